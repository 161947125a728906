"""Live migration through virtnet serve vs QEMU's own ``-netdev tap,vhost=off``.

How long is a migrating guest off the network, and does logging dirty pages in
serve's workers slow the migration down?  The same guest (the test initramfs
under TCG, 2 vCPUs, 512 MB, ``--queues`` pairs) moves between two QEMU 10
processes on this host (QMP ``migrate`` over a unix socket), ``--repeat``
times per backend, both backends in the same run:

* ``virtnet``: ``virtnet serve --socket A --socket B --port tap:T%d`` inside a
  network namespace, the guests on ``-netdev vhost-user``;
* ``qemu tap,vhost=off`` (the peer): each QEMU's own multiqueue tap.

Either way both taps sit in a bridge ``br0`` (10.78.0.1/24) in the namespace,
as libvirt bridges guests.  From one second before the migration until
``--after`` seconds after it, the namespace pings the guest every
``--interval-ms``; with ``--load`` a TCP stream from the namespace into the
guest also runs (the guest writes the pages its receive buffers land in).

Per run: QEMU's total time, downtime and setup time (``query-migrate``), the
RAM transferred, and the *network gap*: the longest run of unanswered pings
times the interval (the guest stops on the source, resumes on the
destination, announces itself and the bridge learns its new port).

Run as root: ``python bench/migration.py [--queues 2] [--repeat 3]
[--interval-ms 10] [--after 3] [--load] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from guest_tap_baseline import can_boot

from virtnet.testing.guest import (
    Guest,
    GuestError,
    tap_netdev_args,
    vhost_user_netdev_args,
    wait_for,
)
from virtnet.testing.netns import NetNS, unique_name
from virtnet.testing.procs import stop_process
from virtnet.testing.serve import start_bridged_serve

HOST_IP = "10.78.0.1"
GUEST_IP = "10.78.0.2"
MIGRATE_TIMEOUT = 180.0
#: A TCP sink in the guest for ``--load`` (busybox nc, output discarded).
LOAD_PORT = 5002

_SEQ = re.compile(r"icmp_seq=(\d+)")
_SENT = re.compile(r"(\d+) packets transmitted")
#: ``--load``: zeros into the guest's sink until killed.
FEEDER = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
block = bytes(64 << 10)
while True:
    s.sendall(block)
"""


@dataclass(frozen=True)
class MigrationFigures:
    label: str
    queues: int
    load: bool
    total_ms: float
    downtime_ms: float
    setup_ms: float
    transferred_mb: float
    pings_sent: int
    pings_lost: int
    gap_ms: float


def network_gap(ping_output: str, interval_ms: float) -> tuple[int, int, float]:
    """``(sent, lost, gap_ms)`` from iputils ping's output: the longest run of
    sequence numbers without a reply (also at the end), times the interval."""
    seqs = sorted({int(m) for m in _SEQ.findall(ping_output)})
    sent_m = _SENT.search(ping_output)
    sent = int(sent_m.group(1)) if sent_m else (seqs[-1] if seqs else 0)
    if not seqs:
        return sent, sent, sent * interval_ms
    edges = [0, *seqs, sent + 1]  # seq numbers run 1..sent
    longest = max(b - a - 1 for a, b in itertools.pairwise(edges))
    return sent, sent - len(seqs), longest * interval_ms


def _qmp_ready(guest: Guest) -> bool:
    try:
        guest.qmp("query-status")
    except GuestError:
        return False
    return True


def one_run(
    backend: str, *, queues: int, interval_ms: float, after: float, load: bool
) -> MigrationFigures:
    tap = unique_name("vnmg")
    taps = [f"{tap}0", f"{tap}1"]
    with tempfile.TemporaryDirectory(prefix="vnmigbench-") as d, NetNS() as ns:
        work = Path(d)
        mig = work / "mig.sock"
        serve: subprocess.Popen[str] | None = None
        if backend == "virtnet":
            socks = [work / "a.sock", work / "b.sock"]
            serve = start_bridged_serve(
                ns, tap, socks, work / "stats.sock", work / "serve.log",
                queues=queues, host_cidr=f"{HOST_IP}/24", verbose=False,
            )  # fmt: skip
            netdevs = [vhost_user_netdev_args(s, queues=queues) for s in socks]
            label = "virtnet serve --port tap"
        else:
            ns.add_bridge("br0", f"{HOST_IP}/24")
            netdevs = [tap_netdev_args(t, queues=queues) for t in taps]
            label = "qemu tap,vhost=off"

        def plug(i: int, guest: Guest) -> None:
            if backend != "virtnet":  # QEMU made its tap in the root namespace
                # QMP answers once QEMU's set-up is done: every queue of the
                # tap is open (an -incoming QEMU connects its agent earlier).
                if not wait_for(lambda: _qmp_ready(guest), timeout=60, interval=0.2):
                    raise RuntimeError(f"{label}: QEMU's monitor did not come up")
                ns.move_link(taps[i])
                ns.enslave(taps[i], "br0")

        pinger: subprocess.Popen[str] | None = None
        feeder: subprocess.Popen[str] | None = None
        try:
            with Guest(netdevs[0], ip=f"{GUEST_IP}/24") as src:
                plug(0, src)
                src.set_channels(queues)
                if not src.ping(HOST_IP, count=2):
                    raise RuntimeError(f"{label}: the guest cannot ping\n{src.console_tail()}")
                if load:
                    src.run(f"(nc -l -p {LOAD_PORT} > /dev/null) >/dev/null 2>&1 &")
                with Guest(netdevs[1], ip=f"{GUEST_IP}/24", incoming=f"unix:{mig}") as dst:
                    plug(1, dst)
                    if load:
                        feeder = ns.popen(
                            [sys.executable, "-c", FEEDER, GUEST_IP, str(LOAD_PORT)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                        )  # fmt: skip
                    pinger = ns.popen(
                        ["ping", "-n", "-W", "1", "-i", f"{interval_ms / 1000:g}", GUEST_IP],
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    )  # fmt: skip
                    time.sleep(1.0)
                    st = src.migrate(f"unix:{mig}", timeout=MIGRATE_TIMEOUT)
                    if st.get("status") != "completed":
                        raise RuntimeError(f"{label}: migration {st.get('status')}: {st}")
                    time.sleep(after)
                    assert pinger is not None
                    pinger.send_signal(signal.SIGINT)
                    out, _ = pinger.communicate(timeout=10)
                    if not dst.ping(HOST_IP, count=2):
                        links = ns.run("ip -br link; bridge fdb show br br0", check=False)
                        raise RuntimeError(
                            f"{label}: no network after the migration\n{links.stdout}"
                            f"{dst.run('ip -br addr; ip neigh', check=False).output}"
                        )
        finally:
            for p in (pinger, feeder):
                if p is not None and p.poll() is None:
                    p.kill()
                    p.wait()
            if serve is not None:
                stop_process(serve)
    sent, lost, gap = network_gap(out, interval_ms)
    ram: dict[str, Any] = st.get("ram") or {}
    return MigrationFigures(
        label=label,
        queues=queues,
        load=load,
        total_ms=float(st.get("total-time", 0)),
        downtime_ms=float(st.get("downtime", 0)),
        setup_ms=float(st.get("setup-time", 0)),
        transferred_mb=float(ram.get("transferred", 0)) / 1e6,
        pings_sent=sent,
        pings_lost=lost,
        gap_ms=gap,
    )


_FIELDS = ("total_ms", "downtime_ms", "setup_ms", "transferred_mb", "gap_ms", "pings_lost")


def median_of(runs: Sequence[MigrationFigures]) -> dict[str, float]:
    return {f: statistics.median(float(getattr(r, f)) for r in runs) for f in _FIELDS}


def table(rows: dict[str, dict[str, float]], n: int) -> str:
    head = "| backend | total ms | downtime ms | setup ms | MB sent | network gap ms | pings lost |"
    out = [f"medians of {n} run(s)", head, "|" + "---|" * 7]
    for label, m in rows.items():
        out.append(
            f"| {label} | {m['total_ms']:.0f} | {m['downtime_ms']:.0f} | {m['setup_ms']:.0f} "
            f"| {m['transferred_mb']:.0f} | {m['gap_ms']:.0f} | {m['pings_lost']:.0f} |"
        )
    labels = list(rows)
    if len(labels) == 2:
        a, b = rows[labels[0]], rows[labels[1]]
        ratios = ", ".join(
            f"{f} {a[f] / b[f]:.2f}" for f in ("total_ms", "downtime_ms", "gap_ms") if b[f] > 0
        )
        out.append(f"ratio {labels[0]} / {labels[1]}: {ratios}")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queues", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--interval-ms", type=float, default=10.0)
    parser.add_argument("--after", type=float, default=3.0, help="seconds of pings after it")
    parser.add_argument("--load", action="store_true", help="a TCP stream into the guest")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if not can_boot():
        return 2
    if shutil.which("ping") is None:
        print("needs iputils ping (apt-get install iputils-ping)", file=sys.stderr)
        return 2
    runs: dict[str, list[MigrationFigures]] = {}
    for i in range(max(1, args.repeat)):
        for backend in ("virtnet", "qemu"):  # alternate: drift hits both alike
            fig = one_run(
                backend,
                queues=args.queues,
                interval_ms=args.interval_ms,
                after=args.after,
                load=args.load,
            )
            runs.setdefault(fig.label, []).append(fig)
            print(f"run {i + 1} {fig}", flush=True)
    medians = {label: median_of(r) for label, r in runs.items()}
    print(table(medians, max(1, args.repeat)))
    if args.json:
        doc = {"runs": [asdict(r) for rs in runs.values() for r in rs], "medians": medians}
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
