"""Fuzz target: the device side of a split virtqueue over hostile guest memory.

The input is laid out as guest memory: a descriptor table, an available ring
and raw data.  The device pops, walks and pushes whatever the "guest" wrote;
any exception other than :class:`~virtnet.errors.PeerError` is a bug, and so
is a buffer view that lies outside guest memory or a change to the guard
bytes around it.

Run with atheris: ``python fuzz/fuzz_virtq.py fuzz/corpus/virtq -max_total_time=60``.
Replay the corpus without atheris (CI): ``python fuzz/fuzz_virtq.py --corpus-only
fuzz/corpus/virtq``.  ``--make-corpus DIR`` writes the seed files.
"""

from __future__ import annotations

import struct
import sys

import harness  # fuzz/harness.py: this script's directory is on sys.path
from harness import GuardedMemory

from virtnet.errors import PeerError
from virtnet.virtq import DeviceQueue

QSIZE = 16
MEM = 0x4000
DESC = 0x0
AVAIL = 0x100
USED = 0x200
_D = struct.Struct("<QIHH")


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    flags = data[0]
    g = GuardedMemory(data[1:], MEM)
    used_view = g.mem.view(USED, 6 + 8 * QSIZE)
    used_view[:] = bytes(len(used_view))
    try:
        q = DeviceQueue(g.mem, QSIZE, DESC, AVAIL, USED, event_idx=bool(flags & 1))
        for _ in range(4):
            chains = q.pop(1 + (flags >> 4))
            g.use(chains)
            q.push([(c.head, c.in_len) for c in chains])
            q.should_notify()
            q.enable_notify(bool(flags & 2))
    except PeerError:
        pass
    assert g.intact()


def _seed(descs: list[tuple[int, int, int, int]], heads: list[int], flags: int = 0) -> bytes:
    mem = bytearray(0x400)
    for i, d in enumerate(descs):
        _D.pack_into(mem, DESC + 16 * i, *d)
    struct.pack_into("<HH", mem, AVAIL, 0, len(heads))
    for k, h in enumerate(heads):
        struct.pack_into("<H", mem, AVAIL + 4 + 2 * k, h)
    return bytes([flags]) + bytes(mem)


def seeds() -> dict[str, bytes]:
    return {
        "single": _seed([(0x1000, 64, 0, 0)], [0]),
        "chain": _seed([(0x1000, 12, 1, 1), (0x1100, 64, 1, 2), (0x1200, 128, 2, 0)], [0], 1),
        "loop": _seed([(0x1000, 12, 1, 1), (0x1100, 64, 1, 0)], [0]),
        "indirect": _seed([(0x800, 32, 4, 0)], [0], 3),
        "next_oob": _seed([(0x1000, 12, 1, 40)], [0]),
        "head_oob": _seed([], [99]),
        "ahead": _seed([(0x1000, 4, 0, 0)] * 16, list(range(16)) + [0] * 2, 0x21),
        "outside": _seed([(0x3FF0, 0x100, 2, 0)], [0]),
        "writable_first": _seed([(0x1000, 12, 3, 1), (0x1100, 12, 0, 0)], [0]),
    }


if __name__ == "__main__":
    sys.exit(harness.main("fuzz_virtq", test_one_input, seeds))
