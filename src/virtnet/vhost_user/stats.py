"""``virtnet stats``: live per-queue counters of a running ``virtnet serve``.

Connects to serve's ``--stats-socket``, reads one JSON document (see
:func:`virtnet.vhost_user.serve.snapshot`) and renders a rich table per VM;
``--watch`` refreshes every ``--interval`` seconds and shows rates;
``--prometheus [ADDR:]PORT`` exports them instead
(:mod:`virtnet.vhost_user.metrics`).

Invariant: reads at most :data:`MAX_REPLY` bytes and waits at most
:data:`TIMEOUT_S`; anything else is a :class:`~virtnet.errors.UsageError`.
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import time
from typing import Any

from virtnet.errors import UsageError

__all__ = [
    "DEFAULT_STATS_SOCKET",
    "SWITCH_COLUMNS",
    "add_arguments",
    "ask",
    "fetch",
    "rate_text",
    "render",
    "run",
    "tap_drops_text",
]

log = logging.getLogger(__name__)

DEFAULT_STATS_SOCKET = "/run/virtnet/stats.sock"
#: Largest stats document accepted (bytes).
MAX_REPLY = 16 << 20
#: Seconds to wait for the daemon.
TIMEOUT_S = 5.0

#: counter -> column header
_COLUMNS = {
    "rx_packets": "rx pkts",
    "rx_bytes": "rx bytes",
    "rx_dropped": "rx drop",
    "rx_no_buffer": "no buf",
    "tx_packets": "tx pkts",
    "tx_bytes": "tx bytes",
    "tx_dropped": "tx drop",
    "errors": "err",
}

#: switch counter -> column header (drops by reason; what the workers' pairs cannot show)
SWITCH_COLUMNS = {
    "frames_in": "in",
    "frames_out": "out",
    "flooded": "flooded",
    "filtered": "filtered",
    "dropped_full": "drop full",
    "dropped_unknown_vm": "drop no VM",
    "dropped_bad_frame": "drop bad",
    "dropped_vlan": "drop VLAN",
    "dropped_spoofed": "drop spoofed",
    "dropped_offload": "drop offload",
    "dropped_no_queue": "drop no queue",
    "dropped_rate": "drop rate",
    "dropped_guard": "drop guard",
}


def rate_text(bps: int) -> str:
    """``100 Mbit/s`` and the like (serve's log, the stats title)."""
    for unit, scale in (("Gbit/s", 10**9), ("Mbit/s", 10**6), ("kbit/s", 10**3)):
        if bps >= scale:
            return f"{bps / scale:g} {unit}"
    return f"{bps} bit/s"


def tap_drops_text(tap: Any) -> str:
    """``tap vn0: the kernel dropped 5 frames to the guest, 0 from it`` (or
    that the tap is not there) for a snapshot's ``tap`` entry."""
    if not isinstance(tap, dict):
        return "tap: ?"
    name = tap.get("name", "?")
    dropped = tap.get("dropped")
    if not isinstance(dropped, dict):
        return f"tap {name}: not found in this network namespace"
    return (
        f"tap {name}: the kernel dropped {dropped.get('to_guest', '?')} frames to the guest,"
        f" {dropped.get('from_guest', '?')} from it"
    )


def ask(path: str, request: bytes = b"", *, limit: int, timeout: float) -> bytes:
    """Send ``request`` to serve's Unix socket ``path`` and read the answer
    until serve closes: OSError when that fails, ValueError when the answer
    is longer than ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        if request:
            s.sendall(request)
        while data := s.recv(1 << 16):
            size += len(data)
            if size > limit:
                raise ValueError(f"answer from {path} longer than {limit} bytes")
            chunks.append(data)
    return b"".join(chunks)


def fetch(path: str) -> dict[str, Any]:
    """One snapshot from the daemon's stats socket."""
    try:
        doc = json.loads(ask(path, limit=MAX_REPLY, timeout=TIMEOUT_S))
    except OSError as exc:
        raise UsageError(f"cannot read stats from {path}: {exc}") from exc
    except ValueError as exc:
        raise UsageError(f"bad stats reply from {path}: {exc}") from exc
    if not isinstance(doc, dict):
        raise UsageError(f"bad stats reply from {path}")
    return doc


def render(doc: dict[str, Any], prev: dict[str, Any] | None = None) -> Any:
    """A rich renderable for one snapshot (rates when ``prev`` is given)."""
    from rich.console import Group
    from rich.table import Table

    tables = []
    dt = float(doc.get("time", 0)) - float(prev.get("time", 0)) if prev else 0.0
    prev_vms = {v["name"]: v for v in prev.get("vms", [])} if prev else {}
    for vm in doc.get("vms", []):
        state = "connected" if vm.get("connected") else "waiting"
        title = f"{vm['name']} ({vm['socket']}) {state}, {vm.get('connections', 0)} connection(s)"
        if vm.get("errors"):
            title += f", {vm['errors']} error(s): {vm.get('last_error')}"
        if vm.get("migrating"):
            title += f", migrating (dirty log of {vm.get('dirty_log_bytes', 0)} bytes)"
        if "tap" in vm:
            title += f"; {tap_drops_text(vm['tap'])}"
        if vm.get("vlans"):
            title += f"; VLANs {','.join(map(str, vm['vlans']))}"
        if vm.get("macs"):
            title += f"; sends from {','.join(vm['macs'])} only"
        if vm.get("ips"):
            title += f"; IPs {','.join(vm['ips'])} only"
        if vm.get("rate_bps"):
            title += f"; at most {rate_text(vm['rate_bps'])}"
        if vm.get("guards"):
            title += f"; guards {','.join(vm['guards'])}"
        if vm.get("leases"):
            title += f"; DHCP leases {','.join(vm['leases'])}"
        if vm.get("slaac"):
            title += f"; SLAAC {','.join(vm['slaac'])}"
        if vm.get("groups"):
            title += f"; multicast groups {','.join(vm['groups'])}"
        t = Table(title=title, caption=vm.get("features") or None)
        t.add_column("pair", justify="right")
        t.add_column("on")
        t.add_column("pid", justify="right")
        for header in _COLUMNS.values():
            t.add_column(header, justify="right")
        if dt > 0:
            t.add_column("rx pps", justify="right")
            t.add_column("tx pps", justify="right")
        old_pairs = prev_vms.get(vm["name"], {}).get("pairs", [])
        for i, row in enumerate(vm.get("pairs", [])):
            active = row.get("enabled") or any(row.get(c) for c in _COLUMNS)
            if not active:
                continue
            cells = [str(i), "yes" if row.get("enabled") else "-", str(row.get("pid") or "-")]
            cells += [str(row.get(c, 0)) for c in _COLUMNS]
            if dt > 0:
                old = old_pairs[i] if i < len(old_pairs) else {}
                for c in ("rx_packets", "tx_packets"):
                    cells.append(f"{(row.get(c, 0) - old.get(c, 0)) / dt:,.0f}")
            t.add_row(*cells)
        tables.append(t)
    sw = doc.get("switch")
    if isinstance(sw, dict):
        tables.append(_switch_table(sw))
    return Group(*tables)


def _switch_table(sw: dict[str, Any]) -> Any:
    """The switch process's frame counters and drops by reason."""
    from rich.table import Table

    if "error" in sw:
        return Table(title=f"switch: {sw['error']}")
    notes = [
        f"{key.replace('_', ' ')} {sw[key]}"
        for key in (
            "restarts",
            "mac_evictions",
            "flow_evictions",
            "macs_unlearnt",
            "leases_learnt",
            "leases_refused",
            "prefixes_learnt",
            "prefixes_refused",
            "neigh_suppressed",
            "mcast_joined",
            "mcast_refused",
            "mcast_forwarded",
            "mcast_queries",
            "control_errors",
        )
        if sw.get(key)
    ]
    if sw.get("prefixes"):
        notes.append(f"SLAAC prefixes {', '.join(map(str, sw['prefixes']))}")
    if sw.get("on"):
        notes.append(f"on: {', '.join(str(k).replace('_', '-') for k in sw['on'])}")
    if sw.get("mrouters"):
        notes.append(f"multicast routers {', '.join(map(str, sw['mrouters']))}")
    if isinstance(sw.get("groups"), dict):
        notes += [f"{m} multicast groups {','.join(map(str, g))}" for m, g in sw["groups"].items()]
    notes += [tap_drops_text(up) for up in sw.get("uplinks") or []]
    t = Table(title="switch", caption="; ".join(notes) or None)
    for header in SWITCH_COLUMNS.values():
        t.add_column(header, justify="right")
    t.add_row(*(str(sw.get(key, 0)) for key in SWITCH_COLUMNS))
    return t


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--stats-socket",
        default=DEFAULT_STATS_SOCKET,
        metavar="PATH",
        help=f"serve's --stats-socket (default {DEFAULT_STATS_SOCKET})",
    )
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--watch", action="store_true", help="refresh until interrupted")
    mode.add_argument("--json", action="store_true", help="print the raw JSON snapshot")
    mode.add_argument(
        "--prometheus",
        metavar="[ADDR:]PORT",
        help="serve the counters as Prometheus metrics on http://ADDR:PORT/metrics until"
        " interrupted (one stats read per scrape)",
    )


def run(args: argparse.Namespace) -> int:
    if args.prometheus is not None:
        from virtnet.vhost_user.metrics import serve_metrics

        path = args.stats_socket
        try:
            fetch(path)
        except UsageError as exc:  # an exporter outlives serve's restarts: warn, go on
            log.warning("%s; virtnet_up is 0 until serve answers", exc)
        return serve_metrics(lambda: fetch(path), args.prometheus)
    from rich.console import Console

    console = Console()
    doc = fetch(args.stats_socket)
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    if not args.watch:
        console.print(render(doc))
        return 0
    from rich.live import Live

    prev: dict[str, Any] | None = None
    with Live(render(doc), console=console, refresh_per_second=4) as live:
        try:
            while True:
                time.sleep(max(0.1, float(args.interval)))
                prev, doc = doc, fetch(args.stats_socket)
                live.update(render(doc, prev))
        except KeyboardInterrupt:
            pass
    return 0
