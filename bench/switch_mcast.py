"""Datagrams to a multicast group through the switch, snooped or flooded (``--mcast-snoop``).

An in-process :class:`~virtnet.ports.switch.Switch` joins ``--vms`` VMs (one
pair each, ``SOCK_SEQPACKET`` socketpairs, as serve's switch process has
them); VM 1 alone has joined the group 239.1.1.1 (an IGMPv3 report, in
answer to the switch's query as querier, ``set_mcast_querier``).  Each
round VM 0 sends ``--burst`` UDP datagrams to a group; the switch runs until
it has handled them all, then every VM is drained; only the switch's part is
timed.  Three switches, alternated round by round in the same process:
``flood`` (no snooping, the default: every datagram goes to the other
``vms - 1`` VMs, each of whose workers would wake to read it), ``snoop``
(to VM 1 alone) and ``unreported`` (snooping, a group nobody reported:
still flooded, so what the lookup costs shows).  Each switch's clock runs
ahead of the wall clock by the querier's first second and the hosts'
response interval, so that snooping holds traffic back from the start.

Prints datagrams per second (median of ``--repeat`` rounds), the frames each
delivered per datagram, and the ratios against ``flood``.  Run: ``python
bench/switch_mcast.py [--vms 8] [--burst 100] [--repeat 30]``.  No root, no VM.
"""

from __future__ import annotations

import statistics
import struct
import sys
import time
from collections.abc import Sequence

from switch_neigh import _drain, alternate, bench_args, mac

from virtnet.net import inet_checksum
from virtnet.ports import VNET_HDR_LEN, SocketQueue
from virtnet.ports.mcast import RESPONSE_S
from virtnet.ports.switch import Switch

GROUP, OTHER = bytes([239, 1, 1, 1]), bytes([239, 2, 2, 2])
#: The switches compared, flood first (the ratios are against it).
SETUPS = ("flood", "snoop", "unreported")


def _ipv4(src: int, dst: bytes, proto: int, body: bytes, ttl: int) -> bytes:
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), 0, 0, ttl, proto, 0,
                                bytes([10, 0, 0, src]), dst))  # fmt: skip
    hdr[10:12] = struct.pack("!H", inet_checksum(hdr))
    return bytes(hdr) + body


def _to_group(src: int, group: bytes, ip: bytes) -> bytes:
    dst = bytes([1, 0, 0x5E, group[1] & 0x7F, group[2], group[3]])
    return bytes(VNET_HDR_LEN) + dst + mac(src) + b"\x08\x00" + ip


def report(vm: int, group: bytes) -> bytes:
    """VM ``vm``'s IGMPv3 report joining ``group`` (CHANGE_TO_EXCLUDE, no sources)."""
    igmp = bytearray(struct.pack("!BBHHHBBH4s", 0x22, 0, 0, 0, 1, 4, 0, 0, group))
    igmp[2:4] = struct.pack("!H", inet_checksum(igmp))
    return _to_group(
        vm, bytes([224, 0, 0, 22]), _ipv4(vm, bytes([224, 0, 0, 22]), 2, bytes(igmp), 1)
    )


def datagram(vm: int, group: bytes) -> bytes:
    """A 64-byte UDP datagram from VM ``vm`` to ``group``."""
    udp = struct.pack("!HHHH", 5000, 5000, 8 + 64, 0) + bytes(64)
    return _to_group(vm, group, _ipv4(vm, group, 17, udp, 4))


class _Clock:
    """The wall clock, ``skew`` seconds ahead."""

    def __init__(self) -> None:
        self.skew = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.skew


def build(vms: int, snoop: bool) -> tuple[Switch, list[SocketQueue]]:
    """A switch of ``vms`` VMs; snooping, it is the querier and VM 1 has
    joined GROUP in answer to its first query."""
    clock = _Clock()
    sw = Switch(clock=clock)
    queues = [sw.open_queue(f"vm{i}", 0) for i in range(vms)]
    buf = memoryview(bytearray(2048))

    def settle() -> None:
        while sw.poll_once(0):
            pass
        for q in queues:
            _drain(q, buf)

    if snoop:
        sw.set_mcast_querier(True)
        clock.skew += 1.0  # the first query
        sw.poll_once(0)
        f = memoryview(report(1, GROUP))
        queues[1].send([f[:VNET_HDR_LEN], f[VNET_HDR_LEN:]])
        settle()
        clock.skew += RESPONSE_S
    settle()
    return sw, queues


def main(argv: Sequence[str] | None = None) -> int:
    args = bench_args(argv, __doc__, "datagrams")
    frames = {
        "flood": memoryview(datagram(0, GROUP)),
        "snoop": memoryview(datagram(0, GROUP)),
        "unreported": memoryview(datagram(0, OTHER)),
    }
    setups = {name: build(args.vms, name != "flood") for name in SETUPS}
    rates, delivered = alternate(setups, frames, args.burst, args.repeat)
    sent = args.repeat * args.burst
    print(f"{args.vms} VMs, VM 1 in the group; {args.repeat} rounds of {args.burst}"
          " datagrams from VM 0, medians:")  # fmt: skip
    flood = statistics.median(rates["flood"])
    for name, rs in rates.items():
        print(f"  {name:10s} {statistics.median(rs) / 1e3:8.1f} kdatagrams/s  "
              f"({delivered[name] / sent:.1f} frames delivered a datagram)"
              f"  {name} / flood = {statistics.median(rs) / flood:.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
