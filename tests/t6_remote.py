"""Issue 15: `narfs mount http://host/cache` shows the archive another machine serves.

Real nginx (tests/nginxserver.py, the repository's server block), real FUSE, real Nix: paths are
archived by narfs into a cache that nginx serves, then mounted from its URL and compared with
the store and with a local mount of the same cache.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from mounting import is_mounted, mounted, unmount, wait_for
from t6_mount import find_view, grep_view

from conftest import Narfs
from lyingserver import MODES, lying
from narfs import pathindex
from narfs.cache import Cache
from narfs.config import Settings
from narfs.http import Fetched
from narfs.remote import open_remote
from narfs.zstdseek import read_table
from nginxserver import Nginx, free_port, serving, world_readable
from nixtools import NIX, NixStore, delete_paths, one_line_error, rich_tree, run

FRAME = 4 << 20
BIG = 100 << 20
DEEP = "a/b/c/d/e/f/g/h/fifty.bin"


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A rich tree, a lone file, and a 100 MB path with a 50 KB file deep inside, in the
    middle of its NAR (half incompressible bytes before and after it)."""
    tmp = tmp_path_factory.mktemp("src")
    store = NixStore(tmp / "nix")
    try:
        rich_tree(tmp / "tree", 3 << 20)
        (tmp / "single").write_text("a store path that is one file\n")
        big = tmp / "big"
        (big / "a").mkdir(parents=True)
        (big / "a" / "0-before.bin").write_bytes(os.urandom(BIG // 4) + b"x" * (BIG // 4))
        (big / DEEP).parent.mkdir(parents=True)
        (big / DEEP).write_bytes(os.urandom(50_000))
        (big / "z-after.bin").write_bytes(os.urandom(BIG // 4) + b"y" * (BIG // 4))
        yield {"rich": store.tree(tmp / "tree", "narfs-rich"),
               "file": store.tree(tmp / "single", "narfs-file"),
               "big": store.tree(big, "narfs-big")}
    finally:
        store.cleanup()


@contextmanager
def reachable_dir() -> Iterator[Path]:
    """A directory nginx's workers can reach: not under pytest's tmp dirs, which every pytest
    run (other sessions' too) resets to mode 0700."""
    d = Path(tempfile.mkdtemp(prefix="narfs-remote-"))
    try:
        d.chmod(0o755)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def server(paths: dict[str, str]) -> Iterator[Narfs]:
    """The serving machine's narfs: its cache holds the paths (and their index)."""
    with reachable_dir() as root:
        n = Narfs(root / "narfs")
        n.root.mkdir()
        n("init", "--cache", str(n.cache), "--secret-key", str(n.key))
        n("archive", *paths.values())
        world_readable(n.cache)
        yield n


@pytest.fixture(scope="module")
def nginx(server: Narfs) -> Iterator[Nginx]:
    with serving(server.cache) as s:
        yield s


def client(tmp_path: Path, server: Narfs, url: str, extra: str = "") -> Narfs:
    """Another machine's narfs: no cache of its own, the server's public key trusted."""
    c = Narfs(tmp_path / "client")
    c.root.mkdir(exist_ok=True)
    c.config.write_text(f'cache_dir = "{url}"\npublic_key = "{server.public_key}"\n'
                        f"remote_poll = 1\nremote_timeout = 3\n{extra}")
    c.env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    return c


def base(path: str) -> str:
    return os.path.basename(path)


def test_remote_mount_is_the_store(tmp_path: Path, server: Narfs, nginx: Nginx,
                                   paths: dict[str, str]) -> None:
    c = client(tmp_path, server, nginx.url)
    with mounted(c, tmp_path / "mnt") as m:
        assert sorted(os.listdir(m.path)) == sorted([".by-name", *map(base, paths.values())])
        for path in paths.values():
            diff = subprocess.run(["diff", "-r", "--no-dereference", path, str(m / base(path))],
                                  capture_output=True, text=True)
            assert diff.returncode == 0, diff.stdout + diff.stderr
            assert find_view(m / base(path)) == find_view(Path(path))
        rich = paths["rich"]
        assert grep_view(m / base(rich)) == grep_view(Path(rich))
        assert os.readlink(m / ".by-name" / "narfs-big" / "latest") == f"../../{base(paths['big'])}"
        assert "mounted http://127.0.0.1" in m.log()
        assert server("status").returncode == 0  # another cache's mount in the table is fine
    # the same tree as a local mount of the server's cache, inode numbers included
    with mounted(server, tmp_path / "local") as local, mounted(c, tmp_path / "mnt") as m:
        for path in paths.values():
            for sub in ("", "bin/tool"):
                if not (Path(path) / sub).exists():
                    continue
                a, b = os.lstat(local / base(path) / sub), os.lstat(m / base(path) / sub)
                assert (a.st_ino, a.st_mode, a.st_size) == (b.st_ino, b.st_mode, b.st_size)


def test_cold_read_of_a_small_file_deep_in_a_big_path(tmp_path: Path, server: Narfs,
                                                      nginx: Nginx, paths: dict[str, str],
                                                      capsys: pytest.CaptureFixture) -> None:
    """At most 3 requests (listing, seek table, frame) and 2 frames of payload, counted in
    nginx's access log, for the first read of a 50 KB file in the middle of a 100 MB path."""
    big = paths["big"]
    c = client(tmp_path, server, "/nonexistent")
    with mounted(c, tmp_path / "mnt", nginx.url) as m:  # `narfs mount URL MOUNTPOINT`
        nginx.clear_log()
        data = (m / base(big) / DEEP).read_bytes()
        assert data == (Path(big) / DEEP).read_bytes()
        requests = nginx.requests()
        cache = Cache(str(server.cache))
        info = cache.read_narinfo(base(big)[:32])
        with open(cache.nar_path(info.url), "rb") as f:
            table = read_table(f, os.fstat(f.fileno()).st_size)
        assert table is not None and len(table.frames) > 20
        largest = max(fr.comp_size for fr in table.frames)
        payload = sum(r.body_bytes for r in requests if r.uri.startswith("/nar/"))
        ls = os.path.getsize(cache.listing_path(info.hash))
        with capsys.disabled():
            print(f"\ncold read of 50 KB in a {info.nar_size >> 20} MiB path: "
                  f"{len(requests)} requests, {sum(r.bytes_sent for r in requests)} bytes sent "
                  f"(NAR payload {payload}, listing {ls}, largest frame {largest}): "
                  + ", ".join(f"{r.uri[:24]} {r.status} {r.body_bytes}" for r in requests))
        assert len(requests) <= 3, requests
        assert payload <= 2 * largest, requests
        # a second look costs no request: the kernel, the frame cache and ranges/ hold it
        nginx.clear_log()
        assert (m / base(big) / DEEP).read_bytes() == data
        assert nginx.requests() == []
    with mounted(c, tmp_path / "mnt", nginx.url) as m:  # a new mount: from the disk cache
        nginx.clear_log()
        assert (m / base(big) / DEEP).read_bytes() == data
        assert [r for r in nginx.requests() if r.uri.startswith("/nar/")] == []


def test_a_first_look_asks_for_listing_and_frame_hashes_at_once(
        tmp_path: Path, server: Narfs, nginx: Nginx, paths: dict[str, str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A path's `.ls` is requested while its `.auth` is still being fetched (one round trip
    of a cold look, not two): the `.auth` request here waits for the `.ls` one to start,
    which only a concurrent fetch lets happen. In-process, against the real nginx."""
    h = base(paths["rich"])[:32]
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # the client's mirror
    backend = open_remote(nginx.url, Settings(public_key=server.public_key))
    try:
        backend.update()
        listing_asked = threading.Event()
        get = backend.http.get

        def watched(path: str, limit: int, etag: str | None = None) -> Fetched | None:
            if path == f"{h}.ls":
                listing_asked.set()
            elif path == f"{h}.auth":
                assert listing_asked.wait(10), "the .ls was not asked for before the .auth ended"
            return get(path, limit, etag)

        backend.http.get = watched  # type: ignore[method-assign]
        root = backend.fetch_listing(h, None)
        assert root is not None and "a" in root["entries"]
    finally:
        backend.close()


def test_frames_are_fetched_ahead_of_reads_that_go_frame_after_frame(
        tmp_path: Path, server: Narfs, nginx: Nginx, paths: dict[str, str]) -> None:
    """A file read from its start: once two frames were read one after the other, the next
    two are fetched before they are asked for (each frame once)."""
    c = client(tmp_path, server, nginx.url)
    with mounted(c, tmp_path / "mnt") as m:
        (m / base(paths["big"]) / DEEP).stat()  # the listing, before counting
        nginx.clear_log()

        def frames() -> list[str]:
            return [r.range for r in nginx.requests() if r.uri.startswith("/nar/")]

        with open(m / base(paths["big"]) / "a" / "0-before.bin", "rb") as f:
            f.read(FRAME + FRAME // 2)  # frames 0 and 1
            wait_for(lambda: len(frames()) >= 4, 30, "two frames fetched ahead")
        assert len(set(frames())) == len(frames()), frames()


def test_paths_archived_and_retired_on_the_server_follow(tmp_path: Path, server: Narfs,
                                                         nginx: Nginx, nixstore: NixStore
                                                         ) -> None:
    c = client(tmp_path, server, nginx.url)
    with mounted(c, tmp_path / "mnt") as m:
        # polls are conditional: an unchanged index costs a 304 and no body
        nginx.clear_log()
        wait_for(lambda: [r for r in nginx.requests() if r.uri == f"/{pathindex.FILENAME}"],
                 10, "a poll")
        polls = [r for r in nginx.requests() if r.uri == f"/{pathindex.FILENAME}"]
        assert [(r.status, r.body_bytes) for r in polls][:1] == [(304, 0)], polls
        new = nixstore.text("archived while a remote mount is up", "narfs-late")
        server("archive", new)
        world_readable(server.cache)
        wait_for(lambda: (m / base(new) / "content").exists(), 30, "the new path")
        assert (m / base(new) / "content").read_text() == "archived while a remote mount is up"
        old = time.time() - 3 * 86400
        os.utime(Cache(str(server.cache)).narinfo_path(base(new)[:32]), (old, old))
        gc = server("gc", "--older-than", "2d")
        assert f"retired {new}" in gc.stdout, gc.stdout
        wait_for(lambda: not (m / base(new)).exists(), 30, "the retired path to go")
        assert not (m / ".by-name" / "narfs-late").exists()


def test_narinfo_signed_by_an_untrusted_key_is_not_shown(tmp_path: Path, server: Narfs,
                                                         nginx: Nginx,
                                                         paths: dict[str, str]) -> None:
    other = Narfs(tmp_path / "other")
    other.root.mkdir()
    other("init", "--cache", str(other.cache), "--secret-key", str(other.key))
    c = client(tmp_path, other, nginx.url)  # trusts another key than the server's
    with mounted(c, tmp_path / "mnt") as m:
        assert os.listdir(m.path) == [".by-name"]
        assert not (m / base(paths["file"])).exists()
        assert "not signed by a trusted key" in m.log()


def test_a_server_ignoring_range_gives_eio(tmp_path: Path, server: Narfs,
                                           paths: dict[str, str]) -> None:
    """nginx with `max_ranges 0` answers every Range request with the whole file (200)."""
    with serving(server.cache, "max_ranges 0;") as lying:
        c = client(tmp_path, server, lying.url)
        with mounted(c, tmp_path / "mnt") as m:
            with pytest.raises(OSError) as e:
                (m / base(paths["big"]) / DEEP).read_bytes()
            assert e.value.errno == errno.EIO
            wait_for(lambda: "ignores Range" in m.log(), 10, "the log line")
            whole = [r for r in lying.requests() if r.uri.startswith("/nar/")]
            # the whole file was never read: the connection is closed on the 200
            assert all(r.body_bytes < BIG // 2 for r in whole), whole


@pytest.mark.parametrize("mode", MODES)
def test_a_lying_server_gives_eio_never_other_bytes(tmp_path: Path, server: Narfs, nginx: Nginx,
                                                    paths: dict[str, str], mode: str) -> None:
    """Range answers cut short, with a Content-Length longer or shorter than the body, or for
    another range than the one asked: the read fails (EIO, one log line), bytes are never
    handed on."""
    with lying(nginx.port, mode) as url:
        c = client(tmp_path, server, url)
        with mounted(c, tmp_path / "mnt") as m:
            with pytest.raises(OSError) as e:
                (m / base(paths["big"]) / DEEP).read_bytes()
            assert e.value.errno == errno.EIO
            assert m.alive()
            wait_for(lambda: "read: " in m.log() or "listing unusable" in m.log(), 10,
                     "the log line")


def test_a_range_cut_off_part_way_is_resumed_where_it_broke(
        tmp_path: Path, server: Narfs, nginx: Nginx, paths: dict[str, str]) -> None:
    """A frame's answer cut off half-way (once) costs one more request, for the rest of the
    range only; the read gets its bytes, checked as a whole against the signed hash."""
    seen: list[str] = []
    with lying(nginx.port, "truncated", times=1, seen=seen) as url:
        c = client(tmp_path, server, url)
        with mounted(c, tmp_path / "mnt") as m:
            assert (m / base(paths["big"]) / DEEP).read_bytes() \
                == (Path(paths["big"]) / DEEP).read_bytes()
    ranges = [tuple(map(int, r.removeprefix("bytes=").split("-"))) for r in seen if r]
    assert len(ranges) == 2, seen
    (start, end), (again, end2) = ranges
    assert end2 == end and start < again <= end, "asked again for the rest only"
    assert again - start == (end - start + 1) // 2, "from where the cut answer stopped"


def read_in_child(path: Path) -> str:
    """Read `path` in a child process killed after 60 s, so a read that would hang (a mount
    without its timeouts) fails the test rather than hanging it; returns the error cat gave."""
    proc = subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, timeout=60)
    assert proc.returncode != 0, f"{path} was read whole"
    return proc.stderr


def test_server_stopped_mid_read(tmp_path: Path, server: Narfs, paths: dict[str, str]) -> None:
    """A read that needs the server once it is gone (stopped, then hanging) fails with EIO in
    bounded time; the mount stays up, and unmounts. A path first looked into while the server
    is down is not marked broken: it lists once the server is back."""
    with serving(server.cache) as s:
        c = client(tmp_path, server, s.url)
        with mounted(c, tmp_path / "mnt") as m:
            big = m / base(paths["big"])
            deep = (big / DEEP).read_bytes()
            s.pause()  # hangs: the socket accepts, nothing answers
            assert "Input/output error" in read_in_child(big / "a" / "0-before.bin")
            s.resume()
            s.stop()  # gone: connections refused
            assert "Input/output error" in read_in_child(big / "z-after.bin")
            assert (big / DEEP).read_bytes() == deep  # what it has, it serves
            rich = m / base(paths["rich"])
            with pytest.raises(OSError) as e:
                os.listdir(rich)  # its listing is not fetched
            assert e.value.errno == errno.EIO
            s.start()
            assert sorted(os.listdir(rich)) == sorted(os.listdir(paths["rich"]))
            s.stop()
            assert m.alive()
            wait_for(lambda: "did not answer in time" in m.log() and "refused" in m.log(), 10,
                     "log lines naming each failure")
        # mounted again while the server is down: what the last mount mirrored, with a warning
        with mounted(c, tmp_path / "mnt") as m:
            assert base(paths["big"]) in os.listdir(m.path)
            assert (m / base(paths["big"]) / DEEP).read_bytes() == deep
            assert "showing the paths mirrored at the last mount" in m.log()


def test_tampered_index_is_refused(tmp_path: Path, server: Narfs, paths: dict[str, str]) -> None:
    with reachable_dir() as d, serving(d / "copy") as s:
        shutil.copytree(server.cache, d / "copy", symlinks=True)
        (d / "copy" / pathindex.FILENAME).write_bytes(b"not an index")
        world_readable(d / "copy")
        c = client(tmp_path, server, s.url)
        (tmp_path / "mnt").mkdir()
        proc = c("mount", str(tmp_path / "mnt"), check=False, timeout=60)
        assert proc.returncode != 0
        assert "not a narfs path index" in proc.stderr
        assert len(proc.stderr.splitlines()) == 1, proc.stderr


@contextmanager
def tampered_copy(server: Narfs) -> Iterator[tuple[Path, Nginx]]:
    """A copy of the server's cache, served by its own nginx, for a test to change."""
    with reachable_dir() as d, serving(d / "copy") as s:
        shutil.copytree(server.cache, d / "copy", symlinks=True,
                        ignore=shutil.ignore_patterns(".narfs"))
        world_readable(d / "copy")
        yield d / "copy", s


def _big_nar(cache: Path, big: str) -> tuple[Path, list]:
    c = Cache(str(cache))
    info = c.read_narinfo(base(big)[:32])
    nar = Path(c.nar_path(info.url))
    with open(nar, "rb") as f:
        table = read_table(f, nar.stat().st_size)
    assert table is not None
    return nar, table.frames


def test_a_changed_frame_gives_eio(tmp_path: Path, server: Narfs, paths: dict[str, str]) -> None:
    """A server that rewrites bytes of a NAR (same size, so every length check passes) is
    caught by the frame's signed hash before anything is decompressed."""
    big = paths["big"]
    with tampered_copy(server) as (cache, s):
        nar, frames = _big_nar(cache, big)
        c = client(tmp_path, server, s.url)
        with mounted(c, tmp_path / "mnt") as m:
            before = (m / base(big) / "z-after.bin").stat().st_size  # tree loaded
            middle = frames[1]  # inside a/0-before.bin
            with open(nar, "r+b") as f:
                f.seek(middle.comp_offset + middle.comp_size // 2)
                byte = f.read(1)
                f.seek(-1, os.SEEK_CUR)
                f.write(bytes([byte[0] ^ 0xFF]))
            with pytest.raises(OSError) as e:
                (m / base(big) / "a" / "0-before.bin").read_bytes()
            assert e.value.errno == errno.EIO
            wait_for(lambda: "is not the one the cache's key signed" in m.log(), 10, "the log")
            assert before == BIG // 2


def test_a_changed_listing_is_not_believed(tmp_path: Path, server: Narfs,
                                           paths: dict[str, str]) -> None:
    """A well-formed `.ls` that lies (another size and offset for a file) fails its signed
    hash; the mount builds the listing from the NAR's signed frames instead: the true bytes."""
    big = paths["big"]
    with tampered_copy(server) as (cache, s):
        ls = cache / f"{base(big)[:32]}.ls"
        doc = json.loads(ls.read_text())
        node = doc["root"]
        for part in DEEP.split("/"):
            node = node["entries"][part]
        node["size"] -= 1000
        node["narOffset"] += 1000
        ls.write_text(json.dumps(doc))
        c = client(tmp_path, server, s.url)
        with mounted(c, tmp_path / "mnt") as m:
            assert (m / base(big) / DEEP).read_bytes() == (Path(big) / DEEP).read_bytes()
            assert "not the listing the cache's key signed" in m.log()


def test_a_changed_frame_list_is_refused(tmp_path: Path, server: Narfs,
                                         paths: dict[str, str]) -> None:
    """The frame hashes themselves: rewritten by the server, their signature fails (EIO)."""
    big = paths["big"]
    with tampered_copy(server) as (cache, s):
        auth = cache / f"{base(big)[:32]}.auth"
        doc = json.loads(auth.read_text())
        doc["frames"][0][2] = doc["frames"][1][2]
        auth.write_text(json.dumps(doc))
        c = client(tmp_path, server, s.url)
        with mounted(c, tmp_path / "mnt") as m:
            with pytest.raises(OSError) as e:
                (m / base(big) / DEEP).read_bytes()
            assert e.value.errno == errno.EIO
            wait_for(lambda: "not signed by a trusted key" in m.log(), 10, "the log line")
            assert (m / base(paths["file"])).read_text() == Path(paths["file"]).read_text()


def test_without_signed_frame_hashes_the_whole_nar_is_checked(tmp_path: Path, server: Narfs,
                                                               paths: dict[str, str]) -> None:
    """A server that deletes the `.auth` files (or a cache `nix copy` wrote) cannot downgrade
    the mount to unchecked bytes: the NAR is fetched whole and held to its signed NarHash,
    and its `.ls`, which nothing signed, is not believed."""
    big, small = paths["big"], paths["rich"]
    with tampered_copy(server) as (cache, s):
        for path in (big, small):
            (cache / f"{base(path)[:32]}.auth").unlink()
        ls = cache / f"{base(small)[:32]}.ls"
        doc = json.loads(ls.read_text())
        doc["root"]["entries"]["a"], doc["root"]["entries"]["B"] = \
            doc["root"]["entries"]["B"], doc["root"]["entries"]["a"]  # swapped contents
        ls.write_text(json.dumps(doc))
        # big's narinfo points at rich's NAR: URL and FileSize are not what its key signs
        narinfos = Cache(str(cache))
        other = narinfos.read_narinfo(base(small)[:32])
        text = Path(narinfos.narinfo_path(base(big)[:32])).read_text()
        text = re.sub(r"^URL: .*$", f"URL: {other.url}", text, flags=re.M)
        text = re.sub(r"^FileSize: .*$", f"FileSize: {other.file_size}", text, flags=re.M)
        Path(narinfos.narinfo_path(base(big)[:32])).write_text(text)
        c = client(tmp_path, server, s.url)
        with mounted(c, tmp_path / "mnt") as m:
            assert (m / base(small) / "a").read_text() == "lower\n"
            assert (m / base(small) / "B").read_text() == "upper\n"
            with pytest.raises(OSError) as e:
                os.listdir(m / base(big))
            assert e.value.errno == errno.EIO
            log = m.log()
            assert "no signed frame hashes" in log and "the narinfo says" in log


def test_what_cannot_be_mounted_is_one_line(tmp_path: Path, server: Narfs, nginx: Nginx) -> None:
    """No trusted key, no server, a server that is not a narfs cache: one line naming the fix."""
    (tmp_path / "mnt").mkdir()
    bare = Narfs(tmp_path / "bare")
    bare.root.mkdir()
    bare.config.write_text("")
    bare.env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    bare.env["NIX_CONFIG"] = "trusted-public-keys ="
    err = one_line_error(bare("mount", nginx.url, str(tmp_path / "mnt"), check=False))
    assert "no trusted key" in err and "public_key" in err
    c = client(tmp_path, server, "")
    with serving(tmp_path / "nothing-here") as gone:
        url = gone.url
    err = one_line_error(c("mount", url, str(tmp_path / "mnt"), check=False))
    assert "connection refused" in err
    with tampered_copy(server) as (cache, s):
        (cache / pathindex.FILENAME).unlink()  # as a cache `nix copy` wrote
        err = one_line_error(c("mount", s.url, str(tmp_path / "mnt"), check=False))
        assert "narfs-index.zst: not found" in err



def test_background_mount_and_umount(tmp_path: Path, server: Narfs, nginx: Nginx,
                                     paths: dict[str, str]) -> None:
    """Without --foreground: the command returns once the remote mount is live; `narfs
    umount` ends it."""
    c = client(tmp_path, server, "")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        c("mount", nginx.url, str(mnt), timeout=120)
        assert (mnt / base(paths["file"])).read_text() == Path(paths["file"]).read_text()
        c("umount", str(mnt))
        wait_for(lambda: not is_mounted(mnt), 30, "the unmount")
    finally:
        unmount(mnt)


def test_credentials_from_nix_netrc_file(tmp_path: Path, server: Narfs,
                                         paths: dict[str, str]) -> None:
    """A server behind HTTP Basic authentication: the login comes from the netrc-file Nix
    uses for substituters; without one, the mount names the file to add it to."""
    with reachable_dir() as d:
        (d / "htpasswd").write_text("narfs:{PLAIN}s3cret\n")
        (d / "htpasswd").chmod(0o644)
        with serving(server.cache, f'auth_basic "archive"; auth_basic_user_file {d}/htpasswd;'
                     ) as s:
            c = client(tmp_path, server, "")
            (tmp_path / "mnt").mkdir()
            netrc = tmp_path / "netrc"
            c.env["NIX_CONFIG"] = f"netrc-file = {netrc}"
            err = one_line_error(c("mount", s.url, str(tmp_path / "mnt"), check=False))
            assert "HTTP 401" in err and "add a machine line to" in err
            netrc.write_text("machine 127.0.0.1 login narfs password wrong\n")
            err = one_line_error(c("mount", s.url, str(tmp_path / "mnt"), check=False))
            assert f"they were refused {netrc}" in err
            netrc.write_text("machine 127.0.0.1 login narfs password s3cret\n")
            with mounted(c, tmp_path / "mnt", s.url) as m:
                assert (m / base(paths["file"])).read_text() == Path(paths["file"]).read_text()


@contextmanager
def tls_serving(cache: Path) -> Iterator[tuple[Nginx, str, Path]]:
    """nginx serving `cache` over https too: a throwaway CA (made here with openssl, never
    put in the machine's CA store) signs a certificate for 127.0.0.1. Yields the server, its
    https URL and the CA's certificate (for the client's SSL_CERT_FILE)."""
    with reachable_dir() as d:
        def openssl(*args: str) -> None:
            run(["openssl", *args], cwd=d)

        # The extensions a strict verifier asks for (Python 3.13+ sets VERIFY_X509_STRICT):
        # key usage on the CA, key identifiers, the server's purpose and address.
        (d / "ca.cnf").write_text(
            "[req]\ndistinguished_name = dn\nx509_extensions = ca\nprompt = no\n"
            "[dn]\nCN = narfs test CA\n"
            "[ca]\nbasicConstraints = critical,CA:TRUE\n"
            "keyUsage = critical,keyCertSign,cRLSign\nsubjectKeyIdentifier = hash\n")
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-config",
                "ca.cnf", "-keyout", "ca.key", "-out", "ca.pem")
        (d / "ext").write_text(
            "subjectAltName = IP:127.0.0.1\nbasicConstraints = CA:FALSE\n"
            "keyUsage = critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage = serverAuth\nsubjectKeyIdentifier = hash\n"
            "authorityKeyIdentifier = keyid,issuer\n")
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
                "-keyout", "server.key", "-out", "server.csr")
        openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "2", "-extfile", "ext", "-out", "server.pem")
        port = free_port()
        # a second listen in the example's server block: the same locations, over TLS
        with serving(cache, f"listen 127.0.0.1:{port} ssl; ssl_certificate {d}/server.pem; "
                     f"ssl_certificate_key {d}/server.key;") as s:
            yield s, f"https://127.0.0.1:{port}", d / "ca.pem"


def test_https_with_the_ca_store(tmp_path: Path, server: Narfs,
                                 paths: dict[str, str]) -> None:
    """https:// verifies the server against the CA store OpenSSL uses (here extended with
    SSL_CERT_FILE, as Nix's own fetches honour it); an untrusted certificate is one line
    naming the URL and the fix."""
    with tls_serving(server.cache) as (s, url, ca):
        c = client(tmp_path, server, "")
        c.env.pop("SSL_CERT_FILE", None)
        c.env.pop("SSL_CERT_DIR", None)
        (tmp_path / "mnt").mkdir()
        try:
            err = one_line_error(c("mount", url, str(tmp_path / "mnt"), check=False))
        finally:  # a client that trusted the certificate would have mounted it
            unmount(tmp_path / "mnt")
        assert f"{url}/" in err and "certificate is not trusted" in err \
            and "SSL_CERT_FILE" in err, err
        c.env["SSL_CERT_FILE"] = str(ca)
        s.clear_log()
        with mounted(c, tmp_path / "mnt", url) as m:
            assert (m / base(paths["file"])).read_text() == Path(paths["file"]).read_text()
            assert (m / base(paths["big"]) / DEEP).read_bytes() == \
                (Path(paths["big"]) / DEEP).read_bytes()
            assert f"mounted {url}" in m.log()
        assert any(r.uri.startswith("/nar/") for r in s.requests())  # over TLS, through nginx


def test_restore_from_the_url(tmp_path: Path, server: Narfs, nginx: Nginx,
                              nixstore: NixStore) -> None:
    """`narfs restore --cache URL TARGET`: the closure comes back from the server through
    Nix, signatures checked, each NAR fetched once; a narinfo the server re-signed with an
    untrusted key is not restored."""
    chain = nixstore.closure(2, "narfs-rr")  # rr-0 ← rr-1
    top = chain[-1]
    server("archive", top)
    world_readable(server.cache)
    nixstore.unroot()
    delete_paths(chain)
    c = client(tmp_path, server, "/nonexistent")
    dry = c("restore", "--cache", nginx.url, "--dry-run", "narfs-rr-1")  # by name, as locally
    assert f"would restore {top}" in dry.stdout and f"read from {nginx.url}" in dry.stdout
    nginx.clear_log()
    out = c("restore", "--cache", nginx.url, base(top))
    run(["nix-store", "--verify-path", *chain])
    assert "restored 2 paths" in out.stdout and f"from {nginx.url}" in out.stdout, out.stdout
    nars = [r.uri for r in nginx.requests() if r.uri.startswith("/nar/")]
    assert len(nars) == len(set(nars)) == 2, nars  # each NAR once, by narfs (Nix reads it here)
    assert [p for p in (tmp_path / "xdg" / "narfs" / "remote").rglob("*")
            if "restore" in p.name] == []  # the staging cache is gone
    # the local behaviour stays: --to without Nix, from the URL too
    c("restore", "--cache", nginx.url, "--to", str(tmp_path / "tree"), chain[0])
    assert (tmp_path / "tree" / "content").read_text() == Path(chain[0], "content").read_text()
    # another key than the server's: nothing is shown, so nothing comes back
    other = Narfs(tmp_path / "other")
    other.root.mkdir()
    other("init", "--cache", str(other.cache), "--secret-key", str(other.key))
    delete_paths(chain[1:])
    (tmp_path / "o").mkdir()
    err = client(tmp_path / "o", other, nginx.url)("restore", top, check=False)
    assert err.returncode != 0 and "not archived" in err.stderr, err.stderr
    assert run(["nix-store", "--verify-path", top], check=False).returncode != 0
    c("restore", "--cache", nginx.url, top)  # back, so the fixture deletes it with its .drv


def test_a_mirror_file_cut_by_a_crash_is_fetched_again(tmp_path: Path, server: Narfs,
                                                       nginx: Nginx,
                                                       paths: dict[str, str]) -> None:
    """The client's mirror is written without fsync: a narinfo left empty by a crash (with
    the right mtime) is fetched again by the next mount, not left out for good."""
    c = client(tmp_path, server, nginx.url)
    with mounted(c, tmp_path / "mnt") as m:
        assert (m / base(paths["file"])).read_text() == Path(paths["file"]).read_text()
    mirror = next((tmp_path / "xdg" / "narfs" / "remote").iterdir())
    for suffix in (".narinfo", ".auth", ".ls"):
        cut = mirror / f"{base(paths['file'])[:32]}{suffix}"
        st = cut.stat()
        cut.write_bytes(b"")
        os.utime(cut, ns=(st.st_atime_ns, st.st_mtime_ns))
    with mounted(c, tmp_path / "mnt") as m:
        assert (m / base(paths["file"])).read_text() == Path(paths["file"]).read_text()


def test_a_cache_without_index_shows_the_store_paths_named(tmp_path: Path, server: Narfs,
                                                           paths: dict[str, str]) -> None:
    """A cache `nix copy` wrote (xz, no path index, no frame hashes): the store paths named
    on the command line, each NAR fetched whole and held to its signed NarHash."""
    rich = paths["rich"]
    with reachable_dir() as d:
        cache = d / "nixcopy"
        run([*NIX, "copy", "--to", f"file://{cache}?compression=xz&secret-key={server.key}",
             rich])
        world_readable(cache)
        with serving(cache) as s:
            c = client(tmp_path, server, "")
            (tmp_path / "mnt").mkdir(exist_ok=True)
            err = one_line_error(c("mount", s.url, str(tmp_path / "mnt"), check=False))
            assert "name the store paths to show with --path" in err
            with mounted(c, tmp_path / "mnt", "--path", rich, s.url) as m:
                assert os.listdir(m.path) == sorted([".by-name", base(rich)])
                diff = subprocess.run(["diff", "-r", "--no-dereference", rich,
                                       str(m / base(rich))], capture_output=True, text=True)
                assert diff.returncode == 0, diff.stdout + diff.stderr
                assert "no signed frame hashes" in m.log()


def test_restore_from_a_cache_without_index(tmp_path: Path, server: Narfs,
                                            nixstore: NixStore) -> None:
    """A cache `nix copy` wrote (xz, no path index, no frame hashes), served by nginx:
    `narfs restore --cache URL STOREPATH` brings back the path and the part of its closure the
    store lacks (from the narinfos' References: a path the store holds is not even asked for),
    signatures checked; a path the server lacks, or a bare name, is one line naming the URL
    and the fix."""
    chain = nixstore.closure(3, "narfs-ni")  # ni-0 ← ni-1 ← ni-2
    top = chain[-1]
    absent = nixstore.text("never copied to the server", "narfs-ni-absent")
    with reachable_dir() as d:
        cache = d / "nixcopy"
        run([*NIX, "copy", "--to", f"file://{cache}?compression=xz&secret-key={server.key}",
             top])
        assert not (cache / pathindex.FILENAME).exists()
        world_readable(cache)
        nixstore.unroot()
        delete_paths([absent, *chain[1:]])
        with serving(cache) as s:
            c = client(tmp_path, server, "/nonexistent")
            dry = c("restore", "--cache", s.url, "--dry-run", top)
            assert "would restore 2 paths" in dry.stdout, dry.stdout + dry.stderr
            s.clear_log()
            out = c("restore", "--cache", s.url, top)
            assert "restored 2 paths" in out.stdout and f"from {s.url}" in out.stdout \
                and "1 already in the store" in out.stdout, out.stdout + out.stderr
            run(["nix-store", "--verify-path", *chain])
            asked = [r.uri for r in s.requests()]
            assert f"/{base(chain[0])[:32]}.narinfo" not in asked, asked  # the store has it
            assert len([u for u in asked if u.startswith("/nar/")]) == 2, asked
            c("restore", "--cache", s.url, "--to", str(tmp_path / "tree"), chain[0])
            assert (tmp_path / "tree" / "content").read_text() == \
                Path(chain[0], "content").read_text()  # without Nix too
            assert [p for p in (tmp_path / "xdg").rglob("*") if "narinfos" in p.name
                    or "restore" in p.name] == []  # the temporary caches are gone

            err = one_line_error(c("restore", "--cache", s.url, absent, check=False))
            assert f"{absent}: not in {s.url}" in err and "check the store path" in err, err
            err = one_line_error(c("restore", "--cache", s.url, "narfs-ni-2", check=False))
            assert s.url in err and "no path index" in err and "name the store path" in err
            err = one_line_error(c("restore", "--cache", f"{s.url}/typo", top, check=False))
            assert f"{s.url}/typo: no binary cache there" in err, err
            # signed by a key narfs does not trust: refused before Nix is asked for anything
            other = Narfs(tmp_path / "other")
            other.root.mkdir()
            other("init", "--cache", str(other.cache), "--secret-key", str(other.key))
            delete_paths(chain[1:])
            (tmp_path / "o").mkdir()
            err = one_line_error(client(tmp_path / "o", other, s.url)("restore", top,
                                                                      check=False))
            assert "no valid signature" in err and s.url in err, err
            assert run(["nix-store", "--verify-path", chain[1]], check=False).returncode != 0
            c("restore", "--cache", s.url, top)  # back, so the fixture deletes it with its .drv
