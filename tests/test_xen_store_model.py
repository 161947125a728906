"""Hypothesis state machine: the XenStore core against a plain-dict model (dom0, transactions)."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from virtnet.xen.store import Connection, Store
from virtnet.xen.xs_wire import Decoder, Op, encode, join_args

NAMES = st.sampled_from(["a", "b", "c"])
PATHS = st.lists(NAMES, min_size=1, max_size=3).map(lambda p: "/" + "/".join(p))
VALUES = st.binary(max_size=8)


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.store = Store()
        self.conn = self.store.connect(0)
        self.other = self.store.connect(0)
        self.model: dict[str, bytes] = {"/": b""}
        self.tx: int | None = None
        self.tx_model: dict[str, bytes] = {}
        self.tx_dirty = False  # someone else changed the store during our transaction
        self.tx_log: list[tuple[str, str, bytes]] = []
        self.req = 0

    def call(
        self, conn: Connection | None, op: Op, payload: bytes, tx: int = 0
    ) -> tuple[int, bytes]:
        self.req += 1
        c = self.conn if conn is None else conn
        c.receive(encode(op, self.req, tx, payload))
        msgs = [m for m in Decoder().feed(c.data_to_send()) if m.type != Op.WATCH_EVENT]
        assert len(msgs) == 1 and msgs[0].req_id == self.req
        return msgs[0].type, msgs[0].payload

    @staticmethod
    def _ancestors(path: str) -> list[str]:
        parts = path.strip("/").split("/")
        return ["/" + "/".join(parts[:i]) for i in range(1, len(parts) + 1)]

    def _apply_write(self, m: dict[str, bytes], path: str, value: bytes) -> None:
        for anc in self._ancestors(path)[:-1]:
            m.setdefault(anc, b"")
        m[path] = value

    @staticmethod
    def _apply_rm(m: dict[str, bytes], path: str) -> None:
        for p in [p for p in m if p == path or p.startswith(path + "/")]:
            del m[p]

    @rule(path=PATHS, value=VALUES, in_tx=st.booleans())
    def write(self, path: str, value: bytes, in_tx: bool) -> None:
        if in_tx and self.tx is not None:
            typ, _ = self.call(None, Op.WRITE, path.encode() + b"\0" + value, self.tx)
            assert typ == Op.WRITE
            self._apply_write(self.tx_model, path, value)
            self.tx_log.append(("w", path, value))
        else:
            typ, _ = self.call(self.other, Op.WRITE, path.encode() + b"\0" + value)
            assert typ == Op.WRITE
            self._apply_write(self.model, path, value)
            self.tx_dirty = True

    @rule(path=PATHS, in_tx=st.booleans())
    def rm(self, path: str, in_tx: bool) -> None:
        tx = self.tx if in_tx and self.tx is not None else 0
        m = self.tx_model if tx else self.model
        typ, payload = self.call(None if tx else self.other, Op.RM, join_args(path.encode()), tx)
        parent = path.rsplit("/", 1)[0] or "/"
        if path in m or parent in m:
            assert typ == Op.RM
            if path in m:
                self._apply_rm(m, path)
                if tx:
                    self.tx_log.append(("r", path, b""))
                else:
                    self.tx_dirty = True
        else:
            assert (typ, payload) == (Op.ERROR, b"ENOENT\0")

    @rule(path=PATHS, in_tx=st.booleans())
    def read(self, path: str, in_tx: bool) -> None:
        tx = self.tx if in_tx and self.tx is not None else 0
        m = self.tx_model if tx else self.model
        typ, payload = self.call(None, Op.READ, join_args(path.encode()), tx)
        if path in m:
            assert (typ, payload) == (Op.READ, m[path])
        else:
            assert (typ, payload) == (Op.ERROR, b"ENOENT\0")

    @rule()
    def start(self) -> None:
        if self.tx is None:
            typ, payload = self.call(None, Op.TRANSACTION_START, b"\0")
            assert typ == Op.TRANSACTION_START
            self.tx = int(payload.rstrip(b"\0"))
            self.tx_model = dict(self.model)
            self.tx_dirty = False
            self.tx_log = []

    @rule(commit=st.booleans())
    def end(self, commit: bool) -> None:
        if self.tx is None:
            return
        typ, payload = self.call(None, Op.TRANSACTION_END, b"T\0" if commit else b"F\0", self.tx)
        if not commit:
            assert typ == Op.TRANSACTION_END
        elif typ == Op.TRANSACTION_END:
            # Committed: the transaction's operations land on top of the current store.
            for kind, path, value in self.tx_log:
                if kind == "w":
                    self._apply_write(self.model, path, value)
                else:
                    self._apply_rm(self.model, path)
        else:
            # Only a concurrent change may make a commit fail, and only with EAGAIN.
            assert payload == b"EAGAIN\0" and self.tx_dirty
        self.tx = None

    @invariant()
    def tree_matches(self) -> None:
        nodes = self.store.tree.nodes
        assert {p: n.value for p, n in nodes.items()} == self.model
        for p, n in nodes.items():
            for c in n.children:
                assert (p.rstrip("/") + "/" + c) in nodes


StoreMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestStore = StoreMachine.TestCase
