"""Guest memory: translation bounds, overflow, region table replacement, fd mapping."""

from __future__ import annotations

import mmap
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virtnet.errors import GuestMemoryError, PeerError
from virtnet.memory import MAX_ADDRESS, GuestMemory, MemoryRegion
from virtnet.testing import hugepages


def two_regions() -> GuestMemory:
    return GuestMemory(
        [
            MemoryRegion.anonymous(0x1000, guest_addr=0x0, user_addr=0x7F00_0000_0000),
            MemoryRegion.anonymous(0x2000, guest_addr=0x10000, user_addr=0x7F00_1000_0000),
        ]
    )


def test_view_is_zero_copy_and_bounded() -> None:
    mem = two_regions()
    v = mem.view(0x10, 4)
    v[:] = b"abcd"
    assert mem.read(0x10, 4) == b"abcd"
    assert mem.read(0x10000 + 0x1FFC, 4) == b"\0" * 4
    with pytest.raises(GuestMemoryError):
        mem.view(0xFFE, 4)  # runs past the first region
    with pytest.raises(GuestMemoryError):
        mem.view(0x1000, 1)  # hole between regions
    with pytest.raises(GuestMemoryError):
        mem.view(0x10000 + 0x1FFF, 2)
    with pytest.raises(GuestMemoryError):
        mem.view(-1, 1)
    with pytest.raises(GuestMemoryError):
        mem.view(MAX_ADDRESS, 2)


def test_errors_are_peer_errors() -> None:
    assert issubclass(GuestMemoryError, PeerError)


def test_uva_translation() -> None:
    mem = two_regions()
    assert mem.uva_to_gpa(0x7F00_1000_0010, 16) == 0x10010
    with pytest.raises(GuestMemoryError):
        mem.uva_to_gpa(0x7F00_1000_1FF0, 0x20)
    with pytest.raises(GuestMemoryError):
        mem.uva_to_gpa(0x1234, 1)


def test_overlap_and_overflow_rejected() -> None:
    a = MemoryRegion.anonymous(0x1000, guest_addr=0)
    b = MemoryRegion.anonymous(0x1000, guest_addr=0x800, user_addr=0x100000)
    with pytest.raises(GuestMemoryError):
        GuestMemory([a, b])
    c = MemoryRegion.anonymous(0x1000, guest_addr=0x2000, user_addr=0x0)
    with pytest.raises(GuestMemoryError):
        GuestMemory([a, c])  # user ranges overlap
    with pytest.raises(GuestMemoryError):
        MemoryRegion.anonymous(0x1000, guest_addr=MAX_ADDRESS - 0x10)
    with pytest.raises(GuestMemoryError):
        MemoryRegion.anonymous(0)


def test_replace_whole_table_and_add_remove() -> None:
    mem = two_regions()
    old = mem.regions
    new = MemoryRegion.anonymous(0x1000, guest_addr=0x40000, user_addr=0x9000_0000)
    mem.add_region(new)
    assert len(mem.regions) == 3
    assert old != mem.regions
    mem.write(0x40000, b"x")
    removed = mem.remove_region(0x40000, 0x1000, 0x9000_0000)
    assert removed is new
    with pytest.raises(GuestMemoryError):
        mem.view(0x40000, 1)
    with pytest.raises(GuestMemoryError):
        mem.remove_region(0x40000, 0x1000, 0x9000_0000)
    mem.replace([])
    with pytest.raises(GuestMemoryError):
        mem.view(0, 1)


def test_fd_region_shared_mapping() -> None:
    fd = os.memfd_create("virtnet-test")
    try:
        os.ftruncate(fd, 0x3000)
        r = MemoryRegion.from_fd(
            fd, guest_addr=0x1000, size=0x1000, user_addr=0x5000, mmap_offset=0x1000
        )
        mem = GuestMemory([r])
        mem.write(0x1000, b"shared")
        assert os.pread(fd, 6, 0x1000) == b"shared"
        os.pwrite(fd, b"back", 0x1800)
        assert mem.read(0x1800, 4) == b"back"
        mem.close()
    finally:
        os.close(fd)


@pytest.mark.skipif(hugepages.skip_reason(4) is not None, reason=str(hugepages.skip_reason(4)))
def test_fd_region_on_huge_pages_at_an_unaligned_offset() -> None:
    """A hugetlbfs file maps only at huge-page offsets; a region may start
    anywhere in it (0xc0000: where QEMU's region above the VGA hole starts in
    4-KiB memory).  The mapping starts at the huge page below and the region is
    the exact slice of it."""
    with hugepages.reserved(4):
        fd = os.memfd_create("virtnet-test", os.MFD_HUGETLB)
        try:
            os.ftruncate(fd, 4 * hugepages.HUGEPAGE_SIZE)
            # hugetlbfs has no write(2): the other side of the file is a mapping too.
            whole = mmap.mmap(fd, 4 * hugepages.HUGEPAGE_SIZE)
            whole[-4:] = b"last"
            size = 3 * hugepages.HUGEPAGE_SIZE - 0xC0000
            r = MemoryRegion.from_fd(
                fd,
                guest_addr=0xC0000,
                size=size,
                user_addr=0x7F00_000C_0000,
                mmap_offset=hugepages.HUGEPAGE_SIZE + 0xC0000,
            )
            mem = GuestMemory([r])
            assert mem.read(0xC0000, 4) == b"\0" * 4
            mem.write(0xC0000, b"guest")
            at = hugepages.HUGEPAGE_SIZE + 0xC0000
            assert whole[at : at + 5] == b"guest"
            assert mem.read(0xC0000 + size - 4, 4) == b"last"
            with pytest.raises(GuestMemoryError):
                mem.view(0xC0000 + size - 2, 4)
            mem.close()
            whole.close()
        finally:
            os.close(fd)


def test_fd_region_bad_fd_is_peer_error() -> None:
    with pytest.raises(GuestMemoryError):
        MemoryRegion.from_fd(9999, guest_addr=0, size=4096, user_addr=0)
    fd = os.memfd_create("virtnet-test")
    try:
        os.ftruncate(fd, 4096)
        with pytest.raises(GuestMemoryError):
            MemoryRegion.from_fd(fd, guest_addr=0, size=4096, user_addr=0, mmap_offset=1 << 40)
    finally:
        os.close(fd)


@given(gpa=st.integers(min_value=-(1 << 65), max_value=1 << 65), length=st.integers(-10, 1 << 20))
def test_view_never_escapes(gpa: int, length: int) -> None:
    mem = two_regions()
    try:
        v = mem.view(gpa, length)
    except GuestMemoryError:
        return
    assert len(v) == length
    assert any(r.guest_addr <= gpa and gpa + length <= r.guest_end for r in mem.regions)
