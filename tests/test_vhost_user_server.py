"""vhost-user server: real Unix sockets, SCM_RIGHTS, hostile clients, many VMs."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from virtnet.testing.fds import open_fds
from virtnet.vhost_user.backend import Backend, BackendConfig
from virtnet.vhost_user.codec import (
    HEADER,
    U64,
    VERSION,
    MemRegion,
    MemTable,
    Request,
    VringAddr,
    VringFd,
    VringState,
    encode_message,
    encode_request,
    parse_message,
)
from virtnet.vhost_user.server import Server

R = Request
UVA = 0x7F00_0000_0000


@pytest.fixture
def server() -> Iterator[Server]:
    before = open_fds()
    srv = Server()
    yield srv
    srv.close()
    assert open_fds() == before, "fd leak"


def factory(pairs: int = 2) -> Callable[[], Backend]:
    return lambda: Backend(config=BackendConfig(max_queue_pairs=pairs))


def pump(srv: Server, n: int = 5) -> None:
    for _ in range(n):
        srv.run_once(0.01)


def connect(path: Path | str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(path))
    s.settimeout(2)
    return s


def ask(srv: Server, sock: socket.socket, wire: bytes, fds: list[int] | None = None) -> bytes:
    """Send one request and pump the server until a full reply arrives."""
    socket.send_fds(sock, [wire], fds or [])
    for fd in fds or []:
        os.close(fd)
    out = b""
    sock.setblocking(False)
    try:
        for _ in range(200):
            srv.run_once(0.01)
            try:
                chunk = sock.recv(4096)
            except BlockingIOError:
                continue
            if not chunk:
                break
            out += chunk
            if len(out) >= HEADER.size and len(out) >= HEADER.size + HEADER.unpack_from(out)[2]:
                break
    finally:
        sock.settimeout(2)
    return out


def send(srv: Server, sock: socket.socket, wire: bytes, fds: list[int] | None = None) -> None:
    socket.send_fds(sock, [wire], fds or [])
    for fd in fds or []:
        os.close(fd)
    pump(srv)


def is_closed_by_peer(srv: Server, sock: socket.socket) -> bool:
    pump(srv)
    sock.setblocking(False)
    try:
        for _ in range(50):
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                srv.run_once(0.01)
                continue
            except ConnectionResetError:
                return True
            if data == b"":
                return True
        return False
    finally:
        sock.close()


def features(srv: Server, sock: socket.socket) -> int:
    m = parse_message(ask(srv, sock, encode_request(R.GET_FEATURES)), replies=True)
    assert isinstance(m.body, U64)
    return m.body.value


def memfd(size: int) -> int:
    fd = os.memfd_create("guest")
    os.ftruncate(fd, size)
    return fd


# Hostile inputs: (name, wire, number of eventfds to attach, expected log text)
HOSTILE: list[tuple[str, Callable[[], tuple[bytes, list[int]]], str]] = [
    ("bad-version", lambda: (HEADER.pack(R.GET_FEATURES, 2, 0), []), "version"),
    ("unknown-request", lambda: (HEADER.pack(99, VERSION, 0), []), "unknown vhost-user request 99"),
    ("reply-flag", lambda: (HEADER.pack(R.GET_FEATURES, VERSION | 4, 0), []), "REPLY"),
    ("oversized", lambda: (HEADER.pack(R.SET_FEATURES, VERSION, 1 << 30), []), "exceeds"),
    ("short-body", lambda: (encode_message(R.SET_FEATURES, VERSION, b"\0" * 4), []), "expected 8"),
    (
        "two-fds-for-kick",
        lambda: (
            encode_request(R.SET_VRING_CALL, VringFd(0, False)),
            [os.eventfd(0), os.eventfd(0)],
        ),
        "carries 2 fds",
    ),
    (
        "fd-with-nofd-flag",
        lambda: (encode_request(R.SET_VRING_CALL, VringFd(0, True)), [os.eventfd(0)]),
        "carries 1 fds",
    ),
    (
        "too-many-fds",
        lambda: (encode_request(R.GET_FEATURES), [os.eventfd(0) for _ in range(12)]),
        "fds",
    ),
    (
        "ring-out-of-range",
        lambda: (encode_request(R.SET_VRING_NUM, VringState(4, 256)), []),
        "ring index 4",
    ),
    (
        "ring-address-outside-memory",
        lambda: (
            encode_request(R.SET_MEM_TABLE, MemTable((MemRegion(0, 1 << 16, UVA, 0),)))
            + encode_request(R.SET_VRING_NUM, VringState(0, 256))
            + encode_request(R.SET_VRING_ADDR, VringAddr(0, 0, UVA + 0xF800, UVA, UVA, 0)),
            [memfd(1 << 16)],
        ),
        "descriptor table",
    ),
    (
        "memory-fd-too-small",
        lambda: (
            encode_request(R.SET_MEM_TABLE, MemTable((MemRegion(0, 1 << 20, UVA, 0),))),
            [memfd(4096)],
        ),
        "past the end",
    ),
    (
        "region-overflow",
        lambda: (
            encode_message(
                R.SET_MEM_TABLE,
                VERSION,
                struct.pack("=IIQQQQ", 1, 0, (1 << 64) - 4096, 8192, UVA, 0),
            ),
            [memfd(4096)],
        ),
        "overflows",
    ),
    (
        "unsupported-request",
        lambda: (encode_message(R.POSTCOPY_ADVISE, VERSION, b""), []),
        "not supported",
    ),
]


@pytest.mark.parametrize(("name", "make", "expect"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_client_is_dropped_and_others_keep_working(
    server: Server,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    name: str,
    make: Callable[[], tuple[bytes, list[int]]],
    expect: str,
) -> None:
    good_ep = server.add_listener(str(tmp_path / "good.sock"), factory(), name="vm-good")
    bad_ep = server.add_listener(str(tmp_path / "bad.sock"), factory(), name="vm-bad")
    good = connect(tmp_path / "good.sock")
    bad = connect(tmp_path / "bad.sock")
    pump(server)
    assert features(server, good) & (1 << 32)
    wire, fds = make()
    with caplog.at_level(logging.ERROR, logger="virtnet.vhost_user.server"):
        send(server, bad, wire, fds)
        assert is_closed_by_peer(server, bad)
    assert any(expect in r.getMessage() and "vm-bad" in r.getMessage() for r in caplog.records), [
        r.getMessage() for r in caplog.records
    ]
    assert bad_ep.errors == 1 and bad_ep.connection is None
    # The other VM is unaffected ...
    assert features(server, good) & (1 << 32)
    assert good_ep.errors == 0
    # ... and the bad VM's socket accepts a new connection.
    again = connect(tmp_path / "bad.sock")
    pump(server)
    assert features(server, again) & (1 << 32)
    assert bad_ep.connections == 2
    again.close()
    good.close()
    pump(server)


def test_eof_mid_message_is_an_error(server: Server, tmp_path: Path) -> None:
    ep = server.add_listener(str(tmp_path / "a.sock"), factory())
    s = connect(tmp_path / "a.sock")
    pump(server)
    s.sendall(encode_request(R.SET_FEATURES, U64(0))[:7])
    s.close()
    pump(server)
    assert ep.errors == 1 and ep.connection is None and "mid-message" in (ep.last_error or "")


def test_clean_close_is_not_an_error_and_listener_accepts_again(
    server: Server, tmp_path: Path
) -> None:
    ep = server.add_listener(str(tmp_path / "a.sock"), factory())
    for _ in range(3):
        s = connect(tmp_path / "a.sock")
        pump(server)
        features(server, s)
        s.close()
        pump(server)
    assert ep.connections == 3 and ep.errors == 0


def test_second_client_refused_while_first_is_connected(server: Server, tmp_path: Path) -> None:
    server.add_listener(str(tmp_path / "a.sock"), factory())
    first = connect(tmp_path / "a.sock")
    pump(server)
    second = connect(tmp_path / "a.sock")
    assert is_closed_by_peer(server, second)
    assert features(server, first)
    first.close()
    pump(server)


def test_fds_are_kept_or_closed(server: Server, tmp_path: Path) -> None:
    """A full ring setup over the socket, then disconnect: every fd is released."""
    server.add_listener(str(tmp_path / "a.sock"), factory(1))
    s = connect(tmp_path / "a.sock")
    pump(server)
    size = 1 << 20
    pf = parse_message(ask(server, s, encode_request(R.GET_PROTOCOL_FEATURES)), replies=True)
    assert isinstance(pf.body, U64)
    send(server, s, encode_request(R.SET_PROTOCOL_FEATURES, pf.body))
    send(server, s, encode_request(R.SET_FEATURES, U64(features(server, s))))
    ack = ask(
        server,
        s,
        encode_request(R.SET_MEM_TABLE, MemTable((MemRegion(0, size, UVA, 0),)), need_reply=True),
        [memfd(size)],
    )
    assert parse_message(ack, replies=True).body == U64(0)
    for ring in (0, 1):
        base = UVA + 0x4000 * ring
        send(server, s, encode_request(R.SET_VRING_NUM, VringState(ring, 64)))
        send(
            server,
            s,
            encode_request(
                R.SET_VRING_ADDR, VringAddr(ring, 0, base, base + 0x2000, base + 0x1000, 0)
            ),
        )
        send(server, s, encode_request(R.SET_VRING_KICK, VringFd(ring, False)), [os.eventfd(0)])
        send(server, s, encode_request(R.SET_VRING_CALL, VringFd(ring, False)), [os.eventfd(0)])
    reply = ask(server, s, encode_request(R.GET_VRING_BASE, VringState(1, 0)))
    assert parse_message(reply, replies=True).body == VringState(1, 0)
    s.close()
    pump(server)
    # the server fixture asserts that no fd leaked


def test_client_mode_dials_with_retry_and_redials(tmp_path: Path) -> None:
    before = open_fds()
    now = [0.0]
    srv = Server(clock=lambda: now[0])
    path = str(tmp_path / "qemu.sock")
    ep = srv.add_client(path, factory(), retry_interval=1.0)
    assert ep.connection is None  # nobody listens yet
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(path)
    lst.listen(1)
    srv.run_once(0)
    assert ep.connection is None  # not due yet
    now[0] = 1.5
    srv.run_once(0)
    assert ep.connection is not None
    peer, _ = lst.accept()
    peer.settimeout(2)
    assert features(srv, peer) & (1 << 32)
    peer.close()  # QEMU went away
    pump(srv)
    assert ep.connection is None
    now[0] = 3.0
    srv.run_once(0)
    assert ep.connection is not None and ep.connections == 2
    peer2, _ = lst.accept()
    peer2.close()
    pump(srv)
    srv.close()
    lst.close()
    assert open_fds() == before


def test_adopted_socketpair(server: Server) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ep = server.adopt(a, factory(), name="pair")
    b.settimeout(2)
    assert features(server, b)
    # byte-by-byte over a real socket
    wire = encode_request(R.GET_QUEUE_NUM)
    pf = encode_request(R.GET_PROTOCOL_FEATURES)
    for byte in pf:
        b.send(bytes([byte]))
        server.run_once(0)
    b.recv(4096)
    for byte in wire[:-1]:
        b.send(bytes([byte]))
        server.run_once(0)
    reply = ask(server, b, wire[-1:])
    assert parse_message(reply, replies=True).body == U64(2)
    b.close()
    pump(server)
    assert ep.connection is None


def test_failed_need_reply_request_gets_a_nack_before_close(server: Server, tmp_path: Path) -> None:
    ep = server.add_listener(str(tmp_path / "a.sock"), factory())
    s = connect(tmp_path / "a.sock")
    pump(server)
    send(server, s, encode_request(R.SET_PROTOCOL_FEATURES, U64(1 << 3)))  # REPLY_ACK
    nack = ask(server, s, encode_request(R.SET_VRING_NUM, VringState(0, 3), need_reply=True))
    assert parse_message(nack, replies=True).body == U64(1)
    assert is_closed_by_peer(server, s)
    assert ep.errors == 1 and "power of 2" in (ep.last_error or "")


def test_frontend_that_never_reads_stalls_only_itself(server: Server, tmp_path: Path) -> None:
    server.add_listener(str(tmp_path / "good.sock"), factory(), name="good")
    hog_ep = server.add_listener(str(tmp_path / "hog.sock"), factory(), name="hog")
    good = connect(tmp_path / "good.sock")
    hog = connect(tmp_path / "hog.sock")
    pump(server)
    hog.setblocking(False)
    request = encode_request(R.GET_FEATURES) * 1024
    sent = 0
    for _ in range(400):  # keep asking, never read a reply
        with contextlib.suppress(BlockingIOError):
            sent += hog.send(request)
        server.run_once(0)
    assert sent > 100_000
    conn = hog_ep.connection
    assert conn is not None and conn.outbuf  # parked, not blocking
    assert features(server, good) & (1 << 32)  # the other VM is served meanwhile
    hog.close()
    pump(server, 20)
    assert hog_ep.connection is None
    good.close()
    pump(server)


def test_a_watched_socket_wakes_the_loop_at_once(server: Server) -> None:
    """``watch``: readiness of an owner's socket ends the wait early and calls
    its callback, which reads it; after ``unwatch`` it no longer does."""
    mine, theirs = socket.socketpair()
    calls: list[bytes] = []
    try:
        server.watch(mine, lambda: calls.append(mine.recv(64)))
        theirs.send(b"x")
        t0 = time.monotonic()
        server.run_once(5.0)
        assert calls == [b"x"] and time.monotonic() - t0 < 1.0
        server.unwatch(mine)
        theirs.send(b"y")
        server.run_once(0.05)
        assert calls == [b"x"]
    finally:
        server.unwatch(mine)
        mine.close()
        theirs.close()
