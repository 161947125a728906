"""netback: the backend half of a Xen vif, as a process on our xenstored and hypervisor.

Handshake (Linux ``drivers/net/xen-netback/xenbus.c``): on probe the backend
writes its features -- ``feature-sg``, ``feature-gso-tcpv4``/``-tcpv6``,
``feature-ipv6-csum-offload``, ``feature-rx-copy``, ``feature-rx-flip=0``,
``feature-multicast-control``, ``feature-split-event-channels``,
``multi-queue-max-queues``, ``feature-ctrl-ring`` -- and goes to InitWait.
When the frontend reaches Initialised or Connected it reads
``multi-queue-num-queues`` (absent = 1, flat layout), each queue's
``tx-ring-ref``/``rx-ring-ref`` and ``event-channel-tx``/``-rx`` (or one
``event-channel``), ``request-rx-copy``, ``feature-rx-notify``, the optional
``ctrl-ring-ref``/``event-channel-ctrl``; maps and binds them; starts one
worker process per queue; and goes to Connected.  Frontend Closing/Closed
take it to Closing/Closed.

Invariants:

* Everything read from the frontend's directory is untrusted: a bad number,
  more queues than ``multi-queue-max-queues``, an unmappable ring ref or an
  unbindable event channel is refused the way ``xenbus_dev_fatal`` does
  (an ``error/...`` node under the backend domain, a log line, state
  Closing), never by crashing.
* A worker that meets a fatal frontend error (``PeerError`` from the rings)
  exits with :data:`EXIT_PEER_FATAL`; the backend then disconnects the vif.
* Per-queue counters live in a shared page the workers update; the control
  ring is served by the main process, which publishes the hash
  configuration to the workers through another shared page (seqlock).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import mmap
import os
import select
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Final

from virtnet.errors import PeerError, UsageError, XenStoreError
from virtnet.ports import PortQueue, SocketQueue, make_port
from virtnet.xen.client import XsClient
from virtnet.xen.ctrl_ring import CtrlBackend, HashState
from virtnet.xen.datapath import COUNTER_NAMES, BackendQueue
from virtnet.xen.evtchn import EventChannel
from virtnet.xen.grant import DomainMemory, GrantMapper
from virtnet.xen.hyp import HypervisorClient
from virtnet.xen.xenbus import XenbusState, backend_path, read_uint, write_state

__all__ = ["MAX_QUEUES_LIMIT", "Netback", "add_arguments", "run"]

log = logging.getLogger("virtnet.xen.netback")

#: Our cap on multi-queue-max-queues (Linux defaults xenvif_max_queues to the CPU count).
MAX_QUEUES_LIMIT: Final = 64
EXIT_PEER_FATAL: Final = 3
_U32: Final = struct.Struct("<I")
_EINVAL: Final = 22


@dataclass
class _Worker:
    pid: int
    index: int


@dataclass
class _Connection:
    num_queues: int
    mem: DomainMemory
    mapper: GrantMapper
    channels: list[EventChannel] = field(default_factory=list)
    workers: list[_Worker] = field(default_factory=list)
    ctrl: CtrlBackend | None = None
    ctrl_evt: EventChannel | None = None
    hash_state: HashState | None = None
    stop_r: int = -1
    stop_w: int = -1


class Netback:
    def __init__(
        self,
        xs: XsClient,
        hyp: HypervisorClient,
        *,
        domid: int,
        handle: int = 0,
        max_queues: int = 4,
        port_spec: str = "loopback",
        backend_domid: int = 0,
        persist: bool = False,
    ) -> None:
        if not 1 <= max_queues <= MAX_QUEUES_LIMIT:
            raise UsageError(f"max queues must be 1..{MAX_QUEUES_LIMIT}")
        self.xs = xs
        self.hyp = hyp
        self.domid = domid
        self.handle = handle
        self.max_queues = max_queues
        self.port = make_port(port_spec)
        #: A tap port registers its queues; they must be released between sessions.
        self._release_port_queues = port_spec.startswith("tap:")
        self.backend_domid = backend_domid
        self.persist = persist
        self.sessions = 0
        self.be = backend_path(backend_domid, domid, handle)
        self.fe = ""
        self.state = XenbusState.INITIALISING
        self.conn: _Connection | None = None
        self.counters = mmap.mmap(-1, 8 * len(COUNTER_NAMES) * MAX_QUEUES_LIMIT)
        self.hash_page = mmap.mmap(-1, 4096)
        self.last_error = ""
        self.final_counters: list[dict[str, int]] = []

    # -- xenbus ----------------------------------------------------------------------
    def _set_state(self, st: XenbusState) -> None:
        self.state = st
        write_state(self.xs, self.be, st)
        log.info("backend state -> %s", st.name)

    def _fatal(self, message: str) -> None:
        """xenbus_dev_fatal: record the error, go to Closing."""
        self.last_error = message
        log.error("%s", message)
        node = f"/local/domain/{self.backend_domid}/error/backend/vif/{self.domid}/{self.handle}"
        with contextlib.suppress(XenStoreError):
            self.xs.write(f"{node}/error", f"{_EINVAL} {message}")
        self._disconnect()
        self._set_state(XenbusState.CLOSING)

    def probe(self, timeout: float = 30.0) -> None:
        """netback_probe: features, then InitWait."""
        deadline = time.monotonic() + timeout
        fe = None
        while fe is None:
            fe = self.xs.read_or(f"{self.be}/frontend")
            if fe is None:
                if time.monotonic() > deadline:
                    raise UsageError(f"{self.be} was never created by the toolstack")
                time.sleep(0.05)
        self.fe = fe
        features = {
            "feature-sg": "1",
            "feature-gso-tcpv4": "1",
            "feature-gso-tcpv6": "1",
            "feature-ipv6-csum-offload": "1",
            "feature-rx-copy": "1",
            "feature-rx-flip": "0",
            "feature-multicast-control": "1",
            "feature-dynamic-multicast-control": "1",
            "feature-split-event-channels": "1",
            "multi-queue-max-queues": str(self.max_queues),
            "feature-ctrl-ring": "1",
        }
        while True:
            try:
                with self.xs.transaction():
                    for k, v in features.items():
                        self.xs.write(f"{self.be}/{k}", v)
                break
            except XenStoreError as e:
                if getattr(e, "errno_name", "") != "EAGAIN":
                    raise
        self._set_state(XenbusState.INIT_WAIT)

    def _read_queue(self, path: str, split: bool) -> tuple[int, int, int, int]:
        tx = read_uint(self.xs, f"{path}/tx-ring-ref")
        rx = read_uint(self.xs, f"{path}/rx-ring-ref")
        if split and self.xs.read_or(f"{path}/event-channel-tx") is not None:
            etx = read_uint(self.xs, f"{path}/event-channel-tx")
            erx = read_uint(self.xs, f"{path}/event-channel-rx")
        else:
            etx = erx = read_uint(self.xs, f"{path}/event-channel")
        return tx, rx, etx, erx

    def connect(self) -> None:
        """connect(): read the frontend's configuration, map, bind, start workers."""
        fe = self.fe
        try:
            nq = read_uint(self.xs, f"{fe}/multi-queue-num-queues", 1)
        except XenStoreError as e:
            self._fatal(f"bad multi-queue-num-queues: {e}")
            return
        if nq > self.max_queues:
            self._fatal(f"guest requested {nq} queues, exceeding the maximum of {self.max_queues}.")
            return
        if nq == 0:
            self._fatal("guest requested 0 queues")
            return
        try:
            if read_uint(self.xs, f"{fe}/request-rx-copy", 0) != 1:
                self._fatal("frontend does not support rx-copy (request-rx-copy)")
                return
            if read_uint(self.xs, f"{fe}/feature-rx-notify", 0) != 1:
                self._fatal("feature-rx-notify is mandatory")
                return
            rx_sg = read_uint(self.xs, f"{fe}/feature-sg", 0) == 1
            queues = [
                self._read_queue(fe if nq == 1 else f"{fe}/queue-{i}", split=True)
                for i in range(nq)
            ]
            ctrl_ref = self.xs.read_or(f"{fe}/ctrl-ring-ref")
            ctrl_cfg = None
            if ctrl_ref is not None:
                ctrl_cfg = (
                    read_uint(self.xs, f"{fe}/ctrl-ring-ref"),
                    read_uint(self.xs, f"{fe}/event-channel-ctrl"),
                )
        except XenStoreError as e:
            self._fatal(f"reading frontend configuration: {e}")
            return
        try:
            mem = self.hyp.domain_memory(self.domid)
        except PeerError as e:
            self._fatal(f"cannot reach domain {self.domid} memory: {e}")
            return
        mapper = GrantMapper(mem, domid=self.backend_domid, granter=self.domid)
        conn = _Connection(nq, mem, mapper)
        self.conn = conn
        hs = HashState(nq)
        conn.hash_state = hs
        hs.export(memoryview(self.hash_page))
        try:
            pages = []
            for i, (tx, rx, etx, erx) in enumerate(queues):
                tx_page = mapper.map(tx)
                rx_page = mapper.map(rx)
                ch_tx = self.hyp.bind_interdomain(self.domid, etx)
                conn.channels.append(ch_tx)
                ch_rx = ch_tx if erx == etx else self.hyp.bind_interdomain(self.domid, erx)
                if ch_rx is not ch_tx:
                    conn.channels.append(ch_rx)
                pages.append((i, tx_page, rx_page, ch_tx, ch_rx))
            if ctrl_cfg is not None:
                ctrl_page = mapper.map(ctrl_cfg[0])
                conn.ctrl_evt = self.hyp.bind_interdomain(self.domid, ctrl_cfg[1])
                conn.channels.append(conn.ctrl_evt)
                conn.ctrl = CtrlBackend(ctrl_page, hs, mapper)
        except PeerError as e:
            self._fatal(f"mapping rings / binding event channels: {e}")
            return
        self._start_workers(conn, pages, rx_sg)
        self._set_state(XenbusState.CONNECTED)

    def _start_workers(
        self,
        conn: _Connection,
        pages: list[tuple[int, memoryview, memoryview, EventChannel, EventChannel]],
        rx_sg: bool,
    ) -> None:
        nq = conn.num_queues
        vm = f"xen-dom{self.domid}-vif{self.handle}"
        port_queues = [self.port.open_queue(vm, i) for i in range(nq)]
        boxes: list[tuple[socket.socket, socket.socket]] = [
            socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(nq)
        ]
        for a, b in boxes:
            for s in (a, b):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        conn.stop_r, conn.stop_w = os.pipe()
        counters = memoryview(self.counters).cast("Q")
        for i in range(nq):
            counters[i * len(COUNTER_NAMES) : (i + 1) * len(COUNTER_NAMES)] = memoryview(
                bytes(8 * len(COUNTER_NAMES))
            ).cast("Q")
        for i, tx_page, rx_page, ch_tx, ch_rx in pages:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - runs in the child
                code = 1
                try:
                    signal.signal(signal.SIGINT, signal.SIG_IGN)
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)
                    mailboxes: list[PortQueue | None] = [
                        SocketQueue(boxes[j][1]) if j != i else None for j in range(nq)
                    ]
                    bq = BackendQueue(
                        i,
                        tx_page,
                        rx_page,
                        conn.mapper,
                        port_queues[i],
                        hash_state=HashState(nq),
                        mailboxes=mailboxes,
                        inbox=SocketQueue(boxes[i][0]),
                        rx_sg=rx_sg,
                    )
                    code = _worker_loop(
                        bq, ch_tx, ch_rx, conn.stop_r, memoryview(self.hash_page), counters, i
                    )
                except PeerError as e:
                    sys.stderr.write(f"netback queue {i}: fatal frontend error: {e}\n")
                    code = EXIT_PEER_FATAL
                except BaseException as e:
                    sys.stderr.write(f"netback queue {i}: crashed: {e!r}\n")
                    code = 1
                finally:
                    sys.stderr.flush()
                    os._exit(code)
            conn.workers.append(_Worker(pid, i))
        for a, b in boxes:
            a.close()
            b.close()
        for q in port_queues:
            q.close()
        if self._release_port_queues:
            # The workers hold the queue fds now; the next session opens fresh ones.
            self.port.close()

    def _disconnect(self) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        if conn.stop_w >= 0:
            with contextlib.suppress(OSError):
                os.write(conn.stop_w, b"x")
        deadline = time.monotonic() + 5
        for w in conn.workers:
            while True:
                pid, _status = os.waitpid(w.pid, os.WNOHANG)
                if pid:
                    break
                if time.monotonic() > deadline:
                    os.kill(w.pid, signal.SIGKILL)
                    os.waitpid(w.pid, 0)
                    break
                time.sleep(0.01)
        self.final_counters = self.queue_counters(conn.num_queues)
        for ch in conn.channels:
            with contextlib.suppress(PeerError, OSError):
                self.hyp.close_port(ch.port)
            ch.close()
        for fd in (conn.stop_r, conn.stop_w):
            if fd >= 0:
                os.close(fd)
        conn.mapper.close()
        conn.mem.close()  # ring views may still be exported; the fd is released regardless

    def queue_counters(self, nq: int | None = None) -> list[dict[str, int]]:
        if nq is None:
            nq = self.conn.num_queues if self.conn else len(self.final_counters)
            if self.conn is None:
                return self.final_counters
        view = memoryview(self.counters).cast("Q")
        k = len(COUNTER_NAMES)
        return [
            dict(zip(COUNTER_NAMES, view[i * k : (i + 1) * k].tolist(), strict=True))
            for i in range(nq)
        ]

    # -- main loop -------------------------------------------------------------------
    def _frontend_state(self) -> XenbusState:
        text = self.xs.read_or(f"{self.fe}/state")
        if text is None:
            return XenbusState.CLOSED  # device gone
        if not text.isdigit() or len(text) > 2:
            return XenbusState.UNKNOWN
        try:
            return XenbusState(int(text))
        except ValueError:
            return XenbusState.UNKNOWN

    def _on_frontend(self) -> bool:
        """frontend_changed; False when the device is finished."""
        st = self._frontend_state()
        if st in (XenbusState.INITIALISED, XenbusState.CONNECTED):
            if self.state == XenbusState.INIT_WAIT:
                self.connect()
        elif st == XenbusState.CLOSING:
            if self.state != XenbusState.CLOSING:
                self._disconnect()
                self._set_state(XenbusState.CLOSING)
        elif st == XenbusState.CLOSED:
            self._disconnect()
            if self.state != XenbusState.CLOSED:
                self._set_state(XenbusState.CLOSED)
                self.sessions += 1
            # Linux keeps an online device for a frontend that comes back (reload, kexec).
            return self.persist and self.xs.read_or(f"{self.be}/online") == "1"
        elif st == XenbusState.INITIALISING and self.state in (
            XenbusState.CLOSING,
            XenbusState.CLOSED,
        ):
            # The frontend starts over (possibly before we saw its Closed).
            self._disconnect()
            self._set_state(XenbusState.INIT_WAIT)
        elif st == XenbusState.UNKNOWN and self.state == XenbusState.CLOSED:
            return False
        return True

    def _reap_workers(self) -> None:
        conn = self.conn
        if conn is None:
            return
        for w in list(conn.workers):
            pid, status = os.waitpid(w.pid, os.WNOHANG)
            if not pid:
                continue
            conn.workers.remove(w)
            code = os.waitstatus_to_exitcode(status)
            if code == EXIT_PEER_FATAL:
                self._fatal(f"queue {w.index}: fatal error from the frontend; vif disabled")
                return
            if code != 0:
                self._fatal(f"queue {w.index} worker died (exit {code})")
                return

    def _serve_ctrl(self) -> None:
        conn = self.conn
        if conn is None or conn.ctrl is None or conn.ctrl_evt is None:
            return
        conn.ctrl_evt.consume()
        try:
            handled, notify = conn.ctrl.process()
        except PeerError as e:
            self._fatal(f"control ring: {e}")
            return
        if handled and conn.hash_state is not None:
            conn.hash_state.export(memoryview(self.hash_page))
        if notify:
            conn.ctrl_evt.notify()

    def run(self, *, timeout: float | None = None) -> int:
        self.probe()
        token = f"netback-{self.domid}-{self.handle}"
        self.xs.watch(f"{self.fe}/state", token)
        deadline = None if timeout is None else time.monotonic() + timeout
        stop = [False]

        def on_signal(*_: object) -> None:
            stop[0] = True

        signal.signal(signal.SIGTERM, on_signal)
        try:
            while not stop[0]:
                if deadline is not None and time.monotonic() > deadline:
                    break
                fds: list[int] = [self.xs.fileno()]
                if self.conn is not None and self.conn.ctrl_evt is not None:
                    fds.append(self.conn.ctrl_evt.fileno())
                if not self.xs.events:
                    with contextlib.suppress(InterruptedError):
                        select.select(fds, [], [], 0.2)
                self._serve_ctrl()
                ev = self.xs.read_event(0)
                while ev is not None:
                    ev = self.xs.read_event(0)
                if not self._on_frontend():
                    break
                self._reap_workers()
        finally:
            self._disconnect()
        return 1 if self.last_error else 0


def _worker_loop(
    bq: BackendQueue,
    ch_tx: EventChannel,
    ch_rx: EventChannel,
    stop_fd: int,
    hash_page: memoryview,
    counters: memoryview,
    index: int,
) -> int:
    hs = bq.hash_state
    assert hs is not None
    seq = -1
    k = len(COUNTER_NAMES)
    base = index * k
    c = bq.counters
    wait_fds = [stop_fd, ch_tx.fileno()]
    if ch_rx is not ch_tx:
        wait_fds.append(ch_rx.fileno())
    for q in (bq.inbox, bq.port):
        fd = q.fileno() if q is not None else None
        if fd is not None:
            wait_fds.append(fd)
    u32 = _U32.unpack_from
    process_tx, process_rx = bq.process_tx, bq.process_rx
    while True:
        s = u32(hash_page, 0)[0]
        if s != seq and s % 2 == 0:
            seq = hs.load(hash_page)
            bq.hash_changed()
        ntx, notify_tx = process_tx()
        if notify_tx:
            ch_tx.notify()
        nrx, notify_rx, blocked = process_rx()
        if notify_rx:
            ch_rx.notify()
        for j, name in enumerate(COUNTER_NAMES):
            counters[base + j] = c[name]
        if ntx or nrx:
            continue
        if bq.tx.final_check_for_requests():
            continue
        if blocked and bq.rx.final_check_for_requests():
            continue
        r, _, _ = select.select(wait_fds, [], [], 0.5)
        if stop_fd in r:
            return 0
        ch_tx.consume()
        if ch_rx is not ch_tx:
            ch_rx.consume()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``virtnet xen back``."""
    parser.add_argument("--xenstore", required=True, help="xenstored socket (dom0)")
    parser.add_argument("--hypervisor", required=True, help="emulated hypervisor socket")
    parser.add_argument("--domid", type=int, default=1, help="frontend domain id")
    parser.add_argument("--handle", type=int, default=0, help="vif handle")
    parser.add_argument("--max-queues", type=int, default=4, help="multi-queue-max-queues")
    parser.add_argument("--port", default="loopback", help="host-side port (loopback, null, ...)")
    parser.add_argument("--timeout", type=float, default=None, help="give up after seconds")
    parser.add_argument(
        "--persist",
        action="store_true",
        help="after the frontend closes, wait for it to come back (while online=1)",
    )
    parser.add_argument(
        "--toolstack",
        action="store_true",
        help="first act as the toolstack: create the guest's memory, introduce it, "
        "write both vif directories (what 'xen demo' does)",
    )


def run(args: argparse.Namespace) -> int:
    """Entry point of ``virtnet xen back``: serve one vif until the frontend closes it."""
    logging.basicConfig(level=logging.INFO, format="netback: %(message)s")
    xs = XsClient(args.xenstore)
    hyp = HypervisorClient(args.hypervisor, 0)
    if args.toolstack:
        from virtnet.xen.demo import domain_size
        from virtnet.xen.xenbus import create_vif

        pages, frames = domain_size(args.max_queues)
        try:
            hyp.create_domain(args.domid, pages, frames)
        except PeerError as e:
            raise UsageError(f"creating domain {args.domid}: {e}") from e
        xs.introduce(args.domid)
        create_vif(xs, args.domid, args.handle)
    nb = Netback(
        xs, hyp, domid=args.domid, handle=args.handle, max_queues=args.max_queues,
        port_spec=args.port, persist=args.persist,
    )  # fmt: skip
    try:
        rc = nb.run(timeout=args.timeout)
    finally:
        xs.close()
        hyp.close()
    for i, cnt in enumerate(nb.final_counters):
        print(f"netback queue {i}: " + " ".join(f"{k}={v}" for k, v in cnt.items()))
    if nb.last_error:
        print(f"netback: {nb.last_error}", file=sys.stderr)
    return rc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="virtnet xen back")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
