"""Where a guest run's time goes: host CPU per thread, for virtnet serve and QEMU's own tap.

Boots the guest of ``guest_runs.py`` (same namespace, tap, placement) on one
backend at a time and, while one iperf3 TCP run (``--direction h2g``: host ->
guest, ``g2h``: guest -> host) is in its steady state, samples over
``--seconds`` (``--test udp64``: 64-byte UDP datagrams instead of TCP, as fast
as iperf3 can send them or ``--rate`` per second):

* each QEMU thread's host CPU (QEMU runs with ``-name debug-threads=on``, so
  the vCPU threads are named ``CPU n/TCG``) and each ``virtnet serve``
  process's (supervisor and workers), in % of one CPU;
* how busy the whole host was (``/proc/stat``), in % of all its CPUs;
* the guest's NIC counters (``ethtool -S``: packets and kicks per queue) and
  its virtio-net interrupts (``/proc/interrupts``), per second;
* for virtnet, the backend's own counters (``virtnet stats``: kicks, calls,
  ``rx_no_buffer`` stalls), per second.

Whether the host's CPUs or the guest's vCPUs are saturated, or everybody
waits on everybody (a latency-bound pipeline), shows here and in no
throughput figure.  ``--device-extra`` adds virtio-net-pci properties to
both backends' NIC (e.g. ``rx_queue_size=1024``).

Run as root: ``python bench/guest_cpu.py [--backend both|virtnet|qemu]
[--direction h2g|g2h] [--test tcp|udp64] [--rate PPS] [--seconds 6] [--vcpus 2]
[--queues 1] [--streams 4] [--device-extra PROPS] [--kick-defer-us U]
[--autogroup keep|on|off]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from guest_runs import Serve, serve_on_tap
from guest_tap_baseline import (
    GUEST_CIDR,
    HOST_IP,
    UDP_PAYLOAD,
    add_autogroup_argument,
    autogroup,
    can_boot,
    per_stream_bitrate,
    pin_guest_placement,
)

from virtnet.testing.guest import Guest, tap_netdev_args, vhost_user_netdev_args
from virtnet.testing.netns import NetNS, unique_name
from virtnet.testing.procs import system_cpu_ticks, thread_cpu_seconds, tree_pids
from virtnet.vhost_user import stats as serve_stats

#: Seconds of iperf3 before the sample starts (slow start, guest settling).
WARMUP_S = 3.0
#: The backend counters sampled from ``virtnet stats`` (summed over pairs).
SERVE_COUNTERS = ("rx_packets", "tx_packets", "rx_no_buffer", "kicks", "calls", "batches")


@dataclass
class CpuBreakdown:
    """One backend's sample (rates are per second of the sample)."""

    backend: str
    direction: str
    test: str
    #: what iperf3's receiver got: Gbit/s (tcp) or datagrams per second (udp64)
    received: float
    seconds: float
    #: thread or process label -> % of one CPU
    threads: dict[str, float] = field(default_factory=dict)
    #: % of all the host's CPUs busy
    host_busy: float = 0.0
    #: guest counter -> per second (ethtool -S and /proc/interrupts)
    guest: dict[str, float] = field(default_factory=dict)
    #: virtnet serve counter -> per second (empty for QEMU's tap)
    serve: dict[str, float] = field(default_factory=dict)

    def table(self) -> str:
        lines = [
            f"[{self.backend}] {self.test} {self.direction} {self.received_text()};"
            f" host busy {self.host_busy:.1f} % of its CPUs over {self.seconds:.1f} s"
        ]
        lines += [f"  {name:24s} {pct:6.1f} % of a CPU" for name, pct in self.threads.items()]
        lines.append(f"  {'(sum)':24s} {sum(self.threads.values()):6.1f} %")
        for title, counters in (("guest", self.guest), ("serve", self.serve)):
            lines += [f"  {title} {k:28s} {v:12,.0f} /s" for k, v in counters.items() if v]
        return "\n".join(lines)

    def received_text(self) -> str:
        if self.test == "tcp":
            return f"{self.received:.2f} Gbit/s"
        return f"{self.received:,.0f} datagrams/s received"


def rates(before: Mapping[str, int], after: Mapping[str, int], seconds: float) -> dict[str, float]:
    """Per-second change of every counter in ``after`` (missing before: 0)."""
    return {k: (v - before.get(k, 0)) / seconds for k, v in sorted(after.items())}


def virtio_interrupts(proc_interrupts: str, nic: str = "virtio0") -> dict[str, int]:
    """``irq <name>`` -> count over every CPU for the ``<nic>-...`` lines of
    ``/proc/interrupts`` (input, output and config vectors)."""
    lines = proc_interrupts.splitlines()
    if not lines:
        raise RuntimeError("empty /proc/interrupts")
    ncpus = len(lines[0].split())
    out: dict[str, int] = {}
    for line in lines[1:]:
        fields = line.split()
        if fields and fields[-1].startswith(f"{nic}-"):
            out[f"irq {fields[-1]}"] = sum(int(f) for f in fields[1 : 1 + ncpus])
    return out


def thread_labels(qemu_pid: int, serve_pids: Sequence[int]) -> dict[str, float]:
    """Label -> CPU seconds: QEMU's threads by name (``qemu main`` for the main
    thread), then ``serve`` (supervisor) and ``serve worker <pid>`` (the rest)."""
    out: dict[str, float] = {}
    for tid, (name, secs) in sorted(thread_cpu_seconds(qemu_pid).items()):
        label = "qemu main" if tid == qemu_pid else f"qemu {name}"
        out[label] = out.get(label, 0.0) + secs
    for i, pid in enumerate(serve_pids):
        label = "serve" if i == 0 else f"serve worker {pid}"
        out[label] = sum(secs for _name, secs in thread_cpu_seconds(pid).values())
    return out


def serve_counters(stats_socket: Path) -> dict[str, int]:
    """:data:`SERVE_COUNTERS` summed over every pair of every VM."""
    doc = serve_stats.fetch(str(stats_socket))
    out = dict.fromkeys(SERVE_COUNTERS, 0)
    for vm in doc.get("vms", []):
        for pair in vm.get("pairs", []):
            for k in SERVE_COUNTERS:
                out[k] += int(pair.get(k, 0))
    return out


def _guest_counters(guest: Guest) -> dict[str, int]:
    counters = dict(guest.ethtool_stats())
    counters.update(virtio_interrupts(guest.run("cat /proc/interrupts").output))
    return counters


def sample(
    guest: Guest,
    *,
    backend: str,
    direction: str,
    test: str,
    seconds: float,
    streams: int,
    vcpus: int,
    serve_pids: Callable[[], list[int]] = list,
    serve_socket: Path | None = None,
    rate: int = 0,
) -> CpuBreakdown:
    """Run iperf3 in ``guest`` in the background and sample its steady state."""
    qemu = guest.qemu_pid
    if qemu is None:
        raise RuntimeError("QEMU is not running")
    prefix = pin_guest_placement(guest, vcpus)
    total_s = round(WARMUP_S + seconds + 2)
    reverse = " -R" if direction == "h2g" else ""
    bitrate = per_stream_bitrate(rate, streams) if rate else 0
    udp = f" -u -l {UDP_PAYLOAD} -b {bitrate}" if test == "udp64" else ""
    guest.run(
        f"({prefix}iperf3 -c {HOST_IP} -P {streams} -t {total_s} -J{reverse}{udp}"
        " > /tmp/iperf3.json 2>&1 &)"
    )
    time.sleep(WARMUP_S)
    pids = serve_pids()
    g0, s0 = _guest_counters(guest), serve_counters(serve_socket) if serve_socket else {}
    c0, t0 = system_cpu_ticks(), thread_labels(qemu, pids)
    m0 = time.monotonic()
    time.sleep(seconds)
    t1, c1 = thread_labels(qemu, pids), system_cpu_ticks()
    dt = time.monotonic() - m0
    g1, s1 = _guest_counters(guest), serve_counters(serve_socket) if serve_socket else {}
    deadline = time.monotonic() + total_s + 30
    while True:
        out = guest.run("cat /tmp/iperf3.json").output
        if '"end"' in out and out.rstrip().endswith("}"):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"iperf3 did not finish:\n{out[-2000:]}")
        time.sleep(0.5)
    data: dict[str, Any] = json.loads(out)
    if "error" in data:
        raise RuntimeError(f"iperf3: {data['error']}")
    got = data["end"]["sum_received"]
    return CpuBreakdown(
        backend=backend,
        direction=direction,
        test=test,
        received=(
            float(got["bits_per_second"]) / 1e9
            if test == "tcp"
            else got["bytes"] / UDP_PAYLOAD / got["seconds"]
        ),
        seconds=dt,
        threads={k: 100 * (t1[k] - t0.get(k, 0.0)) / dt for k in t1},
        host_busy=100 * (c1[0] - c0[0]) / max(1, c1[1] - c0[1]),
        guest=rates(g0, g1, dt),
        serve=rates(s0, s1, dt),
    )


@contextmanager
def _booted(
    netdev_args: Sequence[str], *, vcpus: int, queues: int, after_boot: Callable[[], None]
) -> Iterator[Guest]:
    with Guest(
        netdev_args, ip=GUEST_CIDR, smp=vcpus, extra_args=("-name", "debug-threads=on")
    ) as guest:
        after_boot()
        guest.set_channels(queues)
        if not guest.ping(HOST_IP, count=2):
            raise RuntimeError(f"guest cannot ping {HOST_IP}:\n{guest.console_tail()}")
        yield guest


@contextmanager
def booted_on(
    backend: str,
    ns: NetNS,
    workdir: Path,
    *,
    vcpus: int,
    queues: int,
    device_extra: str = "",
    kick_defer_us: int | None = None,
    poll_us: int = 0,
    tap: str | None = None,
    serve_args: Sequence[str] = (),
) -> Iterator[tuple[Guest, Serve | None]]:
    """The bench guest booted on ``backend`` in ``ns``: ``virtnet`` (serve on a
    tap in ``ns``, its files in ``workdir``, ``serve_args`` added to its
    options) or ``qemu`` (QEMU's own tap, moved into ``ns``); yields the guest
    and the serve (None for QEMU's tap).  ``tap``: the tap's name (default: a
    fresh one)."""
    tap = tap or unique_name("vntap")
    if backend == "virtnet":
        with serve_on_tap(
            ns, tap, workdir, queues=queues, kick_defer_us=kick_defer_us, poll_us=poll_us,
            extra=serve_args,
        ) as serve:  # fmt: skip
            netdev = vhost_user_netdev_args(serve.socket, queues=queues, device_extra=device_extra)
            with _booted(netdev, vcpus=vcpus, queues=queues, after_boot=lambda: None) as g:
                yield g, serve
        return

    def plug() -> None:
        ns.move_link(tap)
        ns.set_address(tap, f"{HOST_IP}/24")

    netdev = tap_netdev_args(tap, queues=queues, device_extra=device_extra)
    with _booted(netdev, vcpus=vcpus, queues=queues, after_boot=plug) as g:
        yield g, None


def measure(
    backend: str,
    *,
    direction: str = "h2g",
    test: str = "tcp",
    seconds: float = 6.0,
    vcpus: int = 2,
    queues: int = 1,
    streams: int = 4,
    device_extra: str = "",
    kick_defer_us: int | None = None,
    rate: int = 0,
) -> CpuBreakdown:
    """One boot on ``backend`` (``virtnet`` or ``qemu``), one sample."""
    kw: dict[str, Any] = {
        "backend": backend,
        "direction": direction,
        "test": test,
        "seconds": seconds,
        "streams": streams,
        "vcpus": vcpus,
        "rate": rate,
    }
    with (
        tempfile.TemporaryDirectory(prefix="vnguestcpu-") as d,
        NetNS() as ns,
        booted_on(
            backend,
            ns,
            Path(d),
            vcpus=vcpus,
            queues=queues,
            device_extra=device_extra,
            kick_defer_us=kick_defer_us,
        ) as (g, serve),
        ns.iperf3_server(),
    ):
        if serve is None:
            return sample(g, **kw)
        pid = serve.proc.pid
        return sample(g, serve_pids=lambda: tree_pids(pid), serve_socket=serve.stats_socket, **kw)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=("both", "virtnet", "qemu"), default="both")
    ap.add_argument("--direction", choices=("h2g", "g2h"), default="h2g")
    ap.add_argument("--test", choices=("tcp", "udp64"), default="tcp")
    ap.add_argument(
        "--rate", type=int, default=0, help="udp64: datagrams/s offered (default 0: flood)"
    )
    ap.add_argument("--seconds", type=float, default=6.0, help="length of the sample")
    ap.add_argument("--vcpus", type=int, default=2, choices=range(1, 9), metavar="N")
    ap.add_argument("--queues", type=int, default=1, choices=range(1, 17), metavar="Q")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument(
        "--kick-defer-us", type=int, help="serve's --kick-defer-us (default: serve's own)"
    )
    ap.add_argument("--device-extra", default="", help="virtio-net-pci properties for both")
    add_autogroup_argument(ap)
    ap.add_argument("--json", type=Path, help="also write the samples here")
    args = ap.parse_args(argv)
    if args.seconds <= 0:
        ap.error("--seconds must be positive")
    if args.rate < 0:
        ap.error("--rate must be >= 0")
    if not can_boot():
        return 2
    backends = ("virtnet", "qemu") if args.backend == "both" else (args.backend,)
    results = []
    with autogroup(args.autogroup) as grouping:
        print(f"autogroup scheduling: {grouping}", flush=True)
        for backend in backends:
            results.append(
                measure(
                    backend,
                    direction=args.direction,
                    test=args.test,
                    seconds=args.seconds,
                    vcpus=args.vcpus,
                    queues=args.queues,
                    streams=args.streams,
                    device_extra=args.device_extra,
                    kick_defer_us=args.kick_defer_us,
                    rate=args.rate,
                )
            )
            print(results[-1].table(), flush=True)
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in results], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
