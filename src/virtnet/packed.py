"""Packed virtqueues (virtio 1.3, 2.8 "Packed Virtqueues"), device side and driver side.

Negotiated with ``VIRTIO_F_RING_PACKED`` (bit 34).  One ring of 16-byte
descriptors ``(addr u64, len u32, id u16, flags u16)`` carries both directions:
the driver makes a descriptor available by writing its flags with AVAIL equal
to its wrap counter and USED the opposite; the device writes a used descriptor
(buffer id, written length) into the next slot of *its* position with AVAIL and
USED both equal to its wrap counter.  Two 4-byte event suppression structures
(``off_wrap u16, flags u16``; 2.8.14) replace the split ring's flags and event
indexes: the driver area says when the driver wants interrupts, the device area
when the device wants kicks.

Sans-I/O like :mod:`virtnet.virtq`, and :class:`PackedDeviceQueue` offers the
same interface as :class:`~virtnet.virtq.DeviceQueue` (``pop``, ``unpop``,
``push``, ``push_heads``, ``push_one``, ``should_notify``, ``enable_notify``,
``base``), so the vhost-user worker serves either kind of ring.

Invariants kept on the device side:

* Nothing is read past a descriptor whose flags do not say available; a chain
  (descriptors linked by NEXT, 2.8.6) spans at most ``size`` slots, so a chain
  that runs round the whole ring raises :class:`VirtqueueError` instead of
  being followed; an indirect table (2.8.7) holds at most
  :data:`~virtnet.virtq.MAX_QUEUE_SIZE` entries, has a non-zero length that is
  a multiple of 16, and its descriptor carries no NEXT.
* Device-writable buffers never precede readable ones, and a chain describes
  at most :data:`~virtnet.virtq.MAX_CHAIN_BYTES`.
* Every buffer is a view from :meth:`GuestMemory.view`: nothing outside guest
  memory is touched.
* A used descriptor is written id and length first, flags last, and the
  device's position then moves on by the number of slots the buffer took
  (2.8.21.3: one for an indirect buffer), which is what drivers expect (Linux's
  ``virtqueue_get_buf_ctx_packed`` steps by the chain's descriptor count).

Positions: ``avail``/``used`` are slot indexes in ``[0, size)`` with a wrap
counter each, both 1 on a fresh ring (2.8.1).  The vhost-user "ring base" of a
packed ring (vhost-user.rst, "Vring descriptor indices for packed
virtqueues") packs them into 32 bits: avail index in bits 0-14, its wrap
counter in bit 15, used index in bits 16-30, its wrap counter in bit 31.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Iterable, Sequence
from itertools import repeat

from virtnet.dirty_log import DirtyLog
from virtnet.errors import VirtqueueError
from virtnet.memory import GuestMemory
from virtnet.virtq import (
    DESC_SIZE,
    MAX_CHAIN_BYTES,
    MAX_QUEUE_SIZE,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    Chain,
    RingLayout,
    _full_barrier,
    first_region,
    vring_need_event,
)

__all__ = [
    "EVENT_DESC",
    "EVENT_DISABLE",
    "EVENT_ENABLE",
    "FRESH_BASE",
    "VIRTQ_DESC_F_AVAIL",
    "VIRTQ_DESC_F_USED",
    "PackedDeviceQueue",
    "PackedDriverQueue",
    "decode_base",
    "encode_base",
    "is_position",
    "packed_ring_layout",
    "ring_position",
]

#: 2.8.1 descriptor flags: bit 7 AVAIL, bit 15 USED.
VIRTQ_DESC_F_AVAIL = 1 << 7
VIRTQ_DESC_F_USED = 1 << 15
#: 2.8.14 event suppression ``flags``: RING_EVENT_FLAGS_ENABLE/DISABLE/DESC.
EVENT_ENABLE = 0
EVENT_DISABLE = 1
EVENT_DESC = 2
#: 2.8.1: alignment of the descriptor ring and of each event suppression area.
PACKED_DESC_ALIGN = 16
EVENT_ALIGN = 4
#: Bytes of one event suppression structure.
EVENT_SIZE = 4
#: The base of a ring never used: both positions 0, both wrap counters 1.
FRESH_BASE = 1 << 15 | 1 << 31

_DESC = struct.Struct("<QIHH")
_desc_unpack = _DESC.unpack_from
_desc_pack = _DESC.pack_into
_IDLEN = struct.Struct("<IH")  # len u32, id u16 at offset 8 of a descriptor
_idlen_pack = _IDLEN.pack_into
_BOTH = VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED
#: Buffer ids are u16: a table of 2**16 entries needs no range check.
_IDS = 1 << 16


def check_packed_size(size: int) -> None:
    """2.8: a packed ring has 1..32768 entries, any number (not only powers of 2)."""
    if not 0 < size <= MAX_QUEUE_SIZE:
        raise VirtqueueError(f"packed queue size {size} is not in 1..{MAX_QUEUE_SIZE}")


def packed_ring_layout(size: int) -> RingLayout:
    """A packed ring in one block: the descriptors, then the driver and the
    device event suppression areas, 4 bytes each (what vhost-user's
    SET_VRING_ADDR sends as desc, avail and used)."""
    check_packed_size(size)
    driver = size * DESC_SIZE
    return RingLayout(size, 0, driver, driver + EVENT_SIZE, driver + 2 * EVENT_SIZE)


def encode_base(avail: int, avail_wrap: int, used: int, used_wrap: int) -> int:
    """The 32-bit vhost-user ring base of a packed ring."""
    return avail | avail_wrap << 15 | used << 16 | used_wrap << 31


def decode_base(base: int, size: int) -> tuple[int, int, int, int]:
    """``(avail, avail_wrap, used, used_wrap)`` from a vhost-user ring base.

    A base with nothing in bits 16-31 names the avail position only (DPDK's
    virtio-user sends ``1 << 15`` for a fresh ring, and DPDK's vhost library
    reads no more than that): the used position is then the same.
    """
    if not 0 <= base <= 0xFFFFFFFF:
        raise VirtqueueError(f"packed ring base 0x{base:x} is not a u32")
    avail, avail_wrap = base & 0x7FFF, base >> 15 & 1
    if base >> 16:
        used, used_wrap = base >> 16 & 0x7FFF, base >> 31
    else:
        used, used_wrap = avail, avail_wrap
    if avail >= size or used >= size:
        raise VirtqueueError(f"packed ring base 0x{base:08x}: an index is not below size {size}")
    return avail, avail_wrap, used, used_wrap


def _avail_bits(wrap: int) -> int:
    """2.8.1: the AVAIL/USED bits of a slot made available on lap ``wrap``
    (AVAIL equal to the wrap counter, USED not)."""
    return VIRTQ_DESC_F_AVAIL if wrap else VIRTQ_DESC_F_USED


def _slot_state(flags: memoryview, slot: int) -> tuple[bool, int]:
    """``(available, wrap)`` of a slot as its flags say."""
    f = flags[8 * slot + 7]
    a = int(bool(f & VIRTQ_DESC_F_AVAIL))
    return a != int(bool(f & VIRTQ_DESC_F_USED)), a


def is_position(desc: memoryview, size: int, slot: int, wrap: int) -> bool:
    """Whether the device's used position may be ``(slot, wrap)`` as the ring
    shows it: the slot holds a buffer made available on lap ``wrap`` or one
    used on the lap before, and the slot before it one used on this lap or one
    made available on the next (on slot 0: the lap before, or this one)."""
    flags = desc.cast("H")
    here = _slot_state(flags, slot)
    if here not in ((True, wrap), (False, wrap ^ 1)):
        return False
    before = _slot_state(flags, slot - 1 if slot else size - 1)
    if slot:
        return before in ((False, wrap), (True, wrap ^ 1))
    return before in ((False, wrap ^ 1), (True, wrap))


def ring_position(desc: memoryview, size: int) -> tuple[int, int] | None:
    """The device's used position ``(slot, wrap)`` as the descriptor ring shows
    it, or None when the ring does not say unambiguously (or says a place
    :func:`is_position` would not accept).

    Slots from the used position up to the driver's next avail position hold
    available descriptors (AVAIL != USED), the others used ones (AVAIL ==
    USED); the wrap bits flip where a lap began.  So the position is the one
    place where a used slot is followed by an available one; on a ring that
    is all used (or all available) it is where the wrap bit changes, or slot
    0 when it never does.  This holds while every buffer takes one slot
    (Linux and DPDK put several parts behind one indirect descriptor) or the
    device marks a chain's later slots used too (:class:`PackedDeviceQueue`
    does); otherwise those slots keep their available flags, which can make
    more than one such place (None) or put the place at a chain's tail.

    QEMU needs this: it keeps no state of a packed ring across a backend
    restart (for a split ring it reads the used index from guest memory) and
    sends a stale or fresh base when the backend comes back.
    """
    pos = _position_guess(desc, size)
    if pos is None or not is_position(desc, size, *pos):
        return None
    return pos


def _position_guess(desc: memoryview, size: int) -> tuple[int, int] | None:
    """The one place the ring shows (see :func:`ring_position`), unchecked."""
    flags = desc.cast("H")
    avail, wrap = zip(*(_slot_state(flags, i) for i in range(size)), strict=True)
    starts = [i for i in range(size) if avail[i] and not avail[i - 1]]
    if len(starts) > 1:
        return None
    if starts:
        slot = starts[0]
        if sum(1 for i in range(size) if not avail[i] and avail[i - 1]) != 1:
            return None
        return slot, wrap[slot]
    # All slots alike: where the wrap bit changes (at most once), else slot 0.
    changes = [i for i in range(1, size) if wrap[i] != wrap[i - 1]]
    if len(changes) > 1:
        return None
    if avail[0]:
        # All available (the ring is full): slots [P, size) are of the used lap.
        return (changes[0], wrap[changes[0]]) if changes else (0, wrap[0])
    # All used: slots [0, P) were used in the current lap, [P, size) in the last.
    return (changes[0], wrap[0]) if changes else (0, wrap[0] ^ 1)


def _views(
    mem: GuestMemory, size: int, desc_addr: int, driver_addr: int, device_addr: int
) -> tuple[memoryview, memoryview, memoryview]:
    check_packed_size(size)
    if desc_addr % PACKED_DESC_ALIGN or driver_addr % EVENT_ALIGN or device_addr % EVENT_ALIGN:
        raise VirtqueueError(
            f"misaligned packed ring: desc 0x{desc_addr:x} driver 0x{driver_addr:x}"
            f" device 0x{device_addr:x}"
        )
    try:
        desc = mem.view(desc_addr, size * DESC_SIZE)
        driver = mem.view(driver_addr, EVENT_SIZE).cast("H")
        device = mem.view(device_addr, EVENT_SIZE).cast("H")
    except VirtqueueError:
        raise
    except Exception as exc:  # GuestMemoryError
        raise VirtqueueError(f"packed ring outside guest memory: {exc}") from exc
    return desc, driver, device


class PackedDeviceQueue:
    """The device's side of one packed virtqueue."""

    def __init__(
        self,
        mem: GuestMemory,
        size: int,
        desc_addr: int,
        driver_addr: int,
        device_addr: int,
        *,
        event_idx: bool = False,
        base: int = FRESH_BASE,
    ) -> None:
        self.mem = mem
        self.desc, self.driver_event, self.device_event = _views(
            mem, size, desc_addr, driver_addr, device_addr
        )
        self.flags = self.desc.cast("H")  # a slot's flags: flags[8 * slot + 7], id: [8 * slot + 6]
        self.words = self.desc.cast("I")  # a slot's len: words[4 * slot + 2]
        self.size = size
        self.desc_addr = desc_addr
        self.device_addr = device_addr
        self.event_idx = event_idx
        self.avail_idx, self.avail_wrap, self.used_idx, self.used_wrap = decode_base(base, size)
        self._signalled_used = self.used_idx
        self._pushed = False  # used descriptors written since the last should_notify
        self.notify_enabled = True
        # Slots taken by the buffer of each id: 1 unless a chain of several
        # is in flight under that id (set at pop, back to 1 at push).
        self._slots = [1] * _IDS
        # Buffers popped and not yet pushed, and the slots they take (unpop).
        self._in_flight = 0
        self._in_flight_slots = 0
        # One reusable Chain per id for single-descriptor buffers (as the
        # split queue keeps one per head): an id is in flight once at a time.
        # Drivers number their buffers below the ring size; others go in a dict.
        self._pool = [Chain(i, (), (), 0, 0) for i in range(size)]
        self._pool_high: dict[int, Chain] = {}
        #: Where push stores ``1 << 32 | used_base()`` (a shared counter
        #: slot word: the supervisor restarts a crashed worker from it).
        self.position: tuple[memoryview, int] | None = None
        self.dirty: DirtyLog | None = None
        # While logging: each id's device-writable buffers (gpa, len).
        self._writable: dict[int, list[tuple[int, int]]] = {}

    # -- state ------------------------------------------------------------
    @property
    def last_avail_idx(self) -> int:
        """The avail position and wrap counter as the low half of :meth:`base`."""
        return self.avail_idx | self.avail_wrap << 15

    def base(self) -> int:
        """Where the ring stands, as vhost-user GET_VRING_BASE reports it."""
        return encode_base(self.avail_idx, self.avail_wrap, self.used_idx, self.used_wrap)

    def used_base(self) -> int:
        """The base to resume from when the chains in flight are to be popped again."""
        return encode_base(self.used_idx, self.used_wrap, self.used_idx, self.used_wrap)

    def restart_at(self, slot: int, wrap: int) -> None:
        """Take ``(slot, wrap)`` as both positions (nothing in flight)."""
        if not 0 <= slot < self.size or wrap not in (0, 1):
            raise VirtqueueError(f"position ({slot}, {wrap}) is not on a ring of {self.size}")
        self.avail_idx = self.used_idx = self._signalled_used = slot
        self.avail_wrap = self.used_wrap = wrap
        self._in_flight = self._in_flight_slots = 0

    def set_dirty_log(self, log: DirtyLog | None, used_log_addr: int | None = None) -> None:
        """Mark every page this queue writes in ``log``: the buffers' written
        bytes, and the ring slots and device area written, at their own
        guest-physical addresses whether or not ``used_log_addr`` (the split
        ring's VHOST_VRING_F_LOG address) is given: a packed ring has no used
        ring to log elsewhere.  ``None`` stops logging."""
        del used_log_addr
        self.dirty = log
        if log is None:
            self._writable.clear()

    # -- available side ---------------------------------------------------
    def _is_avail(self, slot: int, wrap: int) -> bool:
        return self.flags[8 * slot + 7] & _BOTH == _avail_bits(wrap)

    def has_available(self) -> bool:
        return self._is_avail(self.avail_idx, self.avail_wrap)

    def pending(self) -> int:
        """Slots made available from the device's position on (a scan)."""
        n = 0
        slot, wrap = self.avail_idx, self.avail_wrap
        while n < self.size and self._is_avail(slot, wrap):
            n += 1
            slot += 1
            if slot == self.size:
                slot = 0
                wrap ^= 1
        return n

    def pop(self, max_chains: int) -> list[Chain]:
        """Pop up to ``max_chains`` available buffers (a batch)."""
        out_chains: list[Chain] = []
        append = out_chains.append
        size = self.size
        desc = self.desc
        flags = self.flags
        pool = self._pool
        slot = self.avail_idx
        wrap = self.avail_wrap
        avail_bits = _avail_bits(wrap)
        view = self.mem.view
        # Inline translation for buffers inside the first region (the whole
        # memory in most guests), as the split queue does.
        base, end, rbuf = first_region(self.mem)
        empty: tuple[memoryview, ...] = ()
        try:
            while len(out_chains) < max_chains:
                # The flags first (the driver writes them last), then the rest.
                if flags[8 * slot + 7] & _BOTH != avail_bits:
                    break
                addr, length, bid, f = _desc_unpack(desc, slot * DESC_SIZE)
                if not f & (VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_INDIRECT):
                    if length > MAX_CHAIN_BYTES:
                        raise VirtqueueError(f"descriptor length {length} exceeds the cap")
                    ch = pool[bid] if bid < size else self._chain_high(bid)
                    if not length:
                        ch.out = ch.in_ = empty
                        ch.out_len = ch.in_len = 0
                    else:
                        if base <= addr and addr + length <= end:
                            off = addr - base
                            v = rbuf[off : off + length]
                        else:
                            v = view(addr, length)
                        if f & VIRTQ_DESC_F_WRITE:
                            ch.out = empty
                            ch.in_ = (v,)
                            ch.out_len = 0
                            ch.in_len = length
                            if self.dirty is not None:
                                self._writable[bid] = [(addr, length)]
                        else:
                            ch.out = (v,)
                            ch.in_ = empty
                            ch.out_len = length
                            ch.in_len = 0
                    n = 1
                else:
                    ch, n, bid = self._walk(slot, addr, length, bid, f)
                    self._slots[bid] = n  # back to 1 when it is pushed
                append(ch)
                slot += n
                if slot >= size:
                    slot -= size
                    wrap ^= 1
                    avail_bits = _avail_bits(wrap)
        except VirtqueueError:
            raise
        except Exception as exc:  # GuestMemoryError from view()
            raise VirtqueueError(f"descriptor outside guest memory: {exc}") from exc
        finally:
            # What was popped before an error stays popped (in flight); the
            # slots it took: at most the whole ring, once round.
            taken = slot - self.avail_idx + (size if wrap != self.avail_wrap else 0)
            self.avail_idx = slot
            self.avail_wrap = wrap
            self._in_flight += len(out_chains)
            self._in_flight_slots += taken
        return out_chains

    def _chain_high(self, bid: int) -> Chain:
        ch = self._pool_high.get(bid)
        if ch is None:
            ch = self._pool_high[bid] = Chain(bid, (), (), 0, 0)
        return ch

    def _walk(self, slot: int, addr: int, length: int, bid: int, f: int) -> tuple[Chain, int, int]:
        """A buffer of several descriptors, or an indirect one: its chain, the
        slots it takes and its id (2.8.6: the id of the last descriptor)."""
        size = self.size
        view = self.mem.view
        out: list[memoryview] = []
        in_: list[memoryview] = []
        out_len = in_len = 0
        writable: list[tuple[int, int]] = []
        if f & VIRTQ_DESC_F_INDIRECT:
            if f & VIRTQ_DESC_F_NEXT:
                raise VirtqueueError(f"slot {slot}: INDIRECT together with NEXT")
            if length == 0 or length % DESC_SIZE or length // DESC_SIZE > MAX_QUEUE_SIZE:
                raise VirtqueueError(f"slot {slot}: bad indirect table length {length}")
            table = view(addr, length)
            # 2.8.7: entries follow one another; only WRITE counts in their flags.
            entries = [_desc_unpack(table, k * DESC_SIZE) for k in range(length // DESC_SIZE)]
            n = 1
        else:
            entries = [(addr, length, bid, f)]
            n = 1
            s = slot
            while f & VIRTQ_DESC_F_NEXT:
                if n >= size:
                    raise VirtqueueError(f"slot {slot}: chain runs round the whole ring")
                s = s + 1 if s + 1 < size else 0
                addr, length, bid, f = _desc_unpack(self.desc, s * DESC_SIZE)
                if f & VIRTQ_DESC_F_INDIRECT:
                    raise VirtqueueError(f"slot {slot}: indirect descriptor inside a chain")
                entries.append((addr, length, bid, f))
                n += 1
        for addr, length, _id, ef in entries:
            if not length:
                continue
            if ef & VIRTQ_DESC_F_WRITE:
                in_.append(view(addr, length))
                in_len += length
                writable.append((addr, length))
            else:
                if in_:
                    raise VirtqueueError(f"slot {slot}: readable descriptor after writable")
                out.append(view(addr, length))
                out_len += length
            if out_len + in_len > MAX_CHAIN_BYTES:
                raise VirtqueueError(f"slot {slot}: total length exceeds {MAX_CHAIN_BYTES}")
        if self.dirty is not None and writable:
            self._writable[bid] = writable
        return Chain(bid, out, in_, out_len, in_len), n, bid

    def unpop(self, count: int) -> None:
        """Give back the last ``count`` popped buffers: all of those in flight,
        or any number while each takes one slot (what the worker needs: it
        gives back its whole rx reserve)."""
        if count <= 0:
            return
        if count > self._in_flight:
            raise ValueError(f"unpop({count}): only {self._in_flight} in flight")
        if count == self._in_flight:
            back = self._in_flight_slots
        elif self._in_flight_slots == self._in_flight:
            back = count
        else:
            raise ValueError(f"unpop({count}) of {self._in_flight}: buffers of several slots")
        self._in_flight -= count
        self._in_flight_slots -= back
        slot = self.avail_idx - back
        if slot < 0:
            slot += self.size
            self.avail_wrap ^= 1
        self.avail_idx = slot

    # -- used side --------------------------------------------------------
    def push(self, used: Iterable[tuple[int, int]]) -> None:
        """Return buffers as ``(id, written_len)``, in pop order."""
        if self._in_flight_slots != self._in_flight:
            # Some buffer in flight takes several slots (a chain).
            self._push_chains(used)
            return
        words = self.words
        flags = self.flags
        size = self.size
        idx = self.used_idx
        wrap = self.used_wrap
        mark = _BOTH if wrap else 0
        dirty = self.dirty
        count = 0
        for bid, length in used:
            words[4 * idx + 2] = length
            flags[8 * idx + 6] = bid
            flags[8 * idx + 7] = mark | VIRTQ_DESC_F_WRITE if length else mark
            if dirty is not None:
                self._log(dirty, idx, bid, length)
            count += 1
            idx += 1
            if idx == size:
                idx = 0
                wrap ^= 1
                mark = _BOTH if wrap else 0
        self._pushed_to(idx, wrap, count)

    def _push_chains(self, used: Iterable[tuple[int, int]]) -> None:
        """:meth:`push` when buffers of several slots may be among ``used``."""
        words = self.words
        flags = self.flags
        slots = self._slots
        size = self.size
        idx = self.used_idx
        wrap = self.used_wrap
        mark = _BOTH if wrap else 0
        dirty = self.dirty
        count = 0
        for bid, length in used:
            n = slots[bid]
            if n > 1:
                self._mark_tail(idx, wrap, n)
                slots[bid] = 1
            words[4 * idx + 2] = length
            flags[8 * idx + 6] = bid
            flags[8 * idx + 7] = mark | VIRTQ_DESC_F_WRITE if length else mark
            if dirty is not None:
                self._log(dirty, idx, bid, length)
            count += 1
            idx += n
            if idx >= size:
                idx -= size
                wrap ^= 1
                mark = _BOTH if wrap else 0
        self._pushed_to(idx, wrap, count)

    def _pushed_to(self, idx: int, wrap: int, count: int) -> None:
        """``count`` buffers were pushed: the device is at ``(idx, wrap)``."""
        if not count:
            return
        # The slots they took: at most the whole ring, once round.
        back = idx - self.used_idx + (self.size if wrap != self.used_wrap else 0)
        self.used_idx = idx
        self.used_wrap = wrap
        self._pushed = True
        self._in_flight = max(0, self._in_flight - count)
        self._in_flight_slots = max(0, self._in_flight_slots - back)
        self.publish_position()

    def publish_position(self) -> None:
        """Store the used position where :attr:`position` says."""
        if self.position is not None:
            words, i = self.position
            words[i] = 1 << 32 | self.used_base()

    def _mark_tail(self, head: int, wrap: int, n: int) -> None:
        """Mark the later slots of a buffer of ``n`` slots used too, before its
        used descriptor is written.  Drivers never read them (they step over
        them by the buffer's slot count), but then every slot the device is
        done with says so, and :func:`ring_position` can read the device's
        position off the ring after a restart."""
        flags = self.flags
        for j in range(1, n):
            s = head + j
            w = wrap
            if s >= self.size:
                s -= self.size
                w ^= 1
            flags[8 * s + 7] = _BOTH if w else 0
            if self.dirty is not None:
                self.dirty.mark(self.desc_addr + s * DESC_SIZE, DESC_SIZE)

    def push_heads(self, heads: Sequence[int], length: int = 0) -> None:
        """Return buffers that all wrote ``length`` bytes (transmit: 0)."""
        if self.dirty is not None or length or self._in_flight_slots != self._in_flight:
            self.push(zip(heads, repeat(length)))
            return
        # Transmit of one-slot buffers: nothing written, nothing to log.
        words = self.words
        flags = self.flags
        size = self.size
        idx = self.used_idx
        wrap = self.used_wrap
        mark = _BOTH if wrap else 0
        for bid in heads:
            words[4 * idx + 2] = 0
            flags[8 * idx + 6] = bid
            flags[8 * idx + 7] = mark
            idx += 1
            if idx == size:
                idx = 0
                wrap ^= 1
                mark = _BOTH if wrap else 0
        self._pushed_to(idx, wrap, len(heads))

    def push_one(self, head: int, length: int) -> None:
        self.push(((head, length),))

    def _log(self, dirty: DirtyLog, slot: int, bid: int, length: int) -> None:
        dirty.mark(self.desc_addr + slot * DESC_SIZE, DESC_SIZE)
        left = length
        for gpa, n in self._writable.pop(bid, ()):
            if left <= 0:
                break
            dirty.mark(gpa, min(n, left))
            left -= n

    def should_notify(self) -> bool:
        """Whether the driver wants an interrupt for what was pushed since the last decision."""
        if not self._pushed:
            return False
        self._pushed = False
        new = self.used_idx
        old = self._signalled_used
        self._signalled_used = new
        _full_barrier()
        ev = self.driver_event
        mode = ev[1]
        if mode != EVENT_DESC or not self.event_idx:
            return mode != EVENT_DISABLE
        off_wrap = ev[0]
        off = off_wrap & 0x7FFF
        size = self.size
        if new <= old:
            old -= size  # the position wrapped since the last decision
        if off_wrap >> 15 != self.used_wrap:
            off -= size
        return vring_need_event(off & 0xFFFF, new, old & 0xFFFF)

    def enable_notify(self, on: bool) -> bool:
        """Ask the driver for (or release it from) kicks; True when buffers
        are already available after enabling (the caller must not sleep)."""
        self.notify_enabled = on
        ev = self.device_event
        if on and self.event_idx:
            # 2.8.10: a kick only when the driver makes the slot we look at
            # next available (as the split ring's avail_event): one kick per
            # burst, not one per buffer it adds.
            ev[0] = self.avail_idx | self.avail_wrap << 15
            ev[1] = EVENT_DESC
        else:
            ev[1] = EVENT_ENABLE if on else EVENT_DISABLE
        if self.dirty is not None:
            self.dirty.mark(self.device_addr, EVENT_SIZE)
        if not on:
            return False
        _full_barrier()
        return self.has_available()


class PackedDriverQueue:
    """The driver's side of one packed virtqueue (what Linux's virtio_ring does)."""

    def __init__(
        self,
        mem: GuestMemory,
        size: int,
        desc_addr: int,
        driver_addr: int,
        device_addr: int,
        *,
        event_idx: bool = False,
        in_order: bool = False,
    ) -> None:
        self.mem = mem
        self.desc, self.driver_event, self.device_event = _views(
            mem, size, desc_addr, driver_addr, device_addr
        )
        self.flags = self.desc.cast("H")
        self.size = size
        self.event_idx = event_idx
        # VIRTIO_F_IN_ORDER: buffer ids in the order they were made available,
        # which get_used checks the device's used ids against.
        self.in_order = in_order
        self._order: deque[int] = deque()
        self.desc[:] = bytes(size * DESC_SIZE)
        self.driver_event[0] = self.driver_event[1] = 0
        self.device_event[0] = self.device_event[1] = 0
        self.avail_idx, self.avail_wrap = 0, 1
        self.used_idx, self.used_wrap = 0, 1
        self._free_ids = list(range(size - 1, -1, -1))
        self._tokens: list[object | None] = [None] * size
        self._ndesc = [0] * size
        self.num_free = size
        self._pending_head: tuple[int, int] | None = None  # (slot, flags) not yet published
        self._kick_from = (0, 1)

    def add(
        self,
        out: Sequence[tuple[int, int]],
        in_: Sequence[tuple[int, int]],
        token: object,
    ) -> int | None:
        """Queue a buffer of readable ``out`` then writable ``in_`` parts; its
        id, or None when not enough slots are free.  Visible to the device
        after :meth:`publish`, :meth:`kick_needed` or the next add (the
        first descriptor's flags are written last)."""
        bufs = (*out, *in_)
        n = len(bufs)
        if n == 0:
            raise ValueError("a buffer needs at least one part")
        if n > self.num_free or not self._free_ids:
            return None
        self.publish()
        bid = self._free_ids.pop()
        head = (self.avail_idx, 0)  # (slot, flags) of the first descriptor
        slot, wrap = self.avail_idx, self.avail_wrap
        for k, (addr, length) in enumerate(bufs):
            f = _avail_bits(wrap)
            if k >= len(out):
                f |= VIRTQ_DESC_F_WRITE
            if k < n - 1:
                f |= VIRTQ_DESC_F_NEXT
            if k == 0:
                _desc_pack(self.desc, slot * DESC_SIZE, addr, length, bid, 0)
                head = (slot, f)
            else:
                _desc_pack(self.desc, slot * DESC_SIZE, addr, length, bid, f)
            slot += 1
            if slot == self.size:
                slot = 0
                wrap ^= 1
        self._pending_head = head
        self.avail_idx, self.avail_wrap = slot, wrap
        self._tokens[bid] = token
        self._ndesc[bid] = n
        if self.in_order:
            self._order.append(bid)
        self.num_free -= n
        return bid

    def add_indirect(
        self,
        table_addr: int,
        out: Sequence[tuple[int, int]],
        in_: Sequence[tuple[int, int]],
        token: object,
    ) -> int | None:
        """Queue a buffer through an indirect table the caller placed at ``table_addr``."""
        bufs = (*out, *in_)
        table = self.mem.view(table_addr, len(bufs) * DESC_SIZE)
        for k, (addr, length) in enumerate(bufs):
            f = VIRTQ_DESC_F_WRITE if k >= len(out) else 0
            _desc_pack(table, k * DESC_SIZE, addr, length, 0, f)
        if not self.num_free or not self._free_ids:
            return None
        self.publish()
        bid = self._free_ids.pop()
        slot = self.avail_idx
        f = _avail_bits(self.avail_wrap) | VIRTQ_DESC_F_INDIRECT
        _desc_pack(self.desc, slot * DESC_SIZE, table_addr, len(bufs) * DESC_SIZE, bid, 0)
        self._pending_head = (slot, f)
        slot += 1
        if slot == self.size:
            slot = 0
            self.avail_wrap ^= 1
        self.avail_idx = slot
        self._tokens[bid] = token
        self._ndesc[bid] = 1
        if self.in_order:
            self._order.append(bid)
        self.num_free -= 1
        return bid

    def publish(self) -> None:
        """Make the last added buffer visible: its first flags are written last."""
        if self._pending_head is not None:
            slot, f = self._pending_head
            self._pending_head = None
            self.flags[8 * slot + 7] = f

    def kick_needed(self) -> bool:
        """Publish, then whether the device wants a notification for this batch."""
        self.publish()
        new = (self.avail_idx, self.avail_wrap)
        old = self._kick_from
        if new == old:
            return False
        self._kick_from = new
        _full_barrier()
        ev = self.device_event
        mode = ev[1]
        if mode != EVENT_DESC:
            return mode != EVENT_DISABLE
        off_wrap = ev[0]
        off = off_wrap & 0x7FFF
        n_new, o = new[0], old[0]
        if n_new <= o:
            o -= self.size
        if off_wrap >> 15 != new[1]:
            off -= self.size
        return vring_need_event(off & 0xFFFF, n_new, o & 0xFFFF)

    def _used_ready(self) -> bool:
        f = self.flags[8 * self.used_idx + 7]
        want = _BOTH if self.used_wrap else 0
        return f & _BOTH == want

    def used_pending(self) -> int:
        return 1 if self._used_ready() else 0

    def get_used(self, max_items: int = MAX_QUEUE_SIZE) -> list[tuple[object, int]]:
        """Reclaim used buffers: ``(token, written_len)`` in the order the device used them.

        With VIRTIO_F_IN_ORDER a used descriptor may stand for a batch: it
        names the batch's last buffer, and the device skips the slots of the
        rest (virtio 1.3, packed virtqueues, "In-order use of descriptors";
        DPDK's vhost does so for transmit).  The batch comes back whole, the buffers before
        its last with length 0."""
        res: list[tuple[object, int]] = []
        while len(res) < max_items and self._used_ready():
            _addr, length, bid, _f = _desc_unpack(self.desc, self.used_idx * DESC_SIZE)
            if bid >= self.size or self._tokens[bid] is None:
                raise VirtqueueError(f"device returned id {bid} that is not in flight")
            batch = (
                [self._order.popleft() for _ in range(self._order.index(bid) + 1)]
                if self.in_order
                else [bid]
            )
            n = 0
            for b in batch:
                res.append((self._tokens[b], length if b == bid else 0))
                self._tokens[b] = None
                n += self._ndesc[b]
                self._free_ids.append(b)
            self.num_free += n
            self.used_idx += n
            if self.used_idx >= self.size:
                self.used_idx -= self.size
                self.used_wrap ^= 1
        return res

    def enable_interrupts(self, on: bool) -> bool:
        """Ask the device for interrupts (or not).  True if used buffers are already pending."""
        if on and self.event_idx:
            self.driver_event[0] = self.used_idx | self.used_wrap << 15
            self.driver_event[1] = EVENT_DESC
        else:
            self.driver_event[1] = EVENT_ENABLE if on else EVENT_DISABLE
        if not on:
            return False
        _full_barrier()
        return self._used_ready()

    def in_flight(self) -> int:
        return sum(1 for t in self._tokens if t is not None)

    def _device_position(self) -> tuple[int, int]:
        """The device's used position: past every buffer it has used, reaped
        or not, walked from ours by each used buffer's slot count (what the
        driver knows; a device need not mark a chain's later slots)."""
        idx, wrap = self.used_idx, self.used_wrap
        walked = 0
        order = list(self._order) if self.in_order else []
        k = 0  # in order: the buffers up to order[k] are behind us
        while walked < self.size:
            f = self.flags[8 * idx + 7]
            if f & _BOTH != (_BOTH if wrap else 0):
                break
            bid = self.flags[8 * idx + 6]
            if bid >= self.size or self._tokens[bid] is None:
                break
            if self.in_order:
                # An in-order batch: its slots are those of every buffer up to bid.
                try:
                    end = order.index(bid, k) + 1
                except ValueError:
                    break
                n = sum(self._ndesc[b] for b in order[k:end])
                k = end
            else:
                n = self._ndesc[bid]
            walked += n
            idx += n
            if idx >= self.size:
                idx -= self.size
                wrap ^= 1
        return idx, wrap

    def device_base(self) -> int:
        """Where the device stands, as a vhost-user ring base (SET_VRING_BASE:
        both halves at its used position, so a new backend takes up every
        buffer the old one had not used)."""
        idx, wrap = self._device_position()
        return encode_base(idx, wrap, idx, wrap)

    def device_done(self) -> bool:
        """Whether the device has used every buffer made available."""
        self.publish()
        return self._device_position() == (self.avail_idx, self.avail_wrap)
