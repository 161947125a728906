"""netif/ring.h layouts (checked against the C headers) and ring index rules."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtnet.xen import rings
from virtnet.xen.rings import (
    CTRL_REQ,
    CTRL_RING,
    CTRL_RSP,
    EXTRA,
    PAGE_SIZE,
    RX_REQ,
    RX_RING,
    RX_RSP,
    SRING_HEADER_SIZE,
    TX_REQ,
    TX_RING,
    TX_RSP,
    BackRing,
    FrontRing,
    RingError,
)

C_PROGRAM = r"""
#include <stddef.h>
#include <stdio.h>
#include <stdint.h>
#include <xen/xen.h>
#include <xen/grant_table.h>
#include <xen/io/netif.h>
#define P(x) printf(#x " %zu\n", (size_t)(x))
int main(void) {
    P(sizeof(struct netif_tx_request));
    P(offsetof(struct netif_tx_request, gref));
    P(offsetof(struct netif_tx_request, offset));
    P(offsetof(struct netif_tx_request, flags));
    P(offsetof(struct netif_tx_request, id));
    P(offsetof(struct netif_tx_request, size));
    P(sizeof(struct netif_tx_response));
    P(offsetof(struct netif_tx_response, status));
    P(sizeof(struct netif_rx_request));
    P(offsetof(struct netif_rx_request, gref));
    P(sizeof(struct netif_rx_response));
    P(offsetof(struct netif_rx_response, offset));
    P(offsetof(struct netif_rx_response, flags));
    P(offsetof(struct netif_rx_response, status));
    P(sizeof(struct netif_extra_info));
    P(offsetof(struct netif_extra_info, u.hash.value));
    P(sizeof(struct xen_netif_ctrl_request));
    P(sizeof(struct xen_netif_ctrl_response));
    P(offsetof(struct xen_netif_ctrl_response, data));
    P(sizeof(union netif_tx_sring_entry));
    P(sizeof(union netif_rx_sring_entry));
    P(sizeof(union xen_netif_ctrl_sring_entry));
    P(offsetof(struct netif_tx_sring, req_event));
    P(offsetof(struct netif_tx_sring, rsp_prod));
    P(offsetof(struct netif_tx_sring, rsp_event));
    P(offsetof(struct netif_tx_sring, ring));
    P(__CONST_RING_SIZE(netif_tx, 4096));
    P(__CONST_RING_SIZE(netif_rx, 4096));
    P(__CONST_RING_SIZE(xen_netif_ctrl, 4096));
    P(sizeof(struct grant_entry_v1));
    P(NETIF_RSP_NULL);
    P(XEN_NETIF_CTRL_TYPE_SET_HASH_ALGORITHM);
    return 0;
}
"""


@pytest.mark.skipif(
    not Path("/usr/include/xen/io/netif.h").exists() or shutil.which("gcc") is None,
    reason="libxen-dev headers or gcc missing",
)
def test_layout_matches_c_headers(tmp_path: Path) -> None:
    src = tmp_path / "layout.c"
    src.write_text(C_PROGRAM)
    exe = tmp_path / "layout"
    subprocess.run(["gcc", "-o", str(exe), str(src)], check=True, timeout=60)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    c = {k: int(v) for k, v in (line.rsplit(" ", 1) for line in out.splitlines())}

    def get(expr: str) -> int:
        return c[expr]

    assert get("sizeof(struct netif_tx_request)") == TX_REQ.size == 12
    assert [
        get(f"offsetof(struct netif_tx_request, {f})")
        for f in ("gref", "offset", "flags", "id", "size")
    ] == [0, 4, 6, 8, 10]
    assert get("sizeof(struct netif_tx_response)") == TX_RSP.size == 4
    assert get("offsetof(struct netif_tx_response, status)") == 2
    assert get("sizeof(struct netif_rx_request)") == RX_REQ.size == 8
    assert get("offsetof(struct netif_rx_request, gref)") == 4
    assert get("sizeof(struct netif_rx_response)") == RX_RSP.size == 8
    assert [
        get(f"offsetof(struct netif_rx_response, {f})") for f in ("offset", "flags", "status")
    ] == [2, 4, 6]
    assert get("sizeof(struct netif_extra_info)") == EXTRA.size == rings.EXTRA_HASH.size == 8
    assert get("offsetof(struct netif_extra_info, u.hash.value)") == 4
    assert get("sizeof(struct xen_netif_ctrl_request)") == CTRL_REQ.size
    assert get("sizeof(struct xen_netif_ctrl_response)") == CTRL_RSP.size
    assert get("offsetof(struct xen_netif_ctrl_response, data)") == 8
    assert get("sizeof(union netif_tx_sring_entry)") == TX_RING.entry_size == 12
    assert get("sizeof(union netif_rx_sring_entry)") == RX_RING.entry_size == 8
    assert get("sizeof(union xen_netif_ctrl_sring_entry)") == CTRL_RING.entry_size == 16
    assert [
        get(f"offsetof(struct netif_tx_sring, {f})")
        for f in ("req_event", "rsp_prod", "rsp_event", "ring")
    ] == [4, 8, 12, SRING_HEADER_SIZE]
    assert get("__CONST_RING_SIZE(netif_tx, 4096)") == TX_RING.size == 256
    assert get("__CONST_RING_SIZE(netif_rx, 4096)") == RX_RING.size == 256
    assert get("__CONST_RING_SIZE(xen_netif_ctrl, 4096)") == CTRL_RING.size
    assert get("sizeof(struct grant_entry_v1)") == 8
    assert get("NETIF_RSP_NULL") == rings.NETIF_RSP_NULL


def _pair(start: int = 0) -> tuple[FrontRing, BackRing, memoryview]:
    page = memoryview(bytearray(PAGE_SIZE))
    f = FrontRing(page, TX_RING, start=start)
    b = BackRing(page, TX_RING, start=start)
    return f, b, page


def test_notify_rules_and_final_check() -> None:
    f, b, page = _pair()
    assert f.req_event == 1 and f.rsp_event == 1
    TX_REQ.pack_into(page, f.next_request_offset(), 10, 0, 0, 7, 60)
    f.commit_request()
    assert f.push_requests_and_check_notify()  # req_event == 1 lies in (0, 1]
    TX_REQ.pack_into(page, f.next_request_offset(), 11, 0, 0, 8, 60)
    f.commit_request()
    assert not f.push_requests_and_check_notify()  # backend has not re-armed
    assert b.unconsumed_requests() == 2
    got = []
    while b.unconsumed_requests():
        got.append(TX_REQ.unpack_from(page, b.offset(b.req_cons))[3])
        b.req_cons += 1
    assert got == [7, 8]
    assert not b.final_check_for_requests()
    assert b.req_event == 3
    for i in (7, 8):
        TX_RSP.pack_into(page, b.next_response_offset(), i, 0)
        b.commit_response()
    assert b.push_responses_and_check_notify()  # rsp_event 1 in (0, 2]
    assert f.unconsumed_responses() == 2
    f.rsp_cons += 2
    assert not f.final_check_for_responses()
    assert f.rsp_event == 3
    TX_REQ.pack_into(page, f.next_request_offset(), 12, 0, 0, 9, 60)
    f.commit_request()
    assert f.push_requests_and_check_notify()


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.lists(st.integers(1, 256), min_size=1, max_size=20))
def test_wraparound_at_2_32(start: int, batches: list[int]) -> None:
    f, b, page = _pair(start)
    sent = 0
    seen = 0
    for want in batches:
        n = min(want, f.free_requests())
        for _ in range(n):
            TX_REQ.pack_into(page, f.next_request_offset(), 0, 0, 0, sent & 0xFFFF, 1)
            f.commit_request()
            sent += 1
        f.push_requests_and_check_notify()
        k = b.unconsumed_requests()
        assert k == n
        for _ in range(k):
            assert TX_REQ.unpack_from(page, b.offset(b.req_cons))[3] == seen & 0xFFFF
            b.req_cons = (b.req_cons + 1) & 0xFFFFFFFF
            TX_RSP.pack_into(page, b.next_response_offset(), seen & 0xFFFF, 0)
            b.commit_response()
            seen += 1
        b.push_responses_and_check_notify()
        assert f.unconsumed_responses() == k
        f.rsp_cons = (f.rsp_cons + k) & 0xFFFFFFFF
    assert seen == sent


def test_hostile_indexes() -> None:
    f, b, page = _pair()
    idx = page[:16].cast("I")
    idx[0] = 257  # req_prod more than a ring beyond rsp_prod_pvt
    with pytest.raises(RingError):
        b.unconsumed_requests()
    idx[0] = 0xFFFFFFF0  # "negative": also beyond the ring
    with pytest.raises(RingError):
        b.unconsumed_requests()
    idx[0] = 256  # exactly a full ring is legal
    assert b.unconsumed_requests() == 256
    idx[0] = 0
    idx[2] = 5  # responses the frontend never asked for
    with pytest.raises(RingError):
        f.unconsumed_responses()
    idx.release()
