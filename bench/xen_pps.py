"""Xen netif packets per second, per queue, for 1/2/4 queues (64-byte frames, loopback port).

Each configuration runs the real three-process demo (xenstored + hypervisor,
netback, netfront) and reports the frontend's received pps per queue.  The
peer figure from the same run is the in-process ceiling: the same ring code
(frontend queue -> netback queue -> loopback -> back) driven in one process
with no event channels or scheduling, i.e. what one core can do at best.

Usage: python bench/xen_pps.py [--seconds 3] [--queues 1 2 4]
"""

from __future__ import annotations

import argparse
import re
import struct
import time

from virtnet.ports import make_port
from virtnet.xen.datapath import BackendQueue, FrontendQueue
from virtnet.xen.demo import run_demo
from virtnet.xen.grant import DomainMemory, GrantMapper, GrantTable
from virtnet.xen.netfront import flow_frame


def in_process_pps(packets: int = 100_000) -> float:
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--queues", type=int, nargs="+", default=[1, 2, 4])
    args = ap.parse_args()
    peer = in_process_pps()
    print(f"peer: in-process ring round trip, one core: {peer:,.0f} pps")
    for nq in args.queues:
        rc, out, _ = run_demo(nq, args.seconds, quiet=True)
        pps = [float(m.replace(",", "")) for m in re.findall(r"pps=([\d,]+)", out)]
        total = sum(pps)
        per = " ".join(f"q{i}={p:,.0f}" for i, p in enumerate(pps))
        status = "OK" if rc == 0 else f"FAILED rc={rc}"
        print(f"xen {nq} queue(s): total {total:,.0f} pps  per queue: {per}  [{status}]")


if __name__ == "__main__":
    main()
