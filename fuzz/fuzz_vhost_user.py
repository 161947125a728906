"""Fuzz the vhost-user codec and backend state machine (virtnet.vhost_user).

Run with atheris: ``python fuzz/fuzz_vhost_user.py fuzz/corpus/vhost_user -max_total_time=60``.
Replay the corpus without atheris (CI): ``python fuzz/fuzz_vhost_user.py --corpus-only
fuzz/corpus/vhost_user`` (``--replay`` is an alias).  Regenerate the seeds with
``python fuzz/fuzz_vhost_user.py --make-corpus fuzz/corpus/vhost_user``.

Input layout: byte 0 picks max_queue_pairs (1..4, low 2 bits) and whether the
backend maps memory (bit 2); then "sendmsg" records, each ``nfds u8`` (low 4
bits, capped at 10) + ``len u16 le`` + ``len`` bytes.  Every record's fds are
fresh 64 KiB memfds (usable as guest memory and as eventfds alike).

Checks (anything else is a failure):

* feeding the stream the way the server does (message-bounded reads, a
  record's fds with its first read) and feeding it byte by byte give the same
  messages, or both fail with ``ProtocolError``;
* ``Backend.handle`` returns ``None`` or a well-formed reply, or raises
  ``ProtocolError`` (``PeerError``) -- never anything else;
* after ``Backend.close()`` and ``MessageReader.close()`` no fd is left open
  and the owner saw every started ring stopped.
"""

from __future__ import annotations

import os
import struct
import sys
from collections.abc import Iterator

from virtnet.errors import PeerError
from virtnet.vhost_user.backend import LOG_ALL, Backend, BackendConfig, NullEvents, RingConfig
from virtnet.vhost_user.codec import (
    FLAG_REPLY,
    HEADER,
    U64,
    VERSION,
    VRING_ADDR_F_LOG,
    Body,
    Empty,
    LogBase,
    MemRegion,
    MemTable,
    Message,
    MessageReader,
    Request,
    SingleRegion,
    VringAddr,
    VringFd,
    VringState,
    encode_message,
    encode_request,
)

MEMFD_SIZE = 1 << 16
_EMPTY = Empty()
MAX_FDS = 10
_REC = struct.Struct("<BH")
R = Request


class _Events(NullEvents):
    def __init__(self) -> None:
        self.started: set[int] = set()

    def on_ring_start(self, index: int, config: RingConfig) -> None:
        assert index not in self.started
        self.started.add(index)

    def on_ring_stop(self, index: int) -> int | None:
        self.started.remove(index)
        return None


def _records(body: bytes) -> Iterator[tuple[int, bytes]]:
    i = 0
    while i + _REC.size <= len(body):
        nfds, n = _REC.unpack_from(body, i)
        i += _REC.size
        yield min(nfds & 0xF, MAX_FDS), body[i : i + n]
        i += n


def _memfds(n: int) -> list[int]:
    out = []
    for _ in range(n):
        fd = os.memfd_create("fuzz")
        os.ftruncate(fd, MEMFD_SIZE)
        out.append(fd)
    return out


def _key(m: Message) -> tuple[object, ...]:
    return (m.request, m.flags, m.body, len(m.fds))


def _parse_bounded(records: list[tuple[int, bytes]], max_rings: int) -> tuple[list[Message], bool]:
    """Like the server: reads never cross a message; fds come with a record's first read."""
    reader = MessageReader(max_rings=max_rings)
    out: list[Message] = []
    try:
        for nfds, data in records:
            fds = _memfds(nfds)
            pos = 0
            if not data:
                reader.feed(b"", fds)
                continue
            while pos < len(data):
                n = min(reader.wanted, len(data) - pos)
                reader.feed(data[pos : pos + n], fds)
                fds = []
                pos += n
                out.extend(reader)
    except PeerError:
        reader.close()
        return out, False
    reader.close()
    return out, True


def _parse_bytewise(records: list[tuple[int, bytes]], max_rings: int) -> tuple[list[Message], bool]:
    reader = MessageReader(max_rings=max_rings)
    out: list[Message] = []
    try:
        for nfds, data in records:
            fds = _memfds(nfds)
            if not data:
                reader.feed(b"", fds)
                continue
            # fds with the record's first byte, which a bounded read also gets
            for i in range(len(data)):
                reader.feed(data[i : i + 1], fds if i == 0 else [])
                out.extend(reader)
    except PeerError:
        reader.close()
        return out, False
    reader.close()
    return out, True


def test_one_input(data: bytes) -> None:
    if not data:
        return
    pairs = (data[0] & 3) + 1
    mapping = bool(data[0] & 4)
    records = list(_records(data[1:]))
    before = len(os.listdir("/proc/self/fd"))
    config = BackendConfig(max_queue_pairs=pairs, map_memory=mapping)

    msgs, ok = _parse_bounded(records, config.max_rings)
    msgs2, ok2 = _parse_bytewise(records, config.max_rings)
    assert [_key(m) for m in msgs] == [_key(m) for m in msgs2] and ok == ok2, (ok, ok2)
    for m in msgs2:
        m.close_fds()

    events = _Events()
    backend = Backend(events, config)
    pending = list(msgs)
    try:
        while pending:
            m = pending.pop(0)
            try:
                reply = backend.handle(m)
            except PeerError:
                break
            if reply is not None:
                req, flags, size = HEADER.unpack_from(reply)
                assert req == m.request and flags == VERSION | FLAG_REPLY
                assert size == len(reply) - HEADER.size
    finally:
        for m in pending:
            m.close_fds()
        backend.close()
    assert not events.started
    after = len(os.listdir("/proc/self/fd"))
    assert after == before, f"fd leak: {before} -> {after}"


# ---------------------------------------------------------------------------
# Seeds
# ---------------------------------------------------------------------------

UVA = 0x7F00_0000_0000


def _rec(wire: bytes, nfds: int = 0) -> bytes:
    return _REC.pack(nfds, len(wire)) + wire


def _req(
    request: Request, body: Body = _EMPTY, nfds: int = 0, *, need_reply: bool = False
) -> bytes:
    return _rec(encode_request(request, body, need_reply=need_reply), nfds)


def _qemu_like(pairs: int, *, migrate: bool = False) -> bytes:
    out = [bytes([(pairs - 1) | 4])]
    features = 0x170408000
    for dev in range(pairs):
        out += [
            _req(R.GET_FEATURES),
            _req(R.GET_PROTOCOL_FEATURES),
            _req(R.SET_PROTOCOL_FEATURES, U64(0x1A01B if migrate else 0x1A019)),
        ]
        if dev == 0:
            out += [_req(R.GET_QUEUE_NUM), _req(R.SET_OWNER)]
        out.append(_req(R.GET_MAX_MEM_SLOTS))
        for ring in (2 * dev, 2 * dev + 1):
            out += [_req(R.SET_VRING_CALL, VringFd(ring, False), 1)]
            out += [_req(R.SET_VRING_ERR, VringFd(ring, False), 1)]
    out.append(_req(R.RESET_DEVICE))
    out += [_req(R.SET_VRING_ENABLE, VringState(r, int(r < 2))) for r in range(2 * pairs)]
    out.append(_req(R.SET_FEATURES, U64(features)))
    out.append(_req(R.SET_STATUS, U64(8), need_reply=True))
    out.append(
        _req(R.ADD_MEM_REG, SingleRegion(MemRegion(0, MEMFD_SIZE, UVA, 0)), 1, need_reply=True)
    )
    for ring in range(2 * pairs):
        base = UVA + ring * 0x1000
        out += [
            _req(R.SET_VRING_NUM, VringState(ring, 64)),
            _req(R.SET_VRING_BASE, VringState(ring, 0)),
            _req(R.SET_VRING_ADDR, VringAddr(ring, 0, base, base + 0x600, base + 0x400, 0)),
            _req(R.SET_VRING_KICK, VringFd(ring, False), 1),
            _req(R.SET_VRING_CALL, VringFd(ring, False), 1),
        ]
    out.append(_req(R.SET_STATUS, U64(15)))
    if migrate:
        # QEMU's vhost_migration_log: the log, LOG_ALL, every ring with VRING_F_LOG.
        out.append(_req(R.SET_LOG_BASE, LogBase(MEMFD_SIZE >> 15, 0), 1))
        out.append(_req(R.SET_FEATURES, U64(features | LOG_ALL)))
        for ring in range(2 * pairs):
            base = UVA + ring * 0x1000
            addr = VringAddr(
                ring, VRING_ADDR_F_LOG, base, base + 0x600, base + 0x400, base - UVA + 0x600
            )
            out.append(_req(R.SET_VRING_ADDR, addr))
        out.append(_req(R.SET_LOG_FD, _EMPTY, 1))
    out += [_req(R.GET_VRING_BASE, VringState(r, 0)) for r in range(2 * pairs)]
    out.append(_req(R.REM_MEM_REG, SingleRegion(MemRegion(0, MEMFD_SIZE, UVA, 0))))
    return b"".join(out)


def _seeds() -> dict[str, bytes]:
    table = MemTable((MemRegion(0, MEMFD_SIZE, UVA, 0),))
    no_proto = [
        bytes([0]),
        _req(R.GET_FEATURES),
        _req(R.SET_OWNER),
        _req(R.SET_FEATURES, U64(1 << 32 | 1 << 29 | 1 << 15)),
        _req(R.SET_MEM_TABLE, table, 1),
        _req(R.SET_VRING_NUM, VringState(0, 128)),
        _req(R.SET_VRING_ADDR, VringAddr(0, 0, UVA, UVA + 0x1000, UVA + 0x800, 0)),
        _req(R.SET_VRING_KICK, VringFd(0, True)),
        _req(R.SET_MEM_TABLE, table, 1),
        _req(R.GET_VRING_BASE, VringState(0, 0)),
    ]
    packed = bytes([4]) + _rec(
        encode_request(R.SET_MEM_TABLE, table)
        + encode_request(R.SET_VRING_NUM, VringState(0, 64))
        + encode_request(R.SET_VRING_ADDR, VringAddr(0, 0, UVA, UVA + 0x600, UVA + 0x400, 0)),
        1,
    )
    return {
        "qemu10-1pair": _qemu_like(1),
        "qemu10-4pairs": _qemu_like(4),
        "qemu10-migration": _qemu_like(2, migrate=True),
        "no-protocol-features": b"".join(no_proto),
        "packed-sendmsg": packed,
        "bad-version": bytes([0]) + _rec(HEADER.pack(1, 2, 0)),
        "unknown-request": bytes([0]) + _rec(HEADER.pack(77, VERSION, 0)),
        "oversized": bytes([0]) + _rec(HEADER.pack(2, VERSION, 1 << 20)),
        "wrong-fd-count": bytes([0]) + _req(R.SET_VRING_CALL, VringFd(0, False), 3),
        "region-overflow": bytes([4])
        + _rec(
            encode_message(
                R.SET_MEM_TABLE, VERSION, struct.pack("=IIQQQQ", 1, 0, (1 << 64) - 4096, 8192, 0, 0)
            ),
            1,
        ),
        "ring-outside-memory": bytes([4])
        + _req(R.SET_MEM_TABLE, table, 1)
        + _req(R.SET_VRING_NUM, VringState(0, 256))
        + _req(R.SET_VRING_ADDR, VringAddr(0, 0, UVA + 0xF800, UVA, UVA, 0)),
        "split-header": bytes([0])
        + _rec(encode_request(R.GET_FEATURES)[:5])
        + _rec(encode_request(R.GET_FEATURES)[5:]),
    }


if __name__ == "__main__":
    import harness  # fuzz/harness.py: this script's directory is on sys.path

    sys.exit(harness.main("fuzz_vhost_user", test_one_input, _seeds))
