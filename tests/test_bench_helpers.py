"""The benches' measuring helpers that need no VM (bench/guest_tap_baseline.py,
virtnet.testing.procs)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import pytest


@pytest.fixture(scope="module")
def baseline(bench_module: Callable[[str], ModuleType]) -> ModuleType:
    return bench_module("guest_tap_baseline")


SPIN = """
import time
t = time.process_time()
while time.process_time() - t < 0.3:
    pass
print("spun", flush=True)
time.sleep(60)
"""


def test_tree_cpu_seconds_counts_the_descendants() -> None:
    """A child that burnt 0.3 s of CPU counts towards its own tree and ours,
    and not towards a tree it is not in."""
    import os

    from virtnet.testing.procs import cpu_seconds, tree_cpu_seconds

    before = tree_cpu_seconds(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", SPIN], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "spun"
        assert cpu_seconds(child.pid) >= 0.25
        assert cpu_seconds(child.pid, tid=child.pid) >= 0.25  # its main thread spun
        assert tree_cpu_seconds(child.pid) >= 0.25
        assert tree_cpu_seconds(os.getpid()) - before >= 0.25
        assert tree_cpu_seconds(1) >= tree_cpu_seconds(child.pid)
    finally:
        child.kill()
        child.wait()
    assert cpu_seconds(child.pid) == 0.0  # gone


class _Result(NamedTuple):
    status: int
    output: str


class _FakeGuest:
    def __init__(self, snmp: str) -> None:
        self.snmp = snmp

    def ethtool_stats(self) -> dict[str, int]:
        return {"rx_queue_0_packets": 5, "rx_queue_1_packets": 7, "tx_queue_0_packets": 100}

    def run(self, command: str) -> _Result:
        assert command == "cat /proc/net/snmp"
        return _Result(0, self.snmp)


SNMP = """Ip: Forwarding DefaultTTL
Ip: 2 64
Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors
Udp: 120 0 33 4 33 0
UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors
UdpLite: 0 0 0 0 0 0
"""


def test_guest_rx_counters_reads_nic_rx_and_udp_rcvbuf_errors(baseline: ModuleType) -> None:
    assert baseline.guest_rx_counters(_FakeGuest(SNMP)) == (12, 33)


def test_guest_rx_counters_without_udp_counters_is_an_error(baseline: ModuleType) -> None:
    with pytest.raises(RuntimeError, match="RcvbufErrors"):
        baseline.guest_rx_counters(_FakeGuest("Ip: Forwarding\nIp: 2\n"))


INTERRUPTS = """           CPU0       CPU1
  0:         45          0   IO-APIC   2-edge      timer
 24:          0          0   PCI-MSI 49152-edge      virtio0-config
 25:       1200         34   PCI-MSI 49153-edge      virtio0-input.0
 26:         10          0   PCI-MSI 49154-edge      virtio0-output.0
 27:          5        700   PCI-MSI 49155-edge      virtio0-input.1
 28:          1          1   PCI-MSI 49156-edge      virtio1-input.0
LOC:      99999      88888   Local timer interrupts
"""


def test_rx_interrupts_sums_every_input_queue_on_every_cpu(baseline: ModuleType) -> None:
    assert baseline.rx_interrupts(INTERRUPTS) == 1200 + 34 + 5 + 700
    assert baseline.rx_interrupts(INTERRUPTS, nic="virtio1") == 2


def test_rx_interrupts_without_the_nic_is_an_error(baseline: ModuleType) -> None:
    with pytest.raises(RuntimeError, match="virtio2-input"):
        baseline.rx_interrupts(INTERRUPTS, nic="virtio2")
    with pytest.raises(RuntimeError, match="empty"):
        baseline.rx_interrupts("")


def test_per_stream_bitrate_offers_the_total_rate_over_all_streams(baseline: ModuleType) -> None:
    # 40k pps over 4 streams: 10k datagrams/s of 64 payload bytes each per stream
    assert baseline.per_stream_bitrate(40_000, 4) == 10_000 * 64 * 8
    assert baseline.per_stream_bitrate(1, 8) == 64  # rounds, never 0 (iperf3 -b 0 floods)
    with pytest.raises(ValueError, match="positive"):
        baseline.per_stream_bitrate(0, 4)
    with pytest.raises(ValueError, match="positive"):
        baseline.per_stream_bitrate(1000, 0)


def test_ladder_peak_is_the_highest_received_rate(baseline: ModuleType) -> None:
    ladder = ((20e3, 19.9e3), (50e3, 48.7e3), (80e3, 41.0e3))  # livelock past the knee
    assert baseline.ladder_peak(ladder) == 48.7e3
    assert baseline.ladder_peak(()) == 0.0


def test_udp_rates_argument(baseline: ModuleType) -> None:
    import argparse

    assert baseline.udp_rates_arg("20000, 50000") == (20_000, 50_000)
    assert baseline.udp_rates_arg("") == ()
    for bad in ("20k", "0", "-5"):
        with pytest.raises(argparse.ArgumentTypeError):
            baseline.udp_rates_arg(bad)


def test_median_figures_takes_the_ladder_rung_by_rung(baseline: ModuleType) -> None:
    def fig(received: tuple[float, float], peak: float) -> object:
        return baseline.GuestNetFigures(
            label="x", queues=1, streams=4, duration=4, boot_seconds=1.0,
            tcp_guest_to_host_gbps=1.0, tcp_host_to_guest_gbps=1.0,
            udp64_guest_to_host_sent_pps=1.0, udp64_guest_to_host_received_pps=1.0,
            udp64_host_to_guest_sent_pps=1.0, udp64_host_to_guest_received_pps=1.0,
            udp64_host_to_guest_ladder=((20e3, received[0]), (50e3, received[1])),
            udp64_host_to_guest_peak_pps=peak,
        )  # fmt: skip

    runs = [fig((20e3, 40e3), 40e3), fig((19e3, 48e3), 48e3), fig((18e3, 45e3), 45e3)]
    merged = baseline.median_figures(runs)
    assert merged.udp64_host_to_guest_ladder == ((20e3, 19e3), (50e3, 45e3))
    assert merged.udp64_host_to_guest_peak_pps == 45e3
    assert "50k->45.0k" in merged.table()


def test_vcpus_option_reaches_the_figures(baseline: ModuleType) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    baseline.add_run_arguments(parser)
    assert parser.parse_args([]).vcpus == 2
    assert parser.parse_args(["--vcpus", "1"]).vcpus == 1
    with pytest.raises(SystemExit):
        parser.parse_args(["--vcpus", "0"])
    fig = baseline.GuestNetFigures(
        label="x", queues=1, streams=4, duration=4, boot_seconds=1.0,
        tcp_guest_to_host_gbps=1.0, tcp_host_to_guest_gbps=1.0,
        udp64_guest_to_host_sent_pps=1.0, udp64_guest_to_host_received_pps=1.0,
        udp64_host_to_guest_sent_pps=1.0, udp64_host_to_guest_received_pps=1.0, vcpus=1,
    )  # fmt: skip
    assert "vcpus=1 " in fig.table()
    assert baseline.median_figures([fig, fig]).vcpus == 1


@pytest.fixture(scope="module")
def guest_cpu(bench_module: Callable[[str], ModuleType]) -> ModuleType:
    return bench_module("guest_cpu")


def test_virtio_interrupts_names_every_vector_of_the_nic(guest_cpu: ModuleType) -> None:
    assert guest_cpu.virtio_interrupts(INTERRUPTS) == {
        "irq virtio0-config": 0,
        "irq virtio0-input.0": 1234,
        "irq virtio0-output.0": 10,
        "irq virtio0-input.1": 705,
    }
    assert guest_cpu.virtio_interrupts(INTERRUPTS, nic="virtio7") == {}
    with pytest.raises(RuntimeError, match="empty"):
        guest_cpu.virtio_interrupts("")


def test_rates_are_per_second_differences(guest_cpu: ModuleType) -> None:
    assert guest_cpu.rates({"a": 10, "b": 5}, {"a": 30, "b": 5, "c": 4}, 2.0) == {
        "a": 10.0,
        "b": 0.0,
        "c": 2.0,
    }


def test_thread_and_system_cpu_readings() -> None:
    """Our own threads are named and counted; the machine's busy ticks never
    exceed its total and both only grow; our process tree includes a child."""
    import os
    import threading

    from virtnet.testing.procs import system_cpu_ticks, thread_cpu_seconds, tree_pids

    stop = threading.Event()
    t = threading.Thread(target=stop.wait, name="vn-sleeper")
    t.start()
    try:
        threads = thread_cpu_seconds(os.getpid())
        assert os.getpid() in threads and len(threads) >= 2
        assert all(secs >= 0 for _name, secs in threads.values())
    finally:
        stop.set()
        t.join()
    busy0, total0 = system_cpu_ticks()
    t_end = time.process_time() + 0.05
    while time.process_time() < t_end:
        pass
    busy1, total1 = system_cpu_ticks()
    assert 0 <= busy0 <= total0 and busy1 >= busy0 and total1 > total0
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert os.getpid() in tree_pids(os.getpid()) and child.pid in tree_pids(os.getpid())
        assert tree_pids(child.pid) == [child.pid]
    finally:
        child.kill()
        child.wait()
    assert thread_cpu_seconds(child.pid) == {}


PING = """PING 10.78.0.2 (10.78.0.2) 56(84) bytes of data.
64 bytes from 10.78.0.2: icmp_seq=1 ttl=64 time=0.5 ms
64 bytes from 10.78.0.2: icmp_seq=2 ttl=64 time=0.5 ms
64 bytes from 10.78.0.2: icmp_seq=7 ttl=64 time=0.5 ms
64 bytes from 10.78.0.2: icmp_seq=8 ttl=64 time=0.5 ms

--- 10.78.0.2 ping statistics ---
10 packets transmitted, 4 received, 60% packet loss, time 90ms
"""


def test_network_gap_is_the_longest_silence(bench_module: Callable[[str], ModuleType]) -> None:
    """Replies to 1, 2, 7, 8 of 10: 3..6 (4 pings) is the longest gap, 9..10
    at the end is shorter; 6 lost.  No reply at all: all of it is the gap."""
    mig = bench_module("migration")
    assert mig.network_gap(PING, 10.0) == (10, 6, 40.0)
    tail = PING.replace("icmp_seq=7", "icmp_seq=3").replace("icmp_seq=8", "icmp_seq=4")
    assert mig.network_gap(tail, 10.0) == (10, 6, 60.0)  # 5..10 never answered
    assert mig.network_gap("5 packets transmitted, 0 received", 2.0) == (5, 5, 10.0)


def test_guest_steps_counts_stalls_and_failures(bench_module: Callable[[str], ModuleType]) -> None:
    """bench/guest_steps.py: a step below half the offered rate is a stall, a
    failed iperf3 (0 received) one too; the summary says both."""
    steps = bench_module("guest_steps").Steps(
        "virtnet", 80000, [79000.0, 39999.0, 40000.0, 0.0, 78000.0], 1
    )
    assert steps.stalls == 2
    text = steps.summary()
    assert "median 40,000 pps received" in text
    assert "lowest 0" in text and "stalls (< 50% of offered) 2" in text
    assert "iperf3 failures 1" in text


PING_FLOOD = """PING 10.77.0.2 (10.77.0.2) 4000(4028) bytes of data.

--- 10.77.0.2 ping statistics ---
9712 packets transmitted, 9710 received, 0.0205931% packet loss, time 3001ms
rtt min/avg/max/mdev = 0.172/0.295/2.180/0.061 ms, pipe 2, ipg/ewma 0.309/0.293 ms
"""


def test_guest_rr_parses_ping_flood_output(bench_module: Callable[[str], ModuleType]) -> None:
    """bench/guest_rr.py counts the replies and takes the mean round trip in us;
    a run without replies has no rtt line; output without a summary is an error."""
    rr = bench_module("guest_rr")
    assert rr.parse_ping(PING_FLOOD) == (9710, pytest.approx(295.0))
    assert rr.parse_ping("5 packets transmitted, 0 received, 100% packet loss") == (0, 0.0)
    with pytest.raises(ValueError, match="no ping summary"):
        rr.parse_ping("ping: connect: Network is unreachable")


def test_guest_rr_median_is_cell_by_cell(bench_module: Callable[[str], ModuleType]) -> None:
    rr = bench_module("guest_rr")
    boots = [
        [rr.RRFigure(56, 1, rate, rtt), rr.RRFigure(56, 4, 4 * rate, 2 * rtt)]
        for rate, rtt in ((100.0, 10.0), (300.0, 30.0), (200.0, 20.0))
    ]
    assert rr._median(boots) == [rr.RRFigure(56, 1, 200.0, 20.0), rr.RRFigure(56, 4, 800.0, 40.0)]
    with pytest.raises(ValueError):
        rr._median([boots[0], boots[1][:1]])


def test_guest_rr_queue_shares(bench_module: Callable[[str], ModuleType]) -> None:
    rr = bench_module("guest_rr")
    assert rr.shares({1: 30, 0: 10}) == (0.25, 0.75)
    assert rr.shares({0: 0, 1: 0}) == (0.0, 0.0)


@pytest.mark.root
@pytest.mark.skipif(sys.platform != "linux" or os.geteuid() != 0, reason="needs root (netns, tap)")
def test_tap_drops_are_read_inside_the_namespace(baseline: ModuleType) -> None:
    """The flood's host-side drops come from the namespace's /proc/net/dev:
    a tap there reads 0 before any traffic, a name not there is an error, and
    no tap (a backend without one) counts nothing."""
    from virtnet.testing.netns import NetNS, unique_name

    tap = unique_name("vndrop")
    with NetNS() as ns:
        ns.create_tap(tap)
        assert baseline.tap_drops_to_guest(ns, tap) == 0
        assert baseline.tap_drops_to_guest(ns, None) == 0
        with pytest.raises(RuntimeError, match="not in /proc/net/dev"):
            baseline.tap_drops_to_guest(ns, tap + "x")


def test_boot_ratios_pair_boots_in_order_and_sort_the_ratios(
    bench_module: Callable[[str], ModuleType], baseline: ModuleType
) -> None:
    """Boot i of virtnet is divided by boot i of QEMU's tap (not by the
    median), the ratios come lowest first, and a QEMU figure of 0 is left out."""
    runs = bench_module("guest_runs")

    def fig(flood: float) -> object:
        return baseline.GuestNetFigures(
            label="x", queues=1, streams=4, duration=4, boot_seconds=1.0,
            tcp_guest_to_host_gbps=1.0, tcp_host_to_guest_gbps=0.0,
            udp64_guest_to_host_sent_pps=1.0, udp64_guest_to_host_received_pps=1.0,
            udp64_host_to_guest_sent_pps=1.0, udp64_host_to_guest_received_pps=flood,
        )  # fmt: skip

    ours = [fig(50e3), fig(40e3), fig(60e3)]
    peer = [fig(40e3), fig(50e3), fig(60e3)]
    key = "udp64_host_to_guest_received_pps"
    assert runs.boot_ratios(ours, peer, key) == "0.80, 1.00, 1.25"
    assert runs.boot_ratios(ours, peer, "tcp_host_to_guest_gbps") == "-"
    with pytest.raises(ValueError):
        runs.boot_ratios(ours, peer[:2], key)


def test_guest_flood_summary_counts_interrupt_bound_floods_and_divides_by_qemu(
    bench_module: Callable[[str], ModuleType], baseline: ModuleType
) -> None:
    """Medians over every flood, the received rate's range, the floods under
    FEW_FRAMES_PER_IRQ NIC frames per interrupt, and the ratio to QEMU's row."""
    flood = bench_module("guest_flood")

    def f(received: float, nic: float, irqs: float) -> object:
        return baseline.Flood(
            sent_pps=1e6, received_pps=received, nic_pps=nic, socket_drops_pps=nic - received,
            tap_drops_pps=0.0, backend_us_per_frame=3.0, rx_irqs_per_s=irqs,
        )  # fmt: skip

    few = flood.FEW_FRAMES_PER_IRQ
    ours = flood.summarize(
        "virtnet", [f(50e3, 70e3, 60), f(30e3, 40e3, 40e3 / few + 1), f(45e3, 60e3, 60e3 / few)]
    )
    assert (ours.floods, ours.received_pps, ours.lowest_pps, ours.highest_pps) == (
        3, 45e3, 30e3, 50e3,
    )  # fmt: skip
    assert ours.nic_pps == 60e3 and ours.socket_drops_pps == 15e3
    assert ours.interrupt_bound == 1  # exactly FEW_FRAMES_PER_IRQ frames per interrupt is not
    peer = flood.summarize("qemu", [f(50e3, 52e3, 100)])
    rows = flood.table([ours, peer]).splitlines()
    assert rows[2].startswith("| virtnet | 3 | 45.0k | 0.90 | 30.0k-50.0k | 60.0k | 15.0k |")
    assert rows[3].startswith("| qemu | 1 | 50.0k | 1.00 |")
    assert "| - |" in flood.table([ours]).splitlines()[2]  # no QEMU row: no ratio
    with pytest.raises(ValueError, match="no floods"):
        flood.summarize("virtnet", [])


def test_guest_flood_tree_option_needs_a_virtnet_source_tree(
    bench_module: Callable[[str], ModuleType], tmp_path: Path
) -> None:
    """--tree NAME=SRC names a src/ holding the virtnet package, under a name
    that is not a built-in backend's."""
    flood = bench_module("guest_flood")
    src = Path(__file__).resolve().parent.parent / "src"
    assert flood.tree_arg(f"k8={src}") == ("k8", src)
    for bad in ("k8", f"={src}", "k8=", f"qemu={src}", f"virtnet={src}", f"k8={tmp_path}"):
        with pytest.raises(argparse.ArgumentTypeError):
            flood.tree_arg(bad)


def test_guest_flood_variant_option_splits_the_serve_options(
    bench_module: Callable[[str], ModuleType],
) -> None:
    """--variant NAME=OPTIONS: the installed tree, OPTIONS split as a shell
    would; a built-in name, an empty part or unbalanced quotes are refused."""
    flood = bench_module("guest_flood")
    got = flood.variant_arg("pin1=--pin 1 --poll-us '50'")
    assert got == flood.Backend("pin1", None, ("--pin", "1", "--poll-us", "50"))
    for bad in ("pin1", "=--pin 1", "pin1=", "pin1= ", "qemu=--pin 1", "virtnet=--pin 1",
                "pin1=--pin '1"):  # fmt: skip
        with pytest.raises(argparse.ArgumentTypeError):
            flood.variant_arg(bad)


def test_guest_flood_python_path_is_restored(
    bench_module: Callable[[str], ModuleType], monkeypatch: pytest.MonkeyPatch
) -> None:
    """serve is started with the tree first on PYTHONPATH (before what was
    there), and the variable is put back afterwards (set or unset)."""
    flood = bench_module("guest_flood")
    monkeypatch.delenv("PYTHONPATH", raising=False)
    with flood.python_path(Path("/x/src")):
        assert os.environ["PYTHONPATH"] == "/x/src"
    assert "PYTHONPATH" not in os.environ
    monkeypatch.setenv("PYTHONPATH", "/y")
    with flood.python_path(None):
        assert os.environ["PYTHONPATH"] == "/y"
    with flood.python_path(Path("/x/src")):
        assert os.environ["PYTHONPATH"] == f"/x/src{os.pathsep}/y"
    assert os.environ["PYTHONPATH"] == "/y"


def test_autogroup_setting_is_put_back(
    baseline: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--autogroup off writes 0 for the run and the old value afterwards,
    even when the run fails; keep writes nothing; a kernel without the file
    can only keep."""
    knob = tmp_path / "sched_autogroup_enabled"
    knob.write_text("1\n")
    monkeypatch.setattr(baseline, "AUTOGROUP", knob)
    with pytest.raises(KeyError), baseline.autogroup("off") as now:
        assert now == "off" and knob.read_text() == "0"
        raise KeyError
    assert knob.read_text() == "1"
    with baseline.autogroup("keep") as now:
        assert now == "on"
    monkeypatch.setattr(baseline, "AUTOGROUP", tmp_path / "missing")
    with baseline.autogroup("keep") as now:
        assert now == "absent"
    with pytest.raises(RuntimeError, match="no autogroup"), baseline.autogroup("on"):
        pass


@pytest.mark.root
def test_libvirt_cgroups_hold_the_placed_processes_and_go_afterwards(
    bench_module: Callable[[str], ModuleType],
) -> None:
    """--cgroups libvirt: a process placed as the backend runs in
    system.slice/virtnet.service, the groups the run made are gone afterwards
    and the process is back in the root; host places nothing."""
    mod = bench_module("cpu_cgroups")
    if os.geteuid() != 0:
        pytest.skip("making cgroups needs root")
    root, v2 = mod.cpu_hierarchy()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])

    def group() -> str:
        """The child's group in the cpu controller's hierarchy (v2: the one line "0::")."""
        for line in Path(f"/proc/{child.pid}/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if (controllers == "") if v2 else ("cpu" in controllers.split(",")):
                return path
        raise AssertionError("no cpu controller line in /proc/PID/cgroup")

    try:
        with mod.cgroups("host") as placement:
            placement.place("backend", [child.pid])
            assert group() == "/"
        with mod.cgroups("libvirt") as placement:
            placement.place("backend", [child.pid])
            assert group() == "/system.slice/virtnet.service"
            assert (root / "machine.slice" / "machine-qemu-vnbench.scope").is_dir()
            placement.place("sender", [2**22 + 1])  # no such process: nothing to move
        assert group() == "/"
        assert not (root / "system.slice" / "virtnet.service").exists()
    finally:
        child.kill()
        child.wait()


def test_switch_forward_bench_runs(
    bench_module: Callable[[str], ModuleType], capsys: pytest.CaptureFixture[str]
) -> None:
    """bench/switch_forward.py forwards every frame of every round in both variants."""
    assert bench_module("switch_forward").main(["--burst", "20", "--repeat", "3"]) == 0
    out = capsys.readouterr().out
    assert "open" in out and "locked" in out and "locked / open" in out
    assert bench_module("switch_forward").main(["--burst", "20", "--repeat", "2", "--ipv6"]) == 0
    out = capsys.readouterr().out
    assert "IPv6" in out and "learning / open" in out


def test_switch_neigh_bench_runs(
    bench_module: Callable[[str], ModuleType], capsys: pytest.CaptureFixture[str]
) -> None:
    """bench/switch_neigh.py: flooded, each request reaches the other VMs;
    suppressed, one answer reaches the asker."""
    assert bench_module("switch_neigh").main(["--vms", "4", "--burst", "10", "--repeat", "2"]) == 0
    out = capsys.readouterr().out
    assert "(3.0 frames delivered a request)" in out
    assert "(1.0 frames delivered a request)" in out


def test_switch_mcast_bench_runs(
    bench_module: Callable[[str], ModuleType], capsys: pytest.CaptureFixture[str]
) -> None:
    """bench/switch_mcast.py: flooded (no snooping, or a group nobody
    reported), each datagram reaches the other VMs; snooped, the one member."""
    assert bench_module("switch_mcast").main(["--vms", "4", "--burst", "10", "--repeat", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("(3.0 frames delivered a datagram)") == 2, out
    assert "snoop" in out and "(1.0 frames delivered a datagram)" in out, out
