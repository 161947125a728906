"""ARP requests through the switch, answered by it or flooded (``--neigh-suppress``).

An in-process :class:`~virtnet.ports.switch.Switch` joins ``--vms`` VMs (one
pair each, ``SOCK_SEQPACKET`` socketpairs, as serve's switch process has them),
each held to one MAC and one IPv4 address (``set_macs``, ``set_ips``).  Each
round VM 0 sends ``--burst`` ARP requests for VM 1's address; the switch runs
until it has handled them all, then every VM is drained; only the switch's part
(``poll_once`` until idle) is timed.  Two switches, alternated round by round in
the same process: ``flood`` (the default: every request goes to the other
``vms - 1`` VMs, each of whose workers would wake to read it) and ``suppress``
(the switch answers each request to VM 0 alone).

Prints requests per second (median of ``--repeat`` rounds), the frames each
delivered per request, and the ratio suppress / flood.  Run: ``python
bench/switch_neigh.py [--vms 8] [--burst 100] [--repeat 30]``.  No root, no VM.
"""

from __future__ import annotations

import argparse
import statistics
import struct
import sys
import time
from collections.abc import Sequence

from virtnet.ports import VNET_HDR_LEN, SocketQueue
from virtnet.ports.switch import Switch

#: At most this many VMs: each holds two sockets of the process.
MAX_BENCH_VMS = 256


def mac(i: int) -> bytes:
    return bytes([0x52, 0x54, 0, 0, i >> 8, i & 0xFF])


def ip(i: int) -> bytes:
    return bytes([10, 0, i >> 8, i & 0xFF])


def arp_request(asker: int, target: int) -> bytes:
    """VM ``asker``'s broadcast ARP request for VM ``target``'s address."""
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, mac(asker), ip(asker), bytes(6),
                      ip(target))  # fmt: skip
    return bytes(VNET_HDR_LEN) + b"\xff" * 6 + mac(asker) + b"\x08\x06" + arp


def _drain(q: SocketQueue, buf: memoryview) -> int:
    got = 0
    while q.recv_into([buf[:VNET_HDR_LEN], buf[VNET_HDR_LEN:]]):
        got += 1
    return got


def build(vms: int, suppress: bool) -> tuple[Switch, list[SocketQueue]]:
    sw = Switch()
    queues = [sw.open_queue(f"vm{i}", 0) for i in range(vms)]
    for i in range(vms):
        sw.set_macs(f"vm{i}", [mac(i)])
        sw.set_ips(f"vm{i}", [ip(i)])
    sw.set_neigh_suppress(suppress)
    return sw, queues


def one_round(
    sw: Switch, queues: list[SocketQueue], frame: memoryview, burst: int
) -> tuple[float, int]:
    """(requests per second through the switch, frames delivered) for one burst."""
    for _ in range(burst):
        if not queues[0].send([frame[:VNET_HDR_LEN], frame[VNET_HDR_LEN:]]):
            raise RuntimeError("the socket to the switch is full: lower --burst")
    t0 = time.perf_counter()
    while sw.poll_once(0):
        pass
    dt = time.perf_counter() - t0
    buf = memoryview(bytearray(2048))
    return burst / dt, sum(_drain(q, buf) for q in queues)


def bench_args(argv: Sequence[str] | None, doc: str, what: str) -> argparse.Namespace:
    """``--vms``, ``--burst`` and ``--repeat`` (of ``what``), checked."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n", maxsplit=1)[0])
    ap.add_argument("--vms", type=int, default=8, help="VMs on the switch (default 8)")
    ap.add_argument("--burst", type=int, default=100, help=f"{what} per round (default 100)")
    ap.add_argument("--repeat", type=int, default=30, help="rounds per switch (default 30)")
    args = ap.parse_args(argv)
    if not 2 <= args.vms <= MAX_BENCH_VMS:
        ap.error(f"--vms must be 2..{MAX_BENCH_VMS}")
    if args.burst < 1 or args.repeat < 1:
        ap.error("--burst and --repeat must be positive")
    return args


def alternate(
    setups: dict[str, tuple[Switch, list[SocketQueue]]],
    frames: dict[str, memoryview],
    burst: int,
    repeat: int,
) -> tuple[dict[str, list[float]], dict[str, int]]:
    """``repeat`` rounds of ``burst`` of its frame through each switch, in
    turn (the order reversed every other round), then every switch closed:
    each one's rates (frames a second through the switch) and the frames it
    delivered in all."""
    rates: dict[str, list[float]] = {name: [] for name in setups}
    delivered: dict[str, int] = dict.fromkeys(setups, 0)
    try:
        for r in range(repeat):
            for name in setups if r % 2 == 0 else reversed(list(setups)):
                sw, queues = setups[name]
                rate, got = one_round(sw, queues, frames[name], burst)
                rates[name].append(rate)
                delivered[name] += got
    finally:
        for sw, queues in setups.values():
            sw.close()
            for q in queues:
                q.close()
    return rates, delivered


def main(argv: Sequence[str] | None = None) -> int:
    args = bench_args(argv, __doc__, "requests")
    setups = {name: build(args.vms, name == "suppress") for name in ("flood", "suppress")}
    frame = memoryview(arp_request(0, 1))
    rates, delivered = alternate(setups, dict.fromkeys(setups, frame), args.burst, args.repeat)
    sent = args.repeat * args.burst
    print(f"{args.vms} VMs, {args.repeat} rounds of {args.burst} ARP requests vm0 -> vm1, medians:")
    for name, rs in rates.items():
        print(f"  {name:8s} {statistics.median(rs) / 1e3:8.1f} krequests/s  "
              f"({delivered[name] / sent:.1f} frames delivered a request)")  # fmt: skip
    ratio = statistics.median(rates["suppress"]) / statistics.median(rates["flood"])
    print(f"  suppress / flood = {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
