"""The virtio-net multiqueue device, sans-I/O: virtqueues + control queue + steering.

:class:`VirtioNetDevice` is the device half of one virtio-net function over
one :class:`~virtnet.memory.GuestMemory`.  The caller supplies the time
(``now``) and two plain callables:

* ``tx_sink(pair, hdr, frame)`` receives every transmitted frame (a port,
  a switch, a loopback in the demo); ``frame`` is a view of guest memory
  valid only during the call, and ``hdr`` must not be modified;
* notifications are returned, not sent: :meth:`take_interrupts` lists the
  virtqueues whose driver wants an interrupt after the last batch.

Invariants:

* Nothing raises out of the device for bad guest input: a broken virtqueue is
  marked broken (``NEEDS_RESET``), counted, and no longer served; a bad
  control command gets ``VIRTIO_NET_ERR`` and a counted error.
* After ``VQ_PAIRS_SET(n)`` is acked no frame is delivered to a receive queue
  ``>= n`` (unless RSS, which came later, names it), and transmit queues
  ``>= n`` are no longer served.
* Ordering across a queue-count change (the 2012 draft's rule, kept): before
  a ``VQ_PAIRS_SET``/``RSS_CONFIG`` takes effect the device finishes every
  transmit chain the driver had made available, so packets sent under the
  new setting never overtake packets sent under the old one.
* Every received frame is delivered once or counted as a drop (no buffer,
  filtered, too big); every transmitted chain is used exactly once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from virtnet.ctrl import ControlState, accepts_frame, handle_command
from virtnet.errors import PeerError
from virtnet.memory import GuestMemory
from virtnet.net import (
    CTRL_ERR,
    CTRL_MQ,
    NetConfig,
    NetFeature,
    NetHdr,
    ctrl_index,
    hdr_len,
    num_queue_pairs,
    pair_of,
    rx_index,
    tx_index,
    validate_features,
)
from virtnet.rss import HASH_TYPES_ALL
from virtnet.steering import Steering
from virtnet.virtq import Chain, DeviceQueue

__all__ = ["DEFAULT_DEVICE_FEATURES", "PairStats", "VirtioNetDevice", "fill_rx_chains"]

DEFAULT_DEVICE_FEATURES = (
    NetFeature.VERSION_1
    | NetFeature.MAC
    | NetFeature.MTU
    | NetFeature.MRG_RXBUF
    | NetFeature.STATUS
    | NetFeature.CTRL_VQ
    | NetFeature.CTRL_RX
    | NetFeature.CTRL_RX_EXTRA
    | NetFeature.CTRL_VLAN
    | NetFeature.GUEST_ANNOUNCE
    | NetFeature.MQ
    | NetFeature.CTRL_MAC_ADDR
    | NetFeature.CTRL_GUEST_OFFLOADS
    | NetFeature.NOTF_COAL
    | NetFeature.RSS
    | NetFeature.HASH_REPORT
    | NetFeature.EVENT_IDX
    | NetFeature.INDIRECT_DESC
)

#: Batch size for one pass over a transmit queue.
TX_BATCH = 256
#: The header of a transmitted frame that asks for no offload (shared; never mutated).
_PLAIN_TX_HDR = NetHdr()
#: Largest frame accepted on transmit without GSO (64 KiB, the GSO maximum, is
#: allowed too: the port decides; this caps what one chain may claim).
MAX_FRAME = 65535 + 14 + 4


@dataclass
class PairStats:
    """Device-side counters of one queue pair."""

    rx_packets: int = 0
    rx_bytes: int = 0
    rx_drops: int = 0  # no receive buffer
    tx_packets: int = 0
    tx_bytes: int = 0
    tx_errors: int = 0  # malformed transmit chains


def fill_rx_chains(
    chains: list[Chain], hdr: NetHdr, hl: int, frame: bytes | memoryview, mergeable: bool
) -> list[tuple[int, int]] | None:
    """Scatter ``hdr`` + ``frame`` over receive chains; the used entries, or None if it won't fit.

    Without MRG_RXBUF the whole packet must fit the first chain (5.1.6.3.2).
    With it, the packet spans as many chains as needed and ``num_buffers``
    says how many (5.1.6.4).  Chains not needed are not in the result.
    """
    total = hl + len(frame)
    if chains and len(chains[0].in_) == 1 and chains[0].in_len >= total:
        # One buffer holds it all: header and frame written in place.
        buf = chains[0].in_[0]
        hdr.num_buffers = 1
        if hl:
            hdr.pack_into(buf, 0, hl)
        buf[hl:total] = frame
        return [(chains[0].head, total)]
    used: list[tuple[int, int]] = []
    room = 0
    for ch in chains:
        used.append((ch.head, min(ch.in_len, total - room)))
        room += ch.in_len
        if room >= total or not mergeable:
            break
    if room < total or not chains or chains[0].in_len < hl:
        return None
    hdr.num_buffers = len(used) if mergeable else 0 if hl == 10 else 1
    header = bytearray(hl)
    hdr.pack_into(header, 0, hl)
    src = memoryview(bytes(header) + bytes(frame)) if hl else memoryview(bytes(frame))
    off = 0
    for ch, (_, n) in zip(chains, used, strict=False):
        left = n
        for buf in ch.in_:
            if not left:
                break
            k = min(len(buf), left)
            buf[:k] = src[off : off + k]
            off += k
            left -= k
    return used


class VirtioNetDevice:
    """One virtio-net device: ``2 * max_pairs`` data queues and a control queue."""

    def __init__(
        self,
        mem: GuestMemory,
        config: NetConfig,
        *,
        offered: int = DEFAULT_DEVICE_FEATURES,
        tx_sink: Callable[[int, NetHdr, memoryview], None] = lambda _p, _h, _f: None,
    ) -> None:
        self.mem = mem
        self.config = config
        self.offered = int(offered)
        self.features = 0
        self.tx_sink = tx_sink
        self.queues: dict[int, DeviceQueue] = {}
        self.broken: set[int] = set()
        self.max_pairs = config.max_virtqueue_pairs
        self.ctrl_state = ControlState.new(0, mac=bytes(config.mac))
        self.steering = Steering(self.max_pairs)
        self.stats = [PairStats() for _ in range(self.max_pairs)]
        self.queue_errors = 0
        self.filtered = 0
        self._irq: set[int] = set()
        self.hl = 12
        self.mergeable = True
        self.hash_report = False

    # -- set-up -----------------------------------------------------------
    def set_driver_features(self, features: int) -> None:
        """Accept the driver's features (FEATURES_OK): must be a valid subset of what we offered."""
        if features & ~self.offered:
            raise PeerError(
                f"driver accepted features we did not offer: 0x{features & ~self.offered:x}"
            )
        validate_features(features)
        self.features = features
        self.hl = hdr_len(features)
        self.mergeable = bool(features & NetFeature.MRG_RXBUF)
        self.hash_report = bool(features & NetFeature.HASH_REPORT)
        self.max_pairs = num_queue_pairs(features, self.config.max_virtqueue_pairs)
        self.ctrl_state = ControlState.new(
            features,
            max_queue_pairs=self.config.max_virtqueue_pairs,
            mac=bytes(self.config.mac),
            rss_max_key_size=self.config.rss_max_key_size,
            rss_max_indirection_table_length=self.config.rss_max_indirection_table_length,
            supported_hash_types=self.config.supported_hash_types or HASH_TYPES_ALL,
        )
        self.steering = Steering(self.max_pairs)
        self.stats = [PairStats() for _ in range(self.max_pairs)]

    def attach_queue(
        self, index: int, size: int, desc: int, avail: int, used: int, *, last_avail_idx: int = 0
    ) -> None:
        """Driver set up virtqueue ``index`` (a queue outside our map is the driver's fault)."""
        limit = (
            ctrl_index(self.max_pairs)
            if self.features & NetFeature.CTRL_VQ
            else 2 * self.max_pairs - 1
        )
        if not 0 <= index <= limit:
            raise PeerError(f"virtqueue index {index} does not exist (max {limit})")
        self.queues[index] = DeviceQueue(
            self.mem,
            size,
            desc,
            avail,
            used,
            event_idx=bool(self.features & NetFeature.EVENT_IDX),
            last_avail_idx=last_avail_idx,
        )
        self.broken.discard(index)

    @property
    def active_pairs(self) -> int:
        return self.steering.active_pairs

    # -- helpers ----------------------------------------------------------
    def _queue(self, index: int) -> DeviceQueue | None:
        if index in self.broken:
            return None
        return self.queues.get(index)

    def _break(self, index: int, exc: Exception) -> None:
        """A virtqueue the guest broke: stop serving it (the device would set NEEDS_RESET)."""
        self.broken.add(index)
        self.queue_errors += 1
        self.last_error = f"virtqueue {index}: {exc}"

    def _note_used(self, index: int) -> None:
        self._irq.add(index)

    def take_interrupts(self) -> list[int]:
        """Virtqueues whose driver wants an interrupt for what was used since the last call."""
        out = []
        for index in sorted(self._irq):
            q = self.queues.get(index)
            if q is not None and q.should_notify():
                out.append(index)
        self._irq.clear()
        return out

    # -- transmit ---------------------------------------------------------
    def process_tx(self, pair: int, now: float, budget: int = TX_BATCH) -> int:
        """Serve up to ``budget`` chains of transmitq(pair); frames go to ``tx_sink``."""
        index = tx_index(pair)
        q = self._queue(index)
        if q is None:
            return 0
        try:
            chains = q.pop(budget)
        except PeerError as exc:
            self._break(index, exc)
            return 0
        hl = self.hl
        st = self.stats[pair]
        heads = [ch.head for ch in chains]
        steer = self.steering
        # Rx-follows-tx only has a decision to make with more than one pair.
        note = steer.note_tx if steer.active_pairs > 1 else None
        sink = self.tx_sink
        plain = _PLAIN_TX_HDR
        packets = 0
        nbytes = 0
        errors = 0
        for ch in chains:
            out = ch.out
            data = out[0] if len(out) == 1 else memoryview(b"".join(out))
            n = len(data)
            if n < hl or n - hl > MAX_FRAME or ch.in_:
                errors += 1
                continue
            # No checksum or GSO request: every other field is meaningless.
            hdr = plain if not (data[0] or data[1]) else NetHdr.unpack_from(data, 0, hl)
            frame = data[hl:]
            packets += 1
            nbytes += n
            if note is not None:
                note(frame, pair, now)
            sink(pair, hdr, frame)
        st.tx_packets += packets
        st.tx_bytes += nbytes - packets * hl
        st.tx_errors += errors
        if heads:
            q.push_heads(heads)
            self._note_used(index)
        return len(chains)

    def process_all_tx(self, now: float) -> int:
        """One pass over every transmit queue the device serves now."""
        n = 0
        for p in range(self.max_pairs):
            if self.steering.tx_allowed(p):
                n += self.process_tx(p, now)
        return n

    def drain_tx(self, now: float) -> int:
        """Serve every transmit chain already made available, on every queue."""
        total = 0
        for p in range(self.max_pairs):
            while (n := self.process_tx(p, now)) > 0:
                total += n
        return total

    # -- receive ----------------------------------------------------------
    def deliver(
        self, frame: bytes | memoryview, now: float, hdr: NetHdr | None = None
    ) -> int | None:
        """Receive one frame from the host side; returns the pair it went to, or None (counted)."""
        if len(frame) < 14 or len(frame) > MAX_FRAME:
            self.filtered += 1
            return None
        if not accepts_frame(self.ctrl_state, frame):
            self.filtered += 1
            return None
        pair, hval, hrep = self.steering.choose_rx(frame, now)
        st = self.stats[pair]
        index = rx_index(pair)
        q = self._queue(index)
        if q is None:
            st.rx_drops += 1
            return None
        h = hdr if hdr is not None else NetHdr()
        if self.hash_report:
            h.hash_value, h.hash_report = hval, hrep
        try:
            need = 1
            if self.mergeable:
                need = max(1, -(-(self.hl + len(frame)) // 1536))
            chains = q.pop(need)
            used = fill_rx_chains(chains, h, self.hl, frame, self.mergeable) if chains else None
            if used is None and chains and self.mergeable:
                more = q.pop(64)
                chains += more
                used = fill_rx_chains(chains, h, self.hl, frame, self.mergeable)
        except PeerError as exc:
            self._break(index, exc)
            st.rx_drops += 1
            return None
        if used is None:
            q.unpop(len(chains))
            st.rx_drops += 1
            return None
        q.unpop(len(chains) - len(used))
        q.push(used)
        self._note_used(index)
        st.rx_packets += 1
        st.rx_bytes += len(frame)
        return pair

    def deliver_batch(self, frames: Sequence[bytes | memoryview], now: float) -> int:
        """Receive many frames: one pop, one used-index publish per queue.

        Returns how many were delivered; the others were filtered or dropped
        for want of buffers (each counted).  Frames larger than one receive
        buffer fall back to :meth:`deliver` (mergeable spanning).
        """
        by_pair: dict[int, list[bytes | memoryview]] = {}
        state = self.ctrl_state
        choose = self.steering.choose_rx
        check_filter = not state.promisc
        for frame in frames:
            if (
                len(frame) < 14
                or len(frame) > MAX_FRAME
                or (check_filter and not accepts_frame(state, frame))
            ):
                self.filtered += 1
                continue
            pair = choose(frame, now)[0] if not self.hash_report else -1
            if pair < 0:  # hash report wants per-frame headers
                if self.deliver(frame, now) is not None:
                    by_pair.setdefault(-1, []).append(frame)
                continue
            by_pair.setdefault(pair, []).append(frame)
        delivered = len(by_pair.pop(-1, ()))
        hl = self.hl
        hdr = NetHdr()
        for pair, group in by_pair.items():
            st = self.stats[pair]
            index = rx_index(pair)
            q = self._queue(index)
            if q is None:
                st.rx_drops += len(group)
                continue
            try:
                chains = q.pop(len(group))
            except PeerError as exc:
                self._break(index, exc)
                st.rx_drops += len(group)
                continue
            used: list[tuple[int, int]] = []
            k = 0
            spill: list[bytes | memoryview] = []
            for frame in group:
                # Once one frame takes the slow path, the rest follow it, in order.
                if spill or k >= len(chains):
                    spill.append(frame)
                    continue
                ch = chains[k]
                total = hl + len(frame)
                if len(ch.in_) != 1 or ch.in_len < total:
                    spill.append(frame)
                    continue
                buf = ch.in_[0]
                if hl:
                    hdr.pack_into(buf, 0, hl)
                buf[hl:total] = frame
                used.append((ch.head, total))
                st.rx_bytes += len(frame)
                k += 1
            q.unpop(len(chains) - k)
            if used:
                q.push(used)
                self._note_used(index)
                st.rx_packets += len(used)
                delivered += len(used)
            for frame in spill:
                if self.deliver(frame, now) is not None:
                    delivered += 1
        return delivered

    # -- control ----------------------------------------------------------
    def process_ctrl(self, now: float) -> int:
        """Serve the control queue; returns the number of commands handled."""
        if not self.features & NetFeature.CTRL_VQ:
            return 0
        index = ctrl_index(self.max_pairs)
        q = self._queue(index)
        if q is None:
            return 0
        try:
            chains = q.pop(64)
        except PeerError as exc:
            self._break(index, exc)
            return 0
        for ch in chains:
            if not ch.in_ or ch.in_len < 1:
                # No room for the ack: the command cannot be answered.
                self.ctrl_state.stats.malformed += 1
                q.push([(ch.head, 0)])
                continue
            data = b"".join(ch.out)
            if len(data) >= 1 and data[0] == CTRL_MQ:
                # Keep order across the switch: finish everything sent before it.
                self.drain_tx(now)
            try:
                ack, reply = handle_command(self.ctrl_state, self.features, data, now)
            except PeerError:
                ack, reply = CTRL_ERR, b""
            if ack != CTRL_ERR:
                # Everything sent before the command was drained above, so the
                # new transmit setting can apply at once.
                self.steering.apply(self.ctrl_state)
                self.steering.drain_done()
            # 5.1.6.5: the writable part is the ack byte, then command-specific-result.
            out = (bytes([ack]) + reply)[: ch.in_len]
            off = 0
            for buf in ch.in_:
                if off >= len(out):
                    break
                k = min(len(buf), len(out) - off)
                buf[:k] = out[off : off + k]
                off += k
            used = len(out)
            q.push([(ch.head, used)])
        if chains:
            self._note_used(index)
        return len(chains)

    # -- introspection ----------------------------------------------------
    def queue_of(self, index: int) -> DeviceQueue | None:
        return self.queues.get(index)

    def pair_of(self, index: int) -> int:
        return pair_of(index)
