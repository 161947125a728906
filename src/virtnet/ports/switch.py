"""An L2 learning switch joining every VM served by one virtnet process.

Each (VM, queue pair) is joined to the switch by a ``SOCK_SEQPACKET``
socketpair: the switch keeps one end, the pair's worker gets the other as its
:class:`~virtnet.ports.base.SocketQueue`.  One record = one frame preceded by
a 12-byte ``virtio_net_hdr_v1``; the header travels unchanged from sender to
receiver (the receiving worker fills in ``num_buffers``).  A tap queue fd can
join as a one-pair member (``attach_tap``; ``switch:uplink=IFNAME``): the
uplink to the host stack.

Invariants:

* Learning: the source MAC of every good frame is learnt as (VLAN, MAC) -> VM.
  The MAC table holds at most :data:`MAC_TABLE_SIZE` entries (least recently
  seen evicted first) and forgets an entry after :data:`MAC_AGING_S`; at most
  :data:`MACS_PER_VM` of them point to one VM (its further MACs are not learnt
  and counted, ``macs_unlearnt``), so that no VM can flush the others' out.
* VLANs (802.1Q, TPID 0x8100): an untagged frame is on VLAN 0 (native); a
  frame tagged X is on VLAN X.  A VM is a member of a set of VLANs (default
  ``{0}``); a frame from a VM on a VLAN it is not a member of is dropped, and a
  frame on VLAN X reaches only members of X.  Tags are never added or removed.
* Port security (``set_macs``): a VM given its MAC addresses may send only
  from them, and no other member may send from them; any other frame is
  dropped and counted (``dropped_spoofed``) before it is learnt, so one guest
  cannot take another's traffic by claiming its MAC.  Unicast to a locked MAC
  goes to its VM (on the VLANs it is a member of) without being learnt first,
  so it is never flooded to the others.  The MAC an ARP packet names as its
  sender and the link-layer address options of IPv6 neighbour discovery must
  be the VM's too.  A VM without locked MACs may use any unicast source MAC
  it likes (learning bridge).
* IP source guard (``set_ips``): a VM given its IP addresses may send IPv4
  and ARP only from them, and IPv6 (and neighbour advertisements for) only
  them or link-local addresses (the unspecified address where DHCP, ARP
  probes and DAD need it); other frames of those protocols are dropped and
  counted as spoofed.  Neighbour advertisements are found behind any IPv6
  extension headers; a header chain that cannot be followed, and a second
  VLAN tag, are refused.  Other EtherTypes are not checked.  A link-local
  address is bound, per VLAN, to the member that used it first (SAVI-FCFS,
  RFC 6620; at most :data:`LL_TABLE_SIZE` bindings, each lapsing after
  :data:`LL_AGING_S` unused): a guarded VM may not use one bound to another
  member, nor hold more than :data:`LL_PER_VM`; a member without addresses
  (trusted) takes over any binding it uses.  What a VM learns counts too:
  with :data:`DHCP_LEARNING`, the IPv4 and IPv6 addresses a trusted DHCP or
  DHCPv6 server leases it (the switch snoops the server's DHCPACKs and
  Replies); with :data:`SLAAC_LEARNING`, the addresses it makes in the /64
  prefixes a trusted router advertises for SLAAC, bound first come first
  served like link-local ones.
* DHCP and router guards (``set_guards``): a guarded VM may not send DHCP or
  DHCPv6 server or relay messages, or ICMP/ICMPv6 router advertisements and
  redirects (:class:`Guard`), so that it cannot make itself another VM's
  gateway; they are dropped and counted (``dropped_guard``).
* Neighbour suppression (``set_neigh_suppress``): ARP requests and neighbour
  solicitations for the addresses of VMs held to one MAC and to their
  addresses are answered by the switch, to the asker alone, not flooded.
* Multicast snooping (``set_mcast_snoop``, RFC 4541; :mod:`virtnet.ports.mcast`):
  the switch reads IGMP and MLD reports and queries.  A router port is a
  trusted member that sent a query, a PIM hello or a multicast router
  discovery advertisement in the last
  :data:`~virtnet.ports.mcast.OTHER_QUERIER_S`.  On a VLAN with a querier (a
  member that sent a query in that time, or the switch itself), from the
  first query's maximum response time on (when every host has answered;
  :data:`~virtnet.ports.mcast.RESPONSE_S` for the switch's own), traffic to a group some member
  reported goes only to its members whose source filter admits its source
  (IGMPv3/MLDv2 INCLUDE and EXCLUDE lists), to router ports and to members whose
  reports the switch could not take; reports and leaves go to router ports
  alone.  Unreported groups, 224.0.0.0/24 and ff02::1 still flood, and so
  does everything on a VLAN with no querier: without queries memberships
  cannot be trusted (Linux bridge does the same).  A membership lasts
  :data:`~virtnet.ports.mcast.MEMBERSHIP_S` unless renewed, and a member
  that joins gets every group until it has answered a query; a VM's leave
  ends it at once (one host per port), an uplink's is left to age; a VM may
  hold :data:`MCAST_GROUPS_PER_VM`.  As a querier (``set_mcast_querier``)
  the switch asks every member of a VLAN with no other querier for its
  groups (IGMPv3 and MLDv2 general queries), so that memberships stay
  fresh without a multicast router; reports then reach no other VM.
* Policing (``set_rate``): what a VM sends is held to its rate by a token
  bucket (:func:`rate_burst` bytes); a frame over it is dropped and counted
  (``dropped_rate``) before anything else is looked at.
* Forwarding: known unicast goes to the one VM that owns the destination;
  broadcast, multicast and unknown unicast are flooded to every other member
  VM of the VLAN.  A frame never goes back to the VM it came from.
* Receive steering per VM (unless the VM has its own
  :class:`~virtnet.steering.Steering`, see ``set_steering``): the switch
  remembers, per (VM, symmetric flow id), the pair on which that VM last
  sent the flow (rx follows tx), for at most :data:`FLOW_AGING_S` and at
  most :data:`FLOW_TABLE_SIZE` flows.  A flow with no (fresh, active) entry
  is placed by its hash over the VM's active pairs (``set_active_pairs``);
  a VM gets each frame once, on one pair.
* Offloads: a GSO frame or a partial-checksum frame is delivered only to a VM
  whose rx offloads (``set_rx_offloads``, default: all) carry it; otherwise it
  is dropped and counted (there is no software segmentation).
* The switch never blocks: a full destination socket is a counted drop.  Every
  drop has a counter in :class:`SwitchStats`.
* Control messages (process mode) come from the supervisor over one control
  socket; a malformed one is counted and ignored; the switch process stops
  when the control socket closes.  :class:`SwitchPort` keeps the last
  configuration message of each kind per member, so that
  :meth:`SwitchPort.restart` can give a new process the same configuration.
"""

from __future__ import annotations

import array
import contextlib
import functools
import ipaddress
import json
import os
import select
import signal
import socket
import stat
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

from virtnet.errors import ProtocolError, UsageError
from virtnet.forking import fork_child
from virtnet.net import ipv6_checksum
from virtnet.ports.base import (
    MAX_FRAME_LEN,
    VNET_HDR_LEN,
    Offload,
    PortQueue,
    QueueCounters,
    SocketQueue,
)
from virtnet.ports.mcast import (
    ANY_SOURCE,
    MEMBERSHIP_S,
    OTHER_QUERIER_S,
    QUERY,
    QUERY_INTERVAL_S,
    REPORT,
    RESPONSE_S,
    STARTUP_QUERIES,
    Filter,
    MembershipError,
    Record,
    admits,
    after_record,
    flooded_group,
    igmp_query,
    membership,
    mld_query,
)
from virtnet.rss import flow_id as _rss_flow_id

if TYPE_CHECKING:
    from virtnet.ports.tap import TapPort
    from virtnet.steering import Steering

__all__ = [
    "DHCP_LEARNING",
    "FLOW_AGING_S",
    "FLOW_TABLE_SIZE",
    "LEASES_PER_VM",
    "LEASE_MAX_S",
    "LL_AGING_S",
    "LL_PER_VM",
    "LL_TABLE_SIZE",
    "MACS_PER_VM",
    "MAC_AGING_S",
    "MAC_TABLE_SIZE",
    "MAX_DHCP_OPTIONS",
    "MAX_IPV6_EXT_HEADERS",
    "MAX_ND_OPTIONS",
    "MAX_PAIRS_PER_VM",
    "MAX_VMS",
    "MCAST_GROUPS_PER_VM",
    "PREFIXES_PER_VLAN",
    "PREFIX_MAX_S",
    "SLAAC_LEARNING",
    "Guard",
    "Switch",
    "SwitchPort",
    "SwitchStats",
    "dhcp6_reply",
    "dhcp_ack",
    "flow_id",
    "mac_text",
    "rate_burst",
    "router_prefixes",
    "serve",
    "spread",
]

# Learnt (VLAN, MAC) -> VM entries (an 802.1D filtering database; bounded so a
# guest spraying source MACs cannot grow it).
MAC_TABLE_SIZE = 16384
# Source MACs one VM may teach the table (Linux's bridge has the same per-port
# limit since 6.7, "max_learned"; switches call it port security's maximum):
# past it, a VM's new MACs are not learnt -- frames to them are flooded -- so a
# guest spraying source MACs cannot push the other VMs' out of the table and
# have their traffic flooded to it (MAC flooding).
MACS_PER_VM = 256
# 802.1D-2004 section 7.9.2 recommends an ageing time of 300 s.
MAC_AGING_S = 300.0
# Link-local IPv6 addresses, and the SLAAC ones of VMs that learn them, per
# VLAN, bound to the member that used one first (SAVI-FCFS, RFC 6620), so that
# a VM held to its addresses (set_ips) cannot claim another member's -- a
# router's among them.  Bounded like the MAC table; a binding lapses after
# LL_AGING_S unused, the longest a router may stay silent between its
# advertisements (MaxRtrAdvInterval's upper bound, RFC 4861 section 6.2.1), so
# a quiet router keeps its address.  A guarded VM may hold LL_PER_VM of them
# (a host makes one link-local address per interface -- VLANs are other links
# -- and one or two SLAAC addresses per prefix, RFC 8981's temporary ones
# among them).
LL_TABLE_SIZE = 16384
LL_AGING_S = 1800.0
LL_PER_VM = 16
# A MAC table, flow table or address binding entry in use has its time renewed
# (and moves to the young end of its table) at most this often: their ageing
# counts in tens of seconds or minutes.
_RENEW_S = 1.0
# DHCP snooping (set_ips with DHCP_LEARNING): the IPv4 leases a trusted DHCP
# server acknowledges to a VM, and the IPv6 addresses a trusted DHCPv6 server's
# replies assign it, are added to the addresses it may send from, each until its
# lease (valid lifetime) ends, at most LEASE_MAX_S (a longer or infinite lease
# is taken as this long; the client renews at half of it), LEASES_PER_VM at
# once, both families together.
LEASE_MAX_S = 7 * 86400
LEASES_PER_VM = 8
# SLAAC learning (set_ips with SLAAC_LEARNING): the /64 prefixes a trusted
# router advertises for autoconfiguration (RFC 4862 section 5.5.3), per VLAN,
# each until its valid lifetime ends, at most PREFIX_MAX_S (an infinite one is
# taken as this long; routers advertise every 1800 s at most), PREFIXES_PER_VLAN
# at once (a new one past that is not learnt).
PREFIX_MAX_S = 7 * 86400
PREFIXES_PER_VLAN = 16
# RFC 4862 section 5.5.3 e: an advertisement may cut a prefix's remaining valid
# lifetime to no less than two hours -- as the hosts keep their addresses.
PREFIX_CUT_FLOOR_S = 2 * 3600
# Remembered (VM, flow) -> last tx pair entries for rx-follows-tx.
#: Multicast groups one VM may be a member of per VLAN and all (the model:
#: Linux bridge's ``mcast_max_groups``); a report past it makes the VM get
#: every group, as if the switch did not snoop, until it would have ended.
MCAST_GROUPS_PER_VM = 256

FLOW_TABLE_SIZE = 16384
# A flow not sent on for this long is placed by hash again.
FLOW_AGING_S = 30.0
# VMs and queue pairs per VM one switch serves (virtio 1.3 section 5.1.4 allows
# up to 0x8000 pairs; one process serving more is not useful).
MAX_VMS = 1024
MAX_PAIRS_PER_VM = 256
# Frames read from one ready socket per poll, so one busy VM cannot starve others.
SWITCH_BATCH = 64
# epoll events handled per poll.
MAX_EVENTS = 256
# Kernel send buffer of each switch socket (bounds frames in flight per pair).
SOCKET_BUFFER = 1 << 20
# Seconds between sweeps of aged MAC and flow entries.
SWEEP_INTERVAL_S = 1.0
# Largest control message (JSON) and fds per control message.
CONTROL_MAX = 4096
# run_forever's poll timeout: how quickly a stop request is noticed.
POLL_INTERVAL_S = 0.1
# Policing (set_rate): the rates a VM may be held to, in bit/s, and the bucket:
# at least two 64-KiB GSO frames, else RATE_BURST_S of traffic.  A policer
# drops whole GSO frames, so TCP needs a deep bucket: a guest held to 40 Mbit/s
# got 22 Mbit/s of TCP through a 0.1-s bucket, 41 through a 0.3-s one.
MIN_RATE_BPS = 64_000
MAX_RATE_BPS = 400_000_000_000
MIN_BURST_BYTES = 2 * 65536
RATE_BURST_S = 0.3
# 802.1Q: VLAN ids 1..4094 (0 = untagged/native here, 4095 reserved).
VLAN_MAX = 4094

_GSO_NONE = 0
_GSO_TCPV4 = 1
_GSO_UDP = 3
_GSO_TCPV6 = 4
_GSO_UDP_L4 = 5
_GSO_ECN = 0x80
_F_NEEDS_CSUM = 1
_MIN_FRAME = VNET_HDR_LEN + 14
_MSG_TRUNC = int(socket.MSG_TRUNC)
_BUF_LEN = VNET_HDR_LEN + MAX_FRAME_LEN
_E = VNET_HDR_LEN  # offset of the Ethernet header


def flow_id(frame: bytes | bytearray | memoryview, off: int = VNET_HDR_LEN) -> int:
    """A symmetric flow id of the Ethernet frame at ``frame[off:]``.

    IP frames get :func:`virtnet.rss.flow_id` (exact, symmetric); other frames
    get an id built from the unordered MAC pair and the EtherType, so both
    directions of any conversation share an id.
    """
    fid = _rss_flow_id(frame[off:])
    if fid is not None:
        return fid
    a = bytes(frame[off : off + 6])
    b = bytes(frame[off + 6 : off + 12])
    if b < a:
        a, b = b, a
    # prefix 2 keeps these apart from rss ids (prefix 1)
    return int.from_bytes(b"\x02" + a + b + bytes(frame[off + 12 : off + 14]), "big")


def mac_text(mac: bytes) -> str:
    """``52:54:00:12:34:56``."""
    return ":".join(f"{b:02x}" for b in mac)


def rate_burst(bits_per_s: int) -> int:
    """The token bucket (bytes) of a VM policed to ``bits_per_s``."""
    return max(MIN_BURST_BYTES, int(bits_per_s / 8 * RATE_BURST_S))


def spread(fid: int) -> int:
    """A well-mixed 32-bit value of a flow id, for placing a flow on a pair."""
    h = hash(fid)  # ints hash deterministically (mod 2**61 - 1)
    h = ((h ^ (h >> 31)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    return (h ^ (h >> 29)) >> 32


@dataclass
class SwitchStats:
    """Switch-wide counters."""

    frames_in: int = 0
    frames_out: int = 0
    flooded: int = 0
    filtered: int = 0  # unicast whose destination is the source VM itself (not sent back)
    dropped_full: int = 0  # destination socket full
    dropped_unknown_vm: int = 0  # destination VM/pair gone, or frame on an unknown socket
    dropped_bad_frame: int = 0  # too short, truncated, multicast source
    dropped_vlan: int = 0  # source VM not a member of the frame's VLAN
    dropped_spoofed: int = 0  # source MAC not the VM's own, or another VM's (set_macs)
    dropped_offload: int = 0  # GSO/partial csum to a VM that cannot take it
    dropped_no_queue: int = 0  # destination VM has no active open pair
    dropped_rate: int = 0  # source VM over its rate (set_rate)
    dropped_guard: int = 0  # a DHCP server or router message from a guarded VM (set_guards)
    mac_evictions: int = 0
    macs_unlearnt: int = 0  # new source MACs of a VM that has taught MACS_PER_VM
    leases_learnt: int = 0  # DHCPACKs and DHCPv6 addresses a VM may now send from (set_ips)
    leases_refused: int = 0  # ... for an address another VM holds, or past LEASES_PER_VM
    prefixes_learnt: int = 0  # SLAAC prefixes a trusted router advertised (set_ips)
    prefixes_refused: int = 0  # ... past PREFIXES_PER_VLAN
    neigh_suppressed: int = 0  # ARP requests and NS the switch answered itself (set_neigh_suppress)
    mcast_joined: int = 0  # group records of IGMP/MLD reports that made or renewed a membership
    mcast_refused: int = 0  # reports the switch could not take: their sender gets every group
    mcast_forwarded: int = 0  # multicast frames sent to a group's members and routers, not flooded
    mcast_queries: int = 0  # IGMP and MLD general queries the switch sent as querier
    flow_evictions: int = 0
    control_errors: int = 0
    ports: dict[str, dict[str, int]] = field(default_factory=dict)
    leases: dict[str, list[str]] = field(default_factory=dict)  # VM -> its DHCP(v6) leases
    slaac: dict[str, list[str]] = field(default_factory=dict)  # VM -> its SLAAC addresses
    prefixes: list[str] = field(default_factory=list)  # "fd00::/64" or "fd00::/64 vlan 100"
    groups: dict[str, list[str]] = field(default_factory=dict)  # VM -> its multicast groups
    mrouters: list[str] = field(default_factory=list)  # "vm" or "vm vlan 100": router ports
    on: list[str] = field(default_factory=list)  # neigh_suppress, mcast_snoop, mcast_querier


_NO_OFFLOAD: frozenset[Offload] = frozenset()


@functools.lru_cache(maxsize=512)
def _needed_offloads(flags: int, gso_type: int) -> frozenset[Offload]:
    """Offloads a receiver must have accepted to take a frame with this header."""
    need: set[Offload] = set()
    if flags & _F_NEEDS_CSUM:
        need.add(Offload.CSUM)
    gso = gso_type & ~_GSO_ECN
    if gso == _GSO_TCPV4:
        need.add(Offload.TSO4)
    elif gso == _GSO_TCPV6:
        need.add(Offload.TSO6)
    elif gso == _GSO_UDP:
        need.add(Offload.UFO)
    elif gso == _GSO_UDP_L4:
        need.add(Offload.USO)
    elif gso != _GSO_NONE:
        return frozenset(Offload)  # unknown GSO type: only a receiver taking everything
    if gso_type & _GSO_ECN:
        need.add(Offload.TSO_ECN)
    return frozenset(need)


_ETH_IPV4, _ETH_ARP, _ETH_IPV6 = 0x0800, 0x0806, 0x86DD
#: VLAN tag EtherTypes (802.1Q, 802.1ad, the older 0x9100): a second tag
#: inside the one the switch reads hides the frame from the guards.
_ETH_TAGS = frozenset({0x8100, 0x88A8, 0x9100})
_IPV6_ANY = bytes(16)
_ICMP, _UDP, _ICMPV6 = 1, 17, 58
_ND_NA = 136  # ICMPv6 neighbour advertisement
#: What a host sends from the unspecified address ::, before it has one:
#: router solicitations (RFC 4861 section 4.1), neighbour solicitations of
#: duplicate address detection (RFC 4862 section 5.4.2), MLD reports (RFC 2710
#: section 3, RFC 3810 section 5.2.13).
_FROM_UNSPECIFIED = frozenset({133, 135, 131, 143})
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_PORTS = struct.Struct("!HH")
_DHCP_CLIENT, _DHCP_SERVER = 68, 67
#: DHCPv6's client and server ports (RFC 8415 section 7.2): servers and relay
#: agents send from 547, and only they send to 546.
_DHCP6_CLIENT, _DHCP6_SERVER = 546, 547
#: What the router guard refuses: ICMP redirect and router advertisement
#: (RFC 792, RFC 1256); ICMPv6 router advertisement and redirect (RFC 4861),
#: MLD query (RFC 3810 section 5.1); IGMP membership query (RFC 3376
#: section 4.1), on protocol 2.
_ICMP_ROUTER = frozenset({5, 9})
_ICMPV6_ROUTER = frozenset({134, 137, 130})
_IGMP, _IGMP_QUERY = 2, 0x11
# IPv6 extension headers (RFC 8200 section 4; AH: RFC 4302).
_IPV6_HBH, _IPV6_ROUTING, _IPV6_FRAGMENT, _IPV6_AH, _IPV6_DEST = 0, 43, 44, 51, 60
_IPV6_OPTS = frozenset({_IPV6_HBH, _IPV6_ROUTING, _IPV6_DEST})
_IPV6_EXT = _IPV6_OPTS | {_IPV6_FRAGMENT, _IPV6_AH}
#: Extension headers the guards follow to an IPv6 packet's upper-layer header.
#: RFC 8200 section 4.1 has each kind at most once (destination options
#: twice), six at most; a longer chain, or one cut short by the frame, is
#: refused, as RFC 7113 section 3 has an RA guard do.
MAX_IPV6_EXT_HEADERS = 8
#: A non-first fragment: no upper-layer header in this packet.
_NOT_FIRST = -1
#: In an IP set (``set_ips``): the VM may also send from the IPv4 addresses a
#: trusted DHCP server leases to it (libvirt's ``CTRL_IP_LEARNING=dhcp``) and
#: the IPv6 addresses a trusted DHCPv6 server assigns it.
DHCP_LEARNING = b""
#: In an IP set: the VM may also send from IPv6 addresses it makes itself
#: (SLAAC, RFC 4862) in the prefixes a trusted router advertises, each the
#: first member's to use it (FCFS SAVI, RFC 6620).
SLAAC_LEARNING = b"\x00"
_LEARNING = frozenset({DHCP_LEARNING, SLAAC_LEARNING})
# BOOTP/DHCP (RFC 2131 section 2, RFC 2132): offsets in the UDP payload, the
# magic cookie, and the options read.
_BOOTP_YIADDR, _BOOTP_CHADDR, _BOOTP_COOKIE, _BOOTP_OPTIONS = 16, 28, 236, 240
_BOOTP_SNAME, _BOOTP_FILE = 44, 108  # 64 and 128 bytes, before the cookie
_DHCP_COOKIE = 0x63825363
_DHCP_OPT_PAD, _DHCP_OPT_END, _DHCP_OPT_LEASE, _DHCP_OPT_TYPE = 0, 255, 51, 53
#: Option overload (RFC 2132 section 9.3): 1, the 'file' field holds options
#: too; 2, the 'sname' field; 3, both (read in that order, after the options).
_DHCP_OPT_OVERLOAD = 52
_DHCPACK = 5
#: Options read in one DHCP message before giving up on it (each takes at least
#: a byte; a 1500-byte frame holds fewer than 1260 of them).
MAX_DHCP_OPTIONS = 255


def _dhcp_options(
    buf: bytearray, q: int, end: int, found: dict[int, int], budget: list[int]
) -> bool:
    """Read the DHCP options in ``buf[q:end]`` up to the end option into
    ``found`` (message type, lease time, overload: code -> value; the first
    of each counts, RFC 2131 section 4.1 and RFC 3396 aside), spending
    ``budget[0]`` options; False when one runs past ``end`` or the budget
    (:data:`MAX_DHCP_OPTIONS` a message) is spent."""
    while q < end and buf[q] != _DHCP_OPT_END:
        budget[0] -= 1
        if budget[0] < 0:
            return False
        code = buf[q]
        if code == _DHCP_OPT_PAD:
            q += 1
            continue
        if q + 2 > end or q + 2 + buf[q + 1] > end:
            return False
        size = buf[q + 1]
        if code in (_DHCP_OPT_TYPE, _DHCP_OPT_OVERLOAD) and size == 1:
            found.setdefault(code, buf[q + 2])
        elif code == _DHCP_OPT_LEASE and size == 4:
            found.setdefault(code, _U32.unpack_from(buf, q + 2)[0])
        q += 2 + size
    return True


def dhcp_ack(buf: bytearray, n: int, u: int) -> tuple[bytes, int, int] | None:
    """The (client MAC, leased IPv4 address, lease seconds) of the DHCPACK
    whose UDP header is at ``buf[u:n]``, or None when it is not a well-formed
    one (BOOTREPLY over Ethernet, the magic cookie, message type ACK, a lease
    time, a unicast address).  Options in the 'file' and 'sname' fields
    (option overload) are read too."""
    b = u + 8
    if n < b + _BOOTP_OPTIONS or buf[b] != 2 or buf[b + 1] != 1 or buf[b + 2] != 6:
        return None
    if _U32.unpack_from(buf, b + _BOOTP_COOKIE)[0] != _DHCP_COOKIE:
        return None
    found: dict[int, int] = {}
    budget = [MAX_DHCP_OPTIONS]
    if not _dhcp_options(buf, b + _BOOTP_OPTIONS, n, found, budget):
        return None
    overload = found.get(_DHCP_OPT_OVERLOAD, 0)
    for bit, start, end in ((1, _BOOTP_FILE, _BOOTP_COOKIE), (2, _BOOTP_SNAME, _BOOTP_FILE)):
        if overload & bit and not _dhcp_options(buf, b + start, b + end, found, budget):
            return None
    kind, lease = found.get(_DHCP_OPT_TYPE, -1), found.get(_DHCP_OPT_LEASE, -1)
    addr = _U32.unpack_from(buf, b + _BOOTP_YIADDR)[0]
    if kind != _DHCPACK or lease < 0 or not addr or addr >> 28 >= 0xE:
        return None  # 0.0.0.0, multicast and class E are no host's lease
    return bytes(buf[b + _BOOTP_CHADDR : b + _BOOTP_CHADDR + 6]), addr, lease


# DHCPv6 (RFC 8415): the Reply message, the options read (IA_NA, IA_TA and
# their IA Address options) and where an IA's options start.
_DHCP6_REPLY = 7
_DHCP6_IA_NA, _DHCP6_IA_TA, _DHCP6_IAADDR = 3, 4, 5
_DHCP6_IA_OPTIONS_AT = {_DHCP6_IA_NA: 12, _DHCP6_IA_TA: 4}


def _dhcp6_options(buf: bytearray, q: int, end: int) -> list[tuple[int, int, int]] | None:
    """The DHCPv6 options in ``buf[q:end]``, each (code, offset of its data,
    length); None when one runs past ``end`` or there are more than
    :data:`MAX_DHCP_OPTIONS`."""
    out: list[tuple[int, int, int]] = []
    for _ in range(MAX_DHCP_OPTIONS):
        if q >= end:
            return out
        if q + 4 > end:
            return None
        code, size = _PORTS.unpack_from(buf, q)
        if q + 4 + size > end:
            return None
        out.append((code, q + 4, size))
        q += 4 + size
    return None


def dhcp6_reply(buf: bytearray, n: int, u: int) -> list[tuple[bytes, int]] | None:
    """The (address, valid lifetime in seconds) of each IA Address option in
    the IA_NA and IA_TA options of the DHCPv6 Reply whose UDP header is at
    ``buf[u:n]``, or None when it is not a well-formed Reply.  Only global
    unicast addresses count (not ::, link-local or multicast); a valid
    lifetime of 0 is the server taking the address back.  The message ends
    where the UDP length says (a frame may be padded past it)."""
    b = u + 8
    if n < b + 4 or buf[b] != _DHCP6_REPLY:
        return None
    end = u + _U16.unpack_from(buf, u + 4)[0]
    if not b + 4 <= end <= n:
        return None
    top = _dhcp6_options(buf, b + 4, end)
    if top is None:
        return None
    out = []
    for code, q, size in top:
        at = _DHCP6_IA_OPTIONS_AT.get(code)
        if at is None:
            continue
        if size < at:
            return None
        inner = _dhcp6_options(buf, q + at, q + size)
        if inner is None:
            return None
        for icode, iq, isize in inner:
            if icode != _DHCP6_IAADDR:
                continue
            if isize < 24:
                return None
            addr = bytes(buf[iq : iq + 16])
            if addr == _IPV6_ANY or addr[0] == 0xFF or _link_local(addr):
                continue
            out.append((addr, _U32.unpack_from(buf, iq + 20)[0]))
    return out


class Guard(StrEnum):
    """What a guarded VM may not be (``set_guards``): Hyper-V's DHCP guard
    and router guard, RFC 7610's DHCPv6-Shield and RFC 6105's RA-Guard."""

    #: DHCP and DHCPv6 server and relay messages: UDP from port 67 or 547, or to a
    #: client's port 68 or 546 (a client may not look at the source port).
    DHCP = "dhcp"
    #: Router advertisements and redirects, ICMP and ICMPv6; IGMP and MLD
    #: queries (a querier is a multicast router port, which gets every group).
    ROUTER = "router"


def _ipv6_upper(buf: bytearray, n: int, p: int) -> tuple[int, int] | None:
    """The upper-layer protocol of the IPv6 packet at ``buf[p:n]`` and the
    offset of its header, past any extension headers; ``(44, _NOT_FIRST)``
    for a fragment other than the first; None when the chain runs past the
    frame or past :data:`MAX_IPV6_EXT_HEADERS` headers."""
    nh = buf[p + 6]
    q = p + 40
    for _ in range(MAX_IPV6_EXT_HEADERS):
        if nh in _IPV6_OPTS:
            if n < q + 2:
                return None
            nh, q = buf[q], q + (buf[q + 1] + 1) * 8
        elif nh == _IPV6_FRAGMENT:
            if n < q + 8:
                return None
            if _U16.unpack_from(buf, q + 2)[0] & 0xFFF8:
                return _IPV6_FRAGMENT, _NOT_FIRST
            nh, q = buf[q], q + 8
        elif nh == _IPV6_AH:
            if n < q + 2:
                return None
            nh, q = buf[q], q + (buf[q + 1] + 2) * 4
        else:
            return (nh, q) if q <= n else None
    return None


#: :func:`_l3`'s upper-layer offset for a frame too short for the IPv4, IPv6
#: or ARP header its EtherType names (or an IPv4 header length under 20), or
#: an IPv6 header chain :func:`_ipv6_upper` cannot follow.
_MALFORMED = -2

#: What :func:`_l3` makes of a frame: (EtherType, offset of the header it
#: names, upper-layer protocol, offset of the upper-layer header).
_L3 = tuple[int, int, int, int]


def _l3(buf: bytearray, n: int, off: int) -> _L3:
    """The frame in ``buf[:n]``, its EtherType at ``off``, parsed once for
    every check the switch holds a VM to (:func:`_lladdr_ok`,
    :func:`_ip_source_ok`, :func:`_guards_ok`, DHCP snooping).

    IPv4: the protocol and its header's offset, :data:`_NOT_FIRST` for a
    fragment other than the first.  IPv6: the same past any extension
    headers (:func:`_ipv6_upper`).  ARP and other EtherTypes: protocol 0 and
    the offset of the header after the EtherType.  :data:`_MALFORMED` in
    place of the offset for a frame the checks must refuse."""
    p = off + 2
    if n < p:
        return -1, p, 0, _MALFORMED
    et = buf[off] << 8 | buf[off + 1]
    if et == _ETH_IPV4:
        ihl = (buf[p] & 0x0F) * 4 if n >= p + 20 else 0
        if ihl < 20 or n < p + ihl:
            return et, p, 0, _MALFORMED
        if buf[p + 6] & 0x1F or buf[p + 7]:
            return et, p, buf[p + 9], _NOT_FIRST
        return et, p, buf[p + 9], p + ihl
    if et == _ETH_IPV6:
        if n < p + 40:
            return et, p, 0, _MALFORMED
        if buf[p + 6] not in _IPV6_EXT:
            return et, p, buf[p + 6], p + 40  # no extension header (TCP, UDP, ICMPv6...)
        up = _ipv6_upper(buf, n, p)
        if up is None:
            return et, p, 0, _MALFORMED
        return et, p, up[0], up[1]
    if et == _ETH_ARP and n < p + 28:
        return et, p, 0, _MALFORMED
    return et, p, 0, p


def _ip_source_ok(
    buf: bytearray,
    n: int,
    l3: _L3,
    v4: frozenset[int],
    v6: frozenset[bytes],
    claims: list[bytes] | None = None,
    prefixes: dict[bytes, float] | None = None,
) -> bool:
    """IP source guard: whether the frame in ``buf[:n]`` (parsed as ``l3``)
    claims only addresses of ``v4`` (IPv4, as integers) and ``v6`` (IPv6,
    packed) as its sender.

    IPv4 source and ARP sender address must be in ``v4``; an IPv6 source in
    ``v6``, unless link-local (fe80::/10, which every IPv6 host makes for
    itself) or in one of ``prefixes`` (the /64s, as their first 8 bytes, a
    trusted router offers for SLAAC, when the VM learns those), and so must
    the target a neighbour advertisement claims, behind whatever extension
    headers.  The link-local and SLAAC addresses the frame claims so are
    appended to ``claims`` (when given), for the caller to hold to their
    first user (:meth:`Switch._claim_addresses`).  The unspecified
    address is allowed where a host must use it, before it has an address: a
    DHCP client's UDP 68 -> 67 (RFC 2131), an ARP probe (RFC 5227), and
    duplicate address detection's neighbour solicitations, router
    solicitations and MLD reports (:data:`_FROM_UNSPECIFIED`).  Other
    EtherTypes are not IP and pass, except a second VLAN tag, which hides what
    is inside; a :data:`_MALFORMED` frame does not.
    """
    et, p, nh, u = l3
    if u == _MALFORMED:
        return False
    if et == _ETH_IPV4:
        src = _U32.unpack_from(buf, p + 12)[0]
        if src in v4:
            return True
        if src or nh != _UDP or u < 0:
            return False
        return n >= u + 4 and _PORTS.unpack_from(buf, u) == (_DHCP_CLIENT, _DHCP_SERVER)
    if et == _ETH_ARP:
        spa = _U32.unpack_from(buf, p + 14)[0]
        return spa in v4 or not spa
    if et == _ETH_IPV6:
        src6 = bytes(buf[p + 8 : p + 24])
        if src6 in v6 or src6 == _IPV6_ANY:
            pass
        elif _link_local(src6) or (prefixes and src6[:8] in prefixes):
            if claims is not None:
                claims.append(src6)
        else:
            return False
        if src6 == _IPV6_ANY:
            return nh == _ICMPV6 and n > u >= 0 and buf[u] in _FROM_UNSPECIFIED
        if nh == _ICMPV6 and n > u >= 0 and buf[u] == _ND_NA:
            # A neighbour advertisement claims its target address (RFC 4861
            # section 4.4): IPv6's ARP reply, so held to the same addresses.
            if n < u + 24:
                return False
            target = bytes(buf[u + 8 : u + 24])
            if target in v6:
                return True
            if not _link_local(target) and not (prefixes and target[:8] in prefixes):
                return False
            if claims is not None:
                claims.append(target)
        return True
    return et not in _ETH_TAGS


#: Guard bits (``_Vm.guard_bits``): an int is tested faster per frame than an enum set.
_GUARD_DHCP, _GUARD_ROUTER = 1, 2
_GUARD_BITS = {Guard.DHCP: _GUARD_DHCP, Guard.ROUTER: _GUARD_ROUTER}


#: IPv6 neighbour discovery messages that carry link-layer address options, and
#: where their options start (RFC 4861 section 4): router solicitation and
#: advertisement, neighbour solicitation and advertisement, redirect.
_ND_OPTIONS_AT = {133: 8, 134: 16, 135: 24, 136: 24, 137: 40}
#: Source and target link-layer address options (RFC 4861 section 4.6.1).
_ND_LLAO = frozenset({1, 2})
#: Options one ND message may carry before the lock refuses it (each is at
#: least 8 bytes, so a 1500-byte frame holds fewer than 190).
MAX_ND_OPTIONS = 64


_LLADDR_ET_LOW = frozenset({_ETH_ARP & 0xFF, _ETH_IPV6 & 0xFF})
_ND_NS = 135  # ICMPv6 neighbour solicitation
_ARP_ETH_IPV4 = bytes.fromhex("0001080006040001")  # Ethernet, IPv4, 6, 4, request
#: The neighbour advertisement's flags: solicited and override (RFC 4861 section 4.4).
_NA_SOLICITED_OVERRIDE = 0x60000000
_NA = struct.Struct("!BBHI16sBB6s")  # type, code, checksum, flags, target, TLLAO


def arp_reply(request: bytes | bytearray | memoryview, mac: bytes) -> bytes:
    """The ARP reply of ``mac`` to the request ``request`` (its 28 bytes)."""
    sha, spa, tpa = bytes(request[8:14]), bytes(request[14:18]), bytes(request[24:28])
    return _ARP_ETH_IPV4[:7] + b"\x02" + mac + tpa + sha + spa


def na_reply(src: bytes, dst: bytes, target: bytes, mac: bytes) -> bytes:
    """The IPv6 packet of a solicited neighbour advertisement from ``src`` to
    ``dst``: ``target`` is at ``mac`` (a target link-layer address option),
    its ICMPv6 checksum set."""
    icmp = bytearray(_NA.pack(_ND_NA, 0, 0, _NA_SOLICITED_OVERRIDE, target, 2, 1, mac))
    icmp[2:4] = _U16.pack(ipv6_checksum(src + dst, _ICMPV6, icmp))
    return struct.pack("!IHBB16s16s", 6 << 28, len(icmp), _ICMPV6, 255, src, dst) + icmp


def _nd_options(buf: bytearray, n: int, l3: _L3) -> list[tuple[int, int, int]] | None:
    """The options of the IPv6 neighbour discovery message in ``buf[:n]``
    (parsed as ``l3``), each (type, offset, size in bytes), walked within
    the IPv6 payload length; [] for a frame that is no such message; None for
    a malformed option list (running past the payload, a zero-length option,
    RFC 4861 section 4.6, or more than :data:`MAX_ND_OPTIONS`)."""
    et, p, nh, u = l3
    if et != _ETH_IPV6 or nh != _ICMPV6 or u < 0 or n <= u:
        return []
    at = _ND_OPTIONS_AT.get(buf[u])
    if at is None:
        return []
    end = p + 40 + (buf[p + 4] << 8 | buf[p + 5])  # the payload length, not the frame's
    if end > n:
        return None
    out: list[tuple[int, int, int]] = []
    q = u + at
    for _ in range(MAX_ND_OPTIONS):
        if q + 2 > end:
            return out if q >= end else None
        size = buf[q + 1] * 8
        if not size or q + size > end:
            return None
        out.append((buf[q], q, size))
        q += size
    return None


_ND_RA = 134  # ICMPv6 router advertisement
_ND_PREFIX_INFO = 3  # its prefix information option (RFC 4861 section 4.6.2)
_PIO_AUTONOMOUS = 0x40
#: The prefix length SLAAC works with on Ethernet (RFC 4862 section 5.5.3,
#: RFC 2464 section 4: 64-bit interface identifiers).
_SLAAC_PREFIX_LEN = 64


def router_prefixes(buf: bytearray, n: int, l3: _L3) -> list[tuple[bytes, int]] | None:
    """The (prefix, valid lifetime in seconds) of each /64 the router
    advertisement in ``buf[:n]`` (parsed as ``l3``) offers for SLAAC (the
    autonomous flag set, RFC 4862 section 5.5.3), prefix as its first 8 bytes;
    None when it is not a valid advertisement (RFC 4861 section 6.1.2: ICMPv6
    type 134 code 0, hop limit 255, from a link-local address, options well
    formed).  Link-local and multicast prefixes are skipped, as hosts skip
    them."""
    et, p, nh, u = l3
    if et != _ETH_IPV6 or nh != _ICMPV6 or u < 0 or n < u + 16 or buf[u] != _ND_RA:
        return None
    if buf[u + 1] or buf[p + 7] != 255 or not _link_local(bytes(buf[p + 8 : p + 10])):
        return None
    opts = _nd_options(buf, n, l3)
    if opts is None:
        return None
    out = []
    for kind, q, size in opts:
        if kind != _ND_PREFIX_INFO or size != 32:
            continue
        if buf[q + 2] != _SLAAC_PREFIX_LEN or not buf[q + 3] & _PIO_AUTONOMOUS:
            continue
        prefix = bytes(buf[q + 16 : q + 24])
        if _link_local(prefix) or prefix[0] == 0xFF:
            continue
        out.append((prefix, _U32.unpack_from(buf, q + 4)[0]))
    return out


def _lladdr_ok(buf: bytearray, n: int, l3: _L3, macs: frozenset[bytes]) -> bool:
    """Port security inside the frame: whether the MAC an ARP packet gives as
    its sender, and the link-layer addresses an IPv6 neighbour discovery
    message carries in its options, are among ``macs`` (libvirt's
    ``no-arp-mac-spoofing``, for ND too): else a VM locked to its MAC could
    have the others send what is meant for its addresses to another's MAC.
    A :data:`_MALFORMED` frame (``l3``: :func:`_l3`) is refused."""
    et, p, _nh, u = l3
    if u == _MALFORMED:
        return False
    if et == _ETH_ARP:
        return bytes(buf[p + 8 : p + 14]) in macs
    opts = _nd_options(buf, n, l3)
    if opts is None:
        return False
    return all(k not in _ND_LLAO or bytes(buf[q + 2 : q + 8]) in macs for k, q, _s in opts)


def _guards_ok(buf: bytearray, n: int, l3: _L3, guards: int) -> bool:
    """DHCP and router guards: whether the frame in ``buf[:n]`` (parsed as
    ``l3``) is none of the server messages ``guards`` (a sum of ``_GUARD_*``
    bits) refuse.

    Only a packet's first fragment shows its UDP or ICMP header, so only it
    is checked (a later one cannot be reassembled without it).  A first
    fragment too short for that header, a :data:`_MALFORMED` frame, or a
    second VLAN tag is refused."""
    et, _p, proto, u = l3
    if u == _MALFORMED:
        return False
    if et in (_ETH_IPV4, _ETH_IPV6):
        if u == _NOT_FIRST:
            return True
        v6 = et == _ETH_IPV6
        if proto == _UDP and guards & _GUARD_DHCP:
            return (
                n >= u + 4
                and (buf[u] << 8 | buf[u + 1]) != (_DHCP6_SERVER if v6 else _DHCP_SERVER)
                and (buf[u + 2] << 8 | buf[u + 3]) != (_DHCP6_CLIENT if v6 else _DHCP_CLIENT)
            )
        if proto == (_ICMPV6 if v6 else _ICMP) and guards & _GUARD_ROUTER:
            return n > u and buf[u] not in (_ICMPV6_ROUTER if v6 else _ICMP_ROUTER)
        if proto == _IGMP and not v6 and guards & _GUARD_ROUTER:
            return n > u and buf[u] != _IGMP_QUERY
        return True
    return et not in _ETH_TAGS


def _link_local(addr: bytes) -> bool:
    """fe80::/10."""
    return addr[0] == 0xFE and addr[1] & 0xC0 == 0x80


class _Vm:
    __slots__ = (
        "active", "bound", "burst", "dhcp", "groups", "guard_bits", "id", "ips", "ips4",
        "ips6", "learnt", "leases", "macs", "ports", "rate", "rx_offloads", "rx_ports",
        "slaac", "stamp", "steering", "tokens", "vlans",
    )  # fmt: skip

    def __init__(self, vm_id: str) -> None:
        self.id = vm_id
        self.vlans: frozenset[int] = frozenset({0})
        self.macs: frozenset[bytes] | None = None  # None: any source MAC
        self.ips: frozenset[bytes] | None = None  # None: any source IP (4- or 16-byte)
        self.ips4: frozenset[int] = frozenset()  # the IPv4 ones as integers
        self.ips6: frozenset[bytes] = frozenset()
        self.dhcp = False  # its IPv4 leases count too (DHCP_LEARNING in its set)
        # Leased address (IPv4 as an int, IPv6 packed) -> when the lease ends.
        self.leases: dict[int | bytes, float] = {}
        self.slaac = False  # may use SLAAC addresses (SLAAC_LEARNING in its set)
        self.guard_bits = 0  # what it may not send (set_guards), as _GUARD_* bits
        self.bound: set[tuple[int, bytes]] = set()  # (VLAN, IPv6 address) bound to it
        self.learnt = 0  # MAC table entries that point to it
        self.groups: set[tuple[int, int | bytes]] = set()  # (VLAN, multicast group) it joined
        # Policing of what the VM sends (set_rate): a token bucket in bytes.
        self.rate = 0.0  # bytes per second; 0: not policed
        self.burst = 0.0
        self.tokens = 0.0
        self.stamp = 0.0
        self.active = 1
        self.ports: dict[int, _Port] = {}
        self.rx_offloads: frozenset[Offload] = frozenset(Offload)
        self.rx_ports: list[_Port] = []  # open ports of active pairs, by pair
        self.steering: Steering | None = None

    def refresh_ips(self) -> None:
        """``ips4`` and ``ips6``: the static addresses and the leased ones."""
        static = self.ips or frozenset()
        leased = self.leases
        self.ips4 = frozenset(int.from_bytes(a, "big") for a in static if len(a) == 4) | {
            a for a in leased if isinstance(a, int)
        }
        self.ips6 = frozenset(a for a in static if len(a) == 16) | {
            a for a in leased if isinstance(a, bytes)
        }

    def refresh(self) -> None:
        self.rx_ports = sorted(
            (p for p in self.ports.values() if p.pair < self.active), key=lambda p: p.pair
        )


def _on_vlan(vlan: int) -> str:
    """How ``virtnet stats`` names a VLAN after a table entry ("" for untagged)."""
    return f" vlan {vlan}" if vlan else ""


def _group_text(vlan: int, group: int | bytes, f: Filter | None = None) -> str:
    """A multicast group (and a member's source filter) as ``virtnet stats`` shows it."""
    text = str(ipaddress.ip_address(group))
    if f is not None:
        sources = ",".join(sorted(str(ipaddress.ip_address(s)) for s in f[1]))
        text += f" {'from' if f[0] else 'not from'} {sources}"
    return text + _on_vlan(vlan)


def _answerable(vm: _Vm) -> bool:
    """Whether the switch may answer ARP and NS for ``vm`` (neighbour
    suppression): it is held to one MAC and to its addresses."""
    return vm.macs is not None and len(vm.macs) == 1 and vm.ips is not None


class _Port(QueueCounters):
    """The switch's end of one (VM, pair): rx = from the worker, tx = to it."""

    __slots__ = ("fd", "pair", "send", "sock", "vm")

    def __init__(self, vm: _Vm, pair: int, sock: socket.socket | None, fd: int = -1) -> None:
        super().__init__()
        self.vm = vm
        self.pair = pair
        self.sock = sock  # None: a tap fd (uplink)
        self.fd = sock.fileno() if sock is not None else fd
        self.send: Callable[[memoryview], int] = (
            sock.send if sock is not None else functools.partial(os.write, fd)
        )

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        else:
            os.close(self.fd)


class _StopEvent(Protocol):
    def is_set(self) -> bool: ...


def _socketpair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        s.setblocking(False)
    return a, b


class Switch:
    """The switch core; run it in-process (``poll_once``) or as a process (``serve``)."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._ep = select.epoll()
        self._vms: dict[str, _Vm] = {}
        self._by_fd: dict[int, _Port] = {}
        self._macs: OrderedDict[tuple[int, bytes], tuple[_Vm, float]] = OrderedDict()
        self._locked: dict[bytes, _Vm] = {}  # port security: MAC -> the VM it is locked to
        self._flows: OrderedDict[tuple[str, int], tuple[int, float]] = OrderedDict()
        # (VLAN, link-local or SLAAC IPv6 address) -> the member bound to it, when last used.
        self._bindings: OrderedDict[tuple[int, bytes], tuple[_Vm, float]] = OrderedDict()
        self._claims: list[bytes] = []  # a guarded frame's link-local and SLAAC claims
        # VMs whose DHCP leases or SLAAC addresses count (snooping on when > 0).
        self._learners = 0
        # VLAN -> SLAAC prefix (8 bytes) a trusted router advertised -> when it ends.
        self._prefixes: dict[int, dict[bytes, float]] = {}
        self._suppress = False  # answer ARP and NS for held VMs (set_neigh_suppress)
        # Address (IPv4 as an int, IPv6 packed) -> the VM held to it and to one
        # MAC, for neighbour suppression; None: to be built again (_holders).
        self._held: dict[int | bytes, _Vm] | None = None
        self._mcast = False  # IGMP and MLD snooping (set_mcast_snoop)
        # (VLAN, group: IPv4 as an int, IPv6 packed) -> member -> when its membership ends.
        self._groups: dict[tuple[int, int | bytes], dict[_Vm, float]] = {}
        # The same memberships, (VLAN, group, member), in the order they end.
        self._memberships: OrderedDict[tuple[int, int | bytes, _Vm], float] = OrderedDict()
        # Their source filters, where not ANY_SOURCE.
        self._filters: dict[tuple[int, int | bytes, _Vm], Filter] = {}
        # VLAN -> router port (a trusted member that sent a query) -> until when.
        self._mrouters: dict[int, dict[_Vm, float]] = {}
        # VLAN -> (when snooping may hold traffic back on it, until when a
        # querier is known on it): see _querier_heard.
        self._queriers: dict[int, tuple[float, float]] = {}
        # Members whose report the switch could not take -> until when they get every group.
        self._mcast_all: dict[_Vm, float] = {}
        self._querier = False  # send IGMP and MLD queries (set_mcast_querier)
        self._next_query = 0.0
        self._startup_queries = 0  # queries left to send a quarter interval apart
        # The querier's source MAC: locally administered, this process's own.
        mac = bytes([0x02 | (os.urandom(1)[0] & 0xFC)]) + os.urandom(5)
        # The querier's IGMP and MLD general queries, from that MAC.
        self._queries = (igmp_query(mac), mld_query(mac))
        self._buf = bytearray(_BUF_LEN)
        self._view = memoryview(self._buf)
        self._ctl: socket.socket | None = None
        self._next_sweep = 0.0
        self.stopped = False
        self.stats = SwitchStats()

    # -- configuration -------------------------------------------------------

    def _vm(self, vm_id: str) -> _Vm:
        vm = self._vms.get(vm_id)
        if vm is None:
            if not isinstance(vm_id, str) or not vm_id:
                raise UsageError(f"bad VM id {vm_id!r}")
            if len(self._vms) >= MAX_VMS:
                raise UsageError(f"switch serves at most {MAX_VMS} VMs")
            vm = self._vms[vm_id] = _Vm(vm_id)
        return vm

    def attach(self, vm_id: str, pair: int, sock: socket.socket) -> None:
        """Join ``sock`` (the switch's end of a SEQPACKET pair) as ``(vm_id, pair)``."""
        self._attach(vm_id, pair, sock, -1)

    def attach_tap(self, name: str, fd: int) -> None:
        """Join a tap queue fd (vnet header on) as the one-pair member ``name``.

        This is the uplink to the host: frames for MACs behind the tap go to
        it, floods reach it, and what the host sends comes in like any VM's
        frames.  The switch owns ``fd``; one given again for ``name`` replaces
        the old one (the tap was deleted and is back).
        """
        vm = self._vms.get(name)
        old = None if vm is None else vm.ports.get(0)
        if old is not None and old.sock is None:
            self._close_port(old)
        self._attach(name, 0, None, fd)

    def _attach(self, vm_id: str, pair: int, sock: socket.socket | None, fd: int) -> None:
        if not isinstance(pair, int) or not 0 <= pair < MAX_PAIRS_PER_VM:
            raise UsageError(f"queue pair {pair!r} out of range 0..{MAX_PAIRS_PER_VM - 1}")
        vm = self._vm(vm_id)
        if pair in vm.ports:
            raise UsageError(f"VM {vm_id!r} pair {pair} is already attached")
        if sock is not None:
            sock.setblocking(False)
        else:
            os.set_blocking(fd, False)
        port = _Port(vm, pair, sock, fd)
        vm.ports[pair] = port
        vm.refresh()
        if self._mcast and len(vm.ports) == 1:
            # A new member (or one back after a restart) may listen to groups
            # it reported before: it gets every group until it has answered
            # the switch's query, or would have answered a router's.
            wait = 1.0 + RESPONSE_S if self._querier else MEMBERSHIP_S
            self._mcast_all[vm] = self._clock() + wait
            if self._querier:
                self._query_soon()
        self._by_fd[port.fd] = port
        self._ep.register(port.fd, select.EPOLLIN)

    def open_queue(self, vm_id: str, pair: int) -> SocketQueue:
        """Create the socketpair of ``(vm_id, pair)``; returns the worker's end."""
        mine, theirs = _socketpair()
        try:
            self.attach(vm_id, pair, mine)
        except BaseException:
            mine.close()
            theirs.close()
            raise
        return SocketQueue(theirs)

    def set_active_pairs(self, vm_id: str, n: int) -> None:
        """Pairs ``0..n-1`` of the VM take rx (virtio ``VQ_PAIRS_SET``)."""
        if not isinstance(n, int) or not 1 <= n <= MAX_PAIRS_PER_VM:
            raise UsageError(f"active pairs {n!r} out of range 1..{MAX_PAIRS_PER_VM}")
        vm = self._vm(vm_id)
        vm.active = n
        vm.refresh()

    def set_vlans(self, vm_id: str, vlans: Iterable[int]) -> None:
        """The VLANs the VM is a member of (0 = untagged)."""
        self._held = None
        vs = frozenset(vlans)
        if not vs or any(not isinstance(v, int) or not 0 <= v <= VLAN_MAX for v in vs):
            raise UsageError(f"bad VLAN set {sorted(vs)!r} (ids 0..{VLAN_MAX}, at least one)")
        self._vm(vm_id).vlans = vs

    def set_macs(self, vm_id: str, macs: Iterable[bytes] | None) -> None:
        """Lock the VM to these source MACs (None: unlock); see port security."""
        self._held = None
        vm = self._vm(vm_id)
        new = None if macs is None else frozenset(macs)
        if new is not None and (not new or any(len(m) != 6 or m[0] & 1 for m in new)):
            raise UsageError(f"bad MAC set for {vm_id!r}: unicast 6-byte MACs, at least one")
        taken = {m for m in new or () if self._locked.get(m, vm) is not vm}
        if taken:
            raise UsageError(f"MAC {', '.join(mac_text(m) for m in sorted(taken))} belongs to"
                             " another VM")  # fmt: skip
        for m in vm.macs or ():
            del self._locked[m]
        vm.macs = new
        for m in new or ():
            self._locked[m] = vm
        # Forget what the VM (or anyone) taught the table that the lock now forbids.
        for k in [k for k, (v, _t) in self._macs.items()
                  if (k[1] in self._locked and self._locked[k[1]] is not v)
                  or (v.macs is not None and k[1] not in v.macs)]:  # fmt: skip
            self._macs.pop(k)[0].learnt -= 1

    def set_ips(self, vm_id: str, ips: Iterable[bytes] | None) -> None:
        """Lock the VM to these source IP addresses (4-byte IPv4, 16-byte IPv6;
        None: unlock); see IP source guard."""
        vm = self._vm(vm_id)
        new = None if ips is None else frozenset(ips)
        if new is not None and (
            not new or any(len(a) not in (4, 16) and a not in _LEARNING for a in new)
        ):
            raise UsageError(
                f"bad IP set for {vm_id!r}: IPv4 or IPv6 addresses, DHCP_LEARNING or"
                " SLAAC_LEARNING, at least one"
            )
        vm.ips = new
        vm.dhcp = new is not None and DHCP_LEARNING in new
        if not vm.dhcp:
            vm.leases.clear()
        vm.slaac = new is not None and SLAAC_LEARNING in new
        if new is not None and not vm.slaac:  # its SLAAC addresses are no longer its
            self._unbind(vm, [k for k in vm.bound if not _link_local(k[1])])
        self._refresh_ips(vm)
        self._count_learners()

    def _count_learners(self) -> None:
        """``_learners``: how many VMs learn addresses from DHCP or SLAAC
        (snooping is off, and costs a frame nothing, while there are none)."""
        self._learners = sum(v.dhcp or v.slaac for v in self._vms.values())

    def set_guards(self, vm_id: str, guards: Iterable[str]) -> None:
        """What the VM may not send (:class:`Guard` values; empty: anything):
        DHCP and DHCPv6 server messages, router advertisements and redirects.
        Such a frame is dropped and counted (``dropped_guard``)."""
        try:
            new = frozenset(Guard(g) for g in guards)
        except ValueError:
            raise UsageError(
                f"bad guards for {vm_id!r}: {', '.join(g.value for g in Guard)}"
            ) from None
        self._vm(vm_id).guard_bits = sum(_GUARD_BITS[g] for g in new)

    def set_rate(self, vm_id: str, bits_per_s: int | None) -> None:
        """Police what the VM sends to ``bits_per_s`` (None: no limit): a token
        bucket of :func:`rate_burst` bytes; a frame over it is dropped and
        counted (``dropped_rate``), so TCP backs off to the rate."""
        vm = self._vm(vm_id)
        if bits_per_s is None:
            vm.rate = 0.0
            return
        if not isinstance(bits_per_s, int) or not MIN_RATE_BPS <= bits_per_s <= MAX_RATE_BPS:
            raise UsageError(
                f"rate {bits_per_s!r} out of range {MIN_RATE_BPS}..{MAX_RATE_BPS} bit/s"
            )
        vm.rate = bits_per_s / 8
        vm.burst = vm.tokens = float(rate_burst(bits_per_s))
        vm.stamp = self._clock()

    def set_steering(self, vm_id: str, steering: Steering | None) -> None:
        """Let the VM's own :class:`~virtnet.steering.Steering` choose its rx pair.

        With it the switch feeds every frame the VM sends to ``note_tx`` and
        asks ``choose_rx`` where to deliver (RSS, rx-follows-tx, hash), so the
        guest's RSS configuration applies; a chosen pair with no open queue
        falls back to the hash over open active pairs.  The caller keeps the
        steering's pair count in step (``set_active_pairs`` too, for that
        fallback).  In-process switches only.  None = the switch's own tables.
        """
        self._vm(vm_id).steering = steering

    def set_rx_offloads(self, vm_id: str, offloads: Iterable[Offload]) -> None:
        """What the VM's guest accepts on rx (its negotiated GUEST_CSUM/TSO4/TSO6/ECN)."""
        self._vm(vm_id).rx_offloads = frozenset(offloads)

    def set_neigh_suppress(self, on: bool) -> None:
        """Neighbour suppression (Linux bridge's ``neigh_suppress``, an ARP
        responder): an ARP request or neighbour solicitation for an address
        of a VM held to one MAC and to its addresses (``set_macs``,
        ``set_ips``: static, leased, or bound to it first come first served)
        is answered by the switch on that VM's behalf, to the asker alone,
        instead of being flooded to every VM of the VLAN."""
        self._suppress = bool(on)

    def set_mcast_snoop(self, on: bool) -> None:
        """IGMP and MLD snooping (RFC 4541): a multicast group's traffic
        goes to the members that reported it and to router ports, not to
        every VM of the VLAN (see the module's invariants).  Off (the
        default) forgets every membership: all multicast floods again."""
        self._mcast = bool(on)
        if not self._mcast:
            self._querier = False
            for vm in self._vms.values():
                vm.groups.clear()
            self._groups.clear()
            self._memberships.clear()
            self._filters.clear()
            self._mrouters.clear()
            self._queriers.clear()
            self._mcast_all.clear()

    def set_mcast_querier(self, on: bool) -> None:
        """Be the IGMP and MLD querier (Linux bridge's ``multicast_querier``;
        on turns snooping on too): on every VLAN where no member sent a query
        in the last :data:`~virtnet.ports.mcast.OTHER_QUERIER_S`, the switch
        sends general queries to every member, a second after it starts or a
        VM joins, :data:`~virtnet.ports.mcast.STARTUP_QUERIES` times a quarter
        interval apart, then every
        :data:`~virtnet.ports.mcast.QUERY_INTERVAL_S`.  Reports are then sent
        to router ports alone, never flooded."""
        self._querier = bool(on)
        if self._querier:
            self.set_mcast_snoop(True)
            self._query_soon()

    def _query_soon(self) -> None:
        """Send the startup queries, the first in a second."""
        self._startup_queries = STARTUP_QUERIES
        self._next_query = self._clock() + 1.0
        self._next_sweep = min(self._next_sweep, self._next_query)

    def remove_vm(self, vm_id: str) -> None:
        """Close every socket of the VM and forget what was learnt about it."""
        self._held = None
        vm = self._vms.pop(vm_id, None)
        if vm is None:
            return
        self._leave_groups(vm, list(vm.groups))
        for routers in self._mrouters.values():
            routers.pop(vm, None)
        self._mcast_all.pop(vm, None)
        for m in vm.macs or ():
            del self._locked[m]
        for port in list(vm.ports.values()):
            self._close_port(port)
        for k in [k for k, (v, _t) in self._macs.items() if v is vm]:
            del self._macs[k]
        for fk in [fk for fk in self._flows if fk[0] == vm_id]:
            del self._flows[fk]
        for key in vm.bound:
            del self._bindings[key]
        self._count_learners()

    def add_control(self, sock: socket.socket) -> None:
        """Accept control messages (see :class:`SwitchPort`) on ``sock``."""
        sock.setblocking(False)
        self._ctl = sock
        self._ep.register(sock.fileno(), select.EPOLLIN)

    def snapshot(self) -> SwitchStats:
        """Counters, with per-port counters under ``ports['vm/pair']``, each
        VM's DHCP leases (dotted quads) under ``leases['vm']``, the SLAAC
        addresses bound to each VM that learns them under ``slaac['vm']``, and
        the SLAAC prefixes learnt under ``prefixes``."""
        self.stats.ports = {
            f"{vm.id}/{p}": port.counters()
            for vm in self._vms.values()
            for p, port in vm.ports.items()
        }
        self.stats.leases = {
            vm.id: [
                str(ipaddress.ip_address(a))
                for a in sorted(vm.leases, key=lambda a: (isinstance(a, bytes), a))
            ]
            for vm in self._vms.values()
            if vm.leases
        }
        self.stats.slaac = {
            vm.id: [str(ipaddress.IPv6Address(a)) for _v, a in sorted(vm.bound)
                    if not _link_local(a)]
            for vm in self._vms.values()
            if vm.slaac and any(not _link_local(a) for _v, a in vm.bound)
        }  # fmt: skip
        self.stats.prefixes = [
            f"{ipaddress.IPv6Address(pfx + bytes(8))}/64" + _on_vlan(vlan)
            for vlan, pfxs in sorted(self._prefixes.items())
            for pfx in sorted(pfxs)
        ]
        self.stats.groups = {
            vm.id: [_group_text(vlan, g, self._filters.get((vlan, g, vm))) for vlan, g in
                    sorted(vm.groups, key=lambda k: (k[0], isinstance(k[1], bytes), k[1]))]
            for vm in self._vms.values()
            if vm.groups
        }  # fmt: skip
        self.stats.on = [
            name
            for name, on in (("neigh_suppress", self._suppress), ("mcast_snoop", self._mcast),
                             ("mcast_querier", self._querier))
            if on
        ]  # fmt: skip
        self.stats.mrouters = [
            vm.id + _on_vlan(vlan)
            for vlan, routers in sorted(self._mrouters.items())
            for vm in routers
        ]
        return self.stats

    def mac_table_len(self) -> int:
        return len(self._macs)

    def flow_table_len(self) -> int:
        return len(self._flows)

    def close(self) -> None:
        for vm_id in list(self._vms):
            self.remove_vm(vm_id)
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None
        self._ep.close()

    def _close_port(self, port: _Port) -> None:
        if self._by_fd.pop(port.fd, None) is not None:
            with contextlib.suppress(OSError):
                self._ep.unregister(port.fd)
        port.vm.ports.pop(port.pair, None)
        port.vm.refresh()
        port.close()

    # -- the loop ----------------------------------------------------------

    def run_forever(self, stop_event: _StopEvent | None = None) -> None:
        """Poll until ``stop_event`` is set or the control socket closes."""
        while not self.stopped and (stop_event is None or not stop_event.is_set()):
            self.poll_once(POLL_INTERVAL_S)

    def poll_once(self, timeout: float | None = 0.0) -> int:
        """Wait up to ``timeout`` s (None = forever) and forward what is ready.

        Returns the number of frames read from workers.
        """
        events = self._ep.poll(-1 if timeout is None else timeout, MAX_EVENTS)
        now = self._clock()
        frames = 0
        ctl = self._ctl
        for fd, ev in events:
            if ctl is not None and fd == ctl.fileno():
                self._control(ev)
                continue
            port = self._by_fd.get(fd)
            if port is not None:
                frames += self._drain(port, ev, now)
        if now >= self._next_sweep:
            self._sweep(now)
        return frames

    def _drain(self, port: _Port, ev: int, now: float) -> int:
        buf = self._buf
        if port.sock is not None:
            recv_into = port.sock.recv_into
            trunc = _MSG_TRUNC

            def recv() -> int:
                return recv_into(buf, 0, trunc)
        else:
            readv = os.readv
            iov = [buf]
            fd = port.fd

            def recv() -> int:
                return readv(fd, iov)

        stats = self.stats
        got = 0
        for _ in range(SWITCH_BATCH):
            try:
                n = recv()
            except BlockingIOError:
                break
            except OSError:
                self._close_port(port)
                break
            if n == 0 and ev & select.EPOLLHUP:
                self._close_port(port)
                break
            got += 1
            stats.frames_in += 1
            if n < _MIN_FRAME or n > _BUF_LEN:
                stats.dropped_bad_frame += 1
                port.rx_dropped += 1
                continue
            port.rx_packets += 1
            port.rx_bytes += n - VNET_HDR_LEN
            self._forward(port, n, now)
        return got

    def _forward(self, src: _Port, n: int, now: float) -> None:
        buf = self._buf
        stats = self.stats
        if buf[_E + 6] & 1:  # multicast source MAC
            stats.dropped_bad_frame += 1
            src.rx_dropped += 1
            return
        vlan = 0
        et_off = _E + 12  # the EtherType
        if buf[_E + 12] == 0x81 and buf[_E + 13] == 0x00:
            et_off = _E + 16
            if n < _MIN_FRAME + 4:
                stats.dropped_bad_frame += 1
                src.rx_dropped += 1
                return
            vlan = ((buf[_E + 14] << 8) | buf[_E + 15]) & 0x0FFF
        svm = src.vm
        if svm.rate:
            tokens = min(svm.burst, svm.tokens + (now - svm.stamp) * svm.rate)
            svm.stamp = now
            size = n - VNET_HDR_LEN
            if tokens < size:
                svm.tokens = tokens
                stats.dropped_rate += 1
                src.rx_dropped += 1
                return
            svm.tokens = tokens - size
        if vlan not in svm.vlans:
            stats.dropped_vlan += 1
            src.rx_dropped += 1
            return
        smac = bytes(buf[_E + 6 : _E + 12])
        l3: _L3 | None = None  # the frame parsed (_l3) when a check first needs it
        if self._locked:
            owner = self._locked.get(smac)
            if (owner is not None and owner is not svm) or (
                svm.macs is not None
                and (
                    smac not in svm.macs
                    # ARP (0x0806) and IPv6 (0x86DD) name MACs inside: a look at
                    # the EtherType's low byte spares every other frame a call.
                    or (
                        buf[et_off + 1] in _LLADDR_ET_LOW
                        and not _lladdr_ok(buf, n, l3 := _l3(buf, n, et_off), svm.macs)
                    )
                )
            ):
                stats.dropped_spoofed += 1
                src.rx_dropped += 1
                return
        if svm.ips is not None:
            claims = self._claims
            if l3 is None:
                l3 = _l3(buf, n, et_off)
            pfxs = self._prefixes.get(vlan) if svm.slaac else None
            if not _ip_source_ok(buf, n, l3, svm.ips4, svm.ips6, claims, pfxs) or (
                claims and not self._claim_addresses(svm, vlan, claims, now)
            ):
                claims.clear()
                stats.dropped_spoofed += 1
                src.rx_dropped += 1
                return
            claims.clear()
        elif (
            buf[et_off] == 0x86
            and buf[et_off + 1] == 0xDD
            and n >= et_off + 42
            and (
                (buf[et_off + 10] == 0xFE and buf[et_off + 11] & 0xC0 == 0x80)
                or (
                    self._prefixes
                    and bytes(buf[et_off + 10 : et_off + 18]) in self._prefixes.get(vlan, ())
                )
            )
        ):
            # A member not held to its addresses (trusted) uses a link-local
            # or SLAAC source: it is that member's, whoever claimed it before.
            self._bind_address(svm, (vlan, bytes(buf[et_off + 10 : et_off + 26])), now)
        if svm.guard_bits:
            if l3 is None:
                l3 = _l3(buf, n, et_off)
            if not _guards_ok(buf, n, l3, svm.guard_bits):
                stats.dropped_guard += 1
                src.rx_dropped += 1
                return
        if self._learners and svm.ips is None:
            l3 = l3 or _l3(buf, n, et_off)
            if l3[0] == _ETH_IPV4:
                if not svm.guard_bits & _GUARD_DHCP:
                    self._snoop_dhcp(buf, n, l3, vlan, now)
            elif l3[2] == _ICMPV6:
                if not svm.guard_bits & _GUARD_ROUTER:
                    self._snoop_ra(buf, n, l3, vlan, now)
            elif l3[2] == _UDP and l3[3] >= 0 and not svm.guard_bits & _GUARD_DHCP:
                self._snoop_dhcp6(buf, n, l3, vlan, now)
        macs = self._macs
        key = (vlan, smac)
        had = macs.get(key)
        if had is not None and had[0] is svm:
            if now - had[1] > _RENEW_S:
                macs[key] = (svm, now)
                macs.move_to_end(key)
        else:
            self._learn(svm, key, had, now)
        view = self._view[:n]
        fid = flow_id(view)
        if svm.steering is not None:
            svm.steering.note_tx(view[_E:], src.pair, now)
        else:
            flows = self._flows
            fkey = (svm.id, fid)
            fent = flows.get(fkey)
            if fent is None or fent[0] != src.pair or now - fent[1] > _RENEW_S:
                flows[fkey] = (src.pair, now)
                flows.move_to_end(fkey)
                if len(flows) > FLOW_TABLE_SIZE:
                    flows.popitem(last=False)
                    stats.flow_evictions += 1
        if self._suppress and buf[_E] & 1 and self._answer(svm, vlan, n, et_off, l3, now):
            return
        need = _NO_OFFLOAD if not (buf[0] | buf[1]) else _needed_offloads(buf[0], buf[1])
        if (
            self._mcast
            and buf[_E] & 1
            and (buf[_E] == buf[_E + 1] == 0x33 or buf[_E : _E + 3] == b"\x01\x00\x5e")
            and self._mcast_forward(src, vlan, n, l3 or _l3(buf, n, et_off), fid, now, need)
        ):
            return
        if not buf[_E] & 1:
            dmac = bytes(buf[_E : _E + 6])
            owner = self._locked.get(dmac) if self._locked else None
            if owner is not None and vlan in owner.vlans:
                ent: tuple[_Vm, float] | None = (owner, now)  # a locked MAC is always known
            else:
                ent = macs.get((vlan, dmac))
            if ent is not None and now - ent[1] <= MAC_AGING_S:
                dvm = ent[0]
                if dvm is svm:
                    stats.filtered += 1  # destination behind the source: never reflect
                    return
                if self._vms.get(dvm.id) is not dvm:
                    stats.dropped_unknown_vm += 1
                    return
                self._deliver(dvm, view, fid, now, need)
                return
        stats.flooded += 1
        for dvm in self._vms.values():
            if dvm is not svm and vlan in dvm.vlans:
                self._deliver(dvm, view, fid, now, need)

    def _mcast_forward(
        self, src: _Port, vlan: int, n: int, l3: _L3, fid: int, now: float, need: frozenset[Offload]
    ) -> bool:
        """IGMP and MLD snooping of the IP multicast frame ``src`` sent:
        whether it was sent here, to a group's members and router ports or
        (a report) to router ports; False: it is flooded."""
        buf = self._buf
        svm = src.vm
        et, p, proto, u = l3
        if u == _MALFORMED:
            return False
        try:
            msg = membership(buf, n, et, p, proto, u)
        except MembershipError:
            self._refuse_report(svm, now)
            return False
        out: dict[_Vm, None] = {}
        if msg is not None:
            if msg.kind != REPORT:  # a query, PIM hello or MRD advertisement
                if svm.ips is None:  # a trusted member: a router port
                    self._mrouters.setdefault(vlan, {})[svm] = now + OTHER_QUERIER_S
                    if msg.kind == QUERY:
                        self._querier_heard(vlan, now, msg.response_s)
                return False  # for every host on the link
            self._membership(src, vlan, msg.records, now)
        elif et not in (_ETH_IPV4, _ETH_IPV6):
            return False  # not IP: no group to look up
        else:
            q = self._queriers.get(vlan)
            if q is None or not q[0] <= now < q[1]:
                return False  # no querier (yet): memberships may be missing
            source: int | bytes
            if et == _ETH_IPV4:
                group, source = _U32.unpack_from(buf, p + 16)[0], _U32.unpack_from(buf, p + 12)[0]
            else:
                group, source = bytes(buf[p + 24 : p + 40]), bytes(buf[p + 8 : p + 24])
            members = self._groups.get((vlan, group))
            if members is None or flooded_group(group):
                return False
            live = [m for m, end in members.items() if end > now]
            if not live:
                return False  # every membership has lapsed: unreported again
            filters = self._filters
            out = dict.fromkeys(m for m in live if admits(filters.get((vlan, group, m)), source))
            out.update((m, None) for m, end in self._mcast_all.items() if end > now)
        # Reports go to router ports alone (RFC 4541 section 2.1.1), lest
        # IGMPv1/v2 and MLDv1 hosts hear each other and stay silent.
        out.update((m, None) for m, end in self._mrouters.get(vlan, {}).items() if end > now)
        if msg is not None and not out and self._queriers.get(vlan, (0.0, 0.0))[1] <= now:
            return False  # no querier: no host holds back its report for hearing another's
        self.stats.mcast_forwarded += 1
        view = self._view[:n]
        for dvm in out:
            if dvm is not svm and vlan in dvm.vlans:
                self._deliver(dvm, view, fid, now, need)
        return True

    def _refuse_report(self, vm: _Vm, now: float) -> None:
        """A report of ``vm`` the switch could not take: counted, and ``vm``
        gets every group until a membership it reported would have ended."""
        self.stats.mcast_refused += 1
        self._mcast_all[vm] = now + MEMBERSHIP_S

    def _querier_heard(self, vlan: int, now: float, response_s: float = RESPONSE_S) -> None:
        """A query was sent on ``vlan`` (by a router port or the switch),
        which hosts answer within ``response_s``: snooping holds traffic back
        there from that long after the first one (at most OTHER_QUERIER_S),
        when every host has answered, until OTHER_QUERIER_S after the last."""
        q = self._queriers.get(vlan)
        start = q[0] if q is not None and q[1] > now else now + min(response_s, OTHER_QUERIER_S)
        self._queriers[vlan] = (start, now + OTHER_QUERIER_S)

    def _membership(self, src: _Port, vlan: int, records: list[Record], now: float) -> None:
        """Take the group records of a report ``src`` sent on ``vlan``.

        A VM is one host: its records set its filter, and a leave ends its
        membership at once.  Behind an uplink there may be many: a record
        that joins makes it a member for any source, and leaves are left to
        age (another host may still listen)."""
        vm = src.vm
        order = self._memberships
        filters = self._filters
        for group, rtype, sources in records:
            if flooded_group(group):
                continue
            key, fkey = (vlan, group), (vlan, group, vm)
            member = key in vm.groups
            if src.sock is None:
                if after_record(None, rtype, sources) is None:
                    continue
                new: Filter | None = ANY_SOURCE
            else:
                cur = filters.get(fkey, ANY_SOURCE) if member else None
                new = after_record(cur, rtype, sources)
            if new is None:
                if member:
                    self._leave_groups(vm, [key])
                continue
            if not member:
                if len(vm.groups) >= MCAST_GROUPS_PER_VM:
                    self._refuse_report(vm, now)
                    continue
                vm.groups.add(key)
            self._groups.setdefault(key, {})[vm] = order[fkey] = now + MEMBERSHIP_S
            order.move_to_end(fkey)
            if new == ANY_SOURCE:
                filters.pop(fkey, None)
            else:
                filters[fkey] = new
            self.stats.mcast_joined += 1

    def _leave_groups(self, vm: _Vm, keys: Iterable[tuple[int, int | bytes]]) -> None:
        """End these memberships of ``vm``."""
        for key in keys:
            vm.groups.discard(key)
            members = self._groups.get(key)
            if members is not None and members.pop(vm, None) is not None:
                del self._memberships[(key[0], key[1], vm)]
                self._filters.pop((key[0], key[1], vm), None)
                if not members:
                    del self._groups[key]

    def _refresh_ips(self, vm: _Vm) -> None:
        vm.refresh_ips()
        self._held = None

    def _holder(self, vlan: int, addr: int | bytes) -> _Vm | None:
        """The VM on ``vlan`` held to one MAC and to ``addr`` (IPv4 as an int,
        IPv6 packed) among its addresses (static, leased, or bound to it)."""
        if isinstance(addr, bytes):
            ent = self._bindings.get((vlan, addr))
            if ent is not None and ent[0].ips is not None:
                return ent[0] if _answerable(ent[0]) else None
        held = self._held
        if held is None:
            held = self._held = {}
            for vm in self._vms.values():
                if _answerable(vm):
                    held.update(dict.fromkeys(vm.ips4, vm))
                    held.update(dict.fromkeys(vm.ips6, vm))
        owner = held.get(addr)
        return owner if owner is not None and vlan in owner.vlans else None

    def _answer(self, svm: _Vm, vlan: int, n: int, et_off: int, l3: _L3 | None, now: float) -> bool:
        """Neighbour suppression: whether the multicast frame ``svm`` sent is
        an ARP request or neighbour solicitation the switch answered itself,
        to ``svm`` alone, on behalf of the VM holding the address."""
        buf = self._buf
        et = buf[et_off] << 8 | buf[et_off + 1]
        p = et_off + 2
        if et == _ETH_ARP:
            if n < p + 28 or buf[p : p + 8] != _ARP_ETH_IPV4:
                return False
            tpa = _U32.unpack_from(buf, p + 24)[0]
            if tpa == _U32.unpack_from(buf, p + 14)[0]:
                return False  # a gratuitous ARP: news for everyone
            owner = self._holder(vlan, tpa)
            if owner is None or owner is svm:
                return False
            assert owner.macs is not None
            (omac,) = owner.macs
            body = arp_reply(self._view[p : p + 28], omac)
        elif et == _ETH_IPV6:
            nh, u = (l3 or _l3(buf, n, et_off))[2:]
            if nh != _ICMPV6 or u < 0 or n < u + 24 or buf[u] != _ND_NS or buf[u + 1]:
                return False
            src = bytes(buf[p + 8 : p + 24])
            if buf[p + 7] != 255 or src == _IPV6_ANY:
                return False  # not from the link; duplicate address detection
            target = bytes(buf[u + 8 : u + 24])
            owner = self._holder(vlan, target)
            if owner is None or owner is svm:
                return False
            assert owner.macs is not None
            (omac,) = owner.macs
            body = na_reply(target, src, target, omac)
        else:
            return False
        head = bytes(VNET_HDR_LEN) + bytes(buf[_E + 6 : _E + 12]) + omac
        frame = memoryview(head + bytes(buf[_E + 12 : et_off + 2]) + body)
        self.stats.neigh_suppressed += 1
        self._deliver(svm, frame, flow_id(frame), now, _NO_OFFLOAD)
        return True

    def _deliver(
        self,
        vm: _Vm,
        view: memoryview,
        fid: int,
        now: float,
        need: frozenset[Offload],
    ) -> None:
        stats = self.stats
        if need and not need <= vm.rx_offloads:
            stats.dropped_offload += 1
            return
        ports = vm.ports
        port: _Port | None = None
        steering = vm.steering
        if steering is not None:
            port = ports.get(steering.choose_rx(view[_E:], now)[0])
        else:
            ent = self._flows.get((vm.id, fid))
            if ent is not None and ent[0] < vm.active and now - ent[1] <= FLOW_AGING_S:
                port = ports.get(ent[0])
        if port is None:
            cands = vm.rx_ports
            if not cands:
                stats.dropped_no_queue += 1
                return
            port = cands[spread(fid) % len(cands)]
        try:
            port.send(view)
        except BlockingIOError:
            stats.dropped_full += 1
            port.tx_dropped += 1
            return
        except OSError:
            stats.dropped_unknown_vm += 1
            port.tx_dropped += 1
            return
        stats.frames_out += 1
        port.tx_packets += 1
        port.tx_bytes += len(view) - VNET_HDR_LEN

    def _learn(
        self, vm: _Vm, key: tuple[int, bytes], ent: tuple[_Vm, float] | None, now: float
    ) -> None:
        """Learn that (VLAN, MAC) ``key`` is behind ``vm`` (``ent``: where the
        table had it), unless ``vm`` already taught the table MACS_PER_VM MACs."""
        if vm.learnt >= MACS_PER_VM:
            self.stats.macs_unlearnt += 1
            return
        macs = self._macs
        if ent is not None:
            ent[0].learnt -= 1  # the MAC moved
            del macs[key]
        macs[key] = (vm, now)
        vm.learnt += 1
        if len(macs) > MAC_TABLE_SIZE:
            _k, (owner, _t) = macs.popitem(last=False)
            owner.learnt -= 1
            self.stats.mac_evictions += 1

    def _snoop_dhcp(self, buf: bytearray, n: int, l3: _L3, vlan: int, now: float) -> None:
        """DHCP snooping: a DHCPACK from a trusted server (a member under
        neither the IP source guard nor the DHCP guard) lets the VM it names
        by MAC send from the leased address, if that VM learns from DHCP."""
        et, _p, proto, u = l3
        if et != _ETH_IPV4 or proto != _UDP or u < 0 or n < u + 4:
            return
        if (buf[u] << 8 | buf[u + 1]) != _DHCP_SERVER:
            return
        ack = dhcp_ack(buf, n, u)
        if ack is None:
            return
        chaddr, addr, seconds = ack
        vm = self._dhcp_client(chaddr, vlan)
        if vm is not None:
            self._lease(vm, addr, seconds, now)
            self._refresh_ips(vm)

    def _dhcp_client(self, mac: bytes, vlan: int) -> _Vm | None:
        """The VM behind ``mac`` on ``vlan`` (locked to it, or learnt), if it
        learns its addresses from DHCP."""
        vm = self._locked.get(mac)
        if vm is None:
            ent = self._macs.get((vlan, mac))
            vm = ent[0] if ent is not None else None
        if vm is None or not vm.dhcp or vlan not in vm.vlans:
            return None
        return vm

    def _lease(self, vm: _Vm, addr: int | bytes, seconds: int, now: float) -> None:
        """Let ``vm`` send from ``addr`` (IPv4 as an int, IPv6 packed) for
        ``seconds`` (at most LEASE_MAX_S; 0: no longer), unless another VM is
        held to it or ``vm`` holds LEASES_PER_VM leases; the caller refreshes
        ``vm``'s addresses."""
        if not seconds:
            vm.leases.pop(addr, None)
            return
        taken = any(
            addr in (v.ips4 if isinstance(addr, int) else v.ips6)
            for v in self._vms.values()
            if v is not vm and v.ips is not None
        )
        if taken or (addr not in vm.leases and len(vm.leases) >= LEASES_PER_VM):
            self.stats.leases_refused += 1
            return
        vm.leases[addr] = now + min(seconds, LEASE_MAX_S)
        self.stats.leases_learnt += 1

    def _snoop_dhcp6(self, buf: bytearray, n: int, l3: _L3, vlan: int, now: float) -> None:
        """DHCPv6 snooping: the addresses a Reply from a trusted server (a
        member under neither the IP source guard nor the DHCP guard) assigns
        may be sent from by the VM it is sent to (by destination MAC: a server
        or relay answers a client at its link-local address), if that VM
        learns from DHCP; a valid lifetime of 0 ends such a lease."""
        u = l3[3]
        if n < u + 4 or _PORTS.unpack_from(buf, u) != (_DHCP6_SERVER, _DHCP6_CLIENT):
            return
        vm = self._dhcp_client(bytes(buf[_E : _E + 6]), vlan)
        assigned = dhcp6_reply(buf, n, u) if vm is not None else None
        if vm is None or not assigned:
            return
        for addr, valid in assigned:
            self._lease(vm, addr, valid, now)
        self._refresh_ips(vm)

    def _snoop_ra(self, buf: bytearray, n: int, l3: _L3, vlan: int, now: float) -> None:
        """SLAAC learning: a router advertisement from a trusted router (a
        member under neither the IP source guard nor the router guard) offers
        its /64 prefixes for autoconfiguration on ``vlan``; VMs that learn
        SLAAC may then use addresses in them (:func:`_ip_source_ok`)."""
        offered = router_prefixes(buf, n, l3)
        if not offered:
            return
        pfxs = self._prefixes.setdefault(vlan, {})
        for prefix, valid in offered:
            end = now + min(valid, PREFIX_MAX_S)
            had = pfxs.get(prefix)
            if had is None:
                if not valid:
                    continue
                if len(pfxs) >= PREFIXES_PER_VLAN:
                    self.stats.prefixes_refused += 1
                    continue
                self.stats.prefixes_learnt += 1
            elif end < had:
                end = max(end, min(had, now + PREFIX_CUT_FLOOR_S))
            pfxs[prefix] = end
        if not pfxs:
            del self._prefixes[vlan]

    def _claim_addresses(self, vm: _Vm, vlan: int, addrs: list[bytes], now: float) -> bool:
        """First come, first served (RFC 6620) for a guarded VM: whether
        ``vm`` may use the link-local or SLAAC ``addrs`` on ``vlan``; each is
        then bound to it.  No when another member holds one (used within
        :data:`LL_AGING_S`), when a SLAAC one is another VM's by ``set_ips``,
        or when ``vm`` would hold more than :data:`LL_PER_VM`."""
        lls = self._bindings
        if len(addrs) == 1:  # the common case: one source address, already the VM's
            key = (vlan, addrs[0])
            ent = lls.get(key)
            if ent is not None and ent[0] is vm:
                self._bind_address(vm, key, now)
                return True
        for addr in addrs:
            ent = lls.get((vlan, addr))
            if ent is None:
                # A SLAAC address first used: not one another VM is held to.
                if not _link_local(addr) and any(
                    addr in v.ips6 for v in self._vms.values() if v is not vm
                ):
                    return False
            elif ent[0] is not vm and now - ent[1] <= LL_AGING_S:
                return False
        new = {(vlan, a) for a in addrs} - vm.bound
        if len(vm.bound) + len(new) > LL_PER_VM:
            self._expire_bindings(vm, now)
            if len(vm.bound) + len(new) > LL_PER_VM:
                return False
        for addr in addrs:
            self._bind_address(vm, (vlan, addr), now)
        return True

    def _bind_address(self, vm: _Vm, key: tuple[int, bytes], now: float) -> None:
        """Bind ``key`` (VLAN, link-local or SLAAC address) to ``vm``, used
        ``now`` (a binding already ``vm``'s is renewed at most every _RENEW_S)."""
        lls = self._bindings
        ent = lls.get(key)
        if ent is not None:
            if ent[0] is vm and now - ent[1] <= _RENEW_S:
                return
            ent[0].bound.discard(key)
        lls[key] = (vm, now)
        lls.move_to_end(key)
        vm.bound.add(key)
        if len(lls) > LL_TABLE_SIZE:
            old, (owner, _t) = lls.popitem(last=False)
            owner.bound.discard(old)

    def _expire_bindings(self, vm: _Vm, now: float) -> None:
        """Let go of ``vm``'s address bindings unused for LL_AGING_S."""
        lls = self._bindings
        self._unbind(vm, [k for k in vm.bound if now - lls[k][1] > LL_AGING_S])

    def _unbind(self, vm: _Vm, keys: Iterable[tuple[int, bytes]]) -> None:
        """Let go of these bindings of ``vm``."""
        for key in keys:
            del self._bindings[key]
            vm.bound.discard(key)

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + SWEEP_INTERVAL_S
        for vlan, pfxs in list(self._prefixes.items()):
            for prefix in [x for x, end in pfxs.items() if end <= now]:
                del pfxs[prefix]
            if not pfxs:
                del self._prefixes[vlan]
        if self._learners:
            for vm in self._vms.values():
                ended = [a for a, end in vm.leases.items() if end <= now]
                if ended:
                    for a in ended:
                        del vm.leases[a]
                    self._refresh_ips(vm)
        macs = self._macs
        while macs:
            k, (owner, t) = next(iter(macs.items()))
            if now - t <= MAC_AGING_S:
                break
            del macs[k]
            owner.learnt -= 1
        flows = self._flows
        while flows:
            fk, (_p, t) = next(iter(flows.items()))
            if now - t <= FLOW_AGING_S:
                break
            del flows[fk]
        if self._mcast:
            self._sweep_mcast(now)
            if self._querier and now >= self._next_query:
                self._query(now)
        lls = self._bindings
        while lls:
            key, (owner, t) = next(iter(lls.items()))
            if now - t <= LL_AGING_S:
                break
            del lls[key]
            owner.bound.discard(key)

    def _sweep_mcast(self, now: float) -> None:
        """End the memberships, router ports and every-group grants past their time."""
        order = self._memberships
        while order:
            (vlan, group, vm), end = next(iter(order.items()))
            if end > now:
                break
            self._leave_groups(vm, [(vlan, group)])
        for vlan, routers in list(self._mrouters.items()):
            for vm in [vm for vm, end in routers.items() if end <= now]:
                del routers[vm]
            if not routers:
                del self._mrouters[vlan]
        for vm in [vm for vm, end in self._mcast_all.items() if end <= now]:
            del self._mcast_all[vm]
        for vlan in [v for v, (_start, end) in self._queriers.items() if end <= now]:
            del self._queriers[vlan]

    def _query(self, now: float) -> None:
        """Send general queries on every VLAN no other querier asks on."""
        self._startup_queries = max(0, self._startup_queries - 1)
        self._next_query = now + QUERY_INTERVAL_S / (4 if self._startup_queries else 1)
        self._next_sweep = min(self._next_sweep, self._next_query)
        vlans = {v for vm in self._vms.values() for v in vm.vlans}
        for vlan in sorted(vlans - self._mrouters.keys()):
            self._querier_heard(vlan, now)
            tag = struct.pack("!HH", 0x8100, vlan) if vlan else b""
            for query in self._queries:
                frame = memoryview(bytes(VNET_HDR_LEN) + query[:12] + tag + query[12:])
                fid = flow_id(frame)
                self.stats.mcast_queries += 1
                for vm in list(self._vms.values()):
                    if vlan in vm.vlans:
                        self._deliver(vm, frame, fid, now, _NO_OFFLOAD)

    # -- control channel (process mode) ---------------------------------------

    def _control(self, ev: int) -> None:
        ctl = self._ctl
        assert ctl is not None
        fds_size = socket.CMSG_SPACE(4 * 4)
        while True:
            try:
                data, anc, flags, _ = ctl.recvmsg(CONTROL_MAX, fds_size)
            except BlockingIOError:
                return
            except OSError:
                data, anc, flags = b"", [], 0
            fds: list[int] = []
            for level, typ, cdata in anc:
                if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                    arr = array.array("i")
                    arr.frombytes(cdata[: len(cdata) - len(cdata) % arr.itemsize])
                    fds.extend(arr)
            if not data and not fds:
                # Supervisor gone: stop.
                self.stopped = True
                with contextlib.suppress(OSError):
                    self._ep.unregister(ctl.fileno())
                return
            try:
                if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                    raise ProtocolError("truncated control message")
                self._command(json.loads(data), fds)
            except (ProtocolError, UsageError, ValueError, TypeError, KeyError) as exc:
                self.stats.control_errors += 1
                for fd in fds:
                    os.close(fd)
                with contextlib.suppress(OSError):
                    ctl.send(json.dumps({"error": str(exc)}).encode())

    def _command(self, msg: Any, fds: list[int]) -> None:
        if not isinstance(msg, dict):
            raise ProtocolError("control message is not an object")
        op = msg.get("op")
        want_fds = 1 if op in {"attach", "attach_tap"} else 0
        if len(fds) != want_fds:
            raise ProtocolError(f"{op!r} carries {len(fds)} fds, expected {want_fds}")
        vm = msg.get("vm")
        if op not in {"stats", "stop"} and not isinstance(vm, str):
            raise ProtocolError("missing 'vm'")
        vm_id = str(vm)
        if op == "attach":
            sock = socket.socket(fileno=fds[0])
            try:
                if sock.type != socket.SOCK_SEQPACKET or sock.family != socket.AF_UNIX:
                    raise ProtocolError("attach needs an AF_UNIX SOCK_SEQPACKET socket")
                self.attach(vm_id, msg["pair"], sock)
            except BaseException:
                sock.detach()  # the caller closes the fd
                raise
        elif op == "attach_tap":
            if stat.S_ISSOCK(os.fstat(fds[0]).st_mode):
                raise ProtocolError("attach_tap needs a tap fd")
            self.attach_tap(vm_id, fds[0])
        elif op == "active":
            self.set_active_pairs(vm_id, msg["n"])
        elif op == "vlans":
            self.set_vlans(vm_id, msg["vlans"])
        elif op == "macs":
            self.set_macs(vm_id, _hex_list(msg, "macs", "MAC"))
        elif op == "ips":
            self.set_ips(vm_id, _hex_list(msg, "ips", "address"))
        elif op == "rate":
            self.set_rate(vm_id, msg["bps"])
        elif op == "guards":
            guards = msg["guards"]
            if not isinstance(guards, list) or not all(isinstance(g, str) for g in guards):
                raise ProtocolError("'guards' must be a list of strings")
            self.set_guards(vm_id, guards)
        elif op == "offloads":
            self.set_rx_offloads(vm_id, (Offload(o) for o in msg["offloads"]))
        elif op == "neigh_suppress":
            self.set_neigh_suppress(msg["on"] is True)
        elif op == "mcast_snoop":
            self.set_mcast_snoop(msg["on"] is True)
        elif op == "mcast_querier":
            self.set_mcast_querier(msg["on"] is True)
        elif op == "remove":
            self.remove_vm(vm_id)
        elif op == "stats":
            assert self._ctl is not None
            self._ctl.send(json.dumps(asdict(self.snapshot())).encode())
        elif op == "stop":
            self.stopped = True
        else:
            raise ProtocolError(f"unknown control op {op!r}")


def _hex_list(msg: dict[str, Any], key: str, what: str) -> list[bytes] | None:
    """A control message's list of hex strings (MACs, IP addresses) as bytes,
    or None for null; ProtocolError for anything else."""
    items = msg[key]
    if items is None:
        return None
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise ProtocolError(f"'{key}' must be a list of hex strings or null")
    try:
        return [bytes.fromhex(i) for i in items]
    except ValueError as exc:
        raise ProtocolError(f"bad {what} in {items!r}: {exc}") from None


def _serve_child(control_fd: int) -> int:
    serve(control_fd)
    return 0


def serve(control_fd: int) -> None:
    """Entry point of the switch process: run a switch controlled through ``control_fd``."""
    # Ctrl-C goes to the whole process group; the switch stops when its
    # supervisor closes the control socket instead.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sw = Switch()
    sw.add_control(socket.socket(fileno=control_fd))
    try:
        sw.run_forever()
    finally:
        sw.close()


class SwitchPort:
    """The supervisor's handle on a switch running in its own process.

    ``open_queue`` makes the socketpair here and hands the switch its end with
    ``SCM_RIGHTS``; the returned queue's fd is for the worker.  Configuration
    calls are one-way messages; ``stats`` waits for the answer.
    """

    def __init__(self) -> None:
        self._uplinks: list[tuple[str, TapPort]] = []
        #: The last configuration message of each kind per member, in the
        #: order they were last sent: what a restarted switch process is told.
        self._config: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()
        self.exitcode: int | None = None
        #: How often the switch process was started again (:meth:`restart`).
        self.restarts = 0
        self._pid: int | None = None
        self._returncode: int | None = None
        self._ctl = self._start()

    def _start(self) -> socket.socket:
        """Fork a switch process; the supervisor's end of its control socket."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        fd = theirs.fileno()
        try:
            self._pid = fork_child(functools.partial(_serve_child, fd), {fd}, "switch process")
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        self._returncode = None
        return mine

    def _reap(self, *, block: bool) -> int | None:
        """The switch process's exit code once it ended (negative: the signal
        that killed it), reaping it; None while it runs."""
        if self._pid is None or self._returncode is not None:
            return self._returncode
        try:
            pid, status = os.waitpid(self._pid, 0 if block else os.WNOHANG)
        except ChildProcessError:  # reaped by someone else: gone, status unknown
            self._returncode = -signal.SIGKILL
            return self._returncode
        if pid == 0:
            return None
        self._returncode = os.waitstatus_to_exitcode(status)
        return self._returncode

    def _end(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the switch process to exit, then SIGKILL it."""
        deadline = time.monotonic() + timeout
        while self._reap(block=False) is None:
            if time.monotonic() >= deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self._pid or 0, signal.SIGKILL)
                self._reap(block=True)
                break
            time.sleep(0.01)
        self.exitcode = self._returncode

    @property
    def control(self) -> socket.socket:
        """This end of the switch process's control socket: readable when an
        answer nobody waits for came (:meth:`drain_replies`) or the process died."""
        return self._ctl

    def drain_replies(self) -> None:
        """Read and drop what the switch process sent unasked: answers to a
        stats call that gave up waiting, errors about bad control messages."""
        with contextlib.suppress(OSError):
            while self._ctl.recv(1 << 20, socket.MSG_DONTWAIT):
                pass

    @property
    def pid(self) -> int | None:
        """The switch process's pid (None once closed)."""
        return self._pid

    def restart(self) -> None:
        """Start a new switch process in place of one that died and give it
        this port's configuration and uplinks again.

        The VMs' queues of the old process are dead: each VM's queues must be
        opened again (:meth:`~virtnet.vhost_user.supervisor.Supervisor.reopen_port`).
        The MAC and flow tables start empty, and the counters from zero.
        """
        self._end(0.0)
        self._ctl.close()
        self._ctl = self._start()
        self.restarts += 1
        for member, tap in self._uplinks:
            fd = tap.queue(0).fileno()
            assert fd is not None
            self._send({"op": "attach_tap", "vm": member}, fd)
        for msg in self._config.values():
            self._send(msg)

    def _send(self, msg: dict[str, Any], fd: int | None = None) -> None:
        data = json.dumps(msg).encode()
        anc = []
        if fd is not None:
            anc.append((socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes()))
        try:
            self._ctl.sendmsg([data], anc)
        except OSError as exc:
            raise UsageError(f"switch process is gone: {exc}") from exc

    def open_queue(self, vm_id: str, pair: int) -> PortQueue:
        if not isinstance(pair, int) or not 0 <= pair < MAX_PAIRS_PER_VM:
            raise UsageError(f"queue pair {pair!r} out of range 0..{MAX_PAIRS_PER_VM - 1}")
        mine, theirs = _socketpair()
        try:
            self._send({"op": "attach", "vm": vm_id, "pair": pair}, theirs.fileno())
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        return SocketQueue(mine)

    def add_uplink(self, ifname: str, *, name: str | None = None) -> TapPort:
        """Join the multiqueue tap ``ifname`` (created if missing, brought up) to the switch.

        The tap is a switch member called ``name`` (default ``uplink:IFNAME``);
        the returned :class:`TapPort` stays here (close it after the switch).
        """
        from virtnet.ports.tap import TapPort

        member = name or f"uplink:{ifname}"
        tap = TapPort(ifname, up=True)
        q = tap.open_queue(member, 0)
        fd = q.fileno()
        assert fd is not None
        self._send({"op": "attach_tap", "vm": member}, fd)
        self._uplinks.append((member, tap))
        return tap

    def reopen_uplink(self, tap: TapPort) -> None:
        """Give the switch a new queue of uplink ``tap`` after the interface
        was deleted: it is opened (created again, with its MAC, if this port
        had created it) and brought up, and replaces the dead one."""
        member = next(m for m, t in self._uplinks if t is tap)
        tap.drop_queues()
        fd = tap.open_queue(member, 0).fileno()
        assert fd is not None
        self._send({"op": "attach_tap", "vm": member}, fd)

    @property
    def uplinks(self) -> tuple[TapPort, ...]:
        """The taps joined with :meth:`add_uplink`."""
        return tuple(tap for _, tap in self._uplinks)

    def _configure(self, msg: dict[str, Any]) -> None:
        """Send a configuration message and keep it for a restarted process."""
        key = (str(msg["vm"]), str(msg["op"]))
        self._config[key] = msg
        self._config.move_to_end(key)
        try:
            self._send(msg)
        except UsageError:
            if self.running:
                raise
            # A dead switch process gets the message with the rest of the
            # configuration when it is started again.

    def set_active_pairs(self, vm_id: str, n: int) -> None:
        self._configure({"op": "active", "vm": vm_id, "n": n})

    def set_vlans(self, vm_id: str, vlans: Iterable[int]) -> None:
        self._configure({"op": "vlans", "vm": vm_id, "vlans": sorted(vlans)})

    def set_macs(self, vm_id: str, macs: Iterable[bytes] | None) -> None:
        """Lock the VM to these source MACs (see :meth:`Switch.set_macs`); a MAC
        another VM holds is refused by the switch process and counted as a
        control error, so check first (serve does)."""
        self._configure(
            {
                "op": "macs",
                "vm": vm_id,
                "macs": None if macs is None else sorted(m.hex() for m in macs),
            }
        )

    def set_ips(self, vm_id: str, ips: Iterable[bytes] | None) -> None:
        """IP source guard for the VM (see :meth:`Switch.set_ips`)."""
        self._configure(
            {"op": "ips", "vm": vm_id, "ips": None if ips is None else sorted(a.hex() for a in ips)}
        )

    def set_guards(self, vm_id: str, guards: Iterable[str]) -> None:
        """DHCP and router guards for the VM (see :meth:`Switch.set_guards`)."""
        self._configure({"op": "guards", "vm": vm_id, "guards": sorted(guards)})

    def set_rate(self, vm_id: str, bits_per_s: int | None) -> None:
        """Police what the VM sends (see :meth:`Switch.set_rate`)."""
        self._configure({"op": "rate", "vm": vm_id, "bps": bits_per_s})

    def set_neigh_suppress(self, on: bool) -> None:
        """Answer ARP and NS for held VMs (see :meth:`Switch.set_neigh_suppress`)."""
        self._configure({"op": "neigh_suppress", "vm": "", "on": on})

    def set_mcast_snoop(self, on: bool) -> None:
        """IGMP and MLD snooping (see :meth:`Switch.set_mcast_snoop`)."""
        self._configure({"op": "mcast_snoop", "vm": "", "on": on})

    def set_mcast_querier(self, on: bool) -> None:
        """Be the IGMP and MLD querier (see :meth:`Switch.set_mcast_querier`)."""
        self._configure({"op": "mcast_querier", "vm": "", "on": on})

    def set_rx_offloads(self, vm_id: str, offloads: Iterable[Offload]) -> None:
        self._configure(
            {"op": "offloads", "vm": vm_id, "offloads": sorted(o.value for o in offloads)}
        )

    def remove_vm(self, vm_id: str) -> None:
        for key in [k for k in self._config if k[0] == vm_id]:
            del self._config[key]
        if self.running:
            self._send({"op": "remove", "vm": vm_id})

    def stats(self, timeout: float = 5.0) -> dict[str, Any]:
        """The switch's :class:`SwitchStats` as a dict."""
        # A reply that came after an earlier call gave up waiting is stale:
        # drop it, or every later call would be one answer behind.
        self.drain_replies()
        self._send({"op": "stats"})
        self._ctl.settimeout(timeout)
        try:
            while True:
                reply = json.loads(self._ctl.recv(1 << 20))
                if "error" not in reply:
                    return dict(reply)
        except (OSError, ValueError) as exc:
            raise UsageError(f"switch process did not answer: {exc}") from exc
        finally:
            self._ctl.settimeout(None)

    def offloads(self) -> frozenset[Offload]:
        return frozenset(Offload)

    @property
    def running(self) -> bool:
        """Whether the switch process is alive."""
        return self._pid is not None and self._reap(block=False) is None

    def poll_exitcode(self) -> int | None:
        """The switch process's exit code (negative: the signal that killed
        it); None while it runs or once closed."""
        return None if self._pid is None else self._reap(block=False)

    def close(self) -> None:
        """Stop the switch process (it also stops if this process dies)."""
        if self._pid is None:
            return
        with contextlib.suppress(UsageError):  # a switch process that died
            self._send({"op": "stop"})
        self._ctl.close()
        self._end(5.0)
        self._pid = None
        for _, tap in self._uplinks:
            tap.close()
