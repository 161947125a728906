"""``virtnet serve --client`` dialing QEMU's listening vhost-user socket, switch with uplink.

QEMU (10, TCG) listens (``-chardev socket,server=on``) and waits for its
backend; ``virtnet serve --client --port switch:uplink=IF`` runs in a test
namespace, dials QEMU, and joins the guest (2 pairs) to a tap uplink in the
namespace (10.77.2.1/24).  The guest (10.77.2.2/24) pings the host side and
runs iperf3 both ways through the switch process.

serve holds the guest to 10.77.2.2, its SLAAC addresses and its DHCP leases
(``--ip qemu.sock=10.77.2.2,slaac,dhcp``): dnsmasq on the uplink advertises
fd77:2::/64, the guest's own kernel makes its address in it, and pings the
host from it; from an address in that prefix before the advertisement, or
outside it, the switch drops its pings as spoofed.  dnsmasq as a DHCPv6
server leases the guest's ISC ``dhclient -6`` an address in fd77:3::/64: the
guest may send from that one, not from another of the range.

The switch snoops IGMP and MLD and is the querier (``--mcast-querier``):
the guest kernel's own MLDv2 reports make it a member of its solicited-node
group; a group the guest joins (IGMPv3, ``socat``) gets the host's datagrams
by that membership, and one the host joins on the uplink gets the guest's;
the guest's leave ends its membership at once.  When the switch process is
killed, the new one asks, and the guest's answers make its memberships known
again.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from virtnet.testing.guest import (
    Guest,
    build_initramfs,
    default_initramfs_dir,
    vhost_user_netdev_args,
    wait_for,
)
from virtnet.testing.netns import NetNS, unique_name
from virtnet.testing.procs import stop_process
from virtnet.vhost_user.stats import fetch

pytestmark = [pytest.mark.vm, pytest.mark.root, pytest.mark.timeout(600)]

QUEUES = 2
HOST_IP, GUEST_IP = "10.77.2.1", "10.77.2.2"
#: The prefix dnsmasq advertises on the uplink for SLAAC, and the host's address in it.
PREFIX, HOST_IP6 = "fd77:2::", "fd77:2::1"
#: The DHCPv6 server's subnet on the uplink, its address there, and its range.
DHCP6_NET, DHCP6_HOST, DHCP6_RANGE = "fd77:3::", "fd77:3::1", ("fd77:3::100", "fd77:3::1ff")
#: ISC's DHCP client (Debian isc-dhcp-client), copied into the guest when the host has it.
DHCLIENT = shutil.which("dhclient")
#: socat, which joins the guest to IPv4 multicast groups (copied in likewise).
SOCAT = shutil.which("socat")
#: The groups the guest and the host join (the last from the guest's address
#: alone: source-specific multicast, 232/8), and the UDP port datagrams to them go to.
GUEST_GROUP, HOST_GROUP, SSM_GROUP, MCAST_PORT = "239.77.2.9", "239.77.2.10", "232.77.2.11", 5009


@pytest.fixture(scope="module")
def initramfs(guest_initramfs: Path) -> Path:
    """The test guest's initramfs, with ``dhclient`` and ``socat`` in it when the host has them."""
    extra = tuple(p for p in (DHCLIENT, SOCAT) if p is not None)
    if not extra:
        return guest_initramfs
    return build_initramfs(default_initramfs_dir(), extra_programs=extra)


@pytest.fixture(scope="module")
def setup(
    initramfs: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Guest, NetNS, Path]]:
    tmp = tmp_path_factory.mktemp("serve-client")
    sock, stats, log = tmp / "qemu.sock", tmp / "stats.sock", tmp / "serve.log"
    uplink = unique_name("vnup")
    with NetNS() as ns:
        with log.open("w") as out:
            serve = ns.popen(
                [sys.executable, "-m", "virtnet.cli", "-v", "serve", "--client", "--socket",
                 str(sock), "--port", f"switch:uplink={uplink}", "--queues", str(QUEUES),
                 "--ip", f"qemu.sock={GUEST_IP},slaac,dhcp", "--mcast-querier",
                 "--stats-socket", str(stats)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        try:
            assert wait_for(lambda: stats.exists() or serve.poll() is not None, timeout=20)
            assert serve.poll() is None, log.read_text()
            ns.wait_link(uplink)
            ns.set_address(uplink, f"{HOST_IP}/24")
            guest = Guest(
                vhost_user_netdev_args(sock, queues=QUEUES, server=True),
                initramfs=initramfs,
                ip=f"{GUEST_IP}/24",
            )
            # QEMU blocks until serve has dialed in; Guest.start waits for the agent.
            # (Started from this thread: QEMU dies with the thread that spawned it.)
            guest.start()
            try:
                yield guest, ns, stats
            finally:
                guest.close()
        finally:
            stop_process(serve, timeout=20)
            print(log.read_text()[-4000:])
    assert serve.returncode == 0


def test_client_mode_ping_and_iperf_through_switch_uplink(
    setup: tuple[Guest, NetNS, Path],
) -> None:
    guest, ns, stats = setup
    guest.set_channels(QUEUES)
    assert wait_for(lambda: guest.ping(HOST_IP, count=1, timeout=5), timeout=40), (
        guest.console_tail()
    )
    assert ns.ping(GUEST_IP, count=2)
    with ns.iperf3_server():
        out = guest.iperf3(f"-c {HOST_IP} -P 2 -t 2 -i 0")
        assert "receiver" in out, out
        out = guest.iperf3(f"-c {HOST_IP} -P 2 -t 2 -i 0 -R")
        assert "receiver" in out, out
    vm = fetch(str(stats))["vms"][0]
    assert vm["connected"] and vm["connections"] == 1
    assert sum(p["rx_packets"] for p in vm["pairs"]) > 100
    assert all(p["errors"] == 0 for p in vm["pairs"])


def _spoofed(stats: Path) -> int:
    return int(fetch(str(stats))["switch"]["dropped_spoofed"])


def _ping6_from(guest: Guest, addr: str, host: str = HOST_IP6) -> bool:
    """Whether the guest, from its address ``addr`` (added without duplicate
    address detection, then removed), gets an answer from ``host``."""
    dad = "/proc/sys/net/ipv6/conf/eth0/accept_dad"  # busybox ip has no nodad
    guest.run(f"echo 0 > {dad}; ip -6 addr add {addr}/64 dev eth0; echo 1 > {dad}")
    try:
        return guest.run(f"ping -6 -c 2 -W 3 -I {addr} {host}", check=False).status == 0
    finally:
        guest.run(f"ip -6 addr del {addr}/64 dev eth0")


def _dnsmasq(
    ns: NetNS, uplink: str, tmp_path: Path, *options: str
) -> tuple[subprocess.Popen[str], Path]:
    """dnsmasq, DNS off, on the uplink in ``ns`` with ``options`` (its DHCP
    and RA settings), logging to a file: the process and its log."""
    dnsmasq = shutil.which("dnsmasq")
    assert dnsmasq is not None
    log = tmp_path / "dnsmasq.log"
    with log.open("w") as logged:
        proc = ns.popen(
            [dnsmasq, "--keep-in-foreground", "--conf-file=/dev/null", "--port=0",
             f"--interface={uplink}", "--bind-interfaces",
             f"--pid-file={tmp_path / 'dnsmasq.pid'}",
             f"--dhcp-leasefile={tmp_path / 'dnsmasq.leases'}", "--user=root",
             "--log-facility=-", *options],
            stdout=logged, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    return proc, log


def _slaac_address(guest: Guest) -> str | None:
    """The guest's address in PREFIX that its kernel made (``dynamic``), if any."""
    out = guest.run("ip -6 addr show dev eth0 scope global", check=False).output
    for line in out.splitlines():
        words = line.split()
        if words[:1] == ["inet6"] and words[1].startswith(PREFIX) and "dynamic" in words:
            return words[1].split("/")[0]
    return None


def test_a_guest_may_send_from_its_slaac_address(
    setup: tuple[Guest, NetNS, Path], tmp_path: Path
) -> None:
    """``--ip qemu.sock=10.77.2.2,slaac``: before a router advertises
    fd77:2::/64, the guest's pings from an address in it are dropped as
    spoofed; once dnsmasq on the uplink does, the guest's kernel makes its
    SLAAC address and pings the host from it, ``virtnet stats`` shows the
    prefix and the address; an address outside the prefix is still refused."""
    if shutil.which("dnsmasq") is None:
        pytest.skip("dnsmasq is not installed (Debian package dnsmasq-base)")
    guest, ns, stats = setup
    uplink = fetch(str(stats))["switch"]["uplinks"][0]["name"]
    ns.ip("-6", "addr", "add", f"{HOST_IP6}/64", "dev", uplink, "nodad")
    spoofed = _spoofed(stats)
    assert not _ping6_from(guest, "fd77:2::99")
    assert _spoofed(stats) > spoofed
    router, log = _dnsmasq(
        ns,
        uplink,
        tmp_path,
        "--enable-ra",
        f"--dhcp-range={PREFIX},ra-only,64,1h",
        f"--ra-param={uplink},10",
    )
    try:
        assert wait_for(lambda: _slaac_address(guest) is not None, timeout=60), (
            log.read_text() + guest.run("ip -6 addr; ip -6 route", check=False).output
        )
        addr = _slaac_address(guest)
        ping = f"ping -6 -c 1 -W 3 -I {addr} {HOST_IP6}"
        assert wait_for(lambda: guest.run(ping, check=False).status == 0, timeout=30), fetch(
            str(stats)
        )["switch"]
        doc = fetch(str(stats))
        assert doc["switch"]["prefixes"] == ["fd77:2::/64"], doc["switch"]
        assert doc["switch"]["prefixes_learnt"] == 1
        assert doc["vms"][0]["slaac"] == [addr], doc["vms"][0]
        shown = subprocess.run(
            [sys.executable, "-m", "virtnet.cli", "stats", "--stats-socket", str(stats)],
            capture_output=True, text=True, timeout=30, check=True,
            env={**os.environ, "COLUMNS": "300"},
        )  # fmt: skip
        text = shown.stdout
        assert f"SLAAC {addr}" in text and "SLAAC prefixes fd77:2::/64" in text, text
        spoofed = _spoofed(stats)
        assert not _ping6_from(guest, "fd77:3::5")
        assert _spoofed(stats) > spoofed
    finally:
        stop_process(router, timeout=10)
        ns.ip("-6", "addr", "del", f"{HOST_IP6}/64", "dev", uplink, check=False)


def _link_local_ready(guest: Guest) -> bool:
    """Whether the guest's eth0 has a link-local address past duplicate address detection."""
    out = guest.run("ip -6 addr show dev eth0 scope link", check=False).output
    return "inet6 fe80" in out and "tentative" not in out


def test_a_guest_may_send_from_the_address_dhcpv6_leased_it(
    setup: tuple[Guest, NetNS, Path], tmp_path: Path
) -> None:
    """``--ip qemu.sock=...,dhcp`` and DHCPv6: dnsmasq on the uplink leases
    the guest's ``dhclient -6`` an address; the switch snooped the Reply, so
    the guest may send from that address, and still not from another of the
    range; ``virtnet stats`` shows the lease."""
    if shutil.which("dnsmasq") is None or DHCLIENT is None:
        pytest.skip("dnsmasq and dhclient are not installed (dnsmasq-base, isc-dhcp-client)")
    guest, ns, stats = setup
    uplink = fetch(str(stats))["switch"]["uplinks"][0]["name"]
    ns.ip("-6", "addr", "add", f"{DHCP6_HOST}/64", "dev", uplink, "nodad")
    server, log = _dnsmasq(
        ns, uplink, tmp_path, f"--dhcp-range={DHCP6_RANGE[0]},{DHCP6_RANGE[1]},64,1h", "--log-dhcp"
    )
    leases = "/tmp/dhclient6.leases"
    try:
        # dhclient binds to the link-local address: wait out its duplicate address detection.
        assert wait_for(lambda: _link_local_ready(guest), timeout=30), guest.run("ip addr").output
        guest.run("echo > /tmp/dhclient.conf; rm -f " + leases)
        # One try; on a lease it goes to the background (renewing), its script a no-op.
        out = guest.run(f"dhclient -6 -1 -v -cf /tmp/dhclient.conf -lf {leases} "
                        "-pf /tmp/dhclient6.pid -sf /bin/true eth0", check=False,
                        timeout=90)  # fmt: skip
        held = guest.run(f"cat {leases}", check=False).output
        assert out.status == 0 and "iaaddr" in held, out.output + held + log.read_text()
        leased = held.split("iaaddr ")[1].split()[0]
        assert DHCP6_NET[:-1] in leased, held
        doc = fetch(str(stats))
        assert leased in doc["vms"][0].get("leases", []), (leased, doc["vms"][0])
        other = DHCP6_RANGE[1] if leased != DHCP6_RANGE[1] else DHCP6_RANGE[0]
        spoofed = _spoofed(stats)
        assert _ping6_from(guest, leased, DHCP6_HOST), log.read_text()
        assert not _ping6_from(guest, other, DHCP6_HOST)
        assert _spoofed(stats) > spoofed
    finally:
        guest.run("killall dhclient", check=False)
        stop_process(server, timeout=10)
        ns.ip("-6", "addr", "del", f"{DHCP6_HOST}/64", "dev", uplink, check=False)


#: The host's end of a multicast test: join ``group`` on the interface with
#: address ``addr`` (from the source ``argv[4]`` alone if given: a
#: source-specific join), print the first datagram to it (10 s at most).
_RECEIVE = """
import socket, sys
group, addr, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("", port))
if len(sys.argv) > 4:  # struct ip_mreq_source: group, interface, source
    # IP_ADD_SOURCE_MEMBERSHIP, <linux/in.h> (Python has it from 3.12 on)
    s.setsockopt(socket.IPPROTO_IP, 39, socket.inet_aton(group)
                 + socket.inet_aton(addr) + socket.inet_aton(sys.argv[4]))
else:
    s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                 socket.inet_aton(group) + socket.inet_aton(addr))
print("joined", flush=True)
s.settimeout(10)
print(s.recv(2048).decode(), flush=True)
"""

#: ... and its sender: one datagram to ``group`` out of the interface with address ``addr``.
_SEND = """
import socket, sys
group, addr, port, text = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(addr))
s.sendto(text.encode(), (group, port))
"""


def _groups(stats: Path) -> list[str]:
    """The guest's multicast groups as ``virtnet stats`` shows them."""
    return list(fetch(str(stats))["vms"][0].get("groups", []))


def _uplink_joined(stats: Path, group: str) -> bool:
    """Whether ``virtnet stats`` shows an uplink in ``group``."""
    groups = fetch(str(stats))["switch"].get("groups", {})
    return any(group in g for g in groups.values())


def _forwarded(stats: Path) -> int:
    return int(fetch(str(stats))["switch"]["mcast_forwarded"])


def _solicited_node_group(guest: Guest) -> str:
    """The solicited-node multicast group (RFC 4291 section 2.7.1) of the
    guest's link-local address."""
    assert wait_for(lambda: _link_local_ready(guest), timeout=30)
    out = guest.run("ip -6 addr show dev eth0 scope link").output
    ll = ipaddress.IPv6Address(out.split("inet6 ")[1].split("/")[0]).packed
    return str(ipaddress.IPv6Address(bytes.fromhex("ff0200000000000000000001ff") + ll[13:]))


def test_multicast_snooping_with_the_guests_own_igmp_and_mld(
    setup: tuple[Guest, NetNS, Path],
) -> None:
    """``--mcast-snoop`` with the guest's and the host's kernels reporting:
    the guest is a member of the solicited-node group of its link-local
    address (its MLDv2 reports); a group it joins with socat (IGMPv3) gets
    the host's datagram, sent to the group's members rather than flooded;
    a group the host joins on the uplink gets the guest's, and so does one it
    joins for the guest's address alone; when socat exits the guest's leave
    ends its membership at once."""
    if SOCAT is None:
        pytest.skip("socat is not installed (Debian package socat)")
    guest, ns, stats = setup
    solicited = _solicited_node_group(guest)
    assert wait_for(lambda: solicited in _groups(stats), timeout=30), fetch(str(stats))
    # The guest joins GUEST_GROUP; the host sends to it.
    join = f"UDP4-RECV:{MCAST_PORT},ip-add-membership={GUEST_GROUP}:eth0"
    guest.run(f"rm -f /tmp/mcast; socat -u {join} OPEN:/tmp/mcast,creat,append"
              " </dev/null >/dev/null 2>&1 &")  # fmt: skip
    try:
        assert wait_for(lambda: GUEST_GROUP in _groups(stats), timeout=30), fetch(str(stats))
        forwarded = _forwarded(stats)

        def sent_to_members() -> bool:
            # Snooping holds traffic back from 10 s after the switch's first query.
            ns.run([sys.executable, "-c", _SEND, GUEST_GROUP, HOST_IP, str(MCAST_PORT), "to-guest"])
            return _forwarded(stats) > forwarded

        assert wait_for(sent_to_members, timeout=30, interval=1.0)
        assert wait_for(
            lambda: "to-guest" in guest.run("cat /tmp/mcast", check=False).output, timeout=20
        )
    finally:
        guest.run("killall socat", check=False)
    # socat's exit makes the guest's kernel leave (an IGMPv3 TO_IN({}) record).
    assert wait_for(lambda: GUEST_GROUP not in _groups(stats), timeout=30), fetch(str(stats))
    # The host joins HOST_GROUP on the uplink, then SSM_GROUP from the guest's
    # address alone (its kernel's IGMPv3 ALLOW record); the guest sends to each.
    for group, only in ((HOST_GROUP, ()), (SSM_GROUP, (GUEST_IP,))):
        receiver = ns.popen(
            [sys.executable, "-c", _RECEIVE, group, HOST_IP, str(MCAST_PORT), *only],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            assert receiver.stdout is not None
            assert receiver.stdout.readline().strip() == "joined"
            joined = partial(_uplink_joined, stats, group)
            assert wait_for(joined, timeout=30), fetch(str(stats))["switch"]
            guest.run(f"echo to-host | socat -u - UDP4-DATAGRAM:{group}:{MCAST_PORT},"
                      f"ip-multicast-if={GUEST_IP}")  # fmt: skip
            assert receiver.stdout.readline().strip() == "to-host"
        finally:
            stop_process(receiver, timeout=10)


def test_the_switch_asks_the_guest_for_its_groups_after_a_restart(
    setup: tuple[Guest, NetNS, Path],
) -> None:
    """``--mcast-querier``: the switch process is killed; serve starts a new
    one, which knows no group and sends general queries; the guest kernel
    answers (no unsolicited report is due: its link never went down), and
    its solicited-node group is known again.  (Last: it restarts the switch.)"""
    guest, _ns, stats = setup
    solicited = _solicited_node_group(guest)
    assert wait_for(lambda: solicited in _groups(stats), timeout=30), fetch(str(stats))
    # No report in flight: none came for 5 s (the guest's unsolicited ones are sent 1 s apart).
    joined: list[int] = []

    def quiet() -> bool:
        joined.append(int(fetch(str(stats))["switch"]["mcast_joined"]))
        return len(joined) > 5 and joined[-6] == joined[-1]

    assert wait_for(quiet, timeout=60, interval=1.0)
    sw = fetch(str(stats))["switch"]
    os.kill(sw["pid"], signal.SIGKILL)

    def restarted() -> bool:
        return int(fetch(str(stats))["switch"].get("restarts", 0)) > int(sw["restarts"])

    assert wait_for(restarted, timeout=30)
    assert wait_for(lambda: solicited in _groups(stats), timeout=60), fetch(str(stats))
    assert fetch(str(stats))["switch"]["mcast_queries"] >= 2
    assert wait_for(lambda: guest.ping(HOST_IP, count=1, timeout=5), timeout=30)
