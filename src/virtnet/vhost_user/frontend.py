"""vhost-user frontend: drive any vhost-user backend from Python (the virtio-user role).

:class:`VhostUserFrontend` plays the VMM (QEMU) and the guest driver at once:

* it owns the "guest" memory -- one ``memfd`` mapped shared, guest-physical
  address 0, frontend virtual address :data:`VA_BASE` (a fake VA: vhost-user
  ring addresses are frontend virtual addresses, so every region's
  ``user_addr`` is this base plus its guest address);
* it speaks the vhost-user control protocol to a backend, as a client
  (``connect``) or a server (``listen``), in QEMU's order (``vhost-user.rst``,
  "Starting the device"): GET_FEATURES, GET/SET_PROTOCOL_FEATURES,
  GET_QUEUE_NUM, GET_MAX_MEM_SLOTS, SET_OWNER, SET_FEATURES, SET_MEM_TABLE (or
  ADD_MEM_REG with CONFIGURE_MEM_SLOTS), then per ring SET_VRING_NUM, BASE,
  ADDR, KICK, CALL and finally SET_VRING_ENABLE;
* the guest side is a :class:`~virtnet.driver.VirtioNetDriver` on that memory
  (its ``kick`` writes the ring's kick eventfd, or traps into our control-queue
  handler for the control queue; :meth:`VhostUserFrontend.receive` waits on the
  call eventfds), or,
  for packet generators, :class:`FastPair` rings that replace the driver's
  data rings before the backend ever sees them;
* the control virtqueue never reaches the backend: the frontend serves it as
  QEMU's virtio-net device model does, so ``VQ_PAIRS_SET(n)`` becomes
  SET_VRING_ENABLE on the rings of pairs ``< n`` and off on the others (QEMU
  ``virtio_net_set_queue_pairs`` -> ``peer_attach``/``peer_detach``).  Before a
  pair is detached its tx ring is drained (bounded by :data:`DRAIN_TIMEOUT`)
  so no frame is stranded in a disabled ring;
* when the backend goes away it reconnects and re-sends everything, resuming
  each ring at the used index it finds in shared memory (QEMU restores
  ``last_avail_idx`` from the used index when GET_VRING_BASE cannot be asked).

Invariants:

* Every wait has a deadline: a silent backend raises :class:`BackendTimeoutError`,
  a closed connection :class:`BackendClosedError`, a refused request (REPLY_ACK
  status != 0) :class:`BackendRefusedError` -- all :class:`~virtnet.errors.ProtocolError`.
* Every reply is validated with the codec (:class:`MessageReader` in reply
  mode: version, REPLY flag, size, fd count) and then against the request it
  answers: the request code must match, the body must have the exact size of
  that reply kind, GET_VRING_BASE must name the ring asked about, numbers
  must be in range.  Fds that arrive where none is expected are closed.
* Fds we own (memfd, eventfds, sockets) are closed exactly once by
  :meth:`VhostUserFrontend.close`.
* A device-written ring index or head is never trusted: a used index running
  more than the queue size ahead, or a head outside the queue, raises
  :class:`~virtnet.errors.VirtqueueError`; the fast path never dereferences
  a device-written head (its descriptors are fixed, desc ``i`` -> slot ``i``).
"""

from __future__ import annotations

import array
import contextlib
import errno
import logging
import mmap
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from virtnet.ctrl import ControlState, handle_command
from virtnet.dirty_log import log_bytes_for
from virtnet.driver import (
    DEFAULT_DRIVER_FEATURES,
    MAX_TX_FRAME,
    MERGEABLE_BUF_SIZE,
    AnyDriverQueue,
    BumpAllocator,
    RxFrame,
    VirtioNetDriver,
)
from virtnet.errors import PeerError, ProtocolError, UsageError, VirtqueueError
from virtnet.memory import GuestMemory, MemoryRegion
from virtnet.net import (
    CTRL_ERR,
    CTRL_MQ,
    HDR_LEN_V1,
    VHOST_F_LOG_ALL,
    VHOST_USER_F_PROTOCOL_FEATURES,
    NetConfig,
    NetFeature,
    NetHdr,
    ctrl_index,
    rx_index,
    tx_index,
)
from virtnet.packed import FRESH_BASE, PackedDeviceQueue
from virtnet.vhost_user.codec import (
    MAX_FDS_PER_MESSAGE,
    MAX_MEM_REGIONS,
    MAX_RINGS,
    U64,
    VRING_ADDR_F_LOG,
    Body,
    Empty,
    LogBase,
    MemRegion,
    MemTable,
    Message,
    MessageReader,
    ProtocolFeature,
    Request,
    SingleRegion,
    VringAddr,
    VringFd,
    VringState,
    close_fds,
    encode_request,
)
from virtnet.virtq import (
    DESC_SIZE,
    MAX_QUEUE_SIZE,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    DeviceQueue,
    split_ring_layout,
    vring_need_event,
)

__all__ = [
    "BACKEND_FEATURE_BITS",
    "DEFAULT_PROTOCOL_FEATURES",
    "DEFAULT_QUEUE_SIZE",
    "DEFAULT_TIMEOUT",
    "DRAIN_TIMEOUT",
    "FRONTEND_FEATURE_BITS",
    "MAX_QUEUE_PAIRS",
    "VA_BASE",
    "BackendClosedError",
    "BackendRefusedError",
    "BackendTimeoutError",
    "FastPair",
    "FrontendStats",
    "RingInfo",
    "VhostUserFrontend",
    "full_barrier",
    "kick_if_wanted",
    "recycle",
]

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------
# Limits and constants
# ---------------------------------------------------------------------------

#: Frontend virtual address of guest-physical 0.  vhost-user.rst "Memory region
#: description": the user address is "the starting address in the frontend's
#: address space"; SET_VRING_ADDR carries such addresses ("Vring address
#: description").  We never dereference it -- any canonical user-space value
#: works; this one looks like a QEMU mmap.
VA_BASE = 0x7F00_0000_0000
#: Per-wait deadline (seconds).  vhost-user.rst sets no timeout; QEMU blocks
#: forever, which is exactly what we refuse to do.
DEFAULT_TIMEOUT = 5.0
#: Default ring size (QEMU's rx/tx_queue_size default for vhost-user is 256).
DEFAULT_QUEUE_SIZE = 256
#: SET_VRING_KICK/CALL/ERR carry the ring index in 8 bits (vhost-user.rst,
#: "Front-end message types"): at most 256 rings, 128 queue pairs.
MAX_QUEUE_PAIRS = MAX_RINGS // 2
#: How long the control-queue handler waits for a pair's tx ring to drain
#: before it detaches the pair anyway (a frame still in it then waits there
#: until the pair is attached again, as with QEMU).
DRAIN_TIMEOUT = 1.0
#: Client mode: redial interval while the backend's socket is not there yet.
RETRY_INTERVAL = 0.05
#: Ancillary buffer for one reply's fds (a reply carries none; we still make
#: room for the most a message may carry so extra fds are received and closed).
_ANC_SPACE = socket.CMSG_SPACE(MAX_FDS_PER_MESSAGE * struct.calcsize("i"))
#: REPLY_ACK "u64 payload: zero for success, non-zero otherwise" (vhost-user.rst).
_ACK_OK = 0
#: Memory granularity for the memfd (mmap page size).
_PAGE = mmap.PAGESIZE
_U16_MASK = 0xFFFF

_EMPTY = Empty()

_PF = ProtocolFeature
#: Protocol features we use (vhost-user.rst, "Protocol features").
DEFAULT_PROTOCOL_FEATURES = _PF.MQ.mask | _PF.REPLY_ACK.mask | _PF.CONFIGURE_MEM_SLOTS.mask

_N = NetFeature
#: Bits whose support depends on the backend: offered to the guest only if the
#: backend offers them, and acked to the backend in SET_FEATURES (QEMU's
#: ``user_feature_bits`` in ``hw/net/vhost_net.c``).
BACKEND_FEATURE_BITS = int(
    _N.CSUM
    | _N.GUEST_CSUM
    | _N.GUEST_TSO4
    | _N.GUEST_TSO6
    | _N.GUEST_ECN
    | _N.GUEST_UFO
    | _N.HOST_TSO4
    | _N.HOST_TSO6
    | _N.HOST_ECN
    | _N.HOST_UFO
    | _N.MRG_RXBUF
    | _N.MTU
    | _N.MQ
    | _N.INDIRECT_DESC
    | _N.EVENT_IDX
    | _N.VERSION_1
    | _N.IN_ORDER
    | _N.RING_PACKED
)
#: Bits the frontend itself provides (the control queue and config space live
#: in the VMM); never sent to the backend.
FRONTEND_FEATURE_BITS = int(
    _N.MAC | _N.STATUS | _N.CTRL_VQ | _N.CTRL_RX | _N.CTRL_VLAN | _N.CTRL_MAC_ADDR
)

DEFAULT_MAC = bytes.fromhex("525400123456")


class BackendTimeoutError(ProtocolError):
    """The backend did not answer (or accept our bytes) within the deadline."""


class BackendClosedError(ProtocolError):
    """The backend closed the connection (or it broke)."""


class BackendRefusedError(ProtocolError):
    """The backend answered a REPLY_ACK request with a non-zero status (NAK)."""


def kick_if_wanted(
    used: memoryview, avail_event: int, new: int, old: int, event_idx: bool, kick_fd: int
) -> bool:
    """After publishing avail index ``new`` (was ``old``) and a full barrier:
    kick ``kick_fd`` if the device asked for it (``used[avail_event]`` with
    EVENT_IDX, else the NO_NOTIFY flag; virtio 1.3 2.7.10).  True if kicked."""
    if event_idx:
        want = vring_need_event(used[avail_event], new, old)
    else:
        want = not used[0] & VIRTQ_USED_F_NO_NOTIFY
    if want:
        os.eventfd_write(kick_fd, 1)
    return want


_FENCE = threading.Lock()


def full_barrier() -> None:
    """A store-load fence (a locked instruction) between publishing and reading flags."""
    _FENCE.acquire()
    _FENCE.release()


# ---------------------------------------------------------------------------
# The socket channel
# ---------------------------------------------------------------------------


class _Channel:
    """One vhost-user connection: send requests with fds, read validated replies."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self.sock = sock
        self.timeout = timeout

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def _set_deadline(self, deadline: float, what: str) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise BackendTimeoutError(f"backend did not answer {what} within {self.timeout:g}s")
        self.sock.settimeout(left)

    def send(self, data: bytes, fds: Sequence[int], what: str) -> None:
        deadline = time.monotonic() + self.timeout
        view = memoryview(data)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            while view:
                self._set_deadline(deadline, what)
                n = self.sock.sendmsg([view], anc)
                view = view[n:]
                anc = []  # fds travel with the first byte only
        except TimeoutError:
            raise BackendTimeoutError(
                f"backend did not take {what} within {self.timeout:g}s"
            ) from None
        except (BrokenPipeError, ConnectionError) as exc:
            raise BackendClosedError(f"backend connection broke sending {what}: {exc}") from None
        except OSError as exc:
            if exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF):
                raise BackendClosedError(
                    f"backend connection broke sending {what}: {exc}"
                ) from None
            raise

    def recv_reply(self, request: Request) -> Message:
        """Read one reply and check it answers ``request``."""
        deadline = time.monotonic() + self.timeout
        reader = MessageReader(replies=True)
        try:
            while True:
                self._set_deadline(deadline, request.name)
                try:
                    data, anc, flags, _ = self.sock.recvmsg(reader.wanted, _ANC_SPACE)
                except TimeoutError:
                    raise BackendTimeoutError(
                        f"backend did not answer {request.name} within {self.timeout:g}s"
                    ) from None
                except (ConnectionError, OSError) as exc:
                    raise BackendClosedError(
                        f"backend connection broke waiting for {request.name}: {exc}"
                    ) from None
                fds = _fds_from(anc)
                if flags & socket.MSG_CTRUNC:
                    close_fds(fds)
                    raise ProtocolError(f"{request.name} reply: truncated ancillary data")
                if not data:
                    close_fds(fds)
                    raise BackendClosedError(
                        f"backend closed the connection before answering {request.name}"
                    )
                reader.feed(data, fds)  # takes the fds; closes them on error
                msg = reader.next_message()
                if msg is not None:
                    break
        finally:
            reader.close()
        if msg.request is not request:
            msg.close_fds()
            raise ProtocolError(
                f"got a reply to {msg.request.name} while waiting for {request.name}"
            )
        return msg

    def readable_eof(self) -> bool:
        """Non-blocking: True if the backend closed the connection (or sent junk).

        The backend never speaks unasked on this channel, so anything readable
        is either EOF or a protocol violation; both end the connection.
        """
        try:
            r, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return True
        if not r:
            return False
        try:
            self.sock.settimeout(0)
            data = self.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return False
        except OSError:
            return True
        del data  # EOF (b"") or unsolicited bytes: either way the connection is over
        return True


def _fds_from(anc: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
            fds.extend(arr)
    return fds


# ---------------------------------------------------------------------------
# Rings
# ---------------------------------------------------------------------------


@dataclass
class RingInfo:
    """One data ring as the frontend set it up."""

    index: int
    size: int
    desc: int  # guest-physical
    avail: int
    used: int
    kick_fd: int
    call_fd: int
    enabled: bool = False


class FastPair:
    """Fixed-descriptor rings of one queue pair for packet generators.

    Descriptor ``i`` of the tx ring always points at tx slot ``i``, and
    descriptor ``i`` of the rx ring at rx buffer ``i``: a batch writes only
    avail-ring entries and one avail index, and reclaims used entries by
    reading the used index (the returned heads are copied back into the avail
    ring in bulk, so any completion order works).  Nothing is allocated per
    packet.  All views are ``memoryview.cast('H'/'I')`` of shared memory, so a
    forked child can run the pair while the parent keeps the control socket.

    Ring-full invariant (tx after :meth:`tx_start`, rx always): the driver has
    every descriptor posted except those returned in the used ring and not
    yet reposted, so avail position ``avail_idx & mask`` equals used position
    ``last_used & mask`` and reposting returned heads is a copy between the
    same positions of the two rings.
    """

    __slots__ = (
        "event_idx",
        "hdr_len",
        "mem",
        "pair",
        "rx_avail",
        "rx_avail_idx",
        "rx_buf_size",
        "rx_bufs",
        "rx_call_fd",
        "rx_desc",
        "rx_kick_fd",
        "rx_kicked",
        "rx_last_used",
        "rx_used",
        "rx_used_ring",
        "size",
        "tx_avail",
        "tx_avail_idx",
        "tx_call_fd",
        "tx_desc",
        "tx_frame_len",
        "tx_kick_fd",
        "tx_kicked",
        "tx_last_used",
        "tx_slot_size",
        "tx_slots",
        "tx_used",
        "tx_used_ring",
    )

    def __init__(
        self,
        mem: GuestMemory,
        pair: int,
        rx: RingInfo,
        rx_bufs: Sequence[int],
        rx_buf_size: int,
        tx: RingInfo,
        tx_slots: Sequence[int],
        tx_slot_size: int,
        *,
        hdr_len: int,
        event_idx: bool,
    ) -> None:
        if rx.size != tx.size:
            raise ValueError("rx and tx rings of a pair must have the same size")
        size = rx.size
        self.mem = mem
        self.pair = pair
        self.size = size
        self.hdr_len = hdr_len
        self.event_idx = event_idx
        self.rx_bufs = list(rx_bufs)
        self.rx_buf_size = rx_buf_size
        self.tx_slots = list(tx_slots)
        self.tx_slot_size = tx_slot_size
        self.rx_kick_fd, self.rx_call_fd = rx.kick_fd, rx.call_fd
        self.tx_kick_fd, self.tx_call_fd = tx.kick_fd, tx.call_fd
        self.rx_desc = mem.view(rx.desc, size * DESC_SIZE)
        self.tx_desc = mem.view(tx.desc, size * DESC_SIZE)
        self.rx_avail = mem.view(rx.avail, 6 + 2 * size).cast("H")
        self.tx_avail = mem.view(tx.avail, 6 + 2 * size).cast("H")
        rx_used = mem.view(rx.used, 6 + 8 * size)
        tx_used = mem.view(tx.used, 6 + 8 * size)
        self.rx_used = rx_used.cast("H")
        self.tx_used = tx_used.cast("H")
        self.rx_used_ring = rx_used[4 : 4 + 8 * size].cast("I")
        self.tx_used_ring = tx_used[4 : 4 + 8 * size].cast("I")
        self.tx_frame_len = 0
        # rx: every buffer posted at once (desc i -> buffer i, device-writable).
        for i in range(size):
            struct.pack_into("<QIHH", self.rx_desc, i * DESC_SIZE, rx_bufs[i], rx_buf_size,
                             VIRTQ_DESC_F_WRITE, 0)  # fmt: skip
            self.rx_avail[2 + i] = i
        self.rx_last_used = int(self.rx_used[1])
        self.rx_avail_idx = (self.rx_last_used + size) & _U16_MASK
        self.rx_kicked = self.rx_avail_idx
        self.rx_avail[1] = self.rx_avail_idx
        # tx: nothing posted until tx_start().
        self.tx_last_used = int(self.tx_used[1])
        self.tx_avail_idx = int(self.tx_avail[1])
        self.tx_kicked = self.tx_avail_idx
        self.interrupts(False)

    def interrupts(self, on: bool) -> None:
        """Ask the device for call notifications on both rings (or not)."""
        for avail, last in ((self.rx_avail, self.rx_last_used), (self.tx_avail, self.tx_last_used)):
            if on:
                avail[0] &= ~VIRTQ_AVAIL_F_NO_INTERRUPT & _U16_MASK
                avail[2 + self.size] = last  # used_event: the next used entry
            else:
                avail[0] |= VIRTQ_AVAIL_F_NO_INTERRUPT
                avail[2 + self.size] = (last + 0x8000) & _U16_MASK  # as far away as possible

    def load_frames(self, frames: Sequence[bytes | bytearray | memoryview]) -> None:
        """Write ``hdr + frames[i % len(frames)]`` into tx slot ``i`` and fix descriptor ``i``.

        All frames must have the same length (the descriptor lengths are fixed).
        """
        if not frames:
            raise ValueError("need at least one frame")
        flen = len(frames[0])
        if any(len(f) != flen for f in frames) or not 0 < flen <= self.tx_slot_size - self.hdr_len:
            raise ValueError("frames must share one length that fits a tx slot")
        hdr = NetHdr(num_buffers=0).pack(self.hdr_len)
        total = self.hdr_len + flen
        for i in range(self.size):
            addr = self.tx_slots[i]
            self.mem.write(addr, hdr + bytes(frames[i % len(frames)]))
            struct.pack_into("<QIHH", self.tx_desc, i * DESC_SIZE, addr, total, 0, 0)
        self.tx_frame_len = flen

    def set_tx_slot(self, i: int, frame: bytes | bytearray | memoryview) -> None:
        """Put one frame (any length that fits) in tx slot ``i`` and fix descriptor ``i``."""
        if not 0 < len(frame) <= self.tx_slot_size - self.hdr_len:
            raise ValueError("frame does not fit a tx slot")
        addr = self.tx_slots[i]
        self.mem.write(addr, NetHdr(num_buffers=0).pack(self.hdr_len) + bytes(frame))
        struct.pack_into(
            "<QIHH", self.tx_desc, i * DESC_SIZE, addr, self.hdr_len + len(frame), 0, 0
        )

    def tx_start(self) -> None:
        """Post every tx descriptor (ring-full invariant from now on)."""
        size = self.size
        pos = self.tx_avail_idx
        for k in range(size):
            self.tx_avail[2 + ((pos + k) & (size - 1))] = (pos + k) & (size - 1)
        self.tx_avail_idx = (pos + size) & _U16_MASK
        self.tx_avail[1] = self.tx_avail_idx

    # -- helpers shared by the fast loops (pktgen, rr) -------------------------
    def kick_tx(self) -> bool:
        """Notify the device of new tx entries if it wants it; True if kicked."""
        new = self.tx_avail_idx
        old = self.tx_kicked
        if new == old:
            return False
        self.tx_kicked = new
        full_barrier()
        return kick_if_wanted(
            self.tx_used, 2 + 4 * self.size, new, old, self.event_idx, self.tx_kick_fd
        )

    def kick_rx(self) -> bool:
        """Notify the device of new rx buffers if it wants it; True if kicked."""
        new = self.rx_avail_idx
        old = self.rx_kicked
        if new == old:
            return False
        self.rx_kicked = new
        full_barrier()
        return kick_if_wanted(
            self.rx_used, 2 + 4 * self.size, new, old, self.event_idx, self.rx_kick_fd
        )

    def tx_pending_used(self) -> int:
        n = (self.tx_used[1] - self.tx_last_used) & _U16_MASK
        if n > self.size:
            raise VirtqueueError(f"tx ring of pair {self.pair}: used index runs {n} ahead")
        return n

    def tx_in_flight(self) -> int:
        """Tx entries posted and not yet returned by the device."""
        return (self.tx_avail_idx - int(self.tx_used[1])) & _U16_MASK


def recycle(avail: memoryview, used_ring: memoryview, size: int, start: int, n: int) -> None:
    """Copy the heads of used entries ``start .. start+n`` (mod size) into the same avail slots.

    Raises :class:`VirtqueueError` if the device returned a head ``>= size``.
    """
    mask = size - 1
    p0 = start & mask
    end = p0 + n
    if end <= size:
        ids = used_ring[2 * p0 : 2 * end : 2].tolist()
        if max(ids) >= size:
            raise VirtqueueError(f"device returned head {max(ids)} >= queue size {size}")
        avail[2 + p0 : 2 + end] = array.array("H", ids)
        return
    first = used_ring[2 * p0 : 2 * size : 2].tolist()
    second = used_ring[0 : 2 * (end - size) : 2].tolist()
    top = max(*first, *second)
    if top >= size:
        raise VirtqueueError(f"device returned head {top} >= queue size {size}")
    avail[2 + p0 : 2 + size] = array.array("H", first)
    avail[2 : 2 + end - size] = array.array("H", second)


# ---------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------


@dataclass
class FrontendStats:
    """Control-plane counters."""

    requests: int = 0
    connects: int = 0
    reconnects: int = 0
    ctrl_commands: int = 0
    ctrl_errors: int = 0
    enable_changes: int = 0
    drain_timeouts: int = 0
    kicks: dict[int, int] = field(default_factory=dict)


# ---------------------------------------------------------------------------
# The frontend
# ---------------------------------------------------------------------------


class VhostUserFrontend:
    """A vhost-user frontend with a virtio-net guest driver on shared memory.

    Typical use::

        with VhostUserFrontend("/tmp/vhost.sock", queue_pairs=4) as fe:
            fe.set_queue_pairs(4)            # control queue -> SET_VRING_ENABLE
            fe.send([frame])                 # driver tx, kick eventfd
            frames = fe.receive(timeout=1)   # wait on call eventfds, driver rx

    ``fast=True`` replaces the driver's data rings by :class:`FastPair` rings
    (``fe.fast_pairs``) before the backend sees them; ``send``/``receive``
    are then unavailable (the packet generators drive the rings directly).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        mode: Literal["connect", "listen"] = "connect",
        queue_pairs: int = 1,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        timeout: float = DEFAULT_TIMEOUT,
        features: int = DEFAULT_DRIVER_FEATURES,
        protocol_features: int = DEFAULT_PROTOCOL_FEATURES,
        mac: bytes = DEFAULT_MAC,
        fast: bool = False,
        auto_reconnect: bool = True,
        packed: bool = False,
    ) -> None:
        if mode not in ("connect", "listen"):
            raise UsageError(f"mode must be connect or listen, not {mode!r}")
        if packed and fast:
            raise UsageError("packed rings are not available with fast=True (split rings only)")
        if not 1 <= queue_pairs <= MAX_QUEUE_PAIRS:
            raise UsageError(f"queue pairs must be within 1..{MAX_QUEUE_PAIRS}")
        if not 2 <= queue_size <= MAX_QUEUE_SIZE or queue_size & (queue_size - 1):
            raise UsageError(f"queue size must be a power of two in 2..{MAX_QUEUE_SIZE}")
        if timeout <= 0:
            raise UsageError("timeout must be positive")
        if len(mac) != 6:
            raise UsageError("mac must be 6 bytes")
        self.path = str(path)
        self.mode = mode
        self.requested_pairs = queue_pairs
        self.queue_size = queue_size
        self.timeout = timeout
        self.wanted_features = features
        self.wanted_protocol = protocol_features
        self.mac = bytes(mac)
        self.fast = fast
        # QEMU's -device virtio-net-pci,packed=on: the device offers packed
        # virtqueues (if the backend does) and a driver that wants them uses them.
        self.packed = packed
        self.auto_reconnect = auto_reconnect
        self.stats = FrontendStats()
        # negotiated state
        self.backend_features = 0
        self.protocol_features = 0
        self.backend_queue_pairs = 1
        self.max_mem_slots = MAX_MEM_REGIONS
        self.acked_backend_features = 0
        self.max_pairs = 0
        self.curr_pairs = 0
        # resources
        self._listener: socket.socket | None = None
        self._chan: _Channel | None = None
        self._memfd = -1
        self._mem_size = 0
        self.mem: GuestMemory | None = None
        self._driver: VirtioNetDriver | None = None
        self.rings: dict[int, RingInfo] = {}
        self.fast_pairs: list[FastPair] = []
        self._ctrl_state: ControlState | None = None
        self._ctrl_q: DeviceQueue | PackedDeviceQueue | None = None
        self._ctrl_failure: PeerError | None = None
        self._closed = False
        self._opened = False
        # migration: the dirty log handed to the backend (start_dirty_log)
        self._log_fd = -1
        self._log_map: mmap.mmap | None = None

    # -- context manager --------------------------------------------------
    def __enter__(self) -> VhostUserFrontend:
        if not self._opened:
            self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- properties -------------------------------------------------------
    @property
    def driver(self) -> VirtioNetDriver:
        if self._driver is None:
            raise RuntimeError("frontend not open")
        return self._driver

    @property
    def features(self) -> int:
        """Features the guest driver negotiated with our virtio-net device."""
        return self.driver.features

    @property
    def connected(self) -> bool:
        return self._chan is not None

    # -- connection -------------------------------------------------------
    def _dial(self) -> socket.socket:
        deadline = time.monotonic() + self.timeout
        if self.mode == "listen":
            if self._listener is None:
                with contextlib.suppress(FileNotFoundError):
                    if Path(self.path).is_socket():
                        os.unlink(self.path)
                lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
                try:
                    lst.bind(self.path)
                    lst.listen(1)
                except OSError as exc:
                    lst.close()
                    raise UsageError(f"cannot listen on {self.path}: {exc}") from exc
                self._listener = lst
            self._listener.settimeout(self.timeout)
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                raise BackendTimeoutError(
                    f"no backend connected to {self.path} within {self.timeout:g}s"
                ) from None
            sock.set_inheritable(False)
            return sock
        last: OSError | None = None
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.settimeout(self.timeout)
                sock.connect(self.path)
                return sock
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                sock.close()
                last = exc
            except OSError:
                sock.close()
                raise
            if time.monotonic() + RETRY_INTERVAL > deadline:
                raise BackendTimeoutError(
                    f"cannot connect to the backend at {self.path} within {self.timeout:g}s: {last}"
                )
            time.sleep(RETRY_INTERVAL)

    def _chan_or_fail(self) -> _Channel:
        if self._chan is None:
            raise BackendClosedError("not connected to a backend")
        return self._chan

    def _call(
        self,
        request: Request,
        body: Body = _EMPTY,
        fds: Sequence[int] = (),
        *,
        reply: Literal["none", "u64", "state"] = "none",
    ) -> int:
        """Send one request; read and validate its reply (or REPLY_ACK status).

        Returns the reply's u64 (or the state's ``num``); 0 when no reply.
        """
        chan = self._chan_or_fail()
        ack = reply == "none" and bool(self.protocol_features & _PF.REPLY_ACK.mask)
        data = encode_request(request, body, need_reply=ack)
        try:
            chan.send(data, fds, request.name)
            self.stats.requests += 1
            if reply == "none" and not ack:
                return 0
            msg = chan.recv_reply(request)
        except ProtocolError:
            self._drop()
            raise
        got = msg.body
        if reply == "state":
            if not isinstance(got, VringState):
                self._drop()
                raise ProtocolError(
                    f"{request.name} reply: expected an 8-byte vring state, got {got!r}"
                )
            assert isinstance(body, VringState)
            if got.index != body.index:
                self._drop()
                raise ProtocolError(
                    f"{request.name} reply names ring {got.index}, asked about ring {body.index}"
                )
            if got.num > _U16_MASK:
                self._drop()
                raise ProtocolError(f"{request.name} reply: base {got.num} is not a 16-bit index")
            return got.num
        if not isinstance(got, U64):
            self._drop()
            raise ProtocolError(f"{request.name} reply: expected an 8-byte u64, got {got!r}")
        if ack and got.value != _ACK_OK:
            self._drop()
            raise BackendRefusedError(
                f"backend refused {request.name} (REPLY_ACK status {got.value})"
            )
        return got.value

    def _drop(self) -> None:
        if self._chan is not None:
            self._chan.close()
            self._chan = None

    def _negotiate(self) -> None:
        feats = self._call(Request.GET_FEATURES, reply="u64")
        self.backend_features = feats
        pf = 0
        if feats >> VHOST_USER_F_PROTOCOL_FEATURES & 1:
            offered = self._call(Request.GET_PROTOCOL_FEATURES, reply="u64")
            pf = offered & self.wanted_protocol
            self._call(Request.SET_PROTOCOL_FEATURES, U64(pf))
        # From here on REPLY_ACK (if negotiated) guards every reply-less request.
        self.protocol_features = pf
        pairs = 1
        if pf & _PF.MQ.mask:
            # QEMU reads GET_QUEUE_NUM as the number of queue *pairs* for net
            # (net/vhost-user.c); DPDK answers its maximum (128).
            n = self._call(Request.GET_QUEUE_NUM, reply="u64")
            if n == 0:
                raise ProtocolError("GET_QUEUE_NUM: backend supports 0 queues")
            pairs = min(n, MAX_QUEUE_PAIRS)
        self.backend_queue_pairs = pairs
        if pf & _PF.CONFIGURE_MEM_SLOTS.mask:
            slots = self._call(Request.GET_MAX_MEM_SLOTS, reply="u64")
            if slots == 0:
                raise ProtocolError("GET_MAX_MEM_SLOTS: backend supports 0 memory slots")
            self.max_mem_slots = slots
        self._call(Request.SET_OWNER)

    def _device_features(self) -> int:
        """What our virtio-net device offers the guest driver."""
        backend = self.backend_features & BACKEND_FEATURE_BITS
        if not self.protocol_features & _PF.MQ.mask:
            backend &= ~int(_N.MQ)
        if self.fast:
            # FastPair gives buffers back by the id of every used entry; a
            # device may return an in-order batch with one entry.
            backend &= ~int(_N.IN_ORDER)
        if not self.packed:
            backend &= ~int(_N.RING_PACKED)
        return backend | FRONTEND_FEATURE_BITS

    def _build_guest(self) -> None:
        """Memory, driver, ring layouts, eventfds (first connection only)."""
        device_features = self._device_features()
        max_pairs = min(self.requested_pairs, self.backend_queue_pairs)
        if not device_features & _N.MQ:
            max_pairs = 1
        config = NetConfig(mac=self.mac, max_virtqueue_pairs=max_pairs)
        mergeable = bool(device_features & self.wanted_features & _N.MRG_RXBUF)
        rx_buf = MERGEABLE_BUF_SIZE if mergeable else 65562
        ring = split_ring_layout(self.queue_size).total + 2 * _PAGE
        per_pair = 2 * ring + self.queue_size * (rx_buf + 64 + HDR_LEN_V1 + MAX_TX_FRAME + 64)
        size = 2 * _PAGE + max_pairs * per_pair + split_ring_layout(64).total + 4 * _PAGE
        size = (size + (1 << 21) - 1) & ~((1 << 21) - 1)
        self._memfd = os.memfd_create("virtnet-frontend", os.MFD_CLOEXEC)
        os.ftruncate(self._memfd, size)
        self._mem_size = size
        region = MemoryRegion.from_fd(self._memfd, guest_addr=0, size=size, user_addr=VA_BASE)
        self.mem = GuestMemory([region])
        self._driver = VirtioNetDriver(
            self.mem,
            BumpAllocator(_PAGE, size),
            config,
            device_features,
            queue_size=self.queue_size,
            wanted=self.wanted_features,
            kick=self._kick,
            pump=self._pump,
        )
        drv = self._driver
        self.max_pairs = drv.max_pairs
        self.acked_backend_features = drv.features & BACKEND_FEATURE_BITS & self.backend_features
        for index in range(2 * drv.max_pairs):
            size_, d, a, u = drv.vq_layout(index)
            kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self.rings[index] = RingInfo(index, size_, d, a, u, kick, call)
        if drv.ctrl is not None:
            cs, cd, ca, cu = drv.vq_layout(ctrl_index(drv.max_pairs))
            ctrl_queue = PackedDeviceQueue if drv.packed else DeviceQueue
            self._ctrl_q = ctrl_queue(
                self.mem, cs, cd, ca, cu, event_idx=bool(drv.features & _N.EVENT_IDX)
            )
            self._ctrl_state = ControlState.new(
                drv.features, max_queue_pairs=drv.max_pairs, mac=self.mac
            )
        if self.fast:
            hl = drv.hdr_len
            for p in range(drv.max_pairs):
                self.fast_pairs.append(
                    FastPair(
                        self.mem, p,
                        self.rings[rx_index(p)], drv.rxqs[p].bufs, drv.rx_buf_size,
                        self.rings[tx_index(p)], drv.txqs[p].slots, hl + MAX_TX_FRAME,
                        hdr_len=hl, event_idx=bool(drv.features & _N.EVENT_IDX),
                    )
                )  # fmt: skip

    def _send_memory(self) -> None:
        assert self.mem is not None
        region = MemRegion(0, self._mem_size, VA_BASE, 0)
        if self.protocol_features & _PF.CONFIGURE_MEM_SLOTS.mask:
            # QEMU sends ADD_MEM_REG per region once CONFIGURE_MEM_SLOTS is on.
            self._call(Request.ADD_MEM_REG, SingleRegion(region), (self._memfd,))
        else:
            self._call(Request.SET_MEM_TABLE, MemTable((region,)), (self._memfd,))

    def _ring_addr(self, r: RingInfo) -> VringAddr:
        # QEMU's vhost_virtqueue_set_addr: while logging, the used ring is
        # logged at its guest-physical address (our guest memory starts at 0).
        logging_ = self._log_map is not None
        return VringAddr(
            r.index,
            VRING_ADDR_F_LOG if logging_ else 0,
            r.desc + VA_BASE,
            r.used + VA_BASE,
            r.avail + VA_BASE,
            r.used if logging_ else 0,
        )

    def _send_ring(self, r: RingInfo, base: int) -> None:
        self._call(Request.SET_VRING_NUM, VringState(r.index, r.size))
        self._call(Request.SET_VRING_BASE, VringState(r.index, base))
        self._call(Request.SET_VRING_ADDR, self._ring_addr(r))
        self._call(Request.SET_VRING_KICK, VringFd(r.index, False), (r.kick_fd,))
        self._call(Request.SET_VRING_CALL, VringFd(r.index, False), (r.call_fd,))

    @property
    def _protocol_negotiated(self) -> bool:
        return bool(self.backend_features >> VHOST_USER_F_PROTOCOL_FEATURES & 1)

    def _set_enable(self, index: int, on: bool) -> None:
        # vhost-user.rst, SET_VRING_ENABLE: "should be sent only when
        # VHOST_USER_F_PROTOCOL_FEATURES has been negotiated"; without it every
        # ring is enabled from the start and stays so (one pair: nothing to switch).
        if self._protocol_negotiated:
            self._call(Request.SET_VRING_ENABLE, VringState(index, int(on)))
            self.rings[index].enabled = on
        else:
            self.rings[index].enabled = True

    def _driver_vq(self, index: int) -> AnyDriverQueue:
        """The guest driver's side of data ring ``index``."""
        drv = self.driver
        pair, tx = divmod(index, 2)
        return (drv.txqs if tx else drv.rxqs)[pair].vq

    def _vhost_features(self) -> int:
        """What SET_FEATURES acks: the guest's backend bits plus vhost's own."""
        acked = self.acked_backend_features
        if self._protocol_negotiated:
            acked |= 1 << VHOST_USER_F_PROTOCOL_FEATURES
        if self._log_map is not None:
            acked |= 1 << VHOST_F_LOG_ALL
        return acked

    def _setup(self, *, resume: bool) -> None:
        if self._log_map is not None:
            self._send_log()
        self._call(Request.SET_FEATURES, U64(self._vhost_features()))
        self._send_memory()
        for index in sorted(self.rings):
            r = self.rings[index]
            # A fresh device starts at the ring's start; after a backend
            # restart, continue from where the old backend had used buffers to
            # (the split used index, as QEMU does; a packed ring's used position).
            if resume:
                base = self._driver_vq(index).device_base()
            else:
                base = FRESH_BASE if self.driver.packed else 0
            self._send_ring(r, base)
        want = max(self.curr_pairs, 1)
        for p in range(self.max_pairs):
            on = p < want
            self._set_enable(rx_index(p), on)
            self._set_enable(tx_index(p), on)
        if not self.protocol_features & _PF.REPLY_ACK.mask:
            # Without REPLY_ACK nothing above was answered: a GET round trip
            # proves the backend took all of it (QEMU's enforce_reply trick).
            self._call(Request.GET_FEATURES, reply="u64")
        self.curr_pairs = want
        # Whatever the driver posted while nobody listened: tell the backend.
        for p in range(want):
            self._notify(rx_index(p))
            self._notify(tx_index(p))

    def _notify(self, index: int) -> None:
        r = self.rings.get(index)
        if r is None:  # the driver kicks while it is being built: rings start later
            return
        os.eventfd_write(r.kick_fd, 1)
        self.stats.kicks[index] = self.stats.kicks.get(index, 0) + 1

    def open(self) -> VhostUserFrontend:
        """Connect (or accept), negotiate, share memory and start the rings."""
        if self._closed:
            raise RuntimeError("frontend closed")
        try:
            self._chan = _Channel(self._dial(), self.timeout)
            self._negotiate()
            if self._driver is None:
                self._build_guest()
            if not self._check_compatible():
                raise ProtocolError("backend offers fewer features or queues than before")
            self._setup(resume=self._opened)
        except BaseException:
            self._drop()
            raise
        self.stats.connects += 1
        self._opened = True
        return self

    def _check_compatible(self) -> bool:
        """On reconnect the new backend must offer at least what we acked."""
        if not self._opened:
            return True
        if self.acked_backend_features & ~self.backend_features:
            return False
        return self.backend_queue_pairs >= self.max_pairs

    def reconnect(self) -> None:
        """Drop the connection and set everything up again on a new one.

        Rings resume at the used index found in shared memory.  Traffic posted
        meanwhile stays in the rings and is processed by the new backend.
        """
        self._drop()
        self.stats.reconnects += 1
        log.info("reconnecting to the backend at %s", self.path)
        self.open()

    def check_connection(self) -> bool:
        """True if connected; on a dead connection reconnect (if enabled) or raise."""
        if self._chan is not None and not self._chan.readable_eof():
            return True
        self._drop()
        if not self.auto_reconnect:
            raise BackendClosedError(f"backend at {self.path} went away")
        self.reconnect()
        return True

    # -- migration -------------------------------------------------------
    def _send_log(self) -> None:
        assert self._log_map is not None
        self._call(
            Request.SET_LOG_BASE, LogBase(len(self._log_map), 0), (self._log_fd,), reply="u64"
        )

    def start_dirty_log(self) -> memoryview:
        """Start dirty-page logging as QEMU does when a migration starts.

        ``vhost_migration_log``: a shared log covering guest memory goes to the
        backend (SET_LOG_BASE, answered), VHOST_F_LOG_ALL is acked
        (SET_FEATURES) and every ring is re-sent with VHOST_VRING_F_LOG and its
        used ring's guest-physical address (SET_VRING_ADDR).  Returns the log:
        bit ``p % 8`` of byte ``p // 8`` is guest page ``p`` (4 KiB).
        """
        if self._log_map is not None:
            raise UsageError("the dirty log is already on")
        if not self.backend_features >> VHOST_F_LOG_ALL & 1:
            raise UsageError("the backend does not offer VHOST_F_LOG_ALL")
        if not self.protocol_features & _PF.LOG_SHMFD.mask:
            raise UsageError("LOG_SHMFD was not negotiated (pass it in protocol_features)")
        size = max(log_bytes_for(self._mem_size), 8)
        fd = os.memfd_create("virtnet-dirty-log", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            self._log_map = mmap.mmap(fd, size)
        except OSError:
            os.close(fd)
            raise
        self._log_fd = fd
        self._send_log()
        self._send_log_state()
        return memoryview(self._log_map)

    def stop_dirty_log(self) -> None:
        """Stop logging (QEMU after a cancelled migration): SET_FEATURES without
        VHOST_F_LOG_ALL, rings re-sent without VHOST_VRING_F_LOG."""
        if self._log_map is None:
            return
        self._release_log()
        self._send_log_state()

    def _send_log_state(self) -> None:
        """VHOST_F_LOG_ALL (SET_FEATURES) and every ring's VHOST_VRING_F_LOG
        (SET_VRING_ADDR) as the log now is: on or off."""
        self._call(Request.SET_FEATURES, U64(self._vhost_features()))
        for index in sorted(self.rings):
            self._call(Request.SET_VRING_ADDR, self._ring_addr(self.rings[index]))

    def _release_log(self) -> None:
        if self._log_map is not None:
            with contextlib.suppress(BufferError):  # a caller still holds a view
                self._log_map.close()
            self._log_map = None
        if self._log_fd >= 0:
            os.close(self._log_fd)
            self._log_fd = -1

    def stop_rings(self) -> dict[int, int]:
        """Stop the device as QEMU's ``vhost_net_stop`` does; returns each ring's base.

        Every enabled ring is disabled first (SET_VRING_ENABLE 0), then
        GET_VRING_BASE stops each ring and reports the backend's next avail index.
        """
        if self._protocol_negotiated:
            for index in sorted(self.rings):
                if self.rings[index].enabled:
                    self._set_enable(index, False)
        out: dict[int, int] = {}
        for index in sorted(self.rings):
            out[index] = self._call(Request.GET_VRING_BASE, VringState(index, 0), reply="state")
        return out

    def close(self) -> None:
        """Stop the rings if connected, then release every fd and the memory."""
        if self._closed:
            return
        self._closed = True
        if self._chan is not None:
            with contextlib.suppress(PeerError, OSError):
                self.stop_rings()
        self._drop()
        if self._listener is not None:
            self._listener.close()
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        for r in self.rings.values():
            close_fds((r.kick_fd, r.call_fd))
        self._release_log()
        # Drop every view of the shared memory first: the mapping (and the fd
        # mmap keeps) can only go once nothing exports it.
        self.fast_pairs.clear()
        self._driver = None
        self._ctrl_q = None
        if self.mem is not None:
            self.mem.close()
        if self._memfd >= 0:
            os.close(self._memfd)
            self._memfd = -1

    def close_in_child(self) -> None:
        """In a forked child: drop our copy of the control socket (the parent owns it)."""
        if self._chan is not None:
            with contextlib.suppress(OSError):
                os.close(self._chan.sock.detach())
        if self._listener is not None:
            with contextlib.suppress(OSError):
                os.close(self._listener.detach())
        self._chan = None
        self._listener = None
        self._closed = True

    # -- guest driver hooks ----------------------------------------------
    def _kick(self, vq: int) -> None:
        drv = self._driver
        if drv is not None and drv.ctrl is not None and vq == ctrl_index(drv.max_pairs):
            self._process_ctrl()  # a trap into the VMM: handled synchronously
            return
        self._notify(vq)

    def _pump(self) -> None:
        self._process_ctrl()

    def _process_ctrl(self) -> None:
        q, state, drv = self._ctrl_q, self._ctrl_state, self._driver
        if q is None or state is None or drv is None:
            return
        for ch in q.pop(64):
            self.stats.ctrl_commands += 1
            if not ch.in_ or ch.in_len < 1:
                q.push([(ch.head, 0)])
                continue
            data = b"".join(bytes(b) for b in ch.out)
            before = state.curr_queue_pairs
            ack, reply = handle_command(state, drv.features, data, time.monotonic())
            if ack != CTRL_ERR and data[:1] == bytes([CTRL_MQ]):
                try:
                    self._apply_pairs(before, state.curr_queue_pairs)
                except PeerError as exc:
                    # The backend failed us mid-switch: refuse the command (the
                    # driver keeps its old count) and report it from set_queue_pairs.
                    state.curr_queue_pairs = before
                    ack, reply = CTRL_ERR, b""
                    self._ctrl_failure = exc
            if ack == CTRL_ERR:
                self.stats.ctrl_errors += 1
            out = bytes([ack]) + reply
            off = 0
            for buf in ch.in_:
                k = min(len(buf), len(out) - off)
                if k <= 0:
                    break
                buf[:k] = out[off : off + k]
                off += k
            q.push([(ch.head, off)])

    def _drain_tx(self, pairs: Iterable[int]) -> None:
        deadline = time.monotonic() + DRAIN_TIMEOUT
        assert self.mem is not None
        for p in pairs:
            vq = self._driver_vq(tx_index(p))
            while not vq.device_done():
                if time.monotonic() > deadline:
                    self.stats.drain_timeouts += 1
                    log.warning("tx ring of pair %d did not drain before detach", p)
                    break
                time.sleep(0.0005)

    def _apply_pairs(self, old: int, new: int) -> None:
        """QEMU's virtio_net_set_queue_pairs: attach pairs < new, detach the rest."""
        if new < old:
            self._drain_tx(range(new, old))
        for p in range(self.max_pairs):
            on = p < new
            for index in (rx_index(p), tx_index(p)):
                if self.rings[index].enabled != on:
                    self._set_enable(index, on)
                    self.stats.enable_changes += 1
        self.curr_pairs = new
        for p in range(old, new):
            self._notify(rx_index(p))
            self._notify(tx_index(p))

    # -- public data/control API -----------------------------------------
    def set_queue_pairs(self, n: int) -> bool:
        """``ethtool -L eth0 combined n`` through the control queue.

        Returns False if the device refused ``n``; raises the backend's
        :class:`~virtnet.errors.PeerError` if it failed during the switch.
        """
        self._ctrl_failure = None
        ok = self.driver.set_queue_pairs(n)
        failure, self._ctrl_failure = self._ctrl_failure, None
        if failure is not None:
            raise failure
        return ok

    def wait(self, timeout: float, rings: Iterable[int] | None = None) -> list[int]:
        """Wait up to ``timeout`` for call eventfds; returns the rings that fired (cleared)."""
        sel = [self.rings[i] for i in (rings if rings is not None else self.rings)]
        fds = [r.call_fd for r in sel]
        try:
            ready, _, _ = select.select(fds, [], [], max(0.0, timeout))
        except InterruptedError:
            return []
        fired: list[int] = []
        for r in sel:
            if r.call_fd in ready:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(r.call_fd)
                fired.append(r.index)
        return fired

    def _no_fast(self) -> VirtioNetDriver:
        if self.fast:
            raise RuntimeError("send/receive are unavailable with fast=True (use fast_pairs)")
        return self.driver

    def send(self, frames: Iterable[bytes | memoryview], *, pair: int | None = None) -> int:
        """Transmit frames through the guest driver; returns how many were queued."""
        return self._no_fast().transmit(frames, pair=pair)

    def receive(self, timeout: float = 0.0) -> list[RxFrame]:
        """Frames received on any pair; waits up to ``timeout`` if none is there yet."""
        drv = self._no_fast()
        deadline = time.monotonic() + timeout
        while True:
            for p in range(drv.max_pairs):
                drv.reclaim_tx(p)
            got = drv.receive_all()
            left = deadline - time.monotonic()
            if got or left <= 0:
                return got
            self.wait(min(left, 0.05))

    def driver_stats(self) -> dict[str, int]:
        """ethtool -S style per-queue counters of the guest driver."""
        return self.driver.stats()
