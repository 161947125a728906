"""A queue-pair worker in this process, on guest memory of its own.

For tests and benches of the worker's data path without a VM: the guest's
memory is a memfd, the driver's side of both rings is a :class:`DriverQueue`
here, and the worker (:class:`virtnet.vhost_user.worker.Worker`, not forked)
serves them against a port queue the caller opened (a tap queue, usually).
Ring and buffer layout: the rx ring at :data:`RX_RING`, the tx ring at
:data:`TX_RING`, posted buffers in slots of :data:`SLOT` bytes from
:data:`BUFS`.
"""

from __future__ import annotations

import os
import socket
import subprocess

from virtnet.memory import GuestMemory, MemoryRegion
from virtnet.net import NetFeature
from virtnet.packed import FRESH_BASE, PackedDriverQueue, packed_ring_layout
from virtnet.ports.base import PortQueue
from virtnet.ports.tap import TapPort
from virtnet.vhost_user.worker import RegionSpec, RingSpec, Worker, WorkerSpec
from virtnet.virtq import DriverQueue, split_ring_layout

QSIZE = 256
MEM_SIZE = 8 << 20
RX_RING, TX_RING, BUFS = 0x10000, 0x20000, 0x100000
SLOT = 8192  # guest memory per posted chain; QSIZE slots, then room for tx frames
USER_ADDR = 1 << 40


def quiet_tap(name: str, mtu: int | None = None) -> TapPort:
    """A new tap with queue 0 open (:meth:`TapPort.queue`), brought up without
    IPv6 so that the kernel puts none of its own frames (duplicate-address
    detection, MLD reports) into the queue a test or bench reads (root)."""
    port = TapPort(name)
    try:
        port.open_queue("vm", 0)
        with open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "w") as f:
            f.write("1")
        if mtu is not None:
            subprocess.run(["ip", "link", "set", name, "mtu", str(mtu)], check=True,
                           capture_output=True, timeout=10)  # fmt: skip
        port.set_up(True)
    except BaseException:
        port.close()
        raise
    return port


class WorkerHarness:
    """A worker on ``port`` (of ``port_kind``) and the driver's side of its rings.

    ``gso``: the guest takes checksum-offloaded TSO frames (a 64 KiB receive
    reserve); ``eventfds``: real kick and call eventfds (:attr:`efds`: kick rx,
    kick tx, call rx, call tx), else none and the worker polls; ``packed``:
    packed virtqueues (VIRTIO_F_RING_PACKED; the driver side is then a
    :class:`~virtnet.packed.PackedDriverQueue`, with the same interface).
    """

    def __init__(
        self,
        port: PortQueue,
        *,
        gso: bool,
        mtu: int,
        eventfds: bool = False,
        port_kind: str = "tap",
        packed: bool = False,
    ) -> None:
        self.memfd = os.memfd_create("guest", 0)
        os.ftruncate(self.memfd, MEM_SIZE)
        self.mem = GuestMemory(
            [MemoryRegion.from_fd(self.memfd, guest_addr=0, size=MEM_SIZE, user_addr=USER_ADDR)]
        )
        lay = packed_ring_layout(QSIZE) if packed else split_ring_layout(QSIZE)
        queue = PackedDriverQueue if packed else DriverQueue
        # In order: the harness checks that the worker uses buffers in turn.
        self.rx, self.tx = (
            queue(
                self.mem,
                QSIZE,
                *(b + a for a in (lay.desc, lay.avail, lay.used)),
                event_idx=True,
                in_order=True,
            )
            for b in (RX_RING, TX_RING)
        )
        feats = (
            NetFeature.VERSION_1 | NetFeature.MRG_RXBUF | NetFeature.EVENT_IDX | NetFeature.IN_ORDER
        )
        if packed:
            feats |= NetFeature.RING_PACKED
        if gso:
            feats |= NetFeature.GUEST_CSUM | NetFeature.GUEST_TSO4 | NetFeature.GUEST_TSO6
        self.efds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(4)] if eventfds else []
        fds: list[int | None] = [*self.efds] if eventfds else [None] * 4
        rings = [
            RingSpec(i, QSIZE, b + lay.desc, b + lay.avail, b + lay.used,
                     FRESH_BASE if packed else 0, fds[i], fds[2 + i], None)
            for i, b in ((0, RX_RING), (1, TX_RING))
        ]  # fmt: skip
        regions = (RegionSpec(0, MEM_SIZE, USER_ADDR, 0, os.dup(self.memfd)),)  # the worker's
        spec = WorkerSpec("harness", 0, int(feats), regions,
                          rings[0], rings[1], port_kind, port.fileno(), mtu=mtu)  # fmt: skip
        self.ctl = socket.socketpair()
        self.worker = Worker(spec, self.ctl[0], port=port)

    @staticmethod
    def slot_addr(slot: int) -> int:
        """Guest address of buffer slot ``slot``."""
        return BUFS + slot * SLOT

    def post(self, slot: int, sizes: tuple[int, ...]) -> None:
        """One rx chain in buffer slot ``slot`` (its token): a buffer per size."""
        addr = self.slot_addr(slot)
        bufs = []
        for n in sizes:
            bufs.append((addr, n))
            addr += n
        self.rx.add([], bufs, slot)

    def close(self) -> None:
        """Release the worker and the guest memory; the port queue outlives
        them, and its counters start again at zero."""
        p = self.worker.port
        p.rx_packets = p.rx_bytes = p.rx_dropped = p.tx_packets = p.tx_bytes = p.tx_dropped = 0
        self.worker.ep.close()
        self.worker.mem.close()
        self.mem.close()
        for fd in (self.memfd, *self.efds):
            os.close(fd)
        for s in self.ctl:
            s.close()
