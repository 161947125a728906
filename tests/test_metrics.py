"""``virtnet stats --prometheus``: serve's counters as Prometheus metrics.

The exposition is read back with ``prometheus_client``'s own text parser (a
parser we did not write); the end-to-end test scrapes a real ``virtnet
serve`` that a vhost-user frontend sent frames through.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from virtnet.errors import UsageError
from virtnet.vhost_user.backend import MAX_QUEUE_PAIRS
from virtnet.vhost_user.metrics import COUNTERS, ServeCollector, parse_listen


def _row(**kw: int) -> dict[str, int]:
    row = {k: 0 for k in COUNTERS} | {"pid": 0, "broken": 0, "enabled": 0, "restarts": 0}
    return row | kw


SNAPSHOT: dict[str, Any] = {
    "time": 1.0,
    "queues": 2,
    "vms": [
        {
            "name": "vm1.sock",
            "socket": "/run/vm1.sock",
            "connected": True,
            "migrating": True,
            "connections": 3,
            "errors": 1,
            "pairs": [
                _row(enabled=1, rx_packets=10, tx_packets=7, tx_bytes=700, calls=4),
                _row(enabled=0, rx_dropped=2, restarts=1),
            ],
        },
        {"name": "vm2.sock", "connected": False, "connections": 0, "errors": 0, "pairs": []},
    ],
}


def scrape(doc: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample the collector reports for ``doc`` (a UsageError: serve unreadable)."""

    def source() -> Any:
        if isinstance(doc, Exception):
            raise doc
        return doc

    registry = CollectorRegistry()
    registry.register(ServeCollector(source))
    text = generate_latest(registry).decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_counters_per_vm_and_pair() -> None:
    got = scrape(SNAPSHOT)
    assert got[("virtnet_up", ())] == 1
    vm1p0 = (("pair", "0"), ("vm", "vm1.sock"))
    vm1p1 = (("pair", "1"), ("vm", "vm1.sock"))
    assert got[("virtnet_rx_packets_total", vm1p0)] == 10
    assert got[("virtnet_tx_packets_total", vm1p0)] == 7
    assert got[("virtnet_tx_bytes_total", vm1p0)] == 700
    assert got[("virtnet_calls_total", vm1p0)] == 4
    assert got[("virtnet_rx_dropped_total", vm1p1)] == 2
    assert got[("virtnet_pair_enabled", vm1p0)] == 1
    assert got[("virtnet_pair_enabled", vm1p1)] == 0
    assert got[("virtnet_pair_worker_restarts_total", vm1p1)] == 1
    assert got[("virtnet_vm_connected", (("vm", "vm1.sock"),))] == 1
    assert got[("virtnet_vm_connected", (("vm", "vm2.sock"),))] == 0
    assert got[("virtnet_vm_connections_total", (("vm", "vm1.sock"),))] == 3
    assert got[("virtnet_vm_errors_total", (("vm", "vm1.sock"),))] == 1
    assert got[("virtnet_vm_migrating", (("vm", "vm1.sock"),))] == 1
    assert got[("virtnet_vm_migrating", (("vm", "vm2.sock"),))] == 0
    # Every serve counter is exported for every pair, none invented.
    per_pair = {name for (name, labels) in got if ("pair", "0") in labels}
    assert per_pair == {f"{m}_total" for m, _ in COUNTERS.values()} | {
        "virtnet_pair_enabled",
        "virtnet_pair_worker_restarts_total",
    }


def _broken(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(SNAPSHOT)
    node: Any = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc


@pytest.mark.parametrize(
    "doc",
    [
        UsageError("cannot read stats from /nowhere: No such file or directory"),
        ["not", "an", "object"],
        {"vms": "vm1"},
        {"vms": [{"pairs": []}]},  # no name
        _broken(("vms", 0, "pairs", 0, "rx_packets"), -1),
        _broken(("vms", 0, "pairs", 0, "tx_bytes"), "700"),
        _broken(("vms", 0, "pairs", 0, "calls"), True),
        _broken(("vms", 0, "pairs", 1), 5),
        _broken(("vms", 0, "pairs"), [_row()] * (MAX_QUEUE_PAIRS + 1)),
        _broken(("vms", 0, "connections"), 1.5),
        _broken(("vms", 1, "name"), "vm1.sock"),
    ],
    ids=lambda d: type(d).__name__,
)
def test_unreadable_or_malformed_snapshot_is_up_zero_and_nothing_else(doc: Any) -> None:
    assert scrape(doc) == {("virtnet_up", ()): 0}


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("9477", ("0.0.0.0", 9477)),
        ("127.0.0.1:9477", ("127.0.0.1", 9477)),
        ("[::1]:0", ("::1", 0)),
        (":80", ("0.0.0.0", 80)),
    ],
)
def test_listen_address(text: str, want: tuple[str, int]) -> None:
    assert parse_listen(text) == want


@pytest.mark.parametrize("text", ["", "x", "127.0.0.1:http", "65536", "1:-1"])
def test_bad_listen_address_is_a_usage_error(text: str) -> None:
    with pytest.raises(UsageError, match="--prometheus"):
        parse_listen(text)


_names = st.text(st.characters(codec="utf-8", exclude_characters="\0"), min_size=1, max_size=20)
_counter = st.integers(min_value=0, max_value=2**64 - 1)
_pair = st.fixed_dictionaries({k: _counter for k in COUNTERS} | {"enabled": st.integers(0, 1)})


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(_names, st.lists(_pair, max_size=4), max_size=4))
def test_any_snapshot_round_trips_through_the_exposition(vms: dict[str, list[Any]]) -> None:
    """Whatever the VM names (quotes, backslashes, newlines, non-ASCII) and u64
    counters, Prometheus' own parser reads back exactly serve's numbers."""
    doc = {"vms": [{"name": n, "connections": 0, "errors": 0, "pairs": p} for n, p in vms.items()]}
    got = scrape(doc)
    for name, pairs in vms.items():
        for i, row in enumerate(pairs):
            labels = (("pair", str(i)), ("vm", name))
            for key, (metric, _) in COUNTERS.items():
                assert got[(f"{metric}_total", labels)] == float(row[key])


_SWITCH = {
    "frames_in": 9,
    "frames_out": 5,
    "flooded": 1,
    "filtered": 0,
    "dropped_full": 3,
    "dropped_unknown_vm": 0,
    "dropped_bad_frame": 1,
    "dropped_vlan": 0,
    "dropped_offload": 0,
    "dropped_no_queue": 0,
    "mac_evictions": 0,
    "flow_evictions": 2,
    "macs_unlearnt": 7,
    "leases_learnt": 3,
    "leases_refused": 1,
    "prefixes_learnt": 2,
    "prefixes_refused": 5,
    "neigh_suppressed": 11,
    "mcast_joined": 12,
    "mcast_refused": 1,
    "mcast_forwarded": 40,
    "mcast_queries": 6,
    "control_errors": 0,
    "uplinks": [{"name": "up0", "dropped": {"to_guest": 4, "from_guest": 0}}],
    "restarts": 1,
    "pid": 4242,
}


def test_the_drops_no_worker_sees_tap_and_switch() -> None:
    """A VM's tap drops (the kernel's) and the switch's counters by reason; a
    tap not found reports no sample rather than a zero."""
    doc = copy.deepcopy(SNAPSHOT)
    doc["vms"][0]["tap"] = {"name": "vn0", "dropped": {"to_guest": 31337, "from_guest": 2}}
    doc["vms"][1]["tap"] = {"name": "vn1", "dropped": None}
    doc["switch"] = copy.deepcopy(_SWITCH)
    got = scrape(doc)
    tap = "virtnet_tap_dropped_total"
    assert got[(tap, (("direction", "to_guest"), ("tap", "vn0"), ("vm", "vm1.sock")))] == 31337
    assert got[(tap, (("direction", "from_guest"), ("tap", "vn0"), ("vm", "vm1.sock")))] == 2
    assert not any(name == tap and ("tap", "vn1") in labels for name, labels in got)
    assert got[(tap, (("direction", "to_guest"), ("tap", "up0"), ("vm", "uplink")))] == 4
    assert got[("virtnet_switch_up", ())] == 1
    assert got[("virtnet_switch_frames_total", (("direction", "in"),))] == 9
    assert got[("virtnet_switch_dropped_total", (("reason", "full"),))] == 3
    assert got[("virtnet_switch_dropped_total", (("reason", "bad_frame"),))] == 1
    assert got[("virtnet_switch_evictions_total", (("table", "flow"),))] == 2
    assert got[("virtnet_switch_macs_unlearnt_total", ())] == 7
    assert got[("virtnet_switch_dhcp_leases_total", (("result", "learnt"),))] == 3
    assert got[("virtnet_switch_dhcp_leases_total", (("result", "refused"),))] == 1
    assert got[("virtnet_switch_slaac_prefixes_total", (("result", "learnt"),))] == 2
    assert got[("virtnet_switch_slaac_prefixes_total", (("result", "refused"),))] == 5
    assert got[("virtnet_switch_neigh_suppressed_total", ())] == 11
    assert got[("virtnet_switch_mcast_total", (("event", "joined"),))] == 12
    assert got[("virtnet_switch_mcast_total", (("event", "refused"),))] == 1
    assert got[("virtnet_switch_mcast_total", (("event", "forwarded"),))] == 40
    assert got[("virtnet_switch_mcast_total", (("event", "queries"),))] == 6
    assert got[("virtnet_switch_restarts_total", ())] == 1
    # A switch that did not answer: down, and none of its counters but restarts.
    doc["switch"] = {
        "error": "switch process did not answer: timed out",
        "uplinks": [],
        "restarts": 2,
    }
    got = scrape(doc)
    assert got[("virtnet_switch_up", ())] == 0
    assert got[("virtnet_switch_restarts_total", ())] == 2
    assert not any(name.startswith("virtnet_switch_frames") for name, _ in got)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("switch",), "up"),
        (("switch", "dropped_full"), -1),
        (("switch", "uplinks"), "up0"),
        (("switch", "uplinks", 0, "dropped"), [4, 0]),
        (("vms", 0, "tap"), {"dropped": None}),
        (("vms", 0, "tap", "dropped", "to_guest"), "7"),
    ],
)
def test_malformed_tap_or_switch_entries_fail_the_scrape(path: tuple[Any, ...], value: Any) -> None:
    doc = copy.deepcopy(SNAPSHOT)
    doc["vms"][0]["tap"] = {"name": "vn0", "dropped": {"to_guest": 1, "from_guest": 0}}
    doc["switch"] = copy.deepcopy(_SWITCH)
    node: Any = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert scrape(doc) == {("virtnet_up", ()): 0}


def test_stats_table_shows_tap_and_switch_drops() -> None:
    from rich.console import Console

    from virtnet.vhost_user.stats import render

    doc = copy.deepcopy(SNAPSHOT)
    doc["vms"][0]["tap"] = {"name": "vn0", "dropped": {"to_guest": 31337, "from_guest": 2}}
    doc["vms"][1] |= {"socket": "/run/vm2.sock", "tap": {"name": "vn1", "dropped": None}}
    doc["vms"][0]["groups"] = ["239.1.1.1", "ff02::1:ff00:2"]
    doc["switch"] = copy.deepcopy(_SWITCH) | {
        "mrouters": ["uplink:up0"], "groups": {"uplink:up0": ["239.9.9.9 vlan 100"]},
    }  # fmt: skip
    console = Console(width=200, record=True)
    console.print(render(doc))
    text = " ".join(console.export_text().split())
    assert "multicast groups 239.1.1.1,ff02::1:ff00:2" in text
    assert "multicast routers uplink:up0" in text and "mcast forwarded 40" in text
    assert "uplink:up0 multicast groups 239.9.9.9 vlan 100" in text
    assert "tap vn0: the kernel dropped 31337 frames to the guest, 2 from it" in text
    assert "tap vn1: not found in this network namespace" in text
    assert "drop full" in text and "flow evictions 2" in text and "macs unlearnt 7" in text
    assert "tap up0: the kernel dropped 4 frames to the guest" in text


def test_stats_table_says_a_vm_is_migrating() -> None:
    """``virtnet stats`` titles a migrating VM's table with the dirty log's size."""
    from rich.console import Console

    from virtnet.vhost_user.stats import render

    doc = copy.deepcopy(SNAPSHOT)
    doc["vms"][0]["dirty_log_bytes"] = 16384
    doc["vms"][1]["socket"] = "/run/vm2.sock"
    console = Console(width=200, record=True)
    console.print(render(doc))
    text = " ".join(console.export_text().split())  # the title may wrap
    assert "migrating (dirty log of 16384 bytes)" in text
    assert text.count("migrating") == 1  # vm2 is not
