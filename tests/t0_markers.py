"""The `nix` and `fuse` marks tests/conftest.py derives from what a test module imports and runs:
what `pytest -m "not nix and not fuse"` leaves in must run on a machine with neither."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import MARK_FUSE, MARK_NIX, misplaced, module_needs

HELPERS = {
    "mounting.py": "from conftest import Narfs\n",
    "nixeval.py": "from nixtools import run\n",
    "nixtools.py": "import subprocess\n",
    "conftest.py": "from nixtools import Narfs, run\n",
}


@pytest.mark.parametrize(("source", "needs"), [
    ("import os\nfrom narfs import tree\n", set()),
    ("from conftest import Narfs\nfrom nixtools import rich_tree\n", set()),
    ('"""Runs n@ix-store --dump, in prose only."""\n', set()),  # a docstring: not run
    ("from nixtools import NixStore\n", {MARK_NIX}),
    ("from conftest import Narfs, run\n", {MARK_NIX}),
    ("import nixtools\n", {MARK_NIX}),
    ("from nixeval import evaluate\n", {MARK_NIX}),
    ("import subprocess\nsubprocess.run(['n@ix-store', '--version'])\n", {MARK_NIX}),
    ("SCRIPT = '''set -e\nexec n@ix-build -E \"x\"'''\n", {MARK_NIX}),
    ("X = f'n@ix {1} copy'\n", {MARK_NIX}),
    ("from conftest import Narfs\n\ndef test(narfs):\n    narfs('archive', '--all')\n",
     {MARK_NIX}),  # narfs archive runs nix path-info
    ("from conftest import Narfs\n\ndef test(narfs):\n    narfs('ls')\n", set()),
    ("from mounting import mounted\n", {MARK_FUSE}),
    ("def test():\n    from mounting import mounted\n", {MARK_FUSE}),
    ("TOOLS = ('f@usermount3', 'zstd')\n", {MARK_FUSE}),
    ("from test_other import helper\n", {MARK_NIX, MARK_FUSE}),  # through another test module
    ("import test_other\n", {MARK_NIX, MARK_FUSE}),
])
def test_module_needs(tmp_path: Path, source: str, needs: set[str]) -> None:
    for name, text in HELPERS.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "test_other.py").write_text(
        "from mounting import mounted\nfrom nixtools import NIX\nimport test_mod\n")  # a cycle
    # "@" keeps the command names out of this file's own strings, which the hook reads too.
    (tmp_path / "test_mod.py").write_text(source.replace("@", ""))
    assert module_needs(tmp_path / "test_mod.py") == needs


def test_this_suite_is_marked(request: pytest.FixtureRequest) -> None:
    """The pure layers of this suite stay pure; a mounting module and a Nix module are marked."""
    tests = Path(__file__).parent
    for pure in ("t1_reader.py", "t1_tree.py", "t1_mount_tree.py", "t2_view.py", "t3_fs.py"):
        assert module_needs(tests / pure) == set(), pure
    assert MARK_FUSE in module_needs(tests / "t6_mount.py")
    assert MARK_NIX in module_needs(tests / "t4_archive_cli.py")
    marks = {m.name for m in request.node.iter_markers()}
    assert not marks & {MARK_NIX, MARK_FUSE}


@pytest.mark.parametrize(("module", "needs", "fits"), [
    ("t1_reader", set(), None),
    ("t3_fs", {MARK_FUSE}, "t5_"),
    ("t2_view", {MARK_NIX}, "t4_"),
    ("t4_gc", {MARK_NIX}, None),
    ("t4_gc", {MARK_NIX, MARK_FUSE}, "t6_"),
    ("t5_mount_bad", {MARK_NIX}, "t4_"),
    ("t5_mount_bad", set(), None),  # a file may need more than some of its tests
    ("t6_mount", {MARK_NIX, MARK_FUSE}, None),
    ("test_remote", {MARK_NIX, MARK_FUSE}, None),  # test_* files are not checked
])
def test_a_files_name_says_what_its_tests_may_need(module: str, needs: set[str],
                                                    fits: str | None) -> None:
    problem = misplaced(module, needs)
    assert (problem is None) == (fits is None), problem
    if fits is not None:
        assert f"move it to a {fits}* file" in str(problem)
