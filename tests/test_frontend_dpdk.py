"""The vhost-user frontend against DPDK's vhost PMD (real ``dpdk-testpmd``).

testpmd forwards in ``rxonly`` (counts and drops), ``macswap`` (echo with
MACs swapped) and ``io`` (echo unchanged) modes; each echo goes back on the
queue pair it came in on.  Also: a queue-count change under load loses
nothing beyond counted drops, the frontend reconnects when testpmd
restarts, and it works as the listening side (testpmd ``client=1``).
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtnet.demo import PAYLOAD_OFF, build_frame
from virtnet.net import NetFeature
from virtnet.testing.dpdk import TestPmd, skip_reason
from virtnet.vhost_user.frontend import VhostUserFrontend

pytestmark = [pytest.mark.dpdk, pytest.mark.timeout(180)]

if skip_reason() is not None:  # pragma: no cover - depends on the machine
    pytest.skip(skip_reason() or "", allow_module_level=True)

_SEQ = struct.Struct("!II")


@pytest.fixture
def sock(tmp_path: Path) -> Path:
    return tmp_path / "vhost.sock"


def pmd(sock: Path, queues: int, fwd: str, *, client: bool = False) -> TestPmd:
    return TestPmd.vhost(sock, queues=queues, fwd=fwd, client=client)


@pytest.fixture
def macswap4(sock: Path) -> Iterator[TestPmd]:
    with pmd(sock, 4, "macswap") as p:
        p.start_forwarding()
        yield p


def collect(fe: VhostUserFrontend, want: int, timeout: float = 5.0) -> list[tuple[int, bytes]]:
    got: list[tuple[int, bytes]] = []
    end = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < end:
        got += [(f.pair, f.data) for f in fe.receive(0.05)]
    return got


def drops(fe: VhostUserFrontend) -> int:
    return sum(v for k, v in fe.driver_stats().items() if k.endswith("_drops"))


def test_rxonly_counts_every_frame(sock: Path) -> None:
    with pmd(sock, 1, "rxonly") as p:
        p.start_forwarding()
        with VhostUserFrontend(sock) as fe:
            sent = 0
            for k in range(20):
                sent += fe.send([build_frame(f, k) for f in range(10)])
                time.sleep(0.002)
            assert sent == 200
            end = time.monotonic() + 5
            while p.port_stats()[0].rx_packets < sent and time.monotonic() < end:
                time.sleep(0.05)
            st = p.port_stats()[0]
            assert st.rx_packets == sent
            assert st.rx_bytes == sum(len(build_frame(0, 0)) for _ in range(sent))
            assert fe.driver_stats()["tx_queue_0_packets"] == sent


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_macswap_echoes_on_the_same_pair(macswap4: TestPmd, sock: Path, packed: bool) -> None:
    with VhostUserFrontend(sock, queue_pairs=4, packed=packed) as fe:
        # DPDK's vhost offers IN_ORDER: our driver's queues then check that it
        # uses every buffer in the order it was made available.
        assert fe.features & NetFeature.IN_ORDER
        assert bool(fe.features & NetFeature.RING_PACKED) is packed
        assert fe.max_pairs == 4
        assert fe.set_queue_pairs(4)
        frames = [build_frame(f, 0) for f in range(64)]
        sent_pair = {f: fe.driver.select_queue(fr) for f, fr in enumerate(frames)}
        assert len(set(sent_pair.values())) == 4  # 64 flows spread over all pairs
        assert fe.send(frames) == 64
        got = collect(fe, 64)
        assert len(got) == 64
        for pair, data in got:
            flow, _ = _SEQ.unpack_from(data, PAYLOAD_OFF)
            assert pair == sent_pair[flow]
            orig = frames[flow]
            assert data[0:6] == orig[6:12] and data[6:12] == orig[0:6]  # MACs swapped
            assert data[12:] == orig[12:]


def test_io_echoes_unchanged(sock: Path) -> None:
    with pmd(sock, 2, "io") as p:
        p.start_forwarding()
        with VhostUserFrontend(sock, queue_pairs=2) as fe:
            assert fe.set_queue_pairs(2)
            frames = [build_frame(f, 7, 128) for f in range(32)]
            assert fe.send(frames) == 32
            got = collect(fe, 32)
            assert sorted(d for _, d in got) == sorted(frames)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_queue_change_under_load_loses_nothing_uncounted(
    macswap4: TestPmd, sock: Path, packed: bool
) -> None:
    """Frames keep flowing while the pairs go 4 -> 1 -> 2 -> 3 -> 4.

    Every frame sent comes back exactly once, or is counted as a drop by the
    driver (tx ring full) or by testpmd (TX-errors: it could not put the echo
    into our receive ring).  ``packed``: on packed virtqueues.
    """
    flows = 48
    window = 192
    with VhostUserFrontend(sock, queue_pairs=4, queue_size=256, packed=packed) as fe:
        assert fe.set_queue_pairs(4)
        seqs = [0] * flows
        seen: list[set[int]] = [set() for _ in range(flows)]
        dup = 0
        received = 0
        schedule = [1, 2, 3, 4]
        start = time.monotonic()
        phase = 0
        pairs_used: set[int] = set()

        def take(frames: list[tuple[int, bytes]]) -> None:
            nonlocal dup, received
            for pair, data in frames:
                flow, seq = _SEQ.unpack_from(data, PAYLOAD_OFF)
                pairs_used.add(pair)
                if seq in seen[flow]:
                    dup += 1
                else:
                    seen[flow].add(seq)
                    received += 1

        while time.monotonic() - start < 3.0:
            t = time.monotonic() - start
            if phase < len(schedule) and t >= 0.5 * (phase + 1):
                assert fe.set_queue_pairs(schedule[phase])
                phase += 1
            if sum(seqs) - received - drops(fe) < window:
                batch = []
                for f in range(flows):
                    batch.append(build_frame(f, seqs[f]))
                    seqs[f] += 1
                fe.send(batch)
            take([(f.pair, f.data) for f in fe.receive(0.001)])
        # Drain what is still in flight.
        end = time.monotonic() + 5
        tx_drops = 0
        while time.monotonic() < end:
            tx_drops = drops(fe)
            if received + tx_drops + macswap4.port_stats()[0].tx_errors >= sum(seqs):
                break
            take([(f.pair, f.data) for f in fe.receive(0.05)])
        pmd_drops = macswap4.port_stats()[0].tx_errors
        assert phase == len(schedule)
        assert fe.stats.enable_changes >= 3 * 2 + 3 * 2
        assert dup == 0
        assert received > 0 and pairs_used == {0, 1, 2, 3}
        assert received + tx_drops + pmd_drops == sum(seqs), (received, tx_drops, pmd_drops)


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_reconnect_when_testpmd_restarts(sock: Path, packed: bool) -> None:
    """``packed``: the new testpmd takes up each ring at the used position our
    driver walks off it, through DPDK's one-descriptor transmit batches."""
    first = pmd(sock, 2, "macswap").start()
    try:
        first.start_forwarding()
        fe = VhostUserFrontend(sock, queue_pairs=2, timeout=15.0, packed=packed)
        with fe:
            assert fe.set_queue_pairs(2)
            assert fe.send([build_frame(f, 0) for f in range(8)]) == 8
            assert len(collect(fe, 8)) == 8
            first.kill()  # a crashed backend
            if sock.exists():
                os.unlink(sock)
            with pmd(sock, 2, "macswap") as second:
                second.start_forwarding()
                end = time.monotonic() + 20
                while fe.stats.reconnects == 0 and time.monotonic() < end:
                    fe.check_connection()
                    time.sleep(0.05)
                assert fe.stats.reconnects == 1
                assert fe.curr_pairs == 2
                assert fe.send([build_frame(f, 1) for f in range(8)]) == 8
                got = collect(fe, 8)
                assert sorted(_SEQ.unpack_from(d, PAYLOAD_OFF) for _, d in got) == [
                    (f, 1) for f in range(8)
                ]
    finally:
        first.close()


def test_listen_mode_with_testpmd_as_client(sock: Path) -> None:
    with pmd(sock, 1, "macswap", client=True) as p:
        p.start_forwarding()
        with VhostUserFrontend(sock, mode="listen", timeout=20.0) as fe:
            assert fe.send([build_frame(f, 3) for f in range(4)]) == 4
            assert len(collect(fe, 4)) == 4
    assert not sock.exists()


def test_pmd_stats_parser_and_clean_shutdown(sock: Path) -> None:
    p = pmd(sock, 1, "rxonly").start()
    pid = p.pid
    try:
        st = p.port_stats()
        assert st[0].rx_packets == 0 and st[0].tx_packets == 0
        assert p.cpu_seconds() >= 0.0
    finally:
        p.close()
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
