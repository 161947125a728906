"""bench/guest_cpu.py against a real guest on virtnet serve (QEMU 10, TCG).

The bench's figures are what a diagnosis rests on, so the tool itself is
checked: a short host->guest TCP sample must name QEMU's vCPU threads and
serve's worker, count the guest's rx kicks and interrupts and serve's frames,
and report a machine that was busy in between.  Nothing here is timed: no
figure is compared with a speed.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import pytest

pytestmark = [pytest.mark.vm, pytest.mark.root, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def guest_cpu(bench_module: Callable[[str], ModuleType]) -> ModuleType:
    return bench_module("guest_cpu")


def test_guest_cpu_sample_on_virtnet(guest_cpu: ModuleType) -> None:
    r = guest_cpu.measure("virtnet", direction="h2g", seconds=2.0, vcpus=2, queues=1, streams=2)
    print(r.table())
    assert r.test == "tcp" and r.received > 0 and r.seconds >= 2.0
    assert {"qemu main", "qemu CPU 0/TCG", "qemu CPU 1/TCG", "serve"} <= set(r.threads)
    workers = [k for k in r.threads if k.startswith("serve worker ")]
    assert len(workers) == 1 and r.threads[workers[0]] > 0  # the pair's worker did the copying
    assert 0 < r.host_busy <= 100
    assert r.guest["rx_queue_0_packets"] > 0 and r.guest["irq virtio0-input.0"] > 0
    assert r.serve["rx_packets"] > 0 and r.serve["calls"] > 0
    # the backend's count and the guest's agree on what crossed (+-20 %: the two
    # are read a moment apart)
    assert r.serve["rx_packets"] == pytest.approx(r.guest["rx_queue_0_packets"], rel=0.2)
