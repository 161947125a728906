"""Network namespaces, taps and veths for tests, always cleaned up.

Everything goes through ``ip`` (iproute2) in a subprocess; no extra Python
dependency.  Tests keep their traffic inside namespaces they create, using
addresses from ``10.77.0.0/16``.

Invariants:

* A :class:`NetNS` deletes its namespace on ``close()`` / ``with`` exit, after
  killing every process it started with :meth:`NetNS.popen` (iperf3 servers
  included).  Deleting the namespace destroys the virtual links inside it.
* Child processes die with the test process (``setpriv --pdeathsig``), and a
  namespace left by a killed run (its creator's pid is in its name) is deleted
  by the next :meth:`NetNS.create`.
* Names are unique per process (``<prefix><pid>x<n>``) and fit ``IFNAMSIZ``
  so parallel test runs do not collide.
* Every subprocess has a timeout; a failed ``ip`` call raises
  :class:`NetnsError` with the command and its stderr.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from types import TracebackType

__all__ = [
    "IperfServer",
    "NetNS",
    "NetnsError",
    "create_tap",
    "delete_link",
    "die_with_parent",
    "ip",
    "link_exists",
    "sweep_stale_namespaces",
    "unique_name",
]

#: Linux IFNAMSIZ (16) minus the terminating NUL.
IFNAME_MAX = 15

_counter = itertools.count()


class NetnsError(Exception):
    """An ``ip`` / namespace operation failed (command and stderr included)."""


def die_with_parent(argv: Sequence[str]) -> list[str]:
    """``argv`` wrapped so the process is SIGKILLed when its spawning thread dies.

    Uses util-linux ``setpriv --pdeathsig`` (an exec, so it is thread-safe,
    unlike ``preexec_fn``); keeps a killed test run from leaking QEMU or iperf3.
    Spawn from a long-lived thread (the main thread in pytest).  Without
    ``setpriv`` the command is returned unchanged.
    """
    if shutil.which("setpriv") is None:
        return list(argv)
    return ["setpriv", "--pdeathsig", "KILL", *argv]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_namespaces(prefix: str = "vnns") -> list[str]:
    """Delete namespaces named by :func:`unique_name` whose creating process is gone."""
    removed: list[str] = []
    pat = re.compile(rf"^{re.escape(prefix)}(\d+)x\d+$")
    for line in ip("netns", "list", check=False).splitlines():
        name = line.split()[0] if line.strip() else ""
        m = pat.match(name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            ip("netns", "del", name, check=False)
            removed.append(name)
    return removed


def unique_name(prefix: str = "vn") -> str:
    """A name unique within this process and among concurrent processes (<= 15 chars)."""
    name = f"{prefix}{os.getpid()}x{next(_counter)}"
    if len(name) > IFNAME_MAX:
        name = f"{prefix}{os.getpid() % 100000}x{next(_counter)}"[-IFNAME_MAX:]
    return name


def _run(argv: Sequence[str], *, timeout: float = 30.0, check: bool = True) -> str:
    try:
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise NetnsError(f"{shlex.join(argv)} timed out after {timeout}s") from None
    except FileNotFoundError as exc:
        raise NetnsError(f"{argv[0]} not found: {exc}") from None
    if check and proc.returncode != 0:
        raise NetnsError(f"{shlex.join(argv)} exited with {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def ip(*args: str, netns: str | None = None, check: bool = True) -> str:
    """Run ``ip [-n netns] <args>`` and return stdout."""
    argv = ["ip"] + (["-n", netns] if netns else []) + list(args)
    return _run(argv, check=check)


def link_exists(ifname: str, *, netns: str | None = None) -> bool:
    """True if link ``ifname`` exists (in ``netns`` or the current namespace)."""
    argv = ["ip"] + (["-n", netns] if netns else []) + ["link", "show", "dev", ifname]
    return subprocess.run(argv, capture_output=True, timeout=30, check=False).returncode == 0


def create_tap(
    ifname: str,
    *,
    multi_queue: bool = True,
    vnet_hdr: bool = True,
    netns: str | None = None,
) -> None:
    """Create a persistent tap ``ifname`` (``ip tuntap add mode tap``)."""
    args = ["tuntap", "add", "dev", ifname, "mode", "tap"]
    if multi_queue:
        args.append("multi_queue")
    if vnet_hdr:
        args.append("vnet_hdr")
    ip(*args, netns=netns)


def delete_link(ifname: str, *, netns: str | None = None) -> None:
    """Delete link ``ifname`` if it exists (taps included); never raises for a missing link."""
    if link_exists(ifname, netns=netns):
        ip("link", "del", "dev", ifname, netns=netns, check=False)


class IperfServer:
    """An ``iperf3 -s`` running in a namespace; stopped by :meth:`stop` or ``with`` exit."""

    def __init__(self, proc: subprocess.Popen[str], port: int) -> None:
        self.proc = proc
        self.port = port

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL)."""
        _terminate(self.proc)

    def __enter__(self) -> IperfServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _terminate(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


class NetNS:
    """A named network namespace owned by the test; use as a context manager.

    >>> with NetNS() as ns:                                  # doctest: +SKIP
    ...     ns.move_link("vntap0")          # from the root namespace
    ...     ns.set_address("vntap0", "10.77.0.1/24")
    ...     with ns.iperf3_server():
    ...         ...
    """

    def __init__(self, name: str | None = None, *, prefix: str = "vnns") -> None:
        self.name = name or unique_name(prefix)
        self._prefix = prefix
        self._procs: list[subprocess.Popen[str]] = []
        self._created = False

    # -- lifecycle ---------------------------------------------------------------------

    def create(self) -> NetNS:
        """Create the namespace and bring its ``lo`` up."""
        sweep_stale_namespaces(self._prefix)
        ip("netns", "add", self.name)
        self._created = True
        self.ip("link", "set", "lo", "up")
        return self

    def close(self) -> None:
        """Kill started processes and delete the namespace (idempotent)."""
        for proc in self._procs:
            _terminate(proc)
        self._procs.clear()
        if self._created:
            ip("netns", "del", self.name, check=False)
            self._created = False

    def __enter__(self) -> NetNS:
        return self.create()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- commands ----------------------------------------------------------------------

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed to run inside this namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(
        self, argv: Sequence[str] | str, *, timeout: float = 60.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a command (argv list, or a string for ``sh -c``) inside the namespace."""
        if isinstance(argv, str):
            argv = ["sh", "-c", argv]
        full = self.exec_argv(argv)
        try:
            proc = subprocess.run(
                full, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            raise NetnsError(f"{shlex.join(full)} timed out after {timeout}s") from None
        if check and proc.returncode != 0:
            raise NetnsError(
                f"{shlex.join(full)} exited with {proc.returncode}:\n{proc.stdout}{proc.stderr}"
            )
        return proc

    def popen(self, argv: Sequence[str], **kwargs: object) -> subprocess.Popen[str]:
        """Start a background process inside the namespace; killed by :meth:`close`."""
        proc: subprocess.Popen[str] = subprocess.Popen(  # type: ignore[call-overload]
            die_with_parent(self.exec_argv(argv)),
            text=True,
            start_new_session=True,
            **kwargs,
        )
        self._procs.append(proc)
        return proc

    def ip(self, *args: str, check: bool = True) -> str:
        """``ip -n <this namespace> <args>``."""
        return ip(*args, netns=self.name, check=check)

    # -- links and addresses -----------------------------------------------------------

    def move_link(self, ifname: str, *, from_netns: str | None = None) -> None:
        """Move ``ifname`` from the root namespace (or ``from_netns``) into this one."""
        ip("link", "set", "dev", ifname, "netns", self.name, netns=from_netns)

    def create_tap(self, ifname: str, *, multi_queue: bool = True, vnet_hdr: bool = True) -> None:
        """Create a persistent tap inside this namespace."""
        create_tap(ifname, multi_queue=multi_queue, vnet_hdr=vnet_hdr, netns=self.name)

    def create_veth(self, ifname: str, peer: str, *, peer_netns: str | None = None) -> None:
        """Create veth pair ``ifname`` (here) <-> ``peer`` (in ``peer_netns`` or root)."""
        self.ip("link", "add", ifname, "type", "veth", "peer", "name", peer)
        if peer_netns is not None:
            self.ip("link", "set", "dev", peer, "netns", peer_netns)
        else:
            self.ip("link", "set", "dev", peer, "netns", "1")

    def set_address(self, ifname: str, cidr: str, *, up: bool = True) -> None:
        """Add ``cidr`` (e.g. ``10.77.0.1/24``) to ``ifname``; bring it up."""
        self.ip("addr", "add", cidr, "dev", ifname)
        if up:
            self.link_up(ifname)

    def link_up(self, ifname: str) -> None:
        """``ip link set <ifname> up``."""
        self.ip("link", "set", "dev", ifname, "up")

    def add_bridge(self, name: str, cidr: str) -> None:
        """A Linux bridge ``name`` holding ``cidr`` (the host's side), up."""
        self.ip("link", "add", name, "type", "bridge")
        self.set_address(name, cidr)

    def enslave(self, ifname: str, bridge: str) -> None:
        """Put ``ifname`` into ``bridge`` and bring it up."""
        self.ip("link", "set", "dev", ifname, "master", bridge)
        self.link_up(ifname)

    def has_link(self, ifname: str) -> bool:
        """True if ``ifname`` exists in this namespace."""
        return link_exists(ifname, netns=self.name)

    def wait_link(self, ifname: str, *, timeout: float = 10.0) -> None:
        """Wait until ``ifname`` exists here (NetnsError after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while not self.has_link(ifname):
            if time.monotonic() > deadline:
                raise NetnsError(f"link {ifname} did not appear in netns {self.name}")
            time.sleep(0.05)

    # -- traffic -----------------------------------------------------------------------

    def ping(self, address: str, *, count: int = 3, timeout: float = 20.0) -> bool:
        """True if ``address`` answers at least one of ``count`` pings from here."""
        res = self.run(
            [
                *_ping_argv(),
                "-c",
                str(count),
                "-W",
                "2",
                "-w",
                str(max(2, int(timeout) - 1)),
                address,
            ],
            timeout=timeout,
            check=False,
        )
        return res.returncode == 0

    def iperf3_server(
        self, *, port: int = 5201, bind: str | None = None, timeout: float = 10.0
    ) -> IperfServer:
        """Start ``iperf3 -s`` here and wait until it listens."""
        argv = ["iperf3", "-s", "-p", str(port)]
        if bind:
            argv += ["-B", bind]
        proc = self.popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not self._listening(port):
            if proc.poll() is not None:
                raise NetnsError(f"iperf3 -s exited with {proc.returncode} in {self.name}")
            if time.monotonic() > deadline:
                _terminate(proc)
                raise NetnsError(f"iperf3 -s did not listen on {port} in {self.name}")
            time.sleep(0.05)
        return IperfServer(proc, port)

    def _listening(self, port: int) -> bool:
        out = self.run(["ss", "-Hltn", f"sport = :{port}"], check=False).stdout
        return bool(out.strip())

    def iperf3_client(
        self, args: Sequence[str], *, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``iperf3 <args>`` here (raises NetnsError on failure)."""
        return self.run(["iperf3", *args], timeout=timeout)


def _ping_argv() -> list[str]:
    """``ping`` if installed (iputils), else busybox's applet (busybox-static)."""
    if shutil.which("ping"):
        return ["ping"]
    if shutil.which("busybox"):
        return ["busybox", "ping"]
    raise NetnsError("neither ping nor busybox is installed")
