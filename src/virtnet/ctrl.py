"""Device-side control virtqueue semantics (virtio 1.3 §5.1.6.5), pure.

:func:`handle_command` takes the device-readable bytes of one control chain
(``class u8, command u8, command-specific-data``) and returns the ack byte and
the command-specific result to write after it.

Invariants:

* :func:`handle_command` never raises for any input: every malformed, short,
  over-long, out-of-range, unknown or not-negotiated command is answered
  :data:`~virtnet.net.CTRL_ERR` and counted in ``state.stats``.
* A command answered ERR leaves every field of the state unchanged except the
  counters in ``state.stats`` (``ControlState.__eq__`` ignores ``stats``): each
  handler parses and validates everything before it mutates anything.
* Every command whose data has a fixed size must match it exactly; variable
  ones (MAC table, RSS/hash config) must match the size their own length
  fields give.  The whole readable part is capped at :data:`MAX_COMMAND_LEN`.
* Of VQ_PAIRS_SET and RSS_CONFIG the last accepted one wins
  (§5.1.6.5.5 "Device operation in multiqueue mode"): it sets
  ``steering_mode`` and bumps ``steering_generation``.  ``curr_queue_pairs``
  is always within ``1..max_queue_pairs`` and, in RSS mode, covers every queue
  the RSS config can select.
* ``generation`` increases on every accepted command that changed state, so a
  consumer (:class:`virtnet.steering.Steering`) can cheaply tell whether to
  re-read the state.
"""

from __future__ import annotations

import copy
import enum
import struct
from dataclasses import dataclass, field
from typing import Final

from virtnet.errors import ControlError
from virtnet.net import (
    CTRL_ANNOUNCE,
    CTRL_ANNOUNCE_ACK,
    CTRL_ERR,
    CTRL_GUEST_OFFLOADS,
    CTRL_GUEST_OFFLOADS_SET,
    CTRL_MAC,
    CTRL_MAC_ADDR_SET,
    CTRL_MAC_TABLE_SET,
    CTRL_MQ,
    CTRL_MQ_HASH_CONFIG,
    CTRL_MQ_RSS_CONFIG,
    CTRL_MQ_VQ_PAIRS_MAX,
    CTRL_MQ_VQ_PAIRS_MIN,
    CTRL_MQ_VQ_PAIRS_SET,
    CTRL_NOTF_COAL,
    CTRL_NOTF_COAL_RX_SET,
    CTRL_NOTF_COAL_TX_SET,
    CTRL_NOTF_COAL_VQ_GET,
    CTRL_NOTF_COAL_VQ_SET,
    CTRL_OK,
    CTRL_RX,
    CTRL_RX_ALLMULTI,
    CTRL_RX_ALLUNI,
    CTRL_RX_NOBCAST,
    CTRL_RX_NOMULTI,
    CTRL_RX_NOUNI,
    CTRL_RX_PROMISC,
    CTRL_VLAN,
    CTRL_VLAN_ADD,
    CTRL_VLAN_DEL,
    GUEST_OFFLOAD_FEATURES,
    MIN_RSS_MAX_INDIRECTION_TABLE_LENGTH,
    MIN_RSS_MAX_KEY_SIZE,
    NetFeature,
)
from virtnet.rss import HASH_TYPES_ALL, RssConfig, frame_vlan

__all__ = [
    "ETH_ALEN",
    "MAX_COMMAND_LEN",
    "MAX_MAC_TABLE_ENTRIES",
    "MAX_VLAN_ID",
    "ControlState",
    "ControlStats",
    "SteeringMode",
    "accepts",
    "accepts_frame",
    "handle_command",
]

ETH_ALEN: Final = 6
BROADCAST_MAC: Final = b"\xff" * ETH_ALEN
# §5.1.6.5.2: the device "can filter by any number of addresses" and may switch
# to all-unicast/all-multicast when given too many.  We keep at most this many
# per table (QEMU uses 64 too) and beyond it set the *_overflow flags.
MAX_MAC_TABLE_ENTRIES: Final = 64
# IEEE 802.1Q: 12-bit VID (§5.1.6.5.3 "VLAN Filtering" carries it in an le16).
MAX_VLAN_ID: Final = 4095
# Our cap on the device-readable part of one control command: the largest legal
# command is a MAC table; 64 KiB bounds parsing work per command.
MAX_COMMAND_LEN: Final = 65536

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_COAL = struct.Struct("<II")  # virtio_net_ctrl_coal: max_packets, max_usecs
_COAL_VQ = struct.Struct("<HHII")  # virtio_net_ctrl_coal_vq
_COAL_VQ_GET = struct.Struct("<HH")  # vq_index, reserved (device-readable part)
_RSS_HEAD = struct.Struct("<IHH")  # hash_types, indirection_table_mask, unclassified_queue
_HASH_HEAD = struct.Struct("<IHHHHB")  # hash_types, reserved[4], hash_key_length

_RSS_RQ_RESERVED: Final = 0x8000  # rss_rq_id: 15-bit vq_index_1_16 + reserved bit
# indirection_table[mask + 1]: the length is a power of two up to 0x10000.
_RSS_TABLES: Final = {1 << i: struct.Struct(f"<{1 << i}H") for i in range(17)}


class SteeringMode(enum.Enum):
    """Which multiqueue command came last (§5.1.6.5.5)."""

    AUTO = "auto"  # VQ_PAIRS_SET (or none yet): automatic receive steering
    RSS = "rss"  # RSS_CONFIG


@dataclass(slots=True)
class ControlStats:
    """Counters; not part of ``ControlState`` equality."""

    ok: int = 0
    err: int = 0
    malformed: int = 0  # wrong size, bad reserved bits, bad on/off byte
    unsupported: int = 0  # unknown class or command
    not_negotiated: int = 0  # feature for the class/command not negotiated
    out_of_range: int = 0  # value outside what the spec or device allows
    mac_overflow: int = 0  # MAC tables larger than MAX_MAC_TABLE_ENTRIES (accepted)
    reserved_ignored: int = 0  # HASH_CONFIG with nonzero reserved fields (accepted)


@dataclass(slots=True)
class ControlState:
    """Everything the control queue can change.  Create with :meth:`new`."""

    max_queue_pairs: int = 1
    mac: bytes = b"\x00" * ETH_ALEN
    # Device limits (mirrors of NetConfig fields).
    rss_max_key_size: int = MIN_RSS_MAX_KEY_SIZE
    rss_max_indirection_table_length: int = MIN_RSS_MAX_INDIRECTION_TABLE_LENGTH
    supported_hash_types: int = HASH_TYPES_ALL
    # Whether VLAN filtering applies (CTRL_VLAN negotiated), set by new().
    vlan_filtering: bool = False
    # RX modes (§5.1.6.5.1).  promisc starts on: without CTRL_RX the driver cannot
    # ask for multicast, and a CTRL_RX driver sets it explicitly when it opens.
    promisc: bool = True
    allmulti: bool = False
    alluni: bool = False
    nomulti: bool = False
    nouni: bool = False
    nobcast: bool = False
    # MAC filtering (§5.1.6.5.2); the tables start empty.
    uni_macs: frozenset[bytes] = frozenset()
    multi_macs: frozenset[bytes] = frozenset()
    uni_overflow: bool = False
    multi_overflow: bool = False
    vlans: frozenset[int] = frozenset()
    # Multiqueue (§5.1.6.5.5-7).
    curr_queue_pairs: int = 1
    steering_mode: SteeringMode = SteeringMode.AUTO
    steering_generation: int = 0
    rss: RssConfig | None = None
    # Hash calculation for reporting (§5.1.6.4.2): from RSS_CONFIG or HASH_CONFIG.
    hash_types: int = 0
    hash_key: bytes = b""
    # Offloads (§5.1.6.5.8).
    guest_offloads: int = 0
    # Notification coalescing (§5.1.6.5.9): (max_packets, max_usecs).
    tx_coal: tuple[int, int] = (0, 0)
    rx_coal: tuple[int, int] = (0, 0)
    vq_coal: dict[int, tuple[int, int]] = field(default_factory=dict)
    # Gratuitous packets (§5.1.6.5.4): mirrors VIRTIO_NET_S_ANNOUNCE.
    announce_pending: bool = False
    generation: int = 0
    stats: ControlStats = field(default_factory=ControlStats, compare=False)

    @classmethod
    def new(
        cls,
        features: int,
        *,
        max_queue_pairs: int = 1,
        mac: bytes = b"\x00" * ETH_ALEN,
        rss_max_key_size: int = MIN_RSS_MAX_KEY_SIZE,
        rss_max_indirection_table_length: int = MIN_RSS_MAX_INDIRECTION_TABLE_LENGTH,
        supported_hash_types: int = HASH_TYPES_ALL,
    ) -> ControlState:
        """The state after reset for negotiated ``features``.

        Raises ``ValueError`` for impossible local parameters (a caller bug).
        """
        if not CTRL_MQ_VQ_PAIRS_MIN <= max_queue_pairs <= CTRL_MQ_VQ_PAIRS_MAX:
            raise ValueError(f"max_queue_pairs {max_queue_pairs} outside 1..0x8000")
        if len(mac) != ETH_ALEN:
            raise ValueError("mac must be 6 bytes")
        if not features & (NetFeature.MQ | NetFeature.RSS):
            max_queue_pairs = 1  # §5.1.2: N = 1 without MQ or RSS
        return cls(
            max_queue_pairs=max_queue_pairs,
            mac=bytes(mac),
            rss_max_key_size=rss_max_key_size,
            rss_max_indirection_table_length=rss_max_indirection_table_length,
            supported_hash_types=supported_hash_types,
            vlan_filtering=bool(features & NetFeature.CTRL_VLAN),
            # Offloads start enabled as negotiated (§5.1.6.5.8).
            guest_offloads=features & GUEST_OFFLOAD_FEATURES,
        )

    def snapshot(self) -> ControlState:
        """A deep copy (used by tests and by callers that want before/after)."""
        return copy.deepcopy(self)

    def coalescing(self, vq_index: int) -> tuple[int, int]:
        """(max_packets, max_usecs) in force for data virtqueue ``vq_index``."""
        got = self.vq_coal.get(vq_index)
        if got is not None:
            return got
        return self.tx_coal if vq_index & 1 else self.rx_coal


class _RejectedError(ControlError):
    """Internal: a rejected command, with the counter to bump."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.reason = reason


def _need(features: int, feature: NetFeature) -> None:
    if not features & feature:
        raise _RejectedError("not_negotiated", f"{feature.name} not negotiated")


def _exact(data: memoryview, n: int) -> None:
    if len(data) != n:
        raise _RejectedError("malformed", f"expected {n} bytes, got {len(data)}")


def _onoff(data: memoryview) -> bool:
    _exact(data, 1)
    v = data[0]
    if v > 1:
        raise _RejectedError("malformed", "on/off byte must be 0 or 1")
    return v == 1


def _rx(state: ControlState, features: int, cmd: int, data: memoryview) -> None:
    if cmd in (CTRL_RX_PROMISC, CTRL_RX_ALLMULTI):
        _need(features, NetFeature.CTRL_RX)
    elif cmd in (CTRL_RX_ALLUNI, CTRL_RX_NOMULTI, CTRL_RX_NOUNI, CTRL_RX_NOBCAST):
        _need(features, NetFeature.CTRL_RX_EXTRA)
    else:
        raise _RejectedError("unsupported", f"RX command {cmd}")
    on = _onoff(data)
    if cmd == CTRL_RX_PROMISC:
        state.promisc = on
    elif cmd == CTRL_RX_ALLMULTI:
        state.allmulti = on
    elif cmd == CTRL_RX_ALLUNI:
        state.alluni = on
    elif cmd == CTRL_RX_NOMULTI:
        state.nomulti = on
    elif cmd == CTRL_RX_NOUNI:
        state.nouni = on
    else:
        state.nobcast = on


def _mac_list(data: memoryview, off: int, multicast: bool) -> tuple[list[bytes], int]:
    if len(data) < off + 4:
        raise _RejectedError("malformed", "MAC table: missing entry count")
    (n,) = _U32.unpack_from(data, off)
    off += 4
    if n > (len(data) - off) // ETH_ALEN:
        raise _RejectedError("malformed", "MAC table: entries run past the data")
    macs = [bytes(data[off + i * ETH_ALEN : off + (i + 1) * ETH_ALEN]) for i in range(n)]
    for m in macs:
        if bool(m[0] & 1) != multicast:
            raise _RejectedError("out_of_range", "MAC table: address in the wrong table")
    return macs, off + n * ETH_ALEN


def _mac(state: ControlState, features: int, cmd: int, data: memoryview) -> None:
    if cmd == CTRL_MAC_TABLE_SET:
        _need(features, NetFeature.CTRL_RX)
        uni, off = _mac_list(data, 0, multicast=False)
        multi, off = _mac_list(data, off, multicast=True)
        if off != len(data):
            raise _RejectedError("malformed", "MAC table: trailing bytes")
        state.uni_overflow = len(uni) > MAX_MAC_TABLE_ENTRIES
        state.multi_overflow = len(multi) > MAX_MAC_TABLE_ENTRIES
        if state.uni_overflow or state.multi_overflow:
            state.stats.mac_overflow += 1
        state.uni_macs = frozenset() if state.uni_overflow else frozenset(uni)
        state.multi_macs = frozenset() if state.multi_overflow else frozenset(multi)
    elif cmd == CTRL_MAC_ADDR_SET:
        _need(features, NetFeature.CTRL_MAC_ADDR)
        _exact(data, ETH_ALEN)
        mac = bytes(data)
        if mac[0] & 1 or mac == b"\x00" * ETH_ALEN:
            raise _RejectedError("out_of_range", "MAC_ADDR_SET: not a unicast address")
        state.mac = mac
    else:
        raise _RejectedError("unsupported", f"MAC command {cmd}")


def _vlan(state: ControlState, features: int, cmd: int, data: memoryview) -> None:
    _need(features, NetFeature.CTRL_VLAN)
    if cmd not in (CTRL_VLAN_ADD, CTRL_VLAN_DEL):
        raise _RejectedError("unsupported", f"VLAN command {cmd}")
    _exact(data, 2)
    (vid,) = _U16.unpack_from(data)
    if vid > MAX_VLAN_ID:
        raise _RejectedError("out_of_range", f"VLAN id {vid}")
    state.vlans = state.vlans | {vid} if cmd == CTRL_VLAN_ADD else state.vlans - {vid}


def _announce(state: ControlState, features: int, cmd: int, data: memoryview) -> None:
    _need(features, NetFeature.GUEST_ANNOUNCE)
    if cmd != CTRL_ANNOUNCE_ACK:
        raise _RejectedError("unsupported", f"ANNOUNCE command {cmd}")
    _exact(data, 0)
    state.announce_pending = False


def _parse_key(data: memoryview, off: int, state: ControlState) -> bytes:
    klen = data[off]
    off += 1
    if len(data) != off + klen:
        raise _RejectedError("malformed", "hash key length does not match the data")
    if klen > state.rss_max_key_size:
        raise _RejectedError("out_of_range", f"hash key of {klen} bytes > {state.rss_max_key_size}")
    return bytes(data[off:])


def _check_types(state: ControlState, types: int) -> None:
    if types & ~state.supported_hash_types:
        raise _RejectedError("out_of_range", f"unsupported hash types {types:#x}")


def _mq(state: ControlState, features: int, cmd: int, data: memoryview) -> None:
    if cmd == CTRL_MQ_VQ_PAIRS_SET:
        _need(features, NetFeature.MQ)
        _exact(data, 2)
        (pairs,) = _U16.unpack_from(data)
        if not CTRL_MQ_VQ_PAIRS_MIN <= pairs <= state.max_queue_pairs:
            raise _RejectedError("out_of_range", f"virtqueue_pairs {pairs}")
        state.curr_queue_pairs = pairs
        state.steering_mode = SteeringMode.AUTO
        state.steering_generation += 1
    elif cmd == CTRL_MQ_RSS_CONFIG:
        _need(features, NetFeature.RSS)
        if len(data) < _RSS_HEAD.size:
            raise _RejectedError("malformed", "RSS_CONFIG too short")
        types, mask, unclassified = _RSS_HEAD.unpack_from(data)
        entries = mask + 1
        off = _RSS_HEAD.size + 2 * entries
        if len(data) < off + 3:
            raise _RejectedError("malformed", "RSS_CONFIG too short for its table")
        if entries & mask:
            raise _RejectedError("out_of_range", "indirection table length not a power of two")
        if entries > state.rss_max_indirection_table_length:
            raise _RejectedError("out_of_range", f"indirection table of {entries} entries")
        table = list(_RSS_TABLES[entries].unpack_from(data, _RSS_HEAD.size))
        (max_tx_vq,) = _U16.unpack_from(data, off)
        key = _parse_key(data, off + 2, state)
        _check_types(state, types)
        top = max(*table, unclassified)
        if top & _RSS_RQ_RESERVED:
            raise _RejectedError("malformed", "rss_rq_id reserved bit set")
        if top >= state.max_queue_pairs:
            raise _RejectedError("out_of_range", f"receive queue {top} >= {state.max_queue_pairs}")
        if not CTRL_MQ_VQ_PAIRS_MIN <= max_tx_vq <= state.max_queue_pairs:
            raise _RejectedError("out_of_range", f"max_tx_vq {max_tx_vq}")
        state.rss = RssConfig(types, table, unclassified, max_tx_vq, key)
        state.curr_queue_pairs = max(max_tx_vq, top + 1)
        state.hash_types = types
        state.hash_key = key
        state.steering_mode = SteeringMode.RSS
        state.steering_generation += 1
    elif cmd == CTRL_MQ_HASH_CONFIG:
        _need(features, NetFeature.HASH_REPORT)
        if len(data) < _HASH_HEAD.size:
            raise _RejectedError("malformed", "HASH_CONFIG too short")
        types, r0, r1, r2, r3, _klen = _HASH_HEAD.unpack_from(data)
        key = _parse_key(data, _HASH_HEAD.size - 1, state)
        _check_types(state, types)
        if r0 | r1 | r2 | r3:
            # §5.1.6.5.6.4 says reserved MUST be zero, but Linux before the fix
            # "max_tx_vq = has_rss ? curr_queue_pairs : 0" (2023) put the queue
            # count there; QEMU ignores the fields.  Accept and count.
            state.stats.reserved_ignored += 1
        state.hash_types = types
        state.hash_key = key
    else:
        raise _RejectedError("unsupported", f"MQ command {cmd}")


def _offloads(state: ControlState, features: int, cmd: int, data: memoryview) -> None:
    _need(features, NetFeature.CTRL_GUEST_OFFLOADS)
    if cmd != CTRL_GUEST_OFFLOADS_SET:
        raise _RejectedError("unsupported", f"GUEST_OFFLOADS command {cmd}")
    _exact(data, 8)
    (offloads,) = _U64.unpack_from(data)
    if offloads & ~(features & GUEST_OFFLOAD_FEATURES):
        raise _RejectedError("out_of_range", f"offloads {offloads:#x} not negotiated")
    state.guest_offloads = offloads


def _data_vq(state: ControlState, vq: int) -> None:
    # "an enabled transmit or receive virtqueue": any data queue the device has
    # (enablement is the transport's business; the controlq is never valid).
    if vq >= 2 * state.max_queue_pairs:
        raise _RejectedError("out_of_range", f"vq_index {vq} is not a data virtqueue")


def _coal(state: ControlState, features: int, cmd: int, data: memoryview) -> bytes:
    if cmd in (CTRL_NOTF_COAL_TX_SET, CTRL_NOTF_COAL_RX_SET):
        _need(features, NetFeature.NOTF_COAL)
        _exact(data, _COAL.size)
        params: tuple[int, int] = _COAL.unpack_from(data)
        parity = 1 if cmd == CTRL_NOTF_COAL_TX_SET else 0
        # §5.1.6.5.9: the last command for a queue wins, so TX_SET/RX_SET override
        # earlier per-queue settings of that direction.
        state.vq_coal = {k: v for k, v in state.vq_coal.items() if k & 1 != parity}
        if parity:
            state.tx_coal = params
        else:
            state.rx_coal = params
        return b""
    if cmd == CTRL_NOTF_COAL_VQ_SET:
        _need(features, NetFeature.VQ_NOTF_COAL)
        _exact(data, _COAL_VQ.size)
        vq, _reserved, packets, usecs = _COAL_VQ.unpack_from(data)  # reserved ignored
        _data_vq(state, vq)
        state.vq_coal = {**state.vq_coal, vq: (packets, usecs)}
        return b""
    if cmd == CTRL_NOTF_COAL_VQ_GET:
        _need(features, NetFeature.VQ_NOTF_COAL)
        _exact(data, _COAL_VQ_GET.size)
        vq, _reserved = _COAL_VQ_GET.unpack_from(data)
        _data_vq(state, vq)
        return _COAL.pack(*state.coalescing(vq))
    raise _RejectedError("unsupported", f"NOTF_COAL command {cmd}")


def _dispatch(state: ControlState, features: int, data: memoryview) -> bytes:
    """Validate then apply; raises _RejectedError before any mutation on rejection."""
    if not features & NetFeature.CTRL_VQ:
        raise _RejectedError("not_negotiated", "CTRL_VQ not negotiated")
    if len(data) < 2:
        raise _RejectedError("malformed", "command shorter than class + command")
    if len(data) > MAX_COMMAND_LEN:
        raise _RejectedError("malformed", "command longer than MAX_COMMAND_LEN")
    cls, cmd = data[0], data[1]
    body = data[2:]
    if cls == CTRL_RX:
        _rx(state, features, cmd, body)
    elif cls == CTRL_MAC:
        _mac(state, features, cmd, body)
    elif cls == CTRL_VLAN:
        _vlan(state, features, cmd, body)
    elif cls == CTRL_ANNOUNCE:
        _announce(state, features, cmd, body)
    elif cls == CTRL_MQ:
        _mq(state, features, cmd, body)
    elif cls == CTRL_GUEST_OFFLOADS:
        _offloads(state, features, cmd, body)
    elif cls == CTRL_NOTF_COAL:
        return _coal(state, features, cmd, body)
    else:
        raise _RejectedError("unsupported", f"class {cls}")
    return b""


def handle_command(
    state: ControlState, features: int, data: bytes | bytearray | memoryview, now: float
) -> tuple[int, bytes]:
    """Apply one control command; return ``(ack, command-specific-result)``.

    ``now`` is accepted for symmetry with the other sans-I/O entry points (no
    command currently depends on time).
    """
    del now
    mv = memoryview(data).cast("B") if isinstance(data, memoryview) else memoryview(data)
    stats = state.stats
    try:
        reply = _dispatch(state, features, mv)
    except _RejectedError as e:
        stats.err += 1
        setattr(stats, e.reason, getattr(stats, e.reason) + 1)
        return CTRL_ERR, b""
    stats.ok += 1
    state.generation += 1
    return CTRL_OK, reply


def accepts(state: ControlState, dst_mac: bytes | bytearray | memoryview, vlan: int | None) -> bool:
    """Whether a received frame to ``dst_mac`` (on VLAN ``vlan``) is delivered.

    §5.1.6.5.1 (RX modes; promisc wins over everything), §5.1.6.5.2 (MAC
    tables), §5.1.6.5.3 (VLAN table, only with CTRL_VLAN, only tagged frames).
    """
    if state.promisc:
        return True
    if vlan is not None and state.vlan_filtering and vlan not in state.vlans:
        return False
    d = bytes(dst_mac)
    if len(d) != ETH_ALEN:
        return False
    if d == BROADCAST_MAC:
        return not state.nobcast
    if d[0] & 1:
        if state.nomulti:
            return False
        return state.allmulti or state.multi_overflow or d in state.multi_macs
    if state.nouni:
        return False
    return state.alluni or state.uni_overflow or d == state.mac or d in state.uni_macs


def accepts_frame(state: ControlState, frame: bytes | bytearray | memoryview) -> bool:
    """:func:`accepts` applied to an Ethernet frame (runt frames are refused)."""
    if len(frame) < 14:
        return False
    return accepts(state, frame[:ETH_ALEN], frame_vlan(frame))
