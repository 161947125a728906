"""The dirty-page log (live migration): bit layout, bounds, and what a device
queue marks -- the written bytes of the chains it uses and its used ring."""

from __future__ import annotations

import mmap
import os

import pytest

from virtnet.dirty_log import LOG_PAGE, MARK_GRANULE, DirtyLog, log_bytes_for
from virtnet.memory import GuestMemory
from virtnet.vhost_user.worker import LogSpec, open_dirty_log
from virtnet.virtq import Chain, DeviceQueue, DriverQueue, split_ring_layout

MEM = 1 << 20
DATA = 0x40000
USED_LOG = 0x80000  # where the test says the used ring is logged


def pages(log: DirtyLog) -> set[int]:
    """The pages marked: for a :class:`RecordingLog` the pages asked for (after
    checking the bitmap holds exactly their granules), else the bits set."""
    bits = {8 * i + b for i, byte in enumerate(log.log) for b in range(8) if byte >> b & 1}
    if isinstance(log, RecordingLog):
        assert bits == {8 * (p // 8) + b for p in log.pages for b in range(8)}
        return log.pages
    return bits


class RecordingLog(DirtyLog):
    """A log that also remembers each page a mark asked for, so the tests of
    what a queue marks see pages, not granules."""

    def __init__(self, size: int) -> None:
        super().__init__(memoryview(bytearray(size)))
        self.pages: set[int] = set()

    def mark(self, gpa: int, length: int) -> None:
        if length > 0:
            self.pages |= set(range(gpa // LOG_PAGE, (gpa + length - 1) // LOG_PAGE + 1))
        super().mark(gpa, length)

    def clear(self) -> None:
        self.log[:] = bytes(len(self.log))
        self.pages.clear()


def test_bits_follow_the_spec_layout() -> None:
    # vhost-user "Migration": page = addr / 0x1000; bit page % 8 of log[page / 8].
    # A mark sets its page's bit and the seven others of that byte (MARK_GRANULE).
    log = DirtyLog(memoryview(bytearray(4)))
    log.mark(0x3000, 1)
    assert bytes(log.log) == bytes([0xFF, 0, 0, 0])
    log.mark(9 * LOG_PAGE + 100, 1)
    assert bytes(log.log) == bytes([0xFF, 0xFF, 0, 0])
    assert log.is_dirty(0x3FFF) and log.is_dirty(0x9000) and not log.is_dirty(0x10000)
    assert MARK_GRANULE == 8 * LOG_PAGE


def test_a_range_marks_every_granule_it_touches() -> None:
    log = DirtyLog(memoryview(bytearray(4)))
    log.mark(MARK_GRANULE - 1, 2)  # straddles pages 7 and 8: bytes 0 and 1
    log.mark(20 * LOG_PAGE, 0)  # nothing written, nothing marked
    assert bytes(log.log) == bytes([0xFF, 0xFF, 0, 0])
    log.mark(24 * LOG_PAGE, 8 * LOG_PAGE)  # pages 24..31 exactly: byte 3
    assert bytes(log.log) == bytes([0xFF, 0xFF, 0, 0xFF])
    assert log.marked == 10


def test_marks_never_clear_what_the_frontend_or_others_set() -> None:
    """No read-modify-write: a mark only stores 0xFF, so bits set by another
    worker stay, and QEMU clearing a byte between two marks loses nothing
    (the later mark sets it again)."""
    backing = bytearray([0b0000_0100, 0, 0])
    log = DirtyLog(memoryview(backing))
    log.mark(0, 1)
    assert backing[0] == 0xFF
    backing[0] = 0  # QEMU collected it
    log.mark(LOG_PAGE, 1)
    assert backing == bytearray([0xFF, 0, 0])


def test_marks_outside_the_log_are_counted_not_written() -> None:
    backing = bytearray(6)
    log = DirtyLog(memoryview(backing)[1:5])  # 32 pages; guards at both ends
    log.mark(30 * LOG_PAGE, 4 * LOG_PAGE)  # pages 30..33: 32 and 33 are outside
    log.mark(1 << 40, 1)
    assert pages(log) == set(range(24, 32))
    assert log.outside == 3
    assert backing[0] == 0 and backing[5] == 0


def test_log_size_for_guest_memory() -> None:
    assert log_bytes_for(0) == 0
    assert log_bytes_for(1) == 1
    assert log_bytes_for(8 * LOG_PAGE) == 1
    assert log_bytes_for(8 * LOG_PAGE + 1) == 2
    assert log_bytes_for(4 << 30) == (4 << 30) // LOG_PAGE // 8


def test_rejects_a_read_only_log() -> None:
    with pytest.raises(ValueError, match="writable"):
        DirtyLog(memoryview(bytes(8)))


def test_open_dirty_log_maps_the_frontends_file_at_its_offset() -> None:
    fd = os.memfd_create("vhost-log")
    try:
        os.ftruncate(fd, 2 * 4096)
        log = open_dirty_log(LogSpec(fd, 4096, 4096))
        log.mark(3 * LOG_PAGE, 1)
        with mmap.mmap(fd, 2 * 4096) as m:
            assert m[4096] == 0xFF and m[0] == 0 and m[4097] == 0
    finally:
        os.close(fd)


# -- what a device queue marks -------------------------------------------------------


def _pair(size: int = 16) -> tuple[GuestMemory, DriverQueue, DeviceQueue, RecordingLog]:
    mem = GuestMemory.anonymous(MEM)
    lay = split_ring_layout(size)
    drv = DriverQueue(mem, size, lay.desc, lay.avail, lay.used)
    dev = DeviceQueue(mem, size, lay.desc, lay.avail, lay.used)
    log = RecordingLog(log_bytes_for(MEM))
    return mem, drv, dev, log


def _pop(drv: DriverQueue, dev: DeviceQueue, n: int) -> list[Chain]:
    drv.publish()
    return dev.pop(n)


def test_rx_push_marks_the_bytes_written_across_the_chain() -> None:
    _mem, drv, dev, log = _pair()
    # Three writable buffers: page 64, page 66, and the last 8 bytes of page 70 onwards.
    drv.add([], [(DATA, 100), (DATA + 2 * LOG_PAGE, LOG_PAGE), (DATA + 7 * LOG_PAGE - 8, 64)], "rx")
    (ch,) = _pop(drv, dev, 4)
    dev.set_dirty_log(log)
    dev.push([(ch.head, 100 + LOG_PAGE + 8)])  # 8 bytes in the last buffer: page 70 only
    assert pages(log) == {DATA // LOG_PAGE, DATA // LOG_PAGE + 2, DATA // LOG_PAGE + 6}
    _, drv2, dev2, log2 = _pair()
    drv2.add([], [(DATA + 7 * LOG_PAGE - 8, 64)], "rx")
    (ch2,) = _pop(drv2, dev2, 1)
    dev2.set_dirty_log(log2)
    dev2.push([(ch2.head, 9)])  # one byte past the page boundary
    assert pages(log2) == {DATA // LOG_PAGE + 6, DATA // LOG_PAGE + 7}


def test_only_the_written_part_is_marked() -> None:
    _mem, drv, dev, log = _pair()
    drv.add([], [(DATA, 100), (DATA + 4 * LOG_PAGE, 100)], "rx")
    (ch,) = _pop(drv, dev, 4)
    dev.set_dirty_log(log)
    dev.push([(ch.head, 60)])
    assert pages(log) == {DATA // LOG_PAGE}


def test_device_readable_buffers_are_never_marked() -> None:
    _mem, drv, dev, log = _pair()
    drv.add([(DATA, 64)], [(DATA + 8 * LOG_PAGE, 64)], "mixed")
    drv.add([(DATA + 16 * LOG_PAGE, 64)], [], "tx")
    chains = _pop(drv, dev, 4)
    dev.set_dirty_log(log)
    dev.push([(chains[0].head, 64)])
    dev.push_heads([chains[1].head])
    assert pages(log) == {DATA // LOG_PAGE + 8}


def test_indirect_chains_are_walked() -> None:
    _mem, drv, dev, log = _pair()
    table = DATA + 32 * LOG_PAGE
    drv.add_indirect(table, [(DATA, 10)], [(DATA + 3 * LOG_PAGE, 200)], "ind")
    (ch,) = _pop(drv, dev, 4)
    dev.set_dirty_log(log)
    dev.push([(ch.head, 200)])
    # The data page; not the indirect table (the device only reads it).
    assert pages(log) == {DATA // LOG_PAGE + 3}


def test_used_ring_is_marked_at_its_log_address_when_asked() -> None:
    _mem, drv, dev, log = _pair(size=256)
    drv.add([(DATA, 64)], [], "tx")
    (ch,) = _pop(drv, dev, 1)
    dev.set_dirty_log(log, USED_LOG)
    dev.push_heads([ch.head])
    used_bytes = 6 + 8 * 256
    want = set(range(USED_LOG // LOG_PAGE, (USED_LOG + used_bytes - 1) // LOG_PAGE + 1))
    assert pages(log) == want
    log.clear()
    dev.enable_notify(False)  # flags / avail_event are used-ring writes too
    assert pages(log) == want
    log.clear()
    drv.add([(DATA, 64)], [], "tx2")
    drv.add([(DATA, 64)], [], "tx3")
    _a, b = _pop(drv, dev, 2)
    dev.push_batch(b.head, 2)  # IN_ORDER: one entry for the batch, marked the same
    assert pages(log) == want


def test_no_log_no_marks_and_logging_stops() -> None:
    _mem, drv, dev, log = _pair()
    drv.add([], [(DATA, 64)], "a")
    drv.add([], [(DATA + LOG_PAGE, 64)], "b")
    a, b = _pop(drv, dev, 2)
    dev.push([(a.head, 64)])
    dev.set_dirty_log(log, USED_LOG)
    dev.set_dirty_log(None, USED_LOG)
    dev.push([(b.head, 64)])
    assert pages(log) == set()


def test_a_chain_rewritten_into_a_loop_is_marked_and_left() -> None:
    mem, drv, dev, log = _pair(size=4)
    drv.add([], [(DATA, 64), (DATA + LOG_PAGE, 64)], "rx")
    (ch,) = _pop(drv, dev, 1)
    # The driver turns the chain into a loop after we popped it.
    lay = split_ring_layout(4)
    desc = mem.view(lay.desc, 4 * 16).cast("H")
    first_next = desc[ch.head * 8 + 7]
    desc[first_next * 8 + 7] = ch.head  # second.next = head
    desc[first_next * 8 + 6] |= 1  # second.flags |= NEXT
    dev.set_dirty_log(log)
    dev.push([(ch.head, 1 << 20)])  # more than the chain holds: walk until the hop budget
    assert pages(log) == {DATA // LOG_PAGE, DATA // LOG_PAGE + 1}
