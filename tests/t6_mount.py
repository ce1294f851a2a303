"""Issue 3: `narfs mount` shows archived store paths exactly as /nix/store holds them.

Real FUSE, real Nix: paths are built in the store, archived by narfs or copied by `nix copy`, then
compared with the originals through diff, find, grep and ls.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from mounting import Mount, mounted, wait_for

from conftest import Narfs
from narfs.cache import Cache
from narfs.catalog import Catalog
from nixtools import NIX, NixStore, rich_tree, run, tree_with_a_file_deep_in_it

pytestmark = pytest.mark.usefixtures("fuse_mode")  # conftest: fast and stock


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Store paths of every shape: a rich tree spanning frames, a lone file, a lone symlink."""
    tmp = tmp_path_factory.mktemp("src")
    store = NixStore(tmp / "nix")
    try:
        rich_tree(tmp / "tree", 3 << 20)
        (tmp / "single").write_text("a store path that is one file; narfs finds it\n")
        (tmp / "link").symlink_to("/etc/hostname")
        yield {"rich": store.tree(tmp / "tree", "narfs-rich"),
               "file": store.tree(tmp / "single", "narfs-file"),
               "link": store.tree(tmp / "link", "narfs-link")}
    finally:
        store.cleanup()


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory, paths: dict[str, str]) -> Narfs:
    n = Narfs(tmp_path_factory.mktemp("narfs"))
    n("init", "--cache", str(n.cache), "--secret-key", str(n.key))
    n.config.write_text(n.config.read_text() + "frame_size = 1048576\n")
    n("archive", *paths.values())
    return n


def base(path: str) -> str:
    return os.path.basename(path)


def find_view(root: Path) -> list[str]:
    """Names, types, modes, sizes and link targets (directory sizes differ between
    filesystems and say nothing)."""
    out = run(["find", str(root), "(", "-type", "d", "-printf", r"%P %y %m\n", ")", "-o",
               "-printf", r"%P %y %m %s %l\n"]).stdout
    return sorted(out.splitlines())


def ls_view(root: Path) -> list[str]:
    """`ls -lR` modulo link counts, owner, dates, block totals and directory sizes."""
    cwd, arg = (root, ".") if root.is_dir() and not root.is_symlink() else (root.parent,
                                                                            root.name)
    out = run(["ls", "-lR", "--time-style=+T", arg], cwd=cwd).stdout
    view = []
    for line in out.splitlines():
        fields = line.split(None, 6)
        if line.startswith("total ") or len(fields) < 7:
            view.append(line if not line.startswith("total ") else "")
            continue
        perms, _, _, _, size, _, rest = fields
        view.append(f"{perms} {'-' if perms.startswith('d') else size} {rest}")
    return view


def grep_view(root: Path) -> list[str]:
    cwd, arg = (root, ".") if root.is_dir() and not root.is_symlink() else (root.parent,
                                                                            root.name)
    out = subprocess.run(["grep", "-r", "-n", "-a", "narfs", arg], cwd=cwd,
                         capture_output=True).stdout
    return sorted(out.decode(errors="replace").splitlines())


def assert_same(mounted_path: Path, store_path: str) -> None:
    store = Path(store_path)
    diff = subprocess.run(["diff", "-r", "--no-dereference", str(mounted_path), store_path],
                          capture_output=True, text=True)
    assert diff.returncode == 0, diff.stdout + diff.stderr
    assert find_view(mounted_path) == find_view(store)
    assert ls_view(mounted_path) == ls_view(store)
    assert grep_view(mounted_path) == grep_view(store)


def test_narfs_archive_mounts_as_the_store_holds_it(archive: Narfs, paths: dict[str, str],
                                                    tmp_path: Path) -> None:
    with mounted(archive, tmp_path / "mnt") as m:
        listed = sorted(os.listdir(m.path))
        assert listed == sorted([".by-name", *(base(p) for p in paths.values())])
        for p in paths.values():
            assert_same(m / base(p), p)
        # Store modes: directories 0555, files 0444 or 0555, mtime 1 like the store.
        rich = m / base(paths["rich"])
        assert (rich / "bin").stat().st_mode & 0o7777 == 0o555
        assert (rich / "bin" / "tool").stat().st_mode & 0o7777 == 0o555
        assert (rich / "empty-file").stat().st_mode & 0o7777 == 0o444
        assert (rich / "bin").stat().st_mtime == 1
        assert (rich / "bin").stat().st_nlink == 2
        assert os.readlink(m / base(paths["link"])) == "/etc/hostname"
        for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
            with pytest.raises(OSError) as e:
                os.open(rich / "a", flags)
            assert e.value.errno == errno.EROFS, (flags, e.value)
        # /proc/mounts maps the mount back to its cache.
        with open("/proc/self/mounts") as f:
            line = next(ln.split() for ln in f if ln.split()[1] == str(m.path))
        assert line[0] == f"narfs:{archive.cache}" and line[2] == "fuse.narfs"
        assert "ro" in line[3].split(",") and "default_permissions" in line[3]
        assert m.alive()
    rich_hash = base(paths["rich"])[:32]
    with Catalog(Cache(str(archive.cache))) as catalog:
        assert catalog.access.get(rich_hash, 0) > 0, "reads were not recorded for gc"


def test_by_name_view(archive: Narfs, paths: dict[str, str], tmp_path: Path) -> None:
    with mounted(archive, tmp_path / "mnt") as m:
        names = os.listdir(m / ".by-name")
        assert sorted(names) == ["narfs-file", "narfs-link", "narfs-rich"]
        d = m / ".by-name" / "narfs-rich"
        entries = sorted(os.listdir(d))
        assert entries[-1] == "latest" and len(entries) == 2
        version = entries[0]
        assert version.endswith("-" + base(paths["rich"])[:8]) and version[:2] == "20"
        assert os.readlink(d / "latest") == f"../../{base(paths['rich'])}"
        assert os.readlink(d / version) == f"../../{base(paths['rich'])}"
        assert (d / "latest" / "bin" / "tool").read_text() == "#!/bin/sh\necho tool\n"


def test_inodes_survive_a_remount(archive: Narfs, paths: dict[str, str],
                                  tmp_path: Path) -> None:
    def inodes(m: Mount) -> list[str]:
        return sorted(run(["find", str(m.path), "-printf", r"%i %P\n"]).stdout.splitlines())

    with mounted(archive, tmp_path / "mnt") as m:
        first = inodes(m)
    with mounted(archive, tmp_path / "mnt") as m:
        assert inodes(m) == first
    numbers = [int(line.split()[0]) for line in first]
    assert len(set(numbers)) == len(numbers)


@pytest.mark.parametrize("compression,listing", [("xz", False), ("xz", True), ("zstd", False),
                                                 ("zstd", True)])
def test_nix_copy_caches(paths: dict[str, str], tmp_path: Path, compression: str,
                         listing: bool) -> None:
    """Caches written by Nix itself: listings from `.ls` or parsed from the NAR, reads through
    the hot tier (no seek table)."""
    n = Narfs(tmp_path / "narfs")
    n.root.mkdir()
    n.config.write_text(f'cache_dir = "{n.cache}"\n')
    url = f"file://{n.cache}?compression={compression}"
    if listing:
        url += "&write-nar-listing=true"
    run([*NIX, "copy", "--to", url, *paths.values()])
    assert any(f.suffix == ".ls" for f in n.cache.iterdir()) == listing
    with mounted(n, tmp_path / "mnt") as m:
        for p in paths.values():
            assert_same(m / base(p), p)
        stats = m.stats()
        assert stats["nar_parses"] == (0 if listing else 3), stats
        assert stats["hot_fills"] >= 2, stats
        assert stats["frames_decompressed"] == 0, stats


def test_hot_tier_is_bounded(paths: dict[str, str], tmp_path: Path) -> None:
    n = Narfs(tmp_path / "narfs")
    n.root.mkdir()
    n.config.write_text(f'cache_dir = "{n.cache}"\nhot_tier_mb = 1\n')
    run([*NIX, "copy", "--to", f"file://{n.cache}?compression=xz&write-nar-listing=true",
         *paths.values()])
    hot = n.cache / ".narfs" / "hot"
    with mounted(n, tmp_path / "mnt") as m:
        (m / base(paths["rich"]) / "bin" / "tool").read_text()
        assert len(list(hot.glob("*.nar"))) == 1  # larger than the tier: held alone
        (m / base(paths["file"])).read_text()
        files = list(hot.glob("*.nar"))
        assert len(files) == 1 and files[0].stat().st_size < 1 << 20, files
        # The evicted NAR comes back on demand.
        assert (m / base(paths["rich"]) / "big.bin").read_bytes() == \
            Path(paths["rich"], "big.bin").read_bytes()


def test_a_read_decompresses_only_the_frames_it_needs(narfs: Narfs, nixstore: NixStore,
                                                      tmp_path: Path) -> None:
    """50 KB in the middle of a 100 MB path costs a frame or two (4 MiB frames), not 25."""
    src = tree_with_a_file_deep_in_it(tmp_path / "big", 50)
    p = nixstore.tree(src, "narfs-100mb")
    narfs("archive", p)
    with mounted(narfs, tmp_path / "mnt") as m:
        before = m.stats()
        data = (m / base(p) / "m-target").read_bytes()
        after = m.stats()
        assert data == (src / "m-target").read_bytes()
        frames = after["frames_decompressed"] - before["frames_decompressed"]
        read = after["frame_bytes_read"] - before["frame_bytes_read"]
        assert 1 <= frames <= 2, (before, after)
        assert read <= 2 * (4 << 20) + 4096, (before, after)
        assert after["frame_cache_bytes"] <= 256 << 20
        # Contents never change, so files open with keep_cache: a second open and read is
        # served from the kernel's page cache and never reaches narfs's read path.
        assert (m / base(p) / "m-target").read_bytes() == data
        again = m.stats()
        for counter in ("frames_decompressed", "frame_hits", "frame_bytes_read"):
            assert again[counter] == after[counter], (counter, after, again)


def sent(before: dict, after: dict) -> dict[str, int]:
    """FUSE requests that reached narfs between two `Mount.stats()`, by operation."""
    ops = set(before["requests"]) | set(after["requests"])
    diff = {op: after["requests"].get(op, 0) - before["requests"].get(op, 0) for op in ops}
    return {op: n for op, n in diff.items() if n}


def test_warm_grep_sends_almost_no_requests_in_fast_mode(archive: Narfs, paths: dict[str, str],
                                                        tmp_path: Path, fuse_mode: str) -> None:
    """Issue 12: requests counted by narfs itself, per operation. Fast: the kernel opens files
    and directories without asking and answers from its caches. Stock: an OPEN and a RELEASE
    per file, an OPENDIR, a READDIR and a RELEASEDIR per directory, every time."""
    store = Path(paths["rich"])
    files = sum(len([f for f in fs if not (Path(d) / f).is_symlink()])
                for d, _, fs in os.walk(store))
    dirs = sum(1 for _ in os.walk(store))
    with mounted(archive, tmp_path / "mnt") as m:
        assert m.stats()["mode"] == fuse_mode
        assert f"{fuse_mode} mode:" in m.log()
        rich = m / base(paths["rich"])
        cold = grep_view(rich)
        assert cold == grep_view(store)
        before = m.stats()
        assert grep_view(rich) == cold
        warm = sent(before, m.stats())
    print(f"{fuse_mode}: warm grep -r over {files} files, {dirs} directories sent {warm}")
    if fuse_mode == "fast":
        assert sum(warm.values()) <= 2, warm
    else:
        assert warm.get("open", 0) >= files and warm.get("release", 0) >= files, warm
        assert warm.get("opendir", 0) >= dirs and warm.get("readdir", 0) >= dirs, warm


def test_listing_and_stat_are_no_access_reading_is(narfs: Narfs, nixstore: NixStore,
                                                   tmp_path: Path) -> None:
    """Issue 11: what an indexer does (updatedb, a backup's find, ls -lR, stat, readlink, an
    open without a read) keeps nothing alive for gc; reading a file's contents does."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "file").write_text("contents\n")
    (src / "link").symlink_to("sub/file")
    p = nixstore.tree(src, "narfs-indexed")
    narfs("archive", p)
    h = base(p)[:32]

    def access() -> float:
        with Catalog(Cache(str(narfs.cache))) as catalog:
            return catalog.access.get(h, 0)

    with mounted(narfs, tmp_path / "mnt") as m:
        run(["find", str(m.path), "-ls"])
        run(["ls", "-lRL", str(m.path)])
        os.stat(m / base(p) / "sub" / "file")
        assert os.readlink(m / base(p) / "link") == "sub/file"
        with open(m / base(p) / "sub" / "file", "rb"):
            pass
    assert access() == 0
    with mounted(narfs, tmp_path / "mnt") as m:
        assert (m / base(p) / "link").read_text() == "contents\n"
    assert access() > 0


def test_read_files_reach_narfs_again_after_the_access_window(narfs: Narfs, nixstore: NixStore,
                                                              tmp_path: Path) -> None:
    """The kernel answers repeated reads from its page cache; once per access window the mount
    drops what it cached of the files read, so steady use keeps being recorded for gc."""
    p = nixstore.text("steady use\n", "narfs-window")
    narfs("archive", p)
    narfs.config.write_text(narfs.config.read_text() + "access_window = 1\n")
    with mounted(narfs, tmp_path / "mnt") as m:
        content = m / base(p) / "content"
        assert content.read_text() == "steady use\n"
        first = m.stats()["requests"].get("read", 0)
        assert first >= 1

        def read_again() -> bool:
            assert content.read_text() == "steady use\n"
            return m.stats()["requests"].get("read", 0) > first

        wait_for(read_again, 15, "a read to reach narfs again")


def test_a_cold_grep_reads_each_directory_once_not_each_file(narfs: Narfs, nixstore: NixStore,
                                                             tmp_path: Path,
                                                             fuse_mode: str) -> None:
    """Fast mode: the first read in a directory hands its neighbours, already decompressed, to
    the kernel's page cache (fs.py, prefetch), so a cold `grep -r` costs a READ per directory;
    stock mode reads file by file."""
    src = tmp_path / "src"
    for d in range(3):
        (src / f"d{d}").mkdir(parents=True)
        for i in range(100):
            (src / f"d{d}" / f"f{i:03}").write_text(f"line {i}\n" * 40 + f"narfs {d} {i}\n")
    p = nixstore.tree(src, "narfs-prefetch")
    narfs("archive", p)
    with mounted(narfs, tmp_path / "mnt") as m:
        before = m.stats()
        assert grep_view(m / base(p)) == grep_view(Path(p))
        after = m.stats()
    reads = sent(before, after).get("read", 0)
    print(f"{fuse_mode}: cold grep -r over 300 files in 3 directories: {reads} READs, "
          f"{after['prefetched']} files prefetched")
    if fuse_mode == "fast":
        assert reads <= 6 and after["prefetched"] >= 290, (reads, after)
    else:
        assert reads >= 300 and after["prefetched"] == 0, (reads, after)
