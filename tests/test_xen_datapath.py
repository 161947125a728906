"""netif data path in one process: frontend and backend queues over one guest memory."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtnet.errors import PeerError
from virtnet.ports import make_port
from virtnet.xen.datapath import BackendQueue, FrontendQueue
from virtnet.xen.grant import DomainMemory, GrantMapper, GrantTable
from virtnet.xen.rings import (
    EXTRA_GSO,
    NETIF_RSP_ERROR,
    NETIF_RSP_NULL,
    NETIF_RSP_OKAY,
    NETTXF_EXTRA_INFO,
    NETTXF_MORE_DATA,
    TX_REQ,
    TX_RSP,
    RingError,
)


def _frame(seq: int, size: int = 64) -> bytes:
    eth = b"\x02\x00\x00\x00\x00\x02" + b"\x02\x00\x00\x00\x00\x01" + b"\x08\x00"
    ip = struct.pack(
        ">BBHHHBBH4s4s", 0x45, 0, size - 14, 0, 0, 64, 17, 0, b"\x0a\0\0\1", b"\x0a\0\0\2"
    )
    udp = struct.pack(">HHHH", 1000, 2000, size - 34, 0)
    body = struct.pack(">Q", seq)
    return (eth + ip + udp + body).ljust(size, b"\x00")


class Rig:
    def __init__(self) -> None:
        self.mem = DomainMemory.create("dp", 2048, 2)
        self.gt = GrantTable(self.mem)
        self.fq = FrontendQueue(0, self.gt, 0)
        self.mapper = GrantMapper(self.mem, domid=0, granter=1)
        self.port = make_port("loopback").open_queue("vm", 0)
        self.bq = BackendQueue(
            0,
            self.mapper.map(self.fq.tx_ring_ref),
            self.mapper.map(self.fq.rx_ring_ref),
            self.mapper,
            self.port,
        )
        self.got: list[bytes] = []

    def send(self, data: bytes, flags: int = 0) -> int:
        slot = self.fq.tx_slot()
        assert slot is not None
        self.fq.tx_bufs[slot][: len(data)] = data
        self.fq.queue_tx(slot, len(data), flags)
        return slot

    def pump(self) -> None:
        self.fq.post_rx()
        self.fq.push_tx()
        self.bq.process_tx()
        self.bq.process_rx()
        self.fq.reap_tx()
        self.fq.reap_rx(lambda b: self.got.append(bytes(b)))


def test_round_trip_many() -> None:
    r = Rig()
    sent = []
    for seq in range(2000):
        f = _frame(seq, 60 + seq % 1400)
        sent.append(f)
        r.send(f)
        if seq % 50 == 49:
            r.pump()
    r.pump()
    r.pump()
    assert len(r.got) == 2000
    for s, g in zip(sent, r.got, strict=True):
        assert g[12:] == s[12:] and g[:6] == s[6:12]  # loopback swaps MACs
    assert r.bq.counters["tx_packets"] == 2000 == r.bq.counters["rx_packets"]
    assert r.fq.counters["tx_errors"] == 0


def _raw_tx(r: Rig, *reqs: tuple[int, int, int, int, int]) -> None:
    ring = r.fq.tx
    for req in reqs:
        TX_REQ.pack_into(r.fq.tx_page, ring.offset(ring.req_prod_pvt), *req)
        ring.req_prod_pvt += 1
    ring.push_requests_and_check_notify()


def _responses(r: Rig) -> list[tuple[int, int]]:
    ring = r.fq.tx
    out = []
    while ring.unconsumed_responses():
        out.append(TX_RSP.unpack_from(r.fq.tx_page, ring.offset(ring.rsp_cons)))
        ring.rsp_cons += 1
    return out


def test_bad_packets_get_error_responses() -> None:
    r = Rig()
    ok_ref = r.fq.tx_refs[0]
    r.fq.tx_bufs[0][:64] = _frame(1)
    _raw_tx(
        r,
        (999_999, 0, 0, 1, 60),  # ungranted ref
        (r.fq.rx_ring_ref + 10_000, 0, 0, 2, 60),  # out of table
        (ok_ref, 0, 0, 3, 10),  # shorter than an Ethernet header
        (ok_ref, 0, 0, 4, 60),  # fine
    )
    done, _ = r.bq.process_tx()
    assert done == 4
    assert _responses(r) == [
        (1, NETIF_RSP_ERROR),
        (2, NETIF_RSP_ERROR),
        (3, NETIF_RSP_ERROR),
        (4, NETIF_RSP_OKAY),
    ]
    assert r.bq.counters["tx_errors"] == 3


def test_readonly_and_foreign_grants() -> None:
    r = Rig()
    foreign = r.gt.grant_access(7, r.gt.alloc_frame())  # granted to another domain
    _raw_tx(r, (foreign, 0, 0, 1, 60))
    r.bq.process_tx()
    assert _responses(r) == [(1, NETIF_RSP_ERROR)]
    # rx buffer granted read-only: backend cannot write -> error status, no crash.
    r.fq.rx_refs[0] = r.gt.grant_access(0, r.fq.rx_frames[0], readonly=True)
    r.send(_frame(5))
    r.pump()
    assert r.bq.counters["rx_errors"] + len(r.got) >= 1


def test_extra_and_fragments() -> None:
    r = Rig()
    f = _frame(9, 100)
    r.fq.tx_bufs[0][:40] = f[:40]
    r.fq.tx_bufs[1][:60] = f[40:]
    ring = r.fq.tx
    _raw_tx(r, (r.fq.tx_refs[0], 0, NETTXF_MORE_DATA, 0, 100), (r.fq.tx_refs[1], 0, 0, 1, 60))
    r.bq.process_tx()
    assert _responses(r) == [(0, NETIF_RSP_OKAY), (1, NETIF_RSP_OKAY)]
    # A GSO extra slot gets a NULL response.
    TX_REQ.pack_into(
        r.fq.tx_page, ring.offset(ring.req_prod_pvt), r.fq.tx_refs[0], 0, NETTXF_EXTRA_INFO, 2, 60
    )
    EXTRA_GSO.pack_into(r.fq.tx_page, ring.offset(ring.req_prod_pvt + 1), 1, 0, 1448, 1, 0, 0)
    ring.req_prod_pvt += 2
    ring.push_requests_and_check_notify()
    r.fq.tx_bufs[0][:64] = _frame(3)  # UDP + GSO TCPv4 is refused: error, not fatal
    r.bq.process_tx()
    assert _responses(r) == [(2, NETIF_RSP_ERROR), (0, NETIF_RSP_NULL)]


@pytest.mark.parametrize(
    "reqs",
    [
        [(8, 4000, 0, 1, 200)],  # crosses the page
        [(8, 0, NETTXF_MORE_DATA, 1, 100)],  # fragment never published
        [(8, 0, NETTXF_MORE_DATA, 1, 10), (8, 0, 0, 2, 60)],  # fragments longer than packet
        [(8, 0, NETTXF_MORE_DATA, 0, 60000)]
        + [(8, 0, NETTXF_MORE_DATA, i, 100) for i in range(1, 21)]
        + [(8, 0, 0, 99, 60)],  # more than FATAL_SKB_SLOTS slots
    ],
)
def test_fatal_packets(reqs: list[tuple[int, int, int, int, int]]) -> None:
    r = Rig()
    _raw_tx(r, *reqs)
    with pytest.raises(RingError):
        r.bq.process_tx()


def test_hostile_ring_index_and_bad_extra() -> None:
    r = Rig()
    struct.pack_into("<I", r.fq.tx_page, 0, 100_000)  # req_prod far beyond the ring
    with pytest.raises(PeerError):
        r.bq.process_tx()
    r = Rig()
    ring = r.fq.tx
    TX_REQ.pack_into(r.fq.tx_page, ring.offset(0), r.fq.tx_refs[0], 0, NETTXF_EXTRA_INFO, 1, 60)
    EXTRA_GSO.pack_into(r.fq.tx_page, ring.offset(1), 9, 0, 0, 0, 0, 0)  # unknown extra type
    ring.req_prod_pvt = 2
    ring.push_requests_and_check_notify()
    with pytest.raises(RingError):
        r.bq.process_tx()
    # A hostile backend: rx response for an id never posted.
    r = Rig()
    struct.pack_into("<I", r.fq.rx_page, 8, 1)  # rsp_prod = 1 with nothing posted
    with pytest.raises(RingError):
        r.fq.reap_rx(lambda b: None)


def test_gso_and_checksum_offload_reach_the_port() -> None:
    from virtnet.xen.datapath import VNET_HDR
    from virtnet.xen.netfront import flow_frame
    from virtnet.xen.rings import NETTXF_CSUM_BLANK, NETTXF_DATA_VALIDATED

    r = Rig()
    frame = flow_frame(10000, 1500)  # TCP/IPv4
    ring = r.fq.tx
    r.fq.tx_bufs[0][:1500] = frame
    TX_REQ.pack_into(
        r.fq.tx_page, ring.offset(0), r.fq.tx_refs[0], 0,
        NETTXF_EXTRA_INFO | NETTXF_CSUM_BLANK | NETTXF_DATA_VALIDATED, 1, 1500,
    )  # fmt: skip
    EXTRA_GSO.pack_into(r.fq.tx_page, ring.offset(1), 1, 0, 1448, 1, 0, 0)
    ring.req_prod_pvt = 2
    ring.push_requests_and_check_notify()
    r.bq.process_tx()
    assert _responses(r) == [(1, NETIF_RSP_OKAY), (0, NETIF_RSP_NULL)]
    out = [memoryview(bytearray(12)), memoryview(bytearray(2000))]
    n = r.port.recv_into(out)
    assert n == 12 + 1500
    flags, gso_type, hdr_len, gso_size, csum_start, csum_off, _ = VNET_HDR.unpack(out[0])
    assert (flags, gso_type, gso_size) == (1, 1, 1448)  # NEEDS_CSUM, TCPV4
    assert (csum_start, csum_off, hdr_len) == (34, 16, 54)
    # Checksum-blank UDP without GSO: csum_offset 6.
    udp = _frame(1, 100)
    r.fq.tx_bufs[1][:100] = udp
    _raw_tx(r, (r.fq.tx_refs[1], 0, NETTXF_CSUM_BLANK, 2, 100))
    r.bq.process_tx()
    r.port.recv_into(out)
    assert VNET_HDR.unpack(out[0])[:6] == (1, 0, 0, 0, 34, 6)


def test_multi_slot_frames_both_ways() -> None:
    r = Rig()
    jumbo = _frame(77, 9014)
    assert r.fq.queue_tx_frame(jumbo)
    r.pump()
    r.pump()
    assert len(r.got) == 1
    assert r.got[0][12:] == jumbo[12:]  # 3 tx slots out, 3 rx slots back, reassembled
    assert r.bq.counters["rx_packets"] == 1
    # Without feature-sg the backend will not split a frame into several rx slots.
    r.bq.rx_max_slots = 1
    assert r.fq.queue_tx_frame(jumbo)
    r.pump()
    assert r.bq.counters["rx_dropped"] == 1


def test_rx_hash_extra_info() -> None:
    from virtnet.xen import ctrl_ring as cr
    from virtnet.xen.ctrl_ring import HashState
    from virtnet.xen.netfront import MS_RSS_KEY

    r = Rig()
    hs = HashState(1)
    hs.alg, hs.key, hs.flags = cr.HASH_ALGORITHM_TOEPLITZ, MS_RSS_KEY, cr.HASH_TYPES_ALL
    r.bq.hash_state = hs
    # The first Microsoft vector: 66.9.149.187:2794 -> 161.142.100.80:1766, TCP.
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, 6, 0,
                     bytes((66, 9, 149, 187)), bytes((161, 142, 100, 80)))  # fmt: skip
    tcp = struct.pack(">HHIIBBHHH", 2794, 1766, 0, 0, 0x50, 0, 0, 0, 0)
    frame = b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip + tcp + bytes(10)
    for _ in range(3):
        r.send(frame)
        r.pump()
    assert len(r.got) == 3 and all(g[12:] == frame[12:] for g in r.got)
    assert r.fq.last_rx_hash == (1, cr.HASH_ALGORITHM_TOEPLITZ, 0x51CCC178)  # IPV4_TCP
    assert r.fq.counters["rx_hash_extras"] == 3
    # Every rx buffer came back (extra slots recycled too).
    r.pump()
    assert len(r.fq.rx_free) + sum(r.fq.rx_inflight) == 256


@settings(max_examples=200, deadline=None)
@given(
    st.binary(max_size=600),
    st.binary(max_size=600),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
)
def test_hostile_ring_pages_only_raise_peer_errors(
    tx_slots: bytes, rx_slots: bytes, tx_prod: int, rx_prod: int, rsp_prod: int
) -> None:
    """Whatever a guest writes into its ring pages, the backend raises PeerError or copes."""
    r = Rig()
    r.fq.tx_page[64 : 64 + len(tx_slots)] = tx_slots
    r.fq.rx_page[64 : 64 + len(rx_slots)] = rx_slots
    struct.pack_into("<I", r.fq.tx_page, 0, tx_prod % 300 if tx_prod % 2 else tx_prod)
    struct.pack_into("<I", r.fq.rx_page, 0, rx_prod % 300 if rx_prod % 2 else rx_prod)
    r.port.send([memoryview(bytes(12) + _frame(1))])
    with contextlib.suppress(PeerError):
        r.bq.process_tx()
    with contextlib.suppress(PeerError):
        r.bq.process_rx()
    # And a hostile backend, seen from the frontend.
    for page in (r.fq.tx_page, r.fq.rx_page):
        struct.pack_into("<I", page, 8, rsp_prod % 300 if rsp_prod % 2 else rsp_prod)
    with contextlib.suppress(PeerError):
        r.fq.reap_tx()
    with contextlib.suppress(PeerError):
        r.fq.reap_rx(lambda b: None)
