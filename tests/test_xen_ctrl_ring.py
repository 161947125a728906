"""netif control ring: hash configuration requests, steering with the Toeplitz test vectors."""

from __future__ import annotations

import struct
import threading

import pytest

from virtnet.xen import ctrl_ring as cr
from virtnet.xen.ctrl_ring import CtrlBackend, CtrlFrontend, HashState
from virtnet.xen.evtchn import local_pair
from virtnet.xen.grant import DomainMemory, GrantMapper, GrantTable
from virtnet.xen.rings import RingError

# Microsoft "Verifying the RSS Hash Calculation" key and IPv4 vectors.
MS_KEY = bytes.fromhex(
    "6d5a56da255b0ec24167253d43a38fb0d0ca2bcbae7b30b477cb2da38030f20c6a42b73bbeac01fa"
)
VECTORS_V4 = [
    # (src, dst, sport, dport, hash with TCP ports, hash IPv4 only)
    ("66.9.149.187", "161.142.100.80", 2794, 1766, 0x51CCC178, 0x323E8FC2),
    ("199.92.111.2", "65.69.140.83", 14230, 4739, 0xC626B0EA, 0xD718262A),
    ("24.19.198.95", "12.22.207.184", 12898, 38024, 0x5C2B394A, 0xD2D0A5DE),
    ("38.27.205.30", "209.142.163.6", 48228, 2217, 0xAFC7327F, 0x82989176),
    ("153.39.163.191", "202.188.127.2", 44251, 1303, 0x10E828A2, 0x5D1809C5),
]


def _frame_v4(src: str, dst: str, sport: int, dport: int, proto: int = 6) -> bytes:
    ip = bytes(map(int, src.split("."))), bytes(map(int, dst.split(".")))
    l4 = struct.pack(">HH", sport, dport) + bytes(16)
    hdr = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0, 0, 64, proto, 0, *ip)
    return b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + hdr + l4


class Guest:
    def __init__(self) -> None:
        self.mem = DomainMemory.create("g", 64, 1)
        self.gt = GrantTable(self.mem)
        self.mapper = GrantMapper(self.mem, domid=0, granter=1)

    def grant_bytes(self, data: bytes, readonly: bool = True) -> int:
        f = self.gt.alloc_frame()
        self.mem.page(f)[: len(data)] = data
        return self.gt.grant_access(0, f, readonly=readonly)


def test_hash_state_requests() -> None:
    g = Guest()
    st = HashState(num_queues=4)
    assert (
        st.handle(cr.CTRL_TYPE_GET_HASH_FLAGS, 0, 0, 0, g.mapper)[0] == cr.STATUS_INVALID_PARAMETER
    )
    assert (
        st.handle(cr.CTRL_TYPE_SET_HASH_ALGORITHM, 9, 0, 0, g.mapper)[0]
        == cr.STATUS_INVALID_PARAMETER
    )
    assert st.handle(cr.CTRL_TYPE_SET_HASH_ALGORITHM, 1, 0, 0, g.mapper) == (cr.STATUS_SUCCESS, 0)
    assert st.handle(cr.CTRL_TYPE_GET_HASH_FLAGS, 0, 0, 0, g.mapper) == (0, cr.HASH_TYPES_ALL)
    assert (
        st.handle(cr.CTRL_TYPE_SET_HASH_FLAGS, 1 << 7, 0, 0, g.mapper)[0]
        == cr.STATUS_INVALID_PARAMETER
    )
    key_ref = g.grant_bytes(MS_KEY)
    assert (
        st.handle(cr.CTRL_TYPE_SET_HASH_KEY, key_ref, 41, 0, g.mapper)[0]
        == cr.STATUS_BUFFER_OVERFLOW
    )
    assert (
        st.handle(cr.CTRL_TYPE_SET_HASH_KEY, 5000, 40, 0, g.mapper)[0]
        == cr.STATUS_INVALID_PARAMETER
    )
    assert st.handle(cr.CTRL_TYPE_SET_HASH_KEY, key_ref, 40, 0, g.mapper)[0] == cr.STATUS_SUCCESS
    assert st.key == MS_KEY
    assert st.handle(cr.CTRL_TYPE_GET_HASH_MAPPING_SIZE, 0, 0, 0, g.mapper) == (0, 128)
    assert (
        st.handle(cr.CTRL_TYPE_SET_HASH_MAPPING_SIZE, 129, 0, 0, g.mapper)[0]
        == cr.STATUS_INVALID_PARAMETER
    )
    assert (
        st.handle(cr.CTRL_TYPE_SET_HASH_MAPPING_SIZE, 128, 0, 0, g.mapper)[0] == cr.STATUS_SUCCESS
    )
    bad = g.grant_bytes(struct.pack("<4I", 0, 1, 2, 4))  # queue 4 does not exist
    assert (
        st.handle(cr.CTRL_TYPE_SET_HASH_MAPPING, bad, 4, 0, g.mapper)[0]
        == cr.STATUS_INVALID_PARAMETER
    )
    assert st.mapping == [0] * 128  # unchanged
    ok = g.grant_bytes(struct.pack("<4I", 3, 2, 1, 0))
    assert (
        st.handle(cr.CTRL_TYPE_SET_HASH_MAPPING, ok, 4, 126, g.mapper)[0]
        == cr.STATUS_INVALID_PARAMETER
    )
    assert (
        st.handle(cr.CTRL_TYPE_SET_HASH_MAPPING, ok, 2000, 0, g.mapper)[0]
        == cr.STATUS_BUFFER_OVERFLOW
    )
    assert st.handle(cr.CTRL_TYPE_SET_HASH_MAPPING, ok, 4, 124, g.mapper)[0] == cr.STATUS_SUCCESS
    assert st.mapping[124:] == [3, 2, 1, 0]
    assert st.handle(cr.CTRL_TYPE_INVALID, 0, 0, 0, g.mapper)[0] == cr.STATUS_NOT_SUPPORTED
    assert st.handle(9, 0, 0, 0, g.mapper)[0] == cr.STATUS_NOT_SUPPORTED  # gref mapping ops


def test_toeplitz_vectors_pick_queues() -> None:
    g = Guest()
    st = HashState(num_queues=4)
    st.handle(cr.CTRL_TYPE_SET_HASH_ALGORITHM, cr.HASH_ALGORITHM_TOEPLITZ, 0, 0, g.mapper)
    st.handle(cr.CTRL_TYPE_SET_HASH_KEY, g.grant_bytes(MS_KEY), 40, 0, g.mapper)
    table = [(i * 7) % 4 for i in range(128)]
    st.handle(cr.CTRL_TYPE_SET_HASH_MAPPING_SIZE, 128, 0, 0, g.mapper)
    st.handle(
        cr.CTRL_TYPE_SET_HASH_MAPPING, g.grant_bytes(struct.pack("<128I", *table)), 128, 0, g.mapper
    )
    st.handle(cr.CTRL_TYPE_SET_HASH_FLAGS, cr.HASH_TYPES_ALL, 0, 0, g.mapper)
    for src, dst, sp, dp, h_tcp, h_ip in VECTORS_V4:
        assert st.hash_frame(_frame_v4(src, dst, sp, dp)) == (h_tcp, cr.HASH_TYPE_IPV4_TCP)
        assert st.select_queue(_frame_v4(src, dst, sp, dp)) == table[h_tcp % 128]
        # UDP is not a hash type: falls back to the IPv4 2-tuple.
        assert st.hash_frame(_frame_v4(src, dst, sp, dp, proto=17)) == (h_ip, cr.HASH_TYPE_IPV4)
    st.handle(cr.CTRL_TYPE_SET_HASH_FLAGS, cr.HASH_TYPE_IPV4, 0, 0, g.mapper)
    src, dst, sp, dp, _, h_ip = VECTORS_V4[0]
    assert st.hash_frame(_frame_v4(src, dst, sp, dp)) == (h_ip, cr.HASH_TYPE_IPV4)
    st.handle(cr.CTRL_TYPE_SET_HASH_MAPPING_SIZE, 0, 0, 0, g.mapper)
    assert st.select_queue(_frame_v4(src, dst, sp, dp)) == h_ip % 4  # modular arithmetic
    assert st.select_queue(b"\x00" * 60) is None  # not IP: backend's choice


def test_shared_export_load() -> None:
    g = Guest()
    st = HashState(2)
    st.handle(cr.CTRL_TYPE_SET_HASH_ALGORITHM, 1, 0, 0, g.mapper)
    st.handle(cr.CTRL_TYPE_SET_HASH_KEY, g.grant_bytes(MS_KEY), 40, 0, g.mapper)
    st.handle(cr.CTRL_TYPE_SET_HASH_MAPPING_SIZE, 3, 0, 0, g.mapper)
    buf = memoryview(bytearray(4096))
    st.export(buf)
    other = HashState(2)
    assert other.load(buf) == 2
    assert (other.alg, other.key, other.mapping) == (1, MS_KEY, [0, 0, 0])


def test_ctrl_ring_round_trip() -> None:
    g = Guest()
    page_frame = g.gt.alloc_frame()
    ref = g.gt.grant_access(0, page_frame)
    front_ch, back_ch = local_pair()
    front = CtrlFrontend(g.mem.page(page_frame), front_ch)
    back = CtrlBackend(g.mapper.map(ref), HashState(4), g.mapper)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            back_ch.wait(0.05)
            _, notify = back.process()
            if notify:
                back_ch.notify()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        assert front.request(cr.CTRL_TYPE_SET_HASH_ALGORITHM, 1) == (0, 0)
        assert front.request(cr.CTRL_TYPE_GET_HASH_MAPPING_SIZE) == (0, 128)
        for _ in range(300):  # wraps the 128-entry ring
            assert front.request(cr.CTRL_TYPE_GET_HASH_FLAGS) == (0, cr.HASH_TYPES_ALL)
        assert (
            front.request(cr.CTRL_TYPE_SET_HASH_KEY, 1 << 20, 8)[0] == cr.STATUS_INVALID_PARAMETER
        )
    finally:
        stop.set()
        t.join(2)


def test_ctrl_ring_hostile_index() -> None:
    g = Guest()
    f = g.gt.alloc_frame()
    ref = g.gt.grant_access(0, f)
    back = CtrlBackend(g.mapper.map(ref), HashState(1), g.mapper)
    struct.pack_into("<I", g.mem.page(f), 0, 500)  # req_prod far beyond a 128-entry ring
    with pytest.raises(RingError):
        back.process()
