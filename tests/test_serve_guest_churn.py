"""Running guests put through a random series of disruptions, under traffic.

Every other real-guest test checks one disruption on its own.  A user's VM
meets them mixed: the guest changes its queue count while a worker is being
restarted, serve is restarted right after the driver was reloaded, and so on.
Two set-ups, each with 4-pair NICs:

* one guest on ``virtnet serve --port tap`` (split rings; packed rings; split
  rings with every pair in one worker process), its traffic going to the
  host end of the tap;
* two guests on ``--port switch``, talking to each other through the switch
  process.

Each takes :data:`STEPS` steps drawn from a seeded random generator; a step
starts TCP traffic in a guest and, mid-transfer, does one of:

* ``channels``: ``ethtool -L eth0 combined N`` in a guest, N drawn from 1-4;
* ``kill_worker``: SIGKILL one enabled pair's worker (serve restarts it from
  the ring positions it published);
* ``restart_serve``: SIGKILL serve and start it again (QEMU reconnects; not
  on packed rings, see :meth:`Churn.step`);
* ``reload_driver``: rmmod/insmod a guest's virtio_net;
* ``channels_vs_worker``, ``channels_vs_serve``: ``ethtool -L`` and, while
  QEMU and serve carry it out, a worker or serve killed;
* ``kill_switch`` (switch only): SIGKILL the switch process (serve starts
  another and hands it the running pairs' queues).

After every step: each guest reaches its peer, serve enables exactly the pairs
each guest uses, no pair counts an error, and a fresh iperf3 run in each
direction completes.  At the end: serve's log holds no traceback and no
guest's console a virtio complaint.  The seed is in the test id;
``VIRTNET_CHURN_SEED=N`` runs another series, ``VIRTNET_CHURN_OPS=a,b``
draws from those disruptions only (serve kills on packed rings included) and
``VIRTNET_CHURN_STEPS=N`` takes N steps.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from virtnet.testing.guest import Guest, vhost_user_netdev_args, wait_for
from virtnet.testing.netns import NetNS
from virtnet.testing.procs import stop_process
from virtnet.testing.serve import first_enabled, guest_on_tap, reload_virtio_net, start_serve
from virtnet.vhost_user.stats import fetch

pytestmark = [pytest.mark.vm, pytest.mark.root, pytest.mark.timeout(900)]

QUEUES = 4
STEPS = 14
HOST_IP = "10.81.0.1"
GUEST_CIDR = "10.81.0.2/24"
SWITCH_CIDRS = ("10.82.0.2/24", "10.82.0.3/24")
SWITCH_MACS = ("52:54:00:82:00:02", "52:54:00:82:00:03")
#: iperf3 servers: the checks' on IPERF_PORT, each step's interrupted transfer
#: on a port of its own from BG_PORT (a client cut off by a driver reload can
#: leave its server waiting for it).
IPERF_PORT = 5201
BG_PORT = 5300
SEEDS = {"tap-split": 2111, "tap-packed": 2112, "tap-grouped": 2114, "switch": 2113}
#: Kernel messages below this level reach the guest's console: KERN_WARNING
#: and worse, so a soft lockup or virtio_ring's BAD_RING shows.
CONSOLE_LOGLEVEL = 5
#: What a broken ring or a driver gone astray prints on a Linux guest's console
#: (drivers/virtio/virtio_ring.c BAD_RING, virtio_net's own complaints, a
#: kernel oops or warning).
GUEST_COMPLAINTS = re.compile(
    r"is not a head|id \d+ out of range|Unexpected TXQ|bad|BUG:|WARNING:|Oops|call trace",
    re.IGNORECASE,
)


@dataclass
class Member:
    """A guest, its VM's index in serve's stats, and where its traffic goes."""

    guest: Guest
    vm: int
    cidr: str
    peer_ip: str
    #: An iperf3 server reachable at ``peer_ip`` on a given port, while in the block.
    server: Callable[[int], contextlib.AbstractContextManager[object]]
    channels: int = 0


@dataclass
class Serve:
    """How to reach, kill and start again the serve the members are on."""

    stats: Path
    log: Path
    start: Callable[[], subprocess.Popen[str]]
    proc: subprocess.Popen[str]

    def restart(self, pause: float) -> None:
        self.proc.kill()
        self.proc.wait()
        time.sleep(pause)
        self.proc = self.start()

    def doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = fetch(str(self.stats))
        return doc


class Churn:
    """The guests, serve, and what each guest is known to use."""

    def __init__(
        self, members: list[Member], serve: Serve, rng: random.Random, *, packed: bool = False
    ) -> None:
        self.members = members
        self.packed = packed
        self.serve = serve
        self.rng = rng
        for m in members:
            m.channels = m.guest.channels().combined
        self.history: list[str] = []
        self.switch = "switch" in serve.doc()

    def pairs(self, m: Member) -> list[dict[str, int]]:
        pairs: list[dict[str, int]] = self.serve.doc()["vms"][m.vm]["pairs"]
        return pairs

    # -- the disruptions ------------------------------------------------------------

    def channels_op(self, m: Member) -> str:
        n = self.rng.choice([c for c in range(1, QUEUES + 1) if c != m.channels])
        m.guest.set_channels(n)
        m.channels = n
        return f"vm {m.vm}: channels {n}"

    def kill_worker_op(self, m: Member) -> str:
        pairs = self.pairs(m)
        enabled = [i for i, p in enumerate(pairs) if p["enabled"] and p["pid"]]
        i = self.rng.choice(enabled)
        before = pairs[i]["restarts"]
        os.kill(pairs[i]["pid"], signal.SIGKILL)
        assert wait_for(lambda: self.pairs(m)[i]["restarts"] > before, timeout=15), (
            f"pair {i}'s worker was not restarted: {self.pairs(m)}"
        )
        return f"vm {m.vm}: kill worker {i}"

    def restart_serve_op(self, m: Member) -> str:
        self.serve.restart(self.rng.uniform(0.2, 1.5))
        return "restart serve"

    def reload_driver_op(self, m: Member) -> str:
        reload_virtio_net(m.guest, m.cidr)
        m.channels = m.guest.channels().combined
        return f"vm {m.vm}: reload driver ({m.channels} channels)"

    def kill_switch_op(self, m: Member) -> str:
        sw = self.serve.doc()["switch"]
        os.kill(sw["pid"], signal.SIGKILL)
        restarts = sw["restarts"]
        assert wait_for(lambda: self.serve.doc()["switch"]["restarts"] > restarts, timeout=20), (
            self.where()
        )
        return "kill switch"

    def channels_racing(self, m: Member, disrupt: Callable[[], object], what: str) -> str:
        """``ethtool -L`` in the background, and ``disrupt`` while QEMU and serve
        carry it out; the guest's channel count is read back afterwards (it
        may refuse the change, never end between two counts)."""
        g = m.guest
        n = self.rng.choice([c for c in range(1, QUEUES + 1) if c != m.channels])
        g.run(f"ethtool -L eth0 combined {n} >/dev/null 2>&1 &")
        time.sleep(self.rng.uniform(0.0, 0.4))
        disrupt()
        assert wait_for(lambda: "ethtool" not in g.run("ps").output, timeout=30), self.where()
        m.channels = g.channels().combined
        return f"vm {m.vm}: channels {n} racing {what} -> {m.channels}"

    def kill_any_worker(self, m: Member) -> None:
        pids = [p["pid"] for p in self.pairs(m) if p["pid"]]
        if pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.rng.choice(pids), signal.SIGKILL)

    def channels_vs_worker_op(self, m: Member) -> str:
        return self.channels_racing(m, lambda: self.kill_any_worker(m), "a worker's death")

    def channels_vs_serve_op(self, m: Member) -> str:
        return self.channels_racing(m, lambda: self.restart_serve_op(m), "serve's restart")

    # -- one step ---------------------------------------------------------------------

    def step(self, k: int) -> None:
        ops: list[Callable[[Member], str]] = [
            self.channels_op,
            self.channels_op,
            self.kill_worker_op,
            self.restart_serve_op,
            self.reload_driver_op,
            self.channels_vs_worker_op,
            self.channels_vs_serve_op,
        ]
        if self.switch:
            ops.append(self.kill_switch_op)
        only = os.environ.get("VIRTNET_CHURN_OPS")
        if only:
            ops = [op for op in ops if op.__name__.removesuffix("_op") in only.split(",")]
        elif self.packed:
            # QEMU keeps no packed ring state across a backend restart, and
            # while the backend is gone it drops the guest's transmits by using
            # tx buffers from that stale position (virtio_net_drop_tx_queue_data):
            # three of 11 runs with serve killed under traffic came back to a
            # disordered ring and a stalled queue (seeds 32, 51, 53).  Left out
            # unless asked for; test_serve_guest_packed restarts serve on a
            # quiet guest.
            ops = [op for op in ops if op not in (self.restart_serve_op, self.channels_vs_serve_op)]
        op = self.rng.choice(ops)
        m = self.rng.choice(self.members)
        sender = self.rng.choice(self.members)
        reverse = self.rng.choice(("", " -R"))
        port = BG_PORT + k
        with sender.server(port):
            sender.guest.run(
                f"iperf3 -c {sender.peer_ip} -p {port} -P 4 -t 3 -i 0{reverse} >/tmp/bg.log 2>&1 &"
            )
            time.sleep(self.rng.uniform(0.5, 2.0))
            self.history.append(op(m))
            # The transfer may end with an error (a driver reload takes the
            # guest's address away); it must end, and the next one must work.
            assert wait_for(lambda: "iperf3 -c" not in sender.guest.run("ps").output, timeout=60), (
                self.where()
            )
        self.check()

    def check(self) -> None:
        assert self.serve.proc.poll() is None, f"serve exited\n{self.where()}"
        for m in self.members:
            assert wait_for(partial(self.reaches_peer, m), timeout=60), f"vm {m.vm}\n{self.where()}"
            assert wait_for(partial(self.enabled_as_used, m), timeout=15), (
                f"vm {m.vm}: {self.pairs(m)}\n{self.where()}"
            )
        m = self.members[0]
        with m.server(IPERF_PORT):
            for reverse in ("", " -R"):
                out = m.guest.iperf3(f"-c {m.peer_ip} -P 4 -t 1 -i 0{reverse}", timeout=60)
                assert "receiver" in out, f"{out}\n{self.where()}"
        for m in self.members:
            pairs = self.pairs(m)
            assert all(p["errors"] == 0 for p in pairs), f"vm {m.vm}: {pairs}\n{self.where()}"

    @staticmethod
    def reaches_peer(m: Member) -> bool:
        return m.guest.ping(m.peer_ip, count=1, timeout=4)

    def enabled_as_used(self, m: Member) -> bool:
        """serve enables exactly the pairs the guest uses."""
        return first_enabled(self.pairs(m), m.channels)

    def run(self, steps: int) -> None:
        self.check()
        for k in range(steps):
            self.step(k)
        print("steps:", self.history)
        log = self.serve.log.read_text()
        assert "Traceback" not in log, self.where()
        for m in self.members:
            console = m.guest.console_log.read_text(errors="replace")
            complaints = [line for line in console.splitlines() if GUEST_COMPLAINTS.search(line)]
            assert not complaints, f"vm {m.vm}:\n" + "\n".join(complaints[-20:])

    def where(self) -> str:
        consoles = "\n".join(f"guest {m.vm}:\n{m.guest.console_tail()}" for m in self.members)
        return (
            f"steps: {self.history}\nserve log:\n{self.serve.log.read_text()[-3000:]}\n{consoles}"
        )


def _seed(kind: str) -> int:
    return int(os.environ.get("VIRTNET_CHURN_SEED", SEEDS[kind]))


def _steps() -> int:
    return int(os.environ.get("VIRTNET_CHURN_STEPS", STEPS))


@pytest.mark.parametrize(
    ("rings", "seed"), [(r, _seed(f"tap-{r}")) for r in ("split", "packed", "grouped")], ids=str
)
def test_random_disruptions_on_a_tap(
    rings: str, seed: int, guest_initramfs: Path, tmp_path: Path
) -> None:
    """``grouped``: split rings, every pair in one worker process (``--workers 1``)."""
    with guest_on_tap(
        tmp_path,
        guest_initramfs,
        queues=QUEUES,
        host_cidr=f"{HOST_IP}/24",
        guest_cidr=GUEST_CIDR,
        device_extra="packed=on" if rings == "packed" else "",
        # Errors and warnings on the console (the harness's default is none).
        cmdline_extra=f"loglevel={CONSOLE_LOGLEVEL}",
        serve_args=("--workers", "1") if rings == "grouped" else (),
    ) as sg:

        def start() -> subprocess.Popen[str]:
            sg.start_serve()
            return sg.serve

        serve = Serve(sg.stats, sg.log, start, sg.serve)
        member = Member(
            sg.guest, 0, GUEST_CIDR, HOST_IP, lambda port: sg.ns.iperf3_server(port=port)
        )
        try:
            Churn([member], serve, random.Random(seed), packed=rings == "packed").run(_steps())
        finally:
            sg.serve = serve.proc  # guest_on_tap stops the serve running now


@contextlib.contextmanager
def _guest_iperf_server(g: Guest, port: int) -> Iterator[object]:
    """``iperf3 -s`` in guest ``g`` on ``port`` while in the block."""
    pidfile = f"/tmp/iperf3-{port}.pid"
    g.run(f"iperf3 -s -D -p {port} -I {pidfile} >/dev/null 2>&1; sleep 0.3")
    try:
        yield None
    finally:
        g.run(f"kill $(cat {pidfile}); rm -f {pidfile}", check=False)


@pytest.mark.parametrize("seed", [_seed("switch")], ids=str)
def test_random_disruptions_on_the_switch(seed: int, guest_initramfs: Path, tmp_path: Path) -> None:
    socks = [tmp_path / "a.sock", tmp_path / "b.sock"]
    stats, log = tmp_path / "stats.sock", tmp_path / "serve.log"
    args = [a for s in socks for a in ("--socket", str(s))]
    args += ["--port", "switch", "--queues", str(QUEUES)]
    with NetNS() as ns:

        def start() -> subprocess.Popen[str]:
            return start_serve(ns, args, stats=stats, log=log)

        serve = Serve(stats, log, start, start())
        try:
            with contextlib.ExitStack() as stack:
                guests = [
                    stack.enter_context(
                        Guest(
                            vhost_user_netdev_args(sock, queues=QUEUES, mac=mac, reconnect_ms=500),
                            initramfs=guest_initramfs,
                            ip=cidr,
                            smp=1,
                            cmdline_extra=f"loglevel={CONSOLE_LOGLEVEL}",
                        )
                    )
                    for sock, mac, cidr in zip(socks, SWITCH_MACS, SWITCH_CIDRS, strict=True)
                ]
                ips = [c.split("/")[0] for c in SWITCH_CIDRS]
                members = [
                    Member(
                        guests[i],
                        i,
                        SWITCH_CIDRS[i],
                        ips[1 - i],
                        partial(_guest_iperf_server, guests[1 - i]),
                    )
                    for i in range(2)
                ]
                Churn(members, serve, random.Random(seed)).run(_steps())
        finally:
            stop_process(serve.proc)
            print(log.read_text()[-6000:])
