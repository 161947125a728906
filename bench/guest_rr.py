"""Request/response rate of a real guest against sessions: virtnet serve vs QEMU's tap.

The seeds measure request/response rates against the number of sessions
(netperf TCP_RR).  Here a session is one ``ping -f`` from the host side (one
echo request outstanding at a time, the next sent as soon as the reply is
back) and the guest's kernel is the responder, so no guest program's
scheduling is measured, only the path: host -> tap -> backend -> guest ->
backend -> tap -> host.  ``--sizes`` picks the echo payload: 56 bytes is one
frame each way; 4000 bytes is three IP fragments each way, so every reply
is a transmit burst of three chains -- the pattern that starts the worker's
deferred kicks (``serve --kick-defer-us``), whose price is that a reply
queued during a deferral waits for the next look.

Backends, each on a fresh boot of the same guest (TCG, ``--vcpus``, 512 MB):

* ``virtnet`` once per ``--kick-defer-us`` value: ``virtnet serve --port
  tap:IF`` inside a namespace holding the tap at 10.77.0.1/24;
* ``qemu tap,vhost=off``: QEMU's own tap backend moved into a namespace (the
  peer, measured in the same run).

Printed per (size, sessions): transactions per second (completed echoes, all
sessions together), the mean round trip, the ratio to the peer and, with
several queue pairs, each guest rx and tx queue's share of the frames
(``ethtool -S``).  The sessions do not spread over the pairs: the host's tap
picks the rx queue by a flow hash that, for ICMP, covers the addresses only,
and the guest answers on the tx queue of the vCPU that took the request.

Run as root: ``python bench/guest_rr.py [--kick-defer-us 0,50,400] [--sessions 1,4,16]
[--sizes 56,4000] [--duration 4] [--queues 1] [--vcpus 2] [--poll-us U] [--repeat N]
[--json FILE]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from guest_cpu import booted_on
from guest_tap_baseline import GUEST_CIDR, can_boot, int_list_arg

from virtnet.testing.guest import queue_deltas
from virtnet.testing.netns import NetNS

GUEST_IP = GUEST_CIDR.split("/")[0]
#: Largest echo payload: an IPv4 datagram is at most 65535 bytes (RFC 791)
#: less 20 of IP and 8 of ICMP header.
MAX_PAYLOAD = 65507
_SUMMARY = re.compile(r"(\d+) packets transmitted, (\d+) received")
_RTT = re.compile(r"rtt min/avg/max/mdev = [\d.]+/([\d.]+)/")


@dataclass(frozen=True)
class RRFigure:
    """One (payload size, sessions) cell: completed echoes per second, mean
    round trip, and the share of the frames each of the guest's rx and tx queues took."""

    size: int
    sessions: int
    rate: float
    rtt_us: float
    rx_share: tuple[float, ...] = ()
    tx_share: tuple[float, ...] = ()


def shares(counts: dict[int, int]) -> tuple[float, ...]:
    """Each queue's share of ``{queue: frames}`` (all 0 without frames)."""
    total = sum(counts.values())
    return tuple(counts[q] / total if total else 0.0 for q in sorted(counts))


def parse_ping(output: str) -> tuple[int, float]:
    """(replies received, mean round trip in microseconds) from iputils ``ping -q`` output.

    Raises ``ValueError`` when the summary line is missing; a run without any
    reply has no rtt line and gives a round trip of 0.
    """
    m = _SUMMARY.search(output)
    if m is None:
        raise ValueError(f"no ping summary in:\n{output}")
    rtt = _RTT.search(output)
    return int(m.group(2)), float(rtt.group(1)) * 1000 if rtt else 0.0


def rr_sessions(ns: NetNS, *, sessions: int, size: int, seconds: int) -> RRFigure:
    """``sessions`` concurrent ``ping -f`` runs from ``ns`` to the guest for ``seconds``."""
    argv = ["ping", "-f", "-q", "-w", str(seconds), "-s", str(size), GUEST_IP]
    procs = [
        ns.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(sessions)
    ]
    replies = 0
    weighted = 0.0
    for proc in procs:
        out, _ = proc.communicate(timeout=seconds + 30)
        got, rtt_us = parse_ping(out)
        replies += got
        weighted += got * rtt_us
    return RRFigure(size, sessions, replies / seconds, weighted / replies if replies else 0.0)


@dataclass(frozen=True)
class Plan:
    """What every boot measures."""

    sizes: tuple[int, ...]
    sessions: tuple[int, ...]
    seconds: int
    queues: int
    vcpus: int
    poll_us: int = 0


def measure(backend: str, plan: Plan, kick_defer_us: int | None = None) -> list[RRFigure]:
    """Boot the guest on ``backend`` (``virtnet``: serve on a tap with
    ``kick_defer_us``; ``qemu``: QEMU's own tap) and measure every (size,
    sessions) cell."""
    with (
        tempfile.TemporaryDirectory(prefix="vnguestrr-") as d,
        NetNS() as ns,
        booted_on(
            backend, ns, Path(d), vcpus=plan.vcpus, queues=plan.queues,
            kick_defer_us=kick_defer_us, poll_us=plan.poll_us,
        ) as (guest, _serve),
    ):  # fmt: skip
        cells = []
        for size in plan.sizes:
            for n in plan.sessions:
                before = guest.ethtool_stats()
                fig = rr_sessions(ns, sessions=n, size=size, seconds=plan.seconds)
                after = guest.ethtool_stats()
                cells.append(
                    dataclasses.replace(
                        fig,
                        rx_share=shares(queue_deltas(before, after, "rx")),
                        tx_share=shares(queue_deltas(before, after, "tx")),
                    )
                )
        return cells


def _median(runs: Sequence[list[RRFigure]]) -> list[RRFigure]:
    """Cell by cell median over boots."""
    return [
        RRFigure(
            cells[0].size,
            cells[0].sessions,
            statistics.median(c.rate for c in cells),
            statistics.median(c.rtt_us for c in cells),
            _median_shares([c.rx_share for c in cells]),
            _median_shares([c.tx_share for c in cells]),
        )
        for cells in zip(*runs, strict=True)
    ]


def _median_shares(shares_by_boot: Sequence[tuple[float, ...]]) -> tuple[float, ...]:
    """Queue by queue median of the boots' shares."""
    return tuple(statistics.median(q) for q in zip(*shares_by_boot, strict=True))


def _spread(cell: RRFigure) -> str:
    """ " rx 50/50 tx 100/0 %" with several queues, else ""."""
    if len(cell.rx_share) < 2:
        return ""
    rx = "/".join(f"{100 * x:.0f}" for x in cell.rx_share)
    tx = "/".join(f"{100 * x:.0f}" for x in cell.tx_share)
    return f" rx {rx} tx {tx} %"


_sizes = int_list_arg("sizes", 0, MAX_PAYLOAD)
_positive = int_list_arg("values", 1)
_defers = int_list_arg("microseconds", 0)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--kick-defer-us",
        type=_defers,
        default=(0, 50, 400),
        help="serve's --kick-defer-us values, one boot each (default 0,50,400)",
    )
    ap.add_argument(
        "--sessions",
        type=_positive,
        default=(1, 4, 16),
        help="concurrent ping -f sessions (default 1,4,16)",
    )
    ap.add_argument(
        "--sizes",
        type=_sizes,
        default=(56, 4000),
        help="echo payload bytes (default 56: one frame, 4000: three fragments)",
    )
    ap.add_argument("--duration", type=int, default=4, help="seconds per cell")
    ap.add_argument("--queues", type=int, default=1, choices=range(1, 17), metavar="N")
    ap.add_argument("--vcpus", type=int, default=2, choices=range(1, 9), metavar="N")
    ap.add_argument("--poll-us", type=int, default=0, help="serve's --poll-us (default 0)")
    ap.add_argument("--repeat", type=int, default=1, help="boots per backend; medians printed")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    if args.duration < 1 or args.repeat < 1 or args.poll_us < 0:
        ap.error("--duration and --repeat must be >= 1, --poll-us >= 0")
    if shutil.which("ping") is None:
        print("guest_rr.py needs iputils' ping (ping -f): apt-get install iputils-ping",
              file=sys.stderr)  # fmt: skip
        return 2
    if not can_boot():
        return 2
    plan = Plan(args.sizes, args.sessions, args.duration, args.queues, args.vcpus, args.poll_us)
    runs: dict[str, list[list[RRFigure]]] = {}
    for rep in range(max(1, args.repeat)):
        for us in args.kick_defer_us:
            runs.setdefault(f"virtnet defer {us} us", []).append(measure("virtnet", plan, us))
            print(f"boot {rep + 1}: virtnet defer {us} us done", flush=True)
        runs.setdefault("qemu tap", []).append(measure("qemu", plan))
        print(f"boot {rep + 1}: qemu tap done", flush=True)
    med = {name: _median(r) for name, r in runs.items()}
    peer = med["qemu tap"]
    names = list(med)
    print(
        f"\n({args.repeat} boot(s) each, median; {args.vcpus} vCPUs, {args.queues} queue(s),"
        f" {args.duration} s per cell; transactions/s, mean round trip, ratio to QEMU's tap)"
    )
    print("| payload | sessions | " + " | ".join(names) + " |")
    print("|---:|---:|" + "---:|" * len(names))
    for i, p in enumerate(peer):
        cells = [
            f"{med[n][i].rate:,.0f}/s {med[n][i].rtt_us:.0f} us"
            + (f" ({med[n][i].rate / p.rate:.2f})" if n != "qemu tap" and p.rate else "")
            + _spread(med[n][i])
            for n in names
        ]
        print(f"| {p.size} | {p.sessions} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(
            json.dumps({n: [vars(c) for c in cells] for n, cells in med.items()}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
