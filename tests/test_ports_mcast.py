"""IGMP and MLD snooping on the switch (``set_mcast_snoop``, virtnet.ports.mcast)."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import struct
from collections.abc import Iterator, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from test_ports_switch import Clock, TrackingSwitch, drain, mac, pump, send
from virtnet.net import inet_checksum, ipv6_checksum
from virtnet.ports import VNET_HDR_LEN, SocketQueue
from virtnet.ports import switch as sw_mod
from virtnet.ports.mcast import (
    ALLOW,
    ANY_SOURCE,
    BLOCK,
    IS_EX,
    IS_IN,
    MAX_GROUP_RECORDS,
    MAX_SOURCES,
    MEMBERSHIP_S,
    OTHER_QUERIER_S,
    QUERY,
    QUERY_INTERVAL_S,
    RESPONSE_S,
    TO_EX,
    TO_IN,
    Filter,
    Membership,
    MembershipError,
    admits,
    after_record,
    igmp_query,
    membership,
    mld_query,
)
from virtnet.ports.switch import Switch

ROUTER_ALERT = b"\x94\x04\x00\x00"  # IPv4 option (RFC 2113)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def sw(clock: Clock) -> Iterator[Switch]:
    s = TrackingSwitch(clock)  # snooping comes on once the test's VMs are in
    yield s
    s.close()
    for q in s.handed:
        q.close()


def _packed(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def _group_mac(group: str) -> bytes:
    """The Ethernet address of an IP multicast group (RFC 1112 section 6.4, RFC 2464 section 7)."""
    g = _packed(group)
    return b"\x33\x33" + g[12:] if len(g) == 16 else bytes([1, 0, 0x5E, g[1] & 0x7F, g[2], g[3]])


def _frame(src: bytes, dst_ip: str, ethertype: int, ip: bytes, vlan: int | None) -> bytes:
    tag = b"" if vlan is None else struct.pack("!HH", 0x8100, vlan)
    eth = _group_mac(dst_ip) + src + tag + struct.pack("!H", ethertype)
    return bytes(VNET_HDR_LEN) + eth + ip


def _ipv4(src: str, dst: str, proto: int, body: bytes, *, ttl: int = 1) -> bytes:
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x46, 0, 24 + len(body), 0, 0, ttl, proto, 0,
                                _packed(src), _packed(dst)) + ROUTER_ALERT)  # fmt: skip
    hdr[10:12] = struct.pack("!H", inet_checksum(hdr))
    return bytes(hdr) + body


def _report(
    records: Sequence[tuple[int, str, int]], version: int, claimed: int | None = None
) -> bytearray:
    """An IGMPv3 (``version`` 4) or MLDv2 (6) report of ``records``, each
    (record type, group, number of sources: :func:`source` 1, 2...; each
    claims ``claimed`` sources if given), its checksum not set."""
    kind, record = (0x22, "!BBH4s") if version == 4 else (143, "!BBH16s")
    body = bytearray(struct.pack("!BBHHH", kind, 0, 0, 0, len(records)))
    for rtype, g, nsrc in records:
        body += struct.pack(record, rtype, 0, nsrc if claimed is None else claimed, _packed(g))
        body += b"".join(_packed(source(i, version)) for i in range(1, nsrc + 1))
    return body


def igmp(
    src: bytes,
    kind: int,
    group: str = "0.0.0.0",
    *,
    records: Sequence[tuple[int, str, int]] = (),
    vlan: int | None = None,
    bad_checksum: bool = False,
    claimed: int | None = None,
) -> bytes:
    """An IGMP message from MAC ``src``: a v1/v2 report, v2 leave or query
    of ``group``, or (``kind`` 0x22) a v3 report of ``records`` (:func:`_report`)."""
    if kind == 0x22:
        body = _report(records, 4, claimed)
        dst = "224.0.0.22"
    else:
        body = bytearray(struct.pack("!BBH4s", kind, 100, 0, _packed(group)))
        dst = {0x11: "224.0.0.1", 0x17: "224.0.0.2"}.get(kind, group)
    body[2:4] = struct.pack("!H", inet_checksum(body) ^ (0x1111 if bad_checksum else 0))
    return _frame(src, dst, 0x0800, _ipv4("10.0.0.9", dst, 2, bytes(body)), vlan)


def mld(
    src: bytes,
    kind: int,
    group: str = "::",
    *,
    records: Sequence[tuple[int, str, int]] = (),
    vlan: int | None = None,
    ip_src: str = "fe80::9",
    hop: int = 1,
) -> bytes:
    """An MLD message from MAC ``src`` (behind a hop-by-hop router alert):
    a v1 report (131), done (132) or query (130) of ``group``, or (143) a
    v2 report of ``records``."""
    if kind == 143:
        body = _report(records, 6)
        dst = "ff02::16"
    else:
        body = bytearray(struct.pack("!BBHHH16s", kind, 0, 0, 1000, 0, _packed(group)))
        dst = {130: "ff02::1", 132: "ff02::2"}.get(kind, group)
    body[2:4] = struct.pack("!H", ipv6_checksum(_packed(ip_src) + _packed(dst), 58, body))
    hbh = bytes([58, 0, 5, 2, 0, 0, 1, 0])  # router alert (RFC 2711), PadN
    ip = struct.pack("!IHBB16s16s", 0x60000000, len(hbh) + len(body), 0, hop, _packed(ip_src),
                     _packed(dst)) + hbh + bytes(body)  # fmt: skip
    return _frame(src, dst, 0x86DD, ip, vlan)


def source(i: int, version: int) -> str:
    """The ``i``-th source address of the group records these tests build."""
    return f"10.9.0.{i}" if version == 4 else f"fd09::{i}"


def data(src: bytes, group: str, *, vlan: int | None = None, ip: int = 0) -> bytes:
    """A UDP datagram from MAC ``src`` to ``group``, from IP :func:`source`
    ``ip`` (0: 10.0.0.9 or fe80::9, a source no record names)."""
    udp = struct.pack("!HHHH", 5000, 5000, 8, 0)
    if ":" in group:
        sip = source(ip, 6) if ip else "fe80::9"
        hdr = struct.pack("!IHBB16s16s", 0x60000000, 8, 17, 1, _packed(sip), _packed(group))
        return _frame(src, group, 0x86DD, hdr + udp, vlan)
    sip = source(ip, 4) if ip else "10.0.0.9"
    return _frame(src, group, 0x0800, _ipv4(sip, group, 17, udp, ttl=4), vlan)


def who_gets(sw: Switch, q: SocketQueue, f: bytes, queues: dict[str, SocketQueue]) -> set[str]:
    """The members of ``queues`` the frame ``f`` sent on ``q`` reaches."""
    for other in queues.values():
        drain(other)
    assert send(q, f)
    pump(sw)
    return {name for name, other in queues.items() if drain(other)}


@contextlib.contextmanager
def uplink(sw: Switch) -> Iterator[SocketQueue]:
    """A tap uplink ``up`` on ``sw``: our end of it, closed afterwards."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sw.attach_tap("up", os.dup(theirs.fileno()))
    theirs.close()
    up = SocketQueue(mine)
    try:
        yield up
    finally:
        up.close()


def ask(sw: Switch, clock: Clock, qs: dict[str, SocketQueue]) -> None:
    """Make the switch the querier and wait until its first queries have
    been answered (snooping holds traffic back from then on)."""
    sw.set_mcast_querier(True)
    for wait in (1.0, RESPONSE_S):
        clock.t += wait
        pump(sw)
        for q in qs.values():
            drain(q)


def test_igmp_snooping_sends_a_group_to_its_members(sw: Switch, clock: Clock) -> None:
    """With a querier, a group's traffic goes to the VMs that reported it
    (IGMPv2 and v3 records), unreported groups and 224.0.0.0/24 flood, a
    leave or TO_IN({}) ends a VM's membership at once; with no querier, or
    snooping off, all floods."""
    qs = {v: sw.open_queue(v, 0) for v in "abcd"}
    sw.set_mcast_snoop(True)
    a = qs["a"]
    everyone = {"b", "c", "d"}
    assert who_gets(sw, a, data(mac(1), "239.1.1.1"), qs) == everyone  # nobody reported it
    # With no querier, reports flood and so does a reported group's traffic.
    assert who_gets(sw, qs["b"], igmp(mac(2), 0x16, "239.1.1.1"), qs) == {"a", "c", "d"}
    assert who_gets(sw, a, data(mac(1), "239.1.1.1"), qs) == everyone
    ask(sw, clock, qs)
    # Now reports reach no other VM (no multicast router here).
    assert who_gets(sw, qs["b"], igmp(mac(2), 0x16, "239.1.1.1"), qs) == set()
    v3 = igmp(mac(3), 0x22, records=[(TO_EX, "239.1.1.1", 0), (IS_IN, "239.2.2.2", 2),
                                     (IS_IN, "239.3.3.3", 0), (9, "239.4.4.4", 0)])  # fmt: skip
    who_gets(sw, qs["c"], v3, qs)
    assert sw.snapshot().groups == {
        "b": ["239.1.1.1"], "c": ["239.1.1.1", "239.2.2.2 from 10.9.0.1,10.9.0.2"],
    }  # fmt: skip
    assert sw.snapshot().mcast_joined == 4
    assert who_gets(sw, a, data(mac(1), "239.1.1.1"), qs) == {"b", "c"}
    assert who_gets(sw, a, data(mac(1), "239.2.2.2", ip=2), qs) == {"c"}
    assert who_gets(sw, a, data(mac(1), "239.2.2.2"), qs) == set()  # not a source c asked for
    assert who_gets(sw, qs["c"], data(mac(3), "239.2.2.2", ip=1), qs) == set()  # its only member
    assert who_gets(sw, a, data(mac(1), "239.3.3.3"), qs) == everyone  # IS_IN({}): not joined
    assert sw.snapshot().mcast_forwarded == 6  # 4 datagrams and 2 reports held back
    # The local network control block always floods, reported or not.
    who_gets(sw, qs["b"], igmp(mac(2), 0x16, "224.0.0.251"), qs)
    assert who_gets(sw, a, data(mac(1), "224.0.0.251"), qs) == everyone
    # A leave (v2) and a TO_IN({}) record (v3) end a VM's membership at once.
    who_gets(sw, qs["b"], igmp(mac(2), 0x17, "239.1.1.1"), qs)
    assert who_gets(sw, a, data(mac(1), "239.1.1.1"), qs) == {"c"}
    who_gets(sw, qs["c"], igmp(mac(3), 0x22, records=[(TO_IN, "239.1.1.1", 0)]), qs)
    assert who_gets(sw, a, data(mac(1), "239.1.1.1"), qs) == everyone
    # BLOCK takes a source from c's INCLUDE list; TO_IN of a source joins d for it.
    who_gets(sw, qs["c"], igmp(mac(3), 0x22, records=[(BLOCK, "239.2.2.2", 1)]), qs)
    who_gets(sw, qs["d"], igmp(mac(4), 0x22, records=[(TO_IN, "239.2.2.2", 1)]), qs)
    assert who_gets(sw, a, data(mac(1), "239.2.2.2", ip=1), qs) == {"d"}
    assert who_gets(sw, a, data(mac(1), "239.2.2.2", ip=2), qs) == {"c"}
    sw.set_mcast_snoop(False)
    assert sw.snapshot().groups == {}
    assert who_gets(sw, a, data(mac(1), "239.2.2.2", ip=1), qs) == everyone


def test_mld_snooping_and_vlans(sw: Switch, clock: Clock) -> None:
    """MLDv1 and v2 reports make memberships per VLAN; ff02::1 floods; a
    done ends one; a report not from the link (hop limit, source) or with
    a bad checksum is refused and its sender gets every group."""
    qs = {v: sw.open_queue(v, 0) for v in "abcd"}
    for v in "abcd":
        sw.set_vlans(v, [0, 100])
    ask(sw, clock, qs)
    a = qs["a"]
    who_gets(sw, qs["b"], mld(mac(2), 131, "ff05::1:3"), qs)
    v2 = mld(mac(3), 143, records=[(IS_EX, "ff02::1:ff00:3", 0), (ALLOW, "ff0e::77", 1)],
             ip_src="::", vlan=100)  # fmt: skip
    who_gets(sw, qs["c"], v2, qs)
    assert sw.snapshot().groups == {
        "b": ["ff05::1:3"], "c": ["ff02::1:ff00:3 vlan 100", "ff0e::77 from fd09::1 vlan 100"],
    }  # fmt: skip
    assert who_gets(sw, a, data(mac(1), "ff05::1:3"), qs) == {"b"}
    assert who_gets(sw, a, data(mac(1), "ff05::1:3", vlan=100), qs) == {"b", "c", "d"}
    assert who_gets(sw, a, data(mac(1), "ff0e::77", vlan=100, ip=1), qs) == {"c"}
    assert who_gets(sw, a, data(mac(1), "ff0e::77"), qs) == {"b", "c", "d"}
    # Not IP, though its bytes where an IPv6 group would be name b's: flooded.
    other = _frame(mac(1), "ff05::1:3", 0x88B5, bytes(24) + _packed("ff05::1:3"), None)
    assert who_gets(sw, a, other, qs) == {"b", "c", "d"}
    who_gets(sw, qs["b"], mld(mac(2), 131, "ff02::1"), qs)  # all nodes: never snooped
    assert who_gets(sw, a, data(mac(1), "ff02::1"), qs) == {"b", "c", "d"}
    who_gets(sw, qs["b"], mld(mac(2), 132, "ff05::1:3"), qs)
    assert who_gets(sw, a, data(mac(1), "ff05::1:3"), qs) == {"b", "c", "d"}
    # d's reports the switch may not read: d gets every group from then on.
    assert who_gets(sw, a, data(mac(1), "ff0e::77", vlan=100, ip=1), qs) == {"c"}
    for refused, bad in enumerate(
        (
            mld(mac(4), 131, "ff05::9", hop=255),
            mld(mac(4), 131, "ff05::9", ip_src="2001:db8::4"),
            mld(mac(4), 130, ip_src="::"),  # a query from ::
            igmp(mac(4), 0x16, "239.9.9.9", bad_checksum=True),
            igmp(mac(4), 0x16, "10.0.0.1"),  # not a group
            igmp(mac(4), 0x22, records=[(IS_EX, "239.9.9.9", 1)], claimed=2),  # past the report
        ),
        start=1,
    ):
        assert who_gets(sw, qs["d"], bad, qs) == {"a", "b", "c"}  # flooded as before
        assert sw.snapshot().mcast_refused == refused
    assert who_gets(sw, a, data(mac(1), "ff0e::77", vlan=100, ip=1), qs) == {"c", "d"}
    assert "d" not in sw.snapshot().groups


def test_router_ports_get_reports_and_every_group(sw: Switch, clock: Clock) -> None:
    """A trusted member that sends a query is a router port and the VLAN's
    querier: it gets every reported group and the reports, which no longer
    reach the other VMs; from RESPONSE_S after its first query snooping holds
    traffic back, until OTHER_QUERIER_S passes without a query.  A VM held
    to its addresses does not become one; one under the router guard may not
    send queries at all.  Memberships end MEMBERSHIP_S after their last report."""
    qs = {v: sw.open_queue(v, 0) for v in "abcde"}
    sw.set_ips("e", [_packed("10.0.0.9"), _packed("fe80::9")])
    sw.set_guards("c", ["router"])
    sw.set_mcast_snoop(True)
    everyone = {"b", "c", "d", "e"}
    assert who_gets(sw, qs["e"], igmp(mac(5), 0x11), qs) == {"a", "b", "c", "d"}
    assert who_gets(sw, qs["c"], igmp(mac(3), 0x11), qs) == set()
    assert who_gets(sw, qs["c"], mld(mac(3), 130), qs) == set()
    assert sw.snapshot().dropped_guard == 2
    assert sw.snapshot().mrouters == []
    assert who_gets(sw, qs["b"], igmp(mac(2), 0x16, "239.1.1.1"), qs) == {"a", "c", "d", "e"}
    assert who_gets(sw, qs["a"], data(mac(1), "239.1.1.1"), qs) == everyone  # no querier
    assert who_gets(sw, qs["d"], mld(mac(4), 130), qs) == {"a", "b", "c", "e"}
    assert sw.snapshot().mrouters == ["d"]
    assert who_gets(sw, qs["b"], igmp(mac(2), 0x16, "239.1.1.1"), qs) == {"d"}
    assert who_gets(sw, qs["a"], data(mac(1), "239.1.1.1"), qs) == everyone  # hosts answering
    clock.t += RESPONSE_S
    assert who_gets(sw, qs["a"], data(mac(1), "239.1.1.1"), qs) == {"b", "d"}
    assert who_gets(sw, qs["a"], data(mac(1), "239.7.7.7"), qs) == everyone
    clock.t += MEMBERSHIP_S / 2
    who_gets(sw, qs["b"], igmp(mac(2), 0x16, "239.1.1.1"), qs)  # renewed
    renewed = clock.t
    clock.t += OTHER_QUERIER_S / 2
    pump(sw)
    # The querier went silent: b is still a member, but everything floods again.
    assert sw.snapshot().mrouters == []
    assert sw.snapshot().groups == {"b": ["239.1.1.1"]}
    assert who_gets(sw, qs["a"], data(mac(1), "239.1.1.1"), qs) == everyone
    who_gets(sw, qs["d"], mld(mac(4), 130), qs)
    clock.t += RESPONSE_S
    assert who_gets(sw, qs["a"], data(mac(1), "239.1.1.1"), qs) == {"b", "d"}
    clock.t = renewed + MEMBERSHIP_S - 1
    sw.poll_once(0)
    assert sw.snapshot().groups == {"b": ["239.1.1.1"]}
    clock.t += 2
    sw.poll_once(0)
    assert sw.snapshot().groups == {}
    assert who_gets(sw, qs["a"], data(mac(1), "239.1.1.1"), qs) == everyone


def test_an_uplinks_leave_waits_and_groups_are_capped(
    sw: Switch, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The uplink may have several hosts behind it: its leaves do not end its
    membership (it ages out).  A VM past MCAST_GROUPS_PER_VM gets every
    group; a removed VM's memberships go with it."""
    monkeypatch.setattr(sw_mod, "MCAST_GROUPS_PER_VM", 2)
    qs = {v: sw.open_queue(v, 0) for v in "ab"}
    with uplink(sw) as up:
        qs["up"] = up
        ask(sw, clock, qs)
        who_gets(sw, up, igmp(mac(9), 0x16, "239.1.1.1"), qs)
        who_gets(sw, up, igmp(mac(9), 0x17, "239.1.1.1"), qs)
        assert sw.snapshot().groups == {"up": ["239.1.1.1"]}
        assert who_gets(sw, qs["a"], data(mac(1), "239.1.1.1"), qs) == {"up"}
        records = [(IS_EX, f"239.0.0.{i}", 0) for i in (1, 2, 3)]
        who_gets(sw, qs["b"], igmp(mac(2), 0x22, records=records), qs)
        assert sw.snapshot().groups["b"] == ["239.0.0.1", "239.0.0.2"]
        assert sw.snapshot().mcast_refused == 1
        assert who_gets(sw, qs["a"], data(mac(1), "239.1.1.1"), qs) == {"up", "b"}
        sw.remove_vm("up")
        assert sw.snapshot().groups == {"b": ["239.0.0.1", "239.0.0.2"]}
        assert not sw._groups.get((0, int(ipaddress.IPv4Address("239.1.1.1"))))


def test_the_control_channel_turns_snooping_on_and_off(sw: Switch) -> None:
    sw._command({"op": "mcast_snoop", "vm": "", "on": True}, [])
    assert sw._mcast
    sw._command({"op": "mcast_querier", "vm": "", "on": True}, [])
    assert sw._querier
    sw._command({"op": "mcast_snoop", "vm": "", "on": False}, [])
    assert not sw._mcast and not sw._querier


def test_membership_limits() -> None:
    """MAX_GROUP_RECORDS records per report at most; a fragmented IGMP
    message is refused; other IGMP types (DVMRP) are none of snooping's."""
    many = [(IS_EX, "239.0.0.1", 0)] * (MAX_GROUP_RECORDS + 1)

    def parse(f: bytes) -> Membership | None:
        buf = bytearray(f)
        return membership(buf, len(buf), *sw_mod._l3(buf, len(buf), VNET_HDR_LEN + 12))

    for bad in (
        igmp(mac(1), 0x22, records=many),
        igmp(mac(1), 0x22, records=many[:-1])[:-8],  # truncated
    ):
        with pytest.raises(MembershipError):
            parse(bad)
    got = parse(igmp(mac(1), 0x22, records=many[:-1]))
    assert got is not None and len(got[1]) == MAX_GROUP_RECORDS
    fragment = bytearray(igmp(mac(1), 0x16, "239.1.1.1"))
    fragment[VNET_HDR_LEN + 14 + 6] |= 0x20  # more fragments
    with pytest.raises(MembershipError):
        parse(bytes(fragment))
    assert parse(igmp(mac(1), 0x13, "239.1.1.1")) is None  # DVMRP


def _igmp3_query(src: bytes, code: int) -> bytes:
    """An IGMPv3 general query whose Max Resp Code is ``code``."""
    body = bytearray(struct.pack("!BBH4sBBH", 0x11, code, 0, bytes(4), 2, 125, 0))
    body[2:4] = struct.pack("!H", inet_checksum(body))
    return _frame(src, "224.0.0.1", 0x0800, _ipv4("10.0.0.9", "224.0.0.1", 2, bytes(body)), None)


def test_query_response_times() -> None:
    """A query's Maximum Response Time: IGMPv1 (code 0) 10 s, IGMPv2 in
    tenths, IGMPv3 and MLDv2 in their floating-point form, MLDv1 in ms."""

    def response(f: bytes) -> float:
        buf = bytearray(f)
        got = membership(buf, len(buf), *sw_mod._l3(buf, len(buf), VNET_HDR_LEN + 12))
        assert got is not None and got.kind == QUERY
        return got.response_s

    v2 = bytearray(igmp(mac(1), 0x11))
    v2[VNET_HDR_LEN + 14 + 24 + 1] = 0  # code 0: IGMPv1
    v2[VNET_HDR_LEN + 14 + 24 + 2 : VNET_HDR_LEN + 14 + 24 + 4] = bytes(2)
    cs = inet_checksum(v2[VNET_HDR_LEN + 14 + 24 :])
    v2[VNET_HDR_LEN + 14 + 24 + 2 : VNET_HDR_LEN + 14 + 24 + 4] = struct.pack("!H", cs)
    assert response(bytes(v2)) == 10.0
    assert response(igmp(mac(1), 0x11)) == 10.0  # code 100
    assert response(_igmp3_query(mac(1), 50)) == 5.0
    assert response(_igmp3_query(mac(1), 0x8F)) == 24.8  # (0xF | 0x10) << 3 tenths
    assert response(mld(mac(1), 130)) == 1.0  # MLDv1, 1000 ms
    assert response(bytes(VNET_HDR_LEN) + mld_query(mac(1))) == 10.0  # the switch's own
    assert response(bytes(VNET_HDR_LEN) + igmp_query(mac(1))) == 10.0


def test_an_outside_queriers_response_time_delays_snooping(sw: Switch, clock: Clock) -> None:
    """Snooping holds traffic back from the querier's Maximum Response Time
    after its first query, not a fixed 10 s: hosts may answer that late.  A
    VM that joins the switch then gets every group for MEMBERSHIP_S."""
    qs = {v: sw.open_queue(v, 0) for v in "abcd"}
    sw.set_mcast_snoop(True)
    who_gets(sw, qs["c"], _igmp3_query(mac(3), 0x8F), qs)  # 24.8 s
    assert who_gets(sw, qs["b"], igmp(mac(2), 0x16, "239.1.1.1"), qs) == {"c"}
    clock.t += 20
    assert who_gets(sw, qs["a"], data(mac(1), "239.1.1.1"), qs) == {"b", "c", "d"}
    clock.t += 5
    assert who_gets(sw, qs["a"], data(mac(1), "239.1.1.1"), qs) == {"b", "c"}
    # A VM that comes now gets every group until it would have answered c's
    # next query: it may listen to groups it reported elsewhere.
    qs["e"] = sw.open_queue("e", 0)
    assert who_gets(sw, qs["a"], data(mac(1), "239.1.1.1"), qs) == {"b", "c", "e"}
    clock.t += MEMBERSHIP_S
    who_gets(sw, qs["c"], _igmp3_query(mac(3), 0x8F), qs)  # c was silent too long: anew
    who_gets(sw, qs["b"], igmp(mac(2), 0x16, "239.1.1.1"), qs)
    clock.t += 25
    assert who_gets(sw, qs["a"], data(mac(1), "239.1.1.1"), qs) == {"b", "c"}


@given(st.binary(min_size=0, max_size=200), st.integers(0, 210))
@settings(max_examples=400, deadline=None)
def test_membership_takes_any_bytes(raw: bytes, n: int) -> None:
    """Whatever a guest sends, membership() answers or raises MembershipError."""
    buf = bytearray(2048)
    for base in (igmp(mac(1), 0x22, records=[(IS_EX, "239.0.0.1", 1)]),
                 mld(mac(1), 143, records=[(IS_EX, "ff05::1", 1)])):  # fmt: skip
        buf[: len(base)] = base
        buf[VNET_HDR_LEN + 14 : VNET_HDR_LEN + 14 + len(raw)] = raw
        n = min(n, len(base))
        l3 = sw_mod._l3(buf, n, VNET_HDR_LEN + 12)
        try:
            got = membership(buf, n, *l3)
        except MembershipError:
            continue
        assert got is None or all(isinstance(g, (int, bytes)) for g, _t, _s in got.records)


def _queries(frames: list[bytes]) -> list[tuple[int | None, int]]:
    """The general queries among ``frames``: (VLAN or None, EtherType), each
    checked as a valid query (checksums, hop limit, link-local source)."""
    out: list[tuple[int | None, int]] = []
    for f in frames:
        buf = bytearray(f)
        tagged = buf[VNET_HDR_LEN + 12 : VNET_HDR_LEN + 14] == b"\x81\x00"
        l3 = sw_mod._l3(buf, len(buf), VNET_HDR_LEN + 12 + (4 if tagged else 0))
        assert membership(buf, len(buf), *l3) == (QUERY, [], RESPONSE_S), f.hex()
        vlan = struct.unpack_from("!H", buf, VNET_HDR_LEN + 14)[0] if tagged else None
        out.append((vlan, l3[0]))
    return sorted(out, key=lambda q: (q[0] or 0, q[1]))


def test_the_switch_as_querier(sw: Switch, clock: Clock) -> None:
    """``set_mcast_querier``: a second after it starts or a VM joins, then a
    quarter interval later, then every QUERY_INTERVAL_S, every member of each
    VLAN gets an IGMPv3 and an MLDv2 general query (tagged on its VLAN) -
    except on a VLAN where a member sends queries itself; reports reach no
    other VM; a reported group floods until RESPONSE_S after the first query."""
    qs = {v: sw.open_queue(v, 0) for v in "ab"}
    sw.set_vlans("b", [0, 100])
    sw.set_mcast_querier(True)
    pump(sw)
    assert drain(qs["a"]) == []
    clock.t += 1
    pump(sw)
    both = [(None, 0x0800), (None, 0x86DD)]
    assert _queries(drain(qs["a"])) == both
    assert _queries(drain(qs["b"])) == [*both, (100, 0x0800), (100, 0x86DD)]
    assert sw.snapshot().mcast_queries == 4
    who_gets(sw, qs["b"], igmp(mac(2), 0x16, "239.1.1.1"), qs)
    assert who_gets(sw, qs["b"], data(mac(2), "239.1.1.1"), qs) == {"a"}  # not held back yet
    clock.t += RESPONSE_S
    assert who_gets(sw, qs["b"], data(mac(2), "239.1.1.1"), qs) == set()  # its own group
    clock.t -= RESPONSE_S
    clock.t += QUERY_INTERVAL_S / 4
    pump(sw)
    assert len(drain(qs["a"])) == 2  # the second startup query
    clock.t += QUERY_INTERVAL_S / 2
    pump(sw)
    assert drain(qs["a"]) == []
    clock.t += QUERY_INTERVAL_S / 2
    pump(sw)
    assert len(drain(qs["a"])) == 2
    # The guests' answers are snooped and sent to no one.
    assert who_gets(sw, qs["b"], igmp(mac(2), 0x22, records=[(IS_EX, "239.1.1.1", 0)]), qs) == set()
    assert sw.snapshot().groups == {"b": ["239.1.1.1"]}
    # A member that queries on VLAN 0 silences the switch there, not on VLAN 100.
    who_gets(sw, qs["b"], mld(mac(2), 130), qs)
    clock.t += QUERY_INTERVAL_S
    pump(sw)
    assert drain(qs["a"]) == []
    assert _queries(drain(qs["b"])) == [(100, 0x0800), (100, 0x86DD)]
    # A new VM is asked at once (in a second), and gets every group until
    # it has answered.
    qs["c"] = sw.open_queue("c", 0)
    clock.t += 1
    pump(sw)
    assert len(drain(qs["b"])) == 2 and drain(qs["c"]) == []  # VLAN 0 has b for querier
    assert who_gets(sw, qs["a"], data(mac(1), "239.1.1.1"), qs) == {"b", "c"}
    clock.t += RESPONSE_S
    assert who_gets(sw, qs["a"], data(mac(1), "239.1.1.1"), qs) == {"b"}
    sw.set_mcast_snoop(False)
    clock.t += QUERY_INTERVAL_S
    pump(sw)
    assert drain(qs["b"]) == []


def test_a_one_host_members_source_filter() -> None:
    """after_record follows RFC 3376 section 6.4 for a port with one host;
    more sources than MAX_SOURCES read as any source (BLOCK: no change)."""
    a, b = frozenset({1}), frozenset({2})
    many = frozenset(range(MAX_SOURCES))
    none: frozenset[int | bytes] = frozenset()
    cases: list[tuple[Filter | None, int, frozenset[int | bytes] | None, Filter | None]] = [
        (None, IS_EX, none, ANY_SOURCE),
        (None, TO_EX, a, (False, a)),
        (None, IS_IN, a, (True, a)),
        (None, TO_IN, none, None),
        (None, ALLOW, a, (True, a)),
        (None, ALLOW, none, None),
        (None, BLOCK, a, None),
        ((True, a), ALLOW, b, (True, a | b)),
        ((True, a | b), BLOCK, a, (True, b)),
        ((True, a), BLOCK, a, None),
        ((False, a), ALLOW, a, ANY_SOURCE),
        ((False, a), BLOCK, b, (False, a | b)),
        ((True, a), TO_EX, b, (False, b)),
        ((False, a), TO_IN, b, (True, b)),
        ((False, a), IS_IN, none, None),
        ((True, a), IS_IN, None, ANY_SOURCE),
        ((True, a), BLOCK, None, (True, a)),
        ((True, many), ALLOW, frozenset({-1}), ANY_SOURCE),
        ((False, many), BLOCK, frozenset({-1}), (False, many)),
    ]
    for cur, rtype, sources, want in cases:
        assert after_record(cur, rtype, sources) == want, (cur, rtype, sources)
    assert admits((True, a), 1) and not admits((True, a), 2)
    assert admits((False, a), 2) and not admits((False, a), 1)
    assert admits(None, 1) and admits(ANY_SOURCE, 1)


def test_source_specific_memberships(sw: Switch, clock: Clock) -> None:
    """A VM's INCLUDE or EXCLUDE list decides which sources' datagrams it
    gets; a record of more than MAX_SOURCES sources, and any join from the
    uplink (several hosts may be behind it), is for any source."""
    qs = {v: sw.open_queue(v, 0) for v in "abc"}
    with uplink(sw) as up:
        qs["up"] = up
        ask(sw, clock, qs)
        who_gets(sw, qs["b"], igmp(mac(2), 0x22, records=[(TO_EX, "239.5.5.5", 1)]), qs)
        who_gets(sw, qs["c"], igmp(mac(3), 0x22, records=[(IS_IN, "239.5.5.5", 2)]), qs)
        who_gets(sw, up, igmp(mac(9), 0x22, records=[(IS_IN, "239.5.5.5", 1)]), qs)
        assert sw.snapshot().groups == {
            "b": ["239.5.5.5 not from 10.9.0.1"],
            "c": ["239.5.5.5 from 10.9.0.1,10.9.0.2"],
            "up": ["239.5.5.5"],
        }
        assert who_gets(sw, qs["a"], data(mac(1), "239.5.5.5", ip=1), qs) == {"c", "up"}
        assert who_gets(sw, qs["a"], data(mac(1), "239.5.5.5", ip=2), qs) == {"b", "c", "up"}
        assert who_gets(sw, qs["a"], data(mac(1), "239.5.5.5"), qs) == {"b", "up"}
        big = igmp(mac(3), 0x22, records=[(IS_IN, "239.5.5.5", MAX_SOURCES + 1)])
        who_gets(sw, qs["c"], big, qs)
        assert sw.snapshot().groups["c"] == ["239.5.5.5"]
        assert who_gets(sw, qs["a"], data(mac(1), "239.5.5.5"), qs) == {"b", "c", "up"}
        # The uplink's leave changes nothing (it ages out); a VM's ends its membership.
        who_gets(sw, up, igmp(mac(9), 0x22, records=[(TO_IN, "239.5.5.5", 0)]), qs)
        who_gets(sw, qs["b"], igmp(mac(2), 0x22, records=[(TO_IN, "239.5.5.5", 0)]), qs)
        assert who_gets(sw, qs["a"], data(mac(1), "239.5.5.5", ip=2), qs) == {"c", "up"}


def _pim_hello(src: bytes, ip_src: str, *, bad_checksum: bool = False) -> bytes:
    """A PIMv2 hello (holdtime option 105 s) from ``ip_src`` to ALL-PIM-ROUTERS."""
    body = bytearray(struct.pack("!BBHHHH", 0x20, 0, 0, 1, 2, 105))
    if ":" in ip_src:
        dst = "ff02::d"
        cs = ipv6_checksum(_packed(ip_src) + _packed(dst), 103, body)
        body[2:4] = struct.pack("!H", cs ^ (1 if bad_checksum else 0))
        ip = struct.pack("!IHBB16s16s", 0x60000000, len(body), 103, 1, _packed(ip_src),
                         _packed(dst)) + bytes(body)  # fmt: skip
        return _frame(src, dst, 0x86DD, ip, None)
    body[2:4] = struct.pack("!H", inet_checksum(body) ^ (1 if bad_checksum else 0))
    return _frame(src, "224.0.0.13", 0x0800, _ipv4(ip_src, "224.0.0.13", 103, bytes(body)), None)


def _mrd_advert(src: bytes, version: int) -> bytes:
    """A multicast router discovery advertisement (RFC 4286), IGMP or ICMPv6."""
    if version == 4:
        body = bytearray(struct.pack("!BBHHH", 0x30, 20, 0, 125, 2))
        body[2:4] = struct.pack("!H", inet_checksum(body))
        return _frame(src, "224.0.0.106", 0x0800, _ipv4("10.0.0.9", "224.0.0.106", 2, bytes(body)),
                      None)  # fmt: skip
    ip_src, dst = "fe80::9", "ff02::6a"
    body = bytearray(struct.pack("!BBHHH", 151, 20, 0, 125, 2))
    body[2:4] = struct.pack("!H", ipv6_checksum(_packed(ip_src) + _packed(dst), 58, body))
    ip = struct.pack("!IHBB16s16s", 0x60000000, len(body), 58, 1, _packed(ip_src),
                     _packed(dst)) + bytes(body)  # fmt: skip
    return _frame(src, dst, 0x86DD, ip, None)


def test_routers_that_do_not_query(sw: Switch, clock: Clock) -> None:
    """A trusted member that sends a PIM hello (IPv4 or IPv6) or a multicast
    router discovery advertisement is a router port without being the
    querier: it gets every reported group.  A VM held to its addresses does
    not become one; a hello with a bad checksum is not one (and is no report
    either: nothing is refused)."""
    qs = {v: sw.open_queue(v, 0) for v in "abcde"}
    sw.set_ips("e", [_packed("10.0.0.9"), _packed("fe80::9")])
    ask(sw, clock, qs)
    who_gets(sw, qs["b"], igmp(mac(2), 0x16, "239.1.1.1"), qs)
    assert who_gets(sw, qs["a"], data(mac(1), "239.1.1.1"), qs) == {"b"}
    for sender, hello in (
        ("e", _pim_hello(mac(5), "10.0.0.9")),
        ("c", _pim_hello(mac(3), "fe80::3", bad_checksum=True)),
        ("c", _pim_hello(mac(3), "10.0.0.3", bad_checksum=True)),
    ):
        assert who_gets(sw, qs[sender], hello, qs) == {"a", "b", "c", "d", "e"} - {sender}
    assert sw.snapshot().mrouters == [] and sw.snapshot().mcast_refused == 0
    for sender, hello in (
        ("c", _pim_hello(mac(3), "fe80::3")),
        ("d", _mrd_advert(mac(4), 4)),
        ("a", _mrd_advert(mac(1), 6)),
    ):
        who_gets(sw, qs[sender], hello, qs)
    assert sorted(sw.snapshot().mrouters) == ["a", "c", "d"]
    assert who_gets(sw, qs["e"], data(mac(5), "239.1.1.1"), qs) == {"a", "b", "c", "d"}
    clock.t += OTHER_QUERIER_S + 1
    pump(sw)
    assert sw.snapshot().mrouters == []
