"""Supervisor -> worker hand-off: a Backend driving fake pair workers over SOCK_SEQPACKET."""

from __future__ import annotations

import os
import socket
import struct
import threading
from dataclasses import dataclass, field

import pytest

from virtnet.errors import ProtocolError
from virtnet.memory import GuestMemory
from virtnet.vhost_user.backend import Backend, BackendConfig, RegionInfo, RingConfig
from virtnet.vhost_user.codec import (
    U64,
    Body,
    Empty,
    MemRegion,
    MemTable,
    Message,
    Request,
    SingleRegion,
    VringAddr,
    VringFd,
    VringState,
    encode_request,
    parse_message,
)
from virtnet.vhost_user.handoff import Command, Op, PairRouter, TableBuilder, receive, send
from virtnet.vhost_user.worker import region_mappings

pytestmark = pytest.mark.usefixtures("no_fd_leak")
R = Request
UVA = 0x7F55_0000_0000
GPA = 0x4000_0000
SIZE = 1 << 20


@dataclass
class FakeWorker:
    """What a pair worker does with the hand-off (no data path)."""

    pair: int
    sock: socket.socket
    memory: GuestMemory = field(default_factory=GuestMemory)
    rings: dict[int, RingConfig] = field(default_factory=dict)
    enabled: dict[int, bool] = field(default_factory=dict)
    features: int = 0
    kicks: list[int] = field(default_factory=list)
    greeting: bytes = b""
    fds: list[int] = field(default_factory=list)

    def run(self) -> None:
        table = TableBuilder()
        while True:
            cmd = receive(self.sock)
            if cmd is None or cmd.op is Op.SHUTDOWN:
                break
            if cmd.op in (Op.MEM_REGION, Op.MEM_COMMIT):
                regions = table.add(cmd)
                if regions is not None:
                    old = self.memory.regions
                    self.memory.replace(region_mappings(regions))
                    for m in old:
                        m.close()
                    self.greeting = self.memory.read(GPA, 5)
                    send(self.sock, Command(Op.ACK))
            elif cmd.op is Op.RING_START:
                assert cmd.config is not None
                self.rings[cmd.ring] = cmd.config
                self.enabled[cmd.ring] = cmd.config.enabled
                if cmd.config.kick_fd is not None:
                    self.kicks.append(int.from_bytes(os.read(cmd.config.kick_fd, 8), "little"))
                self.fds += cmd.fds
            elif cmd.op is Op.RING_STOP:
                cfg = self.rings.pop(cmd.ring)
                send(self.sock, Command(Op.STOPPED, cmd.ring, value=cfg.last_avail_idx + 10))
            elif cmd.op is Op.RING_ENABLE:
                self.enabled[cmd.ring] = bool(cmd.value)
            elif cmd.op is Op.RING_CALL:
                self.fds += cmd.fds
            elif cmd.op is Op.FEATURES:
                self.features = cmd.value
        for fd in self.fds:
            os.close(fd)
        self.memory.close()
        self.sock.close()


def msg(request: Request, body: Body | None = None, fds: tuple[int, ...] = ()) -> Message:
    return parse_message(encode_request(request, body or Empty()), fds)


def test_backend_drives_pair_workers() -> None:
    workers: dict[int, FakeWorker] = {}
    threads: list[threading.Thread] = []
    ours: list[socket.socket] = []

    def connect(pair: int) -> socket.socket:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        w = FakeWorker(pair, b)
        workers[pair] = w
        t = threading.Thread(target=w.run)
        t.start()
        threads.append(t)
        ours.append(a)
        return a

    router = PairRouter(connect)
    be = Backend(router, BackendConfig(max_queue_pairs=2))

    def h(request: Request, body: Body | None = None, fds: tuple[int, ...] = ()) -> bytes | None:
        return be.handle(msg(request, body, fds))

    pf = parse_message(h(R.GET_PROTOCOL_FEATURES) or b"", replies=True).body
    assert isinstance(pf, U64)
    h(R.SET_PROTOCOL_FEATURES, pf)
    h(R.SET_FEATURES, U64(1 << 32 | 1 << 30 | 1 << 29))
    mem = os.memfd_create("guest")
    os.ftruncate(mem, SIZE)
    os.pwrite(mem, b"hello", 0)
    h(R.ADD_MEM_REG, SingleRegion(MemRegion(GPA, SIZE, UVA, 0)), (mem,))
    kicks = []
    for ring in range(4):
        base = UVA + 0x10000 * (ring + 1)
        h(R.SET_VRING_NUM, VringState(ring, 128))
        h(R.SET_VRING_BASE, VringState(ring, ring))
        h(R.SET_VRING_ADDR, VringAddr(ring, 0, base, base + 0x2000, base + 0x1000, 0))
        kick = os.eventfd(0)
        os.eventfd_write(kick, 100 + ring)
        kicks.append(kick)
        h(R.SET_VRING_KICK, VringFd(ring, False), (os.dup(kick),))
        h(R.SET_VRING_CALL, VringFd(ring, False), (os.eventfd(0),))
    h(R.SET_VRING_ENABLE, VringState(0, 1))
    # A new table with the same layout while running: every worker ACKs first.
    mem2 = os.memfd_create("guest2")
    os.ftruncate(mem2, SIZE)
    os.pwrite(mem2, b"world", 0)
    h(R.SET_MEM_TABLE, MemTable((MemRegion(GPA, SIZE, UVA, 0),)), (mem2,))
    replies = [h(R.GET_VRING_BASE, VringState(ring, 0)) for ring in range(4)]
    bases = [parse_message(r or b"", replies=True).body for r in replies]
    assert bases == [VringState(i, i + 10) for i in range(4)]
    be.close()
    router.shutdown()
    for t in threads:
        t.join(5)
    for s in ours:
        s.close()
    for k in kicks:
        os.close(k)
    assert sorted(workers) == [0, 1]
    w0, w1 = workers[0], workers[1]
    assert w0.greeting == b"world" and w1.greeting == b"world"  # saw the second table
    assert w0.features == 1 << 32 | 1 << 30 | 1 << 29
    assert sorted(w0.kicks) == [100, 101] and sorted(w1.kicks) == [102, 103]
    assert w0.enabled[0] and not w1.enabled.get(2, False)


def test_decode_rejections_close_fds() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    bad: list[tuple[bytes, int]] = [
        (struct.pack("=II", 99, 0), 0),
        (struct.pack("=II", Op.MEM_REGION, 0) + bytes(32), 0),
        (struct.pack("=II", Op.MEM_REGION, 0) + bytes(32), 2),
        (struct.pack("=II", Op.RING_CALL, 0) + struct.pack("=Q", 1), 0),
        (struct.pack("=II", Op.RING_CALL, 0) + struct.pack("=Q", 2), 0),
        (struct.pack("=II", Op.ACK, 0) + b"x", 0),
        (b"abc", 0),
    ]
    for data, nfds in bad:
        fds = [os.eventfd(0) for _ in range(nfds)]
        if fds:
            socket.send_fds(a, [data], fds)
        else:
            a.send(data)
        for fd in fds:
            os.close(fd)
        with pytest.raises(ProtocolError):
            receive(b)
    a.send(bytes(300))
    with pytest.raises(ProtocolError, match="truncated"):
        receive(b)
    a.close()
    assert receive(b) is None
    b.close()


def test_table_builder_count_mismatch() -> None:
    tb = TableBuilder()
    fd = os.eventfd(0)
    tb.add(Command(Op.MEM_REGION, region=RegionInfo(0, 4096, 0, 0, fd), fds=(fd,)))
    with pytest.raises(ProtocolError, match="MEM_COMMIT of 2"):
        tb.add(Command(Op.MEM_COMMIT, value=2))
    with pytest.raises(ProtocolError):
        tb.add(Command(Op.RING_STOP))
    tb.close()


def _child_worker(sock: socket.socket) -> int:
    """A worker process: maps the table, checks the kick fd, answers stops."""
    table = TableBuilder()
    memory = GuestMemory()
    held: list[int] = []
    while True:
        cmd = receive(sock)
        if cmd is None or cmd.op is Op.SHUTDOWN:
            return 0
        if cmd.op in (Op.MEM_REGION, Op.MEM_COMMIT):
            regions = table.add(cmd)
            if regions is not None:
                memory.replace(region_mappings(regions))
                memory.write(GPA + 100, b"from the worker")
                send(sock, Command(Op.ACK))
        elif cmd.op is Op.RING_START:
            assert cmd.config is not None and cmd.config.kick_fd is not None
            held += cmd.fds
            last = cmd.config.last_avail_idx + os.eventfd_read(cmd.config.kick_fd)
            send(sock, Command(Op.FEATURES, value=last))  # tell the test what we saw
        elif cmd.op is Op.RING_STOP:
            send(sock, Command(Op.STOPPED, cmd.ring, value=777))


def test_worker_process_maps_guest_memory_from_handed_fds() -> None:
    pids: list[int] = []
    ours: list[socket.socket] = []

    def connect(pair: int) -> socket.socket:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            a.close()
            code = 1
            try:
                code = _child_worker(b)
            finally:
                os._exit(code)
        b.close()
        pids.append(pid)
        ours.append(a)
        return a

    router = PairRouter(connect)
    be = Backend(router, BackendConfig(max_queue_pairs=1))
    be.handle(msg(R.SET_PROTOCOL_FEATURES, U64(0x1A019)))
    be.handle(msg(R.SET_FEATURES, U64(1 << 32 | 1 << 30)))
    mem = os.memfd_create("guest")
    os.ftruncate(mem, SIZE)
    be.handle(msg(R.SET_MEM_TABLE, MemTable((MemRegion(GPA, SIZE, UVA, 0),)), (mem,)))
    be.handle(msg(R.SET_VRING_NUM, VringState(1, 64)))
    be.handle(msg(R.SET_VRING_BASE, VringState(1, 5)))
    be.handle(msg(R.SET_VRING_ADDR, VringAddr(1, 0, UVA, UVA + 0x800, UVA + 0x400, 0)))
    kick = os.eventfd(0)
    os.eventfd_write(kick, 3)
    be.handle(msg(R.SET_VRING_KICK, VringFd(1, False), (kick,)))
    seen = receive(ours[0])  # the worker's report on the kick it read
    assert seen is not None and seen.value == 5 + 3
    # The worker's write went through its own mapping of the same memfd.
    assert be.memory.read(GPA + 100, 15) == b"from the worker"
    reply = be.handle(msg(R.GET_VRING_BASE, VringState(1, 0)))
    assert parse_message(reply or b"", replies=True).body == VringState(1, 777)
    be.close()
    router.shutdown()
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    for s in ours:
        s.close()
