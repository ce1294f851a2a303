"""Issue 15: the path index a remote mount polls (narfs/pathindex.py), fast and in-process.

It lists exactly the narinfos the directory holds, reuses the rows it can, is rewritten by
rename (a reader never sees half of it), and refuses or drops what a hostile cache puts there."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
import zstandard

from narfs import nix32, pathindex
from narfs.cache import Cache
from narfs.narinfo import NarInfo
from narfs.tree import Tree


def nth_hash(i: int) -> str:
    """As random as real store path hashes, so the index compresses as it would."""
    return nix32.encode(hashlib.sha256(str(i).encode()).digest()[:20])


def publish(cache: Cache, i: int, listing: dict | None = None) -> str:
    h = nth_hash(i)
    info = NarInfo(store_path=f"/nix/store/{h}-fake-{i}", url=f"nar/{h}.nar", compression="none",
                   file_hash=None, file_size=None, nar_hash="sha256:" + "0" * 52, nar_size=1000)
    Path(cache.narinfo_path(h)).write_text(info.render())
    if listing is not None:
        Path(cache.listing_path(h)).write_text(json.dumps({"version": 1, "root": listing}))
    return h


LISTINGS = [
    {"type": "regular", "size": 5, "narOffset": 96},
    {"type": "regular", "size": 5, "narOffset": 96, "executable": True},
    {"type": "symlink", "target": "../x y"},
    {"type": "directory", "entries": {
        "a": {"type": "directory", "entries": {}},
        "b": {"type": "directory", "entries": {}},
        "c": {"type": "regular", "size": 0, "narOffset": 200}}},
]


@pytest.fixture
def cache(tmp_path: Path) -> Cache:
    c = Cache(str(tmp_path / "cache"))
    c.init()
    return c


def test_rows_are_the_narinfos_with_names_times_and_tops(cache: Cache) -> None:
    hs = [publish(cache, i, ls) for i, ls in enumerate(LISTINGS)]
    bare = publish(cache, 99)  # no `.ls`: no top
    assert pathindex.publish(cache) == 5
    rows = {r[0]: r for r in pathindex.read(cache)}
    assert sorted(rows) == sorted([*hs, bare])
    for i, (h, ls) in enumerate(zip(hs, LISTINGS, strict=True)):
        assert rows[h][1] == f"fake-{i}"
        assert rows[h][2] == os.stat(cache.narinfo_path(h)).st_mtime
        assert rows[h][3] == Tree.build(h, 0, ls, 1000).top()  # as the mount computes it
    assert rows[bare][3] is None
    # retired and new paths: the next publish says so
    os.unlink(cache.narinfo_path(hs[0]))
    new = publish(cache, 7, LISTINGS[0])
    pathindex.publish(cache)
    assert {r[0] for r in pathindex.read(cache)} == {*hs[1:], bare, new}
    assert not [n for n in os.listdir(cache.root) if n.startswith(".narfs-tmp-")]


def test_rows_are_reused_until_the_narinfo_changes(cache: Cache) -> None:
    h = publish(cache, 1, LISTINGS[0])
    pathindex.publish(cache)
    os.unlink(cache.listing_path(h))  # a reused row does not read the listing again
    pathindex.publish(cache)
    assert pathindex.read(cache)[0][3] is not None
    os.utime(cache.narinfo_path(h), (1e9, 1e9))  # re-signed, re-published: read again
    pathindex.publish(cache)
    assert pathindex.read(cache)[0][2:] == (1e9, None)


def test_hostile_index_and_rows(cache: Cache) -> None:
    path = Path(cache.root, pathindex.FILENAME)
    path.write_bytes(b"not zstd")
    assert pathindex.read(cache) == []  # rewritten from the narinfos at the next publish
    h = nth_hash(3)
    bad = [[h, "ok", 1.0, None], [h, "dup", 1.0, None], ["e" * 32, "n", 1.0, None],
           [nth_hash(4), "../etc", 1.0, None], [nth_hash(5), "n", "1", None],
           [nth_hash(6), "n", 1.0, [9, 9, 9]], "row"]
    doc = json.dumps({"version": 1, "paths": bad}).encode()
    rows = pathindex.decode(zstandard.ZstdCompressor().compress(doc))
    assert rows == [(h, "ok", 1.0, None), (nth_hash(6), "n", 1.0, None)]
    with pytest.raises(Exception, match="version 1"):
        pathindex.decode(zstandard.ZstdCompressor().compress(b'{"version": 2, "paths": []}'))
    bomb = zstandard.ZstdCompressor().compress(b" " * (pathindex.MAX_SIZE + 1))
    with pytest.raises(Exception, match="not a narfs path index"):
        pathindex.decode(bomb)
    path.unlink()
    os.symlink("/etc/passwd", path)  # never read through a symlink
    assert pathindex.read(cache) == []
    publish(cache, 1)
    assert pathindex.publish(cache) == 1
    assert not path.is_symlink()


@pytest.mark.parametrize("n", [10_000, 100_000])
def test_rewrite_cost(cache: Cache, n: int) -> None:
    """The figures in pathindex's docstring: a rewrite with one new path among n."""
    for i in range(n):
        publish(cache, i, LISTINGS[i % 4] if i % 10 == 0 else None)
    first = time.perf_counter()
    pathindex.publish(cache)
    first = time.perf_counter() - first
    publish(cache, n + 1, LISTINGS[0])
    again = time.perf_counter()
    assert pathindex.publish(cache) == n + 1
    again = time.perf_counter() - again
    size = os.path.getsize(os.path.join(cache.root, pathindex.FILENAME))
    print(f"\n{n} paths: first write {first:.2f} s, rewrite {again:.2f} s, {size} bytes "
          f"({size / n:.1f} a path)")
