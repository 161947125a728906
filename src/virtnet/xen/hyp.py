"""The emulated hypervisor service: domain memory and event channels over a Unix socket.

Real Xen hands out grant mappings and event channels through hypercalls; here
a small service (run inside the ``xenstored`` process with
``--hypervisor-socket``) owns each domain's memory memfd and the event-channel
table, and passes file descriptors with ``SCM_RIGHTS``.

Wire format: ``SOCK_SEQPACKET``; each request is one JSON object (at most
:data:`MAX_REQUEST` bytes), each reply one JSON object plus any fds.

Invariants:

* A client names its domain once (``hello``); only domain 0 may create
  domains or fetch another domain's memory (a driver domain / dom0 backend
  maps foreign grants; the grant checks themselves are in
  :class:`virtnet.xen.grant.GrantMapper`).
* ``bind_interdomain`` succeeds only for a port that exists, is still
  unbound, and was allocated for the binding domain
  (``EVTCHNOP_bind_interdomain`` rules); otherwise the reply is an error and
  the client raises :class:`~virtnet.errors.GrantError`.
* Bounded: :data:`MAX_PORTS_PER_DOMAIN` ports per domain
  (``EVTCHN_2L_NR_CHANNELS`` for 64-bit guests, ``xen/include/public/event_channel.h``),
  :data:`MAX_DOMAINS` domains.
* A malformed request gets an error reply; it never stops the service.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import socket
import threading
from dataclasses import dataclass
from typing import Any, Final

from virtnet.errors import GrantError, UsageError
from virtnet.xen.evtchn import EventChannel
from virtnet.xen.grant import MAX_DOMAIN_PAGES, MAX_GRANT_FRAMES, DomainMemory

__all__ = ["MAX_PORTS_PER_DOMAIN", "HypervisorClient", "HypervisorService"]

MAX_REQUEST: Final = 4096
#: EVTCHN_2L_NR_CHANNELS on 64-bit: 64 * 64 (event_channel.h, 2-level ABI).
MAX_PORTS_PER_DOMAIN: Final = 4096
MAX_DOMAINS: Final = 256
_EFD: Final = os.EFD_NONBLOCK | os.EFD_CLOEXEC


@dataclass(slots=True)
class _Port:
    remote: int
    fd_a: int  # the allocating end waits on this
    fd_b: int  # the binding end waits on this
    bound: bool = False


@dataclass(slots=True)
class _Domain:
    memfd: int
    pages: int
    gnttab_frames: int


class HypervisorService:
    def __init__(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.bind(path)
        self.sock.listen(64)
        self.lock = threading.Lock()
        self.domains: dict[int, _Domain] = {}
        self.ports: dict[int, dict[int, _Port]] = {}
        self._closed = False

    def serve_in_thread(self) -> threading.Thread:
        t = threading.Thread(target=self._accept_loop, name="hypervisor", daemon=True)
        t.start()
        return t

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        domid: int | None = None
        with conn:
            while True:
                try:
                    data = conn.recv(MAX_REQUEST + 1)
                except OSError:
                    return
                if not data:
                    return
                fds: list[int] = []
                try:
                    req = json.loads(data) if len(data) <= MAX_REQUEST else None
                    if not isinstance(req, dict):
                        raise GrantError("malformed request")
                    if req.get("op") == "hello":
                        domid = _int(req, "domid", 0, 0x7FEF)
                        reply: dict[str, Any] = {}
                    elif domid is None:
                        raise GrantError("hello first")
                    else:
                        with self.lock:
                            reply, fds = self._handle(domid, req)
                except (GrantError, UsageError, ValueError, OSError) as exc:
                    reply, fds = {"error": str(exc)}, []
                try:
                    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                    conn.sendmsg([json.dumps(reply).encode()], anc if fds else [])
                except OSError:
                    return

    def _handle(self, domid: int, req: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        op = req.get("op")
        if op == "create_domain":
            if domid != 0:
                raise GrantError("only dom0 creates domains")
            target = _int(req, "domid", 1, 0x7FEF)
            pages = _int(req, "pages", 2, MAX_DOMAIN_PAGES)
            frames = _int(req, "gnttab_frames", 1, MAX_GRANT_FRAMES)
            if target in self.domains:
                raise GrantError(f"domain {target} exists")
            if len(self.domains) >= MAX_DOMAINS:
                raise GrantError("too many domains")
            mem = DomainMemory.create(f"xen-dom{target}", pages, frames)
            mem.view.release()
            self.domains[target] = _Domain(os.dup(mem.fd), pages, frames)
            mem.close()
            return {}, []
        if op == "domain_memory":
            target = _int(req, "domid", 0, 0x7FEF)
            if domid not in (target, 0):
                raise GrantError("foreign memory needs privilege")
            d = self.domains.get(target)
            if d is None:
                raise GrantError(f"no domain {target}")
            return {"pages": d.pages, "gnttab_frames": d.gnttab_frames}, [d.memfd]
        if op == "alloc_unbound":
            remote = _int(req, "remote", 0, 0x7FEF)
            table = self.ports.setdefault(domid, {})
            if len(table) >= MAX_PORTS_PER_DOMAIN - 1:
                raise GrantError("out of event channel ports")
            port = next(p for p in range(1, MAX_PORTS_PER_DOMAIN) if p not in table)
            table[port] = _Port(remote, os.eventfd(0, _EFD), os.eventfd(0, _EFD))
            ch = table[port]
            return {"port": port}, [ch.fd_a, ch.fd_b]
        if op == "bind_interdomain":
            remote = _int(req, "remote", 0, 0x7FEF)
            rport = _int(req, "remote_port", 1, MAX_PORTS_PER_DOMAIN - 1)
            ch_or_none = self.ports.get(remote, {}).get(rport)
            if ch_or_none is None:
                raise GrantError(f"domain {remote} has no port {rport}")
            if ch_or_none.bound or ch_or_none.remote != domid:
                raise GrantError(f"port {rport} of domain {remote} is not offered to {domid}")
            ch_or_none.bound = True
            table = self.ports.setdefault(domid, {})
            port = next(p for p in range(1, MAX_PORTS_PER_DOMAIN) if p not in table)
            table[port] = _Port(remote, -1, -1, True)
            return {"port": port}, [ch_or_none.fd_b, ch_or_none.fd_a]
        if op == "close":
            port = _int(req, "port", 1, MAX_PORTS_PER_DOMAIN - 1)
            closing = self.ports.get(domid, {}).pop(port, None)
            if closing is None:
                raise GrantError("no such port")
            for fd in (closing.fd_a, closing.fd_b):
                if fd >= 0:
                    os.close(fd)
            return {}, []
        raise GrantError(f"unknown op {op!r}")


def _int(req: dict[str, Any], key: str, lo: int, hi: int) -> int:
    v = req.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise GrantError(f"bad {key}")
    return v


class HypervisorClient:
    """One domain's hypercall interface (emulated)."""

    def __init__(self, path: str, domid: int) -> None:
        self.domid = domid
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.connect(path)
        self.lock = threading.Lock()
        self._call({"op": "hello", "domid": domid})

    def close(self) -> None:
        self.sock.close()

    def _call(self, req: dict[str, Any], nfds: int = 0) -> tuple[dict[str, Any], list[int]]:
        with self.lock:
            self.sock.sendall(json.dumps(req).encode())
            fds = array.array("i")
            msg, anc, _flags, _addr = self.sock.recvmsg(
                MAX_REQUEST, socket.CMSG_SPACE(max(nfds, 1) * fds.itemsize)
            )
        for level, typ, data in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
        if not msg:
            raise GrantError("hypervisor service went away")
        reply = json.loads(msg)
        if "error" in reply:
            for fd in fds:
                os.close(fd)
            raise GrantError(reply["error"])
        if len(fds) != nfds:
            for fd in fds:
                os.close(fd)
            raise GrantError("hypervisor reply carried the wrong number of fds")
        return reply, list(fds)

    def create_domain(self, domid: int, pages: int, gnttab_frames: int) -> None:
        self._call(
            {"op": "create_domain", "domid": domid, "pages": pages, "gnttab_frames": gnttab_frames}
        )

    def domain_memory(self, domid: int) -> DomainMemory:
        reply, (fd,) = self._call({"op": "domain_memory", "domid": domid}, 1)
        return DomainMemory(fd, reply["pages"], reply["gnttab_frames"])

    def alloc_unbound(self, remote: int) -> EventChannel:
        reply, (wait_fd, notify_fd) = self._call({"op": "alloc_unbound", "remote": remote}, 2)
        return EventChannel(reply["port"], remote, wait_fd, notify_fd)

    def close_port(self, port: int) -> None:
        """EVTCHNOP_close (the local fds are the caller's to close)."""
        self._call({"op": "close", "port": port})

    def bind_interdomain(self, remote: int, remote_port: int) -> EventChannel:
        reply, (wait_fd, notify_fd) = self._call(
            {"op": "bind_interdomain", "remote": remote, "remote_port": remote_port}, 2
        )
        return EventChannel(reply["port"], remote, wait_fd, notify_fd)
