"""virtio-net wire facts: feature bits, the packet header, config space, queue map.

Everything here follows virtio 1.3, section 5.1 "Network Device" (where the
2012 drafts or later drafts differ, 1.3 wins).  The module is pure: no I/O, no
clock, no global mutable state.

Invariants:

* :class:`NetFeature` values are exactly the spec's bit numbers (``1 << bit``).
* :func:`negotiate` never returns a feature the device did not offer, nor one
  whose requirements (§5.1.3.1 "Feature bit requirements") are unmet: it
  returns the largest dependency-closed subset of ``offered & wanted``.
* :func:`validate_features` raises :class:`FeatureError` (a
  :class:`~virtnet.errors.PeerError`) for a driver that accepted a set that
  breaks §5.1.3.1; it never raises anything else.
* Every header/config struct is a precompiled little-endian ``struct.Struct``
  (legacy drivers on big-endian guests are not supported: their headers are
  guest-native endian, §5.1.6.1 "Legacy Interface: Device Operation").
* Queue pairs are 0-based here: pair ``p`` is receiveq(p+1) at virtqueue index
  ``2p`` and transmitq(p+1) at ``2p+1``; the controlq is ``2N`` for ``N`` pairs
  (§5.1.2 "Virtqueues").
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final

from virtnet.errors import ProtocolError

__all__ = [
    "CONFIG_SIZE",
    "CTRL_ANNOUNCE",
    "CTRL_ANNOUNCE_ACK",
    "CTRL_ERR",
    "CTRL_GUEST_OFFLOADS",
    "CTRL_GUEST_OFFLOADS_SET",
    "CTRL_MAC",
    "CTRL_MAC_ADDR_SET",
    "CTRL_MAC_TABLE_SET",
    "CTRL_MQ",
    "CTRL_MQ_HASH_CONFIG",
    "CTRL_MQ_RSS_CONFIG",
    "CTRL_MQ_VQ_PAIRS_MAX",
    "CTRL_MQ_VQ_PAIRS_MIN",
    "CTRL_MQ_VQ_PAIRS_SET",
    "CTRL_NOTF_COAL",
    "CTRL_NOTF_COAL_RX_SET",
    "CTRL_NOTF_COAL_TX_SET",
    "CTRL_NOTF_COAL_VQ_GET",
    "CTRL_NOTF_COAL_VQ_SET",
    "CTRL_OK",
    "CTRL_RX",
    "CTRL_RX_ALLMULTI",
    "CTRL_RX_ALLUNI",
    "CTRL_RX_NOBCAST",
    "CTRL_RX_NOMULTI",
    "CTRL_RX_NOUNI",
    "CTRL_RX_PROMISC",
    "CTRL_STATS",
    "CTRL_STATS_GET",
    "CTRL_STATS_QUERY",
    "CTRL_VLAN",
    "CTRL_VLAN_ADD",
    "CTRL_VLAN_DEL",
    "DUPLEX_FULL",
    "DUPLEX_HALF",
    "DUPLEX_UNKNOWN",
    "FEATURE_REQUIREMENTS",
    "GUEST_OFFLOAD_FEATURES",
    "HASH_REPORT_IPV4",
    "HASH_REPORT_IPV6",
    "HASH_REPORT_IPV6_EX",
    "HASH_REPORT_NONE",
    "HASH_REPORT_TCPV4",
    "HASH_REPORT_TCPV6",
    "HASH_REPORT_TCPV6_EX",
    "HASH_REPORT_UDPV4",
    "HASH_REPORT_UDPV6",
    "HASH_REPORT_UDPV6_EX",
    "HDR_F_DATA_VALID",
    "HDR_F_NEEDS_CSUM",
    "HDR_F_RSC_INFO",
    "HDR_GSO_ECN",
    "HDR_GSO_NONE",
    "HDR_GSO_TCPV4",
    "HDR_GSO_TCPV6",
    "HDR_GSO_UDP",
    "HDR_GSO_UDP_L4",
    "HDR_LEN_HASH",
    "HDR_LEN_LEGACY",
    "HDR_LEN_V1",
    "MAX_MTU",
    "MIN_MTU",
    "MIN_RSS_MAX_INDIRECTION_TABLE_LENGTH",
    "MIN_RSS_MAX_KEY_SIZE",
    "SPEED_UNKNOWN",
    "STATUS_ANNOUNCE",
    "STATUS_LINK_UP",
    "VHOST_F_LOG_ALL",
    "VHOST_USER_F_PROTOCOL_FEATURES",
    "VIRTIO_ID_NET",
    "FeatureError",
    "NetConfig",
    "NetFeature",
    "NetHdr",
    "config_size",
    "ctrl_index",
    "hdr_len",
    "inet_checksum",
    "ipv6_checksum",
    "negotiate",
    "num_queue_pairs",
    "pair_of",
    "rx_index",
    "tx_index",
    "validate_features",
]

VIRTIO_ID_NET: Final = 1  # §5.1.1 "Device ID"


class NetFeature(enum.IntFlag):
    """virtio-net (§5.1.3) and generic (§6 "Reserved Feature Bits") feature bits."""

    CSUM = 1 << 0
    GUEST_CSUM = 1 << 1
    CTRL_GUEST_OFFLOADS = 1 << 2
    MTU = 1 << 3
    MAC = 1 << 5
    GSO = 1 << 6  # legacy only (§5.1.3.2)
    GUEST_TSO4 = 1 << 7
    GUEST_TSO6 = 1 << 8
    GUEST_ECN = 1 << 9
    GUEST_UFO = 1 << 10
    HOST_TSO4 = 1 << 11
    HOST_TSO6 = 1 << 12
    HOST_ECN = 1 << 13
    HOST_UFO = 1 << 14
    MRG_RXBUF = 1 << 15
    STATUS = 1 << 16
    CTRL_VQ = 1 << 17
    CTRL_RX = 1 << 18
    CTRL_VLAN = 1 << 19
    CTRL_RX_EXTRA = 1 << 20
    GUEST_ANNOUNCE = 1 << 21
    MQ = 1 << 22
    CTRL_MAC_ADDR = 1 << 23
    # Generic transport/ring features (§6).
    NOTIFY_ON_EMPTY = 1 << 24  # legacy
    ANY_LAYOUT = 1 << 27  # legacy
    INDIRECT_DESC = 1 << 28
    EVENT_IDX = 1 << 29
    VERSION_1 = 1 << 32
    ACCESS_PLATFORM = 1 << 33
    RING_PACKED = 1 << 34
    IN_ORDER = 1 << 35
    ORDER_PLATFORM = 1 << 36
    SR_IOV = 1 << 37
    NOTIFICATION_DATA = 1 << 38
    NOTIF_CONFIG_DATA = 1 << 39
    RING_RESET = 1 << 40
    ADMIN_VQ = 1 << 41
    # virtio-net high bits (§5.1.3).
    DEVICE_STATS = 1 << 50  # virtio 1.4
    HASH_TUNNEL = 1 << 51
    VQ_NOTF_COAL = 1 << 52
    NOTF_COAL = 1 << 53
    GUEST_USO4 = 1 << 54
    GUEST_USO6 = 1 << 55
    HOST_USO = 1 << 56
    HASH_REPORT = 1 << 57
    GUEST_HDRLEN = 1 << 59
    RSS = 1 << 60
    RSC_EXT = 1 << 61
    STANDBY = 1 << 62
    SPEED_DUPLEX = 1 << 63


# vhost-user.rst "Feature bits": the backend offers bit 30 in GET_FEATURES to say it
# speaks GET/SET_PROTOCOL_FEATURES.  It is not a virtio feature and never reaches
# the guest.
VHOST_USER_F_PROTOCOL_FEATURES: Final = 30
# linux/vhost.h "VHOST_F_LOG_ALL 26": while negotiated the backend marks every page
# it writes in the dirty log (vhost-user.rst "Migration").  Not a virtio feature.
VHOST_F_LOG_ALL: Final = 26

_F = NetFeature

# §5.1.3.1 "Feature bit requirements": (feature, all of these, at least one of these).
FEATURE_REQUIREMENTS: Final[tuple[tuple[NetFeature, int, int], ...]] = (
    (_F.GUEST_TSO4, _F.GUEST_CSUM, 0),
    (_F.GUEST_TSO6, _F.GUEST_CSUM, 0),
    (_F.GUEST_ECN, 0, _F.GUEST_TSO4 | _F.GUEST_TSO6),
    (_F.GUEST_UFO, _F.GUEST_CSUM, 0),
    (_F.GUEST_USO4, _F.GUEST_CSUM, 0),
    (_F.GUEST_USO6, _F.GUEST_CSUM, 0),
    (_F.HOST_TSO4, _F.CSUM, 0),
    (_F.HOST_TSO6, _F.CSUM, 0),
    (_F.HOST_ECN, 0, _F.HOST_TSO4 | _F.HOST_TSO6),
    (_F.HOST_UFO, _F.CSUM, 0),
    (_F.HOST_USO, _F.CSUM, 0),
    (_F.CTRL_RX, _F.CTRL_VQ, 0),
    (_F.CTRL_VLAN, _F.CTRL_VQ, 0),
    (_F.GUEST_ANNOUNCE, _F.CTRL_VQ, 0),
    (_F.MQ, _F.CTRL_VQ, 0),
    (_F.CTRL_MAC_ADDR, _F.CTRL_VQ, 0),
    (_F.NOTF_COAL, _F.CTRL_VQ, 0),
    (_F.RSC_EXT, 0, _F.HOST_TSO4 | _F.HOST_TSO6),
    (_F.RSS, _F.CTRL_VQ, 0),
    (_F.VQ_NOTF_COAL, _F.CTRL_VQ, 0),
    (_F.HASH_TUNNEL, _F.CTRL_VQ, _F.RSS | _F.HASH_REPORT),
)

# Features that are only usable through the control queue although §5.1.3.1 does
# not list the requirement (§5.1.4 device-normative: "SHOULD NOT offer
# HASH_REPORT / CTRL_RX_EXTRA if it does not offer CTRL_VQ").  negotiate() drops
# them without CTRL_VQ; validate_features() does not reject a driver for them.
_SOFT_REQUIREMENTS: Final[tuple[tuple[NetFeature, int, int], ...]] = (
    (_F.HASH_REPORT, _F.CTRL_VQ, 0),
    (_F.CTRL_RX_EXTRA, _F.CTRL_VQ, 0),
    (_F.CTRL_GUEST_OFFLOADS, _F.CTRL_VQ, 0),
    (_F.DEVICE_STATS, _F.CTRL_VQ, 0),
)

# §5.1.6.5.8 "Setting Offloads State": the offloads CTRL_GUEST_OFFLOADS_SET may toggle.
GUEST_OFFLOAD_FEATURES: Final = int(
    _F.GUEST_CSUM
    | _F.GUEST_TSO4
    | _F.GUEST_TSO6
    | _F.GUEST_ECN
    | _F.GUEST_UFO
    | _F.GUEST_USO4
    | _F.GUEST_USO6
)


class FeatureError(ProtocolError):
    """The driver accepted a feature set that breaks §5.1.3.1."""


def _unmet(features: int, table: tuple[tuple[NetFeature, int, int], ...]) -> int:
    bad = 0
    for feat, all_of, any_of in table:
        if features & feat and (
            (features & all_of) != all_of or (any_of and not features & any_of)
        ):
            bad |= feat
    return bad


def negotiate(device_offered: int, driver_wanted: int) -> int:
    """The largest dependency-closed subset of ``device_offered & driver_wanted``.

    Bits this module does not know (transport bits, vhost-user bit 30) pass
    through untouched if both sides set them.
    """
    features = device_offered & driver_wanted
    tables = FEATURE_REQUIREMENTS + _SOFT_REQUIREMENTS
    while True:  # at most one pass per dependency level (<= 3)
        bad = _unmet(features, tables)
        if not bad:
            return features
        features &= ~bad


def validate_features(features: int) -> None:
    """Raise :class:`FeatureError` if ``features`` breaks §5.1.3.1."""
    bad = _unmet(features, FEATURE_REQUIREMENTS)
    if bad:
        names = ", ".join(f.name or hex(f.value) for f in NetFeature if bad & f.value)
        raise FeatureError(f"feature requirements not met for: {names}")


# --------------------------------------------------------------------------------------
# struct virtio_net_hdr (§5.1.6 "Device Operation")

HDR_F_NEEDS_CSUM: Final = 1
HDR_F_DATA_VALID: Final = 2
HDR_F_RSC_INFO: Final = 4

HDR_GSO_NONE: Final = 0
HDR_GSO_TCPV4: Final = 1
HDR_GSO_UDP: Final = 3
HDR_GSO_TCPV6: Final = 4
HDR_GSO_UDP_L4: Final = 5
HDR_GSO_ECN: Final = 0x80

# §5.1.6.4.4 "Hash reporting for incoming packets"; HASH_TYPE_X = 1 << (REPORT_X - 1).
HASH_REPORT_NONE: Final = 0
HASH_REPORT_IPV4: Final = 1
HASH_REPORT_TCPV4: Final = 2
HASH_REPORT_UDPV4: Final = 3
HASH_REPORT_IPV6: Final = 4
HASH_REPORT_TCPV6: Final = 5
HASH_REPORT_UDPV6: Final = 6
HASH_REPORT_IPV6_EX: Final = 7
HASH_REPORT_TCPV6_EX: Final = 8
HASH_REPORT_UDPV6_EX: Final = 9

# §5.1.6.1: legacy without MRG_RXBUF has no num_buffers; VERSION_1 always has it;
# HASH_REPORT appends hash_value, hash_report, padding_reserved.
HDR_LEN_LEGACY: Final = 10
HDR_LEN_V1: Final = 12
HDR_LEN_HASH: Final = 20

_HDR_LEGACY = struct.Struct("<BBHHHH")
_HDR_V1 = struct.Struct("<BBHHHHH")
_HDR_HASH = struct.Struct("<BBHHHHHIHH")
assert _HDR_LEGACY.size == HDR_LEN_LEGACY
assert _HDR_V1.size == HDR_LEN_V1
assert _HDR_HASH.size == HDR_LEN_HASH


def hdr_len(features: int) -> int:
    """Size of the virtio_net_hdr that precedes every packet for ``features``."""
    if features & NetFeature.HASH_REPORT:
        return HDR_LEN_HASH
    if features & (NetFeature.VERSION_1 | NetFeature.MRG_RXBUF):
        return HDR_LEN_V1
    return HDR_LEN_LEGACY


@dataclass(slots=True)
class NetHdr:
    """One virtio_net_hdr.  Pure data; no field is checked on unpack."""

    flags: int = 0
    gso_type: int = HDR_GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    num_buffers: int = 1
    hash_value: int = 0
    hash_report: int = HASH_REPORT_NONE

    @classmethod
    def unpack_from(cls, buf: bytes | bytearray | memoryview, offset: int, size: int) -> NetHdr:
        """Read a ``size``-byte header (10, 12 or 20) at ``offset``.

        Raises ``ValueError`` for an unknown ``size`` (a caller bug) and
        ``struct.error`` if ``buf`` is too short; callers check lengths first.
        """
        if size == HDR_LEN_V1:
            f, g, hl, gs, cs, co, nb = _HDR_V1.unpack_from(buf, offset)
            return cls(f, g, hl, gs, cs, co, nb)
        if size == HDR_LEN_HASH:
            f, g, hl, gs, cs, co, nb, hv, hr, _pad = _HDR_HASH.unpack_from(buf, offset)
            return cls(f, g, hl, gs, cs, co, nb, hv, hr)
        if size == HDR_LEN_LEGACY:
            f, g, hl, gs, cs, co = _HDR_LEGACY.unpack_from(buf, offset)
            return cls(f, g, hl, gs, cs, co)
        raise ValueError(f"bad virtio_net_hdr size {size}")

    def pack_into(self, buf: bytearray | memoryview, offset: int, size: int) -> None:
        """Write the header in its ``size``-byte form (10, 12 or 20) at ``offset``."""
        if size == HDR_LEN_V1:
            _HDR_V1.pack_into(
                buf, offset, self.flags, self.gso_type, self.hdr_len, self.gso_size,
                self.csum_start, self.csum_offset, self.num_buffers,
            )  # fmt: skip
        elif size == HDR_LEN_HASH:
            _HDR_HASH.pack_into(
                buf, offset, self.flags, self.gso_type, self.hdr_len, self.gso_size,
                self.csum_start, self.csum_offset, self.num_buffers,
                self.hash_value, self.hash_report, 0,
            )  # fmt: skip
        elif size == HDR_LEN_LEGACY:
            _HDR_LEGACY.pack_into(
                buf, offset, self.flags, self.gso_type, self.hdr_len, self.gso_size,
                self.csum_start, self.csum_offset,
            )  # fmt: skip
        else:
            raise ValueError(f"bad virtio_net_hdr size {size}")

    def pack(self, size: int) -> bytes:
        out = bytearray(size)
        self.pack_into(out, 0, size)
        return bytes(out)


# --------------------------------------------------------------------------------------
# struct virtio_net_config (§5.1.4 "Device configuration layout")

STATUS_LINK_UP: Final = 1
STATUS_ANNOUNCE: Final = 2

MIN_MTU: Final = 68  # §5.1.4.1: mtu between 68 and 65535 inclusive
MAX_MTU: Final = 65535
SPEED_UNKNOWN: Final = 0xFFFFFFFF  # §5.1.4: speed in Mbit/s, 0..0x7fffffff or unknown
DUPLEX_HALF: Final = 0x00
DUPLEX_FULL: Final = 0x01
DUPLEX_UNKNOWN: Final = 0xFF
MIN_RSS_MAX_KEY_SIZE: Final = 40  # §5.1.4.1: rss_max_key_size at least 40
MIN_RSS_MAX_INDIRECTION_TABLE_LENGTH: Final = 128  # §5.1.4.1: at least 128

# mac[6] status max_virtqueue_pairs mtu speed duplex rss_max_key_size
# rss_max_indirection_table_length supported_hash_types supported_tunnel_types
_CONFIG = struct.Struct("<6sHHHIBBHII")
CONFIG_SIZE: Final = _CONFIG.size
assert CONFIG_SIZE == 28

# How much of the config space exists for a feature set (§5.1.4: each field
# "only exists if" its feature is set; a field exists when any later one does).
_CONFIG_FIELD_ENDS: Final[tuple[tuple[int, int], ...]] = (
    (NetFeature.HASH_TUNNEL, 28),
    (NetFeature.RSS | NetFeature.HASH_REPORT, 24),
    (NetFeature.SPEED_DUPLEX, 17),
    (NetFeature.MTU, 12),
    (NetFeature.MQ | NetFeature.RSS, 10),
    (NetFeature.STATUS, 8),
)


def config_size(features: int) -> int:
    """Bytes of config space that exist for ``features`` (at least ``mac``)."""
    for feats, end in _CONFIG_FIELD_ENDS:
        if features & feats:
            return end
    return 6


@dataclass(slots=True)
class NetConfig:
    """The device configuration space (read-only for the driver)."""

    mac: bytes = b"\x00" * 6
    status: int = STATUS_LINK_UP
    max_virtqueue_pairs: int = 1
    mtu: int = 1500
    speed: int = SPEED_UNKNOWN
    duplex: int = DUPLEX_UNKNOWN
    rss_max_key_size: int = MIN_RSS_MAX_KEY_SIZE
    rss_max_indirection_table_length: int = MIN_RSS_MAX_INDIRECTION_TABLE_LENGTH
    supported_hash_types: int = 0
    supported_tunnel_types: int = 0

    def pack(self) -> bytes:
        """The :data:`CONFIG_SIZE`-byte little-endian config space image (slice it
        to :func:`config_size` for what a given feature set exposes)."""
        return _CONFIG.pack(
            bytes(self.mac), self.status, self.max_virtqueue_pairs, self.mtu, self.speed,
            self.duplex, self.rss_max_key_size, self.rss_max_indirection_table_length,
            self.supported_hash_types, self.supported_tunnel_types,
        )  # fmt: skip

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> NetConfig:
        """Parse a config image.  Missing trailing fields read as 0 (a driver may
        read only the prefix its features make valid); bytes past
        :data:`CONFIG_SIZE` are ignored."""
        raw = bytes(data[:CONFIG_SIZE]).ljust(CONFIG_SIZE, b"\x00")
        mac, st, mvp, mtu, speed, duplex, ks, itl, ht, tt = _CONFIG.unpack(raw)
        return cls(mac, st, mvp, mtu, speed, duplex, ks, itl, ht, tt)


# --------------------------------------------------------------------------------------
# Queue map (§5.1.2 "Virtqueues"); pairs are 0-based.


def rx_index(pair: int) -> int:
    """Virtqueue index of receiveq(pair+1)."""
    return 2 * pair


def tx_index(pair: int) -> int:
    """Virtqueue index of transmitq(pair+1)."""
    return 2 * pair + 1


def ctrl_index(max_pairs: int) -> int:
    """Virtqueue index of the controlq for ``max_pairs`` queue pairs."""
    return 2 * max_pairs


def pair_of(vq_index: int) -> int:
    """0-based queue pair of data virtqueue ``vq_index``."""
    return vq_index >> 1


def num_queue_pairs(features: int, max_virtqueue_pairs: int) -> int:
    """N of §5.1.2: 1 unless MQ or RSS is negotiated, else ``max_virtqueue_pairs``."""
    if features & (NetFeature.MQ | NetFeature.RSS):
        return max_virtqueue_pairs
    return 1


# --------------------------------------------------------------------------------------
# Control virtqueue classes and commands (§5.1.6.5 "Control Virtqueue").

CTRL_OK: Final = 0
CTRL_ERR: Final = 1

CTRL_RX: Final = 0  # §5.1.6.5.1 "Packet Receive Filtering"
CTRL_RX_PROMISC: Final = 0
CTRL_RX_ALLMULTI: Final = 1
CTRL_RX_ALLUNI: Final = 2
CTRL_RX_NOMULTI: Final = 3
CTRL_RX_NOUNI: Final = 4
CTRL_RX_NOBCAST: Final = 5

CTRL_MAC: Final = 1  # §5.1.6.5.2 "Setting MAC Address Filtering"
CTRL_MAC_TABLE_SET: Final = 0
CTRL_MAC_ADDR_SET: Final = 1

CTRL_VLAN: Final = 2  # §5.1.6.5.3 "VLAN Filtering"
CTRL_VLAN_ADD: Final = 0
CTRL_VLAN_DEL: Final = 1

CTRL_ANNOUNCE: Final = 3  # §5.1.6.5.4 "Gratuitous Packet Sending"
CTRL_ANNOUNCE_ACK: Final = 0

CTRL_MQ: Final = 4  # §5.1.6.5.5 "Device operation in multiqueue mode"
CTRL_MQ_VQ_PAIRS_SET: Final = 0
CTRL_MQ_RSS_CONFIG: Final = 1
CTRL_MQ_HASH_CONFIG: Final = 2
CTRL_MQ_VQ_PAIRS_MIN: Final = 1  # §5.1.6.5.6 "Automatic receive steering in multiqueue mode"
CTRL_MQ_VQ_PAIRS_MAX: Final = 0x8000

CTRL_GUEST_OFFLOADS: Final = 5  # §5.1.6.5.8 "Offloads State Configuration"
CTRL_GUEST_OFFLOADS_SET: Final = 0

CTRL_NOTF_COAL: Final = 6  # §5.1.6.5.9 "Notifications Coalescing"
CTRL_NOTF_COAL_TX_SET: Final = 0
CTRL_NOTF_COAL_RX_SET: Final = 1
CTRL_NOTF_COAL_VQ_SET: Final = 2
CTRL_NOTF_COAL_VQ_GET: Final = 3

CTRL_STATS: Final = 8  # virtio 1.4 "Device Statistics" (not implemented: answered ERR)
CTRL_STATS_QUERY: Final = 0
CTRL_STATS_GET: Final = 1


def inet_checksum(data: bytes | bytearray) -> int:
    """The Internet checksum (RFC 1071) of ``data``, an odd length padded
    with a zero byte: for the IPv4 headers and ICMPv6 messages virtnet's
    tools and switch build themselves."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    s: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ipv6_checksum(addrs: bytes | bytearray, nh: int, data: bytes | bytearray) -> int:
    """The Internet checksum of the upper-layer message ``data`` (protocol
    ``nh``: ICMPv6, PIM...) behind the IPv6 pseudo-header of ``addrs``, the
    packet's source and destination addresses (32 bytes; RFC 8200 section
    8.1): 0 for a message whose checksum field is right, else the value to
    put there while it is zero."""
    return inet_checksum(bytes(addrs) + struct.pack("!IxxxB", len(data), nh) + data)
