"""The mount's model (narfs/view.py) with no FUSE at all, as borg's vfs_test.py tests its VFS:
the paths a mount shows, `.by-name`, lookup counts, listing cursors, the idle-tree bound, what a
refresh reports, where trees come from, access records and prefetch candidates. Over a real
cache directory made in-process (tests/inprocess.py); each test takes milliseconds."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from hostile import GOOD_TREE, nar, node_file, node_link
from inprocess import Archive, collect, files, path_inode, run
from narfs import treecache
from narfs import view as view_mod
from narfs.catalog import Entry
from narfs.errors import Unavailable
from narfs.tree import (
    BYNAME_DIR,
    BYNAME_INODE,
    BYNAME_LINK,
    INDEX_BITS,
    ROOT_INODE,
    Tree,
    name_slot,
)
from narfs.view import (
    BYNAME,
    LATEST,
    Broken,
    Invalid,
    IsADirectory,
    NotADirectory,
    NotFound,
    version_name,
)


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[Archive]:
    a = Archive(tmp_path / "cache")
    try:
        yield a
    finally:
        a.close()


def root_names(a: Archive) -> list[bytes]:
    got, reply = collect()
    run(lambda: a.view.listdir(ROOT_INODE, 0, reply))
    return [name for name, _, _ in got]


def test_the_view_knows_nothing_of_fuse() -> None:
    code = "import sys, narfs.view; assert 'pyfuse3' not in sys.modules, 'pyfuse3 imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_root_and_by_name_show_every_path(archive: Archive) -> None:
    old = archive.add(files(2), "tool")
    os.utime(archive.root / f"{old}.narinfo", (1000, 1000))
    new = archive.add(files(3), "tool")
    other = archive.add(GOOD_TREE, "other")
    run(archive.view.refresh)
    bases = [archive.base(h) for h in sorted((old, new, other), key=path_inode)]
    assert root_names(archive) == [BYNAME, *bases], ".by-name first, then paths in slot order"
    got, reply = collect()
    run(lambda: archive.view.listdir(BYNAME_INODE, 0, reply))
    assert sorted(name for name, _, _ in got) == [b"other", b"tool"]
    tool_dir = name_slot("tool") << INDEX_BITS | BYNAME_DIR
    got, reply = collect()
    run(lambda: archive.view.listdir(tool_dir, 0, reply))
    names = {name for name, _, _ in got}
    assert names == {LATEST, version_name(1000, old),
                     version_name(archive.view.paths[new].archived, new)}
    latest = run(lambda: archive.view.lookup(tool_dir, LATEST))
    assert latest.mtime_ns == int(archive.view.paths[new].archived * 1e9), "the newest"
    assert run(lambda: archive.view.readlink(latest.inode)) == b"../../" + archive.base(new)
    version = run(lambda: archive.view.lookup(tool_dir, version_name(1000, old)))
    assert run(lambda: archive.view.readlink(version.inode)) == b"../../" + archive.base(old)
    assert version.mtime_ns == 1000 * 10**9 and version.dynamic


def test_root_entries_say_what_their_trees_say(archive: Archive) -> None:
    """The root listing answers from the paths' tops (catalog, `.ls`) without loading trees;
    what it says must be what the tree says once loaded."""
    hashes = [archive.add(files(3), "dir"), archive.add(nar(node_file(b"12345", True)), "exe"),
              archive.add(nar(node_link("tärget".encode())), "link")]
    run(archive.view.refresh)
    run(archive.view.fill_tops)
    got, reply = collect()
    run(lambda: archive.view.listdir(ROOT_INODE, 0, reply))
    assert archive.view.trees.loaded == {}, "tops only: no tree loaded for a listing"
    tops = {node.inode: node for name, node, _ in got if name != BYNAME}
    assert len(tops) == 3
    for h in hashes:
        assert tops[path_inode(h)] == run(lambda h=h: archive.view.getattr(path_inode(h)))


def test_lookups_and_accepted_listing_entries_are_counted_and_forgotten(
        archive: Archive) -> None:
    h = archive.add(files(5))
    run(archive.view.refresh)
    v = archive.view
    top = run(lambda: v.lookup(ROOT_INODE, archive.base(h)))
    d = run(lambda: v.lookup(top.inode, b"d"))
    assert v.trees.refs[h] == 2 and h not in v.trees.idle
    run(lambda: v.lookup(d.inode, b"."))
    run(lambda: v.getattr(d.inode))
    assert v.trees.refs[h] == 2, "getattr and `.` hand out nothing new"
    got, reply = collect(limit=3)
    run(lambda: v.listdir(d.inode, 0, reply))
    assert len(got) == 3 and v.trees.refs[h] == 5, "the refused fourth entry is not counted"
    v.forget([(d.inode, 1), (got[0][1].inode, 1)])
    assert v.trees.refs[h] == 3 and h in v.trees.loaded
    v.forget([(top.inode, 1), (got[1][1].inode, 1), (got[2][1].inode, 1)])
    assert h not in v.trees.refs and h in v.trees.idle, "unreferenced: parked in the idle LRU"
    assert v.trees.idle_nodes == len(v.trees.loaded[h])
    v.forget([(top.inode, 1)])  # more than the kernel was given: changes nothing
    assert v.trees.idle_nodes == len(v.trees.loaded[h]) and h not in v.trees.refs
    run(lambda: v.lookup(ROOT_INODE, archive.base(h)))
    assert v.trees.refs[h] == 1 and h not in v.trees.idle and v.trees.idle_nodes == 0
    v.forget([(ROOT_INODE, 5), (BYNAME_INODE, 1), (1 << 60, 1)])  # not counted, unknown: no-op
    assert v.trees.refs[h] == 1


def test_a_directory_listing_resumes_from_its_cursor(archive: Archive) -> None:
    h = archive.add(files(30))
    run(archive.view.refresh)
    v = archive.view
    top = run(lambda: v.lookup(ROOT_INODE, archive.base(h)))
    d = run(lambda: v.lookup(top.inode, b"d"))
    names: list[bytes] = []
    cursor = 0
    for _ in range(10):  # bounded: a cursor that does not advance must fail, not hang
        got, reply = collect(limit=7)
        run(lambda c=cursor, r=reply: v.listdir(d.inode, c, r))
        if not got:
            break
        names += [name for name, _, _ in got]
        cursor = got[-1][2]
    assert names == [f"f{i:03}".encode() for i in range(30)]
    with pytest.raises(NotADirectory):
        run(lambda: v.listdir(top.inode + 2, 0, collect()[1]))  # `link`, a symlink


def test_root_cursors_hold_while_paths_come_and_go(archive: Archive) -> None:
    hashes = [archive.add(files(1), f"p{i}") for i in range(12)]
    run(archive.view.refresh)
    order = sorted(hashes, key=path_inode)
    got, reply = collect(limit=6)  # .by-name and five paths
    run(lambda: archive.view.listdir(ROOT_INODE, 0, reply))
    seen = [name for name, _, _ in got]
    assert seen == [BYNAME] + [archive.base(h) for h in order[:5]]
    cursor = got[-1][2]
    gone = archive.base(order[2])
    archive.retire(order[2])  # already listed
    archive.retire(order[7])  # not yet listed
    later = [archive.add(files(1), f"new{i}") for i in range(8)]
    run(archive.view.refresh)
    got, reply = collect()
    run(lambda: archive.view.listdir(ROOT_INODE, cursor, reply))
    rest = [name for name, _, _ in got]
    want = [archive.base(h) for h in sorted([*order, *later], key=path_inode)
            if h in archive.view.paths and path_inode(h) > path_inode(order[4])]
    assert rest == want, "nothing listed twice, nothing retired, new paths past the cursor"
    assert gone not in rest and len(set(seen + rest)) == len(seen + rest)


def test_idle_trees_stay_within_their_bound(archive: Archive,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    hashes = [archive.add(files(10), f"p{i}") for i in range(6)]
    run(archive.view.refresh)
    v = archive.view
    size = len(run(lambda: v.tree(hashes[0])))
    monkeypatch.setattr(treecache, "IDLE_NODES", 3 * size)
    kept = run(lambda: v.lookup(ROOT_INODE, archive.base(hashes[5])))  # referenced: not idle
    for h in hashes[:5]:
        run(lambda h=h: v.getattr(path_inode(h)))  # loads the tree, hands out nothing
        assert v.trees.idle_nodes <= 3 * size
        assert v.trees.idle_nodes == sum(len(v.trees.loaded[x]) for x in v.trees.idle)
    assert list(v.trees.idle) == hashes[2:5], "the least recently used trees went first"
    assert set(v.trees.loaded) == {*hashes[2:6]}
    run(lambda: v.getattr(path_inode(hashes[2]) + 1))  # used again: the newest
    first = run(lambda: v.getattr(path_inode(hashes[0]) + 1))  # dropped: built again
    assert first.inode == path_inode(hashes[0]) + 1
    assert list(v.trees.idle) == [hashes[4], hashes[2], hashes[0]], "used last, dropped last"
    assert hashes[5] not in v.trees.idle and kept.counted == hashes[5]


def test_one_idle_tree_is_kept_however_big(archive: Archive,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(treecache, "IDLE_NODES", 1)
    h = archive.add(files(10))
    run(archive.view.refresh)
    run(lambda: archive.view.getattr(path_inode(h)))
    assert list(archive.view.trees.idle) == [h]


def test_refresh_reports_what_the_kernel_must_forget(archive: Archive) -> None:
    a = archive.add(files(1), "tool")
    b = archive.add(files(2), "tool")
    c = archive.add(files(3), "lone")
    first = run(archive.view.refresh)
    assert (first.added, first.removed, first.gone) == (3, 0, [])
    tool, lone = name_slot("tool") << INDEX_BITS, name_slot("lone") << INDEX_BITS
    assert sorted(first.inodes) == sorted([ROOT_INODE, BYNAME_INODE, tool | BYNAME_DIR,
                                           tool | BYNAME_LINK, lone | BYNAME_DIR,
                                           lone | BYNAME_LINK])
    v = archive.view
    archived = {h: v.paths[h].archived for h in (a, b, c)}
    bases = {h: archive.base(h) for h in (a, b, c)}
    archive.retire(a)
    archive.retire(c)
    changes = run(v.refresh)
    assert (changes.added, changes.removed) == (0, 2)
    assert sorted(changes.gone) == sorted([
        (ROOT_INODE, bases[a], path_inode(a)),
        (tool | BYNAME_DIR, version_name(archived[a], a), path_inode(a) | BYNAME_LINK),
        (ROOT_INODE, bases[c], path_inode(c)),
        (lone | BYNAME_DIR, version_name(archived[c], c), path_inode(c) | BYNAME_LINK),
        (BYNAME_INODE, b"lone", lone | BYNAME_DIR),  # its last version went
    ])
    assert sorted(changes.inodes) == sorted([ROOT_INODE, BYNAME_INODE, tool | BYNAME_DIR,
                                             tool | BYNAME_LINK, lone | BYNAME_DIR,
                                             lone | BYNAME_LINK])
    quiet = run(v.refresh)
    assert (quiet.added, quiet.removed, quiet.gone, quiet.inodes) == (0, 0, [], [])
    with pytest.raises(NotFound):
        run(lambda: v.lookup(ROOT_INODE, bases[a]))


def test_a_retired_path_in_use_keeps_its_tree_until_forgotten(archive: Archive) -> None:
    h = archive.add(files(2))
    run(archive.view.refresh)
    v = archive.view
    top = run(lambda: v.lookup(ROOT_INODE, archive.base(h)))
    archive.retire(h)
    run(v.refresh)
    assert h in v.trees.loaded, "the kernel still holds its inodes"
    v.forget([(top.inode, 1)])
    assert h not in v.trees.loaded and h not in v.trees.idle, \
        "retired and forgotten: dropped, not parked"


def test_trees_come_from_the_ls_then_the_nar_and_big_ones_from_a_tree_file(
        archive: Archive, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(treecache, "TREE_FILE_MIN", 10)
    with_ls = archive.add(files(20), "a")
    without = archive.add(files(2), "b")
    (archive.root / f"{without}.ls").unlink()
    run(archive.view.refresh)
    v = archive.view
    assert len(run(lambda: v.tree(with_ls))) > 20
    assert archive.reader.stats.nar_parses == 0, "the .ls was enough"
    run(lambda: v.tree(without))
    assert archive.reader.stats.nar_parses == 1, "no .ls: the NAR is parsed"
    tree_file = Path(v.trees.dir) / f"{with_ls}.tree"
    assert not tree_file.exists(), "written by the flush, not on the lookup's way"
    run(v.flush)
    assert tree_file.is_file() and not (Path(v.trees.dir) / f"{without}.tree").exists()
    # A new view (a remount) reads the tree file, and neither listing.
    again = Archive(archive.root)
    try:
        run(again.view.start)
        (archive.root / f"{with_ls}.ls").unlink()
        again.catalog.listings.clear()
        again.catalog.listings.commit()
        d = run(lambda: again.view.lookup(path_inode(with_ls), b"d"))
        assert d.inode == run(lambda: v.lookup(path_inode(with_ls), b"d")).inode
        assert again.reader.stats.nar_parses == 0 and with_ls in again.view.trees.loaded
    finally:
        again.close()


def test_listings_reach_the_catalog_at_the_flush_not_on_the_lookup_s_way(
        archive: Archive, monkeypatch: pytest.MonkeyPatch) -> None:
    """A first look at a path costs no catalog write: the listing and top it learnt are stored
    at the next flush (with the access times), and a remount reads them from there. A path
    without a tree file (the trees directory is listed at start) costs no look for one."""
    h = archive.add(files(3), "a")
    run(archive.view.refresh)
    v = archive.view
    looked: list[str] = []
    real = treecache.TreeCache._read_tree

    def read_tree(path: str, h: str, slot: int, entry: Entry) -> Tree | None:
        looked.append(path)
        return real(path, h, slot, entry)

    monkeypatch.setattr(treecache.TreeCache, "_read_tree", staticmethod(read_tree))
    run(v.start)
    run(lambda: v.lookup(path_inode(h), b"d"))
    assert looked == [], "no tree file listed at start: none looked for"
    assert archive.catalog.listing(h) is None and h in v.trees.unsaved
    run(v.flush)
    assert archive.catalog.listing(h) is not None and not v.trees.unsaved
    (archive.root / f"{h}.ls").unlink()
    again = Archive(archive.root)
    try:
        run(again.view.start)
        assert run(lambda: again.view.lookup(path_inode(h), b"d")).inode
        assert again.reader.stats.nar_parses == 0, "from the catalog"
    finally:
        again.close()


@pytest.mark.parametrize("kind", ["fifo", "symlink"])
def test_a_tree_file_that_is_not_a_file_is_never_read(archive: Archive, tmp_path: Path,
                                                      kind: str) -> None:
    """.narfs/trees is untrusted too: a FIFO there must not hang a worker (and so the unmount),
    and a symlink must not be followed, even to a tree that would pass every check."""
    h = archive.add(files(2))
    run(archive.view.refresh)
    v = archive.view
    planted = Path(v.trees.dir) / f"{h}.tree"
    planted.parent.mkdir(parents=True, exist_ok=True)
    if kind == "fifo":
        os.mkfifo(planted)
    else:
        entry = archive.catalog.get(h)
        assert entry is not None
        other = Tree.build(h, v.paths[h].slot, {"type": "directory", "entries": {
            "planted": {"type": "regular", "size": 1, "narOffset": 0}}}, entry.nar_size)
        (tmp_path / "outside.tree").write_bytes(other.dumps(entry.nar_hash))
        planted.symlink_to(tmp_path / "outside.tree")
    run(lambda: v.lookup(path_inode(h), b"d"))  # built from the listing, at once
    with pytest.raises(NotFound):
        run(lambda: v.lookup(path_inode(h), b"planted"))


@pytest.mark.expect_log_errors("left out of the mount: NAR truncated")
def test_a_path_with_no_usable_listing_is_broken_and_left_out(archive: Archive) -> None:
    good = archive.add(GOOD_TREE, "good")
    bad = archive.add(GOOD_TREE[:len(GOOD_TREE) // 2], "bad")  # a truncated NAR, no .ls
    run(archive.view.refresh)
    run(archive.view.fill_tops)
    assert bad in archive.view.trees.broken
    assert root_names(archive) == [BYNAME, archive.base(good)]
    with pytest.raises(Broken):
        run(lambda: archive.view.getattr(path_inode(bad)))
    archive.retire(bad)
    run(archive.view.refresh)
    assert bad not in archive.view.trees.broken


def test_a_listing_source_that_cannot_be_asked_now_breaks_nothing(
        archive: Archive, monkeypatch: pytest.MonkeyPatch) -> None:
    """A remote server down while a path's listing is fetched: that request fails (the adapter
    answers EIO), the path is not marked broken, the NAR (on the same server) is not parsed
    instead, and the next look, with the server back, works."""
    h = archive.add(files(2), "away")
    run(archive.view.refresh)
    backend = archive.reader.backend
    real = backend.read_listing
    down = True

    def read_listing(h: str, nar_size: int | None = None) -> dict | None:
        if down:
            raise Unavailable(errno.EIO, "http://cache.example/x.ls: connection refused")
        return real(h, nar_size)

    monkeypatch.setattr(backend, "read_listing", read_listing)
    archive.catalog.listings.clear()
    archive.catalog.listings.commit()
    with pytest.raises(Unavailable):
        run(lambda: archive.view.lookup(path_inode(h), b"d"))
    assert h not in archive.view.trees.broken
    assert archive.reader.stats.nar_parses == 0
    down = False
    assert run(lambda: archive.view.lookup(path_inode(h), b"d")).inode


def test_each_misuse_raises_its_own_error(archive: Archive) -> None:
    h = archive.add(files(2))
    run(archive.view.refresh)
    v = archive.view
    top = path_inode(h)
    run(lambda: v.tree(h))
    d, link, topfile = (run(lambda n=n: v.lookup(top, n)).inode for n in (b"d", b"link", b"top"))
    for call, error in [
        (lambda: v.lookup(ROOT_INODE, b"x" * 32 + b"-missing"), NotFound),
        (lambda: v.lookup(top, b"missing"), NotFound),
        (lambda: v.lookup(topfile, b"x"), NotADirectory),
        (lambda: v.lookup(BYNAME_INODE, b"missing"), NotFound),
        (lambda: v.getattr(1 << 62), NotFound),
        (lambda: v.file(d), IsADirectory),
        (lambda: v.file(link), Invalid),
        (lambda: v.file(top | BYNAME_LINK), Invalid),
        (lambda: v.readlink(topfile), Invalid),
    ]:
        with pytest.raises(error):
            run(call)
    assert run(lambda: v.readlink(link)) == b"d/f000"


def test_only_reads_are_access_records(archive: Archive) -> None:
    h, other = archive.add(files(2), "a"), archive.add(files(2), "b")
    run(archive.view.refresh)
    v = archive.view
    d = run(lambda: v.lookup(path_inode(other), b"d"))
    run(lambda: v.listdir(d.inode, 0, collect()[1]))
    d = run(lambda: v.lookup(path_inode(h), b"d"))
    f0 = run(lambda: v.lookup(d.inode, b"f000"))
    key, entry, _, size = run(lambda: v.file(f0.inode))
    assert key == h and size == 40
    v.record_read(key)
    run(v.flush)
    assert v.accessed == set()
    assert list(archive.catalog.access.keys()) == [h], "only the path read is recorded"
    assert archive.catalog.last_access(entry) > entry.archived


def test_prefetch_candidates_are_listed_neighbours_in_cached_frames(tmp_path: Path) -> None:
    a = Archive(tmp_path / "cache", prefetch=True)
    try:
        h = a.add(files(6))
        run(a.view.refresh)
        v = a.view
        d = run(lambda: v.lookup(path_inode(h), b"d"))
        inodes = [run(lambda i=i: v.lookup(d.inode, f"f{i:03}".encode())).inode
                  for i in range(6)]
        spans = [run(lambda ino=ino: v.file(ino)) for ino in inodes]
        key, entry = spans[0][0], spans[0][1]
        run(lambda: a.reader.read(entry, 0, spans[2][2] + spans[2][3]))  # f000 to f002
        run(lambda: v.listdir(path_inode(h), 0, collect()[1]))  # the path's top, not `d`
        assert v.prefetch_candidates(key, entry, inodes[0]) == [], \
            "`d` not listed in full: the kernel may not know its files' inodes"
        run(lambda: v.listdir(d.inode, 0, collect()[1]))
        first = v.prefetch_candidates(key, entry, inodes[0])
        assert [ino for ino, _ in first] == inodes[1:3], \
            "the neighbours in decompressed frames; never the file being read"
        for ino, data in first:
            _, _, off, n = spans[inodes.index(ino)]
            assert data == run(lambda off=off, n=n: a.reader.read(entry, off, n))
        run(lambda: a.reader.read(entry, 0, entry.nar_size))  # every frame decompressed
        second = v.prefetch_candidates(key, entry, inodes[5])
        assert [ino for ino, _ in second] == inodes[3:5], "each file once"
        assert v.prefetch_candidates(key, entry, inodes[4]) == []
    finally:
        a.close()


def test_a_dropped_tree_forgets_which_directories_the_kernel_had_listed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = Archive(tmp_path / "cache", prefetch=True)
    try:
        h, other = a.add(files(4), "a"), a.add(files(4), "b")
        run(a.view.refresh)
        v = a.view
        d = run(lambda: v.lookup(path_inode(h), b"d"))
        run(lambda: v.listdir(d.inode, 0, collect()[1]))
        f0 = run(lambda: v.lookup(d.inode, b"f000")).inode
        key, entry, _, _ = run(lambda: v.file(f0))
        run(lambda: a.reader.read(entry, 0, entry.nar_size))
        monkeypatch.setattr(treecache, "IDLE_NODES", len(v.trees.loaded[h]))
        v.forget([(d.inode, v.trees.refs[h])])  # the kernel forgets all of it: parked
        run(lambda: v.getattr(path_inode(other)))  # parked after it: the bound drops it
        assert h not in v.trees.loaded
        run(lambda: v.getattr(path_inode(h)))  # built again; the kernel knows no inode of it
        f1 = run(lambda: v.lookup(d.inode, b"f001")).inode
        assert v.prefetch_candidates(key, entry, f1) == [], "`d` is not listed any more"
        run(lambda: v.listdir(d.inode, 0, collect()[1]))
        assert len(v.prefetch_candidates(key, entry, f1)) == 3, "listed again: all but f001"
    finally:
        a.close()


def test_no_prefetch_without_the_fast_mode(archive: Archive) -> None:
    h = archive.add(files(3, size=8))
    run(archive.view.refresh)
    v = archive.view
    d = run(lambda: v.lookup(path_inode(h), b"d"))
    run(lambda: v.listdir(d.inode, 0, collect()[1]))
    f0 = run(lambda: v.lookup(d.inode, b"f000")).inode
    key, entry, _, _ = run(lambda: v.file(f0))
    run(lambda: archive.reader.read(entry, 0, entry.nar_size))
    assert v.prefetch_candidates(key, entry, f0) == []


def test_a_catalog_stand_in_is_enough(tmp_path: Path) -> None:
    """The view uses only the PathSet methods of the catalog: a remote path set can stand in."""
    a = Archive(tmp_path / "cache")

    class Only:
        def __init__(self, inner: object) -> None:
            self.inner = inner

        def __getattr__(self, name: str) -> object:
            assert name in treecache.PathSet.__dict__, f"the view used catalog.{name}"
            return getattr(self.inner, name)

    try:
        h = a.add(nar(node_file(b"single file\n")), "single")
        v = view_mod.ArchiveView(a.reader.backend, Only(a.catalog), a.reader,
                                 trio.CapacityLimiter(1), a.view.trees.dir)
        run(v.start)
        run(v.refresh)
        run(v.fill_tops)
        node = run(lambda: v.lookup(ROOT_INODE, v.paths[h].base.encode()))
        v.record_read(h)
        run(v.flush)
        assert node.size == len(b"single file\n")
    finally:
        a.close()
