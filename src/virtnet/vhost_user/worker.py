"""The data path of virtio-net queue pairs, run in worker processes.

A :class:`Worker` serves rx ring ``2p`` and tx ring ``2p + 1`` of one VM: it
uses the guest memory mapped in the worker process from the region fds
(:func:`map_regions`), builds a :class:`~virtnet.virtq.DeviceQueue` per ring,
waits on the kick eventfds, the port queue's fd and its control socket with
its own ``epoll``, and signals the call eventfds.  The supervisor
(:mod:`virtnet.vhost_user.supervisor`) forks the process and talks to each
pair over its own ``SOCK_SEQPACKET`` control socket (:class:`Ctl`).

A process serves one pair by default; with ``serve --workers N`` it serves
several pairs of one VM (:class:`WorkerGroup`): one outer ``epoll`` over the
pairs' epoll fds, so the process sleeps once for all of them and a kick that
arrives while another pair is being served costs no wake-up.  A stopped pair
leaves the group; the process exits when its last pair is stopped.

Data path:

* tx: pop up to :data:`TX_BATCH` chains, ``port.send(chain.out)`` each (the
  guest's 12-byte ``virtio_net_hdr_v1`` is the port's vnet header, so guest
  buffers go straight to ``writev``), one used publish and one
  ``should_notify`` + call write per batch.
* rx: the worker keeps a *reserve* of popped rx chains whose writable buffers
  cover one maximal frame (:attr:`Worker.rx_need`: 12 + 65550 bytes when the
  guest takes GSO, 12 + 18 + MTU otherwise); one ``recv_into`` (``readv``
  straight into guest memory) receives a frame into the front of the reserve,
  ``num_buffers`` is written into the header (mergeable buffers), the chains
  used are pushed in pop order.  Up to :data:`RX_BATCH` frames per publish.
  While frames are small, ``readv`` gets the first chain's buffers plus a
  bounce buffer (not the ~40 guest buffers that cover 64 KiB: those cost a
  Python loop and a buffer export each, per frame); a frame that spills into
  the bounce buffer is copied on into the next chains and switches the worker
  to reading in place until a frame fits the first chain again.  Large frames
  are published sooner: every :data:`RX_PUBLISH_BYTES` of frames (each GSO
  frame), so the guest starts on them while the worker copies the next ones.
* rx from a tap, the common case (mergeable buffers, a chain of one buffer,
  a frame that fits it): a loop of its own does one ``os.readv`` of that
  buffer and the bounce buffer per frame, writes ``num_buffers`` 1 and adds
  the port's counters once per batch; a frame that spills over, a chain of
  several buffers or a short reserve hands over to the general loop above.
  That took a 64-byte frame from 3.2 to 2.1 us of worker time (of which the
  tap ``readv`` is 1.0), bringing the backend's CPU per frame to about 1.1x
  QEMU's own tap backend in a real guest's flood.
* Without rx buffers the worker stops reading the port (the frame stays in the
  kernel / switch / loopback queue, which counts its own drops), counts an
  ``rx_no_buffer`` stall, enables rx kicks and waits for the guest.  A stall
  means a frame waits: a read that finds the port empty ends it, so the port
  is polled again instead of the ring (a stall kept without a frame once left
  the worker re-arming on posted buffers while the tap filled and dropped).
* Busy polling (``poll_us``): spin that long on the rings and the port before
  re-enabling notifications and sleeping in ``epoll``.
* Deferred kicks (``kick_defer_us``, on by default): after a transmit burst
  (:data:`KICK_DEFER_MIN_CHAINS` chains or more in a batch) the worker leaves
  the guest's kicks off and looks at the tx ring again later, up to
  :data:`KICK_DEFER_ROUNDS` times, waking at once for the port and the
  control socket meanwhile; only then does it ask for kicks and sleep.  A
  guest streaming out then kicks a few times a second instead of once every
  few packets (a kick is a VM exit; under TCG, tens of microseconds of vCPU),
  the way QEMU's own virtio-net polls from a bottom half and Linux NICs defer
  interrupts (``napi_defer_hard_irqs``).  The looks are ``kick_defer_us``
  apart while the pair moves bulk traffic (:data:`KICK_DEFER_BULK_BYTES_PER_S`
  over a window of ``kick_defer_us``), :data:`KICK_DEFER_SHORT_US` otherwise:
  a frame queued during a deferral waits for the next look, which a stream
  does not notice and a request/response peer does.  Traffic of one packet
  at a time never defers at all.
* Transmit completions are signalled once :data:`TX_SIGNAL_CHAINS` are
  unsignalled, when the tx ring stayed empty for a deferral round, and before
  the worker sleeps -- not after every batch: the guest reclaims completed
  buffers as it transmits and needs the interrupt only when it stops.
* Ports: tap and switch through their queue fd (``writev``/``readv``); the
  null port is counted in-worker (no call per frame); loopback goes through
  :class:`~virtnet.ports.loopback.LoopbackQueue` (frames come back on this
  pair's rx with MACs swapped).
* A pair being disabled (``Ctl.DISABLE``) first consumes and discards the tx
  chains the guest made available, then stops like ``Ctl.STOP``.
* A kick fd that cannot be polled breaks its ring; a call fd that cannot be
  written is dropped after one logged error (no more interrupts on it).

Invariants:

* Used entries are pushed in pop order, so ``last_avail_idx - len(reserve)``
  always equals the used index: at stop the reserve is given back
  (``unpop``) and the reported next-avail index equals the used index, and a
  crashed worker can be restarted from the used index in guest memory.
  Buffers are thus used in the order they were made available, which is
  what ``VIRTIO_F_IN_ORDER`` promises; with it negotiated on a split ring a
  tx batch is returned with one used entry naming its last buffer
  (virtio 1.3 2.7.9), the used index moved on by the whole batch.
* Packed rings (``VIRTIO_F_RING_PACKED``, :mod:`virtnet.packed`) are served
  by the same loop through :class:`~virtnet.packed.PackedDeviceQueue`; their
  next-avail report is the 32-bit packed base (both positions and wrap
  counters).  A packed ring keeps its used position nowhere the supervisor
  could read it in guest memory, so after each push the worker stores it in
  its counter slot (:data:`POS_FIELDS`): a crashed worker's packed rings
  restart from there.
* Guest input is untrusted: a :class:`~virtnet.errors.PeerError` from a ring
  (loops, bad indexes, addresses outside guest memory -- all checked by
  ``DeviceQueue``) marks that ring broken (logged, counted in ``errors``,
  signalled on the ring's err eventfd, never touched again); the worker keeps
  running so the supervisor can still stop it and the other ring keeps going.
* After the stop request is answered the worker touches no guest memory: it
  exits at once.  It also exits when its control socket closes (supervisor
  gone) and dies with its parent (``PR_SET_PDEATHSIG``).
* A worker holds the frontend's connection open (never reading it): when
  serve is killed, QEMU sees the connection close only after the last worker
  has died, so the used indexes it then takes as the rings' bases (it cannot
  ask GET_VRING_BASE of a dead backend) do not move on behind its back.  A
  worker that starts from a base behind the ring's used index all the same
  resumes at the used index.
* Counters are published into a shared ``u64`` slot (:data:`FIELDS`) after
  every batch.  Per packet the worker allocates only the used-entry tuple
  and what ``os.readv``/``os.writev`` need; rings, indexes and notification
  decisions are handled once per batch.
* Limits: :data:`TX_BATCH` chains, :data:`RX_BATCH` frames per publish (rx
  sooner after :data:`RX_PUBLISH_BYTES`); :data:`MAX_RX_IOVECS` buffers per
  ``readv`` (below IOV_MAX); :data:`GSO_RX_NEED` bytes of rx reserve for a GSO-capable guest.
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
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from virtnet.dirty_log import DirtyLog
from virtnet.errors import PeerError
from virtnet.forking import fork_child
from virtnet.memory import GuestMemory, MemoryRegion
from virtnet.net import NetFeature
from virtnet.packed import PackedDeviceQueue, is_position, ring_position
from virtnet.ports.base import MAX_FRAME_LEN, VNET_HDR_LEN, PortQueue, attach_queue
from virtnet.vhost_user.backend import RegionInfo
from virtnet.virtq import Chain, DeviceQueue

#: The device side of a split or a packed ring: the worker uses either alike.
AnyQueue = DeviceQueue | PackedDeviceQueue

__all__ = [
    "FIELDS",
    "KICK_DEFER_BULK_BYTES_PER_S",
    "KICK_DEFER_MIN_CHAINS",
    "KICK_DEFER_ROUNDS",
    "KICK_DEFER_SHORT_US",
    "KICK_DEFER_US",
    "MAX_KICK_DEFER_US",
    "NFIELDS",
    "POS_FIELDS",
    "RX_BATCH",
    "RX_PUBLISH_BYTES",
    "TX_BATCH",
    "TX_SIGNAL_CHAINS",
    "Ctl",
    "RegionSpec",
    "RingSpec",
    "Worker",
    "WorkerGroup",
    "WorkerSpec",
    "map_regions",
    "region_mappings",
    "run_group",
    "spawn_worker",
    "spawn_workers",
    "worker_main",
]

log = logging.getLogger(__name__)

#: Chains popped from the tx ring per batch (one used publish, one call).
TX_BATCH = 256
#: Frames received per rx batch (one used publish, one call).
RX_BATCH = 64
#: Bytes of received frames after which the rx used ring is published (and
#: the guest notified if it asked to be) in the middle of a batch: every GSO
#: frame (up to 64 KiB) goes to the guest as soon as it is copied, and MTU-size
#: frames about every 20.  Publishing only at the end of a batch held 16 GSO
#: frames (~0.7 ms of copying) from a guest that had nothing else to do: TCP
#: host->guest into a 2-vCPU TCG guest went from 4.5-4.8 to 5.1-5.5 Gbit/s.
#: Small frames still publish once per batch.
RX_PUBLISH_BYTES = 32 * 1024
#: Default ``kick_defer_us`` (``serve --kick-defer-us``): microseconds between
#: two looks at the tx ring while the guest's kicks are left off and the pair
#: moves bulk traffic (the kernel's default 50 us timer slack comes on top).
#: Session 13, TCP host->guest into a 2-vCPU TCG guest (the guest's ACKs are
#: the tx): 50 us gave 3.9-4.1 Gbit/s (~500 guest kicks and ~570 tx
#: interrupts a second), 400 us 4.6-4.9 (~15 and ~110), QEMU's own tap
#: 4.2-4.4.  Session 14: 400-us looks for every kind of traffic halved the
#: rate of 4 ping sessions (each reply waited for a look), hence
#: :data:`KICK_DEFER_SHORT_US` when the traffic is not bulk.
KICK_DEFER_US = 400
#: Largest ``kick_defer_us`` accepted: beyond a millisecond a streaming guest's
#: 256-entry tx ring (~100k packets/s under TCG here) fills between two looks.
MAX_KICK_DEFER_US = 1000
#: Microseconds between two looks while deferring when the pair is not
#: moving bulk traffic (below :data:`KICK_DEFER_BULK_BYTES_PER_S`): a
#: request/response peer is waiting for each frame a look picks up, so a look
#: of ``kick_defer_us`` (400 us) halved the transactions per second of four
#: ping sessions into a 2-vCPU guest (``bench/guest_rr.py``, session 14).
KICK_DEFER_SHORT_US = 50
#: Bytes per second (rx and tx of the pair, over a window of at least
#: ``kick_defer_us``) from which the deferral's looks are ``kick_defer_us``
#: long: 1 Gbit/s.  A TCP stream here moves 3-5 Gbit/s; request/response
#: traffic far less.  (A shorter window judged a 4 KB burst arriving in 30 us
#: bulk, and that transaction's answer waited for a long look.)
KICK_DEFER_BULK_BYTES_PER_S = 125_000_000
#: Looks at an empty tx ring before the worker asks for kicks and sleeps.
KICK_DEFER_ROUNDS = 4
#: A tx batch of at least this many chains starts the deferral: a stream, not
#: one request waiting for its answer.
KICK_DEFER_MIN_CHAINS = 2
#: Unsignalled tx completions after which the guest is interrupted even while
#: the worker is busy (a quarter of QEMU's default 256-entry ring).
TX_SIGNAL_CHAINS = 64
#: rx chains popped at least per refill of the reserve (one pop per batch of
#: small frames instead of one per frame).
RX_REFILL = 32
#: Sleep bound when a ring has no kick fd (vhost-user NOFD: "poll"), seconds.
NOFD_POLL_S = 0.001
#: Default MTU when the guest did not set one (virtio 1.3 section 5.1.4.1).
DEFAULT_MTU = 1500
#: Ethernet header with one 802.1Q tag.
ETH_VLAN_HDR = 18
#: Largest rx frame a GSO-capable guest may get: vnet header + 64 KiB GSO
#: frame (virtio 1.3 section 5.1.6.4.1: 65550 bytes of frame plus header).
GSO_RX_NEED = VNET_HDR_LEN + MAX_FRAME_LEN
#: readv/writev take at most IOV_MAX (1024) buffers; the reserve stays below.
MAX_RX_IOVECS = 1000

#: Counter slot layout (u64 each), shared with the supervisor.
FIELDS = (
    "rx_packets",
    "rx_bytes",
    "rx_dropped",
    "rx_no_buffer",
    "tx_packets",
    "tx_bytes",
    "tx_dropped",
    "errors",
    "kicks",
    "calls",
    "batches",
    "pid",
    "broken",
    "rx_errors",
    "tx_errors",
)
#: Slot words after the counters (never folded into totals): a packed ring's
#: used position as ``1 << 32 | base`` (0: not known), rx then tx.
POS_FIELDS = (16, 17)
NFIELDS = 18
_F = {name: i for i, name in enumerate(FIELDS)}

_EVENTFD_ONE = struct.pack("=Q", 1)
_STOP_REPLY = struct.Struct("=cII")
_CALL_MSG = struct.Struct("=cBB")
_LOG_MSG = struct.Struct("=cBBQ")
_EPOLLIN = select.EPOLLIN
_EPOLLHUP = select.EPOLLHUP
_EPOLLERR = select.EPOLLERR
_FD_SETSIZE = 1024  # select(2)
_GUEST_GSO = int(NetFeature.GUEST_TSO4 | NetFeature.GUEST_TSO6 | NetFeature.GUEST_UFO)


@dataclass(frozen=True, slots=True)
class RegionSpec:
    """One guest memory region; ``fd`` is the worker's own (inherited) copy."""

    guest_addr: int
    size: int
    user_addr: int
    mmap_offset: int
    fd: int


@dataclass(frozen=True, slots=True)
class RingSpec:
    """One ring as the worker starts it (guest-physical addresses)."""

    index: int
    size: int
    desc_addr: int
    avail_addr: int
    used_addr: int
    last_avail_idx: int
    kick_fd: int | None
    call_fd: int | None
    err_fd: int | None
    #: ``log_guest_addr`` while the ring's VHOST_VRING_F_LOG flag is set:
    #: used-ring writes are logged there (see :mod:`virtnet.dirty_log`).
    log_addr: int | None = None


@dataclass(frozen=True, slots=True)
class LogSpec:
    """The dirty log (SET_LOG_BASE): ``size`` bytes at ``offset`` of ``fd``."""

    fd: int
    size: int
    offset: int


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """Everything a worker process needs; every fd in it is the worker's."""

    vm: str
    pair: int
    features: int
    regions: tuple[RegionSpec, ...]
    rx: RingSpec
    tx: RingSpec
    port_kind: str
    port_fd: int | None
    mtu: int = DEFAULT_MTU
    poll_us: int = 0
    cpu: int | None = None
    kick_defer_us: int = KICK_DEFER_US
    #: Set while VHOST_F_LOG_ALL is negotiated (live migration): the worker
    #: marks every page it writes (lock-free: :mod:`virtnet.dirty_log`).
    log: LogSpec | None = None

    def fds(self) -> set[int]:
        out = {r.fd for r in self.regions}
        if self.log is not None:
            out.add(self.log.fd)
        for ring in (self.rx, self.tx):
            out.update(fd for fd in (ring.kick_fd, ring.call_fd, ring.err_fd) if fd is not None)
        if self.port_fd is not None:
            out.add(self.port_fd)
        return out


class Ctl:
    """Control messages between supervisor and worker (one SEQPACKET record each).

    * ``S`` stop: the worker answers ``S`` + rx and tx next-avail indexes (u32
      each: a split ring's u16 index, a packed ring's base), then exits
      without touching guest memory again.
    * ``D`` disable: like ``S``, but first the tx chains the guest has made
      available are consumed and discarded (a disabled ring "must discard
      tx", vhost-user.rst "Ring states"), pushed used and signalled.
    * ``C`` ring has_fd (+ one SCM_RIGHTS fd): new call fd for a ring; the
      worker answers ``c``.
    * ``L`` ring on addr: log the ring's used ring at guest-physical ``addr``
      from now on (``on`` 0: stop); the worker answers ``l``.  Only a worker
      started with the dirty log (VHOST_F_LOG_ALL) writes it.
    """

    STOP = b"S"
    DISABLE = b"D"
    CALL = b"C"
    CALL_ACK = b"c"
    LOG = b"L"
    LOG_ACK = b"l"
    STOP_REPLY = _STOP_REPLY
    CALL_MSG = _CALL_MSG
    LOG_MSG = _LOG_MSG


def _read_used_idx(mem: GuestMemory, used_addr: int) -> int:
    return int(mem.view(used_addr + 2, 2).cast("H")[0])


class Worker:
    """The event loop of one queue pair (runs inside the worker process)."""

    def __init__(
        self,
        spec: WorkerSpec,
        ctl: socket.socket,
        counters: memoryview | None = None,
        port: PortQueue | None = None,
        mem: GuestMemory | None = None,
    ) -> None:
        self.spec = spec
        self.ctl = ctl
        self.name = f"{spec.vm} pair {spec.pair}"
        # ``mem``: the mapping shared by the pairs of one worker process
        # (map_regions); otherwise this worker maps (and closes) the regions.
        self.mem = mem if mem is not None else map_regions(spec.regions)
        self.counters = (
            counters if counters is not None else memoryview(bytearray(8 * NFIELDS)).cast("Q")
        )
        self.counters[_F["pid"]] = os.getpid()
        feats = spec.features
        self.event_idx = bool(feats & NetFeature.EVENT_IDX)
        self.mergeable = bool(feats & NetFeature.MRG_RXBUF)
        self.rx_need = (
            GSO_RX_NEED if feats & _GUEST_GSO else VNET_HDR_LEN + ETH_VLAN_HDR + max(spec.mtu, 68)
        )
        self.port: PortQueue = (
            port if port is not None else attach_queue(spec.port_kind, spec.port_fd)
        )
        self._pending = getattr(self.port, "pending", None)
        self.null_port = spec.port_kind == "null"
        # tap: tx writes inlined (see _tap_tx); other fd ports use send().
        self.tap_fd = self.port.fileno() if spec.port_kind == "tap" else None
        self.port_readable = True
        self.packed = bool(feats & NetFeature.RING_PACKED)
        # VIRTIO_F_IN_ORDER on a split ring: a tx batch is returned with one
        # used entry (DeviceQueue.push_batch).  Packed rings mark every slot
        # of a used buffer anyway (see virtnet.packed), so they gain nothing.
        self.tx_one_entry = bool(feats & NetFeature.IN_ORDER) and not self.packed
        self.rxq: AnyQueue | None = None
        self.txq: AnyQueue | None = None
        self.call = {spec.rx.index: spec.rx.call_fd, spec.tx.index: spec.tx.call_fd}
        self.err = {spec.rx.index: spec.rx.err_fd, spec.tx.index: spec.tx.err_fd}
        # rx reserve: chains popped and not yet used, their buffers, capacity.
        self.reserve: list[Chain] = []
        self.rx_bufs: list[memoryview] = []
        self.rx_cap = 0
        self.rx_stalled = False
        # Small-frame rx reads into the first chain + this bounce buffer;
        # rx_big: recent frames spilled over, read straight into the chains.
        # (one byte more: the tap fast path's truncation sentinel).
        self.rx_bounce = memoryview(bytearray(self.rx_need + 1))
        self.rx_big = False
        self.rx_unpublished = 0  # bytes of frames received, not yet published
        self.errors = 0
        self.rxq = self._queue(spec.rx)
        self.txq = self._queue(spec.tx)
        self.dirty = open_dirty_log(spec.log) if spec.log is not None else None
        if self.dirty is not None:
            for q, ring in ((self.rxq, spec.rx), (self.txq, spec.tx)):
                if q is not None:
                    q.set_dirty_log(self.dirty, ring.log_addr)
        self.kicks = 0
        self.calls = 0
        self.batches = 0
        self.rx_no_buffer = 0
        # Deferred kicks: a tx burst was seen (defer_ok); empty rounds so far.
        self.defer_s = spec.kick_defer_us / 1e6
        self.short_s = min(self.defer_s, KICK_DEFER_SHORT_US / 1e6)
        # The bulk-traffic window: its start (monotonic, port bytes) and the
        # verdict on the previous window.
        self._window_at = 0.0
        self._window_bytes = 0
        self._bulk = False
        self.poll_s = spec.poll_us / 1e6  # busy polling before sleeping (--poll-us)
        self.defer_ok = False
        self.deferred = 0
        # Tx completions pushed but not yet signalled (the guest asked: pending).
        self.tx_signal_pending = False
        self.tx_unsignalled = 0
        self.done = False  # a control message ended this worker (stop, or supervisor gone)
        self.ep = select.epoll()
        self._kick_fds: dict[int, int] = {}
        for ring in (spec.rx, spec.tx):
            if ring.kick_fd is not None:
                try:
                    os.set_blocking(ring.kick_fd, False)
                    self.ep.register(ring.kick_fd, _EPOLLIN)
                except OSError as exc:
                    # A frontend's kick "eventfd" that cannot be polled (a
                    # regular file, ...): that ring cannot be served.
                    self._broken(ring.index, f"kick fd cannot be polled: {exc}")
                    continue
                self._kick_fds[ring.kick_fd] = ring.index
        self.ctl_fd = ctl.fileno()
        self.ep.register(self.ctl_fd, _EPOLLIN)
        self.port_fd = self.port.fileno()
        self._port_polled = False
        if self.port_fd is not None:
            self.ep.register(self.port_fd, _EPOLLIN)
            self._port_polled = True
        self.nofd = any(r.kick_fd is None for r in (spec.rx, spec.tx))

    # -- set-up -----------------------------------------------------------

    def _queue(self, ring: RingSpec) -> AnyQueue | None:
        if self.packed:
            return self._packed_queue(ring)
        try:
            used_idx = _read_used_idx(self.mem, ring.used_addr)
            start = ring.last_avail_idx
            if 0 < (used_idx - start) & 0xFFFF <= ring.size:
                # The used index is ahead of the base: a backend that stopped
                # without answering GET_VRING_BASE (killed) used buffers past
                # the position QEMU took for it.  Nothing before the used
                # index is left to serve; resume there, as QEMU itself does.
                log.warning("%s: ring %d: base %d is behind the used index %d; resuming there",
                            self.name, ring.index, start, used_idx)  # fmt: skip
                start = used_idx
            q = DeviceQueue(
                self.mem,
                ring.size,
                ring.desc_addr,
                ring.avail_addr,
                ring.used_addr,
                event_idx=self.event_idx,
                last_avail_idx=start,
                used_idx=used_idx,
            )
        except PeerError as exc:
            self._broken(ring.index, f"cannot start: {exc}")
            return None
        if (start - used_idx) & 0xFFFF > ring.size:
            self._broken(
                ring.index,
                f"used index {used_idx} is more than the ring size behind"
                f" avail {ring.last_avail_idx}",
            )
            return None
        return q

    def _packed_queue(self, ring: RingSpec) -> PackedDeviceQueue | None:
        """A packed ring: ``desc``/``avail``/``used`` addresses are its
        descriptor ring, driver area and device area (vhost-user
        SET_VRING_ADDR), ``last_avail_idx`` its 32-bit base."""
        try:
            q = PackedDeviceQueue(
                self.mem,
                ring.size,
                ring.desc_addr,
                ring.avail_addr,
                ring.used_addr,
                event_idx=self.event_idx,
                base=ring.last_avail_idx,
            )
        except PeerError as exc:
            self._broken(ring.index, f"cannot start: {exc}")
            return None
        if not is_position(q.desc, q.size, q.used_idx, q.used_wrap):
            # QEMU keeps no packed ring state across a backend restart and
            # sends an old base: the ring itself says where the device stood.
            seen = ring_position(q.desc, q.size)
            if seen is None:
                log.warning("%s: ring %d: base 0x%08x does not match the ring, which does"
                            " not show where it stands; starting at the base",
                            self.name, ring.index, ring.last_avail_idx)  # fmt: skip
            else:
                log.warning("%s: ring %d: base 0x%08x does not match the ring, which was"
                            " used up to slot %d (wrap %d); resuming there",
                            self.name, ring.index, ring.last_avail_idx, *seen)  # fmt: skip
                q.restart_at(*seen)
        q.position = (self.counters, POS_FIELDS[ring.index & 1])
        q.publish_position()
        return q

    def _error(self, index: int | None) -> None:
        """Count one error: per pair, and per ring (``index``) when known."""
        self.errors += 1
        c = self.counters
        c[_F["errors"]] = self.errors
        if index is not None:
            c[_F["tx_errors" if index & 1 else "rx_errors"]] += 1

    def _broken(self, index: int, why: str) -> None:
        """A ring the guest broke: log, count, signal its err fd, never touch it again."""
        log.error("%s: ring %d broken, no longer served: %s", self.name, index, why)
        self._error(index)
        self.counters[_F["broken"]] |= 1 << (index & 1)
        if index == self.spec.rx.index:
            self.rxq = None
            self.reserve.clear()
            self.rx_bufs.clear()
            self.rx_cap = 0
        else:
            self.txq = None
        fd = self.err.get(index)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.write(fd, _EVENTFD_ONE)

    # -- data path --------------------------------------------------------

    def _signal(self, index: int) -> None:
        fd = self.call[index]
        if fd is not None:
            try:
                os.write(fd, _EVENTFD_ONE)
            except OSError as exc:
                if exc.errno != errno.EAGAIN:
                    # Not an eventfd we can signal: say so once, stop using it.
                    log.error("%s: call fd of ring %d unusable, no more interrupts: %s",
                              self.name, index, exc)  # fmt: skip
                    self._error(index)
                    self.call[index] = None
                    os.close(fd)
            self.calls += 1

    def tx_batch(self) -> int:
        """Transmit one batch; the number of chains consumed."""
        q = self.txq
        if q is None:
            return 0
        try:
            chains = q.pop(TX_BATCH)
        except PeerError as exc:
            self._broken(self.spec.tx.index, str(exc))
            return 0
        if not chains:
            return 0
        port = self.port
        if self.null_port:
            # Count and drop in-worker: no per-frame call (NullQueue semantics).
            n = 0
            short = 0
            for ch in chains:
                if ch.out_len < VNET_HDR_LEN:
                    short += 1
                else:
                    n += ch.out_len
            port.tx_packets += len(chains) - short
            port.tx_bytes += n - VNET_HDR_LEN * (len(chains) - short)
            port.tx_dropped += short
        elif self.tap_fd is not None:
            self._tap_tx(chains)
        else:
            send = port.send
            for ch in chains:
                send(ch.out)
        n = len(chains)
        if self.tx_one_entry and isinstance(q, DeviceQueue):
            q.push_batch(chains[-1].head, n)
        else:
            q.push_heads([ch.head for ch in chains])
        if q.should_notify():
            self.tx_signal_pending = True
        if self.tx_signal_pending:
            self.tx_unsignalled += n
            if self.tx_unsignalled >= TX_SIGNAL_CHAINS:
                self.flush_tx_signal()
        if n >= KICK_DEFER_MIN_CHAINS and self.defer_s:
            self.defer_ok = True
        return n

    def flush_tx_signal(self) -> None:
        """Signal the tx completions the guest asked to hear about, if any."""
        if self.tx_signal_pending:
            self.tx_signal_pending = False
            self.tx_unsignalled = 0
            self._signal(self.spec.tx.index)

    def _tap_tx(self, chains: list[Chain]) -> None:
        """``FdQueue.send`` inlined for a tap queue: one ``writev`` per frame, counters once."""
        writev = os.writev
        fd = self.tap_fd
        assert fd is not None
        port = self.port
        sent = 0
        nbytes = 0
        for ch in chains:
            try:
                n = writev(fd, ch.out)
            except OSError:
                port.send(ch.out)  # the port's own error handling (drop, count, raise)
                continue
            if n < VNET_HDR_LEN:
                port.tx_dropped += 1
                continue
            sent += 1
            nbytes += n
        port.tx_packets += sent
        port.tx_bytes += nbytes - VNET_HDR_LEN * sent

    def _refill(self, q: AnyQueue) -> bool:
        """Pop rx chains until the reserve covers one maximal frame; False if short."""
        if not self.mergeable:
            return bool(self.reserve) or self._reserve(q.pop(RX_REFILL))
        need = self.rx_need
        bufs = self.rx_bufs
        while self.rx_cap < need:
            last = self.reserve[-1].in_len if self.reserve else 0
            want = max(RX_REFILL, 1 + (need - self.rx_cap) // last if last else 1)
            if len(bufs) + want > MAX_RX_IOVECS:
                want = max(1, MAX_RX_IOVECS - len(bufs))
            if not self._reserve(q.pop(want)):
                return False
            if len(bufs) >= MAX_RX_IOVECS:
                break
        return True

    def _reserve(self, chains: list[Chain]) -> bool:
        """Add popped rx chains to the reserve; False if there were none."""
        if not chains:
            return False
        self.reserve.extend(chains)
        extend = self.rx_bufs.extend
        cap = self.rx_cap
        for ch in chains:
            extend(ch.in_)
            cap += ch.in_len
        self.rx_cap = cap
        return True

    def rx_batch(self) -> int:
        """Receive up to RX_BATCH frames into guest buffers; frames delivered."""
        q = self.rxq
        if q is None:
            return 0
        used: list[tuple[int, int]] = []
        self.rx_unpublished = 0
        frames = 0
        try:
            if self.tap_fd is not None and self.mergeable and not self.rx_big:
                frames = self._rx_tap_small(q, used)
            if frames < RX_BATCH:
                frames += self._rx_frames(q, used, RX_BATCH - frames)
        except PeerError as exc:
            self._broken(self.spec.rx.index, str(exc))
            return frames
        if self.rx_stalled and not self._has_frame():
            # Stalled means a frame waits for buffers.  A read that found the
            # port empty ends the stall: the port is polled again, not the
            # ring (else the worker re-arms on the posted buffers forever).
            self.rx_stalled = False
        if used:
            q.push(used)
            if q.should_notify():
                self._signal(self.spec.rx.index)
        return frames

    def _rx_publish(self, q: AnyQueue, used: list[tuple[int, int]]) -> None:
        """Publish the frames received so far in this batch (large frames)."""
        self.rx_unpublished = 0
        q.push(used)
        used.clear()
        if q.should_notify():
            self._signal(self.spec.rx.index)

    def _rx_tap_small(self, q: AnyQueue, used: list[tuple[int, int]]) -> int:
        """The common case of a tap and mergeable buffers: frames that fit the
        first chain of the reserve, a chain of one buffer (how Linux posts
        them), each read with one ``readv`` of that buffer and the bounce
        buffer, ``num_buffers`` 1, the port's counters added once.

        The general loop (:meth:`_rx_frames`) takes over at the first frame
        this one does not: a reserve short of a maximal frame, a chain of
        several buffers, or a frame that spilled into the bounce buffer (that
        one is finished here, and reading switches to in place).  Frames
        delivered.
        """
        fd = self.tap_fd
        assert fd is not None
        if not self.port_readable:
            return 0
        readv = os.readv
        reserve = self.reserve
        bufs = self.rx_bufs
        need = self.rx_need
        bounce = self.rx_bounce
        append = used.append
        port = self.port
        hdr_len = VNET_HDR_LEN
        # Chains of the reserve read into: reserve[:i] (and bufs[:i], one
        # buffer each), deleted together before anything else looks at the
        # reserve (a refill, a spilled frame, the way out).
        i = 0
        frames = 0
        nbytes = 0
        budget = RX_BATCH
        last_hl = -1
        room = 0
        view = bounce
        cap = self.rx_cap  # kept in a local between refills
        publish_at = RX_PUBLISH_BYTES - self.rx_unpublished  # nbytes that publishes
        try:
            while budget > 0:
                if cap < need:
                    del reserve[:i]
                    del bufs[:i]
                    i = 0
                    self.rx_cap = cap
                    ok = self._refill(q)
                    cap = self.rx_cap
                    if not ok:
                        break  # short of buffers: the general loop stalls or reads anyway
                head = reserve[i]
                hb = head.in_
                hl = head.in_len
                if len(hb) != 1:
                    break
                if hl != last_hl:
                    if hl < hdr_len:
                        break
                    last_hl = hl
                    room = need - hl if hl < need else 0  # the reserve has that much after it
                    # One byte more than the reserve can take: the tap truncates
                    # silently, so a read that reaches it is a frame cut short.
                    view = bounce[: room + 1]
                try:
                    n = readv(fd, (hb[0], view))
                except BlockingIOError:
                    self.port_readable = False
                    break
                except OSError:
                    break  # the general loop reads again through the port, which handles it
                budget -= 1
                if n <= hl:
                    if n < hdr_len:  # never from a tap; FdQueue.recv_into's rule
                        if n:
                            port.rx_dropped += 1
                        self.port_readable = False
                        break
                    first = hb[0]
                    first[10] = 1  # num_buffers, little-endian u16
                    first[11] = 0
                    append((head.head, n))
                    i += 1
                    cap -= hl
                    frames += 1
                    nbytes += n
                    if nbytes >= publish_at:
                        self._rx_publish(q, used)
                        publish_at = nbytes + RX_PUBLISH_BYTES
                elif n > hl + room:
                    port.rx_dropped += 1  # longer than any frame the guest takes
                else:
                    del reserve[:i]
                    del bufs[:i]
                    i = 0
                    self._unspill(n - hl)
                    self.rx_big = True
                    self.rx_cap = cap
                    self._rx_used(n, used)
                    cap = self.rx_cap
                    frames += 1
                    nbytes += n
                    if nbytes >= publish_at:
                        self._rx_publish(q, used)
                        publish_at = nbytes + RX_PUBLISH_BYTES
                    break
        finally:
            del reserve[:i]
            del bufs[:i]
            self.rx_cap = cap
            self.rx_unpublished = nbytes - (publish_at - RX_PUBLISH_BYTES)
            if frames:
                self.rx_stalled = False
                port.rx_packets += frames
                port.rx_bytes += nbytes - hdr_len * frames
        return frames

    def _rx_frames(self, q: AnyQueue, used: list[tuple[int, int]], limit: int) -> int:
        """Receive up to ``limit`` frames through the port's ``recv_into``."""
        recv = self.port.recv_into
        has_frame = self._has_frame
        reserve = self.reserve
        mergeable = self.mergeable
        need = self.rx_need
        frames = 0
        while frames < limit:
            if not has_frame():
                break
            if (
                self.rx_cap < need
                and not self._refill(q)
                and (not reserve or len(reserve) < q.size // 2)
            ):
                # Not enough guest buffers for a maximal frame: leave the
                # frame where it is (the port queues or counts it) and wait
                # for the guest's kick.  (With half the ring already in the
                # reserve we read anyway -- the guest may never post more
                # -- and a frame longer than the reserve is a counted drop.)
                if not self.rx_stalled:
                    self.rx_no_buffer += 1
                self.rx_stalled = True
                break
            self.rx_stalled = False
            # Hand the port only the buffers one maximal frame needs (fewer
            # iovecs per readv); usually the first chain alone.
            head = reserve[0]
            spill = -1  # >= 0: bytes past this offset went to the bounce buffer
            if head.in_len >= need or not mergeable:
                iov: Sequence[memoryview] = head.in_
            elif self.rx_big:
                # Large frames lately (GSO): every buffer a maximal frame
                # may need, read in place.
                total = 0
                nb = 0
                for ch in reserve:
                    total += ch.in_len
                    nb += len(ch.in_)
                    if total >= need:
                        break
                iov = self.rx_bufs[:nb]
            else:
                # Small frames lately: the first chain plus a bounce
                # buffer for the rest of what the reserve can take (two
                # iovecs, not the ~40 that cover 64 KiB of guest buffers).
                iov = head.in_
                room = min(need, self.rx_cap) - head.in_len
                if room > 0:
                    spill = head.in_len  # may be 0: a chain without writable bytes
                    iov = (*iov, self.rx_bounce[:room])
            n = recv(iov)
            if n <= 0:
                self.port_readable = False
                continue
            if spill >= 0:
                if n > spill:
                    self._unspill(n - spill)
                    self.rx_big = True
            elif self.rx_big and n <= head.in_len:
                self.rx_big = False
            self._rx_used(n, used)
            frames += 1
            self.rx_unpublished += n
            if self.rx_unpublished >= RX_PUBLISH_BYTES:
                self._rx_publish(q, used)
        return frames

    def _rx_used(self, n: int, used: list[tuple[int, int]]) -> None:
        """A frame of ``n`` bytes was read into the front of the reserve: its
        used entries, ``num_buffers``, and the chains taken off the reserve."""
        reserve = self.reserve
        bufs = self.rx_bufs
        mergeable = self.mergeable
        first = bufs[0]
        k = 0
        left = n
        nbufs = 0
        while True:
            ch = reserve[k]
            k += 1
            nbufs += len(ch.in_)
            cl = ch.in_len
            self.rx_cap -= cl
            if cl >= left or not mergeable:
                used.append((ch.head, left if cl >= left else cl))
                break
            used.append((ch.head, cl))
            left -= cl
        if first.nbytes >= VNET_HDR_LEN:
            first[10] = k & 0xFF
            first[11] = k >> 8
        else:
            self._write_num_buffers(bufs, k)
        del reserve[:k]
        del bufs[:nbufs]

    def _unspill(self, left: int) -> None:
        """Copy the ``left`` bytes a frame put in the bounce buffer into the
        buffers of the reserve's chains after the first (they have room: the
        bounce buffer handed to the port is never longer than they are)."""
        src = self.rx_bounce
        pos = 0
        for ch in self.reserve[1:]:
            for b in ch.in_:
                take = min(b.nbytes, left - pos)
                b[:take] = src[pos : pos + take]
                pos += take
                if pos >= left:
                    return

    @staticmethod
    def _write_num_buffers(bufs: Sequence[memoryview], k: int) -> None:
        """num_buffers at header bytes 10..11 when the header spans buffers."""
        val = (k & 0xFF, k >> 8)
        pos = 0
        for b in bufs:
            for j in range(b.nbytes):
                if pos + j in (10, 11):
                    b[j] = val[pos + j - 10]
            pos += b.nbytes
            if pos >= VNET_HDR_LEN:
                return

    def _has_frame(self) -> bool:
        """Whether a frame may be waiting on the port for the rx ring (no
        syscall); never while the rx ring is broken: nothing will take it."""
        if self.rxq is None:
            return False
        if self.port_fd is not None:
            return self.port_readable
        pending = self._pending
        return pending is not None and pending() > 0

    def publish(self) -> None:
        c = self.counters
        p = self.port
        c[0] = p.rx_packets
        c[1] = p.rx_bytes
        c[2] = p.rx_dropped
        c[3] = self.rx_no_buffer
        c[4] = p.tx_packets
        c[5] = p.tx_bytes
        c[6] = p.tx_dropped
        c[8] = self.kicks
        c[9] = self.calls
        c[10] = self.batches

    # -- control ----------------------------------------------------------

    def _ctl_ready(self) -> bool:
        """Handle control messages; False when the worker must exit."""
        while True:
            try:
                data, anc, _flags, _addr = self.ctl.recvmsg(16, socket.CMSG_SPACE(4 * 4))
            except (BlockingIOError, InterruptedError):
                return True
            fds: list[int] = []
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    arr = array.array("i")
                    arr.frombytes(payload[: len(payload) - len(payload) % 4])
                    fds.extend(arr)
            if not data:
                for fd in fds:
                    os.close(fd)
                log.info("%s: supervisor gone, exiting", self.name)
                return False
            op = data[:1]
            if op in (Ctl.STOP, Ctl.DISABLE):
                for fd in fds:
                    os.close(fd)
                if op == Ctl.DISABLE:
                    self.discard_tx()
                self.stop_reply()
                return False
            if op == Ctl.CALL and len(data) == Ctl.CALL_MSG.size:
                _, index, has_fd = Ctl.CALL_MSG.unpack(data)
                new = fds.pop(0) if has_fd and fds else None
                for fd in fds:
                    os.close(fd)
                if index in self.call:
                    old = self.call[index]
                    self.call[index] = new
                    if old is not None:
                        os.close(old)
                elif new is not None:
                    os.close(new)
                self.ctl.send(Ctl.CALL_ACK)
                continue
            if op == Ctl.LOG and len(data) == Ctl.LOG_MSG.size:
                for fd in fds:
                    os.close(fd)
                _, index, on, addr = Ctl.LOG_MSG.unpack(data)
                for q, ring in ((self.rxq, self.spec.rx), (self.txq, self.spec.tx)):
                    if q is not None and ring.index == index:
                        q.set_dirty_log(q.dirty, addr if on else None)
                self.ctl.send(Ctl.LOG_ACK)
                continue
            for fd in fds:
                os.close(fd)
            log.error("%s: unknown control message %r", self.name, data[:8])

    def discard_tx(self) -> int:
        """Consume and drop every available tx chain (ring being disabled)."""
        q = self.txq
        if q is None:
            return 0
        n = 0
        try:
            for _ in range(q.size // TX_BATCH + 1):
                chains = q.pop(TX_BATCH)
                if not chains:
                    break
                q.push_heads([ch.head for ch in chains])
                n += len(chains)
        except PeerError as exc:
            self._broken(self.spec.tx.index, str(exc))
            return n
        self.port.tx_dropped += n
        if n and q.should_notify():
            self.tx_signal_pending = True
        self.flush_tx_signal()
        return n

    def next_avail(self) -> tuple[int, int]:
        """Give back the rx reserve; the (rx, tx) next-avail indexes to report."""
        spec = self.spec
        if self.rxq is not None:
            self.rxq.unpop(len(self.reserve))
            self.reserve.clear()
            self.rx_bufs.clear()
            self.rx_cap = 0
            rx = self.rxq.base()
        else:
            rx = self._fallback(spec.rx)
        tx = self.txq.base() if self.txq is not None else self._fallback(spec.tx)
        return rx, tx

    def _fallback(self, ring: RingSpec) -> int:
        if self.packed:
            return ring.last_avail_idx
        try:
            return _read_used_idx(self.mem, ring.used_addr)
        except PeerError:
            return ring.last_avail_idx

    def stop_reply(self) -> None:
        self.flush_tx_signal()
        rx, tx = self.next_avail()
        self.publish()
        self.rxq = self.txq = None
        self.ctl.send(Ctl.STOP_REPLY.pack(Ctl.STOP, rx, tx))

    # -- loop -------------------------------------------------------------

    def _drain(self, fd: int) -> None:
        with contextlib.suppress(OSError):
            os.read(fd, 8)
        self.kicks += 1

    def _notify(self, on: bool) -> bool:
        """Enable/disable tx kicks (and rx kicks while stalled); True = work appeared."""
        more = False
        try:
            if self.txq is not None:
                more = self.txq.enable_notify(on) or more
            if self.rxq is not None:
                if on and self.rx_stalled:
                    more = self.rxq.enable_notify(True) or more
                elif not on:
                    self.rxq.enable_notify(False)
        except PeerError as exc:
            log.error("%s: ring error while arming notifications: %s", self.name, exc)
            self._error(None)
        return more

    def _set_port_polled(self, on: bool) -> None:
        if self.port_fd is not None and on != self._port_polled:
            self.ep.modify(self.port_fd, _EPOLLIN if on else 0)
            self._port_polled = on

    def _handle_events(self, events: list[tuple[int, int]]) -> bool:
        kick_fds = self._kick_fds
        for fd, ev in events:
            if fd == self.ctl_fd:
                if not self._ctl_ready():
                    return False
            elif fd in kick_fds:
                self._drain(fd)
                if kick_fds[fd] == self.spec.rx.index:
                    self.rx_stalled = False
            elif fd == self.port_fd:
                self.port_readable = True
                if ev & (_EPOLLHUP | _EPOLLERR):
                    self._port_gone()
        return True

    def _port_gone(self) -> None:
        """The host side hung up (switch process or tap gone): stop polling it,
        keep tx counted; serve gives the pair a new queue (a new worker).  Not a
        ring error (those are the guest's): serve logs the port's loss and
        counts its recovery (the switch's restarts)."""
        fd = self.port_fd
        if fd is None:
            return
        log.warning(
            "%s: port queue fd hung up (switch process or tap gone); tx is dropped and"
            " rx stops until serve opens the port again",
            self.name,
        )
        with contextlib.suppress(OSError):
            self.ep.unregister(fd)
        self.port_fd = None
        self._port_polled = False
        self._pending = None
        self.port_readable = False

    def run(self) -> None:
        """Serve until stopped; returns after the stop reply was sent."""
        self.start()
        step = self.step
        idle_timeout = NOFD_POLL_S if self.nofd else -1.0
        while not self.done:
            step(idle_timeout)

    def step(self, timeout: float) -> str:
        """One pass of the loop :meth:`run` repeats: "work" (a batch done),
        "spin" (busy polling found work or an event), "defer" (a deferral
        round after a tx burst), "rearm" (work showed up while arming), or
        "slept" (in ``epoll``, ``timeout`` seconds at most, -1 for ever).
        The loop ends once :attr:`done`."""
        if self.work():
            self._handle_ready()
            return "work"
        poll_s = self.poll_s
        if poll_s and self._spin(poll_s):
            return "spin"
        look = self.defer()
        if look is not None:
            wait_readable(self.ep.fileno(), look)
            self._handle_ready()
            return "defer"
        if self.arm():
            return "rearm"
        self.wake(self.ep.poll(timeout))
        return "slept"

    def _handle_ready(self) -> None:
        """Handle the events ready now (no wait)."""
        events = self.ep.poll(0)
        if events:
            self.handle(events)

    # The steps of the loop, shared by run() and WorkerGroup.step().

    def start(self) -> None:
        self.ctl.setblocking(False)
        self._notify(False)

    def work(self) -> int:
        """One tx and one rx batch; the chains and frames done."""
        did = self.tx_batch()
        if self.rx_stalled or self._has_frame():
            did += self.rx_batch()
        if did:
            self.deferred = 0  # awake and busy: deferral rounds count idle looks only
            self.batches += 1
            self.publish()
        want = self._port_wanted()
        if self._port_polled != want:
            # Stalled: the port's readiness would wake the loop for nothing
            # (rx is retried every pass until the guest posts buffers); nor
            # is the port of a broken rx ring read again.
            self._set_port_polled(want)
        return did

    def _port_wanted(self) -> bool:
        """Whether the loop should wake for the port: rx is served and not stalled."""
        return self.rxq is not None and not self.rx_stalled

    def handle(self, events: list[tuple[int, int]]) -> None:
        """Handle ``events`` while awake; sets :attr:`done` when a control
        message ended the worker."""
        if not self._handle_events(events):
            self.done = True

    def defer(self) -> float | None:
        """Idle after a tx burst: the seconds until the next look at the tx
        ring (kicks still off), or None to arm instead; signals the pending
        tx completions once the ring stayed empty for a whole round."""
        if not self.defer_ok or self.deferred >= KICK_DEFER_ROUNDS:
            return None
        if self.deferred:
            self.flush_tx_signal()  # the guest may be waiting for them
        self.deferred += 1
        # Long looks only while bulk traffic flows: a frame queued meanwhile
        # waits for the look, which a stream does not notice and a peer
        # waiting for an answer does.
        return self.defer_s if self.bulk_traffic() else self.short_s

    def bulk_traffic(self) -> bool:
        """Whether the pair moves :data:`KICK_DEFER_BULK_BYTES_PER_S` or more,
        judged over windows of at least ``kick_defer_us``: the current window
        once it has moved that much, else the previous window's verdict."""
        now = time.monotonic()
        port = self.port
        total = port.rx_bytes + port.tx_bytes
        moved = total - self._window_bytes
        elapsed = now - self._window_at
        if elapsed >= self.defer_s:  # the window is over: judge it, start the next
            self._bulk = moved >= KICK_DEFER_BULK_BYTES_PER_S * elapsed
            self._window_at, self._window_bytes = now, total
            return self._bulk
        return self._bulk or moved >= KICK_DEFER_BULK_BYTES_PER_S * self.defer_s

    def arm(self) -> bool:
        """Going to sleep: signal pending tx completions, ask for kicks, then
        re-check (virtio 1.3 2.7.10 race).

        True (notifications off again) when work showed up meanwhile.
        """
        self.defer_ok = False
        self.deferred = 0
        self.flush_tx_signal()
        self._set_port_polled(self._port_wanted())
        if self._notify(True) or (not self.rx_stalled and self._has_frame()):
            self._notify(False)
            return True
        return False

    def disarm(self) -> None:
        """Notifications off again (awake, serving)."""
        self._notify(False)

    def wake(self, events: list[tuple[int, int]]) -> None:
        """After the sleep: notifications off, handle ``events``."""
        self.disarm()
        self.handle(events)
        if not self.done:
            self._set_port_polled(self._port_wanted())

    def pending_work(self) -> bool:
        """Busy-poll check without a syscall on the rings: tx available or a
        frame queued on an fd-less port."""
        txq = self.txq
        if txq is not None and txq.has_available():
            return True
        return self.port_fd is None and self._has_frame()

    def _spin(self, seconds: float) -> bool:
        """Busy-poll rings and port for ``seconds``; True when work (or a stop) showed up."""
        ep_poll = self.ep.poll
        pending_work = self.pending_work
        events: list[tuple[int, int]] = []

        def ready() -> bool:
            nonlocal events
            events = ep_poll(0)
            return bool(events) or pending_work()

        if not spin_until(seconds, ready):
            return False
        if events:
            self.handle(events)
        return True


def spin_until(seconds: float, ready: Callable[[], bool]) -> bool:
    """Busy-poll ``ready()`` for up to ``seconds``; True as soon as it is
    (``--poll-us``: one pair's loop and a group's share this)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if ready():
            return True
    return False


def open_dirty_log(spec: LogSpec) -> DirtyLog:
    """Map the dirty log shared (the mapping lives as long as the process)."""
    try:
        m = mmap.mmap(spec.fd, spec.offset + spec.size, mmap.MAP_SHARED)
    except (OSError, ValueError) as exc:
        raise PeerError(f"cannot map the dirty log: {exc}") from None
    return DirtyLog(memoryview(m)[spec.offset : spec.offset + spec.size])


def region_mappings(regions: Sequence[RegionSpec | RegionInfo]) -> list[MemoryRegion]:
    """Map each guest memory region and close its fd (the mappings stay)."""
    maps = [
        MemoryRegion.from_fd(
            r.fd,
            guest_addr=r.guest_addr,
            size=r.size,
            user_addr=r.user_addr,
            mmap_offset=r.mmap_offset,
        )
        for r in regions
    ]
    for r in regions:
        os.close(r.fd)
    return maps


def map_regions(regions: Sequence[RegionSpec]) -> GuestMemory:
    """The guest memory of a worker process (:func:`region_mappings`)."""
    return GuestMemory(region_mappings(regions))


def run_group(workers: Sequence[Worker]) -> None:
    """Serve several pairs in one process until every one of them is stopped
    (:class:`WorkerGroup`; one pair runs its own loop)."""
    if len(workers) == 1:
        workers[0].run()
        return
    WorkerGroup(workers).run()


class WorkerGroup:
    """Several pairs served by one process.

    One ``epoll`` over the workers' own epoll fds: the process sleeps once for
    all its pairs, and a kick on one pair that arrives while another is being
    served costs no wake-up.  Each pair keeps its own control socket, stop
    reply and counters; a stopped pair leaves the loop, the others go on.
    """

    def __init__(self, workers: Sequence[Worker]) -> None:
        self.live = list(workers)
        self.outer = select.epoll()
        self._by_fd = {w.ep.fileno(): w for w in self.live}
        self.poll_s = max(w.poll_s for w in self.live)
        self.idle_timeout = NOFD_POLL_S if any(w.nofd for w in self.live) else -1.0

    @property
    def done(self) -> bool:
        """Every pair has stopped."""
        return not self.live

    def start(self) -> None:
        for w in self.live:
            w.start()
            self.outer.register(w.ep.fileno(), _EPOLLIN)

    def run(self) -> None:
        """Serve until every pair is stopped."""
        self.start()
        try:
            while self.live:
                self.step(self.idle_timeout)
        finally:
            self.close()

    def close(self) -> None:
        self.outer.close()

    def step(self, timeout: float) -> str:
        """One pass of the loop :meth:`run` repeats, with the outcomes of
        :meth:`Worker.step` ("work" also when a pair stopped)."""
        live = self.live
        outer = self.outer
        did = 0
        for w in live:
            did += w.work()
        # Every pass, not only when idle: a busy pair must not starve the
        # others' port readiness, kicks and control messages.
        for fd, _ in outer.poll(0):
            w = self._by_fd[fd]
            w.handle(w.ep.poll(0))
        if self._retire() or did:
            return "work"
        if self.poll_s and self._spin(self.poll_s):
            return "spin"
        looks = [look for look in (w.defer() for w in live) if look is not None]
        if looks:
            wait_readable(outer.fileno(), min(looks))
            return "defer"
        if self._arm_all():
            return "rearm"
        ready = {fd for fd, _ in outer.poll(timeout)}
        for w in live:
            if w.ep.fileno() in ready:
                w.wake(w.ep.poll(0))
            else:
                w.disarm()
        self._retire()
        return "slept"

    def _retire(self) -> bool:
        """Drop the workers that are done; True if any was."""
        done = [w for w in self.live if w.done]
        for w in done:
            self.live.remove(w)
            with contextlib.suppress(OSError, ValueError):
                self.outer.unregister(w.ep.fileno())
        return bool(done)

    def _arm_all(self) -> bool:
        """Arm every worker; True (all disarmed again) when one of them has work."""
        live = self.live
        for i, w in enumerate(live):
            if w.arm():
                for other in live[:i]:
                    other.disarm()
                return True
        return False

    def _spin(self, seconds: float) -> bool:
        """Busy-poll every pair for ``seconds``; True when work or an event
        showed up (the next pass handles the events)."""
        live = self.live
        poll = self.outer.poll
        return spin_until(seconds, lambda: bool(poll(0)) or any(w.pending_work() for w in live))


def wait_readable(fd: int, seconds: float) -> None:
    """Wait up to ``seconds`` (microsecond resolution, unlike ``epoll``'s
    milliseconds) for ``fd`` -- an epoll fd: any of its fds -- to be readable."""
    if fd < _FD_SETSIZE:
        select.select([fd], [], [], seconds)
    else:  # select() cannot take it: sleep blind for the (short) round
        time.sleep(seconds)


def worker_main(
    specs: Sequence[WorkerSpec], ctl_fds: Sequence[int], counters: Sequence[memoryview | None]
) -> int:
    """Entry point inside a worker process serving ``specs`` (pairs of one VM,
    sharing one memory table), forked by :func:`spawn_workers` with only the
    specs' fds and ``ctl_fds`` left open; returns the exit status."""
    first = specs[0]
    label = f"{first.vm} pair{'s' if len(specs) > 1 else ''} {','.join(str(s.pair) for s in specs)}"
    if first.cpu is not None:
        try:
            os.sched_setaffinity(0, {first.cpu})
        except OSError as exc:
            log.warning("%s: cannot pin to CPU %d: %s", label, first.cpu, exc)
    ctls = [socket.socket(fileno=fd) for fd in ctl_fds]
    try:
        mem = map_regions(first.regions)
        workers = [
            Worker(spec, ctl, slot, mem=mem)
            for spec, ctl, slot in zip(specs, ctls, counters, strict=True)
        ]
    except PeerError as exc:
        log.error("%s: cannot start: %s", label, exc)
        _answer_stops(specs, ctls)
        return 3
    log.debug("%s: worker %d running", label, os.getpid())
    run_group(workers)
    return 0


def _answer_stops(specs: Sequence[WorkerSpec], ctls: Sequence[socket.socket]) -> None:
    """A worker that could not start: answer each pair's stop with the indexes it was given."""
    waiting = dict(zip(ctls, specs, strict=True))
    while waiting:
        try:
            ready, _, _ = select.select(list(waiting), [], [])
        except OSError:
            return
        for ctl in ready:
            spec = waiting.pop(ctl)
            with contextlib.suppress(OSError):
                if ctl.recv(16)[:1] in (Ctl.STOP, Ctl.DISABLE):
                    ctl.send(
                        Ctl.STOP_REPLY.pack(
                            Ctl.STOP, spec.rx.last_avail_idx, spec.tx.last_avail_idx
                        )
                    )


def spawn_worker(spec: WorkerSpec, counters: memoryview | None = None) -> tuple[int, socket.socket]:
    """Fork a worker for one pair; returns (pid, supervisor end of its control socket)."""
    pid, ctls = spawn_workers([spec], [counters])
    return pid, ctls[0]


def spawn_workers(
    specs: Sequence[WorkerSpec],
    counters: Sequence[memoryview | None],
    *,
    hold: int | None = None,
) -> tuple[int, list[socket.socket]]:
    """Fork one worker process serving the pairs in ``specs``; returns (pid,
    the supervisor ends of one control socket per pair, in ``specs`` order).

    The specs share one memory table (the same region fds).  The child keeps
    only the fds named in ``specs`` (its own copies after the fork), its
    control sockets and ``hold`` (the frontend's connection: never used, only
    kept open until the child exits); the caller still owns (and should
    close) its copies.
    """
    if not specs or len(specs) != len(counters):
        raise ValueError("spawn_workers: one counter slot per spec, at least one spec")
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in specs]
    ctl_fds = [theirs.fileno() for _, theirs in pairs]
    keep = set(ctl_fds)
    if hold is not None:
        keep.add(hold)
    for spec in specs:
        keep |= spec.fds()
    try:
        pid = fork_child(
            lambda: worker_main(specs, ctl_fds, counters),
            keep,
            f"{specs[0].vm} pair {specs[0].pair}: worker",
        )
    except BaseException:
        for mine, theirs in pairs:
            mine.close()
            theirs.close()
        raise
    for _, theirs in pairs:
        theirs.close()
    return pid, [mine for mine, _ in pairs]
