"""Child processes of tests and benchmarks (``virtnet serve``, QEMU, ...)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from typing import Any

__all__ = [
    "cpu_seconds",
    "stop_process",
    "system_cpu_ticks",
    "thread_cpu_seconds",
    "tree_cpu_seconds",
    "tree_pids",
]


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


def _all_procs() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds) of every live process."""
    procs: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(f"/proc/{entry}/stat")
            if fields is not None:
                procs[int(entry)] = (int(fields[1]), _ticks_to_s(fields))
    return procs


def _in_tree(procs: dict[int, tuple[int, float]], pid: int, root: int) -> bool:
    while pid > 1 and pid != root:  # walk up: is root an ancestor?
        pid = procs.get(pid, (0, 0.0))[0]
    return pid == root


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds of process ``root`` and all its live descendants (a
    daemon's forked workers, however deep)."""
    procs = _all_procs()
    return sum(cpu for pid, (_ppid, cpu) in procs.items() if _in_tree(procs, pid, root))


def tree_pids(root: int) -> list[int]:
    """``root`` and its live descendants, in pid order."""
    procs = _all_procs()
    return sorted(pid for pid in procs if _in_tree(procs, pid, root))


def thread_cpu_seconds(pid: int) -> dict[int, tuple[str, float]]:
    """tid -> (thread name, CPU seconds) for every live thread of ``pid``
    (empty once it is gone)."""
    out: dict[int, tuple[str, float]] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        path = f"/proc/{pid}/task/{tid}"
        fields = _stat_fields(f"{path}/stat")
        if fields is None:
            continue
        try:
            with open(f"{path}/comm") as f:
                name = f.read().strip()
        except OSError:
            continue
        out[int(tid)] = (name, _ticks_to_s(fields))
    return out


def system_cpu_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot (``/proc/stat``; idle
    and iowait are not busy): the difference of two readings gives the
    share of the machine that was busy in between."""
    with open("/proc/stat") as f:
        head = f.readline().split()
    if not head or head[0] != "cpu":
        raise RuntimeError(f"unexpected /proc/stat first line: {' '.join(head)!r}")
    ticks = [int(x) for x in head[1:]]
    total = sum(ticks[:8])  # user..steal; guest time is already in user
    return total - ticks[3] - ticks[4], total
