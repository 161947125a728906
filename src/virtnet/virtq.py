"""Split virtqueues (virtio 1.3, 2.7 "Split Virtqueues"), device side and driver side.

Sans-I/O: the queues read and write guest memory through
:class:`~virtnet.memory.GuestMemory` and decide *whether* to notify; the
caller owns eventfds and kicks.

Invariants kept on the device side (:class:`DeviceQueue`):

* The available index may run at most ``size`` entries ahead of the device's
  ``last_avail_idx`` (2.7.6); more raises :class:`VirtqueueError`.
* A chain's head and every ``next`` are ``< size`` (2.7.5); a chain visits at
  most ``size`` descriptors (the hop budget), so a loop is detected rather
  than followed forever; an indirect table (2.7.5.3) holds at most
  ``MAX_QUEUE_SIZE`` entries, has a length that is a non-zero multiple of
  16, is never nested and is never combined with NEXT.
* Device-writable descriptors never precede device-readable ones in a chain
  (2.7.4.2), and a chain's total length is capped at :data:`MAX_CHAIN_BYTES`.
* Every buffer handed out is a ``memoryview`` obtained from
  :meth:`GuestMemory.view`, so nothing outside guest memory is touched.
* Indexes are free-running 16-bit counters that wrap at 2**16.
* One used-index publication and one notification decision per batch.

Ordering: the device reads ``avail.idx`` before ring entries and writes used
entries before ``used.idx``; on x86 (TSO) program order suffices for those.
Where the spec needs a full barrier (a store followed by a load: publish used
idx then read ``used_event``; write ``avail_event`` then re-read
``avail.idx``) we take and release a lock, whose locked instruction is a full
fence.
"""

from __future__ import annotations

import struct
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from virtnet.dirty_log import DirtyLog
from virtnet.errors import VirtqueueError
from virtnet.memory import GuestMemory

__all__ = [
    "DESC_SIZE",
    "MAX_CHAIN_BYTES",
    "MAX_QUEUE_SIZE",
    "VIRTQ_AVAIL_F_NO_INTERRUPT",
    "VIRTQ_DESC_F_INDIRECT",
    "VIRTQ_DESC_F_NEXT",
    "VIRTQ_DESC_F_WRITE",
    "VIRTQ_USED_F_NO_NOTIFY",
    "Chain",
    "DeviceQueue",
    "DriverQueue",
    "RingLayout",
    "split_ring_layout",
    "vring_need_event",
]

#: 2.7 "Split Virtqueues": Queue Size is a power of 2, at most 32768.
MAX_QUEUE_SIZE = 32768
#: 2.7.5 "The Virtqueue Descriptor Table": 16 bytes per descriptor.
DESC_SIZE = 16
#: 2.7.5: flags.
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
#: 2.7.6 "The Virtqueue Available Ring" flags.
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
#: 2.7.8 "The Virtqueue Used Ring" flags.
VIRTQ_USED_F_NO_NOTIFY = 1
#: 2.7.4 alignment requirements: descriptor table 16, available ring 2, used ring 4.
DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4
#: Cap on the bytes one chain may describe.  The largest virtio-net packet is a
#: 64 KiB GSO frame plus header; 16 MiB leaves room for other devices while
#: bounding what a guest can make us account for.
MAX_CHAIN_BYTES = 16 << 20

_DESC = struct.Struct("<QIHH")
_desc_unpack = _DESC.unpack_from
_desc_pack = _DESC.pack_into


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """2.7.10: notify iff ``event_idx`` lies in ``[old_idx, new_idx)`` (mod 2**16)."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


@dataclass(frozen=True)
class RingLayout:
    """Offsets of the three parts of a split ring laid out in one block."""

    size: int
    desc: int
    avail: int
    used: int
    total: int


def _check_size(size: int) -> None:
    if not (0 < size <= MAX_QUEUE_SIZE) or size & (size - 1):
        raise VirtqueueError(f"queue size {size} is not a power of two in 1..{MAX_QUEUE_SIZE}")


def split_ring_layout(size: int, align: int = 4096) -> RingLayout:
    """The legacy contiguous layout (2.7.2): desc, avail, then used aligned to ``align``."""
    _check_size(size)
    desc = 0
    avail = size * DESC_SIZE
    avail_end = avail + 6 + 2 * size
    used = (avail_end + align - 1) // align * align
    used_end = used + 6 + 8 * size
    return RingLayout(size, desc, avail, used, used_end)


def _ask_peer(
    ring: memoryview, event_pos: int, idx: int, flag: int, on: bool, event_idx: bool
) -> None:
    """Ask the other side for notifications from ``idx`` on (``on``), or release it.

    2.7.7/2.7.10: with EVENT_IDX the ring's trailing event index (``used_event``
    in the available ring, ``avail_event`` in the used ring) says when; without
    it a flag bit in the ring's first word (NO_INTERRUPT / NO_NOTIFY) says
    whether.  Disabling with EVENT_IDX leaves the event index stale, which
    suppresses notifications until the indexes wrap round to it.
    """
    if event_idx:
        if on:
            ring[event_pos] = idx
    elif on:
        ring[0] &= ~flag & 0xFFFF
    else:
        ring[0] |= flag


_FENCE = threading.Lock()


def _full_barrier() -> None:
    _FENCE.acquire()
    _FENCE.release()


def first_region(mem: GuestMemory) -> tuple[int, int, memoryview]:
    """``(start, end, buffer)`` of guest memory's first region, for a pop's
    inline translation of the buffers inside it (``(0, 0, empty)`` without
    regions: every buffer then goes through the checked ``GuestMemory.view``)."""
    regions = mem.regions
    if not regions:
        return 0, 0, memoryview(b"")
    start = regions[0].guest_addr
    return start, start + regions[0].size, regions[0].buf


class Chain:
    """A descriptor chain popped by the device: readable buffers, then writable ones.

    Valid until the chain is pushed back as used: the device queue reuses the
    object for the next chain with the same head.
    """

    __slots__ = ("head", "in_", "in_len", "out", "out_len")

    def __init__(
        self,
        head: int,
        out: Sequence[memoryview],
        in_: Sequence[memoryview],
        out_len: int,
        in_len: int,
    ) -> None:
        self.head = head
        self.out = out
        self.in_ = in_
        self.out_len = out_len
        self.in_len = in_len

    def __repr__(self) -> str:
        return (
            f"Chain(head={self.head}, out={self.out_len}B/{len(self.out)},"
            f" in={self.in_len}B/{len(self.in_)})"
        )


class _Rings:
    """Typed views over the three parts of a split ring in guest memory."""

    def __init__(
        self, mem: GuestMemory, size: int, desc_addr: int, avail_addr: int, used_addr: int
    ) -> None:
        _check_size(size)
        if desc_addr % DESC_ALIGN or avail_addr % AVAIL_ALIGN or used_addr % USED_ALIGN:
            raise VirtqueueError(
                f"misaligned ring: desc 0x{desc_addr:x} avail 0x{avail_addr:x} used 0x{used_addr:x}"
            )
        self.size = size
        self.mask = size - 1
        try:
            self.desc = mem.view(desc_addr, size * DESC_SIZE)
            # avail: flags, idx, ring[size], used_event
            self.avail = mem.view(avail_addr, 6 + 2 * size).cast("H")
            # used: flags, idx, ring[size] of (id u32, len u32), avail_event
            used = mem.view(used_addr, 6 + 8 * size)
        except VirtqueueError:
            raise
        except Exception as exc:  # GuestMemoryError
            raise VirtqueueError(f"ring outside guest memory: {exc}") from exc
        self.used = used.cast("H")
        self.used_ring = used[4 : 4 + 8 * size].cast("I")
        self.used_event_pos = 2 + size  # index into avail ('H')
        self.avail_event_pos = 2 + 4 * size  # index into used ('H')


class DeviceQueue:
    """The device's side of one split virtqueue."""

    def __init__(
        self,
        mem: GuestMemory,
        size: int,
        desc_addr: int,
        avail_addr: int,
        used_addr: int,
        *,
        event_idx: bool = False,
        last_avail_idx: int = 0,
        used_idx: int | None = None,
    ) -> None:
        self.mem = mem
        self._r = _Rings(mem, size, desc_addr, avail_addr, used_addr)
        self.size = size
        self.event_idx = event_idx
        self.last_avail_idx = last_avail_idx & 0xFFFF
        # After a restart (vhost-user SET_VRING_BASE) the used index continues
        # from where the guest sees it; by default that equals last_avail_idx.
        self.used_idx = (self.last_avail_idx if used_idx is None else used_idx) & 0xFFFF
        self._signalled_used = self.used_idx
        self._signalled_valid = False
        self.notify_enabled = True
        # One reusable Chain per head for single-descriptor chains: a head is
        # never in flight twice, so its object is free again once it was used.
        self._pool = [Chain(h, (), (), 0, 0) for h in range(size)]
        # Live migration: pages written are marked here (set_dirty_log).
        self.dirty: DirtyLog | None = None
        self.used_log_addr: int | None = None

    def set_dirty_log(self, log: DirtyLog | None, used_log_addr: int | None = None) -> None:
        """Mark every page this queue writes in ``log`` from now on: the
        buffers of the chains pushed (their written bytes) and, when
        ``used_log_addr`` is given (vhost-user ``VHOST_VRING_F_LOG``), the used
        ring, logged at that address.  ``None`` stops logging."""
        self.dirty = log
        self.used_log_addr = used_log_addr if log is not None else None

    def _log_used_ring(self, dirty: DirtyLog) -> None:
        if self.used_log_addr is not None:
            dirty.mark(self.used_log_addr, 6 + 8 * self.size)

    def _log_chain(self, dirty: DirtyLog, head: int, written: int) -> None:
        """Mark the pages of the first ``written`` device-writable bytes of the
        chain at ``head``, walked again from the descriptor table (within the
        same hop budget as a pop; a chain the driver changed since is marked
        as far as it is still well formed)."""
        r = self._r
        table = r.desc
        table_size = self.size
        idx = head
        hops = 0
        left = written
        nested = False
        while left > 0 and idx < table_size and hops <= table_size:
            addr, length, flags, nxt = _desc_unpack(table, idx * DESC_SIZE)
            if flags & VIRTQ_DESC_F_INDIRECT:
                entries, rest = divmod(length, DESC_SIZE)
                if nested or rest or not 0 < entries <= MAX_QUEUE_SIZE:
                    return
                try:
                    table = self.mem.view(addr, length)
                except Exception:  # GuestMemoryError: nothing of it was written
                    return
                table_size = length // DESC_SIZE
                nested = True
                idx = 0
                hops = 0
                continue
            if flags & VIRTQ_DESC_F_WRITE:
                take = min(length, left)
                dirty.mark(addr, take)
                left -= take
            if not flags & VIRTQ_DESC_F_NEXT:
                return
            idx = nxt
            hops += 1

    def _log_push(self, dirty: DirtyLog, used: Sequence[tuple[int, int]]) -> None:
        for head, length in used:
            if length:
                self._log_chain(dirty, head, length)
        self._log_used_ring(dirty)

    def base(self) -> int:
        """Where the ring stands, as vhost-user GET_VRING_BASE reports it."""
        return self.last_avail_idx

    # -- available side ---------------------------------------------------
    def avail_idx(self) -> int:
        """The driver's current available index."""
        return int(self._r.avail[1])

    def pending(self) -> int:
        """Chains the driver has made available and we have not popped."""
        n = (self._r.avail[1] - self.last_avail_idx) & 0xFFFF
        if n > self.size:
            raise VirtqueueError(
                f"available index {self._r.avail[1]} is {n} ahead of {self.last_avail_idx},"
                f" more than the queue size {self.size}"
            )
        return n

    def has_available(self) -> bool:
        return self.pending() > 0

    def pop(self, max_chains: int) -> list[Chain]:
        """Pop up to ``max_chains`` available chains (a batch)."""
        n = self.pending()
        n = min(n, max_chains)
        if n <= 0:
            return []
        r = self._r
        avail = r.avail
        mask = r.mask
        size = self.size
        desc = r.desc
        view = self.mem.view
        # Inline translation for the most common case: a buffer inside the
        # first region (the whole memory in most guests); others go through
        # the checked GuestMemory.view().
        base, end, rbuf = first_region(self.mem)
        out_chains: list[Chain] = []
        append = out_chains.append
        idx = self.last_avail_idx
        empty: tuple[memoryview, ...] = ()
        pool = self._pool
        try:
            for _ in range(n):
                head = avail[2 + (idx & mask)]
                idx += 1
                if head >= size:
                    raise VirtqueueError(f"available ring head {head} >= queue size {size}")
                addr, length, flags, nxt = _desc_unpack(desc, head * DESC_SIZE)
                if not flags & (VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_INDIRECT):
                    # Fast path: a single direct descriptor.
                    if length > MAX_CHAIN_BYTES:
                        raise VirtqueueError(f"descriptor length {length} exceeds the cap")
                    ch = pool[head]
                    if not length:
                        ch.out = ch.in_ = empty
                        ch.out_len = ch.in_len = 0
                    else:
                        if base <= addr and addr + length <= end:
                            off = addr - base
                            v = rbuf[off : off + length]
                        else:
                            v = view(addr, length)
                        if flags & VIRTQ_DESC_F_WRITE:
                            ch.out = empty
                            ch.in_ = (v,)
                            ch.out_len = 0
                            ch.in_len = length
                        else:
                            ch.out = (v,)
                            ch.in_ = empty
                            ch.out_len = length
                            ch.in_len = 0
                    append(ch)
                    continue
                append(self._walk(head, addr, length, flags, nxt))
        except VirtqueueError:
            raise
        except Exception as exc:  # GuestMemoryError from view()
            raise VirtqueueError(f"descriptor outside guest memory: {exc}") from exc
        self.last_avail_idx = idx & 0xFFFF
        return out_chains

    def _walk(self, head: int, addr: int, length: int, flags: int, nxt: int) -> Chain:
        size = self.size
        desc = self._r.desc
        view = self.mem.view
        out: list[memoryview] = []
        in_: list[memoryview] = []
        out_len = 0
        in_len = 0
        hops = 0
        table = desc
        table_size = size
        indirect = False
        while True:
            if flags & VIRTQ_DESC_F_INDIRECT:
                if indirect:
                    raise VirtqueueError(f"chain {head}: nested indirect descriptor")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise VirtqueueError(f"chain {head}: INDIRECT together with NEXT")
                if out or in_:
                    raise VirtqueueError(f"chain {head}: indirect descriptor after direct ones")
                if length == 0 or length % DESC_SIZE or length // DESC_SIZE > MAX_QUEUE_SIZE:
                    raise VirtqueueError(f"chain {head}: bad indirect table length {length}")
                table = view(addr, length)
                table_size = length // DESC_SIZE
                indirect = True
                hops = 0
                addr, length, flags, nxt = _desc_unpack(table, 0)
                continue
            if length:
                if flags & VIRTQ_DESC_F_WRITE:
                    in_.append(view(addr, length))
                    in_len += length
                else:
                    if in_:
                        raise VirtqueueError(f"chain {head}: readable descriptor after writable")
                    out.append(view(addr, length))
                    out_len += length
                if out_len + in_len > MAX_CHAIN_BYTES:
                    raise VirtqueueError(f"chain {head}: total length exceeds {MAX_CHAIN_BYTES}")
            if not flags & VIRTQ_DESC_F_NEXT:
                break
            hops += 1
            if hops >= table_size:
                raise VirtqueueError(f"chain {head}: descriptor loop (more than {table_size} hops)")
            if nxt >= table_size:
                raise VirtqueueError(f"chain {head}: next {nxt} >= table size {table_size}")
            addr, length, flags, nxt = _desc_unpack(table, nxt * DESC_SIZE)
        return Chain(head, out, in_, out_len, in_len)

    def unpop(self, count: int) -> None:
        """Give back the last ``count`` popped chains (e.g. no room on the host side)."""
        self.last_avail_idx = (self.last_avail_idx - count) & 0xFFFF

    # -- used side --------------------------------------------------------
    def push(self, used: Sequence[tuple[int, int]]) -> None:
        """Return chains as ``(head, written_len)`` and publish the used index once."""
        if not used:
            return
        r = self._r
        ring = r.used_ring
        mask = r.mask
        idx = self.used_idx
        for head, length in used:
            j = (idx & mask) << 1
            ring[j] = head
            ring[j + 1] = length
            idx += 1
        idx &= 0xFFFF
        r.used[1] = idx
        self.used_idx = idx
        if self.dirty is not None:
            self._log_push(self.dirty, used)

    def push_heads(self, heads: Sequence[int], length: int = 0) -> None:
        """Return chains that all wrote ``length`` bytes (transmit: 0); one publish."""
        if not heads:
            return
        r = self._r
        ring = r.used_ring
        mask = r.mask
        idx = self.used_idx
        for head in heads:
            j = (idx & mask) << 1
            ring[j] = head
            ring[j + 1] = length
            idx += 1
        idx &= 0xFFFF
        r.used[1] = idx
        self.used_idx = idx
        if self.dirty is not None:
            self._log_push(self.dirty, [(h, length) for h in heads])

    def push_batch(self, last_head: int, count: int) -> None:
        """Return the ``count`` chains popped last, none written to (transmit),
        with one used entry naming ``last_head``, the head of the last.

        Only for a driver that negotiated VIRTIO_F_IN_ORDER (virtio 1.3
        2.7.9): the entry goes where the batch's first would, the used index
        moves on by ``count``, and the driver takes the buffers before
        ``last_head`` as used in full.  One store per batch instead of two
        per chain."""
        if not count:
            return
        r = self._r
        idx = self.used_idx
        j = (idx & r.mask) << 1
        r.used_ring[j] = last_head
        r.used_ring[j + 1] = 0
        idx = (idx + count) & 0xFFFF
        r.used[1] = idx
        self.used_idx = idx
        if self.dirty is not None:
            self._log_used_ring(self.dirty)

    def push_one(self, head: int, length: int) -> None:
        """Return one chain and publish the used index."""
        r = self._r
        idx = self.used_idx
        j = (idx & r.mask) << 1
        r.used_ring[j] = head
        r.used_ring[j + 1] = length
        idx = (idx + 1) & 0xFFFF
        r.used[1] = idx
        self.used_idx = idx
        if self.dirty is not None:
            self._log_push(self.dirty, [(head, length)])

    def should_notify(self) -> bool:
        """Whether the driver wants an interrupt for what was pushed since the last decision."""
        r = self._r
        new = self.used_idx
        old = self._signalled_used
        if new == old and self._signalled_valid:
            return False
        _full_barrier()
        if self.event_idx:
            event = r.avail[r.used_event_pos]
            valid = self._signalled_valid
            self._signalled_used = new
            self._signalled_valid = True
            return not valid or vring_need_event(event, new, old)
        self._signalled_used = new
        self._signalled_valid = True
        return not r.avail[0] & VIRTQ_AVAIL_F_NO_INTERRUPT

    def enable_notify(self, on: bool) -> bool:
        """Ask the driver for (or release it from) kicks.

        Returns True when, after enabling, chains are already available, so the
        caller must process them instead of sleeping (the race of 2.7.10).
        """
        r = self._r
        self.notify_enabled = on
        _ask_peer(
            r.used,
            r.avail_event_pos,
            self.last_avail_idx,
            VIRTQ_USED_F_NO_NOTIFY,
            on,
            self.event_idx,
        )
        if self.dirty is not None:
            self._log_used_ring(self.dirty)
        if not on:
            return False
        _full_barrier()
        return self.has_available()


class DriverQueue:
    """The driver's side of one split virtqueue (what Linux's virtio_ring does)."""

    def __init__(
        self,
        mem: GuestMemory,
        size: int,
        desc_addr: int,
        avail_addr: int,
        used_addr: int,
        *,
        event_idx: bool = False,
        in_order: bool = False,
    ) -> None:
        self.mem = mem
        self._r = _Rings(mem, size, desc_addr, avail_addr, used_addr)
        self.size = size
        self.event_idx = event_idx
        # Free descriptors; next pointers kept in our own shadow, never read
        # back from (device-writable) guest memory.  A stack, or with
        # VIRTIO_F_IN_ORDER a queue: descriptors are then taken in ring order
        # (virtio 1.3 2.7.9), and the device must use the chains in the order
        # they were made available (:attr:`_order`, checked by get_used).
        self.in_order = in_order
        self._free: deque[int] = deque(range(size) if in_order else range(size - 1, -1, -1))
        self._take = self._free.popleft if in_order else self._free.pop
        self._order: deque[int] = deque()
        self._tokens: list[object | None] = [None] * size
        self._chain: list[list[int]] = [[] for _ in range(size)]
        self.avail_idx = 0
        self._published = 0
        self._kicked = 0
        self.last_used_idx = 0
        for i in range(3 + size):
            self._r.avail[i] = 0
        for i in range(3 + 4 * size):
            self._r.used[i] = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    def add(
        self,
        out: Sequence[tuple[int, int]],
        in_: Sequence[tuple[int, int]],
        token: object,
    ) -> int | None:
        """Queue a chain of readable ``out`` then writable ``in_`` buffers.

        Returns the head index, or None when not enough descriptors are free.
        The chain becomes visible to the device at the next :meth:`kick_needed`
        (or :meth:`publish`).
        """
        n = len(out) + len(in_)
        if n == 0:
            raise ValueError("a chain needs at least one buffer")
        free = self._free
        if len(free) < n:
            return None
        desc = self._r.desc
        take = self._take
        ids = [take() for _ in range(n)]
        last = n - 1
        for k, (addr, length) in enumerate((*out, *in_)):
            flags = VIRTQ_DESC_F_WRITE if k >= len(out) else 0
            nxt = 0
            if k < last:
                flags |= VIRTQ_DESC_F_NEXT
                nxt = ids[k + 1]
            _desc_pack(desc, ids[k] * DESC_SIZE, addr, length, flags, nxt)
        head = ids[0]
        self._tokens[head] = token
        self._chain[head] = ids
        if self.in_order:
            self._order.append(head)
        r = self._r
        r.avail[2 + (self.avail_idx & r.mask)] = head
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        return head

    def add_indirect(
        self,
        table_addr: int,
        out: Sequence[tuple[int, int]],
        in_: Sequence[tuple[int, int]],
        token: object,
    ) -> int | None:
        """Queue a chain through an indirect table the caller placed at ``table_addr``."""
        bufs = (*out, *in_)
        table = self.mem.view(table_addr, len(bufs) * DESC_SIZE)
        for k, (addr, length) in enumerate(bufs):
            flags = VIRTQ_DESC_F_WRITE if k >= len(out) else 0
            if k < len(bufs) - 1:
                flags |= VIRTQ_DESC_F_NEXT
            _desc_pack(table, k * DESC_SIZE, addr, length, flags, k + 1 if k < len(bufs) - 1 else 0)
        if not self._free:
            return None
        d = self._take()
        _desc_pack(
            self._r.desc, d * DESC_SIZE, table_addr, len(bufs) * DESC_SIZE, VIRTQ_DESC_F_INDIRECT, 0
        )
        self._tokens[d] = token
        self._chain[d] = [d]
        if self.in_order:
            self._order.append(d)
        r = self._r
        r.avail[2 + (self.avail_idx & r.mask)] = d
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        return d

    def publish(self) -> None:
        """Make every added chain visible to the device (one avail.idx store)."""
        self._r.avail[1] = self.avail_idx
        self._published = self.avail_idx

    def kick_needed(self) -> bool:
        """Publish, then decide whether the device wants a notification for this batch."""
        self.publish()
        new = self._published
        old = self._kicked
        if new == old:
            return False
        self._kicked = new
        _full_barrier()
        r = self._r
        if self.event_idx:
            return vring_need_event(r.used[r.avail_event_pos], new, old)
        return not r.used[0] & VIRTQ_USED_F_NO_NOTIFY

    def used_pending(self) -> int:
        n = (self._r.used[1] - self.last_used_idx) & 0xFFFF
        if n > self.size:
            raise VirtqueueError(f"used index runs {n} ahead, more than the queue size")
        return n

    def get_used(self, max_items: int = MAX_QUEUE_SIZE) -> list[tuple[object, int]]:
        """Reclaim used chains: ``(token, written_len)`` in the order the device used them."""
        n = self.used_pending()
        n = min(n, max_items)
        if not n:
            return []
        if self.in_order:
            return self._get_used_in_order(n)
        r = self._r
        ring = r.used_ring
        mask = r.mask
        tokens = self._tokens
        chains = self._chain
        free = self._free
        idx = self.last_used_idx
        res: list[tuple[object, int]] = []
        for _ in range(n):
            j = (idx & mask) << 1
            head = ring[j]
            length = ring[j + 1]
            idx += 1
            if head >= self.size or tokens[head] is None:
                raise VirtqueueError(f"device returned head {head} that is not in flight")
            free.extend(reversed(chains[head]))
            tok = tokens[head]
            tokens[head] = None
            res.append((tok, length))
        self.last_used_idx = idx & 0xFFFF
        return res

    def _get_used_in_order(self, n: int) -> list[tuple[object, int]]:
        """get_used under VIRTIO_F_IN_ORDER: an entry names the next buffer
        made available, or the last of a batch the device used at once
        (virtio 1.3 2.7.9); a batch comes back whole, the buffers before its
        last with length 0.  Anything else is a VirtqueueError."""
        r = self._r
        ring = r.used_ring
        order = self._order
        res: list[tuple[object, int]] = []
        idx = self.last_used_idx
        while len(res) < n:
            j = (idx & r.mask) << 1
            head = ring[j]
            length = ring[j + 1]
            if head >= self.size or self._tokens[head] is None:
                raise VirtqueueError(f"device returned head {head} that is not in flight")
            count = order.index(head) + 1
            if count > self.used_pending() - len(res):
                raise VirtqueueError(
                    f"device used a batch of {count} up to head {head} past its used index"
                )
            for _ in range(count):
                h = order.popleft()
                res.append((self._tokens[h], length if h == head else 0))
                self._tokens[h] = None
                self._free.extend(self._chain[h])
            idx += count
        self.last_used_idx = idx & 0xFFFF
        return res

    def enable_interrupts(self, on: bool) -> bool:
        """Ask the device for interrupts (or not).  True if used entries are already pending."""
        r = self._r
        _ask_peer(
            r.avail,
            r.used_event_pos,
            self.last_used_idx,
            VIRTQ_AVAIL_F_NO_INTERRUPT,
            on,
            self.event_idx,
        )
        if not on:
            return False
        _full_barrier()
        return self.used_pending() > 0

    def in_flight(self) -> int:
        return sum(1 for t in self._tokens if t is not None)

    def device_base(self) -> int:
        """Where the device stands, as a vhost-user ring base: its used index
        (a new backend goes on from there, as with QEMU)."""
        return int(self._r.used[1])

    def device_done(self) -> bool:
        """Whether the device has used every buffer made available."""
        return int(self._r.used[1]) == self._published
