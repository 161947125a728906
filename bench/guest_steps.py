"""One offered rate of 64-byte UDP into a guest, step after step: virtnet against QEMU's tap.

``guest_runs.py`` offers each rate of its ladder once per boot.  This bench
repeats one rate (``--rate``, default 80k datagrams/s: about the ladder's peak
on this host) ``--steps`` times on one guest per backend, so that what
happens rarely shows: a step in which the guest received less than half the
offered rate is counted as a **stall** (the backend or the guest stopped
taking frames for seconds).  iperf3 runs in the guest (``-R``: the host
sends), 4 streams, the guest's NIC interrupts on vCPU 0 and iperf3 on the
last vCPU, as in ``guest_runs.py``.  Per backend it prints every step, the
median and the lowest step and the stalls; with both backends, the ratio of
the medians.

Run as root: ``python bench/guest_steps.py [--backend both|virtnet|qemu]
[--steps 30] [--rate 80000] [--duration 4] [--vcpus 2] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from guest_cpu import booted_on
from guest_tap_baseline import (
    UDP_PAYLOAD,
    _iperf_json,
    _udp_pps,
    can_boot,
    per_stream_bitrate,
    pin_guest_placement,
)

from virtnet.testing.guest import GuestCommandError
from virtnet.testing.netns import NetNS

#: A step below this share of the offered rate is a stall.
STALL_SHARE = 0.5


@dataclass
class Steps:
    backend: str
    rate: int
    received: list[float] = field(default_factory=list)  # pps per step; 0: iperf3 failed
    failed: int = 0

    @property
    def stalls(self) -> int:
        return sum(1 for r in self.received if r < STALL_SHARE * self.rate)

    def summary(self) -> str:
        med = statistics.median(self.received)
        return (
            f"[{self.backend}] {len(self.received)} steps of {self.rate} pps offered: "
            f"median {med:,.0f} pps received, lowest {min(self.received):,.0f}, "
            f"stalls (< {STALL_SHARE:.0%} of offered) {self.stalls}, iperf3 failures "
            f"{self.failed}"
        )


def run_steps(
    backend: str, *, steps: int, rate: int, duration: float, vcpus: int, streams: int = 4
) -> Steps:
    out = Steps(backend, rate)
    args = (
        f"-u -l {UDP_PAYLOAD} -b {per_stream_bitrate(rate, streams)} -P {streams} "
        f"-t {duration:g} -R"
    )
    with (
        tempfile.TemporaryDirectory(prefix="vnsteps-") as d,
        NetNS() as ns,
        booted_on(backend, ns, Path(d), vcpus=vcpus, queues=1) as (guest, _),
        ns.iperf3_server(),
    ):
        prefix = pin_guest_placement(guest, vcpus)
        for k in range(steps):
            try:
                _, got = _udp_pps(_iperf_json(guest, args, duration, prefix=prefix))
            except (GuestCommandError, RuntimeError, KeyError, ValueError) as exc:
                # iperf3 killed after its timeout, or no result: a stall too.
                out.failed += 1
                got = 0.0
                print(f"  step {k}: iperf3 failed: {str(exc).splitlines()[0]}", flush=True)
            out.received.append(got)
            print(f"  [{backend}] step {k}: received {got:,.0f} pps", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=("both", "virtnet", "qemu"), default="both")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rate", type=int, default=80000, help="datagrams/s offered")
    ap.add_argument("--duration", type=float, default=4.0, help="seconds per step")
    ap.add_argument("--vcpus", type=int, default=2, choices=range(1, 9), metavar="N")
    ap.add_argument("--json", type=Path, help="also write every step here")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.rate < 1 or args.duration <= 0:
        ap.error("--steps, --rate and --duration must be positive")
    if not can_boot():
        return 2
    backends = ("virtnet", "qemu") if args.backend == "both" else (args.backend,)
    results = [
        run_steps(b, steps=args.steps, rate=args.rate, duration=args.duration, vcpus=args.vcpus)
        for b in backends
    ]
    for r in results:
        print(r.summary())
    if len(results) == 2:
        v, q = (statistics.median(r.received) for r in results)
        print(f"median received virtnet / QEMU tap: {v / q:.2f}" if q else "QEMU received 0")
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in results], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
