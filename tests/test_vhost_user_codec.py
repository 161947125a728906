"""vhost-user codec: round trips, rejections, incremental feeding, fd ownership."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virtnet.errors import ProtocolError
from virtnet.testing.fds import fd_is_open
from virtnet.vhost_user import codec
from virtnet.vhost_user.codec import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER,
    MAX_MEM_REGIONS,
    MAX_PAYLOAD_SIZE,
    U64,
    VERSION,
    Body,
    Empty,
    LogBase,
    MemRegion,
    MemTable,
    Message,
    MessageReader,
    Raw,
    Request,
    SingleRegion,
    VringAddr,
    VringFd,
    VringState,
    encode_message,
    encode_reply,
    encode_request,
    parse_message,
)

pytestmark = pytest.mark.usefixtures("no_fd_leak")
R = Request
REGION = MemRegion(0x0, 0x10000, 0x7F0000000000, 0)


def fresh_fds(n: int) -> list[int]:
    return [os.eventfd(0) for _ in range(n)]


# One valid example per request type: (request, body, number of fds).
VALID: list[tuple[Request, Body, int]] = [
    (R.GET_FEATURES, Empty(), 0),
    (R.SET_FEATURES, U64(1 << 32 | 1 << 30), 0),
    (R.SET_OWNER, Empty(), 0),
    (R.RESET_OWNER, Empty(), 0),
    (R.SET_MEM_TABLE, MemTable((REGION,)), 1),
    (
        R.SET_MEM_TABLE,
        MemTable(tuple(MemRegion(i << 20, 1 << 20, (i << 20) + (1 << 40), 0) for i in range(8))),
        8,
    ),
    (R.SET_LOG_BASE, LogBase(4096, 0), 1),
    (R.SET_LOG_FD, Empty(), 1),
    (R.SET_VRING_NUM, VringState(3, 256), 0),
    (R.SET_VRING_ADDR, VringAddr(1, 0, 0x1000, 0x3000, 0x2000, 0), 0),
    (R.SET_VRING_ADDR, VringAddr(1, 1, 0x1000, 0x3000, 0x2000, 0x9000), 0),
    (R.SET_VRING_BASE, VringState(0, 0xFFFF), 0),
    (R.GET_VRING_BASE, VringState(7, 0), 0),
    (R.SET_VRING_KICK, VringFd(5, False), 1),
    (R.SET_VRING_KICK, VringFd(5, True), 0),
    (R.SET_VRING_CALL, VringFd(255, False), 1),
    (R.SET_VRING_CALL, VringFd(0, True), 0),
    (R.SET_VRING_ERR, VringFd(2, False), 1),
    (R.GET_PROTOCOL_FEATURES, Empty(), 0),
    (R.SET_PROTOCOL_FEATURES, U64(0x1A019), 0),
    (R.GET_QUEUE_NUM, Empty(), 0),
    (R.SET_VRING_ENABLE, VringState(1, 1), 0),
    (R.SEND_RARP, U64(0x0000563412005452), 0),
    (R.NET_SET_MTU, U64(1500), 0),
    (R.SET_BACKEND_REQ_FD, Empty(), 1),
    (R.IOTLB_MSG, Raw(bytes(24)), 0),
    (R.SET_VRING_ENDIAN, VringState(0, 0), 0),
    (R.GET_CONFIG, Raw(bytes(12 + 8)), 0),
    (R.SET_CONFIG, Raw(bytes(12 + 6)), 0),
    (R.CREATE_CRYPTO_SESSION, Raw(bytes(40)), 0),
    (R.CLOSE_CRYPTO_SESSION, U64(3), 0),
    (R.POSTCOPY_ADVISE, Empty(), 0),
    (R.POSTCOPY_LISTEN, Empty(), 0),
    (R.POSTCOPY_END, Empty(), 0),
    (R.GET_INFLIGHT_FD, Raw(bytes(20)), 0),
    (R.SET_INFLIGHT_FD, Raw(bytes(20)), 1),
    (R.GPU_SET_SOCKET, Empty(), 1),
    (R.RESET_DEVICE, Empty(), 0),
    (R.VRING_KICK, VringState(4, 0), 0),
    (R.GET_MAX_MEM_SLOTS, Empty(), 0),
    (R.ADD_MEM_REG, SingleRegion(REGION), 1),
    (R.REM_MEM_REG, SingleRegion(REGION), 0),
    (R.REM_MEM_REG, SingleRegion(REGION), 1),
    (R.SET_STATUS, U64(0xF), 0),
    (R.GET_STATUS, Empty(), 0),
    (R.GET_SHARED_OBJECT, Raw(bytes(16)), 0),
    (R.SET_DEVICE_STATE_FD, Raw(bytes(8)), 1),
    (R.CHECK_DEVICE_STATE, Empty(), 0),
]


def test_every_request_has_an_example() -> None:
    assert {r for r, _, _ in VALID} == set(Request)


def test_request_and_protocol_feature_numbers_match_the_spec() -> None:
    # vhost-user.rst "Front-end message types" / "Protocol features".
    assert (R.GET_FEATURES, R.SET_MEM_TABLE, R.SET_VRING_NUM, R.SET_VRING_ADDR) == (1, 5, 8, 9)
    assert (R.GET_VRING_BASE, R.SET_VRING_KICK, R.SET_VRING_ERR, R.GET_QUEUE_NUM) == (
        11,
        12,
        14,
        17,
    )
    assert (R.SET_VRING_ENABLE, R.SEND_RARP, R.NET_SET_MTU, R.SET_BACKEND_REQ_FD) == (
        18,
        19,
        20,
        21,
    )
    assert (R.RESET_DEVICE, R.GET_MAX_MEM_SLOTS, R.ADD_MEM_REG, R.REM_MEM_REG) == (34, 36, 37, 38)
    assert (R.SET_STATUS, R.GET_STATUS) == (39, 40)
    pf = codec.ProtocolFeature
    assert tuple(range(6)) == (
        pf.MQ,
        pf.LOG_SHMFD,
        pf.RARP,
        pf.REPLY_ACK,
        pf.NET_MTU,
        pf.BACKEND_REQ,
    )
    assert (pf.RESET_DEVICE, pf.CONFIGURE_MEM_SLOTS, pf.STATUS) == (13, 15, 16)


@pytest.mark.parametrize(("request_", "body", "nfds"), VALID, ids=str)
def test_round_trip(request_: Request, body: Body, nfds: int) -> None:
    wire = encode_request(request_, body)
    msg = parse_message(wire, list(range(100, 100 + nfds)))
    assert msg == Message(request_, VERSION, body, tuple(range(100, 100 + nfds)))
    assert codec.encode_body(msg.body) == wire[codec.HEADER_SIZE :]


@pytest.mark.parametrize(("request_", "body", "nfds"), VALID, ids=str)
def test_wrong_fd_count_is_rejected(request_: Request, body: Body, nfds: int) -> None:
    wire = encode_request(request_, body)
    allowed = {nfds}
    if request_ in (R.REM_MEM_REG, R.SET_LOG_BASE):
        allowed = {0, 1}
    if isinstance(body, Raw) and request_ not in (R.SET_INFLIGHT_FD, R.SET_DEVICE_STATE_FD):
        allowed = {0}
    for bad in {0, 1, 2, nfds + 1} - allowed:
        with pytest.raises(ProtocolError, match="fds"):
            parse_message(wire, list(range(bad)))


@pytest.mark.parametrize(("request_", "body", "nfds"), VALID, ids=str)
def test_wrong_size_is_rejected(request_: Request, body: Body, nfds: int) -> None:
    payload = codec.encode_body(body)
    if isinstance(body, Raw):
        return  # variable-size bodies: only MAX_PAYLOAD_SIZE applies
    fds = list(range(nfds))
    for bad in (payload + b"\0" * 8, payload[:-1] if payload else b"\0" * 4):
        with pytest.raises(ProtocolError):
            parse_message(encode_message(request_, VERSION, bad), fds)


def test_named_limits() -> None:
    assert MAX_PAYLOAD_SIZE == 4096
    assert MAX_MEM_REGIONS == 8
    assert codec.MAX_RINGS == 256


@pytest.mark.parametrize(
    ("wire", "match"),
    [
        (HEADER.pack(0, VERSION, 0), "unknown"),
        (HEADER.pack(44, VERSION, 0), "unknown"),
        (HEADER.pack(0xFFFFFFFF, VERSION, 0), "unknown"),
        (HEADER.pack(1, 0, 0), "version"),
        (HEADER.pack(1, 2, 0), "version"),
        (HEADER.pack(1, VERSION | 0x10, 0), "flag bits"),
        (HEADER.pack(1, VERSION | FLAG_REPLY, 0), "REPLY"),
        (HEADER.pack(2, VERSION, MAX_PAYLOAD_SIZE + 1), "exceeds"),
        (HEADER.pack(2, VERSION, 0xFFFFFFFF), "exceeds"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_headers(wire: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        parse_message(wire)
    reader = MessageReader()
    with pytest.raises(ProtocolError, match=match):
        reader.feed(wire)
        reader.next_message()


def _mem(regions: list[tuple[int, int, int, int]], count: int | None = None) -> bytes:
    n = len(regions) if count is None else count
    body = struct.pack("=II", n, 0) + b"".join(struct.pack("=QQQQ", *r) for r in regions)
    return encode_message(R.SET_MEM_TABLE, VERSION, body)


U64_MAX = (1 << 64) - 1


@pytest.mark.parametrize(
    ("wire", "nfds", "match"),
    [
        (_mem([]), 0, "0 regions"),
        (_mem([(0, 4096, 0, 0)] * 9), 9, "9 (regions|fds)"),
        (_mem([(0, 4096, 0, 0)], count=2), 2, "expected"),
        (_mem([(0, 0, 0, 0)]), 1, "size 0"),
        (_mem([(U64_MAX - 10, 4096, 0, 0)]), 1, "guest range"),
        (_mem([(0, 4096, U64_MAX, 0)]), 1, "user range"),
        (_mem([(0, 4096, 0, U64_MAX - 1)]), 1, "mmap offset range"),
        (_mem([(0, 8192, 0, 0), (4096, 4096, 1 << 30, 0)]), 2, "overlap"),
        (_mem([(0, 4096, 1 << 30, 0), (1 << 20, 4096, (1 << 30) + 100, 0)]), 2, "overlap"),
        (
            encode_message(
                R.ADD_MEM_REG, VERSION, struct.pack("=QQQQQ", 0, U64_MAX, U64_MAX, 1, 0)
            ),
            1,
            "overflows",
        ),
        (encode_message(R.SET_VRING_KICK, VERSION, struct.pack("=Q", 0x200)), 1, "undefined"),
        (encode_message(R.SET_VRING_CALL, VERSION, struct.pack("=Q", 1 << 40)), 1, "undefined"),
        (encode_request(R.SET_VRING_ADDR, VringAddr(0, 2, 0, 0, 0, 0)), 0, "vring flags"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_bodies(wire: bytes, nfds: int, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        parse_message(wire, list(range(nfds)))


@pytest.mark.parametrize(
    "wire",
    [
        encode_request(R.SET_VRING_NUM, VringState(8, 256)),
        encode_request(R.GET_VRING_BASE, VringState(200, 0)),
        encode_request(R.SET_VRING_ENABLE, VringState(8, 1)),
        encode_request(R.SET_VRING_ADDR, VringAddr(9, 0, 0, 0, 0, 0)),
        encode_request(R.SET_VRING_CALL, VringFd(8, True)),
    ],
    ids=["num", "get_base", "enable", "addr", "call"],
)
def test_ring_index_beyond_max_rings(wire: bytes) -> None:
    parse_message(wire, max_rings=256)
    with pytest.raises(ProtocolError, match="ring index"):
        parse_message(wire, max_rings=8)


def test_need_reply_flag_and_reply_encoding() -> None:
    msg = parse_message(encode_request(R.SET_FEATURES, U64(0), need_reply=True))
    assert msg.need_reply and msg.flags == VERSION | FLAG_NEED_REPLY
    reply = encode_reply(R.GET_FEATURES, U64(0x1234))
    assert HEADER.unpack_from(reply) == (1, VERSION | FLAG_REPLY, 8)
    parsed = parse_message(reply, replies=True)
    assert parsed.is_reply and parsed.body == U64(0x1234)
    vb = parse_message(encode_reply(R.GET_VRING_BASE, VringState(3, 77)), replies=True)
    assert vb.body == VringState(3, 77)


# ---------------------------------------------------------------------------
# MessageReader
# ---------------------------------------------------------------------------


def _stream() -> tuple[bytes, list[tuple[int, int]]]:
    """All VALID messages back to back, and their (start, nfds)."""
    wire = b""
    marks = []
    for request_, body, nfds in VALID:
        marks.append((len(wire), nfds))
        wire += encode_request(request_, body)
    return wire, marks


def test_byte_by_byte_feeding_with_fds() -> None:
    wire, marks = _stream()
    starts = dict(marks)
    reader = MessageReader()
    got: list[Message] = []
    for i in range(len(wire)):
        n = starts.get(i, 0)
        reader.feed(wire[i : i + 1], fresh_fds(n))
        got.extend(reader)
    assert [(m.request, m.body, len(m.fds)) for m in got] == VALID
    assert reader.buffered == 0 and reader.pending_fds == 0
    for m in got:
        m.close_fds()


def test_whole_stream_in_one_feed_attributes_fds_to_last_message() -> None:
    # One chunk holding [tail of M][M+1 with fds]: fds go to the message
    # holding the chunk's last byte (Linux recvmsg stops after an fd segment).
    a = encode_request(R.SET_VRING_NUM, VringState(0, 256))
    b = encode_request(R.SET_VRING_KICK, VringFd(0, False))
    reader = MessageReader()
    reader.feed(a[:5])
    fds = fresh_fds(1)
    reader.feed(a[5:] + b, fds)
    m1, m2 = list(reader)
    assert m1.fds == () and m2.fds == tuple(fds)
    m2.close_fds()


def test_empty_feed_with_fds_goes_to_next_byte() -> None:
    reader = MessageReader()
    fds = fresh_fds(1)
    reader.feed(b"", fds)
    reader.feed(encode_request(R.SET_VRING_CALL, VringFd(0, False)))
    (m,) = list(reader)
    assert m.fds == tuple(fds)
    m.close_fds()


@given(st.data())
def test_random_chunking_matches_whole_parse(data: st.DataObject) -> None:
    wire, marks = _stream()
    cuts = sorted(
        data.draw(st.sets(st.integers(1, len(wire) - 1), max_size=40), label="cuts")
        | {m[0] for m in marks if m[0]}
    )
    # fds must arrive with the chunk that starts their message: cut at every message start.
    starts = dict(marks)
    reader = MessageReader()
    got: list[Message] = []
    prev = 0
    for cut in [*cuts, len(wire)]:
        reader.feed(wire[prev:cut], list(range(1000, 1000 + starts.get(prev, 0))))
        got.extend(reader)
        prev = cut
    assert [(m.request, m.body, len(m.fds)) for m in got] == VALID


def test_reader_closes_fds_of_a_rejected_message_and_dies() -> None:
    reader = MessageReader()
    fds = fresh_fds(2)
    reader.feed(encode_request(R.SET_VRING_KICK, VringFd(0, False)), fds)  # 2 fds, wants 1
    with pytest.raises(ProtocolError, match="fds"):
        reader.next_message()
    assert not any(fd_is_open(fd) for fd in fds)
    more = fresh_fds(1)
    with pytest.raises(ProtocolError, match="already failed"):
        reader.feed(b"x", more)
    assert not fd_is_open(more[0])


def test_reader_close_releases_pending_fds() -> None:
    reader = MessageReader()
    fds = fresh_fds(3)
    wire = _mem([(i << 20, 4096, i << 30, 0) for i in range(3)])
    reader.feed(wire[:10], fds)
    assert reader.next_message() is None and reader.pending_fds == 3
    reader.close()
    assert not any(fd_is_open(fd) for fd in fds)


def test_reader_caps_buffer_and_fds() -> None:
    reader = MessageReader()
    with pytest.raises(ProtocolError, match="buffered"):
        reader.feed(b"\0" * (codec.MAX_BUFFERED_BYTES + 1))
    reader2 = MessageReader()
    # A header promising a big payload, then many fd-carrying feeds.
    reader2.feed(HEADER.pack(R.SET_CONFIG, VERSION, 4000))
    fds = fresh_fds(codec.MAX_PENDING_FDS + 1)
    with pytest.raises(ProtocolError, match="unclaimed fds"):
        for fd in fds:
            reader2.feed(b"\0", [fd])
    assert not any(fd_is_open(fd) for fd in fds)


def test_reader_rejects_oversized_header_before_payload() -> None:
    reader = MessageReader()
    reader.feed(HEADER.pack(R.SET_FEATURES, VERSION, 1 << 31))
    with pytest.raises(ProtocolError, match="exceeds"):
        reader.next_message()


def test_too_many_fds_for_any_message() -> None:
    with pytest.raises(ProtocolError, match="exceed"):
        parse_message(encode_request(R.GET_FEATURES), list(range(9)))
    reader = MessageReader()
    fds = fresh_fds(9)
    reader.feed(encode_request(R.GET_FEATURES), fds)
    with pytest.raises(ProtocolError, match="exceed"):
        reader.next_message()
    assert not any(fd_is_open(fd) for fd in fds)


@given(st.binary(max_size=600), st.integers(0, 9))
def test_arbitrary_bytes_never_crash(blob: bytes, nfds: int) -> None:
    reader = MessageReader(max_rings=8)
    try:
        reader.feed(blob, list(range(50_000, 50_000 + nfds)) if blob else [])
        for _ in reader:
            pass
    except ProtocolError:
        pass
