"""Shared fixtures: real Nix (single-user, NIX_REMOTE=local), caches, keys, the narfs CLI."""

from __future__ import annotations

import ast
import functools
import os
import re
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
# A test fails when narfs logs an ERROR it does not expect (tests/pytest_checklogs.py);
# pytester runs that plugin's own test.
pytest_plugins = ["pytest_checklogs", "pytester"]
__all__ = ["Narfs", "nix_copy_from", "run"]


@pytest.fixture
def nixstore(tmp_path: Path) -> Iterator[NixStore]:
    store = NixStore(tmp_path / "nix")
    try:
        yield store
    finally:
        store.cleanup()


@pytest.fixture(scope="module", params=["fast", "stock"])
def fuse_mode(request: pytest.FixtureRequest) -> Iterator[str]:
    """Mount tests run in both modes (narfs/fs.py): fast needs pyfuse3 with narfs's patch
    (tools/install-pyfuse3) and fails without it; stock is what PyPI's pyfuse3 gives."""
    import mounting

    mounting.FUSE_MODE = request.param
    try:
        yield request.param
    finally:
        mounting.FUSE_MODE = None


@pytest.fixture
def narfs(tmp_path: Path) -> Narfs:
    """A fresh, initialised cache with its own key and config file."""
    n = Narfs(tmp_path / "narfs")
    n.root.mkdir()
    n("init", "--cache", str(n.cache), "--secret-key", str(n.key))
    return n


# --- What each test needs: `pytest -m "not nix and not fuse"` runs the pure layers alone, on a
# machine with neither Nix nor FUSE. Worked out from the test modules' own imports, so the files
# themselves carry no marks:
# - `nix`: the test uses a fixture that builds store paths, or its module (or a test module it
#   imports from) imports a Nix-running helper from nixtools/conftest or nixeval, names a Nix
#   command in a string (a subprocess argument or a script), or a narfs command that runs Nix;
# - `fuse`: its module imports tests/mounting.py (directly or through another test module) or
#   names fusermount;
# - both: it is marked `machine` (it builds a whole machine and runs Nix and a mount in it).
# A file's name says what its tests may need (S3QL's t0…t6): t0_ the suite itself, t1_ pure
# layers, t2_ the mount's model and t3_ the FUSE operations in-process (no kernel), t4_ Nix,
# t5_ FUSE, t6_ both (or a whole machine). A test that needs more than its file's name allows
# is a collection error, not a silently slower layer; test_* files are not checked.

MARK_NIX, MARK_FUSE = "nix", "fuse"
NIX_FIXTURES = {"nixstore"}
NIX_COMMANDS = {"nix", "nix-build", "nix-collect-garbage", "nix-copy-closure", "nix-daemon",
                "nix-env", "nix-hash", "nix-instantiate", "nix-prefetch-url", "nix-shell",
                "nix-store"}
# narfs commands that run Nix themselves (narfs("archive", ...) in a test needs Nix too).
NIX_RUNNING_NARFS_COMMANDS = {"archive", "restore", "verify", "watch"}
FUSE_COMMANDS = {"fusermount", "fusermount3"}
# What tests import from tests/nixtools.py or conftest that runs no Nix; anything else does.
NIX_FREE_HELPERS = {"MARK_FUSE", "MARK_NIX", "Narfs", "misplaced", "module_needs", "on_a_terminal",
                    "rich_tree"}
ALLOWED = {"t0_": set(), "t1_": set(), "t2_": set(), "t3_": set(), "t4_": {MARK_NIX},
           "t5_": {MARK_FUSE}, "t6_": {MARK_NIX, MARK_FUSE}}
_WORDS = re.compile(r"[\s;|&()`'\"{}\[\]]+")


def module_needs(path: Path) -> frozenset[str]:
    """The marks test module `path` needs: its own and those of the test modules it imports
    (looked up beside it), from their imports and their string constants."""
    needs: set[str] = set()
    seen: set[Path] = set()
    todo = [path]
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.add(p)
            own, imported = _direct_needs(p)
            needs |= own
            todo += imported
    return frozenset(needs)


@functools.cache
def _direct_needs(path: Path) -> tuple[frozenset[str], tuple[Path, ...]]:
    if path.stem == "mounting":
        return frozenset({MARK_FUSE}), ()
    if path.stem == "nixeval":
        return frozenset({MARK_NIX}), ()
    if not path.is_file():
        return frozenset(), ()  # not a test helper: a library, or narfs itself
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    docstrings = {id(node.value) for node in ast.walk(tree)
                  if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)}
    needs: set[str] = set()
    imported: list[Path] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in ("nixtools", "conftest"):
                if {a.name for a in node.names} - NIX_FREE_HELPERS:
                    needs.add(MARK_NIX)
            else:
                imported.append(path.with_name(f"{node.module}.py"))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "nixtools":
                    needs.add(MARK_NIX)
                else:
                    imported.append(path.with_name(f"{alias.name}.py"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and id(node) not in docstrings:
            words = set(_WORDS.split(node.value))
            if words & NIX_COMMANDS or node.value in NIX_RUNNING_NARFS_COMMANDS:
                needs.add(MARK_NIX)
            if words & FUSE_COMMANDS:
                needs.add(MARK_FUSE)
    return frozenset(needs), tuple(imported)


def misplaced(module: str, needs: set[str]) -> str | None:
    """Why a test that needs `needs` does not belong in test module `module`, if it does not."""
    allowed = ALLOWED.get(module[:3])
    if allowed is None or needs <= allowed:
        return None
    fits = next(prefix for prefix, ok in ALLOWED.items() if needs <= ok)
    may = " and ".join(sorted(allowed)) or "neither Nix nor FUSE"
    return (f"a {module[:2]} file may need {may} but this test needs "
            f"{' and '.join(sorted(needs))}; move it to a {fits}* file")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = item.path.stem
        needs = set(module_needs(item.path))
        if NIX_FIXTURES & set(getattr(item, "fixturenames", ())):
            needs.add(MARK_NIX)
        if item.get_closest_marker("machine"):
            needs |= {MARK_NIX, MARK_FUSE}
        problem = misplaced(module, needs)
        if problem:
            raise pytest.UsageError(f"{item.nodeid}: {problem}")
        for mark in sorted(needs):
            item.add_marker(mark)
