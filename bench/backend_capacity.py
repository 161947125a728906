"""vhost-user backend capacity: virtnet serve vs DPDK's vhost PMD, same run, same peer.

The peer is DPDK testpmd with its ``net_virtio_user`` PMD (DPDK's own
frontend; busy-polls one core).  The backend under test is, in turn,

* ``virtnet``: ``virtnet serve --port null`` (txonly) or ``--port loopback``
  (io pingpong), one worker process per queue pair, pinned with ``taskset``
  to CPU 0 (testpmd's peer forwards on CPU 1), eventfd wake-ups;
* ``virtnet-poll``: the same with ``--poll-us`` (default 1000) busy polling;
* ``dpdk``: a second testpmd with ``net_vhost0`` (``rxonly`` for txonly,
  ``io`` for pingpong: every packet goes back on the queue it came in),
  forwarding on the other CPU.

Modes:

* ``txonly``: the peer transmits as fast as it can; the figure is the rate
  the backend *consumed* (peer TX-packets per second; virtio-user only
  transmits what the backend took from the ring).
* ``pingpong``: ``io`` forwarding after ``start tx_first`` on the peer: a
  fixed number of bursts circulate between peer and backend; the figure is
  the peer's RX-packets per second (each packet crossed the backend twice:
  tx ring in, rx ring out).

* ``txonly-tap`` (root): as ``txonly`` but into a tap in a namespace of the
  bench's own, whose stack drops the frames: virtnet ``--port tap:IF`` (one
  ``writev`` per frame) vs testpmd ``net_vhost0`` + ``net_tap0`` with ``io``
  forwarding (DPDK's tap PMD), both run inside the namespace.

For each: packets/s, Gbit/s of frame bytes, the ratio virtnet/DPDK and the
backend's CPU seconds per million packets (virtnet: serve and its workers;
DPDK: the vhost testpmd, which spins a core whatever the load).

``--rings packed`` (or ``split packed``) has the peer negotiate packed
virtqueues (``packed_vq=1``) with either backend.  ``--orders any`` (or
``in any``) has it leave out VIRTIO_F_IN_ORDER (``in_order=0``), which it
otherwise asks for and both backends offer.

Usage: ``python bench/backend_capacity.py [--seconds S] [--queues 1 2]
[--sizes 64 1518] [--modes txonly pingpong] [--rings split packed]
[--orders in any] [--poll-us U] [--json FILE]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from virtnet.testing.dpdk import TestPmd, skip_reason
from virtnet.testing.netns import NetNS, unique_name
from virtnet.testing.procs import stop_process, tree_cpu_seconds


@dataclass
class Figure:
    backend: str
    mode: str
    queues: int
    size: int
    pps: float
    gbps: float
    cpu_s_per_mpkt: float
    backend_cpu_share: float
    ring: str = "split"
    order: str = "in"


def _wait(path: Path, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > end:
            raise RuntimeError(f"{path} did not appear")
        time.sleep(0.05)


@contextlib.contextmanager
def _virtnet(
    tmp: Path,
    port: str,
    queues: int,
    cpus: Sequence[int],
    poll_us: int,
    ns: NetNS | None = None,
) -> Iterator[tuple[Path, Path, subprocess.Popen[bytes]]]:
    sock, stats = tmp / "virtnet.sock", tmp / "virtnet-stats.sock"
    for p in (sock, stats):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    argv = ["taskset", "-c", ",".join(map(str, cpus)), sys.executable, "-m", "virtnet.cli",
            "serve", "--socket", str(sock), "--port", port, "--queues", str(queues),
            "--stats-socket", str(stats), "--poll-us", str(poll_us)]  # fmt: skip
    if ns is not None:
        argv = ns.exec_argv(argv)
    log = (tmp / "serve.log").open("ab")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        _wait(stats)
        yield sock, stats, proc
    finally:
        stop_process(proc)
        log.close()


def one(
    backend: str,
    mode: str,
    queues: int,
    size: int,
    seconds: float,
    tmp: Path,
    poll_us: int,
    ring: str = "split",
    order: str = "in",
) -> Figure:
    peer_lcores = "0-1"  # main lcore 0, forwarding on 1
    fwd = "io" if mode == "pingpong" else "txonly"
    with contextlib.ExitStack() as stack:
        ns: NetNS | None = None
        tap = ""
        if mode == "txonly-tap":
            # Frames go to a tap in a namespace of our own (its stack drops them).
            ns = stack.enter_context(NetNS())
            tap = unique_name("vncap")
            ns.create_tap(tap)
            ns.link_up(tap)
        if backend in ("virtnet", "virtnet-poll"):
            port = {"txonly": "null", "pingpong": "loopback"}.get(mode, f"tap:{tap}")
            poll = poll_us if backend == "virtnet-poll" else 0
            sock, _stats, proc = stack.enter_context(_virtnet(tmp, port, queues, [0], poll, ns))

            def cpu() -> float:
                # ``ip netns exec`` and ``taskset`` exec the command: proc.pid
                # is serve itself, its pair workers are its children.
                return tree_cpu_seconds(proc.pid)
        else:
            sock = tmp / "dpdk-vhost.sock"
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()
            if mode == "txonly-tap":
                # vhost port 0 -> io forwarding -> DPDK's tap PMD (port 1), in the namespace.
                vhost = TestPmd(
                    [f"net_vhost0,iface={sock},queues={queues}", f"net_tap0,iface={tap}dp"],
                    rxq=queues,
                    txq=queues,
                    fwd="io",
                    lcores="0-1",
                    main_lcore=1,
                    log_path=tmp / "vhost.log",
                )
                assert ns is not None
                vhost.argv = ns.exec_argv(vhost.argv)
                stack.enter_context(vhost)
            else:
                vhost = stack.enter_context(
                    TestPmd.vhost(
                        sock,
                        queues=queues,
                        fwd="rxonly" if mode == "txonly" else "io",
                        lcores="0-1",
                        main_lcore=1,
                        log_path=tmp / "vhost.log",
                    )
                )
            vhost.start_forwarding()

            def cpu() -> float:
                return vhost.cpu_seconds()

        peer = stack.enter_context(
            TestPmd.virtio_user(
                sock,
                queues=queues,
                fwd=fwd,
                lcores=peer_lcores,
                main_lcore=0,
                extra_app=[f"--txpkts={size}"],
                packed=ring == "packed",
                in_order=order == "in",
            )
        )
        if mode == "pingpong":
            peer.command("start tx_first")
        else:
            peer.start_forwarding()
        time.sleep(1.0)  # warm up
        peer.clear_stats()
        c0 = cpu()
        t0 = time.monotonic()
        time.sleep(seconds)
        st = peer.port_stats()[0]
        t1 = time.monotonic()
        c1 = cpu()
        peer.stop_forwarding()
    dt = t1 - t0
    pkts = st.rx_packets if mode == "pingpong" else st.tx_packets
    nbytes = st.rx_bytes if mode == "pingpong" else st.tx_bytes
    pps = pkts / dt
    cpu_s = c1 - c0
    return Figure(
        backend=backend,
        mode=mode,
        queues=queues,
        size=size,
        pps=pps,
        gbps=nbytes * 8 / dt / 1e9,
        cpu_s_per_mpkt=cpu_s / (pkts / 1e6) if pkts else float("inf"),
        backend_cpu_share=cpu_s / dt,
        ring=ring,
        order=order,
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--queues", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 1518])
    ap.add_argument(
        "--modes",
        nargs="+",
        default=["txonly", "pingpong"],
        choices=["txonly", "pingpong", "txonly-tap"],
    )
    ap.add_argument("--backends", nargs="+", default=["virtnet", "virtnet-poll", "dpdk"])
    ap.add_argument("--poll-us", type=int, default=1000, help="for virtnet-poll")
    ap.add_argument(
        "--rings",
        nargs="+",
        default=["split"],
        choices=["split", "packed"],
        help="virtqueue layout the peer negotiates (packed: virtio-user packed_vq=1)",
    )
    ap.add_argument(
        "--orders",
        nargs="+",
        default=["in"],
        choices=["in", "any"],
        help="in: the peer asks for VIRTIO_F_IN_ORDER (its default); any: in_order=0",
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    reason = skip_reason()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="vncap-") as d:
        tmp = Path(d)
        for mode, ring, order in (
            (m, r, o) for m in args.modes for r in args.rings for o in args.orders
        ):
            for q in args.queues:
                for size in args.sizes:
                    row = {}
                    for backend in args.backends:
                        f = one(
                            backend, mode, q, size, args.seconds, tmp, args.poll_us, ring, order
                        )
                        figures.append(f)
                        row[backend] = f
                    p = row.get("dpdk")
                    ratios = [
                        f"{name}/dpdk = {f.pps / p.pps:.3f}"
                        for name, f in row.items()
                        if name != "dpdk" and p and p.pps
                    ]
                    for f in row.values():
                        print(
                            f"{f.mode:8} {f.ring:6} {f.order:3} q={f.queues} {f.size:5}B"
                            f" {f.backend:8}"
                            f" {f.pps / 1e6:7.3f} Mpps {f.gbps:7.3f} Gbit/s"
                            f" {f.cpu_s_per_mpkt:7.3f} CPU-s/Mpkt"
                            f" (backend CPU {f.backend_cpu_share:4.2f})",
                            flush=True,
                        )
                    print(f"{'':8}   " + ", ".join(ratios), flush=True)
    if args.json:
        args.json.write_text(json.dumps([asdict(f) for f in figures], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
