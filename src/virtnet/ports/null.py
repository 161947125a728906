"""The null port: every frame sent is counted and discarded; nothing is received.

Invariants: ``send`` always succeeds (frames are accepted, then discarded) and
counts ``tx_packets``/``tx_bytes``; a frame shorter than the vnet header is
counted as ``tx_dropped``.  ``recv_into`` always returns 0.  No fd.
"""

from __future__ import annotations

from collections.abc import Sequence

from virtnet.ports.base import VNET_HDR_LEN, Offload, PortQueue, QueueCounters

__all__ = ["NullPort", "NullQueue"]


class NullQueue(QueueCounters):
    """A queue that swallows every frame."""

    __slots__ = ()

    def fileno(self) -> int | None:
        return None

    def send(self, bufs: Sequence[memoryview]) -> bool:
        n = 0
        for b in bufs:
            n += b.nbytes
        if n < VNET_HDR_LEN:
            self.tx_dropped += 1
            return False
        self.tx_packets += 1
        self.tx_bytes += n - VNET_HDR_LEN
        return True

    def recv_into(self, bufs: Sequence[memoryview]) -> int:
        return 0

    def close(self) -> None:
        pass


class NullPort:
    """Port whose queues swallow everything; carries every offload (nothing to do)."""

    def open_queue(self, vm_id: str, pair: int) -> PortQueue:
        return NullQueue()

    def offloads(self) -> frozenset[Offload]:
        return frozenset(Offload)

    def close(self) -> None:
        pass
