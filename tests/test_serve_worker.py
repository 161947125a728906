"""The queue-pair worker process against a simulated frontend (no VM).

A driver (``virtnet.virtq.DriverQueue``) runs in the test process over a
memfd that the forked worker maps itself; kicks and calls are real eventfds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import select
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtnet.memory import GuestMemory, MemoryRegion
from virtnet.net import NetFeature
from virtnet.packed import FRESH_BASE, PackedDriverQueue, decode_base, packed_ring_layout
from virtnet.vhost_user.backend import RingConfig
from virtnet.vhost_user.supervisor import Supervisor
from virtnet.vhost_user.worker import (
    FIELDS,
    KICK_DEFER_BULK_BYTES_PER_S,
    KICK_DEFER_MIN_CHAINS,
    KICK_DEFER_ROUNDS,
    KICK_DEFER_SHORT_US,
    NFIELDS,
    POS_FIELDS,
    RX_BATCH,
    RX_PUBLISH_BYTES,
    TX_SIGNAL_CHAINS,
    Ctl,
    RegionSpec,
    RingSpec,
    Worker,
    WorkerSpec,
    spawn_worker,
)
from virtnet.virtq import DriverQueue, split_ring_layout

MEM = 4 << 20
QSIZE = 256
RX_RING = 0x10000
TX_RING = 0x20000
BUFS = 0x100000
BUF_SIZE = 2048
#: IN_ORDER: the rigs' driver queues check that the worker uses buffers in order.
FEATURES = int(
    NetFeature.VERSION_1
    | NetFeature.MRG_RXBUF
    | NetFeature.EVENT_IDX
    | NetFeature.INDIRECT_DESC
    | NetFeature.IN_ORDER
)


@dataclass
class Rig:
    mem: GuestMemory
    memfd: int
    rx: DriverQueue
    tx: DriverQueue
    kicks: tuple[int, int]
    calls: tuple[int, int]
    err: tuple[int, int]
    counters: memoryview
    pid: int = 0
    ctl: object = None
    packed: bool = False

    def spec(self, port: str = "loopback", rx_avail: int = 0, tx_avail: int = 0) -> WorkerSpec:
        lay = packed_ring_layout(QSIZE) if self.packed else split_ring_layout(QSIZE)
        rings = []
        fresh = FRESH_BASE if self.packed else 0
        for i, base, asked in ((0, RX_RING, rx_avail), (1, TX_RING, tx_avail)):
            avail = asked or fresh
            rings.append(
                RingSpec(
                    index=i,
                    size=QSIZE,
                    desc_addr=base + lay.desc,
                    avail_addr=base + lay.avail,
                    used_addr=base + lay.used,
                    last_avail_idx=avail,
                    kick_fd=self.kicks[i],
                    call_fd=self.calls[i],
                    err_fd=self.err[i],
                )
            )
        return WorkerSpec(
            vm="test",
            pair=0,
            features=FEATURES | (int(NetFeature.RING_PACKED) if self.packed else 0),
            regions=(RegionSpec(0, MEM, 0x7F0000000000, 0, self.memfd),),
            rx=rings[0],
            tx=rings[1],
            port_kind=port,
            port_fd=None,
        )

    def counter(self, name: str) -> int:
        return int(self.counters[FIELDS.index(name)])


def _queue(mem: GuestMemory, base: int, packed: bool = False) -> DriverQueue:
    """The driver's side of a ring at ``base`` (in order: every rig checks
    that the worker uses buffers in the order they were made available)."""
    lay = packed_ring_layout(QSIZE) if packed else split_ring_layout(QSIZE)
    queue = PackedDriverQueue if packed else DriverQueue
    q = queue(mem, QSIZE, *(base + a for a in (lay.desc, lay.avail, lay.used)),
              event_idx=True, in_order=True)  # fmt: skip
    return q  # type: ignore[return-value]  # packed: the same driver interface


@pytest.fixture
def rig() -> Iterator[Rig]:
    with _make_rig(packed=False) as r:
        yield r


@pytest.fixture
def prig() -> Iterator[Rig]:
    """A rig whose rings are packed (VIRTIO_F_RING_PACKED)."""
    with _make_rig(packed=True) as r:
        yield r


@contextlib.contextmanager
def _make_rig(packed: bool) -> Iterator[Rig]:
    import mmap

    fd = os.memfd_create("guest", 0)
    os.ftruncate(fd, MEM)
    mem = GuestMemory([MemoryRegion.from_fd(fd, guest_addr=0, size=MEM, user_addr=0x7F0000000000)])
    efd = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(6)]
    shm = mmap.mmap(-1, 8 * NFIELDS)
    r = Rig(
        mem,
        fd,
        _queue(mem, RX_RING, packed),
        _queue(mem, TX_RING, packed),
        (efd[0], efd[1]),
        (efd[2], efd[3]),
        (efd[4], efd[5]),
        memoryview(shm).cast("Q"),
        packed=packed,
    )
    try:
        yield r
    finally:
        if r.pid:
            try:
                os.kill(r.pid, 9)
                os.waitpid(r.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        for f in (*efd, fd):
            os.close(f)


def _frame(n: int, size: int = 64) -> bytes:
    dst = b"\x02\x00\x00\x00\x00\x01"
    src = b"\x02\x00\x00\x00\x00\x02"
    body = struct.pack(">I", n) + bytes(size - 14 - 4)
    return bytes(12) + dst + src + b"\x08\x00" + body


def _post_rx(r: Rig, count: int, size: int = BUF_SIZE, start: int = 0) -> None:
    for i in range(count):
        addr = BUFS + (start + i) * BUF_SIZE
        r.rx.add([], [(addr, size)], addr)
    if r.rx.kick_needed():
        os.eventfd_write(r.kicks[0], 1)


def _send(r: Rig, frames: list[bytes], slot0: int = 0x200000) -> None:
    for k, f in enumerate(frames):
        addr = slot0 + (k % 512) * BUF_SIZE
        r.mem.write(addr, f)
        r.tx.add([(addr, len(f))], [], k)
    if r.tx.kick_needed():
        os.eventfd_write(r.kicks[1], 1)


def _wait_used(q: DriverQueue, n: int, timeout: float = 5.0) -> list[tuple[object, int]]:
    got: list[tuple[object, int]] = []
    end = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < end:
        got += q.get_used()
        if len(got) < n:
            time.sleep(0.002)
    return got


def _start(r: Rig, spec: WorkerSpec) -> None:
    r.pid, r.ctl = spawn_worker(spec, r.counters)


def _stop(r: Rig) -> tuple[int, int]:
    import socket

    ctl = r.ctl
    assert isinstance(ctl, socket.socket)
    ctl.settimeout(5)
    ctl.send(Ctl.STOP)
    reply = ctl.recv(16)
    _, rx, tx = Ctl.STOP_REPLY.unpack(reply)
    _, status = os.waitpid(r.pid, 0)
    r.pid = 0
    ctl.close()
    assert os.waitstatus_to_exitcode(status) == 0
    return rx, tx


def test_loopback_tx_comes_back_on_rx_with_macs_swapped(rig: Rig) -> None:
    _post_rx(rig, 128)
    _start(rig, rig.spec())
    frames = [_frame(i) for i in range(100)]
    _send(rig, frames)
    assert len(_wait_used(rig.tx, 100)) == 100
    used = _wait_used(rig.rx, 100)
    assert len(used) == 100
    for k, (addr, length) in enumerate(used):
        assert isinstance(addr, int)
        assert length == 12 + 64
        data = rig.mem.read(addr, length)
        assert struct.unpack_from("<H", data, 10)[0] == 1  # num_buffers
        assert data[12:18] == frames[k][18:24] and data[18:24] == frames[k][12:18]
        assert data[24:] == frames[k][24:]
    # call eventfds were signalled
    assert os.eventfd_read(rig.calls[1]) >= 1
    rx, tx = _stop(rig)
    assert tx == 100
    # 128 posted, 100 used: the reserve is given back at stop
    assert rx == 100
    assert rig.counter("tx_packets") == 100 and rig.counter("rx_packets") == 100


@pytest.mark.parametrize("ring", ["split", "packed"])
def test_mergeable_mtu_frame_spans_chains(ring: str, request: pytest.FixtureRequest) -> None:
    rig: Rig = request.getfixturevalue("prig" if ring == "packed" else "rig")
    _post_rx(rig, 64, size=1024)
    _start(rig, rig.spec())
    _send(rig, [_frame(7, size=1514)])
    used = _wait_used(rig.rx, 2)
    assert [n for _, n in used] == [1024, 12 + 1514 - 1024]
    first = used[0][0]
    assert isinstance(first, int)
    assert struct.unpack_from("<H", rig.mem.read(first, 12), 10)[0] == 2
    rx, tx = _stop(rig)
    if ring == "packed":  # both positions, both wrap counters still 1
        assert (decode_base(rx, QSIZE), decode_base(tx, QSIZE)) == ((2, 1, 2, 1), (1, 1, 1, 1))
    else:
        assert (rx, tx) == (2, 1)


def _start_gso(rig: Rig) -> None:
    """Start the worker for a guest that takes GSO frames (64 KiB rx reserve)."""
    gso = FEATURES | int(NetFeature.GUEST_CSUM | NetFeature.GUEST_TSO4)
    _start(rig, dataclasses.replace(rig.spec(), features=gso))


def test_mergeable_gso_frame_spans_chains(rig: Rig) -> None:
    _post_rx(rig, 160, size=1024)
    _start_gso(rig)
    big = _frame(7, size=5000)
    _send(rig, [big])
    used = _wait_used(rig.rx, 5)
    assert [n for _, n in used] == [1024] * 4 + [12 + 5000 - 4096]
    first = used[0][0]
    assert isinstance(first, int)
    assert struct.unpack_from("<H", rig.mem.read(first, 12), 10)[0] == 5
    rx, tx = _stop(rig)
    assert (rx, tx) == (5, 1)


def test_gso_guest_small_and_large_frames_alternate(rig: Rig) -> None:
    """A GSO guest with 1 KiB mergeable buffers: small frames are read into the
    first chain + a bounce buffer, a large one spills into the next chains (and
    switches to reading in place), a small one switches back; every frame is
    delivered intact, in order."""
    _post_rx(rig, 200, size=1024)
    _start_gso(rig)
    sizes = [60, 5000, 3000, 60, 60, 2100, 60]
    frames = [_frame(i, size=max(n, 64)) for i, n in enumerate(sizes)]
    frames = [f[:12] + f[12:18] + f[18:24] + f[24:28] + bytes(range(256)) * 20 for f in frames]
    frames = [f[: 12 + max(n, 64)] for f, n in zip(frames, sizes, strict=True)]
    for k, f in enumerate(frames):  # 8 KiB apart: the frames must not overlap
        rig.mem.write(0x200000 + k * 8192, f)
        rig.tx.add([(0x200000 + k * 8192, len(f))], [], k)
    if rig.tx.kick_needed():
        os.eventfd_write(rig.kicks[1], 1)
    chains = [-(-(len(f)) // 1024) for f in frames]
    used = _wait_used(rig.rx, sum(chains))
    pos = 0
    for f, nb in zip(frames, chains, strict=True):
        head = used[pos][0]
        assert isinstance(head, int)
        assert struct.unpack_from("<H", rig.mem.read(head, 12), 10)[0] == nb
        got = b"".join(rig.mem.read(a, n) for a, n in used[pos : pos + nb] if isinstance(a, int))
        # loopback swaps the MAC addresses
        assert got[12:] == f[18:24] + f[12:18] + f[24:]
        pos += nb
    assert _stop(rig) == (sum(chains), len(frames))


def test_gso_guest_rx_chain_without_writable_bytes_first(rig: Rig) -> None:
    """A chain with no writable bytes at the front of the reserve (a readable
    descriptor on the rx ring): the frame goes whole into the next chains."""
    rig.rx.add([(BUFS, 64)], [], BUFS)  # readable only: nothing to write into
    _post_rx(rig, 150, size=1024, start=1)
    _start_gso(rig)
    f = _frame(3, size=1500)
    _send(rig, [f])
    used = _wait_used(rig.rx, 3)
    assert [n for _, n in used] == [0, 1024, 12 + 1500 - 1024]
    got = b"".join(rig.mem.read(a, n) for a, n in used[1:] if isinstance(a, int))
    assert got[12:] == f[18:24] + f[12:18] + f[24:]
    _stop(rig)


def test_no_rx_buffer_stalls_then_delivers(rig: Rig) -> None:
    _start(rig, rig.spec())
    _send(rig, [_frame(i) for i in range(10)])
    assert len(_wait_used(rig.tx, 10)) == 10
    end = time.monotonic() + 5
    while rig.counter("rx_no_buffer") < 1 and time.monotonic() < end:
        time.sleep(0.01)
    assert rig.counter("rx_no_buffer") >= 1 and rig.counter("rx_packets") == 0
    _post_rx(rig, 40)  # the worker asked for a kick
    assert len(_wait_used(rig.rx, 10)) == 10
    _stop(rig)


def test_restart_continues_from_reported_indexes(rig: Rig) -> None:
    _post_rx(rig, 200)
    _start(rig, rig.spec())
    _send(rig, [_frame(i) for i in range(30)])
    assert len(_wait_used(rig.rx, 30)) == 30
    rx, tx = _stop(rig)
    _start(rig, rig.spec(rx_avail=rx, tx_avail=tx))
    _send(rig, [_frame(i) for i in range(30, 50)], slot0=0x300000)
    used = _wait_used(rig.rx, 20)
    assert len(used) == 20
    assert _stop(rig) == (50, 50)


def test_restart_from_a_base_behind_the_used_index_resumes_at_it(rig: Rig) -> None:
    """QEMU, whose backend died without answering GET_VRING_BASE, sends a base
    older than the ring's used index: the worker resumes at the used index
    (nothing before it is left to serve) instead of giving the ring up."""
    _post_rx(rig, 200)
    _start(rig, rig.spec())
    _send(rig, [_frame(i) for i in range(30)])
    rx_used = _wait_used(rig.rx, 30)
    assert len(rx_used) == 30
    assert _stop(rig) == (30, 30)
    _start(rig, rig.spec(rx_avail=12, tx_avail=30))
    _send(rig, [_frame(i) for i in range(30, 50)], slot0=0x300000)
    used = _wait_used(rig.rx, 20)
    assert _stop(rig) == (50, 50)
    # Buffers 30-49 took the frames: none of 12-29 was filled a second time.
    assert [addr for addr, _ in used] == [BUFS + k * BUF_SIZE for k in range(30, 50)]
    assert rig.counter("errors") == 0


def test_descriptor_loop_breaks_only_that_ring(rig: Rig) -> None:
    _post_rx(rig, 64)
    _start(rig, rig.spec())
    # A tx chain whose descriptor points at itself: the hop budget catches it.
    lay = split_ring_layout(QSIZE)
    head = rig.tx.add([(0x200000, 64), (0x200100, 64)], [], "x")
    assert head is not None
    desc = rig.mem.view(TX_RING + lay.desc + 16 * head, 16)
    struct.pack_into("<QIHH", desc, 0, 0x200000, 64, 1, head)
    rig.tx.kick_needed()
    os.eventfd_write(rig.kicks[1], 1)
    r, _, _ = select.select([rig.err[1]], [], [], 5)
    assert r, "err eventfd of the tx ring was not signalled"
    assert rig.counter("errors") == 1
    assert rig.counter("tx_errors") == 1 and rig.counter("rx_errors") == 0
    # The worker is alive and still answers a stop.
    rx, _tx = _stop(rig)
    assert rx == 0


def test_broken_rx_ring_with_frames_waiting_still_answers_its_supervisor(rig: Rig) -> None:
    """Frames wait on the port for an rx ring that is broken: the worker must
    neither spin on them nor stop reading its control socket (a call-fd swap
    and the stop are answered at once)."""
    import socket

    spec = rig.spec()
    _start(rig, dataclasses.replace(spec, rx=dataclasses.replace(spec.rx, desc_addr=4 * MEM)))
    _send(rig, [_frame(i) for i in range(10)])  # looped back towards the broken rx ring
    assert len(_wait_used(rig.tx, 10)) == 10
    ctl = rig.ctl
    assert isinstance(ctl, socket.socket)
    ctl.settimeout(2)
    call = os.eventfd(0)
    try:
        socket.send_fds(ctl, [Ctl.CALL_MSG.pack(Ctl.CALL, 0, 1)], [call])
        assert ctl.recv(16) == Ctl.CALL_ACK
    finally:
        os.close(call)
    assert _stop(rig) == (0, 10)
    assert rig.counter("rx_errors") == 1


def test_out_of_range_buffer_is_refused(rig: Rig) -> None:
    _start(rig, rig.spec())
    rig.tx.add([(MEM - 10, 64)], [], "bad")
    rig.tx.kick_needed()
    os.eventfd_write(rig.kicks[1], 1)
    r, _, _ = select.select([rig.err[1]], [], [], 5)
    assert r
    _stop(rig)


def test_null_port_counts_and_drops(rig: Rig) -> None:
    _start(rig, rig.spec("null"))
    _send(rig, [_frame(i) for i in range(50)])
    assert len(_wait_used(rig.tx, 50)) == 50
    _stop(rig)
    assert rig.counter("tx_packets") == 50 and rig.counter("tx_bytes") == 50 * 64


@pytest.mark.parametrize("in_order", [True, False], ids=["in-order", "any-order"])
def test_tx_batch_goes_back_with_one_used_entry_under_in_order(rig: Rig, in_order: bool) -> None:
    """VIRTIO_F_IN_ORDER on a split ring: the worker returns a tx batch with
    one used entry, where the batch's first would go, naming its last buffer
    (virtio 1.3 2.7.9); without it, an entry per buffer."""
    feats = FEATURES if in_order else FEATURES & ~int(NetFeature.IN_ORDER)
    _send(rig, [_frame(i) for i in range(50)])  # all available before it starts: one batch
    _start(rig, dataclasses.replace(rig.spec("null"), features=feats))
    assert [t for t, _ in _wait_used(rig.tx, 50)] == list(range(50))
    used = rig.mem.view(TX_RING + split_ring_layout(QSIZE).used, 4 + 8 * 50).cast("I")
    heads = [used[1 + 2 * i] for i in range(50)]
    assert heads == ([49] + [0] * 49 if in_order else list(range(50)))
    _stop(rig)
    assert rig.counter("tx_packets") == 50


def test_packed_rings_loop_back_over_several_laps(prig: Rig) -> None:
    """Packed rings: frames come back intact over three laps of both rings,
    and the stop reports 32-bit bases whose used and avail halves agree."""
    n = 0
    for lap in range(3):
        _post_rx(prig, 200, start=200 * (lap % 2))
        if lap == 0:
            _start(prig, prig.spec())
        frames = [_frame(n + i) for i in range(200)]
        _send(prig, frames, slot0=0x200000 + 0x80000 * (lap % 2))
        assert len(_wait_used(prig.tx, 200)) == 200
        used = _wait_used(prig.rx, 200)
        assert len(used) == 200
        for k, (addr, length) in enumerate(used):
            assert isinstance(addr, int) and length == 12 + 64
            data = prig.mem.read(addr, length)
            assert struct.unpack_from("<H", data, 10)[0] == 1
            assert data[12:18] == frames[k][18:24] and data[24:] == frames[k][24:]
        n += 200
    rx, tx = _stop(prig)
    # 600 slots on a 256-slot ring: position 88 on the third lap (wrap counter 1).
    assert decode_base(rx, QSIZE) == decode_base(tx, QSIZE) == (88, 1, 88, 1)
    assert prig.counter("tx_packets") == 600 == prig.counter("rx_packets")


def test_packed_restart_continues_from_reported_bases(prig: Rig) -> None:
    _post_rx(prig, 250)
    _start(prig, prig.spec())
    _send(prig, [_frame(i) for i in range(200)])
    assert len(_wait_used(prig.rx, 200)) == 200
    assert len(_wait_used(prig.tx, 200)) == 200  # the slots are free again
    rx, tx = _stop(prig)
    _start(prig, prig.spec(rx_avail=rx, tx_avail=tx))
    _post_rx(prig, 100, start=250)
    _send(prig, [_frame(i) for i in range(200, 300)], slot0=0x300000)
    used = _wait_used(prig.rx, 100)
    assert len(used) == 100
    assert prig.mem.read(used[-1][0], 76)[26:30] == struct.pack(">I", 299)  # type: ignore[arg-type]
    rx, tx = _stop(prig)
    assert decode_base(tx, QSIZE) == (44, 0, 44, 0)  # 300 slots: second lap


def test_packed_chain_round_the_ring_breaks_only_that_ring(prig: Rig) -> None:
    _post_rx(prig, 64)
    _start(prig, prig.spec())
    lay = packed_ring_layout(QSIZE)
    for slot in range(QSIZE):  # every slot available, every one saying NEXT
        struct.pack_into("<QIHH", prig.mem.view(TX_RING + lay.desc + 16 * slot, 16), 0,
                         0x200000, 64, 0, 1 << 7 | 1)  # fmt: skip
    os.eventfd_write(prig.kicks[1], 1)
    r, _, _ = select.select([prig.err[1]], [], [], 5)
    assert r, "err eventfd of the tx ring was not signalled"
    assert prig.counter("tx_errors") == 1 and prig.counter("rx_errors") == 0
    rx, _tx = _stop(prig)
    assert rx == FRESH_BASE  # the rx reserve was given back


def test_packed_worker_killed_resumes_from_its_published_position(prig: Rig) -> None:
    """A packed ring's used position is not in guest memory: the worker
    stores it in its counter slot, and a worker started from there after a
    SIGKILL goes on without losing or repeating a buffer."""
    _post_rx(prig, 120)
    _start(prig, prig.spec())
    _send(prig, [_frame(i) for i in range(100)])
    assert len(_wait_used(prig.rx, 100)) == 100
    os.kill(prig.pid, 9)
    os.waitpid(prig.pid, 0)
    prig.pid = 0
    words = [int(prig.counters[i]) for i in POS_FIELDS]
    assert all(w >> 32 for w in words)
    rx, tx = (w & 0xFFFFFFFF for w in words)
    assert decode_base(rx, QSIZE)[2:] == (100, 1) and decode_base(tx, QSIZE)[2:] == (100, 1)
    _start(prig, prig.spec(rx_avail=rx, tx_avail=tx))
    _send(prig, [_frame(i) for i in range(100, 110)], slot0=0x300000)
    used = _wait_used(prig.rx, 10)  # the 20 buffers the dead worker had popped are popped again
    assert [prig.mem.read(a, 76)[26:30] for a, _ in used] == [  # type: ignore[arg-type]
        struct.pack(">I", i) for i in range(100, 110)
    ]
    _stop(prig)


def test_call_fd_swap_while_running(rig: Rig) -> None:
    import socket

    _post_rx(rig, 64)
    _start(rig, rig.spec())
    new_call = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        ctl = rig.ctl
        assert isinstance(ctl, socket.socket)
        ctl.settimeout(5)
        socket.send_fds(ctl, [Ctl.CALL_MSG.pack(Ctl.CALL, 0, 1)], [new_call])
        assert ctl.recv(16) == Ctl.CALL_ACK
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(rig.calls[0])
        _send(rig, [_frame(i) for i in range(5)])
        assert len(_wait_used(rig.rx, 5)) == 5
        r, _, _ = select.select([new_call], [], [], 5)
        assert r, "the new call fd of the rx ring was not signalled"
        with pytest.raises(BlockingIOError):
            os.eventfd_read(rig.calls[0])  # the old one no longer is
        _stop(rig)
    finally:
        os.close(new_call)


def _ring_config(ring: RingSpec, features: int, enabled: bool) -> RingConfig:
    return RingConfig(
        index=ring.index,
        size=ring.size,
        desc_addr=ring.desc_addr,
        avail_addr=ring.avail_addr,
        used_addr=ring.used_addr,
        log_addr=0,
        flags=0,
        last_avail_idx=0,
        kick_fd=ring.kick_fd,
        call_fd=ring.call_fd,
        err_fd=ring.err_fd,
        enabled=enabled,
        features=features,
    )


def _supervise(sup: Supervisor, rig: Rig, *, enabled: bool) -> None:
    """Features, the rig's memory and both rings (enabled or not), in protocol order."""
    from virtnet.vhost_user.backend import RegionInfo

    spec = rig.spec()
    sup.on_features(FEATURES)
    sup.on_mem_table((RegionInfo(0, MEM, 0x7F0000000000, 0, rig.memfd),))
    for ring in (spec.rx, spec.tx):
        sup.on_ring_start(ring.index, _ring_config(ring, FEATURES, enabled))


def test_supervisor_refuses_legacy_10_byte_header(rig: Rig) -> None:
    from virtnet.ports.null import NullPort
    from virtnet.vhost_user.backend import RegionInfo
    from virtnet.vhost_user.supervisor import Supervisor, VmPort

    vm = VmPort("vm", NullPort(), 1)
    sup = Supervisor(vm)
    spec = rig.spec()
    legacy = int(NetFeature.EVENT_IDX)
    try:
        sup.on_features(legacy)
        sup.on_mem_table((RegionInfo(0, MEM, 0x7F0000000000, 0, rig.memfd),))
        for ring in (spec.rx, spec.tx):
            sup.on_ring_start(ring.index, _ring_config(ring, legacy, True))
        assert not sup.workers
    finally:
        sup.close()
        vm.close()


def test_supervisor_lifecycle_in_process(rig: Rig) -> None:
    """Supervisor callbacks in protocol order: start, enable, mem table swap, disable, stop."""
    from virtnet.ports.loopback import LoopbackPort
    from virtnet.vhost_user.backend import RegionInfo
    from virtnet.vhost_user.supervisor import Supervisor, VmPort

    vm = VmPort("vm", LoopbackPort(), 1)
    sup = Supervisor(vm)
    try:
        _supervise(sup, rig, enabled=False)
        assert not sup.workers  # started but disabled: no worker
        sup.on_ring_enable(0, True)
        assert not sup.workers
        sup.on_ring_enable(1, True)
        first = sup.workers[0].pid
        _post_rx(rig, 100)
        _send(rig, [_frame(i) for i in range(10)])
        assert len(_wait_used(rig.rx, 10)) == 10
        # A new memory table: the worker is stopped and restarted on it.
        sup.on_mem_table(
            (
                RegionInfo(0, MEM, 0x7F0000000000, 0, rig.memfd),
                RegionInfo(1 << 32, 1 << 20, 0x7E0000000000, 0, rig.memfd),
            )
        )
        assert sup.workers[0].pid != first
        _send(rig, [_frame(i) for i in range(10, 20)], slot0=0x300000)
        assert len(_wait_used(rig.rx, 10)) == 10
        # Disable: pending tx is discarded, worker stops.
        _send(rig, [_frame(i) for i in range(20, 23)], slot0=0x380000)
        sup.on_ring_enable(1, False)
        assert not sup.workers
        used = _wait_used(rig.tx, 23, timeout=1)
        assert len(used) == 23
        assert sup.on_ring_stop(1) == 23
        rx_next = sup.on_ring_stop(0)
        snap = vm.snapshot()[0]
        # The last 3 were either sent (and looped back) before the disable
        # arrived, or discarded by it.
        assert snap["tx_packets"] + snap["tx_dropped"] == 23 and snap["tx_packets"] >= 20
        assert rx_next == snap["rx_packets"] == snap["tx_packets"]
    finally:
        sup.close()
        vm.close()


def test_hung_worker_is_killed_on_stop_and_ring_resumes_from_used(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker that never answers the stop (SIGSTOPped) is logged, killed, and the
    reported next-avail indexes fall back to the used indexes in guest memory."""
    import signal
    import types
    from typing import cast

    from virtnet.ports.loopback import LoopbackPort
    from virtnet.vhost_user.backend import Backend
    from virtnet.vhost_user.supervisor import Supervisor, VmPort

    vm = VmPort("vm", LoopbackPort(), 1)
    sup = Supervisor(vm)
    # The supervisor reads used indexes through its backend's memory map.
    sup.backend = cast(Backend, types.SimpleNamespace(memory=rig.mem, connection_fd=None))
    try:
        _supervise(sup, rig, enabled=True)
        pid = sup.workers[0].pid
        _post_rx(rig, 64)
        _send(rig, [_frame(i) for i in range(5)])
        assert len(_wait_used(rig.rx, 5)) == 5
        os.kill(pid, signal.SIGSTOP)
        _send(rig, [_frame(i) for i in range(5, 8)], slot0=0x300000)  # never consumed
        with caplog.at_level("ERROR"):
            tx_next = sup.on_ring_stop(1)
        assert "did not answer stop" in caplog.text
        assert not sup.workers
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reaped: it is gone
        assert tx_next == 5  # the used index: the 3 pending frames stay available
        assert sup.on_ring_stop(0) == 5
    finally:
        sup.close()
        vm.close()


def test_group_busy_pair_does_not_starve_the_other() -> None:
    """Two pairs in one process (run_group): while pair 0 is busy on every pass,
    pair 1 still sees its port become readable (a frame reaches its rx ring) and
    answers its stop; then pair 0 stops and the loop ends."""
    import socket
    import threading

    from virtnet.testing.guest import wait_for
    from virtnet.vhost_user.worker import map_regions, run_group

    fd = os.memfd_create("guest", 0)
    os.ftruncate(fd, MEM)
    lay = split_ring_layout(QSIZE)
    bases = ((0x10000, 0x20000), (0x30000, 0x40000))
    efds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(4)]
    ports = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(2)]
    ctls = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(2)]
    mem = GuestMemory([MemoryRegion.from_fd(fd, guest_addr=0, size=MEM, user_addr=0x7F0000000000)])
    wmem = map_regions([RegionSpec(0, MEM, 0x7F0000000000, 0, os.dup(fd))])
    workers: list[Worker] = []
    for pair, (rxb, txb) in enumerate(bases):
        rings = [
            RingSpec(2 * pair + i, QSIZE, base + lay.desc, base + lay.avail, base + lay.used, 0,
                     efds[2 * pair + i], None, None)
            for i, base in enumerate((rxb, txb))
        ]  # fmt: skip
        spec = WorkerSpec("g", pair, FEATURES, (), rings[0], rings[1], "switch",
                          os.dup(ports[pair][0].fileno()))  # fmt: skip
        workers.append(Worker(spec, ctls[pair][0], mem=wmem))
    setattr(workers[0], "work", lambda: 1)  # noqa: B010 - pair 0 always has work
    rx1 = _queue(mem, bases[1][0])
    for i in range(8):
        rx1.add([], [(BUFS + i * BUF_SIZE, BUF_SIZE)], i)
    rx1.publish()
    t = threading.Thread(target=run_group, args=(workers,), daemon=True)
    try:
        t.start()
        assert wait_for(lambda: not workers[1].port_readable, timeout=5)
        frame = _frame(7)
        ports[1][1].send(frame)
        used: list[tuple[object, int]] = []

        def delivered() -> bool:
            used.extend(rx1.get_used())
            return bool(used)

        assert wait_for(delivered, timeout=5)
        assert used[0][1] == len(frame)
        for pair in (1, 0):
            ctl = ctls[pair][1]
            ctl.settimeout(5)
            ctl.send(Ctl.STOP)
            op, _, _ = Ctl.STOP_REPLY.unpack(ctl.recv(16))
            assert op == Ctl.STOP
        t.join(5)
        assert not t.is_alive()
    finally:
        for w in workers:
            w.port.close()
        wmem.close()
        mem.close()
        for f in (*efds, fd):
            os.close(f)
        for a, b in (*ports, *ctls):
            a.close()
            b.close()


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=14, max_value=9000), min_size=1, max_size=12),
    buf=st.sampled_from([64, 256, 1024, 1536, 2048, 4096]),
    mergeable=st.booleans(),
    gso=st.booleans(),
)
def test_rx_scatter_property(sizes: list[int], buf: int, mergeable: bool, gso: bool) -> None:
    """In-process worker, loopback port: every frame comes back intact, spread over
    as many chains as ``num_buffers`` says (mergeable) or dropped-and-counted when
    it cannot fit; the used index always equals the popped index minus the reserve."""
    import socket

    fd = os.memfd_create("guest", 0)
    os.ftruncate(fd, MEM)
    a, b = socket.socketpair()
    try:
        mem = GuestMemory(
            [MemoryRegion.from_fd(fd, guest_addr=0, size=MEM, user_addr=0x7F0000000000)]
        )
        rx, tx = _queue(mem, RX_RING), _queue(mem, TX_RING)
        lay = split_ring_layout(QSIZE)
        feats = FEATURES if mergeable else FEATURES & ~int(NetFeature.MRG_RXBUF)
        if gso:  # the reserve then covers 64 KiB: small frames take the bounce path
            feats |= int(NetFeature.GUEST_CSUM | NetFeature.GUEST_TSO4)
        rings = [
            RingSpec(i, QSIZE, base + lay.desc, base + lay.avail, base + lay.used, 0,
                     None, None, None)
            for i, base in ((0, RX_RING), (1, TX_RING))
        ]  # fmt: skip
        spec = WorkerSpec("p", 0, feats, (RegionSpec(0, MEM, 0x7F0000000000, 0, os.dup(fd)),),
                          rings[0], rings[1], "loopback", None, mtu=9000)  # fmt: skip
        w = Worker(spec, a)
        rx_size = buf if mergeable else w.rx_need
        for i in range(200):
            rx.add([], [(BUFS + i * 10000, rx_size)], BUFS + i * 10000)
        rx.publish()
        frames = [bytes([k & 0xFF]) * 12 + bytes(range(256)) * (n // 256) + bytes(n % 256)
                  for k, n in enumerate(sizes)]  # fmt: skip
        for k, f in enumerate(frames):
            addr = 0x300000 + k * 10000
            mem.write(addr, f)
            tx.add([(addr, len(f))], [], k)
        tx.publish()
        assert w.tx_batch() == len(frames)
        delivered = w.rx_batch()
        used = rx.get_used()
        pos = 0
        last = -1
        for _ in range(delivered):
            head_addr = used[pos][0]
            assert isinstance(head_addr, int)
            nb = struct.unpack_from("<H", mem.read(head_addr, 12), 10)[0]
            chunks = used[pos : pos + nb]
            assert nb >= 1 and (mergeable or nb == 1)
            got = b"".join(mem.read(c[0], c[1]) for c in chunks if isinstance(c[0], int))
            # Which frame (its header bytes say): in order, with the dropped
            # ones (longer than the buffers left) missing anywhere.
            k = next(i for i in range(last + 1, len(frames)) if frames[i][:10] == got[:10])
            last = k
            f = frames[k]
            assert sum(c[1] for c in chunks) == len(f)
            assert got[12:] == f[18:24] + f[12:18] + f[24:]
            pos += nb
        assert pos == len(used)
        from virtnet.ports.loopback import LoopbackQueue

        assert isinstance(w.port, LoopbackQueue)
        assert delivered + w.port.rx_dropped + w.port.pending() == len(frames)
        if not mergeable or buf >= 1024:
            assert delivered == len(frames)  # 200 buffers hold every example
        q = w.rxq
        assert q is not None
        assert (q.last_avail_idx - len(w.reserve)) & 0xFFFF == q.used_idx
        rx_next, _ = w.next_avail()
        assert rx_next == q.used_idx
        w.mem.close()
    finally:
        a.close()
        b.close()
        os.close(fd)


@pytest.mark.parametrize(
    ("size", "count", "publishes"),
    [
        (64, 40, 1),  # small frames: one publish (and one interrupt) for the batch
        (RX_PUBLISH_BYTES, 5, 5),  # GSO-size frames: each as soon as it is copied
        (RX_PUBLISH_BYTES // 2, 6, 3),  # every RX_PUBLISH_BYTES of frames
    ],
)
def test_rx_publishes_large_frames_without_waiting_for_the_batch(
    size: int, count: int, publishes: int
) -> None:
    """The guest gets a large frame (and its interrupt) as soon as it is in its
    buffers, not after the rest of the batch is copied; small frames are still
    published once per batch.  Without EVENT_IDX every publish interrupts, so
    the call eventfd counts the publishes; every frame arrives intact, in order."""
    import socket

    assert count <= RX_BATCH
    fd = os.memfd_create("guest", 0)
    os.ftruncate(fd, MEM)
    call = os.eventfd(0, os.EFD_NONBLOCK)
    a, b = socket.socketpair()
    try:
        mem = GuestMemory(
            [MemoryRegion.from_fd(fd, guest_addr=0, size=MEM, user_addr=0x7F0000000000)]
        )
        lay = split_ring_layout(QSIZE)
        rx = DriverQueue(mem, QSIZE, RX_RING + lay.desc, RX_RING + lay.avail,
                         RX_RING + lay.used, event_idx=False, in_order=True)  # fmt: skip
        tx = DriverQueue(mem, QSIZE, TX_RING + lay.desc, TX_RING + lay.avail,
                         TX_RING + lay.used, event_idx=False, in_order=True)  # fmt: skip
        feats = (FEATURES & ~int(NetFeature.EVENT_IDX)) | int(
            NetFeature.GUEST_CSUM | NetFeature.GUEST_TSO4
        )
        rings = [
            RingSpec(i, QSIZE, base + lay.desc, base + lay.avail, base + lay.used, 0,
                     None, call if i == 0 else None, None)
            for i, base in ((0, RX_RING), (1, TX_RING))
        ]  # fmt: skip
        spec = WorkerSpec("p", 0, feats, (RegionSpec(0, MEM, 0x7F0000000000, 0, os.dup(fd)),),
                          rings[0], rings[1], "loopback", None)  # fmt: skip
        w = Worker(spec, a)
        for i in range(200):
            rx.add([], [(BUFS + i * 4096, 4096)], BUFS + i * 4096)
        rx.publish()
        payload = (size - 12) // 256 * bytes(range(256)) + bytes((size - 12) % 256)
        frames = [bytes(12) + bytes([k]) * 12 + payload[12:] for k in range(count)]
        for k, f in enumerate(frames):
            addr = 0x300000 + k * -(-len(f) // 4096) * 4096
            mem.write(addr, f)
            tx.add([(addr, len(f))], [], k)
        tx.publish()
        assert w.tx_batch() == count
        assert w.rx_batch() == count
        assert os.eventfd_read(call) == publishes
        used = rx.get_used()
        pos = 0
        for f in frames:
            nb = -(-len(f) // 4096)
            got = b"".join(mem.read(c[0], c[1]) for c in used[pos : pos + nb]
                           if isinstance(c[0], int))  # fmt: skip
            assert got[12:] == f[12:]  # loopback swapped two equal MACs
            pos += nb
        assert pos == len(used)
        w.mem.close()
    finally:
        a.close()
        b.close()
        os.close(call)
        os.close(fd)


@dataclass
class InProc:
    """A worker driven step by step in this process (null port, no EVENT_IDX:
    every publish the device decides to signal shows on the tx call eventfd)."""

    w: Worker
    mem: GuestMemory
    tx: DriverQueue
    call: int
    sent: int = 0

    def send(self, n: int, size: int = 76) -> None:
        """Queue ``n`` tx chains of ``size`` bytes (the null port reads only the length)."""
        for _ in range(n):
            addr = 0x300000 + (self.sent % 256) * BUF_SIZE
            self.mem.write(addr, _frame(self.sent))
            self.tx.add([(addr, size)], [], self.sent)
            self.sent += 1
        self.tx.publish()

    def signalled(self) -> int:
        try:
            return os.eventfd_read(self.call)
        except BlockingIOError:
            return 0


@contextlib.contextmanager
def _inproc(kick_defer_us: int) -> Iterator[InProc]:
    import socket

    fd = os.memfd_create("guest", 0)
    os.ftruncate(fd, MEM)
    call = os.eventfd(0, os.EFD_NONBLOCK)
    a, b = socket.socketpair()
    mem = GuestMemory([MemoryRegion.from_fd(fd, guest_addr=0, size=MEM, user_addr=0x7F0000000000)])
    lay = split_ring_layout(QSIZE)
    rings = [
        RingSpec(i, QSIZE, base + lay.desc, base + lay.avail, base + lay.used, 0,
                 None, call if i == 1 else None, None)
        for i, base in ((0, RX_RING), (1, TX_RING))
    ]  # fmt: skip
    spec = WorkerSpec("p", 0, FEATURES & ~int(NetFeature.EVENT_IDX),
                      (RegionSpec(0, MEM, 0x7F0000000000, 0, os.dup(fd)),), rings[0], rings[1],
                      "null", None, kick_defer_us=kick_defer_us)  # fmt: skip
    w = Worker(spec, a)
    tx = DriverQueue(mem, QSIZE, TX_RING + lay.desc, TX_RING + lay.avail, TX_RING + lay.used,
                     event_idx=False, in_order=True)  # fmt: skip
    try:
        yield InProc(w, mem, tx, call)
    finally:
        w.mem.close()
        w.ep.close()
        mem.close()
        a.close()
        b.close()
        os.close(call)
        os.close(fd)


def test_tx_burst_defers_kicks_for_a_few_rounds_then_arms() -> None:
    """After a burst the worker looks at the tx ring KICK_DEFER_ROUNDS more
    times before it asks for kicks; a tx batch resets the count; arming ends it."""
    with _inproc(kick_defer_us=50) as r:
        r.send(KICK_DEFER_MIN_CHAINS)
        assert r.w.work() == KICK_DEFER_MIN_CHAINS
        looks = [r.w.defer() for _ in range(KICK_DEFER_ROUNDS + 1)]
        assert looks == [50e-6] * KICK_DEFER_ROUNDS + [None]
        r.send(KICK_DEFER_MIN_CHAINS)
        assert r.w.work() == KICK_DEFER_MIN_CHAINS and r.w.defer() is not None  # the stream goes on
        assert not r.w.arm()  # nothing left: notifications on, asleep
        assert r.w.defer() is None  # a new burst is needed to defer again


def test_deferral_looks_are_long_only_while_bulk_traffic_flows() -> None:
    """A deferral's looks are KICK_DEFER_SHORT_US apart unless the pair moves
    KICK_DEFER_BULK_BYTES_PER_S, judged over windows of at least kick_defer_us:
    a request/response peer waits for every frame a look picks up, a stream
    does not; a short burst is not a stream."""
    short, window = KICK_DEFER_SHORT_US / 1e6, 400e-6
    with _inproc(kick_defer_us=400) as r:
        r.send(KICK_DEFER_MIN_CHAINS)  # small frames: not bulk
        assert r.w.work() == KICK_DEFER_MIN_CHAINS
        assert r.w.defer() == short
        r.send(4, size=10_000)  # 40 KB at once: fast, but less than a window's worth
        assert KICK_DEFER_BULK_BYTES_PER_S * window > 4 * (10_000 - 12)
        assert r.w.work() == 4
        assert r.w.defer() == short
        r.send(16, size=60_000)  # 960 KB: more than a window's worth
        assert KICK_DEFER_BULK_BYTES_PER_S * window < 16 * (60_000 - 12)
        assert r.w.work() == 16
        assert r.w.defer() == window
        time.sleep(0.01)  # the window ends: under 1 MB in 10 ms is not 1 Gbit/s
        assert KICK_DEFER_BULK_BYTES_PER_S * 0.01 > 2 * 64 + 4 * 10_000 + 16 * 60_000
        assert r.w.defer() == short
    with _inproc(kick_defer_us=20) as r:  # a look is never longer than kick_defer_us
        r.send(16, size=60_000)
        assert r.w.work() == 16
        assert r.w.defer() == 20e-6


def test_single_packets_never_defer_and_zero_disables() -> None:
    """Request/response traffic (one chain per batch) arms at once, so its latency
    does not change; --kick-defer-us 0 never defers."""
    with _inproc(kick_defer_us=50) as r:
        for _ in range(3):
            r.send(1)
            assert r.w.work() == 1
            assert r.w.defer() is None
    with _inproc(kick_defer_us=0) as r:
        r.send(10)
        assert r.w.work() == 10
        assert r.w.defer() is None


def test_tx_completions_signalled_when_the_ring_stays_empty_or_on_arming() -> None:
    """Completions the guest asked to hear about are signalled after a whole
    empty deferral round, when the worker arms, or once TX_SIGNAL_CHAINS pile
    up -- never lost, never once per batch while the guest keeps sending."""
    with _inproc(kick_defer_us=50) as r:
        r.send(3)
        assert r.w.work() == 3
        assert r.signalled() == 0  # pending: the guest is still sending
        assert r.w.defer() is not None  # first empty look: still pending
        assert r.signalled() == 0
        assert r.w.defer() is not None  # the ring stayed empty for a round: signal
        assert r.signalled() == 1
        r.send(3)
        assert r.w.work() == 3 and r.signalled() == 0
        assert not r.w.arm()  # going to sleep: signal first
        assert r.signalled() == 1
        sent = 0
        while sent < TX_SIGNAL_CHAINS:
            r.send(8)
            sent += 8
            assert r.w.work() == 8
        assert r.signalled() == 1  # the pile-up was signalled while busy
    with _inproc(kick_defer_us=0) as r:
        r.send(3)
        assert r.w.work() == 3 and r.w.defer() is None
        assert not r.w.arm() and r.signalled() == 1


def test_deferred_kicks_keep_a_forked_worker_live(rig: Rig) -> None:
    """A real worker process: a burst is consumed and its completion signalled
    without any further guest action; after the deferral the worker asks for
    kicks again, and a later burst (kicked) is consumed."""
    _start(rig, rig.spec(port="null"))
    _send(rig, [_frame(i) for i in range(8)])
    assert len(_wait_used(rig.tx, 8)) == 8
    r, _, _ = select.select([rig.calls[1]], [], [], 5)
    assert r, "the tx completions were never signalled"
    from virtnet.testing.guest import wait_for

    ring = rig.tx._r  # the device's avail_event: where it wants the next kick

    def armed() -> bool:
        return int(ring.used[ring.avail_event_pos]) == 8

    assert wait_for(armed, timeout=5), "the worker never asked for kicks again"
    frames = [_frame(i) for i in range(8, 16)]
    for k, f in enumerate(frames):
        addr = 0x240000 + k * BUF_SIZE
        rig.mem.write(addr, f)
        rig.tx.add([(addr, len(f))], [], 8 + k)
    assert rig.tx.kick_needed()
    os.eventfd_write(rig.kicks[1], 1)
    assert len(_wait_used(rig.tx, 8)) == 8
    assert _stop(rig) == (0, 16)
    assert rig.counter("tx_packets") == 16 and rig.counter("kicks") >= 1


def test_worker_latency_bench_runs(bench_module: Callable[[str], ModuleType]) -> None:
    """bench/worker_latency.py drives a real forked worker: every frame comes back
    (the loop would hang otherwise) and the worker woke on kicks, at most one per frame."""
    bench = bench_module("worker_latency")
    per_frame, wakes = bench.worker_roundtrip(200)
    assert per_frame > 0
    assert 1 <= wakes <= 200
    assert bench.eventfd_pingpong(50) > 0
