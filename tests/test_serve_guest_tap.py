"""A real Linux guest on ``virtnet serve --port tap:IF`` (QEMU 10, TCG, vhost-user, 4 pairs).

The test creates a network namespace holding a persistent multiqueue tap
(10.77.0.1/24) and runs ``virtnet serve`` inside it; the guest (10.77.0.2/24)
boots with ``-netdev vhost-user,queues=4`` on serve's socket.  Checks:
channel changes (``ethtool -L``) reach serve as ring enable/disable, ping,
iperf3 TCP with 4 streams both ways using every queue, rx-follows-tx per
flow, and -- last -- serve killed and restarted while the guest runs.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from virtnet.testing.guest import Guest, queue_deltas, vhost_user_netdev_args, wait_for
from virtnet.testing.netns import NetNS, unique_name
from virtnet.testing.procs import stop_process
from virtnet.testing.serve import (
    ServedGuest,
    check_driver_reload,
    check_serve_restart,
    guest_on_tap,
    start_tap_serve,
)
from virtnet.vhost_user.stats import fetch

pytestmark = [pytest.mark.vm, pytest.mark.root, pytest.mark.timeout(600)]

QUEUES = 4
HOST_IP = "10.77.0.1"
GUEST_IP = "10.77.0.2"


def _start_serve(
    ns: NetNS, tap: str, sock: Path, stats: Path, log: Path, *args: str
) -> subprocess.Popen[str]:
    return start_tap_serve(ns, tap, sock, stats, log, queues=QUEUES, args=args)


@pytest.fixture(scope="module")
def setup(guest_initramfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedGuest]:
    with guest_on_tap(
        tmp_path_factory.mktemp("serve-tap"),
        guest_initramfs,
        queues=QUEUES,
        host_cidr=f"{HOST_IP}/24",
        guest_cidr=f"{GUEST_IP}/24",
        # room for a hot-plugged DIMM (memory table change at run time)
        extra_args=["-m", "512M,slots=2,maxmem=1G"],
        cmdline_extra="memhp_default_state=online",
    ) as s:
        yield s


def _iperf_both_ways(s: ServedGuest, *, streams: int, seconds: int) -> None:
    with s.ns.iperf3_server():
        out = s.guest.iperf3(f"-c {HOST_IP} -P {streams} -t {seconds} -i 0")
        assert "receiver" in out, out
        out = s.guest.iperf3(f"-c {HOST_IP} -P {streams} -t {seconds} -i 0 -R")
        assert "receiver" in out, out


def test_channels_follow_and_ping(setup: ServedGuest) -> None:
    """ethtool -L 1, 2, 4, 1: serve follows; ping; iperf3 -P 4 both ways uses every
    enabled queue (rx and tx, ethtool -S deltas) and no disabled one."""
    g = setup.guest
    assert g.channels().max_combined == QUEUES
    for n in (1, 2, 4, 1):
        g.set_channels(n)
        assert g.channels().combined == n
        assert wait_for(partial(ServedGuest.enabled_is, setup, n), timeout=10), setup.pairs()
        assert g.ping(HOST_IP, count=2), g.console_tail()
        before = g.ethtool_stats()
        _iperf_both_ways(setup, streams=4, seconds=2)
        for _ in range(4):
            after = g.ethtool_stats()
            rx, tx = queue_deltas(before, after, "rx"), queue_deltas(before, after, "tx")
            if all(rx.get(q, 0) > 0 and tx.get(q, 0) > 0 for q in range(n)):
                break
            _iperf_both_ways(setup, streams=8, seconds=1)
        assert all(rx.get(q, 0) > 0 for q in range(n)), (n, rx)
        assert all(tx.get(q, 0) > 0 for q in range(n)), (n, tx)
        assert all(d.get(q, 0) == 0 for d in (rx, tx) for q in range(n, QUEUES)), (n, rx, tx)
    assert setup.ns.ping(GUEST_IP, count=2)


def test_iperf3_tcp_all_queues_used(setup: ServedGuest) -> None:
    g = setup.guest
    g.set_channels(QUEUES)
    before = g.ethtool_stats()
    s0 = setup.pairs()
    _iperf_both_ways(setup, streams=4, seconds=3)
    for _ in range(3):
        after = g.ethtool_stats()
        rx, tx = queue_deltas(before, after, "rx"), queue_deltas(before, after, "tx")
        if all(rx.get(q, 0) > 0 and tx.get(q, 0) > 0 for q in range(QUEUES)):
            break
        _iperf_both_ways(setup, streams=8, seconds=1)
    assert all(rx[q] > 0 for q in range(QUEUES)), rx
    assert all(tx[q] > 0 for q in range(QUEUES)), tx
    s1 = setup.pairs()
    for q in range(QUEUES):
        assert s1[q]["rx_packets"] > s0[q]["rx_packets"], (q, s0, s1)
        assert s1[q]["tx_packets"] > s0[q]["tx_packets"], (q, s0, s1)
        assert s1[q]["errors"] == 0
    # serve reads the kernel's drops on its tap in the namespace it runs in.
    tap = fetch(str(setup.stats))["vms"][0]["tap"]
    assert tap["name"] == setup.tap, tap
    assert set(tap["dropped"]) == {"to_guest", "from_guest"}, tap
    assert all(isinstance(v, int) and v >= 0 for v in tap["dropped"].values()), tap


def test_rx_follows_tx_per_flow(setup: ServedGuest) -> None:
    """One TCP flow at a time (distinct client ports, iperf3 pinned to one vCPU so
    the guest's XPS keeps the flow on one tx queue): its rx comes back on that
    queue -- the tap's flow table steers rx to the queue the flow was sent on."""
    g = setup.guest
    g.set_channels(QUEUES)
    seen: set[int] = set()
    with setup.ns.iperf3_server():
        for k, cport in enumerate(range(40001, 40009)):
            before = g.ethtool_stats()
            out = g.run(
                f"taskset -c {k % 2} iperf3 -c {HOST_IP} -P 1 -t 1 -i 0 --cport {cport}",
                timeout=60,
            ).output
            assert "receiver" in out, out
            after = g.ethtool_stats()
            rx, tx = queue_deltas(before, after, "rx"), queue_deltas(before, after, "tx")
            nrx, ntx = sum(rx.values()), sum(tx.values())
            txq = max(tx, key=lambda q: tx[q])
            if tx[txq] < 0.9 * ntx:
                continue  # the control connection was big, or XPS moved the flow
            assert rx[txq] >= 0.9 * nrx, (cport, rx, tx)
            seen.add(txq)
    assert len(seen) >= 2, seen


def test_worker_killed_is_restarted_from_used_index(setup: ServedGuest) -> None:
    """SIGKILL one pair's worker under traffic: serve restarts it, traffic goes on."""
    g = setup.guest
    g.set_channels(QUEUES)
    assert wait_for(partial(ServedGuest.enabled_is, setup, QUEUES), timeout=10)
    before = setup.pairs()
    victim = before[1]["pid"]
    others = [before[q]["pid"] for q in (0, 2, 3)]
    with setup.ns.iperf3_server():
        g.run(f"iperf3 -c {HOST_IP} -P 4 -t 4 -i 0 >/tmp/bg.log 2>&1 &")
        time.sleep(1.5)
        os.kill(victim, signal.SIGKILL)
        assert wait_for(lambda: setup.pairs()[1]["restarts"] >= 1, timeout=10)
        time.sleep(4)
        out = g.run("cat /tmp/bg.log").output
        assert "receiver" in out, out
        _iperf_both_ways(setup, streams=4, seconds=2)
    after = setup.pairs()
    assert after[1]["pid"] not in (0, victim)
    assert [after[q]["pid"] for q in (0, 2, 3)] == others
    assert after[1]["rx_packets"] > before[1]["rx_packets"]
    assert "resumes from used index" in setup.log.read_text()


def test_memory_hotplug_remaps_running_workers(setup: ServedGuest) -> None:
    """A DIMM plugged at run time: QEMU sends ADD_MEM_REG, every worker is
    stopped, remapped and restarted before the reply; traffic goes on."""
    g = setup.guest
    g.set_channels(QUEUES)
    assert wait_for(partial(ServedGuest.enabled_is, setup, QUEUES), timeout=10)
    before = [p["pid"] for p in setup.pairs()]
    g.qmp("object-add", {"qom-type": "memory-backend-memfd", "id": "hp0",
                         "size": 256 << 20, "share": True})  # fmt: skip
    g.qmp("device_add", {"driver": "pc-dimm", "id": "dimm0", "memdev": "hp0"})
    assert wait_for(lambda: all(
        p["pid"] not in (0, old) for p, old in zip(setup.pairs(), before, strict=True)
    ), timeout=20), (before, setup.pairs())  # fmt: skip
    assert g.ping(HOST_IP, count=2)
    with setup.ns.iperf3_server():
        out = g.iperf3(f"-c {HOST_IP} -P 4 -t 2 -i 0")
        assert "receiver" in out, out
    assert all(p["errors"] == 0 for p in setup.pairs())


def test_driver_reload_restarts_rings(setup: ServedGuest) -> None:
    """rmmod/insmod virtio_net in the guest: QEMU stops every ring (GET_VRING_BASE),
    resets the device and starts fresh rings at index 0; traffic resumes."""
    check_driver_reload(setup, HOST_IP, f"{GUEST_IP}/24")


def test_channel_changes_under_traffic(setup: ServedGuest) -> None:
    """ethtool -L 1, 3, 2, 4 while 4 TCP streams flow, out of the guest and
    then into it: pairs go and come under load, every stream lives to the end
    at a real rate (nothing is stranded on a disabled pair), no errors."""
    g = setup.guest
    g.set_channels(QUEUES)
    assert wait_for(partial(ServedGuest.enabled_is, setup, QUEUES), timeout=10)
    with setup.ns.iperf3_server():
        for reverse in ("", " -R"):
            g.run(f"iperf3 -c {HOST_IP} -P 4 -t 10 -i 0{reverse} >/tmp/chg.log 2>&1 &")
            time.sleep(1.5)
            for n in (1, 3, 2, 4):
                g.set_channels(n)
                assert wait_for(partial(ServedGuest.enabled_is, setup, n), timeout=10)
                time.sleep(1.5)
            assert wait_for(lambda: "receiver" in g.run("cat /tmp/chg.log").output, timeout=40), (
                g.run("cat /tmp/chg.log").output
            )
            out = g.run("cat /tmp/chg.log").output
            m = re.search(r"\[SUM\].*?([\d.]+) ([KMG]?)bits/sec.*receiver", out)
            assert m is not None, out
            rate = float(m.group(1)) * {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}[m.group(2)]
            assert rate > 10e6, out  # TCG guests move hundreds of Mbit/s or more
    assert all(p["errors"] == 0 for p in setup.pairs()), setup.pairs()


def test_serve_restart_resumes_traffic(setup: ServedGuest) -> None:
    """Kill serve (SIGKILL: workers die with it) and start it again: no guest reboot."""
    check_serve_restart(setup, HOST_IP, pairs=2)


def _running(s: ServedGuest, n: int) -> bool:
    return all(p["pid"] for p in s.pairs()[:n])


def test_grouped_workers_with_a_real_guest(guest_initramfs: Path, tmp_path: Path) -> None:
    """``serve --workers 2``: the guest's 4 pairs run in 2 processes (pair p in
    process p % 2) through ethtool -L 4, 1, 2, 4; every enabled queue carries
    iperf3 traffic both ways and the processes follow the channel changes."""
    tap = unique_name("vntap")
    with NetNS() as ns:
        ns.create_tap(tap)
        ns.set_address(tap, f"{HOST_IP}/24")
        sock, stats, log = tmp_path / "vm.sock", tmp_path / "stats.sock", tmp_path / "serve.log"
        serve = _start_serve(ns, tap, sock, stats, log, "--workers", "2")
        try:
            with Guest(
                vhost_user_netdev_args(sock, queues=QUEUES),
                initramfs=guest_initramfs,
                ip=f"{GUEST_IP}/24",
            ) as g:
                s = ServedGuest(g, ns, tap, sock, stats, log, serve, QUEUES)
                for n in (4, 1, 2, 4):
                    g.set_channels(n)
                    assert wait_for(partial(ServedGuest.enabled_is, s, n), timeout=10), s.pairs()
                    assert wait_for(partial(_running, s, n), timeout=10), s.pairs()
                    pids = [p["pid"] for p in s.pairs()]
                    assert len({pids[q] for q in range(n)}) == min(n, 2), (n, pids)
                    assert all(pids[q] == pids[q % 2] for q in range(n)), (n, pids)
                    assert g.ping(HOST_IP, count=2), g.console_tail()
                    before = g.ethtool_stats()
                    _iperf_both_ways(s, streams=4, seconds=2)
                    for _ in range(4):
                        after = g.ethtool_stats()
                        rx = queue_deltas(before, after, "rx")
                        tx = queue_deltas(before, after, "tx")
                        if all(rx.get(q, 0) > 0 and tx.get(q, 0) > 0 for q in range(n)):
                            break
                        _iperf_both_ways(s, streams=8, seconds=1)
                    assert all(rx.get(q, 0) > 0 and tx.get(q, 0) > 0 for q in range(n)), (rx, tx)
                assert all(p["errors"] == 0 for p in s.pairs())
        finally:
            stop_process(serve)
            print(log.read_text()[-4000:])
