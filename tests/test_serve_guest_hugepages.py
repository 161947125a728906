"""A real guest whose memory is on huge pages, on ``virtnet serve --port tap``.

vhost-user is deployed with guest RAM on 2-MiB (or 1-GiB) pages: libvirt's
``<memoryBacking><hugepages/>``, OVS-DPDK's and DPDK's own set-ups; a
hugetlbfs file maps only at offsets that are whole huge pages (QEMU aligns its
regions to them).  Both ways QEMU puts guest RAM on huge pages:
``memory-backend-memfd,hugetlb=on`` and ``memory-backend-file`` on a hugetlbfs
mount.  Checks: serve's workers map the guest's huge pages, ``ethtool -L``
reaches serve, ping and iperf3 move packets on every queue both ways.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from virtnet.testing import hugepages
from virtnet.testing.guest import Guest, vhost_user_netdev_args, wait_for
from virtnet.testing.netns import NetNS, unique_name
from virtnet.testing.procs import stop_process
from virtnet.testing.serve import ServedGuest, iperf_until_every_queue_moved, start_tap_serve

pytestmark = [pytest.mark.vm, pytest.mark.root, pytest.mark.timeout(600)]

QUEUES = 2
HOST_IP = "10.83.0.1"
GUEST_IP = "10.83.0.2"
MEMORY_MB = 512
#: The guest's RAM in 2-MiB pages, and a few for QEMU's other RAM blocks.
PAGES = MEMORY_MB // 2 + 16
HUGE_KIB = hugepages.HUGEPAGE_SIZE // 1024


@contextlib.contextmanager
def memory_backend(kind: str) -> Iterator[str]:
    if kind == "memfd-hugetlb":
        yield "memory-backend-memfd,hugetlb=on,hugetlbsize=2M"
    else:
        with hugepages.hugetlbfs_mount() as mount:
            yield f"memory-backend-file,mem-path={mount}"


@pytest.fixture(params=["memfd-hugetlb", "hugetlbfs"])
def setup(
    request: pytest.FixtureRequest, guest_initramfs: Path, tmp_path: Path
) -> Iterator[ServedGuest]:
    with (
        hugepages.reserved(PAGES),
        memory_backend(request.param) as backend,
        NetNS() as ns,
    ):
        tap = unique_name("vntap")
        ns.create_tap(tap)
        ns.set_address(tap, f"{HOST_IP}/24")
        sock, stats, log = tmp_path / "vm.sock", tmp_path / "stats.sock", tmp_path / "serve.log"
        serve = start_tap_serve(ns, tap, sock, stats, log, queues=QUEUES)
        try:
            with Guest(
                vhost_user_netdev_args(sock, queues=QUEUES, reconnect_ms=500),
                initramfs=guest_initramfs,
                ip=f"{GUEST_IP}/24",
                memory_mb=MEMORY_MB,
                memory_backend=backend,
            ) as guest:
                yield ServedGuest(guest, ns, tap, sock, stats, log, serve, QUEUES)
        finally:
            stop_process(serve)
            print(log.read_text()[-6000:])


def huge_page_mapped_kib(pid: int) -> int:
    """KiB that ``pid`` maps in 2-MiB pages (``/proc/PID/smaps``)."""
    total = size = 0
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == "Size":
            size = int(value.split()[0])
        elif key == "KernelPageSize" and int(value.split()[0]) == HUGE_KIB:
            total += size
    return total


def test_guest_on_huge_pages_moves_traffic_on_every_queue(setup: ServedGuest) -> None:
    g = setup.guest
    for n in (1, 2):
        g.set_channels(n)
        assert wait_for(partial(ServedGuest.enabled_is, setup, n), timeout=10), setup.pairs()
        assert g.ping(HOST_IP, count=2), g.console_tail()
    for p in setup.pairs():
        assert huge_page_mapped_kib(p["pid"]) >= MEMORY_MB * 1024 // 2, p
    rx, tx = iperf_until_every_queue_moved(g, setup.ns, HOST_IP, QUEUES)
    assert all(rx.get(q, 0) > 0 and tx.get(q, 0) > 0 for q in range(QUEUES)), (rx, tx)
    pairs = setup.pairs()
    assert all(p["rx_packets"] > 0 and p["tx_packets"] > 0 for p in pairs), pairs
    assert all(p["errors"] == 0 for p in pairs), pairs
    assert "ERROR" not in setup.log.read_text()
