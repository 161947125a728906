"""``virtnet ctl`` against a running ``virtnet serve --control-socket``: VMs
added and removed at run time, bad requests refused with the reason while
serve goes on serving (our own vhost-user frontend plays the VMs)."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtnet.errors import ProtocolError
from virtnet.ports.switch import DHCP_LEARNING, SLAAC_LEARNING, Guard
from virtnet.testing.guest import wait_for
from virtnet.testing.netns import NetNS
from virtnet.testing.procs import stop_process
from virtnet.testing.serve import start_serve
from virtnet.vhost_user.control import (
    MAX_REQUEST_BYTES,
    AddVm,
    RemoveVm,
    SetSwitch,
    SetVm,
    parse_rate,
    parse_request,
)
from virtnet.vhost_user.frontend import BackendClosedError, VhostUserFrontend
from virtnet.vhost_user.stats import fetch

MAC_A = b"\x02\x00\x00\x00\x00\x0a"
MAC_B = b"\x02\x00\x00\x00\x00\x0b"


def test_parse_request() -> None:
    assert parse_request(b'{"op": "add", "socket": "/run/b.sock"}') == AddVm("/run/b.sock")
    assert parse_request(b'{"op": "add", "socket": "b", "vlans": [0, 7], "tap": "vn3"}') == AddVm(
        "b", frozenset({0, 7}), "vn3"
    )
    assert parse_request(b'{"op": "add", "socket": "b", "macs": ["52:54:00:12:34:56"]}') == AddVm(
        "b", macs=frozenset({bytes.fromhex("525400123456")})
    )
    assert parse_request(b'{"op": "remove", "name": "b.sock"}') == RemoveVm("b.sock")
    assert parse_request(b'{"op": "set", "name": "b", "vlans": [5]}') == SetVm("b", frozenset({5}))
    assert parse_request(b'{"op": "set", "name": "b", "macs": null}') == SetVm("b", unlock=True)
    assert parse_request(b'{"op": "add", "socket": "b", "ips": ["10.0.0.5", "fd00::5"]}') == AddVm(
        "b", ips=frozenset({bytes([10, 0, 0, 5]), bytes.fromhex("fd00" + "00" * 13 + "05")})
    )
    assert parse_request(b'{"op": "set", "name": "b", "ips": null}') == SetVm("b", unlock_ips=True)
    assert parse_request(b'{"op": "set", "name": "b", "ips": ["dhcp"]}') == SetVm(
        "b", ips=frozenset({DHCP_LEARNING})
    )
    assert parse_request(b'{"op": "set", "name": "b", "ips": ["slaac", "10.0.0.5"]}') == SetVm(
        "b", ips=frozenset({SLAAC_LEARNING, bytes([10, 0, 0, 5])})
    )
    assert parse_request(b'{"op": "set", "name": "b", "rate": 100000000}') == SetVm(
        "b", rate=100_000_000
    )
    assert parse_request(b'{"op": "set", "name": "b", "rate": null}') == SetVm("b", unlimit=True)
    assert parse_request(b'{"op": "add", "socket": "b", "guards": ["router", "dhcp"]}') == AddVm(
        "b", guards=frozenset({Guard.DHCP, Guard.ROUTER})
    )
    assert parse_request(b'{"op": "set", "name": "b", "guards": []}') == SetVm(
        "b", guards=frozenset()
    )
    assert parse_request(b'{"op": "switch", "mcast_querier": true}') == SetSwitch(
        mcast_querier=True
    )
    assert parse_request(
        b'{"op": "switch", "neigh_suppress": false, "mcast_snoop": true}'
    ) == SetSwitch(neigh_suppress=False, mcast_snoop=True)
    assert parse_rate("100M") == parse_rate("0.1G") == 100_000_000
    assert parse_rate("64k") == 64_000 and parse_rate("2000000") == 2_000_000
    for text in ("fast", "1T", "63k", "500G", "", "M"):
        with pytest.raises(ValueError):
            parse_rate(text)
    bad = [
        b"", b"[]", b"{", b'{"op": "list"}', b'{"op": "add"}', b'{"op": "add", "socket": ""}',
        b'{"op": "add", "socket": "' + b"x" * 108 + b'"}',
        b'{"op": "add", "socket": "b", "vlans": []}',
        b'{"op": "add", "socket": "b", "vlans": [4095]}',
        b'{"op": "add", "socket": "b", "vlans": [true]}',
        b'{"op": "add", "socket": "b", "tap": 3}', b'{"op": "add", "socket": "b", "x": 1}',
        b'{"op": "add", "socket": "b", "macs": "52:54:00:12:34:56"}',
        b'{"op": "add", "socket": "b", "macs": ["01:00:5e:00:00:01"]}',
        b'{"op": "add", "socket": "b", "macs": ["nonsense"]}',
        b'{"op": "add", "socket": "b", "ips": []}',
        b'{"op": "add", "socket": "b", "ips": "10.0.0.5"}',
        b'{"op": "add", "socket": "b", "ips": ["10.0.0.256"]}',
        b'{"op": "add", "socket": "b", "ips": ["224.0.0.1"]}',
        b'{"op": "add", "socket": "b", "ips": ["0.0.0.0"]}',
        b'{"op": "add", "socket": "b", "rate": "100M"}',
        b'{"op": "add", "socket": "b", "rate": 1000}', b'{"op": "set", "name": "b", "rate": true}',
        b'{"op": "add", "socket": "b", "guards": "dhcp"}',
        b'{"op": "add", "socket": "b", "guards": ["nat"]}',
        b'{"op": "set", "name": "b", "guards": null}',
        b'{"op": "set", "name": "b", "guards": [""]}',
        b'{"op": "remove"}', b'{"op": "remove", "name": "b", "also": 1}',
        b'{"op": "set", "name": "b"}', b'{"op": "set", "vlans": [1]}',
        b'{"op": "set", "name": "b", "tap": "x", "vlans": [1]}',
        b'{"op": "switch"}', b'{"op": "switch", "mcast_snoop": 1}',
        b'{"op": "switch", "mcast_snoop": null}', b'{"op": "switch", "name": "b"}',
        b" " * (MAX_REQUEST_BYTES + 1),
    ]  # fmt: skip
    for line in bad:
        with pytest.raises(ProtocolError):
            parse_request(line)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200), st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(
        st.sampled_from(["op", "socket", "vlans", "tap", "name", "ips", "guards", "x"]), kids,
        max_size=4),
    max_leaves=8,
).map(lambda d: json.dumps(d).encode())))  # fmt: skip
def test_parse_request_raises_only_protocol_errors(line: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        parse_request(line)


def _ctl(control: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "virtnet.cli", "ctl", "--control-socket", str(control), *args],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


@contextlib.contextmanager
def _serving(tmp_path: Path, *args: str) -> Iterator[tuple[Path, Path, int]]:
    """``virtnet serve ARGS`` with a stats and a control socket in ``tmp_path``;
    yields (stats, control, its pid) once it serves, and must stop cleanly."""
    stats, control, log = tmp_path / "stats", tmp_path / "control", tmp_path / "log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "virtnet.cli", "serve", "--queues", "1", *args,
             "--stats-socket", str(stats), "--control-socket", str(control)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        assert wait_for(lambda: control.exists() or proc.poll() is not None, timeout=20)
        assert proc.poll() is None, log.read_text()
        yield stats, control, proc.pid
    finally:
        assert stop_process(proc, timeout=30) == 0, log.read_text()[-3000:]
    assert not control.exists()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[tuple[Path, Path, Path]]:
    """serve --port switch on a.sock with a control socket; (a.sock, stats, control)."""
    a = tmp_path / "a.sock"
    with _serving(tmp_path, "--socket", str(a), "--port", "switch", "--vlans", "0,100") as (
        stats,
        control,
        _,
    ):
        yield a, stats, control


def _gone(fe: VhostUserFrontend) -> bool:
    """serve closed ``fe``'s connection."""
    try:
        fe.check_connection()
    except BackendClosedError:
        return True
    return False


def _broadcast(n: int) -> bytes:
    return b"\xff" * 6 + MAC_A + b"\x08\x00" + n.to_bytes(4, "big") + bytes(42)


def test_switch_settings_changed_at_run_time(
    serve: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """``virtnet ctl switch``: neighbour suppression, multicast snooping and
    the querier go on and off in the switch process (its own stats say so);
    the querier brings snooping, snooping off takes the querier; serve with
    another port refuses."""
    _a, stats, control = serve

    def on() -> list[str]:
        return list(fetch(str(stats))["switch"]["on"])

    assert on() == []
    assert _ctl(control, "switch", "--mcast-querier", "on").returncode == 0
    assert on() == ["mcast_snoop", "mcast_querier"]
    assert _ctl(control, "switch", "--neigh-suppress", "on", "--mcast-snoop", "off").returncode == 0
    assert on() == ["neigh_suppress"]
    res = _ctl(control, "switch")
    assert res.returncode != 0 and "switch what?" in res.stderr, res
    shown = subprocess.run(
        [sys.executable, "-m", "virtnet.cli", "stats", "--stats-socket", str(stats)],
        capture_output=True, text=True, timeout=30, check=True,
        env={**os.environ, "COLUMNS": "300"},
    )  # fmt: skip
    assert "on: neigh-suppress" in shown.stdout, shown.stdout
    other = tmp_path / "other"
    other.mkdir()
    with _serving(other, "--socket", str(other / "b.sock"), "--port", "null") as (_s, ctl, _p):
        res = _ctl(ctl, "switch", "--mcast-snoop", "on")
        assert res.returncode != 0 and "needs --port switch" in res.stderr, res


def test_vms_added_and_removed_at_run_time(serve: tuple[Path, Path, Path], tmp_path: Path) -> None:
    a, stats, control = serve
    assert stat.S_IMODE(control.stat().st_mode) == 0o600
    b = tmp_path / "b.sock"
    res = _ctl(control, "add", "--socket", str(b))
    assert res.returncode == 0 and res.stdout.strip() == "b.sock", res
    doc = fetch(str(stats))
    assert [vm["name"] for vm in doc["vms"]] == ["a.sock", "b.sock"]
    assert [vm["vlans"] for vm in doc["vms"]] == [[0, 100], [0, 100]]  # the --vlans default
    with (
        VhostUserFrontend(a, queue_pairs=1, mac=MAC_A) as fa,
        VhostUserFrontend(b, queue_pairs=1, mac=MAC_B, auto_reconnect=False) as fb,
    ):
        assert fa.send([_broadcast(1)]) == 1
        assert wait_for(lambda: fb.receive(timeout=0.1), timeout=5)
        res = _ctl(control, "add", "--socket", str(b))
        assert res.returncode == 2 and "already served" in res.stderr, res
        res = _ctl(control, "remove", "b.sock")
        assert res.returncode == 0, res
        assert wait_for(partial(_gone, fb), timeout=5)
        assert not b.exists()
        assert [vm["name"] for vm in fetch(str(stats))["vms"]] == ["a.sock"]
        assert fa.send([_broadcast(2)]) == 1  # A is still served
        time.sleep(0.2)
        assert fetch(str(stats))["vms"][0]["pairs"][0]["tx_packets"] == 2
    res = _ctl(control, "remove", "b.sock")
    assert res.returncode == 2 and "no VM called 'b.sock'" in res.stderr, res
    res = _ctl(control, "add", "--socket", str(b), "--vlans", "7", "--tap", "vn0")
    assert res.returncode == 2 and "a tap name needs --port tap" in res.stderr, res
    res = _ctl(control, "add", "--socket", str(b), "--vlans", "7", "--mac", MAC_B.hex(":"))
    assert res.returncode == 0 and res.stdout.strip() == "b.sock", res
    vm = fetch(str(stats))["vms"][1]
    assert vm["vlans"] == [7] and vm["macs"] == [MAC_B.hex(":")], vm
    res = _ctl(control, "add", "--socket", str(tmp_path / "c.sock"), "--mac", MAC_B.hex(":"))
    assert res.returncode == 2 and "belongs to another VM" in res.stderr, res
    assert _ctl(control, "remove", "b.sock").returncode == 0  # frees B's MAC
    res = _ctl(control, "add", "--socket", str(tmp_path / "c.sock"), "--mac", MAC_B.hex(":"))
    assert res.returncode == 0, res


def test_vlans_and_mac_lock_changed_at_run_time(
    serve: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """``virtnet ctl set``: B leaves VLAN 0 (A's untagged broadcast no longer
    reaches it), then B is locked to its MAC (its frames from another MAC are
    dropped), then unlocked again; the same with its IPv4 source address."""
    a, stats, control = serve
    b = tmp_path / "b.sock"
    assert _ctl(control, "add", "--socket", str(b)).returncode == 0
    other = b"\x02\x00\x00\x00\x00\x0c"

    def b_hears_a(n: int) -> bool:
        assert fa.send([_broadcast(n)]) == 1
        time.sleep(0.3)
        return bool(fb.receive(timeout=0.2))

    def a_hears_b_from(src: bytes) -> bool:
        assert fb.send([b"\xff" * 6 + src + b"\x08\x00" + bytes(46)]) == 1
        time.sleep(0.3)
        return bool(fa.receive(timeout=0.2))

    def a_hears_b_ip(src: str) -> bool:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20, 0, 0, 64, 253, 0,
                         ipaddress.ip_address(src).packed, bytes([10, 0, 0, 1]))  # fmt: skip
        assert fb.send([b"\xff" * 6 + MAC_B + b"\x08\x00" + ip + bytes(26)]) == 1
        time.sleep(0.3)
        return bool(fa.receive(timeout=0.2))

    def a_hears_b_udp(sport: int, dport: int) -> bool:
        ip = struct.pack("!BBHHHBBH4s4sHHHH", 0x45, 0, 28, 0, 0, 64, 17, 0, bytes(4),
                         b"\xff" * 4, sport, dport, 8, 0)  # fmt: skip
        assert fb.send([b"\xff" * 6 + MAC_B + b"\x08\x00" + ip + bytes(18)]) == 1
        time.sleep(0.3)
        return bool(fa.receive(timeout=0.2))

    with (
        VhostUserFrontend(a, queue_pairs=1, mac=MAC_A) as fa,
        VhostUserFrontend(b, queue_pairs=1, mac=MAC_B) as fb,
    ):
        assert wait_for(lambda: b_hears_a(1), timeout=5)
        assert _ctl(control, "set", "b.sock", "--vlans", "100").returncode == 0
        assert not b_hears_a(2)
        assert fetch(str(stats))["vms"][1]["vlans"] == [100]
        assert _ctl(control, "set", "b.sock", "--vlans", "0,100").returncode == 0
        assert a_hears_b_from(other)
        assert _ctl(control, "set", "b.sock", "--mac", MAC_B.hex(":")).returncode == 0
        assert not a_hears_b_from(other) and a_hears_b_from(MAC_B)
        assert fetch(str(stats))["vms"][1]["macs"] == [MAC_B.hex(":")]
        res = _ctl(control, "set", "a.sock", "--mac", MAC_B.hex(":"))
        assert res.returncode == 2 and "belongs to another VM" in res.stderr, res
        assert _ctl(control, "set", "b.sock", "--no-mac").returncode == 0
        assert a_hears_b_from(other)
        assert "macs" not in fetch(str(stats))["vms"][1]
        # IP source guard: B may send IPv4 from 10.0.0.2 only.
        assert a_hears_b_ip("10.0.0.9")
        assert _ctl(control, "set", "b.sock", "--ip", "10.0.0.2").returncode == 0
        assert not a_hears_b_ip("10.0.0.9") and a_hears_b_ip("10.0.0.2")
        assert fetch(str(stats))["vms"][1]["ips"] == ["10.0.0.2"]
        res = _ctl(control, "set", "a.sock", "--ip", "10.0.0.2")
        assert res.returncode == 2 and "belongs to another VM" in res.stderr, res
        assert _ctl(control, "set", "b.sock", "--no-ip").returncode == 0
        assert a_hears_b_ip("10.0.0.9")
        assert "ips" not in fetch(str(stats))["vms"][1]
        # Policing: held to the lowest rate, B's burst beyond its bucket is dropped.
        assert _ctl(control, "set", "b.sock", "--rate", "64k").returncode == 0
        assert fetch(str(stats))["vms"][1]["rate_bps"] == 64_000
        big = b"\xff" * 6 + MAC_B + b"\x08\x00" + bytes(1486)
        for _ in range(4):  # 4 x 64 frames of 1500 bytes: 384 KB against a 128-KiB bucket
            fb.send([big] * 64)
            time.sleep(0.05)
        assert wait_for(lambda: fetch(str(stats))["switch"]["dropped_rate"] > 0, timeout=5)
        assert _ctl(control, "set", "b.sock", "--no-rate").returncode == 0
        assert "rate_bps" not in fetch(str(stats))["vms"][1]
        # Guards: B's DHCP server reply (UDP 67 -> 68) is dropped, its DHCP
        # client request is not; --no-guard lets the reply through again.
        assert a_hears_b_udp(67, 68)
        assert _ctl(control, "set", "b.sock", "--guard", "dhcp,router").returncode == 0
        assert fetch(str(stats))["vms"][1]["guards"] == ["dhcp", "router"]
        assert not a_hears_b_udp(67, 68) and a_hears_b_udp(68, 67)
        assert fetch(str(stats))["switch"]["dropped_guard"] == 1
        res = _ctl(control, "set", "b.sock", "--guard", "nat")
        assert res.returncode == 2 and "no guard 'nat'" in res.stderr, res
        assert _ctl(control, "set", "b.sock", "--no-guard").returncode == 0
        assert a_hears_b_udp(67, 68)
        assert "guards" not in fetch(str(stats))["vms"][1]
    res = _ctl(control, "set", "b.sock")
    assert res.returncode == 2 and "set what?" in res.stderr, res
    res = _ctl(control, "set", "nope", "--vlans", "1")
    assert res.returncode == 2 and "no VM called 'nope'" in res.stderr, res


def test_bad_requests_are_answered_and_serve_goes_on(serve: tuple[Path, Path, Path]) -> None:
    _, stats, control = serve
    for line in (b"nonsense\n", b'{"op": "reboot"}\n', b"x" * (MAX_REQUEST_BYTES + 10), b""):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(control))
            s.sendall(line)
            s.shutdown(socket.SHUT_WR)
            reply = json.loads(s.makefile("rb").readline())
        assert reply["ok"] is False and reply["error"], (line[:20], reply)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:  # says nothing at all
        s.connect(str(control))
        time.sleep(1.5)
    assert [vm["name"] for vm in fetch(str(stats))["vms"]] == ["a.sock"]
    res = _ctl(control.with_name("nowhere"), "remove", "a.sock")
    assert res.returncode == 2 and "cannot reach serve's control socket" in res.stderr, res


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespace, taps)")
def test_tap_vms_added_and_removed(tmp_path: Path) -> None:
    """``--port tap:vnc%d``: an added VM gets the next index (or the tap it
    names); removing it closes its tap, which serve created and which goes."""
    stats, control, log = tmp_path / "stats", tmp_path / "control", tmp_path / "log"
    a, b, c = (tmp_path / f"{n}.sock" for n in "abc")
    with NetNS() as ns:
        serve = start_serve(
            ns, ["--socket", str(a), "--port", "tap:vnc%d", "--queues", "1",
                 "--control-socket", str(control)],
            stats=stats, log=log,
        )  # fmt: skip
        try:
            assert _ctl(control, "add", "--socket", str(b)).stdout.strip() == "b.sock"
            assert _ctl(control, "add", "--socket", str(c), "--tap", "mine0").returncode == 0
            res = _ctl(control, "add", "--socket", str(tmp_path / "d.sock"), "--tap", "mine0")
            assert res.returncode == 2 and "tap mine0 already serves a VM" in res.stderr, res
            res = _ctl(control, "add", "--socket", str(tmp_path / "e.sock"), "--vlans", "5")
            assert res.returncode == 2 and "VLANs need --port switch" in res.stderr, res
            with (
                VhostUserFrontend(b, queue_pairs=1, mac=MAC_B, auto_reconnect=False) as fb,
                VhostUserFrontend(c, queue_pairs=1, mac=MAC_A, auto_reconnect=False),
            ):
                assert wait_for(lambda: ns.has_link("vnc1") and ns.has_link("mine0"), timeout=10)
                assert _ctl(control, "remove", "b.sock").returncode == 0
                assert wait_for(partial(_gone, fb), timeout=5)
                assert wait_for(lambda: not ns.has_link("vnc1"), timeout=10)
                assert ns.has_link("mine0")
            names = [vm["name"] for vm in fetch(str(stats))["vms"]]
            assert names == ["a.sock", "c.sock"], names
        finally:
            assert stop_process(serve, timeout=30) == 0, log.read_text()[-3000:]


def test_client_mode_vm_added_dials_its_frontend(tmp_path: Path) -> None:
    """serve --client: an added VM is dialled like a --socket given at start,
    retrying until its frontend listens; a removed one is hung up on."""
    a, b = tmp_path / "a.sock", tmp_path / "b.sock"
    with _serving(tmp_path, "--client", "--socket", str(a), "--port", "loopback") as (
        _,
        control,
        _pid,
    ):
        assert _ctl(control, "add", "--socket", str(b)).stdout.strip() == "b.sock"
        frame = MAC_B + MAC_A + b"\x08\x00" + bytes(50)
        with VhostUserFrontend(
            b, mode="listen", queue_pairs=1, mac=MAC_A, timeout=10.0, auto_reconnect=False
        ) as fb:
            assert fb.send([frame]) == 1
            assert wait_for(lambda: fb.receive(timeout=0.1), timeout=5)  # looped back
            assert _ctl(control, "remove", "b.sock").returncode == 0
            assert wait_for(partial(_gone, fb), timeout=5)


def _fds_and_children(pid: int) -> tuple[int, set[int]]:
    children: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        children |= {int(c) for c in (task / "children").read_text().split()}
    return len(list(Path(f"/proc/{pid}/fd").iterdir())), children


def test_churn_leaks_no_fd_and_no_process(tmp_path: Path) -> None:
    """VMs added and removed a dozen times -- never connected, removed while
    their frontend is connected with 2 pairs running, or removed after it
    left: serve ends with the fds and child processes it started with."""
    a = tmp_path / "a.sock"
    frame = b"\xff" * 6 + MAC_A + b"\x08\x00" + bytes(50)
    with _serving(tmp_path, "--socket", str(a), "--port", "switch", "--queues", "2") as (
        stats,
        control,
        pid,
    ):
        baseline = _fds_and_children(pid)
        for i in range(12):
            path = tmp_path / f"vm{i}.sock"
            assert _ctl(control, "add", "--socket", str(path)).returncode == 0
            if i % 3:
                with VhostUserFrontend(path, queue_pairs=2, mac=MAC_A, auto_reconnect=False) as fe:
                    assert fe.set_queue_pairs(2)
                    assert fe.send([frame] * 8, pair=1) == 8
                    assert wait_for(lambda: len(_fds_and_children(pid)[1]) >= 3, timeout=10)
                    if i % 3 == 1:
                        assert _ctl(control, "remove", f"vm{i}.sock").returncode == 0
                        assert wait_for(partial(_gone, fe), timeout=5)
                if i % 3 == 2:
                    assert _ctl(control, "remove", f"vm{i}.sock").returncode == 0
            else:
                assert _ctl(control, "remove", f"vm{i}.sock").returncode == 0
        assert wait_for(lambda: _fds_and_children(pid) == baseline, timeout=20), (
            baseline,
            _fds_and_children(pid),
        )
        assert [vm["name"] for vm in fetch(str(stats))["vms"]] == ["a.sock"]


def test_state_file_brings_added_vms_back_after_a_restart(tmp_path: Path) -> None:
    """``--state-file``: VMs added with ctl (and their later ``set``) are served
    again by the next serve; removed ones are not.  A state file that is not
    one is moved aside and serve starts without it; bad entries are dropped."""
    a, b, c = (tmp_path / f"{n}.sock" for n in "abc")
    state, log = tmp_path / "state.json", tmp_path / "log"
    args = ("--socket", str(a), "--port", "switch", "--state-file", str(state))
    with _serving(tmp_path, *args) as (stats, control, _pid):
        res = _ctl(control, "add", "--socket", str(b), "--vlans", "0,100", "--guard", "dhcp")
        assert res.returncode == 0, res
        assert fetch(str(stats))["vms"][1]["guards"] == ["dhcp"]
        assert _ctl(control, "add", "--socket", str(c)).returncode == 0
        assert (
            _ctl(control, "set", "b.sock", "--vlans", "100", "--mac", MAC_B.hex(":")).returncode
            == 0
        )
        assert _ctl(control, "set", "b.sock", "--ip", "slaac,10.0.0.2,fd00::2").returncode == 0
        assert fetch(str(stats))["vms"][1]["ips"] == ["10.0.0.2", "fd00::2", "slaac"]
        assert _ctl(control, "set", "b.sock", "--rate", "1.5G").returncode == 0
        assert _ctl(control, "set", "b.sock", "--guard", "router").returncode == 0
        assert _ctl(control, "remove", "c.sock").returncode == 0
        assert stat.S_IMODE(state.stat().st_mode) == 0o600
    with _serving(tmp_path, *args) as (stats, _, _pid):
        vms = fetch(str(stats))["vms"]
        assert [vm["name"] for vm in vms] == ["a.sock", "b.sock"], vms
        assert vms[1]["vlans"] == [100] and vms[1]["macs"] == [MAC_B.hex(":")], vms[1]
        assert vms[1]["ips"] == ["10.0.0.2", "fd00::2", "slaac"], vms[1]
        assert vms[1]["rate_bps"] == 1_500_000_000, vms[1]
        assert vms[1]["guards"] == ["router"], vms[1]
        with VhostUserFrontend(b, queue_pairs=1, mac=MAC_B):
            pass  # b's socket is really served
    state.write_text("{not json")
    with _serving(tmp_path, *args) as (stats, _, _pid):
        assert [vm["name"] for vm in fetch(str(stats))["vms"]] == ["a.sock"]
    assert (tmp_path / "state.json.bad").read_text() == "{not json"
    assert "moved to" in log.read_text()
    entries = [
        {"socket": str(b)},
        {"socket": 5},
        "x",
        {"socket": str(a)},
        {"socket": str(c), "x": 1},
    ]
    state.write_text(json.dumps({"version": 1, "vms": entries}))
    with _serving(tmp_path, *args) as (stats, _, _pid):
        assert [vm["name"] for vm in fetch(str(stats))["vms"]] == ["a.sock", "b.sock"]
    text = log.read_text()
    assert text.count("dropping") == 4 and "already served" in text, text
    assert json.loads(state.read_text())["vms"] == [{"socket": str(b)}]
