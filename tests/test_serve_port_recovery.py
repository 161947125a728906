"""serve keeps its VMs' networks when the host side of a port goes away.

* The switch process is killed: serve starts it again with the same VLANs,
  MAC locks and offloads, and both VMs' running pairs go on with new queues
  on it, without reconnecting.  A switch that keeps dying stops serve with
  exit status 1.
* A VM's tap is deleted: serve creates it again when serve had created it,
  waits for it when it was the user's, and the VM's pairs go on with it.

Peers: ``virtnet serve`` as a process, our own frontend as the VMs (real guests
go through the same in ``test_serve_switch`` and ``test_serve_guest_tap``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import pytest

import test_frontend_serve as fs
from virtnet.errors import UsageError
from virtnet.testing.netns import create_tap, delete_link, link_exists, unique_name
from virtnet.testing.procs import stop_process
from virtnet.vhost_user.frontend import DEFAULT_MAC, VhostUserFrontend
from virtnet.vhost_user.stats import fetch

pytestmark = pytest.mark.timeout(120)

MAC_A, MAC_B = fs.MAC_A, fs.MAC_B
BROADCAST = b"\xff" * 6


def wait_for(what: str, cond: Callable[[], bool], timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def switch_doc(stats: Path) -> dict[str, object]:
    doc = fetch(str(stats))["switch"]
    assert isinstance(doc, dict)
    return doc


def unicast_arrives(
    src: VhostUserFrontend, dst: VhostUserFrontend, smac: bytes, dmac: bytes
) -> bool:
    frames = [fs._to(dmac, smac, f) for f in range(6)]
    assert src.send(frames) == len(frames)
    got = [d for _, d in fs.collect(dst, len(frames), timeout=2.0)]
    return all(f in got for f in frames)


def test_a_killed_switch_process_is_started_again_with_its_configuration(
    tmp_path: Path,
) -> None:
    stats = tmp_path / "stats.sock"
    extra = ("--vlans", "0,100", "--mac", f"vm0.sock={MAC_A.hex(':')}")
    with (
        fs.serve(tmp_path, "switch", vms=2, queues=2, extra=extra) as (sa, sb),
        VhostUserFrontend(sa, queue_pairs=2, mac=MAC_A) as a,
        VhostUserFrontend(sb, queue_pairs=2, mac=MAC_B) as b,
    ):
        assert a.set_queue_pairs(2) and b.set_queue_pairs(2)
        assert b.send([fs._to(BROADCAST, MAC_B, 1)]) == 1  # the switch learns B
        assert len(fs.collect(a, 1)) == 1
        assert unicast_arrives(a, b, MAC_A, MAC_B)
        first = switch_doc(stats)
        assert first["restarts"] == 0
        old_pid = first["pid"]
        assert isinstance(old_pid, int)

        os.kill(old_pid, signal.SIGKILL)
        wait_for(
            "the switch process to be started again",
            lambda: switch_doc(stats).get("restarts") == 1,
        )
        doc = switch_doc(stats)
        assert doc["pid"] != old_pid and "error" not in doc

        # Both VMs' pairs go on, on every pair, without reconnecting: B is
        # learnt again from a broadcast, then unicast goes both ways.
        def b_learnt() -> bool:
            b.send([fs._to(BROADCAST, MAC_B, 2)])
            return len(fs.collect(a, 1, timeout=0.5)) == 1

        wait_for("broadcast through the new switch process", b_learnt)
        assert unicast_arrives(a, b, MAC_A, MAC_B)
        assert unicast_arrives(b, a, MAC_B, MAC_A)
        stats_doc = fetch(str(stats))
        for vm in stats_doc["vms"]:
            assert vm["connections"] == 1, vm
            assert sorted(vm["workers"]) == [0, 1], vm

        # The MAC lock came back with it: B may not send from A's MAC.
        spoofed = switch_doc(stats)["dropped_spoofed"]
        assert isinstance(spoofed, int)
        assert b.send([fs._to(BROADCAST, MAC_A, 3)]) == 1
        wait_for(
            "the spoofed frame to be dropped",
            lambda: switch_doc(stats)["dropped_spoofed"] == spoofed + 1,
        )
        assert fs.collect(a, 1, timeout=0.5) == []
    log = (tmp_path / "serve-switch.log").read_text()
    assert f"switch process {old_pid} died (signal 9); starting it again" in log, log


def test_a_switch_process_that_keeps_dying_stops_serve(tmp_path: Path) -> None:
    stats = tmp_path / "stats.sock"
    sock = tmp_path / "vm0.sock"
    log_path = tmp_path / "serve.log"
    args = [sys.executable, "-m", "virtnet.cli", "serve", "--socket", str(sock),
            "--stats-socket", str(stats)]  # fmt: skip
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    try:
        wait_for("serve's stats socket", stats.exists)
        kills = 0
        pid = None
        while proc.poll() is None and kills <= 10:
            try:
                new = switch_doc(stats)["pid"]
            except (UsageError, KeyError):  # serve may be stopping under us
                time.sleep(0.05)
                continue
            if new == pid or not isinstance(new, int):
                time.sleep(0.05)
                continue
            pid = new
            os.kill(pid, signal.SIGKILL)
            kills += 1
        assert proc.wait(timeout=30) == 1
    finally:
        stop_process(proc)
    assert kills == 6  # SWITCH_MAX_RESTARTS restarts, then the sixth death ends it
    text = log_path.read_text()
    assert "6 times in 60 s: giving up, stopping serve" in text, text
    assert not sock.exists()


def _up(ifname: str) -> None:
    subprocess.run(["ip", "link", "set", "dev", ifname, "up"], check=True)


@pytest.mark.parametrize("owner", ["serve", "user"])
def test_a_deleted_tap_comes_back_under_a_running_vm(tmp_path: Path, owner: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (tap devices)")
    ifname = unique_name("vnrc")
    stats = tmp_path / "stats.sock"
    if owner == "user":
        create_tap(ifname)
    try:
        with (
            fs.serve(tmp_path, f"tap:{ifname}", queues=2) as (sock,),
            VhostUserFrontend(sock, queue_pairs=2) as fe,
        ):
            assert fe.set_queue_pairs(2)
            wait_for("the tap", lambda: link_exists(ifname))
            _up(ifname)
            fs.tap_both_ways(fe, ifname)
            workers = fetch(str(stats))["vms"][0]["workers"]
            assert workers == [0, 1]

            mac = Path(f"/sys/class/net/{ifname}/address").read_text()
            delete_link(ifname)
            # What the VM sends meanwhile is counted as dropped, not lost silently.
            assert fe.send([fs._to(BROADCAST, DEFAULT_MAC, f) for f in range(4)]) == 4
            wait_for(
                "the drops to be counted",
                lambda: sum(p["tx_dropped"] for p in fetch(str(stats))["vms"][0]["pairs"]) >= 4,
            )
            if owner == "user":
                log = tmp_path / f"serve-tap:{ifname}.log"
                wait_for("serve to see the tap gone", lambda: "is gone" in log.read_text())
                time.sleep(1.5)  # serve waits for the user's tap; it does not create it
                assert not link_exists(ifname)
                create_tap(ifname)
            wait_for("the tap to be there again", lambda: link_exists(ifname))
            if owner == "serve":  # created again with the MAC it had
                wait_for(
                    "its MAC", lambda: Path(f"/sys/class/net/{ifname}/address").read_text() == mac
                )
            _up(ifname)
            wait_for(
                "the VM's pairs to run on it",
                lambda: (
                    "traffic goes on through it"
                    in (tmp_path / f"serve-tap:{ifname}.log").read_text()
                ),
            )
            fs.tap_both_ways(fe, ifname)
            vm = fetch(str(stats))["vms"][0]
            assert vm["connections"] == 1 and vm["workers"] == [0, 1], vm
        text = (tmp_path / f"serve-tap:{ifname}.log").read_text()
        want = "created again" if owner == "serve" else "is back"
        assert f"tap {ifname} {want}" in text, text
    finally:
        if link_exists(ifname):
            delete_link(ifname)


@contextmanager
def _on_uplink(tmp_path: Path) -> Iterator[tuple[VhostUserFrontend, str]]:
    """serve with ``--port switch:uplink=IF`` (serve creates IF) and a 2-pair
    VM whose frames cross the uplink both ways; IF deleted at the end."""
    if os.geteuid() != 0:
        pytest.skip("needs root (tap devices)")
    ifname = unique_name("vnup")
    try:
        with (
            fs.serve(tmp_path, f"switch:uplink={ifname}", queues=2) as (sock,),
            VhostUserFrontend(sock, queue_pairs=2) as fe,
        ):
            assert fe.set_queue_pairs(2)
            fs.tap_both_ways(fe, ifname)
            yield fe, ifname
    finally:
        if link_exists(ifname):
            delete_link(ifname)


def test_a_restarted_switch_process_keeps_its_uplink(tmp_path: Path) -> None:
    """``--port switch:uplink=IF``: after the switch process is killed, the
    new one has the uplink tap again (serve still holds its queue fd), so a
    VM's broadcast reaches the host and the host's frames reach the VM."""
    stats = tmp_path / "stats.sock"
    with _on_uplink(tmp_path) as (fe, ifname):
        old = switch_doc(stats)["pid"]
        assert isinstance(old, int)
        os.kill(old, signal.SIGKILL)
        wait_for("a new switch process", lambda: switch_doc(stats).get("restarts") == 1)
        fs.tap_both_ways(fe, ifname)


def test_a_deleted_uplink_is_created_again(tmp_path: Path) -> None:
    """``--port switch:uplink=IF`` with serve creating IF: ``ip link del IF``
    under a running VM; serve creates it again (its MAC, up) and hands the
    switch the new queue, and traffic crosses it both ways again."""
    with _on_uplink(tmp_path) as (fe, ifname):
        mac = Path(f"/sys/class/net/{ifname}/address").read_text()
        delete_link(ifname)
        log = tmp_path / f"serve-switch:uplink={ifname}.log"
        wait_for("serve to create it again", lambda: "created again" in log.read_text())
        assert Path(f"/sys/class/net/{ifname}/address").read_text() == mac
        fs.tap_both_ways(fe, ifname)
    assert f"uplink:{ifname}: tap {ifname} is gone (deleted?); creating it again" in (
        log.read_text()
    )


def _fds_and_children(pid: int) -> tuple[int, int]:
    """serve's open fds and child processes (zombies included: one not reaped counts)."""
    children: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        children |= {int(c) for c in (task / "children").read_text().split()}
    return len(list(Path(f"/proc/{pid}/fd").iterdir())), len(children)


def _restarted(stats: Path, n: int) -> bool:
    return switch_doc(stats).get("restarts") == n


def test_switch_restarts_leak_no_fd_and_no_process(tmp_path: Path) -> None:
    """Four switch processes killed in a row under a connected 2-pair VM:
    serve ends with as many fds and live children as before (the old switch
    and workers reaped, their sockets closed), and the VM's frames go on."""
    stats = tmp_path / "stats.sock"
    args = [sys.executable, "-m", "virtnet.cli", "serve", "--port", "switch", "--queues", "2",
            "--socket", str(tmp_path / "a.sock"), "--socket", str(tmp_path / "b.sock"),
            "--stats-socket", str(stats)]  # fmt: skip
    with (tmp_path / "serve.log").open("ab") as log:
        proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    try:
        wait_for(
            "serve",
            lambda: all((tmp_path / n).exists() for n in ("a.sock", "b.sock", "stats.sock")),
        )
        with (
            VhostUserFrontend(tmp_path / "a.sock", queue_pairs=2, mac=MAC_A) as a,
            VhostUserFrontend(tmp_path / "b.sock", queue_pairs=2, mac=MAC_B) as b,
        ):
            assert a.set_queue_pairs(2) and b.set_queue_pairs(2)
            wait_for("4 workers and the switch", lambda: _fds_and_children(proc.pid)[1] == 5)
            baseline = _fds_and_children(proc.pid)
            for i in range(1, 5):
                old = switch_doc(stats)["pid"]
                assert isinstance(old, int)
                os.kill(old, signal.SIGKILL)
                wait_for(f"restart {i}", partial(_restarted, stats, i))
            wait_for(
                "the fds and children of before",
                lambda: _fds_and_children(proc.pid) == baseline,
            )
            wait_for("frames from b to a", partial(unicast_arrives, b, a, MAC_B, MAC_A))
    finally:
        stop_process(proc)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (tap devices)")
def test_a_tap_deleted_while_the_vm_is_away(tmp_path: Path) -> None:
    """The tap serve created is deleted while its VM is disconnected (every
    queue detached, so no fd can tell): when the VM comes back, attaching a
    queue fails, serve creates the tap again, and traffic flows."""
    ifname = unique_name("vnaw")
    log = tmp_path / f"serve-tap:{ifname}.log"
    try:
        with fs.serve(tmp_path, f"tap:{ifname}", queues=2) as (sock,):
            with VhostUserFrontend(sock, queue_pairs=2) as fe:
                assert fe.set_queue_pairs(2)
                wait_for("the tap", lambda: link_exists(ifname))
                _up(ifname)
                fs.tap_both_ways(fe, ifname)
            wait_for("the VM to be gone", lambda: "connection closed" in log.read_text())
            delete_link(ifname)
            time.sleep(1.5)  # serve's check runs: nothing attached, nothing to see yet
            with VhostUserFrontend(sock, queue_pairs=2) as fe:
                assert fe.set_queue_pairs(2)
                wait_for("serve to create it again", lambda: "created again" in log.read_text())
                _up(ifname)
                fs.tap_both_ways(fe, ifname)
    finally:
        if link_exists(ifname):
            delete_link(ifname)
