"""Packed virtqueues: our device queue against our driver queue (wrap-around on
odd sizes, chains, indirect tables, give-back, restart from the vhost-user
base, event suppression, the dirty log), and hostile descriptor rings."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtnet.dirty_log import LOG_PAGE, DirtyLog, log_bytes_for
from virtnet.errors import VirtqueueError
from virtnet.memory import GuestMemory, MemoryRegion
from virtnet.packed import (
    EVENT_DESC,
    EVENT_DISABLE,
    EVENT_ENABLE,
    FRESH_BASE,
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_USED,
    PackedDeviceQueue,
    PackedDriverQueue,
    decode_base,
    encode_base,
    is_position,
    ring_position,
)
from virtnet.virtq import MAX_CHAIN_BYTES, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT

MEM = 1 << 20
DESC = 0x0
DRIVER = 0x8000
DEVICE = 0x8010
DATA = 0x10000
TABLES = 0x80000
RAW = struct.Struct("<QIHH")


def make(
    size: int = 8, event_idx: bool = False, in_order: bool = False
) -> tuple[GuestMemory, PackedDriverQueue, PackedDeviceQueue]:
    mem = GuestMemory.anonymous(MEM)
    drv = PackedDriverQueue(mem, size, DESC, DRIVER, DEVICE, event_idx=event_idx, in_order=in_order)
    dev = PackedDeviceQueue(mem, size, DESC, DRIVER, DEVICE, event_idx=event_idx)
    return mem, drv, dev


def buf(k: int) -> int:
    return DATA + 256 * (k % 1024)


def test_fresh_base_is_both_wrap_counters_set() -> None:
    assert decode_base(FRESH_BASE, 8) == (0, 1, 0, 1)
    # DPDK virtio-user names the avail half only: used follows it.
    assert decode_base(1 << 15, 8) == (0, 1, 0, 1)
    assert decode_base(encode_base(5, 0, 3, 1), 8) == (5, 0, 3, 1)
    with pytest.raises(VirtqueueError, match="not below size"):
        decode_base(encode_base(8, 1, 0, 1), 8)
    with pytest.raises(VirtqueueError, match="u32"):
        decode_base(1 << 32, 8)


def test_tx_and_rx_round_trip_with_data() -> None:
    mem, drv, dev = make(size=4)
    mem.write(buf(0), b"hello")
    assert drv.add([(buf(0), 5)], [], "tx") == 0
    assert not dev.has_available()  # its flags are written at publish
    assert drv.add([], [(buf(1), 64)], "rx") == 1
    assert len(dev.pop(8)) == 1  # the next add published the first
    dev.unpop(1)
    drv.publish()
    tx, rx = dev.pop(8)
    assert (tx.head, bytes(tx.out[0]), tx.in_len) == (0, b"hello", 0)
    assert (rx.head, rx.out_len, rx.in_len) == (1, 0, 64)
    rx.in_[0][:3] = b"abc"
    dev.push([(tx.head, 0), (rx.head, 3)])
    assert drv.get_used() == [("tx", 0), ("rx", 3)]
    assert mem.read(buf(1), 3) == b"abc"
    assert drv.num_free == 4


def add_buffer(
    drv: PackedDriverQueue,
    indirect: bool,
    out: list[tuple[int, int]],
    in_: list[tuple[int, int]],
    token: object,
) -> int | None:
    if indirect:
        return drv.add_indirect(TABLES, out, in_, token)
    return drv.add(out, in_, token)


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(1, 9),
    shapes=st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 3), st.booleans()), min_size=1, max_size=60
    ),
)
def test_many_laps_of_mixed_buffers(size: int, shapes: list[tuple[int, int, bool]]) -> None:
    """Every buffer comes back once, in order, with its length, over many
    laps of a ring whose size is not a power of 2."""
    _mem, drv, dev = make(size)
    sent: list[object] = []
    got: list[tuple[object, int]] = []
    k = 0
    for n_out, n_in0, indirect in shapes:
        n_in = n_in0 or int(n_out == 0)
        if not indirect and n_out + n_in > size:
            continue
        out = [(buf(k + j), 10 + j) for j in range(n_out)]
        in_ = [(buf(k + n_out + j), 20 + j) for j in range(n_in)]
        k += n_out + n_in
        token = ("b", len(sent))

        bid = add_buffer(drv, indirect, out, in_, token)
        if bid is None:  # ring full: the device serves everything first
            drv.publish()
            chains = dev.pop(size)
            dev.push([(c.head, c.in_len) for c in chains])
            got.extend(drv.get_used())
            bid = add_buffer(drv, indirect, out, in_, token)
        assert bid is not None
        sent.append(token)
        drv.publish()
        (ch,) = dev.pop(1)  # one at a time: the indirect table is reused
        assert (ch.out_len, ch.in_len) == (sum(ln for _, ln in out), sum(ln for _, ln in in_))
        dev.push([(ch.head, ch.in_len)])
        got.extend(drv.get_used())
    assert [t for t, _ in got] == sent
    assert drv.num_free == size and drv.in_flight() == 0
    assert not dev.has_available()


@pytest.mark.parametrize("in_order", [False, True])
def test_in_order_driver_reads_a_batch_from_one_used_descriptor(in_order: bool) -> None:
    """VIRTIO_F_IN_ORDER: a used descriptor naming a later buffer stands for
    the batch up to it (DPDK's vhost writes one for a transmit batch), and
    the device's next one follows the batch's slots; without IN_ORDER it is
    that buffer alone."""
    _mem, drv, dev = make(size=8, in_order=in_order)
    drv.add([(buf(0), 1)], [], 0)
    drv.add([(buf(1), 1), (buf(2), 1)], [], 1)  # two slots
    drv.add([(buf(3), 1)], [], 2)
    drv.add([(buf(4), 1)], [], 3)
    drv.publish()
    a, b, c, d = dev.pop(8)
    if not in_order:
        dev.push([(b.head, 0), (a.head, 0)])
        assert drv.get_used() == [(1, 0), (0, 0)]
        return
    assert drv.device_base() == FRESH_BASE
    # One used descriptor, in the batch's first slot, for buffers 0-2 (4 slots).
    raw = _mem.view(DESC, 16 * 8)
    RAW.pack_into(raw, 0, 0, 5, c.head, VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED)  # used, wrap 1
    assert drv.device_base() == encode_base(4, 1, 4, 1)
    assert not drv.device_done()
    assert drv.get_used() == [(0, 0), (1, 0), (2, 5)]
    RAW.pack_into(raw, 16 * 4, 0, 0, d.head, VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED)
    assert drv.get_used() == [(3, 0)]
    assert drv.device_done() and drv.in_flight() == 0 and drv.num_free == 8


def test_unpop_gives_back_chains_of_several_slots() -> None:
    """Everything in flight can be given back whatever its slots; part of it
    while every buffer takes one slot."""
    _mem, drv, dev = make(size=5)
    drv.add([], [(buf(0), 8), (buf(1), 8)], "a")  # slots 0-1
    drv.add([], [(buf(2), 8)], "b")  # slot 2
    drv.add([], [(buf(3), 8), (buf(4), 8)], "c")  # slots 3-4
    drv.publish()
    a, b, c = dev.pop(8)
    assert dev.avail_idx == 0 and dev.avail_wrap == 0  # wrapped
    with pytest.raises(ValueError, match="several slots"):
        dev.unpop(2)
    dev.unpop(3)
    assert (dev.avail_idx, dev.avail_wrap) == (0, 1)
    a2, b2, c2 = dev.pop(8)
    assert (a2.head, b2.head, c2.head) == (a.head, b.head, c.head)
    dev.push([(a2.head, 1), (b2.head, 2), (c2.head, 3)])
    assert drv.get_used() == [("a", 1), ("b", 2), ("c", 3)]
    with pytest.raises(ValueError, match="only 0 in flight"):
        dev.unpop(1)
    for i in range(3):
        drv.add([], [(buf(i), 8)], i)
    drv.publish()
    assert len(dev.pop(8)) == 3
    dev.unpop(2)  # one slot each: part of them
    assert (dev.avail_idx, dev.avail_wrap) == (1, 0)
    assert len(dev.pop(8)) == 2


def test_restart_from_base_continues_the_ring() -> None:
    """GET_VRING_BASE then SET_VRING_BASE: a new device queue goes on where
    the old one stopped, wrap counters included."""
    mem, drv, dev = make(size=3)
    for i in range(4):  # one lap and a bit
        drv.add([(buf(i), 4)], [], i)
        drv.publish()
        (ch,) = dev.pop(4)
        dev.push([(ch.head, 0)])
        assert drv.get_used() == [(i, 0)]
    base = dev.base()
    assert decode_base(base, 3) == (1, 0, 1, 0)
    dev2 = PackedDeviceQueue(mem, 3, DESC, DRIVER, DEVICE, base=base)
    drv.add([(buf(9), 4)], [], "next")
    drv.publish()
    (ch,) = dev2.pop(4)
    dev2.push([(ch.head, 0)])
    assert drv.get_used() == [("next", 0)]


def test_used_base_pops_the_in_flight_chains_again() -> None:
    mem, drv, dev = make(size=4)
    drv.add([(buf(0), 4)], [], "x")
    drv.publish()
    dev.pop(4)  # in flight when the worker dies
    dev2 = PackedDeviceQueue(mem, 4, DESC, DRIVER, DEVICE, base=dev.used_base())
    (ch,) = dev2.pop(4)
    dev2.push([(ch.head, 0)])
    assert drv.get_used() == [("x", 0)]


def test_interrupt_suppression_by_flags() -> None:
    _mem, drv, dev = make(size=4)
    for mode, want in ((EVENT_DISABLE, False), (EVENT_ENABLE, True)):
        drv.add([(buf(0), 4)], [], mode)
        drv.publish()
        (ch,) = dev.pop(1)
        drv.enable_interrupts(mode == EVENT_ENABLE)
        assert drv.driver_event[1] == mode
        dev.push([(ch.head, 0)])
        assert dev.should_notify() is want
        assert dev.should_notify() is False  # nothing new
        drv.get_used()


def test_interrupt_suppression_by_descriptor_event() -> None:
    """EVENT_IDX: the driver asks for an interrupt once the device's used
    position passes its off_wrap, also across a wrap."""
    _mem, drv, dev = make(size=4, event_idx=True)
    for i in range(10):
        assert drv.enable_interrupts(True) is False
        assert drv.driver_event[1] == EVENT_DESC
        drv.add([(buf(i), 4)], [], i)
        drv.publish()
        (ch,) = dev.pop(1)
        dev.push([(ch.head, 0)])
        assert dev.should_notify(), i
        drv.get_used()
    # Event set two buffers ahead: the first push does not reach it.
    drv.driver_event[0] = (drv.used_idx + 1) % 4 | (drv.used_wrap ^ (drv.used_idx + 1 >= 4)) << 15
    for i, want in ((0, False), (1, True)):
        drv.add([(buf(i), 4)], [], i)
        drv.publish()
        (ch,) = dev.pop(1)
        dev.push([(ch.head, 0)])
        assert dev.should_notify() is want, i


def test_kick_suppression() -> None:
    _mem, drv, dev = make(size=4)
    assert dev.enable_notify(False) is False
    drv.add([(buf(0), 4)], [], "a")
    assert drv.kick_needed() is False
    assert dev.enable_notify(True) is True  # already available: do not sleep
    drv.add([(buf(1), 4)], [], "b")
    assert drv.kick_needed() is True
    assert drv.kick_needed() is False  # nothing new


def test_kick_suppression_by_descriptor_event() -> None:
    """EVENT_IDX: the device asks for a kick when its next slot is made
    available; the driver's later additions in the burst do not kick, across
    wraps too."""
    _mem, drv, dev = make(size=3, event_idx=True)
    for lap in range(4):
        assert dev.enable_notify(True) is False
        assert dev.device_event[1] == EVENT_DESC
        drv.add([(buf(0), 4)], [], "first")
        assert drv.kick_needed() is True, lap
        drv.add([(buf(1), 4)], [], "second")
        assert drv.kick_needed() is False, lap
        dev.enable_notify(False)
        chains = dev.pop(4)
        assert len(chains) == 2
        dev.push([(c.head, 0) for c in chains])
        assert [t for t, _ in drv.get_used()] == ["first", "second"]


def raw(mem: GuestMemory, slot: int, addr: int, length: int, bid: int, flags: int) -> None:
    RAW.pack_into(mem.view(DESC + 16 * slot, 16), 0, addr, length, bid, flags)


AV = VIRTQ_DESC_F_AVAIL  # available on the first lap


def test_chain_running_round_the_ring_is_refused() -> None:
    mem = GuestMemory.anonymous(MEM)
    dev = PackedDeviceQueue(mem, 4, DESC, DRIVER, DEVICE)
    for s in range(4):
        raw(mem, s, buf(s), 8, 0, AV | VIRTQ_DESC_F_NEXT)
    with pytest.raises(VirtqueueError, match="round the whole ring"):
        dev.pop(4)


@pytest.mark.parametrize(
    ("length", "flags", "match"),
    [
        (48, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, "INDIRECT together with NEXT"),
        (20, VIRTQ_DESC_F_INDIRECT, "bad indirect table length"),
        (0, VIRTQ_DESC_F_INDIRECT, "bad indirect table length"),
        (MAX_CHAIN_BYTES + 1, 0, "exceeds the cap"),
    ],
)
def test_bad_descriptors_are_refused(length: int, flags: int, match: str) -> None:
    mem = GuestMemory.anonymous(MEM)
    dev = PackedDeviceQueue(mem, 4, DESC, DRIVER, DEVICE)
    raw(mem, 0, TABLES, length, 0, AV | flags)
    with pytest.raises(VirtqueueError, match=match):
        dev.pop(4)


def test_readable_after_writable_and_memory_outside_are_refused() -> None:
    mem = GuestMemory.anonymous(MEM)
    dev = PackedDeviceQueue(mem, 4, DESC, DRIVER, DEVICE)
    raw(mem, 0, buf(0), 8, 0, AV | VIRTQ_DESC_F_NEXT | 2)
    raw(mem, 1, buf(1), 8, 0, AV)
    with pytest.raises(VirtqueueError, match="readable descriptor after writable"):
        dev.pop(4)
    dev = PackedDeviceQueue(mem, 4, DESC, DRIVER, DEVICE)
    raw(mem, 0, MEM - 4, 8, 0, AV)
    with pytest.raises(VirtqueueError, match="outside guest memory"):
        dev.pop(4)


def test_ring_geometry_is_checked() -> None:
    mem = GuestMemory.anonymous(MEM)
    with pytest.raises(VirtqueueError, match=r"not in 1\.\.32768"):
        PackedDeviceQueue(mem, 0, DESC, DRIVER, DEVICE)
    with pytest.raises(VirtqueueError, match="misaligned"):
        PackedDeviceQueue(mem, 4, 8, DRIVER, DEVICE)
    with pytest.raises(VirtqueueError, match="outside guest memory"):
        PackedDeviceQueue(mem, 4, DESC, MEM, DEVICE)
    PackedDeviceQueue(mem, 3, DESC, DRIVER, DEVICE)  # any size


@settings(max_examples=200, deadline=None)
@given(ring=st.binary(min_size=16 * 8, max_size=16 * 8), tables=st.binary(max_size=256))
def test_any_ring_contents_pop_cleanly_or_raise(ring: bytes, tables: bytes) -> None:
    """Whatever a guest writes, pop returns chains inside guest memory or
    raises VirtqueueError, and never writes outside it."""
    backing = bytearray(b"\xa5" * 4096) + bytearray(MEM) + bytearray(b"\x5a" * 4096)
    region = MemoryRegion(0, MEM, 0x7000_0000, memoryview(backing)[4096 : 4096 + MEM])
    mem = GuestMemory([region])
    mem.write(DESC, ring)
    mem.write(0, tables[:16])  # an indirect table at address 0 overlaps the ring
    dev = PackedDeviceQueue(mem, 8, DESC, DRIVER, DEVICE, event_idx=True)
    try:
        chains = dev.pop(16)
        dev.push([(c.head, c.in_len) for c in chains])
        dev.should_notify()
    except VirtqueueError:
        pass
    assert backing[:4096] == b"\xa5" * 4096 and backing[-4096:] == b"\x5a" * 4096


def test_dirty_log_marks_written_bytes_and_ring_slots() -> None:
    _mem, drv, dev = make(size=4)
    log = DirtyLog(memoryview(bytearray(log_bytes_for(MEM))))
    dev.set_dirty_log(log, 0)
    page = 0x40000
    drv.add([], [(page + 10, 100), (page + 16 * LOG_PAGE, 100)], "rx")
    drv.publish()
    (ch,) = dev.pop(1)
    dev.push([(ch.head, 50)])  # only the first buffer was written
    assert log.is_dirty(page) and log.is_dirty(DESC)
    assert not log.is_dirty(page + 16 * LOG_PAGE)
    dev.enable_notify(True)
    assert log.is_dirty(DEVICE)
    assert drv.get_used() == [("rx", 50)]


def test_used_descriptor_flags_follow_the_device_wrap_counter() -> None:
    mem, drv, dev = make(size=2)
    for i in range(3):
        drv.add([(buf(i), 4)], [], i)
        drv.publish()
        (ch,) = dev.pop(1)
        dev.push([(ch.head, 0)])
        assert drv.get_used() == [(i, 0)]
    # Slot 0 was used on lap 2 (wrap 0): AVAIL and USED both clear.
    flags = RAW.unpack_from(mem.view(DESC, 16))[3]
    assert flags & (VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED) == 0


@settings(max_examples=120, deadline=None)
@given(
    size=st.integers(1, 9),
    steps=st.lists(st.tuples(st.integers(0, 9), st.integers(0, 9)), min_size=1, max_size=12),
)
def test_ring_position_reads_the_used_position_off_the_ring(
    size: int, steps: list[tuple[int, int]]
) -> None:
    """Whatever the driver has made available and the device has used (one
    slot per buffer), the ring shows where the device stands."""
    _mem, drv, dev = make(size)
    assert ring_position(dev.desc, size) == (0, 1)  # fresh (zeroed) ring
    assert is_position(dev.desc, size, 0, 1)
    k = 0
    for add, use in steps:
        for _ in range(add):
            if drv.add([(buf(k), 8)], [], k) is None:
                break
            k += 1
        drv.publish()
        dev.push([(c.head, 0) for c in dev.pop(use)])
        drv.get_used()
        # In flight (popped, not used) counts as available on the ring.
        pos = ring_position(dev.desc, size)
        assert pos == (dev.used_idx, dev.used_wrap), (pos, dev.base())
        assert is_position(dev.desc, size, *pos)
        others = [(s, w) for s in range(size) for w in (0, 1) if (s, w) != pos]
        assert not any(is_position(dev.desc, size, s, w) for s, w in others)


def test_ring_position_sees_past_chains_because_their_tails_are_marked() -> None:
    """A used chain's later slots are marked used, so the ring shows the
    device's position; without that mark the tail looks available."""
    _mem, drv, dev = make(size=6)
    drv.add([(buf(0), 8), (buf(1), 8)], [], "two slots")
    drv.add([(buf(2), 8)], [], "one")
    drv.publish()
    a, _b = dev.pop(2)
    dev.push([(a.head, 0)])  # slots 0-1 used, slot 2 in flight
    assert ring_position(dev.desc, 6) == (2, 1)
    assert not is_position(dev.desc, 6, 1, 1)
    assert drv.get_used() == [("two slots", 0)]
    dev.flags[8 * 1 + 7] = VIRTQ_DESC_F_AVAIL  # as a device that does not mark them
    assert ring_position(dev.desc, 6) == (1, 1)  # the tail misleads: hence the marks
    assert not is_position(dev.desc, 6, 2, 1)
