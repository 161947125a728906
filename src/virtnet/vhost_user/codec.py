"""vhost-user message codec (sans-I/O): header, per-request bodies, replies.

Reference: QEMU ``docs/interop/vhost-user.rst`` ("Message Specification",
"Front-end message types", "Protocol features").  All numbers are in the
machine's native byte order (the spec says so); we use ``=`` (native order,
standard sizes, no padding) with every :class:`struct.Struct`.

Invariants:

* :func:`parse_message` and :class:`MessageReader` either return a fully
  validated :class:`Message` or raise :class:`~virtnet.errors.ProtocolError`.
  Validation covers: header version and flag bits, known request number,
  ``size <= MAX_PAYLOAD_SIZE`` (checked as soon as the header is complete,
  before any payload is buffered), the exact body size for the request, the
  exact number of file descriptors the request carries, ring indexes below
  ``max_rings``, region counts ``1..MAX_MEM_REGIONS`` and 64-bit overflow of
  every region's guest, user and mmap ranges, and pairwise disjoint regions.
* File descriptors received with the bytes are owned by the reader until it
  hands them out inside a :class:`Message`; from then on the consumer owns
  them.  When parsing fails, the reader closes the failing message's fds
  itself before raising, and :meth:`MessageReader.close` closes every fd it
  still holds.  No fd is ever leaked or closed twice by this module.
* fd attribution rule (see :class:`MessageReader`): the fds of one ``feed``
  call belong to the message that contains the last byte fed in that call.
  Linux ``AF_UNIX`` stream ``recvmsg`` returns fds with the read that
  consumes the first byte of the sender's ``sendmsg`` and stops there, so a
  socket loop that reads at most :attr:`MessageReader.wanted` bytes at a
  time (one message, header first, as libvhost-user and rust-vmm do) gets
  exact attribution even from a sender that packs several messages into one
  ``sendmsg``.
* Nothing here touches sockets, fds (other than closing rejected ones) or
  time.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import os
import struct
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NoReturn, TypeAlias

from virtnet.errors import ProtocolError

__all__ = [
    "FLAG_NEED_REPLY",
    "FLAG_REPLY",
    "HEADER",
    "HEADER_SIZE",
    "MAX_FDS_PER_MESSAGE",
    "MAX_MEM_REGIONS",
    "MAX_PAYLOAD_SIZE",
    "MAX_RINGS",
    "U64",
    "VERSION",
    "VRING_NOFD_MASK",
    "Body",
    "Empty",
    "LogBase",
    "MemRegion",
    "MemTable",
    "Message",
    "MessageReader",
    "ProtocolFeature",
    "Raw",
    "Request",
    "SingleRegion",
    "VringAddr",
    "VringFd",
    "VringState",
    "encode_body",
    "encode_message",
    "encode_reply",
    "encode_request",
    "parse_body",
    "parse_header",
    "parse_message",
]

# ---------------------------------------------------------------------------
# Limits and constants (vhost-user.rst unless noted)
# ---------------------------------------------------------------------------

#: "Lower 2 bits are the version (currently 0x01)" (Message Specification / Header).
VERSION = 0x1
VERSION_MASK = 0x3
#: "Bit 2 is the reply flag".
FLAG_REPLY = 0x4
#: "Bit 3 is the need_reply flag" (REPLY_ACK section).
FLAG_NEED_REPLY = 0x8
#: Every other flag bit is undefined; we reject them.
VALID_FLAGS = VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY

#: Header: request u32, flags u32, size u32.
HEADER = struct.Struct("=III")
HEADER_SIZE = HEADER.size

#: The largest payload we accept.  The spec sets no number; rust-vmm's
#: ``vhost`` crate (``MAX_MSG_SIZE``) and libvhost-user both cap messages at
#: one 4 KiB page, far above our largest body (a full SET_MEM_TABLE: 264 B).
MAX_PAYLOAD_SIZE = 0x1000

#: "Memory regions description": region0 ... region7 -- a SET_MEM_TABLE
#: carries at most 8 regions (QEMU's VHOST_MEMORY_BASELINE_NREGIONS), each
#: with one fd.
MAX_MEM_REGIONS = 8

#: The most fds one message may carry: SET_MEM_TABLE's one fd per region.
MAX_FDS_PER_MESSAGE = MAX_MEM_REGIONS

#: SET_VRING_KICK/CALL/ERR: "Bits (0-7) of the payload contain the vring
#: index. Bit 8 is the invalid FD flag."  Ring indexes are therefore < 256.
VRING_INDEX_MASK = 0xFF
VRING_NOFD_MASK = 0x100
MAX_RINGS = VRING_INDEX_MASK + 1

#: A fed-but-unparsed backlog bigger than this is an abusive peer
#: (a complete message is at most HEADER_SIZE + MAX_PAYLOAD_SIZE bytes; the
#: reader never holds more than a few messages at once).
MAX_BUFFERED_BYTES = 64 * (HEADER_SIZE + MAX_PAYLOAD_SIZE)
#: Cap on fds held by a reader that have not been handed out yet.
MAX_PENDING_FDS = 4 * MAX_FDS_PER_MESSAGE

_U64 = struct.Struct("=Q")
_STATE = struct.Struct("=II")  # vring state description: index, num
_ADDR = struct.Struct("=IIQQQQ")  # index, flags, desc, used, avail, log
_MEM_HDR = struct.Struct("=II")  # num regions, padding
_REGION = struct.Struct("=QQQQ")  # guest addr, size, user addr, mmap offset
_SINGLE_PAD = struct.Struct("=Q")  # "Single memory region description": padding u64
_LOG = struct.Struct("=QQ")  # log size, log offset
_U64_MAX = (1 << 64) - 1

#: VhostUserVringAddr flags: VHOST_VRING_F_LOG (bit 0) is the only one defined.
VRING_ADDR_F_LOG = 0x1


class Request(enum.IntEnum):
    """Front-end message types ("Front-end message types", ``:id:``)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class ProtocolFeature(enum.IntEnum):
    """Protocol feature *bit numbers* ("Protocol features")."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    NET_MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    XEN_MMAP = 17
    SHARED_OBJECT = 18
    DEVICE_STATE = 19
    #: The spec's code block spells bit 4 ``VHOST_USER_PROTOCOL_F_MTU``.
    MTU = 4

    @property
    def mask(self) -> int:
        return 1 << self.value


#: "#define VHOST_USER_F_PROTOCOL_FEATURES 30" (virtio feature bit).
F_PROTOCOL_FEATURES = 30


# ---------------------------------------------------------------------------
# Bodies
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Empty:
    """No payload."""


@dataclass(frozen=True, slots=True)
class U64:
    """ "A single 64-bit integer"."""

    value: int


@dataclass(frozen=True, slots=True)
class VringState:
    """ "A vring state description": index u32, num u32."""

    index: int
    num: int


@dataclass(frozen=True, slots=True)
class VringAddr:
    """ "A vring address description" (user addresses unless IOMMU_PLATFORM)."""

    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int


@dataclass(frozen=True, slots=True)
class VringFd:
    """SET_VRING_KICK/CALL/ERR: the u64 split into ring index and NOFD flag."""

    index: int
    nofd: bool


@dataclass(frozen=True, slots=True)
class MemRegion:
    """One region: guest address, size, user address, mmap offset."""

    guest_addr: int
    size: int
    user_addr: int
    mmap_offset: int


@dataclass(frozen=True, slots=True)
class MemTable:
    """ "Memory regions description" (SET_MEM_TABLE)."""

    regions: tuple[MemRegion, ...]


@dataclass(frozen=True, slots=True)
class SingleRegion:
    """ "Single memory region description" (ADD_MEM_REG / REM_MEM_REG)."""

    region: MemRegion


@dataclass(frozen=True, slots=True)
class LogBase:
    """ "Log description": log size, log offset (SET_LOG_BASE)."""

    size: int
    offset: int


@dataclass(frozen=True, slots=True)
class Raw:
    """A body this codec keeps as bytes (requests the backend does not implement)."""

    data: bytes


Body: TypeAlias = (
    Empty | U64 | VringState | VringAddr | VringFd | MemTable | SingleRegion | LogBase | Raw
)


@dataclass(frozen=True, slots=True)
class Message:
    """One parsed vhost-user message; owns ``fds`` until the consumer closes them."""

    request: Request
    flags: int
    body: Body
    fds: tuple[int, ...] = ()

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)

    def close_fds(self) -> None:
        """Close every fd this message carries (for a consumer that keeps none)."""
        close_fds(self.fds)


def close_fds(fds: Iterable[int]) -> None:
    """Close each fd, ignoring ones already gone."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


# ---------------------------------------------------------------------------
# Per-request layout: (body kind, fd rule)
# ---------------------------------------------------------------------------


class _Kind(enum.Enum):
    EMPTY = "empty"
    U64 = "u64"
    STATE = "state"
    ADDR = "addr"
    VRING_FD = "vring_fd"
    MEM_TABLE = "mem_table"
    SINGLE_REGION = "single_region"
    LOG = "log"
    RAW = "raw"  # variable or unimplemented layouts: bounded by MAX_PAYLOAD_SIZE only


class _Fds(enum.Enum):
    NONE = 0  # exactly zero
    ONE = 1  # exactly one
    ZERO_OR_ONE = 2  # REM_MEM_REG ("MAY accept messages with one file descriptor")
    PER_REGION = 3  # SET_MEM_TABLE: one per region
    NOFD_FLAG = 4  # KICK/CALL/ERR: one unless bit 8 of the u64 is set


_R = Request
_LAYOUT: dict[Request, tuple[_Kind, _Fds]] = {
    _R.GET_FEATURES: (_Kind.EMPTY, _Fds.NONE),
    _R.SET_FEATURES: (_Kind.U64, _Fds.NONE),
    _R.SET_OWNER: (_Kind.EMPTY, _Fds.NONE),
    _R.RESET_OWNER: (_Kind.EMPTY, _Fds.NONE),
    _R.SET_MEM_TABLE: (_Kind.MEM_TABLE, _Fds.PER_REGION),
    _R.SET_LOG_BASE: (_Kind.LOG, _Fds.ZERO_OR_ONE),
    _R.SET_LOG_FD: (_Kind.EMPTY, _Fds.ONE),
    _R.SET_VRING_NUM: (_Kind.STATE, _Fds.NONE),
    _R.SET_VRING_ADDR: (_Kind.ADDR, _Fds.NONE),
    _R.SET_VRING_BASE: (_Kind.STATE, _Fds.NONE),
    _R.GET_VRING_BASE: (_Kind.STATE, _Fds.NONE),
    _R.SET_VRING_KICK: (_Kind.VRING_FD, _Fds.NOFD_FLAG),
    _R.SET_VRING_CALL: (_Kind.VRING_FD, _Fds.NOFD_FLAG),
    _R.SET_VRING_ERR: (_Kind.VRING_FD, _Fds.NOFD_FLAG),
    _R.GET_PROTOCOL_FEATURES: (_Kind.EMPTY, _Fds.NONE),
    _R.SET_PROTOCOL_FEATURES: (_Kind.U64, _Fds.NONE),
    _R.GET_QUEUE_NUM: (_Kind.EMPTY, _Fds.NONE),
    _R.SET_VRING_ENABLE: (_Kind.STATE, _Fds.NONE),
    _R.SEND_RARP: (_Kind.U64, _Fds.NONE),
    _R.NET_SET_MTU: (_Kind.U64, _Fds.NONE),
    _R.SET_BACKEND_REQ_FD: (_Kind.EMPTY, _Fds.ONE),
    _R.IOTLB_MSG: (_Kind.RAW, _Fds.NONE),
    _R.SET_VRING_ENDIAN: (_Kind.STATE, _Fds.NONE),
    _R.GET_CONFIG: (_Kind.RAW, _Fds.NONE),
    _R.SET_CONFIG: (_Kind.RAW, _Fds.NONE),
    _R.CREATE_CRYPTO_SESSION: (_Kind.RAW, _Fds.NONE),
    _R.CLOSE_CRYPTO_SESSION: (_Kind.U64, _Fds.NONE),
    _R.POSTCOPY_ADVISE: (_Kind.EMPTY, _Fds.NONE),
    _R.POSTCOPY_LISTEN: (_Kind.EMPTY, _Fds.NONE),
    _R.POSTCOPY_END: (_Kind.EMPTY, _Fds.NONE),
    _R.GET_INFLIGHT_FD: (_Kind.RAW, _Fds.NONE),
    _R.SET_INFLIGHT_FD: (_Kind.RAW, _Fds.ONE),
    _R.GPU_SET_SOCKET: (_Kind.EMPTY, _Fds.ONE),
    _R.RESET_DEVICE: (_Kind.EMPTY, _Fds.NONE),
    _R.VRING_KICK: (_Kind.STATE, _Fds.NONE),
    _R.GET_MAX_MEM_SLOTS: (_Kind.EMPTY, _Fds.NONE),
    _R.ADD_MEM_REG: (_Kind.SINGLE_REGION, _Fds.ONE),
    _R.REM_MEM_REG: (_Kind.SINGLE_REGION, _Fds.ZERO_OR_ONE),
    _R.SET_STATUS: (_Kind.U64, _Fds.NONE),
    _R.GET_STATUS: (_Kind.EMPTY, _Fds.NONE),
    _R.GET_SHARED_OBJECT: (_Kind.RAW, _Fds.NONE),
    _R.SET_DEVICE_STATE_FD: (_Kind.RAW, _Fds.ONE),
    _R.CHECK_DEVICE_STATE: (_Kind.EMPTY, _Fds.NONE),
}
assert set(_LAYOUT) == set(Request)

#: Requests whose VringState.index names a ring (SET_VRING_ENDIAN included).
_STATE_INDEXED = frozenset(
    {
        _R.SET_VRING_NUM,
        _R.SET_VRING_BASE,
        _R.GET_VRING_BASE,
        _R.SET_VRING_ENABLE,
        _R.SET_VRING_ENDIAN,
        _R.VRING_KICK,
    }
)


def parse_header(
    data: bytes | bytearray | memoryview, *, replies: bool = False
) -> tuple[Request, int, int]:
    """Decode and check a 12-byte header; return ``(request, flags, size)``.

    ``replies=False`` (a backend reading requests) rejects the REPLY flag;
    ``replies=True`` (a frontend reading replies) requires it.
    """
    if len(data) != HEADER_SIZE:
        raise ProtocolError(f"vhost-user header is {HEADER_SIZE} bytes, got {len(data)}")
    req, flags, size = HEADER.unpack(data)
    try:
        request = Request(req)
    except ValueError:
        raise ProtocolError(f"unknown vhost-user request {req}") from None
    if flags & VERSION_MASK != VERSION:
        raise ProtocolError(f"{request.name}: unsupported version {flags & VERSION_MASK}")
    if flags & ~VALID_FLAGS:
        raise ProtocolError(f"{request.name}: undefined flag bits 0x{flags & ~VALID_FLAGS:x}")
    if bool(flags & FLAG_REPLY) != replies:
        what = "missing" if replies else "unexpected"
        raise ProtocolError(f"{request.name}: {what} REPLY flag")
    if size > MAX_PAYLOAD_SIZE:
        raise ProtocolError(f"{request.name}: payload size {size} exceeds {MAX_PAYLOAD_SIZE}")
    return request, flags, size


def _check_size(request: Request, data: bytes, expected: int) -> None:
    if len(data) != expected:
        raise ProtocolError(f"{request.name}: payload is {len(data)} bytes, expected {expected}")


def _check_ring(request: Request, index: int, max_rings: int) -> None:
    if index >= max_rings:
        raise ProtocolError(f"{request.name}: ring index {index} >= {max_rings} rings")


def _region(request: Request, raw: tuple[int, int, int, int]) -> MemRegion:
    gpa, size, uva, off = raw
    if size == 0:
        raise ProtocolError(f"{request.name}: memory region of size 0")
    for name, base in (("guest", gpa), ("user", uva), ("mmap offset", off)):
        if base + size - 1 > _U64_MAX:
            raise ProtocolError(
                f"{request.name}: region {name} range 0x{base:x}+0x{size:x} overflows 64 bits"
            )
    return MemRegion(gpa, size, uva, off)


def _check_disjoint(request: Request, regions: Sequence[MemRegion]) -> None:
    for key in ("guest_addr", "user_addr"):
        spans = sorted((getattr(r, key), r.size) for r in regions)
        for (a, alen), (b, _) in itertools.pairwise(spans):
            if a + alen > b:
                raise ProtocolError(f"{request.name}: regions overlap at {key} 0x{b:x}")


def parse_body(
    request: Request,
    data: bytes,
    nfds: int,
    *,
    max_rings: int = MAX_RINGS,
    reply: bool = False,
) -> Body:
    """Decode and validate one request's payload, given how many fds came with it.

    With ``reply=True`` the payload is a reply's: a u64 for every reply except
    GET_VRING_BASE (a vring state); other sizes are kept :class:`Raw`.
    """
    if reply:
        if nfds:
            raise ProtocolError(f"{request.name}: reply with {nfds} fds")
        if request is _R.GET_VRING_BASE and len(data) == _STATE.size:
            return VringState(*_STATE.unpack(data))
        if len(data) == _U64.size:
            return U64(_U64.unpack(data)[0])
        return Raw(bytes(data))
    kind, fd_rule = _LAYOUT[request]
    body: Body
    expected_fds: tuple[int, ...]
    if kind is _Kind.EMPTY:
        _check_size(request, data, 0)
        body = Empty()
    elif kind is _Kind.U64:
        _check_size(request, data, _U64.size)
        body = U64(_U64.unpack(data)[0])
    elif kind is _Kind.STATE:
        _check_size(request, data, _STATE.size)
        state = VringState(*_STATE.unpack(data))
        if request in _STATE_INDEXED:
            _check_ring(request, state.index, max_rings)
        body = state
    elif kind is _Kind.ADDR:
        _check_size(request, data, _ADDR.size)
        addr = VringAddr(*_ADDR.unpack(data))
        _check_ring(request, addr.index, max_rings)
        if addr.flags & ~VRING_ADDR_F_LOG:
            raise ProtocolError(f"{request.name}: undefined vring flags 0x{addr.flags:x}")
        body = addr
    elif kind is _Kind.VRING_FD:
        _check_size(request, data, _U64.size)
        value = _U64.unpack(data)[0]
        if value & ~(VRING_INDEX_MASK | VRING_NOFD_MASK):
            raise ProtocolError(f"{request.name}: undefined bits in 0x{value:x}")
        vfd = VringFd(value & VRING_INDEX_MASK, bool(value & VRING_NOFD_MASK))
        _check_ring(request, vfd.index, max_rings)
        body = vfd
    elif kind is _Kind.MEM_TABLE:
        if len(data) < _MEM_HDR.size:
            raise ProtocolError(f"{request.name}: payload of {len(data)} bytes is too short")
        count, _pad = _MEM_HDR.unpack_from(data)
        if not 1 <= count <= MAX_MEM_REGIONS:
            raise ProtocolError(f"{request.name}: {count} regions, expected 1..{MAX_MEM_REGIONS}")
        _check_size(request, data, _MEM_HDR.size + count * _REGION.size)
        regions = tuple(
            _region(request, _REGION.unpack_from(data, _MEM_HDR.size + i * _REGION.size))
            for i in range(count)
        )
        _check_disjoint(request, regions)
        body = MemTable(regions)
    elif kind is _Kind.SINGLE_REGION:
        _check_size(request, data, _SINGLE_PAD.size + _REGION.size)
        body = SingleRegion(_region(request, _REGION.unpack_from(data, _SINGLE_PAD.size)))
    elif kind is _Kind.LOG:
        _check_size(request, data, _LOG.size)
        body = LogBase(*_LOG.unpack(data))
    else:
        body = Raw(bytes(data))

    if fd_rule is _Fds.NONE:
        expected_fds = (0,)
    elif fd_rule is _Fds.ONE:
        expected_fds = (1,)
    elif fd_rule is _Fds.ZERO_OR_ONE:
        expected_fds = (0, 1)
    elif fd_rule is _Fds.PER_REGION:
        assert isinstance(body, MemTable)
        expected_fds = (len(body.regions),)
    else:
        assert isinstance(body, VringFd)
        expected_fds = (0,) if body.nofd else (1,)
    if nfds not in expected_fds:
        want = " or ".join(str(n) for n in expected_fds)
        raise ProtocolError(f"{request.name}: carries {nfds} fds, expected {want}")
    return body


def parse_message(
    data: bytes | bytearray | memoryview,
    fds: Sequence[int] = (),
    *,
    max_rings: int = MAX_RINGS,
    replies: bool = False,
) -> Message:
    """Parse exactly one whole message (header + payload).  Does not close ``fds``."""
    data = bytes(data)
    if len(data) < HEADER_SIZE:
        raise ProtocolError(f"message of {len(data)} bytes is shorter than a header")
    request, flags, size = parse_header(data[:HEADER_SIZE], replies=replies)
    if len(data) != HEADER_SIZE + size:
        raise ProtocolError(
            f"{request.name}: header says {size} payload bytes, got {len(data) - HEADER_SIZE}"
        )
    if len(fds) > MAX_FDS_PER_MESSAGE:
        raise ProtocolError(f"{request.name}: {len(fds)} fds exceed {MAX_FDS_PER_MESSAGE}")
    body = parse_body(request, data[HEADER_SIZE:], len(fds), max_rings=max_rings, reply=replies)
    return Message(request, flags, body, tuple(fds))


# ---------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------


def encode_body(body: Body) -> bytes:
    """The payload bytes of ``body``."""
    if isinstance(body, Empty):
        return b""
    if isinstance(body, U64):
        return _U64.pack(body.value)
    if isinstance(body, VringState):
        return _STATE.pack(body.index, body.num)
    if isinstance(body, VringAddr):
        return _ADDR.pack(body.index, body.flags, body.desc, body.used, body.avail, body.log)
    if isinstance(body, VringFd):
        return _U64.pack(body.index | (VRING_NOFD_MASK if body.nofd else 0))
    if isinstance(body, MemTable):
        parts = [_MEM_HDR.pack(len(body.regions), 0)]
        parts += [
            _REGION.pack(r.guest_addr, r.size, r.user_addr, r.mmap_offset) for r in body.regions
        ]
        return b"".join(parts)
    if isinstance(body, SingleRegion):
        r = body.region
        return _SINGLE_PAD.pack(0) + _REGION.pack(r.guest_addr, r.size, r.user_addr, r.mmap_offset)
    if isinstance(body, LogBase):
        return _LOG.pack(body.size, body.offset)
    return body.data


def encode_message(request: int, flags: int, payload: bytes) -> bytes:
    """Header + payload, no validation (tests use it to build hostile input)."""
    return HEADER.pack(request, flags, len(payload)) + payload


def encode_request(request: Request, body: Body = Empty(), *, need_reply: bool = False) -> bytes:
    """A front-end request (used by tests, the fuzz seeds and the frontend)."""
    flags = VERSION | (FLAG_NEED_REPLY if need_reply else 0)
    return encode_message(request, flags, encode_body(body))


def encode_reply(request: Request, body: Body) -> bytes:
    """A back-end reply: same request number, version 1 and the REPLY flag."""
    return encode_message(request, VERSION | FLAG_REPLY, encode_body(body))


# ---------------------------------------------------------------------------
# Incremental reader
# ---------------------------------------------------------------------------


class MessageReader:
    """Assemble messages from a byte stream and its fds, fed in any pieces.

    ``feed(data, fds)`` accepts whatever one ``recvmsg`` returned (even one
    byte at a time); ``next_message()`` returns the next complete, validated
    :class:`Message` or ``None`` if more bytes are needed.  Iterating the reader
    yields every complete message.

    The fds of one ``feed`` call belong to the message that contains the
    call's last byte (a call with no bytes: to the next byte fed).  After a
    :class:`ProtocolError` the reader is dead: every later call raises, and the
    owner should drop the connection and call :meth:`close`.
    """

    __slots__ = ("_buf", "_consumed", "_dead", "_fd_marks", "_fed", "_max_rings", "_replies")

    def __init__(self, *, max_rings: int = MAX_RINGS, replies: bool = False) -> None:
        self._buf = bytearray()
        self._fed = 0  # stream offset one past the last byte fed
        self._consumed = 0  # stream offset of self._buf[0]
        # (stream offset of the owning byte, fds) in feed order
        self._fd_marks: deque[tuple[int, list[int]]] = deque()
        self._max_rings = max_rings
        self._replies = replies
        self._dead: str | None = None

    @property
    def buffered(self) -> int:
        """Bytes fed but not yet returned as messages."""
        return len(self._buf)

    @property
    def wanted(self) -> int:
        """Bytes still missing from the message in progress (its header first).

        A socket loop that never reads more than this keeps every ``recvmsg``
        inside one message, which makes fd attribution exact: Linux returns
        ``SCM_RIGHTS`` fds with the read that consumes the first byte of the
        sender's ``sendmsg``, and ends that read right there.
        """
        have = len(self._buf)
        if have < HEADER_SIZE:
            return HEADER_SIZE - have
        size: int = HEADER.unpack_from(self._buf)[2]
        if size > MAX_PAYLOAD_SIZE:
            return 1  # next_message() will reject the header
        return max(1, HEADER_SIZE + size - have)

    @property
    def pending_fds(self) -> int:
        return sum(len(f) for _, f in self._fd_marks)

    def feed(self, data: bytes | bytearray | memoryview, fds: Sequence[int] = ()) -> None:
        """Take bytes and the fds received with them (ownership passes to the reader)."""
        if self._dead is not None:
            close_fds(fds)
            raise ProtocolError(f"reader already failed: {self._dead}")
        self._buf += data
        self._fed += len(data)
        if fds:
            owner = self._fed - 1 if len(data) else self._fed
            self._fd_marks.append((owner, list(fds)))
        if len(self._buf) > MAX_BUFFERED_BYTES:
            self._fail(f"more than {MAX_BUFFERED_BYTES} unparsed bytes buffered")
        if self.pending_fds > MAX_PENDING_FDS:
            self._fail(f"more than {MAX_PENDING_FDS} unclaimed fds")

    def _fail(self, why: str) -> NoReturn:
        self._dead = why
        self.close()
        raise ProtocolError(why)

    def next_message(self) -> Message | None:
        """The next complete message, or ``None``."""
        if self._dead is not None:
            raise ProtocolError(f"reader already failed: {self._dead}")
        if len(self._buf) < HEADER_SIZE:
            return None
        try:
            request, flags, size = parse_header(self._buf[:HEADER_SIZE], replies=self._replies)
        except ProtocolError as exc:
            self._fail(str(exc))
        total = HEADER_SIZE + size
        if len(self._buf) < total:
            return None
        end = self._consumed + total
        fds: list[int] = []
        while self._fd_marks and self._fd_marks[0][0] < end:
            fds += self._fd_marks.popleft()[1]
        payload = bytes(self._buf[HEADER_SIZE:total])
        del self._buf[:total]
        self._consumed = end
        if len(fds) > MAX_FDS_PER_MESSAGE:
            close_fds(fds)
            self._fail(f"{request.name}: {len(fds)} fds exceed {MAX_FDS_PER_MESSAGE}")
        try:
            body = parse_body(
                request, payload, len(fds), max_rings=self._max_rings, reply=self._replies
            )
        except ProtocolError as exc:
            close_fds(fds)
            self._fail(str(exc))
        return Message(request, flags, body, tuple(fds))

    def __iter__(self) -> MessageReader:
        return self

    def __next__(self) -> Message:
        msg = self.next_message()
        if msg is None:
            raise StopIteration
        return msg

    def close(self) -> None:
        """Close every fd the reader still owns and drop buffered bytes."""
        while self._fd_marks:
            close_fds(self._fd_marks.popleft()[1])
        self._buf.clear()
