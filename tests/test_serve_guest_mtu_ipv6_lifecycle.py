"""Jumbo frames, IPv6 and a VM's lifecycle, with a real guest on ``virtnet serve --port tap``.

One guest (QEMU 10, TCG, 2 pairs) whose NIC has ``host_mtu=9000``: QEMU then
sends ``VHOST_USER_NET_SET_MTU`` and offers ``VIRTIO_NET_F_MTU``, and the
guest's own virtio_net takes MTU 9000.  serve creates the tap in the test's
namespace and raises its MTU to the one QEMU announced.  Checks:

* jumbo frames: 9000-byte IPv4 packets both ways, unfragmented (DF set into
  the guest, the tap's counters out of it), and TCP both ways at that MTU;
* IPv6: neighbour discovery (multicast) through serve, ping both ways, TCP
  both ways (the TSO6/GSO TCPV6 offload path in both directions);
* the NIC unplugged and plugged again at run time (QMP ``device_del`` /
  ``netdev_del`` then ``chardev-add`` / ``netdev_add`` / ``device_add``, what
  ``virsh detach-interface`` and ``attach-interface`` do): serve stops the
  rings, sees the connection close, keeps serving, and takes the new NIC on a
  new connection without being restarted;
* the machine reset (a reboot): the same connection, the device negotiated
  again by the rebooted kernel;
* the tap deleted under the running guest: serve creates it again, with its
  MAC and the guest's MTU, and the guest's pairs go on with it.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from virtnet.testing.guest import DEFAULT_MAC, Guest, wait_for
from virtnet.testing.serve import ServedGuest, guest_on_tap
from virtnet.vhost_user.stats import fetch

pytestmark = [pytest.mark.vm, pytest.mark.root, pytest.mark.timeout(600)]

QUEUES = 2
MTU = 9000
HOST_IP, GUEST_IP = "10.78.0.1", "10.78.0.2"
HOST_IP6, GUEST_IP6 = "fd78::1", "fd78::2"
#: ICMP payload filling a 9000-byte IPv4 packet (20 IP + 8 ICMP header bytes).
JUMBO_PING = MTU - 28


@pytest.fixture(scope="module")
def setup(guest_initramfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedGuest]:
    # No tap yet: serve creates it and gives it the MTU QEMU announces.
    with guest_on_tap(
        tmp_path_factory.mktemp("serve-jumbo"),
        guest_initramfs,
        queues=QUEUES,
        host_cidr=f"{HOST_IP}/24",
        guest_cidr=f"{GUEST_IP}/24",
        device_extra=f"id=nic0,host_mtu={MTU}",
        serve_creates_tap=True,
    ) as s:
        s.ns.ip("-6", "addr", "add", f"{HOST_IP6}/64", "dev", s.tap, "nodad")
        _add_ipv6(s.guest)
        yield s


def _add_ipv6(guest: Guest) -> None:
    guest.run(
        "echo 0 > /proc/sys/net/ipv6/conf/eth0/accept_dad"
        f" && ip -6 addr add {GUEST_IP6}/64 dev eth0 && ip link set eth0 up"
    )


def _tap_rx(s: ServedGuest) -> tuple[int, int]:
    """Frames and bytes the host received on the tap (what the guest sent)."""
    base = f"/sys/class/net/{s.tap}/statistics"
    out = s.ns.run(["cat", f"{base}/rx_packets", f"{base}/rx_bytes"]).stdout.split()
    return int(out[0]), int(out[1])


def _tcp_both_ways(s: ServedGuest, server: str, *, flags: str = "") -> None:
    with s.ns.iperf3_server():
        for direction in ("", " -R"):
            out = s.guest.iperf3(f"-c {server} {flags} -P {QUEUES} -t 2 -i 0{direction}")
            assert "receiver" in out, out


def _no_errors(s: ServedGuest) -> None:
    pairs = s.pairs()
    assert all(p["errors"] == 0 for p in pairs), pairs


def test_guest_and_tap_take_the_nics_mtu(setup: ServedGuest) -> None:
    """The guest's driver takes ``host_mtu``; serve hears it (NET_SET_MTU) and
    raises the MTU of the tap it created to match."""
    g = setup.guest
    assert g.run("cat /sys/class/net/eth0/mtu").output.strip() == str(MTU)
    log = setup.log.read_text()
    assert f"MTU {MTU}" in log and f"tap {setup.tap} MTU {MTU}, the guest's" in log, log
    mtu = setup.ns.run(["cat", f"/sys/class/net/{setup.tap}/mtu"]).stdout.strip()
    assert mtu == str(MTU)


def test_jumbo_frames_unfragmented_both_ways(setup: ServedGuest) -> None:
    """Host->guest: iputils ping with DF set (-M do) cannot fragment, so a
    reply proves a 9000-byte packet went in and one came back.  Guest->host:
    busybox ping cannot set DF, so the tap's counters show the echo requests
    arrived whole: as many frames as pings, each over 9000 bytes."""
    s = setup
    g = s.guest
    assert g.ping(HOST_IP, count=1)  # ARP settled both ways before counting
    res = s.ns.run(
        ["ping", "-M", "do", "-s", str(JUMBO_PING), "-c", "3", "-W", "5", GUEST_IP], check=False
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{JUMBO_PING + 8} bytes from {GUEST_IP}" in res.stdout, res.stdout
    frames0, bytes0 = _tap_rx(s)
    out = g.run(f"ping -c 3 -W 5 -s {JUMBO_PING} {HOST_IP}").output
    assert f"{JUMBO_PING + 8} bytes from {HOST_IP}" in out, out
    frames1, bytes1 = _tap_rx(s)
    # 3 echo requests of 9014 bytes each; a fragmented one would add frames of
    # at most 1514.  Allow a few small extra frames (ND, ARP) but not fragments.
    assert bytes1 - bytes0 >= 3 * (MTU + 14), (frames1 - frames0, bytes1 - bytes0)
    assert frames1 - frames0 <= 3 + 2, (frames1 - frames0, bytes1 - bytes0)
    _tcp_both_ways(s, HOST_IP)
    _no_errors(s)


def test_ipv6_ping_and_tcp_both_ways(setup: ServedGuest) -> None:
    """Neighbour discovery is multicast; TCP over IPv6 uses the TSO6 offload
    (GSO TCPV6 in the virtio-net header) both ways."""
    s = setup
    g = s.guest
    assert wait_for(lambda: g.run(f"ping -6 -c 1 -W 2 {HOST_IP6}", check=False).status == 0,
                    timeout=20), g.run("ip -6 addr; ip -6 neigh", check=False).output  # fmt: skip
    assert s.ns.ping(GUEST_IP6, count=2)
    features = g.run("ethtool -k eth0").output
    assert "tx-tcp6-segmentation: on" in features, features
    _tcp_both_ways(s, HOST_IP6, flags="-6")
    # jumbo over IPv6 too (40-byte IPv6 header, 8-byte ICMPv6 header)
    res = s.ns.run(
        ["ping", "-6", "-M", "do", "-s", str(MTU - 48), "-c", "2", "-W", "5", GUEST_IP6],
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    _no_errors(s)


def _vm(s: ServedGuest) -> dict[str, object]:
    vm: dict[str, object] = fetch(str(s.stats))["vms"][0]
    return vm


def _pci_has(g: Guest, dev_id: str) -> bool:
    buses = g.qmp("query-pci")
    assert isinstance(buses, list)
    return any(d.get("qdev_id") == dev_id for bus in buses for d in bus["devices"])


def test_nic_unplugged_and_plugged_again(setup: ServedGuest) -> None:
    """Hot-unplug the NIC (the guest ejects it through ACPI), delete its
    netdev (QEMU closes the vhost-user connection), then plug a new NIC on a
    new connection to the same serve: the guest gets eth0 back at MTU 9000
    with both pairs, and traffic flows.  serve is never restarted.  (The
    module's later tests run on the new NIC.)"""
    s = setup
    g = s.guest
    g.set_channels(QUEUES)
    assert wait_for(partial(ServedGuest.enabled_is, s, QUEUES), timeout=10), s.pairs()
    connections = _vm(s)["connections"]
    serve_pid = s.serve.pid

    g.qmp("device_del", {"id": "nic0"})
    assert wait_for(lambda: not _pci_has(g, "nic0"), timeout=60), g.console_tail()
    assert g.run("test -e /sys/class/net/eth0", check=False).status != 0
    # QEMU stopped every ring (GET_VRING_BASE) and reset the device: no worker runs.
    assert wait_for(lambda: all(p["pid"] == 0 for p in s.pairs()), timeout=10), s.pairs()
    g.qmp("netdev_del", {"id": "n0"})
    assert wait_for(lambda: not _vm(s)["connected"], timeout=10), _vm(s)

    g.qmp("chardev-add", {"id": "n1c", "backend": {"type": "socket", "data": {
        "addr": {"type": "unix", "data": {"path": str(s.sock)}},
        "server": False, "reconnect-ms": 500}}})  # fmt: skip
    g.qmp("netdev_add", {"type": "vhost-user", "id": "n1", "chardev": "n1c",
                         "queues": QUEUES})  # fmt: skip
    g.qmp("device_add", {"driver": "virtio-net-pci", "id": "nic1", "netdev": "n1",
                         "mac": DEFAULT_MAC, "mq": True, "vectors": 2 * QUEUES + 2,
                         "host_mtu": MTU})  # fmt: skip
    assert wait_for(lambda: g.run("test -e /sys/class/net/eth0", check=False).status == 0,
                    timeout=60), g.console_tail()  # fmt: skip
    g.configure_ip(f"{GUEST_IP}/24")
    assert g.run("cat /sys/class/net/eth0/mtu").output.strip() == str(MTU)
    assert wait_for(lambda: g.ping(HOST_IP, count=1, timeout=4), timeout=30), s.log.read_text()[
        -3000:
    ]
    g.set_channels(QUEUES)
    assert wait_for(partial(ServedGuest.enabled_is, s, QUEUES), timeout=10), s.pairs()
    vm = _vm(s)
    assert vm["connected"] and vm["connections"] == connections + 1, vm  # type: ignore[operator]
    with s.ns.iperf3_server():
        out = g.iperf3(f"-c {HOST_IP} -P {QUEUES} -t 2 -i 0 -R")
        assert "receiver" in out, out
    assert s.serve.poll() is None and s.serve.pid == serve_pid
    _no_errors(s)


def test_guest_reboot(setup: ServedGuest) -> None:
    """The whole machine reset (after the re-plug above): QEMU stops the rings
    and resets the device on the same connection, the rebooted kernel's
    virtio_net negotiates again, and both pairs carry traffic."""
    s = setup
    g = s.guest
    connections = _vm(s)["connections"]
    g.reboot()
    assert wait_for(lambda: g.ping(HOST_IP, count=1, timeout=4), timeout=60), g.console_tail()
    assert g.run("cat /sys/class/net/eth0/mtu").output.strip() == str(MTU)
    g.set_channels(QUEUES)
    assert wait_for(partial(ServedGuest.enabled_is, s, QUEUES), timeout=10), s.pairs()
    _tcp_both_ways(s, HOST_IP)
    assert _vm(s)["connections"] == connections  # a reset is not a reconnection
    _no_errors(s)


def test_tap_deleted_under_the_running_guest(setup: ServedGuest) -> None:
    """``ip link del`` of the tap serve created, while the guest runs: serve
    creates it again with its MAC and the guest's MTU, the guest's pairs go on with it
    (same connection, no reboot, no reconnection), and once the host has
    configured it as before, jumbo pings and TCP cross both ways."""
    s = setup
    g = s.guest
    g.set_channels(QUEUES)
    assert wait_for(partial(ServedGuest.enabled_is, s, QUEUES), timeout=10), s.pairs()
    connections = _vm(s)["connections"]
    mac = s.ns.run(["cat", f"/sys/class/net/{s.tap}/address"]).stdout
    s.ns.ip("link", "del", "dev", s.tap)
    assert wait_for(lambda: "created again" in s.log.read_text(), timeout=20), s.log.read_text()
    s.ns.wait_link(s.tap)
    mtu = s.ns.run(["cat", f"/sys/class/net/{s.tap}/mtu"]).stdout.strip()
    assert mtu == str(MTU)
    # The same MAC: the guest's neighbour entry for the host stays right.
    assert s.ns.run(["cat", f"/sys/class/net/{s.tap}/address"]).stdout == mac
    s.ns.set_address(s.tap, f"{HOST_IP}/24")
    assert wait_for(lambda: g.ping(HOST_IP, count=1, timeout=4), timeout=30), g.console_tail()
    res = s.ns.run(
        ["ping", "-M", "do", "-s", str(JUMBO_PING), "-c", "2", "-W", "5", GUEST_IP], check=False
    )
    assert res.returncode == 0, res.stdout + res.stderr
    _tcp_both_ways(s, HOST_IP)
    vm = _vm(s)
    assert vm["connections"] == connections, vm
    assert vm["workers"] == list(range(QUEUES)), vm
