"""``virtnet pktgen``: a packet generator driving any vhost-user backend (Linux pktgen's shape).

One process per queue pair (forked from the process that holds the
vhost-user connection) transmits pre-built frames as fast as the backend
takes them and counts what comes back on its receive ring.  Per-queue and
total kpps and Gbit/s are printed at the end, live with ``rich`` when stdout
is a terminal, or as JSON with ``--json``.

The data path is :class:`~virtnet.vhost_user.frontend.FastPair`: frames are
written once into memfd slots (descriptor ``i`` -> slot ``i``, never
rewritten); a batch is "copy the returned heads back into the avail ring,
publish the avail index once, kick only if the device asked for it"
(EVENT_IDX ``avail_event`` or the NO_NOTIFY flag).  Nothing is allocated
and no syscall is made per packet; the costs per batch are a few
``memoryview`` slice operations.

Counting (honest by construction):

* tx packets = used-ring entries the device returned (it consumed the
  frame), counted when the used index is read; frames still in the ring at
  the end are not counted;
* rx packets = receive buffers the device filled (one frame each: buffers
  are large enough for any frame this tool sends, so MRG_RXBUF never spans);
  bytes exclude the virtio-net header;
* kpps = packets / wall time of the sending window; Gbit/s uses the frame
  bytes (Ethernet header to payload, no FCS, preamble or gap);
* CPU time is the generator's own (parent and children, ``getrusage``).

Invariants:

* Each child touches only its own pair's rings; the parent keeps the control
  socket, serves the control queue, reconnects if the backend restarts, and
  changes the number of active pairs (``--schedule``): a pair being detached
  first stops posting (shared flag), then the frontend drains and disables
  its rings; a pair being attached is enabled first, then resumes posting.
* Every child is joined or killed before :func:`run_pktgen` returns.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import multiprocessing
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, ParamSpec

from virtnet.demo import PAYLOAD_OFF, build_frame
from virtnet.errors import PeerError, UsageError, VirtqueueError
from virtnet.vhost_user.frontend import (
    DEFAULT_TIMEOUT,
    MAX_QUEUE_PAIRS,
    FastPair,
    VhostUserFrontend,
    full_barrier,
    kick_if_wanted,
    recycle,
)

__all__ = [
    "MAX_FRAME",
    "MIN_FRAME",
    "PairCounters",
    "PktgenResult",
    "QueueResult",
    "SharedControl",
    "add_arguments",
    "build_frames",
    "run",
    "run_pktgen",
]

#: Smallest frame we build: Ethernet + IPv4 + UDP headers and the 8-byte
#: flow/sequence payload of :func:`virtnet.demo.build_frame`.
MIN_FRAME = PAYLOAD_OFF + 8
#: Largest untagged Ethernet frame without FCS (MTU 1500).
MAX_FRAME = 1514
#: Most flows (UDP source ports 40000 + flow, see demo.build_frame).
MAX_FLOWS = 4096
#: Default ring size for generators: a deeper ring means bigger batches.
PKTGEN_QUEUE_SIZE = 1024
#: How often the parent refreshes the live display and checks the connection.
TICK = 0.25
#: Slots per pair in the shared counter page.
_SLOTS = 8
_TX_PK, _RX_PK, _RX_BY, _TX_KICK, _RX_KICK, _STATE, _CPU_US, _BATCHES = range(_SLOTS)
_STOP, _ACTIVE = 0, 1
_HDR_SLOTS = 2
_RUNNING, _DONE, _FAILED = 1, 2, 3
_U16 = 0xFFFF


class SharedControl:
    """A shared anonymous page: stop flag, active pairs, per-pair counters (u64)."""

    def __init__(self, pairs: int) -> None:
        size = 8 * (_HDR_SLOTS + _SLOTS * pairs)
        self._map = mmap.mmap(-1, max(size, mmap.PAGESIZE))  # MAP_SHARED: survives fork
        self.q = memoryview(self._map).cast("Q")
        self.pairs = pairs

    def base(self, pair: int) -> int:
        return _HDR_SLOTS + _SLOTS * pair

    def get(self, pair: int, slot: int) -> int:
        return int(self.q[self.base(pair) + slot])

    @property
    def stop(self) -> bool:
        return bool(self.q[_STOP])

    @stop.setter
    def stop(self, on: bool) -> None:
        self.q[_STOP] = int(on)

    @property
    def active(self) -> int:
        return int(self.q[_ACTIVE])

    @active.setter
    def active(self, n: int) -> None:
        self.q[_ACTIVE] = n

    def close(self) -> None:
        self.q.release()
        with contextlib.suppress(BufferError):
            self._map.close()


@dataclass
class PairCounters:
    tx_packets: int = 0
    rx_packets: int = 0
    rx_bytes: int = 0
    tx_kicks: int = 0
    rx_kicks: int = 0
    batches: int = 0
    cpu_seconds: float = 0.0
    state: int = 0


def read_counters(ctl: SharedControl, pair: int) -> PairCounters:
    b = ctl.base(pair)
    q = ctl.q
    return PairCounters(
        tx_packets=int(q[b + _TX_PK]),
        rx_packets=int(q[b + _RX_PK]),
        rx_bytes=int(q[b + _RX_BY]),
        tx_kicks=int(q[b + _TX_KICK]),
        rx_kicks=int(q[b + _RX_KICK]),
        batches=int(q[b + _BATCHES]),
        cpu_seconds=int(q[b + _CPU_US]) / 1e6,
        state=int(q[b + _STATE]),
    )


def build_frames(size: int, flows: int) -> list[bytes]:
    """One UDP frame of ``size`` bytes per flow (source port 40000 + flow)."""
    return [build_frame(f, 0, size) for f in range(flows)]


# ---------------------------------------------------------------------------
# The per-pair loop (runs in a forked child)
# ---------------------------------------------------------------------------


def pair_loop(fp: FastPair, ctl: SharedControl, deadline: float) -> None:
    """Send on ``fp`` until ``deadline`` or the stop flag; count tx and rx.

    Ring bookkeeping (16-bit free-running indexes):
    ``tx_last`` = used index read so far (counted), ``tx_rep`` = used index up
    to which returned heads were posted again; ``tx_av == tx_rep + size``.
    """
    size = fp.size
    pair = fp.pair
    q = ctl.q
    b = ctl.base(pair)
    event_idx = fp.event_idx
    hl = fp.hdr_len
    tx_avail, tx_used, tx_ring = fp.tx_avail, fp.tx_used, fp.tx_used_ring
    rx_avail, rx_used, rx_ring = fp.rx_avail, fp.rx_used, fp.rx_used_ring
    used_event = 2 + size  # avail ring index of used_event
    avail_event = 2 + 4 * size  # used ring index of avail_event
    tx_kick_fd, rx_kick_fd = fp.tx_kick_fd, fp.rx_kick_fd
    eventfd_write = os.eventfd_write
    mono = time.monotonic
    barrier = full_barrier

    fp.tx_start()
    tx_last = tx_rep = fp.tx_last_used
    tx_av = fp.tx_avail_idx
    tx_kicked = fp.tx_kicked
    rx_last = fp.rx_last_used
    rx_kicked = fp.rx_kicked
    tx_pk = rx_pk = rx_by = tx_kicks = rx_kicks = batches = 0
    # First kick: the device learns about the full ring.
    barrier()
    eventfd_write(tx_kick_fd, 1)
    tx_kicks += 1
    tx_kicked = tx_av
    q[b + _STATE] = _RUNNING
    spins = 0
    while True:
        spins += 1
        changed = False
        # rx is sampled before tx: a device publishes a frame's tx completion
        # before the frame can come back on rx, so the counters never show
        # more received than sent (loopback) at any snapshot.
        ru = rx_used[1]
        # -- tx completions -------------------------------------------------
        u = tx_used[1]
        n = (u - tx_last) & _U16
        if n:
            if n > size:
                raise VirtqueueError(f"pair {pair} tx: used index runs {n} ahead")
            tx_pk += n
            tx_last = u
            changed = True
        if tx_rep != tx_last and pair < q[_ACTIVE]:
            m = (tx_last - tx_rep) & _U16
            recycle(tx_avail, tx_ring, size, tx_rep, m)
            tx_rep = tx_last
            tx_av = (tx_rep + size) & _U16
            tx_avail[used_event] = (tx_last + 0x8000) & _U16  # no tx interrupts, please
            tx_avail[1] = tx_av
            batches += 1
            barrier()
            if kick_if_wanted(tx_used, avail_event, tx_av, tx_kicked, event_idx, tx_kick_fd):
                tx_kicks += 1
            tx_kicked = tx_av
        # -- rx: whatever comes back ---------------------------------------
        m = (ru - rx_last) & _U16
        if m:
            if m > size:
                raise VirtqueueError(f"pair {pair} rx: used index runs {m} ahead")
            rx_pk += m
            p0 = rx_last & (size - 1)
            if p0 + m <= size:
                rx_by += sum(rx_ring[2 * p0 + 1 : 2 * (p0 + m) + 1 : 2]) - m * hl
            else:
                rx_by += (
                    sum(rx_ring[2 * p0 + 1 : 2 * size : 2])
                    + sum(rx_ring[1 : 2 * (p0 + m - size) : 2])
                    - m * hl
                )
            recycle(rx_avail, rx_ring, size, rx_last, m)
            rx_last = ru
            rx_av = (ru + size) & _U16
            rx_avail[used_event] = (ru + 0x8000) & _U16
            rx_avail[1] = rx_av
            barrier()
            if kick_if_wanted(rx_used, avail_event, rx_av, rx_kicked, event_idx, rx_kick_fd):
                rx_kicks += 1
            rx_kicked = rx_av
            changed = True
        if changed or spins >= 256:
            spins = 0
            q[b + _TX_PK] = tx_pk
            q[b + _RX_PK] = rx_pk
            q[b + _RX_BY] = rx_by
            q[b + _TX_KICK] = tx_kicks
            q[b + _RX_KICK] = rx_kicks
            q[b + _BATCHES] = batches
            if q[_STOP] or mono() >= deadline:
                break
    fp.tx_last_used, fp.tx_avail_idx, fp.tx_kicked = tx_last, tx_av, tx_kicked


# ---------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------


def _child_main(
    fe: VhostUserFrontend,
    pair: int,
    ctl: SharedControl,
    deadline: float,
    cpu: int | None,
    loop: Callable[[FastPair, SharedControl, float], None],
) -> None:
    fe.close_in_child()
    if cpu is not None:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {cpu})
    b = ctl.base(pair)
    start = time.process_time()
    code = 0
    try:
        loop(fe.fast_pairs[pair], ctl, deadline)
        ctl.q[b + _STATE] = _DONE
    except PeerError as exc:
        print(f"virtnet: pair {pair}: backend error: {exc}", file=sys.stderr)
        ctl.q[b + _STATE] = _FAILED
        code = 1
    finally:
        ctl.q[b + _CPU_US] = int((time.process_time() - start) * 1e6)
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


@dataclass
class Workers:
    """The forked per-pair children of one run."""

    procs: list[multiprocessing.process.BaseProcess] = field(default_factory=list)

    def start(
        self,
        fe: VhostUserFrontend,
        ctl: SharedControl,
        deadline: float,
        cpus: Sequence[int] | None,
        loop: Callable[[FastPair, SharedControl, float], None],
    ) -> None:
        ctx = multiprocessing.get_context("fork")
        for p in range(len(fe.fast_pairs)):
            cpu = cpus[p % len(cpus)] if cpus else None
            proc = ctx.Process(
                target=_child_main, args=(fe, p, ctl, deadline, cpu, loop), daemon=True
            )
            proc.start()
            self.procs.append(proc)

    def alive(self) -> bool:
        return any(p.is_alive() for p in self.procs)

    def run(
        self,
        fe: VhostUserFrontend,
        ctl: SharedControl,
        seconds: float,
        cpus: Sequence[int] | None,
        loop: Callable[[FastPair, SharedControl, float], None],
        on_tick: Callable[[float], None],
    ) -> tuple[float, list[int], float]:
        """Run ``loop`` in one process per pair for ``seconds``, then stop them.

        ``on_tick(elapsed)`` runs here every :data:`TICK` (schedules, progress).
        Returns ``(elapsed, exit codes, CPU seconds)``; the CPU figure counts
        this process and its children over the run.
        """
        cpu0 = _cpu_now()
        child0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.monotonic()
        deadline = start + seconds
        self.start(fe, ctl, deadline, cpus, loop)
        while self.alive():
            now = time.monotonic()
            if now >= deadline + 2.0:
                break
            on_tick(now - start)
            fe.check_connection()
            time.sleep(min(TICK, max(0.01, deadline - now)))
        elapsed = min(time.monotonic(), deadline) - start
        codes = self.stop(ctl)
        child1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = _cpu_now() - cpu0
        cpu += (child1.ru_utime + child1.ru_stime) - (child0.ru_utime + child0.ru_stime)
        return elapsed, codes, cpu

    def stop(self, ctl: SharedControl, timeout: float = 5.0) -> list[int]:
        """Ask every child to stop, join (kill after ``timeout``); return exit codes."""
        ctl.stop = True
        end = time.monotonic() + timeout
        for p in self.procs:
            p.join(max(0.0, end - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(1.0)
        return [p.exitcode if p.exitcode is not None else -9 for p in self.procs]


@contextlib.contextmanager
def fast_run(
    path: str,
    *,
    what: str,
    mode: Literal["connect", "listen"],
    queues: int,
    seconds: float,
    queue_size: int,
    timeout: float,
    frontend: VhostUserFrontend | None,
) -> Iterator[tuple[VhostUserFrontend, SharedControl, Workers]]:
    """The set-up and tear-down ``what`` (pktgen, rr) share around :meth:`Workers.run`.

    Checks ``queues`` and ``seconds``; opens a ``fast=True`` frontend unless
    the caller passed one (then the caller keeps it); checks the backend has
    ``queues`` pairs; yields it with a control block over all its pairs and
    the (not yet started) workers.  On the way out the workers are stopped,
    the control block closed and an own frontend closed.
    """
    if not 1 <= queues <= MAX_QUEUE_PAIRS:
        raise UsageError(f"--queues must be within 1..{MAX_QUEUE_PAIRS}")
    if seconds <= 0:
        raise UsageError("--seconds must be positive")
    own = frontend is None
    fe = frontend or VhostUserFrontend(
        path, mode=mode, queue_pairs=queues, queue_size=queue_size, timeout=timeout, fast=True
    )
    try:
        if own:
            fe.open()
        if not fe.fast:
            raise UsageError(f"{what} needs a frontend opened with fast=True")
        if len(fe.fast_pairs) < queues:
            raise UsageError(f"the backend supports only {len(fe.fast_pairs)} queue pairs")
        ctl = SharedControl(len(fe.fast_pairs))
        workers = Workers()
        try:
            yield fe, ctl, workers
        finally:
            workers.stop(ctl)
            ctl.close()
    finally:
        if own:
            fe.close()


def parse_schedule(text: str | None) -> list[tuple[float, int]]:
    """``"2@1.5,4@3"`` -> [(1.5, 2), (3.0, 4)]: at time T switch to N pairs."""
    out: list[tuple[float, int]] = []
    if not text:
        return out
    for part in text.split(","):
        try:
            n, t = part.split("@")
            out.append((float(t), int(n)))
        except ValueError:
            raise UsageError(f"bad --schedule entry {part!r} (want N@SECONDS)") from None
    return sorted(out)


def change_pairs(fe: VhostUserFrontend, ctl: SharedControl, n: int) -> bool:
    """Switch the active pairs of a running generator (see module invariants)."""
    if n < ctl.active:
        ctl.active = n  # children of pairs >= n stop posting first
        ok = fe.set_queue_pairs(n)
        if not ok:
            ctl.active = fe.curr_pairs
        return ok
    ok = fe.set_queue_pairs(n)
    if ok:
        ctl.active = n
    return ok


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------


@dataclass
class QueueResult:
    pair: int
    tx_packets: int
    tx_bytes: int
    rx_packets: int
    rx_bytes: int
    tx_kicks: int
    rx_kicks: int
    seconds: float

    @property
    def tx_kpps(self) -> float:
        return self.tx_packets / self.seconds / 1e3 if self.seconds else 0.0

    @property
    def rx_kpps(self) -> float:
        return self.rx_packets / self.seconds / 1e3 if self.seconds else 0.0

    @property
    def tx_gbps(self) -> float:
        return self.tx_bytes * 8 / self.seconds / 1e9 if self.seconds else 0.0

    @property
    def rx_gbps(self) -> float:
        return self.rx_bytes * 8 / self.seconds / 1e9 if self.seconds else 0.0


@dataclass
class PktgenResult:
    queues: list[QueueResult]
    seconds: float
    size: int
    flows: int
    cpu_seconds: float
    switches: list[tuple[float, int, bool]] = field(default_factory=list)
    reconnects: int = 0
    failed_pairs: list[int] = field(default_factory=list)
    features: int = 0

    @property
    def tx_packets(self) -> int:
        return sum(q.tx_packets for q in self.queues)

    @property
    def rx_packets(self) -> int:
        return sum(q.rx_packets for q in self.queues)

    @property
    def tx_kpps(self) -> float:
        return sum(q.tx_kpps for q in self.queues)

    @property
    def rx_kpps(self) -> float:
        return sum(q.rx_kpps for q in self.queues)

    @property
    def tx_gbps(self) -> float:
        return sum(q.tx_gbps for q in self.queues)

    @property
    def rx_gbps(self) -> float:
        return sum(q.rx_gbps for q in self.queues)

    @property
    def kpps_per_cpu(self) -> float:
        """Transmitted kpackets per CPU second of the generator."""
        return self.tx_packets / 1e3 / self.cpu_seconds if self.cpu_seconds else 0.0

    def to_json(self) -> dict[str, Any]:
        qs = []
        for q in self.queues:
            d: dict[str, Any] = asdict(q)
            d.update(tx_kpps=q.tx_kpps, rx_kpps=q.rx_kpps, tx_gbps=q.tx_gbps, rx_gbps=q.rx_gbps)
            qs.append(d)
        return {
            "queues": qs,
            "total": {
                "tx_packets": self.tx_packets,
                "rx_packets": self.rx_packets,
                "tx_kpps": self.tx_kpps,
                "rx_kpps": self.rx_kpps,
                "tx_gbps": self.tx_gbps,
                "rx_gbps": self.rx_gbps,
            },
            "seconds": self.seconds,
            "size": self.size,
            "flows": self.flows,
            "cpu_seconds": self.cpu_seconds,
            "kpps_per_cpu_second": self.kpps_per_cpu,
            "switches": [list(s) for s in self.switches],
            "reconnects": self.reconnects,
            "failed_pairs": self.failed_pairs,
            "features": self.features,
        }


def _cpu_now() -> float:
    s = resource.getrusage(resource.RUSAGE_SELF)
    return s.ru_utime + s.ru_stime


def run_pktgen(
    path: str,
    *,
    mode: Literal["connect", "listen"] = "connect",
    queues: int = 1,
    size: int = 64,
    flows: int = 1,
    seconds: float = 5.0,
    queue_size: int = PKTGEN_QUEUE_SIZE,
    timeout: float = DEFAULT_TIMEOUT,
    cpus: Sequence[int] | None = None,
    schedule: Sequence[tuple[float, int]] = (),
    progress: Callable[[float, list[PairCounters]], None] | None = None,
    frontend: VhostUserFrontend | None = None,
) -> PktgenResult:
    """Connect, send for ``seconds`` on every pair, return the counts.

    With ``frontend`` (opened with ``fast=True``) the caller keeps the
    connection (tests, the seeds bench); otherwise one is made and closed.
    """
    if not MIN_FRAME <= size <= MAX_FRAME:
        raise UsageError(f"--size must be within {MIN_FRAME}..{MAX_FRAME}")
    if not 1 <= flows <= MAX_FLOWS:
        raise UsageError(f"--flows must be within 1..{MAX_FLOWS}")
    with fast_run(
        path, what="pktgen", mode=mode, queues=queues, seconds=seconds,
        queue_size=queue_size, timeout=timeout, frontend=frontend,
    ) as (fe, ctl, workers):  # fmt: skip
        pairs = len(fe.fast_pairs)
        if fe.curr_pairs != pairs:
            fe.set_queue_pairs(pairs)
        frames = build_frames(size, flows)
        for fp in fe.fast_pairs:
            fp.load_frames(frames)
        ctl.active = pairs
        reconnects0 = fe.stats.reconnects
        switches: list[tuple[float, int, bool]] = []
        pending = list(schedule)

        def tick(elapsed: float) -> None:
            while pending and elapsed >= pending[0][0]:
                _, n = pending.pop(0)
                ok = change_pairs(fe, ctl, n)
                switches.append((round(elapsed, 3), n, ok))
            if progress is not None:
                progress(elapsed, [read_counters(ctl, p) for p in range(pairs)])

        elapsed, codes, cpu = workers.run(fe, ctl, seconds, cpus, pair_loop, tick)
        counters = [read_counters(ctl, p) for p in range(pairs)]
        res = PktgenResult(
            queues=[
                QueueResult(
                    pair=p,
                    tx_packets=c.tx_packets,
                    tx_bytes=c.tx_packets * size,
                    rx_packets=c.rx_packets,
                    rx_bytes=c.rx_bytes,
                    tx_kicks=c.tx_kicks,
                    rx_kicks=c.rx_kicks,
                    seconds=elapsed,
                )
                for p, c in enumerate(counters)
            ],
            seconds=elapsed,
            size=size,
            flows=flows,
            cpu_seconds=cpu,
            switches=switches,
            reconnects=fe.stats.reconnects - reconnects0,
            failed_pairs=[p for p, code in enumerate(codes) if code != 0],
            features=fe.features,
        )
        return res


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def add_socket_arguments(parser: argparse.ArgumentParser) -> None:
    """--connect/--listen, --queues, --queue-size, --timeout, --cpus (shared with rr)."""
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--connect", metavar="SOCK", help="backend's vhost-user socket (we dial)")
    where.add_argument("--listen", metavar="SOCK", help="listen here; the backend dials us")
    parser.add_argument("--queues", type=int, default=1, help="queue pairs (default 1)")
    parser.add_argument(
        "--queue-size", type=int, default=PKTGEN_QUEUE_SIZE, help="ring size (default 1024)"
    )
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, help="per-request deadline (s)"
    )
    parser.add_argument(
        "--cpus", default=None, help="pin pair processes to these CPUs, e.g. 0,1 (default: none)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_socket_arguments(parser)
    parser.add_argument("--size", type=int, default=64, help="frame bytes (default 64)")
    parser.add_argument("--flows", type=int, default=1, help="UDP flows (default 1)")
    parser.add_argument("--seconds", type=float, default=5.0, help="run time (default 5)")
    parser.add_argument(
        "--schedule", default=None, help="change active pairs at run time: N@SECONDS[,...]"
    )


def parse_cpus(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(c) for c in text.split(",")]
    except ValueError:
        raise UsageError(f"bad --cpus {text!r}") from None


def _table(title: str, counters: list[PairCounters], elapsed: float, size: int) -> Any:
    from rich.table import Table

    t = Table(title=title)
    for col in ("pair", "tx kpps", "tx Gbit/s", "rx kpps", "tx kicks"):
        t.add_column(col, justify="right")
    tot_tx = tot_rx = 0.0
    for p, c in enumerate(counters):
        tx = c.tx_packets / elapsed / 1e3 if elapsed else 0.0
        rx = c.rx_packets / elapsed / 1e3 if elapsed else 0.0
        tot_tx += tx
        tot_rx += rx
        t.add_row(str(p), f"{tx:,.0f}", f"{tx * size * 8 / 1e6:.2f}", f"{rx:,.0f}", str(c.tx_kicks))
    t.add_row("total", f"{tot_tx:,.0f}", f"{tot_tx * size * 8 / 1e6:.2f}", f"{tot_rx:,.0f}", "")
    return t


def render(res: PktgenResult) -> str:
    lines = [f"{'pair':>5} {'tx kpps':>10} {'tx Gbit/s':>10} {'rx kpps':>10} {'rx Gbit/s':>10}"]
    for q in res.queues:
        lines.append(
            f"{q.pair:>5} {q.tx_kpps:>10,.0f} {q.tx_gbps:>10.3f} {q.rx_kpps:>10,.0f}"
            f" {q.rx_gbps:>10.3f}"
        )
    lines.append(
        f"{'total':>5} {res.tx_kpps:>10,.0f} {res.tx_gbps:>10.3f} {res.rx_kpps:>10,.0f}"
        f" {res.rx_gbps:>10.3f}"
    )
    lines.append(
        f"{res.size}-byte frames, {res.flows} flows, {res.seconds:.2f} s,"
        f" {res.cpu_seconds:.2f} CPU s ({res.kpps_per_cpu:,.0f} kpps per CPU second)"
    )
    if res.switches:
        lines.append("pair changes: " + ", ".join(f"{n}@{t}s{'' if ok else ' REFUSED'}"
                                                 for t, n, ok in res.switches))  # fmt: skip
    if res.reconnects:
        lines.append(f"reconnects: {res.reconnects}")
    if res.failed_pairs:
        lines.append(f"FAILED pairs: {res.failed_pairs}")
    return "\n".join(lines)


def socket_target(args: argparse.Namespace) -> tuple[str, Literal["connect", "listen"]]:
    """The vhost-user socket and whether we dial it (``--connect``) or listen (``--listen``)."""
    if args.connect:
        return args.connect, "connect"
    return args.listen, "listen"


_P = ParamSpec("_P")


@contextlib.contextmanager
def live_progress(
    json_output: bool, render: Callable[_P, Any]
) -> Iterator[Callable[_P, None] | None]:
    """On a terminal (and without ``--json``) yield a progress callback that
    shows ``render(*its arguments)`` in a live display updated in place;
    otherwise ``None``.  No refresh thread: the per-pair processes are forked
    while it runs."""
    if json_output or not sys.stdout.isatty():
        yield None
        return
    from rich.live import Live

    with Live(auto_refresh=False) as live:

        def progress(*args: _P.args, **kwargs: _P.kwargs) -> None:
            live.update(render(*args, **kwargs))
            live.refresh()

        yield progress


def print_result(args: argparse.Namespace, res: Any, render_text: Callable[[Any], str]) -> int:
    """Print ``res`` as JSON (``--json``) or text; exit status 1 if a pair failed."""
    if args.json:
        print(json.dumps(res.to_json(), indent=2))
    else:
        print(render_text(res))
    return 1 if res.failed_pairs else 0


def run(args: argparse.Namespace) -> int:
    path, mode = socket_target(args)

    def table(elapsed: float, counters: list[PairCounters]) -> Any:
        return _table(f"pktgen {elapsed:5.1f}s", counters, elapsed, args.size)

    with live_progress(args.json, table) as progress:
        res = run_pktgen(
            path,
            mode=mode,
            queues=args.queues,
            size=args.size,
            flows=args.flows,
            seconds=args.seconds,
            queue_size=args.queue_size,
            timeout=args.timeout,
            cpus=parse_cpus(args.cpus),
            schedule=parse_schedule(args.schedule),
            progress=progress,
        )
    return print_result(args, res, render)
