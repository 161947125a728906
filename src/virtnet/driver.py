"""The virtio-net driver side: what Linux's ``virtio_net`` does, sans-I/O.

:class:`VirtioNetDriver` owns the driver half of every virtqueue of one
device in a :class:`~virtnet.memory.GuestMemory`: it negotiates features,
keeps the receive queues filled (mergeable buffers when ``MRG_RXBUF`` is
negotiated), chooses a transmit queue per packet (flow hash, or CPU as XPS
does), and changes the number of queue pairs through the control queue
(``ethtool -L eth0 combined N``).

I/O is injected: ``kick(vq_index)`` is called when the device wants a
notification for a batch, and ``pump()`` is called while waiting for the
device to answer a control command (the in-process demo runs the device
there; the vhost-user frontend waits on the call eventfd).

Invariants:

* Only pairs ``0 .. curr_queue_pairs-1`` are used for transmit; a refused
  ``VQ_PAIRS_SET`` leaves the old count in force.
* Every buffer the driver posts comes back exactly once or is still in
  flight; anything the device returns that was not in flight is a
  :class:`~virtnet.errors.VirtqueueError` (the device is a peer too).
* Counters are named as Linux's ethtool statistics (``rx_queue_0_packets``).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from virtnet.errors import ControlError, VirtqueueError
from virtnet.memory import GuestMemory
from virtnet.net import (
    CTRL_MQ,
    CTRL_MQ_VQ_PAIRS_SET,
    CTRL_OK,
    NetConfig,
    NetFeature,
    NetHdr,
    ctrl_index,
    hdr_len,
    negotiate,
    num_queue_pairs,
    rx_index,
    tx_index,
)
from virtnet.packed import PackedDriverQueue, packed_ring_layout
from virtnet.virtq import DriverQueue, split_ring_layout

__all__ = ["DEFAULT_DRIVER_FEATURES", "BumpAllocator", "QueueStats", "RxFrame", "VirtioNetDriver"]

#: What the driver asks for, like Linux's virtio_net feature table.
DEFAULT_DRIVER_FEATURES = (
    NetFeature.VERSION_1
    | NetFeature.MAC
    | NetFeature.MTU
    | NetFeature.MRG_RXBUF
    | NetFeature.STATUS
    | NetFeature.CTRL_VQ
    | NetFeature.CTRL_RX
    | NetFeature.CTRL_VLAN
    | NetFeature.MQ
    | NetFeature.CTRL_MAC_ADDR
    | NetFeature.EVENT_IDX
    | NetFeature.INDIRECT_DESC
    # The queues then take descriptors in ring order and read batched used
    # entries (virtio 1.3 2.7.9).
    | NetFeature.IN_ORDER
    # Taken when the device offers it, as Linux does (QEMU offers it with
    # packed=on; VhostUserFrontend with packed=True).
    | NetFeature.RING_PACKED
)

#: Linux's mergeable rx buffers are sized from the average packet, around
#: 1536 bytes; a fixed size keeps this driver simple.
MERGEABLE_BUF_SIZE = 1536
#: Without MRG_RXBUF, a receive buffer holds a whole (non-GSO) frame + header.
BIG_BUF_SIZE = 65562
#: Largest frame this driver transmits (no TSO): MTU 1500 + Ethernet + VLAN.
MAX_TX_FRAME = 1522
#: How many times to pump while waiting for a control answer (Linux spins too).
CTRL_PUMP_LIMIT = 10_000

_CTRL_HDR = struct.Struct("<BB")


class BumpAllocator:
    """Hands out aligned, never-freed ranges of guest memory."""

    def __init__(self, start: int, end: int) -> None:
        self.next = start
        self.end = end

    def alloc(self, size: int, align: int = 64) -> int:
        addr = (self.next + align - 1) // align * align
        if addr + size > self.end:
            raise MemoryError(f"guest memory exhausted allocating {size} bytes")
        self.next = addr + size
        return addr


@dataclass
class QueueStats:
    packets: int = 0
    bytes: int = 0
    drops: int = 0
    kicks: int = 0


@dataclass(frozen=True)
class RxFrame:
    pair: int
    hdr: NetHdr
    data: bytes


#: A split or a packed virtqueue's driver side (the same interface).
AnyDriverQueue = DriverQueue | PackedDriverQueue


@dataclass
class _RxQueue:
    vq: AnyDriverQueue
    bufs: list[int]  # buffer index -> guest address
    free: list[int] = field(default_factory=list)
    stats: QueueStats = field(default_factory=QueueStats)


@dataclass
class _TxQueue:
    vq: AnyDriverQueue
    slots: list[int]
    free: list[int] = field(default_factory=list)
    stats: QueueStats = field(default_factory=QueueStats)


def flow_hash(frame: bytes | memoryview) -> int:
    """A flow hash for transmit queue choice (Linux uses skb_get_hash on flow keys)."""
    from virtnet.rss import flow_id

    fid = flow_id(frame)
    if fid is None:
        return zlib.crc32(bytes(frame[:14]))
    return zlib.crc32(fid.to_bytes((fid.bit_length() + 7) // 8, "big"))


class VirtioNetDriver:
    """The driver half of a virtio-net device with ``max_virtqueue_pairs`` pairs."""

    def __init__(
        self,
        mem: GuestMemory,
        alloc: BumpAllocator,
        config: NetConfig,
        device_features: int,
        *,
        queue_size: int = 256,
        wanted: int = DEFAULT_DRIVER_FEATURES,
        kick: Callable[[int], None] = lambda _vq: None,
        pump: Callable[[], object] = lambda: None,
    ) -> None:
        self.mem = mem
        self.config = config
        self.features = negotiate(device_features, wanted)
        self.hdr_len = hdr_len(self.features)
        self.mergeable = bool(self.features & NetFeature.MRG_RXBUF)
        self.max_pairs = num_queue_pairs(self.features, config.max_virtqueue_pairs)
        self.has_ctrl = bool(self.features & NetFeature.CTRL_VQ)
        # Linux starts with min(max_pairs, online CPUs); we start with 1 like the
        # seeds' drivers ("multiqueue disabled by default") -- callers choose.
        self.curr_pairs = 1
        self.queue_size = queue_size
        self.kick_cb = kick
        self.pump = pump
        self.event_idx = bool(self.features & NetFeature.EVENT_IDX)
        self.in_order = bool(self.features & NetFeature.IN_ORDER)
        self.packed = bool(self.features & NetFeature.RING_PACKED)
        self.alloc = alloc
        self.layouts: dict[int, tuple[int, int, int, int]] = {}
        self.rxqs: list[_RxQueue] = []
        self.txqs: list[_TxQueue] = []
        self.xps: dict[int, int] = {}
        self.ctrl_errors = 0
        rx_buf = MERGEABLE_BUF_SIZE if self.mergeable else BIG_BUF_SIZE
        self.rx_buf_size = rx_buf
        for p in range(self.max_pairs):
            rvq = self._make_vq(rx_index(p))
            bufs = [alloc.alloc(rx_buf) for _ in range(queue_size)]
            self.rxqs.append(_RxQueue(rvq, bufs, list(range(queue_size))))
            tvq = self._make_vq(tx_index(p))
            slots = [alloc.alloc(self.hdr_len + MAX_TX_FRAME) for _ in range(queue_size)]
            self.txqs.append(_TxQueue(tvq, slots, list(range(queue_size))))
        self.ctrl: AnyDriverQueue | None = None
        if self.has_ctrl:
            self.ctrl = self._make_vq(ctrl_index(self.max_pairs), size=64)
            self._ctrl_buf = alloc.alloc(4096)
        for p in range(self.max_pairs):
            self.refill(p)

    # -- set-up -----------------------------------------------------------
    def _make_vq(self, index: int, size: int | None = None) -> AnyDriverQueue:
        size = size or self.queue_size
        lay = packed_ring_layout(size) if self.packed else split_ring_layout(size)
        base = self.alloc.alloc(lay.total, 4096)
        addrs = (base + lay.desc, base + lay.avail, base + lay.used)
        queue = PackedDriverQueue if self.packed else DriverQueue
        vq: AnyDriverQueue = queue(
            self.mem, size, *addrs, event_idx=self.event_idx, in_order=self.in_order
        )
        self.layouts[index] = (size, *addrs)
        vq.enable_interrupts(True)
        return vq

    def vq_layout(self, index: int) -> tuple[int, int, int, int]:
        """``(size, desc, avail, used)`` guest addresses of virtqueue ``index``."""
        size, d, a, u = self.layouts[index]
        return size, d, a, u

    @property
    def num_vqs(self) -> int:
        return 2 * self.max_pairs + (1 if self.has_ctrl else 0)

    def _kick(self, vq_index: int, vq: AnyDriverQueue) -> None:
        if vq.kick_needed():
            self.kick_cb(vq_index)
            pair = vq_index >> 1
            if vq_index == ctrl_index(self.max_pairs) and self.has_ctrl:
                return
            (self.rxqs if vq_index % 2 == 0 else self.txqs)[pair].stats.kicks += 1

    # -- receive ----------------------------------------------------------
    def refill(self, pair: int) -> int:
        """Post every free receive buffer of ``pair``; returns how many."""
        q = self.rxqs[pair]
        n = 0
        size = self.rx_buf_size
        while q.free:
            i = q.free.pop()
            if q.vq.add((), ((q.bufs[i], size),), i) is None:
                q.free.append(i)
                break
            n += 1
        if n:
            self._kick(rx_index(pair), q.vq)
        return n

    def receive(self, pair: int, budget: int = 256) -> list[RxFrame]:
        """Reap received frames of ``pair`` (like a NAPI poll), then refill."""
        q = self.rxqs[pair]
        out: list[RxFrame] = []
        used = q.vq.get_used(budget)
        k = 0
        hl = self.hdr_len
        while k < len(used):
            tok, length = used[k]
            k += 1
            i = int(tok)  # type: ignore[call-overload]
            q.free.append(i)
            if length < hl or length > self.rx_buf_size:
                q.stats.drops += 1
                continue
            first = self.mem.view(q.bufs[i], length)
            hdr = NetHdr.unpack_from(first, 0, hl)
            parts = [bytes(first[hl:])]
            nbuf = hdr.num_buffers if self.mergeable else 1
            if nbuf < 1 or nbuf > self.queue_size:
                q.stats.drops += 1
                continue
            for _ in range(nbuf - 1):
                if k >= len(used):
                    more = q.vq.get_used(1)
                    if not more:
                        raise VirtqueueError(
                            f"rx queue {pair}: header says {nbuf} buffers, device used fewer"
                        )
                    used.extend(more)
                tok, length = used[k]
                k += 1
                j = int(tok)  # type: ignore[call-overload]
                q.free.append(j)
                parts.append(self.mem.read(q.bufs[j], min(length, self.rx_buf_size)))
            data = b"".join(parts)
            q.stats.packets += 1
            q.stats.bytes += len(data)
            out.append(RxFrame(pair, hdr, data))
        if used:
            self.refill(pair)
            q.vq.enable_interrupts(True)
        return out

    def receive_all(self) -> list[RxFrame]:
        """Poll every receive queue, the inactive ones too (they may hold old packets)."""
        out: list[RxFrame] = []
        for p in range(self.max_pairs):
            out.extend(self.receive(p))
        return out

    # -- transmit ---------------------------------------------------------
    def select_queue(self, frame: bytes | memoryview, cpu: int | None = None) -> int:
        """XPS when a CPU map is set, else flow hash over the active pairs."""
        if cpu is not None and cpu in self.xps:
            q = self.xps[cpu]
            if q < self.curr_pairs:
                return q
        return flow_hash(frame) % self.curr_pairs

    def set_xps(self, cpu_to_queue: dict[int, int]) -> None:
        self.xps = dict(cpu_to_queue)

    def reclaim_tx(self, pair: int) -> int:
        q = self.txqs[pair]
        used = q.vq.get_used()
        for tok, _ in used:
            q.free.append(int(tok))  # type: ignore[call-overload]
        return len(used)

    def transmit(
        self,
        frames: Iterable[bytes | memoryview],
        *,
        pair: int | None = None,
        cpu: int | None = None,
        hdr: NetHdr | None = None,
    ) -> int:
        """Queue frames for transmission; one kick decision per touched queue.

        Returns how many were queued; the rest are counted as drops on their
        queue (the queue was full even after reclaiming).
        """
        touched: set[int] = set()
        sent = 0
        hl = self.hdr_len
        h = hdr or NetHdr(num_buffers=0)
        for frame in frames:
            p = self.select_queue(frame, cpu) if pair is None else pair
            if not 0 <= p < self.curr_pairs:
                raise ValueError(f"pair {p} is not active ({self.curr_pairs} active)")
            q = self.txqs[p]
            if not q.free:
                self.reclaim_tx(p)
            if not q.free or len(frame) > MAX_TX_FRAME:
                q.stats.drops += 1
                continue
            i = q.free.pop()
            addr = q.slots[i]
            buf = self.mem.view(addr, hl + len(frame))
            h.pack_into(buf, 0, hl)
            buf[hl:] = frame
            if q.vq.add(((addr, hl + len(frame)),), (), i) is None:
                q.free.append(i)
                q.stats.drops += 1
                continue
            q.stats.packets += 1
            q.stats.bytes += len(frame)
            touched.add(p)
            sent += 1
        for p in touched:
            self._kick(tx_index(p), self.txqs[p].vq)
        return sent

    # -- control queue ----------------------------------------------------
    def ctrl_command(
        self, cls: int, cmd: int, payload: bytes = b"", reply_len: int = 0
    ) -> tuple[int, bytes]:
        """Send one control command and wait (pumping) for its ack.

        Returns ``(ack, reply)``.  Raises :class:`ControlError` if there is no
        control queue or the device never answers.
        """
        if self.ctrl is None:
            raise ControlError("device has no control queue (CTRL_VQ not negotiated)")
        base = self._ctrl_buf
        out_len = _CTRL_HDR.size + len(payload)
        self.mem.write(base, _CTRL_HDR.pack(cls, cmd) + payload)
        ack_addr = base + 2048
        reply_addr = base + 2112
        self.mem.write(ack_addr, b"\xff")
        ins = [(ack_addr, 1)] if not reply_len else [(ack_addr, 1), (reply_addr, reply_len)]
        if self.ctrl.add(((base, out_len),), ins, "ctrl") is None:
            raise ControlError("control queue full")
        idx = ctrl_index(self.max_pairs)
        if self.ctrl.kick_needed():
            self.kick_cb(idx)
        for _ in range(CTRL_PUMP_LIMIT):
            done = self.ctrl.get_used()
            if done:
                ack = self.mem.read(ack_addr, 1)[0]
                reply = self.mem.read(reply_addr, reply_len) if reply_len else b""
                if ack != CTRL_OK:
                    self.ctrl_errors += 1
                return ack, reply
            self.pump()
        raise ControlError(f"device did not answer control command class {cls} cmd {cmd}")

    def set_queue_pairs(self, n: int) -> bool:
        """``ethtool -L eth0 combined n``: True if the device accepted it.

        Like Linux, the new count takes effect only after the device acks;
        a refused command leaves the old count in force.
        """
        if not self.features & NetFeature.MQ:
            return n == 1
        if not 1 <= n <= self.max_pairs:
            return False
        ack, _ = self.ctrl_command(CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", n))
        if ack != CTRL_OK:
            return False
        self.curr_pairs = n
        return True

    # -- statistics -------------------------------------------------------
    def stats(self) -> dict[str, int]:
        """ethtool -S style per-queue counters."""
        out: dict[str, int] = {}
        for p, rq in enumerate(self.rxqs):
            out[f"rx_queue_{p}_packets"] = rq.stats.packets
            out[f"rx_queue_{p}_bytes"] = rq.stats.bytes
            out[f"rx_queue_{p}_drops"] = rq.stats.drops
            out[f"rx_queue_{p}_kicks"] = rq.stats.kicks
        for p, tq in enumerate(self.txqs):
            out[f"tx_queue_{p}_packets"] = tq.stats.packets
            out[f"tx_queue_{p}_bytes"] = tq.stats.bytes
            out[f"tx_queue_{p}_drops"] = tq.stats.drops
            out[f"tx_queue_{p}_kicks"] = tq.stats.kicks
        return out
