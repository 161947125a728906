"""Child processes of tests and benchmarks (``virtnet serve``, QEMU, ...)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from typing import Any

__all__ = ["cpu_seconds", "stop_process", "tree_cpu_seconds"]


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


def _stat_fields(path: str) -> list[str] | None:
    """The fields of a ``/proc/.../stat`` file after the command name
    (``fields[1]`` is the parent pid, ``[11]``/``[12]`` utime/stime); None if gone."""
    try:
        with open(path) as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _ticks_to_s(fields: list[str]) -> float:
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads), or of
    its thread ``tid`` alone; 0.0 once it is gone."""
    fields = _stat_fields(f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat")
    return 0.0 if fields is None else _ticks_to_s(fields)


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds of process ``root`` and all its live descendants (a
    daemon's forked workers, however deep)."""
    procs: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(f"/proc/{entry}/stat")
            if fields is not None:
                procs[int(entry)] = (int(fields[1]), _ticks_to_s(fields))
    total = 0.0
    for pid, (_ppid, cpu) in procs.items():
        p = pid
        while p > 1 and p != root:  # walk up: is root an ancestor?
            p = procs.get(p, (0, 0.0))[0]
        if p == root:
            total += cpu
    return total
