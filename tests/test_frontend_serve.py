"""The frontend, pktgen and rr against virtnet's own backend, ``virtnet serve``, every port.

* ``loopback``: every frame comes back on the pair it was sent on.
* ``null``: frames are consumed, nothing comes back.
* ``switch``: two VMs (two sockets of one daemon) reach each other by MAC.
* ``tap:IF``: frames reach the kernel interface and come back from it (root);
  also with serve run as ``nobody`` on a tap that user owns (no root needed).

Also: ``virtnet stats --prometheus`` scraping serve; a queue-count change
under load, and a restart of the daemon (the frontend reconnects and its rings
resume at the used index).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import virtnet
from virtnet.demo import PAYLOAD_OFF, build_frame
from virtnet.net import NetFeature
from virtnet.pktgen import PairCounters, PktgenResult, run_pktgen
from virtnet.rr import run_rr
from virtnet.testing.guest import wait_for
from virtnet.testing.netns import create_tap, delete_link
from virtnet.testing.procs import stop_process
from virtnet.vhost_user.codec import ProtocolFeature, Request
from virtnet.vhost_user.frontend import DEFAULT_MAC, DEFAULT_PROTOCOL_FEATURES, VhostUserFrontend
from virtnet.vhost_user.stats import fetch

pytestmark = pytest.mark.timeout(180)

_SEQ = struct.Struct("!II")
MAC_A = bytes.fromhex("52540000aa01")
MAC_B = bytes.fromhex("52540000bb02")


@contextmanager
def serve(
    tmp: Path, port: str, *, vms: int = 1, queues: int = 4, extra: tuple[str, ...] = ()
) -> Iterator[list[Path]]:
    """``virtnet serve`` with ``vms`` sockets on ``port``; always stopped afterwards."""
    socks = [tmp / f"vm{i}.sock" for i in range(vms)]
    stats = tmp / "stats.sock"
    args = [sys.executable, "-m", "virtnet.cli", "serve", "--port", port,
            "--queues", str(queues), "--stats-socket", str(stats), *extra]  # fmt: skip
    for s in socks:
        args += ["--socket", str(s)]
    log = (tmp / f"serve-{port}.log").open("ab")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 20
        while not all(s.exists() for s in socks):
            assert proc.poll() is None, (tmp / f"serve-{port}.log").read_text()
            assert time.monotonic() < end, "virtnet serve did not create its sockets"
            time.sleep(0.05)
        yield socks
    finally:
        stop_process(proc)
        log.close()


def collect(fe: VhostUserFrontend, want: int, timeout: float = 5.0) -> list[tuple[int, bytes]]:
    got: list[tuple[int, bytes]] = []
    end = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < end:
        got += [(f.pair, f.data) for f in fe.receive(0.05)]
    return got


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_loopback_echoes_on_the_same_pair(tmp_path: Path, packed: bool) -> None:
    with (
        serve(tmp_path, "loopback") as (sock,),
        VhostUserFrontend(sock, queue_pairs=4, packed=packed) as fe,
    ):
        # IN_ORDER: serve's workers return tx batches with one used entry,
        # which our driver's in-order queues read (split rings).
        assert fe.features & NetFeature.IN_ORDER
        assert bool(fe.features & NetFeature.RING_PACKED) is packed
        assert fe.max_pairs == 4 and fe.set_queue_pairs(4)
        frames = [build_frame(f, 0) for f in range(32)]
        pair_of = {f: fe.driver.select_queue(fr) for f, fr in enumerate(frames)}
        assert fe.send(frames) == 32
        got = collect(fe, 32)
        assert len(got) == 32
        for pair, data in got:
            flow, _ = _SEQ.unpack_from(data, PAYLOAD_OFF)
            orig = frames[flow]
            assert pair == pair_of[flow]
            assert data == orig[6:12] + orig[0:6] + orig[12:]  # MACs swapped


def test_fast_rings_leave_in_order_out(tmp_path: Path) -> None:
    """FastPair (pktgen, rr) gives buffers back by every used entry's id, so
    it does not take IN_ORDER, under which a device may batch them."""
    with serve(tmp_path, "loopback") as (sock,), VhostUserFrontend(sock, fast=True) as fe:
        assert not fe.features & NetFeature.IN_ORDER
        assert fe.features & NetFeature.EVENT_IDX


def _marked_pages(log: memoryview) -> set[int]:
    return {i * 8 + b for i, byte in enumerate(log) if byte for b in range(8) if byte >> b & 1}


def _pages(addr: int, length: int) -> set[int]:
    """The pages a mark of ``addr .. addr + length - 1`` sets: every page of
    each 8-page granule it touches (virtnet.dirty_log.MARK_GRANULE)."""
    first, last = addr >> 12, (addr + length - 1) >> 12
    return set(range(first & ~7, (last | 7) + 1))


@pytest.mark.parametrize("workers", [(), ("--workers", "1")], ids=["per-pair", "one-worker"])
def test_dirty_log_marks_every_page_the_workers_write(
    tmp_path: Path, workers: tuple[str, ...]
) -> None:
    """Migration as QEMU starts it (SET_LOG_BASE, LOG_ALL, SET_VRING_ADDR with
    VHOST_VRING_F_LOG): serve's forked workers (one per pair, or one for all
    four pairs) mark the page of every receive buffer they fill and every used
    ring they publish, and nothing else (at the granularity of a log byte,
    eight pages); after logging stops nothing more is marked."""
    pf = DEFAULT_PROTOCOL_FEATURES | ProtocolFeature.LOG_SHMFD.mask
    with (
        serve(tmp_path, "loopback", extra=workers) as (sock,),
        VhostUserFrontend(sock, queue_pairs=4, protocol_features=pf) as fe,
    ):
        assert fe.set_queue_pairs(4)
        assert not fetch(str(tmp_path / "stats.sock"))["vms"][0]["migrating"]
        log = fe.start_dirty_log()
        vm = fetch(str(tmp_path / "stats.sock"))["vms"][0]
        assert vm["migrating"] and vm["dirty_log_bytes"] == len(log)
        used_rings = {
            i: _pages(r.used, 6 + 8 * r.size) for i, r in fe.rings.items() if i < 2 * fe.max_pairs
        }
        # Restarted under the log, the workers write only ring flags so far.
        assert _marked_pages(log) <= set().union(*used_rings.values())
        frames = [build_frame(f, 0) for f in range(64)]
        assert fe.send(frames) == 64
        got = collect(fe, 64)
        assert len(got) == 64
        drv = fe.driver
        hl = drv.hdr_len
        echoed = {data for _, data in got}
        # Where the workers wrote: the receive buffers now holding an echo ...
        filled: set[int] = set()
        for q in drv.rxqs:
            for addr in q.bufs:
                for data in echoed:
                    if fe.mem is not None and fe.mem.read(addr + hl, len(data)) == data:
                        filled |= _pages(addr, hl + len(data))
        assert filled
        # ... and the used rings of the rings that carried frames.
        busy = {2 * p for p, _ in got} | {2 * p + 1 for p, _ in got}
        marked = _marked_pages(log)
        missing = filled - marked
        assert not missing, f"{len(missing)} written buffer pages not logged"
        for i in busy:
            assert used_rings[i] <= marked, f"used ring of ring {i} not logged"
        allowed = set().union(*used_rings.values()) | {
            pg for q in drv.rxqs for a in q.bufs for pg in _pages(a, drv.rx_buf_size)
        }
        assert marked <= allowed, (
            f"pages logged that no worker writes: {sorted(marked - allowed)[:8]}"
        )

        fe.stop_dirty_log()
        assert not fetch(str(tmp_path / "stats.sock"))["vms"][0]["migrating"]
        log[:] = bytes(len(log))
        assert fe.send(frames[:16]) == 16
        assert len(collect(fe, 16)) == 16
        assert not _marked_pages(log), "pages logged after VHOST_F_LOG_ALL was cleared"


def _worker_pid(stats: Path) -> int:
    pid: int = fetch(str(stats))["vms"][0]["pairs"][0]["pid"]
    return pid


def _socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets ``pid`` has open (``/proc/PID/fd``)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            link = os.readlink(fd)
            if link.startswith("socket:["):
                inodes.add(int(link[8:-1]))
    return inodes


def _peer_inode(inode: int) -> int:
    """The inode of the other end of the connected Unix socket ``inode`` (``ss -x``:
    netid state recv-q send-q local-address local-inode peer-address peer-inode)."""
    out = subprocess.run(["ss", "-xH"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        f = line.split()
        if len(f) >= 8 and f[7] == str(inode):
            return int(f[5])
    raise AssertionError(f"no socket connected to inode {inode} in:\n{out}")


def test_workers_hold_the_connection_so_a_killed_serve_closes_it_after_them(
    tmp_path: Path,
) -> None:
    """Every worker keeps serve's end of the frontend connection open: if serve
    is killed, the frontend sees the close only when no worker can move a
    ring any more (QEMU then takes the used indexes as the rings' bases)."""
    with (
        serve(tmp_path, "loopback", queues=2, extra=("--workers", "0")) as (sock,),
        VhostUserFrontend(sock, queue_pairs=2) as fe,
    ):
        assert fe.set_queue_pairs(2)

        def pairs_now() -> list[dict[str, int]]:
            pairs: list[dict[str, int]] = fetch(str(tmp_path / "stats.sock"))["vms"][0]["pairs"]
            return pairs

        # A worker's pid reaches the stats once it has started, a moment after
        # its pair was enabled.
        assert wait_for(lambda: all(p["pid"] for p in pairs_now()), timeout=10), pairs_now()
        pairs = pairs_now()
        assert fe._chan is not None
        theirs = _peer_inode(os.fstat(fe._chan.sock.fileno()).st_ino)
        for p in pairs:
            assert theirs in _socket_inodes(p["pid"]), p


def test_a_worker_that_ignores_a_log_address_is_restarted_with_it(tmp_path: Path) -> None:
    """A running ring's VHOST_VRING_F_LOG reaches its worker as a control
    message; a worker that does not answer (stopped here with SIGSTOP) is
    killed and started again with the log address, and frames flow, logged."""
    pf = DEFAULT_PROTOCOL_FEATURES | ProtocolFeature.LOG_SHMFD.mask
    with (
        serve(tmp_path, "loopback", queues=1) as (sock,),
        VhostUserFrontend(sock, queue_pairs=1, protocol_features=pf) as fe,
    ):
        stats = tmp_path / "stats.sock"
        log = fe.start_dirty_log()
        stuck = _worker_pid(stats)
        os.kill(stuck, signal.SIGSTOP)
        # QEMU re-sends a ring's address with the log flag (what start_dirty_log did).
        fe._call(Request.SET_VRING_ADDR, fe._ring_addr(fe.rings[0]))
        fresh = _worker_pid(stats)
        assert fresh != stuck
        log[:] = bytes(len(log))
        assert fe.send([build_frame(f, 0) for f in range(8)]) == 8
        assert len(collect(fe, 8)) == 8
        used_rx = _pages(fe.rings[0].used, 6 + 8 * fe.rings[0].size)
        assert used_rx <= _marked_pages(log), "the restarted worker does not log the rx used ring"
    text = (tmp_path / "serve-loopback.log").read_text()
    assert "did not take the log address" in text, text[-2000:]


def test_null_consumes_everything(tmp_path: Path) -> None:
    with serve(tmp_path, "null", queues=2) as (sock,), VhostUserFrontend(sock, queue_pairs=2) as fe:
        assert fe.set_queue_pairs(2)
        assert fe.send([build_frame(f, 0) for f in range(16)]) == 16
        assert collect(fe, 1, timeout=0.5) == []
        end = time.monotonic() + 5
        while time.monotonic() < end:
            reclaimed = sum(fe.driver.reclaim_tx(p) for p in range(2))
            if not any(q.vq.in_flight() for q in fe.driver.txqs):
                break
            del reclaimed
            time.sleep(0.02)
        assert not any(q.vq.in_flight() for q in fe.driver.txqs)  # all consumed


def _scrape(url: str) -> dict[tuple[str, str], float]:
    """``(metric, pair)`` -> value for VM vm0.sock's samples (and virtnet_up)."""
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.labels.get("vm", "vm0.sock") == "vm0.sock":
                out[(s.name, s.labels.get("pair", ""))] = s.value
    return out


def test_prometheus_exporter_scrapes_a_running_serve(tmp_path: Path) -> None:
    """``virtnet stats --prometheus``: the frames a frontend sent, per pair, on /metrics;
    virtnet_up 0 once serve is gone; SIGTERM ends the exporter cleanly."""
    stats = tmp_path / "stats.sock"
    with serve(tmp_path, "null", queues=2) as (sock,):
        exporter = subprocess.Popen(
            [sys.executable, "-m", "virtnet.cli", "stats", "--stats-socket", str(stats),
             "--prometheus", "127.0.0.1:0"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert exporter.stdout is not None
            line = exporter.stdout.readline()
            url = line.rsplit(" ", 1)[-1].strip()
            assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics"), line
            with VhostUserFrontend(sock, queue_pairs=2) as fe:
                assert fe.set_queue_pairs(2)
                frames = [build_frame(f, 0) for f in range(16)]
                per_pair = [0, 0]
                for fr in frames:
                    per_pair[fe.driver.select_queue(fr)] += 1
                assert fe.send(frames) == 16
                end = time.monotonic() + 10
                while True:
                    got = _scrape(url)
                    sent = [got.get(("virtnet_tx_packets_total", str(p)), 0) for p in (0, 1)]
                    if sent == per_pair or time.monotonic() > end:
                        break
                    time.sleep(0.1)
                assert sent == per_pair
                assert got[("virtnet_up", "")] == 1
                assert got[("virtnet_vm_connected", "")] == 1
                assert got[("virtnet_pair_enabled", "0")] == got[("virtnet_pair_enabled", "1")] == 1
                assert got[("virtnet_tx_bytes_total", "0")] > 0
        except BaseException:
            stop_process(exporter)
            raise
    try:
        assert _scrape(url) == {("virtnet_up", ""): 0}  # serve stopped: a failed scrape
    finally:
        exporter.send_signal(signal.SIGTERM)
        assert exporter.wait(timeout=10) == 0
        assert exporter.stderr is not None
        assert "scrape failed" in exporter.stderr.read()


def _to(dst: bytes, src: bytes, flow: int) -> bytes:
    f = build_frame(flow, 0)
    return dst + src + f[12:]


def tap_both_ways(fe: VhostUserFrontend, ifname: str, n: int = 10) -> None:
    """Frames ``fe`` sends arrive on tap ``ifname`` (its rx counter), and
    frames sent out of the tap reach ``fe``."""
    rx = Path(f"/sys/class/net/{ifname}/statistics/rx_packets")
    rx0 = int(rx.read_text())
    assert fe.send([_to(b"\xff" * 6, DEFAULT_MAC, f) for f in range(n)]) == n
    end = time.monotonic() + 5
    while int(rx.read_text()) < rx0 + n and time.monotonic() < end:
        time.sleep(0.02)
    assert int(rx.read_text()) >= rx0 + n
    frames = [_to(DEFAULT_MAC, MAC_B, f) for f in range(n)]
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as raw:
        raw.bind((ifname, 0))
        for fr in frames:
            raw.send(fr)
    got = [d for _, d in collect(fe, n)]
    assert all(fr in got for fr in frames)


def test_switch_connects_two_vms(tmp_path: Path) -> None:
    with (
        serve(tmp_path, "switch", vms=2, queues=2) as (sa, sb),
        VhostUserFrontend(sa, queue_pairs=2, mac=MAC_A) as a,
        VhostUserFrontend(sb, queue_pairs=2, mac=MAC_B) as b,
    ):
        # Broadcast from B: A receives it, and the switch learns B's MAC.
        assert b.send([_to(b"\xff" * 6, MAC_B, 1)]) == 1
        got_a = collect(a, 1)
        assert len(got_a) == 1 and got_a[0][1][6:12] == MAC_B
        # Unicast A -> B on several flows.
        frames = [_to(MAC_B, MAC_A, f) for f in range(8)]
        assert a.send(frames) == 8
        got_b = collect(b, 8)
        assert sorted(d for _, d in got_b) == sorted(frames)


def test_pktgen_and_rr_against_loopback(tmp_path: Path) -> None:
    with serve(tmp_path, "loopback", queues=2) as (sock,):
        res = run_pktgen(str(sock), queues=2, seconds=1.5, queue_size=256, flows=4)
        assert not res.failed_pairs
        for q in res.queues:
            assert q.tx_packets > 0 and 0 < q.rx_packets <= q.tx_packets
        rr = run_rr(str(sock), queues=2, sessions=20, seconds=1.5, queue_size=256)
        assert not rr.failed_pairs and rr.transactions > 0
        assert all(p.stale == 0 for p in rr.pairs)


def test_queue_change_under_load_against_loopback(tmp_path: Path) -> None:
    with serve(tmp_path, "loopback", queues=4) as (sock,):
        res = run_pktgen(
            str(sock), queues=4, seconds=2.5, queue_size=256, flows=8,
            schedule=[(0.6, 1), (1.2, 3), (1.8, 4)],
        )  # fmt: skip
    assert not res.failed_pairs
    assert [ok for _, _, ok in res.switches] == [True, True, True]
    assert all(q.tx_packets > 0 for q in res.queues)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_reconnect_after_serve_restarts(tmp_path: Path, packed: bool) -> None:
    """The new serve takes up each ring where the old one had used buffers to
    (packed: the used position the driver walks off the ring)."""
    fe = VhostUserFrontend(tmp_path / "vm0.sock", queue_pairs=2, timeout=10.0, packed=packed)
    try:
        with serve(tmp_path, "loopback", queues=2):
            fe.open()
            assert fe.set_queue_pairs(2)
            assert fe.send([build_frame(f, 1) for f in range(8)]) == 8
            assert len(collect(fe, 8)) == 8
        # The daemon is gone; a new one comes up on the same socket.
        with serve(tmp_path, "loopback", queues=2):
            end = time.monotonic() + 15
            while fe.stats.reconnects == 0 and time.monotonic() < end:
                fe.check_connection()
                time.sleep(0.05)
            assert fe.stats.reconnects == 1 and fe.curr_pairs == 2
            frames = [build_frame(f, 9) for f in range(8)]
            assert fe.send(frames) == 8
            assert sorted(d[12:] for _, d in collect(fe, 8)) == sorted(f[12:] for f in frames)
    finally:
        fe.close()


def test_pktgen_survives_a_daemon_restart(tmp_path: Path) -> None:
    """The forked pair processes keep their rings; the parent reconnects under them."""
    sock = tmp_path / "vm0.sock"
    marks: list[tuple[float, int, int]] = []  # (elapsed, reconnects so far, tx packets)
    fe = VhostUserFrontend(sock, queue_pairs=2, queue_size=256, timeout=10.0, fast=True)
    stop_first = threading.Event()

    def progress(elapsed: float, counters: list[PairCounters]) -> None:
        marks.append((elapsed, fe.stats.reconnects, sum(c.tx_packets for c in counters)))
        if elapsed > 1.0:
            stop_first.set()

    try:
        with serve(tmp_path, "loopback", queues=2):
            fe.open()
            box: list[PktgenResult] = []
            runner = threading.Thread(
                target=lambda: box.append(
                    run_pktgen(str(sock), queues=2, seconds=5.0, frontend=fe, progress=progress)
                )
            )
            runner.start()
            assert stop_first.wait(20)
        # First daemon gone (SIGTERM); a new one on the same socket.
        with serve(tmp_path, "loopback", queues=2):
            runner.join(30)
        assert box, "pktgen did not finish"
        res = box[0]
        assert res.reconnects == 1 and not res.failed_pairs
        before = max(tx for _, rc, tx in marks if rc == 0)
        after = max(tx for _, rc, tx in marks if rc == 1)
        assert after > before  # traffic flowed again after the reconnect
    finally:
        fe.close()


@pytest.mark.root
@pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun"), reason="needs root and /dev/net/tun"
)
def test_tap_port_both_directions(tmp_path: Path) -> None:
    ifname = f"vnfe{os.getpid() % 100000}"
    create_tap(ifname)
    try:
        subprocess.run(["ip", "link", "set", "dev", ifname, "up"], check=True)
        with (
            serve(tmp_path, f"tap:{ifname}", queues=2) as (sock,),
            VhostUserFrontend(sock, queue_pairs=2) as fe,
        ):
            assert fe.set_queue_pairs(2)
            tap_both_ways(fe, ifname, 20)
    finally:
        delete_link(ifname)


@pytest.mark.root
@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv"
)
def test_tap_port_served_by_an_unprivileged_user(tmp_path: Path) -> None:
    """serve needs no root for a tap that exists and belongs to its user
    (``ip tuntap add ... user nobody``): run as ``nobody`` it attaches its
    queues, sets the offloads, and frames cross both ways."""
    ifname = f"vnnp{os.getpid() % 100000}"
    pkg = Path(tempfile.mkdtemp(prefix="vnpkg-"))  # the code, where nobody can read it
    shutil.copytree(Path(virtnet.__file__).parent, pkg / "virtnet")
    os.chmod(pkg, 0o755)
    work = Path(tempfile.mkdtemp(prefix="vnnobody-"))
    os.chmod(work, 0o777)
    nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    env = dict(os.environ, PYTHONPATH=str(pkg))
    probe = subprocess.run([*nobody, sys.executable, "-c", "import virtnet"], env=env,
                           capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
    if probe.returncode != 0:
        pytest.skip(f"nobody cannot run {sys.executable}: {probe.stderr[-300:]}")
    subprocess.run(["ip", "tuntap", "add", "dev", ifname, "mode", "tap", "multi_queue",
                    "vnet_hdr", "user", "nobody"], check=True, timeout=30)  # fmt: skip
    sock = work / "vm.sock"
    log = (tmp_path / "serve.log").open("ab")
    proc = subprocess.Popen(
        [*nobody, sys.executable, "-m", "virtnet.cli", "serve", "--port", f"tap:{ifname}",
         "--queues", "2", "--socket", str(sock)],
        env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        subprocess.run(["ip", "link", "set", "dev", ifname, "up"], check=True, timeout=30)
        end = time.monotonic() + 20
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < end, (
                tmp_path / "serve.log"
            ).read_text()
            time.sleep(0.05)
        assert os.stat(sock).st_uid == pwd.getpwnam("nobody").pw_uid
        with VhostUserFrontend(sock, queue_pairs=2) as fe:
            assert fe.set_queue_pairs(2)
            tap_both_ways(fe, ifname)
    finally:
        stop_process(proc)
        log.close()
        delete_link(ifname)
        shutil.rmtree(pkg, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    text = (tmp_path / "serve.log").read_text()
    assert "ERROR" not in text, text
