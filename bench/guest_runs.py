"""A real guest's throughput through virtnet serve vs QEMU's own ``-netdev tap,vhost=off``.

Same guest (the virtnet test initramfs under TCG, 2 vCPUs unless ``--vcpus``, 512 MB), same
measurement (:func:`guest_tap_baseline.measure_guest_network`: iperf3 TCP
with ``--streams`` streams and 64-byte UDP, both directions, against a server
in a fresh namespace at 10.77.0.1/24), two backends in the same run:

* ``virtnet``: a persistent multiqueue tap in the namespace, ``virtnet serve
  --port tap:IF --queues Q`` running inside the namespace, the guest on
  ``-netdev vhost-user,queues=Q``;
* ``qemu tap,vhost=off``: QEMU's own multiqueue tap backend (the peer).

Run as root: ``python bench/guest_runs.py [--queues 4|1,2,4] [--workers 0|0,1,2]
[--duration 5] [--streams 4] [--repeat N] [--poll-us U] [--no-guest-pin]
[--vcpus 2] [--autogroup keep|on|off] [--packed] [--json FILE]``.  ``--packed`` gives the
NIC packed virtqueues on both backends.  ``--workers`` is serve's
(0: one worker process per pair); a list measures each value against the same peer boots.
The guest's interrupts and iperf3 are pinned apart by default, the same for
both backends (see :mod:`guest_tap_baseline`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

from guest_tap_baseline import (
    DEFAULT_UDP_RATES,
    HOST_IP,
    GuestNetFigures,
    add_run_arguments,
    autogroup,
    can_boot,
    device_extra,
    int_list_arg,
    measure_guest_network,
    run_options,
    summary_figures,
    tap_baseline,
)

from virtnet.testing.guest import vhost_user_netdev_args
from virtnet.testing.netns import NetNS, unique_name
from virtnet.testing.procs import stop_process
from virtnet.testing.serve import start_serve
from virtnet.vhost_user.backend import MAX_QUEUE_PAIRS


class Serve(NamedTuple):
    """A running ``virtnet serve --port tap`` (:func:`serve_on_tap`)."""

    socket: Path
    stats_socket: Path
    proc: subprocess.Popen[str]


@contextlib.contextmanager
def serve_on_tap(
    ns: NetNS,
    tap: str,
    workdir: Path,
    *,
    queues: int,
    poll_us: int = 0,
    workers: int = 0,
    kick_defer_us: int | None = None,
    extra: Sequence[str] = (),
) -> Iterator[Serve]:
    """A persistent multiqueue tap ``tap`` at 10.77.0.1/24 in ``ns`` and ``virtnet
    serve --port tap:TAP`` inside ``ns`` (socket, stats socket and log in
    ``workdir``; ``extra``: more serve options), stopped on exit."""
    sock, stats, log = workdir / "vm.sock", workdir / "stats.sock", workdir / "serve.log"
    ns.create_tap(tap)
    ns.set_address(tap, f"{HOST_IP}/24")
    log.write_text("")
    serve = start_serve(
        ns,
        ["--socket", str(sock), "--port", f"tap:{tap}", "--queues", str(queues),
         "--poll-us", str(poll_us), "--workers", str(workers),
         *([] if kick_defer_us is None else ["--kick-defer-us", str(kick_defer_us)]),
         *extra],
        stats=stats, log=log, verbose=False,
    )  # fmt: skip
    try:
        yield Serve(sock, stats, serve)
    finally:
        stop_process(serve)


def virtnet_run(
    *,
    queues: int,
    duration: float,
    streams: int,
    poll_us: int = 0,
    workers: int = 0,
    pin_guest: bool = True,
    udp_rates: Sequence[int] = DEFAULT_UDP_RATES,
    vcpus: int = 2,
    kick_defer_us: int | None = None,
    packed: bool = False,
) -> GuestNetFigures:
    """The guest on virtnet serve --port tap (tap and serve inside a namespace)."""
    tap = unique_name("vntap")
    with (
        tempfile.TemporaryDirectory(prefix="vnguestrun-") as d,
        NetNS() as ns,
        serve_on_tap(
            ns, tap, Path(d), queues=queues, poll_us=poll_us, workers=workers,
            kick_defer_us=kick_defer_us,
        ) as serve,
    ):  # fmt: skip
        label = (
            "virtnet serve --port tap"
            + (f" --poll-us {poll_us}" if poll_us else "")
            + (f" --workers {workers}" if workers else "")
            + (f" --kick-defer-us {kick_defer_us}" if kick_defer_us is not None else "")
            + (" (packed rings)" if packed else "")
        )
        return measure_guest_network(
            vhost_user_netdev_args(serve.socket, queues=queues, device_extra=device_extra(packed)),
            ns=ns,
            queues=queues,
            label=label,
            duration=duration,
            streams=streams,
            pin_guest=pin_guest,
            backend_pid=serve.proc.pid,
            udp_rates=udp_rates,
            smp=vcpus,
            tap=tap,
        )


def _ratio(a: float, b: float) -> str:
    return f"{a / b:6.2f}" if b else "     -"


def boot_ratios(ours: Sequence[GuestNetFigures], peer: Sequence[GuestNetFigures], key: str) -> str:
    """Boot i of virtnet against boot i of QEMU's tap (the two ran back to
    back), lowest to highest: the spread a median hides.  The 64-byte flood
    into a 2-vCPU guest swings widely from boot to boot, so whether a
    median below 1.0 is a loss or a draw shows here."""
    pairs = [(getattr(a, key), getattr(b, key)) for a, b in zip(ours, peer, strict=True)]
    ratios = sorted(a / b for a, b in pairs if b)
    return ", ".join(f"{r:.2f}" for r in ratios) if ratios else "-"


_ROWS = (
    ("TCP guest->host", "tcp_guest_to_host_gbps", "Gbit/s"),
    ("TCP host->guest", "tcp_host_to_guest_gbps", "Gbit/s"),
    ("UDP-64 guest->host received", "udp64_guest_to_host_received_pps", "pps"),
    ("UDP-64 host->guest received", "udp64_host_to_guest_received_pps", "pps"),
    ("UDP-64 host->guest at the guest NIC", "udp64_host_to_guest_nic_pps", "pps"),
    ("UDP-64 host->guest guest socket drops", "udp64_host_to_guest_socket_drops_pps", "pps"),
    ("UDP-64 host->guest host tap drops", "udp64_host_to_guest_tap_drops_pps", "pps"),
    ("UDP-64 host->guest backend CPU", "udp64_host_to_guest_backend_us_per_frame", "us/frame"),
    ("UDP-64 host->guest peak of the offered-load ladder", "udp64_host_to_guest_peak_pps", "pps"),
    ("guest rx interrupts, TCP host->guest", "tcp_host_to_guest_rx_irqs_per_s", "/s"),
    ("guest rx interrupts, UDP-64 host->guest flood", "udp64_host_to_guest_rx_irqs_per_s", "/s"),
)


_queue_counts = int_list_arg("counts", 1, MAX_QUEUE_PAIRS)
_worker_counts = int_list_arg("counts", 0, MAX_QUEUE_PAIRS)


def _cell(value: float, unit: str) -> str:
    return f"{value:,.0f} {unit}" if unit in ("pps", "/s") else f"{value:.2f} {unit}"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--queues",
        type=_queue_counts,
        default=[4],
        help="queue pairs, or a comma-separated sweep such as 1,2,4 (default 4)",
    )
    ap.add_argument("--poll-us", type=int, default=0, help="serve's --poll-us")
    ap.add_argument(
        "--kick-defer-us", type=int, help="serve's --kick-defer-us (default: serve's own)"
    )
    ap.add_argument(
        "--workers",
        type=_worker_counts,
        default=[0],
        help="serve's --workers, or a sweep such as 0,1,2 (default 0: a process per pair)",
    )
    add_run_arguments(ap)
    args = ap.parse_args(argv)
    if not can_boot():
        return 2
    # (queues, workers) -> every boot of virtnet, every boot of QEMU's tap
    results: dict[tuple[int, int], tuple[list[GuestNetFigures], list[GuestNetFigures]]] = {}
    with autogroup(args.autogroup) as grouping:
        print(f"autogroup scheduling: {grouping}", flush=True)
        for queues in args.queues:
            ours: dict[int, list[GuestNetFigures]] = {w: [] for w in args.workers}
            peer: list[GuestNetFigures] = []
            for _ in range(max(1, args.repeat)):
                for workers in args.workers:
                    ours[workers].append(
                        virtnet_run(
                            queues=queues,
                            poll_us=args.poll_us,
                            workers=workers,
                            kick_defer_us=args.kick_defer_us,
                            **run_options(args),
                        )
                    )
                    print(ours[workers][-1].table(), flush=True)
                peer.append(tap_baseline(queues=queues, **run_options(args)))
                print(peer[-1].table(), flush=True)
            for workers, figs in ours.items():
                results[(queues, workers)] = (figs, peer)
    runs = f"median of {args.repeat}" if args.repeat > 1 else "one run"
    runs += f", {args.vcpus} vCPU{'s' if args.vcpus > 1 else ''}, autogroup {grouping}"
    print(
        f"\n| queues | workers | figure | virtnet serve | QEMU tap,vhost=off | ratio "
        f"| boot by boot |  ({runs})"
    )
    print("|---:|---:|---|---:|---:|---:|---|")
    for (queues, workers), (ours_runs, peer_runs) in results.items():
        v, p = summary_figures(ours_runs), summary_figures(peer_runs)
        for label, key, unit in _ROWS:
            a, b = getattr(v, key), getattr(p, key)
            cells = (
                str(queues),
                str(min(workers, queues) if workers else queues),
                label,
                _cell(a, unit),
                _cell(b, unit),
                _ratio(a, b).strip(),
                boot_ratios(ours_runs, peer_runs, key),
            )
            print("| " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    f"{q}q{w}w": {
                        "virtnet": asdict(summary_figures(v)),
                        "qemu_tap": asdict(summary_figures(p)),
                    }
                    for (q, w), (v, p) in results.items()
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
