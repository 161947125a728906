"""The guest harness itself: initramfs contents, caching and the command agent."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtnet.testing.guest import (
    GUEST_MODULES,
    Guest,
    GuestCommandError,
    GuestError,
    build_initramfs,
    find_kernel,
    queue_deltas,
    queue_packets,
    skip_reason,
    tap_netdev_args,
    vhost_user_netdev_args,
)

needs_host = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))


def test_netdev_args() -> None:
    assert tap_netdev_args("t0", queues=4) == [
        "-netdev",
        "tap,id=n0,ifname=t0,script=no,downscript=no,vhost=off,queues=4",
        "-device",
        "virtio-net-pci,netdev=n0,mac=52:54:00:77:00:02,mq=on,vectors=10",
    ]
    args = vhost_user_netdev_args("/run/s.sock", queues=2, server=True)
    assert args[:2] == ["-chardev", "socket,id=n0c,path=/run/s.sock,server=on"]
    assert "vhost-user,id=n0,chardev=n0c,queues=2" in args
    assert args[-1].endswith("mq=on,vectors=6")


def test_queue_stats_helpers() -> None:
    before = {"rx_queue_0_packets": 1, "rx_queue_1_packets": 5, "tx_queue_0_packets": 2}
    after = {"rx_queue_0_packets": 4, "rx_queue_1_packets": 5, "tx_queue_0_packets": 9}
    assert queue_packets(after, "rx") == {0: 4, 1: 5}
    assert queue_deltas(before, after, "rx") == {0: 3, 1: 0}
    assert queue_deltas(before, after, "tx") == {0: 7}


@needs_host
def test_initramfs_contents_and_cache(tmp_path: Path) -> None:
    t0 = time.monotonic()
    first = build_initramfs(tmp_path)
    t1 = time.monotonic()
    again = build_initramfs(tmp_path)
    t2 = time.monotonic()
    assert first == again
    assert t2 - t1 < max(1.0, t1 - t0)
    listing = subprocess.run(
        ["cpio", "-it", "--quiet"], stdin=first.open("rb"), capture_output=True, check=True
    ).stdout.decode()
    names = set(listing.split())
    for needed in ("init", "bin/busybox", "bin/sh", "usr/bin/iperf3", "usr/bin/ethtool",
                   "lib64/ld-linux-x86-64.so.2", "dev/console", "etc/virtnet/modules"):  # fmt: skip
        assert needed in names, needed
    for mod in GUEST_MODULES:
        assert f"lib/modules/{mod}.ko" in names, mod
    assert find_kernel()[1]


@pytest.fixture(scope="module")
def bare_guest(guest_initramfs: Path) -> Iterator[Guest]:
    with Guest(initramfs=guest_initramfs, memory_mb=256, smp=1) as g:
        yield g


@pytest.mark.vm
def test_agent_roundtrip(bare_guest: Guest) -> None:
    g = bare_guest
    assert g.run("echo hello").output == "hello\n"
    # Output that looks like the framing must not confuse the channel.
    tricky = "@@VIRTNET-END 1 0@@\n@@VIRTNET-BEGIN 2@@"
    assert g.run(f"printf '%s' '{tricky}'").output == tricky
    big = g.run("seq 1 20000").output.split()
    assert len(big) == 20000 and big[-1] == "20000"
    res = g.run("echo oops >&2; exit 7", check=False)
    assert res == (7, "oops\n")
    with pytest.raises(GuestCommandError) as info:
        g.run("false")
    assert info.value.status == 1


@pytest.mark.vm
def test_agent_timeout_kills_command(bare_guest: Guest) -> None:
    res = bare_guest.run("sleep 30", timeout=1, check=False)
    assert res.status == 137
    assert bare_guest.run("echo alive").output == "alive\n"


@pytest.mark.vm
def test_modules_loaded(bare_guest: Guest) -> None:
    out = bare_guest.run("lsmod").output
    for mod in GUEST_MODULES:
        assert mod in out
    assert "virtnet-init" not in bare_guest.console_tail(200)


@pytest.mark.vm
def test_agent_survives_orphans(bare_guest: Guest) -> None:
    # Orphans are re-parented to PID 1, never to the agent, so their exits
    # cannot interrupt the agent while it reads the next request.
    for i in range(30):
        cmd = f"(sleep 0.{i % 4} &); echo {i}"
        assert bare_guest.run(cmd).output == f"{i}\n"


@pytest.mark.vm
def test_qmp(bare_guest: Guest) -> None:
    status = bare_guest.qmp("query-status")
    assert isinstance(status, dict) and status["running"] is True


@needs_host
def test_qemu_failure_is_reported(guest_initramfs: Path) -> None:
    with (
        pytest.raises(GuestError, match="no-such-option"),
        Guest(initramfs=guest_initramfs, extra_args=["-no-such-option"], boot_timeout=30),
    ):
        pass
