"""The loopback port: each frame sent on pair P comes back on pair P's rx.

The frame comes back with its destination and source MAC addresses swapped
and its vnet header unchanged (so partial checksums and GSO metadata are
returned as sent; the loopback carries every offload).

Invariants:

* Everything happens inside the worker: no fd, no syscall.  ``fileno()`` is
  None; the worker polls ``recv_into`` after each tx batch.
* At most :data:`LOOPBACK_QUEUE_LEN` frames wait; a send beyond that is
  counted as ``tx_dropped`` and returns False.
* A frame shorter than vnet header + Ethernet header is dropped on tx
  (``tx_dropped``); a frame longer than the rx buffers is dropped on rx
  (``rx_dropped``), like a kernel ``MSG_TRUNC``.
* One copy in (``bytearray.join``), one copy out (slice assignment).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from virtnet.ports.base import MAX_FRAME_LEN, VNET_HDR_LEN, Offload, PortQueue, QueueCounters

__all__ = ["LOOPBACK_QUEUE_LEN", "LoopbackPort", "LoopbackQueue"]

# Frames waiting between tx and rx of one pair (a virtio queue is at most
# 32768 entries, virtio 1.3 section 2.7; 1024 covers a full default ring of 256
# plus slack).
LOOPBACK_QUEUE_LEN = 1024

_ETH_HDR_LEN = 14
_DST = slice(VNET_HDR_LEN, VNET_HDR_LEN + 6)
_SRC = slice(VNET_HDR_LEN + 6, VNET_HDR_LEN + 12)
_MIN = VNET_HDR_LEN + _ETH_HDR_LEN
_MAX = VNET_HDR_LEN + MAX_FRAME_LEN
_EMPTY = bytearray()


class LoopbackQueue(QueueCounters):
    """A bounded in-memory queue that returns frames with MACs swapped."""

    __slots__ = ("_q",)

    def __init__(self) -> None:
        super().__init__()
        self._q: deque[bytearray] = deque()

    def fileno(self) -> int | None:
        return None

    def pending(self) -> int:
        """Frames waiting for ``recv_into``."""
        return len(self._q)

    def send(self, bufs: Sequence[memoryview]) -> bool:
        q = self._q
        if len(q) >= LOOPBACK_QUEUE_LEN:
            self.tx_dropped += 1
            return False
        d = _EMPTY.join(bufs)
        n = len(d)
        if n < _MIN or n > _MAX:
            self.tx_dropped += 1
            return False
        d[_DST], d[_SRC] = d[_SRC], d[_DST]
        q.append(d)
        self.tx_packets += 1
        self.tx_bytes += n - VNET_HDR_LEN
        return True

    def recv_into(self, bufs: Sequence[memoryview]) -> int:
        q = self._q
        if not q:
            return 0
        d = q.popleft()
        n = len(d)
        first = bufs[0]
        if first.nbytes >= n:
            first[:n] = d
        else:
            room = 0
            for b in bufs:
                room += b.nbytes
            if room < n:
                self.rx_dropped += 1
                return 0
            src = memoryview(d)
            off = 0
            for b in bufs:
                take = min(b.nbytes, n - off)
                b[:take] = src[off : off + take]
                off += take
                if off == n:
                    break
        self.rx_packets += 1
        self.rx_bytes += n - VNET_HDR_LEN
        return n

    def close(self) -> None:
        self._q.clear()


class LoopbackPort:
    """Port whose queues loop every frame back to the same pair."""

    def open_queue(self, vm_id: str, pair: int) -> PortQueue:
        return LoopbackQueue()

    def offloads(self) -> frozenset[Offload]:
        return frozenset(Offload)

    def close(self) -> None:
        pass
