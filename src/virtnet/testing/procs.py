"""Child processes of tests and benchmarks (``virtnet serve``, QEMU, ...)."""

from __future__ import annotations

import contextlib
import signal
import subprocess
from typing import Any

__all__ = ["stop_process"]


def stop_process(proc: subprocess.Popen[Any], timeout: float = 15.0) -> int:
    """Stop ``proc`` the way a user would: SIGTERM, up to ``timeout`` seconds
    for it to exit, then SIGKILL.  Returns its exit status (``-9`` when it had
    to be killed); a process that already exited is only reaped."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=timeout)
    return int(proc.returncode)
