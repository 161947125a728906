"""DPDK ``dpdk-testpmd`` as a vhost-user peer for tests and benchmarks.

:class:`TestPmd` starts testpmd interactively (``-i``) with its stdin and
stdout on pipes (stdout line-buffered through ``stdbuf``, else testpmd's
stdio holds command output until exit), sends commands and reads each
answer up to the next ``testpmd>`` prompt, parses ``show port stats all``
into :class:`PortStats`, and always shuts testpmd down: ``quit``, then
SIGTERM, then SIGKILL, each with a deadline.  Its ``/var/run/dpdk/<prefix>``
runtime directory is removed afterwards.

Typical use::

    with TestPmd.vhost(sock, queues=2, fwd="macswap") as pmd:
        ...                       # connect a frontend to ``sock``
        pmd.start_forwarding()
        stats = pmd.port_stats()[0]

Invariants:

* Every wait (startup, prompt, exit) has a deadline; a testpmd that does not
  answer raises :class:`TestPmdError` and is killed.
* testpmd's output pipe is drained all the time by a reader thread: the vhost
  library logs every vhost-user message to it, and a full pipe would block
  testpmd's vhost thread in ``write`` (a stuck backend, not a slow one).
  Only the last :data:`MAX_OUTPUT` bytes are kept.
* The process is gone when :meth:`TestPmd.close` (or ``__exit__``) returns,
  whatever happened before.
* The ``virtnet`` package proper never imports this module.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DEFAULT_MBUFS",
    "DEFAULT_MEM_MB",
    "PortStats",
    "TestPmd",
    "TestPmdError",
    "skip_reason",
    "virtio_user_txonly_pps",
]

#: ``--no-huge`` needs an explicit amount of (anonymous) memory; 512 MB holds
#: the mbuf pool below and the vhost PMD's rings.
DEFAULT_MEM_MB = 512
#: testpmd sizes its mbuf pool from the port/queue counts (155456 mbufs of
#: 2176 bytes = 338 MB for one port); a fixed pool keeps it inside -m.
DEFAULT_MBUFS = 16384
#: Seconds to wait for testpmd's first prompt (EAL init + mempool creation).
STARTUP_TIMEOUT = 30.0
#: Seconds to wait for the prompt after a command.
COMMAND_TIMEOUT = 10.0
#: Seconds to wait for exit after ``quit`` / SIGTERM before escalating.
EXIT_TIMEOUT = 10.0
PROMPT = b"testpmd> "
#: Bytes of testpmd output kept in memory (the tail; the log file gets all).
MAX_OUTPUT = 1 << 20

_COUNTER = itertools.count()


class TestPmdError(RuntimeError):
    """testpmd failed to start, stopped answering or exited."""


@dataclass(frozen=True)
class PortStats:
    """One port's ``show port stats`` block."""

    port: int
    rx_packets: int
    rx_missed: int
    rx_bytes: int
    rx_errors: int
    rx_nombuf: int
    tx_packets: int
    tx_errors: int
    tx_bytes: int
    rx_pps: int
    tx_pps: int


_STATS_RE = re.compile(
    rb"NIC statistics for port (\d+).*?"
    rb"RX-packets:\s*(\d+)\s+RX-missed:\s*(\d+)\s+RX-bytes:\s*(\d+).*?"
    rb"RX-errors:\s*(\d+).*?RX-nombuf:\s*(\d+).*?"
    rb"TX-packets:\s*(\d+)\s+TX-errors:\s*(\d+)\s+TX-bytes:\s*(\d+).*?"
    rb"Rx-pps:\s*(\d+).*?Tx-pps:\s*(\d+)",
    re.S,
)


def parse_port_stats(text: bytes) -> dict[int, PortStats]:
    """Every port block in the output of ``show port stats all``."""
    out: dict[int, PortStats] = {}
    for m in _STATS_RE.finditer(text):
        vals = [int(x) for x in m.groups()]
        out[vals[0]] = PortStats(*vals)
    return out


def skip_reason() -> str | None:
    """Why testpmd cannot run here (for ``pytest.skip``), or ``None``."""
    if shutil.which("dpdk-testpmd") is None:
        return "dpdk-testpmd is not installed (package dpdk)"
    if shutil.which("stdbuf") is None:
        return "stdbuf (coreutils) is needed to read testpmd's answers"
    return None


def _parse_cpus(text: str) -> list[int]:
    """An EAL ``-l`` list like ``0-1`` or ``0,2-3``."""
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += range(int(lo), int(hi or lo) + 1)
    return out


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a live process, from /proc (0.0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


class TestPmd:
    """One interactive dpdk-testpmd process."""

    __test__ = False  # not a pytest class

    def __init__(
        self,
        vdevs: Sequence[str],
        *,
        lcores: str = "0-1",
        main_lcore: int | None = None,
        rxq: int = 1,
        txq: int = 1,
        fwd: str = "rxonly",
        mem_mb: int = DEFAULT_MEM_MB,
        mbufs: int = DEFAULT_MBUFS,
        extra_eal: Sequence[str] = (),
        extra_app: Sequence[str] = (),
        log_path: str | os.PathLike[str] | None = None,
    ) -> None:
        reason = skip_reason()
        if reason is not None:
            raise TestPmdError(reason)
        self.prefix = f"vnt{os.getpid()}_{next(_COUNTER)}"
        eal = ["--no-huge", "--no-pci", "-m", str(mem_mb), "-l", lcores,
               "--file-prefix", self.prefix]  # fmt: skip
        if main_lcore is not None:
            eal += ["--main-lcore", str(main_lcore)]
        for v in vdevs:
            eal += ["--vdev", v]
        app = ["-i", f"--rxq={rxq}", f"--txq={txq}", "--nb-cores=1",
               f"--forward-mode={fwd}", f"--total-num-mbufs={mbufs}"]  # fmt: skip
        self.argv = ["stdbuf", "-oL", "-eL", "dpdk-testpmd", *eal, *extra_eal, "--",
                     *app, *extra_app]  # fmt: skip
        self.fwd = fwd
        self.lcores = _parse_cpus(lcores)
        self.main_lcore = main_lcore if main_lcore is not None else min(self.lcores)
        self.log_path = Path(log_path) if log_path is not None else None
        self.output = bytearray()
        self._total = 0  # bytes ever read (output holds the last MAX_OUTPUT of them)
        self._cond = threading.Condition()
        self._eof = False
        self._reader: threading.Thread | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def forwarding_cpus(self) -> list[int]:
        """CPUs testpmd's forwarding lcores spin on (``--nb-cores=1``: the first non-main)."""
        return [c for c in self.lcores if c != self.main_lcore][:1]

    def other_cpus(self) -> list[int]:
        """CPUs this process may use that testpmd does not spin on (for pinning a peer).

        Falls back to every allowed CPU when testpmd spins on all of them.
        """
        allowed = sorted(os.sched_getaffinity(0))
        free = [c for c in allowed if c not in self.forwarding_cpus]
        return free or allowed

    # -- constructors -----------------------------------------------------
    @classmethod
    def vhost(
        cls,
        sock: str | os.PathLike[str],
        *,
        queues: int = 1,
        client: bool = False,
        fwd: str = "rxonly",
        **kw: object,
    ) -> TestPmd:
        """testpmd with one ``net_vhost`` port on ``sock`` (server unless ``client``)."""
        vdev = f"net_vhost0,iface={sock},queues={queues}" + (",client=1" if client else "")
        return cls([vdev], rxq=queues, txq=queues, fwd=fwd, **kw)  # type: ignore[arg-type]

    @classmethod
    def virtio_user(
        cls,
        sock: str | os.PathLike[str],
        *,
        queues: int = 1,
        server: bool = False,
        fwd: str = "txonly",
        packed: bool = False,
        in_order: bool = True,
        **kw: object,
    ) -> TestPmd:
        """testpmd with one ``net_virtio_user`` port (DPDK's own frontend) on
        ``sock``; ``packed``: packed virtqueues (``packed_vq=1``); not
        ``in_order``: VIRTIO_F_IN_ORDER left out (``in_order=0``; virtio-user
        asks for it by default and then takes its in-order paths)."""
        vdev = f"net_virtio_user0,path={sock},queues={queues}" + (",server=1" if server else "")
        if packed:
            vdev += ",packed_vq=1"
        if not in_order:
            vdev += ",in_order=0"
        return cls([vdev], rxq=queues, txq=queues, fwd=fwd, **kw)  # type: ignore[arg-type]

    # -- life cycle -------------------------------------------------------
    def __enter__(self) -> TestPmd:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise TestPmdError("testpmd not started")
        return self.proc.pid

    def start(self, timeout: float = STARTUP_TIMEOUT) -> TestPmd:
        """Launch and wait for the first prompt."""
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read_loop, name="testpmd-out", daemon=True)
        self._reader.start()
        try:
            self._wait_prompt(0, timeout)
        except BaseException:
            self.close()
            raise
        return self

    def _read_loop(self) -> None:
        proc = self.proc
        assert proc is not None and proc.stdout is not None
        fd = proc.stdout.fileno()
        log = self.log_path.open("ab") if self.log_path is not None else None
        try:
            while True:
                try:
                    data = os.read(fd, 65536)
                except OSError:
                    data = b""
                if log is not None and data:
                    log.write(data)
                with self._cond:
                    if not data:
                        self._eof = True
                        self._cond.notify_all()
                        return
                    self.output += data
                    self._total += len(data)
                    if len(self.output) > MAX_OUTPUT:
                        del self.output[: len(self.output) - MAX_OUTPUT]
                    self._cond.notify_all()
        finally:
            if log is not None:
                log.close()

    def _wait_prompt(self, since: int, timeout: float) -> bytes:
        """Wait for a prompt printed after stream offset ``since``; return the output since."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if self._total > since and self.output.endswith(PROMPT):
                    first = self._total - len(self.output)
                    return bytes(self.output[max(0, since - first) :])
                if self._eof:
                    status = self.proc.poll() if self.proc is not None else None
                    raise TestPmdError(f"testpmd exited (status {status}): {self._tail_locked()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TestPmdError(
                        f"testpmd gave no prompt within {timeout:g}s: {self._tail_locked()}"
                    )
                self._cond.wait(min(left, 0.5))

    def drain_output(self) -> None:
        """Kept for callers: the reader thread drains testpmd's output continuously."""

    def _tail_locked(self, n: int = 2000) -> str:
        return bytes(self.output[-n:]).decode(errors="replace")

    def tail(self, n: int = 2000) -> str:
        with self._cond:
            return self._tail_locked(n)

    def command(self, cmd: str, timeout: float = COMMAND_TIMEOUT) -> str:
        """Send one command line; return its output up to the next prompt."""
        proc = self.proc
        if proc is None or proc.stdin is None or proc.poll() is not None:
            raise TestPmdError(f"testpmd is not running: {self.tail()}")
        with self._cond:
            since = self._total
        try:
            proc.stdin.write(cmd.encode() + b"\n")
            proc.stdin.flush()
        except BrokenPipeError:
            raise TestPmdError(f"testpmd closed its stdin: {self.tail()}") from None
        return self._wait_prompt(since, timeout).decode(errors="replace")

    def start_forwarding(self) -> None:
        self.command("start")

    def stop_forwarding(self) -> str:
        return self.command("stop")

    def set_fwd(self, mode: str) -> None:
        self.command(f"set fwd {mode}")
        self.fwd = mode

    def port_stats(self) -> dict[int, PortStats]:
        """``show port stats all`` parsed per port."""
        text = self.command("show port stats all")
        stats = parse_port_stats(text.encode())
        if not stats:
            raise TestPmdError(f"cannot parse port stats from: {text[-1500:]}")
        return stats

    def clear_stats(self) -> None:
        self.command("clear port stats all")

    def cpu_seconds(self) -> float:
        """CPU time testpmd used so far (all its threads)."""
        return _cpu_seconds(self.pid) if self.proc is not None else 0.0

    def wait_for_log(self, needle: bytes, timeout: float = COMMAND_TIMEOUT) -> bool:
        """Wait until ``needle`` appears in testpmd's (kept) output, e.g. a link event."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while needle not in self.output:
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    return False
                self._cond.wait(min(left, 0.5))
        return True

    def close(self) -> None:
        """Quit, then SIGTERM, then SIGKILL -- the process is gone afterwards."""
        proc = self.proc
        if proc is None:
            return
        try:
            if proc.poll() is None and proc.stdin is not None:
                with contextlib.suppress(OSError, ValueError):
                    proc.stdin.write(b"quit\n")
                    proc.stdin.flush()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(EXIT_TIMEOUT)
            for sig in (signal.SIGTERM, signal.SIGKILL):
                if proc.poll() is not None:
                    break
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                try:
                    proc.wait(EXIT_TIMEOUT)
                except subprocess.TimeoutExpired:
                    continue
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
            if self._reader is not None:
                self._reader.join(EXIT_TIMEOUT)
                self._reader = None
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
            shutil.rmtree(f"/var/run/dpdk/{self.prefix}", ignore_errors=True)
            self.proc = None

    def kill(self) -> None:
        """SIGKILL at once (simulates a crashed backend); then clean up."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.close()


def virtio_user_txonly_pps(
    rx: TestPmd, sock: str | os.PathLike[str], *, size: int = 64, seconds: float = 3.0
) -> float:
    """DPDK's own frontend as a peer: ``net_virtio_user`` txonly (one queue,
    ``size``-byte frames) into ``rx`` (a forwarding vhost testpmd on ``sock``)
    for ``seconds``; the packets per second ``rx`` counted on port 0.  The
    sender runs on lcore 1 (``rx`` is expected to poll lcore 0)."""
    with TestPmd.virtio_user(
        sock, queues=1, fwd="txonly", lcores="0-1", main_lcore=1, extra_app=[f"--txpkts={size}"]
    ) as tx:
        time.sleep(0.5)  # link up
        before = rx.port_stats()[0].rx_packets
        t0 = time.monotonic()
        tx.start_forwarding()
        time.sleep(seconds)
        tx.stop_forwarding()
        elapsed = time.monotonic() - t0
        time.sleep(0.2)  # let the receiver drain
        got = rx.port_stats()[0].rx_packets - before
    return got / elapsed
