"""Tests for virtnet.net: feature bits, negotiation, headers, config space, queue map."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virtnet import net
from virtnet.errors import PeerError
from virtnet.net import NetConfig, NetFeature, NetHdr

F = NetFeature

SPEC_BITS = {
    "CSUM": 0, "GUEST_CSUM": 1, "CTRL_GUEST_OFFLOADS": 2, "MTU": 3, "MAC": 5, "GSO": 6,
    "GUEST_TSO4": 7, "GUEST_TSO6": 8, "GUEST_ECN": 9, "GUEST_UFO": 10, "HOST_TSO4": 11,
    "HOST_TSO6": 12, "HOST_ECN": 13, "HOST_UFO": 14, "MRG_RXBUF": 15, "STATUS": 16,
    "CTRL_VQ": 17, "CTRL_RX": 18, "CTRL_VLAN": 19, "CTRL_RX_EXTRA": 20, "GUEST_ANNOUNCE": 21,
    "MQ": 22, "CTRL_MAC_ADDR": 23, "NOTIFY_ON_EMPTY": 24, "ANY_LAYOUT": 27,
    "INDIRECT_DESC": 28, "EVENT_IDX": 29, "VERSION_1": 32, "ACCESS_PLATFORM": 33,
    "RING_PACKED": 34, "IN_ORDER": 35, "ORDER_PLATFORM": 36, "SR_IOV": 37,
    "NOTIFICATION_DATA": 38, "NOTIF_CONFIG_DATA": 39, "RING_RESET": 40, "ADMIN_VQ": 41,
    "DEVICE_STATS": 50, "HASH_TUNNEL": 51, "VQ_NOTF_COAL": 52, "NOTF_COAL": 53,
    "GUEST_USO4": 54, "GUEST_USO6": 55, "HOST_USO": 56, "HASH_REPORT": 57,
    "GUEST_HDRLEN": 59, "RSS": 60, "RSC_EXT": 61, "STANDBY": 62, "SPEED_DUPLEX": 63,
}  # fmt: skip


def test_feature_bits_match_spec() -> None:
    assert {f.name: f.value.bit_length() - 1 for f in NetFeature} == SPEC_BITS
    assert net.VHOST_USER_F_PROTOCOL_FEATURES == 30


def test_negotiate_intersects_and_drops_unmet() -> None:
    offered = F.VERSION_1 | F.MQ | F.CTRL_VQ | F.GUEST_TSO4 | F.GUEST_CSUM | F.MRG_RXBUF
    assert net.negotiate(offered, offered) == offered
    # driver does not want CTRL_VQ: MQ goes too
    got = net.negotiate(offered, offered & ~F.CTRL_VQ)
    assert not got & F.MQ and not got & F.CTRL_VQ
    # GUEST_CSUM missing -> TSO4 dropped -> ECN (needing TSO4|TSO6) dropped too
    got = net.negotiate(offered | F.GUEST_ECN, F.GUEST_TSO4 | F.GUEST_ECN)
    assert got == 0


def test_negotiate_soft_requirements() -> None:
    assert net.negotiate(F.HASH_REPORT, F.HASH_REPORT) == 0
    both = F.HASH_REPORT | F.CTRL_VQ
    assert net.negotiate(both, both) == both
    # unknown/transport bits pass through
    bit30 = 1 << net.VHOST_USER_F_PROTOCOL_FEATURES
    assert net.negotiate(bit30 | F.VERSION_1, bit30) == bit30


@pytest.mark.parametrize(
    ("features", "ok"),
    [
        (F.MQ, False),
        (F.MQ | F.CTRL_VQ, True),
        (F.RSS, False),
        (F.CTRL_RX | F.CTRL_VQ, True),
        (F.CTRL_RX, False),
        (F.GUEST_TSO4, False),
        (F.GUEST_TSO4 | F.GUEST_CSUM, True),
        (F.GUEST_ECN | F.GUEST_CSUM, False),
        (F.GUEST_ECN | F.GUEST_CSUM | F.GUEST_TSO6, True),
        (F.HOST_ECN | F.CSUM | F.HOST_TSO4, True),
        (F.RSC_EXT | F.CSUM, False),
        (F.HASH_TUNNEL | F.CTRL_VQ, False),
        (F.HASH_TUNNEL | F.CTRL_VQ | F.HASH_REPORT, True),
        (F.HOST_USO, False),
        (0, True),
    ],
)
def test_validate_features(features: int, ok: bool) -> None:
    if ok:
        net.validate_features(features)
    else:
        with pytest.raises(net.FeatureError) as exc:
            net.validate_features(features)
        assert isinstance(exc.value, PeerError)


@given(st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 64) - 1))
def test_negotiate_is_consistent_subset(offered: int, wanted: int) -> None:
    got = net.negotiate(offered, wanted)
    assert got & ~(offered & wanted) == 0
    net.validate_features(got)
    assert net.negotiate(got, got) == got


def test_hdr_len() -> None:
    assert net.hdr_len(0) == 10
    assert net.hdr_len(F.MRG_RXBUF) == 12
    assert net.hdr_len(F.VERSION_1) == 12
    assert net.hdr_len(F.VERSION_1 | F.HASH_REPORT) == 20


def test_hdr_known_bytes() -> None:
    h = NetHdr(net.HDR_F_NEEDS_CSUM, net.HDR_GSO_TCPV4 | net.HDR_GSO_ECN, 54, 1448, 34, 16, 3)
    raw = h.pack(12)
    assert raw == bytes([1, 0x81]) + struct.pack("<HHHHH", 54, 1448, 34, 16, 3)
    assert NetHdr.unpack_from(raw, 0, 12) == h
    legacy = h.pack(10)
    assert legacy == raw[:10]
    back = NetHdr.unpack_from(legacy, 0, 10)
    assert back.num_buffers == 1 and back.csum_offset == 16
    h.hash_value, h.hash_report = 0xDEADBEEF, net.HASH_REPORT_TCPV6
    raw20 = h.pack(20)
    assert raw20[12:] == struct.pack("<IHH", 0xDEADBEEF, 5, 0)
    assert NetHdr.unpack_from(b"xx" + raw20, 2, 20) == h


def test_hdr_bad_size() -> None:
    with pytest.raises(ValueError):
        NetHdr.unpack_from(bytes(32), 0, 11)
    with pytest.raises(ValueError):
        NetHdr().pack(16)


_U16 = st.integers(0, 0xFFFF)


@given(
    st.tuples(
        st.integers(0, 255), st.integers(0, 255), _U16, _U16, _U16, _U16, _U16,
        st.integers(0, 0xFFFFFFFF), _U16,
    )
)  # fmt: skip
def test_hdr_roundtrip(fields: tuple[int, ...]) -> None:
    h = NetHdr(*fields)
    buf = bytearray(24)
    h.pack_into(buf, 4, 20)
    assert NetHdr.unpack_from(buf, 4, 20) == h


def test_config_layout() -> None:
    c = NetConfig(
        mac=bytes.fromhex("525400123456"), status=net.STATUS_LINK_UP | net.STATUS_ANNOUNCE,
        max_virtqueue_pairs=8, mtu=9000, speed=10000, duplex=net.DUPLEX_FULL,
        rss_max_key_size=40, rss_max_indirection_table_length=128, supported_hash_types=0x1FF,
    )  # fmt: skip
    raw = c.pack()
    assert len(raw) == net.CONFIG_SIZE == 28
    assert raw[:6] == bytes.fromhex("525400123456")
    assert struct.unpack_from("<HHH", raw, 6) == (3, 8, 9000)
    assert struct.unpack_from("<I", raw, 12) == (10000,)
    assert raw[16] == 1 and raw[17] == 40
    assert struct.unpack_from("<HI", raw, 18) == (128, 0x1FF)
    assert NetConfig.unpack(raw) == c
    assert raw[24:] == bytes(4)  # supported_tunnel_types
    assert NetConfig.unpack(raw + b"\xff" * 4) == c
    short = NetConfig.unpack(raw[:10])
    assert short.mac == c.mac and short.max_virtqueue_pairs == 8 and short.mtu == 0


def test_queue_map() -> None:
    assert [net.rx_index(p) for p in range(3)] == [0, 2, 4]
    assert [net.tx_index(p) for p in range(3)] == [1, 3, 5]
    assert net.ctrl_index(4) == 8
    assert net.ctrl_index(1) == 2
    assert all(net.pair_of(net.rx_index(p)) == p == net.pair_of(net.tx_index(p)) for p in range(9))
    assert net.num_queue_pairs(F.MQ, 8) == 8
    assert net.num_queue_pairs(F.RSS, 8) == 8
    assert net.num_queue_pairs(F.CTRL_VQ, 8) == 1


def test_ctrl_constants() -> None:
    assert (net.CTRL_RX, net.CTRL_MAC, net.CTRL_VLAN, net.CTRL_ANNOUNCE) == (0, 1, 2, 3)
    assert (net.CTRL_MQ, net.CTRL_GUEST_OFFLOADS, net.CTRL_NOTF_COAL) == (4, 5, 6)
    assert (net.CTRL_MQ_VQ_PAIRS_MIN, net.CTRL_MQ_VQ_PAIRS_MAX) == (1, 0x8000)
    assert (net.CTRL_OK, net.CTRL_ERR) == (0, 1)
    assert net.CTRL_NOTF_COAL_VQ_GET == 3 and net.CTRL_RX_NOBCAST == 5


def test_config_size() -> None:
    assert net.config_size(0) == 6
    assert net.config_size(F.STATUS) == 8
    assert net.config_size(F.MQ | F.STATUS) == 10
    assert net.config_size(F.MTU) == 12
    assert net.config_size(F.SPEED_DUPLEX | F.MQ) == 17
    assert net.config_size(F.RSS) == net.config_size(F.HASH_REPORT) == 24
    assert net.config_size(F.HASH_TUNNEL | F.MAC) == 28
