"""Per-queue netif data path: backend (netback) and frontend (netfront) ring processing.

One :class:`BackendQueue` serves one queue's tx and rx rings inside one worker
process; one :class:`FrontendQueue` drives the same rings from the guest side.
Neither touches XenStore; both are driven by their worker loops (``netback``,
``netfront``) or directly by tests over one shared memory.

Backend invariants (as ``drivers/net/xen-netback/netback.c``):

* Every tx request slot consumed gets exactly one response slot, in order:
  the packet's first and fragment slots echo their ids with the packet's
  status; ``netif_extra_info`` slots get ``NETIF_RSP_NULL``.
* A packet that is *malformed* -- slots not all published, more than
  :data:`FATAL_SKB_SLOTS` slots, a fragment running past its page, fragments
  longer than the packet, an unknown extra type -- is the frontend's fatal
  error: :class:`~virtnet.xen.rings.RingError` (a ``PeerError``) is raised
  and the caller disconnects the vif.  A packet that is merely *bad*
  (shorter than an Ethernet header, more than :data:`MAX_SKB_SLOTS` slots,
  an ungranted/read-only/foreign grant ref) is answered ``NETIF_RSP_ERROR``,
  counted, and processing goes on.
* Guest data is read through :meth:`GrantMapper.span` views (copied once,
  by the port); received frames are copied once from a bounce buffer into
  granted rx pages.
* rx frames are steered by the control-ring hash (when configured); a frame
  for another queue is handed to that queue's worker through its mailbox.
* No frame is lost uncounted: a good guest frame the port refuses is
  ``tx_dropped`` (``tx_packets`` counts only frames the port took); frames
  the port discarded while receiving are mirrored as ``rx_port_dropped``;
  frames lost here are ``rx_dropped``.

Frontend invariants (as ``drivers/net/xen-netfront.c``): a response id must
name a request in flight and an rx response's offset + status must fit its
page, otherwise ``RingError``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Final

from virtnet.errors import GrantError
from virtnet.ports.base import VNET_HDR_LEN, PortQueue
from virtnet.xen.ctrl_ring import HASH_ALGORITHM_TOEPLITZ, HashState
from virtnet.xen.grant import PAGE_SIZE, GrantMapper, GrantTable
from virtnet.xen.rings import (
    EXTRA,
    EXTRA_GSO,
    EXTRA_HASH,
    MASK32,
    NETIF_RSP_ERROR,
    NETIF_RSP_NULL,
    NETIF_RSP_OKAY,
    NETRXF_CSUM_BLANK,
    NETRXF_DATA_VALIDATED,
    NETRXF_EXTRA_INFO,
    NETRXF_MORE_DATA,
    NETTXF_CSUM_BLANK,
    NETTXF_DATA_VALIDATED,
    NETTXF_EXTRA_INFO,
    NETTXF_MORE_DATA,
    RX_REQ,
    RX_RING,
    RX_RSP,
    TX_REQ,
    TX_RING,
    TX_RSP,
    XEN_NETIF_EXTRA_FLAG_MORE,
    XEN_NETIF_EXTRA_TYPE_GSO,
    XEN_NETIF_EXTRA_TYPE_HASH,
    XEN_NETIF_EXTRA_TYPE_MAX,
    XEN_NETIF_NR_SLOTS_MIN,
    BackRing,
    FrontRing,
    RingError,
)
from virtnet.xen.rings import (
    SRING_HEADER_SIZE as _SH,
)

__all__ = [
    "COUNTER_NAMES",
    "FATAL_SKB_SLOTS",
    "MAX_SKB_SLOTS",
    "BackendQueue",
    "FrontendQueue",
]

#: netback's max_skb_slots default: XEN_NETIF_NR_SLOTS_MIN (netif.h); more is dropped.
MAX_SKB_SLOTS: Final = XEN_NETIF_NR_SLOTS_MIN
#: netback FATAL_SKB_SLOTS_DEFAULT (netback.c): more slots than this is a fatal error.
FATAL_SKB_SLOTS: Final = 20
ETH_HLEN: Final = 14
#: Largest frame we pass into a guest: 64 KiB + Ethernet/VLAN headers (as ports.MAX_FRAME_LEN).
MAX_RX_FRAME: Final = 65535 + 14 + 4
RX_MAX_SLOTS: Final = -(-MAX_RX_FRAME // PAGE_SIZE)  # 17
#: virtio_net_hdr_v1 (virtio 1.3 section 5.1.6): flags, gso_type, hdr_len, gso_size,
#: csum_start, csum_offset, num_buffers.
VNET_HDR: Final = struct.Struct("<BBHHHHH")
VIRTIO_NET_HDR_F_NEEDS_CSUM: Final = 1
VIRTIO_NET_HDR_F_DATA_VALID: Final = 2
VIRTIO_NET_HDR_GSO_TCPV4: Final = 1
VIRTIO_NET_HDR_GSO_TCPV6: Final = 4
_GSO_XEN_TO_VIRTIO: Final = {1: VIRTIO_NET_HDR_GSO_TCPV4, 2: VIRTIO_NET_HDR_GSO_TCPV6}

#: Steering cache key for IPv4 without options: ethertype, flags/fragment offset,
#: protocol, and the 12 bytes of addresses and ports (offsets from the frame's byte 12).
_STEER_KEY: Final = struct.Struct(">H6xHxB2x12s")
STEER_CACHE_MAX: Final = 4096
_MISS: Final = (-1, -1, -1)

COUNTER_NAMES: Final = (
    "tx_packets",
    "tx_bytes",
    "tx_errors",
    "rx_packets",
    "rx_bytes",
    "rx_errors",
    "rx_dropped",
    "rx_forwarded",
    "tx_dropped",
    "rx_port_dropped",
)


def _l4_offset(frame: memoryview) -> tuple[int, int] | None:
    """(l4 offset, IP protocol) for Ethernet[/VLAN]/IPv4/IPv6 without extension headers."""
    n = len(frame)
    if n < ETH_HLEN:
        return None
    et = (frame[12] << 8) | frame[13]
    off = ETH_HLEN
    if et == 0x8100 and n >= 18:
        et = (frame[16] << 8) | frame[17]
        off = 18
    if et == 0x0800 and n >= off + 20:
        return off + (frame[off] & 0x0F) * 4, frame[off + 9]
    if et == 0x86DD and n >= off + 40:
        return off + 40, frame[off + 6]
    return None


class BackendQueue:
    """netback's per-queue state: the two back rings, the port queue, counters."""

    def __init__(
        self,
        index: int,
        tx_page: memoryview,
        rx_page: memoryview,
        grants: GrantMapper,
        port: PortQueue,
        *,
        hash_state: HashState | None = None,
        mailboxes: Sequence[PortQueue | None] = (),
        inbox: PortQueue | None = None,
        rx_sg: bool = True,
    ) -> None:
        self.index = index
        self.tx = BackRing(tx_page, TX_RING)
        self.rx = BackRing(rx_page, RX_RING)
        self.tx_page = tx_page
        self.rx_page = rx_page
        self.grants = grants
        self.port = port
        self.hash_state = hash_state
        self.mailboxes = list(mailboxes)
        self.inbox = inbox
        self.rx_max_slots = RX_MAX_SLOTS if rx_sg else 1
        self.counters = dict.fromkeys(COUNTER_NAMES, 0)
        self._hdr = memoryview(bytearray(VNET_HDR_LEN))
        self._bounce = bytearray(VNET_HDR_LEN + MAX_RX_FRAME)
        self._bounce_mv = memoryview(self._bounce)
        self._bounce_bufs = [self._bounce_mv]
        self._pending = 0  # bytes (header included) of a received frame waiting for rx slots
        self._steer_cache: dict[tuple[int, int, int, bytes], tuple[int, int, int] | None] = {}
        self._pending_hash: tuple[int, int, int] | None = None
        self._steer_seq = -1

    def steer(self, frame: memoryview) -> tuple[int, int, int] | None:
        """``(rx queue, hash, hash type bit)`` under the current hash config, or ``None``.

        Decisions are cached per IPv4 flow (options-free headers only).
        """
        hs = self.hash_state
        if hs is None:
            return None
        key = None
        if len(frame) >= 38 and frame[12] == 0x08 and frame[13] == 0 and frame[14] == 0x45:
            key = _STEER_KEY.unpack_from(frame, 12)
            hit = self._steer_cache.get(key, _MISS)
            if hit is not _MISS:
                return hit
        hv = hs.hash_frame(frame)
        res = None if hv is None else (hs.queue_for_hash(hv[0]), hv[0], hv[1])
        if key is not None:
            if len(self._steer_cache) >= STEER_CACHE_MAX:
                self._steer_cache.clear()
            self._steer_cache[key] = res
        return res

    def hash_changed(self) -> None:
        """Call after the hash configuration changed (drops cached decisions)."""
        self._steer_cache.clear()

    # -- guest transmit ----------------------------------------------------------------
    def process_tx(self, budget: int = 256) -> tuple[int, bool]:
        """Consume up to ``budget`` packets; ``(packets, notify frontend)``.  RingError = fatal."""
        ring, page = self.tx, self.tx_page
        mask, esz = ring.mask, ring.entry_size
        span = self.grants.span
        send = self.port.send
        hdr = self._hdr
        c = self.counters
        done = 0
        avail = ring.unconsumed_requests()
        while avail and done < budget:
            cons = ring.req_cons
            gref, off, flags, rid, size = TX_REQ.unpack_from(page, _SH + (cons & mask) * esz)
            used = 1
            gso: tuple[int, int] | None = None
            if flags & NETTXF_EXTRA_INFO:
                n_extra = 0
                while True:
                    if used >= avail:
                        raise RingError("packet's extra info slots not published")
                    etype, eflags, _body = EXTRA.unpack_from(
                        page, _SH + ((cons + used) & mask) * esz
                    )
                    used += 1
                    n_extra += 1
                    if (
                        not 0 < etype < XEN_NETIF_EXTRA_TYPE_MAX
                        or n_extra >= XEN_NETIF_EXTRA_TYPE_MAX
                    ):
                        raise RingError(f"bad extra info type {etype}")
                    if etype == XEN_NETIF_EXTRA_TYPE_GSO:
                        _t, _f, gsize, gtype, _pad, _feat = EXTRA_GSO.unpack_from(
                            page, _SH + ((cons + used - 1) & mask) * esz
                        )
                        if gtype not in _GSO_XEN_TO_VIRTIO or gsize == 0:
                            raise RingError(f"bad GSO type {gtype} / size {gsize}")
                        gso = (_GSO_XEN_TO_VIRTIO[gtype], gsize)
                    if not eflags & XEN_NETIF_EXTRA_FLAG_MORE:
                        break
            frags: list[tuple[int, int, int, int]] = []
            f = flags
            frag_total = 0
            while f & NETTXF_MORE_DATA:
                if used >= avail:
                    raise RingError("packet's fragment slots not published")
                if len(frags) + 1 >= FATAL_SKB_SLOTS:
                    raise RingError(f"packet spans more than {FATAL_SKB_SLOTS} slots")
                g2, o2, f, id2, s2 = TX_REQ.unpack_from(page, _SH + ((cons + used) & mask) * esz)
                used += 1
                if o2 + s2 > PAGE_SIZE:
                    raise RingError("tx fragment crosses its page")
                frags.append((g2, o2, s2, id2))
                frag_total += s2
            if frag_total > size:
                raise RingError("tx fragments are longer than the packet")
            first_len = size - frag_total
            if off + first_len > PAGE_SIZE:
                raise RingError("tx request crosses its page")
            status = NETIF_RSP_OKAY
            if size < ETH_HLEN or len(frags) + 1 > MAX_SKB_SLOTS:
                status = NETIF_RSP_ERROR
                c["tx_errors"] += 1
            else:
                try:
                    first = span(gref, off, first_len, write=False)
                    bufs = [hdr, first]
                    for g2, o2, s2, _ in frags:
                        bufs.append(span(g2, o2, s2, write=False))
                except GrantError:
                    status = NETIF_RSP_ERROR
                    c["tx_errors"] += 1
                else:
                    if flags & (NETTXF_CSUM_BLANK | NETTXF_DATA_VALIDATED) or gso:
                        if not self._fill_vnet_hdr(first, flags, gso):
                            status = NETIF_RSP_ERROR
                            c["tx_errors"] += 1
                    else:
                        hdr[:] = b"\x00" * VNET_HDR_LEN
                    if status == NETIF_RSP_OKAY:
                        # The guest's packet was good (NETIF_RSP_OKAY) even when the
                        # host side refuses it; that loss is counted, not hidden.
                        if send(bufs):
                            c["tx_packets"] += 1
                            c["tx_bytes"] += size
                        else:
                            c["tx_dropped"] += 1
            # Responses: one per slot consumed, in order.
            rsp = ring.rsp_prod_pvt
            TX_RSP.pack_into(page, _SH + (rsp & mask) * esz, rid, status)
            rsp += 1
            for _ in range(used - 1 - len(frags)):
                TX_RSP.pack_into(page, _SH + (rsp & mask) * esz, 0, NETIF_RSP_NULL)
                rsp += 1
            for _g, _o, _s, id2 in frags:
                TX_RSP.pack_into(page, _SH + (rsp & mask) * esz, id2, status)
                rsp += 1
            ring.rsp_prod_pvt = rsp & MASK32
            ring.req_cons = (cons + used) & MASK32
            avail -= used
            done += 1
            if not avail:
                avail = ring.unconsumed_requests()
        notify = ring.push_responses_and_check_notify() if done else False
        return done, notify

    def _fill_vnet_hdr(self, first: memoryview, flags: int, gso: tuple[int, int] | None) -> bool:
        hdr = self._hdr
        if not flags & NETTXF_CSUM_BLANK and gso is None:
            VNET_HDR.pack_into(hdr, 0, VIRTIO_NET_HDR_F_DATA_VALID, 0, 0, 0, 0, 0, 0)
            return True
        l4 = _l4_offset(first)
        if l4 is None:
            return False
        start, proto = l4
        if proto == 6:
            csum_off = 16
        elif proto == 17 and gso is None:
            csum_off = 6
        else:
            return False
        if gso is None:
            VNET_HDR.pack_into(hdr, 0, VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, start, csum_off, 0)
            return True
        if len(first) < start + 20:
            return False
        hdr_len = start + (first[start + 12] >> 4) * 4
        VNET_HDR.pack_into(
            hdr, 0, VIRTIO_NET_HDR_F_NEEDS_CSUM, gso[0], hdr_len, gso[1], start, csum_off, 0
        )
        return True

    # -- guest receive -----------------------------------------------------------------
    def _next_frame(self) -> int:
        bufs = self._bounce_bufs
        if self.inbox is not None:
            n = self.inbox.recv_into(bufs)
            if n:
                return n
        return self.port.recv_into(bufs)

    def process_rx(self, budget: int = 256) -> tuple[int, bool, bool]:
        """Deliver up to ``budget`` frames; ``(frames, notify, blocked on rx slots)``."""
        ring, page = self.rx, self.rx_page
        mask, esz = ring.mask, ring.entry_size
        span = self.grants.span
        bounce = self._bounce_mv
        c = self.counters
        hs = self.hash_state
        done = 0
        blocked = False
        avail = ring.unconsumed_requests()
        while done < budget:
            n = self._pending
            if not n:
                n = self._next_frame()
                if not n:
                    break
                if n < VNET_HDR_LEN + ETH_HLEN:
                    c["rx_dropped"] += 1
                    continue
                hres = None
                if hs is not None and hs.alg:
                    hres = self.steer(bounce[VNET_HDR_LEN:n])
                    q = self.index if hres is None else hres[0]
                    if q != self.index and len(self.mailboxes) > 1:
                        box = self.mailboxes[q] if q < len(self.mailboxes) else None
                        if box is not None and box.send([bounce[:n]]):
                            c["rx_forwarded"] += 1
                        else:
                            c["rx_dropped"] += 1
                        continue
                self._pending_hash = hres
            hres = self._pending_hash
            data_len = n - VNET_HDR_LEN
            extra = 1 if hres is not None else 0
            slots = -(-data_len // PAGE_SIZE)
            if slots > self.rx_max_slots:
                c["rx_dropped"] += 1
                self._pending = 0
                continue
            if avail < slots + extra:
                avail = ring.unconsumed_requests()
                if avail < slots + extra:
                    self._pending = n
                    blocked = True
                    break
            vflags = bounce[0]
            first_flags = 0
            if vflags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
                first_flags = NETRXF_CSUM_BLANK | NETRXF_DATA_VALIDATED
            elif vflags & VIRTIO_NET_HDR_F_DATA_VALID:
                first_flags = NETRXF_DATA_VALIDATED
            if extra:
                first_flags |= NETRXF_EXTRA_INFO
            pos = VNET_HDR_LEN
            cons = ring.req_cons
            rsp = ring.rsp_prod_pvt
            for s in range(slots):
                # Slot order (netback rx.c): first data, then the extra, then the rest.
                at = s + extra if s else 0
                rid, _pad, gref = RX_REQ.unpack_from(page, _SH + ((cons + at) & mask) * esz)
                chunk = min(PAGE_SIZE, n - pos)
                try:
                    span(gref, 0, chunk, write=True)[:] = bounce[pos : pos + chunk]
                    status = chunk
                except GrantError:
                    status = NETIF_RSP_ERROR
                    c["rx_errors"] += 1
                fl = first_flags if s == 0 else 0
                if s < slots - 1:
                    fl |= NETRXF_MORE_DATA
                RX_RSP.pack_into(page, _SH + ((rsp + at) & mask) * esz, rid, 0, fl, status)
                pos += chunk
            if hres is not None:
                # netif_extra_info HASH: type, flags, htype (bit number), alg, value (LE).
                EXTRA_HASH.pack_into(
                    page, _SH + ((rsp + 1) & mask) * esz, XEN_NETIF_EXTRA_TYPE_HASH, 0,
                    hres[2].bit_length() - 1, HASH_ALGORITHM_TOEPLITZ, hres[1],
                )  # fmt: skip
            ring.req_cons = (cons + slots + extra) & MASK32
            ring.rsp_prod_pvt = (rsp + slots + extra) & MASK32
            avail -= slots + extra
            self._pending = 0
            self._pending_hash = None
            c["rx_packets"] += 1
            c["rx_bytes"] += data_len
            done += 1
        c["rx_port_dropped"] = self.port.rx_dropped
        notify = ring.push_responses_and_check_notify() if done else False
        return done, notify, blocked


class FrontendQueue:
    """netfront's per-queue state: front rings over granted tx/rx buffer pages.

    Each ring slot id owns one data page granted to the backend (tx pages
    read-only, rx pages writable) for the life of the queue.
    """

    def __init__(self, index: int, gt: GrantTable, backend_domid: int) -> None:
        self.index = index
        self.gt = gt
        mem = gt.mem
        self.tx_frame = gt.alloc_frame()
        self.rx_frame = gt.alloc_frame()
        self.tx_ring_ref = gt.grant_access(backend_domid, self.tx_frame)
        self.rx_ring_ref = gt.grant_access(backend_domid, self.rx_frame)
        self.tx_page = mem.page(self.tx_frame)
        self.rx_page = mem.page(self.rx_frame)
        self.tx = FrontRing(self.tx_page, TX_RING)
        self.rx = FrontRing(self.rx_page, RX_RING)
        n_tx, n_rx = TX_RING.size, RX_RING.size
        self.tx_frames = [gt.alloc_frame() for _ in range(n_tx)]
        self.tx_refs = [gt.grant_access(backend_domid, f, readonly=True) for f in self.tx_frames]
        self.tx_bufs = [mem.page(f) for f in self.tx_frames]
        self.rx_frames = [gt.alloc_frame() for _ in range(n_rx)]
        self.rx_refs = [gt.grant_access(backend_domid, f) for f in self.rx_frames]
        self.rx_bufs = [mem.page(f) for f in self.rx_frames]
        self.tx_free = list(range(n_tx - 1, -1, -1))
        self.tx_inflight = [False] * n_tx
        self.rx_free = list(range(n_rx - 1, -1, -1))
        self.rx_inflight = [False] * n_rx
        self.rx_posted = [0] * n_rx  # ring index & mask -> buffer id (for extra-info slots)
        self._rx_partial: bytearray | None = None
        self._rx_partial_bad = False
        self._rx_skip_extra = 0
        self.last_rx_hash: tuple[int, int, int] | None = None
        self.counters = dict.fromkeys(COUNTER_NAMES, 0)

    def post_rx(self) -> bool:
        """Post every free rx buffer; True if the backend must be notified."""
        ring, page = self.rx, self.rx_page
        mask, esz = ring.mask, ring.entry_size
        free = self.rx_free
        if not free:
            return False
        prod = ring.req_prod_pvt
        n = min(len(free), ring.free_requests())
        refs, inflight, posted = self.rx_refs, self.rx_inflight, self.rx_posted
        for _ in range(n):
            i = free.pop()
            RX_REQ.pack_into(page, _SH + (prod & mask) * esz, i, 0, refs[i])
            inflight[i] = True
            posted[prod & mask] = i
            prod += 1
        ring.req_prod_pvt = prod & MASK32
        return ring.push_requests_and_check_notify()

    def tx_slot(self) -> int | None:
        """A free tx buffer id (fill ``tx_bufs[id]``, then :meth:`queue_tx`)."""
        return self.tx_free.pop() if self.tx_free else None

    def queue_tx(self, slot: int, length: int, flags: int = 0) -> None:
        ring = self.tx
        mask, esz = ring.mask, ring.entry_size
        TX_REQ.pack_into(
            self.tx_page,
            _SH + (ring.req_prod_pvt & mask) * esz,
            self.tx_refs[slot],
            0,
            flags,
            slot,
            length,
        )
        self.tx_inflight[slot] = True
        ring.req_prod_pvt = (ring.req_prod_pvt + 1) & MASK32
        self.counters["tx_packets"] += 1
        self.counters["tx_bytes"] += length

    def queue_tx_frame(self, data: bytes | bytearray | memoryview, flags: int = 0) -> bool:
        """Queue one frame over as many slots as it needs (NETTXF_more_data); False if no room."""
        n = len(data)
        slots = max(1, -(-n // PAGE_SIZE))
        if len(self.tx_free) < slots or self.tx.free_requests() < slots or slots > MAX_SKB_SLOTS:
            return False
        ring, page = self.tx, self.tx_page
        mask, esz = ring.mask, ring.entry_size
        prod = ring.req_prod_pvt
        for k in range(slots):
            slot = self.tx_free.pop()
            chunk = data[k * PAGE_SIZE : (k + 1) * PAGE_SIZE]
            self.tx_bufs[slot][: len(chunk)] = chunk
            f = flags if k == 0 else 0
            if k < slots - 1:
                f |= NETTXF_MORE_DATA
            size = n if k == 0 else len(chunk)
            TX_REQ.pack_into(page, _SH + (prod & mask) * esz, self.tx_refs[slot], 0, f, slot, size)
            self.tx_inflight[slot] = True
            prod += 1
        ring.req_prod_pvt = prod & MASK32
        self.counters["tx_packets"] += 1
        self.counters["tx_bytes"] += n
        return True

    def push_tx(self) -> bool:
        return self.tx.push_requests_and_check_notify()

    def reap_tx(self) -> int:
        """Collect tx responses; ids return to the free list.  RingError on garbage."""
        ring, page = self.tx, self.tx_page
        mask, esz = ring.mask, ring.entry_size
        n = ring.unconsumed_responses()
        cons = ring.rsp_cons
        inflight, free = self.tx_inflight, self.tx_free
        for k in range(n):
            rid, status = TX_RSP.unpack_from(page, _SH + ((cons + k) & mask) * esz)
            if status == NETIF_RSP_NULL:
                continue
            if rid >= len(inflight) or not inflight[rid]:
                raise RingError(f"tx response for id {rid} not in flight")
            inflight[rid] = False
            free.append(rid)
            if status != NETIF_RSP_OKAY:
                self.counters["tx_errors"] += 1
        ring.rsp_cons = (cons + n) & MASK32
        return n

    def reap_rx(self, deliver: Callable[[memoryview], None]) -> int:
        """Hand each received frame to ``deliver``; buffers go back to the free list.

        Single-slot frames are delivered straight from the rx page; multi-slot
        frames (NETRXF_more_data) are joined first; extra-info slots
        (NETRXF_extra_info) are skipped and their buffers recycled.
        """
        ring, page = self.rx, self.rx_page
        mask, esz = ring.mask, ring.entry_size
        n = ring.unconsumed_responses()
        cons = ring.rsp_cons
        inflight, free, bufs, posted = self.rx_inflight, self.rx_free, self.rx_bufs, self.rx_posted
        c = self.counters
        for k in range(n):
            idx = cons + k
            if self._rx_skip_extra:
                # netif_extra_info slot: no id of its own; the buffer posted at this index.
                rid = posted[idx & mask]
                etype, eflags, _ = EXTRA.unpack_from(page, _SH + (idx & mask) * esz)
                if etype == XEN_NETIF_EXTRA_TYPE_HASH:
                    _t, _f, htype, alg, value = EXTRA_HASH.unpack_from(
                        page, _SH + (idx & mask) * esz
                    )
                    self.last_rx_hash = (htype, alg, value)
                    c["rx_hash_extras"] = c.get("rx_hash_extras", 0) + 1
                if inflight[rid]:
                    inflight[rid] = False
                    free.append(rid)
                if not eflags & XEN_NETIF_EXTRA_FLAG_MORE:
                    self._rx_skip_extra = 0
                continue
            rid, off, flags, status = RX_RSP.unpack_from(page, _SH + (idx & mask) * esz)
            if rid >= len(inflight) or not inflight[rid]:
                raise RingError(f"rx response for id {rid} not in flight")
            inflight[rid] = False
            free.append(rid)
            if flags & NETRXF_EXTRA_INFO:
                self._rx_skip_extra = 1
            more = bool(flags & NETRXF_MORE_DATA)
            if status < 0:
                c["rx_errors"] += 1
                if more:
                    if self._rx_partial is None:
                        self._rx_partial = bytearray()
                    self._rx_partial_bad = True
                else:
                    self._rx_partial = None
                    self._rx_partial_bad = False
                continue
            if off + status > PAGE_SIZE:
                raise RingError("rx response runs past its page")
            data = bufs[rid][off : off + status]
            partial = self._rx_partial
            if partial is None and not more:
                c["rx_packets"] += 1
                c["rx_bytes"] += status
                deliver(data)
                continue
            if partial is None:
                partial = self._rx_partial = bytearray()
            if len(partial) + status > MAX_RX_FRAME:
                raise RingError("multi-slot rx frame longer than any frame")
            partial += data
            if not more:
                self._rx_partial = None
                if self._rx_partial_bad:
                    self._rx_partial_bad = False
                    c["rx_dropped"] += 1
                    continue
                c["rx_packets"] += 1
                c["rx_bytes"] += len(partial)
                deliver(memoryview(partial))
        ring.rsp_cons = (cons + n) & MASK32
        return n
