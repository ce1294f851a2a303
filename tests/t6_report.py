"""Issue 5: `narfs ls` and `narfs status` show what is archived, what waits, what failed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from narfs.cache import Cache
from narfs.catalog import Catalog
from narfs.mounttable import narfs_mounts
from narfs.narinfo import parse as parse_narinfo
from narfs.progress import human_size
from narfs.storepath import hash_part
from nixtools import NixStore

if TYPE_CHECKING:
    from conftest import Narfs


def stamp(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def test_ls_lists_sizes_dates_and_last_access(narfs: Narfs, nixstore: NixStore) -> None:
    alpha = nixstore.text("alpha " * 5000, "narfs-report-alpha")
    beta = nixstore.text("beta", "narfs-report-beta", refs=[alpha])
    narfs("archive", beta)
    read_at = time.time() + 3 * 86400  # unmistakable in the LAST ACCESS column
    with Catalog(Cache(str(narfs.cache))) as catalog:
        catalog.sync()
        catalog.touch([hash_part(alpha)], read_at)

    out = narfs("ls").stdout.splitlines()
    assert out[0].split() == ["NAR", "COMPRESSED", "ARCHIVED", "LAST", "ACCESS", "STORE", "PATH"]
    rows = {ln.split()[-1]: ln for ln in out[1:-1]}
    assert set(rows) == {alpha, beta}
    for path, row in rows.items():
        info = parse_narinfo((narfs.cache / f"{hash_part(path)}.narinfo").read_bytes())
        assert row.startswith(f"{human_size(info.nar_size):>10} {human_size(info.file_size):>10}")
        archived = (narfs.cache / f"{hash_part(path)}.narinfo").stat().st_mtime
        assert stamp(archived) in row
    assert stamp(read_at) in rows[alpha] and stamp(read_at) not in rows[beta]
    assert out[-1].startswith("2 paths")

    sub = narfs("ls", "report-be").stdout
    assert beta in sub and alpha not in sub
    glob = narfs("ls", "*-narfs-report-alph?").stdout
    assert alpha in glob and beta not in glob
    none = narfs("ls", "no-such-thing", check=False)
    assert none.returncode == 1 and none.stderr.count("\n") == 1
    assert "no archived path matches" in none.stderr


def test_status_totals_pins_watch_and_errors(narfs: Narfs, nixstore: NixStore,
                                             tmp_path: Path) -> None:
    roots = tmp_path / "roots"
    roots.mkdir()
    config = [ln for ln in narfs.config.read_text().splitlines() if "roots_dir" not in ln]
    narfs.config.write_text("\n".join([*config, f'roots_dir = "{roots}"']) + "\n")
    a = nixstore.text("a " * 10000, "narfs-status-a")
    b = nixstore.text("b " * 10000, "narfs-status-b")
    narfs("archive", a, b)
    infos = [parse_narinfo(p.read_bytes()) for p in narfs.cache.glob("*.narinfo")]
    nar = sum(i.nar_size for i in infos)
    comp = sum(i.file_size or 0 for i in infos)
    old = time.time() - 7200
    for i, target in enumerate((a, b)):
        pin = roots / f"pin-{i}"
        pin.symlink_to(target)
        os.utime(pin, (old + i * 60, old + i * 60), follow_symlinks=False)
    # Not pins, as narfs watch sees them (watchstate.classify): not counted, however old.
    (roots / "notes.txt").write_text("a person's file\n")
    (roots / "outside").symlink_to(tmp_path)
    for bad in ("notes.txt", "outside"):
        os.utime(roots / bad, (old - 60, old - 60), follow_symlinks=False)

    out = narfs("status").stdout
    assert f"archived:     2 paths, {human_size(nar)} NAR → {human_size(comp)} compressed " \
           f"(ratio {comp / nar:.2f})" in out, out
    assert f"pins waiting: 2 (oldest pinned {stamp(old)}" in out, out
    assert "watch:        not running" in out and "last error:   none recorded" in out
    assert "mounted at:   not mounted" in out

    state = narfs.cache / ".narfs" / "watch.json"
    fake = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()", "narfs",
                             "watch"], stdin=subprocess.PIPE)
    try:
        state.write_text(json.dumps({
            "pid": fake.pid, "started": old, "queue": 3, "archived": 7,
            "last_error": "/nix/store/x: no space left on the cache's filesystem",
            "last_error_time": old + 60, "oldest_pin_time": old}))
        out = narfs("status").stdout
        assert f"watch:        running (pid {fake.pid}, since {stamp(old)}), 3 queued, " \
               "7 archived" in out, out
        assert f"last error:   {stamp(old + 60)}: /nix/store/x: no space left" in out, out
    finally:
        fake.stdin.close()
        fake.wait(timeout=10)
    out = narfs("status").stdout
    assert "watch:        not running (stale state file)" in out, out

    for garbage in ("{not json", json.dumps([1, 2]), json.dumps({"pid": "1", "queue": True})):
        state.write_text(garbage)
        res = narfs("status")
        assert "watch:        not running" in res.stdout and "Traceback" not in res.stderr

    for pin in roots.iterdir():
        pin.unlink()
    assert "pins waiting: none" in narfs("status").stdout


@pytest.mark.skipif(not Path("/dev/fuse").exists(), reason="no FUSE on this machine")
def test_status_names_live_mounts_of_this_cache(narfs: Narfs, nixstore: NixStore,
                                                tmp_path: Path) -> None:
    pytest.importorskip("narfs.mount")
    from mounting import mounted

    narfs("archive", nixstore.text("mounted", "narfs-status-mount"))
    with mounted(narfs, tmp_path / "mnt") as m:
        assert f"mounted at:   {m.path}" in narfs("status").stdout
    assert "mounted at:   not mounted" in narfs("status").stdout


def test_mount_table_parsing(tmp_path: Path) -> None:
    table = tmp_path / "mounts"
    table.write_text(
        "/dev/vda / ext4 rw,relatime 0 0\n"
        "narfs:/var/lib/narfs/cache /mnt/nar-archive fuse.narfs ro,nosuid,user_id=0 0 0\n"
        "narfs:/srv/my\\040cache /mnt/with\\040space fuse.narfs ro,user_id=0,group_id=0 0 0\n"
        "narfs:/home/eve/fake /mnt/eve fuse.narfs ro,user_id=4242,group_id=4242 0 0\n"
        "other:/x /mnt/other fuse.sshfs rw 0 0\n"
        "garbage\n")
    found = [(m.mountpoint, m.cache_dir) for m in narfs_mounts(str(table))]
    assert found == [("/mnt/nar-archive", "/var/lib/narfs/cache"),
                     ("/mnt/with space", "/srv/my cache")]
    assert narfs_mounts(str(tmp_path / "missing")) == []
    # Anybody can mount a fuse.narfs naming any cache: restore trusts only root's and its own.
    every = [m.mountpoint for m in narfs_mounts(str(table), trusted=False)]
    assert every == ["/mnt/nar-archive", "/mnt/with space", "/mnt/eve"]
