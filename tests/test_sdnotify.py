"""Readiness notification (``$NOTIFY_SOCKET``): the function, and the daemons under it.

The end-to-end tests play the service manager: they bind the datagram socket
systemd would, start ``virtnet serve`` or ``virtnet xenstored`` with
``NOTIFY_SOCKET`` pointing at it, and check that ``READY=1`` comes only once
the daemon's socket accepts connections, and ``STOPPING=1`` on SIGTERM.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtnet.sdnotify import MAX_STATE, notify
from virtnet.testing.procs import stop_process

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A bound datagram socket, as systemd provides for a Type=notify unit."""
    path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(30)
    try:
        yield path, s
    finally:
        s.close()


def test_no_notify_socket_sends_nothing() -> None:
    assert notify("READY=1", env={}) is False


def test_sends_one_datagram(manager: tuple[str, socket.socket]) -> None:
    path, s = manager
    assert notify("READY=1\nSTATUS=up", env={"NOTIFY_SOCKET": path})
    assert s.recv(MAX_STATE + 1) == b"READY=1\nSTATUS=up"


def test_abstract_namespace() -> None:
    name = f"virtnet-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        s.settimeout(5)
        assert notify("READY=1", env={"NOTIFY_SOCKET": "@" + name})
        assert s.recv(64) == b"READY=1"


def test_oversized_state_is_cut_at_a_line(manager: tuple[str, socket.socket]) -> None:
    path, s = manager
    assert notify("READY=1\nSTATUS=" + "x" * (2 * MAX_STATE), env={"NOTIFY_SOCKET": path})
    assert s.recv(2 * MAX_STATE) == b"READY=1"


def test_unreachable_manager_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="virtnet.sdnotify"):
        assert notify("READY=1", env={"NOTIFY_SOCKET": str(tmp_path / "nobody")}) is False
    assert "cannot notify the service manager" in caplog.text


@pytest.mark.parametrize(
    ("args", "status"),
    [
        (
            ["serve", "--port", "null", "--queues", "2", "--socket"],
            "serving 1 VM(s), 2 queue pairs",
        ),
        (["xenstored", "--socket"], "xenstored on "),
    ],
    ids=["serve", "xenstored"],
)
def test_daemon_is_ready_when_its_socket_listens_and_says_stopping(
    tmp_path: Path, manager: tuple[str, socket.socket], args: list[str], status: str
) -> None:
    path, s = manager
    listen = tmp_path / "daemon.sock"
    env = dict(os.environ, NOTIFY_SOCKET=path)
    log = (tmp_path / "daemon.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "virtnet.cli", *args, str(listen)],
        env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        ready = s.recv(MAX_STATE).decode().splitlines()
        assert "READY=1" in ready
        assert f"MAINPID={proc.pid}" in ready
        assert any(line.startswith("STATUS=" + status) for line in ready), ready
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.connect(str(listen))  # already listening when READY=1 came
        proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in s.recv(MAX_STATE).decode().splitlines()
        assert proc.wait(timeout=30) == 0
    finally:
        stop_process(proc)
        log.close()


UNIT = Path(__file__).resolve().parent.parent / "contrib" / "systemd" / "virtnet-serve@.service"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """``systemd-analyze verify`` (systemd's own parser) accepts the shipped unit
    without a warning, with ExecStart pointed at this checkout's ``virtnet``."""
    text = UNIT.read_text()
    assert "Type=notify" in text and "ExecStart=/usr/local/bin/virtnet serve " in text
    exe = shutil.which("virtnet")
    assert exe is not None, "the virtnet entry point is not on PATH"
    unit = tmp_path / "virtnet-serve@ci.service"
    unit.write_text(text.replace("/usr/local/bin/virtnet", exe))
    argv = ["systemd-analyze", "verify", str(unit)]
    r = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr
