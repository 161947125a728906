"""The virtio-net device and driver over one guest memory: control queue, steering,
filters, mergeable buffers, hash report, ordering across queue-count changes."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from virtnet.demo import GUEST_MAC, build_frame, reflect, run_demo
from virtnet.device import DEFAULT_DEVICE_FEATURES, VirtioNetDevice
from virtnet.driver import DEFAULT_DRIVER_FEATURES, BumpAllocator, VirtioNetDriver
from virtnet.errors import PeerError
from virtnet.memory import GuestMemory
from virtnet.net import (
    CTRL_ERR,
    CTRL_MQ,
    CTRL_MQ_RSS_CONFIG,
    CTRL_OK,
    CTRL_RX,
    CTRL_RX_NOBCAST,
    CTRL_RX_PROMISC,
    CTRL_VLAN,
    CTRL_VLAN_ADD,
    HASH_REPORT_UDPV4,
    NetConfig,
    NetFeature,
    NetHdr,
    ctrl_index,
    tx_index,
)
from virtnet.rss import toeplitz_hash

KEY = bytes.fromhex(
    "6d5a56da255b0ec24167253d43a38fb0d0ca2bcbae7b30b477cb2da38030f20c6a42b73bbeac01fa"
)


@dataclass
class Rig:
    mem: GuestMemory
    dev: VirtioNetDevice
    drv: VirtioNetDriver
    sunk: list[tuple[int, bytes]] = field(default_factory=list)
    now: float = 0.0


def make_rig(pairs: int = 4, wanted: int = DEFAULT_DRIVER_FEATURES, reflect_tx: bool = True) -> Rig:
    mem = GuestMemory.anonymous(64 << 20)
    config = NetConfig(mac=GUEST_MAC, max_virtqueue_pairs=pairs)
    box: list[Rig] = []

    def sink(pair: int, hdr: NetHdr, frame: memoryview) -> None:
        rig = box[0]
        rig.sunk.append((pair, bytes(frame)))
        if reflect_tx:
            rig.dev.deliver(reflect(frame), rig.now)

    dev = VirtioNetDevice(mem, config, tx_sink=sink)
    drv = VirtioNetDriver(
        mem,
        BumpAllocator(0x1000, 64 << 20),
        config,
        dev.offered,
        wanted=wanted,
        pump=lambda: dev.process_ctrl(0.0),
    )
    dev.set_driver_features(drv.features)
    for i in range(drv.num_vqs):
        dev.attach_queue(i, *drv.vq_layout(i))
    rig = Rig(mem, dev, drv)
    box.append(rig)
    return rig


def test_features_must_be_offered_and_consistent() -> None:
    mem = GuestMemory.anonymous(1 << 20)
    dev = VirtioNetDevice(mem, NetConfig(max_virtqueue_pairs=2), offered=NetFeature.VERSION_1)
    with pytest.raises(PeerError):
        dev.set_driver_features(int(NetFeature.VERSION_1 | NetFeature.MQ))
    dev2 = VirtioNetDevice(mem, NetConfig(max_virtqueue_pairs=2))
    with pytest.raises(PeerError):  # MQ needs CTRL_VQ (5.1.3.1)
        dev2.set_driver_features(int(NetFeature.VERSION_1 | NetFeature.MQ))


def test_queue_index_outside_map_rejected() -> None:
    rig = make_rig(2)
    with pytest.raises(PeerError):
        rig.dev.attach_queue(ctrl_index(2) + 1, 256, 0, 0x1000, 0x2000)


def test_vq_pairs_set_range_and_refusal_keeps_old_count() -> None:
    rig = make_rig(4)
    assert rig.drv.set_queue_pairs(3)
    assert rig.drv.curr_pairs == 3 and rig.dev.active_pairs == 3
    assert rig.drv.ctrl_command(CTRL_MQ, 0, struct.pack("<H", 0))[0] == CTRL_ERR
    assert rig.drv.ctrl_command(CTRL_MQ, 0, struct.pack("<H", 5))[0] == CTRL_ERR
    assert rig.drv.ctrl_command(CTRL_MQ, 0, b"\x01")[0] == CTRL_ERR  # short
    assert rig.dev.active_pairs == 3
    assert not rig.drv.set_queue_pairs(5)
    assert rig.drv.curr_pairs == 3


def test_rx_follows_tx_per_flow() -> None:
    rig = make_rig(4)
    assert rig.drv.set_queue_pairs(4)
    for flow in range(32):
        rig.drv.transmit([build_frame(flow, 0)])
    rig.dev.process_all_tx(0.0)
    got = rig.drv.receive_all()
    assert len(got) == 32
    tx_pair = {struct.unpack_from("!I", f, 42)[0]: p for p, f in rig.sunk}
    for fr in got:
        flow = struct.unpack_from("!I", fr.data, 42)[0]
        assert fr.pair == tx_pair[flow]
    assert len({p for p, _ in rig.sunk}) > 1  # flows really spread over pairs


def test_no_rx_above_active_pairs_after_shrink() -> None:
    rig = make_rig(4)
    assert rig.drv.set_queue_pairs(4)
    for flow in range(32):
        rig.drv.transmit([build_frame(flow, 0)])
    rig.dev.process_all_tx(0.0)
    rig.drv.receive_all()
    assert rig.drv.set_queue_pairs(2)
    before = rig.drv.stats()
    # Unsolicited frames for every flow (their old rx pair may be 2 or 3).
    for flow in range(32):
        assert rig.dev.deliver(reflect(build_frame(flow, 1)), 0.0) in (0, 1)
    rig.drv.receive_all()
    after = rig.drv.stats()
    for p in (2, 3):
        assert after[f"rx_queue_{p}_packets"] == before[f"rx_queue_{p}_packets"]


def test_order_kept_across_queue_count_change() -> None:
    """Packets queued on old tx queues are served before the switch takes effect."""
    rig = make_rig(4, reflect_tx=False)
    assert rig.drv.set_queue_pairs(4)
    frames = [build_frame(7, s) for s in range(20)]
    rig.drv.transmit(frames[:10], pair=3)  # not yet processed by the device
    assert rig.drv.set_queue_pairs(1)  # device must drain txq 3 first
    rig.drv.transmit(frames[10:], pair=0)
    rig.dev.process_all_tx(0.0)
    seqs = [struct.unpack_from("!I", f, 46)[0] for _, f in rig.sunk]
    assert seqs == list(range(20))
    assert [p for p, _ in rig.sunk] == [3] * 10 + [0] * 10


def test_rx_mode_filters_and_vlan_filter() -> None:
    rig = make_rig(1, wanted=DEFAULT_DRIVER_FEATURES | NetFeature.CTRL_RX_EXTRA)
    bcast = b"\xff" * 6 + bytes(6) + b"\x08\x00" + bytes(50)
    assert rig.dev.deliver(bcast, 0.0) == 0
    assert rig.drv.ctrl_command(CTRL_RX, CTRL_RX_PROMISC, b"\x00")[0] == CTRL_OK
    assert rig.drv.ctrl_command(CTRL_RX, CTRL_RX_NOBCAST, b"\x01")[0] == CTRL_OK
    assert rig.dev.deliver(bcast, 0.0) is None
    assert rig.dev.filtered == 1
    other = bytes.fromhex("020000000099") + bytes(6) + b"\x08\x00" + bytes(50)
    assert rig.dev.deliver(other, 0.0) is None  # not our MAC, not promisc
    mine = GUEST_MAC + bytes(6) + b"\x08\x00" + bytes(50)
    assert rig.dev.deliver(mine, 0.0) == 0
    tagged = GUEST_MAC + bytes(6) + b"\x81\x00\x00\x05\x08\x00" + bytes(50)
    assert rig.dev.deliver(tagged, 0.0) is None  # VLAN 5 not in the filter
    assert rig.drv.ctrl_command(CTRL_VLAN, CTRL_VLAN_ADD, struct.pack("<H", 5))[0] == CTRL_OK
    assert rig.dev.deliver(tagged, 0.0) == 0
    assert rig.drv.ctrl_command(CTRL_VLAN, CTRL_VLAN_ADD, struct.pack("<H", 4096))[0] == CTRL_ERR


def test_mergeable_buffers_span_large_frame() -> None:
    rig = make_rig(1)
    frame = GUEST_MAC + bytes(6) + b"\x08\x00" + bytes(range(256)) * 20  # 5134 bytes
    assert rig.dev.deliver(frame, 0.0) == 0
    (got,) = rig.drv.receive(0)
    assert got.data == frame
    assert got.hdr.num_buffers == 4  # 12 + 5134 over 1536-byte buffers


def test_rx_without_buffers_counts_drop() -> None:
    rig = make_rig(1)
    for _ in range(256):
        assert rig.dev.deliver(build_frame(0, 0), 0.0) == 0
    assert rig.dev.deliver(build_frame(0, 1), 0.0) is None
    assert rig.dev.stats[0].rx_drops == 1


def _rss_command(table: list[int], key: bytes, types: int, max_tx: int) -> bytes:
    return (
        struct.pack("<IHH", types, len(table) - 1, 0)
        + struct.pack(f"<{len(table)}H", *table)
        + struct.pack("<HB", max_tx, len(key))
        + key
    )


def test_rss_config_with_hash_report() -> None:
    wanted = DEFAULT_DRIVER_FEATURES | NetFeature.RSS | NetFeature.HASH_REPORT
    rig = make_rig(4, wanted=wanted)
    assert rig.drv.features & NetFeature.HASH_REPORT
    table = [0, 1, 2, 3] * 32
    types = 0b111  # IPv4, TCPv4, UDPv4
    ack, _ = rig.drv.ctrl_command(CTRL_MQ, CTRL_MQ_RSS_CONFIG, _rss_command(table, KEY, types, 4))
    assert ack == CTRL_OK
    for flow in range(16):
        frame = reflect(build_frame(flow, 0))
        pair = rig.dev.deliver(frame, 0.0)
        src = bytes(frame[26:30])
        dst = bytes(frame[30:34])
        h = toeplitz_hash(KEY, src + dst + frame[34:38])
        assert pair == table[h & 127]
    got = rig.drv.receive_all()
    assert all(f.hdr.hash_report == HASH_REPORT_UDPV4 for f in got)
    # VQ_PAIRS_SET after RSS_CONFIG wins.
    assert rig.drv.set_queue_pairs(1)
    assert rig.dev.deliver(reflect(build_frame(3, 0)), 0.0) == 0


def test_bad_ctrl_chain_and_broken_queue_do_not_raise() -> None:
    rig = make_rig(2)
    assert rig.drv.set_queue_pairs(2)
    # Corrupt the transmit queue 1 descriptor table: a loop.
    size, desc, _, _ = rig.drv.vq_layout(tx_index(1))
    rig.drv.transmit([build_frame(0, 0)], pair=1)
    d = struct.Struct("<QIHH")
    for i in range(size):
        d.pack_into(rig.mem.view(desc + 16 * i, 16), 0, 0x2000, 10, 1, i)
    rig.dev.process_all_tx(0.0)
    assert tx_index(1) in rig.dev.broken and rig.dev.queue_errors == 1
    # Pair 0 still works.
    rig.drv.transmit([build_frame(1, 0)], pair=0)
    assert rig.dev.process_tx(0, 0.0) == 1


def test_short_tx_chain_counted() -> None:
    rig = make_rig(1, reflect_tx=False)
    rig.drv.txqs[0].vq.add(((0x2000, 4),), (), 0)
    rig.drv.txqs[0].vq.publish()
    rig.dev.process_tx(0, 0.0)
    assert rig.dev.stats[0].tx_errors == 1 and not rig.sunk


def test_demo_passes_and_detects_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    res, _, drv = run_demo(queues=4, flows=8, seconds=0.4)
    assert res.ok and res.sent == res.received > 0
    assert res.switches == [4, 1, 2, 4]
    stats = drv.stats()
    assert all(stats[f"tx_queue_{p}_packets"] > 0 for p in range(4))
    real = VirtioNetDevice.deliver
    calls = {"n": 0}

    def lossy(
        self: VirtioNetDevice, frame: bytes, now: float, hdr: NetHdr | None = None
    ) -> int | None:
        calls["n"] += 1
        if calls["n"] == 100:
            return None  # a silently lost packet
        return real(self, frame, now, hdr)

    monkeypatch.setattr(VirtioNetDevice, "deliver", lossy)
    res2, _, _ = run_demo(queues=2, flows=4, seconds=0.2)
    assert not res2.ok and res2.lost == 1


def test_demo_cli_exit_status() -> None:
    from virtnet.cli import main

    assert main(["demo", "--queues", "2", "--flows", "4", "--seconds", "0.2"]) == 0
    assert main(["demo", "--queues", "0"]) == 2


class QueueCountMachine(RuleBasedStateMachine):
    """Random traffic and random queue-count changes: per-flow order, exactly once."""

    def __init__(self) -> None:
        super().__init__()
        self.rig = make_rig(4)
        self.seq = [0] * 6
        self.got: dict[int, list[int]] = {f: [] for f in range(6)}

    @rule(flow=st.integers(0, 5), n=st.integers(1, 6))
    def send(self, flow: int, n: int) -> None:
        for _ in range(n):
            if self.rig.drv.transmit([build_frame(flow, self.seq[flow])]):
                self.seq[flow] += 1

    @rule(pairs=st.integers(0, 5))
    def change_pairs(self, pairs: int) -> None:
        before = self.rig.drv.curr_pairs
        ok = self.rig.drv.set_queue_pairs(pairs)
        assert ok == (1 <= pairs <= 4)
        assert self.rig.drv.curr_pairs == (pairs if ok else before)
        self._reap()

    @rule(budget=st.integers(1, 64))
    def device_tx(self, budget: int) -> None:
        for p in range(4):
            if self.rig.dev.steering.tx_allowed(p):
                self.rig.dev.process_tx(p, 0.0, budget)

    @rule()
    def reap(self) -> None:
        self._reap()

    def _reap(self) -> None:
        for fr in self.rig.drv.receive_all():
            assert fr.pair < 4
            flow, seq = struct.unpack_from("!II", fr.data, 42)
            self.got[flow].append(seq)

    @invariant()
    def in_order_exactly_once(self) -> None:
        for flow, seqs in self.got.items():
            assert seqs == list(range(len(seqs))), (flow, seqs)
            assert len(seqs) <= self.seq[flow]

    def teardown(self) -> None:
        self.rig.dev.drain_tx(0.0)
        self._reap()
        for flow in range(6):
            assert self.got[flow] == list(range(self.seq[flow]))


QueueCountMachine.TestCase.settings = settings(
    max_examples=25, stateful_step_count=40, deadline=None
)
test_queue_count_machine = QueueCountMachine.TestCase


def test_default_device_features_contain_mq() -> None:
    assert DEFAULT_DEVICE_FEATURES & NetFeature.MQ and DEFAULT_DEVICE_FEATURES & NetFeature.CTRL_VQ


def test_deliver_batch_counts_drops_and_spills_large_frames() -> None:
    rig = make_rig(1)
    small = [reflect(build_frame(0, s)) for s in range(300)]
    assert rig.dev.deliver_batch(small, 0.0) == 256  # ring holds 256 buffers
    assert rig.dev.stats[0].rx_drops == 44
    got = rig.drv.receive(0, budget=512)
    assert [struct.unpack_from("!I", f.data, 46)[0] for f in got] == list(range(256))
    big = GUEST_MAC + bytes(6) + b"\x08\x00" + bytes(range(256)) * 12
    assert rig.dev.deliver_batch([small[0], big, small[1]], 0.0) == 3
    data = [f.data for f in rig.drv.receive(0)]
    assert data == [small[0], big, small[1]]


def test_deliver_batch_applies_rx_filter() -> None:
    rig = make_rig(1)
    assert rig.drv.ctrl_command(CTRL_RX, CTRL_RX_PROMISC, b"\x00")[0] == CTRL_OK
    other = bytes.fromhex("020000000099") + bytes(6) + b"\x08\x00" + bytes(50)
    assert rig.dev.deliver_batch([other, reflect(build_frame(0, 0))], 0.0) == 1
    assert rig.dev.filtered == 1
