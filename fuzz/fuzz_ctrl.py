"""Fuzz the virtio-net control queue core (virtnet.ctrl) and its steering consumer.

Run with atheris: ``python fuzz/fuzz_ctrl.py fuzz/corpus/ctrl -max_total_time=60``.
Replay the corpus without atheris (CI): ``python fuzz/fuzz_ctrl.py --corpus-only
fuzz/corpus/ctrl`` (``--replay`` is an alias).  Regenerate the seeds with
``python fuzz/fuzz_ctrl.py --make-corpus fuzz/corpus/ctrl``.

Input layout: byte 0-1 (le16) pick which control features are negotiated,
byte 2 picks max_queue_pairs (1..8), then commands, each ``len u8`` + bytes;
a length of 255 means "the rest of the input" (for long MAC tables).

Checks (anything else is a failure): ``handle_command`` never raises and acks
OK or ERR; an ERR leaves the state unchanged except counters and has no reply;
only an OK VQ_GET has a reply (8 bytes); ``1 <= curr_queue_pairs <= max``; in
RSS mode the RSS config selects only active queues; ``Steering.apply`` +
``choose_rx`` never pick a pair >= the active count.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Iterator

from virtnet import net
from virtnet.ctrl import ControlState, SteeringMode, handle_command
from virtnet.net import NetFeature
from virtnet.steering import Steering

F = NetFeature
_SELECTABLE = (
    F.CTRL_VQ, F.CTRL_RX, F.CTRL_RX_EXTRA, F.CTRL_VLAN, F.GUEST_ANNOUNCE, F.MQ,
    F.CTRL_MAC_ADDR, F.RSS, F.HASH_REPORT, F.CTRL_GUEST_OFFLOADS, F.NOTF_COAL,
    F.VQ_NOTF_COAL, F.GUEST_CSUM, F.GUEST_TSO4, F.GUEST_TSO6, F.GUEST_UFO,
)  # fmt: skip
_TCP4 = (
    bytes.fromhex("525400000001" "525400000002" "0800")
    + struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, 6, 0,
                  bytes((66, 9, 149, 187)), bytes((161, 142, 100, 80)))
    + struct.pack("!HHIIBBHHH", 2794, 1766, 0, 0, 0x50, 2, 512, 0, 0)
)  # fmt: skip
_FRAMES = (_TCP4, bytes.fromhex("ffffffffffff5254000000020806") + bytes(28))
_REST = 255


def _features(sel: int) -> int:
    out = int(F.VERSION_1)
    for i, f in enumerate(_SELECTABLE):
        if not sel >> i & 1:  # bit set = feature withheld; 0x0000 = all negotiated
            out |= f
    return net.negotiate(out, out)


def _commands(body: bytes) -> Iterator[bytes]:
    i = 0
    while i < len(body):
        n = body[i]
        i += 1
        if n == _REST:
            yield body[i:]
            return
        yield body[i : i + n]
        i += n


def test_one_input(data: bytes) -> None:
    if len(data) < 3:
        return
    (sel,) = struct.unpack_from("<H", data)
    features = _features(sel)
    state = ControlState.new(features, max_queue_pairs=1 + data[2] % 8)
    steering = Steering(state.max_queue_pairs, flow_table_size=4)
    for i, cmd in enumerate(_commands(data[3:])):
        before = state.snapshot()
        errs = state.stats.err
        ack, reply = handle_command(state, features, cmd, float(i))
        if ack == net.CTRL_ERR:
            assert state == before, "ERR changed the state"
            assert state.stats.err == errs + 1
            assert reply == b""
        else:
            assert ack == net.CTRL_OK, f"bad ack {ack}"
            is_get = cmd[:2] == bytes((net.CTRL_NOTF_COAL, net.CTRL_NOTF_COAL_VQ_GET))
            assert len(reply) == (8 if is_get else 0)
        assert 1 <= state.curr_queue_pairs <= state.max_queue_pairs
        if state.steering_mode is SteeringMode.RSS:
            assert state.rss is not None
            assert state.rss.max_queue() < state.curr_queue_pairs
        steering.apply(state)
        steering.note_tx(_FRAMES[0], state.curr_queue_pairs - 1, float(i))
        for frame in (*_FRAMES, cmd):
            pair, _h, _rep = steering.choose_rx(frame, float(i))
            assert 0 <= pair < steering.active_pairs == state.curr_queue_pairs


def _seed(features_off: int, pairs: int, *cmds: bytes) -> bytes:
    out = struct.pack("<HB", features_off, pairs - 1)
    for c in cmds:
        out += bytes([len(c)]) + c if len(c) < _REST else bytes([_REST]) + c
    return out


def _seeds() -> dict[str, bytes]:
    key = bytes(range(40))
    mac = bytes.fromhex("020000000001")
    mcast = bytes.fromhex("01005e000001")

    def c(cls: int, cmd: int, body: bytes = b"") -> bytes:
        return bytes((cls, cmd)) + body

    rss = c(net.CTRL_MQ, net.CTRL_MQ_RSS_CONFIG,
            struct.pack("<IHH", 0x1FF, 7, 1) + struct.pack("<8H", 0, 1, 2, 3, 3, 2, 1, 0)
            + struct.pack("<HB", 4, 40) + key)  # fmt: skip
    hashc = c(net.CTRL_MQ, net.CTRL_MQ_HASH_CONFIG, struct.pack("<IHHHHB", 3, 0, 0, 0, 0, 40) + key)
    table = c(net.CTRL_MAC, net.CTRL_MAC_TABLE_SET,
              struct.pack("<I", 1) + mac + struct.pack("<I", 1) + mcast)  # fmt: skip
    big_table = c(net.CTRL_MAC, net.CTRL_MAC_TABLE_SET,
                  struct.pack("<I", 70) + mac * 70 + struct.pack("<I", 0))  # fmt: skip
    return {
        "rx_modes": _seed(0, 1, *(c(net.CTRL_RX, i, b"\x01") for i in range(6))),
        "mac": _seed(0, 1, table, c(net.CTRL_MAC, net.CTRL_MAC_ADDR_SET, mac)),
        "mac_overflow": _seed(0, 1, big_table),
        "vlan": _seed(0, 1, c(net.CTRL_VLAN, 0, b"\x0a\x00"), c(net.CTRL_VLAN, 1, b"\x0a\x00")),
        "announce": _seed(0, 1, c(net.CTRL_ANNOUNCE, net.CTRL_ANNOUNCE_ACK)),
        "pairs": _seed(0, 8, c(net.CTRL_MQ, 0, b"\x04\x00"), c(net.CTRL_MQ, 0, b"\x02\x00")),
        "rss_then_pairs": _seed(0, 4, rss, c(net.CTRL_MQ, 0, b"\x01\x00"), rss),
        "hash_config": _seed(0, 2, hashc),
        "offloads": _seed(0, 1, c(net.CTRL_GUEST_OFFLOADS, 0, struct.pack("<Q", 2))),
        "coal": _seed(
            0,
            2,
            c(net.CTRL_NOTF_COAL, 0, struct.pack("<II", 15, 10)),
            c(net.CTRL_NOTF_COAL, 1, struct.pack("<II", 8, 5)),
            c(net.CTRL_NOTF_COAL, 2, struct.pack("<HHII", 3, 0, 1, 2)),
            c(net.CTRL_NOTF_COAL, 3, struct.pack("<HH", 3, 0)),
        ),
        "not_negotiated": _seed(0xFFFF, 2, rss, c(net.CTRL_RX, 0, b"\x00")),
        "garbage": _seed(0x0102, 3, b"\xff", b"", b"\x04\x01\x00", b"\x06\x03"),
    }


if __name__ == "__main__":
    import harness  # fuzz/harness.py: this script's directory is on sys.path

    sys.exit(harness.main("fuzz_ctrl", test_one_input, _seeds))
