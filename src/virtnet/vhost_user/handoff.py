"""Supervisor -> worker hand-off of ring and memory state, over SOCK_SEQPACKET.

The vhost-user :class:`~virtnet.vhost_user.backend.Backend` runs in the
supervisor; each queue pair's data path runs in a worker process.  This module
carries the backend's :class:`~virtnet.vhost_user.backend.BackendEvents` to a
worker and the worker's answers back:

* :class:`PairRouter` implements ``BackendEvents``: it routes ring ``i`` to
  the channel of pair ``i // 2`` (asking a ``connect`` callback for it the
  first time), broadcasts memory tables and features to every channel, and
  waits for the worker's answer where the protocol needs one (the table
  switch must be complete before the backend unmaps the old table; a stop
  must report the ring's next avail index for GET_VRING_BASE).
* :func:`send` / :func:`receive` move one :class:`Command` with its fds.
  SOCK_SEQPACKET keeps message boundaries, so the fds travel with exactly the
  message they belong to.  A memory table goes as one ``MEM_REGION`` message
  per region (one fd each, far below the kernel's SCM_MAX_FD) and a
  ``MEM_COMMIT`` with the region count; the worker installs the table whole
  at the commit (:class:`TableBuilder`).

Invariants:

* Every received fd ends up in the returned :class:`Command` (the receiver
  owns it) or is closed before :func:`receive` raises.
* Malformed messages raise :class:`~virtnet.errors.ProtocolError`; a worker
  that does not answer within ``timeout`` raises ``TimeoutError`` in the
  supervisor (the supervisor's problem, not the frontend's).
"""

from __future__ import annotations

import contextlib
import enum
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from virtnet.errors import ProtocolError
from virtnet.vhost_user.backend import RegionInfo, RingConfig
from virtnet.vhost_user.codec import close_fds

__all__ = [
    "MAX_HANDOFF_SIZE",
    "REPLY_TIMEOUT",
    "Command",
    "Op",
    "PairRouter",
    "TableBuilder",
    "receive",
    "send",
]

#: Largest hand-off message (a RING_START is 88 bytes); SOCK_SEQPACKET
#: truncates longer ones, which we detect with MSG_TRUNC.
MAX_HANDOFF_SIZE = 256
#: At most kick + call + err travel with one message.
MAX_HANDOFF_FDS = 3
#: Seconds the supervisor waits for a worker's ACK / STOPPED.
REPLY_TIMEOUT = 5.0

_HDR = struct.Struct("=II")  # op, ring index (or 0)
_U64 = struct.Struct("=Q")
_REGION = struct.Struct("=QQQQ")  # guest addr, size, user addr, mmap offset
# size, desc, avail, used, log, flags, last_avail, enabled, features, fd mask
_RING = struct.Struct("=IQQQQIIIQI")
_FD_KICK, _FD_CALL, _FD_ERR = 1, 2, 4


class Op(enum.IntEnum):
    """Hand-off message types.  Supervisor -> worker unless noted."""

    MEM_REGION = 1  # one region + its fd
    MEM_COMMIT = 2  # u64 region count; worker installs, answers ACK
    RING_START = 3  # RingConfig + kick/call/err fds
    RING_STOP = 4  # worker stops the ring, answers STOPPED
    RING_ENABLE = 5  # u64 0/1
    RING_CALL = 6  # u64 1 + fd, or 0 (no call fd)
    FEATURES = 7  # u64 negotiated features
    SHUTDOWN = 8  # worker exits
    ACK = 100  # worker -> supervisor
    STOPPED = 101  # worker -> supervisor: u64 last_avail_idx


@dataclass(frozen=True, slots=True)
class Command:
    """One hand-off message.  ``fds`` are owned by whoever holds the Command."""

    op: Op
    ring: int = 0
    value: int = 0
    region: RegionInfo | None = None
    config: RingConfig | None = None
    fds: tuple[int, ...] = ()


def _encode(cmd: Command) -> tuple[bytes, list[int]]:
    head = _HDR.pack(cmd.op, cmd.ring)
    if cmd.op is Op.MEM_REGION:
        r = cmd.region
        assert r is not None
        return head + _REGION.pack(r.guest_addr, r.size, r.user_addr, r.mmap_offset), [r.fd]
    if cmd.op is Op.RING_START:
        c = cmd.config
        assert c is not None
        fds: list[int] = []
        mask = 0
        for bit, fd in ((_FD_KICK, c.kick_fd), (_FD_CALL, c.call_fd), (_FD_ERR, c.err_fd)):
            if fd is not None:
                mask |= bit
                fds.append(fd)
        body = _RING.pack(
            c.size,
            c.desc_addr,
            c.avail_addr,
            c.used_addr,
            c.log_addr,
            c.flags,
            c.last_avail_idx,
            int(c.enabled),
            c.features,
            mask,
        )
        return head + body, fds
    if cmd.op is Op.RING_CALL:
        return head + _U64.pack(1 if cmd.fds else 0), list(cmd.fds)
    if cmd.op in (Op.RING_STOP, Op.SHUTDOWN, Op.ACK):
        return head, []
    return head + _U64.pack(cmd.value), []


def send(sock: socket.socket, cmd: Command) -> None:
    """Send one command; the caller keeps its own fds (the kernel dups them)."""
    data, fds = _encode(cmd)
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.send(data)


def _decode(data: bytes, fds: list[int]) -> Command:
    if len(data) < _HDR.size:
        raise ProtocolError(f"hand-off message of {len(data)} bytes")
    raw_op, ring = _HDR.unpack_from(data)
    try:
        op = Op(raw_op)
    except ValueError:
        raise ProtocolError(f"unknown hand-off op {raw_op}") from None
    body = data[_HDR.size :]

    def need(size: int, nfds: int) -> None:
        if len(body) != size or len(fds) != nfds:
            raise ProtocolError(
                f"{op.name}: {len(body)} bytes/{len(fds)} fds, expected {size}/{nfds}"
            )

    if op is Op.MEM_REGION:
        need(_REGION.size, 1)
        gpa, size, uva, off = _REGION.unpack(body)
        return Command(op, ring, region=RegionInfo(gpa, size, uva, off, fds[0]), fds=(fds[0],))
    if op is Op.RING_START:
        if len(body) != _RING.size:
            need(_RING.size, len(fds))
        size, desc, avail, used, log, flags, last, enabled, features, mask = _RING.unpack(body)
        if mask & ~(_FD_KICK | _FD_CALL | _FD_ERR):
            raise ProtocolError(f"RING_START: bad fd mask 0x{mask:x}")
        need(_RING.size, bin(mask).count("1"))
        it = iter(fds)
        kick = next(it) if mask & _FD_KICK else None
        call = next(it) if mask & _FD_CALL else None
        err = next(it) if mask & _FD_ERR else None
        cfg = RingConfig(
            ring,
            size,
            desc,
            avail,
            used,
            log,
            flags,
            last,
            kick,
            call,
            err,
            bool(enabled),
            features,
        )
        return Command(op, ring, config=cfg, fds=tuple(fds))
    if op is Op.RING_CALL:
        if len(body) != _U64.size:
            need(_U64.size, len(fds))
        has = _U64.unpack(body)[0]
        if has not in (0, 1):
            raise ProtocolError(f"RING_CALL: bad flag {has}")
        need(_U64.size, int(has))
        return Command(op, ring, value=has, fds=tuple(fds))
    if op in (Op.RING_STOP, Op.SHUTDOWN, Op.ACK):
        need(0, 0)
        return Command(op, ring)
    need(_U64.size, 0)
    return Command(op, ring, value=_U64.unpack(body)[0])


def receive(sock: socket.socket) -> Command | None:
    """Receive one command (blocking per the socket's mode); ``None`` at EOF."""
    data, fds, flags, _ = socket.recv_fds(sock, MAX_HANDOFF_SIZE, MAX_HANDOFF_FDS)
    try:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise ProtocolError("hand-off message or its fds truncated")
        if not data:
            if fds:
                raise ProtocolError("fds without a hand-off message")
            return None
        return _decode(data, fds)
    except ProtocolError:
        close_fds(fds)
        raise


class TableBuilder:
    """Worker side: collect MEM_REGION messages until MEM_COMMIT.

    ``add(cmd)`` returns the complete table at a commit (the caller owns the
    region fds), else ``None``.  A commit whose count does not match raises
    ``ProtocolError`` after closing the collected fds.
    """

    def __init__(self) -> None:
        self._regions: list[RegionInfo] = []

    def add(self, cmd: Command) -> tuple[RegionInfo, ...] | None:
        if cmd.op is Op.MEM_REGION:
            assert cmd.region is not None
            self._regions.append(cmd.region)
            return None
        if cmd.op is Op.MEM_COMMIT:
            regions, self._regions = tuple(self._regions), []
            if cmd.value != len(regions):
                close_fds(r.fd for r in regions)
                raise ProtocolError(f"MEM_COMMIT of {cmd.value} regions, got {len(regions)}")
            return regions
        raise ProtocolError(f"{cmd.op.name} is not part of a memory table")

    def close(self) -> None:
        close_fds(r.fd for r in self._regions)
        self._regions = []


class PairRouter:
    """``BackendEvents`` that forward to one worker channel per queue pair.

    ``connect(pair)`` returns the supervisor's end of a SOCK_SEQPACKET
    connection to that pair's worker (spawning it if needed); it is called
    the first time a ring of the pair starts.  A new worker first gets the
    current memory table and features.  The router never closes the channels
    (their owner does); :meth:`shutdown` sends SHUTDOWN to each.
    """

    def __init__(
        self,
        connect: Callable[[int], socket.socket],
        *,
        timeout: float = REPLY_TIMEOUT,
        on_mtu: Callable[[int], bool] | None = None,
        on_rarp: Callable[[bytes], bool] | None = None,
    ) -> None:
        self._connect = connect
        self._timeout = timeout
        self._on_mtu = on_mtu
        self._on_rarp = on_rarp
        self.channels: dict[int, socket.socket] = {}
        self.regions: tuple[RegionInfo, ...] = ()
        self.features = 0
        self.status = 0

    # -- plumbing ---------------------------------------------------------

    def _await(self, sock: socket.socket, op: Op, ring: int) -> Command:
        sock.settimeout(self._timeout)
        cmd = receive(sock)
        if cmd is None:
            raise ConnectionError(
                f"worker closed its channel while the supervisor awaited {op.name}"
            )
        if cmd.op is not op or cmd.ring != ring:
            close_fds(cmd.fds)
            raise ProtocolError(
                f"worker answered {cmd.op.name}/{cmd.ring}, expected {op.name}/{ring}"
            )
        return cmd

    def _send_table(self, sock: socket.socket) -> None:
        for r in self.regions:
            send(sock, Command(Op.MEM_REGION, region=r))
        send(sock, Command(Op.MEM_COMMIT, value=len(self.regions)))
        self._await(sock, Op.ACK, 0)

    def _channel(self, pair: int) -> socket.socket:
        sock = self.channels.get(pair)
        if sock is None:
            sock = self._connect(pair)
            self.channels[pair] = sock
            if self.features:
                send(sock, Command(Op.FEATURES, value=self.features))
            if self.regions:
                self._send_table(sock)
        return sock

    # -- BackendEvents ----------------------------------------------------

    def on_mem_table(self, regions: tuple[RegionInfo, ...]) -> None:
        self.regions = regions
        for sock in self.channels.values():
            self._send_table(sock)

    def on_ring_start(self, index: int, config: RingConfig) -> None:
        send(self._channel(index // 2), Command(Op.RING_START, index, config=config))

    def on_ring_stop(self, index: int) -> int | None:
        sock = self.channels.get(index // 2)
        if sock is None:
            return None
        send(sock, Command(Op.RING_STOP, index))
        return self._await(sock, Op.STOPPED, index).value

    def on_ring_enable(self, index: int, enabled: bool) -> None:
        sock = self.channels.get(index // 2)
        if sock is not None:
            send(sock, Command(Op.RING_ENABLE, index, value=int(enabled)))

    def on_ring_call(self, index: int, call_fd: int | None) -> None:
        fds = () if call_fd is None else (call_fd,)
        send(self._channel(index // 2), Command(Op.RING_CALL, index, fds=fds))

    def on_ring_log(self, index: int, log_addr: int | None) -> bool:
        return False  # no dirty log here (on_log_base refuses it)

    def on_features(self, features: int) -> None:
        self.features = features
        for sock in self.channels.values():
            send(sock, Command(Op.FEATURES, value=features))

    def on_status(self, status: int) -> None:
        self.status = status

    def on_reset(self) -> None:
        self.features = 0

    def on_mtu(self, mtu: int) -> bool:
        return self._on_mtu(mtu) if self._on_mtu is not None else True

    def on_rarp(self, mac: bytes) -> bool:
        return self._on_rarp(mac) if self._on_rarp is not None else False

    def on_log_base(self, fd: int, size: int, offset: int) -> None:
        # The channel protocol carries no dirty log: refuse the migration
        # rather than let the workers write pages the frontend never re-sends.
        # (A backend for this router should not offer VHOST_F_LOG_ALL.)
        raise ProtocolError("SET_LOG_BASE: this backend's workers cannot log dirty pages")

    def on_close(self) -> None:
        """Nothing held per connection: the channels outlive it (see :meth:`shutdown`)."""

    def shutdown(self) -> None:
        """Ask every worker to exit (best effort)."""
        for sock in self.channels.values():
            with contextlib.suppress(OSError):
                send(sock, Command(Op.SHUTDOWN))
