"""Supervisor: one :class:`~virtnet.vhost_user.backend.BackendEvents` per VM connection,
one forked worker process per running queue pair (or, with ``workers=N``, at
most N processes, pair ``p`` in process ``p % N``).

:class:`VmPort` is a VM's side of the host port (its port queues, offloads,
enabled pairs and shared counters); it lives as long as the VM's socket, so
a reconnecting frontend gets the same tap queues and counters.
:class:`Supervisor` lives as long as one frontend connection and keeps, per
ring, the latest config with its *own* duplicates of the kick/call/err fds,
and per pair the worker's pid and control socket.

Invariants:

* A pair's worker runs iff both its rings are started and enabled and a
  memory table is known; it is stopped (synchronously, with
  :data:`STOP_TIMEOUT`) before any callback that changes what it uses
  returns: ring stop, disable, memory table, reset.  The next-avail indexes
  the worker reports are kept per ring and returned by ``on_ring_stop``
  (GET_VRING_BASE) and used when the pair is restarted.
* Grouped pairs (``workers=N``): stopping a pair leaves its process serving
  the others; starting a pair whose process already runs stops that process's
  pairs (each reports its indexes) and forks it again with all of them -- a
  running process takes no new rings.  The process is reaped with its last
  pair; a process that dies takes every pair it served with it, and each is
  restarted like a single worker.
* A worker that does not answer in time is killed; a worker that died is
  logged and restarted from its rings' used indexes in guest memory (the
  worker pushes used entries in pop order, so the used index is exactly
  where it stood), at most :data:`MAX_RESTARTS` times per
  :data:`RESTART_WINDOW_S`; the other pairs are untouched.
* The supervisor closes every fd it dup'ed: ring fds when replaced or at
  stop, region fds when the table changes or the connection closes.  The
  worker closes the copies it inherited that are not in its spec.
* Per-pair counters live in an anonymous shared mapping of the
  :class:`VmPort`; totals of finished workers are folded into a base so
  counters only grow across worker restarts and reconnections.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import mmap
import os
import signal
import socket
import time
from dataclasses import dataclass

from virtnet.errors import PeerError, UsageError
from virtnet.net import NetFeature, hdr_len
from virtnet.ports.base import VNET_HDR_LEN, Offload, Port, PortQueue
from virtnet.vhost_user.backend import LOG_ALL, Backend, RegionInfo, RingConfig
from virtnet.vhost_user.codec import VRING_ADDR_F_LOG
from virtnet.vhost_user.worker import (
    FIELDS,
    KICK_DEFER_US,
    MAX_KICK_DEFER_US,
    NFIELDS,
    POS_FIELDS,
    Ctl,
    LogSpec,
    RegionSpec,
    RingSpec,
    WorkerSpec,
    spawn_workers,
)

__all__ = [
    "MAX_RESTARTS",
    "RESTART_WINDOW_S",
    "STOP_TIMEOUT",
    "Supervisor",
    "VmPort",
    "feature_names",
]

log = logging.getLogger(__name__)

#: Seconds to wait for a worker's stop reply (GET_VRING_BASE waits on it).
STOP_TIMEOUT = 2.0
#: Seconds to wait for a worker's call-fd acknowledgement.
CALL_TIMEOUT = 2.0
#: Seconds to wait for a stopped worker to exit before SIGKILL.
EXIT_TIMEOUT = 2.0
#: A pair whose worker died this many times within RESTART_WINDOW_S is given up.
MAX_RESTARTS = 5
RESTART_WINDOW_S = 10.0

_GUEST_OFFLOADS = {
    NetFeature.GUEST_CSUM: Offload.CSUM,
    NetFeature.GUEST_TSO4: Offload.TSO4,
    NetFeature.GUEST_TSO6: Offload.TSO6,
    NetFeature.GUEST_ECN: Offload.TSO_ECN,
    NetFeature.GUEST_UFO: Offload.UFO,
}


def feature_names(features: int) -> str:
    """``VERSION_1|MQ|...`` for the known bits, plus any unknown ones in hex."""
    names = []
    rest = features
    for f in NetFeature:
        if f.name and features & f.value and f.value.bit_count() == 1:
            names.append(f.name)
            rest &= ~f.value
    if rest & (1 << 30):
        names.append("PROTOCOL_FEATURES")
        rest &= ~(1 << 30)
    if rest & LOG_ALL:
        names.append("LOG_ALL")
        rest &= ~LOG_ALL
    if rest:
        names.append(f"0x{rest:x}")
    return "|".join(names) or "none"


def port_kind(port: Port) -> str:
    """The :func:`~virtnet.ports.base.attach_queue` kind of ``port``."""
    name = type(port).__name__
    return {
        "TapPort": "tap",
        "SwitchPort": "switch",
        "LoopbackPort": "loopback",
        "NullPort": "null",
    }.get(name, name.lower())


class VmPort:
    """One VM's side of the port: queues, enabled pairs, offloads, counters."""

    def __init__(self, vm_id: str, port: Port, max_pairs: int) -> None:
        self.vm_id = vm_id
        self.port = port
        self.kind = port_kind(port)
        self.max_pairs = max_pairs
        self.queues: dict[int, PortQueue] = {}
        self.enabled: set[int] = set()
        self._shm = mmap.mmap(-1, 8 * NFIELDS * max_pairs)  # MAP_SHARED | MAP_ANONYMOUS
        self.slots = memoryview(self._shm).cast("Q")
        self.base = [[0] * NFIELDS for _ in range(max_pairs)]
        self.restarts = [0] * max_pairs
        #: The MTU the VM's NIC announced (NET_SET_MTU), None until it does.
        self.guest_mtu: int | None = None
        self._mtu_done: int | None = None  # the guest MTU the tap was last checked for
        self._attach_failed = False  # a tap queue could not be attached: the tap is gone

    def slot(self, pair: int) -> memoryview:
        return self.slots[pair * NFIELDS : (pair + 1) * NFIELDS]

    def queue_fd(self, pair: int) -> int | None:
        """A fresh duplicate of the pair's port queue fd (None for fd-less ports)."""
        q = self.queues.get(pair)
        if q is None:
            q = self.port.open_queue(self.vm_id, pair)
            self.queues[pair] = q
            if self.kind == "tap":
                # A new tap queue is attached; follow the pair's enable state.
                self._tap_enable(pair, pair in self.enabled)
                self._tap_mtu()  # the first queue may have created the tap
        fd = q.fileno()
        return None if fd is None else os.dup(fd)

    def fold(self, pair: int) -> None:
        """A worker of ``pair`` ended: add its counters to the base, clear the
        slot (its ring positions too: they were the ended worker's)."""
        s = self.slot(pair)
        b = self.base[pair]
        for i, name in enumerate(FIELDS):
            if name not in ("pid", "broken"):
                b[i] += s[i]
            s[i] = 0
        for i in POS_FIELDS:
            s[i] = 0

    def set_enabled(self, pair: int, on: bool) -> None:
        if on:
            self.enabled.add(pair)
        else:
            self.enabled.discard(pair)
        if self.kind == "tap" and pair in self.queues:
            self._tap_enable(pair, on)
        elif self.kind == "switch":
            n = 0
            while n in self.enabled:
                n += 1
            set_active = getattr(self.port, "set_active_pairs", None)
            if set_active is not None:
                set_active(self.vm_id, max(1, n))

    def set_guest_mtu(self, mtu: int) -> None:
        """The VM's NIC announced ``mtu`` (NET_SET_MTU, already range-checked)."""
        self.guest_mtu = mtu
        if self.kind == "tap" and self.queues:
            self._tap_mtu()

    def _tap_mtu(self) -> None:
        """Raise the MTU of a tap serve created to the guest's; warn when a tap
        that existed has a smaller one (host->guest frames over it are lost)."""
        want = self.guest_mtu
        get_mtu = getattr(self.port, "mtu", None)
        if want is None or want == self._mtu_done or get_mtu is None:
            return
        self._mtu_done = want
        have = get_mtu()
        if have is None or have >= want:
            return
        name = getattr(self.port, "ifname", "?")
        set_mtu = getattr(self.port, "set_mtu", None)
        if getattr(self.port, "created", False) and set_mtu is not None:
            try:
                set_mtu(want)
            except UsageError as exc:
                log.warning("%s: %s", self.vm_id, exc)
            else:
                log.info("%s: tap %s MTU %d, the guest's", self.vm_id, name, want)
            return
        log.warning(
            "%s: the guest's MTU is %d but tap %s's is %d: the host cannot send the guest"
            " frames over %d bytes; raise it with 'ip link set dev %s mtu %d'",
            self.vm_id, want, name, have, have, name, want,
        )  # fmt: skip

    def _tap_enable(self, pair: int, on: bool) -> None:
        set_queue_enabled = getattr(self.port, "set_queue_enabled", None)
        if set_queue_enabled is None:
            return
        try:
            set_queue_enabled(pair, on)
        except UsageError as exc:
            log.error("%s: %s", self.vm_id, exc)
            # Attaching fails only when the interface is gone (TUNSETQUEUE:
            # EINVAL on a queue of a deleted tap); serve opens it again.
            self._attach_failed = self._attach_failed or on

    def set_features(self, features: int) -> None:
        """Tell the port which offloads the guest takes on rx."""
        offloads = {o for f, o in _GUEST_OFFLOADS.items() if features & f}
        if Offload.CSUM not in offloads:
            offloads = set()
        if self.kind == "tap":
            set_offloads = getattr(self.port, "set_offloads", None)
            if set_offloads is not None:
                try:
                    set_offloads(frozenset(offloads))
                except UsageError as exc:
                    log.error("%s: %s", self.vm_id, exc)
        elif self.kind == "switch":
            set_rx = getattr(self.port, "set_rx_offloads", None)
            if set_rx is not None:
                set_rx(self.vm_id, sorted(offloads, key=lambda o: o.value))

    def snapshot(self) -> list[dict[str, int]]:
        """Per-pair counters (totals over every worker of this VM)."""
        out = []
        for p in range(self.max_pairs):
            s = self.slot(p)
            b = self.base[p]
            row = {name: b[i] + s[i] for i, name in enumerate(FIELDS)}
            row["pid"] = s[FIELDS.index("pid")]
            row["broken"] = s[FIELDS.index("broken")]
            row["enabled"] = int(p in self.enabled)
            row["restarts"] = self.restarts[p]
            out.append(row)
        return out

    def drop_queues(self) -> None:
        """Close every port queue (their host side is gone: a switch process
        that died, a tap that was deleted); the next :meth:`queue_fd` of each
        pair opens a new one."""
        for q in self.queues.values():
            with contextlib.suppress(OSError):
                q.close()
        self.queues.clear()
        forget = getattr(self.port, "drop_queues", None)
        if forget is not None:
            forget()
        self._mtu_done = None
        self._attach_failed = False

    def port_lost(self) -> bool:
        """Whether the host side of this VM's queues is gone (a tap that was
        deleted: its queues answer EBADFD, or one could not be attached again);
        the switch process's death is the daemon's to see."""
        if not self.queues:
            return False
        lost = getattr(self.port, "lost", None)
        return self._attach_failed or (lost is not None and bool(lost()))

    def close(self) -> None:
        for q in self.queues.values():
            with contextlib.suppress(OSError):
                q.close()
        self.queues.clear()
        self.slots.release()
        self._shm.close()


@dataclass
class _Ring:
    config: RingConfig | None = None
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    started: bool = False
    enabled: bool = False
    next_avail: int = 0


@dataclass
class _Proc:
    pid: int
    ctl: socket.socket


def _dup(fd: int | None) -> int | None:
    return None if fd is None else os.dup(fd)


def _close(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


class Supervisor:
    """BackendEvents for one frontend connection; forks and reaps the workers."""

    def __init__(
        self,
        vm: VmPort,
        *,
        poll_us: int = 0,
        cpus: tuple[int, ...] = (),
        workers: int = 0,
        kick_defer_us: int = KICK_DEFER_US,
    ) -> None:
        """``workers``: at most this many worker processes for this VM, pair
        ``p`` served by process ``p % workers`` (0: one process per pair).
        ``poll_us``, ``kick_defer_us``: the workers' (:class:`WorkerSpec`)."""
        if workers < 0:
            raise UsageError(f"workers must be >= 0, not {workers}")
        if not 0 <= kick_defer_us <= MAX_KICK_DEFER_US:
            raise UsageError(f"kick_defer_us must be 0..{MAX_KICK_DEFER_US}, not {kick_defer_us}")
        self.vm = vm
        self.name = vm.vm_id
        self.poll_us = poll_us
        self.kick_defer_us = kick_defer_us
        self.cpus = cpus
        self.nworkers = workers if 0 < workers < vm.max_pairs else 0
        self.backend: Backend | None = None
        self.features = 0
        self.mtu = 1500
        self.regions: tuple[RegionSpec, ...] = ()
        self.rings = [_Ring() for _ in range(2 * vm.max_pairs)]
        self.workers: dict[int, _Proc] = {}
        # Per pair: when its worker died lately (the MAX_RESTARTS limit).
        self.deaths: dict[int, list[float]] = {}
        self.given_up: set[int] = set()
        self.hdr_ok = False  # until SET_FEATURES says which header the driver uses
        # Live migration: the dirty log (SET_LOG_BASE; our own fd).
        self.log: LogSpec | None = None
        self.closed = False
        self._warned_cpus = False  # the more-processes-than-CPUs warning, once

    # -- BackendEvents ----------------------------------------------------

    def on_mem_table(self, regions: tuple[RegionInfo, ...]) -> None:
        running = self._stop_all()
        for r in self.regions:
            _close(r.fd)
        self.regions = tuple(
            RegionSpec(i.guest_addr, i.size, i.user_addr, i.mmap_offset, os.dup(i.fd))
            for i in regions
        )
        log.debug("%s: memory table with %d regions", self.name, len(regions))
        self._start_all(running)

    def on_log_base(self, fd: int, size: int, offset: int) -> None:
        logging_now = bool(self.features & LOG_ALL)
        running = self._stop_all() if logging_now else []
        if self.log is not None:
            _close(self.log.fd)
        self.log = LogSpec(os.dup(fd), size, offset)
        log.info("%s: dirty log of %d bytes (migration)", self.name, size)
        self._start_all(running)

    def on_ring_start(self, index: int, config: RingConfig) -> None:
        r = self.rings[index]
        self._release(r)
        r.config = config
        r.kick_fd = _dup(config.kick_fd)
        r.call_fd = _dup(config.call_fd)
        r.err_fd = _dup(config.err_fd)
        r.started = True
        r.enabled = config.enabled
        r.next_avail = config.last_avail_idx
        log.debug("%s: ring %d started at avail %d", self.name, index, config.last_avail_idx)
        self._maybe_start(index // 2)

    def on_ring_stop(self, index: int) -> int | None:
        r = self.rings[index]
        pair = index // 2
        if pair in self.workers:
            self._stop_worker(pair)
        was = r.started
        r.started = False
        self._release(r)
        log.debug("%s: ring %d stopped at avail %d", self.name, index, r.next_avail)
        return r.next_avail if was else None

    def on_ring_enable(self, index: int, enabled: bool) -> None:
        r = self.rings[index]
        r.enabled = enabled
        pair = index // 2
        log.info("%s: ring %d %s", self.name, index, "enabled" if enabled else "disabled")
        on = self._pair_enabled(pair)
        if on != (pair in self.vm.enabled):
            self.vm.set_enabled(pair, on)
        if on:
            self._maybe_start(pair)
        elif pair in self.workers:
            self._stop_worker(pair, discard_tx=True)

    def on_ring_call(self, index: int, call_fd: int | None) -> None:
        r = self.rings[index]
        _close(r.call_fd)
        r.call_fd = _dup(call_fd)
        proc = self.workers.get(index // 2)
        if proc is None:
            return
        fds = [r.call_fd] if r.call_fd is not None else []
        msg = Ctl.CALL_MSG.pack(Ctl.CALL, index, 1 if fds else 0)
        self._tell_worker(index // 2, proc, msg, fds, Ctl.CALL_ACK, "the call fd")

    def _tell_worker(
        self, pair: int, proc: _Proc, msg: bytes, fds: list[int], ack: bytes, what: str
    ) -> None:
        """Send a running worker one control message and wait for its ``ack``;
        a worker that does not answer is killed and started again."""
        try:
            proc.ctl.settimeout(CALL_TIMEOUT)
            socket.send_fds(proc.ctl, [msg], fds)
            got = proc.ctl.recv(16)
            if got != ack:
                raise OSError(f"bad acknowledgement {got!r}")
        except OSError as exc:
            log.error("%s: pair %d worker did not take %s (%s); restarting it",
                      self.name, pair, what, exc)  # fmt: skip
            self._kill_worker(pair)
            self._maybe_start(pair)

    def on_ring_log(self, index: int, log_addr: int | None) -> bool:
        r = self.rings[index]
        c = r.config
        if c is None:
            return False
        flags = c.flags | VRING_ADDR_F_LOG if log_addr is not None else c.flags & ~VRING_ADDR_F_LOG
        r.config = dataclasses.replace(c, flags=flags, log_addr=log_addr or 0)
        proc = self.workers.get(index // 2)
        if proc is None:
            return True  # the next start takes it from the config
        msg = Ctl.LOG_MSG.pack(Ctl.LOG, index, log_addr is not None, log_addr or 0)
        self._tell_worker(index // 2, proc, msg, [], Ctl.LOG_ACK, "the log address")
        return True

    def on_features(self, features: int) -> None:
        # Dirty logging turned on or off (live migration): running workers are
        # restarted so that they map the log, or stop marking it.
        running = self._stop_all() if (features ^ self.features) & LOG_ALL else []
        if running:
            log.info("%s: dirty page logging %s", self.name, "on" if features & LOG_ALL else "off")
        self.features = features
        log.info("%s: negotiated features 0x%x %s", self.name, features, feature_names(features))
        self.hdr_ok = hdr_len(features) == VNET_HDR_LEN
        if not self.hdr_ok:
            # The ports carry the 12-byte virtio_net_hdr_v1 unchanged; a legacy
            # driver without VERSION_1 and MRG_RXBUF uses 10 bytes.
            log.error(
                "%s: the driver negotiated neither VERSION_1 nor MRG_RXBUF (a %d-byte "
                "header); only the 12-byte header is supported: no queue will be served",
                self.name,
                hdr_len(features),
            )
        self.vm.set_features(features)
        self._start_all(running)

    def on_status(self, status: int) -> None:
        log.debug("%s: device status 0x%x", self.name, status)

    def on_reset(self) -> None:
        log.info("%s: device reset", self.name)
        for pair in sorted(self.workers):
            self._stop_worker(pair)

    def on_mtu(self, mtu: int) -> bool:
        log.info("%s: MTU %d", self.name, mtu)
        self.mtu = mtu
        self.vm.set_guest_mtu(mtu)
        return True

    def on_rarp(self, mac: bytes) -> bool:
        return False

    def on_close(self) -> None:
        self.close()

    # -- workers ----------------------------------------------------------

    def _stop_all(self) -> list[int]:
        """Stop every running worker; the pairs that ran."""
        running = sorted(self.workers)
        for pair in running:
            self._stop_worker(pair)
        return running

    def _start_all(self, pairs: list[int]) -> None:
        for pair in pairs:
            self._maybe_start(pair)

    def _pair_enabled(self, pair: int) -> bool:
        return self.rings[2 * pair].enabled and self.rings[2 * pair + 1].enabled

    def group(self, pair: int) -> int:
        """The worker process (group) that serves ``pair``."""
        return pair % self.nworkers if self.nworkers else pair

    def _group_pairs(self, group: int) -> range:
        step = self.nworkers or self.vm.max_pairs
        return range(group, self.vm.max_pairs, step)

    def _runnable(self, pair: int) -> bool:
        if self.closed or pair in self.given_up or not self.regions or not self.hdr_ok:
            return False
        rx, tx = self.rings[2 * pair], self.rings[2 * pair + 1]
        return rx.started and tx.started and self._pair_enabled(pair)

    def _maybe_start(self, pair: int) -> None:
        """Start ``pair`` if it can run; a process serving other pairs of its
        group is stopped and forked again with all of them (a running process
        takes no new rings)."""
        if pair in self.workers or not self._runnable(pair):
            return
        group = self.group(pair)
        members = [q for q in self._group_pairs(group) if q in self.workers or self._runnable(q)]
        for q in members:
            if q in self.workers:
                self._stop_worker(q)
        specs: list[WorkerSpec] = []
        for q in members:
            try:
                port_fd = self.vm.queue_fd(q)
            except UsageError as exc:
                log.error("%s: pair %d: cannot open the port queue: %s", self.name, q, exc)
                self.given_up.add(q)
                continue
            specs.append(
                WorkerSpec(
                    vm=self.name,
                    pair=q,
                    features=self.features,
                    regions=self.regions,
                    rx=self._ring_spec(2 * q),
                    tx=self._ring_spec(2 * q + 1),
                    port_kind=self.vm.kind,
                    port_fd=port_fd,
                    mtu=self.mtu,
                    poll_us=self.poll_us,
                    kick_defer_us=self.kick_defer_us,
                    cpu=self.cpus[group % len(self.cpus)] if self.cpus else None,
                    log=self.log if self.features & LOG_ALL else None,
                )
            )
        if not specs:
            return
        for spec in specs:
            self.vm.fold(spec.pair)
        try:
            pid, ctls = spawn_workers(
                specs,
                [self.vm.slot(spec.pair) for spec in specs],
                hold=self.backend.connection_fd if self.backend is not None else None,
            )
        finally:
            for spec in specs:
                _close(spec.port_fd)
        for spec, ctl in zip(specs, ctls, strict=True):
            self.workers[spec.pair] = _Proc(pid, ctl)
            log.info(
                "%s: pair %d worker %d started (rx %s, tx %s)",
                self.name,
                spec.pair,
                pid,
                self._base_text(spec.rx.last_avail_idx),
                self._base_text(spec.tx.last_avail_idx),
            )
        self._check_cpus()

    def _check_cpus(self) -> None:
        """Warn once when this VM has more worker processes than serve may use
        CPUs: each busy pair is then a process that wakes per kick and waits
        for a CPU, and more pairs cost instead of adding throughput
        (docs/benchmarks.md, "Worker processes per VM")."""
        procs = len({p.pid for p in self.workers.values()})
        cpus = len(os.sched_getaffinity(0))
        if procs <= cpus or self._warned_cpus:
            return
        self._warned_cpus = True
        log.warning(
            "%s: %d worker processes on %d CPUs; busy pairs will take turns on them."
            " --workers %d serves the pairs in that many processes",
            self.name,
            procs,
            cpus,
            cpus,
        )

    def _ring_spec(self, index: int) -> RingSpec:
        r = self.rings[index]
        c = r.config
        assert c is not None
        return RingSpec(
            index=index,
            size=c.size,
            desc_addr=c.desc_addr,
            avail_addr=c.avail_addr,
            used_addr=c.used_addr,
            last_avail_idx=r.next_avail,
            kick_fd=r.kick_fd,
            call_fd=r.call_fd,
            err_fd=r.err_fd,
            log_addr=c.log_addr if c.flags & VRING_ADDR_F_LOG else None,
        )

    def _stop_worker(self, pair: int, *, discard_tx: bool = False) -> None:
        """Ask the worker for its next-avail indexes and wait for it to exit.

        ``discard_tx``: the pair is being disabled; its pending tx is dropped first.
        """
        proc = self.workers.pop(pair, None)
        if proc is None:
            return
        reply = b""
        try:
            proc.ctl.settimeout(STOP_TIMEOUT)
            proc.ctl.send(Ctl.DISABLE if discard_tx else Ctl.STOP)
            while True:
                reply = proc.ctl.recv(16)
                if not reply or reply[:1] == Ctl.STOP:
                    break
        except OSError as exc:
            log.error(
                "%s: pair %d worker %d did not answer stop: %s", self.name, pair, proc.pid, exc
            )
        if len(reply) == Ctl.STOP_REPLY.size:
            _, rx, tx = Ctl.STOP_REPLY.unpack(reply)
            self.rings[2 * pair].next_avail = rx
            self.rings[2 * pair + 1].next_avail = tx
            if not self._shares_process(proc):
                self._reap(proc, EXIT_TIMEOUT)
            log.info("%s: pair %d worker %d stopped (rx %s, tx %s)", self.name, pair,
                     proc.pid, self._base_text(rx), self._base_text(tx))  # fmt: skip
        else:
            # Killed with the other pairs it served (if any): poll() finds
            # those dead and restarts them.
            self._reap(proc, 0.0)
            self._resume_from_used(pair)
        proc.ctl.close()
        self.vm.fold(pair)

    def _base_text(self, base: int) -> str:
        """A ring base for the log: ``avail 17``; packed rings ``avail 17/1 used 17/1``
        (slot/wrap counter)."""
        if not self.features & NetFeature.RING_PACKED:
            return f"avail {base}"
        return f"avail {base & 0x7FFF}/{base >> 15 & 1} used {base >> 16 & 0x7FFF}/{base >> 31}"

    def _shares_process(self, proc: _Proc) -> bool:
        """Whether another pair is still served by ``proc``'s process."""
        return any(p.pid == proc.pid for p in self.workers.values())

    def _kill_worker(self, pair: int) -> None:
        proc = self.workers.pop(pair, None)
        if proc is None:
            return
        self._reap(proc, 0.0)
        proc.ctl.close()
        self._resume_from_used(pair)
        self.vm.fold(pair)

    @staticmethod
    def _reap(proc: _Proc, timeout: float) -> int | None:
        """Wait up to ``timeout`` for ``proc`` to exit, then SIGKILL it; its status."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                pid, status = os.waitpid(proc.pid, os.WNOHANG)
            except ChildProcessError:
                return None
            if pid:
                return status
            if time.monotonic() >= deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    return os.waitpid(proc.pid, 0)[1]
                return None
            time.sleep(0.005)

    def _resume_from_used(self, pair: int) -> None:
        """After a worker vanished: restart its rings from the used indexes in guest memory."""
        backend = self.backend
        for index in (2 * pair, 2 * pair + 1):
            r = self.rings[index]
            if r.config is None or backend is None:
                continue
            if r.config.features & NetFeature.RING_PACKED:
                # The worker stored its used position after every push.
                word = self.vm.slot(pair)[POS_FIELDS[index & 1]]
                if word >> 32:
                    r.next_avail = word & 0xFFFFFFFF
                    log.info("%s: ring %d resumes from its used position (base 0x%08x)",
                             self.name, index, r.next_avail)  # fmt: skip
                continue
            try:
                used = int(backend.memory.view(r.config.used_addr + 2, 2).cast("H")[0])
            except PeerError as exc:
                log.error("%s: ring %d: cannot read the used index: %s", self.name, index, exc)
                continue
            log.info("%s: ring %d resumes from used index %d", self.name, index, used)
            r.next_avail = used

    def reopen_port(self) -> None:
        """Give the running pairs new port queues: stop their workers (which
        report where their rings stand), open the queues again, start them."""
        running = self._stop_all()
        self.vm.drop_queues()
        # A pair given up on (its queue could not be opened while the port
        # was gone, or its worker kept dying) gets another chance.
        retry = self.given_up.copy()
        self.given_up.clear()
        self._start_all(sorted(set(running) | retry))

    def poll(self) -> None:
        """Reap worker processes that died; restart their pairs (rate-limited)."""
        now = time.monotonic()
        status_of: dict[int, int] = {}
        for proc in list(self.workers.values()):
            if proc.pid in status_of:
                continue
            try:
                pid, status = os.waitpid(proc.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = proc.pid, -1
            if pid:
                status_of[proc.pid] = status
        dead = [(pair, proc) for pair, proc in self.workers.items() if proc.pid in status_of]
        restart: list[int] = []
        for pair, proc in dead:
            del self.workers[pair]
            proc.ctl.close()
            status = status_of[proc.pid]
            how = (
                f"signal {os.WTERMSIG(status)}"
                if status >= 0 and os.WIFSIGNALED(status)
                else f"exit status {os.waitstatus_to_exitcode(status) if status >= 0 else '?'}"
            )
            log.error("%s: pair %d worker %d died (%s)", self.name, pair, proc.pid, how)
            self._resume_from_used(pair)
            self.vm.fold(pair)
            deaths = [t for t in self.deaths.get(pair, []) if now - t < RESTART_WINDOW_S] + [now]
            self.deaths[pair] = deaths
            self.vm.restarts[pair] += 1
            if len(deaths) > MAX_RESTARTS:
                log.error("%s: pair %d died %d times in %.0f s; not restarting it",
                          self.name, pair, len(deaths), RESTART_WINDOW_S)  # fmt: skip
                self.given_up.add(pair)
                continue
            restart.append(pair)
        for pair in restart:
            self._maybe_start(pair)

    # -- teardown ---------------------------------------------------------

    def _release(self, r: _Ring) -> None:
        for fd in (r.kick_fd, r.call_fd, r.err_fd):
            _close(fd)
        r.kick_fd = r.call_fd = r.err_fd = None

    def close(self) -> None:
        """Stop every worker and close every fd this supervisor holds."""
        if self.closed:
            return
        for pair in sorted(self.workers):
            self._stop_worker(pair)
        self.closed = True
        # No frontend: stop steering rx to this VM's queues until it is back.
        for pair in sorted(self.vm.enabled):
            self.vm.set_enabled(pair, False)
        for r in self.rings:
            self._release(r)
        for reg in self.regions:
            _close(reg.fd)
        self.regions = ()
        if self.log is not None:
            _close(self.log.fd)
            self.log = None
