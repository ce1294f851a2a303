"""Issue 16: the habits Nix and shell users bring, against real Nix and a real mount."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import Narfs
from narfs.storepath import GC_ROOTS_DIR
from nixtools import NixStore, delete_paths, gc_roots, nobody_narfs, one_line_error, run


def test_archive_into_a_missing_or_empty_dir_makes_the_cache(narfs: Narfs,
                                                            nixstore: NixStore,
                                                            tmp_path: Path) -> None:
    """As `nix copy --to file://DIR` does; a non-empty directory that is no cache is refused
    and left as it was."""
    top = nixstore.text("into a new cache", "narfs-new-cache")
    for cache in (tmp_path / "missing" / "cache", tmp_path / "empty"):
        if cache.name == "empty":
            cache.mkdir()
        out = narfs("archive", "--cache", str(cache), top)
        assert "archived 1 path:" in out.stdout, out.stdout + out.stderr
        assert (cache / "nix-cache-info").read_text().startswith("StoreDir: /nix/store")
        run(["nix", "--extra-experimental-features", "nix-command", "path-info", "--store",
             f"file://{cache}", top])
    other = tmp_path / "photos"
    other.mkdir()
    (other / "IMG_0001.jpg").write_bytes(b"not a cache")
    err = one_line_error(narfs("archive", "--cache", str(other), top, check=False))
    assert f"{other}: not a binary cache" in err
    assert os.listdir(other) == ["IMG_0001.jpg"]


def test_ls_patterns_and_restore_suggestions(narfs: Narfs, nixstore: NixStore) -> None:
    a = nixstore.text("one", "narfs-habit-2.1")
    b = nixstore.text("two", "narfs-habit-2.10")
    c = nixstore.text("three", "narfs-other-1.0")
    narfs("archive", a, b, c)

    def listed(pattern: str) -> set[str]:
        lines = narfs("ls", pattern).stdout.splitlines()
        return {line.split()[-1] for line in lines[1:-1]}

    assert listed("narfs-habit-*") == {a, b}  # against the name, as a shell user types it
    assert listed("*-2.1?") == {b}
    assert listed("narfs-[ho]*-1.0") == {c}
    assert listed(f"{os.path.dirname(a)}/*-narfs-habit-2.1") == {a}  # a store path glob
    assert listed("habit") == {a, b}  # a plain word: a substring
    assert narfs("ls", "narfs-other-1.0").stdout.splitlines()[-1].startswith("1 path,")
    err = one_line_error(narfs("ls", "nothing-*", check=False))
    assert "no archived path matches" in err

    # A name without its version: did you mean (both versions named, newest-looking first).
    err = one_line_error(narfs("restore", "--dry-run", "narfs-habit", check=False))
    assert "did you mean narfs-habit-2.10 or narfs-habit-2.1?" in err
    # A typo.
    err = one_line_error(narfs("restore", "--dry-run", "narfs-otehr-1.0", check=False))
    assert "did you mean narfs-other-1.0?" in err
    # Nothing close: no guess.
    err = one_line_error(narfs("restore", "--dry-run", "zzzzzz", check=False))
    assert "did you mean" not in err and "narfs ls" in err


def test_status_counts_only_pins(narfs: Narfs, nixstore: NixStore, tmp_path: Path) -> None:
    roots = tmp_path / "roots"
    roots.mkdir()
    lines = [x for x in narfs.config.read_text().splitlines() if not x.startswith("roots_dir")]
    narfs.config.write_text("\n".join([*lines, f'roots_dir = "{roots}"', ""]))
    top = nixstore.text("pinned", "narfs-pinned")
    (roots / os.path.basename(top)).symlink_to(top)
    (roots / "elsewhere").symlink_to("/etc/hostname")  # a link, but no pin
    (roots / "notes.txt").write_text("a file\n")
    out = narfs("status").stdout
    assert "pins waiting: 1 (oldest pinned" in out, out


def test_restore_through_by_name_and_an_out_link(narfs: Narfs, nixstore: NixStore,
                                                 tmp_path: Path) -> None:
    from mounting import mounted

    top = nixstore.text("found by name\n", "narfs-by-name-1.0")
    work = tmp_path / "work"
    work.mkdir()
    link = work / "result"
    link.symlink_to(top)
    narfs("archive", top)
    nixstore.unroot()
    delete_paths([top])

    # A file reached through .by-name/<name>/latest restores like one reached by hash.
    with mounted(narfs, tmp_path / "mnt") as m:
        inside = m / ".by-name" / "narfs-by-name-1.0" / "latest" / "content"
        assert inside.read_text() == "found by name\n"
        dry = narfs("restore", "--dry-run", str(inside))
        assert f"would restore {top}" in dry.stdout, dry.stdout + dry.stderr
        versions = [v for v in os.listdir(m / ".by-name" / "narfs-by-name-1.0") if v != "latest"]
        dry = narfs("restore", "--dry-run", str(m / ".by-name" / "narfs-by-name-1.0" /
                                               versions[0]))
        assert f"would restore {top}" in dry.stdout, dry.stdout + dry.stderr

    # ./result, dangling after the GC: restored, and a GC root again as nix-build left it.
    back = narfs("restore", "result", cwd=str(work))
    assert f"restored {top}" in back.stdout and f"GC root {link}" in back.stdout, back.stdout
    try:
        assert gc_roots().get(str(link)) == top
        dead = run(["nix-store", "--delete", top], check=False)
        assert dead.returncode != 0 and os.path.exists(top)  # alive: rooted by ./result
    finally:
        link.unlink()
        nixstore.paths.append(top)


def test_watch_warns_about_roots_that_are_no_gc_roots_and_refuses_a_second(
        narfs: Narfs, tmp_path: Path) -> None:
    roots = tmp_path / "roots"
    first = narfs.popen("watch", "--roots", str(roots), stderr=subprocess.PIPE, text=True)
    try:
        lock = narfs.cache / ".narfs" / "watch.json"
        deadline = time.monotonic() + 30
        while not lock.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lock.exists(), "the first watch never wrote its state"
        second = narfs("watch", "--roots", str(tmp_path / "other"), check=False)
        err = one_line_error(second)  # refused before anything else: its only line
        assert "refused: another narfs watch is already archiving" in err
    finally:
        first.terminate()
        _, first_err = first.communicate(timeout=30)
    assert first_err.splitlines()[0] == (
        f"narfs: {roots}: not under {GC_ROOTS_DIR}, so its pins are not GC roots: Nix may "
        f"collect a build before it is archived; use a directory under {GC_ROOTS_DIR} (the "
        f"default is {GC_ROOTS_DIR}/narfs)"), first_err


def test_restore_as_a_user_who_cannot_write_the_store() -> None:
    """Single-user Nix, no daemon: a non-root user is told restore needs root or the daemon
    (not a Nix permission error about a lock file)."""
    if os.path.exists("/nix/var/nix/daemon-socket/socket"):
        pytest.skip("a nix-daemon runs here: non-root users can restore through it")
    with nobody_narfs() as n:
        env = {k: v for k, v in n.env.items() if k != "NIX_REMOTE"}
        proc = subprocess.run(
            ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups",
             sys.executable, "-m", "narfs.cli", "restore", "anything"],
            capture_output=True, text=True, env={**env, "HOME": "/"}, cwd="/", timeout=60)
        err = one_line_error(proc)
        assert "only root can" in err and "nix-daemon" in err and "--to" in err


def test_latest_is_the_newest_archived_then_the_later_write(narfs: Narfs, nixstore: NixStore,
                                                            tmp_path: Path) -> None:
    """`.by-name/<name>/latest` and `restore NAME` agree: the latest archive time (narinfo
    mtime) wins; at equal archive times the narinfo written last (here: touched last)."""
    from mounting import mounted

    a = nixstore.text("first", "narfs-tie-1.0")
    b = nixstore.text("second", "narfs-tie-1.0")
    narfs("archive", a, b)
    narinfo = {p: narfs.cache / f"{os.path.basename(p)[:32]}.narinfo" for p in (a, b)}

    def stamp(*order: tuple[str, float]) -> None:
        for p, t in order:  # each utime also sets the narinfo's ctime: a write, in order
            os.utime(narinfo[p], (t, t))
            time.sleep(0.02)  # past the kernel's timestamp granularity

    def latest() -> str:
        narfs("ls")  # the catalog in step with the new times before the mount starts from it
        with mounted(narfs, tmp_path / "mnt") as m:
            link = os.readlink(m / ".by-name" / "narfs-tie-1.0" / "latest")
        told = narfs("restore", "--dry-run", "narfs-tie-1.0").stderr
        assert f"restoring the newest, {os.path.dirname(a)}/{os.path.basename(link)} " in told
        return os.path.join(os.path.dirname(a), os.path.basename(link))

    t = 1.8e9
    stamp((a, t + 60), (b, t))  # b written later, but a archived later
    assert latest() == a
    stamp((a, t), (b, t))  # a tie: the later write
    assert latest() == b
    stamp((b, t), (a, t))
    assert latest() == a
