"""Shared fixtures: real Nix (single-user, NIX_REMOTE=local), caches, keys, the narfs CLI."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from nixtools import Narfs, NixStore, nix_copy_from, run

os.environ["NIX_REMOTE"] = "local"
# Offline machine: no cache.nixos.org look-ups (each costs seconds of retries), and builds run as
# root so builders can read the test's private tmp dirs.
os.environ["NIX_CONFIG"] = "substituters =\nbuild-users-group =\n"
os.environ.pop("NARFS_CONFIG", None)

# Benchmarks and the fuzz harness are scripts (tests/bench/run.py, tests/fuzz/), not tests.
collect_ignore = ["bench", "fuzz"]
__all__ = ["Narfs", "nix_copy_from", "run"]


@pytest.fixture
def nixstore(tmp_path: Path) -> Iterator[NixStore]:
    store = NixStore(tmp_path / "nix")
    try:
        yield store
    finally:
        store.cleanup()


@pytest.fixture
def narfs(tmp_path: Path) -> Narfs:
    """A fresh, initialised cache with its own key and config file."""
    n = Narfs(tmp_path / "narfs")
    n.root.mkdir()
    n("init", "--cache", str(n.cache), "--secret-key", str(n.key))
    return n
