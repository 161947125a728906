"""Event channels, emulated with eventfds.

An interdomain channel is two eventfds, one per direction: each end waits on
its own and notifies the other's.  Like Xen's pending bit, notifications
coalesce: any number of :meth:`EventChannel.notify` calls before a
:meth:`EventChannel.consume` is one event.

Invariants:

* Every eventfd is nonblocking and close-on-exec; ``notify`` never blocks
  (the counter cannot realistically overflow 2**64-2; if it did, the event is
  already pending, which is all a notification means).
* ``close`` is idempotent.
"""

from __future__ import annotations

import contextlib
import os
import select

__all__ = ["EventChannel", "local_pair"]

_FLAGS = os.EFD_NONBLOCK | os.EFD_CLOEXEC


class EventChannel:
    """One end of an interdomain event channel (``port`` is its local number)."""

    __slots__ = ("_owned", "notify_fd", "port", "remote_domid", "wait_fd")

    def __init__(
        self, port: int, remote_domid: int, wait_fd: int, notify_fd: int, *, owned: bool = True
    ) -> None:
        self.port = port
        self.remote_domid = remote_domid
        self.wait_fd = wait_fd
        self.notify_fd = notify_fd
        self._owned = owned

    def fileno(self) -> int:
        return self.wait_fd

    def notify(self) -> None:
        """EVTCHNOP_send."""
        with contextlib.suppress(BlockingIOError):
            os.eventfd_write(self.notify_fd, 1)

    def consume(self) -> bool:
        """Clear the pending event; True if one was pending."""
        try:
            os.eventfd_read(self.wait_fd)
        except BlockingIOError:
            return False
        return True

    def wait(self, timeout: float | None) -> bool:
        """Block until an event is pending (and clear it) or ``timeout`` passes."""
        r, _, _ = select.select([self.wait_fd], [], [], timeout)
        return bool(r) and self.consume()

    def close(self) -> None:
        if self._owned and self.wait_fd >= 0:
            for fd in (self.wait_fd, self.notify_fd):
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.wait_fd = self.notify_fd = -1


def local_pair(
    port_a: int = 1, port_b: int = 1, dom_a: int = 0, dom_b: int = 1
) -> tuple[EventChannel, EventChannel]:
    """Two connected ends in this process (tests, single-process setups)."""
    ea = os.eventfd(0, _FLAGS)
    eb = os.eventfd(0, _FLAGS)
    a = EventChannel(port_a, dom_b, ea, eb)
    b = EventChannel(port_b, dom_a, eb, ea, owned=False)
    return a, b
