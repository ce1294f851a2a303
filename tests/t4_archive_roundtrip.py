"""Issue 2: narfs archive writes a cache that Nix itself restores, verifies and reads."""

from __future__ import annotations

import os
from pathlib import Path

from conftest import Narfs, nix_copy_from
from nixtools import NIX, NixStore, delete_paths, rich_tree, run


def test_round_trip_through_nix(narfs: Narfs, nixstore: NixStore, tmp_path: Path) -> None:
    src = tmp_path / "tree"
    rich_tree(src, 3 << 20)
    dep = nixstore.text("a dependency", "narfs-dep")
    top = nixstore.tree(src, "narfs-rich", refs=[dep])
    narfs.config.write_text(narfs.config.read_text() + "frame_size = 1048576\n")

    out = narfs("archive", top)
    assert "archived 2 paths" in out.stdout, out.stdout
    again = narfs("archive", top)
    assert "nothing to archive" in again.stdout

    nixstore.unroot()
    delete_paths([top, dep])
    nix_copy_from(narfs.cache, [top], narfs.public_key)
    run(["nix-store", "--verify-path", top, dep])
    assert (Path(top) / "ünïcödé — 名前.txt").read_text() == "non-ASCII name\n"
    assert os.readlink(Path(top) / "dangling") == "does/not/exist"


def test_nix_reads_listings_and_nars(narfs: Narfs, nixstore: NixStore) -> None:
    p = nixstore.text("hello from narfs\n")
    narfs("archive", p)
    store = ["--store", f"file://{narfs.cache}"]
    cat = run([*NIX, "store", "cat", *store, f"{p}/content"]).stdout
    assert cat == "hello from narfs\n"
    ls = run([*NIX, "store", "ls", *store, "-lR", p]).stdout
    assert "content" in ls
    run([*NIX, "store", "verify", *store, "--trusted-public-keys", narfs.public_key,
         "--sigs-needed", "1", p])
    wrong = run([*NIX, "store", "verify", *store, "--trusted-public-keys",
                 "other:" + "A" * 43 + "=", "--sigs-needed", "1", p], check=False)
    assert wrong.returncode != 0
