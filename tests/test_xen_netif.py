"""netback/netfront on our xenstored + hypervisor: handshake, refusals, hostile peers, demo."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from virtnet.xen.client import XsClient
from virtnet.xen.demo import domain_size, run_demo
from virtnet.xen.hyp import HypervisorClient, HypervisorService
from virtnet.xen.netfront import Netfront, NetfrontError, flow_frame
from virtnet.xen.rings import NETIF_RSP_ERROR, NETIF_RSP_OKAY, TX_REQ, TX_RSP
from virtnet.xen.xenbus import XenbusState, create_vif, wait_for_state
from virtnet.xen.xenstored import XenStored, start_in_thread

pytestmark = pytest.mark.xen

BE = "/local/domain/0/backend/vif/1/0"
FE = "/local/domain/1/device/vif/0"


@dataclass
class Env:
    xsd: XenStored
    xs_sock: str
    dom_sock: str
    hyp_sock: str
    xs: XsClient


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    xs_sock, dom_sock, hyp_sock = (str(tmp_path / n) for n in ("xs", "xs1", "hyp"))
    xsd, t = start_in_thread(xs_sock, {1: dom_sock})
    svc = HypervisorService(hyp_sock)
    svc.serve_in_thread()
    xs = XsClient(xs_sock)
    hyp = HypervisorClient(hyp_sock, 0)
    pages, frames = domain_size(4)
    hyp.create_domain(1, pages, frames)
    hyp.close()
    xs.introduce(1)
    create_vif(xs, 1, 0)
    yield Env(xsd, xs_sock, dom_sock, hyp_sock, xs)
    xs.close()
    svc.close()
    xsd.stop()
    t.join(5)
    xsd.close()


def _netback(e: Env, max_queues: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "virtnet.xen.netback", "--xenstore", e.xs_sock,
         "--hypervisor", e.hyp_sock, "--domid", "1", "--max-queues", str(max_queues),
         "--timeout", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def _front(e: Env, queues: int, **kw: bool) -> tuple[Netfront, XsClient, HypervisorClient]:
    xs1 = XsClient(e.dom_sock)
    hyp1 = HypervisorClient(e.hyp_sock, 1)
    return Netfront(xs1, hyp1, domid=1, queues=queues, **kw), xs1, hyp1


def _finish(nb: subprocess.Popen[str], nf: Netfront, *clients: object) -> tuple[int, str]:
    nf.close()
    out, _ = nb.communicate(timeout=30)
    for c in clients:
        c.close()  # type: ignore[attr-defined]
    return nb.returncode, out


@pytest.mark.parametrize(("queues", "split"), [(1, True), (3, True), (2, False)])
def test_handshake_layout(env: Env, queues: int, split: bool) -> None:
    nb = _netback(env, 4)
    nf, xs1, hyp1 = _front(env, queues, split_event_channels=split)
    nf.connect()
    xs = env.xs
    assert xs.read(f"{BE}/state") == "4" and xs.read(f"{FE}/state") == "4"
    for k, v in (
        ("feature-sg", "1"), ("feature-gso-tcpv4", "1"), ("feature-rx-copy", "1"),
        ("multi-queue-max-queues", "4"), ("feature-split-event-channels", "1"),
        ("feature-ctrl-ring", "1"),
    ):  # fmt: skip
        assert xs.read(f"{BE}/{k}") == v
    assert xs.read(f"{FE}/request-rx-copy") == "1"
    assert xs.read(f"{FE}/feature-rx-notify") == "1"
    names = xs.directory(FE)
    if queues == 1:  # flat layout
        assert "multi-queue-num-queues" not in names and "queue-0" not in names
        for k in ("tx-ring-ref", "rx-ring-ref", "event-channel-tx", "event-channel-rx"):
            assert xs.read(f"{FE}/{k}").isdigit()
    else:
        assert xs.read(f"{FE}/multi-queue-num-queues") == str(queues)
        assert "tx-ring-ref" not in names
        evt = ["event-channel-rx", "event-channel-tx"] if split else ["event-channel"]
        for i in range(queues):
            assert sorted(xs.directory(f"{FE}/queue-{i}")) == sorted(
                [*evt, "rx-ring-ref", "tx-ring-ref"]
            )
    # The guest cannot touch the backend's directory.
    with pytest.raises(Exception, match="EACCES"):
        xs1.write(f"{BE}/state", "6")
    # Traffic on every queue, checked by flow.
    from virtnet.xen.netfront import run_traffic

    stats = run_traffic(nf, 0.5, 64)
    assert len(stats) == queues
    for d in stats:
        assert d["sent"] > 0 and d["received"] == d["sent"]
        assert d["lost"] == d["reordered"] == d["misrouted"] == 0
    rc, out = _finish(nb, nf, xs1, hyp1)
    assert rc == 0, out
    assert xs.read(f"{BE}/state") == str(int(XenbusState.CLOSED))


def test_too_many_queues_refused(env: Env) -> None:
    nb = _netback(env, 2)
    nf, xs1, hyp1 = _front(env, 4)
    with pytest.raises(NetfrontError, match="at most 2"):
        nf.connect()
    nf2 = Netfront(xs1, hyp1, domid=1, queues=4, force_queues=True)
    with pytest.raises(NetfrontError, match="refused"):
        nf2.connect()
    rc, out = _finish(nb, nf2, xs1, hyp1)
    assert rc == 1
    assert "guest requested 4 queues, exceeding the maximum of 2." in out
    err = env.xs.read("/local/domain/0/error/backend/vif/1/0/error")
    assert err.startswith("22 guest requested 4 queues")


def test_bad_ring_ref_refused(env: Env) -> None:
    nb = _netback(env, 2)
    xs1 = XsClient(env.dom_sock)
    wait_for_state(xs1, f"{BE}/state", {XenbusState.INIT_WAIT}, 20, "t")
    for k, v in (
        ("tx-ring-ref", "4000"), ("rx-ring-ref", "9"), ("event-channel", "1"),
        ("request-rx-copy", "1"), ("feature-rx-notify", "1"),
    ):  # fmt: skip
        xs1.write(f"{FE}/{k}", v)
    xs1.write(f"{FE}/state", "3")
    st = wait_for_state(xs1, f"{BE}/state", {XenbusState.CONNECTED, XenbusState.CLOSING}, 20, "u")
    assert st == XenbusState.CLOSING
    xs1.write(f"{FE}/state", "6")
    out, _ = nb.communicate(timeout=30)
    assert nb.returncode == 1 and "grant ref" in out
    xs1.close()


def _tx_raw(nf: Netfront, q: int, reqs: list[tuple[int, int, int, int, int]]) -> None:
    fq = nf.queues[q].fq
    ring = fq.tx
    for r in reqs:
        TX_REQ.pack_into(fq.tx_page, ring.offset(ring.req_prod_pvt), *r)
        ring.req_prod_pvt += 1
    ring.push_requests_and_check_notify()
    nf.queues[q].ch_tx.notify()


def _tx_responses(nf: Netfront, q: int, n: int) -> list[tuple[int, int]]:
    fq = nf.queues[q].fq
    ring = fq.tx
    out: list[tuple[int, int]] = []
    deadline = time.monotonic() + 10
    while len(out) < n and time.monotonic() < deadline:
        if ring.unconsumed_responses():
            out.append(TX_RSP.unpack_from(fq.tx_page, ring.offset(ring.rsp_cons)))
            ring.rsp_cons += 1
        else:
            nf.queues[q].ch_tx.wait(0.1)
    return out


def test_hostile_frontend(env: Env) -> None:
    nb = _netback(env, 2)
    nf, xs1, hyp1 = _front(env, 2)
    nf.connect()
    fq = nf.queues[1].fq
    fq.tx_bufs[0][:64] = flow_frame(10000, 64)
    # Bad grant refs and a runt: error responses; the vif stays up.
    _tx_raw(nf, 1, [(123456, 0, 0, 7, 64), (0, 0, 0, 8, 64), (fq.tx_refs[0], 0, 0, 9, 8),
                    (fq.tx_refs[0], 0, 0, 10, 64)])  # fmt: skip
    assert _tx_responses(nf, 1, 4) == [
        (7, NETIF_RSP_ERROR), (8, NETIF_RSP_ERROR), (9, NETIF_RSP_ERROR), (10, NETIF_RSP_OKAY),
    ]  # fmt: skip
    assert env.xs.read(f"{BE}/state") == "4"
    # Ring index far beyond the ring: fatal, backend disables the vif (Closing), no crash.
    struct.pack_into("<I", nf.queues[0].fq.tx_page, 0, 0x7000_0000)
    nf.queues[0].ch_tx.notify()
    st = wait_for_state(env.xs, f"{BE}/state", {XenbusState.CLOSING}, 20, "h")
    assert st == XenbusState.CLOSING
    rc, out = _finish(nb, nf, xs1, hyp1)
    assert rc == 1
    assert "fatal frontend error" in out and "beyond" in out


def test_oversized_request_is_fatal(env: Env) -> None:
    nb = _netback(env, 1)
    nf, xs1, hyp1 = _front(env, 1)
    nf.connect()
    fq = nf.queues[0].fq
    _tx_raw(nf, 0, [(fq.tx_refs[0], 100, 0, 1, 4090)])  # runs past its page
    st = wait_for_state(env.xs, f"{BE}/state", {XenbusState.CLOSING}, 20, "o")
    assert st == XenbusState.CLOSING
    rc, out = _finish(nb, nf, xs1, hyp1)
    assert rc == 1 and "crosses its page" in out


def test_demo_two_queues() -> None:
    rc, fout, bout = run_demo(2, 1.0, quiet=True)
    assert rc == 0, fout + bout
    assert "queue 0:" in fout and "queue 1:" in fout and "OK" in fout
    assert "lost=0" in fout


def test_cli_xen_demo_single_queue(capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from virtnet.xen import cli

    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    args = p.parse_args(["demo", "--queues", "1", "--seconds", "0.5"])
    assert cli.run(args) == 0
    assert "total received=" in capsys.readouterr().out


def test_demo_refused_queues_exit_nonzero() -> None:
    rc, fout, _ = run_demo(3, 0.2, max_queues=2, quiet=True)
    assert rc != 0
    assert "at most 2" in fout


def test_cli_entry_points_exist() -> None:
    import argparse

    from virtnet.xen import demo, netback, netfront, xenstored

    for mod in (xenstored, demo, netback, netfront):
        p = argparse.ArgumentParser()
        mod.add_arguments(p)
        assert callable(mod.run)
    assert os.path.exists(netback.__file__)


def test_demo_jumbo_frames_multi_slot() -> None:
    rc, fout, bout = run_demo(1, 0.5, frame_size=9014, quiet=True)
    assert rc == 0, fout + bout
    assert "lost=0" in fout and "reordered=0" in fout


def test_hostile_control_ring(env: Env) -> None:
    nb = _netback(env, 2)
    nf, xs1, hyp1 = _front(env, 2)
    nf.connect()  # programs the hash through the control ring first
    assert nf.ctrl is not None and nf.ctrl_evt is not None
    struct.pack_into("<I", nf.ctrl.page, 0, 0x4000_0000)  # req_prod far beyond 128 entries
    nf.ctrl_evt.notify()
    st = wait_for_state(env.xs, f"{BE}/state", {XenbusState.CLOSING}, 20, "c")
    assert st == XenbusState.CLOSING
    rc, out = _finish(nb, nf, xs1, hyp1)
    assert rc == 1 and "control ring" in out


def test_persistent_backend_serves_a_reconnecting_frontend(env: Env) -> None:
    nb = subprocess.Popen(
        [sys.executable, "-m", "virtnet.xen.netback", "--xenstore", env.xs_sock,
         "--hypervisor", env.hyp_sock, "--domid", "1", "--max-queues", "2", "--persist",
         "--timeout", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    from virtnet.xen.netfront import run_traffic

    for queues in (2, 1):
        nf, xs1, hyp1 = _front(env, queues)
        nf.connect()
        stats = run_traffic(nf, 0.3, 64)
        assert all(d["received"] == d["sent"] > 0 for d in stats)
        nf.close()
        xs1.close()
        hyp1.close()
        wait_for_state(env.xs, f"{BE}/state", {XenbusState.CLOSED}, 20, "p")
    assert nb.poll() is None  # still serving
    env.xs.write(f"{BE}/online", "0")  # the toolstack takes the device away
    env.xs.write(f"{FE}/state", "6")  # another Closed event for the backend to notice
    out, _ = nb.communicate(timeout=30)
    assert nb.returncode == 0, out


def test_without_control_ring(env: Env) -> None:
    nb = _netback(env, 2)
    nf, xs1, hyp1 = _front(env, 2, use_ctrl_ring=False)
    nf.connect()
    assert "ctrl-ring-ref" not in env.xs.directory(FE)
    from virtnet.xen.netfront import run_traffic

    stats = run_traffic(nf, 0.3, 64)
    assert all(d["received"] == d["sent"] > 0 and d["misrouted"] == 0 for d in stats)
    rc, out = _finish(nb, nf, xs1, hyp1)
    assert rc == 0, out
