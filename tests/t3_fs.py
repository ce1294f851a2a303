"""The pyfuse3 operations (narfs/fs.py) in-process, with no kernel, as S3QL's t3_fs_api.py: the
adapter is built over a real cache made without Nix (tests/inprocess.py), its handlers are
awaited directly, and the kernel calls (readdir_reply, invalidate_*, notify_store) are
monkeypatched to record what the kernel would be told. Each test takes milliseconds."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pyfuse3
import pytest

from hostile import GOOD_TREE
from inprocess import Archive, files, path_inode, run
from narfs.fs import FOREVER, SHORT, NarFS
from narfs.tree import BYNAME_DIR, BYNAME_INODE, BYNAME_LINK, INDEX_BITS, ROOT_INODE, name_slot
from narfs.view import BYNAME, version_name


class Kernel:
    """What the kernel is told, recorded; readdir_reply takes `room` entries, then refuses."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.room: int | None = None
        self.listed: list[tuple[bytes, pyfuse3.EntryAttributes, int]] = []
        self.entries: list[tuple[int, bytes, int]] = []
        self.inodes: list[int] = []
        self.stored: list[tuple[int, bytes]] = []
        monkeypatch.setattr(pyfuse3, "readdir_reply", self.readdir_reply)
        monkeypatch.setattr(pyfuse3, "invalidate_entry_async", self.invalidate_entry_async)
        monkeypatch.setattr(pyfuse3, "invalidate_inode", self.invalidate_inode)
        monkeypatch.setattr(pyfuse3, "notify_store", self.notify_store)

    def readdir_reply(self, token: object, name: bytes, attr: pyfuse3.EntryAttributes,
                      next_id: int) -> bool:
        if self.room is not None and len(self.listed) >= self.room:
            return False
        self.listed.append((name, attr, next_id))
        return True

    def invalidate_entry_async(self, parent: int, name: bytes, deleted: int = 0,
                               ignore_enoent: bool = False) -> None:
        assert ignore_enoent
        self.entries.append((parent, name, deleted))

    def invalidate_inode(self, inode: int, attr_only: bool = False) -> None:
        self.inodes.append(inode)

    def notify_store(self, inode: int, offset: int, data: bytes) -> None:
        self.stored.append((inode, bytes(data)))

    def readdir(self, fs: NarFS, inode: int, start: int = 0, room: int | None = None
                ) -> list[tuple[bytes, pyfuse3.EntryAttributes, int]]:
        self.listed, self.room = [], room
        run(lambda: fs.readdir(inode, start, object()))  # type: ignore[arg-type]
        return self.listed


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> Kernel:
    return Kernel(monkeypatch)


@pytest.fixture(params=["fast", "stock"])
def mounted(request: pytest.FixtureRequest, tmp_path: Path,
            kernel: Kernel) -> Iterator[tuple[Archive, NarFS]]:
    """An adapter in each mode, live: its kernel calls go to `kernel`."""
    fast = request.param == "fast"
    a = Archive(tmp_path / "cache", prefetch=fast)
    fs = NarFS(a.view, a.reader, fast)
    fs.live = True
    try:
        yield a, fs
    finally:
        a.close()


def errno_of(call: object) -> int:
    with pytest.raises(pyfuse3.FUSEError) as info:
        run(call)  # type: ignore[arg-type]
    return info.value.errno


def open_dir(fs: NarFS, inode: int) -> int:
    """The handle readdir gets: opendir's in stock mode, the inode itself in fast mode."""
    if fs.fast:
        assert errno_of(lambda: fs.opendir(inode)) == errno.ENOSYS
        return inode
    return run(lambda: fs.opendir(inode))


@pytest.mark.expect_log_errors("left out of the mount", r"getattr\(\d+,\) failed")
def test_errors_become_their_errnos(mounted: tuple[Archive, NarFS],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    a, fs = mounted
    h = a.add(files(2))
    bad = a.add(GOOD_TREE[:len(GOOD_TREE) // 2], "bad")  # no listing to be had
    run(fs.refresh)
    top = path_inode(h)
    d, link, topfile = (run(lambda n=n: fs.lookup(top, n)).st_ino
                        for n in (b"d", b"link", b"top"))
    assert errno_of(lambda: fs.lookup(ROOT_INODE, b"missing")) == errno.ENOENT
    assert errno_of(lambda: fs.lookup(topfile, b"x")) == errno.ENOTDIR
    assert errno_of(lambda: fs.readlink(topfile)) == errno.EINVAL
    assert errno_of(lambda: fs.getattr(path_inode(bad))) == errno.EIO
    if not fs.fast:
        assert errno_of(lambda: fs.open(d, os.O_RDONLY)) == errno.EISDIR
        assert errno_of(lambda: fs.open(link, os.O_RDONLY)) == errno.EINVAL
        assert errno_of(lambda: fs.open(topfile, os.O_WRONLY)) == errno.EROFS
    assert errno_of(lambda: fs.flush(1)) == errno.ENOSYS
    # No extended attributes: ENOSYS once, and the kernel stops asking (three per `ls -l` file).
    assert errno_of(lambda: fs.getxattr(topfile, b"security.selinux", None)) == errno.ENOSYS

    async def crash(*args: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(a.view, "getattr", crash)
    assert errno_of(lambda: fs.getattr(top)) == errno.EIO, "a bug must not end the mount"
    assert fs.requests["getattr"] == 2 and fs.requests["lookup"] == 5


@pytest.mark.expect_log_errors("zstd stream ends inside a frame header")
def test_damage_is_one_log_line_per_problem(mounted: tuple[Archive, NarFS],
                                            caplog: pytest.LogCaptureFixture) -> None:
    a, fs = mounted
    h = a.add(files(2))
    run(fs.refresh)
    topfile = run(lambda: fs.lookup(path_inode(h), b"top")).st_ino
    entry = a.catalog.get(h)
    assert entry is not None
    (a.root / entry.url).write_bytes(b"garbage")
    handle = topfile if fs.fast else run(lambda: fs.open(topfile, os.O_RDONLY)).fh
    caplog.set_level(logging.ERROR)
    for _ in range(3):
        assert errno_of(lambda: fs.read(handle, 0, 100)) == errno.EIO
    lines = [r.getMessage() for r in caplog.records if r.name == "narfs.fs"]
    assert len(lines) == 1 and f"/nix/store/{entry.name}" in lines[0], lines


def test_attributes_and_timeouts_follow_the_mode(mounted: tuple[Archive, NarFS]) -> None:
    a, fs = mounted
    h = a.add(files(2), "tool")
    run(fs.refresh)
    top = run(lambda: fs.lookup(ROOT_INODE, a.base(h)))
    assert top.st_ino == path_inode(h) and top.entry_timeout == FOREVER
    assert top.st_mode == 0o40555 and top.st_nlink == 2 + 1
    f = run(lambda: fs.lookup(top.st_ino, b"top"))
    assert (f.st_mode, f.st_size, f.st_mtime_ns) == (0o100444, 9, 10**9)
    dynamic = SHORT if not fs.fast else FOREVER
    byname = run(lambda: fs.lookup(ROOT_INODE, BYNAME))
    tool = run(lambda: fs.lookup(BYNAME_INODE, b"tool"))
    latest = run(lambda: fs.lookup(tool.st_ino, b"latest"))
    for attr in (byname, tool, latest):
        assert attr.entry_timeout == attr.attr_timeout == dynamic
    assert latest.st_mode == 0o120777 and latest.st_size == len(b"../../" + a.base(h))
    assert fs.enable_symlink_caching == fs.fast


def test_stock_mode_hands_out_file_handles(tmp_path: Path) -> None:
    a = Archive(tmp_path / "cache")
    fs = NarFS(a.view, a.reader, fast=False)
    try:
        h = a.add(files(2))
        run(fs.refresh)
        d = run(lambda: fs.lookup(path_inode(h), b"d")).st_ino
        f0 = run(lambda: fs.lookup(d, b"f000")).st_ino
        one = run(lambda: fs.open(f0, os.O_RDONLY))
        two = run(lambda: fs.open(f0, os.O_RDONLY))
        assert one.fh != two.fh and one.keep_cache and fs.handles == {one.fh: f0, two.fh: f0}
        assert run(lambda: fs.read(one.fh, 0, 100)) == b"A" * 40
        assert run(lambda: fs.read(two.fh, 38, 100)) == b"AA"
        assert run(lambda: fs.read(two.fh, 40, 100)) == b""
        run(lambda: fs.release(one.fh))
        assert fs.handles == {two.fh: f0} and fs.stats()["open_files"] == 1
        assert run(lambda: fs.opendir(d)) == d, "the inode is the directory's handle"
    finally:
        a.close()


def test_fast_mode_opens_nothing_and_reads_by_inode(tmp_path: Path) -> None:
    a = Archive(tmp_path / "cache", prefetch=True)
    fs = NarFS(a.view, a.reader, fast=True)
    try:
        h = a.add(files(2))
        run(fs.refresh)
        d = run(lambda: fs.lookup(path_inode(h), b"d")).st_ino
        f1 = run(lambda: fs.lookup(d, b"f001")).st_ino
        assert errno_of(lambda: fs.open(f1, os.O_RDONLY)) == errno.ENOSYS
        assert errno_of(lambda: fs.opendir(d)) == errno.ENOSYS
        assert run(lambda: fs.read(f1, 0, 100)) == b"B" * 40
        assert fs.handles == {} and fs.mode == "fast"
    finally:
        a.close()


def test_readdir_resumes_from_its_cursor_and_counts_what_the_kernel_took(
        mounted: tuple[Archive, NarFS], kernel: Kernel) -> None:
    a, fs = mounted
    h = a.add(files(25))
    run(fs.refresh)
    top = run(lambda: fs.lookup(ROOT_INODE, a.base(h))).st_ino
    d = run(lambda: fs.lookup(top, b"d")).st_ino
    fh = open_dir(fs, d)
    names: list[bytes] = []
    start = 0
    for _ in range(10):  # bounded: a cursor that does not advance must fail, not hang
        got = kernel.readdir(fs, fh, start, room=4)
        if not got:
            break
        names += [name for name, _, _ in got]
        start = got[-1][2]
    assert names == [f"f{i:03}".encode() for i in range(25)]
    assert a.view.trees.refs[h] == 2 + 25, \
        "each entry the kernel took is a lookup; refusals are not"
    run(lambda: fs.forget([(top, 1), (d, 1)] + [(d + 1 + i, 1) for i in range(25)]))
    assert h not in a.view.trees.refs and h in a.view.trees.idle


def test_root_readdir_across_paths_added_and_retired(mounted: tuple[Archive, NarFS],
                                                      kernel: Kernel) -> None:
    a, fs = mounted
    hashes = [a.add(files(1), f"p{i}") for i in range(10)]
    run(fs.refresh)
    fh = open_dir(fs, ROOT_INODE)
    got = kernel.readdir(fs, fh, 0, room=5)
    assert got[0][0] == BYNAME
    cursor = got[-1][2]
    order = sorted(hashes, key=path_inode)
    listed = [name for name, _, _ in got[1:]]
    assert listed == [a.base(h) for h in order[:4]]
    a.retire(order[1])
    a.retire(order[6])
    news = [a.add(files(1), f"n{i}") for i in range(6)]
    run(fs.refresh)
    rest = [name for name, _, _ in kernel.readdir(fs, fh, cursor)]
    assert rest == [a.base(h) for h in sorted([*order[4:], *news], key=path_inode)
                    if h in a.view.paths and path_inode(h) > path_inode(order[3])]
    assert len(set(listed + rest)) == len(listed + rest)


def test_refresh_tells_the_kernel_what_went_and_what_changed(
        mounted: tuple[Archive, NarFS], kernel: Kernel) -> None:
    a, fs = mounted
    h = a.add(files(1), "tool")
    other = a.add(files(2), "other")
    assert run(fs.refresh) == (2, 0)
    tool = name_slot("tool") << INDEX_BITS
    named = name_slot("other") << INDEX_BITS
    assert set(kernel.inodes) == {ROOT_INODE, BYNAME_INODE, tool | BYNAME_DIR,
                                  tool | BYNAME_LINK, named | BYNAME_DIR, named | BYNAME_LINK}
    assert kernel.entries == []
    base, archived = a.base(h), a.view.paths[h].archived
    kernel.inodes = []
    a.retire(h)
    assert run(fs.refresh) == (0, 1)
    assert sorted(kernel.entries) == sorted([
        (ROOT_INODE, base, path_inode(h)),
        (tool | BYNAME_DIR, version_name(archived, h), path_inode(h) | BYNAME_LINK),
        (BYNAME_INODE, b"tool", tool | BYNAME_DIR)])
    assert set(kernel.inodes) == {ROOT_INODE, BYNAME_INODE, tool | BYNAME_DIR,
                                  tool | BYNAME_LINK}
    kernel.inodes, kernel.entries = [], []
    assert run(fs.refresh) == (0, 0)
    assert (kernel.inodes, kernel.entries) == ([], []), "nothing changed: nothing to say"
    fs.live = False  # before the FUSE session exists there is no kernel to tell
    a.retire(other)
    run(fs.refresh)
    assert (kernel.inodes, kernel.entries) == ([], [])


def test_expire_drops_the_contents_of_files_read(mounted: tuple[Archive, NarFS],
                                                 kernel: Kernel) -> None:
    a, fs = mounted
    h = a.add(files(3))
    run(fs.refresh)
    d = run(lambda: fs.lookup(path_inode(h), b"d")).st_ino
    f0 = run(lambda: fs.lookup(d, b"f000")).st_ino
    handle = f0 if fs.fast else run(lambda: fs.open(f0, os.O_RDONLY)).fh
    run(lambda: fs.read(handle, 0, 10))
    kernel.inodes = []  # what the refresh said
    run(fs.expire)
    assert kernel.inodes == [f0], "only files read"
    assert a.view.accessed == {h}
    kernel.inodes = []
    run(fs.expire)
    assert kernel.inodes == []


def test_fast_reads_hand_listed_neighbours_to_the_page_cache(tmp_path: Path,
                                                           kernel: Kernel) -> None:
    a = Archive(tmp_path / "cache", prefetch=True)
    fs = NarFS(a.view, a.reader, fast=True)
    fs.live = True
    try:
        h = a.add(files(4))
        run(fs.refresh)
        d = run(lambda: fs.lookup(path_inode(h), b"d")).st_ino
        inodes = [attr.st_ino for _, attr, _ in kernel.readdir(fs, d)]
        run(lambda: fs.read(inodes[0], 0, 40))
        entry = a.catalog.get(h)
        assert entry is not None
        run(lambda: a.reader.read(entry, 0, entry.nar_size))
        fs.live = False  # no FUSE session (before init, after close): nothing to fill
        run(lambda: fs.read(inodes[1], 0, 40))
        assert kernel.stored == []
        fs.live = True
        run(lambda: fs.read(inodes[1], 0, 40))
        assert sorted(kernel.stored) == [(inodes[2], b"C" * 40), (inodes[3], b"D" * 40)]
        assert fs.prefetched == 2 and fs.stats()["prefetched"] == 2
        kernel.inodes = []
        run(fs.expire)
        assert set(kernel.inodes) == set(inodes[:4]), "prefetched files expire too"
    finally:
        a.close()


def test_statfs_and_stats(mounted: tuple[Archive, NarFS]) -> None:
    a, fs = mounted
    a.add(files(1))
    run(fs.refresh)
    assert run(fs.statfs).f_files == 1
    stats = fs.stats()
    assert stats["paths"] == 1 and stats["mode"] == fs.mode and stats["requests"] == {
        "statfs": 1}
