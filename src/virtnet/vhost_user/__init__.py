"""vhost-user: message codec, backend state machine, control-socket server.

* :mod:`virtnet.vhost_user.codec` -- sans-I/O wire format and incremental reader.
* :mod:`virtnet.vhost_user.backend` -- sans-I/O device-side state machine and
  the :class:`~virtnet.vhost_user.backend.BackendEvents` interface a
  supervisor implements to run rings in worker processes.
* :mod:`virtnet.vhost_user.server` -- Unix sockets, SCM_RIGHTS, one selector
  loop for many VMs.
* :mod:`virtnet.vhost_user.handoff` -- ``PairRouter`` (a ``BackendEvents``
  routing ring ``i`` to the worker of pair ``i // 2``) and the SOCK_SEQPACKET
  messages that carry memory tables, ring configs and fds to workers.

Submodules are imported on demand; this package imports nothing heavy.
"""

from __future__ import annotations

__all__: list[str] = []
