"""CPU cgroups for a bench's processes, as a libvirt + systemd host has them.

A bench run from a shell leaves QEMU, ``virtnet serve`` and the traffic's
other end in the root cgroup, where the kernel's autogroup scheduling shares
the CPUs between sessions (``guest_tap_baseline.AUTOGROUP``).  A host that
serves VMs does not run them that way: libvirt puts each QEMU in a scope of
``machine.slice`` with the cpu controller, a vhost-user backend runs as a
systemd service in ``system.slice``, and a login's processes are in
``user.slice``.  Tasks outside the root cgroup take no part in autogroup; the
CPUs are shared between the slices first (each at the default weight, cpu
controller v1 ``cpu.shares`` 1024 / v2 ``cpu.weight`` 100).

``--cgroups libvirt`` (:func:`add_cgroups_argument`) makes those groups for
the run, :meth:`Placement.place` moves a role's processes into its group, and
the groups are removed afterwards; ``--cgroups host`` (the default) leaves
every process where it starts.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

#: cgroup v1's cpu controller, or the v2 hierarchy (used when it offers "cpu").
CPU_V1 = Path("/sys/fs/cgroup/cpu")
UNIFIED = Path("/sys/fs/cgroup")
#: Where each role's processes go: the units a libvirt + systemd host gives them.
UNITS = {
    "vm": "machine.slice/machine-qemu-vnbench.scope",
    "backend": "system.slice/virtnet.service",
    "sender": "user.slice/user-0.slice/session-vnbench.scope",
}


class Placement:
    """The groups of one run (none with ``--cgroups host``)."""

    def __init__(self, root: Path | None, *, v2: bool = False) -> None:
        self.root = root
        self.v2 = v2
        self.made: list[Path] = []

    @property
    def name(self) -> str:
        return "host (as started)" if self.root is None else f"libvirt ({self.root})"

    def create(self) -> None:
        """Make every role's group, and its parents, that is not there."""
        assert self.root is not None
        for unit in UNITS.values():
            path = self.root
            for part in unit.split("/"):
                if self.v2:
                    (path / "cgroup.subtree_control").write_text("+cpu")
                path /= part
                if not path.is_dir():
                    path.mkdir()
                    self.made.append(path)

    def place(self, role: str, pids: Iterable[int]) -> None:
        """Move processes ``pids`` (every thread of each) into ``role``'s group."""
        if self.root is None:
            return
        procs = self.root / UNITS[role] / "cgroup.procs"
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):  # exited meanwhile
                procs.write_text(str(pid))

    def remove(self, timeout: float = 10.0) -> None:
        """Move what is left back to the root and remove the groups this run made."""
        if self.root is None:
            return
        for path in reversed(self.made):
            for pid in (path / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    (self.root / "cgroup.procs").write_text(pid)
            deadline = time.monotonic() + timeout
            while True:
                try:
                    path.rmdir()
                    break
                except OSError:  # a task still on its way out
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
        self.made.clear()


def cpu_hierarchy() -> tuple[Path, bool]:
    """(root of the cpu controller's hierarchy, whether it is cgroup v2)."""
    if (CPU_V1 / "cpu.shares").is_file():
        return CPU_V1, False
    controllers = UNIFIED / "cgroup.controllers"
    if controllers.is_file() and "cpu" in controllers.read_text().split():
        return UNIFIED, True
    raise RuntimeError("no cgroup cpu controller here (neither v1 /sys/fs/cgroup/cpu nor v2)")


def add_cgroups_argument(parser: argparse.ArgumentParser) -> None:
    """``--cgroups host|libvirt``: the placement :func:`cgroups` makes."""
    parser.add_argument(
        "--cgroups",
        choices=("host", "libvirt"),
        default="host",
        help="host: leave QEMU, serve and the sender where they start (autogroup decides);"
        " libvirt: QEMU in machine.slice, serve in system.slice, the sender in user.slice,"
        " cpu controller on (default: host)",
    )


@contextlib.contextmanager
def cgroups(setting: str) -> Iterator[Placement]:
    """A :class:`Placement` for ``setting`` (``host`` or ``libvirt``) for the block."""
    if setting == "host":
        yield Placement(None)
        return
    root, v2 = cpu_hierarchy()
    placement = Placement(root, v2=v2)
    try:
        placement.create()
        yield placement
    finally:
        placement.remove()
