"""``virtnet serve --port loopback`` against DPDK's virtio-user PMD (dpdk-testpmd).

testpmd forwards in ``io`` mode after ``start tx_first``: every burst it
sends comes back on the same queue pair (loopback), so packets keep
circulating on every queue.  The queue count then changes at run time
(``port stop``, ``port config all rxq/txq 1``, ``port start``): the second
pair is disabled, its worker stops, and traffic continues on pair 0.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from virtnet.testing import hugepages
from virtnet.testing.guest import wait_for
from virtnet.testing.procs import stop_process
from virtnet.vhost_user.stats import fetch

pytestmark = [pytest.mark.dpdk, pytest.mark.timeout(180)]

TESTPMD = shutil.which("dpdk-testpmd")
#: testpmd's memory: anonymous (``--no-huge`` then needs ``-m``); or 2-MiB
#: huge pages from a hugetlbfs mount, one file per memory segment list (the
#: vhost-user memory table takes at most 8 regions).
NO_HUGE = ("--no-huge", "-m", "512")
HUGE_PAGES = 300


def on_huge_pages(mount: Path) -> tuple[str, ...]:
    return ("--huge-dir", str(mount), "--single-file-segments", "-m", "512")


def _pmd(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/*/dpdk/pmds-*/{name}.so"))
    return found[-1] if found else None


def _serve(tmp: Path, *args: str) -> tuple[subprocess.Popen[bytes], Path, Path]:
    sock, stats = tmp / "vm.sock", tmp / "stats.sock"
    log = (tmp / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "virtnet.cli", "-v", "serve", "--socket", str(sock),
         "--stats-socket", str(stats), *args],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert wait_for(lambda: stats.exists() or proc.poll() is not None, timeout=20)
    assert proc.poll() is None, (tmp / "serve.log").read_text()
    return proc, sock, stats


class PmdProcess:
    """dpdk-testpmd in interactive mode, driven through stdin."""

    def __init__(self, tmp: Path, vdev: str, *extra: str, memory: Sequence[str] = NO_HUGE) -> None:
        virtio, ring = _pmd("librte_net_virtio"), _pmd("librte_mempool_ring")
        if TESTPMD is None or virtio is None or ring is None:
            pytest.skip("dpdk-testpmd with the virtio and mempool_ring PMDs is not installed")
        self.log_path = tmp / "testpmd.log"
        self.log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [TESTPMD, "-l", "0-1", *memory, "--no-pci", "--file-prefix", f"vnts{os.getpid()}",
             "-d", virtio, "-d", ring, "--vdev", vdev,
             "--", "-i", "--nb-cores=1", "--total-num-mbufs=16384", *extra],
            stdin=subprocess.PIPE, stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def cmd(self, line: str, wait: float = 0.3) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        time.sleep(wait)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.cmd("stop", 0.5)
                self.cmd("quit", 0.1)
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(params=["0", "1"], ids=["process-per-pair", "one-process"])
def serve_loopback(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[Path, Path, Path]]:
    """``--workers 0``: a process per pair; ``--workers 1``: both pairs in one process."""
    proc, sock, stats = _serve(
        tmp_path, "--port", "loopback", "--queues", "2", "--workers", request.param
    )
    try:
        yield sock, stats, tmp_path
    finally:
        assert stop_process(proc) == 0, (tmp_path / "serve.log").read_text()[-3000:]


def _pairs(stats: Path) -> list[dict[str, int]]:
    doc = fetch(str(stats))
    pairs: list[dict[str, int]] = doc["vms"][0]["pairs"]
    return pairs


@pytest.mark.parametrize("in_order", [True, False], ids=["in-order", "any-order"])
@pytest.mark.parametrize("ring", ["split", "packed"])
def test_testpmd_io_forwarding_on_two_queues_then_one(
    serve_loopback: tuple[Path, Path, Path], ring: str, in_order: bool
) -> None:
    """``packed``: virtio-user's ``packed_vq=1`` negotiates VIRTIO_F_RING_PACKED;
    virtio-user asks for VIRTIO_F_IN_ORDER unless ``in_order=0`` (and then
    takes its in-order receive and transmit paths)."""
    io_forwarding_on_two_queues_then_one(*serve_loopback, ring=ring, in_order=in_order)


@pytest.mark.root
def test_testpmd_on_huge_pages(tmp_path: Path) -> None:
    """testpmd's memory on 2-MiB huge pages, as DPDK is deployed: serve maps
    the regions of a hugetlbfs file (offsets and sizes in whole huge pages)."""
    reason = hugepages.skip_reason(HUGE_PAGES)
    if reason is not None:
        pytest.skip(reason)
    proc, sock, stats = _serve(tmp_path, "--port", "loopback", "--queues", "2")
    try:
        with hugepages.reserved(HUGE_PAGES), hugepages.hugetlbfs_mount() as mount:

            def workers_map_huge_pages() -> None:
                for p in _pairs(stats):
                    maps = Path(f"/proc/{p['pid']}/maps").read_text()
                    assert str(mount) in maps, maps

            io_forwarding_on_two_queues_then_one(
                sock,
                stats,
                tmp_path,
                ring="split",
                memory=on_huge_pages(mount),
                while_two=workers_map_huge_pages,
            )
    finally:
        assert stop_process(proc) == 0, (tmp_path / "serve.log").read_text()[-3000:]


def io_forwarding_on_two_queues_then_one(
    sock: Path,
    stats: Path,
    tmp: Path,
    *,
    ring: str,
    in_order: bool = True,
    memory: Sequence[str] = NO_HUGE,
    while_two: Callable[[], None] | None = None,
) -> None:
    """testpmd io-forwards on 2 queue pairs against ``serve --port loopback``
    (``while_two`` runs then), then on 1 after a run-time queue count change."""
    vdev = f"net_virtio_user0,path={sock},queues=2,cq=1" + (
        ",packed_vq=1" if ring == "packed" else ""
    )
    if not in_order:
        vdev += ",in_order=0"
    pmd = PmdProcess(tmp, vdev, "--rxq=2", "--txq=2", memory=memory)
    try:
        assert wait_for(lambda: "testpmd>" in pmd.output(), timeout=30), pmd.output()
        pmd.cmd("set fwd io")
        pmd.cmd("start tx_first", 2.0)
        a = _pairs(stats)
        time.sleep(1.0)
        b = _pairs(stats)
        for p in (0, 1):
            assert b[p]["enabled"] == 1
            assert b[p]["rx_packets"] > a[p]["rx_packets"] > 0, (p, a, b)
            assert b[p]["tx_packets"] > a[p]["tx_packets"] > 0, (p, a, b)
        if while_two is not None:
            while_two()
        # Queue count change at run time.
        pmd.cmd("stop", 0.5)
        pmd.cmd("port stop 0", 1.0)
        pmd.cmd("port config all rxq 1")
        pmd.cmd("port config all txq 1")
        pmd.cmd("port start 0", 2.0)
        pmd.cmd("start tx_first", 2.0)
        c = _pairs(stats)
        time.sleep(1.0)
        d = _pairs(stats)
        assert d[0]["enabled"] == 1 and d[1]["enabled"] == 0, d
        assert d[0]["rx_packets"] > c[0]["rx_packets"], (c, d)
        assert d[1]["rx_packets"] == c[1]["rx_packets"], (c, d)
        assert all(p["errors"] == 0 for p in d)
        pmd.cmd("stop", 0.5)
        out = pmd.output()
        assert "RX-packets" in out
    finally:
        pmd.close()
    log = (tmp / "serve.log").read_text()
    assert "negotiated features" in log and "ring 3 disabled" in log
    assert ("RING_PACKED" in log) is (ring == "packed")
    assert ("IN_ORDER" in log) is in_order
    assert "broken" not in log and "ERROR" not in log, log[-3000:]


def test_client_mode_dials_testpmd_server(tmp_path: Path) -> None:
    """``serve --client``: testpmd's virtio-user listens (server=1), serve dials with retry."""
    from virtnet.testing.dpdk import TestPmd, skip_reason

    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    sock, stats, log = tmp_path / "vu.sock", tmp_path / "stats.sock", tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "virtnet.cli", "-v", "serve", "--client", "--socket",
             str(sock), "--port", "null", "--queues", "1", "--stats-socket", str(stats)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        assert wait_for(stats.exists, timeout=20), log.read_text()
        with TestPmd.virtio_user(sock, server=True, fwd="txonly") as pmd:
            pmd.start_forwarding()
            assert wait_for(lambda: _pairs(stats)[0]["tx_packets"] > 10000, timeout=20), (
                log.read_text()[-2000:]
            )
            pmd.stop_forwarding()
    finally:
        assert stop_process(proc) == 0
