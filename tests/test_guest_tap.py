"""Proof of the guest harness against QEMU's own tap backend (``-netdev tap,vhost=off``).

One guest with a 4-queue-pair virtio-net NIC is booted per module; its tap is
moved into a test namespace holding 10.77.0.1/24, the guest has 10.77.0.2/24.
The same checks will later be pointed at virtnet's vhost-user backend.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from virtnet.testing.guest import Guest, queue_deltas, tap_netdev_args
from virtnet.testing.netns import NetNS, unique_name

pytestmark = [pytest.mark.vm, pytest.mark.root, pytest.mark.timeout(300)]

QUEUES = 4
HOST_IP = "10.77.0.1"
GUEST_IP = "10.77.0.2"


@dataclass
class Setup:
    guest: Guest
    ns: NetNS
    tap: str


@pytest.fixture(scope="module")
def setup(guest_initramfs: Path) -> Iterator[Setup]:
    tap = unique_name("vntap")
    with (
        NetNS() as ns,
        Guest(
            tap_netdev_args(tap, queues=QUEUES),
            initramfs=guest_initramfs,
            ip=f"{GUEST_IP}/24",
        ) as guest,
    ):
        # QEMU created the multiqueue tap in the root namespace; move it.
        ns.move_link(tap)
        ns.set_address(tap, f"{HOST_IP}/24")
        yield Setup(guest, ns, tap)


def tap_enabled_queues(s: Setup) -> int:
    """Queues QEMU keeps attached to the tap (``numqueues`` of ``ip -d link``)."""
    out = s.ns.ip("-d", "link", "show", "dev", s.tap)
    m = re.search(r"numqueues (\d+)", out)
    assert m, out
    return int(m.group(1))


def test_boot_time_reported(setup: Setup) -> None:
    assert 0 < setup.guest.boot_seconds < 60


@pytest.mark.parametrize("sequence", [(1, 2, 4, 1)])
def test_set_channels(setup: Setup, sequence: tuple[int, ...]) -> None:
    g = setup.guest
    assert g.channels().max_combined == QUEUES
    for n in sequence:
        g.set_channels(n)
        info = g.channels()
        assert info.combined == n, info
        # QEMU followed: exactly n tap queues stay attached.
        assert tap_enabled_queues(setup) == n
    with pytest.raises(Exception, match="exited"):
        g.set_channels(QUEUES + 1)


def test_ping_both_ways(setup: Setup) -> None:
    setup.guest.set_channels(QUEUES)
    assert setup.guest.ping(HOST_IP, count=2), setup.guest.console_tail()
    assert setup.ns.ping(GUEST_IP, count=2)


def _iperf_both_ways(s: Setup, *, streams: int, seconds: int) -> None:
    with s.ns.iperf3_server():
        out = s.guest.iperf3(f"-c {HOST_IP} -P {streams} -t {seconds} -i 0")
        assert "receiver" in out, out
        out = s.guest.iperf3(f"-c {HOST_IP} -P {streams} -t {seconds} -i 0 -R")
        assert "receiver" in out, out


def test_iperf3_tcp_all_queues_used(setup: Setup) -> None:
    g = setup.guest
    g.set_channels(QUEUES)
    before = g.ethtool_stats()
    _iperf_both_ways(setup, streams=4, seconds=3)
    # Flow-to-queue mapping is by hash; a few more flows make an idle queue
    # (a hash collision, not a bug) vanishingly unlikely.
    for _ in range(3):
        after = g.ethtool_stats()
        rx, tx = queue_deltas(before, after, "rx"), queue_deltas(before, after, "tx")
        if all(rx.get(q, 0) > 0 and tx.get(q, 0) > 0 for q in range(QUEUES)):
            break
        _iperf_both_ways(setup, streams=8, seconds=1)
    assert all(rx[q] > 0 for q in range(QUEUES)), rx
    assert all(tx[q] > 0 for q in range(QUEUES)), tx


def test_disabled_queues_stay_idle(setup: Setup) -> None:
    g = setup.guest
    g.set_channels(2)
    before = g.ethtool_stats()
    _iperf_both_ways(setup, streams=4, seconds=1)
    after = g.ethtool_stats()
    rx, tx = queue_deltas(before, after, "rx"), queue_deltas(before, after, "tx")
    assert rx[0] + rx[1] > 0 and tx[0] + tx[1] > 0, (rx, tx)
    # ethtool -S lists only the enabled pairs; a disabled queue gains nothing.
    assert all(d.get(q, 0) == 0 for d in (rx, tx) for q in range(2, QUEUES)), (rx, tx)
