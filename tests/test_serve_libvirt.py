"""libvirt as the peer: the README's ``vhostuser`` domain XML, started by libvirtd.

A private libvirtd (``virtnet.testing.libvirt``) starts QEMU 10 from a transient
domain whose interface and memory backing are the README's libvirt snippet, with
only the socket path changed.  ``virtnet serve --port tap:IF --queues 4`` runs in a
network namespace holding the tap (10.78.0.1/24).  Checks: libvirt's own QEMU
command line asks for 4 pairs with ``mq=on``; the guest's ``ethtool -L`` reaches
serve; ping and iperf3 both ways on every queue; and serve killed and restarted
while the guest runs (the README's ``<reconnect>``): traffic resumes, no reboot;
the interface detached and attached again with ``virsh``.  And ``virsh migrate
--live`` of that domain between two libvirt daemons, both
guests on one serve.  And QEMU run as ``libvirt-qemu``, as distributions run it,
connecting to a socket serve gave that group (``--socket-group``).
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest

from virtnet.net import NetFeature
from virtnet.testing.guest import wait_for
from virtnet.testing.libvirt import Libvirtd, LibvirtGuest, skip_reason
from virtnet.testing.netns import NetNS, unique_name
from virtnet.testing.procs import stop_process
from virtnet.testing.serve import (
    ServedGuest,
    check_serve_restart,
    iperf_until_every_queue_moved,
    start_bridged_serve,
    start_tap_serve,
)
from virtnet.vhost_user.stats import fetch

pytestmark = [pytest.mark.vm, pytest.mark.root, pytest.mark.timeout(600)]

README = Path(__file__).resolve().parent.parent / "README.md"
README_SOCKET = "/run/vm1.sock"
QUEUES = 4
HOST_IP = "10.78.0.1"
GUEST_IP = "10.78.0.2"
#: The user and group a distribution's libvirt runs QEMU as (Debian's default).
QEMU_USER = "libvirt-qemu"


def readme_libvirt_xml() -> tuple[str, str]:
    """(memory backing, interface) of the README's libvirt snippet."""
    text = README.read_text()
    block = re.search(r"With libvirt.*?```xml\n(.*?)```", text, re.S)
    assert block, "README has no libvirt XML block"
    xml = block.group(1)
    mem = re.search(r"<memoryBacking>.*?</memoryBacking>", xml, re.S)
    iface = re.search(r"<interface type='vhostuser'>.*?</interface>", xml, re.S)
    assert mem and iface, xml
    assert README_SOCKET in iface.group(0), iface.group(0)
    assert f"<driver queues='{QUEUES}'/>" in iface.group(0), iface.group(0)
    return mem.group(0), iface.group(0)


def readme_guest(
    lv: Libvirtd, sock: Path, initramfs: Path, *, packed: bool = False
) -> LibvirtGuest:
    """The test guest as the README's libvirt XML makes it, on serve's ``sock``
    (``packed``: with ``packed='on'`` in its ``<driver>``, as the README says
    to give the NIC packed virtqueues)."""
    mem, iface = readme_libvirt_xml()
    iface = iface.replace(README_SOCKET, str(sock))
    if packed:
        iface = iface.replace(
            f"<driver queues='{QUEUES}'/>", f"<driver queues='{QUEUES}' packed='on'/>"
        )
    return LibvirtGuest(
        libvirtd=lv,
        devices_xml=iface,
        memory_backing_xml=mem,
        initramfs=initramfs,
        ip=f"{GUEST_IP}/24",
    )


def test_readme_snippet_is_found() -> None:
    """The snippet the libvirt test boots is the README's (no VM needed)."""
    mem, iface = readme_libvirt_xml()
    assert "memfd" in mem and "shared" in mem
    assert "mode='client'" in iface and "<reconnect enabled='yes'" in iface


@dataclass
class Setup(ServedGuest):
    guest: LibvirtGuest
    libvirtd: Libvirtd


@pytest.fixture(scope="module")
def setup(guest_initramfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("serve-libvirt")
    tap = unique_name("vntap")
    with NetNS() as ns:
        ns.create_tap(tap)
        ns.set_address(tap, f"{HOST_IP}/24")
        sock, stats, log = tmp / "vm.sock", tmp / "stats.sock", tmp / "serve.log"
        serve = start_tap_serve(ns, tap, sock, stats, log, queues=QUEUES)
        s: Setup | None = None
        try:
            with (
                Libvirtd() as lv,
                readme_guest(lv, sock, guest_initramfs) as guest,
            ):
                s = Setup(guest, ns, tap, sock, stats, log, serve, QUEUES, lv)
                yield s
        finally:
            stop_process(s.serve if s is not None else serve)
            print(log.read_text()[-6000:])


def test_libvirt_builds_a_multiqueue_vhost_user_device(setup: Setup) -> None:
    """What libvirt made of the snippet: a vhost-user netdev with 4 pairs on our
    socket and a virtio-net device with mq on (libvirt adds it, not the user)."""
    pid = setup.guest.qemu_pid
    assert pid is not None
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    text = " ".join(cmdline)
    assert str(setup.sock) in text, text
    assert re.search(r'"type":"vhost-user".*"queues":4|vhost-user.*queues=4', text), text
    assert re.search(r'"mq":true|mq=on', text), text
    assert "vhostuser" in setup.libvirtd.virsh("domiflist", setup.guest.name)
    assert setup.guest.qmp("query-name") == {"name": setup.guest.name}
    assert setup.guest.channels().max_combined == QUEUES


def test_channels_ping_and_iperf3_on_every_queue(setup: Setup) -> None:
    g = setup.guest
    for n in (1, QUEUES):
        g.set_channels(n)
        assert g.channels().combined == n
        assert wait_for(partial(setup.enabled_is, n), timeout=10), setup.pairs()
        assert g.ping(HOST_IP, count=2), g.console_tail()
    rx, tx = iperf_until_every_queue_moved(g, setup.ns, HOST_IP, QUEUES)
    assert all(rx.get(q, 0) > 0 for q in range(QUEUES)), rx
    assert all(tx.get(q, 0) > 0 for q in range(QUEUES)), tx
    assert all(p["errors"] == 0 for p in setup.pairs())


def test_serve_restart_resumes_traffic_under_libvirt(setup: Setup) -> None:
    """The snippet's ``<reconnect>``: QEMU (run by libvirt) dials serve again."""
    check_serve_restart(setup, HOST_IP, pairs=2)


def test_interface_detached_and_attached_with_virsh(setup: Setup, tmp_path: Path) -> None:
    """``virsh detach-device --live`` of the README's interface: the guest
    loses eth0 and QEMU closes the vhost-user connection; ``virsh
    attach-device --live`` of the same XML: libvirt plugs a new NIC on a new
    connection to the same serve, 4 pairs, traffic flows (what OpenStack's
    interface detach and attach do)."""
    g = setup.guest
    lv = setup.libvirtd
    iface = tmp_path / "iface.xml"
    iface.write_text(readme_libvirt_xml()[1].replace(README_SOCKET, str(setup.sock)))
    connections = fetch(str(setup.stats))["vms"][0]["connections"]

    def has_eth0() -> bool:
        return g.run("test -e /sys/class/net/eth0", check=False).status == 0

    lv.virsh("detach-device", g.name, str(iface), "--live")
    assert wait_for(lambda: not has_eth0(), timeout=60), g.console_tail()
    assert wait_for(lambda: not fetch(str(setup.stats))["vms"][0]["connected"], timeout=30)
    assert "vhostuser" not in lv.virsh("domiflist", g.name)
    lv.virsh("attach-device", g.name, str(iface), "--live")
    assert wait_for(has_eth0, timeout=60), g.console_tail()
    g.configure_ip(f"{GUEST_IP}/24")
    assert g.channels().max_combined == QUEUES
    g.set_channels(QUEUES)
    assert wait_for(partial(setup.enabled_is, QUEUES), timeout=10), setup.pairs()
    assert wait_for(lambda: g.ping(HOST_IP, count=1, timeout=4), timeout=30), g.console_tail()
    with setup.ns.iperf3_server():
        out = g.iperf3(f"-c {HOST_IP} -P 4 -t 2 -i 0 -R")
        assert "receiver" in out, out
    vm = fetch(str(setup.stats))["vms"][0]
    assert vm["connected"] and vm["connections"] == connections + 1, vm


def test_virsh_migrate_live_between_two_libvirt_daemons(
    guest_initramfs: Path, tmp_path: Path
) -> None:
    """``virsh migrate --live`` of the README's domain between two libvirt daemons
    (two hosts to libvirt: each has its own host UUID), both guests on one
    serve: ``--socket A --socket B --port tap:T%d``, the two taps in a bridge.
    libvirt drives QEMU's migration (dirty logging in serve's workers); on the
    destination the guest keeps its 4 pairs, reaches the host, and its traffic
    goes through socket B."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    tap = unique_name("vnlm")
    src_sock, dst_sock = tmp_path / "a.sock", tmp_path / "b.sock"
    stats, log = tmp_path / "stats.sock", tmp_path / "serve.log"
    log.write_text("")
    with NetNS() as ns:
        serve = start_bridged_serve(
            ns, tap, (src_sock, dst_sock), stats, log, queues=QUEUES, host_cidr=f"{HOST_IP}/24"
        )
        try:
            with (
                Libvirtd() as lv_src,
                Libvirtd() as lv_dst,
                readme_guest(lv_src, src_sock, guest_initramfs) as src,
            ):
                src.set_channels(QUEUES)
                assert src.ping(HOST_IP, count=2), src.console_tail()
                with LibvirtGuest(
                    libvirtd=lv_dst,
                    initramfs=guest_initramfs,
                    migrate_from=src,
                    migrate_replace={str(src_sock): str(dst_sock)},
                    incoming="virsh migrate",
                ) as dst:
                    dst.migration_result()
                    assert dst.name == src.name
                    assert wait_for(lambda: dst.running, timeout=30)
                    assert "running" in lv_dst.virsh("domstate", dst.name)
                    assert src.name not in lv_src.virsh("list", "--all", "--name")
                    assert dst.channels().combined == QUEUES
                    assert dst.ping(HOST_IP, count=3), dst.console_tail()
                    with ns.iperf3_server():
                        for reverse in ("", " -R"):
                            out = dst.iperf3(f"-c {HOST_IP} -P 4 -t 2 -i 0{reverse}")
                            assert "receiver" in out, out
                    vms = {vm["socket"]: vm for vm in fetch(str(stats))["vms"]}
                    pairs = vms[str(dst_sock)]["pairs"]
                    assert sum(p["rx_packets"] for p in pairs) > 0, pairs
                    assert sum(p["tx_packets"] for p in pairs) > 0, pairs
                    assert all(p["errors"] == 0 for p in pairs), pairs
                    assert sum(p["enabled"] for p in pairs) == QUEUES, pairs
            text = log.read_text()
            assert "dirty page logging on" in text, text[-4000:]
        finally:
            stop_process(serve)
            print(log.read_text()[-6000:])


def test_qemu_not_running_as_root_connects_with_socket_group(
    guest_initramfs: Path,
) -> None:
    """Distributions run libvirt's QEMU as an unprivileged user (Debian:
    ``libvirt-qemu``), which cannot connect to a socket root created with the
    default umask.  ``serve --socket-group libvirt-qemu`` gives the socket to
    that group (mode 0660): the README's domain boots, QEMU -- running as
    ``libvirt-qemu`` -- negotiates 4 pairs, and the guest reaches the host.
    This domain also has ``packed='on'`` (the README's way to packed
    virtqueues under libvirt): the guest's driver runs packed rings."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    try:
        pwd.getpwnam(QEMU_USER)
        grp.getgrnam(QEMU_USER)
    except KeyError:
        pytest.skip(f"no {QEMU_USER} user and group (libvirt-daemon-system not installed)")
    # The socket's directory must be open to QEMU's user: not under pytest's
    # 0700 temporary root.
    sockdir = Path(tempfile.mkdtemp(prefix="vnsock-"))
    os.chmod(sockdir, 0o755)
    tap = unique_name("vntap")
    try:
        with NetNS() as ns:
            ns.create_tap(tap)
            ns.set_address(tap, f"{HOST_IP}/24")
            sock, stats, log = sockdir / "vm.sock", sockdir / "stats.sock", sockdir / "serve.log"
            serve = start_tap_serve(
                ns, tap, sock, stats, log, queues=QUEUES, args=("--socket-group", QEMU_USER)
            )
            try:
                st = os.stat(sock)
                assert (st.st_mode & 0o777, st.st_gid) == (0o660, grp.getgrnam(QEMU_USER).gr_gid)
                with (
                    Libvirtd(qemu_user=QEMU_USER) as lv,
                    readme_guest(lv, sock, guest_initramfs, packed=True) as guest,
                ):
                    pid = guest.qemu_pid
                    assert pid is not None
                    assert pwd.getpwuid(os.stat(f"/proc/{pid}").st_uid).pw_name == QEMU_USER
                    assert wait_for(lambda: guest.ping(HOST_IP, count=1, timeout=5), timeout=60), (
                        guest.console_tail()
                    )
                    guest.set_channels(QUEUES)
                    doc = fetch(str(stats))
                    assert doc["vms"][0]["connected"], doc
                    bits = guest.run("cat /sys/class/net/eth0/device/features").output.strip()
                    assert bits[NetFeature.RING_PACKED.bit_length() - 1] == "1", bits
                    assert "RING_PACKED" in log.read_text()
            finally:
                stop_process(serve)
                print(log.read_text()[-3000:])
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)
