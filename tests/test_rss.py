"""Tests for virtnet.rss: Toeplitz (Microsoft vectors), hash selection, parsing, RssConfig."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virtnet import net, rss
from virtnet.rss import RssConfig, rss_hash, toeplitz_hash

MS_KEY = bytes.fromhex(
    "6d5a56da255b0ec24167253d43a38fb0d0ca2bcbae7b30b477cb2da38030f20c6a42b73bbeac01fa"
)

# "Verifying the RSS Hash Calculation" (Microsoft): destination, source,
# hash over IP addresses only, hash over addresses + TCP ports.
IPV4_VECTORS = [
    ("161.142.100.80", 1766, "66.9.149.187", 2794, 0x323E8FC2, 0x51CCC178),
    ("65.69.140.83", 4739, "199.92.111.2", 14230, 0xD718262A, 0xC626B0EA),
    ("12.22.207.184", 38024, "24.19.198.95", 12898, 0xD2D0A5DE, 0x5C2B394A),
    ("209.142.163.6", 2217, "38.27.205.30", 48228, 0x82989176, 0xAFC7327F),
    ("202.188.127.2", 1303, "153.39.163.191", 44251, 0x5D1809C5, 0x10E828A2),
]
IPV6_VECTORS = [
    ("3ffe:2501:200:3::1", 1766, "3ffe:2501:200:1fff::7", 2794, 0x2CC18CD5, 0x40207D3D),
    ("ff02::1", 4739, "3ffe:501:8::260:97ff:fe40:efab", 14230, 0x0F0C461C, 0xDDE51BBF),
    (
        "fe80::200:f8ff:fe21:67cf", 38024, "3ffe:1900:4545:3:200:f8ff:fe21:67cf", 44251,
        0x4B61E985, 0x02D1FEEF,
    ),
]  # fmt: skip
ALL_VECTORS = IPV4_VECTORS + IPV6_VECTORS


def ip(a: str) -> bytes:
    return ipaddress.ip_address(a).packed


# ---- frame builders ------------------------------------------------------------------

DST_MAC = bytes.fromhex("525400000001")
SRC_MAC = bytes.fromhex("525400000002")


def eth(payload: bytes, ethertype: int, vlan: int | None = None) -> bytes:
    tag = b"" if vlan is None else struct.pack("!HH", 0x8100, vlan)
    return DST_MAC + SRC_MAC + tag + struct.pack("!H", ethertype) + payload


def tcp(sport: int, dport: int) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 0x50, 0x02, 1024, 0, 0)


def udp(sport: int, dport: int, payload: bytes = b"hi") -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def ipv4(src: str, dst: str, proto: int, l4: bytes, frag: int = 0, options: bytes = b"") -> bytes:
    ihl = 5 + len(options) // 4
    hdr = struct.pack(
        "!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + len(l4), 1, frag, 64, proto, 0, ip(src), ip(dst)
    )
    return eth(hdr + options + l4, 0x0800)


def ipv6(src: str, dst: str, nh: int, payload: bytes, vlan: int | None = None) -> bytes:
    hdr = struct.pack("!IHBB16s16s", 0x60000000, len(payload), nh, 64, ip(src), ip(dst))
    return eth(hdr + payload, 0x86DD, vlan)


# ---- Toeplitz ------------------------------------------------------------------------


@pytest.mark.parametrize(("dst", "dport", "src", "sport", "h_ip", "h_tcp"), ALL_VECTORS)
def test_microsoft_vectors(
    dst: str, dport: int, src: str, sport: int, h_ip: int, h_tcp: int
) -> None:
    addrs = ip(src) + ip(dst)
    ports = struct.pack("!HH", sport, dport)
    assert toeplitz_hash(MS_KEY, addrs) == h_ip
    assert toeplitz_hash(MS_KEY, addrs + ports) == h_tcp
    assert rss._slow_toeplitz(MS_KEY, addrs + ports) == h_tcp


@pytest.mark.parametrize(("dst", "dport", "src", "sport", "h_ip", "h_tcp"), IPV4_VECTORS)
def test_microsoft_vectors_ipv4_frames(
    dst: str, dport: int, src: str, sport: int, h_ip: int, h_tcp: int
) -> None:
    f = ipv4(src, dst, 6, tcp(sport, dport))
    assert rss_hash(f, MS_KEY, rss.HASH_TYPES_ALL) == (h_tcp, net.HASH_REPORT_TCPV4)
    assert rss_hash(f, MS_KEY, rss.HASH_TYPE_IPV4) == (h_ip, net.HASH_REPORT_IPV4)
    assert rss_hash(f, MS_KEY, rss.HASH_TYPE_UDPV4) == (0, net.HASH_REPORT_NONE)
    u = ipv4(src, dst, 17, udp(sport, dport))
    assert rss_hash(u, MS_KEY, rss.HASH_TYPE_UDPV4) == (h_tcp, net.HASH_REPORT_UDPV4)
    assert rss_hash(u, MS_KEY, rss.HASH_TYPE_TCPV4 | rss.HASH_TYPE_IPV4) == (
        h_ip,
        net.HASH_REPORT_IPV4,
    )


@pytest.mark.parametrize(("dst", "dport", "src", "sport", "h_ip", "h_tcp"), IPV6_VECTORS)
def test_microsoft_vectors_ipv6_frames(
    dst: str, dport: int, src: str, sport: int, h_ip: int, h_tcp: int
) -> None:
    f = ipv6(src, dst, 6, tcp(sport, dport), vlan=7)
    assert rss_hash(f, MS_KEY, rss.HASH_TYPES_ALL) == (h_tcp, net.HASH_REPORT_TCPV6)
    assert rss_hash(f, MS_KEY, rss.HASH_TYPE_IPV6) == (h_ip, net.HASH_REPORT_IPV6)
    # EX types do not apply to packets without extension headers
    assert rss_hash(f, MS_KEY, rss.HASH_TYPE_TCP_EX) == (0, net.HASH_REPORT_NONE)
    u = ipv6(src, dst, 17, udp(sport, dport))
    assert rss_hash(u, MS_KEY, rss.HASH_TYPE_UDPV6) == (h_tcp, net.HASH_REPORT_UDPV6)


@given(st.binary(max_size=40), st.binary(max_size=48))
def test_table_path_matches_bitwise(key: bytes, data: bytes) -> None:
    assert toeplitz_hash(key, data) == rss._slow_toeplitz(key, data)
    assert 0 <= toeplitz_hash(key, data) <= 0xFFFFFFFF


@given(st.binary(max_size=40), st.binary(max_size=36), st.binary(max_size=36))
def test_toeplitz_is_linear(key: bytes, a: bytes, b: bytes) -> None:
    n = max(len(a), len(b))
    a, b = a.ljust(n, b"\0"), b.ljust(n, b"\0")
    x = bytes(i ^ j for i, j in zip(a, b, strict=True))
    assert toeplitz_hash(key, x) == toeplitz_hash(key, a) ^ toeplitz_hash(key, b)


def test_key_cache_bounded() -> None:
    for i in range(rss.MAX_CACHED_KEYS * 2):
        toeplitz_hash(bytes([i]) * 40, b"\x01\x02")
    assert len(rss._cache) <= rss.MAX_CACHED_KEYS


# ---- hash selection corner cases -----------------------------------------------------


def test_ipv4_fragments_hash_addresses_only() -> None:
    first = ipv4("10.0.0.1", "10.0.0.2", 6, tcp(1, 2), frag=0x2000)  # MF set
    later = ipv4("10.0.0.1", "10.0.0.2", 6, b"x" * 20, frag=0x0010)
    h_ip = toeplitz_hash(MS_KEY, ip("10.0.0.1") + ip("10.0.0.2"))
    for f in (first, later):
        assert rss_hash(f, MS_KEY, rss.HASH_TYPES_ALL) == (h_ip, net.HASH_REPORT_IPV4)
        assert rss.parse_flow(f) == rss.FlowKey(4, 6, ip("10.0.0.1"), ip("10.0.0.2"), 0, 0)


def test_ipv4_options_and_truncation() -> None:
    f = ipv4("1.2.3.4", "5.6.7.8", 17, udp(53, 5353), options=b"\x01" * 8)
    assert rss.parse_flow(f) == rss.FlowKey(4, 17, ip("1.2.3.4"), ip("5.6.7.8"), 53, 5353)
    short_tcp = ipv4("1.2.3.4", "5.6.7.8", 6, tcp(1, 2)[:10])
    assert rss_hash(short_tcp, MS_KEY, rss.HASH_TYPE_TCPV4) == (0, net.HASH_REPORT_NONE)
    assert rss_hash(short_tcp, MS_KEY, rss.HASH_TYPES_ALL)[1] == net.HASH_REPORT_IPV4


def test_non_ip_and_garbage() -> None:
    arp = eth(b"\x00" * 28, 0x0806)
    assert rss.parse_flow(arp) is None
    assert rss_hash(arp, MS_KEY, rss.HASH_TYPES_ALL) == (0, net.HASH_REPORT_NONE)
    assert rss.flow_id(arp) is None
    assert rss.parse_flow(b"") is None
    bad_version = bytearray(ipv4("1.1.1.1", "2.2.2.2", 6, tcp(1, 2)))
    bad_version[14] = 0x65
    assert rss.parse_flow(bytes(bad_version)) is None


def _dstopts_home(home: str, nh: int) -> bytes:
    # next header, hdr ext len 2 (24 bytes): PadN(2) + HomeAddress option (18)... = 2+2+18+2
    opts = b"\x01\x00" + b"\xc9\x10" + ip(home) + b"\x01\x00"
    return bytes([nh, 2]) + opts


def _rt2(addr: str, nh: int) -> bytes:
    return bytes([nh, 2, 2, 1]) + b"\x00" * 4 + ip(addr)


def test_ipv6_extension_headers() -> None:
    src, dst, home, coa = "2001:db8::1", "2001:db8::2", "2001:db8::aa", "2001:db8::bb"
    payload = _rt2(coa, 60) + _dstopts_home(home, 6) + tcp(1000, 80)
    f = ipv6(src, dst, 43, payload)
    ports = struct.pack("!HH", 1000, 80)
    # EX: home address replaces source, routing-header-2 address replaces destination
    assert rss_hash(f, MS_KEY, rss.HASH_TYPE_TCP_EX) == (
        toeplitz_hash(MS_KEY, ip(home) + ip(coa) + ports),
        net.HASH_REPORT_TCPV6_EX,
    )
    assert rss_hash(f, MS_KEY, rss.HASH_TYPE_IP_EX) == (
        toeplitz_hash(MS_KEY, ip(home) + ip(coa)),
        net.HASH_REPORT_IPV6_EX,
    )
    # without EX types: skip the extension headers, plain TCPv6 rules
    assert rss_hash(f, MS_KEY, rss.HASH_TYPE_TCPV6) == (
        toeplitz_hash(MS_KEY, ip(src) + ip(dst) + ports),
        net.HASH_REPORT_TCPV6,
    )
    # UDP_EX enabled but packet is TCP, and no IP_EX: fall back to plain rules
    assert rss_hash(f, MS_KEY, rss.HASH_TYPE_UDP_EX | rss.HASH_TYPE_IPV6)[1] == (
        net.HASH_REPORT_IPV6
    )
    assert rss.parse_flow(f) == rss.FlowKey(6, 6, ip(src), ip(dst), 1000, 80)


def test_ipv6_ext_without_mobility_addresses_and_fragments() -> None:
    src, dst = "2001:db8::1", "2001:db8::2"
    hbh = bytes([17, 0]) + b"\x01\x04\x00\x00\x00\x00"
    f = ipv6(src, dst, 0, hbh + udp(5, 6))
    ports = struct.pack("!HH", 5, 6)
    assert rss_hash(f, MS_KEY, rss.HASH_TYPE_UDP_EX) == (
        toeplitz_hash(MS_KEY, ip(src) + ip(dst) + ports),
        net.HASH_REPORT_UDPV6_EX,
    )
    frag = bytes([17, 0, 0x00, 0x01]) + b"\x00\x00\x00\x07"  # offset 0, M=1
    g = ipv6(src, dst, 44, frag + udp(5, 6))
    assert rss_hash(g, MS_KEY, rss.HASH_TYPES_ALL) == (
        toeplitz_hash(MS_KEY, ip(src) + ip(dst)),
        net.HASH_REPORT_IPV6_EX,
    )
    assert rss.parse_flow(g) == rss.FlowKey(6, 17, ip(src), ip(dst), 0, 0)
    # a chain longer than MAX_IPV6_EXT_HEADERS: no L4
    chain = b"".join(bytes([60, 0]) + b"\x01\x04\x00\x00\x00\x00" for _ in range(12))
    h = ipv6(src, dst, 60, chain + udp(5, 6))
    assert rss.parse_flow(h) == rss.FlowKey(6, 60, ip(src), ip(dst), 0, 0)


def test_frame_vlan() -> None:
    assert rss.frame_vlan(ipv6("::1", "::2", 59, b"", vlan=0x2064)) == 0x064
    assert rss.frame_vlan(ipv4("1.1.1.1", "2.2.2.2", 6, tcp(1, 2))) is None
    assert rss.frame_vlan(b"\x00" * 10) is None


# ---- flow ids ------------------------------------------------------------------------

_v4 = st.ip_addresses(v=4).map(str)
_v6 = st.ip_addresses(v=6).map(str)
_port = st.integers(0, 0xFFFF)


@given(_v4, _v4, _port, _port, st.sampled_from([6, 17]))
def test_flow_id_symmetric_v4(a: str, b: str, pa: int, pb: int, proto: int) -> None:
    fwd = ipv4(a, b, proto, tcp(pa, pb) if proto == 6 else udp(pa, pb))
    rev = ipv4(b, a, proto, tcp(pb, pa) if proto == 6 else udp(pb, pa))
    assert rss.flow_id(fwd) == rss.flow_id(rev) == rss.flow_id(fwd)
    assert rss.flow_id(fwd) is not None


@given(_v6, _v6, _port, _port)
def test_flow_id_symmetric_v6(a: str, b: str, pa: int, pb: int) -> None:
    fwd = ipv6(a, b, 17, udp(pa, pb))
    rev = ipv6(b, a, 17, udp(pb, pa), vlan=3)
    assert rss.flow_id(fwd) == rss.flow_id(rev)


def test_flow_id_distinguishes() -> None:
    base = rss.flow_id(ipv4("1.1.1.1", "2.2.2.2", 6, tcp(1, 2)))
    assert base != rss.flow_id(ipv4("1.1.1.1", "2.2.2.2", 17, udp(1, 2)))
    assert base != rss.flow_id(ipv4("1.1.1.1", "2.2.2.2", 6, tcp(1, 3)))
    assert base != rss.flow_id(ipv4("1.1.1.1", "2.2.2.2", 6, tcp(2, 1)))
    assert rss.flow_id(ipv6("::1", "::2", 6, tcp(1, 2))) != rss.flow_id(
        ipv4("0.0.0.1", "0.0.0.2", 6, tcp(1, 2))
    )


@given(st.binary(max_size=200), st.binary(max_size=40), st.integers(0, rss.HASH_TYPES_ALL))
def test_parsing_never_raises(frame: bytes, key: bytes, types: int) -> None:
    rss.parse_flow(frame)
    rss.flow_id(frame)
    h, rep = rss_hash(frame, key, types)
    assert 0 <= h <= 0xFFFFFFFF and 0 <= rep <= 9


@given(st.binary(min_size=14, max_size=120), st.integers(0, rss.HASH_TYPES_ALL))
def test_parsing_ip_shaped_garbage(tail: bytes, types: int) -> None:
    for et in (b"\x08\x00", b"\x86\xdd", b"\x81\x00\x00\x01\x86\xdd"):
        for first in (b"\x45", b"\x46", b"\x60"):
            f = DST_MAC + SRC_MAC + et + first + tail
            rss.parse_flow(f)
            assert rss_hash(f, MS_KEY, types) == rss_hash(memoryview(f), MS_KEY, types)


# ---- RssConfig -----------------------------------------------------------------------


def test_rss_config_select_and_classify() -> None:
    cfg = RssConfig(rss.HASH_TYPE_TCPV4, [0, 1, 2, 3], 2, 4, MS_KEY)
    assert [cfg.select_queue(h) for h in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    dst, dport, src, sport, _h_ip, h_tcp = IPV4_VECTORS[0]
    f = ipv4(src, dst, 6, tcp(sport, dport))
    assert cfg.classify(f) == (h_tcp & 3, h_tcp, net.HASH_REPORT_TCPV4)
    u = ipv4(src, dst, 17, udp(sport, dport))
    assert cfg.classify(u) == (2, 0, net.HASH_REPORT_NONE)
    assert cfg.max_queue() == 3


def test_memo_bounded_and_exact() -> None:
    key = bytes(range(1, 41))
    for i in range(rss.MAX_MEMO_ENTRIES + 10):
        f = ipv4("10.0.0.1", "10.0.0.2", 17, udp(i & 0xFFFF, 53))
        h, rep = rss_hash(f, key, rss.HASH_TYPE_UDPV4)
        if i % 997 == 0:
            inp = ip("10.0.0.1") + ip("10.0.0.2") + struct.pack("!HH", i, 53)
            assert (h, rep) == (rss._slow_toeplitz(key, inp), net.HASH_REPORT_UDPV4)
    assert len(rss._key(key).memo) <= rss.MAX_MEMO_ENTRIES


@given(st.binary(max_size=120), st.integers(0, rss.HASH_TYPES_ALL))
def test_flow_hash_input_matches_rss_hash(tail: bytes, types: int) -> None:
    for f in (
        ipv4("1.2.3.4", "5.6.7.8", 6, tcp(1, 2)) + tail,
        ipv6("2001:db8::1", "2001:db8::2", 43, _rt2("2001:db8::bb", 17) + udp(9, 10)),
        DST_MAC + SRC_MAC + b"\x86\xdd" + tail,
    ):
        got = rss.flow_hash_input(f, types)
        h, rep = rss_hash(f, MS_KEY, types)
        if got is None:
            assert (h, rep) == (0, net.HASH_REPORT_NONE)
        else:
            assert (toeplitz_hash(MS_KEY, got[0]), got[1]) == (h, rep)


def test_flow_hash_input_example() -> None:
    f = ipv4("1.2.3.4", "5.6.7.8", 17, udp(53, 5353))
    assert rss.flow_hash_input(f) == (
        ip("1.2.3.4") + ip("5.6.7.8") + struct.pack("!HH", 53, 5353),
        net.HASH_REPORT_UDPV4,
    )
    assert rss.flow_hash_input(f, rss.HASH_TYPE_TCPV4) is None
