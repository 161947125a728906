"""The dirty-page log of a migrating guest (vhost-user "Migration").

While the frontend migrates the guest it negotiates ``VHOST_F_LOG_ALL`` and
hands the backend a shared bitmap (``SET_LOG_BASE``): one bit per
:data:`LOG_PAGE` bytes of guest-physical address space, bit ``page % 8`` of
byte ``page // 8``.  The backend sets the bit of every page it writes (the
buffers of the chains it uses, and the used ring of a ring whose
``VHOST_VRING_F_LOG`` flag is set, logged at that ring's ``log_guest_addr``);
QEMU collects and clears the bits with atomic exchanges and copies those pages
again.

Invariants:

* A mark outside the log is never written; it is counted in
  :attr:`DirtyLog.outside` (the frontend sized the log too small).
* A mark stores ``0xFF`` into every log byte its pages fall in: all eight
  pages of each :data:`MARK_GRANULE` are reported dirty.  The backend never
  reads the log, so nothing it does can lose a bit: not QEMU's concurrent
  clearing (an atomic exchange per word: a byte stored after it is seen at
  the next sync, at worst a page is sent twice), nor the other worker
  processes of the guest marking the same byte.  A read-modify-write of
  single bits would need atomics (DPDK and rust-vmm use ``fetch_or``) or a
  lock shared between processes, which a worker killed while holding it
  would leave held, stalling every other worker of the guest; sending up to
  seven neighbouring pages again is the cheaper price.
"""

from __future__ import annotations

from typing import Final

__all__ = ["LOG_PAGE", "MARK_GRANULE", "MAX_LOG_BYTES", "DirtyLog", "log_bytes_for"]

#: vhost-user "Migration": ``#define VHOST_LOG_PAGE 0x1000``.
LOG_PAGE: Final = 0x1000
#: What one mark reports dirty at the least: the eight pages of a log byte.
MARK_GRANULE: Final = 8 * LOG_PAGE
_PAGE_SHIFT: Final = 12
#: Cap on the log a frontend may hand us (SET_LOG_BASE "log size"): 1 bit per
#: 4 KiB page, so 256 MiB of log covers 8 TiB of guest-physical space.
MAX_LOG_BYTES: Final = 256 << 20


def log_bytes_for(guest_bytes: int) -> int:
    """Log bytes that cover guest-physical addresses ``0 .. guest_bytes - 1``."""
    pages = (guest_bytes + LOG_PAGE - 1) >> _PAGE_SHIFT
    return (pages + 7) >> 3


class DirtyLog:
    """Marks pages in a log bitmap (a writable memoryview of the shared log)."""

    def __init__(self, log: memoryview) -> None:
        if log.readonly or log.format != "B" or log.ndim != 1:
            raise ValueError("the log must be a writable, flat memoryview of bytes")
        self.log = log
        self.marked = 0  # pages asked to be marked (inside the log)
        self.outside = 0  # page marks that fell outside the log

    def mark(self, gpa: int, length: int) -> None:
        """Mark the pages of guest-physical ``gpa .. gpa + length - 1`` dirty."""
        if length <= 0 or gpa < 0:
            return
        first = gpa >> _PAGE_SHIFT
        last = (gpa + length - 1) >> _PAGE_SHIFT
        log = self.log
        end_page = len(log) << 3
        if last >= end_page:
            self.outside += last - max(first, end_page) + 1
            if first >= end_page:
                return
            last = end_page - 1
        lo = first >> 3
        hi = (last >> 3) + 1
        log[lo:hi] = b"\xff" * (hi - lo)  # byte stores only: nothing read, nothing lost
        self.marked += last - first + 1

    def is_dirty(self, gpa: int) -> bool:
        """Whether the page holding ``gpa`` is marked (tests, diagnostics)."""
        page = gpa >> _PAGE_SHIFT
        return page >> 3 < len(self.log) and bool(self.log[page >> 3] >> (page & 7) & 1)
