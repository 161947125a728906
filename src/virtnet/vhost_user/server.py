"""vhost-user control-socket server: many VMs, one process, one ``selectors`` loop.

Each :class:`Endpoint` is one VM's Unix socket, either

* ``listen`` -- we bind and listen, QEMU connects (QEMU's
  ``-chardev socket,path=...,reconnect=1``); after a connection closes we
  accept the next one, or
* ``connect`` -- QEMU listens (``server=on``), we connect, retrying every
  ``retry_interval`` seconds until it works and again after the connection
  closes.

Every accepted connection gets a fresh :class:`~virtnet.vhost_user.backend.Backend`
from the endpoint's factory, a :class:`~virtnet.vhost_user.codec.MessageReader`,
and is served message by message: bytes and SCM_RIGHTS fds in, replies out.

Invariants:

* A peer's fault (:class:`~virtnet.errors.PeerError`: malformed or unknown
  message, wrong fd count, bad addresses, truncated ancillary data) or a
  socket error is logged with the endpoint's name, counted in
  ``Endpoint.errors``, and closes *that* connection only; the loop keeps
  serving every other endpoint and the endpoint accepts (or re-dials) a new
  connection.  An unexpected exception from the backend's owner is logged
  with its traceback and treated the same way (the process survives).
* Every received fd is owned by exactly one of: the reader, a message, the
  backend; all three close what they own when the connection closes.
  Ancillary data truncated by the kernel (``MSG_CTRUNC``) is an error and
  the fds that did arrive are closed at once.
* Only one connection per endpoint at a time: a second client on a
  listening endpoint is refused (closed) while the first is alive.
* The loop never blocks on a peer: sockets are non-blocking, a reply that
  does not fit is parked and the connection is read again only after it has
  been flushed (back-pressure), so a frontend that stops reading stalls only
  itself.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import selectors
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from virtnet.errors import PeerError, ProtocolError
from virtnet.vhost_user.backend import Backend
from virtnet.vhost_user.codec import (
    HEADER_SIZE,
    MAX_FDS_PER_MESSAGE,
    MAX_PAYLOAD_SIZE,
    U64,
    Message,
    MessageReader,
    ProtocolFeature,
    close_fds,
    encode_reply,
)

__all__ = ["RECV_SIZE", "Connection", "Endpoint", "Server"]

log = logging.getLogger(__name__)

#: One recv can hold a whole maximal message (header + MAX_PAYLOAD_SIZE).
RECV_SIZE = HEADER_SIZE + MAX_PAYLOAD_SIZE
#: Unsent reply bytes we hold for a frontend that does not read them.  QEMU
#: reads each reply before its next request, so a well-behaved peer never
#: has more than one small reply outstanding; past this it is dropped.
MAX_PENDING_REPLY_BYTES = 64 * 1024
#: Default client-mode redial interval (QEMU's reconnect option is in seconds too).
DEFAULT_RETRY_INTERVAL = 1.0
#: Reads per readiness event before going back to the selector (fairness
#: between VMs: one busy frontend cannot starve the others).
READS_PER_WAKEUP = 64
#: Listen backlog: one frontend per socket; a short queue absorbs reconnect races.
LISTEN_BACKLOG = 2


@dataclass(eq=False)
class Endpoint:
    """One VM's control socket and how to serve it."""

    name: str
    path: str
    mode: Literal["listen", "connect"]
    backend_factory: Callable[[], Backend]
    retry_interval: float = DEFAULT_RETRY_INTERVAL
    listener: socket.socket | None = None
    connection: Connection | None = None
    next_dial: float = 0.0
    errors: int = 0
    connections: int = 0
    last_error: str | None = None


@dataclass(eq=False)
class Connection:
    """One live frontend connection."""

    endpoint: Endpoint
    sock: socket.socket
    backend: Backend
    reader: MessageReader = field(init=False)
    messages: int = 0
    outbuf: bytearray = field(default_factory=bytearray)

    def __post_init__(self) -> None:
        self.reader = MessageReader(max_rings=self.backend.config.max_rings)

    def close(self) -> None:
        """Release everything: backend (stops rings, unmaps), reader fds, socket."""
        try:
            self.backend.close()
        finally:
            self.reader.close()
            self.sock.close()


class Server:
    """A selector loop over any number of :class:`Endpoint`."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._sel = selectors.DefaultSelector()
        self._clock = clock
        self.endpoints: list[Endpoint] = []
        self._closed = False

    # -- configuration ----------------------------------------------------

    def add_listener(
        self, path: str, backend_factory: Callable[[], Backend], *, name: str | None = None
    ) -> Endpoint:
        """Listen on ``path`` (a stale socket file there is replaced)."""
        ep = Endpoint(name or path, path, "listen", backend_factory)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        ep.listener = sock
        self._sel.register(sock, selectors.EVENT_READ, ep)
        self.endpoints.append(ep)
        log.info("%s: listening on %s", ep.name, path)
        return ep

    def add_client(
        self,
        path: str,
        backend_factory: Callable[[], Backend],
        *,
        name: str | None = None,
        retry_interval: float = DEFAULT_RETRY_INTERVAL,
    ) -> Endpoint:
        """Connect to a frontend listening on ``path``; dial now and after every close."""
        ep = Endpoint(name or path, path, "connect", backend_factory, retry_interval)
        self.endpoints.append(ep)
        self._dial(ep)
        return ep

    def adopt(
        self, sock: socket.socket, backend_factory: Callable[[], Backend], *, name: str
    ) -> Endpoint:
        """Serve an already connected socket (``--fd``, socketpair tests); no redial."""
        ep = Endpoint(name, "", "connect", backend_factory, retry_interval=float("inf"))
        ep.next_dial = float("inf")
        self.endpoints.append(ep)
        self._open(ep, sock)
        return ep

    def disconnect(self, ep: Endpoint, reason: str | None = None) -> None:
        """Drop ``ep``'s frontend connection (stops its rings); the endpoint stays.

        A listening endpoint accepts the frontend's reconnection; a client
        endpoint redials after ``retry_interval``.  ``reason`` (if given) is
        logged and counted as an error.
        """
        if ep.connection is not None:
            if reason is not None:
                log.error("%s: disconnecting frontend: %s", ep.name, reason)
            self._drop(ep.connection, reason)

    # -- loop -------------------------------------------------------------

    def run_once(self, timeout: float | None = None) -> None:
        """Wait up to ``timeout`` seconds for events and handle them; redial due clients."""
        now = self._clock()
        due = [e.next_dial for e in self.endpoints if e.mode == "connect" and e.connection is None]
        if due:
            wait = max(0.0, min(due) - now)
            timeout = wait if timeout is None else min(timeout, wait)
        for key, mask in self._sel.select(timeout):
            target = key.data
            if isinstance(target, Connection):
                if mask & selectors.EVENT_WRITE:
                    self._guarded(target, self._flush)
                else:
                    self._guarded(target, self._serve)
            elif isinstance(target, Endpoint):
                self._accept(target)
            elif callable(target):
                target()
        now = self._clock()
        for ep in self.endpoints:
            if ep.mode == "connect" and ep.connection is None and ep.next_dial <= now:
                self._dial(ep)

    def watch(self, sock: socket.socket, on_ready: Callable[[], None]) -> None:
        """Call ``on_ready`` from the loop whenever ``sock`` is readable (an fd
        of the owner's that must not wait for the next tick); it must read
        what made it readable, or the loop spins."""
        self._sel.register(sock, selectors.EVENT_READ, on_ready)

    def unwatch(self, sock: socket.socket) -> None:
        """Stop watching ``sock`` (before closing it)."""
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(sock)

    def serve_forever(self, *, poll: float = 1.0) -> None:
        while not self._closed:
            self.run_once(poll)

    def remove(self, ep: Endpoint) -> None:
        """Stop serving ``ep``: drop its connection (stops its rings), close and
        unlink its listening socket, stop redialling."""
        self._retire(ep)
        with contextlib.suppress(ValueError):
            self.endpoints.remove(ep)

    def close(self) -> None:
        """Close every connection and listener (and unlink listening sockets)."""
        self._closed = True
        for ep in self.endpoints:
            self._retire(ep)
        self._sel.close()

    # -- internals --------------------------------------------------------

    def _retire(self, ep: Endpoint) -> None:
        if ep.connection is not None:
            self._drop(ep.connection, None)
        ep.next_dial = float("inf")
        if ep.listener is not None:
            self._sel.unregister(ep.listener)
            ep.listener.close()
            ep.listener = None
            with contextlib.suppress(OSError):
                os.unlink(ep.path)

    def _open(self, ep: Endpoint, sock: socket.socket) -> None:
        sock.setblocking(False)
        try:
            backend = ep.backend_factory()
        except Exception:
            sock.close()
            raise
        backend.connection_fd = sock.fileno()
        conn = Connection(ep, sock, backend)
        ep.connection = conn
        ep.connections += 1
        self._sel.register(sock, selectors.EVENT_READ, conn)
        log.info("%s: frontend connected", ep.name)

    def _accept(self, ep: Endpoint) -> None:
        assert ep.listener is not None
        try:
            sock, _ = ep.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.error("%s: accept failed: %s", ep.name, exc)
            return
        if ep.connection is not None:
            log.warning("%s: refusing a second frontend while one is connected", ep.name)
            sock.close()
            return
        self._open(ep, sock)

    def _dial(self, ep: Endpoint) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(ep.path)
        except OSError as exc:
            sock.close()
            ep.next_dial = self._clock() + ep.retry_interval
            if exc.errno not in (errno.ENOENT, errno.ECONNREFUSED):
                log.warning("%s: connect to %s failed: %s", ep.name, ep.path, exc)
            return
        self._open(ep, sock)

    def _drop(self, conn: Connection, error: str | None) -> None:
        ep = conn.endpoint
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(conn.sock)
        ep.connection = None
        if error is not None:
            ep.errors += 1
            ep.last_error = error
        try:
            conn.close()
        except Exception:
            log.exception("%s: error while closing the connection", ep.name)
        ep.next_dial = self._clock() + ep.retry_interval
        log.info("%s: connection closed", ep.name)

    def _guarded(self, conn: Connection, step: Callable[[Connection], None]) -> None:
        ep = conn.endpoint
        try:
            step(conn)
        except PeerError as exc:
            log.error("%s: dropping frontend: %s", ep.name, exc)
            self._drop(conn, str(exc))
        except OSError as exc:
            log.error("%s: socket error, dropping frontend: %s", ep.name, exc)
            self._drop(conn, str(exc))
        except Exception as exc:
            log.exception("%s: internal error, dropping frontend", ep.name)
            self._drop(conn, f"internal error: {exc!r}")

    def _serve(self, conn: Connection) -> None:
        # Drain what is there, one message-bounded read at a time; the first
        # read cannot block (the selector said readable), later ones must not.
        for _ in range(READS_PER_WAKEUP):
            if conn.outbuf or conn.endpoint.connection is not conn:
                return  # back-pressure: no new requests until replies are out
            try:
                if not self._read_once(conn):
                    return
            except (BlockingIOError, InterruptedError):
                return

    def _read_once(self, conn: Connection) -> bool:
        """One read; False once the connection is gone."""
        # Never read past the message in progress: see MessageReader.wanted.
        want = min(conn.reader.wanted, RECV_SIZE)
        data, fds, msg_flags, _ = socket.recv_fds(conn.sock, want, MAX_FDS_PER_MESSAGE)
        if msg_flags & socket.MSG_CTRUNC:
            close_fds(fds)
            raise ProtocolError(f"more than {MAX_FDS_PER_MESSAGE} fds in one message (truncated)")
        if not data:
            close_fds(fds)
            if conn.reader.buffered:
                raise ProtocolError(f"frontend closed mid-message ({conn.reader.buffered} bytes)")
            self._drop(conn, None)
            return False
        conn.reader.feed(data, fds)
        # At most one message is complete now (reads stop at its end).
        for msg in conn.reader:
            conn.messages += 1
            log.debug(
                "%s: <- %s flags=0x%x %s fds=%d",
                conn.endpoint.name,
                msg.request.name,
                msg.flags,
                msg.body,
                len(msg.fds),
            )
            try:
                reply = conn.backend.handle(msg)
            except PeerError:
                self._nack(conn, msg)
                raise
            if reply is not None:
                self._send(conn, reply)
        return True

    def _nack(self, conn: Connection, msg: Message) -> None:
        """Before dropping: answer a NEED_REPLY request with failure (REPLY_ACK).

        "The payload should be set to zero on success or non-zero on failure"
        (vhost-user.rst, REPLY_ACK); QEMU then reports the failing request
        instead of a bare disconnect.
        """
        if msg.need_reply and conn.backend.has_protocol_feature(ProtocolFeature.REPLY_ACK):
            with contextlib.suppress(OSError, ProtocolError):
                self._send(conn, encode_reply(msg.request, U64(1)))

    def _send(self, conn: Connection, reply: bytes) -> None:
        """Send without ever blocking the loop; park what does not fit."""
        if not conn.outbuf:
            try:
                sent = conn.sock.send(reply)
            except (BlockingIOError, InterruptedError):
                sent = 0
            reply = reply[sent:]
            if not reply:
                return
            self._sel.modify(conn.sock, selectors.EVENT_WRITE, conn)
        conn.outbuf += reply
        if len(conn.outbuf) > MAX_PENDING_REPLY_BYTES:
            raise ProtocolError(
                f"frontend leaves over {MAX_PENDING_REPLY_BYTES} reply bytes unread"
            )

    def _flush(self, conn: Connection) -> None:
        try:
            sent = conn.sock.send(conn.outbuf)
        except (BlockingIOError, InterruptedError):
            return
        del conn.outbuf[:sent]
        if not conn.outbuf:
            self._sel.modify(conn.sock, selectors.EVENT_READ, conn)
            self._serve(conn)  # requests may have queued up meanwhile
