"""Readiness notification to a service manager (systemd's ``sd_notify`` protocol).

When ``$NOTIFY_SOCKET`` is set (systemd does so for ``Type=notify`` units),
:func:`notify` sends one datagram of newline-separated ``KEY=VALUE`` lines to
it: ``READY=1`` once the daemon's sockets accept connections, ``STATUS=...``
for ``systemctl status``, ``STOPPING=1`` on shutdown.  A name starting with
``@`` is in the abstract namespace.  Without ``$NOTIFY_SOCKET`` nothing is
sent.

Written here rather than imported: the protocol is one ``sendto`` on an
``AF_UNIX`` datagram socket (the standard library has everything), and the
Python bindings to libsystemd need its C headers to build.

Invariant: a failure to notify is logged once per call and never raised --
the daemon serves its VMs whether or not a manager listens.
"""

from __future__ import annotations

import logging
import os
import socket

__all__ = ["MAX_STATE", "notify"]

log = logging.getLogger(__name__)

#: Largest notification sent (bytes); systemd reads one datagram of up to
#: its pipe buffer, and ours are a few lines.
MAX_STATE = 4096


def notify(state: str, *, env: dict[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1\\nSTATUS=serving"``); True if it was sent."""
    path = (os.environ if env is None else env).get("NOTIFY_SOCKET", "")
    if not path:
        return False
    data = state.encode()
    if len(data) > MAX_STATE:
        data = data[:MAX_STATE].rsplit(b"\n", 1)[0]
    addr = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(data, addr)
    except OSError as exc:
        log.warning("cannot notify the service manager at %s: %s", path, exc)
        return False
    return True
