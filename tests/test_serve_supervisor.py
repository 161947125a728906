"""``virtnet serve`` supervision, driven by the in-repo vhost-user frontend (no VM).

Worker crash -> logged and restarted from the used index while the other pair
keeps running; queue-pair changes start/stop workers with the right
next-avail indexes; SIGTERM reaps every worker; the stats socket and
``virtnet stats`` show per-queue counters; usage errors are refused clearly.
"""

from __future__ import annotations

import argparse
import contextlib
import grp
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from virtnet.errors import UsageError
from virtnet.testing.guest import wait_for
from virtnet.testing.procs import stop_process
from virtnet.vhost_user.frontend import VhostUserFrontend
from virtnet.vhost_user.serve import (
    Daemon,
    _ip_arg,
    _mac_arg,
    _rate_vm_arg,
    _vlan_plan,
    _vlans_arg,
)
from virtnet.vhost_user.stats import fetch, render

pytestmark = pytest.mark.timeout(120)

MAC_A = b"\x02\x00\x00\x00\x00\x0a"
MAC_B = b"\x02\x00\x00\x00\x00\x0b"


def _paths(tmp_path: Path) -> tuple[Path, Path, Path]:
    """serve's vhost-user socket, stats socket and log file under ``tmp_path``."""
    return tmp_path / "vm.sock", tmp_path / "stats.sock", tmp_path / "serve.log"


@contextlib.contextmanager
def _serving(tmp_path: Path, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """``virtnet serve ARGS`` on the :func:`_paths` sockets, logging to its log
    file; yields the process once it serves.  Stopped with SIGTERM at the end,
    which must exit cleanly."""
    sock, stats, log = _paths(tmp_path)
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "virtnet.cli", "serve", "--socket", str(sock),
             "--stats-socket", str(stats), *args],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        assert wait_for(lambda: stats.exists() or proc.poll() is not None, timeout=20)
        assert proc.poll() is None, log.read_text()
        yield proc
    except BaseException:
        stop_process(proc)
        raise
    assert stop_process(proc, timeout=30) == 0, log.read_text()[-3000:]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[tuple[Path, Path, Path, subprocess.Popen[bytes]]]:
    with _serving(tmp_path, "--port", "loopback", "--queues", "2") as proc:
        yield (*_paths(tmp_path), proc)


def _frame(n: int) -> bytes:
    return MAC_B + MAC_A + b"\x08\x00" + struct.pack(">I", n) + bytes(46)


def _echo(fe: VhostUserFrontend, n: int = 40, pair: int | None = None) -> int:
    sent = fe.send([_frame(i) for i in range(n)], pair=pair)
    got = 0
    deadline = time.monotonic() + 5
    while got < sent and time.monotonic() < deadline:
        got += len(fe.receive(timeout=0.2))
    return got


def _pairs(stats: Path) -> list[dict[str, Any]]:
    pairs: list[dict[str, Any]] = fetch(str(stats))["vms"][0]["pairs"]
    return pairs


def _enabled_is(stats: Path, n: int) -> bool:
    return [p["enabled"] for p in _pairs(stats)] == [1] * n + [0] * (2 - n)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    st = Path(f"/proc/{pid}/stat")
    return st.exists() and st.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def test_worker_crash_is_restarted_other_pair_unaffected(
    serve: tuple[Path, Path, Path, subprocess.Popen[bytes]],
) -> None:
    sock, stats, log, _ = serve
    with VhostUserFrontend(sock, queue_pairs=2, mac=MAC_A) as fe:
        fe.set_queue_pairs(2)
        assert _echo(fe, pair=0) == 40 and _echo(fe, pair=1) == 40
        before = _pairs(stats)
        victim, other = before[1]["pid"], before[0]["pid"]
        assert victim and other
        os.kill(victim, signal.SIGKILL)
        assert wait_for(lambda: _pairs(stats)[1]["restarts"] == 1, timeout=10)
        after = _pairs(stats)
        assert after[1]["pid"] not in (0, victim)
        assert after[0]["pid"] == other
        assert _echo(fe, pair=1) == 40 and _echo(fe, pair=0) == 40
        # counters survive the restart (folded into the base)
        assert _pairs(stats)[1]["rx_packets"] >= 80
    text = log.read_text()
    assert f"worker {victim} died (signal 9)" in text
    assert "resumes from used index" in text


def _pid_changed(stats: Path, pair: int, old: int) -> bool:
    return bool(_pairs(stats)[pair]["pid"] != old)


@pytest.mark.parametrize("workers", ["0", "1"])
def test_worker_dying_too_often_is_given_up(tmp_path: Path, workers: str) -> None:
    """A pair whose worker dies more than MAX_RESTARTS times within
    RESTART_WINDOW_S is not restarted again.  With a process per pair the other
    pair keeps working; with both pairs in one process both are given up."""
    from virtnet.vhost_user.supervisor import MAX_RESTARTS

    sock, stats, log = _paths(tmp_path)
    with (
        _serving(tmp_path, "--port", "loopback", "--queues", "2", "--workers", workers),
        VhostUserFrontend(sock, queue_pairs=2, mac=MAC_A) as fe,
    ):
        assert fe.set_queue_pairs(2)
        for k in range(MAX_RESTARTS + 1):
            assert wait_for(lambda: _pairs(stats)[1]["pid"] != 0, timeout=10), k
            victim = _pairs(stats)[1]["pid"]
            os.kill(victim, signal.SIGKILL)
            assert wait_for(partial(_pid_changed, stats, 1, victim), timeout=10), k
        rows = _pairs(stats)
        assert rows[1]["pid"] == 0 and rows[1]["restarts"] == MAX_RESTARTS + 1
        if workers == "0":
            assert rows[0]["pid"] and rows[0]["restarts"] == 0
            assert _echo(fe, 16, pair=0) == 16
        else:
            assert rows[0]["pid"] == 0
    assert "pair 1 died 6 times in 10 s; not restarting it" in log.read_text()


def test_queue_changes_and_clean_shutdown(
    serve: tuple[Path, Path, Path, subprocess.Popen[bytes]],
) -> None:
    sock, stats, log, proc = serve
    with VhostUserFrontend(sock, queue_pairs=2, mac=MAC_A) as fe:
        for n in (2, 1, 2, 1, 2):
            assert fe.set_queue_pairs(n)
            assert wait_for(partial(_enabled_is, stats, n), timeout=10)
            for p in range(n):
                assert _echo(fe, 20, pair=p) == 20, (n, p)
        pids = [p["pid"] for p in _pairs(stats) if p["pid"]]
        assert len(pids) == 2
        doc = fetch(str(stats))
        assert "MRG_RXBUF" in doc["vms"][0]["features"]
        render(doc, doc)  # the rich table renders
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    assert not any(_alive(p) for p in pids)
    text = log.read_text()
    assert "negotiated features" in text and "ring 3 disabled" in text and "ring 2 enabled" in text
    assert "stopped" in text


def _stats_cli(stats: Path) -> str:
    """What ``virtnet stats`` prints for serve's stats socket (200 columns)."""
    return subprocess.run(
        [sys.executable, "-m", "virtnet.cli", "stats", "--stats-socket", str(stats)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        env={**os.environ, "COLUMNS": "200"},
    ).stdout


def test_stats_cli(serve: tuple[Path, Path, Path, subprocess.Popen[bytes]]) -> None:
    sock, stats, _, _ = serve
    with VhostUserFrontend(sock, queue_pairs=2, mac=MAC_A) as fe:
        fe.set_queue_pairs(2)
        assert _echo(fe, 10, pair=0) == 10
        out = _stats_cli(stats)
        assert "vm.sock" in out and "rx pkts" in out


def test_stats_show_the_switch_drops_no_worker_sees(tmp_path: Path) -> None:
    """With the switch port, the stats document, ``virtnet stats`` and the
    Prometheus exporter report the switch process's own counters: a frame
    with a multicast source is dropped there (counted as a bad frame), after
    the worker had passed it on as sent."""
    from virtnet.vhost_user.metrics import ServeCollector

    sock, stats, _ = _paths(tmp_path)
    bad = b"\xff" * 6 + b"\x01\x00\x5e\x00\x00\x01" + b"\x08\x00" + bytes(46)
    good = b"\xff" * 6 + MAC_A + b"\x08\x00" + bytes(46)
    with (
        _serving(tmp_path, "--port", "switch", "--queues", "1"),
        VhostUserFrontend(sock, queue_pairs=1, mac=MAC_A) as fe,
    ):
        assert fe.send([bad, bad, good]) == 3
        assert wait_for(lambda: fetch(str(stats))["switch"].get("frames_in") == 3, timeout=10)
        doc = fetch(str(stats))
        sw = doc["switch"]
        assert sw["dropped_bad_frame"] == 2 and sw["flooded"] == 1, sw
        assert sw["uplinks"] == [] and "ports" not in sw
        assert doc["vms"][0]["pairs"][0]["tx_packets"] == 3  # the worker sent all three
        out = _stats_cli(stats)
        assert "switch" in out and "drop bad" in out
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in ServeCollector(lambda: doc).collect()
            for s in fam.samples
        }
        assert samples[("virtnet_switch_up", ())] == 1
        assert samples[("virtnet_switch_dropped_total", (("reason", "bad_frame"),))] == 2
        assert samples[("virtnet_switch_frames_total", (("direction", "in"),))] == 3


@pytest.mark.parametrize("workers", ["0", "1"])
def test_more_worker_processes_than_cpus_is_warned_once(tmp_path: Path, workers: str) -> None:
    """serve on one CPU (taskset): a guest enabling 2 pairs gets a worker
    process per pair and one warning naming --workers; with --workers 1 the
    pairs share one process and nothing is said."""
    sock, stats, log = _paths(tmp_path)
    with log.open("w") as out:
        proc = subprocess.Popen(
            ["taskset", "-c", str(min(os.sched_getaffinity(0))), sys.executable, "-m",
             "virtnet.cli", "serve", "--socket", str(sock), "--stats-socket", str(stats),
             "--port", "loopback", "--queues", "2", "--workers", workers],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        assert wait_for(lambda: stats.exists() or proc.poll() is not None, timeout=20)
        with VhostUserFrontend(sock, queue_pairs=2, mac=MAC_A) as fe:
            for n in (2, 1, 2):
                assert fe.set_queue_pairs(n)
                assert wait_for(partial(_enabled_is, stats, n), timeout=10)
            assert _echo(fe, 8, pair=1) == 8
    finally:
        assert stop_process(proc, timeout=30) == 0, log.read_text()[-3000:]
    text = log.read_text()
    warned = "2 worker processes on 1 CPUs; busy pairs will take turns on them. --workers 1"
    assert text.count(warned) == (1 if workers == "0" else 0), text[-3000:]


def _serve_usage_error(*args: str) -> str:
    """``virtnet serve ARGS`` run as a user would: it must stop with a usage
    error (status 2) before serving anything; its stderr."""
    res = subprocess.run(
        [sys.executable, "-m", "virtnet.cli", "serve", *args],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert res.returncode == 2, (res.returncode, res.stderr)
    return res.stderr


def test_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="template"):
        Daemon([str(tmp_path / "a"), str(tmp_path / "b")], port="tap:vnx0")
    with pytest.raises(UsageError, match="queues"):
        Daemon([str(tmp_path / "a")], port="null", queues=0)
    with pytest.raises(UsageError):
        Daemon([str(tmp_path / "a")], port="bogus")
    with pytest.raises(UsageError, match="--workers"):
        Daemon([str(tmp_path / "a")], port="null", workers=-1)
    for bad in (-1, 1001):
        with pytest.raises(UsageError, match=r"--kick-defer-us must be 0\.\.1000"):
            Daemon([str(tmp_path / "a")], port="null", kick_defer_us=bad)
    err = _serve_usage_error(
        "--socket", str(tmp_path / "a"), "--socket", str(tmp_path / "b"), "--port", "tap:vnx0"
    )
    assert "template" in err


def test_socket_group_and_mode(tmp_path: Path) -> None:
    """``--socket-group``/``--socket-mode``: the VM sockets serve listens on
    (at start and added with ``ctl``) get them, so a QEMU running as that
    group (libvirt's, not root) can connect; errors are usage errors."""
    group = grp.getgrgid(os.getgid() if os.getuid() else 100).gr_name  # root: any group
    gid = grp.getgrnam(group).gr_gid
    d = Daemon([str(tmp_path / "a.sock")], port="null", socket_group=group,
               control_socket=str(tmp_path / "ctl.sock"))  # fmt: skip
    try:
        d.add_vm(str(tmp_path / "b.sock"))
        for name in ("a.sock", "b.sock"):
            st = os.stat(tmp_path / name)
            assert (st.st_mode & 0o777, st.st_gid) == (0o660, gid), name
    finally:
        d.close()
    d = Daemon([str(tmp_path / "c.sock")], port="null", socket_mode=0o666)
    try:
        assert os.stat(tmp_path / "c.sock").st_mode & 0o777 == 0o666
    finally:
        d.close()
    with pytest.raises(UsageError, match="no group 'no-such-group-vn'"):
        Daemon([str(tmp_path / "d.sock")], port="null", socket_group="no-such-group-vn")
    with pytest.raises(UsageError, match="with --client QEMU owns the socket"):
        Daemon([str(tmp_path / "d.sock")], port="null", client=True, socket_mode=0o660)
    assert not (tmp_path / "d.sock").exists()
    err = _serve_usage_error("--socket", str(tmp_path / "e.sock"), "--socket-mode", "0968")
    assert "not an octal mode: '0968'" in err, err


def test_vlans_option_parsing_and_errors(tmp_path: Path) -> None:
    assert _vlans_arg("0,100-102") == (None, frozenset({0, 100, 101, 102}))
    assert _vlans_arg("a=b.sock=7") == ("a=b.sock", frozenset({7}))
    for bad in ("", "x", "vm=", "=5", "4095", "5-3", "-1", "vm=0,,1"):
        with pytest.raises(argparse.ArgumentTypeError, match="bad --vlans"):
            _vlans_arg(bad)
    members = ["a.sock", "b.sock", "uplink:up0"]
    plan = _vlan_plan([("b.sock", frozenset({5})), ("uplink", frozenset({0, 5}))], members)
    assert plan == {"a.sock": {0}, "b.sock": {5}, "uplink:up0": {0, 5}}
    plan = _vlan_plan([(None, frozenset({0, 9})), ("a.sock", frozenset({9}))], members)
    assert plan == {"a.sock": {9}, "b.sock": {0, 9}, "uplink:up0": {0, 9}}
    with pytest.raises(UsageError, match=r"no such switch member.*a\.sock, b\.sock, uplink"):
        _vlan_plan([("c.sock", frozenset({1}))], members)
    with pytest.raises(UsageError, match="given twice"):
        _vlan_plan([("uplink", frozenset({1})), ("uplink:up0", frozenset({2}))], members)
    with pytest.raises(UsageError, match="without VM= given twice"):
        _vlan_plan([(None, frozenset({1})), (None, frozenset({2}))], members)
    with pytest.raises(UsageError, match="--vlans needs --port switch"):
        Daemon([str(tmp_path / "a")], port="null", vlans=[(None, frozenset({0}))])
    err = _serve_usage_error("--socket", str(tmp_path / "a"), "--vlans", "a=4095")
    assert "bad --vlans 'a=4095'" in err, err


def test_mac_option_parsing_and_errors(tmp_path: Path) -> None:
    assert _mac_arg("vm.sock=52:54:00:12:34:56,02:00:00:00:00:01") == (
        "vm.sock",
        frozenset({bytes.fromhex("525400123456"), bytes.fromhex("020000000001")}),
    )
    for bad in ("vm.sock", "=52:54:00:12:34:56", "vm=52:54:00:12:34", "vm=01:00:5e:00:00:01",
                "vm=52-54-00-12-34-56", "vm=zz:54:00:12:34:56"):  # fmt: skip
        with pytest.raises(argparse.ArgumentTypeError, match="bad --mac"):
            _mac_arg(bad)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    mac1 = frozenset({bytes.fromhex("525400123456")})
    with pytest.raises(UsageError, match="--mac needs --port switch"):
        Daemon([a], port="null", macs=[("a", mac1)])
    with pytest.raises(UsageError, match=r"no such VM.*a, b"):
        Daemon([a, b], port="switch", macs=[("c", mac1)])
    with pytest.raises(UsageError, match="belongs to another VM"):
        Daemon([a, b], port="switch", macs=[("a", mac1), ("b", mac1)])


def test_ip_option_parsing_and_errors(tmp_path: Path) -> None:
    assert _ip_arg("vm.sock=10.0.0.5,fd00::5") == (
        "vm.sock",
        frozenset({bytes([10, 0, 0, 5]), bytes.fromhex("fd00" + "00" * 13 + "05")}),
    )
    for bad in ("vm.sock", "=10.0.0.5", "vm=10.0.0", "vm=224.0.0.1", "vm=::", "vm=ff02::1",
                "vm=255.255.255.255", "vm=10.0.0.5/24"):  # fmt: skip
        with pytest.raises(argparse.ArgumentTypeError, match="bad --ip"):
            _ip_arg(bad)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    ip1 = frozenset({bytes([10, 0, 0, 5])})
    with pytest.raises(UsageError, match="--ip needs --port switch"):
        Daemon([a], port="null", ips=[("a", ip1)])
    with pytest.raises(UsageError, match=r"no such VM.*a, b"):
        Daemon([a, b], port="switch", ips=[("c", ip1)])
    with pytest.raises(UsageError, match="belongs to another VM"):
        Daemon([a, b], port="switch", ips=[("a", ip1), ("b", ip1)])
    d = Daemon([a, b], port="switch", ips=[("a", ip1 | {bytes.fromhex("fd00" + "00" * 14)})])
    try:
        assert d.snapshot()["vms"][0]["ips"] == ["10.0.0.5", "fd00::"]
    finally:
        d.close()


def test_rate_option_parsing_and_errors(tmp_path: Path) -> None:
    assert _rate_vm_arg("vm.sock=100M") == ("vm.sock", 100_000_000)
    for bad in ("vm.sock", "=100M", "vm=fast", "vm=1k", "vm=1T"):
        with pytest.raises(argparse.ArgumentTypeError, match="bad --rate"):
            _rate_vm_arg(bad)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    with pytest.raises(UsageError, match="--rate needs --port switch"):
        Daemon([a], port="null", rates=[("a", 10**8)])
    with pytest.raises(UsageError, match=r"no such VM.*a, b"):
        Daemon([a, b], port="switch", rates=[("c", 10**8)])
    d = Daemon([a, b], port="switch", rates=[("b", 2 * 10**9)])
    try:
        assert "rate_bps" not in d.snapshot()["vms"][0]
        assert d.snapshot()["vms"][1]["rate_bps"] == 2 * 10**9
    finally:
        d.close()


def test_switch_only_flags(tmp_path: Path) -> None:
    """``--neigh-suppress``, ``--mcast-snoop`` and ``--mcast-querier`` need the switch."""
    a = str(tmp_path / "a")
    with pytest.raises(UsageError, match="--neigh-suppress needs --port switch"):
        Daemon([a], port="null", neigh_suppress=True)
    with pytest.raises(UsageError, match="--mcast-snoop needs --port switch"):
        Daemon([a], port="loopback", mcast_snoop=True)
    with pytest.raises(UsageError, match="--mcast-querier needs --port switch"):
        Daemon([a], port="loopback", mcast_querier=True)


def test_mac_locks_stop_a_spoofing_vm(tmp_path: Path) -> None:
    """``--mac b.sock=MAC_B``: B's frames from A's MAC are dropped as spoofed
    (A does not get them), its own go through; stats show the lock."""
    sock, stats, _ = _paths(tmp_path)
    b_sock = tmp_path / "b.sock"
    with (
        _serving(tmp_path, "--socket", str(b_sock), "--port", "switch", "--queues", "1",
                 "--mac", f"b.sock={MAC_B.hex(':')}"),
        VhostUserFrontend(sock, queue_pairs=1, mac=MAC_A) as fa,
        VhostUserFrontend(b_sock, queue_pairs=1, mac=MAC_B) as fb,
    ):  # fmt: skip
        assert fb.send([_tagged(None, MAC_A, 1), _tagged(None, MAC_B, 2)]) == 2
        got = _received(fa)
        assert got == [_tagged(None, MAC_B, 2)], got
        doc = fetch(str(stats))
        assert doc["switch"]["dropped_spoofed"] == 1, doc["switch"]
        assert doc["vms"][1]["macs"] == [MAC_B.hex(":")] and "macs" not in doc["vms"][0]
        assert "drop spoofed" in _stats_cli(stats)


def _received(fe: VhostUserFrontend) -> list[bytes]:
    """What reaches ``fe``: the first frames (waited for up to 5 s), then
    whatever else arrives within 0.3 s -- to see that nothing more came."""
    got: list[bytes] = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not got:
        got += [f.data for f in fe.receive(timeout=0.2)]
    time.sleep(0.3)
    return got + [f.data for f in fe.receive(timeout=0.2)]


def _tagged(vlan: int | None, src: bytes, n: int) -> bytes:
    tag = b"" if vlan is None else b"\x81\x00" + struct.pack(">H", vlan)
    return b"\xff" * 6 + src + tag + b"\x08\x00" + struct.pack(">I", n) + bytes(42)


def test_vlans_keep_switch_members_apart(tmp_path: Path) -> None:
    """``--vlans vm.sock=0,100 --vlans b.sock=100``: B gets A's frames tagged 100
    (tag kept), not A's untagged ones (B is no member of 0); a frame on a VLAN A
    is no member of is dropped and counted.  The stats show each VM's VLANs."""
    sock, stats, _ = _paths(tmp_path)
    b_sock = tmp_path / "b.sock"
    with (
        _serving(tmp_path, "--socket", str(b_sock), "--port", "switch", "--queues", "1",
                 "--vlans", "vm.sock=0,100", "--vlans", "b.sock=100"),
        VhostUserFrontend(sock, queue_pairs=1, mac=MAC_A) as fa,
        VhostUserFrontend(b_sock, queue_pairs=1, mac=MAC_B) as fb,
    ):  # fmt: skip
        assert fa.send([_tagged(None, MAC_A, 1), _tagged(100, MAC_A, 2), _tagged(200, MAC_A, 3)])
        got = _received(fb)
        assert got == [_tagged(100, MAC_A, 2)], got
        doc = fetch(str(stats))
        assert doc["switch"]["dropped_vlan"] == 1, doc["switch"]
        assert [vm["vlans"] for vm in doc["vms"]] == [[0, 100], [100]]
        assert "VLANs 0,100" in _stats_cli(stats)


@pytest.mark.parametrize("offloads", [True, False])
def test_offered_features(tmp_path: Path, offloads: bool) -> None:
    import socket as _socket

    from virtnet.net import NetFeature
    from virtnet.vhost_user.codec import Request, encode_request

    sock, _, _ = _paths(tmp_path)
    extra = () if offloads else ("--no-offloads",)
    with _serving(tmp_path, "--port", "null", "--queues", "16", *extra):
        s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(str(sock))
        s.sendall(encode_request(Request.GET_FEATURES))
        reply = s.recv(64)
        s.close()
        feats = struct.unpack_from("<Q", reply, 12)[0]
        must = (
            NetFeature.VERSION_1 | NetFeature.MQ | NetFeature.MRG_RXBUF | NetFeature.EVENT_IDX
            | NetFeature.INDIRECT_DESC | NetFeature.MTU | NetFeature.STATUS
        )  # fmt: skip
        assert feats & must == must
        off = NetFeature.CSUM | NetFeature.GUEST_CSUM | NetFeature.HOST_TSO4 | NetFeature.GUEST_TSO6
        assert bool(feats & off == off) is offloads
        assert not (feats & off) or offloads


def test_sixteen_pairs(tmp_path: Path) -> None:
    sock, stats, _ = _paths(tmp_path)
    with (
        _serving(tmp_path, "--port", "loopback", "--queues", "16"),
        VhostUserFrontend(sock, queue_pairs=16, mac=MAC_A) as fe,
    ):
        assert fe.set_queue_pairs(16)
        assert wait_for(lambda: sum(p["enabled"] for p in _pairs(stats)) == 16, timeout=20)
        for p in (0, 7, 15):
            assert _echo(fe, 8, pair=p) == 8, p
        assert len({p["pid"] for p in _pairs(stats)}) == 16


@pytest.mark.parametrize("workers", [0, 1])
def test_pinned_workers(tmp_path: Path, workers: int) -> None:
    """--pin: worker process p on the p-th CPU; with --workers 1 both pairs
    share one process on the first CPU."""
    sock, stats, _ = _paths(tmp_path)
    cpus = sorted(os.sched_getaffinity(0))
    pin = ",".join(map(str, cpus))
    with (
        _serving(
            tmp_path, "--port", "loopback", "--queues", "2", "--pin", pin, "--workers", str(workers)
        ),
        VhostUserFrontend(sock, queue_pairs=2, mac=MAC_A) as fe,
    ):
        assert fe.set_queue_pairs(2)
        assert wait_for(lambda: all(p["pid"] for p in _pairs(stats)[:2]), timeout=10)
        rows = _pairs(stats)
        assert (rows[0]["pid"] == rows[1]["pid"]) == (workers == 1)
        for pair, row in enumerate(rows):
            proc_index = pair % workers if workers else pair
            assert os.sched_getaffinity(row["pid"]) == {cpus[proc_index % len(cpus)]}
        assert _echo(fe, 8, pair=1) == 8


def test_grouped_workers(tmp_path: Path) -> None:
    """--workers 2 with 4 pairs: pair p is served by process p % 2; a pair
    disabled leaves its process serving the rest, a pair enabled re-forks its
    group, a killed process restarts both its pairs and not the others."""
    sock, stats, log = _paths(tmp_path)
    pids: set[int] = set()
    with (
        _serving(tmp_path, "--port", "loopback", "--queues", "4", "--workers", "2"),
        VhostUserFrontend(sock, queue_pairs=4, mac=MAC_A) as fe,
    ):

        def pid_of() -> list[int]:
            return [int(p["pid"]) for p in _pairs(stats)]

        assert fe.set_queue_pairs(4)
        assert wait_for(lambda: all(pid_of()), timeout=10)
        a, b, a2, b2 = pid_of()
        assert a == a2 and b == b2 and a != b
        pids |= {a, b}
        for p in range(4):
            assert _echo(fe, 16, pair=p) == 16, p

        assert fe.set_queue_pairs(2)
        assert wait_for(lambda: pid_of()[2:] == [0, 0], timeout=10)
        assert pid_of()[:2] == [a, b]  # stopping a pair did not re-fork its group
        assert _alive(a) and _alive(b)
        assert _echo(fe, 16, pair=0) == 16 and _echo(fe, 16, pair=1) == 16

        assert fe.set_queue_pairs(4)
        assert wait_for(lambda: all(pid_of()), timeout=10)
        c, d, c2, d2 = pid_of()
        assert c == c2 and d == d2 and c != d and not {c, d} & {a, b}
        pids |= {c, d}
        for p in range(4):
            assert _echo(fe, 16, pair=p) == 16, p

        os.kill(d, signal.SIGKILL)
        assert wait_for(lambda: [r["restarts"] for r in _pairs(stats)] == [0, 1, 0, 1], timeout=10)
        e, f, e2, f2 = pid_of()
        assert e == e2 == c and f == f2 and f not in (0, d)
        pids.add(f)
        for p in range(4):
            assert _echo(fe, 16, pair=p) == 16, p
        assert _pairs(stats)[3]["rx_packets"] >= 32  # counters survive the restart
    assert not any(_alive(p) for p in pids)
    text = log.read_text()
    assert f"pair 1 worker {d} died (signal 9)" in text
    assert f"pair 3 worker {d} died (signal 9)" in text


@pytest.mark.parametrize("workers", ["0", "1"])
def test_busy_polling_workers(tmp_path: Path, workers: str) -> None:
    """--poll-us: the workers spin before sleeping (one per pair, or both pairs in
    one process); traffic flows on both pairs and a stop that arrives while the
    worker spins (1 s after each burst) is still answered."""
    sock, stats, log = _paths(tmp_path)
    with (
        _serving(
            tmp_path,
            "--port",
            "loopback",
            "--queues",
            "2",
            "--poll-us",
            "1000000",
            "--workers",
            workers,
        ),
        VhostUserFrontend(sock, queue_pairs=2, mac=MAC_A) as fe,
    ):
        assert fe.set_queue_pairs(2)
        for p in (0, 1, 0, 1):
            assert _echo(fe, 16, pair=p) == 16, p
        assert fe.set_queue_pairs(1)
        assert wait_for(lambda: _pairs(stats)[1]["pid"] == 0, timeout=10)
        assert _echo(fe, 16, pair=0) == 16
    text = log.read_text()
    assert "pair 1 worker" in text and "stopped (rx avail" in text
    assert "did not answer stop" not in text and "died" not in text


def test_sigint_reaps_workers(serve: tuple[Path, Path, Path, subprocess.Popen[bytes]]) -> None:
    sock, stats, log, proc = serve
    with VhostUserFrontend(sock, queue_pairs=2, mac=MAC_A) as fe:
        assert fe.set_queue_pairs(2)
        assert wait_for(lambda: all(p["pid"] for p in _pairs(stats)[:2]), timeout=10)
        pids = [p["pid"] for p in _pairs(stats)[:2]]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0
    assert not any(_alive(p) for p in pids)
    assert "signal 2: shutting down" in log.read_text()
