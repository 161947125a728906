"""vhost-user backend state machine: negotiation, ring lifecycle, memory, errors."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from virtnet.dirty_log import MAX_LOG_BYTES
from virtnet.errors import ProtocolError
from virtnet.net import NetFeature
from virtnet.testing.fds import fd_is_open, open_fds
from virtnet.vhost_user.backend import (
    DEFAULT_FEATURES,
    LOG_ALL,
    Backend,
    BackendConfig,
    NullEvents,
    RegionInfo,
    RingConfig,
)
from virtnet.vhost_user.codec import (
    F_PROTOCOL_FEATURES,
    HEADER,
    U64,
    VERSION,
    VRING_ADDR_F_LOG,
    Body,
    Empty,
    LogBase,
    MemRegion,
    MemTable,
    Message,
    ProtocolFeature,
    Raw,
    Request,
    SingleRegion,
    VringAddr,
    VringFd,
    VringState,
    encode_request,
    parse_message,
)

pytestmark = pytest.mark.usefixtures("no_fd_leak")
R = Request
PF = ProtocolFeature
MEM_SIZE = 1 << 20
EMPTY = Empty()
UVA = 0x7F12_3400_0000
GPA = 0x10_0000


def memfd(size: int = MEM_SIZE) -> int:
    fd = os.memfd_create("guest")
    os.ftruncate(fd, size)
    return fd


@dataclass
class Recorder(NullEvents):
    """Records every event; checks fds are alive while the callback runs."""

    log: list[tuple[object, ...]] = field(default_factory=list)
    started: dict[int, RingConfig] = field(default_factory=dict)
    last_avail: dict[int, int] = field(default_factory=dict)
    tables: list[tuple[RegionInfo, ...]] = field(default_factory=list)
    mtu_ok: bool = True
    enabled: set[int] = field(default_factory=set)

    def on_mem_table(self, regions: tuple[RegionInfo, ...]) -> None:
        for r in regions:
            assert fd_is_open(r.fd)
        self.tables.append(regions)
        self.log.append(("mem", len(regions)))

    def on_ring_start(self, index: int, config: RingConfig) -> None:
        assert index not in self.started
        if config.kick_fd is not None:
            assert fd_is_open(config.kick_fd)
        self.started[index] = config
        self.log.append(("start", index))

    def on_ring_stop(self, index: int) -> int | None:
        assert index in self.started
        del self.started[index]
        self.log.append(("stop", index))
        return self.last_avail.get(index)

    def on_ring_enable(self, index: int, enabled: bool) -> None:
        self.log.append(("enable", index, enabled))
        if enabled:
            self.enabled.add(index)
        else:
            self.enabled.discard(index)

    def on_ring_call(self, index: int, call_fd: int | None) -> None:
        assert index in self.started
        self.log.append(("call", index, call_fd is not None))

    def on_features(self, features: int) -> None:
        self.log.append(("features", features))

    def on_status(self, status: int) -> None:
        self.log.append(("status", status))

    def on_reset(self) -> None:
        assert not self.started
        self.log.append(("reset",))

    def on_mtu(self, mtu: int) -> bool:
        self.log.append(("mtu", mtu))
        return self.mtu_ok

    def on_rarp(self, mac: bytes) -> bool:
        self.log.append(("rarp", mac))
        return True

    def on_close(self) -> None:
        assert not self.started  # every ring was stopped first
        self.log.append(("close",))


def msg(
    request: Request, body: Body = EMPTY, fds: tuple[int, ...] = (), *, need_reply: bool = False
) -> Message:
    return parse_message(encode_request(request, body, need_reply=need_reply), fds)


def reply_u64(b: bytes | None) -> int:
    assert b is not None
    m = parse_message(b, replies=True)
    assert isinstance(m.body, U64)
    return m.body.value


def ev() -> int:
    return os.eventfd(0)


def negotiate(be: Backend, *, protocol: bool = True, features: int | None = None) -> None:
    offered = reply_u64(be.handle(msg(R.GET_FEATURES)))
    if protocol:
        pf = reply_u64(be.handle(msg(R.GET_PROTOCOL_FEATURES)))
        be.handle(msg(R.SET_PROTOCOL_FEATURES, U64(pf)))
    be.handle(msg(R.SET_OWNER))
    if features is None:
        # Split rings unless a test asks for packed ones.
        features = offered & ~NetFeature.RING_PACKED
        if not protocol:
            features &= ~(1 << F_PROTOCOL_FEATURES)
    be.handle(msg(R.SET_FEATURES, U64(features)))


def ring_layout(index: int, size: int = 256) -> VringAddr:
    base = UVA + 0x1000 + index * 0x4000
    return VringAddr(index, 0, base, base + 0x3000, base + 0x1000 + 0x800, 0)


def setup_ring(be: Backend, index: int, *, size: int = 256, base: int = 0) -> None:
    be.handle(msg(R.SET_VRING_NUM, VringState(index, size)))
    be.handle(msg(R.SET_VRING_BASE, VringState(index, base)))
    be.handle(msg(R.SET_VRING_ADDR, ring_layout(index, size)))


def set_table(be: Backend, size: int = MEM_SIZE) -> None:
    be.handle(msg(R.SET_MEM_TABLE, MemTable((MemRegion(GPA, size, UVA, 0),)), (memfd(size),)))


# ---------------------------------------------------------------------------
# GET_QUEUE_NUM: queue pairs, the way QEMU reads it
# ---------------------------------------------------------------------------


def test_get_queue_num_answers_queue_pairs_as_qemu_expects() -> None:
    """QEMU compares GET_QUEUE_NUM with the netdev's ``queues=`` -- queue *pairs*.

    qemu/qemu ``net/vhost-user.c`` ``vhost_user_start``: one vhost_net (two
    rings) per element of ``queues``, then ``max_queues =
    vhost_net_get_max_queues(net); if (queues > max_queues) error_report("you
    are asking more queues than supported")``; ``hw/net/vhost_net.c``
    ``vhost_net_get_max_queues`` returns ``net->dev.max_queues``, which
    ``hw/virtio/vhost-user.c`` ``vhost_user_backend_init`` fills with
    ``vhost_user_get_u64(dev, VHOST_USER_GET_QUEUE_NUM, &dev->max_queues)``.
    So a backend with 4 pairs (8 rings) must answer 4, and ``queues=4`` works.
    Observed with QEMU 10.0.2: ``-netdev vhost-user,queues=4`` drives rings 0..7.
    """
    be = Backend(config=BackendConfig(max_queue_pairs=4))
    be.handle(msg(R.GET_PROTOCOL_FEATURES))
    assert reply_u64(be.handle(msg(R.GET_QUEUE_NUM))) == 4
    # ... and exactly 2 * pairs rings are addressable (the control queue stays in QEMU).
    be.handle(msg(R.SET_VRING_NUM, VringState(7, 256)))
    with pytest.raises(ProtocolError, match="ring 8"):
        be.handle(msg(R.SET_VRING_NUM, VringState(8, 256)))
    be.close()


# ---------------------------------------------------------------------------
# The sequence QEMU 10.0.2 sent (queues=4, guest virtio_net probing)
# ---------------------------------------------------------------------------


def test_qemu10_observed_sequence() -> None:
    rec = Recorder()
    be = Backend(rec, BackendConfig(max_queue_pairs=4))
    pairs = 4
    for dev in range(pairs):  # one vhost_dev per queue pair
        offered = reply_u64(be.handle(msg(R.GET_FEATURES)))
        assert offered & (1 << F_PROTOCOL_FEATURES)
        pf = reply_u64(be.handle(msg(R.GET_PROTOCOL_FEATURES)))
        assert pf == 0x1A01B  # MQ LOG_SHMFD REPLY_ACK NET_MTU RESET_DEVICE MEM_SLOTS STATUS
        be.handle(msg(R.SET_PROTOCOL_FEATURES, U64(pf)))
        if dev == 0:
            assert reply_u64(be.handle(msg(R.GET_QUEUE_NUM))) == pairs
        assert reply_u64(be.handle(msg(R.GET_MAX_MEM_SLOTS))) >= 8
        if dev == 0:
            be.handle(msg(R.SET_OWNER))
        be.handle(msg(R.GET_FEATURES))
        for ring in (2 * dev, 2 * dev + 1):
            be.handle(msg(R.SET_VRING_CALL, VringFd(ring, False), (ev(),)))
            be.handle(msg(R.SET_VRING_ERR, VringFd(ring, False), (ev(),)))
    assert be.handle(msg(R.RESET_DEVICE)) is None
    for ring in range(8):
        be.handle(msg(R.SET_VRING_ENABLE, VringState(ring, int(ring < 2))))
    acked = 0x170408000
    fd0, fd1 = memfd(), memfd()
    for dev in range(pairs):
        be.handle(msg(R.SET_FEATURES, U64(acked)))
        assert reply_u64(be.handle(msg(R.GET_STATUS))) in (0, 8)
        if dev == 0:
            be.handle(msg(R.SET_STATUS, U64(8)))
            ack = be.handle(
                msg(
                    R.ADD_MEM_REG,
                    SingleRegion(MemRegion(0, 0xA0000, UVA - 0x100000, 0)),
                    (fd0,),
                    need_reply=True,
                )
            )
            assert reply_u64(ack) == 0
            be.handle(
                msg(
                    R.ADD_MEM_REG,
                    SingleRegion(MemRegion(GPA, MEM_SIZE, UVA, 0)),
                    (fd1,),
                    need_reply=True,
                )
            )
        for ring in (2 * dev, 2 * dev + 1):
            setup_ring(be, ring)
            be.handle(msg(R.SET_VRING_KICK, VringFd(ring, False), (ev(),)))
            be.handle(msg(R.SET_VRING_CALL, VringFd(ring, False), (ev(),)))
    be.handle(msg(R.SET_STATUS, U64(15)))
    assert sorted(rec.started) == list(range(8))
    assert [rec.started[i].enabled for i in range(8)] == [True, True] + [False] * 6
    cfg = rec.started[3]
    assert cfg.desc_addr == GPA + 0x1000 + 3 * 0x4000
    assert cfg.size == 256 and cfg.event_idx and cfg.pair == 1 and not cfg.is_rx
    rec.last_avail[0] = 17
    for ring in range(8):
        r = be.handle(msg(R.GET_VRING_BASE, VringState(ring, 0)))
        assert r is not None
        m = parse_message(r, replies=True)
        assert m.body == VringState(ring, 17 if ring == 0 else 0)
    assert not rec.started
    be.handle(msg(R.SET_STATUS, U64(0)))
    be.handle(msg(R.RESET_DEVICE))
    be.close()


# ---------------------------------------------------------------------------
# Ring lifecycle
# ---------------------------------------------------------------------------


def test_ring_start_stop_and_fd_handling() -> None:
    rec = Recorder()
    be = Backend(rec, BackendConfig(max_queue_pairs=2))
    negotiate(be)
    set_table(be)
    setup_ring(be, 1, base=5)
    kick = ev()
    be.handle(msg(R.SET_VRING_KICK, VringFd(1, False), (kick,)))
    cfg = rec.started[1]
    assert cfg.last_avail_idx == 5 and cfg.kick_fd == kick and cfg.call_fd is None
    assert (cfg.desc_addr, cfg.avail_addr, cfg.used_addr) == (
        GPA + 0x5000,
        GPA + 0x5000 + 0x1800,
        GPA + 0x5000 + 0x3000,
    )
    call1, call2 = ev(), ev()
    be.handle(msg(R.SET_VRING_CALL, VringFd(1, False), (call1,)))
    be.handle(msg(R.SET_VRING_CALL, VringFd(1, False), (call2,)))
    assert not fd_is_open(call1) and fd_is_open(call2)
    be.handle(msg(R.SET_VRING_CALL, VringFd(1, True)))
    assert not fd_is_open(call2)
    assert rec.log[-3:] == [("call", 1, True), ("call", 1, True), ("call", 1, False)]
    rec.last_avail[1] = 300
    r = be.handle(msg(R.GET_VRING_BASE, VringState(1, 0)))
    assert r is not None and parse_message(r, replies=True).body == VringState(1, 300)
    assert not fd_is_open(kick)
    # Stopped: GET_VRING_BASE again reports the same index, no second stop event.
    r = be.handle(msg(R.GET_VRING_BASE, VringState(1, 0)))
    assert r is not None and parse_message(r, replies=True).body == VringState(1, 300)
    assert rec.log.count(("stop", 1)) == 1
    # Restart with polling (NOFD kick).
    be.handle(msg(R.SET_VRING_KICK, VringFd(1, True)))
    assert rec.started[1].kick_fd is None and rec.started[1].last_avail_idx == 300
    be.close()
    assert not rec.started


def test_rings_enabled_at_set_features_without_protocol_features() -> None:
    rec = Recorder()
    be = Backend(rec, BackendConfig(max_queue_pairs=2))
    negotiate(be, protocol=False)
    assert [e for e in rec.log if e[0] == "enable"] == [("enable", i, True) for i in range(4)]
    set_table(be)
    setup_ring(be, 0)
    be.handle(msg(R.SET_VRING_KICK, VringFd(0, False), (ev(),)))
    assert rec.started[0].enabled
    be.close()


def test_rings_disabled_until_enable_with_protocol_features() -> None:
    rec = Recorder()
    be = Backend(rec, BackendConfig(max_queue_pairs=1))
    negotiate(be)
    set_table(be)
    setup_ring(be, 0)
    be.handle(msg(R.SET_VRING_KICK, VringFd(0, False), (ev(),)))
    assert not rec.started[0].enabled
    be.handle(msg(R.SET_VRING_ENABLE, VringState(0, 1)))
    be.handle(msg(R.SET_VRING_ENABLE, VringState(0, 1)))
    be.handle(msg(R.SET_VRING_ENABLE, VringState(0, 0)))
    assert [e for e in rec.log if e[0] == "enable"] == [("enable", 0, True), ("enable", 0, False)]
    with pytest.raises(ProtocolError, match="0 or 1"):
        be.handle(msg(R.SET_VRING_ENABLE, VringState(0, 2)))
    be.close()


def test_set_mem_table_switch_happens_before_old_fds_close() -> None:
    seen_old_open: list[bool] = []
    old_fds: list[int] = []

    class Ev(Recorder):
        def on_mem_table(self, regions: tuple[RegionInfo, ...]) -> None:
            super().on_mem_table(regions)
            seen_old_open.extend(fd_is_open(fd) for fd in old_fds)

    rec = Ev()
    be = Backend(rec)
    negotiate(be)
    fd1 = memfd()
    be.handle(msg(R.SET_MEM_TABLE, MemTable((MemRegion(GPA, MEM_SIZE, UVA, 0),)), (fd1,)))
    old_fds.append(fd1)
    assert be.memory.regions[0].guest_addr == GPA
    be.memory.write(GPA + 10, b"hello")
    fd2 = memfd()
    be.handle(msg(R.SET_MEM_TABLE, MemTable((MemRegion(GPA, MEM_SIZE, UVA, 0),)), (fd2,)))
    assert seen_old_open == [True]
    assert not fd_is_open(fd1) and fd_is_open(fd2)
    assert be.memory.read(GPA + 10, 5) == b"\0" * 5  # a new, empty memfd
    be.close()
    assert not fd_is_open(fd2)


def test_add_and_remove_regions() -> None:
    rec = Recorder()
    be = Backend(rec, BackendConfig(max_queue_pairs=1))
    negotiate(be)
    a, b = memfd(), memfd(4096)
    be.handle(msg(R.ADD_MEM_REG, SingleRegion(MemRegion(GPA, MEM_SIZE, UVA, 0)), (a,)))
    be.handle(msg(R.ADD_MEM_REG, SingleRegion(MemRegion(0, 4096, 0x1000, 0)), (b,)))
    assert [len(t) for t in rec.tables] == [1, 2]
    with pytest.raises(ProtocolError, match="overlaps"):
        be.handle(
            msg(R.ADD_MEM_REG, SingleRegion(MemRegion(GPA, 4096, 0x9000_0000, 0)), (memfd(4096),))
        )
    be.close()
    be = Backend(rec, BackendConfig(max_queue_pairs=1))
    negotiate(be)
    a, b = memfd(), memfd(4096)
    be.handle(msg(R.ADD_MEM_REG, SingleRegion(MemRegion(GPA, MEM_SIZE, UVA, 0)), (a,)))
    be.handle(msg(R.ADD_MEM_REG, SingleRegion(MemRegion(0, 4096, 0x1000, 0)), (b,)))
    setup_ring(be, 0)
    be.handle(msg(R.SET_VRING_KICK, VringFd(0, False), (ev(),)))
    stray = ev()
    be.handle(msg(R.REM_MEM_REG, SingleRegion(MemRegion(0, 4096, 0x1000, 0xDEAD)), (stray,)))
    assert not fd_is_open(b) and not fd_is_open(stray)  # "MUST close it without using it"
    with pytest.raises(ProtocolError, match="drops running ring: ring 0"):
        be.handle(msg(R.REM_MEM_REG, SingleRegion(MemRegion(GPA, MEM_SIZE, UVA, 0))))
    with pytest.raises(ProtocolError, match="no region"):
        be.handle(msg(R.REM_MEM_REG, SingleRegion(MemRegion(GPA, 4096, UVA, 0))))
    be.close()


def test_reply_ack() -> None:
    rec = Recorder()
    be = Backend(rec)
    # Not negotiated yet: NEED_REPLY is not answered.
    assert be.handle(msg(R.SET_OWNER, need_reply=True)) is None
    negotiate(be)
    assert reply_u64(be.handle(msg(R.SET_OWNER, need_reply=True))) == 0
    assert reply_u64(be.handle(msg(R.NET_SET_MTU, U64(9000), need_reply=True))) == 0
    assert reply_u64(be.handle(msg(R.NET_SET_MTU, U64(67), need_reply=True))) == 1
    rec.mtu_ok = False
    assert reply_u64(be.handle(msg(R.NET_SET_MTU, U64(1500), need_reply=True))) == 1
    assert be.mtu == 9000
    # A request with its own reply gets only that reply.
    assert reply_u64(be.handle(msg(R.GET_FEATURES, need_reply=True))) == DEFAULT_FEATURES
    be.close()


def test_features_offered_and_withheld() -> None:
    """IN_ORDER is offered (every worker uses buffers in order); RING_RESET
    is not: QEMU would offer it to the guest but never tells a vhost-user
    backend of a queue reset, so the worker would go on with a ring the
    guest has freed."""
    assert DEFAULT_FEATURES & NetFeature.IN_ORDER
    assert not DEFAULT_FEATURES & NetFeature.RING_RESET


def test_rarp_only_when_configured() -> None:
    rec = Recorder()
    be = Backend(rec, BackendConfig(rarp=True))
    pf = reply_u64(be.handle(msg(R.GET_PROTOCOL_FEATURES)))
    assert pf & PF.RARP.mask
    be.handle(msg(R.SET_PROTOCOL_FEATURES, U64(pf)))
    mac = bytes.fromhex("525400123456")
    be.handle(msg(R.SEND_RARP, U64(int.from_bytes(mac + b"\0\0", "little"))))
    assert rec.log[-1] == ("rarp", mac)
    be.close()
    be = Backend(rec)
    assert not reply_u64(be.handle(msg(R.GET_PROTOCOL_FEATURES))) & PF.RARP.mask
    with pytest.raises(ProtocolError, match="RARP"):
        be.handle(msg(R.SEND_RARP, U64(0)))
    be.close()


def test_reset_device_stops_rings_keeps_call_fds() -> None:
    rec = Recorder()
    be = Backend(rec)
    negotiate(be)
    set_table(be)
    call = ev()
    be.handle(msg(R.SET_VRING_CALL, VringFd(0, False), (call,)))
    setup_ring(be, 0)
    kick = ev()
    be.handle(msg(R.SET_VRING_KICK, VringFd(0, False), (kick,)))
    be.handle(msg(R.RESET_DEVICE))
    assert rec.log[-2:] == [("stop", 0), ("reset",)]
    assert not fd_is_open(kick) and fd_is_open(call)
    assert be.features == 0
    be.close()
    assert not fd_is_open(call)


def test_reset_device_disables_every_enabled_ring() -> None:
    """After RESET_DEVICE QEMU re-enables only the pairs the guest uses, so the
    owner must hear that every ring enabled before the reset no longer is."""
    rec = Recorder()
    be = Backend(rec, BackendConfig(max_queue_pairs=2))
    negotiate(be)
    set_table(be)
    for i in range(4):
        be.handle(msg(R.SET_VRING_ENABLE, VringState(i, 1)))
    setup_ring(be, 0)
    be.handle(msg(R.SET_VRING_KICK, VringFd(0, False), (ev(),)))
    assert rec.enabled == {0, 1, 2, 3}
    del rec.log[:]
    be.handle(msg(R.RESET_DEVICE))
    assert rec.log == [
        ("stop", 0),
        ("enable", 0, False),
        ("enable", 1, False),
        ("enable", 2, False),
        ("enable", 3, False),
        ("reset",),
    ]
    assert not rec.enabled and not any(r.enabled for r in be.rings)
    be.close()


def test_offloads_are_configurable() -> None:
    plain = reply_u64(Backend().handle(msg(R.GET_FEATURES)))
    off = reply_u64(Backend(config=BackendConfig(offloads=True)).handle(msg(R.GET_FEATURES)))
    assert not plain & 0b11 and off & 0b11 == 0b11  # CSUM, GUEST_CSUM
    assert plain & NetFeature.VERSION_1


# ---------------------------------------------------------------------------
# Rejections
# ---------------------------------------------------------------------------


def _started_backend(rec: Recorder | None = None) -> Backend:
    be = Backend(rec or Recorder(), BackendConfig(max_queue_pairs=1))
    negotiate(be)
    set_table(be)
    return be


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([(R.SET_FEATURES, U64(1 << 63))], "not offered"),
        ([(R.SET_PROTOCOL_FEATURES, U64(PF.BACKEND_REQ.mask))], "not offered"),
        ([(R.SET_VRING_NUM, VringState(2, 256))], "ring 2"),
        ([(R.SET_VRING_NUM, VringState(0, 100))], "power of 2"),
        ([(R.SET_VRING_NUM, VringState(0, 65536))], "power of 2"),
        ([(R.SET_VRING_NUM, VringState(0, 0))], "power of 2"),
        ([(R.SET_VRING_BASE, VringState(0, 0x10000))], "u16"),
        (
            [
                (R.SET_VRING_NUM, VringState(0, 256)),
                (R.SET_VRING_ADDR, VringAddr(0, 0, 0x1000, 0x3000, 0x2000, 0)),
            ],
            "not in any region",
        ),
        (
            [
                (R.SET_VRING_NUM, VringState(0, 256)),
                (R.SET_VRING_ADDR, VringAddr(0, 0, UVA + 8, UVA + 0x3000, UVA + 0x2000, 0)),
            ],
            "aligned",
        ),
        (
            [
                (R.SET_VRING_NUM, VringState(0, 256)),
                (R.SET_VRING_ADDR, VringAddr(0, 0, UVA, UVA + 0x3000, UVA + MEM_SIZE - 4, 0)),
            ],
            "available ring",
        ),
        ([(R.SET_VRING_KICK, VringFd(0, True))], "no size or addresses"),
        ([(R.SET_LOG_BASE, LogBase(4096, 0))], "shared-memory file"),
        ([(R.GET_CONFIG, Raw(bytes(12)))], "not supported"),
        ([(R.VRING_KICK, VringState(0, 0))], "not supported"),
        ([(R.SET_STATUS, U64(0x100))], "status byte"),
        ([(R.POSTCOPY_ADVISE, Empty())], "not supported"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_rejections(messages: list[tuple[Request, Body]], match: str) -> None:
    be = _started_backend()
    with pytest.raises(ProtocolError, match=match):
        for request, body in messages:
            fds: tuple[int, ...] = ()
            if request is R.SET_LOG_BASE:
                fds = (ev(),)
            be.handle(parse_message(encode_request(request, body), fds))
    be.close()


def test_packed_rings_take_any_size_a_u32_base_and_event_areas() -> None:
    """VIRTIO_F_RING_PACKED: SET_VRING_NUM takes sizes that are not powers
    of 2, SET/GET_VRING_BASE carry 32 bits, and SET_VRING_ADDR's avail and
    used are 4-byte event areas (checked as such)."""
    rec = Recorder()
    be = Backend(rec, BackendConfig(max_queue_pairs=1))
    offered = reply_u64(be.handle(msg(R.GET_FEATURES)))
    assert offered & NetFeature.RING_PACKED
    negotiate(be, features=offered)
    set_table(be)
    be.handle(msg(R.SET_VRING_NUM, VringState(0, 100)))
    be.handle(msg(R.SET_VRING_BASE, VringState(0, 0x80008000)))
    base = UVA + 0x1000
    # Event areas right at the end of memory: 4 bytes fit, a split used ring would not.
    be.handle(
        msg(R.SET_VRING_ADDR, VringAddr(0, 0, base, UVA + MEM_SIZE - 4, UVA + MEM_SIZE - 8, 0))
    )
    be.handle(msg(R.SET_VRING_KICK, VringFd(0, False), (ev(),)))
    cfg = rec.started[0]
    assert (cfg.size, cfg.last_avail_idx) == (100, 0x80008000)
    assert (cfg.avail_addr, cfg.used_addr) == (GPA + MEM_SIZE - 8, GPA + MEM_SIZE - 4)
    rec.last_avail[0] = 0x00050005  # both positions 5, both wrap counters 0
    reply = be.handle(msg(R.GET_VRING_BASE, VringState(0, 0)))
    assert reply is not None and reply[-4:] == (0x00050005).to_bytes(4, "little")
    with pytest.raises(ProtocolError, match="not 4-aligned"):
        be.handle(msg(R.SET_VRING_ADDR, VringAddr(0, 0, base, UVA + 0x3002, UVA + 0x3010, 0)))
        be.handle(msg(R.SET_VRING_KICK, VringFd(0, False), (ev(),)))
    be.close()
    be = Backend(rec, BackendConfig(max_queue_pairs=1))
    negotiate(be, features=offered)
    with pytest.raises(ProtocolError, match="packed size 40000"):
        be.handle(msg(R.SET_VRING_NUM, VringState(0, 40000)))
    be.close()


def test_gated_requests_need_their_protocol_feature() -> None:
    be = Backend()
    be.handle(msg(R.SET_PROTOCOL_FEATURES, U64(0)))
    gated: list[tuple[Request, Body, tuple[int, ...]]] = [
        (R.ADD_MEM_REG, SingleRegion(MemRegion(0, 4096, 0, 0)), (memfd(4096),)),
        (R.REM_MEM_REG, SingleRegion(MemRegion(0, 4096, 0, 0)), ()),
        (R.SET_STATUS, U64(1), ()),
        (R.RESET_DEVICE, Empty(), ()),
        (R.NET_SET_MTU, U64(1500), ()),
        (R.SET_LOG_BASE, LogBase(4096, 0), (memfd(4096),)),
    ]
    for request, body, fds in gated:
        with pytest.raises(ProtocolError, match="without protocol feature"):
            be.handle(msg(request, body, fds))
        assert all(not fd_is_open(fd) for fd in fds)
    be.close()


def test_kick_before_memory_table() -> None:
    be = Backend(config=BackendConfig(max_queue_pairs=1))
    negotiate(be)
    be.handle(msg(R.SET_VRING_NUM, VringState(0, 256)))
    be.handle(msg(R.SET_VRING_ADDR, ring_layout(0)))
    with pytest.raises(ProtocolError, match="memory table"):
        be.handle(msg(R.SET_VRING_KICK, VringFd(0, False), (ev(),)))
    be.close()


def test_bad_memory_fds() -> None:
    be = Backend()
    negotiate(be)
    small = memfd(4096)
    with pytest.raises(ProtocolError, match="past the end"):
        be.handle(msg(R.SET_MEM_TABLE, MemTable((MemRegion(0, 8192, UVA, 0),)), (small,)))
    assert not fd_is_open(small)
    a, b = socket.socketpair()
    with pytest.raises(ProtocolError, match="not a shared-memory file"):
        be.handle(msg(R.SET_MEM_TABLE, MemTable((MemRegion(0, 4096, UVA, 0),)), (a.detach(),)))
    b.close()
    # One good and one bad fd: the good mapping is undone, both fds closed.
    good, bad = memfd(4096), memfd(4096)
    with pytest.raises(ProtocolError, match="past the end"):
        be.handle(
            msg(
                R.SET_MEM_TABLE,
                MemTable((MemRegion(0, 4096, UVA, 0), MemRegion(8192, 4096, UVA + 8192, 4096))),
                (good, bad),
            )
        )
    assert not fd_is_open(good) and not fd_is_open(bad)
    assert be.regions == ()
    be.close()


def test_close_stops_rings_then_tells_the_owner_once() -> None:
    rec = Recorder()
    be = _started_backend(rec)
    for ring in (0, 1):
        setup_ring(be, ring)
        be.handle(msg(R.SET_VRING_KICK, VringFd(ring, False), (ev(),)))
    assert set(rec.started) == {0, 1}
    tables = len(rec.tables)
    be.close()
    be.close()
    assert rec.log[-1] == ("close",)
    assert rec.log.count(("close",)) == 1
    stops = [e for e in rec.log if e[0] == "stop"]
    assert stops and rec.log.index(stops[-1]) < rec.log.index(("close",))
    assert len(rec.tables) == tables  # memory unmapped after on_close, no new table event


def test_closed_backend_refuses_and_closes_fds() -> None:
    be = Backend()
    be.close()
    fd = ev()
    with pytest.raises(ProtocolError, match="closed"):
        be.handle(msg(R.SET_VRING_CALL, VringFd(0, False), (fd,)))
    assert not fd_is_open(fd)


# ---------------------------------------------------------------------------
# Hypothesis: (state, input) pairs
# ---------------------------------------------------------------------------

_ring = st.integers(0, 3)  # 2 pairs = 4 rings; 3 is valid, and the codec caps the rest
_plausible: st.SearchStrategy[tuple[Request, Body]] = st.one_of(
    st.tuples(st.just(R.GET_FEATURES), st.just(Empty())),
    st.tuples(
        st.just(R.SET_FEATURES),
        st.sampled_from([U64(DEFAULT_FEATURES), U64(1 << 32), U64(1 << 63)]),
    ),
    st.tuples(st.just(R.GET_PROTOCOL_FEATURES), st.just(Empty())),
    st.tuples(
        st.just(R.SET_PROTOCOL_FEATURES), st.sampled_from([U64(0x1A019), U64(0), U64(1 << 5)])
    ),
    st.tuples(st.just(R.SET_OWNER), st.just(Empty())),
    st.tuples(st.just(R.RESET_OWNER), st.just(Empty())),
    st.tuples(st.just(R.GET_QUEUE_NUM), st.just(Empty())),
    st.tuples(st.just(R.SET_MEM_TABLE), st.just(MemTable((MemRegion(GPA, MEM_SIZE, UVA, 0),)))),
    st.tuples(st.just(R.ADD_MEM_REG), st.just(SingleRegion(MemRegion(GPA, MEM_SIZE, UVA, 0)))),
    st.tuples(st.just(R.REM_MEM_REG), st.just(SingleRegion(MemRegion(GPA, MEM_SIZE, UVA, 0)))),
    st.tuples(
        st.just(R.SET_VRING_NUM), st.builds(VringState, _ring, st.sampled_from([0, 3, 256, 1024]))
    ),
    st.tuples(
        st.just(R.SET_VRING_BASE),
        st.builds(VringState, _ring, st.sampled_from([0, 7, 0xFFFF, 0x10000])),
    ),
    st.tuples(st.just(R.SET_VRING_ADDR), _ring.map(ring_layout)),
    st.tuples(
        st.just(R.SET_VRING_ADDR),
        st.builds(
            VringAddr,
            _ring,
            st.just(0),
            st.integers(0, 1 << 64 - 1),
            st.integers(0, 1 << 64 - 1),
            st.integers(0, 1 << 64 - 1),
            st.just(0),
        ),
    ),
    st.tuples(st.just(R.GET_VRING_BASE), st.builds(VringState, _ring, st.just(0))),
    st.tuples(
        st.sampled_from([R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR]),
        st.builds(VringFd, _ring, st.booleans()),
    ),
    st.tuples(st.just(R.SET_VRING_ENABLE), st.builds(VringState, _ring, st.integers(0, 2))),
    st.tuples(st.just(R.NET_SET_MTU), st.builds(U64, st.integers(0, 70000))),
    st.tuples(st.just(R.SET_STATUS), st.builds(U64, st.integers(0, 0x1FF))),
    st.tuples(st.just(R.GET_STATUS), st.just(Empty())),
    st.tuples(st.just(R.RESET_DEVICE), st.just(Empty())),
    st.tuples(st.just(R.GET_MAX_MEM_SLOTS), st.just(Empty())),
    st.tuples(st.just(R.SET_LOG_FD), st.just(Empty())),
)


_setup_ring: st.SearchStrategy[list[tuple[Request, Body]]] = _ring.map(
    lambda i: [
        (R.SET_VRING_NUM, VringState(i, 256)),
        (R.SET_VRING_ADDR, ring_layout(i)),
        (R.SET_VRING_KICK, VringFd(i, False)),
    ]
)
_PRELUDE: list[tuple[Request, Body]] = [
    (R.SET_PROTOCOL_FEATURES, U64(0x1A019)),
    (R.SET_FEATURES, U64(DEFAULT_FEATURES)),
    (R.SET_MEM_TABLE, MemTable((MemRegion(GPA, MEM_SIZE, UVA, 0),))),
]
_ops = st.lists(st.tuples(_setup_ring, st.lists(_plausible, max_size=3)), max_size=10).map(
    lambda groups: [op for setup, extra in groups for op in (*setup, *extra)]
)


def _fds_for(request: Request, body: Body) -> tuple[int, ...]:
    if request is R.SET_MEM_TABLE or request is R.ADD_MEM_REG:
        return (memfd(),)
    if isinstance(body, VringFd) and not body.nofd:
        return (ev(),)
    if request is R.SET_LOG_FD:
        return (ev(),)
    return ()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.booleans(), _ops, st.lists(st.booleans(), min_size=60, max_size=60))
def test_state_machine_never_crashes_and_keeps_invariants(
    prelude: bool, ops: list[tuple[Request, Body]], need_replies: list[bool]
) -> None:
    steps = list(zip((_PRELUDE if prelude else []) + ops, need_replies * 2, strict=False))
    before = open_fds()
    rec = Recorder()
    be = Backend(rec, BackendConfig(max_queue_pairs=2))
    most = 0
    for (request, body), need_reply in steps:
        m = parse_message(
            encode_request(request, body, need_reply=need_reply), _fds_for(request, body)
        )
        try:
            reply = be.handle(m)
        except ProtocolError:
            event("ended by ProtocolError")
            break  # the server drops the connection here
        if reply is not None:
            req, flags, size = HEADER.unpack_from(reply)
            assert req == request and flags == VERSION | 0x4 and size == len(reply) - HEADER.size
        # The owner's view of started rings always matches the backend's.
        assert set(rec.started) == {r.index for r in be.rings if r.started}
        # ... and so does its view of enabled rings (RESET_DEVICE included).
        assert rec.enabled == {r.index for r in be.rings if r.enabled}
        most = max(most, len(rec.started))
        for r in be.rings:
            if r.started:
                assert r.size and r.addr is not None and be.regions
    event(f"most rings started at once: {most}")
    be.close()
    assert not rec.started
    assert open_fds() == before


def test_new_table_under_running_rings() -> None:
    rec = Recorder()
    be = Backend(rec, BackendConfig(max_queue_pairs=1))
    negotiate(be)
    set_table(be)
    setup_ring(be, 0)
    be.handle(msg(R.SET_VRING_KICK, VringFd(0, False), (ev(),)))
    old_fd = be.regions[0].fd
    tables = len(rec.tables)
    # Same layout, new fd (e.g. QEMU re-sending after a hotplug elsewhere): accepted.
    be.handle(msg(R.SET_MEM_TABLE, MemTable((MemRegion(GPA, MEM_SIZE, UVA, 0),)), (memfd(),)))
    assert not fd_is_open(old_fd) and len(rec.tables) == tables + 1 and 0 in rec.started
    current = be.regions[0].fd
    # A table that moves the ring to other guest addresses: refused, nothing changes.
    moved = MemTable((MemRegion(GPA + MEM_SIZE, MEM_SIZE, UVA, 0),))
    with pytest.raises(ProtocolError, match="moves running ring 0"):
        be.handle(msg(R.SET_MEM_TABLE, moved, (memfd(),)))
    gone = MemTable((MemRegion(GPA, MEM_SIZE, UVA + MEM_SIZE, 0),))
    with pytest.raises(ProtocolError, match="drops running ring"):
        be.handle(msg(R.SET_MEM_TABLE, gone, (memfd(),)))
    assert fd_is_open(current) and be.regions[0].fd == current and len(rec.tables) == tables + 1
    be.close()


# ---------------------------------------------------------------------------
# Live migration: VHOST_F_LOG_ALL, LOG_SHMFD and SET_LOG_BASE
# ---------------------------------------------------------------------------


@dataclass
class LogRecorder(NullEvents):
    logs: list[tuple[int, int, int, bool]] = field(default_factory=list)

    def on_log_base(self, fd: int, size: int, offset: int) -> None:
        self.logs.append((fd, size, offset, fd_is_open(fd)))


def test_migration_features_are_offered() -> None:
    be = Backend()
    assert reply_u64(be.handle(msg(R.GET_FEATURES))) & LOG_ALL
    assert reply_u64(be.handle(msg(R.GET_PROTOCOL_FEATURES))) & PF.LOG_SHMFD.mask
    be.close()


def test_set_log_base_hands_the_log_over_and_replies() -> None:
    rec = LogRecorder()
    be = Backend(rec)
    negotiate(be)
    fd = memfd(3 * 4096)
    reply = be.handle(msg(R.SET_LOG_BASE, LogBase(8192, 4096), (fd,)))
    # QEMU reads a reply to SET_LOG_BASE when LOG_SHMFD is negotiated.
    assert reply is not None
    assert parse_message(reply, replies=True).request is R.SET_LOG_BASE
    assert rec.logs == [(fd, 8192, 4096, True)]
    assert not fd_is_open(fd)  # borrowed for the callback only
    ev_fd = ev()
    assert be.handle(msg(R.SET_LOG_FD, EMPTY, (ev_fd,))) is None
    assert not fd_is_open(ev_fd)
    be.close()


@pytest.mark.parametrize(
    ("body", "fd_size", "match"),
    [
        (LogBase(0, 0), 4096, "log size 0"),
        (LogBase(MAX_LOG_BYTES + 1, 0), 4096, "log size"),
        (LogBase(8192, 0), 4096, "past the end"),
        (LogBase(4096, 1 << 62), 4096, "past the end"),
        (LogBase(4096, 0), None, "missing"),
    ],
)
def test_set_log_base_rejects_bad_logs(body: LogBase, fd_size: int | None, match: str) -> None:
    be = Backend(LogRecorder())
    negotiate(be)
    fds = (memfd(fd_size),) if fd_size is not None else ()
    with pytest.raises(ProtocolError, match=match):
        be.handle(msg(R.SET_LOG_BASE, body, fds))
    assert all(not fd_is_open(fd) for fd in fds)
    be.close()


@dataclass
class LogAddrRecorder(Recorder):
    """Takes (or, with ``accept=False``, refuses) in-place log-address changes."""

    accept: bool = True

    def on_ring_log(self, index: int, log_addr: int | None) -> bool:
        self.log.append(("log", index, log_addr))
        return self.accept


@pytest.mark.parametrize("accept", [True, False])
def test_log_flag_on_a_started_ring_goes_to_the_owner(accept: bool) -> None:
    """QEMU turns VHOST_VRING_F_LOG on and off on running rings (migration):
    the owner applies it in place, or (refusing) gets the ring restarted with
    it.  A running ring whose addresses change is restarted either way."""
    rec = LogAddrRecorder(accept=accept)
    be = Backend(rec, BackendConfig(max_queue_pairs=1))
    negotiate(be)
    set_table(be)
    setup_ring(be, 0)
    be.handle(msg(R.SET_VRING_KICK, VringFd(0, False), (ev(),)))
    assert rec.log[-1] == ("start", 0)
    plain = ring_layout(0)
    logged = VringAddr(0, VRING_ADDR_F_LOG, plain.desc, plain.used, plain.avail, 0x4000)
    be.handle(msg(R.SET_VRING_ADDR, logged))
    restarted = [("stop", 0), ("start", 0)]
    if accept:
        assert rec.log[-2:] == [("start", 0), ("log", 0, 0x4000)]
    else:
        assert rec.log[-3:] == [("log", 0, 0x4000), *restarted]
    assert be.ring_config(0).flags == VRING_ADDR_F_LOG and be.ring_config(0).log_addr == 0x4000
    if not accept:
        assert rec.started[0].log_addr == 0x4000  # the restart carries it
    be.handle(msg(R.SET_VRING_ADDR, plain))
    assert ("log", 0, None) in rec.log and be.ring_config(0).flags == 0
    # Other addresses on a running ring: a restart, not a log change.
    n = len(rec.log)
    moved = VringAddr(0, 0, plain.desc + 0x100, plain.used, plain.avail, 0)
    be.handle(msg(R.SET_VRING_ADDR, moved))
    assert rec.log[n:] == restarted
    be.close()
