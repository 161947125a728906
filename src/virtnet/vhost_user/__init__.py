"""vhost-user: message codec, backend state machine, control-socket server.

* :mod:`virtnet.vhost_user.codec` -- sans-I/O wire format and incremental reader.
* :mod:`virtnet.vhost_user.backend` -- sans-I/O device-side state machine and
  the :class:`~virtnet.vhost_user.backend.BackendEvents` interface a
  supervisor implements to run rings in worker processes.
* :mod:`virtnet.vhost_user.server` -- Unix sockets, SCM_RIGHTS, one selector
  loop for many VMs.

Submodules are imported on demand; this package imports nothing heavy.
"""

from __future__ import annotations

__all__: list[str] = []
