"""virtnet.testing.netns: namespaces, veths, taps and iperf3 servers, all cleaned up."""

from __future__ import annotations

import os

import pytest

from virtnet.testing.netns import (
    NetNS,
    NetnsError,
    create_tap,
    delete_link,
    link_exists,
    unique_name,
)

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)"),
]


def test_unique_names_fit_ifnamsiz() -> None:
    names = {unique_name("vntap") for _ in range(100)}
    assert len(names) == 100
    assert all(len(n) <= 15 for n in names)


def test_veth_ping_and_iperf3_between_namespaces() -> None:
    with NetNS() as a, NetNS() as b:
        va, vb = unique_name("va"), unique_name("vb")
        a.create_veth(va, vb, peer_netns=b.name)
        a.set_address(va, "10.77.9.1/24")
        b.set_address(vb, "10.77.9.2/24")
        assert a.ping("10.77.9.2", count=1)
        with b.iperf3_server(port=5299) as server:
            out = a.iperf3_client(["-c", "10.77.9.2", "-p", "5299", "-t", "1"]).stdout
            assert "receiver" in out
        assert server.proc.poll() is not None
        name = a.name
    assert name not in os.popen("ip netns list").read()


def test_tap_moved_into_namespace_and_deleted() -> None:
    tap = unique_name("vntap")
    create_tap(tap, multi_queue=True)
    try:
        with NetNS() as ns:
            ns.move_link(tap)
            assert not link_exists(tap)
            assert ns.has_link(tap)
            assert "multi_queue" in ns.ip("-d", "link", "show", "dev", tap)
    finally:
        delete_link(tap)
    assert not link_exists(tap)


def test_errors_name_the_command() -> None:
    with NetNS() as ns, pytest.raises(NetnsError, match="ip -n"):
        ns.ip("link", "set", "dev", "no-such-link", "up")
