"""Test helpers that boot real guests and build network namespaces.

* :mod:`virtnet.testing.guest` -- initramfs builder, :class:`Guest` (QEMU/TCG
  launcher with a serial command agent), netdev argument helpers.
* :mod:`virtnet.testing.netns` -- :class:`NetNS` (network namespaces, taps,
  veths, iperf3 servers), always cleaned up.
* :mod:`virtnet.testing.procs` -- :func:`stop_process` (SIGTERM, wait, SIGKILL).
* :mod:`virtnet.testing.fds` -- :func:`open_fds`, :func:`fd_is_open` (fd-leak checks).

The ``virtnet`` package proper never imports this package.
"""

from __future__ import annotations

from virtnet.testing.fds import fd_is_open, open_fds
from virtnet.testing.guest import (
    DEFAULT_MAC,
    ChannelInfo,
    CommandResult,
    Guest,
    GuestCommandError,
    GuestError,
    build_initramfs,
    default_initramfs_dir,
    find_kernel,
    queue_deltas,
    queue_packets,
    skip_reason,
    tap_netdev_args,
    vhost_user_netdev_args,
)
from virtnet.testing.netns import IperfServer, NetNS, NetnsError, create_tap, delete_link
from virtnet.testing.procs import stop_process

__all__ = [
    "DEFAULT_MAC",
    "ChannelInfo",
    "CommandResult",
    "Guest",
    "GuestCommandError",
    "GuestError",
    "IperfServer",
    "NetNS",
    "NetnsError",
    "build_initramfs",
    "create_tap",
    "default_initramfs_dir",
    "delete_link",
    "fd_is_open",
    "find_kernel",
    "open_fds",
    "queue_deltas",
    "queue_packets",
    "skip_reason",
    "stop_process",
    "tap_netdev_args",
    "vhost_user_netdev_args",
]
