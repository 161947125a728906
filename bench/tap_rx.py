"""Host -> guest through a tap: a worker's receive path against a bare read loop.

What a queue-pair worker pays per frame on the path that decides 64-byte UDP
into a guest: it reads each frame from a real tap queue fd straight into a
guest receive buffer (``Worker.rx_batch``: one ``readv`` per frame, the used
entry, the counters), the driver side of the ring (in this process, over a
memfd) giving the buffers back after every batch.  The peer, measured in the
same run on the same tap with the same frames, is the floor any backend that
reads a tap pays: a bare ``os.readv`` loop, one frame per syscall, no ring
(a tap has no batched read).  The frames are written into the tap from an
``AF_PACKET`` socket before each timed drain, so only the reading side is
timed.

Run (root: it creates a tap): ``python bench/tap_rx.py [--frames 15000]
[--repeat 5] [--size 64]``.  No VM.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence

from virtnet.memory import GuestMemory, MemoryRegion
from virtnet.net import NetFeature
from virtnet.ports.base import Offload
from virtnet.ports.tap import TapPort
from virtnet.testing.netns import unique_name
from virtnet.vhost_user.worker import RegionSpec, RingSpec, Worker, WorkerSpec
from virtnet.virtq import DriverQueue, split_ring_layout

MEM = 8 << 20
QSIZE = 256
RINGS = (0x10000, 0x20000)
BUF0 = 0x100000
BUF_STRIDE = 2048
BUF_LEN = 1530  # what Linux's virtio_net posts for a 1500-byte MTU with MRG_RXBUF
USER_ADDR = 0x7F0000000000
FEATURES = int(
    NetFeature.VERSION_1
    | NetFeature.MRG_RXBUF
    | NetFeature.EVENT_IDX
    | NetFeature.GUEST_CSUM
    | NetFeature.GUEST_TSO4
    | NetFeature.GUEST_TSO6
)


def udp_frame(size: int) -> bytes:
    """An Ethernet + IPv4 + UDP frame of ``size`` bytes (without the FCS)."""
    ip_len = size - 14
    ip = bytes.fromhex("4500") + ip_len.to_bytes(2, "big") + bytes.fromhex("000040004011")
    ip += bytes(2) + bytes([10, 0, 0, 1, 10, 0, 0, 2])
    udp = bytes.fromhex("13891389") + (ip_len - 20).to_bytes(2, "big") + bytes(2)
    eth = bytes.fromhex("525400123456525400abcdef0800")
    return (eth + ip + udp).ljust(size, b"\0")


@contextlib.contextmanager
def tap_with_sender(burst: int) -> Iterator[tuple[TapPort, int, socket.socket]]:
    """A fresh tap (up, offloads on, a queue deep enough for ``burst``), its
    queue fd and an ``AF_PACKET`` socket that writes frames towards that fd."""
    name = unique_name("vnrx")
    port = TapPort(name)
    try:
        queue = port.open_queue("bench", 0)
        # No IPv6 on it: the kernel's own frames (DAD, MLD) would join the burst.
        with open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "w") as f:
            f.write("1")
        port.set_up(True)
        port.set_offloads({Offload.CSUM, Offload.TSO4, Offload.TSO6})
        # tun's per-queue ring is txqueuelen frames long; the burst must fit.
        subprocess.run(["ip", "link", "set", name, "txqueuelen", str(burst + 1000)], check=True)
        sender = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        try:
            sender.bind((name, 0))
            fd = queue.fileno()
            assert fd is not None  # a tap queue is an fd
            yield port, fd, sender
        finally:
            sender.close()
    finally:
        port.close()


def bare_readv(fd: int, sender: socket.socket, frame: bytes, frames: int) -> float:
    """Seconds per frame of a bare ``readv`` drain of ``frames`` frames."""
    os.set_blocking(fd, False)
    buf = memoryview(bytearray(BUF_LEN))
    for _ in range(frames):
        sender.send(frame)
    n = 0
    t0 = time.perf_counter()
    with contextlib.suppress(BlockingIOError):
        while True:
            os.readv(fd, (buf,))
            n += 1
    dt = time.perf_counter() - t0
    if n != frames:
        raise RuntimeError(f"bare readv: {n} of {frames} frames arrived (tap queue too short?)")
    return dt / n


class RxWorker:
    """A queue-pair worker reading one tap queue into a guest rx ring."""

    def __init__(self, tap_fd: int) -> None:
        self.memfd = os.memfd_create("bench-guest", 0)
        os.ftruncate(self.memfd, MEM)
        self.mem = GuestMemory(
            [MemoryRegion.from_fd(self.memfd, guest_addr=0, size=MEM, user_addr=USER_ADDR)]
        )
        lay = split_ring_layout(QSIZE)
        base = RINGS[0]
        self.rx = DriverQueue(
            self.mem, QSIZE, base + lay.desc, base + lay.avail, base + lay.used, event_idx=True
        )
        self.efds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(4)]
        rings = [
            RingSpec(i, QSIZE, b + lay.desc, b + lay.avail, b + lay.used, 0,
                     self.efds[i], self.efds[2 + i], None)
            for i, b in enumerate(RINGS)
        ]  # fmt: skip
        spec = WorkerSpec(
            "bench", 0, FEATURES, (RegionSpec(0, MEM, USER_ADDR, 0, os.dup(self.memfd)),),
            rings[0], rings[1], "tap", os.dup(tap_fd),  # the worker owns both dups
        )  # fmt: skip
        self.ctl, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.worker = Worker(spec, self.ctl)
        for i in range(QSIZE):
            self.rx.add([], [(BUF0 + i * BUF_STRIDE, BUF_LEN)], i)
        self.rx.publish()

    def drain(self, sender: socket.socket, frame: bytes, frames: int) -> float:
        """Seconds per frame in ``rx_batch`` for ``frames`` frames; the buffers
        go back to the ring after every batch (driver time not counted)."""
        for _ in range(frames):
            sender.send(frame)
        w, rx = self.worker, self.rx
        w.port_readable = True
        n = 0
        spent = 0.0
        while True:
            t0 = time.perf_counter()
            k = w.rx_batch()
            spent += time.perf_counter() - t0
            n += k
            for token, _ in rx.get_used():
                assert isinstance(token, int)
                rx.add([], [(BUF0 + token * BUF_STRIDE, BUF_LEN)], token)
            rx.publish()
            if k == 0 and not w.rx_stalled:
                break
        if n != frames:
            raise RuntimeError(f"worker: {n} of {frames} frames reached the ring")
        return spent / n

    def close(self) -> None:
        w = self.worker
        w.ep.close()
        w.port.close()  # the dup of the tap fd
        w.mem.close()
        self.ctl.close()
        self.peer.close()
        self.mem.close()
        for fd in (*self.efds, self.memfd):
            os.close(fd)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=15000, help="frames per timed drain")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--size", type=int, default=64, help="frame size, 60..1514 bytes")
    args = ap.parse_args(argv)
    if args.frames < 1 or args.repeat < 1:
        ap.error("--frames and --repeat must be >= 1")
    if not 60 <= args.size <= 1514:
        ap.error("--size must be 60..1514 (one receive buffer)")
    if os.geteuid() != 0:
        print("tap_rx.py needs root (it creates a tap)", file=sys.stderr)
        return 2
    frame = udp_frame(args.size)
    bare: list[float] = []
    ours: list[float] = []
    with tap_with_sender(args.frames) as (_, fd, sender):
        rxw = RxWorker(fd)
        try:
            for r in range(args.repeat):
                bare.append(bare_readv(fd, sender, frame, args.frames))
                ours.append(rxw.drain(sender, frame, args.frames))
                print(
                    f"round {r}: bare readv {bare[-1] * 1e6:.2f} us/frame, "
                    f"worker rx_batch {ours[-1] * 1e6:.2f} us/frame",
                    flush=True,
                )
        finally:
            rxw.close()
    b, o = statistics.median(bare), statistics.median(ours)
    print(
        f"median of {args.repeat} x {args.frames} frames of {args.size} B: bare readv "
        f"{b * 1e6:.2f} us, worker {o * 1e6:.2f} us per frame; the worker's own share "
        f"{max(0.0, o - b) * 1e6:.2f} us ({o / b:.2f}x the floor)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
