"""Port and queue contracts shared by every host-side backend.

A *port* is where a VM's frames leave and enter the host side.  A *queue* is
one (VM, queue pair)'s view of a port; a worker process that serves that pair
holds exactly one :class:`PortQueue`.

Invariants:

* One ``send`` call transmits exactly one frame; one ``recv_into`` call
  receives at most one frame.  Every frame on the wire of a queue is preceded
  by a :data:`VNET_HDR_LEN`-byte ``virtio_net_hdr_v1`` (virtio 1.3 section
  5.1.6: flags u8, gso_type u8, hdr_len, gso_size, csum_start, csum_offset,
  num_buffers u16, little-endian).
* A queue never blocks its worker and never raises for a full or gone host
  side: ``send`` returns ``False`` and counts ``tx_dropped``; ``recv_into``
  returns 0 when nothing is ready, and counts ``rx_dropped`` (and returns 0)
  for a frame it had to discard (truncated, kernel refused it).
* Byte counters exclude the vnet header.  Packet counters count frames that
  were accepted (tx) or delivered into the caller's buffers (rx).
* Queue fds are created by the supervisor (``Port.open_queue``) and are
  nonblocking, close-on-exec and free of any process-local state, so the
  fd may be inherited across ``fork`` or sent with ``SCM_RIGHTS``; the worker
  rebuilds its queue with :func:`attach_queue`.
* Only an ``OSError`` that is not a transient/peer condition (``EBADF``,
  ``ENOTSOCK``: a bug, the fd was closed under us) escapes the per-packet paths.

How a worker uses a queue (supervisor: ``q = port.open_queue(vm, pair)``, hand
``q.fileno()`` to the worker by fork or ``SCM_RIGHTS``, then ``q.close()``)::

    q = attach_queue(kind, fd)            # in the worker; owns fd
    # tx: one guest tx chain = one frame; chain.out starts with the 12-byte header
    if not q.send(chain.out): ...         # dropped and counted; never blocks
    # rx: pop enough rx chains for MAX_FRAME_LEN (mergeable buffers) and
    n = q.recv_into(bufs)                 # 0 = nothing ready (or a counted drop)
    # patch num_buffers in the header the guest sees, push used, notify once
    # readiness: epoll q.fileno() for EPOLLIN; None (loopback, null) = poll
    # recv_into after each tx batch.  SocketQueue.peer_closed = switch gone.
"""

from __future__ import annotations

import enum
import errno
import os
import socket
import stat
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from virtnet.errors import UsageError

__all__ = [
    "MAX_FRAME_LEN",
    "VNET_HDR_LEN",
    "FdQueue",
    "Offload",
    "Port",
    "PortQueue",
    "QueueCounters",
    "SocketQueue",
    "attach_queue",
    "make_port",
]

# virtio 1.3 section 5.1.6: struct virtio_net_hdr with VIRTIO_F_VERSION_1 is
# 12 bytes (num_buffers always present).
VNET_HDR_LEN = 12
# Largest frame (without vnet header) any port passes: a 64 KiB GSO super-frame
# (virtio 1.3 section 5.1.6.2: gso up to 65535 bytes of IP payload) plus an
# Ethernet header with one 802.1Q tag.
MAX_FRAME_LEN = 65535 + 14 + 4

# errno values that mean "this frame could not go/come now": counted as drops.
_TRANSIENT_ERRNOS = frozenset(
    {
        errno.EAGAIN,
        errno.ENOBUFS,
        errno.ENOMEM,
        errno.EIO,  # tap interface down
        errno.EINVAL,  # kernel rejected a malformed vnet header / short buffer
        errno.EFAULT,  # tap: guest buffers too short for the frame
        errno.EMSGSIZE,
        errno.EPIPE,  # the other end (switch, worker) went away
        errno.ECONNRESET,
        errno.ECONNREFUSED,
        errno.ENOTCONN,
        errno.EBADFD,  # tap queue detached (TUNSETQUEUE) while the worker uses it
    }
)


class Offload(enum.Enum):
    """Offloads a port can carry between guest and host side."""

    CSUM = "csum"  # partial checksums (VIRTIO_NET_HDR_F_NEEDS_CSUM) pass through
    TSO4 = "tso4"  # GSO_TCPV4 super-frames
    TSO6 = "tso6"  # GSO_TCPV6 super-frames
    TSO_ECN = "tso_ecn"  # GSO with the ECN bit
    UFO = "ufo"  # GSO_UDP (fragmenting) super-frames
    USO = "uso"  # GSO_UDP_L4 (segmenting) super-frames


@runtime_checkable
class PortQueue(Protocol):
    """One (VM, queue pair)'s frame channel.  See the module invariants."""

    tx_packets: int
    tx_bytes: int
    tx_dropped: int
    rx_packets: int
    rx_bytes: int
    rx_dropped: int

    def fileno(self) -> int | None:
        """The fd to poll for rx readiness, or None (poll after each tx batch)."""
        ...

    def send(self, bufs: Sequence[memoryview]) -> bool:
        """Gather one frame (vnet header first) from ``bufs``; False = dropped."""
        ...

    def recv_into(self, bufs: Sequence[memoryview]) -> int:
        """Scatter one frame (vnet header first) into ``bufs``; bytes written or 0."""
        ...

    def close(self) -> None:
        """Release the queue's fd (idempotent)."""
        ...


class Port(Protocol):
    """A host-side backend; lives in the supervisor."""

    def open_queue(self, vm_id: str, pair: int) -> PortQueue:
        """Create the queue of ``(vm_id, pair)``; its fd goes to the worker."""
        ...

    def offloads(self) -> frozenset[Offload]:
        """Offloads this port can carry."""
        ...

    def close(self) -> None:
        """Release every resource of the port (idempotent)."""
        ...


class QueueCounters:
    """The six per-queue counters, as plain int attributes."""

    __slots__ = (
        "rx_bytes",
        "rx_dropped",
        "rx_packets",
        "tx_bytes",
        "tx_dropped",
        "tx_packets",
    )

    def __init__(self) -> None:
        self.tx_packets = 0
        self.tx_bytes = 0
        self.tx_dropped = 0
        self.rx_packets = 0
        self.rx_bytes = 0
        self.rx_dropped = 0

    def counters(self) -> dict[str, int]:
        """A snapshot of the counters."""
        return {name: getattr(self, name) for name in sorted(QueueCounters.__slots__)}


_MSG_TRUNC = int(socket.MSG_TRUNC)  # a plain int: IntFlag arithmetic is slow


def _fatal(exc: OSError) -> bool:
    return exc.errno not in _TRANSIENT_ERRNOS


class _WritevQueue(QueueCounters):
    """Transmit shared by the fd-backed queues: one ``writev`` = one frame.

    A full or failing fd is a counted drop (``send`` returns False); only
    errors that mean a bug (bad fd) escape.  Subclasses may react to a failed
    send in :meth:`_send_failed` (the error path only, never per packet).
    """

    __slots__ = ("_fd", "last_errno")

    _fd: int
    last_errno: int

    def send(self, bufs: Sequence[memoryview]) -> bool:
        try:
            n = os.writev(self._fd, bufs)
        except OSError as exc:
            if _fatal(exc):
                raise
            self.last_errno = exc.errno or 0
            self._send_failed(exc)
            self.tx_dropped += 1
            return False
        if n < VNET_HDR_LEN:  # no room for a header: the far side discards it
            self.tx_dropped += 1
            return False
        self.tx_packets += 1
        self.tx_bytes += n - VNET_HDR_LEN
        return True

    def _send_failed(self, exc: OSError) -> None:
        """Hook for a send that failed with a transient error (already counted)."""

    def _recv_failed(self, exc: OSError) -> int:
        """A receive that failed: re-raise a fatal error (a bug), else count a drop; 0."""
        if _fatal(exc):
            raise exc
        self.last_errno = exc.errno or 0
        self.rx_dropped += 1
        return 0


class FdQueue(_WritevQueue):
    """A queue over a nonblocking fd where one read/write = one frame (tap).

    ``recv_into`` uses ``os.readv`` with one extra scratch byte after the
    caller's buffers: the tap silently truncates a frame longer than the
    buffers, so a read that reaches the scratch byte is a truncated frame,
    dropped and counted (a frame that exactly fills the buffers is fine).
    """

    __slots__ = ("_scratch",)

    def __init__(self, fd: int) -> None:
        super().__init__()
        os.set_blocking(fd, False)
        os.set_inheritable(fd, False)
        self._fd = fd
        self._scratch = memoryview(bytearray(1))
        self.last_errno = 0

    def fileno(self) -> int | None:
        return self._fd

    def recv_into(self, bufs: Sequence[memoryview]) -> int:
        try:
            n = os.readv(self._fd, (*bufs, self._scratch))
        except BlockingIOError:
            return 0
        except OSError as exc:
            return self._recv_failed(exc)
        if n < VNET_HDR_LEN:
            if n:
                self.rx_dropped += 1
            return 0
        if n > bufs[0].nbytes:  # spans buffers: did it reach the scratch byte?
            room = 0
            for b in bufs:
                room += b.nbytes
            if n > room:
                self.rx_dropped += 1
                return 0
        self.rx_packets += 1
        self.rx_bytes += n - VNET_HDR_LEN
        return n

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def detach(self) -> int:
        """Give up ownership of the fd (e.g. after sending it to a worker)."""
        fd, self._fd = self._fd, -1
        return fd


class SocketQueue(_WritevQueue):
    """A queue over one end of a ``SOCK_SEQPACKET`` socketpair (switch).

    ``recv_into`` uses ``recvmsg_into`` so a record longer than the buffers is
    detected (``MSG_TRUNC``), dropped and counted instead of delivered cut.
    ``peer_closed`` becomes True once the other end is gone (read of 0).
    """

    __slots__ = ("_recvmsg_into", "_sock", "peer_closed")

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        sock.setblocking(False)
        self._sock = sock
        self._fd = sock.fileno()
        self._recvmsg_into = sock.recvmsg_into
        self.last_errno = 0
        self.peer_closed = False

    def fileno(self) -> int | None:
        return self._fd

    @property
    def sock(self) -> socket.socket:
        return self._sock

    def _send_failed(self, exc: OSError) -> None:
        if exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
            self.peer_closed = True

    def recv_into(self, bufs: Sequence[memoryview]) -> int:
        try:
            n, _anc, flags, _addr = self._recvmsg_into(bufs)
        except BlockingIOError:
            return 0
        except OSError as exc:
            return self._recv_failed(exc)
        if n < VNET_HDR_LEN or flags & _MSG_TRUNC:
            if n == 0 and not flags & _MSG_TRUNC:
                self.peer_closed = True
            else:
                self.rx_dropped += 1
            return 0
        self.rx_packets += 1
        self.rx_bytes += n - VNET_HDR_LEN
        return n

    def close(self) -> None:
        if self._fd >= 0:
            self._fd = -1
            self._sock.close()

    def detach(self) -> int:
        """Give up ownership of the fd (e.g. after sending it to a worker)."""
        self._fd = -1
        return self._sock.detach()


def attach_queue(kind: str, fd: int | None = None) -> PortQueue:
    """Rebuild a queue inside a worker from what the supervisor handed over.

    ``kind`` is the port kind (``tap``, ``switch``, ``loopback``, ``null``);
    ``fd`` is the queue fd (received via fork or ``SCM_RIGHTS``) for the
    fd-backed kinds and must be None for the others.  The queue owns ``fd``.
    """
    if kind in ("loopback", "null"):
        if fd is not None:
            raise UsageError(f"a {kind} queue takes no fd")
        if kind == "null":
            from virtnet.ports.null import NullQueue

            return NullQueue()
        from virtnet.ports.loopback import LoopbackQueue

        return LoopbackQueue()
    if kind not in ("tap", "switch"):
        raise UsageError(f"unknown port kind {kind!r} (expected tap, switch, loopback, null)")
    if fd is None or fd < 0:
        raise UsageError(f"a {kind} queue needs its fd")
    if stat.S_ISSOCK(os.fstat(fd).st_mode):
        return SocketQueue(socket.socket(fileno=fd))
    return FdQueue(fd)


def make_port(spec: str) -> Port:
    """Build a port from a user's spec.

    ``switch`` (VMs of this process joined by an L2 switch process),
    ``switch:uplink=IFNAME`` (the same, plus a tap to the host), ``tap:IFNAME``
    (one VM's multiqueue tap), ``loopback``, ``null``.
    """
    kind, sep, arg = spec.partition(":")
    if kind == "tap":
        if not sep or not arg:
            raise UsageError(f"bad port spec {spec!r}: tap needs an interface name (tap:IFNAME)")
        from virtnet.ports.tap import TapPort

        return TapPort(arg)
    if sep and kind != "switch":
        raise UsageError(f"bad port spec {spec!r}: {kind!r} takes no argument")
    if kind == "switch":
        from virtnet.ports.switch import SwitchPort

        uplink = None
        if sep:
            key, eq, uplink = arg.partition("=")
            if key != "uplink" or not eq or not uplink:
                raise UsageError(f"bad port spec {spec!r}: expected switch or switch:uplink=IFNAME")
        port = SwitchPort()
        if uplink:
            try:
                port.add_uplink(uplink)
            except BaseException:
                port.close()
                raise
        return port
    if kind == "loopback":
        from virtnet.ports.loopback import LoopbackPort

        return LoopbackPort()
    if kind == "null":
        from virtnet.ports.null import NullPort

        return NullPort()
    raise UsageError(f"bad port spec {spec!r}: expected one of switch, tap:IFNAME, loopback, null")
