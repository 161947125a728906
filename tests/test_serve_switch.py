"""Two real guests on one ``virtnet serve --port switch`` (two sockets, one process).

Both guests boot (QEMU 10, TCG) with 2-pair vhost-user NICs; the switch
process of serve joins them.  They ping each other and run iperf3 TCP both
ways (GSO super-frames cross the switch: both guests take TSO on rx), over
IPv4 at MTU 9000 (``host_mtu``), link-local IPv6, and a VLAN both are members
of (``--vlans``); they cannot reach each other over a VLAN they are not
members of, nor by one taking the other's MAC (``--mac``) or sending from an
IP address not its own (``--ip``) or from the other's link-local IPv6
address, and one is held to a rate (``--rate``).
One may not be a DHCP server (``--guard``): the other's DHCP client gets a
lease from it only once ``virtnet ctl`` lifts the guard.
The switch answers the guests' ARP requests and neighbour solicitations for
each other itself (``--neigh-suppress``), and snoops their IGMP and MLD
reports as their querier (``--mcast-querier``): neighbour solicitations it
does not answer go to the solicited-node group's members alone.
A third guest is plugged in and out with ``virtnet ctl``.  The switch process
is killed: serve starts it again and the guests talk on through it, still
locked to their MACs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from virtnet.testing.guest import Guest, vhost_user_netdev_args, wait_for
from virtnet.testing.procs import stop_process
from virtnet.vhost_user.stats import fetch

pytestmark = [pytest.mark.vm, pytest.mark.timeout(600)]

QUEUES = 2
IP_A, IP_B = "10.77.1.2", "10.77.1.3"
#: The guests' MACs, which serve locks them to (``--mac``).
MAC_A, MAC_B = "52:54:00:77:01:02", "52:54:00:77:01:03"
#: Both guests are members of VLAN 0 (untagged) and this one (``--vlans 0,VLAN``).
VLAN, OTHER_VLAN = 100, 200
#: Both NICs announce this MTU (``host_mtu``), so the guests use jumbo frames.
MTU = 9000


def _ips(last: int) -> str:
    """A guest's addresses, which serve holds it to (``--ip``): untagged and on both VLANs."""
    return ",".join(f"10.77.{net}.{last}" for net in (1, VLAN, OTHER_VLAN))


def _control(stats: Path) -> Path:
    """serve's control socket, next to its stats socket."""
    return stats.with_name("control.sock")


@pytest.fixture(scope="module")
def pair(
    guest_initramfs: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Guest, Guest, Path]]:
    tmp = tmp_path_factory.mktemp("serve-switch")
    a, b, stats, log = tmp / "a.sock", tmp / "b.sock", tmp / "stats.sock", tmp / "serve.log"
    with log.open("w") as out:
        serve = subprocess.Popen(
            [sys.executable, "-m", "virtnet.cli", "-v", "serve", "--socket", str(a),
             "--socket", str(b), "--port", "switch", "--queues", str(QUEUES),
             "--vlans", f"0,{VLAN}", "--mac", f"a.sock={MAC_A}", "--mac", f"b.sock={MAC_B}",
             "--ip", f"a.sock={_ips(2)}", "--ip", f"b.sock={_ips(3)},dhcp",
             "--guard", "a.sock=dhcp,router", "--neigh-suppress", "--mcast-querier",
             "--stats-socket", str(stats), "--control-socket", str(_control(stats))],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        assert wait_for(lambda: stats.exists() or serve.poll() is not None, timeout=20)
        assert serve.poll() is None, log.read_text()
        with (
            Guest(
                vhost_user_netdev_args(a, queues=QUEUES, mac=MAC_A, device_extra=f"host_mtu={MTU}"),
                initramfs=guest_initramfs,
                ip=f"{IP_A}/24",
                smp=1,
            ) as ga,
            Guest(
                vhost_user_netdev_args(b, queues=QUEUES, mac=MAC_B, device_extra=f"host_mtu={MTU}"),
                initramfs=guest_initramfs,
                ip=f"{IP_B}/24",
                smp=1,
            ) as gb,
        ):
            yield ga, gb, stats
    finally:
        stop_process(serve, timeout=20)
        print(log.read_text()[-5000:])
    assert serve.returncode == 0


def _ctl(stats: Path, *args: str) -> None:
    """``virtnet ctl ARGS`` against the serve of ``stats``."""
    subprocess.run([sys.executable, "-m", "virtnet.cli", "ctl", "--control-socket",
                    str(_control(stats)), *args], check=True, timeout=30)  # fmt: skip


def _tcp_both_ways(ga: Guest, gb: Guest, target: str, *, flags: str = "", seconds: int = 2) -> None:
    """iperf3 TCP, 2 streams, from ``ga`` to an iperf3 server in ``gb`` at
    ``target`` and back (``-R``)."""
    for reverse in ("", " -R"):
        gb.run("iperf3 -s -D -1 >/dev/null 2>&1; sleep 0.5")
        out = ga.iperf3(f"{flags} -c {target} -P 2 -t {seconds} -i 0{reverse}")
        assert "receiver" in out, out


def test_guests_ping_each_other(pair: tuple[Guest, Guest, Path]) -> None:
    ga, gb, _ = pair
    assert wait_for(lambda: ga.ping(IP_B, count=1, timeout=5), timeout=40), ga.console_tail()
    assert gb.ping(IP_A, count=3)


def test_jumbo_frames_between_guests(pair: tuple[Guest, Guest, Path]) -> None:
    """Both guests took MTU 9000 from host_mtu; 9000-byte packets cross the
    switch whole (the receiver's eth0 counts as many frames as pings)."""
    ga, gb, _ = pair
    for g in (ga, gb):
        assert g.run("cat /sys/class/net/eth0/mtu").output.strip() == str(MTU)
    assert ga.ping(IP_B, count=1)

    def rx_packets() -> int:
        return int(gb.run("cat /sys/class/net/eth0/statistics/rx_packets").output)

    before = rx_packets()
    out = ga.run(f"ping -c 3 -W 5 -s {MTU - 28} {IP_B}").output
    assert f"{MTU - 20} bytes from {IP_B}" in out, out
    assert rx_packets() - before <= 3 + 2  # 3 echo requests (+ ARP), no fragments


def test_the_switch_answers_arp_and_ns_for_the_guests(pair: tuple[Guest, Guest, Path]) -> None:
    """``--neigh-suppress``: with their neighbour caches flushed, the guests
    reach each other over IPv4 and link-local IPv6, and learn each other's
    MAC, from the answers the switch gives on their behalf (counted)."""
    ga, gb, stats = pair
    ll_b = "fe80::5054:ff:fe77:103"  # EUI-64 of B's MAC
    # B's link-local address is bound to it once B has sent from it.
    assert wait_for(lambda: gb.run("ping -6 -c 1 -W 2 fe80::5054:ff:fe77:102%eth0",
                                   check=False).status == 0, timeout=30)  # fmt: skip
    before = fetch(str(stats))["switch"]["neigh_suppressed"]
    for g in (ga, gb):
        g.run("ip neigh flush dev eth0")
    assert ga.ping(IP_B, count=1)
    assert MAC_B in ga.run(f"ip neigh show {IP_B}").output.lower()
    assert ga.run(f"ping -6 -c 1 -W 3 {ll_b}%eth0", check=False).status == 0
    assert MAC_B in ga.run(f"ip -6 neigh show {ll_b}").output.lower()
    # A's ARP request and NS, and B's for its answers: none flooded.
    assert fetch(str(stats))["switch"]["neigh_suppressed"] >= before + 3


def test_the_switch_knows_the_guests_multicast_groups(pair: tuple[Guest, Guest, Path]) -> None:
    """``--mcast-querier``: the switch asked both guests for their groups,
    and each is a member of the solicited-node group of its link-local
    address (RFC 4291 section 2.7.1: ff02::1:ff and the address's last 24
    bits), from its own kernel's MLDv2 reports; the querier's queries and
    the membership records are counted."""
    _ga, _gb, stats = pair

    def known() -> bool:
        groups = {vm["name"]: vm.get("groups", []) for vm in fetch(str(stats))["vms"]}
        return "ff02::1:ff77:102" in groups["a.sock"] and "ff02::1:ff77:103" in groups["b.sock"]

    assert wait_for(known, timeout=30), fetch(str(stats))
    sw = fetch(str(stats))["switch"]
    assert sw["mcast_queries"] >= 2 and sw["mcast_joined"] >= 2, sw


def test_guests_iperf3_both_ways(pair: tuple[Guest, Guest, Path]) -> None:
    ga, gb, stats = pair
    _tcp_both_ways(ga, gb, IP_B, seconds=3)
    doc = fetch(str(stats))
    for vm in doc["vms"]:
        assert vm["connected"]
        assert sum(p["rx_packets"] for p in vm["pairs"]) > 1000, vm
        assert sum(p["tx_packets"] for p in vm["pairs"]) > 1000, vm
        assert all(p["errors"] == 0 for p in vm["pairs"])
    # The switch process's own counters reach the stats: both streams crossed it.
    sw = doc["switch"]
    assert "error" not in sw, sw
    assert sw["frames_in"] > 1000 and sw["frames_out"] > 1000, sw
    assert sw["dropped_bad_frame"] == sw["dropped_unknown_vm"] == 0, sw


def test_guests_over_ipv6(pair: tuple[Guest, Guest, Path]) -> None:
    """Link-local IPv6 needs the switch to flood neighbour solicitations
    (multicast 33:33:ff:xx:xx:xx); then ping and TCP both ways over IPv6,
    with GSO TCPV6 super-frames crossing the switch."""
    ga, gb, _ = pair
    addr_b = "fe80::5054:ff:fe77:103"  # EUI-64 of gb's MAC

    def link_local_ready(g: Guest) -> bool:
        out = g.run("ip -6 addr show dev eth0").output
        return "fe80::" in out and "tentative" not in out

    for g in (ga, gb):
        assert wait_for(partial(link_local_ready, g), timeout=20), g.run("ip -6 addr").output
    assert addr_b in gb.run("ip -6 addr show dev eth0").output
    assert wait_for(lambda: ga.run(f"ping -6 -c 1 -W 2 {addr_b}%eth0", check=False).status == 0,
                    timeout=30), ga.run("ip -6 neigh", check=False).output  # fmt: skip
    _tcp_both_ways(ga, gb, f"{addr_b}%eth0", flags="-6")


def test_guests_over_a_vlan_and_not_over_another(pair: tuple[Guest, Guest, Path]) -> None:
    """``--vlans 0,100``: the guests' own 802.1Q interfaces eth0.100 reach each
    other (ping, TCP both ways: tagged GSO super-frames cross the switch), and
    eth0.200 does not -- the switch drops what a VM sends on a VLAN it is no
    member of, and counts it."""
    ga, gb, stats = pair
    for g, last in ((ga, 2), (gb, 3)):
        for vid in (VLAN, OTHER_VLAN):
            g.run(
                f"ip link add link eth0 name eth0.{vid} type vlan id {vid}"
                f" && ip addr add 10.77.{vid}.{last}/24 dev eth0.{vid}"
                f" && ip link set eth0.{vid} up"
            )
    peer = f"10.77.{VLAN}.3"
    assert wait_for(lambda: ga.ping(peer, count=1, timeout=5), timeout=30), ga.console_tail()
    dropped = fetch(str(stats))["switch"]["dropped_vlan"]
    assert not ga.ping(f"10.77.{OTHER_VLAN}.3", count=2, timeout=5)
    assert fetch(str(stats))["switch"]["dropped_vlan"] >= dropped + 2
    _tcp_both_ways(ga, gb, peer)


def test_a_guest_plugged_in_and_out_with_virtnet_ctl(
    pair: tuple[Guest, Guest, Path], guest_initramfs: Path
) -> None:
    """``virtnet ctl add`` gives serve a third VM socket at run time: a guest
    booted on it pings A; ``virtnet ctl remove`` unplugs it (its link is
    gone) while A and B go on talking; a second add takes it back (QEMU
    reconnects by itself)."""
    ga, _, stats = pair
    control = _control(stats)
    c = stats.with_name("c.sock")

    def ctl(*args: str) -> str:
        res = subprocess.run(
            [sys.executable, "-m", "virtnet.cli", "ctl", "--control-socket", str(control), *args],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        return res.stdout.strip()

    assert ctl("add", "--socket", str(c)) == "c.sock"
    with Guest(
        vhost_user_netdev_args(c, queues=QUEUES, mac="52:54:00:77:01:04", reconnect_ms=500),
        initramfs=guest_initramfs,
        ip="10.77.1.4/24",
        smp=1,
    ) as gc:
        assert wait_for(lambda: gc.ping(IP_A, count=1, timeout=5), timeout=40), gc.console_tail()
        ctl("remove", "c.sock")
        assert not gc.ping(IP_A, count=2, timeout=5)
        assert ga.ping(IP_B, count=2)
        assert [vm["name"] for vm in fetch(str(stats))["vms"]] == ["a.sock", "b.sock"]
        assert ctl("add", "--socket", str(c)) == "c.sock"
        assert wait_for(lambda: gc.ping(IP_A, count=1, timeout=5), timeout=40), gc.console_tail()


def test_a_guest_cannot_take_anothers_mac(pair: tuple[Guest, Guest, Path]) -> None:
    """``--mac``: B takes A's MAC (``ip link set eth0 address``, live, through
    QEMU's control queue) and cannot reach anyone -- its frames are dropped as
    spoofed -- until it takes its own back."""
    _, gb, stats = pair
    assert gb.ping(IP_A, count=1)
    spoofed = fetch(str(stats))["switch"]["dropped_spoofed"]
    gb.run("ip neigh flush dev eth0")
    gb.run(f"ip link set eth0 address {MAC_A}")
    try:
        assert not gb.ping(IP_A, count=2, timeout=5)
        assert fetch(str(stats))["switch"]["dropped_spoofed"] > spoofed
    finally:
        gb.run(f"ip link set eth0 address {MAC_B}")
    assert wait_for(lambda: gb.ping(IP_A, count=1, timeout=5), timeout=30), gb.console_tail()


def test_a_killed_switch_process_is_started_again(pair: tuple[Guest, Guest, Path]) -> None:
    """SIGKILL of the switch process: serve starts a new one with the same
    configuration and gives both guests' running pairs new queues on it; the
    guests ping and run TCP both ways again on the same connections, B
    still cannot send from A's MAC, and the switch still answers ARP."""
    ga, gb, stats = pair
    doc = fetch(str(stats))
    old = doc["switch"]["pid"]
    restarts = doc["switch"]["restarts"]
    connections = [vm["connections"] for vm in doc["vms"]]
    os.kill(old, signal.SIGKILL)
    assert wait_for(lambda: fetch(str(stats))["switch"].get("restarts") == restarts + 1,
                    timeout=20)  # fmt: skip
    assert wait_for(lambda: ga.ping(IP_B, count=1, timeout=5), timeout=40), ga.console_tail()
    assert gb.ping(IP_A, count=2)
    _tcp_both_ways(ga, gb, IP_B)
    doc = fetch(str(stats))
    assert doc["switch"]["pid"] != old
    assert [vm["connections"] for vm in doc["vms"]] == connections
    gb.run("ip neigh flush dev eth0")
    gb.run(f"ip link set eth0 address {MAC_A}")
    try:
        assert not gb.ping(IP_A, count=2, timeout=5)
        assert fetch(str(stats))["switch"]["dropped_spoofed"] > 0
    finally:
        gb.run(f"ip link set eth0 address {MAC_B}")
    assert wait_for(lambda: gb.ping(IP_A, count=1, timeout=5), timeout=30), gb.console_tail()
    # B's ARP request for A, its cache flushed, was answered by the new process.
    assert fetch(str(stats))["switch"]["neigh_suppressed"] > 0


def test_a_guest_cannot_send_from_an_ip_not_its_own(pair: tuple[Guest, Guest, Path]) -> None:
    """``--ip``: B adds an address serve does not hold it to; pinging A from
    it fails -- its ARP and IPv4 are dropped as spoofed -- while its own
    address still works."""
    _, gb, stats = pair
    assert gb.ping(IP_A, count=1)
    spoofed = fetch(str(stats))["switch"]["dropped_spoofed"]
    gb.run("ip addr add 10.77.1.9/24 dev eth0")
    try:
        out = gb.run(f"ping -c 2 -W 3 -I 10.77.1.9 {IP_A}", check=False)
        assert out.status != 0, out.output
        assert fetch(str(stats))["switch"]["dropped_spoofed"] > spoofed
        assert gb.ping(IP_A, count=1)
    finally:
        gb.run("ip addr del 10.77.1.9/24 dev eth0")
    assert fetch(str(stats))["vms"][1]["ips"] == [*_ips(3).split(","), "dhcp"]


def test_a_guest_cannot_take_anothers_link_local_address(pair: tuple[Guest, Guest, Path]) -> None:
    """``--ip`` and link-local IPv6, first come first served: B gives itself
    A's link-local address too (A used it first) and its pings from it are
    dropped as spoofed; from its own link-local address A answers it."""
    _, gb, stats = pair
    addr_a, addr_b = "fe80::5054:ff:fe77:102", "fe80::5054:ff:fe77:103"  # EUI-64 of the MACs
    dad = "/proc/sys/net/ipv6/conf/eth0/accept_dad"  # busybox ip has no nodad
    assert wait_for(lambda: gb.run(f"ping -6 -c 1 -W 2 {addr_a}%eth0", check=False).status == 0,
                    timeout=30), gb.run("ip -6 addr", check=False).output  # fmt: skip
    spoofed = fetch(str(stats))["switch"]["dropped_spoofed"]
    gb.run(f"echo 0 > {dad}; ip -6 addr add {addr_a}/64 dev eth0; echo 1 > {dad}")
    try:
        out = gb.run(f"ping -6 -c 2 -W 2 -I {addr_a}%eth0 ff02::1%eth0", check=False)
        assert fetch(str(stats))["switch"]["dropped_spoofed"] > spoofed, (
            out.output + gb.run("ip -6 addr; ip -6 route show table all", check=False).output
        )
    finally:
        gb.run(f"ip -6 addr del {addr_a}/64 dev eth0")
    ping = f"ping -6 -c 1 -W 2 -I {addr_b}%eth0 {addr_a}%eth0"
    assert wait_for(lambda: gb.run(ping, check=False).status == 0, timeout=20)


def test_a_guest_held_to_a_rate(pair: tuple[Guest, Guest, Path]) -> None:
    """``virtnet ctl set a.sock --rate 40M`` while the guests run: A's TCP to
    B settles near 40 Mbit/s (the switch drops what is over and counts it),
    B's to A is not held; ``--no-rate`` lifts it."""
    ga, gb, stats = pair
    ctl = partial(_ctl, stats)

    def mbits(reverse: str) -> float:
        gb.run("iperf3 -s -D -1 >/dev/null 2>&1; sleep 0.5")
        out = ga.iperf3(f"-c {IP_B} -t 4 -i 0 -f m{reverse}")
        line = next(x for x in out.splitlines() if x.rstrip().endswith("receiver"))
        return float(line.split("Mbits/sec")[0].split()[-1])

    ctl("set", "a.sock", "--rate", "40M")
    try:
        assert fetch(str(stats))["vms"][0]["rate_bps"] == 40_000_000
        held = mbits("")
        assert 10 < held < 48, held
        assert fetch(str(stats))["switch"]["dropped_rate"] > 0
        free = mbits(" -R")
        print(f"A held to 40 Mbit/s: {held:.1f} Mbit/s; B, not held: {free:.1f} Mbit/s")
        assert free > 60  # what B sends is not held
    finally:
        ctl("set", "a.sock", "--no-rate")
    assert "rate_bps" not in fetch(str(stats))["vms"][0]


#: busybox udhcpd's configuration in guest A: a pool on the guests' subnet.
_UDHCPD_CONF = (
    "start 10.77.1.100\\nend 10.77.1.110\\ninterface eth0\\nlease_file /tmp/udhcpd.leases\\n"
)
#: B asks for a lease and exits, 3 tries a second apart, leaving its address as it is.
_UDHCPC = "udhcpc -i eth0 -n -q -t 3 -T 1 -s /bin/true"


def test_a_guarded_guest_cannot_be_a_dhcp_server(pair: tuple[Guest, Guest, Path]) -> None:
    """``--guard a.sock=dhcp,router``: A runs busybox's DHCP server; B's DHCP
    client gets no lease -- A's offers are dropped and counted -- until
    ``virtnet ctl set a.sock --no-guard``, and then it does (through B's own
    IP source guard, which lets a DHCP client send from 0.0.0.0)."""
    ga, gb, stats = pair
    ga.run(f"touch /tmp/udhcpd.leases; printf '{_UDHCPD_CONF}' > /tmp/udhcpd.conf; "
           "udhcpd /tmp/udhcpd.conf")  # fmt: skip
    try:
        guarded = fetch(str(stats))["switch"]["dropped_guard"]
        out = gb.run(_UDHCPC, check=False, timeout=30)
        assert out.status != 0, out.output
        assert fetch(str(stats))["switch"]["dropped_guard"] > guarded
        _ctl(stats, "set", "a.sock", "--no-guard")
        try:
            assert "guards" not in fetch(str(stats))["vms"][0]
            out = gb.run(_UDHCPC, check=False, timeout=30)
            assert out.status == 0 and f"obtained from {IP_A}" in out.output, out.output
        finally:
            _ctl(stats, "set", "a.sock", "--guard", "dhcp,router")
        assert fetch(str(stats))["vms"][0]["guards"] == ["dhcp", "router"]
    finally:
        ga.run("killall udhcpd", check=False)


def test_a_guest_may_send_from_the_address_dhcp_leased_it(pair: tuple[Guest, Guest, Path]) -> None:
    """``--ip b.sock=...,dhcp``: once A is a trusted DHCP server (``virtnet
    ctl set a.sock --no-ip --no-guard``) and leases B an address, B may send
    from it -- the switch snooped the ack -- but still not from one it was
    not leased."""
    ga, gb, stats = pair
    ga.run(f"rm -f /tmp/udhcpd.leases; touch /tmp/udhcpd.leases; "
           f"printf '{_UDHCPD_CONF}' > /tmp/udhcpd.conf; udhcpd /tmp/udhcpd.conf")  # fmt: skip
    _ctl(stats, "set", "a.sock", "--no-ip", "--no-guard")
    try:
        out = gb.run(_UDHCPC, check=False, timeout=30)
        assert out.status == 0, out.output
        leased = out.output.split("lease of ")[1].split()[0]
        doc = fetch(str(stats))
        assert doc["switch"]["leases_learnt"] >= 1
        assert doc["vms"][1]["leases"] == [leased], doc["vms"][1]
        other = "10.77.1.120" if leased != "10.77.1.120" else "10.77.1.121"
        for addr, allowed in ((leased, True), (other, False)):
            gb.run(f"ip addr add {addr}/24 dev eth0")
            try:
                out = gb.run(f"ping -c 2 -W 3 -I {addr} {IP_A}", check=False)
                assert (out.status == 0) is allowed, (addr, out.output)
            finally:
                gb.run(f"ip addr del {addr}/24 dev eth0")
    finally:
        ga.run("killall udhcpd", check=False)
        _ctl(stats, "set", "a.sock", "--ip", _ips(2), "--guard", "dhcp,router")
    assert fetch(str(stats))["vms"][0]["ips"] == _ips(2).split(",")
