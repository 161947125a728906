"""vhost-user negotiation against a real QEMU 10 (no data path yet).

Boots the host's Debian cloud kernel + its initramfs under TCG with a
4-queue-pair ``virtio-net-pci`` on ``-netdev vhost-user``; udev in the
initramfs loads ``virtio_net``, whose probe sets DRIVER_OK, which makes QEMU
send the memory table and start every ring.  We only check the control
plane: every request answered, all 8 rings started with translated
addresses, and -- in listen mode -- that QEMU reconnects and restarts the
rings after we drop the connection.  QEMU is killed as soon as that is seen.
"""

from __future__ import annotations

import glob
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from virtnet.vhost_user.backend import Backend, BackendConfig, NullEvents, RegionInfo, RingConfig
from virtnet.vhost_user.server import Endpoint, Server

pytestmark = pytest.mark.vm

PAIRS = 4
KERNELS = sorted(glob.glob("/boot/vmlinuz-*-cloud-amd64"))
QEMU = shutil.which("qemu-system-x86_64")

if not KERNELS or not QEMU:
    pytest.skip("needs qemu-system-x86_64 and a Debian cloud kernel", allow_module_level=True)
KERNEL = KERNELS[-1]
INITRD = KERNEL.replace("vmlinuz", "initrd.img")


class Watch(NullEvents):
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started: dict[int, RingConfig] = {}
        self.starts = 0
        self.mem_tables = 0

    def on_mem_table(self, regions: tuple[RegionInfo, ...]) -> None:
        with self.lock:
            self.mem_tables += 1

    def on_ring_start(self, index: int, config: RingConfig) -> None:
        with self.lock:
            self.started[index] = config
            self.starts += 1

    def on_ring_stop(self, index: int) -> int | None:
        with self.lock:
            self.started.pop(index, None)
        return None


def _wait(cond: Callable[[], bool], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.1)
    return False


def _qemu(chardev: str, tmp: Path) -> subprocess.Popen[bytes]:
    assert QEMU is not None
    cmd = [
        QEMU,
        "-accel", "tcg", "-m", "256", "-smp", "1",
        "-object", "memory-backend-memfd,id=mem,size=256M,share=on",
        "-numa", "node,memdev=mem",
        "-chardev", chardev,
        "-netdev", f"vhost-user,id=n0,chardev=c0,queues={PAIRS}",
        "-device", f"virtio-net-pci,netdev=n0,mq=on,vectors={2 * PAIRS + 2}",
        "-kernel", KERNEL, "-initrd", INITRD,
        "-append", "console=ttyS0 panic=-1 root=/dev/nonexistent rootdelay=30 quiet",
        "-nographic", "-no-reboot",
    ]  # fmt: skip
    log = (tmp / "qemu.log").open("wb")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _factory(watches: list[Watch]) -> Callable[[], Backend]:
    def make() -> Backend:
        w = Watch()
        watches.append(w)
        return Backend(w, BackendConfig(max_queue_pairs=PAIRS))

    return make


def _serve_in_thread(srv: Server, stop: threading.Event) -> threading.Thread:
    def run() -> None:
        while not stop.is_set():
            srv.run_once(0.05)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _all_started(watches: list[Watch]) -> bool:
    return bool(watches) and len(watches[-1].started) == 2 * PAIRS


def test_qemu_listen_mode_negotiates_starts_rings_and_reconnects(tmp_path: Path) -> None:
    sock = str(tmp_path / "vm.sock")
    srv = Server()
    watches: list[Watch] = []
    ep: Endpoint = srv.add_listener(sock, _factory(watches), name="vm")
    stop = threading.Event()
    thread = _serve_in_thread(srv, stop)
    qemu = _qemu(f"socket,id=c0,path={sock},reconnect-ms=500", tmp_path)
    try:
        assert _wait(lambda: _all_started(watches), 90), (tmp_path / "qemu.log").read_text()
        first = watches[-1]
        assert first.mem_tables >= 1 and ep.errors == 0
        cfg = first.started[1]
        assert cfg.size > 0 and cfg.desc_addr % 16 == 0 and cfg.kick_fd is not None
        # Drop the connection: QEMU reconnects and restarts every ring.
        stop.set()
        thread.join()
        srv.disconnect(ep)
        stop.clear()
        thread = _serve_in_thread(srv, stop)
        assert _wait(lambda: len(watches) >= 2 and _all_started(watches), 30)
        assert ep.connections == 2 and ep.errors == 0
    finally:
        qemu.kill()
        qemu.wait()
        stop.set()
        thread.join()
        srv.close()


def test_qemu_server_mode_we_dial(tmp_path: Path) -> None:
    sock = str(tmp_path / "qemu.sock")
    srv = Server()
    watches: list[Watch] = []
    qemu = _qemu(f"socket,id=c0,path={sock},server=on,wait=off", tmp_path)
    stop = threading.Event()
    thread: threading.Thread | None = None
    try:
        ep = srv.add_client(sock, _factory(watches), name="vm", retry_interval=0.2)
        thread = _serve_in_thread(srv, stop)
        assert _wait(lambda: _all_started(watches), 90), (tmp_path / "qemu.log").read_text()
        assert ep.errors == 0
    finally:
        qemu.kill()
        qemu.wait()
        stop.set()
        if thread is not None:
            thread.join()
        srv.close()
