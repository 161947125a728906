"""Tests for virtnet.ctrl: every control class, validation, RX filtering, properties."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtnet import net
from virtnet.ctrl import ControlState, SteeringMode, accepts, accepts_frame, handle_command
from virtnet.net import CTRL_ERR, CTRL_OK, NetFeature
from virtnet.rss import HASH_TYPE_IPV4, HASH_TYPE_TCPV4, HASH_TYPES_ALL

F = NetFeature
ALL = int(
    F.VERSION_1 | F.CTRL_VQ | F.CTRL_RX | F.CTRL_RX_EXTRA | F.CTRL_VLAN | F.GUEST_ANNOUNCE
    | F.MQ | F.CTRL_MAC_ADDR | F.RSS | F.HASH_REPORT | F.CTRL_GUEST_OFFLOADS | F.NOTF_COAL
    | F.VQ_NOTF_COAL | F.GUEST_CSUM | F.GUEST_TSO4
)  # fmt: skip
MAC = bytes.fromhex("525400abcdef")
KEY = bytes(range(40))


def new(features: int = ALL, pairs: int = 4) -> ControlState:
    return ControlState.new(features, max_queue_pairs=pairs, mac=MAC)


def cmd(cls: int, c: int, data: bytes = b"") -> bytes:
    return bytes((cls, c)) + data


def run(state: ControlState, data: bytes, features: int = ALL) -> tuple[int, bytes]:
    return handle_command(state, features, data, 0.0)


def rss_cmd(
    types: int, table: list[int], unclassified: int = 0, max_tx: int = 1, key: bytes = KEY,
    mask: int | None = None,
) -> bytes:  # fmt: skip
    m = len(table) - 1 if mask is None else mask
    body = struct.pack("<IHH", types, m, unclassified)
    body += struct.pack(f"<{len(table)}H", *table) + struct.pack("<HB", max_tx, len(key)) + key
    return cmd(net.CTRL_MQ, net.CTRL_MQ_RSS_CONFIG, body)


def hash_cmd(types: int, key: bytes = KEY, reserved: int = 0) -> bytes:
    body = struct.pack("<IHHHHB", types, reserved, 0, 0, 0, len(key)) + key
    return cmd(net.CTRL_MQ, net.CTRL_MQ_HASH_CONFIG, body)


def mac_table(uni: list[bytes], multi: list[bytes]) -> bytes:
    body = struct.pack("<I", len(uni)) + b"".join(uni) + struct.pack("<I", len(multi))
    return cmd(net.CTRL_MAC, net.CTRL_MAC_TABLE_SET, body + b"".join(multi))


def assert_err(state: ControlState, data: bytes, features: int = ALL, reason: str = "") -> None:
    before = state.snapshot()
    errs = state.stats.err
    counter = getattr(state.stats, reason) if reason else 0
    assert run(state, data, features) == (CTRL_ERR, b"")
    assert state == before
    assert state.stats.err == errs + 1
    if reason:
        assert getattr(state.stats, reason) == counter + 1


# ---- basics --------------------------------------------------------------------------


def test_new_state_defaults() -> None:
    s = new()
    assert s.promisc and s.curr_queue_pairs == 1 and s.max_queue_pairs == 4
    assert s.vlan_filtering and s.guest_offloads == F.GUEST_CSUM | F.GUEST_TSO4
    assert ControlState.new(F.CTRL_VQ, max_queue_pairs=8).max_queue_pairs == 1
    with pytest.raises(ValueError):
        ControlState.new(ALL, max_queue_pairs=0)
    with pytest.raises(ValueError):
        ControlState.new(ALL, mac=b"\x00")


def test_envelope_errors() -> None:
    s = new()
    assert_err(s, b"", reason="malformed")
    assert_err(s, b"\x00", reason="malformed")
    assert_err(s, cmd(99, 0), reason="unsupported")
    assert_err(s, cmd(net.CTRL_STATS, net.CTRL_STATS_QUERY), reason="unsupported")
    assert_err(s, cmd(net.CTRL_RX, 0, b"\x01"), features=ALL & ~F.CTRL_VQ, reason="not_negotiated")
    assert_err(s, cmd(net.CTRL_MAC, 0, b"\x00" * 70000), reason="malformed")
    assert s.stats.ok == 0


def test_memoryview_input() -> None:
    s = new()
    ack, _ = handle_command(s, ALL, memoryview(cmd(net.CTRL_RX, 0, b"\x00")), 1.5)
    assert ack == CTRL_OK and not s.promisc


# ---- RX modes ------------------------------------------------------------------------

RX_FIELDS = ["promisc", "allmulti", "alluni", "nomulti", "nouni", "nobcast"]


@pytest.mark.parametrize(("c", "name"), list(enumerate(RX_FIELDS)))
def test_rx_modes(c: int, name: str) -> None:
    s = new()
    for on in (1, 0, 1):
        assert run(s, cmd(net.CTRL_RX, c, bytes([on]))) == (CTRL_OK, b"")
        assert getattr(s, name) is bool(on)
    assert_err(s, cmd(net.CTRL_RX, c, b"\x02"), reason="malformed")
    assert_err(s, cmd(net.CTRL_RX, c, b""), reason="malformed")
    assert_err(s, cmd(net.CTRL_RX, c, b"\x01\x00"), reason="malformed")
    need = F.CTRL_RX if c < 2 else F.CTRL_RX_EXTRA
    assert_err(s, cmd(net.CTRL_RX, c, b"\x01"), features=ALL & ~need, reason="not_negotiated")


def test_rx_unknown_command() -> None:
    assert_err(new(), cmd(net.CTRL_RX, 6, b"\x01"), reason="unsupported")


# ---- MAC -----------------------------------------------------------------------------

U1, U2 = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")
M1 = bytes.fromhex("01005e000001")


def test_mac_table_set() -> None:
    s = new()
    assert run(s, mac_table([U1, U2], [M1]))[0] == CTRL_OK
    assert s.uni_macs == {U1, U2} and s.multi_macs == {M1}
    assert run(s, mac_table([], []))[0] == CTRL_OK
    assert s.uni_macs == frozenset() and s.multi_macs == frozenset()


def test_mac_table_errors() -> None:
    s = new()
    good = mac_table([U1], [M1])
    assert_err(s, good[:-1], reason="malformed")
    assert_err(s, good + b"\x00", reason="malformed")
    assert_err(s, good[:8], reason="malformed")
    assert_err(s, mac_table([M1], []), reason="out_of_range")
    assert_err(s, mac_table([], [U1]), reason="out_of_range")
    huge = cmd(net.CTRL_MAC, 0, struct.pack("<I", 0xFFFFFFFF) + U1)
    assert_err(s, huge, reason="malformed")
    assert_err(s, good, features=ALL & ~F.CTRL_RX, reason="not_negotiated")
    assert_err(s, cmd(net.CTRL_MAC, 2, U1), reason="unsupported")


def test_mac_table_overflow_switches_to_all() -> None:
    s = new()
    many = [bytes([2, 0, 0, 0, i >> 8, i & 0xFF]) for i in range(100)]
    assert run(s, mac_table(many, [M1]))[0] == CTRL_OK
    assert s.uni_overflow and not s.multi_overflow and s.stats.mac_overflow == 1
    s.promisc = False
    assert accepts(s, bytes.fromhex("02ffffffffff"), None)


def test_mac_addr_set() -> None:
    s = new()
    assert run(s, cmd(net.CTRL_MAC, net.CTRL_MAC_ADDR_SET, U1))[0] == CTRL_OK
    assert s.mac == U1
    assert_err(s, cmd(net.CTRL_MAC, net.CTRL_MAC_ADDR_SET, M1), reason="out_of_range")
    assert_err(s, cmd(net.CTRL_MAC, net.CTRL_MAC_ADDR_SET, bytes(6)), reason="out_of_range")
    assert_err(s, cmd(net.CTRL_MAC, net.CTRL_MAC_ADDR_SET, U1[:5]), reason="malformed")
    assert_err(
        s, cmd(net.CTRL_MAC, net.CTRL_MAC_ADDR_SET, U2), ALL & ~F.CTRL_MAC_ADDR, "not_negotiated"
    )


# ---- VLAN / announce / offloads ------------------------------------------------------


def test_vlan() -> None:
    s = new()
    for vid in (0, 5, 4095):
        assert run(s, cmd(net.CTRL_VLAN, net.CTRL_VLAN_ADD, struct.pack("<H", vid)))[0] == 0
    assert s.vlans == {0, 5, 4095}
    assert run(s, cmd(net.CTRL_VLAN, net.CTRL_VLAN_DEL, struct.pack("<H", 5)))[0] == 0
    assert run(s, cmd(net.CTRL_VLAN, net.CTRL_VLAN_DEL, struct.pack("<H", 6)))[0] == 0
    assert s.vlans == {0, 4095}
    assert_err(s, cmd(net.CTRL_VLAN, 0, struct.pack("<H", 4096)), reason="out_of_range")
    assert_err(s, cmd(net.CTRL_VLAN, 0, b"\x01"), reason="malformed")
    assert_err(s, cmd(net.CTRL_VLAN, 2, b"\x01\x00"), reason="unsupported")
    assert_err(s, cmd(net.CTRL_VLAN, 0, b"\x01\x00"), ALL & ~F.CTRL_VLAN, "not_negotiated")


def test_announce_ack() -> None:
    s = new()
    s.announce_pending = True
    assert run(s, cmd(net.CTRL_ANNOUNCE, net.CTRL_ANNOUNCE_ACK))[0] == CTRL_OK
    assert not s.announce_pending
    s.announce_pending = True
    assert_err(s, cmd(net.CTRL_ANNOUNCE, 0, b"\x00"), reason="malformed")
    assert_err(s, cmd(net.CTRL_ANNOUNCE, 1), reason="unsupported")
    assert_err(s, cmd(net.CTRL_ANNOUNCE, 0), ALL & ~F.GUEST_ANNOUNCE, "not_negotiated")


def test_guest_offloads() -> None:
    s = new()
    assert run(s, cmd(net.CTRL_GUEST_OFFLOADS, 0, struct.pack("<Q", F.GUEST_CSUM)))[0] == 0
    assert s.guest_offloads == F.GUEST_CSUM
    assert run(s, cmd(net.CTRL_GUEST_OFFLOADS, 0, struct.pack("<Q", 0)))[0] == 0
    assert_err(s, cmd(5, 0, struct.pack("<Q", F.GUEST_TSO6)), reason="out_of_range")
    assert_err(s, cmd(5, 0, struct.pack("<Q", F.MQ)), reason="out_of_range")
    assert_err(s, cmd(5, 0, b"\x00" * 4), reason="malformed")
    assert_err(s, cmd(5, 1, b"\x00" * 8), reason="unsupported")
    assert_err(s, cmd(5, 0, b"\x00" * 8), ALL & ~F.CTRL_GUEST_OFFLOADS, "not_negotiated")


# ---- multiqueue ----------------------------------------------------------------------


def pairs_cmd(n: int) -> bytes:
    return cmd(net.CTRL_MQ, net.CTRL_MQ_VQ_PAIRS_SET, struct.pack("<H", n))


def test_vq_pairs_set() -> None:
    s = new()
    g = s.steering_generation
    assert run(s, pairs_cmd(4))[0] == CTRL_OK
    assert s.curr_queue_pairs == 4 and s.steering_mode is SteeringMode.AUTO
    assert s.steering_generation == g + 1
    assert run(s, pairs_cmd(1))[0] == CTRL_OK and s.curr_queue_pairs == 1
    assert_err(s, pairs_cmd(0), reason="out_of_range")
    assert_err(s, pairs_cmd(5), reason="out_of_range")
    assert_err(s, pairs_cmd(0x8001), reason="out_of_range")
    assert_err(s, pairs_cmd(2)[:-1], reason="malformed")
    assert_err(s, pairs_cmd(2), ALL & ~F.MQ, "not_negotiated")
    assert_err(s, cmd(net.CTRL_MQ, 9), reason="unsupported")


def mode(s: ControlState) -> SteeringMode:
    return s.steering_mode


def test_rss_config_accepted() -> None:
    s = new()
    table = [0, 1, 2, 3] * 32
    assert run(s, rss_cmd(HASH_TYPE_TCPV4 | HASH_TYPE_IPV4, table, 1, 4))[0] == CTRL_OK
    assert s.steering_mode is SteeringMode.RSS and s.rss is not None
    assert s.rss.indirection_table == table and s.rss.unclassified_queue == 1
    assert s.rss.key == KEY and s.rss.max_tx_vq == 4
    assert s.curr_queue_pairs == 4 and s.hash_types == HASH_TYPE_TCPV4 | HASH_TYPE_IPV4
    # last of VQ_PAIRS_SET / RSS_CONFIG wins
    assert run(s, pairs_cmd(2))[0] == CTRL_OK
    assert mode(s) is SteeringMode.AUTO and s.curr_queue_pairs == 2
    assert run(s, rss_cmd(HASH_TYPE_IPV4, [0], 0, 1, b""))[0] == CTRL_OK
    assert mode(s) is SteeringMode.RSS and s.curr_queue_pairs == 1


def test_rss_config_active_pairs_cover_table() -> None:
    s = new()
    assert run(s, rss_cmd(HASH_TYPE_IPV4, [0, 3], 0, 1))[0] == CTRL_OK
    assert s.curr_queue_pairs == 4


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (rss_cmd(1, [0, 1, 2]), "out_of_range"),  # not a power of two
        (rss_cmd(1, [0] * 256), "out_of_range"),  # > rss_max_indirection_table_length
        (rss_cmd(1, [0, 4]), "out_of_range"),  # queue >= max pairs
        (rss_cmd(1, [0, 1], unclassified=4), "out_of_range"),
        (rss_cmd(1, [0, 0x8001]), "malformed"),  # reserved bit
        (rss_cmd(1, [0, 1], max_tx=0), "out_of_range"),
        (rss_cmd(1, [0, 1], max_tx=5), "out_of_range"),
        (rss_cmd(1, [0, 1], key=bytes(41)), "out_of_range"),
        (rss_cmd(1 << 9, [0, 1]), "out_of_range"),  # unsupported hash type
        (rss_cmd(1, [0, 1])[:-1], "malformed"),
        (rss_cmd(1, [0, 1]) + b"\x00", "malformed"),
        (rss_cmd(1, [0, 1], mask=3), "malformed"),  # table shorter than mask says
        (rss_cmd(1, [0, 1])[:9], "malformed"),
        (rss_cmd(1, [0, 1], mask=0xFFFF), "malformed"),
    ],
)
def test_rss_config_rejected(data: bytes, reason: str) -> None:
    assert_err(new(), data, reason=reason)


def test_rss_not_negotiated_and_limits() -> None:
    assert_err(new(), rss_cmd(1, [0]), ALL & ~F.RSS, "not_negotiated")
    s = ControlState.new(ALL, max_queue_pairs=2, supported_hash_types=HASH_TYPE_IPV4)
    assert_err(s, rss_cmd(HASH_TYPE_TCPV4, [0, 1]), reason="out_of_range")


def test_hash_config() -> None:
    s = new()
    assert run(s, hash_cmd(HASH_TYPES_ALL))[0] == CTRL_OK
    assert s.hash_types == HASH_TYPES_ALL and s.hash_key == KEY
    assert s.steering_mode is SteeringMode.AUTO and s.rss is None
    # nonzero reserved fields (older Linux put max_tx_vq there): accepted, counted
    assert run(s, hash_cmd(HASH_TYPE_IPV4, reserved=4))[0] == CTRL_OK
    assert s.hash_types == HASH_TYPE_IPV4 and s.stats.reserved_ignored == 1
    assert_err(s, hash_cmd(1, key=bytes(41)), reason="out_of_range")
    assert_err(s, hash_cmd(1 << 12), reason="out_of_range")
    assert_err(s, hash_cmd(1)[:-1], reason="malformed")
    assert_err(s, hash_cmd(1)[:10], reason="malformed")
    assert_err(s, hash_cmd(1), ALL & ~F.HASH_REPORT, "not_negotiated")


# ---- notification coalescing ---------------------------------------------------------


def coal(c: int, *fields: int, fmt: str = "<II") -> bytes:
    return cmd(net.CTRL_NOTF_COAL, c, struct.pack(fmt, *fields))


def vq_get(s: ControlState, vq: int) -> tuple[int, int]:
    ack, reply = run(s, coal(net.CTRL_NOTF_COAL_VQ_GET, vq, 0, fmt="<HH"))
    assert ack == CTRL_OK and len(reply) == 8
    got: tuple[int, int] = struct.unpack("<II", reply)
    return got


def test_coalescing_spec_example() -> None:
    s = new(pairs=2)
    assert vq_get(s, 0) == (0, 0)
    assert run(s, coal(net.CTRL_NOTF_COAL_RX_SET, 15, 10))[0] == CTRL_OK
    assert vq_get(s, 0) == vq_get(s, 2) == (15, 10) and vq_get(s, 1) == (0, 0)
    assert run(s, coal(net.CTRL_NOTF_COAL_VQ_SET, 0, 0, 3, 4, fmt="<HHII"))[0] == CTRL_OK
    assert vq_get(s, 0) == (3, 4) and vq_get(s, 2) == (15, 10)
    assert run(s, coal(net.CTRL_NOTF_COAL_VQ_SET, 1, 0xFFFF, 5, 6, fmt="<HHII"))[0] == 0
    assert vq_get(s, 1) == (5, 6)
    assert run(s, coal(net.CTRL_NOTF_COAL_TX_SET, 7, 8))[0] == CTRL_OK
    assert vq_get(s, 1) == vq_get(s, 3) == (7, 8)
    assert vq_get(s, 0) == (3, 4)  # RX per-vq setting survives TX_SET
    assert s.coalescing(3) == (7, 8) and s.tx_coal == (7, 8)


def test_coalescing_errors() -> None:
    s = new(pairs=2)
    assert_err(s, coal(net.CTRL_NOTF_COAL_VQ_GET, 4, 0, fmt="<HH"), reason="out_of_range")
    assert_err(s, coal(net.CTRL_NOTF_COAL_VQ_SET, 4, 0, 1, 1, fmt="<HHII"), reason="out_of_range")
    assert_err(s, coal(net.CTRL_NOTF_COAL_VQ_GET, 0, fmt="<H"), reason="malformed")
    assert_err(s, coal(net.CTRL_NOTF_COAL_TX_SET, 1, fmt="<I"), reason="malformed")
    assert_err(s, coal(net.CTRL_NOTF_COAL_RX_SET, 1, 1), ALL & ~F.NOTF_COAL, "not_negotiated")
    assert_err(
        s, coal(net.CTRL_NOTF_COAL_VQ_GET, 0, 0, fmt="<HH"), ALL & ~F.VQ_NOTF_COAL, "not_negotiated"
    )
    assert_err(s, coal(4, 1, 1), reason="unsupported")


# ---- RX filtering --------------------------------------------------------------------

BCAST = b"\xff" * 6
OTHER = bytes.fromhex("020000000099")
M2 = bytes.fromhex("333300000001")


def filtered() -> ControlState:
    s = new()
    assert run(s, cmd(net.CTRL_RX, net.CTRL_RX_PROMISC, b"\x00"))[0] == CTRL_OK
    assert run(s, mac_table([U1], [M1]))[0] == CTRL_OK
    return s


def test_accepts_basic_filter() -> None:
    s = filtered()
    assert accepts(s, MAC, None) and accepts(s, U1, None) and not accepts(s, OTHER, None)
    assert accepts(s, M1, None) and not accepts(s, M2, None)
    assert accepts(s, BCAST, None)
    assert not accepts(s, b"\x02", None)


def test_accepts_modes() -> None:
    s = filtered()
    s.allmulti = True
    assert accepts(s, M2, None)
    s.nomulti = True
    assert not accepts(s, M2, None) and not accepts(s, M1, None)
    assert accepts(s, BCAST, None)  # NOMULTI does not apply to broadcast
    s.nobcast = True
    assert not accepts(s, BCAST, None)
    s.alluni = True
    assert accepts(s, OTHER, None)
    s.nouni = True
    assert not accepts(s, OTHER, None) and not accepts(s, MAC, None)
    s.promisc = True  # promisc wins over everything
    assert all(accepts(s, m, 7) for m in (OTHER, MAC, M2, BCAST))


def test_accepts_vlan() -> None:
    s = filtered()
    assert not accepts(s, MAC, 10)
    assert accepts(s, MAC, None)  # the VLAN table applies to tagged frames only
    assert run(s, cmd(net.CTRL_VLAN, net.CTRL_VLAN_ADD, struct.pack("<H", 10)))[0] == CTRL_OK
    assert accepts(s, MAC, 10) and not accepts(s, MAC, 11)
    nofilter = ControlState.new(ALL & ~F.CTRL_VLAN, mac=MAC)
    nofilter.promisc = False
    assert accepts(nofilter, MAC, 11)


def test_accepts_frame() -> None:
    s = filtered()
    frame = MAC + OTHER + b"\x81\x00\x00\x0a\x08\x00" + bytes(40)
    assert not accepts_frame(s, frame)
    assert run(s, cmd(net.CTRL_VLAN, net.CTRL_VLAN_ADD, struct.pack("<H", 10)))[0] == CTRL_OK
    assert accepts_frame(s, frame)
    assert accepts_frame(s, MAC + OTHER + b"\x08\x00")
    assert not accepts_frame(s, MAC)


# ---- properties ----------------------------------------------------------------------

_valid_cmds = st.one_of(
    st.builds(lambda c, on: cmd(net.CTRL_RX, c, bytes([on])), st.integers(0, 5), st.integers(0, 1)),
    st.builds(pairs_cmd, st.integers(1, 4)),
    st.builds(
        rss_cmd,
        st.integers(0, HASH_TYPES_ALL),
        st.sampled_from([1, 2, 4, 8, 128]).flatmap(
            lambda n: st.lists(st.integers(0, 3), min_size=n, max_size=n)
        ),
        st.integers(0, 3),
        st.integers(1, 4),
    ),
    st.builds(hash_cmd, st.integers(0, HASH_TYPES_ALL)),
    st.builds(
        lambda c, v: cmd(net.CTRL_VLAN, c, struct.pack("<H", v)),
        st.integers(0, 1),
        st.integers(0, 4095),
    ),
    st.builds(
        lambda vq, p, u: coal(net.CTRL_NOTF_COAL_VQ_SET, vq, 0, p, u, fmt="<HHII"),
        st.integers(0, 7),
        st.integers(0, 2**32 - 1),
        st.integers(0, 2**32 - 1),
    ),
)


def _mutate(data: bytes, where: int, byte: int, cut: int) -> bytes:
    out = bytearray(data)
    if out:
        out[where % len(out)] = byte
    return bytes(out[: len(out) - cut]) if cut else bytes(out)


@settings(max_examples=100)
@given(
    st.lists(
        st.one_of(
            _valid_cmds,
            st.builds(_mutate, _valid_cmds, st.integers(0, 600), st.integers(0, 255),
                      st.integers(0, 3)),
            st.binary(max_size=64),
        ),
        max_size=12,
    ),
    st.integers(0, (1 << 64) - 1),
)  # fmt: skip
def test_never_raises_and_err_leaves_state(cmds: list[bytes], features: int) -> None:
    for feats in (ALL, features):
        s = new()
        for data in cmds:
            before = s.snapshot()
            ok, err = s.stats.ok, s.stats.err
            ack, reply = handle_command(s, feats, data, 0.0)
            assert ack in (CTRL_OK, CTRL_ERR)
            if ack == CTRL_ERR:
                assert s == before and reply == b"" and s.stats.err == err + 1
            else:
                assert s.stats.ok == ok + 1
            assert 1 <= s.curr_queue_pairs <= s.max_queue_pairs
            if s.steering_mode is SteeringMode.RSS:
                assert s.rss is not None
                assert s.rss.max_queue() < s.curr_queue_pairs


@given(_valid_cmds)
def test_valid_commands_accepted(data: bytes) -> None:
    assert run(new(), data)[0] == CTRL_OK
