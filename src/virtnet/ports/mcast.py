"""IGMP and MLD snooping's reading of membership messages (RFC 4541).

The switch (``--mcast-snoop``) reads the membership reports a member sends
and the queries multicast routers send, and forwards a multicast group's
traffic only to the members that asked for it and to the router ports.
This module is the pure part: it tells what one frame says.

* IGMPv1/v2 reports and v2 leaves (RFC 1112, RFC 2236), IGMPv3 reports
  (RFC 3376 section 4.2) and queries of every version.
* MLDv1 reports and dones (RFC 2710), MLDv2 reports (RFC 3810 section 5.2)
  and queries.  An MLD message must come with hop limit 1 from a link-local
  address or, for a report, from :: (RFC 3810 sections 5.1.14 and 5.2.13).

Each group record comes with its sources (:data:`MAX_SOURCES` at most;
more is read as "any source", so that nobody gets fewer frames than it asked
for), and the switch keeps each VM's filter: INCLUDE these sources or
EXCLUDE those (RFC 3376 section 6.4's router state for one host).
"""

from __future__ import annotations

import struct
from typing import Final, NamedTuple

from virtnet.errors import PeerError
from virtnet.net import inet_checksum, ipv6_checksum

__all__ = [
    "ALLOW",
    "ANY_SOURCE",
    "BLOCK",
    "IS_EX",
    "IS_IN",
    "MAX_GROUP_RECORDS",
    "MAX_SOURCES",
    "MEMBERSHIP_S",
    "OTHER_QUERIER_S",
    "QUERY",
    "QUERY_INTERVAL_S",
    "REPORT",
    "RESPONSE_S",
    "ROUTER",
    "STARTUP_QUERIES",
    "TO_EX",
    "TO_IN",
    "Filter",
    "Membership",
    "MembershipError",
    "Record",
    "admits",
    "after_record",
    "flooded_group",
    "igmp_query",
    "membership",
    "mld_query",
]

#: How long a membership lasts without a new report: the Group Membership
#: Interval, robustness 2 x query interval 125 s + response interval 10 s
#: (RFC 3376 section 8.4; MLDv2's Multicast Address Listening Interval is the
#: same, RFC 3810 section 9.4).
MEMBERSHIP_S: Final = 260.0
#: How long a member that sent a query stays a router port: the Other
#: Querier Present Interval (RFC 3376 section 8.5, RFC 3810 section 9.5).
OTHER_QUERIER_S: Final = 255.0
#: How often a querier asks (the Query Interval, RFC 3376 section 8.2, RFC
#: 3810 section 9.2); at start it asks :data:`STARTUP_QUERIES` times a
#: quarter of that apart (the Startup Query Count and Interval, 8.6 and 8.7).
QUERY_INTERVAL_S: Final = 125.0
STARTUP_QUERIES: Final = 2
#: The Query Response Interval a querier sets (RFC 3376 section 8.3): hosts
#: answer a general query within it, so the memberships a switch has heard
#: of are complete that long after the first query.
RESPONSE_S: Final = 10.0
_RESPONSE_MS = int(RESPONSE_S * 1000)
#: The Querier's Robustness Variable (RFC 3376 section 4.1.6) and Query
#: Interval Code (section 4.1.7: under 128, the seconds themselves).
_QRV, _QQIC = 2, 125
#: Sources a group record may name and be taken at its word (Linux bridge
#: keeps 32 per port and group, ``BR_MCAST_DEFAULT_EHT_HOSTS_LIMIT`` 512 per
#: port); past it a record reads as "any source".
MAX_SOURCES: Final = 64
#: Group records read from one IGMPv3 or MLDv2 report (a 1500-byte report
#: holds at most 183 IGMPv3 records; a host splits larger state over several
#: reports, RFC 3376 section 4.2.16).
MAX_GROUP_RECORDS: Final = 256

#: What :func:`membership` found: a query, a report, or a multicast router
#: announcing itself (a PIMv2 hello, RFC 7761 section 4.9.2, or a multicast
#: router discovery advertisement, RFC 4286 section 3), which makes its
#: sender a router port as a query does (RFC 4541 section 2.1.1).
QUERY: Final = 0
REPORT: Final = 1
ROUTER: Final = 2

_IGMP = 2
_ICMPV6 = 58
_ETH_IPV4, _ETH_IPV6 = 0x0800, 0x86DD
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_IGMP_QUERY, _IGMP_V1_REPORT, _IGMP_V2_REPORT, _IGMP_LEAVE, _IGMP_V3_REPORT = (
    0x11, 0x12, 0x16, 0x17, 0x22,
)  # fmt: skip
_MLD_QUERY, _MLD_REPORT, _MLD_DONE, _MLD_V2_REPORT = 130, 131, 132, 143
_MRD_ADVERT, _MRD6_ADVERT = 0x30, 151  # IGMP type, ICMPv6 type (RFC 4286 section 5)
_PIM, _PIM_HELLO = 103, 0x20  # protocol; version 2, type 0
#: Group record types (RFC 3376 section 4.2.12, RFC 3810 section 5.2.12):
#: MODE_IS_INCLUDE, MODE_IS_EXCLUDE, CHANGE_TO_INCLUDE_MODE,
#: CHANGE_TO_EXCLUDE_MODE, ALLOW_NEW_SOURCES, BLOCK_OLD_SOURCES.
IS_IN, IS_EX, TO_IN, TO_EX, ALLOW, BLOCK = 1, 2, 3, 4, 5, 6
_TYPES = frozenset({IS_IN, IS_EX, TO_IN, TO_EX, ALLOW, BLOCK})
_ALL_NODES = bytes.fromhex("ff020000000000000000000000000001")
_IPV6_ANY = bytes(16)

#: A group record: (group, record type, its sources; None: more than
#: MAX_SOURCES).  IPv4 addresses as integers, IPv6 ones packed.  An IGMPv1/v2
#: or MLDv1 report is a TO_EX record of no source, a leave or done TO_IN.
Record = tuple[int | bytes, int, frozenset[int | bytes] | None]


class Membership(NamedTuple):
    """A membership message."""

    kind: int  # QUERY or REPORT
    #: A report's group records.
    records: list[Record]
    #: A query's Maximum Response Time in seconds: hosts answer within it.
    response_s: float = 0.0


class MembershipError(PeerError):
    """An IGMP or MLD message the switch cannot read."""


def flooded_group(group: int | bytes) -> bool:
    """Whether ``group`` is one every member of the VLAN gets, whoever
    reported it: IPv4 224.0.0.0/24, the local network control block
    (RFC 4541 section 2.1.2), and IPv6 ff02::1, all nodes (section 3),
    and groups of interface-local or reserved scope, which are never
    reported (RFC 3810 section 6)."""
    if isinstance(group, int):
        return group >> 8 == 0xE00000
    return group == _ALL_NODES or group[1] & 0x0F < 2


def _group(group: int | bytes) -> int | bytes:
    """``group`` if it is a multicast address, else MembershipError."""
    if isinstance(group, int) and group >> 28 == 0xE:
        return group
    if isinstance(group, bytes) and group[0] == 0xFF:
        return group
    raise MembershipError("a group record names no multicast address")


def membership(buf: bytearray, n: int, et: int, p: int, proto: int, u: int) -> Membership | None:
    """The IGMP or MLD message in ``buf[:n]``: ``et`` the EtherType, ``p``
    the IP header's offset, ``proto`` the upper-layer protocol and ``u`` its
    header's offset (negative: a later fragment or an unreadable header).

    A PIMv2 hello with a good checksum is a :data:`ROUTER` message too.
    None for a frame that is none of these (other IGMP and PIM types, such
    as DVMRP and PIMv1, too).  :class:`MembershipError` for one the switch must not read:
    fragmented, truncated, a bad checksum, an MLD message that did not come
    from the link, a group that is not multicast, more than
    :data:`MAX_GROUP_RECORDS` records."""
    if proto == _PIM:
        return _pim_hello(buf, n, et, p, u)
    if et == _ETH_IPV4 and proto == _IGMP:
        if u < 0 or buf[p + 6] & 0x20:
            raise MembershipError("a fragmented IGMP message")
        end = p + _U16.unpack_from(buf, p + 2)[0]
        if end > n or end < u + 8:
            raise MembershipError("an IGMP message shorter than 8 bytes or past the frame")
        kind = buf[u]
        if kind not in (_IGMP_QUERY, _IGMP_V1_REPORT, _IGMP_V2_REPORT, _IGMP_LEAVE,
                        _IGMP_V3_REPORT, _MRD_ADVERT):  # fmt: skip
            return None
        if inet_checksum(buf[u:end]):
            raise MembershipError("an IGMP message with a bad checksum")
        if kind == _MRD_ADVERT:
            return Membership(ROUTER, [])
        if kind == _IGMP_QUERY:
            # Tenths of a second (RFC 2236 section 2.2; 0: an IGMPv1 query,
            # RFC 3376 section 7.1: 10 s), in IGMPv3 a float from 128 on (4.1.1).
            code = buf[u + 1]
            if code >= 128 and end >= u + 12:
                code = _float_code(code, 4)
            return Membership(QUERY, [], code / 10 if code else RESPONSE_S)
        if kind != _IGMP_V3_REPORT:
            group = _group(_U32.unpack_from(buf, u + 4)[0])
            return Membership(REPORT, [(group, TO_IN if kind == _IGMP_LEAVE else TO_EX, _NONE)])
        return Membership(REPORT, _records(buf, u, end, 4))
    if et != _ETH_IPV6 or proto != _ICMPV6 or u < 0 or n < u + 1:
        return None
    kind = buf[u]
    if kind not in (_MLD_QUERY, _MLD_REPORT, _MLD_DONE, _MLD_V2_REPORT, _MRD6_ADVERT):
        return None
    end = p + 40 + _U16.unpack_from(buf, p + 4)[0]
    if end > n or end < u + (8 if kind in (_MLD_V2_REPORT, _MRD6_ADVERT) else 24):
        raise MembershipError("an MLD message too short or past the frame")
    src = bytes(buf[p + 8 : p + 24])
    if buf[p + 7] != 1 or not (
        (src[0] == 0xFE and src[1] & 0xC0 == 0x80) or (src == _IPV6_ANY and kind != _MLD_QUERY)
    ):
        raise MembershipError("an MLD message not from the link (hop limit 1, fe80::/10)")
    if ipv6_checksum(buf[p + 8 : p + 40], _ICMPV6, buf[u:end]):
        raise MembershipError("an MLD message with a bad checksum")
    if kind == _MRD6_ADVERT:
        return Membership(ROUTER, [])
    if kind == _MLD_QUERY:
        # Milliseconds (RFC 2710 section 3.4), in MLDv2 a float from 32768 on (RFC 3810 5.1.3).
        code = _U16.unpack_from(buf, u + 4)[0]
        if code >= 32768 and end >= u + 28:
            code = _float_code(code, 12)
        return Membership(QUERY, [], code / 1000)
    if kind != _MLD_V2_REPORT:
        group = _group(bytes(buf[u + 8 : u + 24]))
        return Membership(REPORT, [(group, TO_EX if kind == _MLD_REPORT else TO_IN, _NONE)])
    return Membership(REPORT, _records(buf, u, end, 16))


def _float_code(code: int, bits: int) -> int:
    """The value of a Max Resp Code in its floating-point form: a mantissa
    of ``bits`` bits under a 3-bit exponent (RFC 3376 section 4.1.1: 4 bits;
    RFC 3810 section 5.1.3: 12)."""
    mant, exp = code & ((1 << bits) - 1), (code >> bits) & 7
    return (mant | 1 << bits) << (exp + 3)


def _pim_hello(buf: bytearray, n: int, et: int, p: int, u: int) -> Membership | None:
    """A :data:`ROUTER` message for the PIMv2 hello at ``buf[u:]`` whose
    checksum is good (over the message, IPv6 with its pseudo-header: RFC 7761
    section 4.9); None for anything else (PIM that is not snooping's business
    goes on as before)."""
    if et == _ETH_IPV4:
        end = p + _U16.unpack_from(buf, p + 2)[0]
    elif et == _ETH_IPV6:
        end = p + 40 + _U16.unpack_from(buf, p + 4)[0]
    else:
        return None
    if u < 0 or end > n or end < u + 4 or buf[u] != _PIM_HELLO:
        return None
    msg = buf[u:end]
    if ipv6_checksum(buf[p + 8 : p + 40], _PIM, msg) if et == _ETH_IPV6 else inet_checksum(msg):
        return None
    return Membership(ROUTER, [])


def igmp_query(mac: bytes) -> bytes:
    """The Ethernet frame (from ``mac``, to 224.0.0.1) of an IGMPv3 general
    query from 0.0.0.0, as a snooping switch's querier sends it (RFC 4541
    section 2.1.1: a proxy querier's source; it loses every election): TTL 1
    and a router alert option (RFC 3376 section 4)."""
    igmp = bytearray(struct.pack("!BBH4sBBH", 0x11, _RESPONSE_MS // 100, 0, bytes(4), _QRV,
                                 _QQIC, 0))  # fmt: skip
    igmp[2:4] = _U16.pack(inet_checksum(igmp))
    ip = bytearray(struct.pack("!BBHHHBBH4s4sI", 0x46, 0xC0, 24 + len(igmp), 0, 0, 1, _IGMP, 0,
                               bytes(4), bytes([224, 0, 0, 1]), 0x94040000))  # fmt: skip
    ip[10:12] = _U16.pack(inet_checksum(ip))
    return bytes([1, 0, 0x5E, 0, 0, 1]) + mac + _U16.pack(_ETH_IPV4) + ip + igmp


def mld_query(mac: bytes) -> bytes:
    """The Ethernet frame (from ``mac``, to ff02::1) of an MLDv2 general query
    from the EUI-64 link-local address of ``mac`` (RFC 4291 appendix A; a
    query must come from a link-local address, RFC 3810 section 5.1.14): hop
    limit 1 behind a router alert (RFC 2711)."""
    src = bytes.fromhex("fe80000000000000") + bytes([mac[0] ^ 2]) + mac[1:3] + b"\xff\xfe" + mac[3:]
    mld = bytearray(struct.pack("!BBHHH16sBBH", _MLD_QUERY, 0, 0, _RESPONSE_MS, 0, bytes(16),
                                _QRV, _QQIC, 0))  # fmt: skip
    mld[2:4] = _U16.pack(ipv6_checksum(src + _ALL_NODES, _ICMPV6, mld))
    hbh = bytes([_ICMPV6, 0, 5, 2, 0, 0, 1, 0])  # router alert (MLD), PadN
    ip = struct.pack("!IHBB16s16s", 6 << 28, len(hbh) + len(mld), 0, 1, src, _ALL_NODES)
    return b"\x33\x33\x00\x00\x00\x01" + mac + _U16.pack(_ETH_IPV6) + ip + hbh + bytes(mld)


_NONE: frozenset[int | bytes] = frozenset()

#: A member's source filter: (INCLUDE?, sources); the sources it wants
#: (INCLUDE) or does not (EXCLUDE).
Filter = tuple[bool, frozenset[int | bytes]]
#: EXCLUDE nothing: any source (IGMPv1/v2, MLDv1, and most IGMPv3 joins).
ANY_SOURCE: Filter = (False, _NONE)


def admits(f: Filter | None, source: int | bytes) -> bool:
    """Whether a member with filter ``f`` (None: any source) wants ``source``."""
    return f is None or (source in f[1]) == f[0]


def after_record(
    cur: Filter | None, rtype: int, sources: frozenset[int | bytes] | None
) -> Filter | None:
    """A one-host member's filter after one of its group records (RFC 3376
    section 6.4 with the host's own state; ``cur`` None: not a member, and
    None back: no longer one).  A record of more than MAX_SOURCES sources
    (``sources`` None) means any source, except BLOCK, which then changes
    nothing; a set that would grow past MAX_SOURCES likewise."""
    if sources is None:
        return cur if rtype == BLOCK else ANY_SOURCE
    if rtype in (IS_EX, TO_EX):
        return (False, sources)
    if rtype in (IS_IN, TO_IN):
        return (True, sources) if sources else None
    if cur is None:
        return (True, sources) if rtype == ALLOW and sources else None
    include, have = cur
    if rtype == ALLOW:
        if not include:
            return (False, have - sources)
        grown = have | sources
        return (True, grown) if len(grown) <= MAX_SOURCES else ANY_SOURCE
    if include:  # BLOCK
        left = have - sources
        return (True, left) if left else None
    grown = have | sources
    return (False, grown) if len(grown) <= MAX_SOURCES else cur


def _records(buf: bytearray, u: int, end: int, size: int) -> list[Record]:
    """The group records of the IGMPv3 (``size`` 4) or MLDv2 (16) report at
    ``buf[u:end]``; records of unknown types are skipped (RFC 3376 section
    4.2.12)."""
    count = _U16.unpack_from(buf, u + 6)[0]
    if count > MAX_GROUP_RECORDS:
        raise MembershipError(f"a report of {count} group records (at most {MAX_GROUP_RECORDS})")
    out: list[Record] = []
    q = u + 8
    for _ in range(count):
        if q + 4 + size > end:
            raise MembershipError("a group record past the report")
        rtype, aux = buf[q], buf[q + 1]
        nsrc = _U16.unpack_from(buf, q + 2)[0]
        raw = bytes(buf[q + 4 : q + 4 + size])
        first = q + 4 + size
        q = first + nsrc * size + aux * 4
        if q > end:
            raise MembershipError("a group record past the report")
        group = _group(_U32.unpack_from(raw)[0] if size == 4 else raw)
        if rtype not in _TYPES:
            continue
        sources: frozenset[int | bytes] | None = None
        if nsrc <= MAX_SOURCES:
            sources = frozenset(
                _U32.unpack_from(buf, s)[0] if size == 4 else bytes(buf[s : s + 16])
                for s in range(first, first + nsrc * size, size)
            )
        out.append((group, rtype, sources))
    return out
