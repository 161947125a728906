"""``virtnet rr``: request frames, session placement, and transactions against testpmd."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from virtnet.driver import flow_hash
from virtnet.errors import UsageError
from virtnet.net import inet_checksum
from virtnet.rr import (
    BASE_PORT,
    FRAME_LEN,
    MAX_SESSIONS,
    _session_of,
    assign_sessions,
    request_frame,
    run_rr,
)
from virtnet.rss import flow_id
from virtnet.testing.dpdk import TestPmd, skip_reason

dpdk = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")


def test_request_frame_is_a_valid_udp_frame() -> None:
    f = request_frame(7)
    assert len(f) == FRAME_LEN
    assert f[12:14] == b"\x08\x00" and f[23] == 17  # IPv4, UDP
    assert inet_checksum(f[14:34]) == 0  # header checksum verifies
    assert int.from_bytes(f[34:36], "big") == BASE_PORT + 7
    assert int.from_bytes(f[16:18], "big") == 20 + 8 + 1  # IP total length: 1-byte payload
    assert flow_id(f) is not None
    with pytest.raises(UsageError):
        request_frame(MAX_SESSIONS)


def test_session_of_reply_with_or_without_swapped_ports() -> None:
    assert _session_of(BASE_PORT + 3, 7) == 3
    assert _session_of(7, BASE_PORT + 3) == 3


def test_sessions_follow_the_drivers_flow_hash() -> None:
    per = assign_sessions(100, 2)
    assert sorted(s for p in per for s in p) == list(range(100))
    for pair, sessions in enumerate(per):
        for s in sessions:
            assert flow_hash(request_frame(s)) % 2 == pair
    assert all(per)  # both pairs get sessions
    assert assign_sessions(5, 1) == [[0, 1, 2, 3, 4]]


def test_bad_arguments() -> None:
    for kw in ({"sessions": 0}, {"queues": 0}, {"seconds": -1}):
        with pytest.raises(UsageError):
            run_rr("/nonexistent", **kw)  # type: ignore[arg-type]


@dpdk
@pytest.mark.dpdk
@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("queues", "sessions", "busy"), [(1, 1, False), (1, 20, True), (2, 50, False)]
)
def test_transactions_through_testpmd_macswap(
    tmp_path: Path, queues: int, sessions: int, busy: bool
) -> None:
    sock = tmp_path / "v.sock"
    with TestPmd.vhost(sock, queues=queues, fwd="macswap") as pmd:
        pmd.start_forwarding()
        res = run_rr(
            str(sock), queues=queues, sessions=sessions, seconds=1.5, busy_poll=busy,
            queue_size=256,
        )  # fmt: skip
        st = pmd.port_stats()[0]
    assert not res.failed_pairs
    assert res.transactions > 1000
    assert all(p.stale == 0 and p.lost == 0 for p in res.pairs)
    assert sum(p.sessions for p in res.pairs) == sessions
    # Every completed transaction went through testpmd and back.
    assert st.tx_packets >= res.transactions
    if queues == 2:
        assert all(p.transactions > 0 for p in res.pairs)
    assert res.cpu_seconds > 0 and res.mean_latency_us > 0


@dpdk
@pytest.mark.dpdk
@pytest.mark.timeout(120)
def test_rxonly_completes_nothing_and_counts_losses(tmp_path: Path) -> None:
    sock = tmp_path / "v.sock"
    with TestPmd.vhost(sock, queues=1, fwd="rxonly") as pmd:
        pmd.start_forwarding()
        res = run_rr(str(sock), sessions=4, seconds=1.2, queue_size=64)
    assert res.transactions == 0
    assert sum(p.lost for p in res.pairs) >= 4  # each session retried after RETRY_TIMEOUT


@dpdk
@pytest.mark.dpdk
@pytest.mark.timeout(120)
def test_cli_json(tmp_path: Path) -> None:
    sock = tmp_path / "v.sock"
    with TestPmd.vhost(sock, queues=1, fwd="io") as pmd:
        pmd.start_forwarding()
        out = subprocess.run(
            [sys.executable, "-m", "virtnet.cli", "rr", "--connect", str(sock),
             "--sessions", "4", "--seconds", "1", "--json", "--queue-size", "64"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["sessions"] == 4 and doc["transactions"] > 0 and doc["tps"] > 0


def test_inet_checksum_pads_odd_lengths() -> None:
    """RFC 1071's example bytes sum to 0xddf2; an odd length counts a zero byte after."""
    assert inet_checksum(bytes.fromhex("0001f203f4f5f6f7")) == ~0xDDF2 & 0xFFFF
    assert inet_checksum(b"\x01") == inet_checksum(b"\x01\x00") == 0xFEFF
