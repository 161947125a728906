"""Grant tables, emulated: a domain's memory is one shared memfd; grants are v1 entries in it.

A domain's memory (:class:`DomainMemory`) is ``pages`` 4 KiB frames of a
memfd.  Frames ``[0, gnttab_frames)`` hold its grant table: packed
``struct grant_entry_v1 { uint16_t flags; domid_t domid; uint32_t frame; }``
(``xen/include/public/grant_table.h``), exactly as a guest keeps it.  The
granting side (:class:`GrantTable`) fills entries; the mapping side
(:class:`GrantMapper`) plays the hypervisor's part of ``GNTTABOP_map_grant_ref``
/ ``GNTTABOP_copy``: it reads the entry from the granter's memory and allows
access only if it permits the mapping domain.

Invariants:

* :class:`GrantMapper` hands out views of *granted pages only*: the ref must
  be in the table and not reserved, the entry must say ``GTF_permit_access``
  for this domain, the frame must be a data frame of the granter's memory
  (never a grant-table frame), and a ``GTF_readonly`` grant yields a
  read-only view and refuses writes.  Anything else raises
  :class:`~virtnet.errors.GrantError`.
* Each check copies the 8-byte entry out once before deciding.
* ``GTF_reading``/``GTF_writing`` (set by real Xen while a grant is mapped) are
  not maintained: the emulation has no atomic compare-and-swap across
  processes, so :meth:`GrantTable.end_access` cannot see in-flight use.  This
  is the one departure from Xen, and it only weakens the *granter's* view.
* The emulation trusts the local processes' claimed domain ids (no hypervisor
  enforces them); the untrusted input is what a guest writes into its rings
  and grant table.
"""

from __future__ import annotations

import mmap
import os
import struct
from typing import Final

from virtnet.errors import GrantError, UsageError

__all__ = [
    "GNTTAB_NR_RESERVED_ENTRIES",
    "GRANT_ENTRY",
    "GTF_PERMIT_ACCESS",
    "GTF_READONLY",
    "PAGE_SIZE",
    "DomainMemory",
    "GrantMapper",
    "GrantTable",
]

PAGE_SIZE: Final = 4096
#: struct grant_entry_v1 (grant_table.h): flags u16, domid u16, frame u32.
GRANT_ENTRY: Final = struct.Struct("<HHI")
ENTRIES_PER_FRAME: Final = PAGE_SIZE // GRANT_ENTRY.size  # 512
_unpack_entry: Final = GRANT_ENTRY.unpack_from
#: grant_table.h: the first 8 refs are reserved (console, xenstore, ...).
GNTTAB_NR_RESERVED_ENTRIES: Final = 8
#: grant_table.h GTF_* flags.
GTF_PERMIT_ACCESS: Final = 1 << 0
GTF_TYPE_MASK: Final = 3
GTF_READONLY: Final = 1 << 2
GTF_READING: Final = 1 << 3
GTF_WRITING: Final = 1 << 4
#: Xen's default ``gnttab_max_frames`` (xen-command-line.pandoc: 64); we cap tables at it.
MAX_GRANT_FRAMES: Final = 64
#: Largest emulated domain: 1 GiB of 4 KiB frames (sparse memfd).
MAX_DOMAIN_PAGES: Final = 1 << 18
DOMID_MAX: Final = 0x7FEF  # below DOMID_FIRST_RESERVED (xen.h)


class DomainMemory:
    """A domain's pseudo-physical memory: a memfd mapped shared."""

    def __init__(self, fd: int, pages: int, gnttab_frames: int) -> None:
        if not 0 < gnttab_frames <= MAX_GRANT_FRAMES or not gnttab_frames < pages:
            raise UsageError("bad grant table size")
        if pages > MAX_DOMAIN_PAGES:
            raise UsageError("domain memory too large")
        self.fd = fd
        self.pages = pages
        self.gnttab_frames = gnttab_frames
        self._mmap = mmap.mmap(fd, pages * PAGE_SIZE, mmap.MAP_SHARED)
        self.view = memoryview(self._mmap)

    @classmethod
    def create(cls, name: str, pages: int, gnttab_frames: int) -> DomainMemory:
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(fd, pages * PAGE_SIZE)
        return cls(fd, pages, gnttab_frames)

    def page(self, frame: int) -> memoryview:
        return self.view[frame * PAGE_SIZE : (frame + 1) * PAGE_SIZE]

    def close(self) -> None:
        try:
            self.view.release()
            self._mmap.close()
        except BufferError:
            pass  # a view is still exported; the mapping dies with the process
        os.close(self.fd)


class GrantTable:
    """The granting domain's side: allocate data frames and grant them."""

    def __init__(self, mem: DomainMemory) -> None:
        self.mem = mem
        self.table = mem.view[: mem.gnttab_frames * PAGE_SIZE]
        nr = mem.gnttab_frames * ENTRIES_PER_FRAME
        self._free = list(range(nr - 1, GNTTAB_NR_RESERVED_ENTRIES - 1, -1))
        self._next_frame = mem.gnttab_frames
        self._free_frames: list[int] = []

    def alloc_frame(self) -> int:
        if self._free_frames:
            return self._free_frames.pop()
        if self._next_frame >= self.mem.pages:
            raise UsageError("domain memory exhausted")
        f = self._next_frame
        self._next_frame += 1
        return f

    def free_frame(self, frame: int) -> None:
        self._free_frames.append(frame)

    def grant_access(self, domid: int, frame: int, *, readonly: bool = False) -> int:
        """gnttab_grant_foreign_access: domid, frame first, then flags."""
        if not self._free:
            raise UsageError("grant table full")
        ref = self._free.pop()
        off = ref * GRANT_ENTRY.size
        struct.pack_into("<HI", self.table, off + 2, domid, frame)
        flags = GTF_PERMIT_ACCESS | (GTF_READONLY if readonly else 0)
        struct.pack_into("<H", self.table, off, flags)
        return ref

    def end_access(self, ref: int) -> None:
        """gnttab_end_foreign_access_ref: clear the entry, recycle the ref."""
        struct.pack_into("<H", self.table, ref * GRANT_ENTRY.size, 0)
        self._free.append(ref)

    def close(self) -> None:
        self.table.release()


class GrantMapper:
    """The mapping domain's side: checked access to pages ``granter`` granted to ``domid``."""

    __slots__ = ("_first_frame", "_nr", "_pages", "_view", "domid", "granter", "mem", "table")

    def __init__(self, mem: DomainMemory, *, domid: int, granter: int) -> None:
        self.mem = mem
        self.domid = domid
        self.granter = granter
        self.table = mem.view[: mem.gnttab_frames * PAGE_SIZE]
        self._nr = mem.gnttab_frames * ENTRIES_PER_FRAME
        self._first_frame = mem.gnttab_frames
        self._pages = mem.pages
        self._view = mem.view

    def check(self, ref: int, *, write: bool) -> int:
        """Validate ``ref`` for this domain; return the granted frame."""
        if not GNTTAB_NR_RESERVED_ENTRIES <= ref < self._nr:
            raise GrantError(f"grant ref {ref} out of range")
        flags, domid, frame = GRANT_ENTRY.unpack_from(self.table, ref * GRANT_ENTRY.size)
        if flags & GTF_TYPE_MASK != GTF_PERMIT_ACCESS:
            raise GrantError(f"grant ref {ref} grants nothing")
        if domid != self.domid:
            raise GrantError(f"grant ref {ref} is for domain {domid}, not {self.domid}")
        if write and flags & GTF_READONLY:
            raise GrantError(f"grant ref {ref} is read-only")
        if not self.mem.gnttab_frames <= frame < self.mem.pages:
            raise GrantError(f"grant ref {ref} names frame {frame} outside the domain")
        return int(frame)

    def map(self, ref: int, *, write: bool = True) -> memoryview:
        """GNTTABOP_map_grant_ref: the whole page (read-only view unless writable)."""
        frame = self.check(ref, write=write)
        view = self.mem.view[frame * PAGE_SIZE : (frame + 1) * PAGE_SIZE]
        return view if write else view.toreadonly()

    def span(self, ref: int, offset: int, length: int, *, write: bool) -> memoryview:
        """GNTTABOP_copy operand: ``length`` bytes at ``offset`` of a granted page.

        The per-packet path: the same checks as :meth:`check`, inlined.
        """
        if offset < 0 or length < 0 or offset + length > PAGE_SIZE:
            raise GrantError(f"copy of {length} bytes at {offset} crosses the page")
        if GNTTAB_NR_RESERVED_ENTRIES <= ref < self._nr:
            flags, domid, frame = _unpack_entry(self.table, ref * 8)
            if (
                flags & GTF_TYPE_MASK == GTF_PERMIT_ACCESS
                and domid == self.domid
                and not (write and flags & GTF_READONLY)
                and self._first_frame <= frame < self._pages
            ):
                base = frame * PAGE_SIZE + offset
                return self._view[base : base + length]
        self.check(ref, write=write)  # raises with the precise reason
        raise GrantError(f"grant ref {ref} refused")  # pragma: no cover - check() raised

    def close(self) -> None:
        self.table.release()
