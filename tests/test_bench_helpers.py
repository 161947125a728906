"""The benches' measuring helpers that need no VM (bench/guest_tap_baseline.py,
virtnet.testing.procs)."""

from __future__ import annotations

import importlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import pytest


@pytest.fixture(scope="module")
def baseline() -> Iterator[ModuleType]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    try:
        yield importlib.import_module("guest_tap_baseline")
    finally:
        sys.path.pop(0)


SPIN = """
import time
t = time.process_time()
while time.process_time() - t < 0.3:
    pass
print("spun", flush=True)
time.sleep(60)
"""


def test_tree_cpu_seconds_counts_the_descendants() -> None:
    """A child that burnt 0.3 s of CPU counts towards its own tree and ours,
    and not towards a tree it is not in."""
    import os

    from virtnet.testing.procs import cpu_seconds, tree_cpu_seconds

    before = tree_cpu_seconds(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", SPIN], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "spun"
        assert cpu_seconds(child.pid) >= 0.25
        assert cpu_seconds(child.pid, tid=child.pid) >= 0.25  # its main thread spun
        assert tree_cpu_seconds(child.pid) >= 0.25
        assert tree_cpu_seconds(os.getpid()) - before >= 0.25
        assert tree_cpu_seconds(1) >= tree_cpu_seconds(child.pid)
    finally:
        child.kill()
        child.wait()
    assert cpu_seconds(child.pid) == 0.0  # gone


class _Result(NamedTuple):
    status: int
    output: str


class _FakeGuest:
    def __init__(self, snmp: str) -> None:
        self.snmp = snmp

    def ethtool_stats(self) -> dict[str, int]:
        return {"rx_queue_0_packets": 5, "rx_queue_1_packets": 7, "tx_queue_0_packets": 100}

    def run(self, command: str) -> _Result:
        assert command == "cat /proc/net/snmp"
        return _Result(0, self.snmp)


SNMP = """Ip: Forwarding DefaultTTL
Ip: 2 64
Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors
Udp: 120 0 33 4 33 0
UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors
UdpLite: 0 0 0 0 0 0
"""


def test_guest_rx_counters_reads_nic_rx_and_udp_rcvbuf_errors(baseline: ModuleType) -> None:
    assert baseline.guest_rx_counters(_FakeGuest(SNMP)) == (12, 33)


def test_guest_rx_counters_without_udp_counters_is_an_error(baseline: ModuleType) -> None:
    with pytest.raises(RuntimeError, match="RcvbufErrors"):
        baseline.guest_rx_counters(_FakeGuest("Ip: Forwarding\nIp: 2\n"))
