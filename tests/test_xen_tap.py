"""Xen netif through a real tap: the host kernel answers a multi-queue netfront.

netback runs (``python -m virtnet.xen.netback --port tap:IFNAME``) inside a
network namespace the test creates, where the tap already exists with
10.77.40.1/24 and IPv6 off (so the kernel sends nothing unasked).  netfront
runs in the test process on the same emulated xenstored/hypervisor as
``test_xen_netif`` (its ``env`` fixture), connects 2 or 4 queues and sends
ARP requests, ICMP echo requests and UDP datagrams (to an echo server in the
namespace) from several guest addresses, chosen so every queue carries
requests and every queue is the Toeplitz-steered queue of some replies.

Checked: every request is answered exactly once; every hashable reply
arrives on the queue the frontend's hash configuration names; every queue
moved frames both ways (frontend and netback per-queue counters); netback's
counters agree with the frontend's and with the tap's kernel counters, and
every drop counter (netback, tap) is zero -- a lost frame cannot go unseen.
"""

from __future__ import annotations

import functools
import json
import os
import select
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

import test_xen_netif as xen_netif
from virtnet.testing.netns import NetNS, unique_name
from virtnet.xen.client import XsClient
from virtnet.xen.netfront import Netfront
from virtnet.xen.xenbus import XenbusState, wait_for_state


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, tap devices)"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun does not exist"
    return None


_SKIP = _skip_reason()
pytestmark = [
    pytest.mark.root,
    pytest.mark.xen,
    pytest.mark.timeout(120),
    pytest.mark.skipif(_SKIP is not None, reason=_SKIP or ""),
]

env = xen_netif.env  # the emulated xenstored + hypervisor, domain 1, vif 0 created
Env = xen_netif.Env

NS_IP = bytes((10, 77, 40, 1))
NS_CIDR = "10.77.40.1/24"
GUEST_IP_FIRST = 10
UDP_PORT = 7777
PER_ADDRESS = 40  # ICMP echo requests, and as many UDP datagrams, per guest address
WINDOW = 48  # requests in flight over all queues: far below the rx buffers posted
ETH_ARP = 0x0806
ETH_IP = 0x0800
BCAST = b"\xff" * 6

UDP_ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(4096)
    s.sendto(data, peer)
"""


# -- frames ------------------------------------------------------------------------------
def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _ipv4(src: bytes, dst: bytes, proto: int, payload: bytes) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0x4000, 64, proto, 0,
                      src, dst)  # fmt: skip
    return hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:] + payload


def arp(op: int, smac: bytes, sip: bytes, tmac: bytes, tip: bytes, dst: bytes) -> bytes:
    body = struct.pack("!HHBBH6s4s6s4s", 1, ETH_IP, 6, 4, op, smac, sip, tmac, tip)
    return dst + smac + struct.pack("!H", ETH_ARP) + body


def icmp_echo(smac: bytes, dmac: bytes, sip: bytes, token: int) -> bytes:
    body = struct.pack("!BBHHHQ", 8, 0, 0, 0x7E57, token & 0xFFFF, token)
    body = body[:2] + struct.pack("!H", _csum(body)) + body[4:]
    return dmac + smac + struct.pack("!H", ETH_IP) + _ipv4(sip, NS_IP, 1, body)


def udp(smac: bytes, dmac: bytes, sip: bytes, sport: int, token: int) -> bytes:
    payload = struct.pack("!Q", token)
    hdr = struct.pack("!HHHH", sport, UDP_PORT, 8 + len(payload), 0)
    pseudo = sip + NS_IP + struct.pack("!BBH", 0, 17, 8 + len(payload))
    ck = _csum(pseudo + hdr + payload) or 0xFFFF
    hdr = hdr[:6] + struct.pack("!H", ck)
    return dmac + smac + struct.pack("!H", ETH_IP) + _ipv4(sip, NS_IP, 17, hdr + payload)


# -- the guest side ----------------------------------------------------------------------
@dataclass
class Guest:
    """netfront's queues driven in this process, with what came back."""

    nf: Netfront
    mac: bytes
    ips: set[bytes]
    sent: list[int] = field(default_factory=list)
    received: list[int] = field(default_factory=list)
    outstanding: dict[int, str] = field(default_factory=dict)  # token -> kind
    answered: dict[str, int] = field(default_factory=dict)
    arp_replies: dict[bytes, bytes] = field(default_factory=dict)  # guest ip -> tap mac
    kernel_arp_requests: int = 0
    duplicates: int = 0
    misrouted: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    backlog: list[tuple[int, bytes]] = field(default_factory=list)  # (queue, frame)

    def __post_init__(self) -> None:
        nq = len(self.nf.queues)
        self.sent = [0] * nq
        self.received = [0] * nq
        for q in self.nf.queues:
            if q.fq.post_rx():
                q.ch_rx.notify()

    def send(self, queue: int, frame: bytes) -> None:
        self.backlog.append((queue, frame))

    def _flush(self) -> bool:
        pushed = set()
        rest = []
        for qi, frame in self.backlog:
            if self.nf.queues[qi].fq.queue_tx_frame(frame):
                self.sent[qi] += 1
                pushed.add(qi)
            else:
                rest.append((qi, frame))
        self.backlog = rest
        for qi in pushed:
            q = self.nf.queues[qi]
            if q.fq.push_tx():
                q.ch_tx.notify()
        return bool(pushed)

    def _deliver(self, qi: int, frame: memoryview) -> None:
        self.received[qi] += 1
        data = bytes(frame)
        et = struct.unpack_from("!H", data, 12)[0]
        if et == ETH_ARP and len(data) >= 42:
            op, smac, sip, _tmac, tip = struct.unpack_from("!6xH6s4s6s4s", data, 14)
            if op == 1 and tip in self.ips:  # the kernel resolves a guest address
                self.kernel_arp_requests += 1
                self.send(qi, arp(2, self.mac, tip, smac, sip, smac))
            elif op == 2 and sip == NS_IP and tip in self.ips and data[:6] == self.mac:
                if tip in self.arp_replies:
                    self.duplicates += 1
                self.arp_replies[tip] = smac
            else:
                self.unexpected.append(f"arp {data[:42].hex()}")
            return
        if et != ETH_IP or len(data) < 42 or data[:6] != self.mac:
            self.unexpected.append(f"queue {qi}: {data[:42].hex()}")
            return
        want = self.nf.hash.select_queue(data)
        if want is not None and want != qi:
            self.misrouted.append(f"{data[26:34].hex()} on queue {qi}, steered to {want}")
        proto = data[23]
        token = None
        if (proto == 1 and data[34] == 0 and len(data) >= 50) or (
            proto == 17 and struct.unpack_from("!H", data, 34)[0] == UDP_PORT
        ):  # ICMP echo reply, or the UDP echo
            token = struct.unpack_from("!Q", data, 42)[0]
        kind = self.outstanding.pop(token, None) if token is not None else None
        if kind is None:
            self.duplicates += token is not None
            self.unexpected.append(f"ip {data[14:50].hex()}")
            return
        self.answered[kind] = self.answered.get(kind, 0) + 1

    def pump(self, timeout: float = 0.02) -> None:
        """Move frames once: tx backlog, reap responses, repost rx buffers; wait if idle."""
        moved = self._flush()
        for qi, q in enumerate(self.nf.queues):
            q.ch_tx.consume()
            q.ch_rx.consume()
            moved |= bool(q.fq.reap_tx())
            moved |= bool(q.fq.reap_rx(functools.partial(self._deliver, qi)))
            if q.fq.post_rx():
                q.ch_rx.notify()
        if moved or self.backlog:
            return
        fds = [q.ch_tx.fileno() for q in self.nf.queues]
        fds += [q.ch_rx.fileno() for q in self.nf.queues if q.ch_rx is not q.ch_tx]
        select.select(fds, [], [], timeout)

    def wait(self, done: Callable[[], bool], seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not done() and time.monotonic() < deadline:
            self.pump()


def choose_addresses(nf: Netfront, mac: bytes) -> list[bytes]:
    """Guest addresses until every queue carries some request flow and some reply flow."""
    nq = len(nf.queues)
    tx_q: set[int] = set()
    rx_q: set[int] = set()
    chosen: list[bytes] = []
    for host in range(GUEST_IP_FIRST, 250):
        ip = bytes((10, 77, 40, host))
        tq = nf.tx_queue_for(icmp_echo(mac, BCAST, ip, 0))
        reply = BCAST + mac + struct.pack("!H", ETH_IP) + _ipv4(NS_IP, ip, 1, bytes(16))
        rq = nf.hash.select_queue(reply)
        assert rq is not None
        if tq not in tx_q or rq not in rx_q:
            chosen.append(ip)
            tx_q.add(tq)
            rx_q.add(rq)
        if len(tx_q) == len(rx_q) == nq:
            return chosen
    raise AssertionError(f"no guest addresses cover {nq} queues: tx {tx_q} rx {rx_q}")


def exchange(nf: Netfront, xs1: XsClient, per_address: int) -> tuple[Guest, int]:
    """ARP for every guest address, then ICMP echo and UDP from each; (guest, per kind)."""
    queues = len(nf.queues)
    mac = bytes.fromhex(xs1.read(f"{xen_netif.FE}/mac").replace(":", ""))
    ips = choose_addresses(nf, mac)
    g = Guest(nf, mac, set(ips))

    # ARP: the kernel answers each guest address's request (and learns it).
    for i, ip in enumerate(ips):
        g.send(i % queues, arp(1, mac, ip, bytes(6), NS_IP, BCAST))
    g.wait(lambda: len(g.arp_replies) == len(ips), 10)
    assert sorted(g.arp_replies) == sorted(ips), (g.arp_replies, g.unexpected)
    tap_macs = set(g.arp_replies.values())
    assert len(tap_macs) == 1, tap_macs
    tap_mac = tap_macs.pop()

    # ICMP echo and UDP from every address, on the queue the flow hash picks.
    plan: list[tuple[str, bytes, int]] = []
    token = 1
    for n in range(per_address):
        for ip in ips:
            plan.append(("icmp", icmp_echo(mac, tap_mac, ip, token), token))
            plan.append(("udp", udp(mac, tap_mac, ip, 20000 + n, token + 1), token + 1))
            token += 2
    deadline = time.monotonic() + 30
    for kind, frame, tok in plan:
        while len(g.outstanding) >= WINDOW and time.monotonic() < deadline:
            g.pump()
        g.outstanding[tok] = kind
        g.send(nf.tx_queue_for(frame), frame)
    g.wait(lambda: not g.outstanding, max(1.0, deadline - time.monotonic()))
    return g, len(plan) // 2


def _tap_stats(ns: NetNS, tap: str) -> dict[str, dict[str, int]]:
    out = json.loads(ns.ip("-s", "-j", "link", "show", "dev", tap))
    stats: dict[str, dict[str, int]] = out[0]["stats64"]
    return stats


def _netback_counters(out: str) -> list[dict[str, int]]:
    rows: list[dict[str, int]] = []
    for line in out.splitlines():
        if line.startswith("netback queue ") and "=" in line:
            head, _, rest = line.partition(": ")
            assert int(head.split()[2]) == len(rows), out
            rows.append({k: int(v) for k, v in (kv.split("=") for kv in rest.split())})
    return rows


@pytest.fixture
def netns() -> Iterator[tuple[NetNS, str]]:
    tap = unique_name("vxtap")
    with NetNS() as ns:
        ns.create_tap(tap)  # persistent, multi_queue, vnet_hdr: netback attaches its queues
        ns.run(f"echo 1 > /proc/sys/net/ipv6/conf/{tap}/disable_ipv6", check=False)
        ns.set_address(tap, NS_CIDR)
        yield ns, tap


@pytest.mark.parametrize("queues", [2, 4])
def test_tap_in_namespace_answers_every_queue(
    env: xen_netif.Env, netns: tuple[NetNS, str], queues: int
) -> None:
    ns, tap = netns
    echo = ns.popen(
        [sys.executable, "-c", UDP_ECHO, NS_CIDR.split("/", maxsplit=1)[0], str(UDP_PORT)],
        stdout=subprocess.PIPE,
    )
    assert echo.stdout is not None and echo.stdout.readline().strip() == "ready"
    nb = ns.popen(
        [sys.executable, "-m", "virtnet.xen.netback", "--xenstore", env.xs_sock,
         "--hypervisor", env.hyp_sock, "--domid", "1", "--max-queues", str(queues),
         "--port", f"tap:{tap}", "--timeout", "90"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    nf, xs1, hyp1 = xen_netif._front(env, queues)
    try:
        nf.connect()
        g, expected = exchange(nf, xs1, PER_ADDRESS)
        g.wait(lambda: False, 0.3)  # drain: anything late is seen and counted below
        tap_stats = _tap_stats(ns, tap)
        fq_errors = [
            (q.fq.counters["tx_errors"], q.fq.counters["rx_errors"], q.fq.counters["rx_dropped"])
            for q in nf.queues
        ]
    finally:
        rc, out = xen_netif._finish(nb, nf, xs1, hyp1)

    assert rc == 0, out
    assert not g.outstanding, f"{len(g.outstanding)} requests unanswered; netback: {out}"
    assert g.answered == {"icmp": expected, "udp": expected}, g.answered
    assert g.duplicates == 0 and not g.unexpected, g.unexpected[:5]
    assert not g.misrouted, g.misrouted[:5]
    assert all(n > 0 for n in g.sent), g.sent
    assert all(n > 0 for n in g.received), g.received
    assert fq_errors == [(0, 0, 0)] * queues, fq_errors

    nb_q = _netback_counters(out)
    assert len(nb_q) == queues, out
    for i, c in enumerate(nb_q):
        assert c["tx_packets"] == g.sent[i], (i, c, g.sent)
        assert c["rx_packets"] == g.received[i], (i, c, g.received)
        for k in ("tx_errors", "tx_dropped", "rx_errors", "rx_dropped", "rx_port_dropped"):
            assert c[k] == 0, (i, k, c)
    # The kernel's side of the tap: it got every frame netback wrote, dropped nothing,
    # and every frame it sent was read by netback.
    assert tap_stats["rx"]["packets"] == sum(c["tx_packets"] for c in nb_q), (tap_stats, nb_q)
    assert tap_stats["tx"]["packets"] == sum(
        c["rx_packets"] for c in nb_q
    ), (tap_stats, nb_q)  # fmt: skip
    assert tap_stats["rx"]["dropped"] == tap_stats["tx"]["dropped"] == 0, tap_stats


def test_tap_persistent_backend_serves_a_reconnecting_frontend(
    env: xen_netif.Env, netns: tuple[NetNS, str]
) -> None:
    """netback --persist keeps the tap across sessions: 2 queues, then 4, then 1."""
    ns, tap = netns
    echo = ns.popen(
        [sys.executable, "-c", UDP_ECHO, NS_CIDR.split("/", maxsplit=1)[0], str(UDP_PORT)],
        stdout=subprocess.PIPE,
    )
    assert echo.stdout is not None and echo.stdout.readline().strip() == "ready"
    nb = ns.popen(
        [sys.executable, "-m", "virtnet.xen.netback", "--xenstore", env.xs_sock,
         "--hypervisor", env.hyp_sock, "--domid", "1", "--max-queues", "4", "--persist",
         "--port", f"tap:{tap}", "--timeout", "90"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        for queues in (2, 4, 1):
            nf, xs1, hyp1 = xen_netif._front(env, queues)
            try:
                nf.connect()
                g, expected = exchange(nf, xs1, 5)
            finally:
                nf.close()
                xs1.close()
                hyp1.close()
            assert g.answered == {"icmp": expected, "udp": expected}, (queues, g.answered)
            assert not g.misrouted and not g.unexpected, (g.misrouted, g.unexpected)
            assert all(n > 0 for n in g.sent) and all(n > 0 for n in g.received), (g.sent,)
            wait_for_state(env.xs, f"{xen_netif.BE}/state", {XenbusState.CLOSED}, 20, "tp")
            assert nb.poll() is None, nb.communicate()[0]
        env.xs.write(f"{xen_netif.BE}/online", "0")  # the toolstack takes the device away
        env.xs.write(f"{xen_netif.FE}/state", "6")
        out, _ = nb.communicate(timeout=30)
    finally:
        if nb.poll() is None:
            nb.kill()
            nb.wait()
    assert nb.returncode == 0, out
    assert len(_netback_counters(out)) == 1, out  # the last session's queue
