"""``virtnet demo``: driver and device over one shared memory, no root, no VM.

Several UDP flows are sent by the driver (:mod:`virtnet.driver`) to the
device (:mod:`virtnet.device`), whose host side reflects each frame back as
the flow's reply (addresses and ports swapped).  Mid-run the number of queue
pairs is changed through the control queue, as ``ethtool -L eth0 combined N``
does in a guest.  Every frame carries its flow number and a sequence number,
so the driver can tell loss, duplication and reordering apart.

The run fails (exit status 1) if any frame was lost, duplicated or reordered,
or if a reply arrived on another queue pair than its request left on
(rx follows tx).
"""

from __future__ import annotations

import argparse
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table

from virtnet.device import VirtioNetDevice
from virtnet.driver import BumpAllocator, VirtioNetDriver
from virtnet.errors import UsageError
from virtnet.memory import GuestMemory
from virtnet.net import NetConfig, NetHdr, rx_index, tx_index

__all__ = ["DemoResult", "add_arguments", "build_frame", "run", "run_demo"]

GUEST_MAC = bytes.fromhex("525400000001")
PEER_MAC = bytes.fromhex("525400000002")
_ETH = struct.Struct("!6s6sH")
_IP = struct.Struct("!BBHHHBBH4s4s")
_UDP = struct.Struct("!HHHH")
_SEQ = struct.Struct("!II")
PAYLOAD_OFF = 14 + 20 + 8
MAX_QUEUES = 64


def build_frame(flow: int, seq: int, size: int = 64) -> bytes:
    """An Ethernet/IPv4/UDP frame of flow ``flow`` carrying ``seq``."""
    payload_len = max(size - PAYLOAD_OFF, _SEQ.size)
    dst = bytes((10, 77, 1 + flow // 250, 1 + flow % 250))
    ip = _IP.pack(0x45, 0, 20 + 8 + payload_len, 0, 0, 64, 17, 0, bytes((10, 77, 0, 1)), dst)
    udp = _UDP.pack(40000 + flow, 7, 8 + payload_len, 0)
    body = _SEQ.pack(flow, seq).ljust(payload_len, b"\x00")
    return _ETH.pack(PEER_MAC, GUEST_MAC, 0x0800) + ip + udp + body


def reflect(frame: bytes | memoryview) -> bytes:
    """The reply a host-side echo would send: MACs, IPs and UDP ports swapped."""
    f = bytearray(frame)
    f[0:6], f[6:12] = f[6:12], f[0:6]
    f[26:30], f[30:34] = f[30:34], f[26:30]
    f[34:36], f[36:38] = f[36:38], f[34:36]
    return bytes(f)


@dataclass
class DemoResult:
    sent: int = 0
    received: int = 0
    lost: int = 0
    duplicated: int = 0
    reordered: int = 0
    misrouted: int = 0  # reply not on the pair its request left on
    tx_dropped: int = 0
    switches: list[int] = field(default_factory=list)
    driver_stats: dict[str, int] = field(default_factory=dict)
    device_rx_drops: int = 0
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.reordered or self.misrouted)


def _schedule(queues: int) -> list[int]:
    """Queue counts to visit: all, one, half, all (each distinct step kept)."""
    steps = [queues, 1, max(1, queues // 2), queues]
    out: list[int] = []
    for s in steps:
        if not out or out[-1] != s:
            out.append(s)
    return out


def run_demo(
    queues: int = 4,
    flows: int = 16,
    seconds: float = 2.0,
    size: int = 64,
    clock: Callable[[], float] = time.monotonic,
    progress: Callable[[str], None] | None = None,
) -> tuple[DemoResult, VirtioNetDevice, VirtioNetDriver]:
    """Run the demo; returns the result, the device and the driver for inspection."""
    if not 1 <= queues <= MAX_QUEUES:
        raise UsageError(f"--queues must be within 1..{MAX_QUEUES}")
    if flows < 1 or seconds <= 0:
        raise UsageError("--flows must be >= 1 and --seconds > 0")
    if not PAYLOAD_OFF + _SEQ.size <= size <= 1514:
        raise UsageError(f"--size must be within {PAYLOAD_OFF + _SEQ.size}..1514")
    mem = GuestMemory.anonymous(max(64 << 20, queues * 8 << 20))
    config = NetConfig(mac=GUEST_MAC, max_virtqueue_pairs=queues)
    res = DemoResult()
    sent_on: dict[int, int] = {}
    expected = [0] * flows

    box: list[VirtioNetDevice] = []

    def host_side(pair: int, hdr: NetHdr, frame: memoryview) -> None:
        del hdr
        if len(frame) >= PAYLOAD_OFF + _SEQ.size:
            flow, _ = _SEQ.unpack_from(frame, PAYLOAD_OFF)
            sent_on[flow] = pair
        box[0].deliver(reflect(frame), clock())

    device = VirtioNetDevice(mem, config, tx_sink=host_side)
    box.append(device)

    def pump() -> None:
        device.process_ctrl(clock())

    driver = VirtioNetDriver(
        mem, BumpAllocator(0x1000, len(mem.regions[0].buf)), config, device.offered, pump=pump
    )
    device.set_driver_features(driver.features)
    for index in range(driver.num_vqs):
        size_, d, a, u = driver.vq_layout(index)
        device.attach_queue(index, size_, d, a, u)

    def check(frames_pairs: list[tuple[int, bytes]]) -> None:
        for pair, data in frames_pairs:
            if len(data) < PAYLOAD_OFF + _SEQ.size:
                continue
            flow, seq = _SEQ.unpack_from(data, PAYLOAD_OFF)
            if flow >= flows:
                continue
            res.received += 1
            exp = expected[flow]
            if seq == exp:
                expected[flow] = exp + 1
            elif seq > exp:
                res.lost += seq - exp
                expected[flow] = seq + 1
            elif seq < exp:
                res.reordered += 1
            if sent_on.get(flow) != pair:
                res.misrouted += 1

    schedule = _schedule(queues)
    phase_len = seconds / len(schedule)
    seqs = [0] * flows
    start = clock()
    phase = -1
    burst = 8
    while True:
        now = clock()
        elapsed = now - start
        if elapsed >= seconds:
            break
        want = min(int(elapsed / phase_len), len(schedule) - 1)
        if want != phase:
            phase = want
            n = schedule[phase]
            ok = driver.set_queue_pairs(n)
            if not ok:
                raise RuntimeError(f"device refused VQ_PAIRS_SET({n})")
            res.switches.append(n)
            # Packets delivered under the old setting are still in old queues:
            # reap them before anything else, as a NAPI poll of every queue would.
            check([(f.pair, f.data) for f in driver.receive_all()])
            if progress is not None:
                progress(f"t={elapsed:5.2f}s  queue pairs -> {n}")
        for flow in range(flows):
            for _ in range(burst):
                frame = build_frame(flow, seqs[flow], size)
                if driver.transmit([frame]):
                    seqs[flow] += 1
                else:
                    res.tx_dropped += 1
            if flow % 4 == 3:
                device.process_all_tx(clock())
        device.process_all_tx(clock())
        check([(f.pair, f.data) for f in driver.receive_all()])
        device.take_interrupts()
    device.drain_tx(clock())
    check([(f.pair, f.data) for f in driver.receive_all()])
    res.elapsed = clock() - start
    res.sent = sum(seqs)
    # Frames still unanswered at the end count as lost.
    res.lost += sum(s - e for s, e in zip(seqs, expected, strict=True) if s > e)
    res.duplicated = max(0, res.received - res.sent - res.reordered)
    res.driver_stats = driver.stats()
    res.device_rx_drops = sum(s.rx_drops for s in device.stats)
    return res, device, driver


def render(
    res: DemoResult, device: VirtioNetDevice, driver: VirtioNetDriver, console: Console
) -> None:
    st = res.driver_stats
    table = Table(title=f"virtnet demo: {driver.max_pairs} queue pairs, switches {res.switches}")
    for col in ("pair", "vqs", "rx packets", "rx bytes", "tx packets", "tx bytes", "drops"):
        table.add_column(col, justify="right", no_wrap=True)
    for p in range(driver.max_pairs):
        table.add_row(
            str(p),
            f"{rx_index(p)}/{tx_index(p)}",
            f"{st[f'rx_queue_{p}_packets']:,}",
            f"{st[f'rx_queue_{p}_bytes']:,}",
            f"{st[f'tx_queue_{p}_packets']:,}",
            f"{st[f'tx_queue_{p}_bytes']:,}",
            f"{st[f'rx_queue_{p}_drops'] + st[f'tx_queue_{p}_drops'] + device.stats[p].rx_drops}",
        )
    console.print(table)
    rate = res.sent / res.elapsed if res.elapsed else 0.0
    console.print(
        f"sent {res.sent:,}  received {res.received:,}  lost {res.lost}"
        f"  duplicated {res.duplicated}"
        f"  reordered {res.reordered}  misrouted {res.misrouted}  tx-full {res.tx_dropped}"
        f"  ({rate:,.0f} round trips/s in one process)"
    )
    verdict = "[green]OK[/green]" if res.ok else "[red]FAILED[/red]"
    console.print(f"result: {verdict}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--queues", type=int, default=4, help="queue pairs (default 4)")
    parser.add_argument("--flows", type=int, default=16, help="concurrent flows (default 16)")
    parser.add_argument("--seconds", type=float, default=2.0, help="run time (default 2)")
    parser.add_argument("--size", type=int, default=64, help="frame size in bytes (default 64)")


def run(args: argparse.Namespace) -> int:
    console = Console(stderr=False)
    res, device, driver = run_demo(
        args.queues, args.flows, args.seconds, args.size, progress=console.print
    )
    render(res, device, driver, console)
    return 0 if res.ok else 1


if __name__ == "__main__":  # pragma: no cover
    p = argparse.ArgumentParser()
    add_arguments(p)
    sys.exit(run(p.parse_args()))
