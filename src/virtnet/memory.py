"""Guest memory: a table of regions and checked guest-address translation.

Invariants:

* Every access goes through :meth:`GuestMemory.view` (or helpers built on
  it), which checks that ``[gpa, gpa + length)`` lies entirely inside one
  region, with no integer overflow; anything else raises
  :class:`~virtnet.errors.GuestMemoryError`.  No byte outside guest memory is
  ever read or written.
* Views are ``memoryview`` slices of the region buffer: no copy is made.
* The region table is an immutable tuple replaced as a whole
  (:meth:`GuestMemory.replace`); a reader holding the old tuple keeps a
  consistent picture.  Regions never overlap in guest-physical nor in
  frontend-virtual address space.
* An fd-backed region owns its ``mmap``; :meth:`MemoryRegion.close` unmaps it.
  Callers must stop every ring that uses a region before closing it (the
  vhost-user backend does so before SET_MEM_TABLE / REM_MEM_REG take effect).
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import mmap
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from virtnet.errors import GuestMemoryError

__all__ = [
    "MAX_ADDRESS",
    "MAX_PAGE_SIZE",
    "MAX_REGIONS",
    "GuestMemory",
    "MemoryRegion",
]

#: Guest physical and frontend virtual addresses are 64-bit (vhost-user.rst,
#: "Memory region description": guest address / user address are u64).
MAX_ADDRESS = (1 << 64) - 1

#: Upper bound on regions in one table.  vhost-user's SET_MEM_TABLE carries at
#: most VHOST_MEMORY_BASELINE_NREGIONS = 8 regions; CONFIGURE_MEM_SLOTS lets a
#: backend advertise more via GET_MAX_MEM_SLOTS.  We advertise and accept 509,
#: QEMU's own cap for vhost-user (hw/virtio/vhost-user.c, VHOST_USER_MAX_RAM_SLOTS).
MAX_REGIONS = 509

#: Largest page a guest memory file may have: x86-64's 1-GiB huge pages (a
#: hugetlbfs mount's ``pagesize=1G``); the mapping of a region starts at most
#: this far before it.
MAX_PAGE_SIZE = 1 << 30


@dataclass(frozen=True, eq=False)
class MemoryRegion:
    """One contiguous piece of guest memory."""

    guest_addr: int
    size: int
    user_addr: int
    buf: memoryview
    _mmap: mmap.mmap | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise GuestMemoryError(f"memory region of size {self.size}")
        if self.guest_addr < 0 or self.guest_addr + self.size - 1 > MAX_ADDRESS:
            raise GuestMemoryError(
                f"region guest address 0x{self.guest_addr:x}+0x{self.size:x} overflows 64 bits"
            )
        if self.user_addr < 0 or self.user_addr + self.size - 1 > MAX_ADDRESS:
            raise GuestMemoryError(
                f"region user address 0x{self.user_addr:x}+0x{self.size:x} overflows 64 bits"
            )
        if len(self.buf) != self.size:
            raise GuestMemoryError("region buffer does not match its size")

    @property
    def guest_end(self) -> int:
        """One past the last guest-physical address of the region."""
        return self.guest_addr + self.size

    @staticmethod
    def anonymous(size: int, *, guest_addr: int = 0, user_addr: int | None = None) -> MemoryRegion:
        """A region backed by a private ``bytearray`` (tests, in-process demos)."""
        if size <= 0:
            raise GuestMemoryError(f"memory region of size {size}")
        buf = memoryview(bytearray(size))
        return MemoryRegion(guest_addr, size, guest_addr if user_addr is None else user_addr, buf)

    @staticmethod
    def from_fd(
        fd: int, *, guest_addr: int, size: int, user_addr: int, mmap_offset: int = 0
    ) -> MemoryRegion:
        """Map ``size`` bytes of ``fd`` at ``mmap_offset`` shared, read-write.

        The fd itself is not kept: the mapping stays valid after the caller
        closes it.  A failing mmap (bad fd, offset past the file, ...) is the
        peer's fault and raises :class:`GuestMemoryError`.
        """
        if size <= 0 or mmap_offset < 0:
            raise GuestMemoryError(f"bad region: size={size} mmap_offset={mmap_offset}")
        # mmap(2) needs an offset aligned to the file's page: 4 KiB for a memfd
        # or tmpfs file, the huge page for hugetlbfs (2 MiB or 1 GiB; EINVAL
        # otherwise).  A region may start anywhere in its file (QEMU's above
        # the VGA hole starts 0xc0000 in; QEMU aligns regions on huge pages
        # itself, a frontend need not), so map from the page below and slice.
        base = mmap_offset - mmap_offset % _mmap_alignment(fd)
        skip = mmap_offset - base
        try:
            m = mmap.mmap(
                fd,
                size + skip,
                flags=mmap.MAP_SHARED,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
                offset=base,
            )
        except (OSError, ValueError, OverflowError) as exc:
            raise GuestMemoryError(f"cannot map guest memory fd {fd}: {exc}") from exc
        buf = memoryview(m)[skip : skip + size]
        return MemoryRegion(guest_addr, size, user_addr, buf, m)

    def close(self) -> None:
        """Release the mapping (fd-backed regions).  Views taken earlier must be gone."""
        self.buf.release()
        if self._mmap is not None:
            # Someone may still hold a view: then leave the mapping to the GC
            # rather than crash; it is unreachable from the table now.
            with contextlib.suppress(BufferError):
                self._mmap.close()


def _mmap_alignment(fd: int) -> int:
    """What a mapping's offset into ``fd`` must be a multiple of: the page
    size, or the file's block size when that is a larger power of 2 up to
    :data:`MAX_PAGE_SIZE` (``st_blksize`` is the huge page size on hugetlbfs;
    DPDK's vhost library aligns its mappings to it too)."""
    try:
        blksize = os.fstat(fd).st_blksize
    except OSError as exc:
        raise GuestMemoryError(f"cannot stat guest memory fd {fd}: {exc}") from exc
    if mmap.ALLOCATIONGRANULARITY < blksize <= MAX_PAGE_SIZE and blksize.bit_count() == 1:
        return blksize
    return mmap.ALLOCATIONGRANULARITY


def _check_disjoint(regions: tuple[MemoryRegion, ...]) -> None:
    by_gpa = sorted(regions, key=lambda r: r.guest_addr)
    for a, b in itertools.pairwise(by_gpa):
        if a.guest_addr + a.size > b.guest_addr:
            raise GuestMemoryError(f"memory regions overlap at guest address 0x{b.guest_addr:x}")
    by_uva = sorted(regions, key=lambda r: r.user_addr)
    for a, b in itertools.pairwise(by_uva):
        if a.user_addr + a.size > b.user_addr:
            raise GuestMemoryError(f"memory regions overlap at user address 0x{b.user_addr:x}")


class GuestMemory:
    """The guest's memory as a table of :class:`MemoryRegion`."""

    __slots__ = ("_last", "_regions", "_starts")

    def __init__(self, regions: Iterable[MemoryRegion] = ()) -> None:
        self._regions: tuple[MemoryRegion, ...] = ()
        self._starts: list[int] = []
        self._last: MemoryRegion | None = None
        self.replace(regions)

    @classmethod
    def anonymous(cls, size: int, *, guest_addr: int = 0) -> GuestMemory:
        """One bytearray-backed region of ``size`` bytes at ``guest_addr``."""
        return cls([MemoryRegion.anonymous(size, guest_addr=guest_addr)])

    @property
    def regions(self) -> tuple[MemoryRegion, ...]:
        return self._regions

    @property
    def size(self) -> int:
        """Total bytes over all regions."""
        return sum(r.size for r in self._regions)

    def replace(self, regions: Iterable[MemoryRegion]) -> None:
        """Validate, then install ``regions`` as the whole new table.

        The old regions are *not* closed: the caller decides when nothing
        uses them any more.
        """
        table = tuple(sorted(regions, key=lambda r: r.guest_addr))
        if len(table) > MAX_REGIONS:
            raise GuestMemoryError(f"{len(table)} memory regions exceed the limit {MAX_REGIONS}")
        _check_disjoint(table)
        self._regions = table
        self._starts = [r.guest_addr for r in table]
        self._last = table[0] if table else None

    def add_region(self, region: MemoryRegion) -> None:
        """Add one region (vhost-user ADD_MEM_REG)."""
        self.replace((*self._regions, region))

    def remove_region(self, guest_addr: int, size: int, user_addr: int) -> MemoryRegion:
        """Remove the region that matches exactly (vhost-user REM_MEM_REG) and return it."""
        for r in self._regions:
            if r.guest_addr == guest_addr and r.size == size and r.user_addr == user_addr:
                self.replace(x for x in self._regions if x is not r)
                return r
        raise GuestMemoryError(
            f"no memory region 0x{guest_addr:x}+0x{size:x} (user 0x{user_addr:x}) to remove"
        )

    def close(self) -> None:
        """Unmap every region and empty the table."""
        old = self._regions
        self.replace(())
        for r in old:
            r.close()

    def _find(self, gpa: int, length: int) -> MemoryRegion:
        if gpa < 0 or length < 0:
            raise GuestMemoryError(f"negative guest address or length: 0x{gpa:x}, {length}")
        last = self._last
        if (
            last is not None
            and last.guest_addr <= gpa
            and gpa + length <= last.guest_addr + last.size
        ):
            return last
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0:
            r = self._regions[i]
            if gpa + length <= r.guest_addr + r.size:
                self._last = r
                return r
        raise GuestMemoryError(
            f"guest range 0x{gpa:x}+{length} is outside guest memory (or spans regions)"
        )

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable zero-copy view of ``length`` bytes at guest address ``gpa``."""
        r = self._find(gpa, length)
        off = gpa - r.guest_addr
        return r.buf[off : off + length]

    def read(self, gpa: int, length: int) -> bytes:
        """A copy of ``length`` bytes at ``gpa``."""
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` into guest memory at ``gpa``."""
        self.view(gpa, len(data))[:] = data

    def contains(self, gpa: int, length: int) -> bool:
        """Whether ``[gpa, gpa+length)`` lies inside one region."""
        try:
            self._find(gpa, length)
        except GuestMemoryError:
            return False
        return True

    def uva_to_gpa(self, uva: int, length: int) -> int:
        """Translate a frontend virtual address range (vhost-user rings) to a guest address."""
        if uva < 0 or length < 0:
            raise GuestMemoryError(f"negative user address or length: 0x{uva:x}, {length}")
        for r in self._regions:
            if r.user_addr <= uva and uva + length <= r.user_addr + r.size:
                return r.guest_addr + (uva - r.user_addr)
        raise GuestMemoryError(f"user address range 0x{uva:x}+{length} is not in any region")
