"""netfront: the guest half of a Xen vif (and a traffic generator that checks what comes back).

Handshake (Linux ``drivers/net/xen-netfront.c``, ``talk_to_netback``): when the
backend reaches InitWait, read ``multi-queue-max-queues``,
``feature-split-event-channels`` and ``feature-ctrl-ring``; grant each
queue's tx and rx ring page to the backend, allocate event channels; then in
one transaction (retried on ``EAGAIN``) write ``multi-queue-num-queues`` and
``queue-N/{tx,rx}-ring-ref`` + ``event-channel-tx``/``-rx`` (flat, without
``queue-N/``, when there is one queue), ``request-rx-copy``,
``feature-rx-notify``, ``feature-sg``, ``feature-gso-tcpv4``/``-tcpv6``
and the control ring keys; go Initialised, wait for the backend's Connected,
go Connected, and program the backend's hash through the control ring.

Invariants:

* Asking for more queues than ``multi-queue-max-queues`` is refused here with
  a clear error (Linux would silently clamp); ``force_queues`` writes the
  request anyway, to exercise the backend's refusal.
* The tx queue of a packet is chosen by its flow hash, with the same
  Toeplitz key and mapping table that the frontend gave the backend, so a
  flow's replies come back on the queue it left from.
* The traffic generator keeps at most :data:`WINDOW` packets in flight per
  queue, below the rx buffers posted, so any loss it reports is real.
"""

from __future__ import annotations

import argparse
import contextlib
import mmap
import os
import select
import signal
import struct
import sys
import time
from dataclasses import dataclass
from typing import Final

from virtnet.errors import PeerError, UsageError, XenStoreError
from virtnet.xen import ctrl_ring as cr
from virtnet.xen.client import XsClient, XsClientError
from virtnet.xen.ctrl_ring import CtrlFrontend, HashState
from virtnet.xen.datapath import FrontendQueue
from virtnet.xen.evtchn import EventChannel
from virtnet.xen.grant import PAGE_SIZE, GrantTable
from virtnet.xen.hyp import HypervisorClient
from virtnet.xen.xenbus import XenbusState, frontend_path, read_uint, wait_for_state, write_state

__all__ = ["MS_RSS_KEY", "Netfront", "NetfrontError", "add_arguments", "run"]

#: The Microsoft RSS verification key (also virtio's and Linux's common default).
MS_RSS_KEY: Final = bytes.fromhex(
    "6d5a56da255b0ec24167253d43a38fb0d0ca2bcbae7b30b477cb2da38030f20c6a42b73bbeac01fa"
)
#: Frames in flight per queue: with a hash extra slot per frame, 2 * 120 < 256 rx buffers.
WINDOW: Final = 120
BATCH: Final = 64
FLOWS_PER_QUEUE: Final = 4
FRAME_MIN: Final = 64
#: Jumbo frames ride several slots (feature-sg): 9000-byte MTU + Ethernet header.
FRAME_MAX: Final = 9014
STAT_NAMES: Final = ("sent", "received", "lost", "reordered", "misrouted", "tx_errors", "rx_errors")
_SEQ: Final = struct.Struct(">Q")
_SRC_IP: Final = bytes((10, 0, 0, 1))
_DST_IP: Final = bytes((10, 0, 0, 2))
_SPORT_BASE: Final = 10000
_PAYLOAD_OFF: Final = 54  # Ethernet 14 + IPv4 20 + TCP 20


_CONNECTION_KEYS: Final = frozenset(
    {
        "multi-queue-num-queues",
        "tx-ring-ref",
        "rx-ring-ref",
        "event-channel",
        "event-channel-tx",
        "event-channel-rx",
        "ctrl-ring-ref",
        "event-channel-ctrl",
    }
)


class NetfrontError(UsageError):
    """The connection could not be set up (refused by the backend, or asked wrongly)."""


@dataclass
class _Queue:
    fq: FrontendQueue
    ch_tx: EventChannel
    ch_rx: EventChannel


def flow_frame(sport: int, size: int) -> bytearray:
    """A TCP/IPv4 frame from 10.0.0.1:sport to 10.0.0.2:80 (payload: an 8-byte sequence)."""
    eth = bytes.fromhex("0200000000020200000000010800")
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, size - 14, 0, 0x4000, 64, 6, 0, _SRC_IP, _DST_IP)
    tcp = struct.pack(">HHIIBBHHH", sport, 80, 0, 0, 0x50, 0x18, 65535, 0, 0)
    return bytearray((eth + ip + tcp).ljust(size, b"\x00"))


class Netfront:
    def __init__(
        self,
        xs: XsClient,
        hyp: HypervisorClient,
        *,
        domid: int,
        handle: int = 0,
        queues: int = 1,
        force_queues: bool = False,
        use_ctrl_ring: bool = True,
        split_event_channels: bool = True,
    ) -> None:
        self.xs = xs
        self.hyp = hyp
        self.domid = domid
        self.handle = handle
        self.requested = queues
        self.force = force_queues
        self.use_ctrl = use_ctrl_ring
        self.use_split = split_event_channels
        self.fe = frontend_path(domid, handle)
        self.queues: list[_Queue] = []
        self.hash = HashState(max(queues, 1))
        self.ctrl: CtrlFrontend | None = None
        self.ctrl_evt: EventChannel | None = None
        self.gt: GrantTable | None = None

    def connect(self, timeout: float = 30.0) -> None:
        xs = self.xs
        be = xs.read(f"{self.fe}/backend")
        be_id = read_uint(xs, f"{self.fe}/backend-id", 0, limit=0x7FEF)
        if xs.read_or(f"{self.fe}/state") != str(int(XenbusState.INITIALISING)):
            # A reconnecting frontend starts over (xenbus_probe_frontend: Initialising).
            write_state(xs, self.fe, XenbusState.INITIALISING)
        st = wait_for_state(
            xs, f"{be}/state", {XenbusState.INIT_WAIT, XenbusState.CONNECTED}, timeout, "fe-be"
        )
        del st
        max_q = read_uint(xs, f"{be}/multi-queue-max-queues", 1)
        if self.requested > max_q and not self.force:
            raise NetfrontError(
                f"{self.requested} queues requested but the backend offers at most "
                f"{max_q} (multi-queue-max-queues)"
            )
        split = read_uint(xs, f"{be}/feature-split-event-channels", 0) == 1 and self.use_split
        has_ctrl = read_uint(xs, f"{be}/feature-ctrl-ring", 0) == 1 and self.use_ctrl
        nq = self.requested
        mem = self.hyp.domain_memory(self.domid)
        gt = GrantTable(mem)
        self.gt = gt
        for i in range(nq):
            fq = FrontendQueue(i, gt, be_id)
            ch_tx = self.hyp.alloc_unbound(be_id)
            ch_rx = self.hyp.alloc_unbound(be_id) if split else ch_tx
            self.queues.append(_Queue(fq, ch_tx, ch_rx))
        ctrl_ref = 0
        if has_ctrl:
            frame = gt.alloc_frame()
            ctrl_ref = gt.grant_access(be_id, frame)
            self.ctrl_evt = self.hyp.alloc_unbound(be_id)
            self.ctrl = CtrlFrontend(mem.page(frame), self.ctrl_evt)
        while True:
            try:
                with xs.transaction():
                    # Keys of an earlier connection must not survive into this one.
                    for name in xs.directory(self.fe):
                        if name in _CONNECTION_KEYS or name.startswith("queue-"):
                            xs.rm(f"{self.fe}/{name}")
                    if nq > 1:
                        xs.write(f"{self.fe}/multi-queue-num-queues", str(nq))
                    for i, q in enumerate(self.queues):
                        path = self.fe if nq == 1 else f"{self.fe}/queue-{i}"
                        xs.write(f"{path}/tx-ring-ref", str(q.fq.tx_ring_ref))
                        xs.write(f"{path}/rx-ring-ref", str(q.fq.rx_ring_ref))
                        if split:
                            xs.write(f"{path}/event-channel-tx", str(q.ch_tx.port))
                            xs.write(f"{path}/event-channel-rx", str(q.ch_rx.port))
                        else:
                            xs.write(f"{path}/event-channel", str(q.ch_tx.port))
                    if self.ctrl_evt is not None:
                        xs.write(f"{self.fe}/ctrl-ring-ref", str(ctrl_ref))
                        xs.write(f"{self.fe}/event-channel-ctrl", str(self.ctrl_evt.port))
                    for k in (
                        "request-rx-copy",
                        "feature-rx-notify",
                        "feature-sg",
                        "feature-gso-tcpv4",
                        "feature-gso-tcpv6",
                        "feature-ipv6-csum-offload",
                    ):
                        xs.write(f"{self.fe}/{k}", "1")
                break
            except XsClientError as e:
                if e.errno_name != "EAGAIN":
                    raise
        write_state(xs, self.fe, XenbusState.INITIALISED)
        st = wait_for_state(
            xs,
            f"{be}/state",
            {XenbusState.CONNECTED, XenbusState.CLOSING, XenbusState.CLOSED},
            timeout,
            "fe-be2",
        )
        if st != XenbusState.CONNECTED:
            raise NetfrontError(
                f"backend refused the connection (state {st.name}); "
                f"it offers {max_q} queues, we asked for {nq}"
            )
        write_state(xs, self.fe, XenbusState.CONNECTED)
        # Without a control ring: a plain flow hash modulo the queue count (as
        # xennet_select_queue's skb_get_hash % num_queues); the backend then keeps
        # each frame on the queue it arrived on.
        self.hash = HashState(nq)
        self.hash.alg = cr.HASH_ALGORITHM_TOEPLITZ
        self.hash.key = MS_RSS_KEY
        self.hash.flags = cr.HASH_TYPES_ALL
        if self.ctrl is not None:
            self._program_hash(gt, be_id, nq)

    def _program_hash(self, gt: GrantTable, be_id: int, nq: int) -> None:
        ctrl = self.ctrl
        assert ctrl is not None
        mem = gt.mem
        key_frame = gt.alloc_frame()
        mem.page(key_frame)[: len(MS_RSS_KEY)] = MS_RSS_KEY
        key_ref = gt.grant_access(be_id, key_frame, readonly=True)
        st, size = ctrl.request(cr.CTRL_TYPE_GET_HASH_MAPPING_SIZE)
        size = min(size, cr.XEN_NETBK_MAX_HASH_MAPPING_SIZE) if st == cr.STATUS_SUCCESS else 0
        table = [i % nq for i in range(size)]
        map_frame = gt.alloc_frame()
        struct.pack_into(f"<{size}I", mem.page(map_frame), 0, *table)
        map_ref = gt.grant_access(be_id, map_frame, readonly=True)
        steps = [
            (cr.CTRL_TYPE_SET_HASH_ALGORITHM, cr.HASH_ALGORITHM_TOEPLITZ, 0, 0),
            (cr.CTRL_TYPE_SET_HASH_KEY, key_ref, len(MS_RSS_KEY), 0),
            (cr.CTRL_TYPE_SET_HASH_MAPPING_SIZE, size, 0, 0),
            (cr.CTRL_TYPE_SET_HASH_MAPPING, map_ref, size, 0),
            (cr.CTRL_TYPE_SET_HASH_FLAGS, cr.HASH_TYPES_ALL, 0, 0),
        ]
        for typ, d0, d1, d2 in steps:
            status, _ = ctrl.request(typ, d0, d1, d2)
            if status != cr.STATUS_SUCCESS:
                raise NetfrontError(f"control request {typ} failed with status {status}")
        # Our own copy, for choosing tx queues the same way.
        self.hash = HashState(nq)
        self.hash.alg = cr.HASH_ALGORITHM_TOEPLITZ
        self.hash.key = MS_RSS_KEY
        self.hash.flags = cr.HASH_TYPES_ALL
        self.hash.mapping = table
        for r in (key_ref, map_ref):
            gt.end_access(r)

    def tx_queue_for(self, frame: bytes | bytearray | memoryview) -> int:
        """xennet_select_queue: by flow hash (Toeplitz + table when programmed)."""
        q = self.hash.select_queue(frame)
        if q is None:
            return 0
        return q

    def close(self, timeout: float = 10.0) -> None:
        """Closing, wait for the backend, Closed."""
        xs = self.xs
        try:
            be = xs.read(f"{self.fe}/backend")
            write_state(xs, self.fe, XenbusState.CLOSING)
            with contextlib.suppress(TimeoutError):
                wait_for_state(
                    xs, f"{be}/state", {XenbusState.CLOSING, XenbusState.CLOSED}, timeout, "fe-c"
                )
            write_state(xs, self.fe, XenbusState.CLOSED)
        except XenStoreError:
            pass
        chans = [q.ch_tx for q in self.queues] + [
            q.ch_rx for q in self.queues if q.ch_rx is not q.ch_tx
        ]
        if self.ctrl_evt is not None:
            chans.append(self.ctrl_evt)
        for ch in chans:
            with contextlib.suppress(PeerError, OSError):
                self.hyp.close_port(ch.port)
            ch.close()
        self.queues = []
        self.ctrl_evt = None


def choose_flows(nf: Netfront, frame_size: int) -> list[list[int]]:
    """Source ports per queue, FLOWS_PER_QUEUE each, placed by the flow hash."""
    nq = len(nf.queues)
    flows: list[list[int]] = [[] for _ in range(nq)]
    sport = _SPORT_BASE
    while any(len(f) < FLOWS_PER_QUEUE for f in flows) and sport < 60000:
        q = nf.tx_queue_for(flow_frame(sport, FRAME_MIN))
        if len(flows[q]) < FLOWS_PER_QUEUE:
            flows[q].append(sport)
        sport += 1
    return flows


def traffic_worker(
    q: _Queue,
    index: int,
    sports: list[int],
    seconds: float,
    frame_size: int,
    stats: memoryview,
) -> None:
    """Send numbered frames on ``sports`` flows for ``seconds``; check what comes back."""
    fq = q.fq
    templates = [flow_frame(sp, frame_size) for sp in sports]
    next_seq = [0] * len(sports)
    expect: dict[int, int] = {sp: 0 for sp in sports}
    st = dict.fromkeys(STAT_NAMES, 0)
    received = [0]
    misrouted = [0]
    reordered = [0]

    def deliver(buf: memoryview) -> None:
        received[0] += 1
        sp = (buf[34] << 8) | buf[35]
        e = expect.get(sp)
        if e is None:
            misrouted[0] += 1
            return
        seq = _SEQ.unpack_from(buf, _PAYLOAD_OFF)[0]
        if seq != e:
            reordered[0] += 1
        expect[sp] = seq + 1

    pack_seq = _SEQ.pack_into
    tx_bufs = fq.tx_bufs
    queue_tx = fq.queue_tx
    tx_free = fq.tx_free
    wait_fds = [q.ch_tx.fileno()] + ([q.ch_rx.fileno()] if q.ch_rx is not q.ch_tx else [])
    sent = 0
    flow = 0
    nflows = len(sports)
    window = max(1, WINDOW // -(-frame_size // PAGE_SIZE))  # in frames; slots stay < 256
    t0 = time.monotonic()
    end = t0 + seconds
    drain_deadline = end + 5.0
    while True:
        now = time.monotonic()
        sending = now < end and nflows > 0
        if fq.post_rx():
            q.ch_rx.notify()
        k = 0
        if sending:
            k = min(BATCH, window - (sent - received[0]), len(tx_free))
            if frame_size > PAGE_SIZE:
                done = 0
                for _ in range(k):
                    tmpl = templates[flow]
                    pack_seq(tmpl, _PAYLOAD_OFF, next_seq[flow])
                    if not fq.queue_tx_frame(tmpl):
                        break
                    next_seq[flow] += 1
                    flow = flow + 1 if flow + 1 < nflows else 0
                    done += 1
                k = done
            for _ in range(k if frame_size <= PAGE_SIZE else 0):
                slot = tx_free.pop()
                buf = tx_bufs[slot]
                buf[:frame_size] = templates[flow]
                pack_seq(buf, _PAYLOAD_OFF, next_seq[flow])
                next_seq[flow] += 1
                queue_tx(slot, frame_size)
                flow += 1
                if flow == nflows:
                    flow = 0
            sent += k
            if k and fq.push_tx():
                q.ch_tx.notify()
        n1 = fq.reap_tx()
        n2 = fq.reap_rx(deliver)
        if not sending and (received[0] >= sent or now > drain_deadline):
            break
        if k or n1 or n2:
            continue
        if fq.tx.final_check_for_responses() or fq.rx.final_check_for_responses():
            continue
        select.select(wait_fds, [], [], 0.05)
        q.ch_tx.consume()
        q.ch_rx.consume()
    st["sent"] = sent
    st["received"] = received[0]
    st["lost"] = max(0, sent - received[0])
    st["reordered"] = reordered[0]
    st["misrouted"] = misrouted[0]
    st["tx_errors"] = fq.counters["tx_errors"]
    st["rx_errors"] = fq.counters["rx_errors"] + fq.counters["rx_dropped"]
    st["elapsed_us"] = int((time.monotonic() - t0) * 1e6)
    for j, name in enumerate((*STAT_NAMES, "elapsed_us")):
        stats[index * 8 + j] = st[name]


def run_traffic(nf: Netfront, seconds: float, frame_size: int) -> list[dict[str, int]]:
    """One traffic process per queue; returns per-queue stats."""
    nq = len(nf.queues)
    flows = choose_flows(nf, frame_size)
    shm = mmap.mmap(-1, 8 * 8 * max(nq, 1))
    stats = memoryview(shm).cast("Q")
    pids = []
    for i, q in enumerate(nf.queues):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 0
            try:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                traffic_worker(q, i, flows[i], seconds, frame_size, stats)
            except PeerError as e:
                sys.stderr.write(f"netfront queue {i}: backend misbehaved: {e}\n")
                code = 3
            except BaseException as e:
                sys.stderr.write(f"netfront queue {i}: crashed: {e!r}\n")
                code = 1
            finally:
                sys.stderr.flush()
                os._exit(code)
        pids.append(pid)
    failed = False
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        failed |= os.waitstatus_to_exitcode(status) != 0
    names = (*STAT_NAMES, "elapsed_us")
    out = [
        dict(zip(names, stats[i * 8 : i * 8 + len(names)].tolist(), strict=True)) for i in range(nq)
    ]
    if failed:
        for d in out:
            d["tx_errors"] += 1 if d["sent"] == 0 else 0
        out.append({"worker_failed": 1})
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``virtnet xen front``."""
    parser.add_argument("--xenstore", required=True, help="xenstored socket for this guest domain")
    parser.add_argument("--hypervisor", required=True, help="emulated hypervisor socket")
    parser.add_argument("--domid", type=int, default=1)
    parser.add_argument("--handle", type=int, default=0)
    parser.add_argument("--queues", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=2.0, help="traffic duration")
    parser.add_argument("--frame-size", type=int, default=FRAME_MIN)
    parser.add_argument(
        "--force-queues", action="store_true", help="ask for more queues than offered (testing)"
    )
    parser.add_argument("--no-ctrl-ring", action="store_true")


def report(stats: list[dict[str, int]]) -> bool:
    """Print per-queue counters; True when every queue is clean."""
    ok = True
    for i, d in enumerate(stats):
        if "worker_failed" in d:
            ok = False
            continue
        secs = max(d["elapsed_us"], 1) / 1e6
        pps = d["received"] / secs
        print(
            f"queue {i}: sent={d['sent']} received={d['received']} lost={d['lost']} "
            f"reordered={d['reordered']} misrouted={d['misrouted']} "
            f"tx_errors={d['tx_errors']} rx_errors={d['rx_errors']} pps={pps:,.0f}"
        )
        if d["lost"] or d["reordered"] or d["misrouted"] or d["sent"] == 0:
            ok = False
        if d["tx_errors"] or d["rx_errors"]:
            ok = False
    total = sum(d.get("received", 0) for d in stats)
    print(f"total received={total} {'OK' if ok else 'FAILED'}")
    return ok


def run(args: argparse.Namespace) -> int:
    """Entry point of ``virtnet xen front``: connect, move traffic, report, close."""
    if not FRAME_MIN <= args.frame_size <= FRAME_MAX:
        raise UsageError(f"--frame-size must be {FRAME_MIN}..{FRAME_MAX}")
    if args.queues < 1:
        raise UsageError("--queues must be at least 1")
    xs = XsClient(args.xenstore)
    hyp = HypervisorClient(args.hypervisor, args.domid)
    nf = Netfront(
        xs, hyp, domid=args.domid, handle=args.handle, queues=args.queues,
        force_queues=args.force_queues, use_ctrl_ring=not args.no_ctrl_ring,
    )  # fmt: skip
    try:
        try:
            nf.connect()
        except NetfrontError as e:
            print(f"netfront: {e}", file=sys.stderr)
            return 2
        stats = run_traffic(nf, args.seconds, args.frame_size)
        ok = report(stats)
        return 0 if ok else 1
    finally:
        nf.close()
        xs.close()
        hyp.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="virtnet xen front")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
