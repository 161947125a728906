"""Grant table and event channel emulation, directly and through the hypervisor service."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtnet.errors import GrantError
from virtnet.xen.evtchn import local_pair
from virtnet.xen.grant import GNTTAB_NR_RESERVED_ENTRIES, DomainMemory, GrantMapper, GrantTable
from virtnet.xen.hyp import HypervisorClient, HypervisorService


@pytest.fixture
def mem() -> Iterator[DomainMemory]:
    m = DomainMemory.create("t", 64, 1)
    yield m


def test_grant_and_map(mem: DomainMemory) -> None:
    gt = GrantTable(mem)
    frame = gt.alloc_frame()
    assert frame >= mem.gnttab_frames
    ref = gt.grant_access(0, frame)
    assert ref >= GNTTAB_NR_RESERVED_ENTRIES
    mem.page(frame)[:5] = b"hello"
    back = GrantMapper(mem, domid=0, granter=1)
    page = back.map(ref)
    assert bytes(page[:5]) == b"hello"
    page[0:1] = b"J"
    assert bytes(mem.page(frame)[:5]) == b"Jello"
    assert bytes(back.span(ref, 1, 4, write=False)) == b"ello"
    # Read-only grants give read-only views and refuse writes.
    ro = gt.grant_access(0, gt.alloc_frame(), readonly=True)
    assert back.map(ro, write=False).readonly
    with pytest.raises(GrantError):
        back.map(ro, write=True)
    # Revoked, foreign, reserved, out-of-range refs.
    gt.end_access(ref)
    with pytest.raises(GrantError):
        back.map(ref)
    other = gt.grant_access(5, gt.alloc_frame())
    with pytest.raises(GrantError):
        back.map(other)
    for bad in (0, GNTTAB_NR_RESERVED_ENTRIES - 1, 512, 2**32 - 1, -1):
        with pytest.raises(GrantError):
            back.map(bad)
    with pytest.raises(GrantError):
        back.span(ro, 4000, 200, write=False)  # crosses the page


def test_hostile_grant_entries(mem: DomainMemory) -> None:
    back = GrantMapper(mem, domid=0, granter=1)
    table = mem.page(0)
    # A guest grants its own grant-table frame, or a frame beyond its memory.
    struct.pack_into("<HHI", table, 8 * 8, 1, 0, 0)
    struct.pack_into("<HHI", table, 9 * 8, 1, 0, 10_000)
    struct.pack_into("<HHI", table, 10 * 8, 2, 0, 20)  # accept_transfer, not access
    for ref in (8, 9, 10):
        with pytest.raises(GrantError):
            back.map(ref)


def test_event_channel_pair() -> None:
    a, b = local_pair()
    assert not b.consume()
    a.notify()
    a.notify()
    assert b.wait(1.0)  # coalesced into one event
    assert not b.consume()
    b.notify()
    assert a.wait(1.0)
    assert not a.wait(0.01)
    a.close()
    b.close()


def test_hypervisor_service(tmp_path: Path) -> None:
    svc = HypervisorService(str(tmp_path / "hyp"))
    svc.serve_in_thread()
    try:
        dom0 = HypervisorClient(str(tmp_path / "hyp"), 0)
        dom1 = HypervisorClient(str(tmp_path / "hyp"), 1)
        dom2 = HypervisorClient(str(tmp_path / "hyp"), 2)
        with pytest.raises(GrantError):
            dom1.create_domain(3, 16, 1)
        dom0.create_domain(1, 32, 1)
        m1 = dom1.domain_memory(1)
        m0view = dom0.domain_memory(1)
        m1.page(5)[:3] = b"abc"
        assert bytes(m0view.page(5)[:3]) == b"abc"
        with pytest.raises(GrantError):
            dom2.domain_memory(1)  # foreign memory needs privilege
        ch1 = dom1.alloc_unbound(0)
        with pytest.raises(GrantError):
            dom2.bind_interdomain(1, ch1.port)  # offered to dom0, not dom2
        ch0 = dom0.bind_interdomain(1, ch1.port)
        with pytest.raises(GrantError):
            dom0.bind_interdomain(1, ch1.port)  # already bound
        with pytest.raises(GrantError):
            dom0.bind_interdomain(1, 999)
        ch1.notify()
        assert ch0.wait(1.0)
        ch0.notify()
        assert ch1.wait(1.0)
        for c in (dom0, dom1, dom2):
            c.close()
    finally:
        svc.close()
