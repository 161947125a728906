"""Device data-path rate per queue, in chains per second (issue: core).

Measures the device half only: a driver posts a full ring once, and between
batches the benchmark re-publishes the same descriptors by bumping the
available index (a free driver), so the figure is what one device queue can
serve on one core.

Paths measured, for 64-byte and 1500-byte frames:

* ``virtq``: pop a batch, push it back used (the ring mechanics alone);
* ``tx``:    the device's transmit path (header parsed, frame handed to a sink);
* ``rx``:    the device's receive path (steering, header written, frame copied
  into the guest's buffer, used entry pushed).

Peer figure from the same run: DPDK testpmd, virtio-user txonly into vhost
rxonly on one queue (``--no-huge --no-pci``), when ``dpdk-testpmd`` is here.

Usage: ``python bench/device_datapath.py [--seconds S] [--batch B] [--no-dpdk]``
"""

from __future__ import annotations

import argparse
import importlib
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from virtnet.demo import GUEST_MAC, build_frame, reflect
from virtnet.device import VirtioNetDevice
from virtnet.driver import BumpAllocator, VirtioNetDriver
from virtnet.memory import GuestMemory
from virtnet.net import NetConfig, NetHdr, rx_index, tx_index
from virtnet.virtq import DeviceQueue, DriverQueue, split_ring_layout

QSIZE = 256


def _timed(step: Callable[[], int], seconds: float) -> float:
    n = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while True:
        n += step()
        now = time.perf_counter()
        if now >= deadline:
            return n / (now - t0)


def bench_virtq(size: int, seconds: float, batch: int) -> float:
    mem = GuestMemory.anonymous(8 << 20)
    lay = split_ring_layout(QSIZE)
    drv = DriverQueue(mem, QSIZE, lay.desc, lay.avail, lay.used, event_idx=True)
    dev = DeviceQueue(mem, QSIZE, lay.desc, lay.avail, lay.used, event_idx=True)
    for i in range(QSIZE):
        drv.add([(0x100000 + i * 2048, size)], [], i)
    drv.publish()
    avail = mem.view(lay.avail, 6 + 2 * QSIZE).cast("H")

    def step() -> int:
        chains = dev.pop(batch)
        dev.push([(c.head, 0) for c in chains])
        dev.should_notify()
        avail[1] = (avail[1] + len(chains)) & 0xFFFF
        return len(chains)

    return _timed(step, seconds)


def _rig() -> tuple[GuestMemory, VirtioNetDevice, VirtioNetDriver]:
    mem = GuestMemory.anonymous(64 << 20)
    config = NetConfig(mac=GUEST_MAC, max_virtqueue_pairs=1)
    sink_count = [0]

    def sink(pair: int, hdr: NetHdr, frame: memoryview) -> None:
        sink_count[0] += 1

    dev = VirtioNetDevice(mem, config, tx_sink=sink)
    drv = VirtioNetDriver(mem, BumpAllocator(0x1000, 64 << 20), config, dev.offered)
    dev.set_driver_features(drv.features)
    for i in range(drv.num_vqs):
        dev.attach_queue(i, *drv.vq_layout(i))
    return mem, dev, drv


def bench_tx(size: int, seconds: float, batch: int) -> float:
    mem, dev, drv = _rig()
    frame = build_frame(0, 0, size)
    for _ in range(QSIZE):
        drv.transmit([frame], pair=0)
    drv.txqs[0].vq.publish()
    _, _, avail_addr, _ = drv.vq_layout(tx_index(0))
    avail = mem.view(avail_addr, 6 + 2 * QSIZE).cast("H")
    # The driver side never reclaims: re-publish the same ring contents.

    def step() -> int:
        n = dev.process_tx(0, 0.0, batch)
        avail[1] = (avail[1] + n) & 0xFFFF
        return n

    return _timed(step, seconds)


def bench_rx(size: int, seconds: float, batch: int) -> float:
    mem, dev, drv = _rig()
    frame = reflect(build_frame(0, 0, size))
    _, _, avail_addr, _ = drv.vq_layout(rx_index(0))
    avail = mem.view(avail_addr, 6 + 2 * QSIZE).cast("H")
    frames = [frame] * batch

    def step() -> int:
        n = dev.deliver_batch(frames, 0.0)
        dev.take_interrupts()
        avail[1] = (avail[1] + n) & 0xFFFF
        return n

    return _timed(step, seconds)


def bench_dpdk(seconds: float) -> float | None:
    """DPDK virtio-user txonly -> vhost rxonly, 64 B, one queue: packets per second."""
    dpdk = importlib.import_module("virtnet.testing.dpdk")
    if dpdk.skip_reason() is not None:
        return None
    with tempfile.TemporaryDirectory(prefix="vnbench") as tmp:
        sock = Path(tmp) / "vhost.sock"
        with dpdk.TestPmd.vhost(sock, queues=1, fwd="rxonly", lcores="0-1") as rx:
            rx.start_forwarding()
            return float(dpdk.virtio_user_txonly_pps(rx, sock, size=64, seconds=seconds))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--no-dpdk", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    results: dict[str, float] = {}
    for size in (64, 1500):
        for name, fn in (("virtq", bench_virtq), ("tx", bench_tx), ("rx", bench_rx)):
            results[f"{name}_{size}"] = fn(size, args.seconds, args.batch)
    peer = None if args.no_dpdk else bench_dpdk(args.seconds)
    if args.json:
        print(json.dumps({"chains_per_s": results, "dpdk_pps": peer}))
        return 0
    print(f"virtnet device data path, one queue, batch {args.batch}, queue size {QSIZE}")
    print(f"{'path':<8}{'size':>6}{'chains/s':>14}{'vs DPDK':>10}")
    for key, rate in results.items():
        name, size_s = key.split("_")
        ratio = f"{rate / peer:.3f}" if peer else "n/a"
        print(f"{name:<8}{size_s:>6}{rate:>14,.0f}{ratio:>10}")
    if peer:
        print(
            "peer: DPDK virtio-user -> vhost (testpmd txonly/rxonly, 64 B, 1 queue):"
            f" {peer:,.0f} pps"
        )
    else:
        print("peer: DPDK testpmd not available in this run")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
