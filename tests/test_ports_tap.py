"""Tests of the multiqueue tap port, each inside a fresh network namespace.

Every test body runs in a forked child that has joined a namespace created
for that test (``setns``), so the host's interfaces are never touched; the
namespace (and every tap in it) is deleted afterwards, even on failure.
Only 10.77.x.x addresses are used, and only inside those namespaces.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import logging
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import traceback
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

from virtnet.errors import UsageError
from virtnet.ports import VNET_HDR_LEN, FdQueue, Offload, attach_queue, make_port
from virtnet.ports.switch import Switch, SwitchPort
from virtnet.ports.tap import TapPort, TapQueue
from virtnet.testing.worker import QSIZE, WorkerHarness, quiet_tap
from virtnet.vhost_user.supervisor import VmPort

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(
        os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
        reason="needs root and /dev/net/tun",
    ),
]

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
ETH_P_ALL = 0x0003
CHILD_TIMEOUT_S = 20.0
_counter = itertools.count()

GUEST = bytes.fromhex("52540077aa01")
PEER = bytes.fromhex("52540077aa02")
BCAST = b"\xff" * 6


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"vnt-ports-{os.getpid()}-{next(_counter)}"
    _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "set", "lo", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True, timeout=10)


def in_netns(ns: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a forked child inside ``ns``; return its result or re-raise."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        code = 0
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
            os.close(fd)
            out: tuple[bool, Any] = (True, fn())
        except BaseException as exc:
            out = (False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
            code = 1
        try:
            os.write(w, pickle.dumps(out))
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([r], [], [], CHILD_TIMEOUT_S)
            if not ready:
                os.kill(pid, signal.SIGKILL)
                raise AssertionError("netns child timed out")
            chunk = os.read(r, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    ok, val = pickle.loads(b"".join(chunks))
    if not ok:
        raise AssertionError(f"in netns child:\n{val}")
    result: T = val
    return result


def vnet_hdr(flags: int = 0, gso: int = 0, hdr_len: int = 0, gso_size: int = 0) -> bytes:
    return struct.pack("<BBHHHHH", flags, gso, hdr_len, gso_size, 0, 0, 0)


def eth(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


def packet_socket(ifname: str) -> socket.socket:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((ifname, 0))
    s.settimeout(2.0)
    return s


def recv_from(s: socket.socket, pred: Callable[[bytes], bool]) -> bytes:
    for _ in range(50):
        data = s.recv(65536)
        if pred(data):
            return data
    raise AssertionError("expected frame not seen")


def ours(data: bytes) -> bool:
    """A test frame (ethertype 0x88B5), not the kernel's own traffic on a tap
    that just came up (IPv6 duplicate-address detection, MLD reports)."""
    return data[VNET_HDR_LEN + 12 : VNET_HDR_LEN + 14] == b"\x88\xb5"


def read_queue(
    queues: list[TapQueue],
    nbufs: int = 3,
    tries: int = 200,
    want: Callable[[bytes], bool] | None = None,
) -> tuple[int, bytes]:
    """Poll the queues until one frame (that ``want`` accepts) arrives; scatter
    it into ``nbufs`` buffers."""
    buf = bytearray(4096)
    m = memoryview(buf)
    bufs = [m[:VNET_HDR_LEN], m[VNET_HDR_LEN : VNET_HDR_LEN + 7], m[VNET_HDR_LEN + 7 :]]
    poller = select.poll()
    for q in queues:
        fd = q.fileno()
        assert fd is not None
        poller.register(fd, select.POLLIN)
    for _ in range(tries):
        poller.poll(50)
        for i, q in enumerate(queues):
            n = q.recv_into(bufs[:nbufs])
            if n and (want is None or want(bytes(buf[:n]))):
                return i, bytes(buf[:n])
    raise AssertionError("no frame on any queue")


def arp_request(sha: bytes, spa: str, tpa: str) -> bytes:
    body = struct.pack(
        "!HHBBH6s4s6s4s",
        1,
        0x0800,
        6,
        4,
        1,
        sha,
        socket.inet_aton(spa),
        b"\0" * 6,
        socket.inet_aton(tpa),
    )
    return eth(BCAST, sha, 0x0806, body)


# -- tests ---------------------------------------------------------------------


def test_tx_and_rx_with_vnet_header(netns: str) -> None:
    def body() -> dict[str, int]:
        port = make_port("tap:vt0")
        assert isinstance(port, TapPort)
        try:
            qs = [port.open_queue("vm", p) for p in range(2)]
            assert all(isinstance(q, TapQueue) for q in qs)
            assert port.created
            # No IPv6 on it: the kernel's own frames (DAD, MLD) would be counted as rx.
            with open("/proc/sys/net/ipv6/conf/vt0/disable_ipv6", "w") as sysctl:
                sysctl.write("1")
            port.set_up()
            ps = packet_socket("vt0")
            # guest -> host: header + frame gathered from three buffers
            payload = b"virtnet-tx" + bytes(50)
            f = eth(PEER, GUEST, 0x88B5, payload)
            m = memoryview(bytearray(vnet_hdr() + f))
            assert qs[0].send([m[:VNET_HDR_LEN], m[VNET_HDR_LEN:20], m[20:]])
            got = recv_from(ps, lambda d: d[6:12] == GUEST)
            assert got[: len(f)] == f
            # host -> guest: a frame sent on the interface lands on a queue
            f2 = eth(GUEST, PEER, 0x88B5, b"virtnet-rx" + bytes(50))
            ps.send(f2)
            _i, data = read_queue([q for q in qs if isinstance(q, TapQueue)], want=ours)
            assert data[:VNET_HDR_LEN] == vnet_hdr()
            assert data[VNET_HDR_LEN:] == f2
            ps.close()
            c = qs[0]
            return {
                "tx_packets": c.tx_packets,
                "tx_bytes": c.tx_bytes,
                "rx": sum(q.rx_packets for q in qs),
            }
        finally:
            port.close()

    res = in_netns(netns, body)
    assert res["tx_packets"] == 1 and res["rx"] == 1
    assert res["tx_bytes"] == 14 + 60


def test_arp_reply_from_host_stack(netns: str) -> None:
    def body() -> bytes:
        port = TapPort("vt0", up=True)
        try:
            q = port.open_queue("vm", 0)
            assert isinstance(q, TapQueue)
            _ip("addr", "add", "10.77.0.1/24", "dev", "vt0")
            req = vnet_hdr() + arp_request(GUEST, "10.77.0.2", "10.77.0.1")
            for _ in range(20):
                assert q.send([memoryview(req)])
                try:
                    _i, data = read_queue([q], tries=10)
                except AssertionError:
                    continue
                if data[VNET_HDR_LEN + 12 : VNET_HDR_LEN + 14] == b"\x08\x06":
                    return data
            raise AssertionError("no ARP reply")
        finally:
            port.close()

    data = in_netns(netns, body)
    frame = data[VNET_HDR_LEN:]
    assert frame[:6] == GUEST
    assert struct.unpack("!H", frame[20:22])[0] == 2  # ARP reply
    assert frame[28:32] == socket.inet_aton("10.77.0.1")


def test_offloads_and_bad_header(netns: str) -> None:
    def body() -> dict[str, Any]:
        port = TapPort("vt0", up=True)
        try:
            q = port.open_queue("vm", 0)
            with pytest.raises(UsageError, match="CSUM"):
                port.set_offloads({Offload.TSO4})
            port.set_offloads(set())
            off = subprocess.run(
                ["ethtool", "-k", "vt0"], capture_output=True, text=True, check=True
            ).stdout
            port.set_offloads({Offload.CSUM, Offload.TSO4, Offload.TSO6})
            on = subprocess.run(
                ["ethtool", "-k", "vt0"], capture_output=True, text=True, check=True
            ).stdout
            # a vnet header with an unknown gso_type: the kernel refuses it;
            # the queue counts a drop and does not raise
            bad = vnet_hdr(gso=0x33, gso_size=100) + eth(PEER, GUEST, 0x0800, bytes(60))
            ok = q.send([memoryview(bad)])
            return {"off": off, "on": on, "ok": ok, "dropped": q.tx_dropped}
        finally:
            port.close()

    res = in_netns(netns, body)
    assert "tcp-segmentation-offload: off" in res["off"]
    assert "tcp-segmentation-offload: on" in res["on"]
    assert res["ok"] is False and res["dropped"] == 1


def test_attach_existing_and_refuse_non_multiqueue(netns: str) -> None:
    _ip("-n", netns, "tuntap", "add", "dev", "mq0", "mode", "tap", "multi_queue")
    _ip("-n", netns, "tuntap", "add", "dev", "sq0", "mode", "tap")
    _ip("-n", netns, "tuntap", "add", "dev", "tun0", "mode", "tun", "multi_queue")
    _ip("-n", netns, "link", "add", "ve0", "type", "veth", "peer", "name", "ve1")

    def body() -> list[str]:
        port = TapPort("mq0")
        try:
            port.open_queue("vm", 0)
            port.open_queue("vm", 1)
            assert not port.created
            with pytest.raises(UsageError, match="already serves"):
                port.open_queue("other-vm", 2)
            with pytest.raises(UsageError, match="already open"):
                port.open_queue("vm", 1)
        finally:
            port.close()
        assert socket.if_nametoindex("mq0")  # persistent tap survives our close
        errors = []
        for name in ("sq0", "tun0", "ve0"):
            p = TapPort(name)
            with pytest.raises(UsageError) as ei:
                p.open_queue("vm", 0)
            errors.append(str(ei.value))
            p.close()
        return errors

    errors = in_netns(netns, body)
    assert "'sq0' exists without multi_queue" in errors[0]
    assert "'tun0' is a tun, not a tap" in errors[1]
    assert "'ve0' exists and is not a tun/tap device" in errors[2]


def test_tap_follows_the_guests_mtu_only_where_serve_created_it(netns: str) -> None:
    """NET_SET_MTU raises the MTU of a tap serve created (before or after its
    first queue), never lowers it, and leaves an existing tap alone with a
    warning naming the command that fixes it."""
    _ip("-n", netns, "tuntap", "add", "dev", "old0", "mode", "tap", "multi_queue")

    def body() -> tuple[list[int | None], list[str]]:
        messages: list[str] = []

        class Keep(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                messages.append(f"{record.levelname} {record.getMessage()}")

        sup_log = logging.getLogger("virtnet.vhost_user.supervisor")
        sup_log.addHandler(Keep())
        sup_log.setLevel(logging.INFO)
        mtus: list[int | None] = []
        for name, first, later in (("new0", 9000, None), ("new1", None, 4000),
                                   ("new2", 1400, None), ("old0", 9000, None)):  # fmt: skip
            tap = TapPort(name)
            vm = VmPort(name, tap, 2)
            try:
                if first is not None:
                    vm.set_guest_mtu(first)  # before the tap exists
                fd = vm.queue_fd(0)
                assert fd is not None
                os.close(fd)
                if later is not None:
                    vm.set_guest_mtu(later)
                mtus.append(tap.mtu())
            finally:
                vm.close()
                tap.close()
        return mtus, messages

    mtus, messages = in_netns(netns, body)
    assert mtus == [9000, 4000, 1500, 1500], mtus
    warnings = [m for m in messages if m.startswith("WARNING")]
    assert warnings == [
        "WARNING old0: the guest's MTU is 9000 but tap old0's is 1500: the host cannot send the"
        " guest frames over 1500 bytes; raise it with 'ip link set dev old0 mtu 9000'"
    ], messages
    assert "INFO new0: tap new0 MTU 9000, the guest's" in messages, messages


def test_bad_names() -> None:
    for name in ("", "x" * 16, "a/b", "vn%d", "a:b", "a b", " a"):
        with pytest.raises(UsageError):
            TapPort(name)


def test_detach_queue_steers_rx_away(netns: str) -> None:
    def body() -> dict[str, Any]:
        port = TapPort("vt0", up=True)
        try:
            qs = [port.open_queue("vm", p) for p in range(2)]
            taps = [q for q in qs if isinstance(q, TapQueue)]
            port.set_queue_enabled(1, False)
            ps = packet_socket("vt0")
            seen = [0, 0]
            for i in range(16):
                ps.send(eth(GUEST, PEER, 0x88B5, struct.pack("!I", i) + bytes(60)))
                idx, _ = read_queue(taps, want=ours)
                seen[idx] += 1
            # a worker writing on a detached queue never raises (recent kernels
            # still transmit; older ones refuse with EBADFD = a counted drop)
            frame = vnet_hdr() + eth(PEER, GUEST, 0x88B5, bytes(60))
            detached_ok = taps[1].send([memoryview(frame)])
            port.set_queue_enabled(1, True)
            reattached_ok = taps[1].send([memoryview(frame)])
            ps.close()
            return {
                "seen": seen,
                "detached_ok": detached_ok,
                "reattached_ok": reattached_ok,
                "drops": taps[1].tx_dropped,
            }
        finally:
            port.close()

    res = in_netns(netns, body)
    assert res["seen"] == [16, 0]
    assert (res["detached_ok"], res["drops"]) in ((True, 0), (False, 1))
    assert res["reattached_ok"] is True


def test_queue_fd_passes_to_worker(netns: str) -> None:
    def body() -> bytes:
        port = TapPort("vt0", up=True)
        try:
            q = port.open_queue("vm", 0)
            fd = q.fileno()
            assert fd is not None
            ps = packet_socket("vt0")
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
            pid = os.fork()
            if pid == 0:  # the "worker": receives the fd, rebuilds its queue
                code = 1
                try:
                    _msg, fds, _f, _a = socket.recv_fds(b, 16, 1)
                    wq = attach_queue("tap", fds[0])
                    assert isinstance(wq, FdQueue)
                    f = vnet_hdr() + eth(PEER, GUEST, 0x88B5, b"from-worker" + bytes(50))
                    code = 0 if wq.send([memoryview(f)]) else 2
                finally:
                    os._exit(code)
            socket.send_fds(a, [b"q"], [fd])
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
            got = recv_from(ps, lambda d: d[6:12] == GUEST)
            for s in (a, b, ps):
                s.close()
            return got
        finally:
            port.close()

    got = in_netns(netns, body)
    assert got[14:25] == b"from-worker"


def test_short_rx_buffers_drop_not_truncate(netns: str) -> None:
    def body() -> list[int]:
        port = quiet_tap("vt0")
        try:
            q = port.queue(0)
            ps = packet_socket("vt0")
            f = eth(GUEST, PEER, 0x88B5, bytes(86))  # 100-byte frame
            out = []
            for room in (50, 112, 111):  # too short, exact fit, one byte short
                ps.send(f)
                fd = q.fileno()
                assert fd is not None
                select.select([fd], [], [], 2)
                buf = memoryview(bytearray(room))
                out.append(q.recv_into([buf[:VNET_HDR_LEN], buf[VNET_HDR_LEN:]]))
            out += [q.rx_packets, q.rx_dropped]
            ps.close()
            return out
        finally:
            port.close()

    assert in_netns(netns, body) == [0, 112, 0, 1, 2]


def _arp_via(q: Any, poll: Callable[[], object]) -> bytes:
    req = vnet_hdr() + arp_request(GUEST, "10.77.0.2", "10.77.0.1")
    buf = bytearray(4096)
    for _ in range(50):
        q.send([memoryview(req)])
        for _ in range(20):
            poll()
            n = q.recv_into([memoryview(buf)])
            if n and buf[VNET_HDR_LEN + 12 : VNET_HDR_LEN + 14] == b"\x08\x06":
                return bytes(buf[:n])
    raise AssertionError("no ARP reply through the switch")


@pytest.mark.parametrize("replaced", [False, True])
def test_switch_uplink_in_process(netns: str, replaced: bool) -> None:
    """A tap queue as the switch's uplink: a VM's ARP request reaches the host
    and its reply comes back.  ``replaced``: ``attach_tap`` of the member
    again with another queue replaces the first (the uplink was deleted and is
    back) instead of failing as 'already attached'."""

    def body() -> bytes:
        tap = TapPort("vt0", up=True)
        sw = Switch()
        try:
            for pair in (0, 1) if replaced else (0,):
                fd = tap.open_queue("uplink", pair).fileno()
                assert fd is not None
                sw.attach_tap("uplink", os.dup(fd))
            _ip("addr", "add", "10.77.0.1/24", "dev", "vt0")
            q = sw.open_queue("vm", 0)
            try:
                return _arp_via(q, lambda: sw.poll_once(0.01))
            finally:
                q.close()
        finally:
            sw.close()
            tap.close()

    frame = in_netns(netns, body)[VNET_HDR_LEN:]
    assert frame[:6] == GUEST and frame[28:32] == socket.inet_aton("10.77.0.1")


def test_switch_process_with_uplink_spec(netns: str) -> None:
    def body() -> bytes:
        port = make_port("switch:uplink=vt0")
        assert isinstance(port, SwitchPort)
        try:
            _ip("addr", "add", "10.77.0.1/24", "dev", "vt0")
            q = port.open_queue("vm", 0)
            fd = q.fileno()
            assert fd is not None
            try:
                return _arp_via(q, lambda: select.select([fd], [], [], 0.05))
            finally:
                q.close()
        finally:
            port.close()

    frame = in_netns(netns, body)[VNET_HDR_LEN:]
    assert frame[:6] == GUEST and struct.unpack("!H", frame[20:22])[0] == 2


def test_the_kernels_drops_on_a_tap_are_read_from_its_namespace(netns: str) -> None:
    """Frames the host sends while nobody reads the tap queue overflow its
    txqueuelen-frame ring; the kernel counts them, and ``host_drops`` finds
    them in the reading process's namespace: sent = queued + dropped."""
    ring, sent = 16, 40

    def body() -> tuple[dict[str, int] | None, int, dict[str, int] | None]:
        port = quiet_tap("vd0")
        try:
            _ip("link", "set", "vd0", "txqueuelen", str(ring))
            before = port.host_drops()
            with contextlib.closing(packet_socket("vd0")) as ps:
                frame = GUEST + PEER + b"\x08\x00" + bytes(50)
                for _ in range(sent):
                    ps.send(frame)
            after = port.host_drops()
            fd = port.queue(0).fileno()
            assert fd is not None
            queued = 0
            buf = bytearray(2048)
            with contextlib.suppress(BlockingIOError):
                while True:
                    os.readv(fd, [buf])
                    queued += 1
            assert before is not None and after is not None
            return before, queued, {k: after[k] - before[k] for k in after}
        finally:
            port.close()

    before, queued, delta = in_netns(netns, body)
    assert before == {"to_guest": 0, "from_guest": 0}
    assert queued == ring
    assert delta == {"to_guest": sent - ring, "from_guest": 0}
    # Not in this namespace: no such interface here.
    assert TapPort("vd0").host_drops() is None


# -- the worker's receive path from a real tap ------------------------------


@contextlib.contextmanager
def _tap_and_sender(name: str, mtu: int | None = None) -> Iterator[tuple[TapQueue, socket.socket]]:
    """A quiet tap's queue 0 and a packet socket on the tap (the host's side)."""
    port = quiet_tap(name, mtu=mtu)
    ps = packet_socket(name)
    try:
        yield port.queue(0), ps
    finally:
        ps.close()
        port.close()


def _drain(q: TapQueue) -> None:
    fd = q.fileno()
    assert fd is not None
    buf = bytearray(70000)
    with __import__("contextlib").suppress(BlockingIOError):
        while True:
            os.readv(fd, [buf])


def test_worker_rx_from_tap_property(netns: str) -> None:
    """The worker's receive path on a real tap -- the fast loop for frames that
    fit the first chain, the general loop after a frame spills over, chains of
    several buffers, a GSO guest's 64 KiB reserve -- against frames the host
    sends: each arrives intact and in order, over as many chains as its
    ``num_buffers`` says; the port counts every frame; the used index equals
    the popped index minus the reserve."""
    import random

    from hypothesis import example, given, settings
    from hypothesis import strategies as st

    def body() -> int:
        with _tap_and_sender("vtw0", mtu=9000) as (q, ps):
            examples = 0

            @settings(max_examples=30, deadline=None, database=None)
            # Streams longer than the ring: the reserve is refilled, the ring wraps.
            @example([60] * 400, [9014], 1530, False, False, random.Random(1))
            @example([60, 1514] * 150, [3000, 9014], 2048, False, True, random.Random(2))
            @given(
                sizes=st.lists(st.integers(min_value=60, max_value=1514), min_size=1, max_size=150),
                jumbo=st.lists(st.integers(min_value=1515, max_value=9014), max_size=4),
                buf=st.sampled_from([256, 1530, 2048, 4096]),
                split=st.booleans(),
                gso=st.booleans(),
                seed=st.randoms(use_true_random=False),
            )
            def case(sizes: list[int], jumbo: list[int], buf: int, split: bool, gso: bool,
                     seed: Any) -> None:  # fmt: skip
                nonlocal examples
                examples += 1
                mixed = sizes + jumbo
                seed.shuffle(mixed)
                _drain(q)
                tw = WorkerHarness(q, gso=gso, mtu=9000)
                try:
                    w = tw.worker
                    shape = (buf // 2, buf - buf // 2) if split else (buf,)
                    for slot in range(QSIZE // len(shape)):
                        tw.post(slot, shape)
                    tw.rx.publish()
                    frames = [
                        eth(GUEST, PEER, 0x88B5, struct.pack(">I", k) + bytes(range(256)) * 40)[:n]
                        for k, n in enumerate(mixed)
                    ]
                    for fr in frames:
                        ps.send(fr)
                    got: list[bytes] = []
                    for _ in range(200):
                        w.port_readable = True
                        w.rx_batch()
                        used = tw.rx.get_used()
                        pos = 0
                        while pos < len(used):
                            head = used[pos][0]
                            assert isinstance(head, int)
                            hdr = tw.mem.read(tw.slot_addr(head), VNET_HDR_LEN)
                            nb = struct.unpack_from("<H", hdr, 10)[0]
                            assert nb >= 1
                            data = b""
                            for tok, ln in used[pos : pos + nb]:
                                assert isinstance(tok, int)
                                data += tw.mem.read(tw.slot_addr(tok), ln)  # chain is contiguous
                                tw.post(tok, shape)
                            got.append(data[VNET_HDR_LEN:])
                            pos += nb
                        assert pos == len(used)
                        tw.rx.publish()
                        if len(got) == len(frames):
                            break
                    assert got == frames
                    assert (w.port.rx_packets, w.port.rx_dropped) == (len(frames), 0)
                    assert w.port.rx_bytes == sum(len(f) for f in frames)
                    rq = w.rxq
                    assert rq is not None
                    assert (rq.last_avail_idx - len(w.reserve)) & 0xFFFF == rq.used_idx
                finally:
                    tw.close()

            case()
        return examples

    assert in_netns(netns, body) >= 30  # hypothesis may run more than max_examples


def test_worker_rx_from_tap_drops_a_frame_longer_than_the_guest_takes(netns: str) -> None:
    """A frame longer than the guest's MTU allows (the tap's MTU is larger) is
    dropped and counted, on the fast path (a chain larger than any frame the
    guest takes) and on the general one; the frames around it arrive."""

    def body() -> list[tuple[int, int, int]]:
        port = quiet_tap("vtw0", mtu=9000)
        q = port.queue(0)
        ps = packet_socket("vtw0")
        out = []
        try:
            for buf in (2048, 1000):  # >= or < the 1530 bytes a 1500-MTU frame needs
                _drain(q)
                tw = WorkerHarness(q, gso=False, mtu=1500)
                try:
                    for slot in range(64):
                        tw.post(slot, (buf,))
                    tw.rx.publish()
                    for n in (100, 3000, 1514, 100):
                        ps.send(eth(GUEST, PEER, 0x88B5, bytes(n - 14)))
                    w = tw.worker
                    w.port_readable = True
                    delivered = w.rx_batch()
                    out.append((delivered, w.port.rx_packets, w.port.rx_dropped))
                finally:
                    tw.close()
        finally:
            ps.close()
            port.close()
        return out

    assert in_netns(netns, body) == [(3, 3, 1), (3, 3, 1)]


def test_worker_stalled_on_buffers_sleeps_on_the_port_once_the_tap_is_empty(
    netns: str,
) -> None:
    """A worker stalled for want of rx buffers, whose first read after the
    guest posts them finds the tap empty, is no longer stalled: it sleeps
    with the port polled, and the next frame the host sends reaches the ring.
    (The fast tap loop once kept the stall: the port unpolled, the worker
    re-arming forever on the posted buffers, frames dropped by the tap
    until the guest happened to kick.)"""

    def body() -> tuple[list[str], int, bool]:
        with _tap_and_sender("vtw0") as (q, ps):
            _drain(q)
            tw = WorkerHarness(q, gso=False, mtu=1500)
            try:
                w = tw.worker
                w.start()
                w.port_readable = True  # as at start: the port may hold a frame
                w.work()  # no buffers posted: stalled
                assert w.rx_stalled
                for slot in range(QSIZE):
                    tw.post(slot, (1530,))
                tw.rx.publish()  # the guest posts without a kick (EVENT_IDX said no)
                steps: list[str] = []
                while len(steps) < 20 and "slept" not in steps:
                    steps.append(w.step(0.2))
                ps.send(eth(GUEST, PEER, 0x88B5, bytes(100)))
                for _ in range(5):
                    if w.port.rx_packets:
                        break
                    w.step(1.0)
                return steps, w.port.rx_packets, w.rx_stalled
            finally:
                tw.close()

    steps, delivered, stalled = in_netns(netns, body)
    assert "slept" in steps, f"the worker never slept: {steps}"
    assert (delivered, stalled) == (1, False)


#: Guest frames queued by a :class:`Guest` at most (the host socket holds them all).
MAX_XMIT = 3000
#: Where a :class:`Guest`'s tx frames live: past the harness's rx slots.
TX_FRAMES_AT = WorkerHarness.slot_addr(QSIZE)


class Guest:
    """One pair's driver side on a :class:`WorkerHarness` with real eventfds:
    rx buffers posted and taken, tx frames queued and reaped, tx interrupts
    counted, and ``ps`` (a packet socket on the pair's tap) as the host."""

    def __init__(self, tw: WorkerHarness, ps: socket.socket, mac: bytes) -> None:
        self.tw, self.ps, self.mac = tw, ps, mac
        self.rx_free = list(range(QSIZE))
        self.tx_free = list(range(QSIZE))
        self.sent: list[bytes] = []  # by the host, to the guest
        self.got: list[bytes] = []
        self.xmitted: list[bytes] = []  # by the guest, to the host
        self.calls = 0
        self.waiting_mark: int | None = None

    def send(self, count: int, size: int = 78) -> None:
        """The host sends ``count`` numbered frames of ``size`` bytes to the guest."""
        for _ in range(min(count, 900 - len(self.sent))):  # the tap queue holds 1000
            fr = eth(self.mac, PEER, 0x88B5, struct.pack(">I", len(self.sent)).ljust(size - 14))
            self.ps.send(fr)
            self.sent.append(fr)

    def post(self, m: int) -> None:
        tw = self.tw
        for _ in range(min(m, len(self.rx_free))):
            tw.post(self.rx_free.pop(), (1530,))
        if tw.rx.kick_needed():
            os.eventfd_write(tw.efds[0], 1)

    def take(self) -> None:
        tw = self.tw
        for tok, ln in tw.rx.get_used():
            assert isinstance(tok, int)
            data = tw.mem.read(tw.slot_addr(tok), ln)
            assert struct.unpack_from("<H", data, 10)[0] == 1  # num_buffers
            self.got.append(data[VNET_HDR_LEN:])
            self.rx_free.append(tok)

    def xmit(self, n: int) -> None:
        tw = self.tw
        for _ in range(min(n, len(self.tx_free), MAX_XMIT - len(self.xmitted))):
            slot = self.tx_free.pop()
            fr = eth(PEER, self.mac, 0x88B5, struct.pack(">I", len(self.xmitted)) + bytes(60))
            addr = TX_FRAMES_AT + slot * 128
            tw.mem.write(addr, bytes(VNET_HDR_LEN) + fr)
            tw.tx.add([(addr, VNET_HDR_LEN + len(fr))], [], slot)
            self.xmitted.append(fr)
        if tw.tx.kick_needed():
            os.eventfd_write(tw.efds[1], 1)

    def count_calls(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self.calls += os.eventfd_read(self.tw.efds[3])

    def reap(self) -> None:
        for tok, _ in self.tw.tx.get_used():
            assert isinstance(tok, int)
            self.tx_free.append(tok)
        self.waiting_mark = None

    def wait(self) -> None:
        self.count_calls()
        if not self.tw.tx.enable_interrupts(True):
            self.waiting_mark = self.calls  # nothing pending: wait for the call

    def drain_host(self) -> None:
        """Forget what the host side's socket holds (an earlier example's frames)."""
        with contextlib.suppress(BlockingIOError):
            while True:
                self.ps.recv(65536)

    def host_got(self) -> list[bytes]:
        """The guest's frames as the host saw them on the tap."""
        seen: list[bytes] = []
        self.ps.settimeout(1.0)  # delivery to the packet socket may lag the write
        try:
            while len(seen) < len(self.xmitted):
                data = self.ps.recv(65536)
                if data[6:12] == self.mac:
                    seen.append(data)
        except TimeoutError:
            pass
        finally:
            self.ps.setblocking(False)
        return seen


def test_worker_rx_state_machine_never_loses_a_frame_or_spins(netns: str) -> None:
    """Random interleavings of the host sending (small frames and frames up
    to the MTU, for a guest with and without GSO), the guest posting buffers
    (kicking when EVENT_IDX asks, as Linux does), the guest taking used
    entries and the worker's own loop steps, on a real tap with real kick
    eventfds.  Then the guest keeps posting and taking while the worker runs:
    every frame arrives once, in order, and the worker never re-arms three
    times running without work (a stall it cannot leave)."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    action = st.one_of(
        st.tuples(st.just("send"), st.integers(min_value=1, max_value=40)),
        st.tuples(st.just("big"), st.integers(min_value=100, max_value=1514)),
        st.tuples(st.just("post"), st.integers(min_value=1, max_value=QSIZE)),
        st.tuples(st.just("take"), st.just(0)),
        st.tuples(st.just("loop"), st.just(0)),
    )

    def body() -> int:
        with _tap_and_sender("vtw0") as (q, ps):
            examples = 0

            @settings(max_examples=60, deadline=None, database=None)
            @given(actions=st.lists(action, max_size=80), gso=st.booleans())
            def case(actions: list[tuple[str, int]], gso: bool) -> None:
                nonlocal examples
                examples += 1
                _drain(q)
                tw = WorkerHarness(q, gso=gso, mtu=1500, eventfds=True)
                w = tw.worker
                g = Guest(tw, ps, GUEST)
                try:
                    w.start()
                    for what, n in actions:
                        if what == "send":
                            g.send(n)
                        elif what == "big":  # one frame of n bytes, up to the MTU
                            g.send(1, n)
                        elif what == "post":
                            g.post(n)
                        elif what == "take":
                            g.take()
                        else:
                            w.step(0.0)
                    rearms = 0
                    for _ in range(3000):
                        g.take()
                        g.post(QSIZE)
                        step = w.step(0.01)
                        rearms = rearms + 1 if step == "rearm" else 0
                        assert rearms < 3, f"worker re-arms without work: stalled={w.rx_stalled}"
                        if step == "slept" and len(g.got) >= len(g.sent):
                            break
                    g.take()
                    assert g.got == g.sent
                    assert (w.port.rx_packets, w.port.rx_dropped) == (len(g.sent), 0)
                finally:
                    tw.close()

            case()
        return examples

    assert in_netns(netns, body) >= 40


def test_worker_tx_state_machine_sends_every_frame_and_never_loses_a_completion(
    netns: str,
) -> None:
    """The transmit side's state machine (deferred kicks, completions
    signalled when the ring goes quiet) under random interleavings of the
    guest queueing frames (kicking when EVENT_IDX asks), reaping completions,
    asking for a completion interrupt (``used_event``, as a driver out of
    slots does) and the worker's own loop steps, on a real tap with real
    eventfds.  Once the worker sleeps: every frame reached the host once and
    in order, and a guest that asked for an interrupt and has completions
    waiting got one (a lost one stalls a guest's transmit for good)."""
    from hypothesis import example, given, settings
    from hypothesis import strategies as st

    action = st.one_of(
        st.tuples(st.just("xmit"), st.integers(min_value=1, max_value=80)),
        st.tuples(st.just("reap"), st.just(0)),
        st.tuples(st.just("wait"), st.just(0)),
        st.tuples(st.just("loop"), st.just(0)),
    )

    def body() -> int:
        with _tap_and_sender("vtw0") as (q, ps):
            ps.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE: every frame sent fits
            ps.setblocking(False)
            examples = 0

            @settings(max_examples=60, deadline=None, database=None)
            # A guest waiting for a completion of one frame (no deferral) or a burst.
            @example([("wait", 0), ("xmit", 1)])
            @example([("xmit", 3), ("loop", 0), ("wait", 0), ("xmit", 70)])
            @given(actions=st.lists(action, max_size=60))
            def case(actions: list[tuple[str, int]]) -> None:
                nonlocal examples
                examples += 1
                _drain(q)
                tw = WorkerHarness(q, gso=False, mtu=1500, eventfds=True)
                w = tw.worker
                g = Guest(tw, ps, GUEST)
                g.drain_host()
                try:
                    w.start()
                    for what, n in actions:
                        if what == "xmit":
                            g.xmit(n)
                        elif what == "reap":
                            g.reap()
                        elif what == "wait":
                            g.wait()
                        else:
                            w.step(0.0)
                    for _ in range(200):
                        if w.step(0.01) == "slept":
                            break
                    else:
                        raise AssertionError("the worker never went to sleep")
                    g.count_calls()
                    if g.waiting_mark is not None and tw.tx.used_pending():
                        assert g.calls > g.waiting_mark, "completions pending, the interrupt lost"
                    assert w.port.tx_packets == len(g.xmitted)
                    assert g.host_got() == g.xmitted
                finally:
                    tw.close()

            case()
        return examples

    assert in_netns(netns, body) >= 60


def test_worker_group_serves_every_pair_under_random_interleavings(netns: str) -> None:
    """Two pairs served by one process (:class:`WorkerGroup`, ``serve
    --workers``), each on a tap of its own with real eventfds, under random
    interleavings of both guests sending and posting rx buffers, taking used
    entries, queueing tx frames, asking for a tx interrupt, and the group's
    own loop steps.  Then the guests keep taking and posting while the group
    runs: every frame of each pair arrives once and in order (rx and tx), the
    group never re-arms three times running without work, and a guest that
    waits for a tx completion it has pending got its interrupt."""
    from hypothesis import example, given, settings
    from hypothesis import strategies as st

    from virtnet.vhost_user.worker import WorkerGroup

    pair = st.integers(min_value=0, max_value=1)
    action = st.one_of(
        st.tuples(st.just("send"), pair, st.integers(min_value=1, max_value=40)),
        st.tuples(st.just("post"), pair, st.integers(min_value=1, max_value=QSIZE)),
        st.tuples(st.just("take"), pair, st.just(0)),
        st.tuples(st.just("xmit"), pair, st.integers(min_value=1, max_value=80)),
        st.tuples(st.just("reap"), pair, st.just(0)),
        st.tuples(st.just("wait"), pair, st.just(0)),
        st.tuples(st.just("loop"), st.just(0), st.just(0)),
    )
    macs = (GUEST, bytes.fromhex("52540077aa03"))

    def body() -> int:
        with _tap_and_sender("vtw0") as (q0, ps0), _tap_and_sender("vtw1") as (q1, ps1):
            for ps in (ps0, ps1):
                ps.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE
                ps.setblocking(False)
            examples = 0

            @settings(max_examples=40, deadline=None, database=None)
            # A guest waiting for a tx completion, on either pair.
            @example([("wait", 0, 0), ("xmit", 0, 1)])
            @example([("xmit", 0, 5), ("wait", 1, 0), ("loop", 0, 0), ("xmit", 1, 1)])
            @given(actions=st.lists(action, max_size=60))
            def case(actions: list[tuple[str, int, int]]) -> None:
                nonlocal examples
                examples += 1
                guests: list[Guest] = []
                group: WorkerGroup | None = None
                try:
                    for q, ps, mac in ((q0, ps0, macs[0]), (q1, ps1, macs[1])):
                        _drain(q)
                        tw = WorkerHarness(q, gso=False, mtu=1500, eventfds=True)
                        guests.append(Guest(tw, ps, mac))
                        guests[-1].drain_host()
                    group = WorkerGroup([g.tw.worker for g in guests])
                    group.start()
                    for what, p, n in actions:
                        g = guests[p]
                        if what == "send":
                            g.send(n)
                        elif what == "post":
                            g.post(n)
                        elif what == "take":
                            g.take()
                        elif what == "xmit":
                            g.xmit(n)
                        elif what == "reap":
                            g.reap()
                        elif what == "wait":
                            g.wait()
                        else:
                            group.step(0.0)
                    rearms = 0
                    for _ in range(3000):
                        for g in guests:
                            g.take()
                            g.post(QSIZE)
                        step = group.step(0.01)
                        rearms = rearms + 1 if step == "rearm" else 0
                        assert rearms < 3, "the group re-arms without work"
                        if step == "slept" and all(len(g.got) >= len(g.sent) for g in guests):
                            break
                    for i, g in enumerate(guests):
                        g.take()
                        g.count_calls()
                        if g.waiting_mark is not None and g.tw.tx.used_pending():
                            assert g.calls > g.waiting_mark, f"pair {i}: tx interrupt lost"
                        assert g.got == g.sent, f"pair {i}: rx"
                        assert g.host_got() == g.xmitted, f"pair {i}: tx"
                        port = g.tw.worker.port
                        assert (port.rx_packets, port.rx_dropped) == (len(g.sent), 0)
                        assert port.tx_packets == len(g.xmitted)
                finally:
                    if group is not None:
                        group.close()
                    for g in guests:
                        g.tw.close()

            case()
        return examples

    assert in_netns(netns, body) >= 40


def test_lost_sees_a_deleted_tap_but_not_one_moved_to_another_namespace(netns: str) -> None:
    """``TapPort.lost``: the queue fds, not the name, say whether the tap is
    gone -- moved to another namespace it still carries frames."""
    other = f"{netns}-b"
    _ip("netns", "add", other)

    def body() -> tuple[bool, bool, bool, bool]:
        tap = TapPort("vt0")
        try:
            tap.open_queue("vm", 0)
            alive = tap.lost()
            _ip("link", "set", "dev", "vt0", "netns", other)
            moved = tap.lost()
            _ip("-n", other, "link", "del", "vt0")
            deleted = tap.lost()
            tap.drop_queues()  # closes the dead queue; the next one creates vt0 again
            tap.open_queue("vm", 0)
            again = tap.lost()
            return alive, moved, deleted, again
        finally:
            tap.close()

    try:
        assert in_netns(netns, body) == (False, False, True, False)
    finally:
        subprocess.run(["ip", "netns", "del", other], check=False, capture_output=True, timeout=10)


def test_a_tap_created_again_keeps_its_mac(netns: str) -> None:
    def body() -> tuple[bytes | None, bytes | None]:
        tap = TapPort("vt0")
        try:
            tap.open_queue("vm", 0)
            before = tap.hwaddr()
            _ip("link", "del", "vt0")
            tap.drop_queues()
            tap.open_queue("vm", 0)
            return before, tap.hwaddr()
        finally:
            tap.close()

    before, after = in_netns(netns, body)
    assert before is not None and len(before) == 6 and after == before
