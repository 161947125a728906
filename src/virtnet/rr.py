"""``virtnet rr``: request/response transactions per second across sessions (netperf TCP_RR shape).

Design -- what is measured, and why it is the device path:

* A *session* is one UDP flow (source port ``40000 + s``) with exactly one
  outstanding request at a time, as a netperf TCP_RR connection has one
  outstanding 1-byte request.  The request is a minimal Ethernet/IPv4/UDP
  frame with a 1-byte payload (padded to the 60-byte Ethernet minimum); the
  payload byte is the session's sequence number mod 256.
* The backend's loopback port (``virtnet serve --port loopback``) or DPDK
  testpmd in ``macswap``/``io`` forwarding reflects every frame back on the
  queue pair it came in on.  A *transaction* completes when the reply of
  that session, carrying the current sequence byte, arrives; only completed
  transactions are counted.  A reply with a stale sequence byte, for a
  session that is not outstanding or for another pair's session counts as
  ``stale``/``foreign``; a request unanswered for :data:`RETRY_TIMEOUT` is
  counted ``lost`` and the session sends its next request (closed loop, like
  a TCP retransmit).
* Sessions are mapped to queue pairs by the flow hash of their request,
  modulo the number of pairs: what the guest driver does
  (:meth:`virtnet.driver.VirtioNetDriver.select_queue`).  One process per
  pair runs that pair's sessions (forked, :mod:`virtnet.pktgen` machinery).
* A process waits for replies on the rx call eventfd (interrupt mode, the
  default: it sleeps when every session is outstanding and enables rx
  notifications with EVENT_IDX ``used_event``), or spins with
  ``--busy-poll``.  Transmit kicks follow the device's ``avail_event`` /
  NO_NOTIFY, once per batch.
* Rate = completed transactions / wall time; the CPU seconds of the rr
  processes are reported so a caller can normalise per CPU second (the
  seeds bench adds the backend's CPU).

Invariants:

* A transmit descriptor is reused only after the device returned it in the
  used ring (a free list; a head returned twice or never posted raises
  :class:`~virtnet.errors.VirtqueueError`).
* Receive buffers are fixed (descriptor ``i`` -> buffer ``i``) and reposted
  in bulk; a reply is parsed only within the length the device reported
  and the buffer's size.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

from virtnet.demo import GUEST_MAC, PEER_MAC
from virtnet.driver import flow_hash
from virtnet.errors import UsageError, VirtqueueError
from virtnet.net import inet_checksum
from virtnet.pktgen import (
    _BATCHES,
    _CPU_US,
    _RX_BY,
    _RX_KICK,
    _RX_PK,
    _STOP,
    _TX_KICK,
    _TX_PK,
    PKTGEN_QUEUE_SIZE,
    SharedControl,
    add_socket_arguments,
    fast_run,
    live_progress,
    parse_cpus,
    print_result,
    socket_target,
)
from virtnet.vhost_user.frontend import (
    DEFAULT_TIMEOUT,
    FastPair,
    VhostUserFrontend,
    full_barrier,
    kick_if_wanted,
    recycle,
)
from virtnet.virtq import VIRTQ_AVAIL_F_NO_INTERRUPT

__all__ = [
    "MAX_SESSIONS",
    "RETRY_TIMEOUT",
    "RrResult",
    "add_arguments",
    "assign_sessions",
    "request_frame",
    "run",
    "run_rr",
]

#: UDP source ports 40000 + s must stay below 65536.
BASE_PORT = 40000
MAX_SESSIONS = 65535 - BASE_PORT
#: A request unanswered this long is counted lost and the session moves on
#: (seconds; far above any loopback round trip).
RETRY_TIMEOUT = 0.5
#: Ethernet minimum frame without FCS (IEEE 802.3: 64 bytes with FCS).
FRAME_LEN = 60
#: Offsets inside the frame: UDP ports and the 1-byte request payload.
_PORTS_OFF = 14 + 20
_SEQ_OFF = 14 + 20 + 8
_PORTS = struct.Struct("!HH")
_ETH = struct.Struct("!6s6sH")
_IP = struct.Struct("!BBHHHBBH4s4s")
_UDP = struct.Struct("!HHHH")
_U16 = 0xFFFF
# Counter slots (shared with pktgen's layout: STATE and CPU slots coincide).
_SENT, _DONE, _STALE, _LOST, _WAKE = _TX_PK, _RX_PK, _RX_BY, _BATCHES, _RX_KICK


def request_frame(session: int) -> bytes:
    """Session ``session``'s request: Ethernet/IPv4/UDP, 1-byte payload, padded to 60 bytes."""
    if not 0 <= session < MAX_SESSIONS:
        raise UsageError(f"session {session} outside 0..{MAX_SESSIONS - 1}")
    dst = bytes((10, 78, 1 + session // 250, 1 + session % 250))
    ip = _IP.pack(0x45, 0, 20 + 8 + 1, 0, 0, 64, 17, 0, bytes((10, 78, 0, 1)), dst)
    ip = ip[:10] + struct.pack("!H", inet_checksum(ip)) + ip[12:]
    udp = _UDP.pack(BASE_PORT + session, 7, 8 + 1, 0)
    frame = _ETH.pack(PEER_MAC, GUEST_MAC, 0x0800) + ip + udp + b"\x00"
    return frame.ljust(FRAME_LEN, b"\x00")


def assign_sessions(sessions: int, pairs: int) -> list[list[int]]:
    """Sessions per pair by flow hash of their request (the guest driver's choice)."""
    out: list[list[int]] = [[] for _ in range(pairs)]
    for s in range(sessions):
        out[flow_hash(request_frame(s)) % pairs].append(s)
    return out


def _session_of(sport: int, dport: int) -> int:
    """Session of a reply whose ports may or may not have been swapped."""
    s = sport - BASE_PORT
    if 0 <= s < MAX_SESSIONS:
        return s
    return dport - BASE_PORT


# ---------------------------------------------------------------------------
# The per-pair loop
# ---------------------------------------------------------------------------


def rr_loop(
    sessions_of: Sequence[Sequence[int]],
    busy_poll: bool,
    fp: FastPair,
    ctl: SharedControl,
    deadline: float,
) -> None:
    """Run the sessions of ``fp.pair`` until ``deadline`` or the stop flag."""
    mine = list(sessions_of[fp.pair])
    if not mine:
        return
    size = fp.size
    mask = size - 1
    if 2 * len(mine) > size:
        raise UsageError(f"{len(mine)} sessions need a ring of at least {2 * len(mine)}")
    q = ctl.q
    b = ctl.base(fp.pair)
    hl = fp.hdr_len
    event_idx = fp.event_idx
    mem = fp.mem
    tx_avail, tx_used, tx_ring = fp.tx_avail, fp.tx_used, fp.tx_used_ring
    rx_avail, rx_used, rx_ring = fp.rx_avail, fp.rx_used, fp.rx_used_ring
    used_event = 2 + size
    avail_event = 2 + 4 * size
    tx_slots = [mem.view(a, hl + FRAME_LEN) for a in fp.tx_slots]
    rx_bufs = [mem.view(a, fp.rx_buf_size) for a in fp.rx_bufs]
    rx_buf_size = fp.rx_buf_size
    frames = [request_frame(s) for s in mine]
    local = {s: j for j, s in enumerate(mine)}
    nsess = len(mine)
    seq = [0] * nsess
    outstanding = bytearray(nsess)
    sent_at = [0.0] * nsess
    # Every tx slot gets the header and a frame; descriptors are fixed length.
    fp.load_frames(frames)
    free = list(range(size - 1, -1, -1))
    in_flight = bytearray(size)
    tx_av = fp.tx_avail_idx
    tx_last = fp.tx_last_used
    tx_kicked = fp.tx_kicked
    rx_last = fp.rx_last_used
    rx_kicked = fp.rx_kicked
    rx_call = fp.rx_call_fd
    unpack_ports = _PORTS.unpack_from
    mono = time.monotonic
    sent = done = stale = lost = wakeups = tx_kicks = 0
    seq_off = hl + _SEQ_OFF
    ports_off = hl + _PORTS_OFF
    min_len = hl + _SEQ_OFF + 1

    def post(j: int, now: float) -> None:
        nonlocal tx_av, sent
        d = free.pop()
        slot = tx_slots[d]
        slot[hl : hl + FRAME_LEN] = frames[j]
        slot[seq_off] = seq[j] & 0xFF
        in_flight[d] = 1
        tx_avail[2 + (tx_av & mask)] = d
        tx_av = (tx_av + 1) & _U16
        outstanding[j] = 1
        sent_at[j] = now
        sent += 1

    now = mono()
    for j in range(nsess):
        post(j, now)
    last_check = now
    while True:
        # -- publish and kick tx (one decision per batch) --------------------
        if tx_av != tx_kicked:
            tx_avail[1] = tx_av
            full_barrier()
            if kick_if_wanted(tx_used, avail_event, tx_av, tx_kicked, event_idx, fp.tx_kick_fd):
                tx_kicks += 1
            tx_kicked = tx_av
        # -- reclaim tx descriptors ------------------------------------------
        u = tx_used[1]
        n = (u - tx_last) & _U16
        if n:
            if n > size:
                raise VirtqueueError(f"pair {fp.pair} tx: used index runs {n} ahead")
            for k in range(n):
                d = tx_ring[((tx_last + k) & mask) << 1]
                if d >= size or not in_flight[d]:
                    raise VirtqueueError(
                        f"pair {fp.pair} tx: device returned head {d} not in flight"
                    )
                in_flight[d] = 0
                free.append(d)
            tx_last = u
            tx_avail[used_event] = (u + 0x8000) & _U16
        # -- replies ---------------------------------------------------------
        ru = rx_used[1]
        m = (ru - rx_last) & _U16
        now = mono()
        if m:
            if m > size:
                raise VirtqueueError(f"pair {fp.pair} rx: used index runs {m} ahead")
            for k in range(m):
                pos = ((rx_last + k) & mask) << 1
                d = rx_ring[pos]
                ln = rx_ring[pos + 1]
                if d >= size:
                    raise VirtqueueError(f"pair {fp.pair} rx: device returned head {d}")
                if ln < min_len or ln > rx_buf_size:
                    stale += 1
                    continue
                buf = rx_bufs[d]
                sport, dport = unpack_ports(buf, ports_off)
                j = local.get(_session_of(sport, dport), -1)
                if j < 0 or not outstanding[j] or buf[seq_off] != seq[j] & 0xFF:
                    stale += 1
                    continue
                done += 1
                outstanding[j] = 0
                seq[j] += 1
                if free:
                    post(j, now)
            recycle(rx_avail, rx_ring, size, rx_last, m)
            rx_last = ru
            rx_av = (ru + size) & _U16
            rx_avail[1] = rx_av
            full_barrier()
            kick_if_wanted(rx_used, avail_event, rx_av, rx_kicked, event_idx, fp.rx_kick_fd)
            rx_kicked = rx_av
        # -- every 50 ms: counters, stop, retries -----------------------------
        if now - last_check >= 0.05:
            last_check = now
            q[b + _SENT] = sent
            q[b + _DONE] = done
            q[b + _STALE] = stale
            q[b + _LOST] = lost
            q[b + _WAKE] = wakeups
            q[b + _TX_KICK] = tx_kicks
            if q[_STOP] or now >= deadline:
                break
            for j in range(nsess):
                if (not outstanding[j] or now - sent_at[j] > RETRY_TIMEOUT) and free:
                    if outstanding[j]:
                        lost += 1
                    seq[j] += 1
                    post(j, now)
        elif now >= deadline:
            break
        if m or busy_poll or tx_av != tx_kicked or tx_last != tx_used[1]:
            continue
        # Interrupt mode: ask for an rx notification, re-check, then sleep.
        rx_avail[0] &= ~VIRTQ_AVAIL_F_NO_INTERRUPT & _U16
        rx_avail[used_event] = rx_last
        full_barrier()
        if rx_used[1] == rx_last:
            r, _, _ = select.select([rx_call], [], [], min(0.05, max(0.0, deadline - now)))
            if r:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(rx_call)
                wakeups += 1
        rx_avail[0] |= VIRTQ_AVAIL_F_NO_INTERRUPT
        rx_avail[used_event] = (rx_last + 0x8000) & _U16
    q[b + _SENT] = sent
    q[b + _DONE] = done
    q[b + _STALE] = stale
    q[b + _LOST] = lost
    q[b + _WAKE] = wakeups
    q[b + _TX_KICK] = tx_kicks


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


@dataclass
class PairRr:
    pair: int
    sessions: int
    transactions: int
    sent: int
    stale: int
    lost: int
    wakeups: int
    tx_kicks: int
    cpu_seconds: float


@dataclass
class RrResult:
    sessions: int
    queues: int
    seconds: float
    cpu_seconds: float
    pairs: list[PairRr] = field(default_factory=list)
    busy_poll: bool = False
    failed_pairs: list[int] = field(default_factory=list)

    @property
    def transactions(self) -> int:
        return sum(p.transactions for p in self.pairs)

    @property
    def tps(self) -> float:
        return self.transactions / self.seconds if self.seconds else 0.0

    @property
    def tps_per_cpu(self) -> float:
        return self.transactions / self.cpu_seconds if self.cpu_seconds else 0.0

    @property
    def mean_latency_us(self) -> float:
        """Little's law: sessions / rate (each session keeps one request outstanding)."""
        return self.sessions / self.tps * 1e6 if self.tps else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "sessions": self.sessions,
            "queues": self.queues,
            "seconds": self.seconds,
            "transactions": self.transactions,
            "tps": self.tps,
            "cpu_seconds": self.cpu_seconds,
            "tps_per_cpu_second": self.tps_per_cpu,
            "mean_latency_us": self.mean_latency_us,
            "busy_poll": self.busy_poll,
            "pairs": [vars(p) for p in self.pairs],
            "failed_pairs": self.failed_pairs,
        }


def run_rr(
    path: str,
    *,
    mode: Literal["connect", "listen"] = "connect",
    queues: int = 1,
    sessions: int = 1,
    seconds: float = 5.0,
    queue_size: int = PKTGEN_QUEUE_SIZE,
    timeout: float = DEFAULT_TIMEOUT,
    busy_poll: bool = False,
    cpus: Sequence[int] | None = None,
    progress: Callable[[float, int], None] | None = None,
    frontend: VhostUserFrontend | None = None,
) -> RrResult:
    """Run ``sessions`` request/response sessions over ``queues`` pairs for ``seconds``."""
    if not 1 <= sessions <= MAX_SESSIONS:
        raise UsageError(f"--sessions must be within 1..{MAX_SESSIONS}")
    with fast_run(
        path, what="rr", mode=mode, queues=queues, seconds=seconds,
        queue_size=queue_size, timeout=timeout, frontend=frontend,
    ) as (fe, ctl, workers):  # fmt: skip
        if fe.curr_pairs != queues:
            fe.set_queue_pairs(queues)
        per_pair = assign_sessions(sessions, queues)
        per_pair += [[] for _ in range(len(fe.fast_pairs) - queues)]
        for p, mine in enumerate(per_pair):
            if 2 * len(mine) > fe.fast_pairs[p].size:
                raise UsageError(
                    f"pair {p} gets {len(mine)} sessions; use --queue-size >= {2 * len(mine)}"
                )
        ctl.active = queues

        def tick(elapsed: float) -> None:
            if progress is not None:
                progress(elapsed, sum(ctl.get(p, _DONE) for p in range(ctl.pairs)))

        loop = partial(rr_loop, per_pair, busy_poll)
        elapsed, codes, cpu = workers.run(fe, ctl, seconds, cpus, loop, tick)
        res = RrResult(sessions=sessions, queues=queues, seconds=elapsed, cpu_seconds=cpu,
                       busy_poll=busy_poll)  # fmt: skip
        for p in range(queues):
            res.pairs.append(
                PairRr(
                    pair=p,
                    sessions=len(per_pair[p]),
                    transactions=ctl.get(p, _DONE),
                    sent=ctl.get(p, _SENT),
                    stale=ctl.get(p, _STALE),
                    lost=ctl.get(p, _LOST),
                    wakeups=ctl.get(p, _WAKE),
                    tx_kicks=ctl.get(p, _TX_KICK),
                    cpu_seconds=ctl.get(p, _CPU_US) / 1e6,
                )
            )
        res.failed_pairs = [p for p, c in enumerate(codes) if c != 0]
        return res


def render(res: RrResult) -> str:
    lines = [f"{'pair':>5} {'sessions':>9} {'trans/s':>12} {'stale':>7} {'lost':>6} {'wakeups':>9}"]
    for p in res.pairs:
        tps = p.transactions / res.seconds if res.seconds else 0.0
        lines.append(
            f"{p.pair:>5} {p.sessions:>9} {tps:>12,.0f} {p.stale:>7} {p.lost:>6} {p.wakeups:>9}"
        )
    lines.append(f"{'total':>5} {res.sessions:>9} {res.tps:>12,.0f}")
    mode = "busy-poll" if res.busy_poll else "eventfd wakeups"
    lines.append(
        f"{res.transactions:,} transactions in {res.seconds:.2f} s ({mode}),"
        f" mean latency {res.mean_latency_us:,.1f} us,"
        f" {res.cpu_seconds:.2f} CPU s ({res.tps_per_cpu:,.0f} transactions per CPU second)"
    )
    if res.failed_pairs:
        lines.append(f"FAILED pairs: {res.failed_pairs}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_socket_arguments(parser)
    parser.add_argument("--sessions", type=int, default=1, help="concurrent sessions (default 1)")
    parser.add_argument("--seconds", type=float, default=5.0, help="run time (default 5)")
    parser.add_argument(
        "--busy-poll", action="store_true", help="spin instead of sleeping on the call eventfd"
    )


def run(args: argparse.Namespace) -> int:
    path, mode = socket_target(args)

    def line(elapsed: float, done: int) -> str:
        rate = done / elapsed if elapsed else 0.0
        return f"rr {elapsed:5.1f}s  {done:,} transactions  {rate:,.0f}/s"

    with live_progress(args.json, line) as progress:
        res = run_rr(
            path,
            mode=mode,
            queues=args.queues,
            sessions=args.sessions,
            seconds=args.seconds,
            queue_size=args.queue_size,
            timeout=args.timeout,
            busy_poll=args.busy_poll,
            cpus=parse_cpus(args.cpus),
            progress=progress,
        )
    return print_result(args, res, render)
