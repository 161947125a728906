"""``virtnet xen demo``: xenstored + hypervisor, netback and netfront as three processes.

The demo plays the toolstack (dom0, like libxl): it starts the daemon, creates
guest domain 1's memory, introduces it, writes both vif directories, starts
netback (dom0) and netfront (as domain 1, through its own XenStore socket),
and returns non-zero if the frontend saw loss, reordering or misrouting or
either side failed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from typing import Final

from virtnet.errors import UsageError
from virtnet.xen.client import XsClient
from virtnet.xen.hyp import HypervisorClient
from virtnet.xen.rings import RX_RING, TX_RING
from virtnet.xen.xenbus import create_vif

__all__ = ["add_arguments", "domain_size", "run", "run_demo"]

GUEST_DOMID: Final = 1
MAX_DEMO_QUEUES: Final = 16


def domain_size(max_queues: int) -> tuple[int, int]:
    """(pages, grant-table frames) for a guest with ``max_queues`` queues."""
    per_queue = 2 + TX_RING.size + RX_RING.size
    data = max_queues * per_queue + 16
    frames = -(-(data + 8) // 512)
    return frames + data, frames


def _wait_path(path: str, timeout: float) -> None:
    """Wait until a Unix socket at ``path`` accepts connections (bind comes before listen)."""
    import socket

    deadline = time.monotonic() + timeout
    kind = socket.SOCK_SEQPACKET if path.endswith("hypervisor.sock") else socket.SOCK_STREAM
    while True:
        if os.path.exists(path):
            s = socket.socket(socket.AF_UNIX, kind)
            try:
                s.connect(path)
                return
            except OSError:
                pass
            finally:
                s.close()
        if time.monotonic() > deadline:
            raise UsageError(f"{path} did not appear")
        time.sleep(0.02)


def run_demo(
    queues: int,
    seconds: float,
    *,
    max_queues: int | None = None,
    port: str = "loopback",
    frame_size: int = 64,
    force_queues: bool = False,
    quiet: bool = False,
) -> tuple[int, str, str]:
    """Run the three processes; ``(exit code, frontend stdout, backend stdout+stderr)``."""
    if not 1 <= queues <= MAX_DEMO_QUEUES:
        raise UsageError(f"--queues must be 1..{MAX_DEMO_QUEUES}")
    max_q = max_queues if max_queues is not None else queues
    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="virtnet-xen-") as tmp:
        xs_sock = os.path.join(tmp, "xenstored.sock")
        dom_sock = os.path.join(tmp, f"xenstored.dom{GUEST_DOMID}.sock")
        hyp_sock = os.path.join(tmp, "hypervisor.sock")
        xsd = subprocess.Popen(
            [py, "-m", "virtnet.xen.xenstored", "--socket", xs_sock,
             "--domain-socket", f"{GUEST_DOMID}={dom_sock}", "--hypervisor-socket", hyp_sock],
        )  # fmt: skip
        back = front = None
        try:
            _wait_path(xs_sock, 10)
            _wait_path(hyp_sock, 10)
            with XsClient(xs_sock) as xs:
                hyp = HypervisorClient(hyp_sock, 0)
                pages, frames = domain_size(max(queues, max_q))
                hyp.create_domain(GUEST_DOMID, pages, frames)
                hyp.close()
                xs.introduce(GUEST_DOMID)
                create_vif(xs, GUEST_DOMID, 0)
            back = subprocess.Popen(
                [py, "-m", "virtnet.xen.netback", "--xenstore", xs_sock, "--hypervisor", hyp_sock,
                 "--domid", str(GUEST_DOMID), "--max-queues", str(max_q), "--port", port,
                 "--timeout", str(seconds + 60)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )  # fmt: skip
            fargs = [py, "-m", "virtnet.xen.netfront", "--xenstore", dom_sock,
                     "--hypervisor", hyp_sock, "--domid", str(GUEST_DOMID),
                     "--queues", str(queues), "--seconds", str(seconds),
                     "--frame-size", str(frame_size)]  # fmt: skip
            if force_queues:
                fargs.append("--force-queues")
            front = subprocess.Popen(
                fargs, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            fout, _ = front.communicate(timeout=seconds + 60)
            bout, _ = back.communicate(timeout=30)
        finally:
            for p in (front, back, xsd):
                if p is not None and p.poll() is None:
                    p.terminate()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        p.wait(5)
                    if p.poll() is None:
                        p.kill()
                        p.wait()
        rc = front.returncode or back.returncode
        if not quiet:
            sys.stdout.write(fout)
            sys.stdout.write(bout)
        return rc, fout, bout


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``virtnet xen demo``."""
    parser.add_argument("--queues", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--max-queues", type=int, default=None, help="backend's maximum")
    parser.add_argument("--port", default="loopback")
    parser.add_argument("--frame-size", type=int, default=64)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``virtnet xen demo``."""
    rc, _, _ = run_demo(
        args.queues, args.seconds, max_queues=args.max_queues, port=args.port,
        frame_size=args.frame_size,
    )  # fmt: skip
    return rc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="virtnet xen demo")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
