"""Split virtqueue: chain validation, notification rules, wrap-around, and a
Hypothesis state machine driving driver and device over one guest memory."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from virtnet.errors import VirtqueueError
from virtnet.memory import GuestMemory, MemoryRegion
from virtnet.virtq import (
    MAX_CHAIN_BYTES,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    DeviceQueue,
    DriverQueue,
    split_ring_layout,
    vring_need_event,
)

DESC = struct.Struct("<QIHH")
GUARD = 4096
MEM_SIZE = 1 << 20
RING_BASE = 0x0
DATA_BASE = 0x40000


def guarded_memory() -> tuple[GuestMemory, bytearray]:
    """Guest memory that is a window of a bigger buffer: the guards must never change."""
    backing = bytearray(b"\xa5" * GUARD) + bytearray(MEM_SIZE) + bytearray(b"\x5a" * GUARD)
    view = memoryview(backing)[GUARD : GUARD + MEM_SIZE]
    region = MemoryRegion(0, MEM_SIZE, 0x7000_0000, view)
    return GuestMemory([region]), backing


def guards_intact(backing: bytearray) -> bool:
    return backing[:GUARD] == b"\xa5" * GUARD and backing[-GUARD:] == b"\x5a" * GUARD


def make_pair(
    size: int = 16, event_idx: bool = False, in_order: bool = False
) -> tuple[GuestMemory, DriverQueue, DeviceQueue]:
    mem = GuestMemory.anonymous(MEM_SIZE)
    lay = split_ring_layout(size)
    drv = DriverQueue(
        mem, size, lay.desc, lay.avail, lay.used, event_idx=event_idx, in_order=in_order
    )
    dev = DeviceQueue(mem, size, lay.desc, lay.avail, lay.used, event_idx=event_idx)
    return mem, drv, dev


def raw_desc(mem: GuestMemory, i: int, addr: int, length: int, flags: int, nxt: int) -> None:
    DESC.pack_into(mem.view(RING_BASE + 16 * i, 16), 0, addr, length, flags, nxt)


def make_avail(mem: GuestMemory, size: int, heads: list[int]) -> None:
    lay = split_ring_layout(size)
    av = mem.view(lay.avail, 6 + 2 * size).cast("H")
    for k, h in enumerate(heads):
        av[2 + k] = h
    av[1] = len(heads)


# --------------------------------------------------------------------------- unit


def test_roundtrip_multi_buffer_chain() -> None:
    mem, drv, dev = make_pair()
    mem.write(DATA_BASE, b"head")
    mem.write(DATA_BASE + 100, b"body")
    drv.add(
        [(DATA_BASE, 4), (DATA_BASE + 100, 4)], [(DATA_BASE + 200, 8), (DATA_BASE + 300, 8)], "t"
    )
    assert drv.kick_needed()
    (ch,) = dev.pop(8)
    assert b"".join(bytes(b) for b in ch.out) == b"headbody"
    assert ch.out_len == 8 and ch.in_len == 16 and len(ch.in_) == 2
    ch.in_[1][:2] = b"ok"
    dev.push([(ch.head, 10)])
    assert drv.get_used() == [("t", 10)]
    assert mem.read(DATA_BASE + 300, 2) == b"ok"
    assert drv.num_free == 16


@pytest.mark.parametrize("size", [0, 3, 100, 65536])
def test_bad_queue_size(size: int) -> None:
    mem = GuestMemory.anonymous(MEM_SIZE)
    with pytest.raises(VirtqueueError):
        DeviceQueue(mem, size, 0, 0x1000, 0x2000)


def test_misaligned_or_outside_rings() -> None:
    mem = GuestMemory.anonymous(MEM_SIZE)
    with pytest.raises(VirtqueueError):
        DeviceQueue(mem, 16, 8, 0x1000, 0x2000)
    with pytest.raises(VirtqueueError):
        DeviceQueue(mem, 16, 0, 0x1000, 0x2002)
    with pytest.raises(VirtqueueError):
        DeviceQueue(mem, 256, 0, 0x1000, MEM_SIZE - 16)


def test_descriptor_loop_detected() -> None:
    mem, _, dev = make_pair(8)
    raw_desc(mem, 0, DATA_BASE, 10, VIRTQ_DESC_F_NEXT, 1)
    raw_desc(mem, 1, DATA_BASE, 10, VIRTQ_DESC_F_NEXT, 0)
    make_avail(mem, 8, [0])
    with pytest.raises(VirtqueueError, match="loop"):
        dev.pop(8)


def test_next_out_of_range() -> None:
    mem, _, dev = make_pair(8)
    raw_desc(mem, 0, DATA_BASE, 10, VIRTQ_DESC_F_NEXT, 8)
    make_avail(mem, 8, [0])
    with pytest.raises(VirtqueueError, match="next"):
        dev.pop(8)


def test_head_out_of_range() -> None:
    mem, _, dev = make_pair(8)
    make_avail(mem, 8, [9])
    with pytest.raises(VirtqueueError, match="head"):
        dev.pop(8)


def test_avail_index_too_far_ahead() -> None:
    mem, _, dev = make_pair(8)
    lay = split_ring_layout(8)
    mem.view(lay.avail, 4).cast("H")[1] = 9
    with pytest.raises(VirtqueueError, match="ahead"):
        dev.pop(8)


def test_buffer_outside_memory() -> None:
    mem, _, dev = make_pair(8)
    raw_desc(mem, 0, MEM_SIZE - 4, 10, 0, 0)
    make_avail(mem, 8, [0])
    with pytest.raises(VirtqueueError, match="outside"):
        dev.pop(8)


def test_readable_after_writable_rejected() -> None:
    mem, _, dev = make_pair(8)
    raw_desc(mem, 0, DATA_BASE, 10, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 1)
    raw_desc(mem, 1, DATA_BASE, 10, 0, 0)
    make_avail(mem, 8, [0])
    with pytest.raises(VirtqueueError, match="readable"):
        dev.pop(8)


def test_total_length_capped() -> None:
    _mem, _, dev = make_pair(8)
    big = GuestMemory([MemoryRegion.anonymous(MAX_CHAIN_BYTES + (1 << 20))])
    lay = split_ring_layout(8)
    d = DeviceQueue(big, 8, lay.desc, lay.avail, lay.used)
    DESC.pack_into(big.view(0, 16), 0, 0x100000, MAX_CHAIN_BYTES - 10, VIRTQ_DESC_F_NEXT, 1)
    DESC.pack_into(big.view(16, 16), 0, 0x100000, 11, 0, 0)
    av = big.view(lay.avail, 6 + 16).cast("H")
    av[2] = 0
    av[1] = 1
    with pytest.raises(VirtqueueError, match="total length"):
        d.pop(8)
    del dev


def test_indirect_chain() -> None:
    mem, drv, dev = make_pair(8)
    mem.write(DATA_BASE, b"abc")
    drv.add_indirect(0x30000, [(DATA_BASE, 3)], [(DATA_BASE + 64, 32), (DATA_BASE + 128, 32)], "i")
    drv.publish()
    (ch,) = dev.pop(8)
    assert bytes(ch.out[0]) == b"abc" and ch.in_len == 64
    dev.push([(ch.head, 0)])
    assert drv.get_used() == [("i", 0)]


def test_nested_indirect_rejected() -> None:
    mem, _, dev = make_pair(8)
    raw_desc(mem, 0, 0x30000, 32, VIRTQ_DESC_F_INDIRECT, 0)
    DESC.pack_into(mem.view(0x30000, 16), 0, 0x31000, 16, VIRTQ_DESC_F_INDIRECT, 0)
    make_avail(mem, 8, [0])
    with pytest.raises(VirtqueueError, match="nested"):
        dev.pop(8)


def test_indirect_with_next_rejected() -> None:
    mem, _, dev = make_pair(8)
    raw_desc(mem, 0, 0x30000, 32, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 1)
    make_avail(mem, 8, [0])
    with pytest.raises(VirtqueueError, match="INDIRECT"):
        dev.pop(8)


@pytest.mark.parametrize("length", [0, 15, 17])
def test_bad_indirect_length(length: int) -> None:
    mem, _, dev = make_pair(8)
    raw_desc(mem, 0, 0x30000, length, VIRTQ_DESC_F_INDIRECT, 0)
    make_avail(mem, 8, [0])
    with pytest.raises(VirtqueueError, match="indirect table length"):
        dev.pop(8)


def test_indirect_loop_detected() -> None:
    mem, _, dev = make_pair(8)
    raw_desc(mem, 0, 0x30000, 32, VIRTQ_DESC_F_INDIRECT, 0)
    DESC.pack_into(mem.view(0x30000, 16), 0, DATA_BASE, 4, VIRTQ_DESC_F_NEXT, 1)
    DESC.pack_into(mem.view(0x30010, 16), 0, DATA_BASE, 4, VIRTQ_DESC_F_NEXT, 0)
    make_avail(mem, 8, [0])
    with pytest.raises(VirtqueueError, match="loop"):
        dev.pop(8)


def test_vring_need_event_rule() -> None:
    # Notify iff event in [old, new).
    assert vring_need_event(5, 6, 5)
    assert not vring_need_event(6, 6, 5)
    assert vring_need_event(0xFFFF, 1, 0xFFFE)  # wraps
    assert not vring_need_event(3, 10, 5)


def test_event_idx_interrupt_suppression() -> None:
    _mem, drv, dev = make_pair(16, event_idx=True)
    for i in range(4):
        drv.add([], [(DATA_BASE + i * 64, 64)], i)
    drv.kick_needed()
    drv.enable_interrupts(True)  # used_event = 0: wants an interrupt for the first used
    chains = dev.pop(16)
    dev.push([(c.head, 1) for c in chains[:2]])
    assert dev.should_notify()
    dev.push([(c.head, 1) for c in chains[2:]])
    assert not dev.should_notify()  # used_event still 0, already passed
    assert len(drv.get_used()) == 4
    drv.enable_interrupts(True)  # used_event = 4
    drv.add([], [(DATA_BASE, 64)], "x")
    drv.kick_needed()
    (c,) = dev.pop(16)
    dev.push([(c.head, 0)])
    assert dev.should_notify()
    assert not dev.should_notify()  # nothing new


def test_event_idx_kick_suppression() -> None:
    _mem, drv, dev = make_pair(16, event_idx=True)
    assert not dev.enable_notify(True)  # avail_event = 0
    drv.add([(DATA_BASE, 1)], [], 0)
    assert drv.kick_needed()
    drv.add([(DATA_BASE, 1)], [], 1)
    assert not drv.kick_needed()  # avail_event still 0
    assert dev.enable_notify(True)  # work already there: caller must poll
    assert len(dev.pop(16)) == 2


def test_no_notify_and_no_interrupt_flags() -> None:
    _mem, drv, dev = make_pair(16)
    dev.enable_notify(False)
    drv.add([(DATA_BASE, 1)], [], 0)
    assert not drv.kick_needed()
    assert dev.enable_notify(True)
    drv.add([(DATA_BASE, 1)], [], 1)
    assert drv.kick_needed()
    drv.enable_interrupts(False)
    chains = dev.pop(16)
    dev.push([(c.head, 0) for c in chains])
    assert not dev.should_notify()
    drv.enable_interrupts(True)
    dev.push([])
    drv.get_used()


def test_indexes_wrap_at_2_16() -> None:
    _mem, drv, dev = make_pair(4)
    for i in range(70000 // 3):
        for k in range(3):
            assert drv.add([(DATA_BASE + k, 1)], [], (i, k)) is not None
        drv.kick_needed()
        chains = dev.pop(4)
        assert len(chains) == 3
        dev.push([(c.head, 0) for c in chains])
        assert [t for t, _ in drv.get_used()] == [(i, 0), (i, 1), (i, 2)]
    assert dev.last_avail_idx == drv.avail_idx == (70000 // 3 * 3) & 0xFFFF


def test_resume_from_base() -> None:
    mem, drv, dev = make_pair(8)
    drv.add([(DATA_BASE, 1)], [], 0)
    drv.add([(DATA_BASE, 1)], [], 1)
    drv.kick_needed()
    (c0,) = dev.pop(1)
    dev.push([(c0.head, 0)])
    base = dev.last_avail_idx
    lay = split_ring_layout(8)
    dev2 = DeviceQueue(mem, 8, lay.desc, lay.avail, lay.used, last_avail_idx=base)
    (c1,) = dev2.pop(8)
    dev2.push([(c1.head, 0)])
    assert [t for t, _ in drv.get_used()] == [0, 1]


def test_driver_rejects_unknown_used_head() -> None:
    _mem, drv, dev = make_pair(8)
    drv.add([(DATA_BASE, 1)], [], 0)
    drv.kick_needed()
    dev.push([(5, 0)])  # a device that lies
    with pytest.raises(VirtqueueError):
        drv.get_used()


def test_in_order_driver_takes_descriptors_in_ring_order() -> None:
    """VIRTIO_F_IN_ORDER (virtio 1.3 2.7.9): the driver uses descriptors in
    ring order, wrapping at the end of the table, across chains of any length."""
    _mem, drv, dev = make_pair(8, in_order=True)
    heads = [drv.add([(DATA_BASE, 1)] * n, [], n) for n in (3, 1, 2)]
    assert heads == [0, 3, 4]
    drv.kick_needed()
    dev.push([(ch.head, 0) for ch in dev.pop(8)])
    assert [t for t, _ in drv.get_used()] == [3, 1, 2]
    # Two descriptors (6, 7) are left before the wrap; a chain of 3 runs over it.
    assert drv.add([(DATA_BASE, 1)] * 3, [], "wrap") == 6
    drv.kick_needed()
    (ch,) = dev.pop(8)
    assert ch.out_len == 3
    assert drv.add([(DATA_BASE, 1)], [], "next") == 1


def test_in_order_device_returns_a_batch_with_one_used_entry() -> None:
    """virtio 1.3 2.7.9: one entry, where the batch's first would go, names the
    last buffer; the used index moves on by the batch; the next batch's entry
    goes where its first would."""
    _mem, drv, dev = make_pair(8, in_order=True)
    for k in range(5):
        drv.add([(DATA_BASE, 1)], [], k)
    drv.kick_needed()
    chains = dev.pop(8)
    dev.push_batch(chains[2].head, 3)
    dev.push_one(chains[3].head, 7)
    assert drv.get_used(1) == [(0, 0), (1, 0), (2, 0)]  # a batch comes back whole
    assert drv.get_used() == [(3, 7)]
    dev.push_batch(chains[4].head, 1)
    assert drv.get_used() == [(4, 0)]
    assert drv.num_free == 8 and drv.in_flight() == 0


@pytest.mark.parametrize("in_order", [False, True])
def test_in_order_driver_refuses_a_device_that_uses_out_of_order(in_order: bool) -> None:
    """The second buffer used before the first: to an in-order driver that is
    a batch running past the used index."""
    _mem, drv, dev = make_pair(8, in_order=in_order)
    for k in range(3):
        drv.add([(DATA_BASE, 1)], [], k)
    drv.kick_needed()
    _a, b, _c = dev.pop(8)
    dev.push([(b.head, 0)])
    if not in_order:
        assert drv.get_used() == [(1, 0)]
        return
    with pytest.raises(VirtqueueError, match="past its used index"):
        drv.get_used()


# ------------------------------------------------------------------ state machine


class DriverDeviceMachine(RuleBasedStateMachine):
    """Random chains, random batch sizes, hostile bytes in the descriptor table.

    Invariants: nothing outside guest memory changes, every buffer comes back
    exactly once and in order (the device completes in order here), indexes
    wrap, the device never hands out a view outside guest memory.
    """

    SIZE = 8

    def __init__(self) -> None:
        super().__init__()
        self.mem, self.backing = guarded_memory()
        lay = split_ring_layout(self.SIZE)
        self.lay = lay
        self.drv = DriverQueue(self.mem, self.SIZE, lay.desc, lay.avail, lay.used, event_idx=True)
        self.dev = DeviceQueue(self.mem, self.SIZE, lay.desc, lay.avail, lay.used, event_idx=True)
        self.sent: list[int] = []
        self.popped: list[tuple[int, int]] = []  # (head, token)
        self.returned: list[int] = []
        self.token = 0
        self.head_token: dict[int, int] = {}
        self.broken = False

    @precondition(lambda self: not self.broken)
    @rule(
        n_out=st.integers(0, 3),
        n_in=st.integers(0, 3),
        length=st.integers(1, 2000),
    )
    def add(self, n_out: int, n_in: int, length: int) -> None:
        if n_out + n_in == 0:
            n_out = 1
        base = DATA_BASE + (self.token % 64) * 8192
        out = [(base + 2048 * k, length) for k in range(n_out)]
        in_ = [(base + 2048 * (n_out + k), length) for k in range(n_in)]
        if (head := self.drv.add(out, in_, self.token)) is not None:
            self.head_token[head] = self.token
            self.sent.append(self.token)
            self.token += 1

    @precondition(lambda self: not self.broken)
    @rule()
    def kick(self) -> None:
        self.drv.kick_needed()

    @precondition(lambda self: not self.broken)
    @rule(batch=st.integers(1, 8))
    def device_pop(self, batch: int) -> None:
        for ch in self.dev.pop(batch):
            for b in (*ch.out, *ch.in_):
                assert b.obj is self.mem.regions[0].buf.obj
            self.popped.append((ch.head, self.head_token[ch.head]))

    @precondition(lambda self: not self.broken)
    @rule(batch=st.integers(1, 8))
    def device_push(self, batch: int) -> None:
        now, self.popped = self.popped[:batch], self.popped[batch:]
        self.dev.push([(h, 0) for h, _ in now])
        self.dev.should_notify()

    @precondition(lambda self: not self.broken)
    @rule()
    def driver_reclaim(self) -> None:
        self.returned.extend(int(t) for t, _ in self.drv.get_used())  # type: ignore[call-overload]

    # Not before some buffers made the round trip: hypothesis would otherwise
    # pick it early and end most runs before anything was used.
    @precondition(lambda self: len(self.returned) >= 3)
    @rule(slot=st.integers(0, 7), junk=st.binary(min_size=16, max_size=16))
    def corrupt_descriptor(self, slot: int, junk: bytes) -> None:
        """The guest scribbles over a descriptor: the device must reject or survive it."""
        self.mem.write(self.lay.desc + 16 * slot, junk)
        with contextlib.suppress(VirtqueueError):
            self.dev.pop(8)
        self.broken = True

    @invariant()
    def memory_outside_untouched(self) -> None:
        assert guards_intact(self.backing)

    @invariant()
    def exactly_once_in_order(self) -> None:
        assert self.returned == self.sent[: len(self.returned)]
        assert self.drv.num_free + self.drv.in_flight() * 0 <= self.SIZE


DriverDeviceMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=60, deadline=None
)
test_driver_device_machine = DriverDeviceMachine.TestCase


class InOrderDriverDeviceMachine(DriverDeviceMachine):
    """The same with VIRTIO_F_IN_ORDER: the driver takes descriptors in ring
    order, and the device returns some batches with one used entry each
    (``push_batch``); every buffer still comes back exactly once, in order."""

    def __init__(self) -> None:
        super().__init__()
        lay = self.lay
        self.drv = DriverQueue(
            self.mem, self.SIZE, lay.desc, lay.avail, lay.used, event_idx=True, in_order=True
        )

    @precondition(lambda self: not self.broken)
    @rule(batch=st.integers(1, 8))
    def device_push_batch(self, batch: int) -> None:
        now, self.popped = self.popped[:batch], self.popped[batch:]
        if now:
            self.dev.push_batch(now[-1][0], len(now))
            self.dev.should_notify()


InOrderDriverDeviceMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=60, deadline=None
)
test_in_order_driver_device_machine = InOrderDriverDeviceMachine.TestCase
