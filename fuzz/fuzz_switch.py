"""Fuzz target: the switch's forwarding path under frames from hostile guests.

Three VMs (a, b, c) join an in-process :class:`~virtnet.ports.switch.Switch`
that snoops IGMP and MLD as the querier; the input's first byte picks what is
checked on b and c (MAC lock, with the switch answering ARP and NS for b; IP
source guard with or without DHCP and SLAAC learning; DHCP and router guards;
VLANs; a rate), then comes a list of
frames, each ``who u8`` (the sending VM, and how far the
clock moves first) + ``len u8`` + that many bytes (the 12-byte virtio-net
header and the frame; a length of 255 takes the rest of the input).  The tables
are made small (8 MACs, 3 per VM, 6 address bindings, 2 per VM, 2 SLAAC
prefixes per VLAN, 3 multicast groups per VM) so that eviction, ageing and
the limits are reached.

Checks (anything else is a failure): nothing raises; every frame written is
counted in; what the VMs receive is what the switch counts out; each MAC
table entry is counted to the VM it points to, and no VM has more than its
share; each address binding is in its owner's set and back, and a SLAAC
address is bound only to a trusted member or one that learns SLAAC, within a
prefix learnt; a VM's leases are among its addresses, and only a learning VM
has any; no VLAN holds more SLAAC prefixes than its share; each multicast
membership is in the group index, its member's set and the expiry order
alike, of a VM still there, within the per-VM cap, with a source filter
of at most MAX_SOURCES sources (none kept for "any source"); router ports are
trusted members.

Run with atheris: ``python fuzz/fuzz_switch.py fuzz/corpus/switch -max_total_time=60``.
Replay the corpus without atheris (CI): ``python fuzz/fuzz_switch.py --corpus-only
fuzz/corpus/switch``.  ``--make-corpus DIR`` writes the seed files.
"""

from __future__ import annotations

import ipaddress
import struct
import sys
from collections import Counter
from collections.abc import Iterator

from virtnet.net import inet_checksum, ipv6_checksum
from virtnet.ports import VNET_HDR_LEN, SocketQueue, mcast
from virtnet.ports import switch as sw_mod
from virtnet.ports.base import MAX_FRAME_LEN
from virtnet.ports.switch import Switch

sw_mod.MAC_TABLE_SIZE = 8
sw_mod.MACS_PER_VM = 3
sw_mod.LL_TABLE_SIZE = 6
sw_mod.LL_PER_VM = 2
sw_mod.PREFIXES_PER_VLAN = 2
sw_mod.MCAST_GROUPS_PER_VM = 3

_REST = 255
_VMS = "abc"
MACS = {v: bytes.fromhex(f"5254000000{i + 1:02x}") for i, v in enumerate(_VMS)}
_IPS = {
    "b": [ipaddress.ip_address(a).packed for a in ("10.0.0.2", "fd00::2")],
    "c": [ipaddress.ip_address(a).packed for a in ("10.0.0.3", "fd00::3")],
}


class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _records(body: bytes) -> Iterator[tuple[int, bytes]]:
    i = 0
    while i + 1 < len(body):
        who, n = body[i], body[i + 1]
        i += 2
        if n == _REST:
            yield who, body[i:]
            return
        yield who, body[i : i + n]
        i += n


def _configure(sw: Switch, bits: int) -> None:
    sw.set_mcast_querier(True)
    if bits & 0x20:
        for v in _VMS:
            sw.set_vlans(v, [0, 100])
    if bits & 0x01:
        sw.set_macs("b", [MACS["b"]])
        sw.set_neigh_suppress(True)  # answers for b when it is held to its addresses too
    if bits & 0x02:
        learn = [sw_mod.DHCP_LEARNING, sw_mod.SLAAC_LEARNING] if bits & 0x80 else []
        sw.set_ips("b", _IPS["b"] + learn)
    guards = [g for bit, g in ((0x04, "dhcp"), (0x08, "router")) if bits & bit]
    sw.set_guards("b", guards)
    if bits & 0x10:
        sw.set_ips("c", _IPS["c"])
        sw.set_guards("c", ["dhcp", "router"])
    if bits & 0x40:
        sw.set_rate("b", sw_mod.MIN_RATE_BPS)


def _drain(q: SocketQueue, buf: memoryview) -> int:
    got = 0
    while q.recv_into([buf[:VNET_HDR_LEN], buf[VNET_HDR_LEN:]]):
        got += 1
    return got


def _check_tables(sw: Switch) -> None:
    owners = Counter(id(vm) for vm, _t in sw._macs.values())
    for vm in sw._vms.values():
        assert vm.learnt == owners[id(vm)], f"{vm.id}: learnt {vm.learnt}, owns {owners[id(vm)]}"
        assert vm.learnt <= sw_mod.MACS_PER_VM
        for key in vm.bound:
            assert sw._bindings[key][0] is vm, f"{vm.id}: binding {key} not its own"
    for key, (vm, _t) in sw._bindings.items():
        assert key in vm.bound, f"{key} missing from {vm.id}'s set"
        assert sw._vms.get(vm.id) is vm, f"{key} bound to a removed VM"
        if not sw_mod._link_local(key[1]):
            assert vm.ips is None or vm.slaac, f"{key} bound to {vm.id}, which may not learn it"
    for vlan, prefixes in sw._prefixes.items():
        assert 0 < len(prefixes) <= sw_mod.PREFIXES_PER_VLAN, (vlan, prefixes)
    for vm in sw._vms.values():
        assert len(vm.leases) <= sw_mod.LEASES_PER_VM
        assert vm.ips4 >= {a for a in vm.leases if isinstance(a, int)}
        assert vm.ips6 >= {a for a in vm.leases if isinstance(a, bytes)}
        assert vm.dhcp or not vm.leases
    assert len(sw._macs) <= sw_mod.MAC_TABLE_SIZE
    assert len(sw._bindings) <= sw_mod.LL_TABLE_SIZE
    order = sw._memberships
    assert len(order) == sum(len(m) for m in sw._groups.values())
    ends = list(order.values())
    assert ends == sorted(ends), "memberships out of order"
    for (vlan, group, vm), end in order.items():
        assert sw._groups[(vlan, group)][vm] == end
    for fkey, (include, sources) in sw._filters.items():  # only where not "any source"
        assert fkey in order and 0 < len(sources) <= mcast.MAX_SOURCES, (fkey, include)
    for group_key, members in sw._groups.items():
        assert members, f"empty group {group_key}"
        for vm in members:
            assert group_key in vm.groups and sw._vms.get(vm.id) is vm, (group_key, vm.id)
    for vm in sw._vms.values():
        assert len(vm.groups) <= sw_mod.MCAST_GROUPS_PER_VM
        assert all(vm in sw._groups[g] for g in vm.groups)
    for routers in sw._mrouters.values():
        assert all(sw._vms.get(vm.id) is vm and vm.ips is None for vm in routers)
    for start, end in sw._queriers.values():  # held back from when the first query is answered
        assert start <= end, (start, end)
    assert all(sw._vms.get(vm.id) is vm for vm in sw._mcast_all)
    if sw._held is not None:  # the neighbour suppression index is not stale
        held = sw._held
        sw._held = None
        sw._holder(0, 0)
        assert sw._held == held, (sw._held, held)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    clock = _Clock()
    sw = Switch(clock=clock)
    queues = {v: sw.open_queue(v, 0) for v in _VMS}
    buf = memoryview(bytearray(VNET_HDR_LEN + MAX_FRAME_LEN + 64))
    try:
        _configure(sw, data[0])
        sent = received = 0
        for who, frame in _records(data[1:]):
            clock.t += (who >> 2) * 7.0
            if not frame:
                continue
            # A write shorter than the header still reaches the switch (which
            # counts and drops it); the sender counts it a drop too.
            ok = queues[_VMS[who % 3]].send([memoryview(bytearray(frame))])
            assert ok == (len(frame) >= VNET_HDR_LEN)
            sent += 1
            while sw.poll_once(0):
                pass
            received += sum(_drain(q, buf) for q in queues.values())
            _check_tables(sw)
        stats = sw.snapshot()
        assert stats.frames_in == sent, (stats.frames_in, sent)
        assert stats.frames_out == received, (stats.frames_out, received)
        sw.remove_vm("a")
        _check_tables(sw)
    finally:
        sw.close()
        for q in queues.values():
            q.close()


def _eth(src: str, dst: bytes, ethertype: int, body: bytes) -> bytes:
    return bytes(VNET_HDR_LEN) + dst + MACS[src] + struct.pack("!H", ethertype) + body


def _ipv6(src: str, nh: int, payload: bytes) -> bytes:
    return struct.pack("!IHBB16s16s", 0x60000000, len(payload), nh, 255,
                       ipaddress.ip_address(src).packed,
                       ipaddress.ip_address("ff02::1").packed) + payload  # fmt: skip


def _ipv4(src: str, proto: int, sport: int, dport: int) -> bytes:
    return struct.pack("!BBHHHBBH4s4sHHHH", 0x45, 0, 28, 0, 0, 64, proto, 0,
                       ipaddress.ip_address(src).packed, b"\xff" * 4,
                       sport, dport, 8, 0)  # fmt: skip


def _dhcp_ack(client: bytes, addr: str, lease: int) -> bytes:
    bootp = struct.pack("!BBBBIHHIIII16s64s128sI", 2, 1, 6, 0, 1, 0, 0, 0,
                        int(ipaddress.ip_address(addr)), 0, 0, client.ljust(16, b"\0"), b"", b"",
                        0x63825363)  # fmt: skip
    opts = bytes([53, 1, 5, 51, 4]) + struct.pack("!I", lease) + bytes([255])
    udp = struct.pack("!HHHH", 67, 68, 8 + len(bootp) + len(opts), 0) + bootp + opts
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                       bytes([10, 0, 0, 1]), b"\xff" * 4) + udp  # fmt: skip


def _ra(*prefixes: str) -> bytes:
    """A router advertisement offering ``prefixes`` (/64, autonomous) for SLAAC."""
    ra = struct.pack("!BBHI", 134, 0, 0, 0) + bytes(8)
    for prefix in prefixes:
        ra += struct.pack("!BBBBIII16s", 3, 4, 64, 0xC0, 600, 600, 0,
                          ipaddress.ip_address(prefix).packed)  # fmt: skip
    return ra


def _dhcp6_reply(*addrs: str) -> bytes:
    """A DHCPv6 Reply assigning ``addrs`` in one IA_NA, as UDP 547 -> 546."""
    inner = b"".join(struct.pack("!HH16sII", 5, 24, ipaddress.ip_address(a).packed, 60, 60)
                     for a in addrs)  # fmt: skip
    ia = struct.pack("!HHIII", 3, 12 + len(inner), 1, 0, 0) + inner
    msg = bytes([7, 0, 0, 1]) + ia
    return struct.pack("!HHHH", 547, 546, 8 + len(msg), 0) + msg


def _igmp_report(*groups: str, rtype: int = 4, sources: tuple[str, ...] = ()) -> bytes:
    """An IGMPv3 report of ``groups``, each a record of type ``rtype``
    (default CHANGE_TO_EXCLUDE) naming ``sources``, to 224.0.0.22."""
    body = bytearray(struct.pack("!BBHHH", 0x22, 0, 0, 0, len(groups)))
    for g in groups:
        body += struct.pack("!BBH4s", rtype, 0, len(sources), ipaddress.ip_address(g).packed)
        body += b"".join(ipaddress.ip_address(a).packed for a in sources)
    body[2:4] = struct.pack("!H", inet_checksum(body))
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), 0, 0, 1, 2, 0,
                       bytes([10, 0, 0, 3]), bytes([224, 0, 0, 22])) + bytes(body)  # fmt: skip


def _mld_query() -> bytes:
    """An MLDv1 general query from fe80::a, hop limit 1."""
    src, dst = ipaddress.ip_address("fe80::a").packed, ipaddress.ip_address("ff02::1").packed
    body = bytearray(struct.pack("!BBHHH16s", 130, 0, 0, 1000, 0, bytes(16)))
    body[2:4] = struct.pack("!H", ipv6_checksum(src + dst, 58, body))
    return struct.pack("!IHBB16s16s", 0x60000000, 24, 58, 1, src, dst) + bytes(body)


def _rec(who: int, frame: bytes) -> bytes:
    return bytes([who, len(frame)]) + frame if len(frame) < _REST else bytes([who, _REST]) + frame


def _seeds() -> dict[str, bytes]:
    bcast = b"\xff" * 6
    na = struct.pack("!BBHI16s", 136, 0, 0, 0x20000000, ipaddress.ip_address("fe80::a").packed)
    ra = struct.pack("!BBHI", 134, 0, 0, 0) + bytes(8)
    dest_opts = bytes([58, 0, 1, 4]) + bytes(4)
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 2, MACS["b"],
                      bytes([10, 0, 0, 3]), bytes(6), bytes([10, 0, 0, 1]))  # fmt: skip
    spray = b"".join(
        _rec(
            1, bytes(VNET_HDR_LEN) + bcast + bytes([0x52, 0, 0, 0, 9, i]) + b"\x88\xb5" + bytes(46)
        )
        for i in range(12)
    )
    group_mac = bytes([1, 0, 0x5E, 1, 1, 1])
    data = struct.pack("!BBHHHBBH4s4sHHHH", 0x45, 0, 28, 0, 0, 4, 17, 0, bytes([10, 0, 0, 2]),
                       bytes([239, 1, 1, 1]), 1, 2, 8, 0)  # fmt: skip
    return {
        "mcast_snooping": bytes([0x10])
        + _rec(2, _eth("c", group_mac, 0x0800, _igmp_report("239.1.1.1", "239.2.2.2")))
        + _rec(1, _eth("b", group_mac, 0x0800, data))
        + _rec(0, _eth("a", b"\x33\x33\0\0\0\x01", 0x86DD, _mld_query()))
        + _rec(2, _eth("c", group_mac, 0x0800, _igmp_report("239.3.3.3", "239.4.4.4")))
        + _rec(0x80 | 1, _eth("b", group_mac, 0x0800, data)),
        "mcast_sources": bytes([0x00])
        + _rec(
            2,
            _eth("c", group_mac, 0x0800, _igmp_report("239.1.1.1", rtype=1, sources=("10.0.0.2",))),
        )
        + _rec(
            0,
            _eth(
                "a",
                group_mac,
                0x0800,
                _igmp_report("239.1.1.1", rtype=4, sources=("10.0.0.2", "10.0.0.7")),
            ),
        )
        + _rec(
            0x10 | 2,
            _eth("c", group_mac, 0x0800, _igmp_report("239.1.1.1", rtype=5, sources=("10.0.0.9",))),
        )
        + _rec(1, _eth("b", group_mac, 0x0800, data))
        + _rec(
            2,
            _eth(
                "c",
                group_mac,
                0x0800,
                _igmp_report("239.1.1.1", rtype=6, sources=("10.0.0.2", "10.0.0.9")),
            ),
        )
        + _rec(1, _eth("b", group_mac, 0x0800, data)),
        "dhcp_offer": bytes([0x0F])
        + _rec(1, _eth("b", bcast, 0x0800, _ipv4("10.0.0.2", 17, 67, 68)))
        + _rec(2, _eth("c", bcast, 0x0800, _ipv4("0.0.0.0", 17, 68, 67))),
        "ra_behind_dest_opts": bytes([0x0B])
        + _rec(1, _eth("b", bcast, 0x86DD, _ipv6("fe80::b", 60, dest_opts + ra))),
        "na_link_local_race": bytes([0x12])
        + _rec(0, _eth("a", bcast, 0x86DD, _ipv6("fe80::a", 58, na)))
        + _rec(2, _eth("c", bcast, 0x86DD, _ipv6("fe80::c", 58, na)))
        + _rec(1 | 0x80, _eth("b", bcast, 0x86DD, _ipv6("fe80::b", 58, na))),
        "arp_spoof_tagged": bytes([0x23])
        + _rec(1, _eth("b", bcast, 0x0806, arp))
        + _rec(1, _eth("b", bcast, 0x8100, struct.pack("!HH", 100, 0x0806) + arp)),
        "mac_spray": bytes([0x40]) + spray + _rec(2, _eth("c", MACS["a"], 0x0800, bytes(30))),
        "dhcp_snooping": bytes([0x83])
        + _rec(0, _eth("a", bcast, 0x0800, _dhcp_ack(MACS["b"], "10.0.0.9", 60)))
        + _rec(1, _eth("b", bcast, 0x0800, _ipv4("10.0.0.9", 17, 1, 2)))
        + _rec(0x80 | 1, _eth("b", bcast, 0x0800, _ipv4("10.0.0.9", 17, 1, 2))),
        "neigh_suppress": bytes([0x03])
        + _rec(
            0,
            _eth(
                "a",
                bcast,
                0x0806,
                struct.pack(
                    "!HHBBH6s4s6s4s",
                    1,
                    0x0800,
                    6,
                    4,
                    1,
                    MACS["a"],
                    bytes([10, 0, 0, 1]),
                    bytes(6),
                    bytes([10, 0, 0, 2]),
                ),
            ),
        )
        + _rec(
            0,
            _eth(
                "a",
                b"\x33\x33\xff\x00\x00\x02",
                0x86DD,
                _ipv6(
                    "fe80::a",
                    58,
                    struct.pack("!BBHI16s", 135, 0, 0, 0, ipaddress.ip_address("fd00::2").packed),
                ),
            ),
        ),
        "dhcpv6_snooping": bytes([0x83])
        + _rec(
            1, _eth("b", bcast, 0x86DD, _ipv6("fe80::b", 17, struct.pack("!HHHH", 546, 547, 8, 0)))
        )
        + _rec(
            0,
            _eth(
                "a",
                MACS["b"],
                0x86DD,
                _ipv6("fe80::a", 17, _dhcp6_reply("fd00::9", "fd00::a", "fd00::3")),
            ),
        )
        + _rec(1, _eth("b", bcast, 0x86DD, _ipv6("fd00::9", 59, b"")))
        + _rec(0x80 | 1, _eth("b", bcast, 0x86DD, _ipv6("fd00::9", 59, b""))),
        "slaac_learning": bytes([0x83])
        + _rec(
            0,
            _eth("a", bcast, 0x86DD, _ipv6("fe80::a", 58, _ra("fd00:1::", "fd00:2::", "fd00:3::"))),
        )
        + _rec(1, _eth("b", bcast, 0x86DD, _ipv6("fd00:1::b", 59, b"")))
        + _rec(2, _eth("c", bcast, 0x86DD, _ipv6("fd00:1::b", 59, b"")))
        + _rec(1, _eth("b", bcast, 0x86DD, _ipv6("fd00:2::b", 58, na)))
        + _rec(0x80 | 1, _eth("b", bcast, 0x86DD, _ipv6("fd00:1::b", 59, b""))),
    }


if __name__ == "__main__":
    import harness  # fuzz/harness.py: this script's directory is on sys.path

    sys.exit(harness.main("fuzz_switch", test_one_input, _seeds))
