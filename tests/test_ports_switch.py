"""In-process tests of the L2 learning switch (virtnet.ports.switch)."""

from __future__ import annotations

import array
import ipaddress
import json
import os
import select
import socket
import struct
from collections.abc import Iterable, Iterator, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtnet.errors import UsageError
from virtnet.net import inet_checksum
from virtnet.ports import VNET_HDR_LEN, Offload, SocketQueue, make_port
from virtnet.ports import switch as sw_mod
from virtnet.ports.switch import Switch, SwitchPort, flow_id, spread
from virtnet.steering import Steering
from virtnet.testing.guest import wait_for

BCAST = b"\xff" * 6


def mac(n: int) -> bytes:
    return bytes([0x52, 0x54, 0, 0, 0, n])


def frame(
    dst: bytes,
    src: bytes,
    *,
    vlan: int | None = None,
    sport: int = 1000,
    dport: int = 2000,
    ips: tuple[int, int] = (1, 2),
    flags: int = 0,
    gso: int = 0,
    payload: bytes = b"",
) -> bytes:
    hdr = struct.pack("<BBHHHHH", flags, gso, 0, 0, 0, 0, 0)
    eth = dst + src
    if vlan is not None:
        eth += struct.pack("!HH", 0x8100, vlan)
    eth += struct.pack("!H", 0x0800)
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        28 + len(payload),
        0,
        0,
        64,
        17,
        0,
        bytes([10, 77, 0, ips[0]]),
        bytes([10, 77, 0, ips[1]]),
    )
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)
    return hdr + eth + ip + udp + payload


def send(q: SocketQueue, data: bytes) -> bool:
    m = memoryview(bytearray(data))
    return q.send([m[:VNET_HDR_LEN], m[VNET_HDR_LEN:]])


def recv(q: SocketQueue) -> bytes | None:
    buf = bytearray(VNET_HDR_LEN + 2048)
    m = memoryview(buf)
    n = q.recv_into([m[:VNET_HDR_LEN], m[VNET_HDR_LEN:100], m[100:]])
    return bytes(buf[:n]) if n else None


def drain(q: SocketQueue) -> list[bytes]:
    out = []
    while (f := recv(q)) is not None:
        out.append(f)
    return out


def not_spoofed(sw: Switch, q: SocketQueue, data: bytes, queues: Iterable[SocketQueue]) -> bool:
    """Whether ``data`` sent on ``q`` gets past the switch's source checks (is
    not dropped as spoofed); every queue of ``queues`` is drained after."""
    before = sw.snapshot().dropped_spoofed
    assert send(q, data)
    pump(sw)
    for other in queues:
        drain(other)
    return sw.snapshot().dropped_spoofed == before


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


class TrackingSwitch(Switch):
    """A switch that closes the worker ends it handed out when the test ends."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock=clock)
        self.handed: list[SocketQueue] = []

    def open_queue(self, vm_id: str, pair: int) -> SocketQueue:
        q = super().open_queue(vm_id, pair)
        self.handed.append(q)
        return q


@pytest.fixture
def sw(clock: Clock) -> Iterator[Switch]:
    s = TrackingSwitch(clock)
    yield s
    s.close()
    for q in s.handed:
        q.close()


def pump(sw: Switch) -> None:
    while sw.poll_once(0):
        pass


def test_flood_then_learn(sw: Switch) -> None:
    a, b, c = (sw.open_queue(v, 0) for v in "abc")
    f = frame(BCAST, mac(1))
    assert send(a, f)
    pump(sw)
    assert drain(b) == [f] and drain(c) == [f]
    assert drain(a) == []  # no reflection of a flood
    # b answers a by unicast: a's MAC was learnt, so only a gets it.
    r = frame(mac(1), mac(2), ips=(2, 1), sport=2000, dport=1000)
    send(b, r)
    pump(sw)
    assert drain(a) == [r]
    assert drain(c) == []
    st = sw.snapshot()
    assert st.flooded == 1 and st.frames_out == 3 and st.frames_in == 2
    assert st.ports["a/0"]["tx_packets"] == 1 and st.ports["a/0"]["rx_packets"] == 1


def test_unknown_unicast_floods_and_no_reflection(sw: Switch) -> None:
    a, b = sw.open_queue("a", 0), sw.open_queue("b", 0)
    send(a, frame(mac(9), mac(1)))
    pump(sw)
    assert len(drain(b)) == 1
    # a frame to a's own MAC from a is filtered, never reflected
    send(a, frame(mac(1), mac(1)))
    pump(sw)
    assert drain(a) == [] and drain(b) == []
    assert sw.snapshot().filtered == 1


def test_vlan_isolation(sw: Switch) -> None:
    a, b, c = (sw.open_queue(v, 0) for v in "abc")
    sw.set_vlans("a", {0, 10})
    sw.set_vlans("b", {10})
    # untagged from a: only VLAN-0 members (c)
    send(a, frame(BCAST, mac(1)))
    pump(sw)
    assert len(drain(c)) == 1 and drain(b) == []
    # tagged 10 from a: only b
    send(a, frame(BCAST, mac(1), vlan=10))
    pump(sw)
    assert len(drain(b)) == 1 and drain(c) == []
    # c is not on VLAN 10: its tagged frame is dropped
    send(c, frame(BCAST, mac(3), vlan=10))
    pump(sw)
    assert drain(a) == [] and drain(b) == []
    assert sw.snapshot().dropped_vlan == 1
    # a MAC learnt on VLAN 10 does not direct VLAN-0 traffic: c's unicast to
    # b's MAC floods on VLAN 0 and never reaches b
    send(b, frame(mac(1), mac(2), vlan=10))
    pump(sw)
    assert len(drain(a)) == 1
    send(c, frame(mac(2), mac(3)))
    pump(sw)
    assert drain(b) == [] and len(drain(a)) == 1


def test_port_security_stops_mac_spoofing(sw: Switch) -> None:
    """a is locked to mac(1): its frames from any other MAC are dropped, and no
    other VM may send from mac(1) -- so b cannot pull a's traffic to itself by
    claiming a's MAC, while unlocked c still sends from any MAC it likes."""
    a, b, c = (sw.open_queue(v, 0) for v in "abc")
    send(a, frame(BCAST, mac(1)))
    send(b, frame(mac(1), mac(1)))  # b taught the table a's MAC before the lock
    pump(sw)
    drain(a), drain(b), drain(c)
    sw.set_macs("a", [mac(1)])  # the stale entry pointing at b goes
    send(c, frame(mac(1), mac(3)))
    pump(sw)
    assert drain(b) == [] and len(drain(a)) == 1  # flooded, reaches a only among a, b
    send(a, frame(BCAST, mac(9)))  # a spoofing
    send(b, frame(BCAST, mac(1)))  # b claiming a's MAC
    pump(sw)
    assert drain(b) == [] and drain(c) == [] and drain(a) == []
    assert sw.snapshot().dropped_spoofed == 2
    send(a, frame(BCAST, mac(1)))
    send(c, frame(BCAST, mac(7)))  # unlocked: any MAC
    pump(sw)
    assert len(drain(b)) == 2 and len(drain(c)) == 1 and len(drain(a)) == 1
    send(c, frame(mac(1), mac(3)))  # unicast to a's MAC goes to a alone
    pump(sw)
    assert len(drain(a)) == 1 and drain(b) == []
    with pytest.raises(UsageError, match="belongs to another VM"):
        sw.set_macs("b", [mac(1)])
    with pytest.raises(UsageError, match="unicast"):
        sw.set_macs("b", [b"\x01" + bytes(5)])
    sw.remove_vm("a")
    sw.set_macs("b", [mac(1)])  # free again
    sw.set_macs("b", None)
    send(b, frame(BCAST, mac(5)))
    pump(sw)
    assert len(drain(c)) == 1


def test_rx_follows_tx_and_hash_placement(sw: Switch) -> None:
    a = [sw.open_queue("a", p) for p in range(4)]
    b = sw.open_queue("b", 0)
    sw.set_active_pairs("a", 4)
    # learn a's MAC
    send(a[0], frame(BCAST, mac(1)))
    pump(sw)
    drain(b)
    # flows b->a never sent by a: placed by hash over active pairs
    placed: dict[int, int] = {}
    for port in range(40):
        f = frame(mac(1), mac(2), sport=port, dport=80, ips=(2, 1))
        send(b, f)
        pump(sw)
        got = [p for p in range(4) if drain(a[p])]
        assert len(got) == 1
        placed[port] = got[0]
        assert got[0] == spread(flow_id(f)) % 4
    assert len(set(placed.values())) > 1
    # a sends flow (80 -> 7) on pair 3; the reply (7 -> 80) comes back on pair 3
    send(a[3], frame(mac(2), mac(1), sport=80, dport=7, ips=(1, 2)))
    pump(sw)
    drain(b)
    send(b, frame(mac(1), mac(2), sport=7, dport=80, ips=(2, 1)))
    pump(sw)
    assert [len(drain(q)) for q in a] == [0, 0, 0, 1]
    # fewer active pairs: the stale pair-3 entry is ignored, hash over 2
    sw.set_active_pairs("a", 2)
    for port in range(20):
        send(b, frame(mac(1), mac(2), sport=port, dport=80, ips=(2, 1)))
    pump(sw)
    counts = [len(drain(q)) for q in a]
    assert counts[2] == counts[3] == 0 and sum(counts) == 20


def test_flow_aging(sw: Switch, clock: Clock) -> None:
    a = [sw.open_queue("a", p) for p in range(2)]
    b = sw.open_queue("b", 0)
    sw.set_active_pairs("a", 2)
    req = frame(mac(2), mac(1), sport=5, dport=6)
    rep = frame(mac(1), mac(2), sport=6, dport=5, ips=(2, 1))
    hashed = spread(flow_id(rep)) % 2
    other = 1 - hashed
    send(a[other], req)
    pump(sw)
    drain(b)
    send(b, rep)
    pump(sw)
    assert len(drain(a[other])) == 1
    clock.t += sw_mod.FLOW_AGING_S + 1
    send(b, rep)
    pump(sw)
    assert len(drain(a[hashed])) == 1
    assert sw.flow_table_len() == 1  # only b's side of the flow, refreshed


def test_bounded_tables(sw: Switch, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sw_mod, "MAC_TABLE_SIZE", 8)
    monkeypatch.setattr(sw_mod, "FLOW_TABLE_SIZE", 8)
    a, b = sw.open_queue("a", 0), sw.open_queue("b", 0)
    for i in range(20):
        send(a, frame(BCAST, mac(100 + i), sport=i))
        pump(sw)
    drain(b)
    assert sw.mac_table_len() == 8 and sw.flow_table_len() == 8
    st = sw.snapshot()
    assert st.mac_evictions == 12 and st.flow_evictions == 12


def test_no_vm_can_flush_the_mac_table(
    sw: Switch, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MAC flooding: a guest spraying source MACs teaches the table at most
    MACS_PER_VM of them, so b's entry stays and c's unicast to b is not
    flooded to the sprayer; the rest are counted; a MAC that moves to
    another VM, and entries that age out, leave room to learn again."""
    monkeypatch.setattr(sw_mod, "MAC_TABLE_SIZE", 8)
    monkeypatch.setattr(sw_mod, "MACS_PER_VM", 4)
    a, b, c = (sw.open_queue(v, 0) for v in "abc")
    assert send(b, frame(BCAST, mac(2)))
    for i in range(20):
        assert send(a, frame(BCAST, mac(100 + i), sport=i))
        pump(sw)
    for q in (a, b, c):
        drain(q)
    assert sw.mac_table_len() == 5
    st = sw.snapshot()
    assert st.macs_unlearnt == 16 and st.mac_evictions == 0
    to_b = frame(mac(2), mac(3))
    assert send(c, to_b)
    pump(sw)
    assert drain(b) == [to_b] and drain(a) == []
    assert send(c, frame(BCAST, mac(100)))  # one of a's MACs moves to c
    pump(sw)
    for q in (a, b, c):
        drain(q)
    assert send(a, frame(BCAST, mac(150)))
    pump(sw)
    for q in (b, c):
        drain(q)
    to_a = frame(mac(150), mac(3))
    assert send(c, to_a)
    pump(sw)
    assert drain(a) == [to_a] and drain(b) == []  # a learnt mac(150): not flooded
    clock.t += sw_mod.MAC_AGING_S + 1
    pump(sw)
    assert sw.mac_table_len() == 0
    assert send(a, frame(BCAST, mac(151)))
    pump(sw)
    assert sw.snapshot().macs_unlearnt == 16


def test_full_queue_counts_drops(sw: Switch) -> None:
    a, b = sw.open_queue("a", 0), sw.open_queue("b", 0)
    f = frame(BCAST, mac(1), payload=bytes(1400))
    sent = 0
    for _ in range(3000):
        if not send(a, f):
            break
        sent += 1
        if sent % 32 == 0:
            pump(sw)
    pump(sw)
    st = sw.snapshot()
    assert st.dropped_full > 0
    got = len(drain(b))
    assert got + st.dropped_full == sent
    assert st.ports["b/0"]["tx_dropped"] == st.dropped_full


def test_worker_side_full_counts_tx_drop(sw: Switch) -> None:
    a = sw.open_queue("a", 0)
    f = frame(BCAST, mac(1), payload=bytes(1400))
    ok = sum(send(a, f) for _ in range(2000))  # the switch never polls
    assert ok < 2000 and a.tx_dropped == 2000 - ok and a.tx_packets == ok


def test_bad_frames_and_no_queue(sw: Switch) -> None:
    a, b = sw.open_queue("a", 0), sw.open_queue("b", 0)
    send(a, bytes(VNET_HDR_LEN + 10))  # too short
    send(a, frame(BCAST, b"\x01" + mac(1)[1:]))  # multicast source
    pump(sw)
    assert sw.snapshot().dropped_bad_frame == 2
    assert drain(b) == []
    # a VM whose only pair closed: learnt unicast counts no-queue
    send(b, frame(BCAST, mac(2)))
    pump(sw)
    drain(a)
    b.close()
    pump(sw)  # switch notices the hang-up
    send(a, frame(mac(2), mac(1)))
    pump(sw)
    assert sw.snapshot().dropped_no_queue == 1


def test_truncated_rx_counted(sw: Switch) -> None:
    a, b = sw.open_queue("a", 0), sw.open_queue("b", 0)
    send(a, frame(BCAST, mac(1), payload=bytes(500)))
    pump(sw)
    small = memoryview(bytearray(64))
    assert b.recv_into([small]) == 0
    assert b.rx_dropped == 1


def test_offload_gate(sw: Switch) -> None:
    a, b, c = (sw.open_queue(v, 0) for v in "abc")
    sw.set_rx_offloads("b", {Offload.CSUM})
    send(a, frame(BCAST, mac(1), flags=1, gso=1))  # NEEDS_CSUM + TCPV4
    pump(sw)
    assert drain(b) == [] and len(drain(c)) == 1
    assert sw.snapshot().dropped_offload == 1
    send(a, frame(BCAST, mac(1), flags=1))
    pump(sw)
    assert len(drain(b)) == 1


def test_remove_vm_forgets(sw: Switch) -> None:
    a, _b = sw.open_queue("a", 0), sw.open_queue("b", 0)
    send(a, frame(BCAST, mac(1)))
    pump(sw)
    sw.remove_vm("a")
    assert sw.mac_table_len() == 0
    assert a.send([memoryview(bytearray(frame(BCAST, mac(1))))]) is False
    assert a.peer_closed


def test_usage_errors(sw: Switch) -> None:
    sw.open_queue("a", 0)
    with pytest.raises(UsageError):
        sw.open_queue("a", 0)
    with pytest.raises(UsageError):
        sw.open_queue("a", sw_mod.MAX_PAIRS_PER_VM)
    with pytest.raises(UsageError):
        sw.set_active_pairs("a", 0)
    with pytest.raises(UsageError):
        sw.set_vlans("a", {4095})


def test_flow_id_symmetric() -> None:
    f = frame(mac(1), mac(2), sport=1, dport=2, ips=(3, 4))
    r = frame(mac(2), mac(1), sport=2, dport=1, ips=(4, 3))
    assert flow_id(f) == flow_id(r)
    assert flow_id(f) != flow_id(frame(mac(1), mac(2), sport=1, dport=3, ips=(3, 4)))
    arp = bytes(12) + mac(1) + mac(2) + b"\x08\x06" + bytes(28)
    rarp = bytes(12) + mac(2) + mac(1) + b"\x08\x06" + bytes(28)
    assert flow_id(arp) == flow_id(rarp) != flow_id(f)
    assert len({spread(flow_id(frame(mac(1), mac(2), sport=i))) % 4 for i in range(32)}) == 4


def test_switch_process() -> None:
    port = make_port("switch")
    assert isinstance(port, SwitchPort)
    try:
        a = port.open_queue("a", 0)
        b = port.open_queue("b", 0)
        assert isinstance(a, SocketQueue) and isinstance(b, SocketQueue)
        port.set_vlans("b", [0])
        f = frame(BCAST, mac(1))
        assert send(a, f)
        b.sock.settimeout(5)  # blocking wait for the switch process
        buf = bytearray(4096)
        n = b.sock.recv_into(buf)
        assert bytes(buf[:n]) == f
        st = port.stats()
        assert st["frames_in"] == 1 and st["frames_out"] == 1
        # A reply nobody waited for (an earlier call that timed out) is not
        # taken for the answer to the next request.
        port._send({"op": "stats"})
        assert wait_for(lambda: bool(select.select([port._ctl], [], [], 0)[0]), timeout=5)
        assert send(a, f)
        assert b.sock.recv_into(buf) == len(f)
        assert port.stats()["frames_in"] == 2
        a.close()
        b.close()
    finally:
        port.close()
    assert not port.running and port.exitcode == 0


def test_control_channel_in_process(sw: Switch) -> None:
    ctl, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sw.add_control(theirs)
    a = sw.open_queue("a", 0)
    mine, sw_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fds = array.array("i", [sw_end.fileno()]).tobytes()
    ctl.sendmsg(
        [json.dumps({"op": "attach", "vm": "b", "pair": 0}).encode()],
        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)],
    )
    sw_end.close()
    for bad in (b"not json", b"[1]", b'{"op": "warp", "vm": "b"}', b'{"op": "active"}'):
        ctl.send(bad)
    ctl.send(json.dumps({"op": "active", "vm": "b", "n": 1}).encode())
    pump(sw)
    assert sw.snapshot().control_errors == 4
    b = SocketQueue(mine)
    send(a, frame(BCAST, mac(1)))
    pump(sw)
    assert len(drain(b)) == 1
    ctl.settimeout(1)
    errors = [json.loads(ctl.recv(4096)) for _ in range(4)]
    assert all("error" in e for e in errors)
    ctl.close()
    pump(sw)
    assert sw.stopped
    b.close()


def test_udp_gso_needs_uso(sw: Switch) -> None:
    a, b = sw.open_queue("a", 0), sw.open_queue("b", 0)
    sw.set_rx_offloads("b", {Offload.CSUM, Offload.TSO4, Offload.TSO6})
    send(a, frame(BCAST, mac(1), flags=1, gso=5))  # GSO_UDP_L4
    pump(sw)
    assert drain(b) == []
    sw.set_rx_offloads("b", {Offload.CSUM, Offload.USO})
    send(a, frame(BCAST, mac(1), flags=1, gso=5))
    pump(sw)
    assert len(drain(b)) == 1


@settings(max_examples=150, deadline=None)
@given(st.lists(st.binary(min_size=0, max_size=120), min_size=1, max_size=8))
def test_arbitrary_frames_never_raise(frames: list[bytes]) -> None:
    sw = Switch()
    qs = [sw.open_queue("a", 0), sw.open_queue("a", 1), sw.open_queue("b", 0)]
    sw.set_vlans("b", {0, 1, 2})
    try:
        for i, f in enumerate(frames):
            qs[i % 3].send([memoryview(bytearray(f))])
        pump(sw)
        stats = sw.snapshot()
        assert stats.frames_in == sum(1 for f in frames if f)  # empty writes send nothing
        assert sum(q.tx_packets for q in qs) == sum(len(f) >= VNET_HDR_LEN for f in frames)
        out = sum(len(drain(q)) for q in qs)
        assert out == stats.frames_out
    finally:
        sw.close()
        for q in qs:
            q.close()


def test_vm_steering_object(sw: Switch, clock: Clock) -> None:
    a = [sw.open_queue("a", p) for p in range(4)]
    b = sw.open_queue("b", 0)
    steering = Steering(4)
    steering.set_pairs(4)
    steering.drain_done()
    sw.set_steering("a", steering)
    sw.set_active_pairs("a", 4)
    send(a[0], frame(BCAST, mac(1)))
    pump(sw)
    drain(b)
    # replies follow the pair a sent the flow on, via a's Steering
    send(a[2], frame(mac(2), mac(1), sport=80, dport=7, ips=(1, 2)))
    pump(sw)
    drain(b)
    reply = frame(mac(1), mac(2), sport=7, dport=80, ips=(2, 1))
    send(b, reply)
    pump(sw)
    assert [len(drain(q)) for q in a] == [0, 0, 1, 0]
    assert steering.stats.flow_hits == 1
    # a new flow lands where the Steering says
    new = frame(mac(1), mac(2), sport=9, dport=80, ips=(2, 1))
    want = steering.choose_rx(new[VNET_HDR_LEN:], clock.t)[0]
    send(b, new)
    pump(sw)
    assert [len(drain(q)) for q in a] == [int(p == want) for p in range(4)]


def test_the_switch_process_keeps_only_its_control_socket() -> None:
    """The switch is a fork of its parent: of the parent's fds it keeps only
    0, 1, 2 and its control socket (a VM connection left open in it would
    keep QEMU from seeing serve close it); it adds its own epoll."""
    extra = [socket.socketpair() for _ in range(3)]  # fds the child must not keep
    inherited = {os.readlink(f"/proc/self/fd/{s.fileno()}") for pair in extra for s in pair}
    port = SwitchPort()
    try:
        pid = port.pid
        assert pid is not None

        def links() -> list[str]:
            fds = sorted(int(f) for f in os.listdir(f"/proc/{pid}/fd") if int(f) > 2)
            return [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in fds]

        # Right after the fork the child still has them all: wait for it to close them.
        wait_for(lambda: len(links()) == 2, timeout=5)
        got = links()
        assert not inherited & set(got), got
        assert sorted(link.split(":")[0] for link in got) == ["anon_inode", "socket"], got
    finally:
        port.close()
        for a, b in extra:
            a.close()
            b.close()


def _eth(src: bytes, ethertype: int, body: bytes, *, vlan: int | None = None) -> bytes:
    tag = b"" if vlan is None else struct.pack("!HH", 0x8100, vlan)
    return bytes(VNET_HDR_LEN) + BCAST + src + tag + struct.pack("!H", ethertype) + body


def _ipv4(src: str, *, proto: int = 17, sport: int = 1000, dport: int = 2000) -> bytes:
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 0, 0, 64, proto, 0,
                     ipaddress.ip_address(src).packed, bytes([10, 0, 0, 1]))  # fmt: skip
    return ip + struct.pack("!HHHH", sport, dport, 8, 0)


def _ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def _arp(spa: str) -> bytes:
    return struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac(1), _ip(spa), bytes(6),
                       _ip("10.0.0.1"))  # fmt: skip


def _ipv6(src: str) -> bytes:
    return struct.pack("!IHBB16s16s", 0x60000000, 0, 59, 64, _ip(src), _ip("ff02::1"))


def _na(src: str, target: str) -> bytes:
    """An IPv6 neighbour advertisement from ``src`` claiming ``target``."""
    icmp = struct.pack("!BBHI16s", 136, 0, 0, 0x20000000, _ip(target))
    return struct.pack("!IHBB16s16s", 0x60000000, len(icmp), 58, 255, _ip(src),
                       _ip("ff02::1")) + icmp  # fmt: skip


def _ipv6_ext(src: str, proto: int, body: bytes, exts: Sequence[tuple[int, bytes]] = ()) -> bytes:
    """An IPv6 packet from ``src`` carrying ``body`` of protocol ``proto``
    behind the extension headers ``exts``, each (its type, its bytes after
    the next-header byte)."""
    chain = b""
    kinds = [k for k, _ in exts] + [proto]
    for (_, rest), nxt in zip(exts, kinds[1:], strict=True):
        chain += bytes([nxt]) + rest
    payload = chain + body
    return struct.pack("!IHBB16s16s", 0x60000000, len(payload), kinds[0], 255, _ip(src),
                       _ip("ff02::1")) + payload  # fmt: skip


_DEST_OPTS = (60, bytes([0]) + bytes([1, 4]) + bytes(4))  # 8 bytes: PadN
_HOP_BY_HOP = (0, bytes([0]) + bytes([1, 4]) + bytes(4))
_FIRST_FRAGMENT = (44, struct.pack("!BHI", 0, 0x0001, 7))  # offset 0, more fragments
_LATER_FRAGMENT = (44, struct.pack("!BHI", 0, 0x00B8, 7))  # offset 23 (x 8 bytes)


def _icmp6(kind: int, target: str = "::") -> bytes:
    return struct.pack("!BBHI16s", kind, 0, 0, 0x20000000, _ip(target))


def test_ip_source_guard(sw: Switch) -> None:
    """a may send IPv4/ARP only from 10.0.0.5 and IPv6 (and neighbour
    advertisements for) only fd00::5 or a link-local address; the unspecified
    address only where DHCP, ARP probes and DAD need it; tagged frames are
    checked the same; other EtherTypes and an unguarded VM pass; everything
    else is dropped as spoofed."""
    a, b = (sw.open_queue(v, 0) for v in "ab")
    sw.set_vlans("a", [0, 100])
    sw.set_vlans("b", [0, 100])
    sw.set_ips(
        "a", [ipaddress.ip_address("10.0.0.5").packed, ipaddress.ip_address("fd00::5").packed]
    )
    allowed = [
        _eth(mac(1), 0x0800, _ipv4("10.0.0.5")),
        _eth(mac(1), 0x0800, _ipv4("10.0.0.5"), vlan=100),
        _eth(mac(1), 0x0800, _ipv4("0.0.0.0", sport=68, dport=67)),  # DHCP discover
        _eth(mac(1), 0x0806, _arp("10.0.0.5")),
        _eth(mac(1), 0x0806, _arp("0.0.0.0")),  # ARP probe
        _eth(mac(1), 0x86DD, _ipv6("fd00::5")),
        _eth(mac(1), 0x86DD, _ipv6("fe80::5054:ff:fe00:1")),
        _eth(mac(1), 0x86DD, _ipv6_ext("::", 58, _icmp6(135, "fd00::5"))),  # DAD
        _eth(mac(1), 0x86DD, _ipv6_ext("::", 58, _icmp6(143), [_HOP_BY_HOP])),  # MLDv2 report
        _eth(mac(1), 0x86DD, _na("fe80::1", "fd00::5")),
        _eth(mac(1), 0x86DD, _na("fe80::1", "fe80::1")),
        _eth(mac(1), 0x88B5, bytes(46)),  # not IP
    ]
    # A later fragment from 0.0.0.0 whose data looks like UDP 68 -> 67: no DHCP client.
    dhcp = _ipv4("0.0.0.0", sport=68, dport=67)
    later_fragment = dhcp[:6] + b"\x00\x10" + dhcp[8:]
    refused = [
        _eth(mac(1), 0x0800, _ipv4("10.0.0.6")),
        _eth(mac(1), 0x0800, _ipv4("10.0.0.6"), vlan=100),
        _eth(mac(1), 0x0800, _ipv4("0.0.0.0", sport=1000, dport=67)),
        _eth(mac(1), 0x0800, _ipv4("0.0.0.0", proto=6, sport=68, dport=67)),
        _eth(mac(1), 0x0806, _arp("10.0.0.9")),
        _eth(mac(1), 0x86DD, _ipv6("fd00::6")),
        _eth(mac(1), 0x86DD, _ipv6("2001:db8::5")),
        _eth(mac(1), 0x86DD, _ipv6("::")),  # nothing but ND and MLD comes from ::
        _eth(mac(1), 0x86DD, _ipv6_ext("::", 58, _icmp6(128))),  # an echo request
        _eth(mac(1), 0x86DD, _na("fe80::1", "fd00::6")),  # claims b's address
        _eth(mac(1), 0x86DD, _na("fe80::1", "fd00::5")[:50]),  # cut before its target
        _eth(mac(1), 0x0800, _ipv4("10.0.0.5")[:12]),  # too short to show its source
        _eth(mac(1), 0x0800, b"\x44" + _ipv4("10.0.0.5")[1:]),  # header length 16: no IPv4
        _eth(mac(1), 0x0800, later_fragment),
    ]
    for f in allowed + refused:
        assert send(a, f)
        pump(sw)
    got = drain(b)
    assert got == allowed
    assert sw.snapshot().dropped_spoofed == len(refused)
    assert send(b, _eth(mac(2), 0x0800, _ipv4("10.0.0.6")))  # b is not guarded
    pump(sw)
    assert len(drain(a)) == 1
    sw.set_ips("a", None)
    assert send(a, refused[0])
    pump(sw)
    assert drain(b) == [refused[0]]
    with pytest.raises(UsageError, match="IPv4 or IPv6"):
        sw.set_ips("a", [b"\x01\x02"])


def _lla(kind: int, addr: bytes) -> bytes:
    """A source (1) or target (2) link-layer address option."""
    return bytes([kind, 1]) + addr


def test_port_security_looks_inside_arp_and_neighbour_discovery(sw: Switch) -> None:
    """a, locked to mac(1), may name only mac(1) as an ARP sender and in the
    link-layer address options of neighbour discovery (behind extension
    headers too); a malformed option list is refused; other traffic and an
    unlocked VM pass."""
    a, b = sw.open_queue("a", 0), sw.open_queue("b", 0)
    sw.set_macs("a", [mac(1)])
    other = mac(9)
    arp_other = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 2, other, _ip("10.0.0.5"),
                            bytes(6), _ip("10.0.0.1"))  # fmt: skip
    na, ns = _icmp6(136, "fe80::1"), _icmp6(135, "fe80::2")
    rs = struct.pack("!BBHI", 133, 0, 0, 0)
    allowed = [
        _eth(mac(1), 0x0806, _arp("10.0.0.5")),
        _eth(mac(1), 0x86DD, _ipv6_ext("fe80::1", 58, na + _lla(2, mac(1)))),
        _eth(mac(1), 0x86DD, _ipv6_ext("fe80::1", 58, ns + _lla(1, mac(1)))),
        _eth(mac(1), 0x86DD, _ipv6_ext("fe80::1", 58, rs)),
        _eth(mac(1), 0x86DD, _ipv6_ext("fe80::1", 58, ns + bytes([14, 1]) + other)),  # a nonce
        _eth(mac(1), 0x86DD, _ipv6_ext("fd00::1", 17, struct.pack("!HHHH", 1, 2, 8, 0))),
    ]
    refused = [
        _eth(mac(1), 0x0806, arp_other),
        _eth(mac(1), 0x0806, _arp("10.0.0.5")[:12]),
        _eth(mac(1), 0x86DD, _ipv6_ext("fe80::1", 58, na + _lla(2, other))),
        _eth(mac(1), 0x86DD, _ipv6_ext("fe80::1", 58, ns + _lla(1, other))),
        _eth(mac(1), 0x86DD, _ipv6_ext("fe80::1", 58, rs + _lla(1, mac(1)) + _lla(1, other))),
        _eth(mac(1), 0x86DD, _ipv6_ext("fe80::1", 58, na + _lla(2, other), [_DEST_OPTS])),
        _eth(mac(1), 0x86DD, _ipv6_ext("fe80::1", 58, na + bytes([2, 0]) + mac(1))),  # length 0
        _eth(mac(1), 0x86DD, _ipv6_ext("fe80::1", 58, na + _lla(2, mac(1)))[:-2]),  # cut short
    ]
    for f in allowed + refused:
        assert send(a, f)
        pump(sw)
    assert drain(b) == allowed
    assert sw.snapshot().dropped_spoofed == len(refused)
    assert send(b, _eth(mac(2), 0x0806, arp_other))  # b is not locked
    pump(sw)
    assert len(drain(a)) == 1


def test_ip_source_guard_follows_ipv6_extension_headers(sw: Switch) -> None:
    """A neighbour advertisement is checked behind hop-by-hop, destination
    options and fragment headers (a guest's stack takes it there too); a
    header chain longer than MAX_IPV6_EXT_HEADERS or cut by the frame, and a
    second VLAN tag inside the first, are refused; a later fragment carries
    no NA header and passes."""
    a, b = (sw.open_queue(v, 0) for v in "ab")
    sw.set_vlans("a", [0, 100])
    sw.set_vlans("b", [0, 100])
    sw.set_ips("a", [_ip("fd00::5")])
    too_many = [_DEST_OPTS] * (sw_mod.MAX_IPV6_EXT_HEADERS + 1)
    allowed = [
        _eth(mac(1), 0x86DD, _ipv6_ext("fe80::1", 58, _icmp6(136, "fd00::5"), [_DEST_OPTS])),
        _eth(mac(1), 0x86DD, _ipv6_ext("fe80::1", 58, _icmp6(135, "fd00::6"), [_HOP_BY_HOP])),
        _eth(mac(1), 0x86DD, _ipv6_ext("fd00::5", 58, bytes(24), [_LATER_FRAGMENT])),
        _eth(mac(1), 0x86DD, _ipv6_ext("fd00::5", 17, bytes(8), [_DEST_OPTS] * 6)),
    ]
    refused = [
        _eth(mac(1), 0x86DD, _ipv6_ext("fe80::1", 58, _icmp6(136, "fd00::6"), [_DEST_OPTS])),
        _eth(
            mac(1),
            0x86DD,
            _ipv6_ext("fe80::1", 58, _icmp6(136, "fd00::6"), [_HOP_BY_HOP, _DEST_OPTS]),
        ),
        _eth(mac(1), 0x86DD, _ipv6_ext("fe80::1", 58, _icmp6(136, "fd00::6"), [_FIRST_FRAGMENT])),
        _eth(mac(1), 0x86DD, _ipv6_ext("fd00::5", 17, bytes(8), too_many)),
        _eth(mac(1), 0x86DD, _ipv6_ext("fd00::5", 17, bytes(8), [_DEST_OPTS])[:46]),
        _eth(mac(1), 0x8100, struct.pack("!H", 0x0800) + _ipv4("10.9.9.9"), vlan=100),
        _eth(mac(1), 0x88A8, struct.pack("!HH", 100, 0x0800) + _ipv4("10.9.9.9")),
    ]
    for f in allowed + refused:
        assert send(a, f)
        pump(sw)
    assert drain(b) == allowed
    assert sw.snapshot().dropped_spoofed == len(refused)


def test_link_local_addresses_go_to_their_first_user(sw: Switch, clock: Clock) -> None:
    """SAVI-FCFS for link-local IPv6: a guarded VM may not send from, nor
    claim in a neighbour advertisement, a link-local address another member
    used first (a router's, r, unguarded); a trusted member takes back what
    a guarded one claimed; another VLAN is another link; bindings lapse after
    LL_AGING_S unused and go with their member; a guarded VM holds at most
    LL_PER_VM of them."""
    queues = {v: sw.open_queue(v, 0) for v in "acr"}
    for v in "acr":
        sw.set_vlans(v, [0, 100])
    sw.set_ips("a", [_ip("fd00::5")])
    sw.set_ips("c", [_ip("fd00::7")])

    def passes(who: str, body: bytes, vlan: int | None = None) -> bool:
        """Whether ``who``'s IPv6 ``body`` gets through (is not dropped as spoofed)."""
        frame = _eth(mac(1 + "acr".index(who)), 0x86DD, body, vlan=vlan)
        return not_spoofed(sw, queues[who], frame, queues.values())

    assert passes("r", _ipv6("fe80::1"))  # the router's address is r's
    assert not passes("a", _ipv6("fe80::1"))
    assert not passes("a", _na("fe80::a", "fe80::1"))
    assert passes("a", _ipv6("fe80::a"))
    assert not passes("c", _na("fe80::c", "fe80::a"))  # a's now
    assert not passes("c", _ipv6("fe80::a"))
    assert passes("c", _na("fe80::c", "fe80::c"))
    assert passes("c", _ipv6("fe80::a"), vlan=100)  # another link
    clock.t += sw_mod.LL_AGING_S + 1
    pump(sw)
    assert passes("c", _ipv6("fe80::a"))  # a's binding lapsed
    assert not passes("a", _ipv6("fe80::a"))
    assert passes("r", _ipv6("fe80::a"))  # a trusted member takes it back
    assert not passes("c", _ipv6("fe80::a"))
    sw.remove_vm("r")
    assert passes("a", _ipv6("fe80::1"))
    held = len([k for k in sw._bindings if sw._bindings[k][0].id == "a"])
    for i in range(sw_mod.LL_PER_VM - held):
        assert passes("a", _ipv6(f"fe80::a:{i}"))
    assert not passes("a", _ipv6("fe80::a:ffff"))
    assert passes("a", _ipv6("fe80::a:0"))  # one it holds


def _ra(src: str, *prefixes: tuple[str, int, int], flags: int = 0x40, hop: int = 255) -> bytes:
    """An IPv6 router advertisement from ``src`` with a prefix information
    option for each (prefix, length, valid lifetime); ``flags``: their L/A
    bits (A, autonomous, by default); ``hop``: the IPv6 hop limit."""
    ra = struct.pack("!BBHBBHII", 134, 0, 0, 64, 0, 1800, 0, 0)
    for prefix, length, valid in prefixes:
        ra += struct.pack("!BBBBIII16s", 3, 4, length, flags, valid, valid, 0, _ip(prefix))
    return struct.pack("!IHBB16s16s", 0x60000000, len(ra), 58, hop, _ip(src),
                       _ip("ff02::1")) + ra  # fmt: skip


def test_slaac_learning_lets_a_vm_send_from_its_slaac_addresses(sw: Switch, clock: Clock) -> None:
    """``SLAAC_LEARNING`` in a VM's IP set: once a trusted router (r, under no
    IP source guard nor router guard) advertises a /64 for autoconfiguration,
    the VM may send from (and claim in neighbour advertisements) addresses in
    it on that VLAN, each the first member's to use it (another VM held to it
    statically is first); until the prefix's valid lifetime ends (which an
    advertisement may cut to no less than two hours); PREFIXES_PER_VLAN at
    once.  A guarded VM's advertisements, prefixes without the autonomous
    flag or not /64, and link-local prefixes teach nothing."""
    names = "acrgb"
    queues = {v: sw.open_queue(v, 0) for v in names}
    for v in names:
        sw.set_vlans(v, [0, 100])
    sw.set_ips("a", [_ip("10.0.0.5"), sw_mod.SLAAC_LEARNING])
    sw.set_ips("c", [_ip("fd00:1::7"), sw_mod.SLAAC_LEARNING])
    sw.set_ips("g", [_ip("10.0.0.9")])
    sw.set_ips("b", [_ip("10.0.0.6")])  # no SLAAC
    sw.set_guards("r", ["dhcp"])  # not a router guard: r is still a trusted router

    def passes(who: str, body: bytes, vlan: int | None = None) -> bool:
        """Whether ``who``'s IPv6 ``body`` gets through (is not dropped as spoofed)."""
        frame = _eth(mac(1 + names.index(who)), 0x86DD, body, vlan=vlan)
        return not_spoofed(sw, queues[who], frame, queues.values())

    assert not passes("a", _ipv6("fd00:1::a"))
    assert passes("g", _ra("fe80::9", ("fd00:1::", 64, 3600)))  # g's RAs teach nothing
    assert not passes("a", _ipv6("fd00:1::a"))
    assert passes("r", _ra("fe80::1", ("fd00:1::", 64, 3600), ("fd00:3::", 48, 3600),
                           ("fe80::", 64, 3600), ("ff02::", 64, 3600)))  # fmt: skip
    assert passes("r", _ra("fe80::1", ("fd00:2::", 64, 3600), flags=0x80))  # on-link only
    assert passes("r", _ra("fe80::1", ("fd00:4::", 64, 3600), hop=64))  # not from the link
    assert sw.snapshot().prefixes == ["fd00:1::/64"]
    assert sw.snapshot().prefixes_learnt == 1
    assert passes("a", _ipv6("fd00:1::a"))
    assert passes("a", _na("fe80::a", "fd00:1::a:1"))
    for other in ("fd00:2::a", "fd00:3::a", "fd00:4::a"):
        assert not passes("a", _ipv6(other))
    assert not passes("a", _ipv6("fd00:1::a"), vlan=100)  # advertised on VLAN 0 only
    assert not passes("c", _ipv6("fd00:1::a"))  # a's, first come first served
    assert not passes("c", _na("fe80::c", "fd00:1::a"))
    assert passes("c", _ipv6("fd00:1::7"))  # its own, statically
    assert not passes("a", _ipv6("fd00:1::7"))  # c's, statically
    assert not passes("b", _ipv6("fd00:1::b"))  # b does not learn SLAAC
    assert passes("r", _ipv6("fd00:1::1"))  # a trusted member's address is its own
    assert not passes("c", _ipv6("fd00:1::1"))
    assert sw.snapshot().slaac == {"a": ["fd00:1::a", "fd00:1::a:1"]}
    # A valid lifetime of 0 cuts the remaining hour no shorter: it ends in an hour.
    assert passes("r", _ra("fe80::1", ("fd00:1::", 64, 0)))
    clock.t += 3500
    assert passes("a", _ipv6("fd00:1::a"))
    clock.t += 101
    pump(sw)
    assert sw.snapshot().prefixes == []
    assert not passes("a", _ipv6("fd00:1::a"))
    # An infinite lifetime is PREFIX_MAX_S; a shorter one cuts it to two hours.
    assert passes("r", _ra("fe80::1", ("fd00:1::", 64, 0xFFFFFFFF)))
    assert passes("r", _ra("fe80::1", ("fd00:1::", 64, 60)))
    clock.t += sw_mod.PREFIX_CUT_FLOOR_S - 10
    assert passes("a", _ipv6("fd00:1::a"))
    clock.t += 20
    pump(sw)  # the sweep, once a second, ends prefixes
    assert not passes("a", _ipv6("fd00:1::a"))
    many = [(f"fd00:{i:x}::", 64, 3600) for i in range(0x10, 0x10 + sw_mod.PREFIXES_PER_VLAN + 1)]
    assert passes("r", _ra("fe80::1", *many))
    assert len(sw.snapshot().prefixes) == sw_mod.PREFIXES_PER_VLAN
    assert sw.snapshot().prefixes_refused == 1
    assert passes("r", _ra("fe80::1", ("fd00:5::", 64, 3600)), vlan=100)
    assert passes("a", _ipv6("fd00:5::a"), vlan=100)
    assert "fd00:5::/64 vlan 100" in sw.snapshot().prefixes
    sw.set_ips("a", [_ip("10.0.0.5")])  # no longer learns SLAAC: lets go of its addresses
    assert "a" not in sw.snapshot().slaac
    assert not passes("a", _ipv6("fd00:5::a"), vlan=100)
    sw.set_ips("c", [_ip("fd00:1::7"), sw_mod.SLAAC_LEARNING])
    assert passes("c", _ipv6("fd00:5::a"), vlan=100)


@given(st.binary(min_size=0, max_size=200), st.integers(0, 210))
@settings(max_examples=300, deadline=None)
def test_router_prefixes_takes_any_bytes(data: bytes, n: int) -> None:
    """Whatever a router sends, ``router_prefixes`` answers None or /64
    prefixes read within the frame."""
    buf = bytearray(2048)
    buf[: len(data)] = data
    n = min(n, len(data))
    got = sw_mod.router_prefixes(buf, n, sw_mod._l3(buf, n, 0))
    assert got is None or all(len(p) == 8 and 0 <= v < 1 << 32 for p, v in got)
    good = bytearray(b"\x86\xdd" + _ra("fe80::1", ("fd00:1::", 64, 30)))
    l3 = sw_mod._l3(good, len(good), 0)
    assert sw_mod.router_prefixes(good, len(good), l3) == [(_ip("fd00:1::")[:8], 30)]
    assert sw_mod.router_prefixes(good, len(good) - 1, sw_mod._l3(good, len(good) - 1, 0)) is None


def _dhcp(kind: int, client: bytes, addr: str, lease: int, *, src: str = "10.0.0.1") -> bytes:
    """A DHCP message of type ``kind`` (5: ACK) from a server to ``client``,
    leasing ``addr`` for ``lease`` seconds, as IPv4/UDP 67 -> 68."""
    bootp = struct.pack(
        "!BBBBIHHIIII16s64s128sI",
        2,
        1,
        6,
        0,
        0x1234,
        0,
        0,
        0,
        int(ipaddress.ip_address(addr)),
        0,
        0,
        client.ljust(16, b"\0"),
        b"",
        b"",
        0x63825363,
    )
    opts = bytes([53, 1, kind, 51, 4]) + struct.pack("!I", lease) + bytes([255])
    udp = struct.pack("!HHHH", 67, 68, 8 + len(bootp) + len(opts), 0) + bootp + opts
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, _ip(src),
                     b"\xff" * 4)  # fmt: skip
    return ip + udp


def test_dhcp_snooping_lets_a_vm_send_from_its_lease(sw: Switch, clock: Clock) -> None:
    """``set_ips(vm, [DHCP_LEARNING])``: b may send from an IPv4 address only
    once a trusted server (r: neither IP-guarded nor DHCP-guarded) acked it
    to b's MAC, and only until the lease ends; acks from an IP-guarded VM,
    from b itself, of another type, or for an address another VM holds do
    not count; a VM holds at most LEASES_PER_VM leases."""
    b, c, r = (sw.open_queue(v, 0) for v in "bcr")
    sw.set_macs("b", [mac(2)])
    sw.set_ips("b", [sw_mod.DHCP_LEARNING, _ip("fd00::2")])
    sw.set_ips("c", [_ip("10.0.0.7")])

    def b_sends_from(addr: str) -> bool:
        return not_spoofed(sw, b, _eth(mac(2), 0x0800, _ipv4(addr)), (b, c, r))

    def ack(q: SocketQueue, src: bytes, addr: str, lease: int = 100, kind: int = 5) -> None:
        assert send(q, _eth(src, 0x0800, _dhcp(kind, mac(2), addr, lease)))
        pump(sw)
        for q2 in (b, c, r):
            drain(q2)

    assert b_sends_from("0.0.0.0") is False  # not a DHCP client's 68 -> 67
    assert not b_sends_from("10.0.0.50")
    ack(c, mac(3), "10.0.0.50")  # c is held to its addresses: not trusted
    ack(r, mac(4), "10.0.0.50", kind=2)  # an offer, not an ack
    assert not b_sends_from("10.0.0.50")
    ack(r, mac(4), "10.0.0.50")
    assert b_sends_from("10.0.0.50") and not b_sends_from("10.0.0.51")
    assert sw.snapshot().leases_learnt == 1 and sw.snapshot().leases == {"b": ["10.0.0.50"]}
    ack(r, mac(4), "10.0.0.7")  # c's address
    assert sw.snapshot().leases_refused == 1 and not b_sends_from("10.0.0.7")
    clock.t += 101
    pump(sw)
    assert not b_sends_from("10.0.0.50")  # the lease ended
    ack(r, mac(4), "10.0.0.60", lease=0xFFFFFFFF)
    clock.t += sw_mod.LEASE_MAX_S - 1
    pump(sw)
    assert b_sends_from("10.0.0.60")
    clock.t += 2
    pump(sw)
    assert not b_sends_from("10.0.0.60")  # "infinite" leases end too
    for i in range(sw_mod.LEASES_PER_VM + 1):
        ack(r, mac(4), f"10.0.1.{i + 1}")
    assert sw.snapshot().leases_refused == 2
    assert b_sends_from("10.0.1.1") and not b_sends_from(f"10.0.1.{sw_mod.LEASES_PER_VM + 1}")
    sw.set_ips("b", [_ip("fd00::2")])  # no more learning: the leases go
    assert not b_sends_from("10.0.1.1")


def _dhcp6(kind: int, *ias: tuple[int, list[tuple[str, int]]]) -> bytes:
    """A DHCPv6 message of type ``kind`` (7: Reply) from a server's port 547 to
    a client's 546, with an IA option for each (3: IA_NA, 4: IA_TA; its
    addresses and their valid lifetimes)."""
    opts = struct.pack("!HH", 1, 4) + b"duid"  # the client identifier
    for code, addrs in ias:
        head = struct.pack("!I", 1) + (struct.pack("!II", 0, 0) if code == 3 else b"")
        inner = b"".join(struct.pack("!HH16sII", 5, 24, _ip(a), v, v) for a, v in addrs)
        opts += struct.pack("!HH", code, len(head) + len(inner)) + head + inner
    msg = bytes([kind, 0, 0, 1]) + opts
    udp = struct.pack("!HHHH", 547, 546, 8 + len(msg), 0) + msg
    return struct.pack("!IHBB16s16s", 0x60000000, len(udp), 17, 64, _ip("fe80::1"),
                       _ip("fe80::2")) + udp  # fmt: skip


def test_dhcpv6_snooping_lets_a_vm_send_from_its_addresses(sw: Switch, clock: Clock) -> None:
    """``DHCP_LEARNING`` covers DHCPv6: b may send from the global addresses a
    trusted server's Reply, sent to b's MAC, assigns it in IA_NA and IA_TA
    options, until their valid lifetimes end (0: at once); not from what an
    Advertise offers, what an IP-guarded VM's Reply assigns, what a Reply to
    another MAC assigns, nor another VM's address."""
    b, c, r = (sw.open_queue(v, 0) for v in "bcr")
    sw.set_macs("b", [mac(2)])
    sw.set_ips("b", [sw_mod.DHCP_LEARNING, _ip("10.0.0.2")])
    sw.set_ips("c", [_ip("fd00::7")])

    def b_sends_from(addr: str) -> bool:
        return not_spoofed(sw, b, _eth(mac(2), 0x86DD, _ipv6(addr)), (b, c, r))

    def reply(q: SocketQueue, src: bytes, body: bytes, dst: bytes = mac(2)) -> None:
        assert send(q, bytes(VNET_HDR_LEN) + dst + src + b"\x86\xdd" + body)
        pump(sw)
        for q2 in (b, c, r):
            drain(q2)

    assert not b_sends_from("fd00::50")
    reply(c, mac(3), _dhcp6(7, (3, [("fd00::50", 100)])))  # c is held to its addresses
    reply(r, mac(4), _dhcp6(2, (3, [("fd00::50", 100)])))  # an Advertise
    reply(r, mac(4), _dhcp6(7, (3, [("fd00::50", 100)])), dst=mac(9))  # to another client
    assert not b_sends_from("fd00::50")
    reply(r, mac(4), _dhcp6(7, (3, [("fd00::50", 100), ("fe80::9", 100), ("ff02::9", 100)]),
                            (4, [("fd00::51", 100)])))  # fmt: skip
    assert b_sends_from("fd00::50") and b_sends_from("fd00::51")
    assert not b_sends_from("fd00::52")
    assert sw.snapshot().leases == {"b": ["fd00::50", "fd00::51"]}
    assert sw.snapshot().leases_learnt == 2
    reply(r, mac(4), _dhcp6(7, (3, [("fd00::7", 100)])))  # c's address
    assert sw.snapshot().leases_refused == 1 and not b_sends_from("fd00::7")
    reply(r, mac(4), _dhcp6(7, (4, [("fd00::51", 0)])))  # taken back
    assert not b_sends_from("fd00::51")
    assert send(r, _eth(mac(4), 0x0800, _dhcp(5, mac(2), "10.0.0.50", 100)))
    pump(sw)
    assert sw.snapshot().leases == {"b": ["10.0.0.50", "fd00::50"]}
    clock.t += 101
    pump(sw)
    assert not b_sends_from("fd00::50")  # the lease ended
    assert sw.snapshot().leases == {}


@given(st.binary(max_size=300), st.integers(0, 320))
@settings(max_examples=300, deadline=None)
def test_dhcp6_reply_takes_any_bytes(data: bytes, n: int) -> None:
    """Whatever a server sends, ``dhcp6_reply`` answers None or global
    addresses within the frame."""
    buf = bytearray(2048)
    buf[: len(data)] = data
    got = sw_mod.dhcp6_reply(buf, min(n, len(data)), 0)
    assert got is None or all(len(a) == 16 and 0 <= v < 1 << 32 for a, v in got)
    good = bytearray(_dhcp6(7, (3, [("fd00::50", 30)]))[40:])
    assert sw_mod.dhcp6_reply(good, len(good), 0) == [(_ip("fd00::50"), 30)]
    assert sw_mod.dhcp6_reply(good, len(good) - 1, 0) is None
    padded = good + bytes(20)  # Ethernet padding past the UDP length
    assert sw_mod.dhcp6_reply(padded, len(padded), 0) == [(_ip("fd00::50"), 30)]


@given(st.binary(max_size=400), st.integers(0, 420))
@settings(max_examples=300, deadline=None)
def test_dhcp_ack_takes_any_bytes(data: bytes, n: int) -> None:
    """Whatever a server sends, ``dhcp_ack`` answers None or a lease within the frame."""
    buf = bytearray(2048)
    buf[: len(data)] = data
    got = sw_mod.dhcp_ack(buf, min(n, len(data)), 0)
    assert got is None or (len(got[0]) == 6 and 0 < got[1] < 0xE0000000 and got[2] >= 0)
    good = _dhcp(5, mac(2), "10.0.0.9", 60)[20:]
    buf[: len(good)] = good
    assert sw_mod.dhcp_ack(buf, len(good), 0) == (mac(2), 0x0A000009, 60)
    assert sw_mod.dhcp_ack(buf, len(good) - 10, 0) is None


def test_dhcp_ack_reads_overloaded_options() -> None:
    """Option overload (52, RFC 2132 section 9.3): the message type and lease
    time may sit in the 'file' field (1), the 'sname' field (2) or both (3);
    they are read there only when the options field says so; an option that
    runs past its field, or more than MAX_DHCP_OPTIONS, refuses the message."""
    ack = bytearray(_dhcp(5, mac(2), "10.0.0.9", 60)[28:])  # the UDP payload
    ack[240:] = bytes([52, 1, 0, 255])  # overload: its options
    ack[240 + 2] = 3
    typ, lease = bytes([53, 1, 5]), bytes([51, 4]) + struct.pack("!I", 70)

    def parse(sname: bytes, file: bytes, overload: int) -> tuple[bytes, int, int] | None:
        msg = bytearray(ack)
        msg[242] = overload
        msg[44 : 44 + len(sname)] = sname
        msg[108 : 108 + len(file)] = file
        buf = bytearray(8) + msg
        return sw_mod.dhcp_ack(buf, len(buf), 0)

    assert parse(typ, lease, 3) == (mac(2), 0x0A000009, 70)
    assert parse(lease, typ, 3) == (mac(2), 0x0A000009, 70)
    assert parse(b"", typ + lease, 1) == (mac(2), 0x0A000009, 70)
    assert parse(typ + lease, b"", 2) == (mac(2), 0x0A000009, 70)
    assert parse(typ + lease, b"", 1) is None  # sname not overloaded: no type, no lease
    assert parse(b"", bytes([53, 200]), 1) is None  # runs past the file field
    assert parse(b"", bytes(100) + typ + lease, 1) == (mac(2), 0x0A000009, 70)  # pads first

    def padded(pads: int) -> tuple[bytes, int, int] | None:
        """The ack with ``pads`` pad options after the overload option, and
        the type and lease (then 119 pads) in the file field."""
        buf = bytearray(8) + ack[:242] + bytes([1]) + bytes(pads) + b"\xff"
        buf[8 + 108 : 8 + 108 + 9] = typ + lease
        return sw_mod.dhcp_ack(buf, len(buf), 0)

    room = sw_mod.MAX_DHCP_OPTIONS - 1 - 2 - (128 - 9)  # one budget for every field
    assert padded(room) == (mac(2), 0x0A000009, 70)
    assert padded(room + 1) is None


def test_dhcp_and_router_guards(sw: Switch) -> None:
    """``set_guards``: a VM with the DHCP guard may not send DHCP (from UDP
    67) or DHCPv6 (from 547) server messages, one with the router guard no
    ICMP or ICMPv6 router advertisement or redirect, behind extension headers
    and in first fragments too; clients' messages, other traffic, later
    fragments, unguarded VMs and each guard's own traffic for the other
    pass; every refused frame is counted."""
    a, b = (sw.open_queue(v, 0) for v in "ab")
    sw.set_vlans("a", [0, 100])
    sw.set_vlans("b", [0, 100])
    sw.set_guards("a", ["dhcp", "router"])
    dhcp_server = [
        _eth(mac(1), 0x0800, _ipv4("10.0.0.5", sport=67, dport=68)),
        _eth(mac(1), 0x0800, _ipv4("10.0.0.5", sport=67, dport=67)),  # relay agent
        _eth(mac(1), 0x0800, _ipv4("10.0.0.5", sport=1067, dport=68)),  # to a client
        _eth(mac(1), 0x86DD, _ipv6_ext("fe80::5", 17, struct.pack("!HHHH", 1547, 546, 8, 0))),
        _eth(mac(1), 0x0800, _ipv4("10.0.0.5", sport=67, dport=68), vlan=100),
        _eth(mac(1), 0x86DD, _ipv6_ext("fe80::5", 17, struct.pack("!HHHH", 547, 546, 8, 0))),
        _eth(
            mac(1),
            0x86DD,
            _ipv6_ext(
                "fe80::5", 17, struct.pack("!HHHH", 547, 546, 8, 0), [_HOP_BY_HOP, _FIRST_FRAGMENT]
            ),
        ),
    ]
    router = [
        _eth(mac(1), 0x86DD, _ipv6_ext("fe80::5", 58, _icmp6(134))),
        _eth(mac(1), 0x86DD, _ipv6_ext("fe80::5", 58, _icmp6(137))),
        _eth(mac(1), 0x86DD, _ipv6_ext("fe80::5", 58, _icmp6(134), [_DEST_OPTS])),
        _eth(mac(1), 0x86DD, _ipv6_ext("fe80::5", 58, _icmp6(134), [_FIRST_FRAGMENT])),
        _eth(mac(1), 0x0800, _ipv4("10.0.0.5", proto=1, sport=0x0500)),  # ICMP redirect
        _eth(mac(1), 0x0800, _ipv4("10.0.0.5", proto=1, sport=0x0900)),  # router advert
    ]
    unclear = [
        _eth(mac(1), 0x86DD, _ipv6_ext("fe80::5", 17, bytes(8), [_DEST_OPTS] * 9)),
        _eth(mac(1), 0x0800, _ipv4("10.0.0.5", sport=67, dport=68)[:22]),  # ports cut off
        _eth(mac(1), 0x8100, struct.pack("!H", 0x0800) + _ipv4("10.0.0.5", sport=67), vlan=100),
    ]
    clients = [
        _eth(mac(1), 0x0800, _ipv4("0.0.0.0", sport=68, dport=67)),
        _eth(mac(1), 0x86DD, _ipv6_ext("fe80::5", 17, struct.pack("!HHHH", 546, 547, 8, 0))),
        _eth(mac(1), 0x86DD, _ipv6_ext("fe80::5", 58, _icmp6(133))),  # router solicitation
        _eth(mac(1), 0x86DD, _ipv6_ext("fe80::5", 58, _icmp6(136, "fe80::5"))),
        _eth(mac(1), 0x0800, _ipv4("10.0.0.5", proto=1, sport=0x0800)),  # echo request
        _eth(mac(1), 0x0800, _ipv4("10.0.0.5", proto=6, sport=67, dport=68)),  # TCP
        _eth(mac(1), 0x86DD, _ipv6_ext("fe80::5", 58, _icmp6(134), [_LATER_FRAGMENT])),
        _eth(mac(1), 0x0806, _arp("10.0.0.5")),
    ]
    for f in dhcp_server + router + unclear + clients:
        assert send(a, f)
        pump(sw)
    assert drain(b) == clients
    assert sw.snapshot().dropped_guard == len(dhcp_server + router + unclear)
    assert sw.snapshot().dropped_spoofed == 0
    for f in dhcp_server + router:  # b is not guarded
        assert send(b, f)
        pump(sw)
    assert len(drain(a)) == len(dhcp_server + router)
    sw.set_guards("a", ["dhcp"])
    for f in router + dhcp_server[:1]:
        assert send(a, f)
        pump(sw)
    assert drain(b) == router
    sw.set_guards("a", [])
    for f in dhcp_server:
        assert send(a, f)
        pump(sw)
    assert drain(b) == dhcp_server
    with pytest.raises(UsageError, match="dhcp, router"):
        sw.set_guards("a", ["dhcp", "nat"])


@given(st.binary(min_size=0, max_size=120), st.integers(0, 130))
@settings(max_examples=300, deadline=None)
def test_ip_source_guard_takes_any_bytes(data: bytes, n: int) -> None:
    """Whatever a guest sends, the check answers True or False within the frame."""
    buf = bytearray(2048)
    buf[: len(data)] = data
    v4, v6 = frozenset({0, 0x0A000005}), frozenset({bytes(16)})
    l3 = sw_mod._l3(buf, min(n, len(data)), 12)
    assert sw_mod._ip_source_ok(buf, min(n, len(data)), l3, v4, v6) in (True, False)


_ETHERTYPES = st.sampled_from([0x0800, 0x86DD, 0x0806, 0x8100, 0x88A8, 0x88B5])
_GUARDED_BODY = st.one_of(
    st.binary(max_size=100),
    st.builds(lambda src, tail: _ipv4(src)[:12] + tail, st.sampled_from(["10.0.0.5", "0.0.0.0"]),
              st.binary(max_size=60)),
    st.builds(lambda ext, tail: _ipv6_ext("fe80::5", 58, tail, ext),
              st.lists(st.sampled_from([_DEST_OPTS, _HOP_BY_HOP, _FIRST_FRAGMENT,
                                        _LATER_FRAGMENT]), max_size=10),
              st.binary(max_size=40)),
)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_ETHERTYPES, _GUARDED_BODY), min_size=1, max_size=12))
def test_a_guarded_vms_frames_are_forwarded_or_counted(frames: list[tuple[int, bytes]]) -> None:
    """Whatever a VM under every check (MAC lock, IP source guard, DHCP and
    router guards) sends, each broadcast frame reaches both other VMs or is
    counted as a drop; nothing raises."""
    sw = Switch()
    b, a, c = sw.open_queue("b", 0), sw.open_queue("a", 0), sw.open_queue("c", 0)
    sw.set_macs("b", [mac(2)])
    sw.set_ips("b", [_ip("10.0.0.5"), _ip("fd00::5")])
    sw.set_guards("b", ["dhcp", "router"])
    try:
        for et, body in frames:
            assert send(b, _eth(mac(2), et, body))
            pump(sw)
        st_ = sw.snapshot()
        dropped = st_.dropped_spoofed + st_.dropped_guard + st_.dropped_bad_frame
        dropped += st_.dropped_vlan
        assert st_.frames_in == len(frames)
        assert len(drain(a)) == len(drain(c)) == len(frames) - dropped
        assert st_.frames_out == 2 * (len(frames) - dropped)
    finally:
        sw.close()
        for q in (a, b, c):
            q.close()


@given(st.binary(min_size=0, max_size=160), st.integers(0, 170), st.integers(12, 16))
@settings(max_examples=300, deadline=None)
def test_guards_take_any_bytes(data: bytes, n: int, off: int) -> None:
    """Whatever a guest sends, the guards answer True or False within the frame."""
    buf = bytearray(2048)
    buf[: len(data)] = data
    every = sw_mod._GUARD_DHCP | sw_mod._GUARD_ROUTER
    n = min(n, len(data))
    l3 = sw_mod._l3(buf, n, off)
    _et, p, _proto, u = l3
    assert u == sw_mod._MALFORMED or (p <= n and u <= n)  # the headers lie within the frame
    assert sw_mod._guards_ok(buf, n, l3, every) in (True, False)
    assert sw_mod._ip_source_ok(buf, n, l3, frozenset(), frozenset()) in (True, False)
    assert sw_mod._lladdr_ok(buf, n, l3, frozenset({bytes(6)})) in (True, False)


def _arp_request(sha: bytes, spa: str, tpa: str) -> bytes:
    return struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, sha, _ip(spa), bytes(6), _ip(tpa))


def _ns(src: str, target: str) -> bytes:
    """A neighbour solicitation from ``src`` for ``target`` (no options)."""
    icmp = struct.pack("!BBHI16s", 135, 0, 0, 0, _ip(target))
    return struct.pack("!IHBB16s16s", 0x60000000, len(icmp), 58, 255, _ip(src),
                       _ip("ff02::1:ff00:5")) + icmp  # fmt: skip


def test_neigh_suppress_answers_for_held_vms(sw: Switch) -> None:
    """``set_neigh_suppress``: an ARP request or neighbour solicitation for an
    address of a VM held to one MAC and its addresses (a: static, and the
    link-local address bound to it) is answered by the switch to the asker
    alone, with a's MAC; for anyone else's address, a gratuitous ARP, duplicate
    address detection, or with suppression off, it is flooded as before."""
    a, b, c = (sw.open_queue(v, 0) for v in "abc")
    for v in "abc":
        sw.set_vlans(v, [0, 100])
    sw.set_macs("a", [mac(1)])
    sw.set_ips("a", [_ip("10.0.0.5"), _ip("fd00::5")])
    sw.set_macs("b", [mac(2)])  # held to its MAC only: not answered for
    sw.set_neigh_suppress(True)
    assert send(a, _eth(mac(1), 0x86DD, _ipv6("fe80::a")))  # binds fe80::a to a
    pump(sw)
    drain(b), drain(c)
    mcast = bytes.fromhex("3333ff000005")

    def ask(body: bytes, ethertype: int = 0x0806, vlan: int | None = None) -> list[bytes]:
        """c asks; what c gets back (b and a must get nothing)."""
        tag = b"" if vlan is None else struct.pack("!HH", 0x8100, vlan)
        dst = BCAST if ethertype == 0x0806 else mcast
        assert send(c, bytes(VNET_HDR_LEN) + dst + mac(3) + tag + struct.pack("!H", ethertype)
                    + body)  # fmt: skip
        pump(sw)
        assert drain(a) == [] and drain(b) == []
        return drain(c)

    def flooded(body: bytes, ethertype: int = 0x0806) -> bool:
        before = sw.snapshot().neigh_suppressed
        assert send(c, _eth(mac(3), ethertype, body))
        pump(sw)
        to_b = drain(b)
        return (
            len(drain(a)) == len(to_b) == 1
            and drain(c) == []
            and (sw.snapshot().neigh_suppressed == before)
        )

    (reply,) = ask(_arp_request(mac(3), "10.0.0.9", "10.0.0.5"))
    assert reply == bytes(VNET_HDR_LEN) + mac(3) + mac(1) + b"\x08\x06" + struct.pack(
        "!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 2, mac(1), _ip("10.0.0.5"), mac(3), _ip("10.0.0.9")
    )
    (tagged,) = ask(_arp_request(mac(3), "10.0.0.9", "10.0.0.5"), vlan=100)
    assert tagged[VNET_HDR_LEN + 12 : VNET_HDR_LEN + 18] == b"\x81\x00\x00\x64\x08\x06"
    for target in ("fd00::5", "fe80::a"):
        (na,) = ask(_ns("fe80::c", target), 0x86DD)
        eth, ip6 = na[VNET_HDR_LEN : VNET_HDR_LEN + 14], na[VNET_HDR_LEN + 14 :]
        assert eth == mac(3) + mac(1) + b"\x86\xdd"
        assert ip6[6:8] == bytes([58, 255]) and ip6[8:24] == _ip(target)
        assert ip6[24:40] == _ip("fe80::c")
        icmp = ip6[40:]
        assert icmp[0] == 136 and icmp[4] == 0x60 and icmp[8:24] == _ip(target)
        assert icmp[24:32] == bytes([2, 1]) + mac(1)  # target link-layer address: a's MAC
        pseudo = ip6[8:40] + struct.pack("!IxxxB", len(icmp), 58)
        assert inet_checksum(pseudo + icmp) == 0
    assert sw.snapshot().neigh_suppressed == 4
    assert flooded(_arp_request(mac(3), "10.0.0.9", "10.0.0.6"))  # nobody's held address
    assert flooded(_arp_request(mac(3), "10.0.0.5", "10.0.0.5"))  # gratuitous
    assert flooded(_ns("::", "fd00::5"), 0x86DD)  # duplicate address detection
    assert flooded(_ns("fe80::c", "fd00::9"), 0x86DD)
    sw.set_ips("b", [_ip("10.0.0.6")])  # now held to its addresses too: answered for
    (reply,) = ask(_arp_request(mac(3), "10.0.0.9", "10.0.0.6"))
    assert reply[VNET_HDR_LEN + 6 : VNET_HDR_LEN + 12] == mac(2)
    sw.set_macs("a", [mac(1), mac(7)])  # which of two MACs? the owner answers
    assert flooded(_arp_request(mac(3), "10.0.0.9", "10.0.0.5"))
    sw.set_macs("a", [mac(1)])
    sw.set_neigh_suppress(False)
    assert flooded(_arp_request(mac(3), "10.0.0.9", "10.0.0.5"))


def test_rate_policing(sw: Switch, clock: Clock) -> None:
    """``set_rate``: a VM held to 1 Mbit/s (125,000 bytes/s, a bucket of
    ``rate_burst`` bytes) gets a full bucket through at once, then only what
    the clock refills; the rest is dropped and counted; unset, anything goes."""
    a, b = (sw.open_queue(v, 0) for v in "ab")
    sw.set_rate("a", 1_000_000)
    burst = sw_mod.rate_burst(1_000_000)
    assert burst == sw_mod.MIN_BURST_BYTES  # 1 Mbit/s: the two-GSO-frame floor
    size = 1000
    f = frame(BCAST, mac(1), payload=bytes(size - 42))  # 1000 bytes after the vnet header
    assert len(f) - VNET_HDR_LEN == size

    def burst_through(count: int) -> int:
        for _ in range(count):
            assert send(a, f)
            pump(sw)
        return len(drain(b))

    fits = burst // size
    assert burst_through(fits + 20) == fits
    assert sw.snapshot().dropped_rate == 20
    clock.t += 0.1  # 12,500 bytes refilled: 12 more frames
    assert burst_through(20) == 12
    sw.set_rate("a", None)
    assert burst_through(50) == 50
    for bad in (0, sw_mod.MIN_RATE_BPS - 1, sw_mod.MAX_RATE_BPS + 1):
        with pytest.raises(UsageError, match="out of range"):
            sw.set_rate("a", bad)
