r"""``virtnet serve``: the vhost-user virtio-net backend daemon.

One process serves any number of VMs (one ``--socket`` each) through one
:class:`~virtnet.vhost_user.server.Server` loop; every VM connection gets a
:class:`~virtnet.vhost_user.backend.Backend` whose events go to a
:class:`~virtnet.vhost_user.supervisor.Supervisor`, which forks one worker
process per running queue pair.

Invariants:

* Features offered: VERSION_1, MQ (``--queues`` pairs, 1..MAX_QUEUE_PAIRS),
  MRG_RXBUF, EVENT_IDX, INDIRECT_DESC, MTU, STATUS, GUEST_ANNOUNCE,
  RING_PACKED, IN_ORDER and, unless
  ``--no-offloads``, CSUM/GUEST_CSUM/HOST_TSO4/6/GUEST_TSO4/6: tap applies
  what the guest accepted with TUNSETOFFLOAD; loopback and null carry
  anything; the switch is told each VM's rx offloads and drops (counting)
  a GSO/partial-checksum frame for a VM that declined them -- every VM it
  serves is offered GUEST_CSUM/TSO, so this only bites a driver that
  declines them, and ``--no-offloads`` is the switch setting for such
  guests (no sender then produces GSO frames).
* ``tap:IF`` belongs to one VM: with several sockets the name must be a
  template (``tap:vn%d`` or ``tap:vn{}``, replaced by the VM's index);
  otherwise :class:`~virtnet.errors.UsageError`.
* Under a service manager (``$NOTIFY_SOCKET``, systemd ``Type=notify``):
  ``READY=1`` once every ``--socket`` listens (or, with ``--client``, is being
  dialled), ``STOPPING=1`` on shutdown (:mod:`virtnet.sdnotify`).
* SIGTERM/SIGINT end the loop; every connection is closed (which stops and
  reaps every worker), then the ports and the stats socket.
* The stats socket (``--stats-socket``) answers each connection with one
  JSON document (:func:`snapshot`) and closes it; it never blocks the loop
  longer than :data:`SWITCH_STATS_TIMEOUT_S` (the switch process's answer).
  Besides the workers' per-pair counters it carries the drops no worker
  sees: a tap's own (the kernel's, per VM) and the switch's (per reason).
* One worker process per enabled pair, unless ``--workers N``: at most N
  processes per VM, pair ``p`` in process ``p % N``.
* Workers are not pinned unless ``--pin CPUS`` (worker process ``p`` -> the
  ``p``-th CPU of the list, cyclically); ``--poll-us`` makes them busy-poll
  that long before sleeping (default 0: eventfd wake-ups); after a guest's
  transmit burst they leave its kicks off and look at the tx ring every
  ``--kick-defer-us`` (default :data:`~virtnet.vhost_user.worker.KICK_DEFER_US`,
  0: never) while bulk traffic flows, every 50 us otherwise, a few times
  before sleeping (:mod:`virtnet.vhost_user.worker`).
* ``--control-socket`` (mode 0600): ``virtnet ctl`` adds and removes VMs at
  run time (:mod:`virtnet.vhost_user.control`), one request per loop tick,
  each waited for at most ``control.TIMEOUT_S``; a bad request is answered
  with its error and changes nothing.  With ``--state-file`` the VMs added
  that way (with their later ``set``) are written there after every change
  and served again when serve starts; VMs of the command line stay the
  command line's.
* ``--vlans``: each switch member's 802.1Q VLANs (default untagged only);
  ``--mac``: the source MACs a VM is locked to on the switch (default: any).
* A switch process that dies is started again at once with the switch's
  configuration (VLANs, MAC locks, offloads, uplinks), and every VM's running
  pairs go on with new queues on it; when it dies more than
  :data:`SWITCH_MAX_RESTARTS` times within :data:`SWITCH_RESTART_WINDOW_S`
  serve stops with exit status 1.  A VM's tap or a switch uplink deleted
  under serve (checked every :data:`PORT_CHECK_S`) is created again (with its
  MAC) if serve had created it, else waited for; the traffic then goes on
  through it, without the VM reconnecting.  Frames a VM sends in between are
  counted as tx drops.
* The loop ticks every :data:`TICK_S` to reap and restart dead workers; a
  ring stop waits for its worker (bounded by the supervisor's timeouts), so
  control messages of other VMs may wait that long -- their data paths do not.

Usage::

    virtnet serve --socket /run/vm0.sock --port tap:vn0 --queues 4 \
        --stats-socket /run/virtnet/stats.sock
    qemu-system-x86_64 ... -object memory-backend-memfd,id=m,size=1G,share=on \
        -numa node,memdev=m -chardev socket,id=c0,path=/run/vm0.sock,reconnect-ms=1000 \
        -netdev vhost-user,id=n0,chardev=c0,queues=4 \
        -device virtio-net-pci,netdev=n0,mq=on,vectors=10
    virtnet stats --stats-socket /run/virtnet/stats.sock --watch
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import grp
import ipaddress
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from types import FrameType
from typing import Any, TypeVar

from virtnet.errors import PeerError, ProtocolError, UsageError
from virtnet.ports.base import Port, make_port
from virtnet.ports.switch import (
    DHCP_LEARNING,
    SLAAC_LEARNING,
    VLAN_MAX,
    Guard,
    SwitchPort,
    mac_text,
)
from virtnet.ports.tap import TapPort, tun_kind
from virtnet.sdnotify import notify
from virtnet.vhost_user.backend import LOG_ALL, MAX_QUEUE_PAIRS, Backend, BackendConfig
from virtnet.vhost_user.control import (
    MAX_REQUEST_BYTES,
    SWITCH_SETTINGS,
    TIMEOUT_S,
    AddVm,
    RemoveVm,
    SetSwitch,
    parse_guards,
    parse_ips,
    parse_macs,
    parse_rate,
    parse_request,
)
from virtnet.vhost_user.server import Endpoint, Server
from virtnet.vhost_user.stats import rate_text
from virtnet.vhost_user.supervisor import Supervisor, VmPort, feature_names
from virtnet.vhost_user.worker import (
    KICK_DEFER_ROUNDS,
    KICK_DEFER_SHORT_US,
    KICK_DEFER_US,
    MAX_KICK_DEFER_US,
)

__all__ = ["DEFAULT_QUEUES", "Daemon", "add_arguments", "run", "snapshot"]

log = logging.getLogger(__name__)

#: Queue pairs offered when --queues is not given.
DEFAULT_QUEUES = 8
#: Main-loop tick: how often dead workers are reaped and the stats socket polled.
TICK_S = 0.05
#: Client-mode redial interval (seconds).
RETRY_S = 0.5
#: Largest --state-file read (bytes); a VM's entry is about 150.
MAX_STATE_BYTES = 4 << 20
#: The state file's format.
STATE_VERSION = 1
#: How long a stats request waits for the switch process's counters.
SWITCH_STATS_TIMEOUT_S = 0.5
#: Seconds between checks that each VM's tap still exists.
PORT_CHECK_S = 1.0
#: The switch process is started again after it dies, at most this many times
#: within SWITCH_RESTART_WINDOW_S; after that serve stops with exit status 1
#: (a service manager's Restart= then takes over).
SWITCH_MAX_RESTARTS = 5
SWITCH_RESTART_WINDOW_S = 60.0


@dataclass
class _Vm:
    index: int
    name: str
    path: str
    port: Port
    vmport: VmPort
    endpoint: Endpoint | None = None
    supervisor: Supervisor | None = None


def _tap_spec(spec: str, index: int, count: int) -> str:
    if not spec.startswith("tap:"):
        return spec
    name = spec[4:]
    if "%d" in name:
        return "tap:" + name.replace("%d", str(index))
    if "{}" in name:
        return "tap:" + name.replace("{}", str(index))
    if count > 1:
        raise UsageError(
            f"--port {spec} serves one VM; with {count} sockets use a template "
            f"such as tap:{name}%d (one tap per VM)"
        )
    return spec


class Daemon:
    """The serve loop (also usable in-process from tests)."""

    def __init__(
        self,
        sockets: list[str],
        *,
        port: str = "switch",
        queues: int = DEFAULT_QUEUES,
        client: bool = False,
        poll_us: int = 0,
        stats_socket: str | None = None,
        offloads: bool = True,
        cpus: tuple[int, ...] = (),
        workers: int = 0,
        kick_defer_us: int = KICK_DEFER_US,
        vlans: Sequence[tuple[str | None, frozenset[int]]] = (),
        control_socket: str | None = None,
        macs: Sequence[tuple[str, frozenset[bytes]]] = (),
        state_file: str | None = None,
        socket_group: str | None = None,
        socket_mode: int | None = None,
        ips: Sequence[tuple[str, frozenset[bytes]]] = (),
        rates: Sequence[tuple[str, int]] = (),
        guards: Sequence[tuple[str, frozenset[Guard]]] = (),
        neigh_suppress: bool = False,
        mcast_snoop: bool = False,
        mcast_querier: bool = False,
    ) -> None:
        """``vlans``: the ``--vlans`` options (:func:`_vlans_arg`), switch only;
        ``control_socket``: where ``virtnet ctl`` adds and removes VMs;
        ``macs``: the ``--mac`` options (:func:`_mac_arg`), switch only;
        ``ips``: the ``--ip`` options (:func:`_ip_arg`), switch only;
        ``rates``: the ``--rate`` options (:func:`_rate_vm_arg`), switch only;
        ``guards``: the ``--guard`` options (:func:`_guard_arg`), switch only;
        ``neigh_suppress``: the switch answers ARP and neighbour solicitations
        for VMs held to one MAC and their addresses (``--neigh-suppress``);
        ``mcast_snoop``: the switch sends a multicast group's traffic to the
        VMs that reported it in IGMP or MLD (``--mcast-snoop``);
        ``mcast_querier``: and asks the VMs for their groups (``--mcast-querier``);
        ``state_file``: where the VMs ``virtnet ctl`` added are kept, to be
        served again after a restart (:meth:`_restore_state`);
        ``socket_group``, ``socket_mode``: ownership and mode of the VM sockets
        serve listens on, so that a QEMU not running as root can connect."""
        if not sockets:
            raise UsageError("at least one --socket is needed")
        if not 1 <= queues <= MAX_QUEUE_PAIRS:
            raise UsageError(f"--queues must be 1..{MAX_QUEUE_PAIRS}, not {queues}")
        if poll_us < 0:
            raise UsageError("--poll-us must be >= 0")
        if workers < 0:
            raise UsageError("--workers must be >= 0 (0: one process per queue pair)")
        if not 0 <= kick_defer_us <= MAX_KICK_DEFER_US:
            raise UsageError(f"--kick-defer-us must be 0..{MAX_KICK_DEFER_US}")
        if client and (socket_group is not None or socket_mode is not None):
            raise UsageError(
                "--socket-group and --socket-mode set the sockets serve listens on; with"
                " --client QEMU owns the socket"
            )
        self._socket_gid, self._socket_mode = _socket_perms(socket_group, socket_mode)
        self.workers = workers
        self.kick_defer_us = kick_defer_us
        if len(set(sockets)) != len(sockets):
            raise UsageError("the same --socket given twice")
        self.queues = queues
        self.poll_us = poll_us
        self.offloads = offloads
        allowed = os.sched_getaffinity(0)
        bad = [c for c in cpus if c not in allowed]
        if bad:
            raise UsageError(f"--pin: CPUs {bad} are not available (allowed: {sorted(allowed)})")
        self.cpus = cpus
        self.port_spec = port
        self.client = client
        self.server = Server()
        self.vms: list[_Vm] = []
        self._next_index = 0  # of the next VM: tap templates, name suffixes
        self._shared: Port | None = None
        #: Each switch member's VLANs, when --vlans set them.
        self.vlans: dict[str, frozenset[int]] = {}
        self._vlan_spec = tuple(vlans)
        #: Switch members locked to their MACs (--mac).
        self.macs: dict[str, frozenset[bytes]] = {}
        #: Switch members held to their source IPs (--ip).
        self.ips: dict[str, frozenset[bytes]] = {}
        #: Switch members policed to a rate, bit/s (--rate).
        self.rates: dict[str, int] = {}
        #: Switch members kept from being DHCP servers or routers (--guard).
        self.guards: dict[str, frozenset[Guard]] = {}
        self._stop = False
        #: serve's exit status: 1 once it gave up on a switch process that keeps dying.
        self.status = 0
        self._switch_deaths: list[float] = []
        self._next_port_check = 0.0
        #: VMs whose tap is gone, waiting for it to exist again: whether serve
        #: had created it (and so creates it again).
        self._lost_taps: dict[str, bool] = {}
        self.stats_path = stats_socket
        self.stats_listener: socket.socket | None = None
        self.control_path = control_socket
        self.control_listener: socket.socket | None = None
        self.state_path = state_file
        #: VMs added at run time, by name: their add request as it stands after
        #: later ``set`` requests (what the state file keeps).
        self.runtime: dict[str, AddVm] = {}
        try:
            for i, path in enumerate(sockets):
                self._add_vm(path, _tap_spec(port, i, len(sockets)))
            if vlans:
                self._set_vlans(vlans)
            for name, addrs in macs:
                self._require_vm("--mac", name)
                self._lock_macs(name, addrs)
            for name, addrs in ips:
                self._require_vm("--ip", name)
                self._lock_ips(name, addrs)
            for name, bps in rates:
                self._require_vm("--rate", name)
                self._set_rate(name, bps)
            for name, gs in guards:
                self._require_vm("--guard", name)
                if name in self.guards:
                    raise UsageError(f"--guard for {name} given twice")
                self._set_guards(name, gs)
            if neigh_suppress and not isinstance(self._shared, SwitchPort):
                raise UsageError(
                    "--neigh-suppress needs --port switch (a tap's neighbours are the host's)"
                )
            if (mcast_snoop or mcast_querier) and not isinstance(self._shared, SwitchPort):
                flag = "--mcast-snoop" if mcast_snoop else "--mcast-querier"
                raise UsageError(f"{flag} needs --port switch (a tap's groups are the host's)")
            if neigh_suppress or mcast_snoop or mcast_querier:
                self.set_switch(
                    SetSwitch(neigh_suppress or None, mcast_snoop or None, mcast_querier or None)
                )
            if isinstance(self._shared, SwitchPort):
                # Its death wakes the loop at once instead of at the next tick.
                self.server.watch(self._shared.control, self._shared.drain_replies)
            if state_file:
                self._restore_state(state_file)
            if stats_socket:
                self.stats_listener = _listen(stats_socket, "stats socket")
            if control_socket:
                self.control_listener = _listen(control_socket, "control socket", private=True)
        except BaseException:
            self.close()
            raise

    def _add_vm(self, path: str, spec: str) -> _Vm:
        """Serve ``path`` on port ``spec`` (the tap's own, or the shared one)."""
        i = self._next_index
        self._next_index += 1
        if spec.startswith("tap:"):
            p = make_port(spec)
        else:
            if self._shared is None:
                self._shared = make_port(spec)
            p = self._shared
        name = os.path.basename(path) or f"vm{i}"
        if any(v.name == name for v in self.vms):
            name = f"{name}#{i}"
        vm = _Vm(i, name, path, p, VmPort(name, p, self.queues))
        factory = self._factory(vm)
        try:
            if self.client:
                vm.endpoint = self.server.add_client(
                    path, factory, name=name, retry_interval=RETRY_S
                )
            else:
                try:
                    vm.endpoint = self.server.add_listener(path, factory, name=name)
                except OSError as exc:
                    raise UsageError(f"cannot listen on {path}: {exc}") from exc
                self._set_socket_perms(path, vm.endpoint)
        except BaseException:
            vm.vmport.close()
            if p is not self._shared:
                p.close()
            raise
        self.vms.append(vm)
        return vm

    def _set_socket_perms(self, path: str, endpoint: Endpoint) -> None:
        """``--socket-group`` / ``--socket-mode`` on a VM socket serve listens on."""
        if self._socket_gid == -1 and self._socket_mode is None:
            return
        try:
            if self._socket_gid != -1:
                os.chown(path, -1, self._socket_gid)
            if self._socket_mode is not None:
                os.chmod(path, self._socket_mode)
        except OSError as exc:
            self.server.remove(endpoint)
            raise UsageError(
                f"cannot set the group or mode of {path}: {exc} (changing the group needs root"
                " or membership of it)"
            ) from exc
        st = os.stat(path)
        log.info("%s: mode %04o, group %s", path, st.st_mode & 0o777, _group_name(st.st_gid))

    def _require_vm(self, option: str, name: str) -> None:
        """UsageError unless a VM of the command line is called ``name``."""
        if not any(vm.name == name for vm in self.vms):
            raise UsageError(
                f"{option} {name}=...: no such VM (VMs are named by their socket's file"
                f" name: {', '.join(vm.name for vm in self.vms)})"
            )

    def _lock_macs(
        self, name: str, addrs: frozenset[bytes] | None, *, replace: bool = False
    ) -> None:
        """Port security on the switch: ``name`` sends from ``addrs`` only (None: any)."""
        sw = self._shared
        if not isinstance(sw, SwitchPort):
            raise UsageError("--mac needs --port switch (a tap's traffic is the host's to filter)")
        if name in self.macs and not replace:
            raise UsageError(f"--mac for {name} given twice")
        self._check_free(self.macs, addrs or frozenset(), name, _mac_owned)
        sw.set_macs(name, addrs)
        if addrs is None:
            self.macs.pop(name, None)
            log.info("%s: may send from any MAC", name)
        else:
            self.macs[name] = addrs
            log.info("%s: may send from %s only", name, ", ".join(sorted(map(mac_text, addrs))))

    def _lock_ips(
        self, name: str, addrs: frozenset[bytes] | None, *, replace: bool = False
    ) -> None:
        """IP source guard on the switch: ``name`` sends from ``addrs`` only (None: any)."""
        sw = self._shared
        if not isinstance(sw, SwitchPort):
            raise UsageError("--ip needs --port switch (a tap's traffic is the host's to filter)")
        if name in self.ips and not replace:
            raise UsageError(f"--ip for {name} given twice")
        self._check_free(self.ips, addrs or frozenset(), name, _ip_owned)
        sw.set_ips(name, addrs)
        if addrs is None:
            self.ips.pop(name, None)
            log.info("%s: may send from any IP address", name)
        else:
            self.ips[name] = addrs
            log.info("%s: may send from IP %s only", name, ", ".join(_ip_texts(addrs)))

    def _set_rate(self, name: str, bps: int | None) -> None:
        """Police what ``name`` sends on the switch to ``bps`` bit/s (None: no limit)."""
        sw = self._shared
        if not isinstance(sw, SwitchPort):
            raise UsageError("--rate needs --port switch (police a tap with tc)")
        sw.set_rate(name, bps)
        if bps is None:
            self.rates.pop(name, None)
            log.info("%s: no rate limit", name)
        else:
            self.rates[name] = bps
            log.info("%s: sends at most %s", name, rate_text(bps))

    def _set_guards(self, name: str, guards: frozenset[Guard]) -> None:
        """Keep ``name`` from sending DHCP server or router messages (empty: let it)."""
        sw = self._shared
        if not isinstance(sw, SwitchPort):
            raise UsageError(
                "--guard needs --port switch (a tap's traffic is the host's to filter)"
            )
        sw.set_guards(name, guards)
        if not guards:
            self.guards.pop(name, None)
            log.info("%s: may be a DHCP server and a router", name)
        else:
            self.guards[name] = guards
            log.info("%s: guarded (%s)", name, _guard_text(guards))

    @staticmethod
    def _check_free(
        held: dict[str, frozenset[bytes]],
        addrs: frozenset[bytes],
        name: str | None,
        text: Callable[[bytes], str],
    ) -> None:
        """UsageError when a VM other than ``name`` holds one of ``addrs`` in
        ``held`` (the MAC locks or the IP guards); ``text`` names the address."""
        claimed = addrs - _LEARNING  # every VM may learn its leases and SLAAC addresses
        taken = sorted(a for who, mine in held.items() if who != name for a in mine & claimed)
        if taken:
            raise UsageError(f"{text(taken[0])} belongs to another VM")

    def set_vm(
        self,
        name: str,
        *,
        vlans: frozenset[int] | None = None,
        macs: frozenset[bytes] | None = None,
        unlock: bool = False,
        ips: frozenset[bytes] | None = None,
        unlock_ips: bool = False,
        rate: int | None = None,
        unlimit: bool = False,
        guards: frozenset[Guard] | None = None,
    ) -> None:
        """Change a served VM's switch settings (``virtnet ctl set``); None and
        False leave one as it is."""
        if not any(vm.name == name for vm in self.vms):
            raise UsageError(f"no VM called {name!r} (see virtnet stats)")
        sw = self._shared
        if not isinstance(sw, SwitchPort):
            raise UsageError(
                "VLANs, MAC locks, IP source guards, rates and DHCP/router guards need"
                " --port switch"
            )
        if macs is not None or unlock:
            self._lock_macs(name, macs, replace=True)
        if ips is not None or unlock_ips:
            self._lock_ips(name, ips, replace=True)
        if rate is not None or unlimit:
            self._set_rate(name, rate)
        if guards is not None:
            self._set_guards(name, guards)
        if vlans is not None:
            sw.set_vlans(name, vlans)
            self.vlans[name] = vlans
            log.info("%s: VLANs %s", name, ",".join(map(str, sorted(vlans))))

    def add_vm(
        self,
        path: str,
        *,
        vlans: frozenset[int] | None = None,
        tap: str | None = None,
        macs: frozenset[bytes] | None = None,
        ips: frozenset[bytes] | None = None,
        rate: int | None = None,
        guards: frozenset[Guard] | None = None,
    ) -> str:
        """Serve one more VM on ``path`` at run time (``virtnet ctl add``); its name.

        ``vlans``: its switch VLANs (default: the ``--vlans`` default, else
        untagged only); ``tap``: its tap with ``--port tap:...`` (default: the
        port's ``%d`` template with the next index); ``macs``: lock it to
        these source MACs on the switch (``--mac``); ``ips``: to these source
        IP addresses (``--ip``); ``rate``: police what it sends (``--rate``);
        ``guards``: the servers it may not be (``--guard``)."""
        if any(vm.path == path for vm in self.vms):
            raise UsageError(f"{path} is already served")
        is_tap = self.port_spec.startswith("tap:")
        if tap is not None and not is_tap:
            raise UsageError(f"a tap name needs --port tap:..., not --port {self.port_spec}")
        if vlans is not None and not isinstance(self._shared, SwitchPort):
            raise UsageError("VLANs need --port switch (a tap carries every VLAN)")
        if macs is not None:
            if not isinstance(self._shared, SwitchPort):
                raise UsageError("MAC locks need --port switch")
            self._check_free(self.macs, macs, None, _mac_owned)
        if ips is not None:
            if not isinstance(self._shared, SwitchPort):
                raise UsageError("IP guards need --port switch")
            self._check_free(self.ips, ips, None, _ip_owned)
        if rate is not None and not isinstance(self._shared, SwitchPort):
            raise UsageError("rates need --port switch (police a tap with tc)")
        if guards and not isinstance(self._shared, SwitchPort):
            raise UsageError("guards need --port switch")
        if is_tap and tap is None and not any(t in self.port_spec for t in ("%d", "{}")):
            raise UsageError(
                f"--port {self.port_spec} names one tap, which a VM already has: give the"
                " new VM its own tap"
            )
        spec = f"tap:{tap}" if tap is not None else _tap_spec(self.port_spec, self._next_index, 1)
        if is_tap and any(getattr(v.port, "ifname", None) == spec[4:] for v in self.vms):
            raise UsageError(f"tap {spec[4:]} already serves a VM")
        vm = self._add_vm(path, spec)
        sw = self._shared
        if isinstance(sw, SwitchPort) and (vlans is not None or self._vlan_spec):
            ids = vlans if vlans is not None else _vlans_for(self._vlan_spec, vm.name)
            sw.set_vlans(vm.name, ids)
            self.vlans[vm.name] = ids
        if macs is not None:
            self._lock_macs(vm.name, macs)
        if ips is not None:
            self._lock_ips(vm.name, ips)
        if rate is not None:
            self._set_rate(vm.name, rate)
        if guards:
            self._set_guards(vm.name, guards)
        log.info(
            "%s: added (%s)%s", vm.name, path,
            f", VLANs {','.join(map(str, sorted(self.vlans[vm.name])))}"
            if vm.name in self.vlans else "",
        )  # fmt: skip
        return vm.name

    def remove_vm(self, name: str) -> None:
        """Stop serving the VM called ``name`` (``virtnet ctl remove``): close
        its connection (its workers stop), its socket and its tap or switch
        membership."""
        vm = next((v for v in self.vms if v.name == name), None)
        if vm is None:
            raise UsageError(f"no VM called {name!r} (see virtnet stats)")
        self.vms.remove(vm)
        if vm.endpoint is not None:
            self.server.remove(vm.endpoint)
        if vm.supervisor is not None:
            vm.supervisor.close()
        vm.vmport.close()
        if vm.port is self._shared:
            remove = getattr(vm.port, "remove_vm", None)
            if remove is not None:
                remove(vm.name)
        else:
            vm.port.close()
        self.vlans.pop(vm.name, None)
        self.macs.pop(vm.name, None)
        self.ips.pop(vm.name, None)
        self.rates.pop(vm.name, None)
        self.guards.pop(vm.name, None)
        self._lost_taps.pop(vm.name, None)
        log.info("%s: removed", vm.name)

    def _set_vlans(self, spec: Sequence[tuple[str | None, frozenset[int]]]) -> None:
        sw = self._shared
        if not isinstance(sw, SwitchPort):
            raise UsageError("--vlans needs --port switch (a tap carries every VLAN)")
        members = [vm.name for vm in self.vms] + [f"uplink:{t.ifname}" for t in sw.uplinks]
        for member, ids in _vlan_plan(spec, members).items():
            sw.set_vlans(member, ids)
            self.vlans[member] = ids
            log.info("%s: VLANs %s", member, ",".join(map(str, sorted(ids))))

    def _factory(self, vm: _Vm) -> Any:
        config = BackendConfig(max_queue_pairs=self.queues, offloads=self.offloads)

        def make() -> Backend:
            sup = Supervisor(
                vm.vmport,
                poll_us=self.poll_us,
                cpus=self.cpus,
                workers=self.workers,
                kick_defer_us=self.kick_defer_us,
            )
            backend = Backend(sup, config)  # its close calls sup.on_close()
            sup.backend = backend
            vm.supervisor = sup
            return backend

        return make

    def snapshot(self) -> dict[str, Any]:
        return snapshot(self)

    def _serve_stats(self) -> None:
        for _ in range(8):
            conn = _accept(self.stats_listener, "stats socket")
            if conn is None:
                return
            try:
                conn.settimeout(1.0)
                conn.sendall(json.dumps(self.snapshot()).encode())
            except OSError:
                pass
            finally:
                conn.close()

    def _serve_control(self) -> None:
        """One control request per tick: a client that says nothing holds the
        loop for at most ``TIMEOUT_S``, and requests are rare."""
        conn = _accept(self.control_listener, "control socket")
        if conn is None:
            return
        with conn:
            conn.settimeout(TIMEOUT_S)
            try:
                line = _read_line(conn, MAX_REQUEST_BYTES)
                reply = self._control(line)
                conn.sendall(json.dumps(reply).encode() + b"\n")
            except OSError as exc:
                log.warning("control socket: %s", exc)

    def _control(self, line: bytes) -> dict[str, Any]:
        """Answer one control request (:mod:`virtnet.vhost_user.control`)."""
        try:
            req = parse_request(line)
            reply: dict[str, Any] = {"ok": True}
            if isinstance(req, AddVm):
                reply["name"] = self._add_remembered(req)
            elif isinstance(req, RemoveVm):
                self.remove_vm(req.name)
                self.runtime.pop(req.name, None)
            elif isinstance(req, SetSwitch):
                self.set_switch(req)
            else:
                self.set_vm(
                    req.name, vlans=req.vlans, macs=req.macs, unlock=req.unlock,
                    ips=req.ips, unlock_ips=req.unlock_ips, rate=req.rate, unlimit=req.unlimit,
                    guards=req.guards,
                )  # fmt: skip
                kept = self.runtime.get(req.name)
                if kept is not None:
                    self.runtime[req.name] = dataclasses.replace(
                        kept,
                        vlans=kept.vlans if req.vlans is None else req.vlans,
                        macs=None if req.unlock else req.macs or kept.macs,
                        ips=None if req.unlock_ips else req.ips or kept.ips,
                        rate=None if req.unlimit else req.rate or kept.rate,
                        guards=kept.guards if req.guards is None else req.guards or None,
                    )
        except (PeerError, UsageError) as exc:
            log.error("control request refused: %s", exc)
            return {"ok": False, "error": str(exc)}
        self._save_state()
        return reply

    def set_switch(self, req: SetSwitch) -> None:
        """Turn switch-wide settings on or off (``virtnet ctl switch``); kept
        until serve stops (a restart goes back to its command line's)."""
        sw = self._shared
        if not isinstance(sw, SwitchPort):
            raise UsageError("'switch' needs --port switch")
        # In this order; the switch makes the querier bring snooping on, and
        # snooping off take the querier (its stats say what is on).
        setters = {"neigh_suppress": sw.set_neigh_suppress, "mcast_snoop": sw.set_mcast_snoop,
                   "mcast_querier": sw.set_mcast_querier}  # fmt: skip
        asked = {key: on for key in SWITCH_SETTINGS if (on := getattr(req, key)) is not None}
        for key, on in asked.items():
            setters[key](on)
        log.info(
            "switch: %s",
            ", ".join(f"{k.replace('_', '-')} {'on' if on else 'off'}" for k, on in asked.items()),
        )

    def _add_remembered(self, req: AddVm) -> str:
        """Serve ``req``'s VM and remember its add request for the state file."""
        name = self.add_vm(
            req.socket, vlans=req.vlans, tap=req.tap, macs=req.macs, ips=req.ips, rate=req.rate,
            guards=req.guards,
        )  # fmt: skip
        self.runtime[name] = req
        return name

    def _save_state(self) -> None:
        """Write the VMs added at run time to the state file (atomically, mode 0600:
        a new file, synced, then renamed over the old one)."""
        path = self.state_path
        if not path:
            return
        vms = [_add_doc(req) for req in self.runtime.values()]
        data = json.dumps({"version": STATE_VERSION, "vms": vms})
        tmp = f"{path}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(data + "\n")
                f.flush()
                os.fsync(f.fileno())  # on disk before it replaces the old one
            os.replace(tmp, path)
        except OSError as exc:
            log.error("cannot write the state file %s: %s", path, exc)

    def _restore_state(self, path: str) -> None:
        """Serve again the VMs a previous serve was told to add (``--state-file``).

        The file is input like any other: one that cannot be read as such is
        logged and moved aside to ``PATH.bad``, an entry that is not a valid
        add request (the control socket's rules) or cannot be served now is
        logged and dropped; serve starts either way."""
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_STATE_BYTES + 1)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise UsageError(f"cannot read the state file {path}: {exc}") from exc
        try:
            if len(raw) > MAX_STATE_BYTES:
                raise ValueError(f"longer than {MAX_STATE_BYTES} bytes")
            doc = json.loads(raw)
            if not isinstance(doc, dict) or doc.get("version") != STATE_VERSION:
                raise ValueError(f"not a version-{STATE_VERSION} virtnet state file")
            entries = doc.get("vms")
            if not isinstance(entries, list):
                raise ValueError("no 'vms' list")
        except ValueError as exc:
            log.error("state file %s: %s; moved to %s.bad, starting without it", path, exc, path)
            with contextlib.suppress(OSError):
                os.replace(path, f"{path}.bad")
            return
        for entry in entries:
            try:
                if not isinstance(entry, dict):
                    raise ProtocolError("an entry is not a JSON object")
                req = parse_request(json.dumps({**entry, "op": "add"}).encode())
                assert isinstance(req, AddVm)
                name = self._add_remembered(req)
            except (PeerError, UsageError) as exc:
                log.error("state file %s: dropping %.200r: %s", path, entry, exc)
                continue
            log.info("%s: served again from the state file", name)
        self._save_state()

    def stop(self) -> None:
        self._stop = True

    def run_once(self, timeout: float = TICK_S) -> None:
        self.server.run_once(timeout)
        self._check_switch()
        now = time.monotonic()
        if now >= self._next_port_check:
            self._next_port_check = now + PORT_CHECK_S
            self._check_taps()
        for vm in self.vms:
            sup = vm.supervisor
            if sup is not None and not sup.closed:
                sup.poll()
        self._serve_stats()
        self._serve_control()

    def serve(self) -> None:
        while not self._stop:
            self.run_once()

    def _check_switch(self) -> None:
        """Start the switch process again if it died, and give every VM new
        queues on it; give up (stop serve, status 1) when it keeps dying."""
        sw = self._shared
        if not isinstance(sw, SwitchPort) or sw.running or self._stop:
            return
        pid = sw.pid
        code = sw.poll_exitcode()
        now = time.monotonic()
        self._switch_deaths = [
            t for t in self._switch_deaths if now - t < SWITCH_RESTART_WINDOW_S
        ] + [now]
        how = f"signal {-code}" if code is not None and code < 0 else f"exit status {code}"
        if len(self._switch_deaths) > SWITCH_MAX_RESTARTS:
            log.error(
                "switch process %s died (%s), %d times in %.0f s: giving up, stopping serve",
                pid, how, len(self._switch_deaths), SWITCH_RESTART_WINDOW_S,
            )  # fmt: skip
            self.status = 1
            self._stop = True
            self.server.unwatch(sw.control)
            return
        log.error("switch process %s died (%s); starting it again", pid, how)
        self.server.unwatch(sw.control)
        try:
            sw.restart()
            self.server.watch(sw.control, sw.drain_replies)
        except (OSError, UsageError) as exc:
            log.error("cannot start the switch process again: %s; stopping serve", exc)
            self.status = 1
            self._stop = True
            return
        for vm in self.vms:
            self._reopen(vm)
        log.info(
            "switch process %s serves %d VM(s) again (restart %d)", sw.pid, len(self.vms),
            sw.restarts,
        )  # fmt: skip

    def _reopen(self, vm: _Vm) -> None:
        """New port queues for ``vm``: its running pairs restart on them; a VM
        not connected opens them when it connects."""
        sup = vm.supervisor
        if sup is not None and not sup.closed:
            sup.reopen_port()
        else:
            vm.vmport.drop_queues()

    def _check_taps(self) -> None:
        """A tap that was deleted under serve -- a VM's, or a switch uplink --
        is created again if serve had created it, else waited for; then the
        VM's running pairs (the switch) go on with new queues on it.  A VM
        not connected gets its tap when it connects, as at start."""
        for vm in self.vms:
            if isinstance(vm.port, TapPort):
                sup = vm.supervisor
                connected = sup is not None and not sup.closed
                self._check_tap(
                    vm.name, vm.port, vm.vmport.port_lost, partial(self._reopen, vm), connected
                )
        sw = self._shared
        if isinstance(sw, SwitchPort):
            for tap in sw.uplinks:
                self._check_tap(
                    f"uplink:{tap.ifname}", tap, tap.lost, partial(sw.reopen_uplink, tap), True
                )

    def _check_tap(
        self,
        name: str,
        tap: TapPort,
        lost: Callable[[], bool],
        reopen: Callable[[], None],
        connected: bool,
    ) -> None:
        if name not in self._lost_taps:
            if not lost():
                return
            self._lost_taps[name] = tap.created
            log.error(
                "%s: tap %s is gone (deleted?); %s", name, tap.ifname,
                "it is opened again when the VM connects" if not connected
                else "creating it again" if tap.created
                else "waiting for it to exist again",
            )  # fmt: skip
        created = self._lost_taps[name]
        kind = tun_kind(tap.ifname)
        if connected and (kind not in (None, "tap") or (kind is None and not created)):
            return  # not (yet) a tap serve may take
        try:
            reopen()
        except UsageError as exc:
            log.error("%s: tap %s: %s", name, tap.ifname, exc)
            return
        del self._lost_taps[name]
        if connected:
            log.info(
                "%s: tap %s %s; traffic goes on through it", name, tap.ifname,
                "created again (its MAC, the guest's MTU; down, without addresses: configure"
                " it as before)" if kind is None else "is back",
            )  # fmt: skip

    def close(self) -> None:
        """Close connections (stopping every worker), ports and the stats socket."""
        self.server.close()
        for vm in self.vms:
            if vm.supervisor is not None:
                vm.supervisor.close()
            vm.vmport.close()
            if vm.port is not self._shared:
                vm.port.close()
        if self._shared is not None:
            self._shared.close()
            self._shared = None
        for sock, path in (
            (self.stats_listener, self.stats_path),
            (self.control_listener, self.control_path),
        ):
            if sock is not None:
                sock.close()
                if path:
                    with contextlib.suppress(OSError):
                        os.unlink(path)
        self.stats_listener = self.control_listener = None


def snapshot(d: Daemon) -> dict[str, Any]:
    """Everything ``virtnet stats`` shows, as JSON-able data."""
    vms = []
    for vm in d.vms:
        ep = vm.endpoint
        sup = vm.supervisor
        connected = ep is not None and ep.connection is not None
        feats = sup.features if (sup is not None and connected) else 0
        migrating = bool(feats & LOG_ALL)
        vms.append(
            {
                "name": vm.name,
                "socket": vm.path,
                "connected": connected,
                "connections": ep.connections if ep is not None else 0,
                "errors": ep.errors if ep is not None else 0,
                "last_error": ep.last_error if ep is not None else None,
                "features": feature_names(feats) if feats else "",
                # Live migration: VHOST_F_LOG_ALL on, workers marking the dirty log.
                "migrating": migrating,
                "dirty_log_bytes": sup.log.size if (migrating and sup and sup.log) else 0,
                "workers": sorted(sup.workers) if (sup is not None and connected) else [],
                "pairs": vm.vmport.snapshot(),
            }
        )
        if isinstance(vm.port, TapPort):
            vms[-1]["tap"] = _tap_snapshot(vm.port)
        if vm.name in d.vlans:
            vms[-1]["vlans"] = sorted(d.vlans[vm.name])
        if vm.name in d.macs:
            vms[-1]["macs"] = sorted(map(mac_text, d.macs[vm.name]))
        if vm.name in d.ips:
            vms[-1]["ips"] = _ip_texts(d.ips[vm.name])
        if vm.name in d.rates:
            vms[-1]["rate_bps"] = d.rates[vm.name]
        if vm.name in d.guards:
            vms[-1]["guards"] = sorted(d.guards[vm.name])
    doc: dict[str, Any] = {"time": time.time(), "queues": d.queues, "vms": vms}
    if isinstance(d._shared, SwitchPort):
        doc["switch"] = _switch_snapshot(d._shared)
        for key in ("leases", "slaac", "groups"):
            learnt = doc["switch"].pop(key, None)
            if isinstance(learnt, dict):
                for entry in vms:
                    if learnt.get(entry["name"]):
                        entry[key] = learnt.pop(entry["name"])
                if learnt and key == "groups":  # the uplinks' multicast groups
                    doc["switch"][key] = learnt
    return doc


def _tap_snapshot(tap: TapPort) -> dict[str, Any]:
    """A tap's name and the kernel's drops on it (``dropped`` None: not found)."""
    return {"name": tap.ifname, "dropped": tap.host_drops()}


def _switch_snapshot(sw: SwitchPort) -> dict[str, Any]:
    """The switch process's counters (without its per-port ones, which the
    workers' pairs already show), its uplink taps and how often it was
    started again; ``error`` when the switch did not answer."""
    try:
        counters = sw.stats(timeout=SWITCH_STATS_TIMEOUT_S)
    except UsageError as exc:
        counters = {"error": str(exc)}
    counters.pop("ports", None)
    counters["uplinks"] = [_tap_snapshot(t) for t in sw.uplinks]
    # A restarted switch process counts from zero again.
    counters["restarts"] = sw.restarts
    counters["pid"] = sw.pid
    return counters


def _add_doc(req: AddVm) -> dict[str, Any]:
    """``req`` as the state file keeps it: the fields of a control ``add`` request."""
    doc: dict[str, Any] = {"socket": req.socket}
    if req.tap is not None:
        doc["tap"] = req.tap
    if req.vlans is not None:
        doc["vlans"] = sorted(req.vlans)
    if req.macs is not None:
        doc["macs"] = sorted(map(mac_text, req.macs))
    if req.ips is not None:
        doc["ips"] = _ip_texts(req.ips)
    if req.rate is not None:
        doc["rate"] = req.rate
    if req.guards:
        doc["guards"] = sorted(req.guards)
    return doc


def _listen(path: str, what: str, *, private: bool = False) -> socket.socket:
    """A listening non-blocking Unix socket at ``path`` (a stale one replaced);
    ``private``: mode 0600, only serve's own user may connect."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_mask = os.umask(0o077) if private else None
    try:
        s.bind(path)
        if private:
            os.chmod(path, 0o600)  # the umask already kept others out
        s.listen(8)
        s.setblocking(False)
    except OSError as exc:
        s.close()
        raise UsageError(f"cannot listen on {what} {path}: {exc}") from exc
    finally:
        if old_mask is not None:
            os.umask(old_mask)
    return s


def _accept(listener: socket.socket | None, what: str) -> socket.socket | None:
    """A waiting client of ``listener``, or None (none waiting, or an error, logged)."""
    if listener is None:
        return None
    try:
        conn, _ = listener.accept()
    except (BlockingIOError, InterruptedError):
        return None
    except OSError as exc:
        log.warning("%s: %s", what, exc)
        return None
    return conn


def _read_line(conn: socket.socket, limit: int) -> bytes:
    """Bytes up to the first newline (or the peer's EOF), at most ``limit`` + 1."""
    buf = bytearray()
    while b"\n" not in buf and len(buf) <= limit:
        data = conn.recv(limit + 1 - len(buf))
        if not data:
            break
        buf += data
    return bytes(buf.split(b"\n", 1)[0])


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _socket_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal mode: {text!r}") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"mode {text} is not 0..0777")
    return mode


def _socket_perms(group: str | None, mode: int | None) -> tuple[int, int | None]:
    """(gid or -1, mode or None) for the VM sockets: ``--socket-group`` /
    ``--socket-mode``, 0660 when only the group is given."""
    gid = -1
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            try:
                gid = grp.getgrgid(int(group)).gr_gid
            except (KeyError, ValueError):
                raise UsageError(f"--socket-group: no group {group!r} on this host") from None
        if mode is None:
            mode = 0o660
    if mode is not None and not 0 <= mode <= 0o777:
        raise UsageError(f"--socket-mode {mode:o} is not 0..0777")
    return gid, mode


def _int_ranges(text: str) -> tuple[int, ...]:
    """``0,2-3`` -> (0, 2, 3); ValueError when it is not such a list."""
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        first, last = int(lo), int(hi or lo)
        if first < 0 or last < first:
            raise ValueError(part)
        out += range(first, last + 1)
    return tuple(out)


def _cpu_list(text: str) -> tuple[int, ...]:
    """``0,2-3`` -> (0, 2, 3)."""
    try:
        return _int_ranges(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad CPU list {text!r} (e.g. 0,2-3)") from None


def _vlans_arg(text: str) -> tuple[str | None, frozenset[int]]:
    """``--vlans [MEMBER=]IDS``: ``vm1.sock=0,100-102`` -> ("vm1.sock", {0, 100, 101, 102});
    without ``MEMBER=`` the set is every member's default (None)."""
    member, eq, ids = text.rpartition("=")
    try:
        vlans = frozenset(_int_ranges(ids))
    except ValueError:
        vlans = frozenset()
    if (eq and not member) or not vlans or max(vlans) > VLAN_MAX:
        raise argparse.ArgumentTypeError(
            f"bad --vlans {text!r}: [VM=]IDS, IDS a list of VLAN ids 0..{VLAN_MAX}"
            " (0: untagged), e.g. vm1.sock=0,100-102"
        )
    return (member if eq else None), vlans


def _mac_owned(mac: bytes) -> str:
    return f"MAC {mac_text(mac)}"


def _ip_owned(addr: bytes) -> str:
    return f"IP {ipaddress.ip_address(addr)}"


#: What a VM may learn (``--ip`` words) beside its addresses.
_LEARNING = frozenset({DHCP_LEARNING, SLAAC_LEARNING})


def _ip_texts(addrs: frozenset[bytes]) -> list[str]:
    """Packed addresses as text, IPv4 first, each family in order; ``dhcp``
    and ``slaac`` last."""
    texts = [
        str(ipaddress.ip_address(a)) for a in sorted(addrs - _LEARNING, key=lambda a: (len(a), a))
    ]
    learnt = (("dhcp", DHCP_LEARNING), ("slaac", SLAAC_LEARNING))
    return texts + [word for word, marker in learnt if marker in addrs]


_T = TypeVar("_T")


def _per_vm(text: str, option: str, parse: Callable[[str], _T], example: str) -> tuple[str, _T]:
    """``--OPTION VM=VALUE``: (VM, ``parse(VALUE)``); ArgumentTypeError naming
    the option and an example (``VM=VALUE``) when either part is wrong."""
    name, eq, value = text.partition("=")
    try:
        if not name or not eq:
            raise ValueError("expected VM=" + example.partition("=")[2])
        return name, parse(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"bad --{option} {text!r}: {exc} (e.g. {example})"
        ) from None


def _rate_vm_arg(text: str) -> tuple[str, int]:
    """``--rate VM=RATE``."""
    return _per_vm(text, "rate", parse_rate, "vm1.sock=100M")


def _guard_text(guards: frozenset[Guard]) -> str:
    """The guards in words, for the log."""
    return ", ".join({"dhcp": "no DHCP server", "router": "no router"}[g] for g in sorted(guards))


def _guard_arg(text: str) -> tuple[str, frozenset[Guard]]:
    """``--guard VM=GUARD[,GUARD]``."""
    return _per_vm(text, "guard", parse_guards, "vm1.sock=dhcp,router")


def _ip_arg(text: str) -> tuple[str, frozenset[bytes]]:
    """``--ip VM=ADDR[,ADDR...]``."""
    return _per_vm(text, "ip", parse_ips, "vm1.sock=10.0.0.5,fd00::5 or vm1.sock=dhcp,slaac")


def _mac_arg(text: str) -> tuple[str, frozenset[bytes]]:
    """``--mac VM=MAC[,MAC...]``."""
    return _per_vm(text, "mac", parse_macs, "vm1.sock=52:54:00:12:34:56")


def _vlans_for(spec: Sequence[tuple[str | None, frozenset[int]]], name: str) -> frozenset[int]:
    """The VLANs ``--vlans`` gives a VM added at run time: its named set, else the default."""
    named = {who: ids for who, ids in spec}
    return named.get(name) or named.get(None) or frozenset({0})


def _vlan_plan(
    spec: Sequence[tuple[str | None, frozenset[int]]], members: Sequence[str]
) -> dict[str, frozenset[int]]:
    """Each switch member's VLANs from the ``--vlans`` options: a named one for
    that member (a VM's name, or ``uplink`` for the uplink tap), the unnamed
    one for the rest (default: untagged only)."""
    default: frozenset[int] | None = None
    named: dict[str, frozenset[int]] = {}
    aliases = {m.partition(":")[0] if m.startswith("uplink:") else m: m for m in members}
    aliases.update({m: m for m in members})
    for who, vlans in spec:
        if who is None:
            if default is not None:
                raise UsageError("--vlans without VM= given twice")
            default = vlans
            continue
        if who not in aliases:
            raise UsageError(
                f"--vlans {who}=...: no such switch member (VMs are named by their socket's"
                f" file name: {', '.join(sorted(aliases))})"
            )
        if aliases[who] in named:
            raise UsageError(f"--vlans for {who} given twice")
        named[aliases[who]] = vlans
    return {m: named.get(m, default if default is not None else frozenset({0})) for m in members}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--socket",
        action="append",
        required=True,
        metavar="PATH",
        help="vhost-user socket of one VM (repeat for more VMs)",
    )
    parser.add_argument(
        "--queues",
        type=int,
        default=DEFAULT_QUEUES,
        help=f"maximum queue pairs offered (default {DEFAULT_QUEUES})",
    )
    parser.add_argument(
        "--port",
        default="switch",
        help="switch | switch:uplink=IF | tap:IF (tap:IF%%d for several VMs) | loopback | null",
    )
    parser.add_argument(
        "--client",
        action="store_true",
        help="connect to the frontend's listening socket (QEMU server=on); default: listen",
    )
    parser.add_argument(
        "--socket-group",
        metavar="GROUP",
        help="give the VM sockets serve listens on to GROUP, mode 0660 unless --socket-mode:"
        " the group QEMU runs as when it is not root (libvirt's qemu.conf 'group';"
        " Debian: libvirt-qemu, Fedora: qemu)",
    )
    parser.add_argument(
        "--socket-mode",
        type=_socket_mode,
        metavar="MODE",
        help="octal mode of the VM sockets serve listens on (QEMU needs write permission);"
        " default: as the umask leaves it, or 0660 with --socket-group",
    )
    parser.add_argument(
        "--poll-us", type=int, default=0, help="busy-poll this long before sleeping"
    )
    parser.add_argument(
        "--kick-defer-us",
        type=int,
        default=KICK_DEFER_US,
        metavar="U",
        help="after a guest's transmit burst, leave its kicks off and look at the tx ring every"
        f" U us while bulk traffic flows (every {KICK_DEFER_SHORT_US} us otherwise;"
        f" {KICK_DEFER_ROUNDS} times) before sleeping: fewer VM exits for a streaming"
        f" guest (default {KICK_DEFER_US}; 0: ask for a kick as soon as the ring is empty;"
        f" at most {MAX_KICK_DEFER_US})",
    )
    parser.add_argument("--stats-socket", metavar="PATH", help="serve counters for virtnet stats")
    parser.add_argument(
        "--control-socket",
        metavar="PATH",
        help="let virtnet ctl add and remove VMs at run time (socket mode 0600)",
    )
    parser.add_argument(
        "--pin",
        type=_cpu_list,
        default=(),
        metavar="CPUS",
        help="pin worker process p to CPU number p of this list (e.g. 0,1 or 2-5); default: none",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        metavar="N",
        help="at most N worker processes per VM, pair p served by process p %% N"
        " (size it to the CPUs the workers can have); default 0: one process per pair",
    )
    parser.add_argument(
        "--vlans",
        type=_vlans_arg,
        action="append",
        default=[],
        metavar="[VM=]IDS",
        help="--port switch: the 802.1Q VLANs a VM may use (0: untagged; e.g. 0,100-102);"
        " VM is its socket's file name, or 'uplink'; without VM= it applies to every member"
        " not named (default: 0 only). Frames are never tagged or untagged",
    )
    parser.add_argument(
        "--state-file",
        metavar="PATH",
        help="keep the VMs virtnet ctl adds here and serve them again after a restart",
    )
    parser.add_argument(
        "--mac",
        type=_mac_arg,
        action="append",
        default=[],
        metavar="VM=MAC[,MAC]",
        help="--port switch: VM may send only from these MACs, and no other VM from them"
        " (port security; default: a VM may use any MAC)",
    )
    parser.add_argument(
        "--ip",
        type=_ip_arg,
        action="append",
        default=[],
        metavar="VM=ADDR[,ADDR]",
        help="--port switch: VM may send IPv4, ARP and IPv6 only from these addresses"
        " (IPv6 link-local too; IP source guard; default: any); 'dhcp' among them adds the"
        " leases a trusted DHCP or DHCPv6 server (uplink, or a VM with neither --ip nor"
        " --guard dhcp) gives it, 'slaac' the IPv6 addresses it makes in the prefixes a trusted"
        " router (neither --ip nor --guard router) advertises, first come first served;"
        " e.g. vm1.sock=dhcp or vm1.sock=10.0.0.5,dhcp,slaac",
    )
    parser.add_argument(
        "--rate",
        type=_rate_vm_arg,
        action="append",
        default=[],
        metavar="VM=RATE",
        help="--port switch: police what VM sends to RATE bit/s (e.g. 100M, 1.5G; frames"
        " over it are dropped and counted, TCP backs off to it; default: no limit)",
    )
    parser.add_argument(
        "--guard",
        type=_guard_arg,
        action="append",
        default=[],
        metavar="VM=GUARDS",
        help="--port switch: what VM may not be: 'dhcp' (no DHCP or DHCPv6 server or relay"
        " messages), 'router' (no router advertisements or redirects), or both, e.g."
        " vm1.sock=dhcp,router; refused frames are dropped and counted (default: none)",
    )
    parser.add_argument(
        "--neigh-suppress",
        action="store_true",
        help="--port switch: answer ARP requests and IPv6 neighbour solicitations for the"
        " addresses of VMs held to one MAC (--mac) and to their IPs (--ip) on their behalf,"
        " to the asker alone, instead of flooding them to every VM (Linux bridge's"
        " neigh_suppress; default: flood)",
    )
    parser.add_argument(
        "--mcast-snoop",
        action="store_true",
        help="--port switch: IGMP and MLD snooping (RFC 4541): on VLANs with a querier (a member"
        " that sends queries, or --mcast-querier), send a multicast group's traffic only to the"
        " VMs that reported it and to the queriers, not to every VM (Linux bridge's"
        " multicast_snooping; default: flood)",
    )
    parser.add_argument(
        "--mcast-querier",
        action="store_true",
        help="--port switch: --mcast-snoop, and the switch sends IGMP and MLD queries on VLANs"
        " where no multicast router does, so that the VMs' memberships stay known"
        " (Linux bridge's multicast_querier; default: off)",
    )
    parser.add_argument(
        "--no-offloads",
        dest="offloads",
        action="store_false",
        help="do not offer checksum/TSO offloads (guests that decline GUEST_TSO on a switch)",
    )


def run(args: argparse.Namespace) -> int:
    d = Daemon(
        list(args.socket),
        port=args.port,
        queues=args.queues,
        client=args.client,
        poll_us=args.poll_us,
        stats_socket=args.stats_socket,
        offloads=args.offloads,
        cpus=args.pin,
        workers=args.workers,
        kick_defer_us=args.kick_defer_us,
        vlans=args.vlans,
        control_socket=args.control_socket,
        macs=args.mac,
        state_file=args.state_file,
        socket_group=args.socket_group,
        ips=args.ip,
        rates=args.rate,
        guards=args.guard,
        socket_mode=args.socket_mode,
        neigh_suppress=args.neigh_suppress,
        mcast_snoop=args.mcast_snoop,
        mcast_querier=args.mcast_querier,
    )

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: shutting down", signum)
        d.stop()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        status = f"serving {len(d.vms)} VM(s), {d.queues} queue pairs each, port {args.port}" + (
            " (client mode)" if args.client else ""
        )
        log.info("%s", status)
        notify(f"READY=1\nSTATUS={status}\nMAINPID={os.getpid()}")
        d.serve()
    finally:
        notify("STOPPING=1\nSTATUS=stopping: closing connections, reaping workers")
        d.close()
        for s, h in old.items():
            signal.signal(s, h)
    log.info("stopped")
    return d.status
