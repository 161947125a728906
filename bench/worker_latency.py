"""One frame at a time through a queue-pair worker vs a bare eventfd ping-pong.

The guest runs (``guest_runs.py``) are latency-bound under TCG: a TCP sender
waits for transmit completions.  This bench isolates the cost of one round
trip through a forked :mod:`virtnet.vhost_user.worker` (``--port null``):
the driver (in this process, over a memfd the worker maps itself) adds one
64-byte frame, kicks the worker's eventfd, sleeps in ``epoll`` on the call
eventfd and takes the used entry.  The peer, measured in the same run, is
the floor any two-process design pays: two processes bouncing an eventfd
(``epoll_wait``, ``read``, ``write``), no ring work at all.

Run: ``python bench/worker_latency.py [--frames 20000] [--repeat 3]``
(no root, no VM).
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import os
import select
import statistics
import sys
import time
from collections.abc import Sequence

from virtnet.memory import GuestMemory, MemoryRegion
from virtnet.net import NetFeature
from virtnet.vhost_user.worker import NFIELDS, RegionSpec, RingSpec, WorkerSpec, spawn_worker
from virtnet.virtq import DriverQueue, split_ring_layout

MEM = 4 << 20
QSIZE = 256
RINGS = (0x10000, 0x20000)
FRAME_AT = 0x200000
USER_ADDR = 0x7F0000000000
FEATURES = int(NetFeature.VERSION_1 | NetFeature.MRG_RXBUF | NetFeature.EVENT_IDX)
FRAME = bytes(12) + b"\x02" * 6 + b"\x02\x00\x00\x00\x00\x02" + b"\x08\x00" + bytes(50)


def eventfd_pingpong(frames: int) -> float:
    """Seconds per round trip of a bare two-process eventfd ping-pong."""
    a = os.eventfd(0, os.EFD_NONBLOCK)
    b = os.eventfd(0, os.EFD_NONBLOCK)
    pid = os.fork()
    if pid == 0:  # pragma: no cover -- child
        ep = select.epoll()
        ep.register(a, select.EPOLLIN)
        for _ in range(frames):
            ep.poll(-1)
            os.eventfd_read(a)
            os.eventfd_write(b, 1)
        os._exit(0)
    ep = select.epoll()
    ep.register(b, select.EPOLLIN)
    t0 = time.perf_counter()
    for _ in range(frames):
        os.eventfd_write(a, 1)
        ep.poll(-1)
        os.eventfd_read(b)
    dt = time.perf_counter() - t0
    os.waitpid(pid, 0)
    for fd in (a, b):
        os.close(fd)
    return dt / frames


def worker_roundtrip(frames: int) -> tuple[float, int]:
    """Seconds per one-frame round trip through a worker; the worker's wake-ups."""
    memfd = os.memfd_create("bench-guest", 0)
    os.ftruncate(memfd, MEM)
    mem = GuestMemory([MemoryRegion.from_fd(memfd, guest_addr=0, size=MEM, user_addr=USER_ADDR)])
    lay = split_ring_layout(QSIZE)
    queues = [
        DriverQueue(mem, QSIZE, b + lay.desc, b + lay.avail, b + lay.used, event_idx=True)
        for b in RINGS
    ]
    efds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(4)]  # kick rx, kick tx, call rx, tx
    rings = [
        RingSpec(i, QSIZE, b + lay.desc, b + lay.avail, b + lay.used, 0, efds[i], efds[2 + i], None)
        for i, b in enumerate(RINGS)
    ]
    shm = mmap.mmap(-1, 8 * NFIELDS)
    counters = memoryview(shm).cast("Q")
    spec = WorkerSpec(
        "bench", 0, FEATURES, (RegionSpec(0, MEM, USER_ADDR, 0, memfd),), rings[0], rings[1],
        "null", None,
    )  # fmt: skip
    pid, ctl = spawn_worker(spec, counters)
    tx = queues[1]
    mem.write(FRAME_AT, FRAME)
    ep = select.epoll()
    ep.register(efds[3], select.EPOLLIN)
    try:
        t0 = time.perf_counter()
        for i in range(frames):
            tx.add([(FRAME_AT, len(FRAME))], [], i)
            tx.publish()
            if tx.kick_needed():
                os.eventfd_write(efds[1], 1)
            while not tx.get_used():
                if tx.enable_interrupts(True):
                    continue
                ep.poll(1.0)
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(efds[3])
        dt = time.perf_counter() - t0
        wakes = int(counters[8])  # kicks
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        ctl.close()
        mem.close()
        for fd in (*efds, memfd):
            os.close(fd)
    return dt / frames, wakes


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    if args.frames < 1 or args.repeat < 1:
        ap.error("--frames and --repeat must be >= 1")
    bare: list[float] = []
    ours: list[float] = []
    for _ in range(args.repeat):
        bare.append(eventfd_pingpong(args.frames))
        rt, wakes = worker_roundtrip(args.frames)
        ours.append(rt)
        print(
            f"eventfd ping-pong {bare[-1] * 1e6:7.1f} us   worker round trip "
            f"{rt * 1e6:7.1f} us  ({wakes} kicks for {args.frames} frames)",
            flush=True,
        )
    b, o = statistics.median(bare), statistics.median(ours)
    print(
        f"median: eventfd ping-pong {b * 1e6:.1f} us, worker {o * 1e6:.1f} us per frame; "
        f"the worker's own share {max(0.0, o - b) * 1e6:.1f} us ({o / b:.2f}x the floor)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
