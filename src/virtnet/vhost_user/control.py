"""``virtnet ctl``: add, remove and change VMs of a running ``virtnet serve``.

serve listens on ``--control-socket PATH`` (created mode 0600: whoever may
write it may plug VMs into serve's switch or taps).  One request per
connection, one JSON object on one line, at most :data:`MAX_REQUEST_BYTES`;
serve answers one JSON line and closes:

* ``{"op": "add", "socket": PATH, "vlans": [IDS]?, "tap": IFNAME?, "macs":
  ["52:54:00:12:34:56", ...]?, "ips": ["10.0.0.5", "fd00::5", ...]?, "rate":
  BPS?, "guards": ["dhcp", "router"]?}``: serve
  a new VM on ``PATH`` exactly as a ``--socket`` given at start (listen, or
  dial with ``--client``); ``vlans``: its switch VLANs (default: those of
  ``--vlans`` without ``VM=``); ``tap``: its tap with ``--port tap:...``
  (default: the ``%d`` template with the next index); ``macs``: lock it to
  these source MACs on the switch, as ``--mac`` does; ``ips``: to these
  source IP addresses, as ``--ip`` does; ``rate``: police what it sends to
  this many bit/s, as ``--rate`` does; ``guards``: ``["dhcp", "router"]`` or
  either, the servers it may not be, as ``--guard`` does (an ``ips`` entry
  ``"dhcp"``: its DHCP leases count too; ``"slaac"``: its SLAAC addresses).
  Answer ``{"ok": true, "name": NAME}``, NAME being what ``virtnet stats``
  shows.
* ``{"op": "remove", "name": NAME}``: stop serving that VM: its connection is
  closed (its workers stop), its socket file removed, its switch membership
  or tap dropped.  The guest sees its link go down.
* ``{"op": "set", "name": NAME, "vlans": [IDS]?, "macs": [MACS] | null?,
  "ips": [ADDRS] | null?, "rate": BPS | null?, "guards": [GUARDS]?}``: change
  a served VM's switch VLANs, MAC lock, IP source guard, rate (``null``: none)
  or DHCP and router guards (``[]``: none) while it runs.
  Answer ``{"ok": true}``.
* ``{"op": "switch", "neigh_suppress": BOOL?, "mcast_snoop": BOOL?,
  "mcast_querier": BOOL?}``: turn the switch's neighbour suppression, IGMP
  and MLD snooping, or querier on or off while it runs, as ``--neigh-suppress``,
  ``--mcast-snoop`` and ``--mcast-querier`` do at start (querier on turns
  snooping on; snooping off turns the querier off).  Answer ``{"ok": true}``.
* Failures: ``{"ok": false, "error": TEXT}``.

Invariants: a request that is not such an object (too long, not JSON, unknown
``op``, wrong types) raises :class:`~virtnet.errors.ProtocolError` while
parsing (:func:`parse_request`) and is answered with the error, changing
nothing; serve takes one request per loop tick and waits at most
:data:`TIMEOUT_S` for it, so a client that sends nothing delays serve's loop
by that much at most.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
from dataclasses import dataclass
from typing import Any

from virtnet.errors import ProtocolError, UsageError
from virtnet.ports.switch import (
    DHCP_LEARNING,
    MAX_RATE_BPS,
    MIN_RATE_BPS,
    SLAAC_LEARNING,
    VLAN_MAX,
    Guard,
)
from virtnet.vhost_user.stats import ask

__all__ = [
    "DEFAULT_CONTROL_SOCKET",
    "MAX_REQUEST_BYTES",
    "SWITCH_SETTINGS",
    "TIMEOUT_S",
    "AddVm",
    "RemoveVm",
    "SetSwitch",
    "SetVm",
    "add_arguments",
    "parse_guards",
    "parse_ips",
    "parse_macs",
    "parse_rate",
    "parse_request",
    "request",
    "run",
]

DEFAULT_CONTROL_SOCKET = "/run/virtnet/control.sock"
#: Longest request line accepted (a socket path is at most 108 bytes; 4094
#: VLAN ids as JSON stay far below this too).
MAX_REQUEST_BYTES = 64 * 1024
#: Seconds either side waits for the other.
TIMEOUT_S = 1.0
#: Longest Unix socket path (``sizeof(sockaddr_un.sun_path) - 1``, Linux).
MAX_SOCKET_PATH = 107


@dataclass(frozen=True)
class AddVm:
    socket: str
    vlans: frozenset[int] | None = None
    tap: str | None = None
    macs: frozenset[bytes] | None = None
    ips: frozenset[bytes] | None = None
    rate: int | None = None
    guards: frozenset[Guard] | None = None


@dataclass(frozen=True)
class SetSwitch:
    """Turn switch-wide settings on or off; None leaves one as it is."""

    neigh_suppress: bool | None = None
    mcast_snoop: bool | None = None
    mcast_querier: bool | None = None


#: The settings ``{"op": "switch"}`` changes (:class:`SetSwitch`'s fields).
SWITCH_SETTINGS = ("neigh_suppress", "mcast_snoop", "mcast_querier")


@dataclass(frozen=True)
class RemoveVm:
    name: str


@dataclass(frozen=True)
class SetVm:
    """Change a served VM's switch settings; None leaves one as it is."""

    name: str
    vlans: frozenset[int] | None = None
    macs: frozenset[bytes] | None = None
    unlock: bool = False  # drop its MAC lock ("macs": null)
    ips: frozenset[bytes] | None = None
    unlock_ips: bool = False  # drop its IP source guard ("ips": null)
    rate: int | None = None
    unlimit: bool = False  # drop its rate ("rate": null)
    guards: frozenset[Guard] | None = None  # empty: none


def parse_macs(text: str) -> frozenset[bytes]:
    """``52:54:00:12:34:56[,MAC...]`` -> the MACs; ValueError unless each is a
    unicast MAC in colon notation."""
    out = set()
    for part in text.split(","):
        octets = part.strip().split(":")
        if len(octets) != 6 or not all(len(o) == 2 for o in octets):
            raise ValueError(f"not a MAC address: {part!r}")
        mac = bytes.fromhex("".join(octets))
        if mac[0] & 1:
            raise ValueError(f"{part} is a multicast address")
        out.add(mac)
    return frozenset(out)


#: ``--ip`` words for what a VM may learn, and their markers in an IP set.
_LEARNING = {"dhcp": DHCP_LEARNING, "slaac": SLAAC_LEARNING}


def parse_ips(text: str) -> frozenset[bytes]:
    """``10.0.0.5,fd00::5,dhcp,slaac`` -> the packed addresses (4 or 16 bytes),
    :data:`~virtnet.ports.switch.DHCP_LEARNING` for ``dhcp`` (the leases a
    trusted DHCP or DHCPv6 server gives count too) and
    :data:`~virtnet.ports.switch.SLAAC_LEARNING` for ``slaac`` (so do the
    addresses the VM makes in the prefixes a trusted router advertises);
    ValueError unless each is one of those or an IPv4 or IPv6 address a host
    may have as its own."""
    out = set()
    for part in text.split(","):
        if part.strip() in _LEARNING:
            out.add(_LEARNING[part.strip()])
            continue
        addr = ipaddress.ip_address(part.strip())
        if addr.is_multicast or addr.is_unspecified or str(addr) == "255.255.255.255":
            raise ValueError(f"{part.strip()} cannot be a host's own address")
        out.add(addr.packed)
    return frozenset(out)


def parse_guards(text: str) -> frozenset[Guard]:
    """``dhcp,router`` -> those :class:`~virtnet.ports.switch.Guard` values
    (``none`` or nothing: no guard); ValueError for any other word."""
    out = set()
    for part in text.split(","):
        word = part.strip()
        if word in ("", "none"):
            continue
        try:
            out.add(Guard(word))
        except ValueError:
            raise ValueError(
                f"no guard {word!r} (guards: {', '.join(g.value for g in Guard)})"
            ) from None
    return frozenset(out)


def _guards(doc: dict[str, Any]) -> frozenset[Guard] | None:
    guards = doc.get("guards")
    if guards is None:
        return None
    if not isinstance(guards, list) or not all(isinstance(g, str) and g for g in guards):
        raise ProtocolError("'guards' must be a list of guard names")
    try:
        return parse_guards(",".join(guards))
    except ValueError as exc:
        raise ProtocolError(f"'guards': {exc}") from None


def _fields(doc: dict[str, Any], allowed: set[str]) -> None:
    extra = set(doc) - allowed
    if extra:
        raise ProtocolError(f"unknown fields {sorted(extra)}")


def _vlans(doc: dict[str, Any]) -> frozenset[int] | None:
    vlans = doc.get("vlans")
    if vlans is not None and (
        not isinstance(vlans, list)
        or not vlans
        or not all(type(v) is int and 0 <= v <= VLAN_MAX for v in vlans)
    ):
        raise ProtocolError(f"'vlans' must be a non-empty list of VLAN ids 0..{VLAN_MAX}")
    return None if vlans is None else frozenset(vlans)


def _macs(doc: dict[str, Any]) -> frozenset[bytes] | None:
    macs = doc.get("macs")
    if macs is None:
        return None
    if not isinstance(macs, list) or not all(isinstance(m, str) for m in macs):
        raise ProtocolError("'macs' must be a list of MAC addresses")
    try:
        return parse_macs(",".join(macs))
    except ValueError as exc:
        raise ProtocolError(f"'macs': {exc}") from None


def _ips(doc: dict[str, Any]) -> frozenset[bytes] | None:
    ips = doc.get("ips")
    if ips is None:
        return None
    if not isinstance(ips, list) or not ips or not all(isinstance(a, str) for a in ips):
        raise ProtocolError("'ips' must be a non-empty list of IP addresses")
    try:
        return parse_ips(",".join(ips))
    except ValueError as exc:
        raise ProtocolError(f"'ips': {exc}") from None


def parse_rate(text: str) -> int:
    """``100M``, ``1.5G``, ``64k``, ``2000000`` (bit/s) -> bit/s; ValueError
    unless within the switch's range."""
    t = text.strip()
    scale = {"k": 10**3, "K": 10**3, "m": 10**6, "M": 10**6, "g": 10**9, "G": 10**9}
    mult = scale.get(t[-1:], 1)
    if mult != 1:
        t = t[:-1]
    try:
        bps = int(float(t) * mult)
    except ValueError:
        raise ValueError(f"not a rate: {text!r} (e.g. 100M, 1.5G, 500k)") from None
    if not MIN_RATE_BPS <= bps <= MAX_RATE_BPS:
        raise ValueError(f"rate {text} out of range {MIN_RATE_BPS}..{MAX_RATE_BPS} bit/s")
    return bps


def _rate(doc: dict[str, Any]) -> int | None:
    rate = doc.get("rate")
    if rate is None:
        return None
    if type(rate) is not int or not MIN_RATE_BPS <= rate <= MAX_RATE_BPS:
        raise ProtocolError(f"'rate' must be {MIN_RATE_BPS}..{MAX_RATE_BPS} bit/s")
    return rate


def _name(doc: dict[str, Any]) -> str:
    name = doc.get("name")
    if not isinstance(name, str) or not name:
        raise ProtocolError("a VM 'name' is needed")
    return name


def parse_request(line: bytes) -> AddVm | RemoveVm | SetVm | SetSwitch:
    """One request line -> :class:`AddVm`, :class:`RemoveVm`, :class:`SetVm`
    or :class:`SetSwitch`; ProtocolError otherwise."""
    if len(line) > MAX_REQUEST_BYTES:
        raise ProtocolError(f"request longer than {MAX_REQUEST_BYTES} bytes")
    try:
        doc = json.loads(line)
    except ValueError as exc:
        raise ProtocolError(f"request is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ProtocolError("request is not a JSON object")
    op = doc.get("op")
    if op == "add":
        path = doc.get("socket")
        if not isinstance(path, str) or not 0 < len(path.encode()) <= MAX_SOCKET_PATH:
            raise ProtocolError(f"'socket' must be a path of 1..{MAX_SOCKET_PATH} bytes")
        tap = doc.get("tap")
        if tap is not None and (not isinstance(tap, str) or not tap):
            raise ProtocolError("'tap' must be an interface name")
        vlans, macs, ips, rate = _vlans(doc), _macs(doc), _ips(doc), _rate(doc)
        guards = _guards(doc)
        _fields(doc, {"op", "socket", "vlans", "tap", "macs", "ips", "rate", "guards"})
        return AddVm(path, vlans, tap, macs, ips, rate, guards)
    if op == "remove":
        name = _name(doc)
        _fields(doc, {"op", "name"})
        return RemoveVm(name)
    if op == "set":
        name, vlans, macs, ips = _name(doc), _vlans(doc), _macs(doc), _ips(doc)
        rate, guards = _rate(doc), _guards(doc)
        _fields(doc, {"op", "name", "vlans", "macs", "ips", "rate", "guards"})
        unlock = "macs" in doc and doc["macs"] is None
        unlock_ips = "ips" in doc and doc["ips"] is None
        unlimit = "rate" in doc and doc["rate"] is None
        if (vlans, macs, ips, rate, guards) == (None,) * 5 and not (
            unlock or unlock_ips or unlimit
        ):
            raise ProtocolError(
                "'set' needs 'vlans', 'macs', 'ips', 'rate' or 'guards' (null: no MAC lock, no"
                " IP guard, no rate; []: no guards)"
            )
        return SetVm(name, vlans, macs, unlock, ips, unlock_ips, rate, unlimit, guards)
    if op == "switch":
        _fields(doc, {"op", *SWITCH_SETTINGS})
        settings = {key: doc.get(key) for key in SWITCH_SETTINGS}
        if any(v is not None and not isinstance(v, bool) for v in settings.values()):
            raise ProtocolError(f"{', '.join(SWITCH_SETTINGS)} must be true or false")
        if all(v is None for v in settings.values()):
            raise ProtocolError(f"'switch' needs one of {', '.join(SWITCH_SETTINGS)}")
        return SetSwitch(**settings)
    raise ProtocolError(f"unknown op {op!r} (add, remove, set, switch)")


def request(path: str, doc: dict[str, Any], *, timeout: float = 30.0) -> dict[str, Any]:
    """Send one request to serve's control socket; its answer (UsageError when
    serve cannot be reached or answers nonsense, or refuses the request)."""
    line = json.dumps(doc).encode() + b"\n"
    try:
        reply = json.loads(ask(path, line, limit=MAX_REQUEST_BYTES, timeout=timeout))
    except OSError as exc:
        raise UsageError(f"cannot reach serve's control socket {path}: {exc}") from exc
    except ValueError:
        reply = None
    if not isinstance(reply, dict):
        raise UsageError(f"bad answer from {path}")
    if not reply.get("ok"):
        raise UsageError(str(reply.get("error", "refused")))
    return reply


def _rate_arg(text: str) -> int:
    try:
        return parse_rate(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _guards_arg(text: str) -> list[str]:
    try:
        return sorted(parse_guards(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _ids(text: str) -> list[int]:
    from virtnet.vhost_user.serve import _vlans_arg  # serve imports this module

    who, vlans = _vlans_arg(text)
    if who is not None:
        raise argparse.ArgumentTypeError(f"give the VLAN ids only: {text!r}")
    return sorted(vlans)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--control-socket",
        default=DEFAULT_CONTROL_SOCKET,
        metavar="PATH",
        help=f"serve's --control-socket (default {DEFAULT_CONTROL_SOCKET})",
    )
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = sub.add_parser("add", help="serve one more VM")
    add.add_argument("--socket", required=True, metavar="PATH", help="its vhost-user socket")
    add.add_argument("--vlans", type=_ids, metavar="IDS", help="its switch VLANs, e.g. 0,100-102")
    add.add_argument("--tap", metavar="IFNAME", help="its tap (with --port tap:...)")
    add.add_argument("--mac", metavar="MAC[,MAC]", help="the source MACs it may use on the switch")
    add.add_argument(
        "--ip",
        metavar="ADDR[,ADDR]",
        help="the source IPs it may use on the switch (dhcp: leases; slaac: SLAAC addresses)",
    )
    add.add_argument("--rate", type=_rate_arg, metavar="RATE", help="police what it sends (100M)")
    add.add_argument(
        "--guard", type=_guards_arg, metavar="GUARDS", help="servers it may not be: dhcp,router"
    )
    rm = sub.add_parser("remove", help="stop serving a VM")
    rm.add_argument("name", help="the VM's name, as virtnet stats shows it")
    st = sub.add_parser("set", help="change a VM's switch VLANs, MAC lock, guards or rate")
    st.add_argument("name", help="the VM's name, as virtnet stats shows it")
    st.add_argument("--vlans", type=_ids, metavar="IDS", help="its switch VLANs")
    lock = st.add_mutually_exclusive_group()
    lock.add_argument("--mac", metavar="MAC[,MAC]", help="lock it to these source MACs")
    lock.add_argument("--no-mac", action="store_true", help="let it use any MAC")
    guard = st.add_mutually_exclusive_group()
    guard.add_argument(
        "--ip",
        metavar="ADDR[,ADDR]",
        help="lock it to these source IPs (dhcp: and its leases; slaac: its SLAAC addresses)",
    )
    guard.add_argument("--no-ip", action="store_true", help="let it use any IP")
    limit = st.add_mutually_exclusive_group()
    limit.add_argument("--rate", type=_rate_arg, metavar="RATE", help="police what it sends")
    limit.add_argument("--no-rate", action="store_true", help="no limit")
    guards = st.add_mutually_exclusive_group()
    guards.add_argument(
        "--guard", type=_guards_arg, metavar="GUARDS", help="servers it may not be: dhcp,router"
    )
    guards.add_argument("--no-guard", action="store_true", help="it may be any server")
    sw = sub.add_parser(
        "switch",
        help="turn the switch's neighbour suppression, multicast snooping or querier on or off",
    )
    for key in SWITCH_SETTINGS:
        flag = "--" + key.replace("_", "-")
        sw.add_argument(flag, choices=("on", "off"), help=f"as serve's {flag}")


def run(args: argparse.Namespace) -> int:
    if args.action == "add":
        doc: dict[str, Any] = {"op": "add", "socket": args.socket}
        if args.vlans is not None:
            doc["vlans"] = args.vlans
        if args.tap is not None:
            doc["tap"] = args.tap
        if args.mac is not None:
            doc["macs"] = args.mac.split(",")
        if args.ip is not None:
            doc["ips"] = args.ip.split(",")
        if args.rate is not None:
            doc["rate"] = args.rate
        if args.guard is not None:
            doc["guards"] = args.guard
        print(request(args.control_socket, doc)["name"])
    elif args.action == "remove":
        request(args.control_socket, {"op": "remove", "name": args.name})
    elif args.action == "switch":
        doc = {"op": "switch"}
        doc |= {k: getattr(args, k) == "on" for k in SWITCH_SETTINGS if getattr(args, k)}
        if len(doc) == 1:
            raise UsageError("switch what? --neigh-suppress, --mcast-snoop or --mcast-querier")
        request(args.control_socket, doc)
    else:
        doc = {"op": "set", "name": args.name}
        if args.vlans is not None:
            doc["vlans"] = args.vlans
        if args.mac is not None:
            doc["macs"] = args.mac.split(",")
        elif args.no_mac:
            doc["macs"] = None
        if args.ip is not None:
            doc["ips"] = args.ip.split(",")
        elif args.no_ip:
            doc["ips"] = None
        if args.rate is not None:
            doc["rate"] = args.rate
        elif args.no_rate:
            doc["rate"] = None
        if args.guard is not None or args.no_guard:
            doc["guards"] = args.guard or []
        if len(doc) == 2:
            raise UsageError(
                "set what? --vlans, --mac, --no-mac, --ip, --no-ip, --rate, --no-rate, --guard"
                " or --no-guard"
            )
        request(args.control_socket, doc)
    return 0
