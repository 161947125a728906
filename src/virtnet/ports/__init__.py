"""Host-side ports: where a VM's frames leave and enter the host.

See :mod:`virtnet.ports.base` for the queue contract.  Kinds: ``tap:IFNAME``
(:mod:`~virtnet.ports.tap`), ``switch`` (:mod:`~virtnet.ports.switch`),
``loopback`` (:mod:`~virtnet.ports.loopback`), ``null`` (:mod:`~virtnet.ports.null`).
"""

from __future__ import annotations

from virtnet.ports.base import (
    MAX_FRAME_LEN,
    VNET_HDR_LEN,
    FdQueue,
    Offload,
    Port,
    PortQueue,
    QueueCounters,
    SocketQueue,
    attach_queue,
    make_port,
)

__all__ = [
    "MAX_FRAME_LEN",
    "VNET_HDR_LEN",
    "FdQueue",
    "Offload",
    "Port",
    "PortQueue",
    "QueueCounters",
    "SocketQueue",
    "attach_queue",
    "make_port",
]
