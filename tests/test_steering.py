"""Tests for virtnet.steering: rx-follows-tx, aging, RSS, hash report, queue switches."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtnet import net
from virtnet.ctrl import ControlState, handle_command
from virtnet.net import NetFeature
from virtnet.rss import HASH_TYPE_IPV4, HASH_TYPE_TCPV4, HASH_TYPES_ALL, rss_hash
from virtnet.steering import Steering

F = NetFeature
FEATURES = int(F.CTRL_VQ | F.MQ | F.RSS | F.HASH_REPORT | F.VERSION_1)
KEY = bytes.fromhex(
    "6d5a56da255b0ec24167253d43a38fb0d0ca2bcbae7b30b477cb2da38030f20c6a42b73bbeac01fa"
)
MAC_A = bytes.fromhex("525400000001")
MAC_B = bytes.fromhex("525400000002")


def frame(src: str, dst: str, sport: int, dport: int, proto: int = 6) -> bytes:
    if proto == 6:
        l4 = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 0x50, 0x02, 1024, 0, 0)
    else:
        l4 = struct.pack("!HHHH", sport, dport, 8, 0)
    s, d = ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0, 0, 64, proto, 0, s, d)
    return MAC_B + MAC_A + b"\x08\x00" + ip + l4


def reply(src: str, dst: str, sport: int, dport: int) -> bytes:
    return frame(dst, src, dport, sport)


ARP = MAC_B + MAC_A + b"\x08\x06" + bytes(28)


def command(state: ControlState, data: bytes) -> None:
    ack, _ = handle_command(state, FEATURES, data, 0.0)
    assert ack == net.CTRL_OK


def pairs_cmd(n: int) -> bytes:
    return bytes((net.CTRL_MQ, net.CTRL_MQ_VQ_PAIRS_SET)) + struct.pack("<H", n)


def rss_cmd(types: int, table: list[int], unclassified: int, max_tx: int) -> bytes:
    body = struct.pack("<IHH", types, len(table) - 1, unclassified)
    body += struct.pack(f"<{len(table)}H", *table) + struct.pack("<HB", max_tx, 40) + KEY
    return bytes((net.CTRL_MQ, net.CTRL_MQ_RSS_CONFIG)) + body


# ---- rx-follows-tx -------------------------------------------------------------------


def test_single_pair_always_zero() -> None:
    s = Steering(4)
    assert s.active_pairs == 1
    s.note_tx(frame("10.0.0.1", "10.0.0.2", 1, 2), 0, 0.0)
    assert s.choose_rx(frame("10.0.0.2", "10.0.0.1", 2, 1), 1.0) == (0, 0, 0)


def test_rx_follows_tx() -> None:
    s = Steering(4)
    s.set_pairs(4)
    s.drain_done()
    flows = [("10.0.0.1", "10.0.0.2", 1000 + i, 80) for i in range(20)]
    for i, fl in enumerate(flows):
        s.note_tx(frame(*fl), i % 4, 1.0)
    for i, fl in enumerate(flows):
        assert s.choose_rx(reply(*fl), 2.0)[0] == i % 4
    assert s.stats.flow_hits == 20
    # the flow moves when the guest transmits it on another pair
    s.note_tx(frame(*flows[0]), 3, 3.0)
    assert s.choose_rx(reply(*flows[0]), 3.5)[0] == 3


def test_unknown_flows_spread_and_are_stable() -> None:
    s = Steering(4)
    s.set_pairs(4)
    seen = set()
    for i in range(200):
        f = frame("10.1.0.1", "10.1.0.2", 2000 + i, 443)
        p = s.choose_rx(f, 0.0)[0]
        assert p == s.choose_rx(f, 5.0)[0]
        # symmetric: the reverse direction of an unknown flow lands alike
        assert p == s.choose_rx(reply("10.1.0.1", "10.1.0.2", 2000 + i, 443), 0.0)[0]
        seen.add(p)
    assert seen == {0, 1, 2, 3}
    assert s.choose_rx(ARP, 0.0)[0] == 0


def test_flow_ttl_expiry() -> None:
    s = Steering(8, flow_ttl=10.0)
    s.set_pairs(8)
    fl = ("192.168.1.1", "192.168.1.2", 5555, 22)
    default = s.choose_rx(reply(*fl), 0.0)[0]
    other = (default + 1) % 8
    s.note_tx(frame(*fl), other, 100.0)
    assert s.choose_rx(reply(*fl), 110.0)[0] == other
    assert s.choose_rx(reply(*fl), 110.5)[0] == default
    assert s.stats.flows_expired == 1 and s.flow_count() == 0


def test_flow_table_lru_eviction() -> None:
    s = Steering(4, flow_table_size=3)
    s.set_pairs(4)
    fls = [("10.0.0.1", "10.0.0.2", 100 + i, 80) for i in range(4)]
    for i, fl in enumerate(fls[:3]):
        s.note_tx(frame(*fl), 3, float(i))
    s.note_tx(frame(*fls[0]), 3, 5.0)  # refresh: fls[1] is now least recent
    s.note_tx(frame(*fls[3]), 3, 6.0)
    assert s.flow_count() == 3 and s.stats.flows_evicted == 1
    assert s.choose_rx(reply(*fls[0]), 7.0)[0] == 3
    assert s.choose_rx(reply(*fls[3]), 7.0)[0] == 3
    s.note_tx(ARP, 1, 7.0)  # non-IP frames are not tracked
    assert s.flow_count() == 3


def test_known_flow_on_removed_pair_falls_back() -> None:
    s = Steering(4)
    s.set_pairs(4)
    s.drain_done()
    fl = ("10.0.0.1", "10.0.0.2", 1, 2)
    s.note_tx(frame(*fl), 3, 0.0)
    s.set_pairs(2)
    assert s.choose_rx(reply(*fl), 1.0)[0] < 2


# ---- control state: RSS and hash reporting -------------------------------------------


def test_apply_rss_and_back() -> None:
    st_ = ControlState.new(FEATURES, max_queue_pairs=4)
    s = Steering(4)
    table = [3, 2, 1, 0] * 32
    command(st_, rss_cmd(HASH_TYPE_TCPV4, table, 1, 4))
    s.apply(st_)
    assert s.active_pairs == 4
    f = frame("66.9.149.187", "161.142.100.80", 2794, 1766)
    h = 0x51CCC178
    assert s.choose_rx(f, 0.0) == (table[h & 127], h, net.HASH_REPORT_TCPV4)
    # unclassified (UDP, only TCPv4 enabled) -> unclassified_queue, no report
    u = frame("66.9.149.187", "161.142.100.80", 2794, 1766, proto=17)
    assert s.choose_rx(u, 0.0) == (1, 0, net.HASH_REPORT_NONE)
    assert s.choose_rx(ARP, 0.0) == (1, 0, net.HASH_REPORT_NONE)
    # the guest transmitting on pair 0 does not override RSS
    s.note_tx(reply("66.9.149.187", "161.142.100.80", 2794, 1766), 0, 1.0)
    assert s.choose_rx(f, 1.0)[0] == table[h & 127]
    # VQ_PAIRS_SET came last: automatic steering, hash still reported (RSS config)
    command(st_, pairs_cmd(2))
    s.apply(st_)
    pair, hv, rep = s.choose_rx(f, 2.0)
    assert pair == 0 and (hv, rep) == (h, net.HASH_REPORT_TCPV4)
    assert s.apply(st_) == set()  # same generation: nothing to do


def test_hash_config_reporting_without_rss() -> None:
    st_ = ControlState.new(int(F.CTRL_VQ | F.HASH_REPORT), max_queue_pairs=1)
    hc = struct.pack("<IHHHHB", HASH_TYPE_IPV4, 0, 0, 0, 0, 40) + KEY
    ack, _ = handle_command(
        st_, int(F.CTRL_VQ | F.HASH_REPORT), bytes((4, net.CTRL_MQ_HASH_CONFIG)) + hc, 0.0
    )
    assert ack == net.CTRL_OK
    s = Steering(1)
    s.apply(st_)
    f = frame("66.9.149.187", "161.142.100.80", 2794, 1766)
    assert s.choose_rx(f, 0.0) == (0, 0x323E8FC2, net.HASH_REPORT_IPV4)


# ---- queue-count switches ------------------------------------------------------------


def test_switch_drains_old_tx_queues_first() -> None:
    s = Steering(4)
    assert s.tx_allowed(0) and not s.tx_allowed(1)
    drain = s.begin_switch(4)
    assert drain == {0} and s.switching
    assert s.active_pairs == 4  # receive side switches at once
    assert s.tx_allowed(0) and not s.tx_allowed(1) and not s.tx_allowed(3)
    s.drained(0)
    assert not s.switching and all(s.tx_allowed(p) for p in range(4))
    assert not s.tx_allowed(4)
    # shrink: all four old queues drain, nothing else runs meanwhile
    assert s.begin_switch(2) == {0, 1, 2, 3} and s.active_pairs == 2
    s.drained(2)
    assert not s.tx_allowed(2) and s.tx_allowed(3)
    for p in (0, 1, 3):
        s.drained(p)
    assert s.tx_allowed(1) and not s.tx_allowed(2)
    assert s.begin_switch(2) == set()
    assert s.stats.switches == 2


def test_switch_during_switch_accumulates() -> None:
    s = Steering(8)
    assert s.begin_switch(4) == {0}
    assert s.begin_switch(8) == {0, 1, 2, 3}
    assert s.pending_drain() == {0, 1, 2, 3}
    s.drain_done()
    assert s.tx_pairs == 8 and all(s.tx_allowed(p) for p in range(8))


def test_switch_to_same_target_while_pending_keeps_progress() -> None:
    s = Steering(4)
    s.begin_switch(4)
    s.begin_switch(4)
    assert s.pending_drain() == {0}


def test_apply_rss_tx_count() -> None:
    st_ = ControlState.new(FEATURES, max_queue_pairs=4)
    s = Steering(4)
    command(st_, rss_cmd(HASH_TYPES_ALL, [0, 1, 2, 3], 0, 2))
    assert s.apply(st_) == {0}
    s.drain_done()
    assert s.active_pairs == 4 and s.tx_pairs == 2


def test_bad_parameters() -> None:
    with pytest.raises(ValueError):
        Steering(0)
    with pytest.raises(ValueError):
        Steering(2, flow_table_size=0)
    s = Steering(2)
    with pytest.raises(ValueError):
        s.begin_switch(3)
    with pytest.raises(ValueError):
        s.begin_switch(1, 0)


# ---- properties ----------------------------------------------------------------------

_ops = st.lists(
    st.one_of(
        st.tuples(st.just("pairs"), st.integers(1, 6)),
        st.tuples(st.just("tx"), st.integers(0, 40), st.integers(0, 5)),
        st.tuples(st.just("rx"), st.integers(0, 40), st.binary(max_size=80)),
        st.tuples(st.just("drain"), st.integers(0, 5)),
        st.tuples(
            st.just("rss"),
            st.sampled_from([1, 2, 4, 8]).flatmap(
                lambda n: st.lists(st.integers(0, 5), min_size=n, max_size=n)
            ),
            st.integers(1, 6),
        ),
    ),
    max_size=30,
)


@settings(max_examples=80)
@given(_ops)
def test_chosen_pair_always_below_active(ops: list[tuple[object, ...]]) -> None:
    state = ControlState.new(FEATURES, max_queue_pairs=6)
    s = Steering(6, flow_table_size=8, flow_ttl=5.0)
    now = 0.0
    for op in ops:
        now += 0.5
        kind = op[0]
        if kind == "pairs":
            assert isinstance(op[1], int)
            command(state, pairs_cmd(op[1]))
            s.apply(state)
        elif kind == "rss":
            assert isinstance(op[1], list) and isinstance(op[2], int)
            command(state, rss_cmd(HASH_TYPES_ALL, op[1], 0, op[2]))
            s.apply(state)
        elif kind == "drain":
            assert isinstance(op[1], int)
            s.drained(op[1])
        elif kind == "tx":
            assert isinstance(op[1], int) and isinstance(op[2], int)
            s.note_tx(frame("10.9.0.1", "10.9.0.2", op[1], 80), op[2], now)
        else:
            assert isinstance(op[1], int) and isinstance(op[2], bytes)
            for f in (reply("10.9.0.1", "10.9.0.2", op[1], 80), op[2]):
                pair, h, rep = s.choose_rx(f, now)
                assert 0 <= pair < s.active_pairs <= 6
                assert (h, rep) == rss_hash(f, s.hash_key, s.hash_types)
        assert s.flow_count() <= 8
        assert s.active_pairs == state.curr_queue_pairs
        if s.switching:
            assert not any(s.tx_allowed(p) for p in range(6) if p not in s.pending_drain())
