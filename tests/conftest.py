"""Shared pytest fixtures and marker handling (kept small and generic).

* Tests marked ``vm`` are skipped, with the reason, when a real guest cannot be
  booted here (no root, no QEMU, no kernel with modules, no busybox/iperf3).
* ``no_fd_leak`` (``pytestmark = pytest.mark.usefixtures("no_fd_leak")``)
  fails a test that leaves more or fewer fds open than it found.
* ``bench_module(name)`` imports a module of ``bench/`` (the benches' helpers
  and tools are tested too).
* ``guest_initramfs`` builds the test-guest initramfs once per session, in
  ``$VIRTNET_CACHE_DIR`` (default ``~/.cache/virtnet/guest``), reused across runs.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

from virtnet.testing.fds import open_fds
from virtnet.testing.guest import build_initramfs, default_initramfs_dir, skip_reason


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``vm`` tests with a clear reason when no guest can be booted."""
    if not any(item.get_closest_marker("vm") for item in items):
        return
    reason = skip_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"cannot boot a test guest: {reason}")
    for item in items:
        if item.get_closest_marker("vm"):
            item.add_marker(skip)


BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="session")
def bench_module() -> Callable[[str], ModuleType]:
    """``load(name)``: the module ``bench/<name>.py`` (bench/ is on ``sys.path``
    only while it is imported: the benches import one another by name)."""

    def load(name: str) -> ModuleType:
        sys.path.insert(0, str(BENCH_DIR))
        try:
            return importlib.import_module(name)
        finally:
            sys.path.remove(str(BENCH_DIR))

    return load


@pytest.fixture(scope="session")
def guest_initramfs() -> Path:
    """Path of the (cached) test-guest initramfs."""
    return build_initramfs(default_initramfs_dir())


@pytest.fixture
def no_fd_leak() -> Iterator[None]:
    """The test must leave exactly as many fds open as it found."""
    before = open_fds()
    yield
    assert open_fds() == before, "fd leak"
