"""XenStore wire protocol codec (sans-I/O), byte-exact to ``xen/include/public/io/xs_wire.h``.

A message is a 16-byte ``struct xsd_sockmsg`` header -- ``type``, ``req_id``,
``tx_id``, ``len``, each a little-endian ``uint32_t`` -- followed by ``len``
bytes of payload, usually NUL-terminated strings.

Invariants:

* :class:`Decoder` never buffers more than one header plus
  :data:`XENSTORE_PAYLOAD_MAX` bytes of payload; a header announcing a longer
  payload raises :class:`~virtnet.errors.XenStoreError` (the stream cannot be
  resynchronised, so the caller drops the peer).
* :func:`encode` refuses to build a message whose payload exceeds
  :data:`XENSTORE_PAYLOAD_MAX`; it is the local caller's bug, so it raises
  ``ValueError``.
* Payload helpers (:func:`split_args`) raise ``XenStoreError`` for a missing NUL
  terminator or a wrong argument count; they never index out of range.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from virtnet.errors import XenStoreError

__all__ = [
    "HEADER",
    "HEADER_SIZE",
    "XENSTORE_ABS_PATH_MAX",
    "XENSTORE_PAYLOAD_MAX",
    "XENSTORE_REL_PATH_MAX",
    "XSD_ERRORS",
    "Decoder",
    "Message",
    "Op",
    "encode",
    "join_args",
    "split_args",
]

#: ``struct xsd_sockmsg``: type, req_id, tx_id, len (xs_wire.h), native = little endian on x86.
HEADER = struct.Struct("<IIII")
HEADER_SIZE = HEADER.size  # 16

#: xs_wire.h: "Violating this is very bad.  See docs/misc/xenstore.txt."
XENSTORE_PAYLOAD_MAX = 4096
#: xs_wire.h: "Violating these just gets you an error back".
XENSTORE_ABS_PATH_MAX = 3072
XENSTORE_REL_PATH_MAX = 2048


class Op(enum.IntEnum):
    """``enum xsd_sockmsg_type`` (xs_wire.h)."""

    CONTROL = 0  # also XS_DEBUG
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    # 20 was XS_RESTRICT, removed.
    RESET_WATCHES = 21  # XS_SET_TARGET + 2
    DIRECTORY_PART = 22


#: XS_TYPE_COUNT (xs_wire.h): types at or above this are invalid.
XS_TYPE_COUNT = 23

#: ``xsd_errors[]`` (xs_wire.h): errors travel as their symbolic names.
XSD_ERRORS: tuple[str, ...] = (
    "EINVAL",
    "EACCES",
    "EEXIST",
    "EISDIR",
    "ENOENT",
    "ENOMEM",
    "ENOSPC",
    "EIO",
    "ENOTEMPTY",
    "ENOSYS",
    "EROFS",
    "EBUSY",
    "EAGAIN",
    "EISCONN",
    "E2BIG",
    "EPERM",
)

OK = b"OK\x00"


@dataclass(frozen=True, slots=True)
class Message:
    """One decoded ``xsd_sockmsg`` with its payload.

    ``type`` is kept as a plain int so that an unknown type can still be
    answered with an error (``Op(type)`` is the caller's business).
    """

    type: int
    req_id: int
    tx_id: int
    payload: bytes


def encode(op: int, req_id: int, tx_id: int, payload: bytes) -> bytes:
    """Build one wire message; ``ValueError`` if the payload is too long."""
    if len(payload) > XENSTORE_PAYLOAD_MAX:
        raise ValueError(f"payload of {len(payload)} bytes exceeds XENSTORE_PAYLOAD_MAX")
    return HEADER.pack(op, req_id & 0xFFFFFFFF, tx_id & 0xFFFFFFFF, len(payload)) + payload


class Decoder:
    """Incremental decoder: feed bytes, get whole messages.

    Input may arrive whole or byte by byte; the result is the same.
    """

    __slots__ = ("_buf", "error")

    def __init__(self) -> None:
        self._buf = bytearray()
        #: Set once a header announced an oversized payload; the stream is dead.
        self.error: XenStoreError | None = None

    def feed(self, data: bytes) -> list[Message]:
        """Append ``data``; return every complete message.

        An oversized header sets :attr:`error`: the messages before it are still
        returned, and ``XenStoreError`` is raised at once if there are none, or
        by the next call otherwise.
        """
        if self.error is not None:
            raise self.error
        buf = self._buf
        buf += data
        out: list[Message] = []
        pos = 0
        while len(buf) - pos >= HEADER_SIZE:
            typ, req_id, tx_id, length = HEADER.unpack_from(buf, pos)
            if length > XENSTORE_PAYLOAD_MAX:
                del buf[:]
                self.error = XenStoreError(
                    f"message payload length {length} exceeds XENSTORE_PAYLOAD_MAX"
                )
                if not out:
                    raise self.error
                return out
            end = pos + HEADER_SIZE + length
            if len(buf) < end:
                break
            out.append(Message(typ, req_id, tx_id, bytes(buf[pos + HEADER_SIZE : end])))
            pos = end
        if pos:
            del buf[:pos]
        return out

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete message (never above header + payload max)."""
        return len(self._buf)


def split_args(payload: bytes, count: int, *, last_raw: bool = False) -> list[bytes]:
    """Split ``payload`` into exactly ``count`` NUL-terminated arguments.

    With ``last_raw`` the final argument is everything after the first
    ``count - 1`` terminators and need not end with NUL (``XS_WRITE`` values).
    ``XenStoreError`` on a missing terminator or a wrong count.
    """
    if last_raw:
        parts = payload.split(b"\x00", count - 1)
        if len(parts) != count:
            raise XenStoreError("too few NUL-terminated arguments")
        return parts
    if not payload.endswith(b"\x00"):
        raise XenStoreError("argument not NUL-terminated")
    parts = payload[:-1].split(b"\x00")
    if len(parts) != count:
        raise XenStoreError(f"expected {count} arguments, got {len(parts)}")
    return parts


def split_list(payload: bytes) -> list[bytes]:
    """Split a payload of one or more NUL-terminated strings (``XS_SET_PERMS``)."""
    if not payload.endswith(b"\x00"):
        raise XenStoreError("argument not NUL-terminated")
    return payload[:-1].split(b"\x00")


def join_args(*args: bytes) -> bytes:
    """Each argument NUL-terminated, concatenated."""
    return b"".join(a + b"\x00" for a in args)
