"""A small synchronous XenStore client over a Unix socket (used by netback/netfront).

Invariants:

* One request in flight at a time; replies are matched by ``req_id``.
  Watch events that arrive meanwhile are queued, never lost, and returned by
  :meth:`XsClient.read_event` in arrival order.
* The daemon is a peer: a reply that breaks framing or carries an
  unexpected type raises :class:`~virtnet.errors.XenStoreError`; an
  ``XS_ERROR`` reply raises :class:`XsClientError` carrying the errno name.
"""

from __future__ import annotations

import collections
import select
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

from virtnet.errors import XenStoreError
from virtnet.xen import xs_wire
from virtnet.xen.xs_wire import Message, Op, join_args

__all__ = ["XsClient", "XsClientError"]

MAX_QUEUED_EVENTS: Final = 65536


class XsClientError(XenStoreError):
    """The daemon answered ``XS_ERROR``; :attr:`errno_name` is e.g. ``"ENOENT"``."""

    def __init__(self, errno_name: str, op: Op, path: str = "") -> None:
        super().__init__(f"{op.name} {path}: {errno_name}")
        self.errno_name = errno_name


class XsClient:
    def __init__(self, path: str, *, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.timeout = timeout
        self._dec = xs_wire.Decoder()
        self._inbox: collections.deque[Message] = collections.deque()
        self.events: collections.deque[tuple[str, str]] = collections.deque()
        self._req = 0
        self.tx_id = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> XsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fileno(self) -> int:
        return self.sock.fileno()

    # -- plumbing --------------------------------------------------------------------
    def _recv_some(self, timeout: float | None) -> bool:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return False
        finally:
            self.sock.settimeout(self.timeout)
        if not data:
            raise XenStoreError("xenstored closed the connection")
        for msg in self._dec.feed(data):
            if msg.type == Op.WATCH_EVENT:
                parts = msg.payload.split(b"\x00")
                if len(parts) < 2:
                    raise XenStoreError("malformed watch event")
                if len(self.events) < MAX_QUEUED_EVENTS:
                    self.events.append((parts[0].decode(), parts[1].decode()))
            else:
                self._inbox.append(msg)
        return True

    def request(self, op: Op, payload: bytes, path: str = "") -> bytes:
        self._req = (self._req + 1) & 0xFFFFFFFF
        req_id = self._req
        tx = self.tx_id if op not in (Op.WATCH, Op.UNWATCH) else 0
        self.sock.sendall(xs_wire.encode(op, req_id, tx, payload))
        deadline = time.monotonic() + self.timeout
        while True:
            while self._inbox:
                msg = self._inbox.popleft()
                if msg.req_id != req_id:
                    continue
                if msg.type == Op.ERROR:
                    raise XsClientError(
                        msg.payload.rstrip(b"\x00").decode("ascii", "replace"), op, path
                    )
                if msg.type != op:
                    raise XenStoreError(f"reply type {msg.type} to {op.name}")
                return msg.payload
            left = deadline - time.monotonic()
            if left <= 0 or not self._recv_some(left):
                raise XenStoreError(f"no reply to {op.name} {path}")

    # -- operations ------------------------------------------------------------------
    def read(self, path: str) -> str:
        return self.request(Op.READ, join_args(path.encode()), path).decode()

    def read_or(self, path: str, default: str | None = None) -> str | None:
        try:
            return self.read(path)
        except XsClientError as e:
            if e.errno_name in ("ENOENT", "EACCES"):
                return default
            raise

    def write(self, path: str, value: str | bytes) -> None:
        v = value.encode() if isinstance(value, str) else value
        self.request(Op.WRITE, path.encode() + b"\x00" + v, path)

    def mkdir(self, path: str) -> None:
        self.request(Op.MKDIR, join_args(path.encode()), path)

    def rm(self, path: str) -> None:
        self.request(Op.RM, join_args(path.encode()), path)

    def directory(self, path: str) -> list[str]:
        p = self.request(Op.DIRECTORY, join_args(path.encode()), path)
        return [c.decode() for c in p.split(b"\x00")[:-1]]

    def get_perms(self, path: str) -> list[str]:
        p = self.request(Op.GET_PERMS, join_args(path.encode()), path)
        return [c.decode() for c in p.split(b"\x00")[:-1]]

    def set_perms(self, path: str, perms: list[str]) -> None:
        self.request(Op.SET_PERMS, join_args(path.encode(), *(p.encode() for p in perms)), path)

    def watch(self, path: str, token: str) -> None:
        self.request(Op.WATCH, join_args(path.encode(), token.encode()), path)

    def unwatch(self, path: str, token: str) -> None:
        self.request(Op.UNWATCH, join_args(path.encode(), token.encode()), path)

    def introduce(self, domid: int) -> None:
        self.request(Op.INTRODUCE, join_args(str(domid).encode(), b"0", b"0"))

    def read_event(self, timeout: float | None) -> tuple[str, str] | None:
        """Next watch event ``(path, token)``, or ``None`` after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.events:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if left is not None and left == 0.0:
                return None
            r, _, _ = select.select([self.sock], [], [], left)
            if r:
                self._recv_some(0.5)
        return self.events.popleft()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Run the body in a transaction; ``XsClientError('EAGAIN')`` on conflict."""
        p = self.request(Op.TRANSACTION_START, b"\x00")
        self.tx_id = int(p.rstrip(b"\x00"))
        try:
            yield
        except BaseException:
            try:
                self.request(Op.TRANSACTION_END, b"F\x00")
            except (OSError, XenStoreError):
                pass
            finally:
                self.tx_id = 0
            raise
        try:
            self.request(Op.TRANSACTION_END, b"T\x00")
        finally:
            self.tx_id = 0
