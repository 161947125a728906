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
