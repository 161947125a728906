"""Start ``virtnet serve`` for a test or a benchmark, inside a network namespace."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from virtnet.testing.guest import wait_for
from virtnet.testing.netns import NetNS

#: How long serve may take to put up its stats socket.
SERVE_START_TIMEOUT = 20.0


class ServeStartError(RuntimeError):
    """``virtnet serve`` exited or did not come up."""


def start_serve(
    ns: NetNS, args: Sequence[str], *, stats: Path, log: Path, verbose: bool = True
) -> subprocess.Popen[str]:
    """``virtnet [-v] serve ARGS --stats-socket STATS`` in ``ns``, output appended to
    ``log``; returns once the stats socket exists (serve is serving)."""
    argv = [sys.executable, "-m", "virtnet.cli", *(["-v"] if verbose else []), "serve",
            *args, "--stats-socket", str(stats)]  # fmt: skip
    with log.open("a") as out:
        proc = ns.popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if not wait_for(lambda: stats.exists() or proc.poll() is not None, timeout=SERVE_START_TIMEOUT):
        proc.kill()
        raise ServeStartError(f"virtnet serve did not start in {SERVE_START_TIMEOUT:.0f} s")
    if proc.poll() is not None:
        tail = log.read_text()[-3000:]
        raise ServeStartError(f"virtnet serve exited ({proc.returncode}):\n{tail}")
    return proc
