"""Reproduce the shape of the seed's tables (virtio-net multiqueue, Jason Wang's series) here.

Seed ``002``: pktgen guest TX with 1/2/3/4 queues (589 / 952 / 1290 / 1578
kpps, +0/62/120/168 %) and netperf TCP_RR (1-byte) rate vs sessions for
2 queue pairs against 1 (+thu%, +normalize%: rate per CPU).

Here the guest is virtnet's userspace driver (``virtnet pktgen`` /
``virtnet rr``, one process per queue pair) and the host side is a
vhost-user backend on this machine:

* ``testpmd``: DPDK ``dpdk-testpmd`` with a ``net_vhost`` port (pktgen:
  ``rxonly``; rr: ``macswap``), one forwarding lcore polling every queue;
  the generator is pinned to the CPU that lcore does not use;
* ``serve``: ``virtnet serve --port loopback`` (one Python worker process
  per queue pair, eventfd wakeups), generator unpinned.

Every figure is also given per CPU second of *all* processes involved (the
generator's and the backend's: ``getrusage`` of our children, ``/proc`` of
the backend), which is the seed's "+normalize%".  The machine has 2 CPUs
(the seed's hosts had 4-8 and a 4-vCPU guest), shared with whatever else
runs: 3 or 4 busy-polling generator processes cannot scale past 2 CPUs, and
the output says so.

Usage: python bench/seeds.py [--seconds 3] [--peers testpmd serve] [--out docs]
Writes ``docs/seeds.md`` and ``docs/seeds.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from virtnet.pktgen import run_pktgen
from virtnet.rr import run_rr
from virtnet.testing.dpdk import TestPmd, skip_reason
from virtnet.testing.procs import stop_process, tree_cpu_seconds

SEED_PKTGEN = {1: 589, 2: 952, 3: 1290, 4: 1578}
SEED_PKTGEN_IMPROVEMENT = {1: 0, 2: 62, 3: 120, 4: 168}
#: TCP_RR, 1-byte, 2 vCPU 2q vs 1q: sessions -> (+thu%, +normalize%).
SEED_RR = {1: (0, -2), 20: (23, 2), 50: (9, -1), 100: (2, -7)}
PAIRS = (1, 2, 3, 4)
SESSIONS = (1, 20, 50, 100)
ROOT = Path(__file__).resolve().parent.parent


class WindowCpu:
    """The peer's CPU seconds during the measuring window only.

    Sampled from the generator's progress callback (every 0.25 s while its
    processes run): the slope between the first and the last sample, times
    the window length.  Set-up and tear-down (handshake, a polling peer
    spinning while nothing is sent) are left out, and live worker processes
    are seen before they exit.
    """

    def __init__(self, cpu: Callable[[], float]) -> None:
        self.cpu = cpu
        self.samples: list[tuple[float, float]] = []

    def sample(self, elapsed: float, *_: object) -> None:
        self.samples.append((elapsed, self.cpu()))

    def seconds_over(self, window: float) -> float:
        if len(self.samples) < 2:
            return 0.0
        (t0, c0), (t1, c1) = self.samples[0], self.samples[-1]
        return (c1 - c0) / (t1 - t0) * window if t1 > t0 else 0.0


@dataclass
class Peer:
    name: str
    sock: Path
    cpu: Callable[[], float]
    pin: list[int] | None
    note: str


@contextmanager
def testpmd_peer(tmp: Path, fwd: str) -> Iterator[Peer]:
    sock = tmp / f"pmd-{fwd}.sock"
    with TestPmd.vhost(sock, queues=max(PAIRS), fwd=fwd, lcores="0-1") as pmd:
        pmd.start_forwarding()
        yield Peer("testpmd", sock, pmd.cpu_seconds, pmd.other_cpus(),
                   f"dpdk-testpmd net_vhost {fwd}, 1 polling lcore")  # fmt: skip


@contextmanager
def serve_peer(tmp: Path) -> Iterator[Peer]:
    sock = tmp / "serve.sock"
    log = (tmp / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "virtnet.cli", "serve", "--socket", str(sock), "--port",
         "loopback", "--queues", str(max(PAIRS))],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        end = time.monotonic() + 20
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(
                    "virtnet serve did not start: " + (tmp / "serve.log").read_text()
                )
            time.sleep(0.05)
        yield Peer("serve", sock, lambda: tree_cpu_seconds(proc.pid), None,
                   "virtnet serve --port loopback, 1 worker process per pair")  # fmt: skip
    finally:
        stop_process(proc)
        log.close()


@dataclass
class Results:
    seconds: float
    repeat: int = 1
    pktgen: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)
    rr: dict[str, dict[int, dict[int, dict[str, float]]]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)


def _median(runs: list[dict[str, float]], key: str) -> dict[str, float]:
    """The run whose ``key`` is the median (noise on a shared 2-CPU machine)."""
    return sorted(runs, key=lambda d: d[key])[len(runs) // 2]


def bench_pktgen(peer: Peer, seconds: float, repeat: int) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for n in PAIRS:
        runs = []
        for _ in range(repeat):
            win = WindowCpu(peer.cpu)
            res = run_pktgen(str(peer.sock), queues=n, size=64, flows=n * 4, seconds=seconds,
                             cpus=peer.pin, progress=win.sample)  # fmt: skip
            peer_cpu = win.seconds_over(res.seconds)
            cpu = res.cpu_seconds + peer_cpu
            runs.append({
                "kpps": res.tx_kpps,
                "rx_kpps": res.rx_kpps,
                "gen_cpu": res.cpu_seconds,
                "peer_cpu": peer_cpu,
                "kpps_per_cpu": res.tx_packets / 1e3 / cpu if cpu else 0.0,
                "failed": float(len(res.failed_pairs)),
            })  # fmt: skip
        out[n] = _median(runs, "kpps")
        print(f"  pktgen {peer.name} {n} pairs: {out[n]['kpps']:8,.0f} kpps"
              f"  ({out[n]['kpps_per_cpu']:,.0f} kpps per CPU s)", flush=True)  # fmt: skip
    return out


def bench_rr(peer: Peer, seconds: float, repeat: int) -> dict[int, dict[int, dict[str, float]]]:
    out: dict[int, dict[int, dict[str, float]]] = {}
    for q in (1, 2):
        out[q] = {}
        for s in SESSIONS:
            runs = []
            for _ in range(repeat):
                win = WindowCpu(peer.cpu)
                res = run_rr(str(peer.sock), queues=q, sessions=s, seconds=seconds,
                             queue_size=256, cpus=peer.pin, progress=win.sample)  # fmt: skip
                peer_cpu = win.seconds_over(res.seconds)
                cpu = res.cpu_seconds + peer_cpu
                runs.append({
                    "tps": res.tps,
                    "gen_cpu": res.cpu_seconds,
                    "peer_cpu": peer_cpu,
                    "tps_per_cpu": res.transactions / cpu if cpu else 0.0,
                    "lost": float(sum(p.lost for p in res.pairs)),
                    "latency_us": res.mean_latency_us,
                })  # fmt: skip
            out[q][s] = d = _median(runs, "tps")
            print(f"  rr {peer.name} {q} pairs {s:3} sessions: {d['tps']:9,.0f} trans/s"
                  f"  ({d['tps_per_cpu']:,.0f} per CPU s)", flush=True)  # fmt: skip
    return out


def pct(new: float, old: float) -> str:
    return f"{(new - old) / old * 100:+.0f}%" if old else "n/a"


def markdown(r: Results) -> str:
    cpus = os.cpu_count()
    lines = [
        "# The seed's multiqueue tables, reproduced on this machine",
        "",
        "Generated by `python bench/seeds.py` "
        f"({time.strftime('%Y-%m-%d %H:%M')}, median of {r.repeat} x {r.seconds:g} s per"
        " figure, Python "
        f"{platform.python_version()}, {platform.machine()}).",
        "",
        f"**This machine has {cpus} CPUs**, shared with other work; the seed's hosts had"
        " 4-8 and its pktgen guest 4 vCPUs.  Every generator process busy-polls its"
        " pair, the DPDK peer busy-polls one CPU, so 3 or 4 pairs cannot run in"
        " parallel here: past 2 pairs the rows measure time-sharing, not scaling.",
        "",
        "Guest = virtnet's userspace virtio-net driver (`virtnet pktgen` / `virtnet rr`,"
        " one forked process per queue pair, memfd-shared rings, vhost-user)."
        " Peers: " + "; ".join(f"**{k}**: {v}" for k, v in r.notes.items()) + ".",
        "",
        '"per CPU s" divides by the CPU seconds of every process involved (generator'
        " processes and the backend, including its polling thread), as the seed's"
        " +normalize% does.",
        "",
        "## pktgen, guest TX, 64-byte frames",
        "",
        "| pairs | seed kpps | seed +impr. |"
        + "".join(f" {p} kpps | {p} +impr. | {p} kpps per CPU s |" for p in r.pktgen),
        "|---:|---:|---:|" + "---:|---:|---:|" * len(r.pktgen),
    ]
    for n in PAIRS:
        row = f"| {n} | {SEED_PKTGEN[n]} | +{SEED_PKTGEN_IMPROVEMENT[n]}% |"
        for data in r.pktgen.values():
            d = data.get(n)
            if d is None:
                row += " - | - | - |"
                continue
            row += f" {d['kpps']:,.0f} | {pct(d['kpps'], data[1]['kpps'])} |"
            row += f" {d['kpps_per_cpu']:,.0f} |"
        lines.append(row)
    lines += [
        "",
        "## Request/response (TCP_RR shape, 1-byte requests): 2 pairs vs 1",
        "",
        "Each session keeps one request outstanding; the backend reflects it on the"
        " same pair (`macswap` / loopback).  Sessions are placed on pairs by flow hash.",
        "",
    ]
    for peer, rdata in r.rr.items():
        lines += [
            f"### peer: {peer}",
            "",
            "| sessions | 1 pair trans/s | 2 pairs trans/s | +thu% | 1 pair per CPU s"
            " | 2 pairs per CPU s | +normalize% | seed +thu% | seed +normalize% |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for s in SESSIONS:
            one, two = rdata[1][s], rdata[2][s]
            st, sn = SEED_RR[s]
            lines.append(
                f"| {s} | {one['tps']:,.0f} | {two['tps']:,.0f} | {pct(two['tps'], one['tps'])}"
                f" | {one['tps_per_cpu']:,.0f} | {two['tps_per_cpu']:,.0f}"
                f" | {pct(two['tps_per_cpu'], one['tps_per_cpu'])} | {st:+d}% | {sn:+d}% |"
            )
        lines.append("")
    lines += [
        "## Reading it",
        "",
        "* Repeats of one figure differ by up to a third on this shared machine; each cell is"
        " the median of the repeats.  Compare shapes, not single cells.",
        "* The seed's pktgen rows grow with queues because each queue had its own"
        " vCPU and vhost thread.  Here the same code path runs per pair in its own"
        " process, but two CPUs bound the aggregate; what the rows do show is the per-pair"
        " cost and that adding pairs does not break anything.",
        "* RR: one session is latency-bound (one round trip at a time), more sessions batch"
        " per wakeup.  A second pair helps only while a CPU is idle; on 2 CPUs with a"
        " polling peer it mostly redistributes the same CPU, as the seed saw when its vhost"
        " threads were each half idle.",
        "",
        "![seeds](seeds.png)",
        "",
    ]
    return "\n".join(lines)


def plot(r: Results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    a.plot(PAIRS, [SEED_PKTGEN[n] for n in PAIRS], "k--o", label="seed (4-vCPU guest, 2012)")
    for peer, data in r.pktgen.items():
        xs = [n for n in PAIRS if n in data]
        a.plot(xs, [data[n]["kpps"] for n in xs], "-o", label=f"virtnet pktgen -> {peer}")
    a.set_xlabel("queue pairs")
    a.set_ylabel("kpps (64-byte frames)")
    a.set_yscale("log")
    a.set_xticks(list(PAIRS))
    a.set_title(f"pktgen guest TX ({os.cpu_count()} CPUs here)")
    a.legend(fontsize=8)
    for peer, rdata in r.rr.items():
        for q, style in ((1, "-o"), (2, "--s")):
            b.plot(SESSIONS, [rdata[q][s]["tps"] for s in SESSIONS], style,
                   label=f"{peer}, {q} pair{'s' if q > 1 else ''}")  # fmt: skip
    b.set_xlabel("sessions")
    b.set_ylabel("transactions / s")
    b.set_title("request/response, 1-byte")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--peers", nargs="+", default=["testpmd", "serve"],
                    choices=["testpmd", "serve"])  # fmt: skip
    ap.add_argument("--repeat", type=int, default=1, help="runs per figure (median kept)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs")
    ap.add_argument("--json", action="store_true", help="also print the raw numbers")
    args = ap.parse_args()
    r = Results(seconds=args.seconds, repeat=args.repeat)
    peers = list(args.peers)
    if "testpmd" in peers and skip_reason() is not None:
        print(f"skipping testpmd: {skip_reason()}", file=sys.stderr)
        peers.remove("testpmd")
    print(f"{os.cpu_count()} CPUs on this machine; {args.seconds:g} s per figure", flush=True)
    with tempfile.TemporaryDirectory(prefix="vnseeds") as tmpdir:
        tmp = Path(tmpdir)
        for name in peers:
            if name == "testpmd":
                with testpmd_peer(tmp, "rxonly") as peer:
                    r.notes[name] = "dpdk-testpmd net_vhost (rxonly for pktgen, macswap for rr),"
                    r.notes[name] += " 1 polling lcore; generator pinned to the other CPU"
                    r.pktgen[name] = bench_pktgen(peer, args.seconds, args.repeat)
                with testpmd_peer(tmp, "macswap") as peer:
                    r.rr[name] = bench_rr(peer, args.seconds, args.repeat)
            else:
                with serve_peer(tmp) as peer:
                    r.notes[name] = peer.note + "; generator unpinned"
                    r.pktgen[name] = bench_pktgen(peer, args.seconds, args.repeat)
                    r.rr[name] = bench_rr(peer, args.seconds, args.repeat)
    args.out.mkdir(parents=True, exist_ok=True)
    md = markdown(r)
    (args.out / "seeds.md").write_text(md)
    plot(r, args.out / "seeds.png")
    print(md)
    if args.json:
        print(json.dumps({"pktgen": r.pktgen, "rr": r.rr}, indent=2))


if __name__ == "__main__":
    main()
