"""Replay the vhost-user fuzz seed corpus (fuzz/corpus/vhost_user) as a test."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "fuzz" / "corpus" / "vhost_user"


def _harness() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "fuzz_vhost_user", ROOT / "fuzz" / "fuzz_vhost_user.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("path", sorted(CORPUS.iterdir()), ids=lambda p: p.name)
def test_corpus_replays(path: Path) -> None:
    _harness().test_one_input(path.read_bytes())


def test_committed_seeds_are_current() -> None:
    seeds = _harness()._seeds()
    for name, blob in seeds.items():
        assert (CORPUS / name).read_bytes() == blob, name
