"""Xen netif vs virtio (vhost-user) packets per second, per queue, for 1/2/4 queues.

Both paths are measured in the same run, on the same machine, with the same
shape: a guest-side generator process per queue, a backend worker process
per queue, a ``loopback`` host port that returns every frame on the queue it
arrived on, 64-byte frames, rings of 256 entries.

* **xen**: ``virtnet xen demo`` -- xenstored + hypervisor, netback, netfront
  as three processes (grant-mapped memfd pages, eventfd event channels,
  control ring with Toeplitz steering).  netfront keeps at most 120 frames
  in flight per queue and checks every frame it gets back (sequence per
  flow); the figure is frames received back per second per queue.
* **virtio**: ``virtnet serve --port loopback`` (vhost-user backend,
  one worker per pair) driven by ``virtnet pktgen`` (vhost-user frontend,
  one process per pair, open loop: it refills the tx ring as fast as the
  backend consumes it); the figure is rx pps per pair (frames that made the
  round trip).

The in-process figures, one queue: the Xen ring code alone (frontend queue
-> netback queue -> loopback -> back) and the virtio device + driver
(``virtnet demo``'s round trip), each in one process with no notifications
or scheduling -- the per-packet cost of each ring format in this code base.

Caveat, by design of the tools: pktgen's pair processes busy-poll their
rings, netfront's sleep on their event channels.  On a machine with fewer
CPUs than 2 x queues the virtio generator competes with its own backend.

Usage: python bench/xen_pps.py [--seconds 3] [--queues 1 2 4]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from virtnet.demo import run_demo as virtio_demo
from virtnet.pktgen import run_pktgen
from virtnet.ports import make_port
from virtnet.testing.procs import stop_process
from virtnet.xen.datapath import BackendQueue, FrontendQueue
from virtnet.xen.demo import run_demo
from virtnet.xen.grant import DomainMemory, GrantMapper, GrantTable
from virtnet.xen.netfront import flow_frame

RING = 256


def in_process_pps(packets: int = 50_000) -> float:
    mem = DomainMemory.create("bench", 1024, 2)
    gt = GrantTable(mem)
    fq = FrontendQueue(0, gt, 0)
    mapper = GrantMapper(mem, domid=0, granter=1)
    bq = BackendQueue(
        0,
        mapper.map(fq.tx_ring_ref),
        mapper.map(fq.rx_ring_ref),
        mapper,
        make_port("loopback").open_queue("bench", 0),
    )
    frame = flow_frame(10000, 64)
    got = [0]

    def deliver(_b: memoryview) -> None:
        got[0] += 1

    t0 = time.perf_counter()
    seq = 0
    while got[0] < packets:
        fq.post_rx()
        for _ in range(64):
            slot = fq.tx_free.pop()
            buf = fq.tx_bufs[slot]
            buf[:64] = frame
            struct.pack_into(">Q", buf, 54, seq)
            seq += 1
            fq.queue_tx(slot, 64)
        fq.push_tx()
        bq.process_tx()
        bq.process_rx()
        fq.reap_tx()
        fq.reap_rx(deliver)
    return got[0] / (time.perf_counter() - t0)


def virtio_in_process_pps(seconds: float = 1.5) -> float:
    res, _dev, _drv = virtio_demo(queues=1, flows=4, seconds=seconds)
    return res.received / res.elapsed


def xen_run(queues: int, seconds: float) -> tuple[list[float], str]:
    """Per-queue received pps of ``virtnet xen demo`` and a status word."""
    rc, out, bout = run_demo(queues, seconds, quiet=True)
    pps = [float(m.replace(",", "")) for m in re.findall(r"pps=([\d,]+)", out)]
    lost = sum(int(m) for m in re.findall(r"lost=(\d+)", out))
    status = "OK" if rc == 0 and len(pps) == queues else f"FAILED rc={rc}"
    if status != "OK":
        sys.stderr.write(out + bout)
    return pps, f"{status}, lost={lost}"


@contextlib.contextmanager
def serve_loopback(queues: int) -> Iterator[str]:
    """``virtnet serve --port loopback`` on a fresh socket; stopped afterwards."""
    with tempfile.TemporaryDirectory(prefix="virtnet-bench-") as tmp:
        sock = Path(tmp) / "vm.sock"
        proc = subprocess.Popen(
            [sys.executable, "-m", "virtnet.cli", "serve", "--port", "loopback",
             "--queues", str(queues), "--socket", str(sock)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            end = time.monotonic() + 20
            while not sock.exists():
                if proc.poll() is not None or time.monotonic() > end:
                    raise RuntimeError("virtnet serve did not create its socket")
                time.sleep(0.05)
            yield str(sock)
        finally:
            stop_process(proc)


def virtio_run(queues: int, seconds: float) -> tuple[list[float], str]:
    """Per-pair rx pps of ``virtnet pktgen`` against ``virtnet serve --port loopback``."""
    with serve_loopback(queues) as sock:
        res = run_pktgen(sock, queues=queues, seconds=seconds, queue_size=RING, flows=4 * queues)
    pps = [q.rx_kpps * 1e3 for q in res.queues]
    status = "OK" if not res.failed_pairs else f"FAILED pairs {res.failed_pairs}"
    return pps, f"{status}, tx={res.tx_packets} rx={res.rx_packets}"


def _fmt(pps: list[float]) -> str:
    return " ".join(f"{p / 1e3:,.1f}" for p in pps)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--queues", type=int, nargs="+", default=[1, 2, 4])
    args = ap.parse_args()
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}, "
          f"{os.cpu_count()} CPUs, {args.seconds:g} s per run, 64-byte frames")  # fmt: skip
    xen1 = in_process_pps()
    vio1 = virtio_in_process_pps()
    print(f"one process, one queue, no notifications: xen rings {xen1 / 1e3:,.1f} kpps, "
          f"virtio device+driver {vio1 / 1e3:,.1f} kpps, xen/virtio {xen1 / vio1:.2f}")  # fmt: skip
    print()
    print("| queues | xen kpps per queue | xen total | virtio kpps per queue | virtio total "
          "| xen/virtio | xen status | virtio status |")  # fmt: skip
    print("|---:|---|---:|---|---:|---:|---|---|")
    for nq in args.queues:
        xen, xen_status = xen_run(nq, args.seconds)
        vio, vio_status = virtio_run(nq, args.seconds)
        xt, vt = sum(xen), sum(vio)
        ratio = f"{xt / vt:.2f}" if vt else "n/a"
        print(f"| {nq} | {_fmt(xen)} | {xt / 1e3:,.1f} | {_fmt(vio)} | {vt / 1e3:,.1f} "
              f"| {ratio} | {xen_status} | {vio_status} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
