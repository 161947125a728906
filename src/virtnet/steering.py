"""Receive steering and queue-count switches for virtio-net multiqueue, pure.

Receive queue choice (:meth:`Steering.choose_rx`), in order:

1. RSS (§5.1.6.5.7) if the last multiqueue command was RSS_CONFIG: the
   indirection table for hashed packets, ``unclassified_queue`` otherwise.
2. Rx-follows-tx (§5.1.6.5.6 "Automatic receive steering"): a flow the guest
   last transmitted on pair X within ``flow_ttl`` seconds is received on X.
3. Otherwise a symmetric hash of the flow over the active pairs (the spec lets
   the device pick any queue); non-IP frames go to pair 0.

The hash value/report returned with the choice is the one configured for hash
reporting (§5.1.6.4.4: RSS_CONFIG or HASH_CONFIG), independent of the steering
decision; it is ``(0, HASH_REPORT_NONE)`` when no hash types are enabled.

Queue-count switches.  The 2012 multiqueue draft's ordering rule: the device
finishes the transmit queues used under the old setting before it processes
packets sent under the new one.  The device loop keeps it like this::

    drain = steering.apply(state)        # after each accepted control command
    for pair in drain:                   # snapshot: stop at today's avail idx
        marks[pair] = txq[pair].avail_idx
    ...
    if steering.tx_allowed(pair): process txq[pair] (for a draining pair,
                                   only up to marks[pair], then drained(pair))

Invariants:

* ``choose_rx`` never returns a pair ``>= active_pairs``, and ``active_pairs``
  is always within ``1..max_pairs``.  Receive uses the new count at once
  (§5.1.6.5.6: no packets on receive queues beyond the new count once the
  command is used).
* While a switch is pending, ``tx_allowed(p)`` is true exactly for the old
  pairs not yet drained; everything else waits.  When the last pending pair is
  drained (or :meth:`drain_done` is called) the new transmit count applies.
  A switch started while another is pending adds the current pairs to the
  pending set, so packets of every earlier setting are processed first.
* The flow table holds at most ``flow_table_size`` flows; inserting into a
  full table evicts the least recently transmitted flow (counted).  Entries
  older than ``flow_ttl`` seconds are ignored and dropped on lookup (counted).
* Time only comes in as the ``now`` argument (seconds, any monotonic origin).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Final
from zlib import crc32

from virtnet.ctrl import ControlState, SteeringMode
from virtnet.net import CTRL_MQ_VQ_PAIRS_MAX, HASH_REPORT_NONE
from virtnet.rss import RssConfig, _flow_key_parsed, _hash_parsed, _parse

__all__ = [
    "DEFAULT_FLOW_TABLE_SIZE",
    "DEFAULT_FLOW_TTL",
    "Steering",
    "SteeringStats",
]

# Our limits (the spec leaves the classifier's size to the device).
DEFAULT_FLOW_TABLE_SIZE: Final = 4096
DEFAULT_FLOW_TTL: Final = 30.0  # seconds a transmitted flow keeps steering its replies


@dataclass(slots=True)
class SteeringStats:
    rss: int = 0
    flow_hits: int = 0
    flow_misses: int = 0
    flows_evicted: int = 0
    flows_expired: int = 0
    switches: int = 0


class Steering:
    """Per-device steering state; see the module docstring for the rules."""

    def __init__(
        self,
        max_pairs: int,
        *,
        flow_table_size: int = DEFAULT_FLOW_TABLE_SIZE,
        flow_ttl: float = DEFAULT_FLOW_TTL,
    ) -> None:
        if not 1 <= max_pairs <= CTRL_MQ_VQ_PAIRS_MAX:
            raise ValueError(f"max_pairs {max_pairs} outside 1..{CTRL_MQ_VQ_PAIRS_MAX}")
        if flow_table_size < 1:
            raise ValueError("flow_table_size must be >= 1")
        self.max_pairs = max_pairs
        self.flow_table_size = flow_table_size
        self.flow_ttl = flow_ttl
        self.active_pairs = 1  # receive side, applies at once
        self.tx_pairs = 1  # transmit side, applies after draining
        self.mode = SteeringMode.AUTO
        self.rss: RssConfig | None = None
        self.hash_types = 0
        self.hash_key = b""
        self.stats = SteeringStats()
        self._flows: OrderedDict[bytes, list[float]] = OrderedDict()  # key -> [pair, last]
        self._pending: set[int] = set()
        self._next_tx = 1
        self._generation = -1

    # -- configuration -------------------------------------------------------------

    def set_pairs(self, n: int) -> set[int]:
        """Automatic steering over ``n`` pairs; returns the tx pairs to drain."""
        self.mode = SteeringMode.AUTO
        self.rss = None
        return self.begin_switch(n)

    def apply(self, state: ControlState) -> set[int]:
        """Adopt a control state; returns the tx pairs to drain (maybe empty)."""
        if state.generation == self._generation:
            return set()
        self._generation = state.generation
        self.hash_types = state.hash_types
        self.hash_key = state.hash_key
        self.mode = state.steering_mode
        self.rss = state.rss if state.steering_mode is SteeringMode.RSS else None
        tx = self.rss.max_tx_vq if self.rss is not None else state.curr_queue_pairs
        return self.begin_switch(state.curr_queue_pairs, tx)

    def begin_switch(self, new_pairs: int, new_tx_pairs: int | None = None) -> set[int]:
        """Switch to ``new_pairs`` receive pairs (and ``new_tx_pairs`` transmit
        pairs, default the same).  Returns the old transmit pairs that must be
        drained before any packet of the new setting; empty if nothing changes.

        Raises ``ValueError`` for counts outside ``1..max_pairs`` (a caller bug:
        :mod:`virtnet.ctrl` never produces them).
        """
        tx = new_pairs if new_tx_pairs is None else new_tx_pairs
        for n in (new_pairs, tx):
            if not 1 <= n <= self.max_pairs:
                raise ValueError(f"queue pairs {n} outside 1..{self.max_pairs}")
        self.active_pairs = new_pairs
        # The setting packets are being sent under now (the pending one, if any).
        current = self._next_tx if self._pending else self.tx_pairs
        if tx == current:
            return set()
        self.stats.switches += 1
        self._pending |= set(range(current))
        self._next_tx = tx
        return set(self._pending)

    @property
    def switching(self) -> bool:
        return bool(self._pending)

    def pending_drain(self) -> frozenset[int]:
        return frozenset(self._pending)

    def drained(self, pair: int) -> None:
        """The device finished ``pair`` up to its switch mark."""
        self._pending.discard(pair)
        if not self._pending:
            self.tx_pairs = self._next_tx

    def drain_done(self) -> None:
        """All old transmit queues are finished: the new transmit count applies."""
        self._pending.clear()
        self.tx_pairs = self._next_tx

    def tx_allowed(self, pair: int) -> bool:
        """Whether the device may process transmit queue ``pair`` now."""
        if self._pending:
            return pair in self._pending
        return 0 <= pair < self.tx_pairs

    # -- per packet ----------------------------------------------------------------

    def note_tx(self, frame: bytes | bytearray | memoryview, pair: int, now: float) -> None:
        """Record that the guest sent ``frame`` on ``pair`` at ``now``."""
        p = _parse(frame)
        if p is None:
            return
        fid = _flow_key_parsed(frame, p)
        flows = self._flows
        entry = flows.get(fid)
        if entry is not None:
            entry[0] = pair
            entry[1] = now
            flows.move_to_end(fid)
            return
        if len(flows) >= self.flow_table_size:
            flows.popitem(last=False)
            self.stats.flows_evicted += 1
        flows[fid] = [pair, now]

    def choose_rx(self, frame: bytes | bytearray | memoryview, now: float) -> tuple[int, int, int]:
        """(pair, hash_value, hash_report) for a frame arriving at ``now``."""
        n = self.active_pairs
        rss = self.rss
        if n == 1 and rss is None and not self.hash_types:
            return 0, 0, HASH_REPORT_NONE  # nothing to decide: skip parsing
        p = _parse(frame)
        h, report = 0, HASH_REPORT_NONE
        if p is not None and self.hash_types:
            h, report = _hash_parsed(frame, p, self.hash_key, self.hash_types)
        if rss is not None:
            self.stats.rss += 1
            if rss.hash_types == self.hash_types and rss.key == self.hash_key:
                rh, rrep = h, report
            elif p is not None and rss.hash_types:
                rh, rrep = _hash_parsed(frame, p, rss.key, rss.hash_types)
            else:
                rh, rrep = 0, HASH_REPORT_NONE
            q = rss.select_queue(rh) if rrep != HASH_REPORT_NONE else rss.unclassified_queue
            return (q if q < n else q % n), h, report
        if n == 1 or p is None:
            return 0, h, report
        fid = _flow_key_parsed(frame, p)
        entry = self._flows.get(fid)
        if entry is not None:
            pair = int(entry[0])
            if now - entry[1] <= self.flow_ttl and pair < n:
                self.stats.flow_hits += 1
                return pair, h, report
            if now - entry[1] > self.flow_ttl:
                del self._flows[fid]
                self.stats.flows_expired += 1
        self.stats.flow_misses += 1
        return crc32(fid) % n, h, report  # deterministic across processes

    def flow_count(self) -> int:
        return len(self._flows)
