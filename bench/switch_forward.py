"""The switch's forwarding rate, with and without port security (``--mac``).

An in-process :class:`~virtnet.ports.switch.Switch` joins VMs ``a`` and
``b`` (one pair each, ``SOCK_SEQPACKET`` socketpairs, as serve's switch
process has them).  Each round writes ``--burst`` 64-byte unicast frames
a -> b (b's MAC learnt first), runs the switch until it has forwarded them
all, and drains b; only the switch's part (``poll_once`` until idle) is
timed.  Variants, alternated round by round in the same process:

* ``open``: no MAC locks (a learning bridge);
* ``locked``: ``set_macs`` on both VMs, so every frame's source is checked
  against the locks and its destination found through them;
* ``guarded``: ``locked`` plus ``set_ips`` on both (IP source guard), so
  every frame's IPv4 source is checked too;
* ``shielded``: ``guarded`` plus ``set_guards`` (DHCP and router guards) on
  both, so every frame's UDP source port is checked as well;
* ``learning``: ``shielded``, but a learns its IPv6 address by SLAAC (``set_ips``
  with ``SLAAC_LEARNING``) from a prefix a third member, a trusted router,
  advertised before the rounds: with ``--ipv6`` each of a's frames is held to
  the prefix and its address's first-come binding is renewed.  (With IPv4
  frames it checks what ``shielded`` does.)

``--ipv6`` sends IPv6/UDP frames instead (fd00::1 -> fd00::2), whose
header the checks of ``locked``, ``guarded`` and ``shielded`` all read.

Prints frames per second (median of ``--repeat`` rounds) for each and the
ratios against open.  Run: ``python bench/switch_forward.py [--burst 200]
[--repeat 30] [--ipv6]``.  No root, no VM.
"""

from __future__ import annotations

import argparse
import statistics
import struct
import sys
import time
from collections.abc import Sequence

from virtnet.ports import VNET_HDR_LEN, SocketQueue
from virtnet.ports.switch import SLAAC_LEARNING, Switch

MAC_A = bytes.fromhex("525400000001")
MAC_B = bytes.fromhex("525400000002")


IP_A, IP_B = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
IP6_A, IP6_B = bytes.fromhex("fd00" + "00" * 13 + "01"), bytes.fromhex("fd00" + "00" * 13 + "02")
#: Each variant checks what the one before it does, and more.
VARIANTS = ("open", "locked", "guarded", "shielded", "learning")
MAC_R = bytes.fromhex("525400000003")


def router_advertisement(prefix: bytes) -> bytes:
    """An IPv6 router advertisement from fe80::1 offering ``prefix`` (/64) for SLAAC."""
    ra = struct.pack("!BBHBBHII", 134, 0, 0, 64, 0, 1800, 0, 0)
    ra += struct.pack("!BBBBIII16s", 3, 4, 64, 0xC0, 3600, 3600, 0, prefix)
    ll = bytes.fromhex("fe80" + "00" * 13 + "01")
    ip = struct.pack(
        "!IHBB16s16s", 6 << 28, len(ra), 58, 255, ll, bytes.fromhex("ff02" + "00" * 13 + "01")
    )
    return bytes(VNET_HDR_LEN) + b"\xff" * 6 + MAC_R + b"\x86\xdd" + ip + ra


def unicast(dst: bytes, src: bytes, n: int, ip_src: bytes = IP_A) -> bytes:
    """A 64-byte IPv4/UDP frame (plus the virtio-net header), sequence ``n``;
    IPv6/UDP when ``ip_src`` is an IPv6 address."""
    if len(ip_src) == 16:
        eth = dst + src + b"\x86\xdd"
        ip = struct.pack("!IHBB16s16s", 6 << 28, 10, 17, 64, ip_src, IP6_B)
        udp = struct.pack("!HHH", 1000, 2000, 10) + n.to_bytes(4, "big")[:2]
    else:
        eth = dst + src + b"\x08\x00"
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 46, 0, 0, 64, 17, 0, ip_src, IP_B)
        udp = struct.pack("!HHHHI", 1000, 2000, 26, 0, n)
    body = ip + udp
    return bytes(VNET_HDR_LEN) + eth + body + bytes(64 - len(eth) - len(body))


def _drain(q: SocketQueue, buf: memoryview) -> int:
    got = 0
    while q.recv_into([buf[:VNET_HDR_LEN], buf[VNET_HDR_LEN:]]):
        got += 1
    return got


def one_round(sw: Switch, a: SocketQueue, b: SocketQueue, frames: list[memoryview]) -> float:
    """Frames per second through the switch for one burst a -> b."""
    for f in frames:
        if not a.send([f[:VNET_HDR_LEN], f[VNET_HDR_LEN:]]):
            raise RuntimeError("the socket to the switch is full: lower --burst")
    t0 = time.perf_counter()
    while sw.poll_once(0):
        pass
    dt = time.perf_counter() - t0
    got = _drain(b, memoryview(bytearray(2048)))
    if got != len(frames):
        raise RuntimeError(f"b received {got} of {len(frames)} frames")
    return len(frames) / dt


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--burst", type=int, default=200, help="frames per round (default 200)")
    ap.add_argument("--repeat", type=int, default=30, help="rounds per variant (default 30)")
    ap.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated, of {', '.join(VARIANTS)} (default all; 'open' alone also runs"
        " against an older tree through PYTHONPATH)",
    )
    ap.add_argument("--ipv6", action="store_true", help="IPv6/UDP frames instead of IPv4")
    args = ap.parse_args(argv)
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not chosen or any(v not in VARIANTS for v in chosen):
        ap.error(f"--variants: some of {', '.join(VARIANTS)}, not {args.variants!r}")
    if args.burst < 1 or args.repeat < 1:
        ap.error("--burst and --repeat must be positive")
    ip_a, ip_b = (IP6_A, IP6_B) if args.ipv6 else (IP_A, IP_B)
    frames = [memoryview(unicast(MAC_B, MAC_A, i, ip_a)) for i in range(args.burst)]
    rates: dict[str, list[float]] = {v: [] for v in chosen}
    switches = {}
    for variant in rates:
        sw = Switch()
        a, b = sw.open_queue("a", 0), sw.open_queue("b", 0)
        level = VARIANTS.index(variant)
        if level >= VARIANTS.index("locked"):
            sw.set_macs("a", [MAC_A])
            sw.set_macs("b", [MAC_B])
        if level >= VARIANTS.index("guarded"):
            sw.set_ips("a", [ip_a])
            sw.set_ips("b", [ip_b])
        if level >= VARIANTS.index("shielded"):
            sw.set_guards("a", ["dhcp", "router"])
            sw.set_guards("b", ["dhcp", "router"])
        if level >= VARIANTS.index("learning"):
            sw.set_ips("a", [IP_A, SLAAC_LEARNING])
            router = sw.open_queue("r", 0)
            router.send([memoryview(router_advertisement(IP6_A[:8] + bytes(8)))])
            while sw.poll_once(0):
                pass
            _drain(a, memoryview(bytearray(2048)))
            _drain(b, memoryview(bytearray(2048)))
        b.send([memoryview(unicast(MAC_A, MAC_B, 0, ip_b))])  # the switch learns b's MAC
        while sw.poll_once(0):
            pass
        _drain(a, memoryview(bytearray(2048)))
        switches[variant] = (sw, a, b)
    try:
        for r in range(args.repeat):
            for variant in rates if r % 2 == 0 else reversed(list(rates)):
                sw, a, b = switches[variant]
                rates[variant].append(one_round(sw, a, b, frames))
    finally:
        for sw, _, _ in switches.values():
            sw.close()
    med = {v: statistics.median(r) for v, r in rates.items()}
    family = "IPv6" if args.ipv6 else "IPv4"
    print(f"{args.repeat} rounds of {args.burst} 64-byte {family} frames a -> b, medians:")
    for v, m in med.items():
        lo, hi = min(rates[v]), max(rates[v])
        print(f"  {v:7s} {m / 1e3:8.1f} kframes/s  (rounds {lo / 1e3:.1f}-{hi / 1e3:.1f}k)")
    for v in VARIANTS[1:]:
        if v in med and "open" in med:
            print(f"  {v} / open = {med[v] / med['open']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
