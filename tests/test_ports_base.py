"""Tests of the port contract, make_port/attach_queue, null and loopback ports."""

from __future__ import annotations

import os
import socket
import struct

import pytest

from virtnet.errors import UsageError
from virtnet.ports import (
    VNET_HDR_LEN,
    FdQueue,
    Offload,
    PortQueue,
    SocketQueue,
    attach_queue,
    make_port,
)
from virtnet.ports import loopback as lb_mod
from virtnet.ports.loopback import LoopbackPort, LoopbackQueue
from virtnet.ports.null import NullPort, NullQueue

A = bytes.fromhex("525400000001")
B = bytes.fromhex("525400000002")


def frame(dst: bytes = B, src: bytes = A, payload: bytes = b"hello") -> bytes:
    hdr = struct.pack("<BBHHHHH", 1, 0, 0, 0, 34, 6, 0)
    return hdr + dst + src + b"\x08\x00" + payload


def views(data: bytes, *cuts: int) -> list[memoryview]:
    m = memoryview(bytearray(data))
    out = []
    prev = 0
    for c in (*cuts, len(data)):
        out.append(m[prev:c])
        prev = c
    return out


@pytest.mark.parametrize(
    "spec",
    ["", "tap", "tap:", "switch:x", "switch:uplink=", "loopback:1", "null:", "bogus", "veth:x"],
)
def test_make_port_bad_spec(spec: str) -> None:
    with pytest.raises(UsageError, match="port spec"):
        make_port(spec)


def test_make_port_kinds() -> None:
    assert isinstance(make_port("null"), NullPort)
    lp = make_port("loopback")
    assert isinstance(lp, LoopbackPort)
    assert lp.offloads() == frozenset(Offload)
    q = lp.open_queue("vm", 0)
    assert isinstance(q, PortQueue) and q.fileno() is None
    lp.close()


def test_attach_queue_kinds() -> None:
    assert isinstance(attach_queue("null"), NullQueue)
    assert isinstance(attach_queue("loopback"), LoopbackQueue)
    with pytest.raises(UsageError):
        attach_queue("null", 3)
    with pytest.raises(UsageError):
        attach_queue("tap")
    with pytest.raises(UsageError):
        attach_queue("nope", 3)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    q = attach_queue("switch", b.detach())
    assert isinstance(q, SocketQueue)
    assert q.send(views(frame(), VNET_HDR_LEN))
    assert a.recv(100) == frame()
    q.close()
    a.close()
    r, w = os.pipe()
    fq = attach_queue("tap", r)
    assert isinstance(fq, FdQueue) and not os.get_blocking(r)
    assert fq.recv_into([memoryview(bytearray(64))]) == 0  # nothing ready, no raise
    fq.close()
    os.close(w)


def test_null_counts() -> None:
    q = NullQueue()
    assert q.send(views(frame(), 12, 20))
    assert not q.send(views(b"short"))
    assert q.recv_into([memoryview(bytearray(100))]) == 0
    assert (q.tx_packets, q.tx_bytes, q.tx_dropped) == (1, len(frame()) - VNET_HDR_LEN, 1)


def test_loopback_swaps_macs_and_scatters() -> None:
    q = LoopbackQueue()
    f = frame(payload=bytes(range(100)))
    assert q.send(views(f, 12, 30))
    out = bytearray(200)
    m = memoryview(out)
    bufs = [m[:12], m[12:20], m[20:]]  # MACs straddle two buffers
    n = q.recv_into(bufs)
    assert n == len(f)
    expect = f[:12] + f[18:24] + f[12:18] + f[24:]
    assert bytes(out[:n]) == expect
    assert bytes(out[12:18]) == A and bytes(out[18:24]) == B
    assert q.recv_into(bufs) == 0
    assert (q.rx_packets, q.rx_bytes) == (1, len(f) - VNET_HDR_LEN)
    # single big buffer fast path
    q.send(views(f))
    big = memoryview(bytearray(4096))
    assert q.recv_into([big]) == len(f)
    assert bytes(big[:n]) == expect


def test_loopback_bounded_and_truncation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lb_mod, "LOOPBACK_QUEUE_LEN", 4)
    q = LoopbackQueue()
    results = [q.send(views(frame())) for _ in range(6)]
    assert results == [True] * 4 + [False] * 2
    assert q.tx_dropped == 2 and q.pending() == 4
    assert q.recv_into([memoryview(bytearray(10))]) == 0
    assert q.rx_dropped == 1 and q.pending() == 3
    assert not q.send(views(b"\0" * 20))  # shorter than vnet + Ethernet header
    assert q.tx_dropped == 3


def test_socket_queue_peer_closed() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    q = SocketQueue(a)
    b.close()
    assert q.recv_into([memoryview(bytearray(64))]) == 0
    assert q.peer_closed
    assert not q.send(views(frame()))
    assert q.tx_dropped == 1
    q.close()
    q.close()  # idempotent


_PROC_NET_DEV = (  # the shape of /proc/net/dev (header lines shortened)
    "Inter-|   Receive                      |  Transmit\n"
    " face |bytes    packets errs drop ...  |bytes    packets errs drop ...\n"
    "    lo: 740 10 0 0 0 0 0 0 740 10 0 0 0 0 0 0\n"
    "   vn0: 1234567     890    0    7    0     0          0         0"
    " 98765432   43210    0 31337    0     0       0          0\n"
    "vnlong:12345678901234 5 0 1 0 0 0 0 6 7 0 2 0 0 0 0\n"
    "  bad0: 1 2 3\n"
    "  neg0: 1 2 3 -4 5 6 7 8 9 10 11 12 13 14 15 16\n"
)


@pytest.mark.parametrize(
    ("ifname", "want"),
    [
        ("vn0", (7, 31337)),
        ("vnlong", (1, 2)),  # no space after the colon once the counter is wide
        ("lo", (0, 0)),
        ("vn", None),  # a prefix of a name is not that name
        ("bad0", None),  # not 16 counters
        ("neg0", None),
        ("face", None),  # the header is not an interface
        ("absent", None),
    ],
)
def test_netdev_drops_reads_rx_and_tx_drop_columns(
    ifname: str, want: tuple[int, int] | None
) -> None:
    from virtnet.ports.tap import netdev_drops

    assert netdev_drops(ifname, _PROC_NET_DEV) == want
