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
* Marks are read-modify-write of one byte.  QEMU's concurrent clearing cannot
  lose a bit that way (at worst a page is sent twice), but two writers of one
  byte could, so every process that writes one log takes the same ``lock``
  (one per guest, made before the workers fork).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Final

__all__ = ["LOG_PAGE", "MAX_LOG_BYTES", "DirtyLog", "log_bytes_for"]

#: vhost-user "Migration": ``#define VHOST_LOG_PAGE 0x1000``.
LOG_PAGE: Final = 0x1000
_PAGE_SHIFT: Final = 12
#: Cap on the log a frontend may hand us (SET_LOG_BASE "log size"): 1 bit per
#: 4 KiB page, so 256 MiB of log covers 8 TiB of guest-physical space.
MAX_LOG_BYTES: Final = 256 << 20


def log_bytes_for(guest_bytes: int) -> int:
    """Log bytes that cover guest-physical addresses ``0 .. guest_bytes - 1``."""
    pages = (guest_bytes + LOG_PAGE - 1) >> _PAGE_SHIFT
    return (pages + 7) >> 3


class DirtyLog:
    """Sets page bits in a log bitmap (a writable memoryview of the shared log)."""

    def __init__(self, log: memoryview, lock: AbstractContextManager[object] | None = None) -> None:
        if log.readonly or log.format != "B" or log.ndim != 1:
            raise ValueError("the log must be a writable, flat memoryview of bytes")
        self.log = log
        self.lock: AbstractContextManager[object] = lock if lock is not None else nullcontext()
        self.marked = 0  # page marks written
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
        with self.lock:
            for page in range(first, last + 1):
                log[page >> 3] |= 1 << (page & 7)
        self.marked += last - first + 1

    def is_dirty(self, gpa: int) -> bool:
        """Whether the page holding ``gpa`` is marked (tests, diagnostics)."""
        page = gpa >> _PAGE_SHIFT
        return page >> 3 < len(self.log) and bool(self.log[page >> 3] >> (page & 7) & 1)
