"""Xen shared I/O rings, byte-exact to ``xen/include/public/io/ring.h`` and ``io/netif.h``.

A shared ring (``struct *_sring``) lives in one 4 KiB page: a 64-byte header
(``req_prod``, ``req_event``, ``rsp_prod``, ``rsp_event`` as ``uint32_t``, then
``pvt`` and ``__pad`` up to offset 64) followed by ``RING_SIZE`` entry slots;
each slot is a union of one request and one response, so its size is the
larger of the two.  ``RING_SIZE`` is the largest power of two that fits.

Invariants:

* Indexes are free-running ``uint32_t`` and wrap at 2**32; a slot is
  ``index & (RING_SIZE - 1)``.  All arithmetic is done modulo 2**32.
* The peer's producer index is untrusted: a backend refuses a ``req_prod``
  that claims more than ``RING_SIZE`` requests beyond its own ``rsp_prod_pvt``
  (``RING_REQUEST_PROD_OVERFLOW``) and a frontend refuses a ``rsp_prod`` more
  than its outstanding requests beyond ``rsp_cons``
  (``RING_RESPONSE_PROD_OVERFLOW``); both raise :class:`RingError`, a
  :class:`~virtnet.errors.PeerError`.
* Entries are copied out of shared memory once (``struct.unpack_from``) before
  they are checked, so a peer rewriting a slot cannot race a check
  (``RING_COPY_REQUEST``).
* Notification follows ring.h's hold-off rule: notify iff the event index
  lies in ``(old, new]`` of the producer index just published.
"""

from __future__ import annotations

import struct
from typing import Final

from virtnet.errors import PeerError

__all__ = [
    "CTRL_RING",
    "NETIF_RSP_DROPPED",
    "NETIF_RSP_ERROR",
    "NETIF_RSP_NULL",
    "NETIF_RSP_OKAY",
    "PAGE_SIZE",
    "RX_REQ",
    "RX_RING",
    "RX_RSP",
    "SRING_HEADER_SIZE",
    "TX_REQ",
    "TX_RING",
    "TX_RSP",
    "BackRing",
    "FrontRing",
    "RingError",
    "RingLayout",
]

MASK32: Final = 0xFFFFFFFF
#: XEN_PAGE_SIZE: rings and grants are one 4 KiB page.
PAGE_SIZE: Final = 4096
#: offsetof(struct netif_tx_sring, ring): four RING_IDX + pvt (4) + __pad[44] (ring.h).
SRING_HEADER_SIZE: Final = 64
_REQ_PROD, _REQ_EVENT, _RSP_PROD, _RSP_EVENT = 0, 1, 2, 3  # uint32 offsets / 4

# netif.h: struct netif_tx_request { grant_ref_t gref; u16 offset, flags, id, size; } = 12
TX_REQ: Final = struct.Struct("<IHHHH")
# netif.h: struct netif_tx_response { u16 id; s16 status; } = 4
TX_RSP: Final = struct.Struct("<Hh")
# netif.h: struct netif_rx_request { u16 id; u16 pad; grant_ref_t gref; } = 8
RX_REQ: Final = struct.Struct("<HHI")
# netif.h: struct netif_rx_response { u16 id, offset, flags; s16 status; } = 8
RX_RSP: Final = struct.Struct("<HHHh")
# netif.h: struct netif_extra_info { u8 type, flags; union { ... u16 pad[3]; } u; } = 8
EXTRA: Final = struct.Struct("<BB6s")
EXTRA_GSO: Final = struct.Struct("<BBHBBH")  # type, flags, size, gso type, pad, features
EXTRA_HASH: Final = struct.Struct("<BBBBI")  # type, flags, htype, alg, value (LSB first)
# netif.h: struct xen_netif_ctrl_request { u16 id, type; u32 data[3]; } = 16
CTRL_REQ: Final = struct.Struct("<HHIII")
# netif.h: struct xen_netif_ctrl_response { u16 id, type; u32 status, data; } = 12
CTRL_RSP: Final = struct.Struct("<HHII")

# netif.h NETTXF_* (tx request flags) and NETRXF_* (rx response flags).
NETTXF_CSUM_BLANK: Final = 1 << 0
NETTXF_DATA_VALIDATED: Final = 1 << 1
NETTXF_MORE_DATA: Final = 1 << 2
NETTXF_EXTRA_INFO: Final = 1 << 3
NETRXF_DATA_VALIDATED: Final = 1 << 0
NETRXF_CSUM_BLANK: Final = 1 << 1
NETRXF_MORE_DATA: Final = 1 << 2
NETRXF_EXTRA_INFO: Final = 1 << 3
NETRXF_GSO_PREFIX: Final = 1 << 4
# netif.h XEN_NETIF_EXTRA_*.
XEN_NETIF_EXTRA_TYPE_NONE: Final = 0
XEN_NETIF_EXTRA_TYPE_GSO: Final = 1
XEN_NETIF_EXTRA_TYPE_MCAST_ADD: Final = 2
XEN_NETIF_EXTRA_TYPE_MCAST_DEL: Final = 3
XEN_NETIF_EXTRA_TYPE_HASH: Final = 4
XEN_NETIF_EXTRA_TYPE_MAX: Final = 5
XEN_NETIF_EXTRA_FLAG_MORE: Final = 1 << 0
# netif.h: status values.
NETIF_RSP_DROPPED: Final = -2
NETIF_RSP_ERROR: Final = -1
NETIF_RSP_OKAY: Final = 0
NETIF_RSP_NULL: Final = 1
#: netif.h XEN_NETIF_MAX_TX_SIZE: a packet's total size field is a u16.
XEN_NETIF_MAX_TX_SIZE: Final = 0xFFFF
#: netif.h XEN_NETIF_NR_SLOTS_MIN: a backend must accept packets this many slots long.
XEN_NETIF_NR_SLOTS_MIN: Final = 18


class RingError(PeerError):
    """The peer's ring indexes or entries break ring.h/netif.h rules."""


def _ring_size(entry_size: int) -> int:
    """__RING_SIZE: largest power of two of entries fitting after the header (ring.h __RD32)."""
    n = (PAGE_SIZE - SRING_HEADER_SIZE) // entry_size
    size = 1
    while size * 2 <= n:
        size *= 2
    return size


class RingLayout:
    """Size facts for one ring type (slot = union of request and response)."""

    __slots__ = ("entry_size", "size")

    def __init__(self, req_size: int, rsp_size: int) -> None:
        self.entry_size = max(req_size, rsp_size)
        self.size = _ring_size(self.entry_size)


TX_RING: Final = RingLayout(TX_REQ.size, TX_RSP.size)  # 12-byte slots, 256 entries
RX_RING: Final = RingLayout(RX_REQ.size, RX_RSP.size)  # 8-byte slots, 256 entries
CTRL_RING: Final = RingLayout(CTRL_REQ.size, CTRL_RSP.size)  # 16-byte slots, 128 entries


def sring_init(page: memoryview) -> None:
    """SHARED_RING_INIT: zero the indexes, events at 1, pad cleared."""
    page[:SRING_HEADER_SIZE] = bytes(SRING_HEADER_SIZE)
    idx = page[:16].cast("I")
    idx[_REQ_EVENT] = 1
    idx[_RSP_EVENT] = 1
    idx.release()


class _Ring:
    __slots__ = ("_idx", "entry_size", "mask", "page", "size")

    def __init__(self, page: memoryview, layout: RingLayout) -> None:
        if len(page) < PAGE_SIZE:
            raise RingError("ring page shorter than 4 KiB")
        self.page = page
        self._idx = page[:16].cast("I")
        self.size = layout.size
        self.mask = layout.size - 1
        self.entry_size = layout.entry_size

    def offset(self, index: int) -> int:
        """Byte offset of slot ``index`` within the page."""
        return SRING_HEADER_SIZE + (index & self.mask) * self.entry_size

    def close(self) -> None:
        self._idx.release()

    # Raw shared fields (for tests and hostile-peer simulation).
    @property
    def req_prod(self) -> int:
        return int(self._idx[_REQ_PROD])

    @property
    def rsp_prod(self) -> int:
        return int(self._idx[_RSP_PROD])

    @property
    def req_event(self) -> int:
        return int(self._idx[_REQ_EVENT])

    @property
    def rsp_event(self) -> int:
        return int(self._idx[_RSP_EVENT])


class FrontRing(_Ring):
    """The frontend's view: produces requests, consumes responses."""

    __slots__ = ("req_prod_pvt", "rsp_cons")

    def __init__(
        self, page: memoryview, layout: RingLayout, *, init: bool = True, start: int = 0
    ) -> None:
        super().__init__(page, layout)
        if init:
            sring_init(page)
            self._idx[_REQ_PROD] = self._idx[_RSP_PROD] = start & MASK32
        self.req_prod_pvt = start & MASK32
        self.rsp_cons = start & MASK32

    def free_requests(self) -> int:
        """RING_FREE_REQUESTS."""
        return self.size - ((self.req_prod_pvt - self.rsp_cons) & MASK32)

    def next_request_offset(self) -> int:
        """Offset of the slot for the next request; call :meth:`commit_request` after filling."""
        return self.offset(self.req_prod_pvt)

    def commit_request(self) -> None:
        self.req_prod_pvt = (self.req_prod_pvt + 1) & MASK32

    def push_requests_and_check_notify(self) -> bool:
        """RING_PUSH_REQUESTS_AND_CHECK_NOTIFY."""
        idx = self._idx
        old = idx[_REQ_PROD]
        new = self.req_prod_pvt
        idx[_REQ_PROD] = new
        return ((new - idx[_REQ_EVENT]) & MASK32) < ((new - old) & MASK32)

    def unconsumed_responses(self) -> int:
        """XEN_RING_NR_UNCONSUMED_RESPONSES, with RING_RESPONSE_PROD_OVERFLOW checked."""
        n = (self._idx[_RSP_PROD] - self.rsp_cons) & MASK32
        if n > ((self.req_prod_pvt - self.rsp_cons) & MASK32):
            raise RingError(f"backend rsp_prod claims {n} responses, more than requests posted")
        return n

    def final_check_for_responses(self) -> bool:
        """RING_FINAL_CHECK_FOR_RESPONSES: re-arm rsp_event, then look again."""
        if self.unconsumed_responses():
            return True
        self._idx[_RSP_EVENT] = (self.rsp_cons + 1) & MASK32
        return self.unconsumed_responses() != 0


class BackRing(_Ring):
    """The backend's view: consumes requests, produces responses."""

    __slots__ = ("req_cons", "rsp_prod_pvt")

    def __init__(self, page: memoryview, layout: RingLayout, *, start: int = 0) -> None:
        super().__init__(page, layout)
        # BACK_RING_ATTACH(start): both private indexes at the ring's starting point.
        self.req_cons = start & MASK32
        self.rsp_prod_pvt = start & MASK32

    def unconsumed_requests(self) -> int:
        """XEN_RING_NR_UNCONSUMED_REQUESTS, with RING_REQUEST_PROD_OVERFLOW checked."""
        prod = self._idx[_REQ_PROD]
        if ((prod - self.rsp_prod_pvt) & MASK32) > self.size:
            raise RingError(
                f"frontend req_prod {prod} is more than a ring ({self.size}) "
                f"beyond rsp_prod_pvt {self.rsp_prod_pvt}"
            )
        req = (prod - self.req_cons) & MASK32
        rsp = self.size - ((self.req_cons - self.rsp_prod_pvt) & MASK32)
        return req if req < rsp else rsp

    def next_response_offset(self) -> int:
        return self.offset(self.rsp_prod_pvt)

    def commit_response(self) -> None:
        self.rsp_prod_pvt = (self.rsp_prod_pvt + 1) & MASK32

    def push_responses_and_check_notify(self) -> bool:
        """RING_PUSH_RESPONSES_AND_CHECK_NOTIFY."""
        idx = self._idx
        old = idx[_RSP_PROD]
        new = self.rsp_prod_pvt
        idx[_RSP_PROD] = new
        return ((new - idx[_RSP_EVENT]) & MASK32) < ((new - old) & MASK32)

    def final_check_for_requests(self) -> bool:
        """RING_FINAL_CHECK_FOR_REQUESTS: re-arm req_event, then look again."""
        if self.unconsumed_requests():
            return True
        self._idx[_REQ_EVENT] = (self.req_cons + 1) & MASK32
        return self.unconsumed_requests() != 0
