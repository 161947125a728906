"""Peer baseline: a real guest's throughput through QEMU's own ``-netdev tap,vhost=off``.

Boots the virtnet test guest (TCG) with a multiqueue virtio-net NIC, moves
QEMU's tap into a fresh namespace (10.77.0.1/24; guest 10.77.0.2/24) and
measures, from the guest with ``iperf3`` against a server in the namespace:

* TCP throughput, guest->host and host->guest (``-P <streams>``);
* 64-byte UDP packets per second (``-u -l 64 -b 0``), offered and received,
  both directions.

Guest placement (``pin_guest``, on by default, the same for every backend):
every virtio-net interrupt goes to vCPU 0 and ``iperf3`` runs on the last
vCPU.  Left to chance, the queues a run's flows hash to decide whether the
receive softirq shares a vCPU with iperf3, and that choice alone moved the
64-byte UDP figure between 30 and 54 kpps from one run to the next on the
same backend; pinned, repeated runs agree within ~10 %.

:func:`measure_guest_network` takes the netdev arguments and an optional
``after_boot`` hook, so the same measurement can be pointed at virtnet's
vhost-user backend (``vhost_user_netdev_args``) later and the two figures
printed side by side.

Run as root: ``python bench/guest_tap_baseline.py [--queues 4] [--duration 5]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from virtnet.ports.tap import NETDEV_STATS, netdev_drops
from virtnet.testing.guest import Guest, queue_packets, skip_reason, tap_netdev_args
from virtnet.testing.netns import NetNS, unique_name
from virtnet.testing.procs import cpu_seconds, tree_cpu_seconds

HOST_IP = "10.77.0.1"
GUEST_CIDR = "10.77.0.2/24"
UDP_PAYLOAD = 64
#: Offered loads (64-byte UDP datagrams per second, all streams together) of
#: the host->guest load-response ladder.  The flood (``-b 0``) figure alone
#: measures how the guest copes with receive livelock (a TCG guest is offered
#: ~300k pps, drops most of it in its socket, and what its iperf3 still
#: receives swings from run to run); the ladder finds the highest rate the
#: guest actually receives, the way forwarding devices are rated (delivered
#: against offered load).  A TCG guest here tops out at 50-70k pps.
DEFAULT_UDP_RATES = (20_000, 35_000, 50_000, 65_000, 80_000, 100_000)
#: The kernel's autogroup scheduling: CPU is shared between sessions before
#: threads, so QEMU's vCPUs and its main thread (which reads QEMU's own tap)
#: share one budget and virtnet serve, a session of its own, has another.  On
#: by default in Debian's kernels; it decides the 64-byte flood into the guest
#: (docs/benchmarks.md, session 17).
AUTOGROUP = Path("/proc/sys/kernel/sched_autogroup_enabled")


@dataclass
class GuestNetFigures:
    """One measurement run (rates are averages over ``duration`` seconds)."""

    label: str
    queues: int
    streams: int
    duration: float
    boot_seconds: float
    tcp_guest_to_host_gbps: float
    tcp_host_to_guest_gbps: float
    udp64_guest_to_host_sent_pps: float
    udp64_guest_to_host_received_pps: float
    udp64_host_to_guest_sent_pps: float
    udp64_host_to_guest_received_pps: float
    pin_guest: bool = True
    #: Host->guest 64-byte UDP frames the guest's virtio-net driver received
    #: (``ethtool -S`` rx_queue_N_packets) and the guest's UDP sockets dropped
    #: for want of receive buffer (``/proc/net/snmp`` RcvbufErrors), per second:
    #: where the frames the iperf3 receiver never saw went.
    udp64_host_to_guest_nic_pps: float = 0.0
    udp64_host_to_guest_socket_drops_pps: float = 0.0
    #: Frames of that flood the host's kernel dropped on the tap (its queue
    #: full: the backend was not reading), per second, from ``/proc/net/dev``
    #: in the namespace: where most of an overload goes, for either backend.
    udp64_host_to_guest_tap_drops_pps: float = 0.0
    #: Host CPU the backend spent per frame the guest's NIC received in that
    #: run: QEMU's main thread (its tap backend, or the interrupts it injects
    #: for vhost-user) plus the backend's own processes (virtnet serve).
    udp64_host_to_guest_backend_us_per_frame: float = 0.0
    #: The load-response ladder: (offered pps, received pps) per rung of
    #: ``DEFAULT_UDP_RATES`` (or ``--udp-rates``), and its peak received rate.
    udp64_host_to_guest_ladder: tuple[tuple[float, float], ...] = ()
    udp64_host_to_guest_peak_pps: float = 0.0
    #: The guest's vCPUs (QEMU ``-smp``); the host's other CPUs are the
    #: backend's and the traffic's.
    vcpus: int = 2
    #: The guest's receive interrupts per second (``/proc/interrupts``, every
    #: ``virtio0-input.N`` line on every vCPU) during the TCP host->guest run
    #: and the 64-byte UDP host->guest flood: what each backend's notification
    #: policy costs the guest (each one is also a wake-up of QEMU's main loop).
    tcp_host_to_guest_rx_irqs_per_s: float = 0.0
    udp64_host_to_guest_rx_irqs_per_s: float = 0.0

    def ladder_text(self) -> str:
        """``offered->received`` per rung, in thousands of pps."""
        return " ".join(
            f"{o / 1e3:.0f}k->{r / 1e3:.1f}k" for o, r in self.udp64_host_to_guest_ladder
        )

    def table(self) -> str:
        """Human-readable summary."""
        return "\n".join(
            [
                f"[{self.label}] queues={self.queues} streams={self.streams} "
                f"vcpus={self.vcpus} duration={self.duration:g}s boot={self.boot_seconds:.1f}s"
                f" guest-pinned={'yes' if self.pin_guest else 'no'}",
                f"  TCP  guest->host {self.tcp_guest_to_host_gbps:8.2f} Gbit/s",
                f"  TCP  host->guest {self.tcp_host_to_guest_gbps:8.2f} Gbit/s",
                f"  UDP64 guest->host sent {self.udp64_guest_to_host_sent_pps:10.0f} pps"
                f"  received {self.udp64_guest_to_host_received_pps:10.0f} pps",
                f"  UDP64 host->guest sent {self.udp64_host_to_guest_sent_pps:10.0f} pps"
                f"  received {self.udp64_host_to_guest_received_pps:10.0f} pps"
                f"  (guest NIC {self.udp64_host_to_guest_nic_pps:.0f} pps, guest socket"
                f" drops {self.udp64_host_to_guest_socket_drops_pps:.0f} pps, host tap"
                f" drops {self.udp64_host_to_guest_tap_drops_pps:.0f} pps;"
                f" backend CPU {self.udp64_host_to_guest_backend_us_per_frame:.2f} us/frame)",
                f"  guest rx interrupts/s: TCP host->guest"
                f" {self.tcp_host_to_guest_rx_irqs_per_s:.0f}, UDP64 host->guest flood"
                f" {self.udp64_host_to_guest_rx_irqs_per_s:.0f}",
                f"  UDP64 host->guest offered->received: {self.ladder_text() or '(no ladder)'}"
                f"  peak {self.udp64_host_to_guest_peak_pps:.0f} pps",
            ]
        )


def per_stream_bitrate(total_pps: float, streams: int) -> int:
    """iperf3 ``-b`` (bits/s of payload, applied to each stream) that offers
    ``total_pps`` 64-byte datagrams per second over ``streams`` streams."""
    if total_pps <= 0 or streams <= 0:
        raise ValueError(f"need a positive rate and stream count, got {total_pps}, {streams}")
    return max(1, round(total_pps / streams * UDP_PAYLOAD * 8))


def ladder_peak(ladder: Sequence[tuple[float, float]]) -> float:
    """The highest received rate on a load-response ladder (0 for none)."""
    return max((received for _offered, received in ladder), default=0.0)


def pin_guest_placement(guest: Guest, smp: int) -> str:
    """Send every virtio-net interrupt to vCPU 0; the command prefix that runs
    a program on the last vCPU (``taskset``), or "" with one vCPU."""
    if smp < 2:  # one vCPU: nothing to separate
        return ""
    guest.run(
        "for i in $(grep virtio0- /proc/interrupts | cut -d: -f1); do"
        " echo 1 > /proc/irq/$i/smp_affinity; done"
    )
    return f"taskset {1 << (smp - 1):x} "


def backend_cpu_seconds(guest: Guest, backend_pid: int | None) -> float:
    """QEMU's main-thread CPU seconds, plus ``backend_pid``'s process tree."""
    qemu = guest.qemu_pid
    total = cpu_seconds(qemu, tid=qemu) if qemu is not None else 0.0
    return total + (tree_cpu_seconds(backend_pid) if backend_pid is not None else 0.0)


def guest_rx_counters(guest: Guest) -> tuple[int, int]:
    """(frames the guest's NIC received on all queues, UDP RcvbufErrors)."""
    nic = sum(queue_packets(guest.ethtool_stats(), "rx").values())
    lines = [ln.split() for ln in guest.run("cat /proc/net/snmp").output.splitlines()]
    udp = [ln[1:] for ln in lines if ln and ln[0] == "Udp:"]
    if len(udp) < 2 or "RcvbufErrors" not in udp[0]:
        raise RuntimeError("guest /proc/net/snmp has no Udp RcvbufErrors")
    return nic, int(udp[1][udp[0].index("RcvbufErrors")])


def rx_interrupts(proc_interrupts: str, nic: str = "virtio0") -> int:
    """The receive interrupts ``/proc/interrupts`` counts for ``nic``: every
    ``<nic>-input.N`` line, summed over every CPU column."""
    lines = proc_interrupts.splitlines()
    if not lines:
        raise RuntimeError("empty /proc/interrupts")
    ncpus = len(lines[0].split())
    total = 0
    found = False
    for line in lines[1:]:
        fields = line.split()
        if fields and fields[-1].startswith(f"{nic}-input."):
            found = True
            total += sum(int(f) for f in fields[1 : 1 + ncpus])
    if not found:
        raise RuntimeError(f"no {nic}-input interrupts in /proc/interrupts")
    return total


def guest_rx_interrupts(guest: Guest) -> int:
    """The guest NIC's receive interrupts so far (:func:`rx_interrupts`)."""
    return rx_interrupts(guest.run("cat /proc/interrupts").output)


def _iperf_json(guest: Guest, args: str, duration: float, prefix: str = "") -> dict[str, Any]:
    out = guest.run(f"{prefix}iperf3 -c {HOST_IP} -i 0 -J {args}", timeout=duration + 60).output
    data: dict[str, Any] = json.loads(out)
    if "error" in data:
        raise RuntimeError(f"iperf3 {args}: {data['error']}")
    return data


def _tcp_gbps(data: dict[str, Any]) -> float:
    return float(data["end"]["sum_received"]["bits_per_second"]) / 1e9


def _udp_pps(data: dict[str, Any]) -> tuple[float, float]:
    sent, received = data["end"]["sum_sent"], data["end"]["sum_received"]
    sent_pps = sent["packets"] / sent["seconds"]
    received_pps = received["bytes"] / UDP_PAYLOAD / received["seconds"]
    return sent_pps, received_pps


def tap_drops_to_guest(ns: NetNS, tap: str | None) -> int:
    """The kernel's transmit drops on ``tap`` in ``ns`` so far (frames for the
    guest its full queue refused); 0 without a tap."""
    if tap is None:
        return 0
    drops = netdev_drops(tap, ns.run(["cat", NETDEV_STATS]).stdout)
    if drops is None:
        raise RuntimeError(f"{tap} is not in {NETDEV_STATS} of namespace {ns.name}")
    return drops[1]


@dataclass(frozen=True)
class Flood:
    """One 64-byte UDP flood into the guest (iperf3 ``-b 0 -R``, as fast as the
    host's iperf3 can send), every figure per second of the run."""

    sent_pps: float
    #: what the guest's iperf3 read
    received_pps: float
    #: what the guest's NIC took (``ethtool -S`` rx packets, every queue)
    nic_pps: float
    #: what the guest's UDP sockets dropped for want of room (RcvbufErrors)
    socket_drops_pps: float
    #: what the host's kernel dropped on the tap facing the guest (0 without one)
    tap_drops_pps: float
    #: host CPU of QEMU's main thread and the backend's processes per NIC frame
    backend_us_per_frame: float
    #: the guest's receive interrupts
    rx_irqs_per_s: float


def udp_flood(
    guest: Guest,
    ns: NetNS,
    *,
    seconds: int,
    streams: int,
    prefix: str = "",
    backend_pid: int | None = None,
    tap: str | None = None,
) -> Flood:
    """Flood the guest with 64-byte UDP for ``seconds`` from an iperf3 server
    running in ``ns`` (the guest's iperf3 runs ``-R``, behind ``prefix``), and
    count where the frames went."""
    before = guest_rx_counters(guest)
    cpu0 = backend_cpu_seconds(guest, backend_pid)
    irq0 = guest_rx_interrupts(guest)
    tap0 = tap_drops_to_guest(ns, tap)
    args = f"-u -l {UDP_PAYLOAD} -b 0 -P {streams} -t {seconds} -R"
    sent, received = _udp_pps(_iperf_json(guest, args, seconds, prefix=prefix))
    tap_dropped = tap_drops_to_guest(ns, tap) - tap0
    irqs = guest_rx_interrupts(guest) - irq0
    cpu1 = backend_cpu_seconds(guest, backend_pid)
    after = guest_rx_counters(guest)
    frames = after[0] - before[0]
    return Flood(
        sent_pps=sent,
        received_pps=received,
        nic_pps=frames / seconds,
        socket_drops_pps=(after[1] - before[1]) / seconds,
        tap_drops_pps=tap_dropped / seconds,
        backend_us_per_frame=1e6 * (cpu1 - cpu0) / max(1, frames),
        rx_irqs_per_s=irqs / seconds,
    )


def measure_guest_network(
    netdev_args: Sequence[str],
    *,
    ns: NetNS,
    queues: int,
    label: str,
    after_boot: Callable[[Guest], None] | None = None,
    duration: float = 5.0,
    streams: int = 4,
    smp: int = 2,
    memory_mb: int = 512,
    pin_guest: bool = True,
    backend_pid: int | None = None,
    udp_rates: Sequence[int] = DEFAULT_UDP_RATES,
    tap: str | None = None,
) -> GuestNetFigures:
    """Boot a guest with ``netdev_args`` and measure TCP and 64-byte UDP both ways.

    ``ns`` must hold ``10.77.0.1`` on the link facing the guest by the time
    ``after_boot(guest)`` returns (for QEMU's tap, ``after_boot`` moves the tap
    into ``ns``; a vhost-user backend may have set it up before).  The guest
    gets ``10.77.0.2/24`` and ``queues`` combined channels; with
    ``pin_guest`` the NIC's interrupts go to vCPU 0 and iperf3 runs on the
    last vCPU (see the module docstring).  ``backend_pid``: a backend process
    outside QEMU (virtnet serve) whose process tree's CPU counts as the
    backend's, with QEMU's main thread.  ``udp_rates``: offered loads of the
    host->guest load-response ladder, run after the flood (empty: none).
    ``tap``: the tap in ``ns`` facing the guest, whose kernel drops during the
    flood are counted.
    """
    secs = max(1, round(duration))
    with Guest(netdev_args, ip=GUEST_CIDR, smp=smp, memory_mb=memory_mb) as guest:
        if after_boot is not None:
            after_boot(guest)
        guest.set_channels(queues)  # (re)sets the driver's IRQ affinity: pin after it
        prefix = pin_guest_placement(guest, smp) if pin_guest else ""
        if not guest.ping(HOST_IP, count=2):
            raise RuntimeError(f"guest cannot ping {HOST_IP}:\n{guest.console_tail()}")
        with ns.iperf3_server():

            def run(args: str) -> dict[str, Any]:
                return _iperf_json(guest, args, secs, prefix=prefix)

            tcp_tx = _tcp_gbps(run(f"-P {streams} -t {secs}"))
            irq0 = guest_rx_interrupts(guest)
            tcp_rx = _tcp_gbps(run(f"-P {streams} -t {secs} -R"))
            tcp_rx_irqs = guest_rx_interrupts(guest) - irq0

            def udp(bitrate: int) -> str:  # 0: as fast as iperf3 can
                return f"-u -l {UDP_PAYLOAD} -b {bitrate} -P {streams} -t {secs}"

            udp_tx = _udp_pps(run(udp(0)))
            flood = udp_flood(
                guest, ns, seconds=secs, streams=streams, prefix=prefix,
                backend_pid=backend_pid, tap=tap,
            )  # fmt: skip
            ladder = []
            for rate in udp_rates:
                got = _udp_pps(run(udp(per_stream_bitrate(rate, streams)) + " -R"))
                ladder.append((float(rate), got[1]))
        return GuestNetFigures(
            label=label,
            queues=queues,
            streams=streams,
            duration=secs,
            boot_seconds=guest.boot_seconds,
            tcp_guest_to_host_gbps=tcp_tx,
            tcp_host_to_guest_gbps=tcp_rx,
            udp64_guest_to_host_sent_pps=udp_tx[0],
            udp64_guest_to_host_received_pps=udp_tx[1],
            udp64_host_to_guest_sent_pps=flood.sent_pps,
            udp64_host_to_guest_received_pps=flood.received_pps,
            pin_guest=pin_guest,
            udp64_host_to_guest_nic_pps=flood.nic_pps,
            udp64_host_to_guest_socket_drops_pps=flood.socket_drops_pps,
            udp64_host_to_guest_tap_drops_pps=flood.tap_drops_pps,
            udp64_host_to_guest_backend_us_per_frame=flood.backend_us_per_frame,
            udp64_host_to_guest_ladder=tuple(ladder),
            udp64_host_to_guest_peak_pps=ladder_peak(ladder),
            vcpus=smp,
            tcp_host_to_guest_rx_irqs_per_s=tcp_rx_irqs / secs,
            udp64_host_to_guest_rx_irqs_per_s=flood.rx_irqs_per_s,
        )


def tap_baseline(
    *,
    queues: int = 4,
    duration: float = 5.0,
    streams: int = 4,
    pin_guest: bool = True,
    udp_rates: Sequence[int] = DEFAULT_UDP_RATES,
    vcpus: int = 2,
    packed: bool = False,
) -> GuestNetFigures:
    """The peer figure: QEMU's own multiqueue tap backend, ``vhost=off``
    (``packed``: the NIC's virtqueues packed, ``packed=on``)."""
    tap = unique_name("vntap")
    with NetNS() as ns:

        def plug(_guest: Guest) -> None:
            ns.move_link(tap)
            ns.set_address(tap, f"{HOST_IP}/24")

        return measure_guest_network(
            tap_netdev_args(tap, queues=queues, device_extra=device_extra(packed)),
            ns=ns,
            queues=queues,
            label="qemu tap,vhost=off" + (" (packed rings)" if packed else ""),
            after_boot=plug,
            duration=duration,
            streams=streams,
            tap=tap,
            pin_guest=pin_guest,
            udp_rates=udp_rates,
            smp=vcpus,
        )


def comma_ints(text: str) -> list[int]:
    """A command-line list such as ``1,2,4`` (blanks ignored; "" is empty)."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of numbers: {text!r}"
        ) from None


def int_list_arg(
    what: str, lo: int, hi: int | None = None, *, empty_ok: bool = False
) -> Callable[[str], tuple[int, ...]]:
    """An argparse ``type``: a comma-separated list (:func:`comma_ints`) of
    integers in ``lo..hi`` (no upper bound when ``hi`` is None), empty only
    with ``empty_ok``; ``what`` names them in the error."""
    bounds = f"{lo}..{hi}" if hi is not None else f">= {lo}"

    def parse(text: str) -> tuple[int, ...]:
        values = tuple(comma_ints(text))
        if (not values and not empty_ok) or any(
            v < lo or (hi is not None and v > hi) for v in values
        ):
            raise argparse.ArgumentTypeError(f"{what} must be {bounds}: {text!r}")
        return values

    return parse


#: ``--udp-rates``: comma-separated offered loads in pps ("" for no ladder).
udp_rates_arg = int_list_arg("rates (packets per second)", 1, empty_ok=True)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every guest-run bench takes (this one and ``guest_runs.py``)."""
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per iperf3 run")
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=1, help="boots; the median is printed")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--no-guest-pin",
        action="store_true",
        help="leave interrupts and iperf3 where the guest puts them (noisier)",
    )
    parser.add_argument(
        "--vcpus",
        type=int,
        default=2,
        choices=range(1, 9),
        metavar="N",
        help="the guest's vCPUs (default 2: on a 2-CPU host the backend then shares the"
        " vCPUs' CPUs; 1 leaves a CPU to the backend, as a deployment reserving cores would)",
    )
    parser.add_argument(
        "--udp-rates",
        type=udp_rates_arg,
        default=DEFAULT_UDP_RATES,
        help="offered loads (pps) of the 64-byte UDP host->guest ladder, comma-separated;"
        " '' skips it (default: 20000,35000,50000,65000,80000,100000)",
    )
    parser.add_argument(
        "--packed",
        action="store_true",
        help="give the NIC packed virtqueues (-device virtio-net-pci,packed=on) on every backend",
    )
    add_autogroup_argument(parser)


def device_extra(packed: bool) -> str:
    """The virtio-net-pci options of a run: ``packed=on`` for packed virtqueues."""
    return "packed=on" if packed else ""


def add_autogroup_argument(parser: argparse.ArgumentParser) -> None:
    """``--autogroup keep|on|off``: the setting :func:`autogroup` applies."""
    parser.add_argument(
        "--autogroup",
        choices=("keep", "on", "off"),
        default="keep",
        help="the kernel's autogroup scheduling for the run, put back afterwards"
        " (default: keep it)",
    )


def run_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of :func:`tap_baseline` (and of ``guest_runs``'
    ``virtnet_run``) that :func:`add_run_arguments` parsed into ``args``."""
    return {
        "duration": args.duration,
        "streams": args.streams,
        "pin_guest": not args.no_guest_pin,
        "udp_rates": args.udp_rates,
        "vcpus": args.vcpus,
        "packed": args.packed,
    }


@contextlib.contextmanager
def autogroup(setting: str) -> Iterator[str]:
    """``kernel.sched_autogroup_enabled`` set to ``setting`` (``on``, ``off``;
    ``keep`` leaves it) until the block ends; yields what is in force ("on",
    "off", or "absent" on a kernel without it)."""
    if not AUTOGROUP.exists():
        if setting != "keep":
            raise RuntimeError(f"{AUTOGROUP} is missing: this kernel has no autogroup")
        yield "absent"
        return
    old = AUTOGROUP.read_text().strip()
    if setting != "keep":
        AUTOGROUP.write_text("1" if setting == "on" else "0")
    try:
        yield "on" if AUTOGROUP.read_text().strip() == "1" else "off"
    finally:
        if setting != "keep":
            AUTOGROUP.write_text(old)


def can_boot() -> bool:
    """Whether a guest can boot here; says why not on stderr."""
    reason = skip_reason()
    if reason is not None:
        print(f"cannot boot a guest: {reason}", file=sys.stderr)
        return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queues", type=int, default=4)
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    if not can_boot():
        return 2
    runs = []
    with autogroup(args.autogroup) as grouping:
        print(f"autogroup scheduling: {grouping}", flush=True)
        for _ in range(max(1, args.repeat)):
            runs.append(tap_baseline(queues=args.queues, **run_options(args)))
            print(runs[-1].table(), flush=True)
    figures = summary_figures(runs)
    if len(runs) > 1:
        print(figures.table())
    if args.json:
        args.json.write_text(json.dumps(asdict(figures), indent=2) + "\n")
    return 0


def summary_figures(runs: Sequence[GuestNetFigures]) -> GuestNetFigures:
    """The figure a table shows: the median of several boots, or the one boot."""
    return median_figures(runs) if len(runs) > 1 else runs[0]


def median_figures(runs: Sequence[GuestNetFigures]) -> GuestNetFigures:
    """Field-wise median of several runs (TCG figures vary with host load)."""
    first = asdict(runs[0])
    merged: dict[str, Any] = {}
    for key, value in first.items():
        if isinstance(value, float):
            merged[key] = statistics.median(getattr(r, key) for r in runs)
        else:
            merged[key] = value
    if len({len(r.udp64_host_to_guest_ladder) for r in runs}) == 1:
        # rung by rung: the median received rate at each offered load
        merged["udp64_host_to_guest_ladder"] = tuple(
            (offered, statistics.median(r.udp64_host_to_guest_ladder[i][1] for r in runs))
            for i, (offered, _) in enumerate(runs[0].udp64_host_to_guest_ladder)
        )
    merged["label"] = f"{first['label']} (median of {len(runs)})"
    return GuestNetFigures(**merged)


if __name__ == "__main__":
    sys.exit(main())
