"""``virtnet serve --client`` dialing QEMU's listening vhost-user socket, switch with uplink.

QEMU (10, TCG) listens (``-chardev socket,server=on``) and waits for its
backend; ``virtnet serve --client --port switch:uplink=IF`` runs in a test
namespace, dials QEMU, and joins the guest (2 pairs) to a tap uplink in the
namespace (10.77.2.1/24).  The guest (10.77.2.2/24) pings the host side and
runs iperf3 both ways through the switch process.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtnet.testing.guest import Guest, vhost_user_netdev_args, wait_for
from virtnet.testing.netns import NetNS, unique_name
from virtnet.testing.procs import stop_process
from virtnet.vhost_user.stats import fetch

pytestmark = [pytest.mark.vm, pytest.mark.root, pytest.mark.timeout(600)]

QUEUES = 2
HOST_IP, GUEST_IP = "10.77.2.1", "10.77.2.2"


@pytest.fixture(scope="module")
def setup(
    guest_initramfs: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Guest, NetNS, Path]]:
    tmp = tmp_path_factory.mktemp("serve-client")
    sock, stats, log = tmp / "qemu.sock", tmp / "stats.sock", tmp / "serve.log"
    uplink = unique_name("vnup")
    with NetNS() as ns:
        with log.open("w") as out:
            serve = ns.popen(
                [sys.executable, "-m", "virtnet.cli", "-v", "serve", "--client", "--socket",
                 str(sock), "--port", f"switch:uplink={uplink}", "--queues", str(QUEUES),
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
                initramfs=guest_initramfs,
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
