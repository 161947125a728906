"""The issue's "at least 16" queue pairs, with a real guest: QEMU 10 (TCG,
2 vCPUs) with ``-netdev vhost-user,queues=16`` on ``virtnet serve --queues 16
--port tap``, which serve creates with 16 queues.  The guest's own virtio_net
takes ``ethtool -L eth0 combined 16``; TCP with 32 streams both ways then puts
packets on every rx and tx queue, serve runs one worker per pair, and going
back to 1 pair stops the other 15.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from virtnet.testing.guest import wait_for
from virtnet.testing.serve import ServedGuest, guest_on_tap, iperf_until_every_queue_moved

pytestmark = [pytest.mark.vm, pytest.mark.root, pytest.mark.timeout(600)]

QUEUES = 16
HOST_IP, GUEST_IP = "10.79.0.1", "10.79.0.2"


@pytest.fixture(scope="module")
def setup(guest_initramfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedGuest]:
    with guest_on_tap(
        tmp_path_factory.mktemp("serve-16"),
        guest_initramfs,
        queues=QUEUES,
        host_cidr=f"{HOST_IP}/24",
        guest_cidr=f"{GUEST_IP}/24",
        serve_creates_tap=True,
    ) as s:
        yield s


def test_sixteen_pairs_all_carry_traffic(setup: ServedGuest) -> None:
    s = setup
    g = s.guest
    assert g.channels().max_combined == QUEUES
    g.set_channels(QUEUES)
    assert wait_for(partial(ServedGuest.enabled_is, s, QUEUES), timeout=30), s.pairs()
    assert wait_for(lambda: g.ping(HOST_IP, count=1, timeout=4), timeout=30), g.console_tail()
    rx, tx = iperf_until_every_queue_moved(
        g, s.ns, HOST_IP, QUEUES, streams=(32, 32, 32, 32), seconds=1
    )
    assert all(rx.get(q, 0) > 0 for q in range(QUEUES)), rx
    assert all(tx.get(q, 0) > 0 for q in range(QUEUES)), tx
    pairs = s.pairs()
    assert len({p["pid"] for p in pairs}) == QUEUES and all(p["pid"] for p in pairs), pairs
    assert all(p["errors"] == 0 for p in pairs), pairs
    # more worker processes than the CPUs serve may use: said once, with the remedy
    assert "--workers" in s.log.read_text()


def test_back_to_one_pair(setup: ServedGuest) -> None:
    s = setup
    g = s.guest
    g.set_channels(1)
    assert wait_for(partial(ServedGuest.enabled_is, s, 1), timeout=30), s.pairs()
    assert wait_for(lambda: all(p["pid"] == 0 for p in s.pairs()[1:]), timeout=30), s.pairs()
    with s.ns.iperf3_server():
        out = g.iperf3(f"-c {HOST_IP} -P 4 -t 1 -i 0 -R")
        assert "receiver" in out, out
