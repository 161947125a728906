"""The two exception families of virtnet.

Invariants:

* Anything that comes from an untrusted side -- a guest's rings and memory, a
  vhost-user or XenStore socket peer, a file -- and is wrong raises a subclass
  of :class:`PeerError`.  Servers catch ``PeerError`` at the connection
  boundary, log it, count it and drop that peer; they never let it take down
  the process.
* A mistake of the local user (bad command-line arguments, a missing
  program) raises :class:`UsageError`.
* Any other exception escaping a virtnet module is a bug.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "ControlError",
    "GrantError",
    "GuestMemoryError",
    "PeerError",
    "ProtocolError",
    "UsageError",
    "VirtqueueError",
    "XenStoreError",
]


class PeerError(Exception):
    """Bad input from an untrusted peer (guest, socket peer, file)."""


class GuestMemoryError(PeerError):
    """A guest address, length or region table that does not fit guest memory."""


class VirtqueueError(PeerError):
    """A malformed virtqueue: bad descriptor chain, index, flags or layout."""


class ControlError(PeerError):
    """A malformed virtio-net control-queue command."""


class ProtocolError(PeerError):
    """A vhost-user (or other socket protocol) message that breaks the protocol."""


class XenStoreError(PeerError):
    """A malformed XenStore wire message or an invalid XenStore request."""


class GrantError(PeerError):
    """A grant reference or event channel the peer may not use."""


class UsageError(Exception):
    """The local user's own mistake: bad arguments, missing tools or files."""


class ConfigError(UsageError):
    """An invalid configuration given by the local user."""
