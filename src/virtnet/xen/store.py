"""XenStore semantics (sans-I/O): the node tree, permissions, watches, transactions.

This is the daemon's brain without the sockets.  :class:`Store` owns the tree
and every :class:`Connection`; a connection turns request bytes into reply
bytes with :meth:`Connection.receive` / :meth:`Connection.data_to_send`.

Invariants:

* Every node path is canonical: absolute, ``/``-separated, made only of
  ``[A-Za-z0-9_@/-]``, no empty component, no trailing ``/`` (except ``/``).
  Every node's parent exists and lists it as a child.
* Nodes are immutable values; any change replaces the node object, so a
  transaction detects a conflict by *identity* of the nodes it touched
  (``EAGAIN`` at ``TRANSACTION_END`` when any of them was replaced).
* Permissions follow xenstored: ``perms[0]`` is the owner and the default for
  every other domain; later entries override for one domain.  Domain 0 is
  privileged and bypasses checks and quotas.
* Everything a peer can grow is bounded: nodes (total and per domain),
  value size, watches and transactions per connection, queued output.
  Exceeding a bound yields an ``ENOSPC``/``E2BIG``/``EQUOTA``-style error
  reply, never an exception; a connection whose output queue overflows or
  whose framing breaks is marked :attr:`Connection.closed` and dropped.
* A peer's bad request never raises out of :meth:`Connection.receive`:
  ``XenStoreError`` becomes an ``XS_ERROR`` reply.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final

from virtnet.errors import XenStoreError
from virtnet.xen import xs_wire
from virtnet.xen.xs_wire import (
    OK,
    XENSTORE_ABS_PATH_MAX,
    XENSTORE_PAYLOAD_MAX,
    XENSTORE_REL_PATH_MAX,
    Message,
    Op,
    join_args,
    split_args,
    split_list,
)

__all__ = [
    "DOM0",
    "Connection",
    "Node",
    "Perm",
    "Store",
    "XsError",
    "format_perms",
    "parse_perms",
]

DOM0: Final = 0
#: Domain ids at and above DOMID_FIRST_RESERVED are special (xen/include/public/xen.h).
DOMID_FIRST_RESERVED: Final = 0x7FF0

# Quotas: xenstored defaults documented in docs/man/xenstored.8 / docs/misc/xenstore.txt
# (quota-nodes 1000, quota-max-entry-size 2048, quota-nb-watches 128,
# quota-transactions 10, quota-perms 5).  They apply to unprivileged domains.
QUOTA_NODES_PER_DOMAIN: Final = 1000
QUOTA_MAX_ENTRY_SIZE: Final = 2048
QUOTA_WATCHES_PER_DOMAIN: Final = 128
QUOTA_TRANSACTIONS_PER_DOMAIN: Final = 10
QUOTA_PERMS_PER_NODE: Final = 5
# Hard bounds for everyone, dom0 included (our own; keep memory bounded).
MAX_NODES: Final = 100_000
MAX_WATCHES_PER_CONNECTION: Final = 4096
MAX_TRANSACTIONS_PER_CONNECTION: Final = 64
MAX_OUTPUT_BYTES: Final = 4 * 1024 * 1024  # queued replies + events per connection
MAX_WATCH_TOKEN: Final = XENSTORE_REL_PATH_MAX

_PATH_RE: Final = re.compile(r"^[A-Za-z0-9_@/-]*$")


class XsError(XenStoreError):
    """A request refused with a xs_wire.h error name (``errno_name``)."""

    def __init__(self, errno_name: str, detail: str = "") -> None:
        assert errno_name in xs_wire.XSD_ERRORS
        super().__init__(f"{errno_name}: {detail}" if detail else errno_name)
        self.errno_name = errno_name


@dataclass(frozen=True, slots=True)
class Perm:
    """One ACL entry: ``domid`` may do ``access`` (one of ``n r w b``)."""

    domid: int
    access: str

    def __str__(self) -> str:
        return f"{self.access}{self.domid}"


def parse_perms(items: list[bytes]) -> tuple[Perm, ...]:
    """Parse ``["b0", "r5"]``-style entries; ``XsError(EINVAL)`` on garbage."""
    if not items:
        raise XsError("EINVAL", "empty permission list")
    out = []
    for raw in items:
        if len(raw) < 2 or raw[:1] not in (b"n", b"r", b"w", b"b") or not raw[1:].isdigit():
            raise XsError("EINVAL", f"bad permission {raw!r}")
        if len(raw) > 6:
            raise XsError("EINVAL", "domid too long")
        domid = int(raw[1:])
        if domid >= DOMID_FIRST_RESERVED:
            raise XsError("EINVAL", "reserved domid in permission")
        out.append(Perm(domid, raw[:1].decode()))
    return tuple(out)


def format_perms(perms: tuple[Perm, ...]) -> bytes:
    return join_args(*(str(p).encode() for p in perms))


@dataclass(frozen=True, slots=True)
class Node:
    """An immutable node; ``gen`` is the store generation at its last change."""

    value: bytes
    perms: tuple[Perm, ...]
    children: tuple[str, ...]
    gen: int

    @property
    def owner(self) -> int:
        return self.perms[0].domid


def _parent(path: str) -> str:
    idx = path.rfind("/")
    return "/" if idx <= 0 else path[:idx]


def _basename(path: str) -> str:
    return path[path.rfind("/") + 1 :]


def _is_child_or_same(path: str, top: str) -> bool:
    """True when ``path`` is ``top`` or lies below it."""
    if top == "/":
        return path.startswith("/")
    return path == top or path.startswith(top + "/")


class Tree:
    """A path -> :class:`Node` map plus per-owner node counts."""

    __slots__ = ("counts", "nodes")

    def __init__(self, nodes: dict[str, Node], counts: dict[int, int]) -> None:
        self.nodes = nodes
        self.counts = counts

    def copy(self) -> Tree:
        return Tree(dict(self.nodes), dict(self.counts))

    def put(self, path: str, node: Node) -> None:
        old = self.nodes.get(path)
        if old is not None:
            self.counts[old.owner] -= 1
        self.nodes[path] = node
        self.counts[node.owner] = self.counts.get(node.owner, 0) + 1

    def delete(self, path: str) -> None:
        old = self.nodes.pop(path, None)
        if old is not None:
            self.counts[old.owner] -= 1


@dataclass(slots=True)
class Watch:
    path: str  # canonical absolute (or special @...) path
    token: bytes
    relative_prefix: str  # stripped from event paths when the watch was relative


@dataclass(slots=True)
class Transaction:
    base: dict[str, Node]
    tree: Tree
    touched: set[str] = field(default_factory=set)
    written: set[str] = field(default_factory=set)
    events: list[tuple[str, bool, Node | None]] = field(default_factory=list)


class Store:
    """The XenStore database and the set of live connections."""

    def __init__(self) -> None:
        self.gen = 0
        root = Node(b"", (Perm(DOM0, "n"),), (), 0)
        self.tree = Tree({"/": root}, {DOM0: 1})
        self.connections: list[Connection] = []
        self.introduced: set[int] = {DOM0}
        #: Permissions of the special watch paths (dom0-only until dom0 says otherwise).
        self.special_perms: dict[str, tuple[Perm, ...]] = {}
        self._next_tx = 1
        self.stats_errors = 0

    # -- helpers used by connections -------------------------------------------------
    def next_gen(self) -> int:
        self.gen += 1
        return self.gen

    def next_tx_id(self) -> int:
        tx = self._next_tx
        self._next_tx = (self._next_tx % 0xFFFFFFFF) + 1  # never 0 (0 = no transaction)
        return tx

    def connect(self, domid: int) -> Connection:
        conn = Connection(self, domid)
        self.connections.append(conn)
        return conn

    def disconnect(self, conn: Connection) -> None:
        conn.closed = True
        conn.watches.clear()
        conn.transactions.clear()
        if conn in self.connections:
            self.connections.remove(conn)

    def fire(self, path: str, recursive: bool, node: Node | None) -> None:
        """Queue watch events for a change to ``path`` (``recursive`` for removals)."""
        for conn in self.connections:
            conn.fire_watches(path, recursive, node)

    def fire_special(self, name: str) -> None:
        perms = self.special_perms.get(name, (Perm(DOM0, "n"),))
        probe = Node(b"", perms, (), 0)
        for conn in self.connections:
            if not conn.can_read(probe):
                continue
            for w in conn.watches:
                if w.path == name:
                    conn.queue_event(name, w.token)


class Connection:
    """One client connection acting as domain ``domid`` (sans-I/O)."""

    def __init__(self, store: Store, domid: int) -> None:
        self.store = store
        self.domid = domid
        self.decoder = xs_wire.Decoder()
        self.out = bytearray()
        self.watches: list[Watch] = []
        self.transactions: dict[int, Transaction] = {}
        self.closed = False
        self.errors = 0

    @property
    def privileged(self) -> bool:
        return self.domid == DOM0

    # -- byte interface --------------------------------------------------------------
    def receive(self, data: bytes) -> None:
        """Consume request bytes; replies and events accumulate in :attr:`out`."""
        if self.closed:
            return
        try:
            msgs = self.decoder.feed(data)
        except XenStoreError:
            # Oversized message: the stream cannot be trusted any more.
            self.errors += 1
            self._queue(Op.ERROR, 0, 0, b"E2BIG\x00")
            self.closed = True
            return
        for msg in msgs:
            self.handle(msg)
            if self.closed:
                return
        if self.decoder.error is not None:
            self.errors += 1
            self._queue(Op.ERROR, 0, 0, b"E2BIG\x00")
            self.closed = True

    def data_to_send(self) -> bytes:
        data = bytes(self.out)
        self.out.clear()
        return data

    def _queue(self, op: int, req_id: int, tx_id: int, payload: bytes) -> None:
        if len(self.out) + len(payload) + xs_wire.HEADER_SIZE > MAX_OUTPUT_BYTES:
            self.closed = True  # peer does not read its replies: drop it
            return
        self.out += xs_wire.encode(op, req_id, tx_id, payload)

    def queue_event(self, path: str, token: bytes) -> None:
        payload = join_args(path.encode(), token)
        if len(payload) <= XENSTORE_PAYLOAD_MAX:
            self._queue(Op.WATCH_EVENT, 0, 0, payload)

    # -- dispatch --------------------------------------------------------------------
    def handle(self, msg: Message) -> None:
        try:
            reply = self._dispatch(msg)
        except XsError as exc:
            self.errors += 1
            self.store.stats_errors += 1
            self._queue(Op.ERROR, msg.req_id, msg.tx_id, exc.errno_name.encode() + b"\x00")
            return
        except XenStoreError:
            self.errors += 1
            self.store.stats_errors += 1
            self._queue(Op.ERROR, msg.req_id, msg.tx_id, b"EINVAL\x00")
            return
        self._queue(msg.type, msg.req_id, msg.tx_id, reply)
        if msg.type == Op.WATCH:
            # A new watch fires once immediately (docs/misc/xenstore.txt).
            w = self.watches[-1]
            self.queue_event(self._event_path(w, w.path), w.token)

    def _dispatch(self, msg: Message) -> bytes:
        try:
            op = Op(msg.type)
        except ValueError:
            raise XsError("EINVAL", f"unknown message type {msg.type}") from None
        tx = None
        if msg.tx_id != 0 and op not in (Op.TRANSACTION_START,):
            tx = self.transactions.get(msg.tx_id)
            if tx is None:
                raise XsError("ENOENT", "no such transaction")
        handler = _HANDLERS.get(op)
        if handler is None:
            raise XsError("ENOSYS" if op < xs_wire.XS_TYPE_COUNT else "EINVAL", op.name)
        return handler(self, msg, tx)

    # -- paths and permissions -------------------------------------------------------
    def _home(self) -> str:
        return f"/local/domain/{self.domid}"

    def canonical(self, raw: bytes, *, allow_special: bool = False) -> tuple[str, str]:
        """Return (absolute path, relative prefix to strip in events)."""
        try:
            path = raw.decode("ascii")
        except UnicodeDecodeError:
            raise XsError("EINVAL", "path not ASCII") from None
        if not path or not _PATH_RE.match(path):
            raise XsError("EINVAL", "bad path characters")
        if path.startswith("@"):
            if not allow_special or "/" in path:
                raise XsError("EINVAL", "special path not allowed here")
            return path, ""
        prefix = ""
        if not path.startswith("/"):
            if len(path) > XENSTORE_REL_PATH_MAX:
                raise XsError("EINVAL", "relative path too long")
            prefix = self._home() + "/"
            path = prefix + path
        if len(path) > XENSTORE_ABS_PATH_MAX:
            raise XsError("EINVAL", "path too long")
        if path != "/" and (path.endswith("/") or "//" in path):
            raise XsError("EINVAL", "empty path component")
        if "@" in path:
            raise XsError("EINVAL", "'@' only starts special paths")
        return path, prefix

    def access(self, node: Node) -> str:
        """The access letter this connection has on ``node``."""
        if self.privileged or node.perms[0].domid == self.domid:
            return "b"
        for p in node.perms[1:]:
            if p.domid == self.domid:
                return p.access
        return node.perms[0].access

    def can_read(self, node: Node) -> bool:
        return self.access(node) in ("r", "b")

    def can_write(self, node: Node) -> bool:
        return self.access(node) in ("w", "b")

    # -- tree access (through a transaction when given) -------------------------------
    def _tree(self, tx: Transaction | None) -> Tree:
        return self.store.tree if tx is None else tx.tree

    def _get(self, tx: Transaction | None, path: str) -> Node | None:
        if tx is not None:
            tx.touched.add(path)
        return self._tree(tx).nodes.get(path)

    def _missing(self, tx: Transaction | None, path: str) -> XsError:
        """errno_from_parents: ENOENT only if the nearest existing ancestor is readable."""
        nodes = self._tree(tx).nodes
        anc = _parent(path)
        while anc not in nodes:
            anc = _parent(anc)
        return XsError("ENOENT" if self.can_read(nodes[anc]) else "EACCES", path)

    def _get_readable(self, tx: Transaction | None, path: str) -> Node:
        node = self._get(tx, path)
        if node is None:
            raise self._missing(tx, path)
        if not self.can_read(node):
            raise XsError("EACCES", path)
        return node

    def _changed(
        self, tx: Transaction | None, path: str, recursive: bool, old: Node | None
    ) -> None:
        if tx is None:
            self.store.fire(path, recursive, old)
        else:
            tx.events.append((path, recursive, old))

    def _put(self, tx: Transaction | None, path: str, node: Node) -> None:
        tree = self._tree(tx)
        if tx is not None:
            tx.touched.add(path)
            tx.written.add(path)
        tree.put(path, node)

    def _delete(self, tx: Transaction | None, path: str) -> None:
        tree = self._tree(tx)
        if tx is not None:
            tx.touched.add(path)
            tx.written.add(path)
        tree.delete(path)

    def _check_quota_new(self, tree: Tree, n_new: int) -> None:
        if len(tree.nodes) + n_new > MAX_NODES:
            raise XsError("ENOSPC", "store full")
        if not self.privileged and tree.counts.get(self.domid, 0) + n_new > QUOTA_NODES_PER_DOMAIN:
            raise XsError("ENOSPC", "node quota exceeded")

    def _create(self, tx: Transaction | None, path: str, value: bytes) -> None:
        """Create ``path`` and any missing ancestors; write access on the nearest one."""
        tree = self._tree(tx)
        missing = [path]
        anc = _parent(path)
        while anc not in tree.nodes:
            missing.append(anc)
            anc = _parent(anc)
        parent = self._get(tx, anc)
        assert parent is not None
        if not self.can_write(parent):
            raise XsError("EACCES", anc)
        self._check_quota_new(tree, len(missing))
        perms = parent.perms
        if not self.privileged:
            perms = (Perm(self.domid, perms[0].access), *perms[1:])
        gen = self.store.next_gen()
        for p in reversed(missing):
            par = tree.nodes[_parent(p)]
            self._put(
                tx, _parent(p), Node(par.value, par.perms, (*par.children, _basename(p)), gen)
            )
            self._put(tx, p, Node(value if p == path else b"", perms, (), gen))
            self._changed(tx, p, False, None)

    # -- handlers --------------------------------------------------------------------
    def do_read(self, msg: Message, tx: Transaction | None) -> bytes:
        (raw,) = split_args(msg.payload, 1)
        path, _ = self.canonical(raw)
        return self._get_readable(tx, path).value

    def do_directory(self, msg: Message, tx: Transaction | None) -> bytes:
        (raw,) = split_args(msg.payload, 1)
        path, _ = self.canonical(raw)
        node = self._get_readable(tx, path)
        reply = join_args(*(c.encode() for c in node.children))
        if len(reply) > XENSTORE_PAYLOAD_MAX:
            raise XsError("E2BIG", "directory listing too long; use XS_DIRECTORY_PART")
        return reply

    def do_directory_part(self, msg: Message, tx: Transaction | None) -> bytes:
        raw, raw_off = split_args(msg.payload, 2)
        path, _ = self.canonical(raw)
        if not raw_off.isdigit() or len(raw_off) > 10:
            raise XsError("EINVAL", "bad offset")
        offset = int(raw_off)
        node = self._get_readable(tx, path)
        listing = join_args(*(c.encode() for c in node.children))
        if offset > len(listing):
            raise XsError("EINVAL", "offset beyond listing")
        head = str(node.gen).encode() + b"\x00"
        room = XENSTORE_PAYLOAD_MAX - len(head) - 1
        rest = listing[offset:]
        if len(rest) <= room:
            return head + rest + b"\x00"  # the final empty string marks the end
        cut = rest.rfind(b"\x00", 0, room) + 1
        return head + rest[:cut]

    def do_write(self, msg: Message, tx: Transaction | None) -> bytes:
        raw, value = split_args(msg.payload, 2, last_raw=True)
        path, _ = self.canonical(raw)
        if not self.privileged and len(value) > QUOTA_MAX_ENTRY_SIZE:
            raise XsError("ENOSPC", "value exceeds quota-max-entry-size")
        node = self._get(tx, path)
        if node is None:
            self._create(tx, path, value)
            return OK
        if not self.can_write(node):
            raise XsError("EACCES", path)
        self._put(tx, path, Node(value, node.perms, node.children, self.store.next_gen()))
        self._changed(tx, path, False, node)
        return OK

    def do_mkdir(self, msg: Message, tx: Transaction | None) -> bytes:
        (raw,) = split_args(msg.payload, 1)
        path, _ = self.canonical(raw)
        node = self._get(tx, path)
        if node is None:
            self._create(tx, path, b"")
        elif not self.can_write(node):
            raise XsError("EACCES", path)
        return OK

    def do_rm(self, msg: Message, tx: Transaction | None) -> bytes:
        (raw,) = split_args(msg.payload, 1)
        path, _ = self.canonical(raw)
        if path == "/":
            raise XsError("EINVAL", "cannot remove the root")
        node = self._get(tx, path)
        if node is None:
            if self._get(tx, _parent(path)) is None:
                raise self._missing(tx, path)
            return OK  # xenstored: removing a missing child of an existing parent is fine
        if not self.can_write(node):
            raise XsError("EACCES", path)
        parent_path = _parent(path)
        parent = self._get(tx, parent_path)
        assert parent is not None
        tree = self._tree(tx)
        # Collect the subtree (depth-first) before deleting anything.
        stack = [path]
        doomed: list[str] = []
        while stack:
            p = stack.pop()
            doomed.append(p)
            n = tree.nodes[p]
            stack.extend(p + "/" + c for c in n.children)
        name = _basename(path)
        self._put(
            tx,
            parent_path,
            Node(
                parent.value,
                parent.perms,
                tuple(c for c in parent.children if c != name),
                self.store.next_gen(),
            ),
        )
        for p in doomed:
            self._delete(tx, p)
        self._changed(tx, path, True, node)
        return OK

    def do_get_perms(self, msg: Message, tx: Transaction | None) -> bytes:
        (raw,) = split_args(msg.payload, 1)
        path, _ = self.canonical(raw, allow_special=True)
        if path.startswith("@"):
            return format_perms(self.store.special_perms.get(path, (Perm(DOM0, "n"),)))
        return format_perms(self._get_readable(tx, path).perms)

    def do_set_perms(self, msg: Message, tx: Transaction | None) -> bytes:
        items = split_list(msg.payload)
        path, _ = self.canonical(items[0], allow_special=True)
        perms = parse_perms(items[1:])
        if path.startswith("@"):
            if not self.privileged:
                raise XsError("EACCES", path)
            self.store.special_perms[path] = perms
            return OK
        if not self.privileged and len(perms) > QUOTA_PERMS_PER_NODE:
            raise XsError("ENOSPC", "too many permissions")
        node = self._get(tx, path)
        if node is None:
            raise self._missing(tx, path)
        if not self.privileged and node.owner != self.domid:
            raise XsError("EACCES", "only the owner may change permissions")
        if not self.privileged and perms[0].domid != self.domid:
            raise XsError("EPERM", "an unprivileged domain cannot give a node away")
        self._put(tx, path, Node(node.value, perms, node.children, self.store.next_gen()))
        self._changed(tx, path, False, node)
        return OK

    def do_watch(self, msg: Message, tx: Transaction | None) -> bytes:
        raw, token = split_args(msg.payload, 2)
        path, prefix = self.canonical(raw, allow_special=True)
        if len(token) > MAX_WATCH_TOKEN:
            raise XsError("EINVAL", "token too long")
        if any(w.path == path and w.token == token for w in self.watches):
            raise XsError("EEXIST", "watch already registered")
        limit = MAX_WATCHES_PER_CONNECTION if self.privileged else QUOTA_WATCHES_PER_DOMAIN
        if len(self.watches) >= limit:
            raise XsError("E2BIG", "too many watches")
        self.watches.append(Watch(path, token, prefix))
        return OK

    def do_unwatch(self, msg: Message, tx: Transaction | None) -> bytes:
        raw, token = split_args(msg.payload, 2)
        path, _ = self.canonical(raw, allow_special=True)
        for i, w in enumerate(self.watches):
            if w.path == path and w.token == token:
                del self.watches[i]
                return OK
        raise XsError("ENOENT", "no such watch")

    def do_reset_watches(self, msg: Message, tx: Transaction | None) -> bytes:
        self.watches.clear()
        self.transactions.clear()
        return OK

    def do_transaction_start(self, msg: Message, tx: Transaction | None) -> bytes:
        if msg.tx_id != 0:
            raise XsError("EBUSY", "nested transaction")
        limit = (
            MAX_TRANSACTIONS_PER_CONNECTION if self.privileged else QUOTA_TRANSACTIONS_PER_DOMAIN
        )
        if len(self.transactions) >= limit:
            raise XsError("ENOSPC", "too many transactions")
        base = self.store.tree.nodes
        new = Transaction(base=dict(base), tree=self.store.tree.copy())
        tx_id = self.store.next_tx_id()
        self.transactions[tx_id] = new
        return str(tx_id).encode() + b"\x00"

    def do_transaction_end(self, msg: Message, tx: Transaction | None) -> bytes:
        (arg,) = split_args(msg.payload, 1)
        if arg not in (b"T", b"F"):
            raise XsError("EINVAL", "TRANSACTION_END takes T or F")
        if tx is None:
            raise XsError("ENOENT", "no transaction")
        del self.transactions[msg.tx_id]
        if arg == b"F":
            return OK
        live = self.store.tree
        for p in tx.touched:
            if live.nodes.get(p) is not tx.base.get(p):
                raise XsError("EAGAIN", "transaction conflict")
        # Quotas are rechecked against the live store: several transactions must not
        # add up to more than one domain may own.
        delta: dict[int, int] = {}
        for p in tx.written:
            old, node = live.nodes.get(p), tx.tree.nodes.get(p)
            if old is not None:
                delta[old.owner] = delta.get(old.owner, 0) - 1
            if node is not None:
                delta[node.owner] = delta.get(node.owner, 0) + 1
        if len(live.nodes) + sum(delta.values()) > MAX_NODES:
            raise XsError("ENOSPC", "store full")
        if (
            not self.privileged
            and delta.get(self.domid, 0) > 0
            and live.counts.get(self.domid, 0) + delta[self.domid] > QUOTA_NODES_PER_DOMAIN
        ):
            raise XsError("ENOSPC", "node quota exceeded")
        for p in tx.written:
            node = tx.tree.nodes.get(p)
            if node is None:
                live.delete(p)
            else:
                live.put(p, node)
        for path, recursive, old in tx.events:
            self.store.fire(path, recursive, old)
        return OK

    def _domid_arg(self, raw: bytes) -> int:
        if not raw.isdigit() or len(raw) > 5:
            raise XsError("EINVAL", "bad domid")
        domid = int(raw)
        if domid >= DOMID_FIRST_RESERVED:
            raise XsError("EINVAL", "reserved domid")
        return domid

    def do_get_domain_path(self, msg: Message, tx: Transaction | None) -> bytes:
        (raw,) = split_args(msg.payload, 1)
        return f"/local/domain/{self._domid_arg(raw)}".encode() + b"\x00"

    def do_is_domain_introduced(self, msg: Message, tx: Transaction | None) -> bytes:
        (raw,) = split_args(msg.payload, 1)
        return b"T\x00" if self._domid_arg(raw) in self.store.introduced else b"F\x00"

    def do_introduce(self, msg: Message, tx: Transaction | None) -> bytes:
        if not self.privileged:
            raise XsError("EACCES", "INTRODUCE is for dom0")
        raw_dom, _mfn, _port = split_args(msg.payload, 3)
        domid = self._domid_arg(raw_dom)
        if domid == DOM0:
            raise XsError("EINVAL", "cannot introduce dom0")
        if domid not in self.store.introduced:
            self.store.introduced.add(domid)
            self.store.fire_special("@introduceDomain")
        return OK

    def do_release(self, msg: Message, tx: Transaction | None) -> bytes:
        if not self.privileged:
            raise XsError("EACCES", "RELEASE is for dom0")
        (raw,) = split_args(msg.payload, 1)
        domid = self._domid_arg(raw)
        if domid not in self.store.introduced or domid == DOM0:
            raise XsError("ENOENT", "domain not introduced")
        self.store.introduced.discard(domid)
        self.store.fire_special("@releaseDomain")
        return OK

    def do_control(self, msg: Message, tx: Transaction | None) -> bytes:
        if not self.privileged:
            raise XsError("EACCES", "XS_CONTROL is for dom0")
        args = split_list(msg.payload) if msg.payload else [b""]
        if args[0] == b"check":
            return OK
        raise XsError("EINVAL", "unknown control command")

    # -- watches ---------------------------------------------------------------------
    def _event_path(self, w: Watch, path: str) -> str:
        if w.relative_prefix and path.startswith(w.relative_prefix):
            return path[len(w.relative_prefix) :]
        return path

    def fire_watches(self, path: str, recursive: bool, node: Node | None) -> None:
        if not self.watches:
            return
        if node is not None and not self.can_read(node):
            return
        if node is None:
            live = self.store.tree.nodes.get(path)
            if live is not None and not self.can_read(live):
                return
        for w in self.watches:
            if w.path.startswith("@"):
                continue
            if _is_child_or_same(path, w.path):
                self.queue_event(self._event_path(w, path), w.token)
            elif recursive and _is_child_or_same(w.path, path):
                self.queue_event(self._event_path(w, w.path), w.token)


_HANDLERS = {
    Op.READ: Connection.do_read,
    Op.DIRECTORY: Connection.do_directory,
    Op.DIRECTORY_PART: Connection.do_directory_part,
    Op.WRITE: Connection.do_write,
    Op.MKDIR: Connection.do_mkdir,
    Op.RM: Connection.do_rm,
    Op.GET_PERMS: Connection.do_get_perms,
    Op.SET_PERMS: Connection.do_set_perms,
    Op.WATCH: Connection.do_watch,
    Op.UNWATCH: Connection.do_unwatch,
    Op.RESET_WATCHES: Connection.do_reset_watches,
    Op.TRANSACTION_START: Connection.do_transaction_start,
    Op.TRANSACTION_END: Connection.do_transaction_end,
    Op.GET_DOMAIN_PATH: Connection.do_get_domain_path,
    Op.IS_DOMAIN_INTRODUCED: Connection.do_is_domain_introduced,
    Op.INTRODUCE: Connection.do_introduce,
    Op.RELEASE: Connection.do_release,
    Op.CONTROL: Connection.do_control,
}
