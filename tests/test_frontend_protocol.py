"""vhost-user frontend control plane: handshake, validation of every reply, deadlines.

Two kinds of peer, both in this process (a thread), no testpmd needed:

* :class:`ScriptedBackend` -- a minimal, correct vhost-user backend that can be
  told to misbehave on one request on purpose: wrong reply size, NAK, an fd
  on a reply, a reply to another request, silence, closing the connection.
* virtnet's own :class:`~virtnet.vhost_user.server.Server` with
  :class:`~virtnet.vhost_user.backend.Backend` (the sans-I/O device side),
  to check what the frontend set up, in both socket directions.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from virtnet.errors import PeerError, ProtocolError
from virtnet.net import CTRL_ERR, CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, NetFeature
from virtnet.testing.fds import open_fds
from virtnet.vhost_user.backend import Backend, BackendConfig, NullEvents, RingConfig
from virtnet.vhost_user.codec import (
    F_PROTOCOL_FEATURES,
    FLAG_REPLY,
    HEADER,
    U64,
    VERSION,
    Message,
    MessageReader,
    ProtocolFeature,
    Request,
    VringState,
    encode_reply,
)
from virtnet.vhost_user.frontend import (
    VA_BASE,
    BackendClosedError,
    BackendRefusedError,
    BackendTimeoutError,
    VhostUserFrontend,
)
from virtnet.vhost_user.server import Server

pytestmark = pytest.mark.timeout(60)

R = Request
PF = ProtocolFeature
FEATURES = (NetFeature.VERSION_1 | NetFeature.MRG_RXBUF | NetFeature.EVENT_IDX | NetFeature.MQ) | (
    1 << F_PROTOCOL_FEATURES
)


class ScriptedBackend:
    """A tiny vhost-user backend on a thread, misbehaving on request ``bad`` as ``how``."""

    def __init__(
        self,
        path: Path,
        *,
        bad: Request | None = None,
        how: str = "",
        features: int = FEATURES,
        protocol: int = PF.MQ.mask | PF.REPLY_ACK.mask,
        queue_num: int = 2,
    ) -> None:
        self.path = str(path)
        self.bad = bad
        self.how = how
        self.features = features
        self.protocol = protocol
        self.queue_num = queue_num
        self.seen: list[Message] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(1)
        self.listener.settimeout(10)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.done = threading.Event()
        self.thread.start()

    def close(self) -> None:
        self.done.set()
        self.listener.close()
        self.thread.join(10)

    def _run(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        conn.settimeout(10)
        reader = MessageReader()
        try:
            while not self.done.is_set():
                data, anc, _, _ = conn.recvmsg(reader.wanted, socket.CMSG_SPACE(8 * 4))
                if not data:
                    return
                fds: list[int] = []
                for _lvl, _typ, payload in anc:
                    fds += struct.unpack(f"{len(payload) // 4}i", payload[: len(payload) // 4 * 4])
                reader.feed(data, fds)
                for msg in reader:
                    msg.close_fds()
                    self.seen.append(msg)
                    if not self._answer(conn, msg):
                        return
        except (OSError, PeerError):
            return
        finally:
            reader.close()
            conn.close()

    def _reply_body(self, msg: Message) -> U64 | VringState | None:
        r = msg.request
        if r is R.GET_FEATURES:
            return U64(self.features)
        if r is R.GET_PROTOCOL_FEATURES:
            return U64(self.protocol)
        if r is R.GET_QUEUE_NUM:
            return U64(self.queue_num)
        if r is R.GET_MAX_MEM_SLOTS:
            return U64(8)
        if r is R.GET_VRING_BASE:
            assert isinstance(msg.body, VringState)
            return VringState(msg.body.index, 0)
        if msg.need_reply:
            return U64(0)
        return None

    def _answer(self, conn: socket.socket, msg: Message) -> bool:
        body = self._reply_body(msg)
        if msg.request is self.bad:
            how = self.how
            if how == "close":
                return False
            if how == "silent":
                self.done.wait(10)
                return False
            if how == "short":
                conn.sendall(HEADER.pack(msg.request, VERSION | FLAG_REPLY, 4) + b"\0" * 4)
                return True
            if how == "nak":
                conn.sendall(encode_reply(msg.request, U64(1)))
                return True
            if how == "wrong_code":
                conn.sendall(encode_reply(R.GET_QUEUE_NUM, U64(0)))
                return True
            if how == "no_reply_flag":
                conn.sendall(HEADER.pack(msg.request, VERSION, 8) + b"\0" * 8)
                return True
            if how == "fd":
                fd = os.eventfd(0)
                try:
                    data = encode_reply(msg.request, body or U64(0))
                    conn.sendmsg(
                        [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))]
                    )
                finally:
                    os.close(fd)
                return True
            if how == "wrong_ring":
                conn.sendall(encode_reply(msg.request, VringState(99, 0)))
                return True
            if how == "huge_base":
                assert isinstance(msg.body, VringState)
                conn.sendall(encode_reply(msg.request, VringState(msg.body.index, 1 << 20)))
                return True
            if how == "zero":
                conn.sendall(encode_reply(msg.request, U64(0)))
                return True
            raise AssertionError(how)
        if body is not None:
            conn.sendall(encode_reply(msg.request, body))
        return True


@pytest.fixture
def sock(tmp_path: Path) -> Iterator[Path]:
    before = open_fds()
    yield tmp_path / "be.sock"
    # Every fd the frontend or the scripted backend opened is closed again.
    deadline = time.monotonic() + 5
    while open_fds() != before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert open_fds() == before, "fd leak"


def frontend(path: Path, **kw: object) -> VhostUserFrontend:
    kw.setdefault("timeout", 1.0)
    kw.setdefault("queue_size", 64)
    return VhostUserFrontend(path, **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# A well-behaved scripted backend: order and content of what we send
# ---------------------------------------------------------------------------


def test_handshake_follows_qemu_order(sock: Path) -> None:
    be = ScriptedBackend(sock)
    try:
        with frontend(sock, queue_pairs=2) as fe:
            assert fe.max_pairs == 2
            assert fe.protocol_features == PF.MQ.mask | PF.REPLY_ACK.mask
            assert fe.features & NetFeature.CTRL_VQ  # provided by the frontend itself
            assert fe.acked_backend_features & NetFeature.EVENT_IDX
        reqs = [m.request for m in be.seen]
    finally:
        be.close()
    head = [R.GET_FEATURES, R.GET_PROTOCOL_FEATURES, R.SET_PROTOCOL_FEATURES,
            R.GET_QUEUE_NUM, R.SET_OWNER, R.SET_FEATURES, R.SET_MEM_TABLE]  # fmt: skip
    assert reqs[: len(head)] == head
    ring = [R.SET_VRING_NUM, R.SET_VRING_BASE, R.SET_VRING_ADDR, R.SET_VRING_KICK,
            R.SET_VRING_CALL]  # fmt: skip
    rings = reqs[len(head) : len(head) + 4 * len(ring)]
    assert rings == ring * 4  # rx0 tx0 rx1 tx1; the control queue never reaches the backend
    assert reqs.count(R.SET_VRING_ENABLE) == 4 + 2  # set-up: all 4; close: the 2 enabled
    # close() stops like QEMU's vhost_net_stop: disable, then GET_VRING_BASE per ring.
    assert reqs[-6:] == [R.SET_VRING_ENABLE] * 2 + [R.GET_VRING_BASE] * 4
    # SET_FEATURES acks only backend bits (+ bit 30), never CTRL_VQ.
    set_feat = next(m for m in be.seen if m.request is R.SET_FEATURES)
    assert isinstance(set_feat.body, U64)
    assert set_feat.body.value >> F_PROTOCOL_FEATURES & 1
    assert not set_feat.body.value & NetFeature.CTRL_VQ
    # With REPLY_ACK every reply-less request after SET_PROTOCOL_FEATURES asked for an ack.
    after = be.seen[3:]
    for m in after:
        if m.request not in (R.GET_QUEUE_NUM, R.GET_VRING_BASE):
            assert m.need_reply, m.request
    addr = next(m for m in be.seen if m.request is R.SET_VRING_ADDR)
    assert addr.body.desc >= VA_BASE  # type: ignore[union-attr]


def test_no_protocol_features_means_one_pair_and_a_sync_round_trip(sock: Path) -> None:
    be = ScriptedBackend(sock, features=int(NetFeature.VERSION_1 | NetFeature.MQ), protocol=0)
    try:
        with frontend(sock, queue_pairs=4) as fe:
            assert fe.protocol_features == 0
            assert fe.max_pairs == 1  # no MQ protocol feature: one pair
        reqs = [m.request for m in be.seen]
    finally:
        be.close()
    assert R.GET_PROTOCOL_FEATURES not in reqs
    assert not any(m.need_reply for m in be.seen)
    # Without protocol features rings start enabled: SET_VRING_ENABLE is never sent.
    assert R.SET_VRING_ENABLE not in reqs
    # Without REPLY_ACK a GET_FEATURES round trip proves the backend took the set-up.
    last_call = max(i for i, r in enumerate(reqs) if r is R.SET_VRING_CALL)
    assert reqs[last_call + 1] is R.GET_FEATURES


def test_configure_mem_slots_uses_add_mem_reg(sock: Path) -> None:
    be = ScriptedBackend(
        sock, protocol=PF.MQ.mask | PF.REPLY_ACK.mask | PF.CONFIGURE_MEM_SLOTS.mask
    )
    try:
        with frontend(sock):
            pass
        reqs = [m.request for m in be.seen]
    finally:
        be.close()
    assert R.GET_MAX_MEM_SLOTS in reqs
    assert R.ADD_MEM_REG in reqs and R.SET_MEM_TABLE not in reqs


# ---------------------------------------------------------------------------
# Misbehaviour: every case is a clear ProtocolError, nothing hangs, no fd leaks
# ---------------------------------------------------------------------------

CASES = [
    (R.GET_FEATURES, "short", ProtocolError, "expected an 8-byte u64"),
    (R.GET_QUEUE_NUM, "short", ProtocolError, "expected an 8-byte u64"),
    (R.SET_MEM_TABLE, "nak", BackendRefusedError, "refused SET_MEM_TABLE"),
    (R.SET_VRING_ADDR, "nak", BackendRefusedError, "refused SET_VRING_ADDR"),
    (R.GET_PROTOCOL_FEATURES, "fd", ProtocolError, "reply with 1 fds"),
    (R.SET_OWNER, "fd", ProtocolError, "reply with 1 fds"),
    (R.GET_FEATURES, "wrong_code", ProtocolError, "reply to GET_QUEUE_NUM while waiting"),
    (R.GET_FEATURES, "no_reply_flag", ProtocolError, "missing REPLY flag"),
    (R.SET_VRING_KICK, "silent", BackendTimeoutError, "did not answer SET_VRING_KICK"),
    (R.GET_FEATURES, "silent", BackendTimeoutError, "did not answer GET_FEATURES"),
    (R.SET_FEATURES, "close", BackendClosedError, "closed the connection"),
    (R.SET_VRING_CALL, "close", BackendClosedError, "closed the connection"),
    (R.GET_QUEUE_NUM, "zero", ProtocolError, "supports 0 queues"),
]


@pytest.mark.parametrize(("bad", "how", "exc", "text"), CASES, ids=str)
def test_bad_backend_is_a_clear_protocol_error(
    sock: Path, bad: Request, how: str, exc: type[Exception], text: str
) -> None:
    be = ScriptedBackend(sock, bad=bad, how=how)
    fe = frontend(sock, timeout=0.5)
    t0 = time.monotonic()
    try:
        with pytest.raises(exc, match=text):
            fe.open()
    finally:
        fe.close()
        be.close()
    assert time.monotonic() - t0 < 5  # every wait is bounded
    assert not fe.connected


@pytest.mark.parametrize("how", ["wrong_ring", "huge_base", "short"])
def test_bad_get_vring_base_reply(sock: Path, how: str) -> None:
    be = ScriptedBackend(sock, bad=R.GET_VRING_BASE, how=how)
    fe = frontend(sock)
    try:
        fe.open()
        with pytest.raises(ProtocolError, match="GET_VRING_BASE"):
            fe.stop_rings()
    finally:
        fe.close()
        be.close()


def test_nobody_listening_times_out(sock: Path) -> None:
    fe = frontend(sock, timeout=0.3)
    t0 = time.monotonic()
    with pytest.raises(BackendTimeoutError, match="cannot connect"):
        fe.open()
    fe.close()
    assert time.monotonic() - t0 < 2


def test_listen_mode_nobody_connects_times_out(sock: Path) -> None:
    fe = frontend(sock, mode="listen", timeout=0.3)
    with pytest.raises(BackendTimeoutError, match="no backend connected"):
        fe.open()
    fe.close()
    assert not sock.exists()


def test_peer_errors_are_peer_errors(sock: Path) -> None:
    be = ScriptedBackend(sock, bad=R.SET_OWNER, how="nak")
    fe = frontend(sock)
    try:
        with pytest.raises(PeerError):
            fe.open()
    finally:
        fe.close()
        be.close()


# ---------------------------------------------------------------------------
# Against virtnet's own backend state machine and server
# ---------------------------------------------------------------------------


class Recorder(NullEvents):
    def __init__(self) -> None:
        self.starts: dict[int, RingConfig] = {}
        self.enabled: dict[int, bool] = {}

    def on_ring_start(self, index: int, config: RingConfig) -> None:
        self.starts[index] = config

    def on_ring_enable(self, index: int, enabled: bool) -> None:
        self.enabled[index] = enabled


class ServerThread:
    """virtnet's Server on a thread (connect or listen endpoint)."""

    def __init__(self, path: Path, *, client: bool, pairs: int = 4) -> None:
        self.rec: list[Recorder] = []
        self.backends: list[Backend] = []

        def factory() -> Backend:
            r = Recorder()
            self.rec.append(r)
            be = Backend(r, BackendConfig(max_queue_pairs=pairs))
            self.backends.append(be)
            return be

        self.srv = Server()
        if client:
            self.ep = self.srv.add_client(str(path), factory, retry_interval=0.05)
        else:
            self.ep = self.srv.add_listener(str(path), factory)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stop.is_set():
            self.srv.run_once(0.02)

    def drop_connection(self) -> None:
        self.srv.disconnect(self.ep, "test restart")

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.srv.close()


def wait_until(pred: Callable[[], bool], timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


@pytest.mark.parametrize("mode", ["connect", "listen"])
def test_virtnet_backend_sees_rings_and_queue_changes(sock: Path, mode: str) -> None:
    srv = ServerThread(sock, client=(mode == "listen"))
    try:
        with frontend(sock, mode=mode, queue_pairs=3, timeout=3.0) as fe:
            assert wait_until(lambda: bool(srv.rec) and len(srv.rec[-1].starts) == 6)
            rec = srv.rec[-1]
            assert fe.max_pairs == 3 and fe.curr_pairs == 1
            # Ring addresses the backend translated back to guest-physical ones.
            for index, cfg in rec.starts.items():
                assert (cfg.desc_addr, cfg.avail_addr, cfg.used_addr) == (
                    fe.rings[index].desc,
                    fe.rings[index].avail,
                    fe.rings[index].used,
                )

            def enabled() -> list[bool]:
                return [rec.enabled.get(i, False) for i in range(6)]

            assert enabled() == [True, True, False, False, False, False]
            assert fe.set_queue_pairs(3)
            assert enabled() == [True] * 6
            assert fe.set_queue_pairs(2)
            assert enabled() == [True, True, True, True, False, False]
            assert not fe.set_queue_pairs(4)  # beyond max: the driver does not even ask
            # A raw VQ_PAIRS_SET beyond the maximum: the frontend's control queue says ERR.
            ack, _ = fe.driver.ctrl_command(CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", 9))
            assert ack == CTRL_ERR
            assert fe.curr_pairs == 2 and fe.stats.ctrl_errors == 1
            assert enabled() == [True, True, True, True, False, False]
    finally:
        srv.close()


def test_reconnect_resumes_rings_at_the_used_index(sock: Path) -> None:
    srv = ServerThread(sock, client=False, pairs=2)
    try:
        with frontend(sock, queue_pairs=2, timeout=3.0) as fe:
            assert fe.set_queue_pairs(2)
            assert fe.mem is not None
            # Pretend the old backend used 5 entries of ring 1 (tx of pair 0).
            used = fe.mem.view(fe.rings[1].used + 2, 2).cast("H")
            used[0] = 5
            srv.drop_connection()
            assert wait_until(lambda: not fe.check_connection() or fe.stats.reconnects == 1)
            assert fe.stats.reconnects == 1
            assert wait_until(lambda: len(srv.rec) == 2 and len(srv.rec[1].starts) == 4)
            assert srv.rec[1].starts[1].last_avail_idx == 5
            assert srv.rec[1].starts[0].last_avail_idx == 0
            # The queue count in force before the restart is restored.
            assert all(srv.rec[1].enabled.get(i) for i in range(4))
    finally:
        srv.close()


def test_reconnect_disabled_raises(sock: Path) -> None:
    srv = ServerThread(sock, client=False, pairs=1)
    try:
        fe = frontend(sock, auto_reconnect=False)
        with fe:
            srv.drop_connection()
            assert wait_until(lambda: fe._chan is not None and fe._chan.readable_eof())
            with pytest.raises(BackendClosedError):
                fe.check_connection()
    finally:
        srv.close()


def test_frontend_closes_everything(sock: Path) -> None:
    be = ScriptedBackend(sock)
    try:
        fe = frontend(sock, queue_pairs=2, fast=True)
        fe.open()
        assert len(fe.fast_pairs) == 2
        fe.close()
        fe.close()  # idempotent
    finally:
        be.close()
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
