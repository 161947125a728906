"""The command line every fuzz target shares.

``python fuzz/fuzz_X.py --corpus-only PATH...`` replays seed files (PATH is a
directory of them or one file) without atheris, as CI does;
``--make-corpus DIR`` writes the target's seeds; anything else is passed to
atheris (libFuzzer flags such as ``-max_total_time=N`` and a corpus dir).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from virtnet.memory import GuestMemory, MemoryRegion
from virtnet.virtq import Chain

#: Bytes around a target's guest memory that must never change, and their value.
GUARD = 256
GUARD_BYTE = b"\xee"


class GuardedMemory:
    """Guest memory of ``size`` bytes holding ``body`` (cut or zero-padded),
    a window of a bigger buffer whose :data:`GUARD` bytes either side must
    stay as they were: a write outside guest memory shows in :meth:`intact`."""

    def __init__(self, body: bytes, size: int) -> None:
        self.size = size
        self.backing = (
            bytearray(GUARD_BYTE * GUARD) + bytearray(size) + bytearray(GUARD_BYTE * GUARD)
        )
        self.backing[GUARD : GUARD + min(len(body), size)] = body[:size]
        self.region = MemoryRegion(0, size, 0x10000, memoryview(self.backing)[GUARD : GUARD + size])
        self.mem = GuestMemory([self.region])

    def use(self, chains: Iterable[Chain]) -> None:
        """What a device does with popped chains: every buffer must be a view
        of guest memory; the first writable one gets a byte."""
        for ch in chains:
            for b in (*ch.out, *ch.in_):
                assert b.obj is self.region.buf.obj, "view outside guest memory"
            if ch.in_:
                ch.in_[0][:1] = b"\x01"

    def intact(self) -> bool:
        return (
            self.backing[:GUARD] == GUARD_BYTE * GUARD
            and self.backing[-GUARD:] == GUARD_BYTE * GUARD
        )


def corpus_files(paths: Sequence[str]) -> Iterator[Path]:
    """Files named directly, and the files of named directories, in sorted order."""
    for p in map(Path, paths):
        if p.is_dir():
            yield from sorted(f for f in p.iterdir() if f.is_file())
        else:
            yield p


def main(
    name: str,
    test_one_input: Callable[[bytes], None],
    seeds: Callable[[], dict[str, bytes]] | None = None,
    argv: Sequence[str] | None = None,
) -> int:
    args = list(sys.argv if argv is None else argv)
    if len(args) >= 2 and args[1] in ("--corpus-only", "--replay"):
        n = 0
        for f in corpus_files(args[2:]):
            test_one_input(f.read_bytes())
            n += 1
        print(f"{name}: replayed {n} inputs, all clean")
        return 0
    if len(args) >= 2 and args[1] == "--make-corpus":
        if seeds is None:
            print(f"{name}: this target has no seed generator", file=sys.stderr)
            return 2
        if len(args) < 3:
            print(f"{name}: usage: --make-corpus DIR", file=sys.stderr)
            return 2
        out = Path(args[2])
        out.mkdir(parents=True, exist_ok=True)
        for seed_name, blob in seeds().items():
            (out / seed_name).write_bytes(blob)
        return 0
    import atheris

    atheris.instrument_all()
    atheris.Setup(args, test_one_input)
    atheris.Fuzz()
    return 0
