"""The netif control ring (``xen/include/public/io/netif.h``, XEN_NETIF_CTRL_TYPE_*).

:class:`HashState` is the backend's hash configuration, changed only by
:meth:`HashState.handle` (one control request in, ``(status, data)`` out) and
used by :meth:`HashState.select_queue` to pick a received packet's queue.
:class:`CtrlBackend` / :class:`CtrlFrontend` move requests over the shared
ring (``DEFINE_RING_TYPES(xen_netif_ctrl, ...)``).

Invariants (as Linux ``drivers/net/xen-netback/hash.c``):

* Only Toeplitz (or NONE) is accepted; hash flags must be a subset of the
  four IPv4/IPv6(+TCP) types, and need an algorithm selected first.
* The key is at most :data:`XEN_NETBK_MAX_HASH_KEY_SIZE` bytes (larger:
  ``BUFFER_OVERFLOW``), read through a grant (read-only grants are fine);
  missing octets are zero.
* The mapping table holds at most :data:`XEN_NETBK_MAX_HASH_MAPPING_SIZE`
  entries; every entry names a queue below ``num_queues``; a rejected
  ``SET_HASH_MAPPING`` leaves the table unchanged.
* A bad grant in a request is ``INVALID_PARAMETER``, never an exception;
  unknown request types are ``NOT_SUPPORTED``.
"""

from __future__ import annotations

import struct
import time
from typing import Final

from virtnet.errors import GrantError
from virtnet.rss import parse_flow, toeplitz_hash
from virtnet.xen.evtchn import EventChannel
from virtnet.xen.grant import PAGE_SIZE, GrantMapper
from virtnet.xen.rings import CTRL_REQ, CTRL_RING, CTRL_RSP, BackRing, FrontRing, RingError

__all__ = [
    "XEN_NETBK_MAX_HASH_KEY_SIZE",
    "XEN_NETBK_MAX_HASH_MAPPING_SIZE",
    "CtrlBackend",
    "CtrlFrontend",
    "HashState",
]

# netif.h XEN_NETIF_CTRL_TYPE_*.
CTRL_TYPE_INVALID: Final = 0
CTRL_TYPE_GET_HASH_FLAGS: Final = 1
CTRL_TYPE_SET_HASH_FLAGS: Final = 2
CTRL_TYPE_SET_HASH_KEY: Final = 3
CTRL_TYPE_GET_HASH_MAPPING_SIZE: Final = 4
CTRL_TYPE_SET_HASH_MAPPING_SIZE: Final = 5
CTRL_TYPE_SET_HASH_MAPPING: Final = 6
CTRL_TYPE_SET_HASH_ALGORITHM: Final = 7
# netif.h XEN_NETIF_CTRL_STATUS_*.
STATUS_SUCCESS: Final = 0
STATUS_NOT_SUPPORTED: Final = 1
STATUS_INVALID_PARAMETER: Final = 2
STATUS_BUFFER_OVERFLOW: Final = 3
# netif.h XEN_NETIF_CTRL_HASH_TYPE_* and algorithms.
HASH_TYPE_IPV4: Final = 1 << 0
HASH_TYPE_IPV4_TCP: Final = 1 << 1
HASH_TYPE_IPV6: Final = 1 << 2
HASH_TYPE_IPV6_TCP: Final = 1 << 3
HASH_TYPES_ALL: Final = HASH_TYPE_IPV4 | HASH_TYPE_IPV4_TCP | HASH_TYPE_IPV6 | HASH_TYPE_IPV6_TCP
HASH_ALGORITHM_NONE: Final = 0
HASH_ALGORITHM_TOEPLITZ: Final = 1
#: drivers/net/xen-netback/common.h.
XEN_NETBK_MAX_HASH_KEY_SIZE: Final = 40
XEN_NETBK_MAX_HASH_MAPPING_SIZE: Final = 128
_IPPROTO_TCP: Final = 6
_U32: Final = struct.Struct("<I")


class HashState:
    """Backend hash configuration for one vif with ``num_queues`` queues."""

    __slots__ = ("alg", "flags", "key", "mapping", "num_queues")

    def __init__(self, num_queues: int) -> None:
        self.num_queues = num_queues
        self.alg = HASH_ALGORITHM_NONE
        self.flags = 0
        self.key = bytes(XEN_NETBK_MAX_HASH_KEY_SIZE)
        self.mapping: list[int] = []

    # -- requests --------------------------------------------------------------------
    def handle(
        self, typ: int, d0: int, d1: int, d2: int, grants: GrantMapper | None
    ) -> tuple[int, int]:
        if typ == CTRL_TYPE_SET_HASH_ALGORITHM:
            if d0 not in (HASH_ALGORITHM_NONE, HASH_ALGORITHM_TOEPLITZ):
                return STATUS_INVALID_PARAMETER, 0
            self.alg = d0
            return STATUS_SUCCESS, 0
        if typ == CTRL_TYPE_GET_HASH_FLAGS:
            if self.alg == HASH_ALGORITHM_NONE:
                return STATUS_INVALID_PARAMETER, 0
            return STATUS_SUCCESS, HASH_TYPES_ALL
        if typ == CTRL_TYPE_SET_HASH_FLAGS:
            if d0 & ~HASH_TYPES_ALL or self.alg == HASH_ALGORITHM_NONE:
                return STATUS_INVALID_PARAMETER, 0
            self.flags = d0
            return STATUS_SUCCESS, 0
        if typ == CTRL_TYPE_SET_HASH_KEY:
            if d1 > XEN_NETBK_MAX_HASH_KEY_SIZE:
                return STATUS_BUFFER_OVERFLOW, 0
            key = b""
            if d1:
                if grants is None:
                    return STATUS_INVALID_PARAMETER, 0
                try:
                    key = bytes(grants.span(d0, 0, d1, write=False))
                except GrantError:
                    return STATUS_INVALID_PARAMETER, 0
            self.key = key + bytes(XEN_NETBK_MAX_HASH_KEY_SIZE - len(key))
            return STATUS_SUCCESS, 0
        if typ == CTRL_TYPE_GET_HASH_MAPPING_SIZE:
            return STATUS_SUCCESS, XEN_NETBK_MAX_HASH_MAPPING_SIZE
        if typ == CTRL_TYPE_SET_HASH_MAPPING_SIZE:
            if d0 > XEN_NETBK_MAX_HASH_MAPPING_SIZE:
                return STATUS_INVALID_PARAMETER, 0
            self.mapping = [0] * d0
            return STATUS_SUCCESS, 0
        if typ == CTRL_TYPE_SET_HASH_MAPPING:
            length, off = d1, d2
            if length > PAGE_SIZE // 4:
                return STATUS_BUFFER_OVERFLOW, 0
            if off + length > len(self.mapping):
                return STATUS_INVALID_PARAMETER, 0
            if grants is None:
                return STATUS_INVALID_PARAMETER, 0
            try:
                raw = bytes(grants.span(d0, 0, 4 * length, write=False))
            except GrantError:
                return STATUS_INVALID_PARAMETER, 0
            entries = [_U32.unpack_from(raw, 4 * i)[0] for i in range(length)]
            if any(q >= self.num_queues for q in entries):
                return STATUS_INVALID_PARAMETER, 0
            self.mapping[off : off + length] = entries
            return STATUS_SUCCESS, 0
        return STATUS_NOT_SUPPORTED, 0

    # -- steering --------------------------------------------------------------------
    def hash_frame(self, frame: bytes | bytearray | memoryview) -> tuple[int, int] | None:
        """``(hash, htype bit)`` with the maximal enabled type, or ``None``."""
        if self.alg != HASH_ALGORITHM_TOEPLITZ or not self.flags:
            return None
        fk = parse_flow(frame)
        if fk is None:
            return None
        tcp = fk.proto == _IPPROTO_TCP
        if fk.version == 4:
            if tcp and self.flags & HASH_TYPE_IPV4_TCP:
                data = fk.src + fk.dst + struct.pack(">HH", fk.sport, fk.dport)
                return toeplitz_hash(self.key, data), HASH_TYPE_IPV4_TCP
            if self.flags & HASH_TYPE_IPV4:
                return toeplitz_hash(self.key, fk.src + fk.dst), HASH_TYPE_IPV4
            return None
        if tcp and self.flags & HASH_TYPE_IPV6_TCP:
            data = fk.src + fk.dst + struct.pack(">HH", fk.sport, fk.dport)
            return toeplitz_hash(self.key, data), HASH_TYPE_IPV6_TCP
        if self.flags & HASH_TYPE_IPV6:
            return toeplitz_hash(self.key, fk.src + fk.dst), HASH_TYPE_IPV6
        return None

    def queue_for_hash(self, h: int) -> int:
        if self.mapping:
            return self.mapping[h % len(self.mapping)]
        return h % self.num_queues

    def select_queue(self, frame: bytes | bytearray | memoryview) -> int | None:
        """The rx queue the configuration picks, or ``None`` (backend's choice)."""
        hv = self.hash_frame(frame)
        return None if hv is None else self.queue_for_hash(hv[0])

    # -- sharing with worker processes ----------------------------------------------
    SHARED: Final = struct.Struct(f"<IIII{XEN_NETBK_MAX_HASH_KEY_SIZE}s")

    def export(self, buf: memoryview) -> None:
        """Write into a shared page: seq (odd while writing), alg, flags, size, key, table."""
        seq = _U32.unpack_from(buf, 0)[0]
        _U32.pack_into(buf, 0, (seq + 1) & 0xFFFFFFFF)
        self.SHARED.pack_into(buf, 0, seq + 1, self.alg, self.flags, len(self.mapping), self.key)
        base = self.SHARED.size
        for i, q in enumerate(self.mapping):
            _U32.pack_into(buf, base + 4 * i, q)
        _U32.pack_into(buf, 0, (seq + 2) & 0xFFFFFFFF)

    def load(self, buf: memoryview) -> int:
        """Read what :meth:`export` wrote; returns the sequence number seen."""
        while True:
            seq, alg, flags, size, key = self.SHARED.unpack_from(buf, 0)
            size = min(size, XEN_NETBK_MAX_HASH_MAPPING_SIZE)
            base = self.SHARED.size
            mapping = [_U32.unpack_from(buf, base + 4 * i)[0] for i in range(size)]
            if seq % 2 == 0 and _U32.unpack_from(buf, 0)[0] == seq:
                break
        self.alg, self.flags, self.key = alg, flags, key
        self.mapping = [q if q < self.num_queues else 0 for q in mapping]
        return int(seq)


class CtrlBackend:
    """Serve the control ring: every request gets exactly one response."""

    def __init__(self, page: memoryview, hash_state: HashState, grants: GrantMapper) -> None:
        self.ring = BackRing(page, CTRL_RING)
        self.page = page
        self.state = hash_state
        self.grants = grants

    def process(self) -> tuple[int, bool]:
        """Handle every pending request; ``(handled, notify)``.  ``RingError`` if hostile."""
        ring, page = self.ring, self.page
        handled = 0
        while True:
            n = ring.unconsumed_requests()
            if not n:
                if not ring.final_check_for_requests():
                    break
                continue
            for _ in range(n):
                rid, typ, d0, d1, d2 = CTRL_REQ.unpack_from(page, ring.offset(ring.req_cons))
                ring.req_cons = (ring.req_cons + 1) & 0xFFFFFFFF
                status, data = self.state.handle(typ, d0, d1, d2, self.grants)
                CTRL_RSP.pack_into(page, ring.next_response_offset(), rid, typ, status, data)
                ring.commit_response()
                handled += 1
        notify = ring.push_responses_and_check_notify() if handled else False
        return handled, notify


class CtrlFrontend:
    """Issue control requests one at a time and wait for each response."""

    def __init__(self, page: memoryview, evtchn: EventChannel) -> None:
        self.ring = FrontRing(page, CTRL_RING)
        self.page = page
        self.evtchn = evtchn
        self._id = 0

    def request(
        self, typ: int, d0: int = 0, d1: int = 0, d2: int = 0, timeout: float = 5.0
    ) -> tuple[int, int]:
        ring, page = self.ring, self.page
        self._id = (self._id + 1) & 0xFFFF
        CTRL_REQ.pack_into(page, ring.next_request_offset(), self._id, typ, d0, d1, d2)
        ring.commit_request()
        if ring.push_requests_and_check_notify():
            self.evtchn.notify()
        deadline = time.monotonic() + timeout
        while not ring.final_check_for_responses():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no control ring response")
            self.evtchn.wait(min(left, 0.1))
        rid, rtyp, status, data = CTRL_RSP.unpack_from(page, ring.offset(ring.rsp_cons))
        ring.rsp_cons = (ring.rsp_cons + 1) & 0xFFFFFFFF
        if rid != self._id or rtyp != typ:
            raise RingError("control response does not match the request")
        return int(status), int(data)
