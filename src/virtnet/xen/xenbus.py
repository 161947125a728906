"""XenBus conventions: device states, paths, waiting on the other end, the toolstack's part.

Invariants:

* States are ``enum xenbus_state`` from ``xen/include/public/io/xenbus.h``.
* The toolstack (:func:`create_vif`, acting as dom0 like libxl) creates both
  device directories: the frontend's (owned by the guest, readable by the
  backend domain) and the backend's (owned by the backend domain, readable
  by the guest), so each side can write only its own nodes.
* Values read from the other end are untrusted text: :func:`read_uint`
  raises :class:`~virtnet.errors.XenStoreError` for anything but a bounded
  decimal integer.
"""

from __future__ import annotations

import contextlib
import enum
import time
from typing import Final

from virtnet.errors import XenStoreError
from virtnet.xen.client import XsClient, XsClientError

__all__ = [
    "XenbusState",
    "backend_path",
    "create_vif",
    "frontend_path",
    "read_uint",
    "wait_for_state",
    "write_state",
]

MAX_UINT_TEXT: Final = 10  # a uint32 in decimal


class XenbusState(enum.IntEnum):
    """``enum xenbus_state`` (io/xenbus.h)."""

    UNKNOWN = 0
    INITIALISING = 1
    INIT_WAIT = 2
    INITIALISED = 3
    CONNECTED = 4
    CLOSING = 5
    CLOSED = 6
    RECONFIGURING = 7
    RECONFIGURED = 8


def frontend_path(domid: int, handle: int) -> str:
    return f"/local/domain/{domid}/device/vif/{handle}"


def backend_path(backend_domid: int, domid: int, handle: int) -> str:
    return f"/local/domain/{backend_domid}/backend/vif/{domid}/{handle}"


def read_uint(
    xs: XsClient, path: str, default: int | None = None, *, limit: int = 0xFFFFFFFF
) -> int:
    """Read a decimal unsigned node (xenbus_read_unsigned); ``default`` when absent."""
    text = xs.read_or(path)
    if text is None:
        if default is None:
            raise XenStoreError(f"{path} missing")
        return default
    if not text.isdigit() or len(text) > MAX_UINT_TEXT or int(text) > limit:
        raise XenStoreError(f"{path}: {text[:20]!r} is not an integer in range")
    return int(text)


def write_state(xs: XsClient, dev_path: str, state: XenbusState) -> None:
    xs.write(f"{dev_path}/state", str(int(state)))


def wait_for_state(
    xs: XsClient, state_path: str, wanted: set[XenbusState], timeout: float, token: str
) -> XenbusState:
    """Watch ``state_path`` until its value is in ``wanted`` (or raise on timeout)."""
    xs.watch(state_path, token)
    try:
        deadline = time.monotonic() + timeout
        while True:
            text = xs.read_or(state_path)
            if text is not None and text.isdigit() and len(text) < 3:
                try:
                    st = XenbusState(int(text))
                except ValueError:
                    st = XenbusState.UNKNOWN
                if st in wanted:
                    return st
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{state_path} never reached {sorted(s.name for s in wanted)}")
            xs.read_event(left)
    finally:
        with contextlib.suppress(XsClientError):
            xs.unwatch(state_path, token)


def create_vif(
    xs: XsClient,
    domid: int,
    handle: int = 0,
    *,
    backend_domid: int = 0,
    mac: str = "00:16:3e:00:00:01",
) -> tuple[str, str]:
    """The toolstack's part (libxl__device_vif_add): both directories, states Initialising."""
    fe = frontend_path(domid, handle)
    be = backend_path(backend_domid, domid, handle)
    dom = f"/local/domain/{domid}"
    xs.mkdir(dom)
    xs.set_perms(dom, [f"n{backend_domid}", f"r{domid}"])
    xs.mkdir(f"{dom}/device")
    xs.set_perms(f"{dom}/device", [f"n{domid}", f"r{backend_domid}"])
    xs.mkdir(f"{dom}/device/vif")
    xs.set_perms(f"{dom}/device/vif", [f"n{domid}", f"r{backend_domid}"])
    xs.mkdir(fe)
    xs.set_perms(fe, [f"n{domid}", f"r{backend_domid}"])
    for k, v in (
        ("backend", be),
        ("backend-id", str(backend_domid)),
        ("handle", str(handle)),
        ("mac", mac),
        ("state", str(int(XenbusState.INITIALISING))),
    ):
        xs.write(f"{fe}/{k}", v)
    xs.mkdir(be)
    xs.set_perms(be, [f"n{backend_domid}", f"r{domid}"])
    for k, v in (
        ("frontend", fe),
        ("frontend-id", str(domid)),
        ("online", "1"),
        ("handle", str(handle)),
        ("mac", mac),
        ("state", str(int(XenbusState.INITIALISING))),
    ):
        xs.write(f"{be}/{k}", v)
    return fe, be
