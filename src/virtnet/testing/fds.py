"""File-descriptor checks for tests that pass fds around (vhost-user, hand-off)."""

from __future__ import annotations

import os

__all__ = ["fd_is_open", "open_fds"]


def open_fds() -> int:
    """How many fds this process has open now."""
    return len(os.listdir("/proc/self/fd"))


def fd_is_open(fd: int) -> bool:
    """Whether ``fd`` refers to an open file in this process."""
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True
