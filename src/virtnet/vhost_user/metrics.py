"""Prometheus metrics for a running ``virtnet serve``: ``virtnet stats --prometheus``.

An exporter beside serve, the way DPDK's telemetry socket has its exporter:
serve keeps its one control loop and no HTTP thread; this process answers
each scrape by reading serve's ``--stats-socket`` once
(:func:`virtnet.vhost_user.stats.fetch`, bounded in size and time) and
turning the snapshot into metric families with ``prometheus_client``.

Metrics (labels ``vm`` -- the socket's name -- and ``pair``):

* ``virtnet_up``: 1 when this scrape read serve's stats, else 0 (and nothing
  else is reported: a counter must not seem to restart from zero);
* ``virtnet_vm_connected``, ``virtnet_vm_connections_total``,
  ``virtnet_vm_errors_total`` (vhost-user connections dropped for bad input);
* ``virtnet_pair_enabled``, ``virtnet_pair_worker_restarts_total``;
* one counter per queue-pair counter of serve: ``virtnet_rx_packets_total``,
  ``virtnet_rx_bytes_total``, ``virtnet_rx_dropped_total``,
  ``virtnet_rx_no_buffer_total``, ``virtnet_tx_packets_total``,
  ``virtnet_tx_bytes_total``, ``virtnet_tx_dropped_total``,
  ``virtnet_errors_total``, ``virtnet_kicks_total``, ``virtnet_calls_total``;
* the drops no worker sees: ``virtnet_tap_dropped_total`` (labels ``vm``,
  ``tap``, ``direction`` ``to_guest``/``from_guest``: the kernel's drops on a
  VM's tap, or on a switch uplink with ``vm`` ``uplink``) and, with the
  switch port, ``virtnet_switch_up``, ``virtnet_switch_frames_total``
  (``direction`` ``in``/``out``), ``virtnet_switch_flooded_total``,
  ``virtnet_switch_filtered_total``, ``virtnet_switch_dropped_total``
  (``reason``: full, unknown_vm, bad_frame, vlan, spoofed, offload, no_queue,
  rate, guard),
  ``virtnet_switch_evictions_total`` (``table`` mac/flow),
  ``virtnet_switch_macs_unlearnt_total``, ``virtnet_switch_dhcp_leases_total``,
  ``virtnet_switch_slaac_prefixes_total``
  (``result`` learnt/refused), ``virtnet_switch_neigh_suppressed_total``,
  ``virtnet_switch_mcast_total`` (``event`` joined/refused/forwarded/queries),
  ``virtnet_switch_control_errors_total`` and ``virtnet_switch_restarts_total``
  (the other switch counters start from zero after a restart).

Invariant: the snapshot is checked before anything is reported (a mapping
with a ``vms`` list of at most :data:`MAX_VMS` uniquely named VMs, each with at most
:data:`~virtnet.vhost_user.backend.MAX_QUEUE_PAIRS` pairs of non-negative
integer counters); a snapshot that is not is a failed scrape (``virtnet_up``
0, one log line), never an exception out of the HTTP handler.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from virtnet.errors import UsageError
from virtnet.ports.switch import SwitchStats
from virtnet.vhost_user.backend import MAX_QUEUE_PAIRS

__all__ = [
    "COUNTERS",
    "MAX_VMS",
    "SWITCH_DROPS",
    "ServeCollector",
    "parse_listen",
    "serve_metrics",
]

log = logging.getLogger(__name__)

#: VMs accepted in one snapshot (serve takes one ``--socket`` per VM; far
#: more than any host runs).
MAX_VMS = 4096

#: serve's per-pair counter -> (metric name, help)
COUNTERS: dict[str, tuple[str, str]] = {
    "rx_packets": ("virtnet_rx_packets", "Frames delivered to the guest."),
    "rx_bytes": ("virtnet_rx_bytes", "Bytes delivered to the guest (no virtio-net header)."),
    "rx_dropped": ("virtnet_rx_dropped", "Frames for the guest dropped (counted, never silent)."),
    "rx_no_buffer": ("virtnet_rx_no_buffer", "Times the guest had posted no rx buffers."),
    "tx_packets": ("virtnet_tx_packets", "Frames sent by the guest and passed to the port."),
    "tx_bytes": ("virtnet_tx_bytes", "Bytes sent by the guest (no virtio-net header)."),
    "tx_dropped": ("virtnet_tx_dropped", "Frames from the guest dropped (counted)."),
    "errors": ("virtnet_errors", "Ring errors: a broken ring is reported and stopped."),
    "kicks": ("virtnet_kicks", "Guest notifications (kicks) handled."),
    "calls": ("virtnet_calls", "Interrupts (call eventfd writes) sent to the guest."),
}

_LABELS = ["vm", "pair"]

#: switch drop counter -> ``reason`` label of virtnet_switch_dropped_total: every
#: ``dropped_*`` field of the switch's :class:`~virtnet.ports.switch.SwitchStats`
SWITCH_DROPS = {
    f.name: f.name.removeprefix("dropped_")
    for f in dataclasses.fields(SwitchStats)
    if f.name.startswith("dropped_")
}


class SnapshotError(ValueError):
    """A stats snapshot without the shape serve writes."""


def _count(row: dict[str, Any], key: str) -> int:
    v = row.get(key, 0)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise SnapshotError(f"{key} is {v!r}, not a non-negative integer")
    return v


def _labelled(
    sw: dict[str, Any], what: str, name: str, help_text: str, label: str, values: tuple[str, ...]
) -> CounterMetricFamily:
    """One counter family of the switch's ``WHAT_VALUE`` counters, a sample
    for each of ``values`` under ``label``."""
    family = CounterMetricFamily(name, help_text, labels=[label])
    for value in values:
        family.add_metric([value], _count(sw, f"{what}_{value}"))
    return family


def _learnt(sw: dict[str, Any], what: str, name: str, help_text: str) -> CounterMetricFamily:
    """A counter of what the switch learnt by snooping, by ``result``: its
    ``WHAT_learnt`` and ``WHAT_refused`` counters."""
    return _labelled(sw, what, name, help_text, "result", ("learnt", "refused"))


def _vms(doc: Any) -> list[dict[str, Any]]:
    if not isinstance(doc, dict):
        raise SnapshotError("not a JSON object")
    vms = doc.get("vms")
    if not isinstance(vms, list) or len(vms) > MAX_VMS:
        raise SnapshotError(f"'vms' is not a list of at most {MAX_VMS}")
    names: set[str] = set()
    for vm in vms:
        if not isinstance(vm, dict) or not isinstance(vm.get("name"), str):
            raise SnapshotError("a VM without a name")
        if vm["name"] in names:  # serve names VMs uniquely; two series must not share labels
            raise SnapshotError(f"VM name {vm['name']!r} twice")
        names.add(vm["name"])
        pairs = vm.get("pairs", [])
        if not isinstance(pairs, list) or len(pairs) > MAX_QUEUE_PAIRS:
            raise SnapshotError(f"VM {vm['name']!r}: 'pairs' not a list of <= {MAX_QUEUE_PAIRS}")
        if not all(isinstance(p, dict) for p in pairs):
            raise SnapshotError(f"VM {vm['name']!r}: a pair that is not an object")
    return vms


class ServeCollector(Collector):
    """Reads one snapshot per scrape through ``source`` (raises UsageError
    when serve cannot be read) and yields serve's counters as metrics."""

    def __init__(self, source: Callable[[], Any]) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("virtnet_up", "1 when serve's stats socket was read.")
        try:
            families = self._families(self.source())
        except (UsageError, SnapshotError) as exc:
            log.warning("scrape failed: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    @staticmethod
    def _families(doc: Any) -> list[Metric]:
        vms = _vms(doc)
        connected = GaugeMetricFamily(
            "virtnet_vm_connected", "1 while the VM's frontend is connected.", labels=["vm"]
        )
        conns = CounterMetricFamily(
            "virtnet_vm_connections", "vhost-user connections accepted.", labels=["vm"]
        )
        errs = CounterMetricFamily(
            "virtnet_vm_errors", "Connections dropped for bad input.", labels=["vm"]
        )
        migrating = GaugeMetricFamily(
            "virtnet_vm_migrating",
            "1 while the frontend migrates the VM (VHOST_F_LOG_ALL: pages written are logged).",
            labels=["vm"],
        )
        enabled = GaugeMetricFamily(
            "virtnet_pair_enabled", "1 while the pair's rings are enabled.", labels=_LABELS
        )
        restarts = CounterMetricFamily(
            "virtnet_pair_worker_restarts", "Worker processes restarted.", labels=_LABELS
        )
        per_pair = {
            key: CounterMetricFamily(name, doc_, labels=_LABELS)
            for key, (name, doc_) in COUNTERS.items()
        }
        for vm in vms:
            name = vm["name"]
            connected.add_metric([name], 1 if vm.get("connected") else 0)
            conns.add_metric([name], _count(vm, "connections"))
            errs.add_metric([name], _count(vm, "errors"))
            migrating.add_metric([name], 1 if vm.get("migrating") else 0)
            for p, row in enumerate(vm.get("pairs", [])):
                labels = [name, str(p)]
                enabled.add_metric(labels, 1 if row.get("enabled") else 0)
                restarts.add_metric(labels, _count(row, "restarts"))
                for key, fam in per_pair.items():
                    fam.add_metric(labels, _count(row, key))
        taps = CounterMetricFamily(
            "virtnet_tap_dropped",
            "Frames the kernel dropped on a tap (to_guest: its queue was full).",
            labels=["vm", "tap", "direction"],
        )
        for vm in vms:
            if "tap" in vm:
                _add_tap(taps, vm["name"], vm["tap"])
        families: list[Metric] = [
            connected,
            conns,
            errs,
            migrating,
            enabled,
            restarts,
            *per_pair.values(),
        ]
        sw = doc.get("switch")
        if sw is not None:
            families += _switch_families(sw, taps)
        families.append(taps)
        return families


def _add_tap(fam: CounterMetricFamily, vm: str, tap: Any) -> None:
    """A snapshot's ``tap`` entry ({name, dropped: {to_guest, from_guest} or None})."""
    if not isinstance(tap, dict) or not isinstance(tap.get("name"), str):
        raise SnapshotError(f"VM {vm!r}: a tap entry without a name")
    dropped = tap.get("dropped")
    if dropped is None:  # the tap is not there (yet): no sample, not a zero
        return
    if not isinstance(dropped, dict):
        raise SnapshotError(f"VM {vm!r}: tap drops are not an object")
    for direction in ("to_guest", "from_guest"):
        fam.add_metric([vm, tap["name"], direction], _count(dropped, direction))


def _switch_families(sw: Any, taps: CounterMetricFamily) -> list[Metric]:
    """The switch process's counters; its uplinks' drops go to ``taps``."""
    if not isinstance(sw, dict):
        raise SnapshotError("'switch' is not an object")
    up = GaugeMetricFamily("virtnet_switch_up", "1 when the switch process answered.")
    up.add_metric([], 0 if "error" in sw else 1)
    restarts = CounterMetricFamily(
        "virtnet_switch_restarts", "Times serve started the switch process again after it died."
    )
    restarts.add_metric([], _count(sw, "restarts"))
    if "error" in sw:
        return [up, restarts]
    frames = CounterMetricFamily(
        "virtnet_switch_frames", "Frames into / out of the switch.", labels=["direction"]
    )
    frames.add_metric(["in"], _count(sw, "frames_in"))
    frames.add_metric(["out"], _count(sw, "frames_out"))
    flooded = CounterMetricFamily("virtnet_switch_flooded", "Frames flooded to every member.")
    flooded.add_metric([], _count(sw, "flooded"))
    filtered = CounterMetricFamily(
        "virtnet_switch_filtered", "Unicast frames for their own source, not sent back."
    )
    filtered.add_metric([], _count(sw, "filtered"))
    dropped = CounterMetricFamily(
        "virtnet_switch_dropped", "Frames the switch dropped, by reason.", labels=["reason"]
    )
    for key, reason in SWITCH_DROPS.items():
        dropped.add_metric([reason], _count(sw, key))
    evictions = CounterMetricFamily(
        "virtnet_switch_evictions", "Table entries evicted when full.", labels=["table"]
    )
    evictions.add_metric(["mac"], _count(sw, "mac_evictions"))
    evictions.add_metric(["flow"], _count(sw, "flow_evictions"))
    unlearnt = CounterMetricFamily(
        "virtnet_switch_macs_unlearnt",
        "Source MACs not learnt: their VM already taught the table its share.",
    )
    unlearnt.add_metric([], _count(sw, "macs_unlearnt"))
    leases = _learnt(
        sw, "leases", "virtnet_switch_dhcp_leases",
        "DHCP leases and DHCPv6 addresses snooped for VMs that learn their addresses from DHCP.",
    )  # fmt: skip
    prefixes = _learnt(
        sw, "prefixes", "virtnet_switch_slaac_prefixes",
        "Router-advertised SLAAC prefixes snooped for VMs that learn their SLAAC addresses.",
    )  # fmt: skip
    suppressed = CounterMetricFamily(
        "virtnet_switch_neigh_suppressed",
        "ARP requests and neighbour solicitations the switch answered itself.",
    )
    suppressed.add_metric([], _count(sw, "neigh_suppressed"))
    mcast = _labelled(
        sw, "mcast", "virtnet_switch_mcast",
        "IGMP/MLD snooping: group records that made or renewed a membership (joined), reports"
        " the switch could not take (refused), frames sent to a group's members (forwarded),"
        " general queries the switch sent as querier (queries).",
        "event", ("joined", "refused", "forwarded", "queries"),
    )  # fmt: skip
    ctl = CounterMetricFamily(
        "virtnet_switch_control_errors", "Bad control messages the switch refused."
    )
    ctl.add_metric([], _count(sw, "control_errors"))
    uplinks = sw.get("uplinks", [])
    if not isinstance(uplinks, list) or len(uplinks) > MAX_VMS:
        raise SnapshotError("switch 'uplinks' is not a list")
    for tap in uplinks:
        _add_tap(taps, "uplink", tap)
    return [
        up, restarts, frames, flooded, filtered, dropped, evictions, unlearnt, leases, prefixes,
        suppressed, mcast, ctl,
    ]  # fmt: skip


def parse_listen(text: str) -> tuple[str, int]:
    """``[ADDR:]PORT`` (``9477``, ``127.0.0.1:9477``, ``[::1]:9477``)."""
    addr, sep, port = text.rpartition(":")
    if not sep:
        addr = "0.0.0.0"
    addr = addr.strip("[]") or "0.0.0.0"
    try:
        n = int(port)
    except ValueError:
        raise UsageError(f"--prometheus wants [ADDR:]PORT, not {text!r}") from None
    if not 0 <= n <= 0xFFFF:
        raise UsageError(f"--prometheus port {n} is not 0..65535")
    return addr, n


def serve_metrics(source: Callable[[], Any], listen: str) -> int:
    """Serve ``/metrics`` on ``listen`` until SIGINT/SIGTERM (main thread only).

    Prints the bound URL first (port 0 picks one).
    """
    addr, port = parse_listen(listen)
    registry = CollectorRegistry()
    registry.register(ServeCollector(source))
    try:
        server, thread = start_http_server(port, addr, registry=registry)
    except OSError as exc:
        raise UsageError(f"cannot listen on {listen}: {exc}") from exc
    host, bound = str(server.server_address[0]), int(server.server_address[1])
    shown = f"[{host}]" if ":" in host else host
    print(f"virtnet stats: Prometheus metrics on http://{shown}:{bound}/metrics", flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    try:
        done.wait()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    return 0
