"""bench/tap_rx.py on a real tap: both drains take every frame the host sent
(the bench raises otherwise) and the summary names both figures.  Nothing here
is timed: no figure is compared with a speed."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from types import ModuleType

import pytest

pytestmark = [
    pytest.mark.root,
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
        reason="needs root and /dev/net/tun",
    ),
]


@pytest.mark.parametrize("size", [64, 1514])
def test_tap_rx_bench_drains_every_frame(
    bench_module: Callable[[str], ModuleType], capsys: pytest.CaptureFixture[str], size: int
) -> None:
    tap_rx = bench_module("tap_rx")
    assert tap_rx.main(["--frames", "600", "--repeat", "2", "--size", str(size)]) == 0
    out = capsys.readouterr().out
    m = re.search(r"bare readv ([\d.]+) us, worker ([\d.]+) us per frame", out)
    assert m is not None, out
    assert float(m.group(1)) > 0 and float(m.group(2)) > 0
    assert out.count("round ") == 2


def test_tap_rx_bench_refuses_bad_sizes(bench_module: Callable[[str], ModuleType]) -> None:
    tap_rx = bench_module("tap_rx")
    with pytest.raises(SystemExit):
        tap_rx.main(["--size", "2000"])
    # The frames it sends are exactly --size bytes.
    assert len(tap_rx.build_frame(0, 0, 64)) == 64 and len(tap_rx.build_frame(0, 0, 1514)) == 1514
