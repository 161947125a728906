"""A XenStore daemon on Unix sockets, speaking the real ``xs_wire.h`` protocol.

The main socket acts for domain 0 (as ``xenstored``'s ``/run/xenstored/socket``
does); each ``--domain-socket DOMID=PATH`` adds a socket whose clients act as
guest ``DOMID``, so the permission model is exercised over the wire exactly as
a guest's ring connection would be.

Invariants:

* One thread, one ``selectors`` loop; every socket is non-blocking.
* A peer's bytes go to :class:`virtnet.xen.store.Connection`, which never
  raises; a connection it marks closed (broken framing, unread output above
  its bound) is dropped after its queued replies are flushed as far as the
  socket takes them.  No peer can take the daemon down.
* At most :data:`MAX_CONNECTIONS` clients; extra ones are closed on accept.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import selectors
import signal
import socket
import threading
from dataclasses import dataclass
from typing import Final

from virtnet.errors import UsageError
from virtnet.sdnotify import notify
from virtnet.xen.store import DOM0, DOMID_FIRST_RESERVED, Connection, Store

__all__ = ["MAX_CONNECTIONS", "XenStored", "add_arguments", "run"]

log = logging.getLogger(__name__)

MAX_CONNECTIONS: Final = 1024
RECV_CHUNK: Final = 65536


@dataclass(slots=True)
class _Listener:
    sock: socket.socket
    domid: int
    path: str


@dataclass(slots=True)
class _Client:
    sock: socket.socket
    conn: Connection
    pending: bytearray


class XenStored:
    """The daemon: listeners, clients, one :class:`Store`."""

    def __init__(self, socket_path: str, domain_sockets: dict[int, str] | None = None) -> None:
        self.store = Store()
        self.sel = selectors.DefaultSelector()
        self.listeners: list[_Listener] = []
        self.clients: dict[int, _Client] = {}
        self._stop_r, self._stop_w = os.pipe()
        os.set_blocking(self._stop_w, False)
        self.sel.register(self._stop_r, selectors.EVENT_READ, None)
        self.add_listener(socket_path, DOM0)
        for domid, path in (domain_sockets or {}).items():
            self.add_listener(path, domid)
        self.dropped = 0

    def add_listener(self, path: str, domid: int) -> None:
        if not 0 <= domid < DOMID_FIRST_RESERVED:
            raise UsageError(f"bad domid {domid}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        sock.listen(64)
        sock.setblocking(False)
        lst = _Listener(sock, domid, path)
        self.listeners.append(lst)
        self.sel.register(sock, selectors.EVENT_READ, lst)

    def stop(self) -> None:
        """Ask :meth:`serve_forever` to return (thread- and signal-safe)."""
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._stop_w, b"x")

    def close(self) -> None:
        for c in list(self.clients.values()):
            self._drop(c)
        for lst in self.listeners:
            self.sel.unregister(lst.sock)
            lst.sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lst.path)
        self.listeners.clear()
        self.sel.close()
        os.close(self._stop_r)
        os.close(self._stop_w)

    def serve_forever(self) -> None:
        while True:
            for key, events in self.sel.select():
                data = key.data
                if data is None:
                    return
                if isinstance(data, _Listener):
                    self._accept(data)
                elif isinstance(data, _Client):
                    if events & selectors.EVENT_READ:
                        self._read(data)
                    if events & selectors.EVENT_WRITE and data.sock.fileno() >= 0:
                        self._flush(data)
            self._flush_all()

    # -- internals -------------------------------------------------------------------
    def _accept(self, lst: _Listener) -> None:
        try:
            sock, _ = lst.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        if len(self.clients) >= MAX_CONNECTIONS:
            sock.close()
            return
        sock.setblocking(False)
        client = _Client(sock, self.store.connect(lst.domid), bytearray())
        self.clients[sock.fileno()] = client
        self.sel.register(sock, selectors.EVENT_READ, client)

    def _read(self, c: _Client) -> None:
        try:
            data = c.sock.recv(RECV_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(c)
            return
        c.conn.receive(data)
        if c.conn.closed:
            self.dropped += 1
            log.info("dropping domain %d connection after a protocol error", c.conn.domid)

    def _flush_all(self) -> None:
        for c in list(self.clients.values()):
            if c.conn.out or c.pending:
                self._flush(c)
            elif c.conn.closed:
                self._drop(c)

    def _flush(self, c: _Client) -> None:
        if c.sock.fileno() < 0:
            return
        c.pending += c.conn.data_to_send()
        try:
            while c.pending:
                n = c.sock.send(c.pending)
                del c.pending[:n]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._drop(c)
            return
        if c.conn.closed and (not c.pending or len(c.pending) > 1 << 20):
            self._drop(c)
            return
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if c.pending else 0)
        self.sel.modify(c.sock, want, c)

    def _drop(self, c: _Client) -> None:
        if c.sock.fileno() < 0:
            return
        self.clients.pop(c.sock.fileno(), None)
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(c.sock)
        c.sock.close()
        self.store.disconnect(c.conn)


def start_in_thread(
    socket_path: str, domain_sockets: dict[int, str] | None = None
) -> tuple[XenStored, threading.Thread]:
    """Start a daemon on a background thread (tests, the demo)."""
    d = XenStored(socket_path, domain_sockets)
    t = threading.Thread(target=d.serve_forever, name="xenstored", daemon=True)
    t.start()
    return d, t


def _domain_socket(text: str) -> tuple[int, str]:
    domid, sep, path = text.partition("=")
    if not sep or not domid.isdigit() or not path:
        raise argparse.ArgumentTypeError("expected DOMID=PATH")
    return int(domid), path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``virtnet xenstored``."""
    parser.add_argument("--socket", required=True, help="Unix socket for dom0 clients")
    parser.add_argument(
        "--domain-socket",
        action="append",
        type=_domain_socket,
        default=[],
        metavar="DOMID=PATH",
        help="extra socket whose clients act as guest DOMID (repeatable)",
    )
    parser.add_argument(
        "--hypervisor-socket",
        help="also serve the emulated hypervisor (domain memory, event channels) here",
    )


def run(args: argparse.Namespace) -> int:
    """Entry point of ``virtnet xenstored``: serve until SIGTERM/SIGINT."""
    d = XenStored(args.socket, dict(args.domain_socket))
    hyp = None
    if args.hypervisor_socket:
        from virtnet.xen.hyp import HypervisorService

        hyp = HypervisorService(args.hypervisor_socket)
        hyp.serve_in_thread()
    signal.signal(signal.SIGTERM, lambda *_: d.stop())
    signal.signal(signal.SIGINT, lambda *_: d.stop())
    notify(f"READY=1\nSTATUS=xenstored on {args.socket}\nMAINPID={os.getpid()}")
    try:
        d.serve_forever()
    finally:
        notify("STOPPING=1")
        d.close()
        if hyp is not None:
            hyp.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="virtnet xenstored")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
