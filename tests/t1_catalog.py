"""Issue 11: narfs's own state as several processes share it (fast, in-process, no Nix).

Every mount, gc and verify syncs the same catalog; a mount must learn what changed against
what it shows, not against what its own sync happened to write. Writers leave temporaries in
`.narfs/` too, and the first writer in clears them, never through a symlink."""

from __future__ import annotations

import os
from pathlib import Path

from narfs.cache import Cache
from narfs.catalog import Catalog
from narfs.narinfo import NarInfo

ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"


def fake_hash(i: int) -> str:
    return (ALPHABET[i % 32] * 32)


def publish(cache: Cache, i: int) -> str:
    """A narinfo (no NAR: syncs read only narinfos), written without fsync: tests are fast."""
    h = fake_hash(i) if i < 32 else f"{fake_hash(i)[:30]}{ALPHABET[i // 32 % 32]}0"
    info = NarInfo(store_path=f"/nix/store/{h}-fake-{i}", url=f"nar/{h}.nar", compression="none",
                   file_hash=None, file_size=None, nar_hash="sha256:" + "0" * 52, nar_size=8)
    Path(cache.narinfo_path(h)).write_text(info.render())
    return h


def test_a_follower_learns_changes_another_process_synced(tmp_path: Path) -> None:
    cache = Cache(str(tmp_path / "cache"))
    cache.init()
    hs = [publish(cache, i) for i in range(4)]
    with Catalog(cache) as mount, Catalog(cache) as gc:
        gc.sync()
        rows, _ = mount.index()
        assert sorted(r[0] for r in rows) == sorted(hs)
        assert mount.sync() == ([], [])

        os.unlink(cache.narinfo_path(hs[0]))
        gc.sync()  # gc's own sync wins the race: the row is gone before the mount looks
        assert mount.sync([hs[0]]) == ([], [hs[0]])  # the inotify path
        os.unlink(cache.narinfo_path(hs[1]))
        new = publish(cache, 9)
        gc.sync()
        added, removed = mount.sync()  # the full sync
        assert (added, removed) == ([new], [hs[1]])
        assert mount.sync() == ([], [])  # reported once

        # A narinfo rewritten (new mtime) is reported as changed, once.
        os.utime(cache.narinfo_path(hs[2]), ns=(1, 1))
        gc.sync()
        assert mount.sync([hs[2]]) == ([hs[2]], [])
        assert mount.sync([hs[2]]) == ([], [])


def test_leftover_state_temporaries_go_never_through_a_symlink(tmp_path: Path) -> None:
    """watch.json is written through a temporary in .narfs/: a writer killed there leaves it,
    and the next first writer clears it (as in the root and nar/), but never follows a
    symlinked .narfs/ to clear somebody else's files."""
    import pytest

    from narfs.cache import TMP_PREFIX
    from narfs.errors import NarfsError

    cache = Cache(str(tmp_path / "cache"))
    cache.init()
    left = Path(cache.state_dir()) / f"{TMP_PREFIX}watch.json-x"
    left.write_text("{")
    with cache.writer():
        pass
    assert not left.exists()

    outside = tmp_path / "outside"
    outside.mkdir()
    decoy = outside / f"{TMP_PREFIX}decoy"
    decoy.write_text("not the cache's")
    state = Path(cache.root) / ".narfs"
    for p in state.iterdir():
        p.unlink()
    state.rmdir()
    state.symlink_to(outside)
    with pytest.raises(NarfsError, match="not a directory"):
        with cache.writer():
            pass
    assert decoy.exists()


def test_every_temporary_narfs_leaves_is_cleared(tmp_path: Path) -> None:
    """Each place narfs writes through a temporary (the cache, nar/, .narfs/, the mount's tree
    files in .narfs/trees/) gets its temporaries from one helper with one naming scheme, so the
    first writer after a crash finds them all; a failed write leaves none and keeps the old
    file."""
    import pytest

    from narfs.cache import new_temporary, temporary

    cache = Cache(str(tmp_path / "cache"))
    cache.init()
    trees = cache.state_path("trees")
    os.mkdir(trees)
    dirs = [cache.root, cache.nar_dir, cache.state_dir(), trees]
    crashed = []
    for d in dirs:
        fd, path = new_temporary(d, "final")
        os.close(fd)  # a writer killed before its rename
        crashed.append(path)
    with cache.writer():
        pass
    assert [p for p in crashed if os.path.lexists(p)] == []

    final = Path(trees) / "x.tree"
    final.write_bytes(b"old")
    with pytest.raises(OSError), temporary(str(final), sync=False) as f:
        f.write(b"half")
        raise OSError("disk full")
    assert final.read_bytes() == b"old" and sorted(os.listdir(trees)) == ["x.tree"]
