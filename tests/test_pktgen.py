"""``virtnet pktgen``: frames, schedule parsing, the fast rings, and runs into DPDK testpmd."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from virtnet.errors import UsageError, VirtqueueError
from virtnet.memory import GuestMemory
from virtnet.pktgen import (
    MAX_FRAME,
    MIN_FRAME,
    SharedControl,
    build_frames,
    parse_schedule,
    read_counters,
    run_pktgen,
)
from virtnet.testing.dpdk import TestPmd, skip_reason
from virtnet.vhost_user.frontend import FastPair, RingInfo, recycle
from virtnet.virtq import split_ring_layout

dpdk = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")


def test_frames() -> None:
    frames = build_frames(64, 4)
    assert [len(f) for f in frames] == [64] * 4
    assert len(set(frames)) == 4
    assert len(build_frames(MIN_FRAME, 1)[0]) == MIN_FRAME
    assert len(build_frames(MAX_FRAME, 1)[0]) == MAX_FRAME


def test_schedule() -> None:
    assert parse_schedule("4@3,2@1.5") == [(1.5, 2), (3.0, 4)]
    assert parse_schedule(None) == []
    with pytest.raises(UsageError):
        parse_schedule("2at1")


def test_bad_arguments() -> None:
    for kw in ({"size": 10}, {"size": 9000}, {"queues": 0}, {"flows": 0}, {"seconds": 0}):
        with pytest.raises(UsageError):
            run_pktgen("/nonexistent", **kw)  # type: ignore[arg-type]


def test_shared_control_survives_fork() -> None:
    ctl = SharedControl(2)
    pid = os.fork()
    if pid == 0:  # child
        ctl.q[ctl.base(1)] = 42
        ctl.active = 7
        os._exit(0)
    os.waitpid(pid, 0)
    assert read_counters(ctl, 1).tx_packets == 42 and ctl.active == 7
    ctl.close()


def _pair(size: int = 8) -> tuple[FastPair, GuestMemory]:
    mem = GuestMemory.anonymous(1 << 20)
    lay = split_ring_layout(size)
    rx = RingInfo(0, size, 0x1000, 0x1000 + lay.avail, 0x1000 + lay.used, -1, -1)
    tx = RingInfo(1, size, 0x10000, 0x10000 + lay.avail, 0x10000 + lay.used, -1, -1)
    bufs = [0x20000 + 2048 * i for i in range(size)]
    slots = [0x40000 + 2048 * i for i in range(size)]
    fp = FastPair(mem, 0, rx, bufs, 2048, tx, slots, 2048, hdr_len=12, event_idx=True)
    return fp, mem


def test_fast_pair_rings_and_recycling_in_any_order() -> None:
    fp, mem = _pair()
    fp.load_frames(build_frames(64, 2))
    fp.tx_start()
    assert fp.tx_avail[1] == 8 and list(fp.tx_avail[2:10]) == list(range(8))
    assert fp.rx_avail[1] == 8
    # The device returns heads 3, 1, 0 out of order: they go back into the
    # same avail positions 0..2.
    for k, head in enumerate((3, 1, 0)):
        fp.tx_used_ring[2 * k] = head
    recycle(fp.tx_avail, fp.tx_used_ring, 8, 0, 3)
    assert list(fp.tx_avail[2:5]) == [3, 1, 0]
    # Wrapping: positions 6, 7, 0.
    for k, head in zip((6, 7, 0), (5, 6, 7), strict=True):
        fp.tx_used_ring[2 * k] = head
    recycle(fp.tx_avail, fp.tx_used_ring, 8, 6, 3)
    assert [fp.tx_avail[2 + 6], fp.tx_avail[2 + 7], fp.tx_avail[2]] == [5, 6, 7]
    # A head beyond the ring is the device's fault.
    fp.tx_used_ring[0] = 8
    with pytest.raises(VirtqueueError):
        recycle(fp.tx_avail, fp.tx_used_ring, 8, 0, 1)
    # Slot contents: header then the frame, descriptor length fixed.
    assert mem.read(fp.tx_slots[1] + 12, 64) == build_frames(64, 2)[1]
    del fp
    mem.close()


def test_fast_pair_rejects_mixed_frame_lengths() -> None:
    fp, mem = _pair()
    with pytest.raises(ValueError):
        fp.load_frames([b"a" * 60, b"b" * 61])
    del fp
    mem.close()


# ---------------------------------------------------------------------------
# Into DPDK testpmd
# ---------------------------------------------------------------------------


@dpdk
@pytest.mark.dpdk
@pytest.mark.timeout(120)
def test_one_pair_into_testpmd_rxonly(tmp_path: Path) -> None:
    sock = tmp_path / "v.sock"
    with TestPmd.vhost(sock, queues=1, fwd="rxonly") as pmd:
        pmd.start_forwarding()
        # Pinned off testpmd's polling core: on 2 CPUs, sharing it halves both.
        # Speed is measured by bench/pktgen_dpdk.py, not asserted here.
        pmd.clear_stats()
        res = run_pktgen(str(sock), queues=1, size=64, seconds=2.0, cpus=pmd.other_cpus())
        st = pmd.port_stats()[0]
    assert not res.failed_pairs
    q = res.queues[0]
    # testpmd dequeued at least what we counted (the device returned those),
    # at most one ring more (consumed but not yet seen used when we stopped).
    assert q.tx_packets <= st.rx_packets <= q.tx_packets + 1024
    assert st.rx_bytes == st.rx_packets * 64
    assert q.tx_packets > 0
    assert q.tx_kicks < q.tx_packets / 100  # never a syscall per packet


@dpdk
@pytest.mark.dpdk
@pytest.mark.timeout(120)
def test_two_pairs_macswap_with_a_queue_change(tmp_path: Path) -> None:
    sock = tmp_path / "v.sock"
    with TestPmd.vhost(sock, queues=2, fwd="macswap") as pmd:
        pmd.start_forwarding()
        res = run_pktgen(
            str(sock), queues=2, size=128, flows=8, seconds=2.4, schedule=[(0.8, 1), (1.6, 2)]
        )
    assert not res.failed_pairs
    assert [(n, ok) for _, n, ok in res.switches] == [(1, True), (2, True)]
    for q in res.queues:
        assert q.tx_packets > 0 and q.rx_packets > 0
        assert q.rx_bytes == q.rx_packets * 128
        assert q.rx_packets <= q.tx_packets


@dpdk
@pytest.mark.dpdk
@pytest.mark.timeout(120)
def test_cli_json_and_io_mode(tmp_path: Path) -> None:
    sock = tmp_path / "v.sock"
    with TestPmd.vhost(sock, queues=1, fwd="io") as pmd:
        pmd.start_forwarding()
        out = subprocess.run(
            [sys.executable, "-m", "virtnet.cli", "pktgen", "--connect", str(sock),
             "--seconds", "1", "--json", "--size", "256", "--queue-size", "256"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["size"] == 256 and len(doc["queues"]) == 1
    assert doc["total"]["tx_packets"] > 0 and doc["total"]["rx_packets"] > 0
    assert doc["queues"][0]["tx_gbps"] > 0


def test_cli_no_backend_is_a_clean_error(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "virtnet.cli", "pktgen", "--connect", str(tmp_path / "none"),
         "--timeout", "0.3", "--seconds", "1"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 1
    assert "peer error" in out.stderr and "cannot connect" in out.stderr
