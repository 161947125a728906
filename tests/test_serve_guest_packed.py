"""A real Linux guest with packed virtqueues on ``virtnet serve --port tap:IF``.

QEMU 10 with ``-device virtio-net-pci,packed=on`` offers VIRTIO_F_RING_PACKED
to the guest when the backend does; Linux's virtio_net then runs every ring
packed (virtio 1.3 section 2.8).  Checks, on 4 pairs: the bit is negotiated on
both sides, ``ethtool -L`` 1, 2, 4 reaches serve, ping and iperf3 TCP both
ways move packets on every queue, a worker killed under traffic resumes from
the used position it published, and the guest's driver reloaded starts fresh
packed rings.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from virtnet.net import NetFeature
from virtnet.testing.guest import wait_for
from virtnet.testing.serve import (
    ServedGuest,
    check_driver_reload,
    check_serve_restart,
    guest_on_tap,
    iperf_until_every_queue_moved,
)

pytestmark = [pytest.mark.vm, pytest.mark.root, pytest.mark.timeout(600)]

QUEUES = 4
HOST_IP = "10.79.0.1"
GUEST_IP = "10.79.0.2"
PACKED_BIT = NetFeature.RING_PACKED.bit_length() - 1  # 34


@pytest.fixture(scope="module")
def setup(guest_initramfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedGuest]:
    with guest_on_tap(
        tmp_path_factory.mktemp("serve-packed"),
        guest_initramfs,
        queues=QUEUES,
        host_cidr=f"{HOST_IP}/24",
        guest_cidr=f"{GUEST_IP}/24",
        device_extra="packed=on",
    ) as s:
        yield s


def test_packed_rings_are_negotiated_on_both_sides(setup: ServedGuest) -> None:
    """The guest driver's feature bits (sysfs: one character per bit) and
    serve's log both say RING_PACKED."""
    bits = setup.guest.run("cat /sys/class/net/eth0/device/features").output.strip()
    assert len(bits) > PACKED_BIT and bits[PACKED_BIT] == "1", bits
    assert "RING_PACKED" in setup.log.read_text()


def test_channels_ping_and_iperf_on_every_queue(setup: ServedGuest) -> None:
    g = setup.guest
    for n in (1, 2, 4):
        g.set_channels(n)
        assert wait_for(partial(ServedGuest.enabled_is, setup, n), timeout=10), setup.pairs()
        assert g.ping(HOST_IP, count=2), g.console_tail()
    rx, tx = iperf_until_every_queue_moved(g, setup.ns, HOST_IP, QUEUES)
    assert all(rx.get(q, 0) > 0 and tx.get(q, 0) > 0 for q in range(QUEUES)), (rx, tx)
    pairs = setup.pairs()
    assert all(p["rx_packets"] > 0 and p["tx_packets"] > 0 for p in pairs), pairs
    assert all(p["errors"] == 0 for p in pairs), pairs


def test_worker_killed_resumes_from_its_published_position(setup: ServedGuest) -> None:
    """SIGKILL one pair's worker under traffic: serve restarts the pair from
    the used positions the worker published, and TCP goes on."""
    g = setup.guest
    g.set_channels(QUEUES)
    assert wait_for(partial(ServedGuest.enabled_is, setup, QUEUES), timeout=10)
    victim = setup.pairs()[1]["pid"]
    with setup.ns.iperf3_server():
        g.run(f"iperf3 -c {HOST_IP} -P 4 -t 4 -i 0 >/tmp/bg.log 2>&1 &")
        time.sleep(1.5)
        os.kill(victim, signal.SIGKILL)
        assert wait_for(lambda: setup.pairs()[1]["restarts"] >= 1, timeout=10)
        assert wait_for(lambda: "receiver" in g.run("cat /tmp/bg.log").output, timeout=30), g.run(
            "cat /tmp/bg.log"
        ).output
        iperf_until_every_queue_moved(g, setup.ns, HOST_IP, QUEUES, streams=(4,))
    assert "resumes from its used position" in setup.log.read_text()
    pairs = setup.pairs()
    assert pairs[1]["pid"] not in (0, victim)
    assert all(p["errors"] == 0 for p in pairs), pairs


def test_driver_reload_starts_fresh_packed_rings(setup: ServedGuest) -> None:
    """rmmod/insmod virtio_net: QEMU stops every ring, resets the device and
    starts new packed rings at the fresh base; traffic resumes."""
    check_driver_reload(setup, HOST_IP, f"{GUEST_IP}/24")


def test_serve_restart_resumes_traffic(setup: ServedGuest) -> None:
    """Kill serve (SIGKILL: workers die with it) and start it again: no guest reboot."""
    check_serve_restart(setup, HOST_IP, pairs=2)
