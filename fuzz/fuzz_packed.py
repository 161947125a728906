"""Fuzz target: the device side of a packed virtqueue over hostile guest memory.

The input is laid out as guest memory: a descriptor ring of ``QSIZE`` slots,
the driver's event suppression area and raw data; its first byte picks the
ring's starting base, EVENT_IDX and the batch size.  The device pops, walks
and pushes whatever the "guest" wrote, and reads its position off the ring
as a restart would; any exception other than
:class:`~virtnet.errors.PeerError` is a bug, and so is a buffer view outside
guest memory or a change to the guard bytes around it.

Run with atheris: ``python fuzz/fuzz_packed.py fuzz/corpus/packed -max_total_time=60``.
Replay the corpus without atheris (CI): ``python fuzz/fuzz_packed.py --corpus-only
fuzz/corpus/packed``.  ``--make-corpus DIR`` writes the seed files.
"""

from __future__ import annotations

import struct
import sys

import harness  # fuzz/harness.py: this script's directory is on sys.path
from harness import GuardedMemory

from virtnet.errors import PeerError
from virtnet.packed import (
    FRESH_BASE,
    VIRTQ_DESC_F_AVAIL,
    PackedDeviceQueue,
    encode_base,
    is_position,
    ring_position,
)

QSIZE = 13  # packed rings need not be powers of 2
MEM = 0x4000
DESC = 0x0
DRIVER = 0x100
DEVICE = 0x104
_D = struct.Struct("<QIHH")


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    flags = data[0]
    g = GuardedMemory(data[1:], MEM)
    start = (flags >> 2) % QSIZE
    base = FRESH_BASE if not flags & 2 else encode_base(start, 0, start, 0)
    try:
        q = PackedDeviceQueue(
            g.mem, QSIZE, DESC, DRIVER, DEVICE, event_idx=bool(flags & 1), base=base
        )
        for _ in range(4):
            chains = q.pop(1 + (flags >> 5))
            g.use(chains)
            if flags & 0x10 and chains:
                q.unpop(len(chains))
                continue
            q.push([(c.head, c.in_len) for c in chains])
            q.should_notify()
            q.enable_notify(bool(flags & 2))
        pos = ring_position(q.desc, QSIZE)
        if pos is not None:
            # Where the ring says the device stands is a position it accepts.
            assert is_position(q.desc, QSIZE, *pos), pos
            q.restart_at(*pos)
    except PeerError:
        pass
    assert g.intact()


def _seed(descs: list[tuple[int, int, int, int]], flags: int = 0) -> bytes:
    mem = bytearray(0x200)
    for i, d in enumerate(descs):
        _D.pack_into(mem, DESC + 16 * i, *d)
    return bytes([flags]) + bytes(mem)


A = VIRTQ_DESC_F_AVAIL  # available on the first lap (wrap counter 1)


def seeds() -> dict[str, bytes]:
    return {
        "single": _seed([(0x1000, 64, 0, A)]),
        "chain": _seed([(0x1000, 12, 0, A | 1), (0x1100, 64, 0, A | 1), (0x1200, 128, 7, A | 2)]),
        "round_the_ring": _seed([(0x1000, 12, 0, A | 1)] * QSIZE),
        "indirect": _seed([(0x800, 32, 3, A | 4)], 1),
        "indirect_next": _seed([(0x800, 32, 3, A | 4 | 1)]),
        "indirect_bad_len": _seed([(0x800, 20, 3, A | 4)]),
        "outside": _seed([(0x3FF0, 0x100, 0, A | 2)]),
        "writable_first": _seed([(0x1000, 12, 0, A | 3), (0x1100, 12, 0, A)]),
        "high_ids": _seed([(0x1000, 64, 0xFFFF, A), (0x1100, 64, 0xFFFE, A)], 0xE0),
        "full_ring_unpop": _seed([(0x1000 + 0x40 * i, 64, i, A) for i in range(QSIZE)], 0xF0),
        "second_lap": _seed([(0x1000, 64, 0, 1 << 15)] * QSIZE, 0x02),
    }


if __name__ == "__main__":
    sys.exit(harness.main("fuzz_packed", test_one_input, seeds))
