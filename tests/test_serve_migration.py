"""Live migration of a running guest between two QEMU 10 processes on one serve.

``virtnet serve --socket A --socket B --port tap:T%d`` gives each VM its own
multiqueue tap; both taps sit in a Linux bridge (10.79.0.1/24) in a network
namespace, as libvirt bridges its guests.  The source guest boots on A; a
second QEMU waits on B with ``-incoming``.  QMP ``migrate`` moves the guest
while a TCP stream of 24 MiB of known bytes flows from the host into it.

What it shows:

* QEMU's migration is not blocked ("vhost lacks VHOST_F_LOG_ALL"): serve
  offers VHOST_F_LOG_ALL and LOG_SHMFD, takes the dirty log (SET_LOG_BASE)
  and restarts its workers with logging on (serve's log says so).
* With both guests paused after the migration (the destination runs ``-S``),
  the destination's memory equals the source's page for page, and the bytes
  the guest received are the bytes sent (md5 in the guest; the tap hands it
  checksum-offloaded segments, which it does not re-checksum).
* The TCP connection and the guest's network survive: the guest announces
  itself (GUEST_ANNOUNCE), the destination's rings start where the source's
  stopped, and ping and iperf3 work on the destination.

What it cannot show: that every page serve writes is logged.  With the
workers' marking switched off this test still passed (twice, with a UDP
flood running through the migration): the guest's own CPU writes most
receive pages again (headers, GRO) and the window between the last log sync
and the stop is short.  ``test_frontend_serve.py::test_dirty_log_marks_every_
page_the_workers_write`` proves the marking, page by page, against serve's
forked workers; it fails when either buffer or used-ring marking is removed.
"""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from virtnet.testing.guest import Guest, queue_deltas, vhost_user_netdev_args, wait_for
from virtnet.testing.netns import NetNS, unique_name
from virtnet.testing.procs import stop_process
from virtnet.testing.serve import start_bridged_serve
from virtnet.vhost_user.stats import fetch

pytestmark = [pytest.mark.vm, pytest.mark.root, pytest.mark.timeout(600)]

QUEUES = 2
HOST_IP = "10.79.0.1"
GUEST_IP = "10.79.0.2"
PORT = 5001
STREAM_BYTES = 24 << 20
STREAM_SECONDS = 8.0
MIGRATE_TIMEOUT = 120.0

# Paced sender: connect (retrying until the guest listens), send the file in
# 256 KiB pieces spread over the given seconds, close.
SENDER = """
import socket, sys, time
host, port, path, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
data = open(path, "rb").read()
deadline = time.monotonic() + 30
while True:
    try:
        s = socket.create_connection((host, port), timeout=5)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.2)
s.settimeout(120)
piece = 256 << 10
step = seconds * piece / len(data)
t0 = time.monotonic()
for k, off in enumerate(range(0, len(data), piece)):
    s.sendall(data[off:off + piece])
    time.sleep(max(0.0, t0 + (k + 1) * step - time.monotonic()))
s.close()
"""

# UDP datagrams to a closed port of the guest, each with its own sequence
# number, as fast as Python sends them: frames keep arriving while the source
# stops, so serve writes guest pages right up to the end of the migration.
BLASTER = """
import socket, struct, sys, time
host, seconds = sys.argv[1], float(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
pad = bytes(range(256)) * 5
end = time.monotonic() + seconds
n = 0
while time.monotonic() < end:
    for _ in range(64):
        n += 1
        try:
            s.sendto(struct.pack("=Q", n) + pad, (host, 9))
        except OSError:
            pass
"""


def _differing_pages(src: Guest, dst: Guest, tmp: Path) -> list[int]:
    """Guest-physical pages whose bytes differ between two paused guests."""
    size = src.memory_mb << 20
    a, b = tmp / "src.mem", tmp / "dst.mem"
    src.qmp("pmemsave", {"val": 0, "size": size, "filename": str(a)}, timeout=120)
    dst.qmp("pmemsave", {"val": 0, "size": size, "filename": str(b)}, timeout=120)
    try:
        ma, mb = a.read_bytes(), b.read_bytes()
    finally:
        a.unlink()
        b.unlink()
    assert len(ma) == len(mb) == size
    step = 4096
    return [i // step for i in range(0, size, step) if ma[i : i + step] != mb[i : i + step]]


@pytest.mark.parametrize("ring", ["split", "packed"])
def test_live_migration_keeps_the_guest_and_its_bytes(
    guest_initramfs: Path, tmp_path: Path, ring: str
) -> None:
    """``packed``: the NIC has packed virtqueues (``packed=on``): the rings'
    32-bit bases cross the migration and the dirty log covers the slots the
    workers write in the descriptor ring."""
    extra = "packed=on" if ring == "packed" else ""
    data = random.Random(2014).randbytes(STREAM_BYTES)
    blob = tmp_path / "stream.bin"
    blob.write_bytes(data)
    want = hashlib.md5(data).hexdigest()
    src_sock, dst_sock = tmp_path / "a.sock", tmp_path / "b.sock"
    stats, log, mig = tmp_path / "stats.sock", tmp_path / "serve.log", tmp_path / "mig.sock"
    log.write_text("")
    tap = unique_name("vnm")
    with NetNS() as ns:
        serve = start_bridged_serve(
            ns, tap, (src_sock, dst_sock), stats, log, queues=QUEUES, host_cidr=f"{HOST_IP}/24"
        )
        sender: subprocess.Popen[str] | None = None
        blaster: subprocess.Popen[str] | None = None
        try:
            with Guest(
                vhost_user_netdev_args(
                    src_sock, queues=QUEUES, reconnect_ms=500, device_extra=extra
                ),
                initramfs=guest_initramfs,
                ip=f"{GUEST_IP}/24",
            ) as src:
                src.set_channels(QUEUES)
                assert src.ping(HOST_IP, count=2), src.console_tail()
                src.run(f"(nc -l -p {PORT} | md5sum > /tmp/rx.md5) >/dev/null 2>&1 &")
                with Guest(
                    vhost_user_netdev_args(
                        dst_sock, queues=QUEUES, reconnect_ms=500, device_extra=extra
                    ),
                    initramfs=guest_initramfs,
                    ip=f"{GUEST_IP}/24",
                    incoming=f"unix:{mig}",
                    extra_args=["-S"],  # stays paused after the migration: compare memory first
                ) as dst:
                    sender = ns.popen(
                        [sys.executable, "-c", SENDER, GUEST_IP, str(PORT), str(blob),
                         str(STREAM_SECONDS)],
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    )  # fmt: skip
                    blaster = ns.popen(
                        [sys.executable, "-c", BLASTER, GUEST_IP, str(MIGRATE_TIMEOUT)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    )  # fmt: skip
                    time.sleep(STREAM_SECONDS / 4)  # the stream is flowing
                    t0 = time.monotonic()
                    st = src.migrate(f"unix:{mig}", timeout=MIGRATE_TIMEOUT)
                    took = time.monotonic() - t0
                    stop_process(blaster)
                    assert st.get("status") == "completed", st
                    ram = st.get("ram")
                    print(f"migration: {took:.2f} s, {ram}")
                    # Both sides paused: the destination's memory must be the
                    # source's, page for page.
                    diff = _differing_pages(src, dst, tmp_path)
                    assert not diff, (
                        f"{len(diff)} pages differ after the migration, first at "
                        + ", ".join(f"0x{p * 4096:x}" for p in diff[:8])
                    )
                    dst.qmp("cont")
                    assert dst.qmp("query-status") == {"status": "running", "running": True}

                    # The stream ends on the destination, intact.
                    out, _ = sender.communicate(timeout=120)
                    assert sender.returncode == 0, out
                    assert wait_for(lambda: " " in dst.run("cat /tmp/rx.md5").output, timeout=60), (
                        dst.run("cat /tmp/rx.md5; ps").output
                    )
                    got = dst.run("cat /tmp/rx.md5").output.split()[0]
                    assert got == want, "bytes changed across the migration"

                    # The guest lives on: channels, ping, iperf3 on the destination.
                    assert dst.channels().combined == QUEUES
                    assert dst.ping(HOST_IP, count=3), dst.console_tail()
                    before = dst.ethtool_stats()
                    with ns.iperf3_server():
                        for reverse in ("", " -R"):
                            out = dst.iperf3(f"-c {HOST_IP} -P 4 -t 2 -i 0{reverse}")
                            assert "receiver" in out, out
                    after = dst.ethtool_stats()
                    assert sum(queue_deltas(before, after, "rx").values()) > 0
                    assert sum(queue_deltas(before, after, "tx").values()) > 0
                    # ... through the destination's socket of serve.
                    vms = {vm["socket"]: vm for vm in fetch(str(stats))["vms"]}
                    pairs = vms[str(dst_sock)]["pairs"]
                    assert sum(p["rx_packets"] for p in pairs) > 0, pairs
                    assert sum(p["tx_packets"] for p in pairs) > 0, pairs
                    assert all(p["errors"] == 0 for p in pairs), pairs
            text = log.read_text()
            assert "dirty log of" in text and "dirty page logging on" in text, text[-4000:]
            assert "LOG_ALL" in text
            assert ("RING_PACKED" in text) is (ring == "packed")
            # The destination's rings started where the source's stopped: no
            # base had to be read off a ring.
            assert "does not match the ring" not in text
        finally:
            for p in (sender, blaster):
                if p is not None and p.poll() is None:
                    p.kill()
            stop_process(serve)
            print(log.read_text()[-6000:])
