"""Huge pages for tests: reserve 2-MiB pages and mount hugetlbfs, then put both back.

Guest memory on huge pages is how vhost-user is deployed (libvirt's
``<memoryBacking><hugepages/>``, OVS-DPDK, DPDK's own EAL); the kernel hands
out such pages only from a pool that root reserves in
``/proc/sys/vm/nr_hugepages``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from virtnet.errors import UsageError

__all__ = [
    "HUGEPAGE_SIZE",
    "NR_HUGEPAGES",
    "free_hugepages",
    "hugetlbfs_mount",
    "reserved",
    "skip_reason",
]

#: The default huge page size on x86-64 (``Hugepagesize`` in /proc/meminfo).
HUGEPAGE_SIZE = 2 << 20
NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")


def free_hugepages() -> int:
    """``HugePages_Free`` from /proc/meminfo."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("HugePages_Free:"):
            return int(line.split()[1])
    return 0


def skip_reason(pages: int) -> str | None:
    """Why ``pages`` free 2-MiB pages cannot be had here, or None."""
    if free_hugepages() >= pages:
        return None
    if os.geteuid() != 0:
        return f"needs {pages} free huge pages (root reserves them in {NR_HUGEPAGES})"
    return None


@contextlib.contextmanager
def reserved(pages: int) -> Iterator[None]:
    """At least ``pages`` free 2-MiB pages while the block runs (root grows the
    pool and shrinks it back after).  UsageError when the kernel cannot find
    that much contiguous memory."""
    old = int(NR_HUGEPAGES.read_text())
    short = pages - free_hugepages()
    if short > 0:
        NR_HUGEPAGES.write_text(f"{old + short}\n")
    try:
        if free_hugepages() < pages:
            raise UsageError(
                f"asked the kernel for {pages} free huge pages, it has {free_hugepages()}"
            )
        yield
    finally:
        if short > 0:
            NR_HUGEPAGES.write_text(f"{old}\n")


@contextlib.contextmanager
def hugetlbfs_mount() -> Iterator[Path]:
    """A hugetlbfs mount (2-MiB pages) in a fresh directory, unmounted after."""
    where = Path(tempfile.mkdtemp(prefix="virtnet-huge-"))
    try:
        subprocess.run(
            ["mount", "-t", "hugetlbfs", "-o", "pagesize=2M", "none", str(where)],
            check=True,
            capture_output=True,
            text=True,
        )
        try:
            yield where
        finally:
            subprocess.run(["umount", str(where)], check=False, capture_output=True)
    finally:
        with contextlib.suppress(OSError):
            where.rmdir()
