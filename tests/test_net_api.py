"""Public API and sans-I/O checks for the pure virtio-net core modules."""

from __future__ import annotations

import ast
import importlib
import inspect

import pytest

MODULES = ["virtnet.net", "virtnet.rss", "virtnet.ctrl", "virtnet.steering"]
# Nothing that touches sockets, fds, processes or the clock.
FORBIDDEN = {
    "asyncio", "mmap", "multiprocessing", "os", "select", "selectors", "signal", "socket",
    "subprocess", "threading", "time",
}  # fmt: skip


@pytest.mark.parametrize("name", MODULES)
def test_all_names_exist(name: str) -> None:
    mod = importlib.import_module(name)
    assert mod.__doc__ and "Invariants" in mod.__doc__
    for attr in mod.__all__:
        assert hasattr(mod, attr), f"{name}.{attr} missing"
    assert sorted(mod.__all__) == sorted(set(mod.__all__))


@pytest.mark.parametrize("name", MODULES)
def test_sans_io(name: str) -> None:
    tree = ast.parse(inspect.getsource(importlib.import_module(name)))
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & FORBIDDEN
