"""The daemon's helper processes -- workers and the switch -- are forks of serve.

A fork starts in milliseconds where a fresh interpreter takes a tenth of a
second or more, which is what a helper's restart costs the VMs' traffic
(``bench/port_recovery.py``).  Invariants of every child started here:

* it keeps only the fds it is given (and 0, 1, 2): a VM connection, a listening
  socket or another VM's fd left open in it would keep a peer from seeing a
  close;
* SIGTERM and SIGCHLD are back to their defaults, SIGINT is ignored (Ctrl-C
  reaches the whole process group; the parent stops its children itself);
* it dies with its parent (``PR_SET_PDEATHSIG``: SIGKILL);
* it never returns into the parent's code: it leaves with ``os._exit``.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import signal
from collections.abc import Callable

__all__ = ["close_other_fds", "die_with_parent", "fork_child"]

log = logging.getLogger(__name__)

# include/uapi/linux/prctl.h
PR_SET_PDEATHSIG = 1


@functools.cache
def _prctl() -> Callable[..., int] | None:
    """libc's prctl, looked up once in the parent (a child inherits it through
    fork instead of loading libc again on its start-up path)."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent dies."""
    prctl = _prctl()
    if prctl is not None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def close_other_fds(keep: set[int]) -> None:
    """Close every fd of this process except ``keep`` (and 0, 1, 2)."""
    keep = keep | {0, 1, 2}
    lo = 0
    for fd in sorted(keep):
        if fd > lo:
            os.closerange(lo, fd)
        lo = fd + 1
    os.closerange(lo, 1 << 20)


def child_signals() -> None:
    """A child's signal dispositions (see the module's invariants)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)


def fork_child(main: Callable[[], int], keep: set[int], what: str) -> int:
    """Fork a child that keeps only ``keep`` (and 0, 1, 2), runs ``main`` and
    exits with its status (1 if it raised, logged as ``what`` crashing);
    returns its pid."""
    _prctl()  # resolved here, inherited by the child
    pid = os.fork()
    if pid:
        return pid
    code = 1  # pragma: no cover - runs in the child
    try:
        child_signals()
        die_with_parent()
        close_other_fds(keep)
        code = main()
    except BaseException:
        with contextlib.suppress(BaseException):
            log.exception("%s crashed", what)
    finally:
        with contextlib.suppress(BaseException):
            logging.shutdown()
        os._exit(code)
