"""Start ``virtnet serve`` for a test or a benchmark, inside a network namespace,
and the checks the real-guest tests share."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from virtnet.testing.guest import Guest, queue_deltas, vhost_user_netdev_args, wait_for
from virtnet.testing.netns import NetNS, unique_name
from virtnet.testing.procs import stop_process
from virtnet.vhost_user.stats import fetch

#: How long serve may take to put up its stats socket.
SERVE_START_TIMEOUT = 20.0


class ServeStartError(RuntimeError):
    """``virtnet serve`` exited or did not come up."""


def start_serve(
    ns: NetNS, args: Sequence[str], *, stats: Path, log: Path, verbose: bool = True
) -> subprocess.Popen[str]:
    """``virtnet [-v] serve ARGS --stats-socket STATS`` in ``ns``, output appended to
    ``log``; returns once the stats socket exists (serve is serving)."""
    argv = [sys.executable, "-m", "virtnet.cli", *(["-v"] if verbose else []), "serve",
            *args, "--stats-socket", str(stats)]  # fmt: skip
    with log.open("a") as out:
        proc = ns.popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if not wait_for(lambda: stats.exists() or proc.poll() is not None, timeout=SERVE_START_TIMEOUT):
        proc.kill()
        raise ServeStartError(f"virtnet serve did not start in {SERVE_START_TIMEOUT:.0f} s")
    if proc.poll() is not None:
        tail = log.read_text()[-3000:]
        raise ServeStartError(f"virtnet serve exited ({proc.returncode}):\n{tail}")
    return proc


def start_tap_serve(
    ns: NetNS,
    tap: str,
    sock: Path,
    stats: Path,
    log: Path,
    *,
    queues: int,
    args: Sequence[str] = (),
) -> subprocess.Popen[str]:
    """``virtnet -v serve --socket SOCK --port tap:TAP --queues N ARGS`` in ``ns``."""
    serve_args = ["--socket", str(sock), "--port", f"tap:{tap}", "--queues", str(queues), *args]
    return start_serve(ns, serve_args, stats=stats, log=log)


def start_bridged_serve(
    ns: NetNS,
    tap: str,
    socks: Sequence[Path],
    stats: Path,
    log: Path,
    *,
    queues: int,
    host_cidr: str,
    verbose: bool = True,
) -> subprocess.Popen[str]:
    """One ``virtnet serve`` for several VM sockets (``--port tap:TAP%d``: VM i
    gets tap ``TAPi``), the taps in a bridge ``br0`` holding ``host_cidr`` in
    ``ns``, as libvirt bridges guests: a guest can migrate from one socket to
    another and stay on the same network."""
    ns.add_bridge("br0", host_cidr)
    for i in range(len(socks)):
        ns.create_tap(f"{tap}{i}")
        ns.enslave(f"{tap}{i}", "br0")
    args = [a for s in socks for a in ("--socket", str(s))]
    args += ["--port", f"tap:{tap}%d", "--queues", str(queues)]
    return start_serve(ns, args, stats=stats, log=log, verbose=verbose)


@dataclass
class ServedGuest:
    """A test guest on ``virtnet serve --port tap:TAP`` running in ``ns``."""

    guest: Guest
    ns: NetNS
    tap: str
    sock: Path
    stats: Path
    log: Path
    serve: subprocess.Popen[str]
    queues: int
    #: serve's options beyond socket, port and queues (kept for a restart).
    serve_args: Sequence[str] = field(default=(), kw_only=True)

    def start_serve(self, *args: str) -> None:
        """Start serve again (after :meth:`kill_serve`) with the same socket,
        tap and options, and ``args``."""
        self.serve = start_tap_serve(
            self.ns,
            self.tap,
            self.sock,
            self.stats,
            self.log,
            queues=self.queues,
            args=(*self.serve_args, *args),
        )

    def kill_serve(self) -> None:
        """SIGKILL serve; its workers die with it."""
        self.serve.kill()
        self.serve.wait()

    def pairs(self) -> list[dict[str, int]]:
        """serve's per-pair counters of the (one) VM."""
        pairs: list[dict[str, int]] = fetch(str(self.stats))["vms"][0]["pairs"]
        return pairs

    def enabled_is(self, n: int) -> bool:
        """Exactly the first ``n`` pairs are enabled."""
        return first_enabled(self.pairs(), n)


def first_enabled(pairs: Sequence[Mapping[str, int]], n: int) -> bool:
    """Exactly the first ``n`` of serve's ``pairs`` (one VM's stats rows) are enabled."""
    return [p["enabled"] for p in pairs] == [1] * n + [0] * (len(pairs) - n)


def reload_virtio_net(g: Guest, cidr: str) -> None:
    """rmmod/insmod the guest's virtio_net (a device reset: QEMU stops every
    ring and starts fresh ones), then give eth0 ``cidr`` again and bring it up."""
    g.run(
        "m=$(grep -x 'virtio_net.ko.*' /etc/virtnet/modules) && rmmod virtio_net"
        " && insmod /lib/modules/$m"
        f" && sleep 1 && ip addr add {cidr} dev eth0 && ip link set eth0 up",
        timeout=60,
    )


@contextlib.contextmanager
def guest_on_tap(
    workdir: Path,
    initramfs: Path,
    *,
    queues: int,
    host_cidr: str,
    guest_cidr: str,
    device_extra: str = "",
    serve_creates_tap: bool = False,
    extra_args: Sequence[str] = (),
    cmdline_extra: str = "",
    serve_args: Sequence[str] = (),
) -> Iterator[ServedGuest]:
    """A guest on ``virtnet serve --port tap:T`` in a fresh namespace.  The
    tap is persistent and has ``host_cidr`` before serve starts (it then
    outlives a serve that is killed), unless ``serve_creates_tap``: then
    serve creates it and it gets ``host_cidr`` once it exists.
    ``device_extra``, ``extra_args`` and ``cmdline_extra`` go to the guest's
    NIC, QEMU and the kernel, ``serve_args`` to serve.  serve's files go in ``workdir``; serve is
    stopped at the end and its log's tail printed."""
    tap = unique_name("vntap")
    with NetNS() as ns:
        if not serve_creates_tap:
            ns.create_tap(tap)
            ns.set_address(tap, host_cidr)
        sock, stats, log = workdir / "vm.sock", workdir / "stats.sock", workdir / "serve.log"
        serve = start_tap_serve(ns, tap, sock, stats, log, queues=queues, args=serve_args)
        s: ServedGuest | None = None
        try:
            with Guest(
                vhost_user_netdev_args(
                    sock, queues=queues, reconnect_ms=500, device_extra=device_extra
                ),
                initramfs=initramfs,
                ip=guest_cidr,
                extra_args=extra_args,
                cmdline_extra=cmdline_extra,
            ) as guest:
                s = ServedGuest(
                    guest, ns, tap, sock, stats, log, serve, queues, serve_args=serve_args
                )
                if serve_creates_tap:
                    ns.wait_link(tap)
                    ns.set_address(tap, host_cidr)
                yield s
        finally:
            stop_process(s.serve if s is not None else serve)
            print(log.read_text()[-6000:])


def check_serve_restart(sg: ServedGuest, host_ip: str, *, pairs: int = 2) -> None:
    """Kill serve while ``sg.guest`` runs with ``pairs`` pairs, start it again: the
    guest reaches ``host_ip`` again without a reboot (QEMU reconnects), serve
    re-enables the pairs and iperf3 runs.  AssertionError says which step failed."""
    g = sg.guest
    g.set_channels(pairs)
    if not g.ping(host_ip, count=1):
        raise AssertionError(f"no ping before the restart\n{g.console_tail()}")
    sg.kill_serve()
    time.sleep(1.0)
    if g.ping(host_ip, count=1, timeout=4):
        raise AssertionError("ping answered while serve was down")
    sg.start_serve()
    if not wait_for(lambda: g.ping(host_ip, count=1, timeout=4), timeout=60):
        raise AssertionError(f"no ping after the restart\n{sg.log.read_text()[-3000:]}")
    if not wait_for(lambda: sum(p["enabled"] for p in sg.pairs()) == pairs, timeout=10):
        raise AssertionError(f"serve did not re-enable {pairs} pairs: {sg.pairs()}")
    with sg.ns.iperf3_server():
        out = g.iperf3(f"-c {host_ip} -P {pairs} -t 2 -i 0")
    if "receiver" not in out:
        raise AssertionError(f"iperf3 after the restart:\n{out}")
    if not g.running:
        raise AssertionError("the guest stopped")


def check_driver_reload(sg: ServedGuest, host_ip: str, guest_cidr: str) -> None:
    """rmmod/insmod virtio_net in ``sg.guest``: QEMU stops every ring
    (GET_VRING_BASE), resets the device and starts fresh rings; the guest
    reaches ``host_ip`` again with its address ``guest_cidr`` set anew, every
    pair is enabled again and iperf3 into the guest runs with no error
    counted.  AssertionError says which step failed."""
    g = sg.guest
    reload_virtio_net(g, guest_cidr)
    if not wait_for(lambda: g.ping(host_ip, count=1, timeout=4), timeout=40):
        raise AssertionError(f"no ping after the reload\n{sg.log.read_text()[-3000:]}")
    g.set_channels(sg.queues)
    with sg.ns.iperf3_server():
        out = g.iperf3(f"-c {host_ip} -P 4 -t 2 -i 0 -R")
    if "receiver" not in out:
        raise AssertionError(f"iperf3 after the reload:\n{out}")
    if not all(p["errors"] == 0 for p in sg.pairs()):
        raise AssertionError(f"errors after the reload: {sg.pairs()}")


def iperf_until_every_queue_moved(
    g: Guest,
    ns: NetNS,
    server_ip: str,
    queues: int,
    *,
    streams: Sequence[int] = (4, 8, 8),
    seconds: int = 2,
) -> tuple[dict[int, int], dict[int, int]]:
    """iperf3 TCP from ``g`` to an iperf3 server in ``ns`` at ``server_ip``
    and back, ``streams[i]`` streams in round ``i``, until every rx and tx
    queue below ``queues`` moved packets (flows land on queues by hash, so a
    few rounds may be needed); the guest's per-queue packet deltas (rx, tx).
    AssertionError when an iperf3 run fails."""
    before = g.ethtool_stats()
    rx: dict[int, int] = {}
    tx: dict[int, int] = {}
    with ns.iperf3_server():
        for n in streams:
            for reverse in ("", " -R"):
                out = g.iperf3(f"-c {server_ip} -P {n} -t {seconds} -i 0{reverse}")
                if "receiver" not in out:
                    raise AssertionError(f"iperf3 -P {n}{reverse} failed:\n{out}")
            after = g.ethtool_stats()
            rx, tx = queue_deltas(before, after, "rx"), queue_deltas(before, after, "tx")
            if all(rx.get(q, 0) > 0 and tx.get(q, 0) > 0 for q in range(queues)):
                break
    return rx, tx
