"""Multiqueue TAP port: one ``/dev/net/tun`` fd per queue pair, vnet header on.

Every queue fd is opened with ``TUNSETIFF`` ``IFF_TAP | IFF_MULTI_QUEUE |
IFF_VNET_HDR | IFF_NO_PI`` on the same interface and ``TUNSETVNETHDRSZ``
:data:`~virtnet.ports.base.VNET_HDR_LEN`, so one ``read``/``write`` on it is one
frame preceded by a ``virtio_net_hdr_v1`` (Documentation/networking/tuntap.rst).

Invariants:

* A :class:`TapPort` belongs to one VM: queues of a second VM are refused.
* The interface is created if missing (and then disappears with its last
  queue fd unless ``persist=True``); an existing interface is attached only if
  it is a TAP with ``multi_queue`` -- anything else is a :class:`UsageError`.
* Queue fds are nonblocking and close-on-exec.  The supervisor keeps its copy
  of each fd to run ``TUNSETQUEUE``/``TUNSETOFFLOAD`` on it; the worker gets a
  duplicate (fork or ``SCM_RIGHTS``); both refer to the same kernel queue.
* The kernel steers rx by its own flow table (rx follows tx) over the
  *attached* queues; :meth:`TapPort.set_queue_enabled` detaches the queue of a
  disabled pair so no rx is steered to it.
* Offloads are off until :meth:`TapPort.set_offloads` turns on what the guest
  negotiated; TSO needs CSUM (the kernel ignores TSO without it).
* A tap serve created follows the MTU the VM's NIC announces
  (``VHOST_USER_NET_SET_MTU``, QEMU's ``host_mtu``) when that is larger, as
  libvirt sets a tap's MTU from ``<mtu>``; a tap that existed is left as its
  owner set it, and a smaller MTU there is logged as a warning.
* A deleted interface leaves the queue fds dead (``TUNGETIFF``: EBADFD,
  :meth:`TapPort.lost`); :meth:`TapPort.drop_queues` closes them so the next
  queue opened attaches to (or creates) the interface of that name again.  A
  tap serve creates again gets the MAC address the old one had, so hosts and
  guests that cached it need not learn a new one.
* Frames the kernel drops on the tap itself are counted by the kernel, not by
  a worker: to the guest when a queue's ring (``txqueuelen`` frames) is full
  because nothing reads it -- typically a guest that posts no rx buffers --
  and from the guest when the kernel refuses a written frame.
  :meth:`TapPort.host_drops` reads both from ``/proc/net/dev``, which shows
  the reading process's network namespace (``/sys/class/net`` shows the one
  sysfs was mounted in).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import struct
import sys

from virtnet.errors import UsageError
from virtnet.ports.base import VNET_HDR_LEN, FdQueue, Offload, PortQueue

__all__ = [
    "IFF_MULTI_QUEUE",
    "IFF_NO_PI",
    "IFF_TAP",
    "IFF_VNET_HDR",
    "MAX_NETDEV_BYTES",
    "MAX_TAP_QUEUES",
    "NETDEV_STATS",
    "TapPort",
    "TapQueue",
    "netdev_drops",
]

TUN_PATH = "/dev/net/tun"
# include/uapi/linux/if_tun.h ioctls (_IOW('T', n, int) / _IOR).
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNGETFEATURES = 0x800454CF
TUNSETOFFLOAD = 0x400454D0
TUNGETIFF = 0x800454D2
TUNSETVNETHDRSZ = 0x400454D8
TUNSETQUEUE = 0x400454D9
TUNSETVNETLE = 0x400454DC
# TUNSETIFF / TUNSETQUEUE flags.
IFF_TUN = 0x0001
IFF_TAP = 0x0002
IFF_MULTI_QUEUE = 0x0100
IFF_ATTACH_QUEUE = 0x0200
IFF_DETACH_QUEUE = 0x0400
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
# TUNSETOFFLOAD flags.
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40
# drivers/net/tun.c MAX_TAP_QUEUES: queues one tun/tap device can have.
MAX_TAP_QUEUES = 256
# include/uapi/linux/if.h IFNAMSIZ (includes the NUL).
IFNAMSIZ = 16
# SIOCGIFFLAGS / SIOCSIFFLAGS and IFF_UP (include/uapi/linux/sockios.h, if.h).
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1

# SIOCGIFMTU / SIOCSIFMTU (include/uapi/linux/sockios.h).
SIOCGIFMTU = 0x8921
SIOCSIFMTU = 0x8922
# SIOCGIFHWADDR / SIOCSIFHWADDR and ARPHRD_ETHER (include/uapi/linux/if_arp.h).
SIOCGIFHWADDR = 0x8927
SIOCSIFHWADDR = 0x8924
_ARPHRD_ETHER = 1

_IFREQ = struct.Struct("16sH22x")  # struct ifreq: name + ifr_flags, 40 bytes
_IFREQ_INT = struct.Struct("16si20x")  # struct ifreq: name + ifr_mtu
_IFREQ_PTR = struct.Struct("16sP16x")  # struct ifreq: name + ifr_data pointer
_IFREQ_HW = struct.Struct("16sH6s16x")  # struct ifreq: name + ifr_hwaddr (family, MAC)
# include/uapi/linux/sockios.h SIOCETHTOOL; ethtool.h ETHTOOL_GDRVINFO and the
# head of struct ethtool_drvinfo (cmd, driver[32], version[32], fw_version[32],
# bus_info[32], ...; 196 bytes in all).
SIOCETHTOOL = 0x8946
ETHTOOL_GDRVINFO = 0x00000003
_DRVINFO = struct.Struct("I32s64x32s64x")
_INT = struct.Struct("i")

_OFFLOAD_BITS = {
    Offload.CSUM: TUN_F_CSUM,
    Offload.TSO4: TUN_F_TSO4,
    Offload.TSO6: TUN_F_TSO6,
    Offload.TSO_ECN: TUN_F_TSO_ECN,
    Offload.UFO: TUN_F_UFO,
    Offload.USO: TUN_F_USO4 | TUN_F_USO6,  # kernel >= 6.2
}

_WANT_FLAGS = IFF_TAP | IFF_MULTI_QUEUE | IFF_VNET_HDR | IFF_NO_PI

#: Per-interface counters of the reading process's namespace (net/core/net-procfs.c:
#: "face |bytes packets errs drop fifo frame compressed multicast|bytes packets
#: errs drop fifo colls carrier compressed").
NETDEV_STATS = "/proc/net/dev"
_NETDEV_FIELDS = 16
_RX_DROP, _TX_DROP = 3, 11
#: Bytes of ``/proc/net/dev`` read at most (about 200 bytes per interface).
MAX_NETDEV_BYTES = 4 << 20


def netdev_drops(ifname: str, text: str) -> tuple[int, int] | None:
    """``(rx drop, tx drop)`` of ``ifname`` in a ``/proc/net/dev`` text, or
    None when the interface is not listed or its line is not 16 counters."""
    for line in text.splitlines()[2:]:
        name, sep, rest = line.partition(":")
        if not sep or name.strip() != ifname:
            continue
        fields = rest.split()
        if len(fields) != _NETDEV_FIELDS or not all(f.isdigit() for f in fields):
            return None
        return int(fields[_RX_DROP]), int(fields[_TX_DROP])
    return None


def _check_ifname(ifname: str) -> bytes:
    raw = ifname.encode()
    # '%' would make the kernel pick the name itself (a "%d" template), ':'
    # and whitespace it refuses (net/core/dev.c dev_valid_name).
    if (
        not raw
        or len(raw) >= IFNAMSIZ
        or any(c in raw for c in b"/:%\0")
        or any(c.isspace() for c in ifname)
    ):
        raise UsageError(
            f"bad interface name {ifname!r} (1..{IFNAMSIZ - 1} bytes, none of '/', ':', '%',"
            " blanks)"
        )
    return raw


def _ifindex(ifname: str) -> int | None:
    """The interface's index in the *current* network namespace, None if absent."""
    try:
        return socket.if_nametoindex(ifname)
    except OSError:
        return None


def _if_ioctl(request: int, arg: bytes) -> bytes:
    """An interface ioctl (``struct ifreq`` in ``arg``) on a throw-away socket of
    the current network namespace; its result, OSError when it fails."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        res: bytes = fcntl.ioctl(s, request, arg)
        return res


def tun_kind(ifname: str) -> str | None:
    """``"tap"``/``"tun"`` for a tun/tap interface, ``"other"`` for anything else,
    None if there is no such interface -- in the *current* network namespace.

    Uses the ethtool driver info (``tun`` driver, bus ``tap``/``tun``), which,
    unlike sysfs, always describes the caller's namespace.
    """
    if _ifindex(ifname) is None:
        return None
    info = ctypes.create_string_buffer(_DRVINFO.size)
    _DRVINFO.pack_into(info, 0, ETHTOOL_GDRVINFO, b"", b"")
    req = _IFREQ_PTR.pack(_check_ifname(ifname), ctypes.addressof(info))
    try:
        _if_ioctl(SIOCETHTOOL, req)
    except OSError:
        return "other"
    _cmd, driver, bus = _DRVINFO.unpack_from(info, 0)
    if driver.rstrip(b"\0") != b"tun":
        return "other"
    return "tun" if bus.rstrip(b"\0") == b"tun" else "tap"


class TapQueue(FdQueue):
    """The queue of one pair: an :class:`FdQueue` over a tap queue fd."""

    __slots__ = ("attached", "pair")

    def __init__(self, fd: int, pair: int) -> None:
        super().__init__(fd)
        self.pair = pair
        self.attached = True


class TapPort:
    """One VM's multiqueue tap interface."""

    def __init__(self, ifname: str, *, up: bool = False, persist: bool = False) -> None:
        self.ifname = ifname
        self._raw = _check_ifname(ifname)
        self._up = up
        self._persist = persist
        self._vm_id: str | None = None
        self._queues: dict[int, TapQueue] = {}
        self._offload_bits = 0
        self.created = False
        self._hwaddr: bytes | None = None  # the interface's MAC, last seen

    # -- Port ---------------------------------------------------------------

    def open_queue(self, vm_id: str, pair: int) -> PortQueue:
        if self._vm_id is not None and vm_id != self._vm_id:
            raise UsageError(
                f"tap {self.ifname!r} already serves VM {self._vm_id!r}; "
                f"give VM {vm_id!r} its own tap"
            )
        if not 0 <= pair < MAX_TAP_QUEUES:
            raise UsageError(f"queue pair {pair} out of range 0..{MAX_TAP_QUEUES - 1}")
        if pair in self._queues:
            raise UsageError(f"queue pair {pair} of tap {self.ifname!r} is already open")
        fd = self._open_fd()
        if not self._queues:
            if self.created and self._hwaddr is not None:
                self._set_hwaddr(self._hwaddr)  # a tap serve creates again keeps its MAC
            else:
                self._hwaddr = self.hwaddr()
        q = TapQueue(fd, pair)
        self._queues[pair] = q
        self._vm_id = vm_id
        if self._up:
            self.set_up(True)
        return q

    def offloads(self) -> frozenset[Offload]:
        return frozenset(_OFFLOAD_BITS)

    def close(self) -> None:
        for q in self._queues.values():
            q.close()
        self._queues.clear()

    def drop_queues(self) -> None:
        """Close every queue (the interface is gone); the next :meth:`open_queue`
        attaches to the interface by that name again, or creates it."""
        self.close()
        self.created = False

    def lost(self) -> bool:
        """Whether the interface these queues belong to was deleted: an
        attached queue's fd then answers ``TUNGETIFF`` with EBADFD (it still
        works when the interface moved to another network namespace).  A
        port with no attached queue cannot tell: False."""
        q = next((q for q in self._queues.values() if q.attached), None)
        fd = None if q is None else q.fileno()
        if fd is None:
            return False
        try:
            fcntl.ioctl(fd, TUNGETIFF, _IFREQ.pack(b"", 0))
        except OSError as exc:
            return exc.errno == errno.EBADFD
        self._hwaddr = self.hwaddr() or self._hwaddr
        return False

    def hwaddr(self) -> bytes | None:
        """The interface's MAC address; None when it is not there."""
        try:
            res = _if_ioctl(SIOCGIFHWADDR, _IFREQ_HW.pack(self._raw, 0, b""))
        except OSError:
            return None
        mac: bytes = _IFREQ_HW.unpack(res)[2]
        return mac

    def _set_hwaddr(self, mac: bytes) -> None:
        try:
            _if_ioctl(SIOCSIFHWADDR, _IFREQ_HW.pack(self._raw, _ARPHRD_ETHER, mac))
        except OSError:
            self._hwaddr = self.hwaddr()  # the new random one, then

    # -- tap control (supervisor side) -------------------------------------

    def queue(self, pair: int) -> TapQueue:
        return self._queues[pair]

    def set_offloads(self, offloads: set[Offload] | frozenset[Offload]) -> None:
        """Tell the kernel which offloads the guest accepts on rx (TUNSETOFFLOAD).

        Call with the guest's negotiated VIRTIO_NET_F_GUEST_CSUM/TSO4/TSO6/ECN.
        """
        bits = 0
        for o in offloads:
            bits |= _OFFLOAD_BITS[o]
        if bits & ~TUN_F_CSUM and not bits & TUN_F_CSUM:
            raise UsageError("TSO offloads need CSUM (virtio 1.3 section 5.1.3.1)")
        self._offload_bits = bits
        # The setting is per device; a detached queue's fd cannot change it.
        q = next((q for q in self._queues.values() if q.attached), None)
        if q is not None:
            self._apply_offloads(q)

    def set_queue_enabled(self, pair: int, enabled: bool) -> None:
        """Attach/detach the queue of ``pair`` (TUNSETQUEUE) so rx is (not) steered to it."""
        q = self._queues[pair]
        if q.attached == enabled:
            return
        fd = q.fileno()
        assert fd is not None
        flag = IFF_ATTACH_QUEUE if enabled else IFF_DETACH_QUEUE
        try:
            fcntl.ioctl(fd, TUNSETQUEUE, _IFREQ.pack(b"", flag))
        except OSError as exc:
            raise UsageError(f"TUNSETQUEUE on {self.ifname!r} pair {pair}: {exc}") from exc
        q.attached = enabled

    def host_drops(self, path: str = NETDEV_STATS) -> dict[str, int] | None:
        """The kernel's drops on this tap, named from the guest's side:
        ``to_guest`` (the tap's transmit drops: frames the host sent while
        the queue was full) and ``from_guest`` (its receive drops: written
        frames the kernel refused); None when the interface is not there."""
        try:
            with open(path, encoding="ascii", errors="replace") as f:
                text = f.read(MAX_NETDEV_BYTES)
        except OSError:
            return None
        drops = netdev_drops(self.ifname, text)
        if drops is None:
            return None
        return {"to_guest": drops[1], "from_guest": drops[0]}

    def set_up(self, up: bool = True) -> None:
        """Set or clear IFF_UP on the interface."""
        try:
            flags = _IFREQ.unpack(_if_ioctl(SIOCGIFFLAGS, _IFREQ.pack(self._raw, 0)))[1]
            flags = flags | _IFF_UP if up else flags & ~_IFF_UP
            _if_ioctl(SIOCSIFFLAGS, _IFREQ.pack(self._raw, flags))
        except OSError as exc:
            raise UsageError(f"cannot set {self.ifname!r} up={up}: {exc}") from exc

    def mtu(self) -> int | None:
        """The interface's MTU; None when it is not there."""
        try:
            res = _if_ioctl(SIOCGIFMTU, _IFREQ_INT.pack(self._raw, 0))
        except OSError:
            return None
        mtu: int = _IFREQ_INT.unpack(res)[1]
        return mtu

    def set_mtu(self, mtu: int) -> None:
        """Set the interface's MTU (SIOCSIFMTU)."""
        try:
            _if_ioctl(SIOCSIFMTU, _IFREQ_INT.pack(self._raw, mtu))
        except OSError as exc:
            raise UsageError(f"cannot set the MTU of {self.ifname!r} to {mtu}: {exc}") from exc

    # -- internals ----------------------------------------------------------

    def _open_fd(self) -> int:
        existed = _ifindex(self.ifname) is not None
        if not existed and not self._queues:
            self.created = True
        try:
            fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise UsageError(f"cannot open {TUN_PATH}: {exc}") from exc
        try:
            try:
                fcntl.ioctl(fd, TUNSETIFF, _IFREQ.pack(self._raw, _WANT_FLAGS))
            except OSError as exc:
                if exc.errno == errno.EINVAL and existed:
                    raise UsageError(self._explain_existing(exc)) from exc
                raise UsageError(
                    f"TUNSETIFF {self.ifname!r} (tap, multi_queue, vnet_hdr): {exc}"
                ) from exc
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, _INT.pack(VNET_HDR_LEN))
            if sys.byteorder == "big":  # virtio 1.x headers are little-endian
                fcntl.ioctl(fd, TUNSETVNETLE, _INT.pack(1))
            if self._persist:
                fcntl.ioctl(fd, TUNSETPERSIST, 1)
            self._apply_offloads(fd)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _explain_existing(self, exc: OSError) -> str:
        kind = tun_kind(self.ifname)
        name = self.ifname
        if kind == "other":
            return f"interface {name!r} exists and is not a tun/tap device"
        if kind == "tun":
            return f"interface {name!r} is a tun, not a tap"
        return (
            f"tap {name!r} exists without multi_queue ({exc}); recreate it with "
            f"'ip tuntap add dev {name} mode tap multi_queue vnet_hdr'"
        )

    def _apply_offloads(self, q: TapQueue | int) -> None:
        fd = q if isinstance(q, int) else q.fileno()
        assert fd is not None
        try:
            fcntl.ioctl(fd, TUNSETOFFLOAD, self._offload_bits)
        except OSError as exc:
            raise UsageError(
                f"TUNSETOFFLOAD {self._offload_bits:#x} on {self.ifname!r}: {exc}"
            ) from exc
