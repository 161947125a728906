"""Toeplitz hashing, flow parsing and RSS configuration (pure, per packet).

References: virtio 1.3 §5.1.6.4.2 "Hash calculation for incoming packets"
(hash types and selection rules), §5.1.6.4.4 "Hash reporting for incoming
packets" (report values), §5.1.6.5.7 "Receive-side scaling (RSS)", and
Microsoft's "RSS hashing functions" / "Verifying the RSS Hash Calculation"
(the Toeplitz function and its test vectors).

Invariants:

* :func:`toeplitz_hash` is exact for any key and input length: a key shorter
  than ``len(data) + 4`` bytes is treated as zero-padded on the right (what
  fixed 40-byte key arrays do in other devices).
* Per-key lookup tables are built once per distinct key, cover
  :data:`TABLE_POSITIONS` input bytes (an IPv6 4-tuple), and live in a cache
  bounded by :data:`MAX_CACHED_KEYS` entries -- a guest that keeps changing its
  key cannot grow memory without bound.  Each key also memoizes up to
  :data:`MAX_MEMO_ENTRIES` recent hash inputs (cleared when full), so a
  steady flow costs a parse and a dict lookup per packet.
* Frame parsing never raises on any input and never reads outside the frame:
  anything it cannot classify is "not IP" (``None``) or "IP without L4" (no
  ports).  Fragmented packets (IPv4 MF/offset, IPv6 fragment header) never
  contribute ports, so all fragments of a datagram hash alike.
* :func:`flow_id` is symmetric: a frame and its reply (addresses and ports
  swapped) get the same id; ids are exact (no collisions), deterministic across
  processes, and distinct between IPv4 and IPv6.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, NamedTuple

from virtnet.net import (
    HASH_REPORT_IPV4,
    HASH_REPORT_IPV6,
    HASH_REPORT_IPV6_EX,
    HASH_REPORT_NONE,
    HASH_REPORT_TCPV4,
    HASH_REPORT_TCPV6,
    HASH_REPORT_TCPV6_EX,
    HASH_REPORT_UDPV4,
    HASH_REPORT_UDPV6,
    HASH_REPORT_UDPV6_EX,
)

__all__ = [
    "ETH_HLEN",
    "ETH_P_8021AD",
    "ETH_P_8021Q",
    "ETH_P_IP",
    "ETH_P_IPV6",
    "HASH_TYPES_ALL",
    "HASH_TYPE_IPV4",
    "HASH_TYPE_IPV6",
    "HASH_TYPE_IP_EX",
    "HASH_TYPE_TCPV4",
    "HASH_TYPE_TCPV6",
    "HASH_TYPE_TCP_EX",
    "HASH_TYPE_UDPV4",
    "HASH_TYPE_UDPV6",
    "HASH_TYPE_UDP_EX",
    "MAX_CACHED_KEYS",
    "MAX_IPV6_EXT_HEADERS",
    "MAX_MEMO_ENTRIES",
    "TABLE_POSITIONS",
    "FlowKey",
    "RssConfig",
    "flow_hash_input",
    "flow_id",
    "frame_vlan",
    "parse_flow",
    "rss_hash",
    "toeplitz_hash",
]

# §5.1.6.4.2.1 "Supported/enabled hash types".
HASH_TYPE_IPV4: Final = 1 << 0
HASH_TYPE_TCPV4: Final = 1 << 1
HASH_TYPE_UDPV4: Final = 1 << 2
HASH_TYPE_IPV6: Final = 1 << 3
HASH_TYPE_TCPV6: Final = 1 << 4
HASH_TYPE_UDPV6: Final = 1 << 5
HASH_TYPE_IP_EX: Final = 1 << 6
HASH_TYPE_TCP_EX: Final = 1 << 7
HASH_TYPE_UDP_EX: Final = 1 << 8
HASH_TYPES_ALL: Final = (1 << 9) - 1
_EX_TYPES: Final = HASH_TYPE_IP_EX | HASH_TYPE_TCP_EX | HASH_TYPE_UDP_EX

# IEEE 802.3 / 802.1Q framing.
ETH_HLEN: Final = 14
ETH_P_IP: Final = 0x0800
ETH_P_IPV6: Final = 0x86DD
ETH_P_8021Q: Final = 0x8100
ETH_P_8021AD: Final = 0x88A8  # accepted as the single tag; a second tag is not parsed

_IPPROTO_HOPOPTS: Final = 0
_IPPROTO_TCP: Final = 6
_IPPROTO_UDP: Final = 17
_IPPROTO_ROUTING: Final = 43
_IPPROTO_FRAGMENT: Final = 44
_IPPROTO_AH: Final = 51
_IPPROTO_DSTOPTS: Final = 60
_IPV6_OPT_HOME_ADDRESS: Final = 0xC9  # RFC 6275 §6.3
_TCP_MIN: Final = 20  # RFC 793 minimum header: "the packet has a TCP header"
_UDP_MIN: Final = 8

# Bound on IPv6 extension headers walked before giving up on finding L4 (our
# own limit; RFC 8200 §4.1 recommends each appear at most once or twice).
MAX_IPV6_EXT_HEADERS: Final = 8
# Input bytes covered by precomputed tables: IPv6 src+dst+sport+dport.
TABLE_POSITIONS: Final = 36
# Distinct keys whose tables are cached (each ~36 x 256 ints).
MAX_CACHED_KEYS: Final = 16

# Per key, a memo of hash input -> hash (flows repeat); cleared when it fills.
MAX_MEMO_ENTRIES: Final = 4096

_MASK32: Final = 0xFFFFFFFF

_Tables = list[list[int]]


class _Key:
    """Lookup tables of one key plus a bounded memo of recent hash inputs."""

    __slots__ = ("memo", "tables")

    def __init__(self, key: bytes) -> None:
        self.tables = _build_tables(key)
        self.memo: dict[bytes, int] = {}


_cache: dict[bytes, _Key] = {}


def _build_tables(key: bytes) -> _Tables:
    nbits = (TABLE_POSITIONS + 4) * 8
    k = int.from_bytes(key[: TABLE_POSITIONS + 4].ljust(TABLE_POSITIONS + 4, b"\x00"), "big")
    tables: _Tables = []
    for pos in range(TABLE_POSITIONS):
        # window for bit j (0 = MSB) of input byte `pos`: key bits [8*pos+j, +32)
        windows = [(k >> (nbits - 32 - (8 * pos + j))) & _MASK32 for j in range(8)]
        t = [0] * 256
        for v in range(1, 256):
            low = v & -v  # lowest set bit 1<<b is MSB-first bit 7-b = 8 - bit_length
            t[v] = t[v ^ low] ^ windows[8 - low.bit_length()]
        tables.append(t)
    return tables


def _key(key: bytes) -> _Key:
    k = _cache.get(key)
    if k is None:
        if len(_cache) >= MAX_CACHED_KEYS:
            _cache.pop(next(iter(_cache)))  # oldest inserted
        key = bytes(key)
        k = _cache[key] = _Key(key)
    return k


def _tables(key: bytes) -> _Tables:
    return _key(key).tables


def _memo_hash(k: _Key, inp: bytes) -> int:
    memo = k.memo
    h = memo.get(inp)
    if h is None:
        h = 0
        for t, b in zip(k.tables, inp, strict=False):
            h ^= t[b]
        if len(memo) >= MAX_MEMO_ENTRIES:
            memo.clear()
        memo[inp] = h
    return h


def _slow_toeplitz(key: bytes, data: bytes) -> int:
    nbytes = len(data) + 4
    nbits = nbytes * 8
    k = int.from_bytes(bytes(key[:nbytes]).ljust(nbytes, b"\x00"), "big")
    h = 0
    for i, b in enumerate(data):
        for j in range(8):
            if b & (0x80 >> j):
                h ^= (k >> (nbits - 32 - (8 * i + j))) & _MASK32
    return h


def toeplitz_hash(key: bytes, data: bytes | bytearray | memoryview) -> int:
    """The 32-bit Toeplitz hash of ``data`` under ``key`` (Microsoft RSS definition)."""
    if len(data) > TABLE_POSITIONS:
        return _slow_toeplitz(bytes(key), bytes(data))
    h = 0
    for t, b in zip(_key(key).tables, data, strict=False):
        h ^= t[b]
    return h


# --------------------------------------------------------------------------------------
# Frame parsing

# Parsed layout: (family 4|6, proto, addr_off, l4_off (-1: no usable L4),
#                 has_ext, home_off (-1), rt2_off (-1))
_Parsed = tuple[int, int, int, int, bool, int, int]


def _l3(frame: bytes | bytearray | memoryview) -> tuple[int, int]:
    """(ethertype, l3 offset) after at most one VLAN tag; (0, 0) if too short."""
    n = len(frame)
    if n < ETH_HLEN:
        return 0, 0
    et = (frame[12] << 8) | frame[13]
    if et in (ETH_P_8021Q, ETH_P_8021AD):
        if n < ETH_HLEN + 4:
            return 0, 0
        return (frame[16] << 8) | frame[17], ETH_HLEN + 4
    return et, ETH_HLEN


def frame_vlan(frame: bytes | bytearray | memoryview) -> int | None:
    """VLAN id of the frame's outer 802.1Q/802.1ad tag, or ``None`` if untagged."""
    if len(frame) < ETH_HLEN + 4:
        return None
    et = (frame[12] << 8) | frame[13]
    if et in (ETH_P_8021Q, ETH_P_8021AD):
        return ((frame[14] << 8) | frame[15]) & 0x0FFF
    return None


def _parse(frame: bytes | bytearray | memoryview) -> _Parsed | None:
    et, off = _l3(frame)
    n = len(frame)
    if et == ETH_P_IP:
        if n < off + 20 or frame[off] >> 4 != 4:
            return None
        ihl = (frame[off] & 0x0F) * 4
        if ihl < 20 or n < off + ihl:
            return None
        proto = frame[off + 9]
        l4 = -1
        if not ((frame[off + 6] << 8) | frame[off + 7]) & 0x3FFF:  # MF or offset: fragment
            l4 = off + ihl
            if proto == _IPPROTO_TCP:
                if n < l4 + _TCP_MIN:
                    l4 = -1
            elif proto == _IPPROTO_UDP:
                if n < l4 + _UDP_MIN:
                    l4 = -1
            else:
                l4 = -1
        return (4, proto, off + 12, l4, False, -1, -1)
    if et == ETH_P_IPV6:
        if n < off + 40 or frame[off] >> 4 != 6:
            return None
        addr = off + 8
        nh = frame[off + 6]
        p = off + 40
        ext = False
        frag = False
        home = rt2 = -1
        for _ in range(MAX_IPV6_EXT_HEADERS):
            if nh in (_IPPROTO_HOPOPTS, _IPPROTO_ROUTING, _IPPROTO_DSTOPTS):
                if n < p + 8:
                    return (6, nh, addr, -1, True, home, rt2)
                hlen = (frame[p + 1] + 1) * 8
                if n < p + hlen:
                    return (6, nh, addr, -1, True, home, rt2)
                if nh == _IPPROTO_ROUTING:
                    # RFC 6275 §6.4: type 2, one address, segments left 1
                    if frame[p + 2] == 2 and hlen == 24 and frame[p + 3] == 1:
                        rt2 = p + 8
                elif nh == _IPPROTO_DSTOPTS:
                    o = p + 2
                    end = p + hlen
                    while o < end:
                        t = frame[o]
                        if t == 0:  # Pad1
                            o += 1
                            continue
                        if o + 2 > end:
                            break
                        ln = frame[o + 1]
                        if t == _IPV6_OPT_HOME_ADDRESS and ln == 16 and o + 18 <= end:
                            home = o + 2
                        o += 2 + ln
            elif nh == _IPPROTO_FRAGMENT:
                if n < p + 8:
                    return (6, nh, addr, -1, True, home, rt2)
                hlen = 8
                if ((frame[p + 2] << 8) | frame[p + 3]) & 0xFFF9:  # offset or M flag
                    frag = True
            elif nh == _IPPROTO_AH:
                if n < p + 8:
                    return (6, nh, addr, -1, True, home, rt2)
                hlen = (frame[p + 1] + 2) * 4
                if n < p + hlen:
                    return (6, nh, addr, -1, True, home, rt2)
            else:
                break
            ext = True
            nh = frame[p]
            p += hlen
        l4 = -1
        if not frag:
            if nh == _IPPROTO_TCP:
                if n >= p + _TCP_MIN:
                    l4 = p
            elif nh == _IPPROTO_UDP and n >= p + _UDP_MIN:
                l4 = p
        return (6, nh, addr, l4, ext, home, rt2)
    return None


class FlowKey(NamedTuple):
    """An IP flow as seen in one frame; ports are 0 when there is no usable L4."""

    version: int  # 4 or 6
    proto: int  # IP protocol / last next-header
    src: bytes
    dst: bytes
    sport: int
    dport: int


def parse_flow(frame: bytes | bytearray | memoryview) -> FlowKey | None:
    """Parse Ethernet (+1 VLAN tag) / IPv4 / IPv6 / TCP / UDP; ``None`` if not IP."""
    p = _parse(frame)
    if p is None:
        return None
    fam, proto, a, l4, _ext, _home, _rt2 = p
    alen = 4 if fam == 4 else 16
    sport = dport = 0
    if l4 >= 0:
        sport = (frame[l4] << 8) | frame[l4 + 1]
        dport = (frame[l4 + 2] << 8) | frame[l4 + 3]
    return FlowKey(fam, proto, bytes(frame[a : a + alen]), bytes(frame[a + alen : a + 2 * alen]),
                   sport, dport)  # fmt: skip


_PROTO_BYTE: Final = [bytes((i,)) for i in range(256)]


def _flow_key_parsed(frame: bytes | bytearray | memoryview, p: _Parsed) -> bytes:
    """Canonical (direction-free) flow bytes: lower endpoint, higher endpoint,
    protocol.  Lengths 9/13 (IPv4 without/with ports) and 33/37 (IPv6) keep
    the families and port-less flows apart."""
    fam, proto, a, l4 = p[0], p[1], p[2], p[3]
    alen = 4 if fam == 4 else 16
    s = bytes(frame[a : a + alen])
    d = bytes(frame[a + alen : a + 2 * alen])
    if l4 >= 0:
        s += bytes(frame[l4 : l4 + 2])
        d += bytes(frame[l4 + 2 : l4 + 4])
    return (s + d if s <= d else d + s) + _PROTO_BYTE[proto]


def flow_id(frame: bytes | bytearray | memoryview) -> int | None:
    """A symmetric, exact flow identifier; ``None`` for non-IP frames."""
    p = _parse(frame)
    if p is None:
        return None
    return int.from_bytes(b"\x01" + _flow_key_parsed(frame, p), "big")


def _input_parsed(
    frame: bytes | bytearray | memoryview, p: _Parsed, types: int
) -> tuple[bytes, int]:
    """(hash input, report type) per the selection rules; (b"", NONE) for no hash."""
    fam, proto, a, l4, ext, home, rt2 = p
    if fam == 4:
        if l4 >= 0 and (
            (proto == _IPPROTO_TCP and types & HASH_TYPE_TCPV4)
            or (proto == _IPPROTO_UDP and types & HASH_TYPE_UDPV4)
        ):
            report = HASH_REPORT_TCPV4 if proto == _IPPROTO_TCP else HASH_REPORT_UDPV4
            inp = bytes(frame[a : a + 8]) + bytes(frame[l4 : l4 + 4])
        elif types & HASH_TYPE_IPV4:
            report = HASH_REPORT_IPV4
            inp = bytes(frame[a : a + 8])
        else:
            return b"", HASH_REPORT_NONE
        return inp, report
    # IPv6 (§5.1.6.4.2.3 and §5.1.6.4.2.4)
    report = HASH_REPORT_NONE
    ports = False
    exaddr = False
    if ext and types & _EX_TYPES:
        if l4 >= 0 and proto == _IPPROTO_TCP and types & HASH_TYPE_TCP_EX:
            report, ports, exaddr = HASH_REPORT_TCPV6_EX, True, True
        elif l4 >= 0 and proto == _IPPROTO_UDP and types & HASH_TYPE_UDP_EX:
            report, ports, exaddr = HASH_REPORT_UDPV6_EX, True, True
        elif types & HASH_TYPE_IP_EX:
            report, exaddr = HASH_REPORT_IPV6_EX, True
    if not report:  # "Else skip IPv6 extension headers and [use the plain IPv6 rules]"
        if l4 >= 0 and proto == _IPPROTO_TCP and types & HASH_TYPE_TCPV6:
            report, ports = HASH_REPORT_TCPV6, True
        elif l4 >= 0 and proto == _IPPROTO_UDP and types & HASH_TYPE_UDPV6:
            report, ports = HASH_REPORT_UDPV6, True
        elif types & HASH_TYPE_IPV6:
            report = HASH_REPORT_IPV6
        else:
            return b"", HASH_REPORT_NONE
    if exaddr and (home >= 0 or rt2 >= 0):
        src = frame[home : home + 16] if home >= 0 else frame[a : a + 16]
        dst = frame[rt2 : rt2 + 16] if rt2 >= 0 else frame[a + 16 : a + 32]
        inp = bytes(src) + bytes(dst)
    else:
        inp = bytes(frame[a : a + 32])
    if ports:
        inp += bytes(frame[l4 : l4 + 4])
    return inp, report


def _hash_parsed(
    frame: bytes | bytearray | memoryview, p: _Parsed, key: bytes, types: int
) -> tuple[int, int]:
    inp, report = _input_parsed(frame, p, types)
    if not report:
        return 0, HASH_REPORT_NONE
    return _memo_hash(_key(key), inp), report


def flow_hash_input(
    frame: bytes | bytearray | memoryview, enabled_types: int = HASH_TYPES_ALL
) -> tuple[bytes, int] | None:
    """The spec's Toeplitz input for ``frame`` and the report type it yields.

    Addresses then ports, in network order, chosen by §5.1.6.4.2's rules for
    ``enabled_types``; ``None`` when no hash would be calculated.
    ``rss_hash(f, k, t) == (toeplitz_hash(k, inp), report)``.
    """
    p = _parse(frame)
    if p is None:
        return None
    inp, report = _input_parsed(frame, p, enabled_types)
    return (inp, report) if report else None


def rss_hash(
    frame: bytes | bytearray | memoryview, key: bytes, enabled_types: int
) -> tuple[int, int]:
    """(hash_value, hash_report) per §5.1.6.4.2; ``(0, HASH_REPORT_NONE)`` if no hash."""
    if not enabled_types:
        return 0, HASH_REPORT_NONE
    p = _parse(frame)
    if p is None:
        return 0, HASH_REPORT_NONE
    return _hash_parsed(frame, p, key, enabled_types)


@dataclass(slots=True)
class RssConfig:
    """One accepted VIRTIO_NET_CTRL_MQ_RSS_CONFIG (§5.1.6.5.7.1).

    ``indirection_table`` and ``unclassified_queue`` hold 0-based receive queue
    numbers (pairs), i.e. the spec's ``vq_index_1_16``.  The table length is a
    power of two (checked by :mod:`virtnet.ctrl` before construction).
    """

    hash_types: int
    indirection_table: list[int]
    unclassified_queue: int
    max_tx_vq: int
    key: bytes
    _mask: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._mask = len(self.indirection_table) - 1

    def select_queue(self, hash_value: int) -> int:
        """Receive queue for a packet with hash ``hash_value`` (§5.1.6.5.7 RSS processing)."""
        return self.indirection_table[hash_value & self._mask]

    def classify(self, frame: bytes | bytearray | memoryview) -> tuple[int, int, int]:
        """(queue, hash_value, hash_report): unclassified packets go to
        ``unclassified_queue``."""
        h, report = rss_hash(frame, self.key, self.hash_types)
        if report == HASH_REPORT_NONE:
            return self.unclassified_queue, 0, HASH_REPORT_NONE
        return self.indirection_table[h & self._mask], h, report

    def max_queue(self) -> int:
        """Largest receive queue number this config can select."""
        return max(max(self.indirection_table, default=0), self.unclassified_queue)
