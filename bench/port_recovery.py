"""What a crash on the host side costs the VMs' traffic.

``virtnet serve --port switch`` joins VMs ``a`` and ``b`` (our own frontend,
one pair each, in this process).  ``a`` sends ``--rate`` sequence-numbered
64-byte frames per second to ``b``; ``b`` records when each arrives.  After
``--warm`` seconds one of two events, rounds alternating between them:

* ``switch``: SIGKILL of the switch process; serve starts a new one and
  gives both VMs' pairs new queues on it (the VMs stay connected);
* ``serve``: serve stopped and started again (``systemctl restart``, what
  a user had to do before serve restarted the switch itself); the VMs
  reconnect, as QEMU does with ``reconnect-ms``, and their rings resume.

Per round: the outage (the longest time ``b`` received nothing, around the
event) and the frames lost (sent by ``a`` after the event started and never
received, whether serve dropped them or ``a``'s driver could not queue them
because its tx ring was full while nothing served it).
Prints the medians of each event and the ratio of outages serve / switch.
Run: ``python bench/port_recovery.py [--rounds 5] [--rate 5000]``.  No root,
no VM.
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from virtnet.testing.procs import stop_process
from virtnet.vhost_user.frontend import VhostUserFrontend
from virtnet.vhost_user.stats import fetch

MAC_A = bytes.fromhex("525400000a01")
MAC_B = bytes.fromhex("525400000b01")
_SEQ = struct.Struct("!Q")
_SEQ_OFF = 14 + 4  # after the Ethernet header and a marker


@dataclass
class Round:
    event: str
    outage_ms: float
    lost: int
    sent: int
    unqueued: int


def _frame(seq: int) -> bytes:
    head = MAC_B + MAC_A + b"\x88\xb5" + b"VNRC"  # local experimental ethertype
    return head + _SEQ.pack(seq) + bytes(64 - len(head) - _SEQ.size)


def _start_serve(tmp: Path, log: Path) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "virtnet.cli", "serve", "--port", "switch", "--queues", "1",
            "--socket", str(tmp / "a.sock"), "--socket", str(tmp / "b.sock"),
            "--stats-socket", str(tmp / "stats.sock")]  # fmt: skip
    with log.open("ab") as out:
        proc = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    end = time.monotonic() + 30
    while not all((tmp / n).exists() for n in ("a.sock", "b.sock", "stats.sock")):
        if proc.poll() is not None or time.monotonic() > end:
            raise RuntimeError(f"serve did not start: {log.read_text()[-2000:]}")
        time.sleep(0.02)
    return proc


def one_round(event: str, rate: int, warm: float, after: float) -> Round:
    with tempfile.TemporaryDirectory(prefix="vn-recovery-") as d:
        tmp = Path(d)
        log = tmp / "serve.log"
        serve = _start_serve(tmp, log)
        a = VhostUserFrontend(tmp / "a.sock", queue_pairs=1, mac=MAC_A, timeout=30.0)
        b = VhostUserFrontend(tmp / "b.sock", queue_pairs=1, mac=MAC_B, timeout=30.0)
        try:
            a.open()
            b.open()
            sent: dict[int, float] = {}
            got: list[tuple[float, int]] = []
            t0 = time.perf_counter()
            t_event = t0 + warm
            t_end = t_event + after
            seq = unqueued = 0
            done = False
            next_check = t0
            while (now := time.perf_counter()) < t_end:
                while seq < (now - t0) * rate:
                    sent[seq] = time.perf_counter()
                    if a.send([_frame(seq)]) != 1:
                        unqueued += 1
                    seq += 1
                for f in b.receive(0):
                    data = bytes(f.data)
                    if data[14:18] == b"VNRC":
                        got.append((time.perf_counter(), _SEQ.unpack_from(data, _SEQ_OFF)[0]))
                if now >= next_check:
                    next_check = now + 0.005
                    a.check_connection()
                    b.check_connection()
                if not done and now >= t_event:
                    done = True
                    if event == "switch":
                        pid = fetch(str(tmp / "stats.sock"))["switch"]["pid"]
                        os.kill(pid, signal.SIGKILL)
                    else:
                        stop_process(serve)
                        serve = _start_serve(tmp, log)
            window = [t for t, _ in got if t >= t_event - 0.5] + [t_end]
            outage = max(b2 - a2 for a2, b2 in itertools.pairwise(window))
            received = {s for _, s in got}
            lost = sum(1 for s, t in sent.items() if t >= t_event and s not in received)
            return Round(event, outage * 1e3, lost, len(sent), unqueued)
        finally:
            a.close()
            b.close()
            stop_process(serve)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="rounds of each event (default 5)")
    ap.add_argument("--rate", type=int, default=5000, help="frames per second a -> b")
    ap.add_argument("--warm", type=float, default=1.5, help="seconds before the event")
    ap.add_argument("--after", type=float, default=4.0, help="seconds after it")
    args = ap.parse_args(argv)
    rounds: list[Round] = []
    for i in range(args.rounds):
        for event in ("switch", "serve") if i % 2 == 0 else ("serve", "switch"):
            r = one_round(event, args.rate, args.warm, args.after)
            rounds.append(r)
            print(
                f"round {i + 1} {event:6}: outage {r.outage_ms:7.1f} ms, lost {r.lost:5d}"
                f" of {r.sent} sent ({r.unqueued} of them not queued: a's tx ring full)",
                flush=True,
            )
    med: dict[str, tuple[float, float]] = {}
    for event in ("switch", "serve"):
        rs = [r for r in rounds if r.event == event]
        med[event] = (
            statistics.median(r.outage_ms for r in rs),
            statistics.median(r.lost for r in rs),
        )
        print(
            f"{event:6} (median of {len(rs)}): outage {med[event][0]:.1f} ms,"
            f" lost {med[event][1]:.0f}"
        )
    print(f"outage serve restart / switch restart: {med['serve'][0] / med['switch'][0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
