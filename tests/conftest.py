"""Shared fixtures: real Nix (single-user, NIX_REMOTE=local), caches, keys, the narfs CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nixtools import NixStore, run

os.environ["NIX_REMOTE"] = "local"
# Offline machine: no cache.nixos.org look-ups (each costs seconds of retries), and builds run as
# root so builders can read the test's private tmp dirs.
os.environ["NIX_CONFIG"] = "substituters =\nbuild-users-group =\n"
os.environ.pop("NARFS_CONFIG", None)


@pytest.fixture
def nixstore(tmp_path: Path) -> Iterator[NixStore]:
    store = NixStore(tmp_path / "nix")
    try:
        yield store
    finally:
        store.cleanup()


class Narfs:
    """The installed `narfs` command, configured for one test's cache via $NARFS_CONFIG."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cache = root / "cache"
        self.key = root / "secret.key"
        self.config = root / "narfs.toml"
        self.env = {**os.environ, "NARFS_CONFIG": str(self.config)}

    def __call__(self, *args: str, check: bool = True, timeout: float = 600,
                 **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "narfs.cli", *args], capture_output=True,
                              text=True, env=kw.pop("env", self.env), timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise AssertionError(f"narfs {' '.join(args)} exited {proc.returncode}:\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc

    def popen(self, *args: str, **kw) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "narfs.cli", *args], env=self.env,
                                **kw)

    @property
    def public_key(self) -> str:
        from narfs.signing import load_secret_key

        return load_secret_key(str(self.key)).public.text()


@pytest.fixture
def narfs(tmp_path: Path) -> Narfs:
    """A fresh, initialised cache with its own key and config file."""
    n = Narfs(tmp_path / "narfs")
    n.root.mkdir()
    n("init", "--cache", str(n.cache), "--secret-key", str(n.key))
    return n


def nix_copy_from(cache: Path, paths: list[str], public_key: str) -> None:
    """Restore through Nix itself, signatures required and only our key trusted."""
    run(["nix", "--extra-experimental-features", "nix-command", "copy", "--from",
         f"file://{cache}", "--option", "trusted-public-keys", public_key,
         "--option", "require-sigs", "true", *paths])
