"""64-byte UDP floods into a real guest, many per boot, backends alternated.

``guest_runs.py`` floods each boot once, after its TCP and UDP runs, and that
one figure swings by a tenth from sweep to sweep on the same host (see
docs/benchmarks.md, session 16).  This bench spends its time on the flood
alone: ``--floods`` floods per boot (``guest_tap_baseline.udp_flood``: what
the guest's iperf3 read, what its NIC took, its socket drops, its receive
interrupts, the backend's CPU per frame), ``--repeat`` boots of each backend,
the order of the backends reversed every other round; it prints every boot's
floods as they come, then per backend the median of each figure, the range of
the received rate, and the received rate over QEMU's.

Backends: ``virtnet`` (``virtnet serve --port tap`` from the installed tree),
``qemu`` (QEMU's own ``-netdev tap,vhost=off``, the peer), and any number of
``--tree NAME=SRC``: virtnet serve run from another source tree (``SRC`` is
the ``src`` directory of, say, a git worktree holding a change to try), so a
change is measured against the installed code and QEMU in the same run; and
of ``--variant NAME=OPTIONS``: the installed serve with more options (say
``pin1="--pin 1"``).

``--autogroup on|off`` sets the kernel's autogroup scheduling for the run
(``guest_tap_baseline.AUTOGROUP``: it decides this figure) and puts the old
value back afterwards.  ``--cgroups libvirt`` puts QEMU, serve and the
flooding iperf3 in the cpu cgroups a libvirt + systemd host gives them
(``cpu_cgroups``); autogroup then no longer applies to them.

A flood with fewer than :data:`FEW_FRAMES_PER_IRQ` NIC frames per receive
interrupt is counted apart: the guest then drains the ring faster than it
fills and takes an interrupt (and a wake-up) per batch, a slower mode that a
minority of floods fall into on either backend.

Run as root: ``python bench/guest_flood.py [--repeat 6] [--floods 3]
[--duration 4] [--streams 4] [--vcpus 2] [--tree NAME=SRC ...]
[--variant NAME=OPTIONS ...] [--no-qemu]
[--autogroup keep|on|off] [--cgroups host|libvirt] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import statistics
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_cgroups import Placement, add_cgroups_argument, cgroups
from guest_cpu import booted_on
from guest_tap_baseline import (
    Flood,
    add_autogroup_argument,
    autogroup,
    can_boot,
    pin_guest_placement,
    udp_flood,
)

from virtnet.testing.netns import NetNS, unique_name
from virtnet.testing.procs import tree_pids

#: Below this many NIC frames per receive interrupt a flood is "interrupt-bound".
#: Session 17's 399 floods on a 2-CPU host: 362 took 200-3,100 frames per
#: interrupt (median 568), 18 took 100-199, and 19 took 5-96; those 19 read
#: 22-46k datagrams/s where the others read about 50k.
FEW_FRAMES_PER_IRQ = 100
PEER = "qemu"


@dataclass(frozen=True)
class Summary:
    """One backend's floods: medians, the received rate's range, and how many
    floods were interrupt-bound."""

    backend: str
    floods: int
    received_pps: float
    lowest_pps: float
    highest_pps: float
    nic_pps: float
    socket_drops_pps: float
    rx_irqs_per_s: float
    backend_us_per_frame: float
    interrupt_bound: int


def interrupt_bound(flood: Flood) -> bool:
    """Fewer than :data:`FEW_FRAMES_PER_IRQ` NIC frames per receive interrupt."""
    return flood.nic_pps < FEW_FRAMES_PER_IRQ * flood.rx_irqs_per_s


def summarize(backend: str, floods: Sequence[Flood]) -> Summary:
    """Medians over ``floods`` (every flood of every boot counts once)."""
    if not floods:
        raise ValueError(f"{backend}: no floods to summarize")
    got = [f.received_pps for f in floods]

    def median(key: str) -> float:
        return float(statistics.median(getattr(f, key) for f in floods))

    return Summary(
        backend=backend,
        floods=len(floods),
        received_pps=statistics.median(got),
        lowest_pps=min(got),
        highest_pps=max(got),
        nic_pps=median("nic_pps"),
        socket_drops_pps=median("socket_drops_pps"),
        rx_irqs_per_s=median("rx_irqs_per_s"),
        backend_us_per_frame=median("backend_us_per_frame"),
        interrupt_bound=sum(interrupt_bound(f) for f in floods),
    )


def named_arg(text: str, form: str) -> tuple[str, str]:
    """``NAME=VALUE`` of a ``--tree`` or ``--variant`` option (``form`` names
    the value in the error): both parts given, NAME not a built-in backend's."""
    name, sep, value = text.partition("=")
    if not sep or not name or not value.strip():
        raise argparse.ArgumentTypeError(f"expected NAME={form}, got {text!r}")
    if name in ("virtnet", PEER):
        raise argparse.ArgumentTypeError(f"{name!r} names a built-in backend")
    return name, value


def tree_arg(text: str) -> tuple[str, Path]:
    """``--tree NAME=SRC``: SRC must hold the ``virtnet`` package."""
    name, src = named_arg(text, "SRC")
    path = Path(src).resolve()
    if not (path / "virtnet" / "__init__.py").is_file():
        raise argparse.ArgumentTypeError(f"{path} holds no virtnet package (give its src/)")
    return name, path


@contextlib.contextmanager
def python_path(src: Path | None) -> Iterator[None]:
    """Processes started meanwhile (serve) import virtnet from ``src`` first."""
    old = os.environ.get("PYTHONPATH")
    if src is not None:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(src), *([old] if old else [])])
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


@dataclass(frozen=True)
class Backend:
    """What one column of the run boots on: ``qemu``, or virtnet serve from
    ``src`` (None: the installed tree) with ``serve_args`` added."""

    name: str
    src: Path | None = None
    serve_args: tuple[str, ...] = ()


def variant_arg(text: str) -> Backend:
    """``--variant NAME=OPTIONS``: the installed serve with OPTIONS (shell words)."""
    name, options = named_arg(text, "OPTIONS")
    try:
        words = shlex.split(options)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{name}: {e}") from None
    return Backend(name, serve_args=tuple(words))


def boot_and_flood(
    backend: Backend,
    *,
    floods: int,
    seconds: int,
    streams: int,
    vcpus: int,
    queues: int,
    placement: Placement,
) -> list[Flood]:
    """One boot on ``backend``, ``floods`` floods, QEMU, serve and the sender
    placed in ``placement``'s cgroups."""
    kind = PEER if backend.name == PEER else "virtnet"
    tap = unique_name("vntap")
    with (
        python_path(backend.src),
        tempfile.TemporaryDirectory(prefix="vnflood-") as d,
        NetNS() as ns,
        booted_on(
            kind, ns, Path(d), vcpus=vcpus, queues=queues, tap=tap,
            serve_args=backend.serve_args,
        ) as (guest, serve),
        ns.iperf3_server() as sender,
    ):  # fmt: skip
        prefix = pin_guest_placement(guest, vcpus)
        pid = serve.proc.pid if serve is not None else None
        placement.place("vm", [guest.qemu_pid] if guest.qemu_pid is not None else [])
        placement.place("backend", tree_pids(pid) if pid is not None else [])
        placement.place("sender", [sender.proc.pid])
        return [
            udp_flood(
                guest,
                ns,
                seconds=seconds,
                streams=streams,
                prefix=prefix,
                backend_pid=pid,
                tap=tap,
            )
            for _ in range(floods)
        ]


def _line(backend: str, boot: int, floods: Sequence[Flood]) -> str:
    cells = "  ".join(
        f"{f.received_pps / 1e3:.1f}k (NIC {f.nic_pps / 1e3:.1f}k, {f.rx_irqs_per_s:.0f} irq/s)"
        for f in floods
    )
    return f"  [{backend}] boot {boot}: {cells}"


def table(summaries: Sequence[Summary]) -> str:
    """The summary table (markdown), ratios to QEMU's tap when it ran."""
    peer = next((s for s in summaries if s.backend == PEER), None)
    rows = [
        "| backend | floods | received, median | / QEMU | lowest-highest | NIC | socket drops "
        "| rx irq/s | backend us/frame | interrupt-bound |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        ratio = f"{s.received_pps / peer.received_pps:.2f}" if peer and peer.received_pps else "-"
        rows.append(
            f"| {s.backend} | {s.floods} | {s.received_pps / 1e3:.1f}k | {ratio} "
            f"| {s.lowest_pps / 1e3:.1f}k-{s.highest_pps / 1e3:.1f}k | {s.nic_pps / 1e3:.1f}k "
            f"| {s.socket_drops_pps / 1e3:.1f}k | {s.rx_irqs_per_s:.0f} "
            f"| {s.backend_us_per_frame:.2f} | {s.interrupt_bound} |"
        )
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=6, help="boots of each backend (default 6)")
    ap.add_argument("--floods", type=int, default=3, help="floods per boot (default 3)")
    ap.add_argument("--duration", type=int, default=4, help="seconds per flood (default 4)")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--vcpus", type=int, default=2, choices=range(1, 9), metavar="N")
    ap.add_argument("--queues", type=int, default=1, help="queue pairs (default 1)")
    ap.add_argument(
        "--tree",
        type=tree_arg,
        action="append",
        default=[],
        metavar="NAME=SRC",
        help="also run virtnet serve from the source tree SRC, named NAME (repeatable)",
    )
    ap.add_argument(
        "--variant",
        type=variant_arg,
        action="append",
        default=[],
        metavar="NAME=OPTIONS",
        help='also run the installed serve with more OPTIONS, named NAME (e.g. pin1="--pin 1";'
        " repeatable)",
    )
    ap.add_argument("--no-qemu", action="store_true", help="leave out QEMU's tap")
    add_autogroup_argument(ap)
    add_cgroups_argument(ap)
    ap.add_argument("--json", type=Path, help="also write every flood here")
    args = ap.parse_args(argv)
    if min(args.repeat, args.floods, args.duration, args.streams, args.queues) < 1:
        ap.error("--repeat, --floods, --duration, --streams and --queues must be positive")
    backends = [
        Backend("virtnet"),
        *(Backend(name, src) for name, src in args.tree),
        *args.variant,
        *([] if args.no_qemu else [Backend(PEER)]),
    ]
    names = [b.name for b in backends]
    if len(set(names)) != len(names):
        ap.error("two --tree or --variant options share a name")
    if not can_boot():
        return 2
    results: dict[str, list[Flood]] = {name: [] for name in names}
    with autogroup(args.autogroup) as grouping, cgroups(args.cgroups) as placement:
        print(f"autogroup scheduling: {grouping}; cgroups: {placement.name}", flush=True)
        for boot in range(args.repeat):
            order = backends if boot % 2 == 0 else backends[::-1]
            for backend in order:
                got = boot_and_flood(
                    backend, floods=args.floods, seconds=args.duration,
                    streams=args.streams, vcpus=args.vcpus, queues=args.queues,
                    placement=placement,
                )  # fmt: skip
                results[backend.name].extend(got)
                print(_line(backend.name, boot, got), flush=True)
    summaries = [summarize(name, floods) for name, floods in results.items()]
    print(
        f"\n{args.repeat} boots x {args.floods} floods of {args.duration} s per backend, "
        f"{args.vcpus} vCPUs, {args.queues} pair(s), autogroup {grouping}, cgroups "
        f"{args.cgroups}; interrupt-bound: "
        f"fewer than {FEW_FRAMES_PER_IRQ} NIC frames per interrupt"
    )
    print(table(summaries))
    if args.json:
        out = {name: [asdict(f) for f in floods] for name, floods in results.items()}
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
