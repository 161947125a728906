"""Project-wide checks: ruff, mypy --strict, and a bounded run of every fuzz target.

These run in CI like any other test, so a lint or type error fails the build.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FUZZ_SECONDS = int(os.environ.get("VIRTNET_FUZZ_SECONDS", "15"))


def _run(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff not installed")
def test_ruff_clean() -> None:
    r = _run(["ruff", "check", "src", "tests", "bench", "fuzz"])
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_strict_clean() -> None:
    r = _run([sys.executable, "-m", "mypy", "--strict"])
    assert r.returncode == 0, r.stdout + r.stderr


FUZZ_TARGETS = sorted((ROOT / "fuzz").glob("fuzz_*.py"))


@pytest.mark.parametrize("target", FUZZ_TARGETS, ids=lambda p: p.stem)
def test_fuzz_corpus_replay(target: Path) -> None:
    """Every committed seed replays without an error outside the PeerError family."""
    corpus = ROOT / "fuzz" / "corpus" / target.stem.removeprefix("fuzz_")
    assert corpus.is_dir() and any(corpus.iterdir()), f"no seed corpus at {corpus}"
    r = _run([sys.executable, str(target), "--corpus-only", str(corpus)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris not installed")
@pytest.mark.parametrize("target", FUZZ_TARGETS, ids=lambda p: p.stem)
def test_fuzz_bounded(target: Path, tmp_path: Path) -> None:
    """A short coverage-guided run (atheris); any crash fails the test."""
    corpus = ROOT / "fuzz" / "corpus" / target.stem.removeprefix("fuzz_")
    work = tmp_path / "corpus"
    shutil.copytree(corpus, work)
    r = _run(
        [
            sys.executable,
            str(target),
            str(work),
            f"-max_total_time={FUZZ_SECONDS}",
            "-rss_limit_mb=2048",
        ],
        timeout=FUZZ_SECONDS * 4 + 120,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
