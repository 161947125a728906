"""Smoke test of the vhost-user launcher path against a known-good backend (DPDK testpmd).

Proves, before virtnet has a backend of its own, that :class:`Guest` with
:func:`vhost_user_netdev_args` boots under TCG with shared memfd memory, that
``ethtool -L`` reaches a vhost-user backend, and that frames flow on every
queue the guest transmits on: testpmd's ``macswap`` forwarding echoes each
frame back on the queue pair it came in on.
"""

from __future__ import annotations

import glob
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtnet.testing.guest import Guest, queue_deltas, vhost_user_netdev_args, wait_for

pytestmark = [pytest.mark.vm, pytest.mark.dpdk, pytest.mark.timeout(300)]

QUEUES = 4


def _pmd(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/*/dpdk/pmds-*/{name}.so"))
    return found[-1] if found else None


@pytest.fixture(scope="module")
def testpmd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A dpdk-testpmd vhost-user backend (server socket, macswap), torn down after."""
    exe, vhost, ring = shutil.which("dpdk-testpmd"), _pmd("librte_net_vhost"), None
    ring = _pmd("librte_mempool_ring")
    if exe is None or vhost is None or ring is None:
        pytest.skip("dpdk-testpmd with the vhost and mempool_ring PMDs not installed")
    workdir = tmp_path_factory.mktemp("testpmd")
    sock = workdir / "vhu.sock"
    log = (workdir / "testpmd.log").open("w")
    proc = subprocess.Popen(
        [exe, "-l", "0-1", "--no-huge", "--no-pci", "-m", "512",
         "--file-prefix", f"vnt{id(workdir) % 100000}", "-d", vhost, "-d", ring,
         "--vdev", f"net_vhost0,iface={sock},queues={QUEUES}", "--",
         f"--rxq={QUEUES}", f"--txq={QUEUES}", "--nb-cores=1",
         "--forward-mode=macswap", "--auto-start", "--total-num-mbufs=16384"],
        stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        if not wait_for(lambda: sock.exists() or proc.poll() is not None, timeout=30):
            pytest.fail("testpmd did not create its vhost-user socket")
        if proc.poll() is not None:
            pytest.fail(f"testpmd exited: {(workdir / 'testpmd.log').read_text()[-2000:]}")
        yield sock
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def guest(testpmd: Path, guest_initramfs: Path) -> Iterator[Guest]:
    with Guest(
        vhost_user_netdev_args(testpmd, queues=QUEUES),
        initramfs=guest_initramfs,
        ip="10.77.0.2/24",
    ) as g:
        yield g


def test_channels_over_vhost_user(guest: Guest) -> None:
    assert guest.channels().max_combined == QUEUES
    for n in (1, 2, 4, 1):
        guest.set_channels(n)
        assert guest.channels().combined == n


def test_frames_echoed_on_the_same_queue(guest: Guest) -> None:
    guest.set_channels(QUEUES)
    before = guest.ethtool_stats()
    # Frames from both vCPUs to many destinations spread over the tx queues.
    guest.run(
        "for c in 0 1; do for i in $(seq 11 26); do"
        " taskset -c $c arping -c 1 -w 1 -I eth0 10.77.0.$i >/dev/null & done; done; wait",
        check=False,
    )
    deadline = time.monotonic() + 5
    while True:
        after = guest.ethtool_stats()
        rx, tx = queue_deltas(before, after, "rx"), queue_deltas(before, after, "tx")
        echoed = all(rx.get(q, 0) >= n for q, n in tx.items())
        if echoed or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert sum(tx.values()) >= 32, tx
    assert echoed, (rx, tx)
