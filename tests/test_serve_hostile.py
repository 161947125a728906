"""A hostile vhost-user client against ``virtnet serve`` while another VM keeps working.

``virtnet serve --port loopback`` serves two sockets.  VM "good" is a
well-behaved frontend (:class:`~virtnet.vhost_user.frontend.VhostUserFrontend`)
whose frames come back through the loopback before, during and after the
attack.  On socket "bad" we send garbage headers, wrong fd counts, ring
addresses outside guest memory, and -- through an otherwise valid session --
descriptor loops and out-of-range buffers written into guest memory.  The
server must log a clear error for each, drop (or, for ring content, stop
serving the broken ring of) that VM only, and keep serving "good".
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtnet.testing.guest import wait_for
from virtnet.testing.procs import stop_process
from virtnet.vhost_user.codec import (
    U64,
    MemRegion,
    MemTable,
    Request,
    VringAddr,
    VringFd,
    VringState,
    encode_request,
)
from virtnet.vhost_user.frontend import VhostUserFrontend
from virtnet.vhost_user.stats import fetch

pytestmark = pytest.mark.timeout(120)

MAC_A = b"\x02\x00\x00\x00\x00\x0a"
MAC_B = b"\x02\x00\x00\x00\x00\x0b"


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[tuple[Path, Path, Path, Path]]:
    good, bad, stats, log = (
        tmp_path / "good.sock",
        tmp_path / "bad.sock",
        tmp_path / "stats.sock",
        tmp_path / "serve.log",
    )
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "virtnet.cli", "serve", "--socket", str(good),
             "--socket", str(bad), "--port", "loopback", "--queues", "2",
             "--stats-socket", str(stats)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        assert wait_for(lambda: stats.exists() or proc.poll() is not None, timeout=20)
        assert proc.poll() is None, log.read_text()
        yield good, bad, stats, log
        assert proc.poll() is None, "serve died:\n" + log.read_text()[-4000:]
    finally:
        stop_process(proc)
    assert proc.returncode == 0, log.read_text()[-4000:]


def _frame(n: int) -> bytes:
    return MAC_B + MAC_A + b"\x08\x00" + struct.pack(">I", n) + bytes(46)


def _echo(fe: VhostUserFrontend, n: int = 20) -> int:
    """Send n frames, count the ones that come back (loopback) within 5 s."""
    sent = fe.send([_frame(i) for i in range(n)])
    got = 0
    deadline = time.monotonic() + 5
    while got < sent and time.monotonic() < deadline:
        got += len(fe.receive(timeout=0.2))
    return got


def _raw(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(str(path))
    return s


def _closed_by_server(s: socket.socket) -> bool:
    try:
        while True:
            data = s.recv(4096)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    finally:
        s.close()


def test_hostile_client_is_dropped_and_other_vm_keeps_working(
    serve: tuple[Path, Path, Path, Path],
) -> None:
    good, bad, stats, log = serve
    with VhostUserFrontend(good, queue_pairs=2, mac=MAC_A) as fe:
        fe.set_queue_pairs(2)
        assert _echo(fe) == 20

        # 1. Garbage header (unknown request, bad version flags).
        s = _raw(bad)
        s.sendall(b"\xff" * 12 + b"\x00" * 8)
        assert _closed_by_server(s)

        # 2. SET_MEM_TABLE announcing a region but carrying no fd.
        s = _raw(bad)
        table = MemTable((MemRegion(0, 1 << 20, 0x10000000, 0),))
        s.sendall(encode_request(Request.SET_MEM_TABLE, table))
        assert _closed_by_server(s)

        # 3. A memfd that is smaller than the region it claims (would SIGBUS).
        s = _raw(bad)
        fd = os.memfd_create("small", 0)
        os.ftruncate(fd, 4096)
        socket.send_fds(s, [encode_request(Request.SET_MEM_TABLE, table)], [fd])
        os.close(fd)
        assert _closed_by_server(s)

        # 4. Ring addresses outside guest memory.
        s = _raw(bad)
        fd = os.memfd_create("mem", 0)
        os.ftruncate(fd, 1 << 20)
        s.sendall(encode_request(Request.SET_OWNER))
        s.sendall(encode_request(Request.SET_FEATURES, U64(1 << 32)))
        socket.send_fds(s, [encode_request(Request.SET_MEM_TABLE, table)], [fd])
        os.close(fd)
        s.sendall(encode_request(Request.SET_VRING_NUM, VringState(1, 256)))
        far = 0x10000000 + (1 << 30)
        s.sendall(encode_request(Request.SET_VRING_ADDR, VringAddr(1, 0, far, far, far, 0)))
        assert _closed_by_server(s)

        # 5. A ring index beyond the rings we offered.
        s = _raw(bad)
        s.sendall(encode_request(Request.SET_VRING_NUM, VringState(200, 256)))
        assert _closed_by_server(s)

        assert _echo(fe) == 20

        # 6. A valid session whose guest writes a descriptor loop into its tx ring.
        with VhostUserFrontend(bad, queue_pairs=2, mac=MAC_B) as evil:
            evil.set_queue_pairs(2)
            assert _echo(evil, 5) == 5
            ring = evil.rings[1]  # tx of pair 0
            assert evil.mem is not None
            avail = evil.mem.view(ring.avail, 4 + 2 * ring.size).cast("H")
            desc = evil.mem.view(ring.desc, 16 * ring.size)
            head = 7
            struct.pack_into("<QIHH", desc, 16 * head, 0x1000, 64, 1, head)  # NEXT -> itself
            idx = avail[1]
            avail[2 + idx % ring.size] = head
            avail[1] = (idx + 1) & 0xFFFF
            os.eventfd_write(ring.kick_fd, 1)
            # and a buffer far outside guest memory on pair 1's tx ring
            ring3 = evil.rings[3]
            avail3 = evil.mem.view(ring3.avail, 4 + 2 * ring3.size).cast("H")
            desc3 = evil.mem.view(ring3.desc, 16 * ring3.size)
            struct.pack_into("<QIHH", desc3, 16 * 3, 1 << 50, 1500, 0, 0)
            idx3 = avail3[1]
            avail3[2 + idx3 % ring3.size] = 3
            avail3[1] = (idx3 + 1) & 0xFFFF
            os.eventfd_write(ring3.kick_fd, 1)

            def broken() -> bool:
                vm = next(v for v in fetch(str(stats))["vms"] if v["name"] == "bad.sock")
                return int(sum(p["errors"] for p in vm["pairs"])) >= 2

            assert wait_for(broken, timeout=10), log.read_text()[-3000:]
            assert _echo(fe) == 20

        # 7. A session whose kick "eventfd" is a regular file and whose call fd
        #    is the read end of a pipe: those rings are refused, nothing crashes.
        s = _raw(bad)
        mem = os.memfd_create("mem", 0)
        os.ftruncate(mem, 1 << 20)
        kick = os.memfd_create("not-an-eventfd", 0)
        call_r, call_w = os.pipe()
        try:
            s.sendall(encode_request(Request.SET_OWNER))
            s.sendall(encode_request(Request.SET_FEATURES, U64(1 << 32)))
            socket.send_fds(s, [encode_request(Request.SET_MEM_TABLE, table)], [mem])
            for idx in (0, 1):
                base = 0x10000000 + 0x10000 * (idx + 1)
                s.sendall(encode_request(Request.SET_VRING_NUM, VringState(idx, 256)))
                s.sendall(encode_request(Request.SET_VRING_BASE, VringState(idx, 0)))
                s.sendall(
                    encode_request(
                        Request.SET_VRING_ADDR,
                        VringAddr(idx, 0, base, base + 0x2000, base + 0x1000, 0),
                    )
                )
                socket.send_fds(s, [encode_request(Request.SET_VRING_CALL, VringFd(idx, False))],
                                [call_r])  # fmt: skip
                socket.send_fds(s, [encode_request(Request.SET_VRING_KICK, VringFd(idx, False))],
                                [kick])  # fmt: skip
            assert wait_for(lambda: "kick fd cannot be polled" in log.read_text(), timeout=10), (
                log.read_text()[-3000:]
            )
            assert _echo(fe) == 20
        finally:
            s.close()
            for fd in (mem, kick, call_r, call_w):
                os.close(fd)

    text = log.read_text()
    assert "dropping frontend" in text
    assert "descriptor loop" in text
    assert "outside guest memory" in text or "not in any region" in text
    doc = fetch(str(stats))
    good_vm = next(v for v in doc["vms"] if v["name"] == "good.sock")
    assert good_vm["errors"] == 0
    assert all(p["errors"] == 0 for p in good_vm["pairs"])
