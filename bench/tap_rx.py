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
[--repeat 5] [--size 64] [--rings split packed]``.  No VM.
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

from virtnet.demo import build_frame
from virtnet.ports.base import Offload
from virtnet.ports.tap import TapQueue
from virtnet.testing.netns import unique_name
from virtnet.testing.worker import QSIZE, WorkerHarness, quiet_tap

BUF_LEN = 1530  # what Linux's virtio_net posts for a 1500-byte MTU with MRG_RXBUF


@contextlib.contextmanager
def tap_with_sender(burst: int) -> Iterator[tuple[TapQueue, int, socket.socket]]:
    """A fresh tap (up, offloads on, a queue deep enough for ``burst``): its
    queue, the queue's fd and an ``AF_PACKET`` socket that writes frames
    towards that fd."""
    name = unique_name("vnrx")
    port = quiet_tap(name)
    try:
        queue = port.queue(0)
        port.set_offloads({Offload.CSUM, Offload.TSO4, Offload.TSO6})
        # tun's per-queue ring is txqueuelen frames long; the burst must fit.
        subprocess.run(["ip", "link", "set", name, "txqueuelen", str(burst + 1000)], check=True)
        sender = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        try:
            sender.bind((name, 0))
            fd = queue.fileno()
            assert fd is not None  # a tap queue is an fd
            yield queue, fd, sender
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


def worker_drain(h: WorkerHarness, sender: socket.socket, frame: bytes, frames: int) -> float:
    """Seconds per frame in the worker's ``rx_batch`` for ``frames`` frames;
    the buffers go back to the ring after every batch (driver time not
    counted)."""
    for _ in range(frames):
        sender.send(frame)
    w, rx = h.worker, h.rx
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
            h.post(token, (BUF_LEN,))
        rx.publish()
        if k == 0 and not w.rx_stalled:
            break
    if n != frames:
        raise RuntimeError(f"worker: {n} of {frames} frames reached the ring")
    return spent / n


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=15000, help="frames per timed drain")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--size", type=int, default=64, help="frame size, 60..1514 bytes")
    ap.add_argument(
        "--rings",
        nargs="+",
        default=["split"],
        choices=["split", "packed"],
        help="the worker's virtqueue layout; several: each measured in every round",
    )
    args = ap.parse_args(argv)
    if args.frames < 1 or args.repeat < 1:
        ap.error("--frames and --repeat must be >= 1")
    if not 60 <= args.size <= 1514:
        ap.error("--size must be 60..1514 (one receive buffer)")
    if os.geteuid() != 0:
        print("tap_rx.py needs root (it creates a tap)", file=sys.stderr)
        return 2
    frame = build_frame(0, 0, args.size)
    bare: list[float] = []
    ours: dict[str, list[float]] = {ring: [] for ring in args.rings}
    with tap_with_sender(args.frames) as (queue, fd, sender):
        harness = {
            ring: WorkerHarness(queue, gso=True, mtu=1500, packed=ring == "packed")
            for ring in args.rings
        }
        try:
            for h in harness.values():
                for slot in range(QSIZE):
                    h.post(slot, (BUF_LEN,))
                h.rx.publish()
            for r in range(args.repeat):
                bare.append(bare_readv(fd, sender, frame, args.frames))
                line = f"round {r}: bare readv {bare[-1] * 1e6:.2f} us/frame"
                for ring, h in harness.items():
                    ours[ring].append(worker_drain(h, sender, frame, args.frames))
                    line += f", worker rx_batch ({ring}) {ours[ring][-1] * 1e6:.2f} us/frame"
                print(line, flush=True)
        finally:
            for h in harness.values():
                h.close()
    b = statistics.median(bare)
    for ring, figures in ours.items():
        o = statistics.median(figures)
        print(
            f"median of {args.repeat} x {args.frames} frames of {args.size} B, {ring} rings:"
            f" bare readv {b * 1e6:.2f} us, worker {o * 1e6:.2f} us per frame; the worker's"
            f" own share {max(0.0, o - b) * 1e6:.2f} us ({o / b:.2f}x the floor)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
