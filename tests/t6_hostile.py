"""Issue 7: a hostile or damaged cache entry never escapes, crashes or spoils the good ones.

One cache holds a real path archived by `narfs archive` and, beside it, every case of
tests/hostile.py (each signed with the cache's own key, so whatever refuses one does so because
of its content). For each case:

  (a) `narfs mount` (one mount for the module: it takes every entry in at start) leaves the
      hostile path out or answers EIO, keeps serving the good path, and stays alive;
  (b) `narfs verify` (one run over the whole cache) exits non-zero and names the hostile entry,
      never the good one;
  (c) `narfs restore --to DIR <hash>` refuses with one line and writes nothing: DIR does not
      appear, its parent is unchanged, and nothing appears where a NAR symlink pointed (/tmp);
  (d) `narfs restore <store path>` (through Nix) refuses and the path stays invalid (what a
      failed import leaves on disk is Nix's own invalid garbage; the test removes it);
  (e) no command prints a traceback (the mount's log included).

`seek-table-lies` is the one case a restore may accept: the lie is in the seek table, an index
only the mount reads; restore decompresses the frames as one stream, and what comes out is
exactly the NAR the signed NarHash names. For it, a restore must either refuse or produce that
exact tree. Known bugs in other modules are strict xfails (see KNOWN): when fixed, the test
XPASSes and fails until the marker is removed. Figures are printed at the end (-s).
"""

from __future__ import annotations

import errno
import json
import os
import re
import sqlite3
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from mounting import Mount, mounted, wait_for

from conftest import Narfs
from hostile import CASES, COMPONENTS, GOOD_TREE, plant, write_case, write_entry
from narfs import nixversions
from narfs.narinfo import parse as parse_narinfo
from narfs.signing import load_secret_key
from nixtools import NixStore, nix_version, run

SYMLINK_TARGET = Path("/tmp/owned")  # where symlink-then-dir would write through its link
ACCEPTED = {"seek-table-lies"}  # restores may succeed: the NAR itself is intact (see above)
GOOD_CONTENT = "narfs hostile good path: readable through every bad neighbour\n"

# (case, command) → the bug, for whom. Strict: a fix makes the test XPASS and fail.
KNOWN: dict[tuple[str, str], str] = {}  # (case, command) → why a known bug is tolerated


def params(command: str) -> list:
    return [pytest.param(case, marks=pytest.mark.xfail(strict=True, reason=KNOWN[case, command]))
            if (case, command) in KNOWN else case for case in CASES]


@dataclass
class Figures:
    commands: int = 0
    named: set[str] = field(default_factory=set)
    escapes: list[str] = field(default_factory=list)
    tracebacks: list[str] = field(default_factory=list)


@dataclass
class Hostile:
    narfs: Narfs
    good: str  # store path, archived by narfs
    cases: dict[str, str]  # case → the store path its narinfo claims
    figures: Figures

    def __call__(self, *args: str) -> subprocess.CompletedProcess:
        """Run narfs; a traceback is recorded here and failed by `no_traceback` once the
        test has looked for escapes (which count whatever else went wrong)."""
        self.figures.commands += 1
        proc = self.narfs(*args, check=False, timeout=120)
        if "Traceback" in proc.stdout + proc.stderr:
            self.figures.tracebacks.append(f"narfs {' '.join(args)}")
        return proc


def no_traceback(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stdout + proc.stderr, f"{proc.args}:\n{proc.stderr}"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    store = NixStore(tmp_path_factory.mktemp("nix"))
    figures = Figures()
    try:
        good = store.text(GOOD_CONTENT, "narfs-hostile-good")
        n = Narfs(tmp_path_factory.mktemp("narfs"))
        n("init", "--cache", str(n.cache), "--secret-key", str(n.key))
        n("archive", good)
        key = load_secret_key(str(n.key))
        cases = {case: write_case(n.cache, key, case) for case in CASES}
        yield Hostile(n, good, cases, figures)
    finally:
        store.cleanup()
    print(f"\n[hostile] cases {len(CASES)}; commands run {figures.commands}; entries named by "
          f"verify {len(figures.named)}/{len(CASES)}; escapes {len(figures.escapes)}; "
          f"tracebacks {len(figures.tracebacks)}"
          + "".join(f"\n  escape: {e}" for e in figures.escapes)
          + "".join(f"\n  traceback: {t}" for t in figures.tracebacks))


@pytest.fixture(scope="module")
def mount(hostile: Hostile, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    hostile.figures.commands += 1
    with mounted(hostile.narfs, tmp_path_factory.mktemp("mnt") / "mnt") as m:
        yield m
    assert "Traceback" not in m.log(), m.log()


@pytest.fixture(scope="module")
def verified(hostile: Hostile) -> subprocess.CompletedProcess:
    proc = hostile("verify")
    no_traceback(proc)
    return proc


def snapshot(root: Path) -> dict[str, tuple[int, int, int, int]]:
    """Every entry under `root` (type, mode, size, mtime) but `root` itself, whose mtime a
    refused unpack's temporary directory (made and removed beside DIR) changes. Iterative:
    what a hostile NAR leaves may be deeper than Python's recursion limit (os.walk's too)."""
    out = {}
    todo = [""]
    while todo:
        rel = todo.pop()
        with os.scandir(root / rel) as it:
            for entry in it:
                st = entry.stat(follow_symlinks=False)
                path = os.path.join(rel, entry.name)
                out[path] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_size,
                             st.st_mtime_ns)
                if entry.is_dir(follow_symlinks=False):
                    todo.append(path)
    return out


def base(path: str) -> str:
    return os.path.basename(path)


def serves_the_good_path(m: Mount, hostile: Hostile) -> None:
    assert m.alive(), m.log()
    assert base(hostile.good) in os.listdir(m.path)
    assert (m / base(hostile.good) / "content").read_text() == GOOD_CONTENT


def escaped(what: str, hostile: Hostile) -> None:
    hostile.figures.escapes.append(what)
    raise AssertionError(f"escape: {what}")


def refused(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0, f"accepted:\n{proc.stdout}\n{proc.stderr}"
    no_traceback(proc)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"want one line on stderr, got:\n{proc.stderr}"
    assert lines[0].startswith("narfs: error: "), lines[0]
    return lines[0]


# --- (a) the mount ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", params("mount"))
def test_mount_leaves_it_out_and_serves_the_rest(mount: Mount, hostile: Hostile,
                                                 case: str) -> None:
    name = base(hostile.cases[case])
    serves_the_good_path(mount, hostile)
    assert name not in os.listdir(mount.path), f"{case}: listed in the mount's root"
    with pytest.raises(OSError) as e:
        os.lstat(mount / name)
    assert e.value.errno in (errno.EIO, errno.ENOENT), e.value
    with pytest.raises(OSError) as e:
        os.listdir(mount / name)
    assert e.value.errno in (errno.EIO, errno.ENOENT), e.value
    serves_the_good_path(mount, hostile)
    assert not SYMLINK_TARGET.exists()
    assert "Traceback" not in mount.log(), mount.log()


# --- (b) verify -------------------------------------------------------------------------------


def test_verify_exits_non_zero_and_spares_the_good_path(verified: subprocess.CompletedProcess,
                                                        hostile: Hostile) -> None:
    assert verified.returncode != 0, verified.stdout
    h = base(hostile.good)[:32]
    named = [line for line in verified.stdout.splitlines() if h in line]
    assert not named, f"verify names the good path:\n{named}"


@pytest.mark.parametrize("case", params("verify"))
def test_verify_names_it(verified: subprocess.CompletedProcess, hostile: Hostile,
                         case: str) -> None:
    h = base(hostile.cases[case])[:32]
    lines = [line for line in verified.stdout.splitlines() if h in line]
    assert lines, f"{case} ({h}) not named by narfs verify:\n{verified.stdout}"
    hostile.figures.named.add(case)


# --- (c) restore --to -------------------------------------------------------------------------


def the_good_tree(root: Path) -> bool:
    """Exactly hostile.GOOD_TREE: bin/tool (executable), readme."""
    return (sorted(str(p.relative_to(root)) for p in root.rglob("*")) == ["bin", "bin/tool",
                                                                           "readme"]
            and (root / "bin" / "tool").read_bytes() == b"#!/bin/sh\n"
            and os.access(root / "bin" / "tool", os.X_OK)
            and (root / "readme").read_bytes() == b"good data\n")


@pytest.mark.parametrize("case", params("restore-to"))
def test_restore_to_refuses_and_writes_nothing(hostile: Hostile, case: str,
                                               tmp_path: Path) -> None:
    parent = tmp_path / "parent"
    parent.mkdir()
    (parent / "neighbour").write_text("untouched\n")
    dest = parent / "out"
    before = snapshot(parent)
    try:
        proc = hostile("restore", "--to", str(dest), base(hostile.cases[case])[:32])
        if SYMLINK_TARGET.exists():
            escaped(f"{case}: restore --to created {SYMLINK_TARGET}", hostile)
        if case in ACCEPTED and proc.returncode == 0:
            no_traceback(proc)
            assert the_good_tree(dest), f"{case}: restored, but not the signed tree"
            return
        changed = {k for k, v in snapshot(parent).items() if before.get(k) != v}
        changed |= set(before) - set(snapshot(parent))
        outside = sorted(k for k in changed if k != dest.name and not k.startswith("out/"))
        if outside:
            escaped(f"{case}: restore --to left {outside[:2]} in {parent}", hostile)
        refused(proc)
        assert not os.path.lexists(dest), f"{case}: refused, yet {dest} was written"
    finally:
        # `rm -rf`, not shutil.rmtree: a tree left 1024 levels deep defeats Python's recursion.
        subprocess.run(["rm", "-rf", str(parent)], check=False)


# --- (d) restore through Nix ------------------------------------------------------------------


def valid(path: str) -> bool:
    return run(["nix-store", "--check-validity", path], check=False).returncode == 0


def forget(path: str) -> None:
    """Undo whatever a restore left of `path`: delete it if valid; else remove what Nix 2.8
    leaves of a failed import (the partial, invalid tree and its `.lock`), as its GC would."""
    if valid(path):
        run(["nix-store", "--delete", path], check=False)
    for p in (path, path + ".lock"):
        if os.path.lexists(p):
            subprocess.run(["chmod", "-R", "u+w", p], check=False, capture_output=True)
            subprocess.run(["rm", "-rf", p], check=False)


@pytest.mark.parametrize("case", params("restore"))
def test_restore_through_nix_refuses_and_leaves_the_store(hostile: Hostile, case: str) -> None:
    path = hostile.cases[case]
    assert not valid(path) and not os.path.lexists(path)
    try:
        proc = hostile("restore", path)
        if SYMLINK_TARGET.exists():
            escaped(f"{case}: restore created {SYMLINK_TARGET}", hostile)
        if case in ACCEPTED and proc.returncode == 0:
            no_traceback(proc)
            assert run(["nix-store", "--verify-path", path], check=False).returncode == 0
            assert the_good_tree(Path(path))
            return
        if valid(path):
            escaped(f"{case}: {path} became a valid store path", hostile)
        # Nix's own error may span lines (its "specified:/got:" hashes): only the first is ours.
        assert proc.returncode != 0, f"accepted:\n{proc.stdout}\n{proc.stderr}"
        no_traceback(proc)
        assert proc.stderr.startswith("narfs: error: "), proc.stderr
    finally:
        forget(path)


# --- (e) and the end --------------------------------------------------------------------------


def test_the_mount_outlived_every_case(mount: Mount, hostile: Hostile) -> None:
    """Last in the module: every case was looked at through the mount, and it is still up."""
    for name in os.listdir(mount.path):
        if name != ".by-name":
            os.listdir(mount / name)  # every path it lists can be listed
    serves_the_good_path(mount, hostile)
    assert "Traceback" not in mount.log(), mount.log()


# --- a damaged catalog --------------------------------------------------------------------------


def test_damaged_catalog_values_crash_nothing(narfs: Narfs, nixstore: NixStore,
                                              tmp_path: Path) -> None:
    """The catalog is derived data in the cache dir, so it is read as untrusted too: values of
    the wrong shape (another version's, or damaged) cost neither the mount nor a command; the
    first sync rewrites them from the narinfos (catalog.Entry.load, _decode, _top_ok, _time)."""
    p = nixstore.text("first path\n", "narfs-catalog-a")
    q = nixstore.text("second path\n", "narfs-catalog-b")
    narfs("archive", p, q)
    narfs("ls")  # creates and fills the catalog
    hp, hq = base(p)[:32], base(q)[:32]
    db = sqlite3.connect(narfs.cache / ".narfs" / "catalog.sqlite")
    try:
        entry = json.loads(db.execute("SELECT value FROM paths WHERE key=?", (hp,)).fetchone()[0])
        entry["added_by_a_newer_narfs"] = True  # same mtime: a sync alone would not look again
        for table, key, value in [
                ("paths", hp, json.dumps(entry)),
                ("paths", hq, "{not json"),
                ("tops", hp, json.dumps(["x", -1])),
                ("tops", hq, "garbage"),
                ("access", hp, json.dumps("tomorrow")),
                ("listings", hq, json.dumps([1, 2]))]:
            db.execute(f"INSERT OR REPLACE INTO {table} (key, value) VALUES (?, ?)", (key, value))
        db.commit()
    finally:
        db.close()

    with mounted(narfs, tmp_path / "mnt") as m:
        wait_for(lambda: {base(p), base(q)} <= set(os.listdir(m.path)), 20,
                 "both paths in the mount")
        assert (m / base(p) / "content").read_text() == "first path\n"
        assert (m / base(q) / "content").read_text() == "second path\n"
        assert m.alive(), m.log()
    assert "Traceback" not in m.log(), m.log()
    for args in (["ls"], ["status"], ["gc", "--dry-run", "--older-than", "0s"],
                 ["restore", "--dry-run", p], ["verify"]):
        proc = narfs(*args, check=False)
        assert "Traceback" not in proc.stdout + proc.stderr, f"narfs {args}:\n{proc.stderr}"
        assert proc.returncode == 0, f"narfs {args}:\n{proc.stdout}\n{proc.stderr}"
        if args == ["ls"]:
            assert p in proc.stdout and q in proc.stdout, proc.stdout


# --- components that are symlinks, FIFOs, sockets or devices (issue 11) -----------------------


def one_line_or_success(proc: subprocess.CompletedProcess) -> None:
    no_traceback(proc)
    if proc.returncode != 0 and not re.search(r" problems?; ", proc.stdout):  # verify's verdict
        lines = proc.stderr.strip().splitlines()
        assert lines and lines[-1].startswith("narfs: error: "), (proc.args, proc.stderr)


ENTRY_PARTS = ("{narinfo}", "{ls}", "{nar}")
GROUPS = [[c] for c in COMPONENTS if c[0] not in ENTRY_PARTS] + [
    [c for c in COMPONENTS if c[0] in ENTRY_PARTS]]  # one bad entry each, in one cache


@pytest.mark.parametrize("group", GROUPS,
                         ids=["+".join(f"{c}={k}" for c, k in g) if len(g) == 1 else "entries"
                              for g in GROUPS])
def test_a_component_that_is_not_what_it_seems(narfs: Narfs, tmp_path: Path,
                                               group: list[tuple[str, str]]) -> None:
    """Nothing outside the cache is written, appended to or deleted through it, no command
    hangs on it (a hang is a timeout here), none prints a traceback, and verify names it.
    The narinfo, listing and NAR cases each spoil their own entry, all in one cache."""
    from narfs.cache import Cache
    from narfs.catalog import Catalog

    key = load_secret_key(str(narfs.key))
    write_entry(narfs.cache, key, GOOD_TREE, "hostile-good")
    outside = tmp_path / "outside"
    outside.mkdir()
    planted, bad = [], []
    for i, (component, kind) in enumerate(group):
        data = GOOD_TREE.replace(b"good data", f"entr {i:04}".encode())  # same length
        p = write_entry(narfs.cache, key, data, f"hostile-{i}")
        h = base(p)[:32]
        url = parse_narinfo((narfs.cache / f"{h}.narinfo").read_bytes()).url
        if i == 0:
            with Catalog(Cache(str(narfs.cache))) as catalog:  # the catalog exists
                catalog.sync()
            (narfs.cache / ".narfs" / "watch.json").write_text("{}")
            (narfs.cache / ".narfs" / "mount.log").write_text("")
            for d in ("trees", "hot"):
                (narfs.cache / ".narfs" / d).mkdir(exist_ok=True)
        where = outside / str(i)
        where.mkdir()
        planted.append(plant(narfs.cache, component, kind, where,
                             {"narinfo": f"{h}.narinfo", "ls": f"{h}.ls", "nar": url}))
        bad.append(h)
        if component in ("nar", ".narfs"):  # what a writer or --repair might clear away
            (where / component / ".narfs-tmp-decoy").write_bytes(b"not the cache's\n")
            (where / component / ("0" * 52 + ".nar")).write_bytes(b"not the cache's\n")
    before = snapshot(outside)

    first = narfs("verify", check=False, timeout=60)
    one_line_or_success(first)
    for (component, _), path in zip(group, planted, strict=True):
        # Named: as a problem (exit 1), or, for the catalog (derived), as removed and rebuilt.
        assert str(path) in first.stdout + first.stderr, first.stdout + first.stderr
        assert first.returncode != 0 or "catalog.sqlite" in component
    restores = [["restore", "--to", str(tmp_path / f"to-{h}"), h] for h in bad]
    for args in (["status"], ["gc", "--older-than", "1d"], *restores, ["verify", "--repair"]):
        one_line_or_success(narfs(*args, check=False, timeout=60))
    assert snapshot(outside) == before


def test_deep_trees_mount_and_verify(narfs: Narfs, tmp_path: Path) -> None:
    """Issue 11: a valid NAR a few hundred directories deep (Nix 2.26 makes them; 2.34 stops
    at 64) once ended the mount at start (json cannot nest its listing); up to nar.MAX_DEPTH
    it mounts, reads and verifies, and archive-side listings simply leave it out."""
    from hostile import _deep

    key = load_secret_key(str(narfs.key))
    deep = {n: write_entry(narfs.cache, key, _deep(n), f"hostile-deep-{n}") for n in (300, 1000)}
    out = narfs("verify").stdout.splitlines()
    assert out[-1].startswith("healthy: 2 entries"), out
    # Nix 2.34 could not restore these: verify says so, and still calls them healthy.
    limited = nixversions.restore_depth_limit(nix_version()) is not None
    assert len([line for line in out if line.startswith("warning:")]) == (2 if limited else 0)
    with mounted(narfs, tmp_path / "mnt") as m:
        for n, p in deep.items():
            leaf = Path(m.path, base(p), *["d"] * n)
            assert leaf.read_bytes() == b"bottom"
        wait_for(lambda: "learnt the top nodes" in m.log(), 10, "the tops filled")
        assert m.alive(), m.log()
    assert "Traceback" not in m.log(), m.log()


@pytest.mark.parametrize("line", [
    "zstd_level = 99", "zstd_level = -1", "jobs = -3", "frame_cache_mb = 0",
    f"frame_cache_mb = {'9' * 300}", "hot_tier_mb = -1", "parallel_paths = 0",
    f"frame_size = {'9' * 300}", "frame_size = -4096"])
def test_absurd_numbers_in_the_config_are_one_line(narfs: Narfs, line: str) -> None:
    narfs.config.write_text(narfs.config.read_text() + line + "\n")
    key = line.split()[0]
    msg = refused(narfs("status", check=False))
    assert key in msg and "out of range" in msg, msg


MOUNT_COMPONENTS = [("{nar}", "fifo"), ("{nar}", "dev-zero"), ("{narinfo}", "fifo"),
                    ("{ls}", "fifo"), ("nar", "outside-dir"), (".narfs/trees", "outside-dir"),
                    (".narfs/hot", "outside-dir"), (".narfs/catalog.sqlite", "outside-file")]


@pytest.mark.parametrize(("component", "kind"), MOUNT_COMPONENTS,
                         ids=[f"{c}={k}" for c, k in MOUNT_COMPONENTS])
def test_the_mount_and_a_component_that_is_not_what_it_seems(
        narfs: Narfs, tmp_path: Path, component: str, kind: str) -> None:
    """The mount either serves the good entry (the bad one answers an error, never hangs) or
    refuses to start with one line; nothing outside the cache changes."""
    key = load_secret_key(str(narfs.key))
    good = write_entry(narfs.cache, key, GOOD_TREE, "hostile-good")
    bad = write_entry(narfs.cache, key, GOOD_TREE + b"", "hostile-bad")
    hb = base(bad)[:32]
    url = parse_narinfo((narfs.cache / f"{hb}.narinfo").read_bytes()).url
    if url == parse_narinfo((narfs.cache / f"{base(good)[:32]}.narinfo").read_bytes()).url:
        good = write_entry(narfs.cache, key, GOOD_TREE.replace(b"good data", b"good text"),
                           "hostile-good")
    narfs("ls")
    for d in ("trees", "hot"):
        (narfs.cache / ".narfs" / d).mkdir(exist_ok=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    plant(narfs.cache, component, kind, outside,
          {"narinfo": f"{hb}.narinfo", "ls": f"{hb}.ls", "nar": url})
    before = snapshot(outside)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if component in (".narfs/trees", ".narfs/hot"):  # refused at start, in one line
        proc = narfs("mount", str(mnt), check=False, timeout=60)
        assert proc.returncode == 1 and component.split("/")[1] in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and not os.path.ismount(mnt)
    else:
        with mounted(narfs, mnt) as m:
            names = os.listdir(m.path)
            if base(good) in names and component != "nar":
                assert (m / base(good) / "readme").read_bytes() in (b"good data\n",
                                                                    b"good text\n")
            if base(bad) in names:  # an error, not a hang: `timeout` ends a stuck read
                read = subprocess.run(["timeout", "20", "cat", str(m / base(bad) / "readme")],
                                      capture_output=True)
                assert read.returncode not in (124, 137), "a read hung on it"
            assert m.alive(), m.log()
        assert "Traceback" not in m.log(), m.log()
    assert snapshot(outside) == before


def test_verify_checks_the_mounts_tree_files(narfs: Narfs, tmp_path: Path) -> None:
    """Derived state is as untrusted as the rest: a tree file the mount wrote passes, one
    whose offsets were changed (its header still names the NAR, so the mount would trust it)
    is named, and --repair removes it."""
    from hostile import nar, node_dir, node_file

    key = load_secret_key(str(narfs.key))
    files = [(f"f{i:04}".encode(), node_file(f"file {i}\n".encode())) for i in range(1100)]
    p = write_entry(narfs.cache, key, nar(node_dir(files)), "hostile-many")
    with mounted(narfs, tmp_path / "mnt") as m:
        assert (m / base(p) / "f0007").read_text() == "file 7\n"
    tree = narfs.cache / ".narfs" / "trees" / f"{base(p)[:32]}.tree"
    assert tree.is_file()
    out = narfs("verify").stdout
    assert out.startswith("healthy: 1 entry,"), out

    data = bytearray(tree.read_bytes())
    n = 1101  # nodes: the root and its files
    offsets = data.index(b"\n") + 1 + n + n * 8  # after the header, kinds (u8), sizes (u64)
    data[offsets + 8 * 7] ^= 0x08  # f0006's contents now start 8 bytes off
    tree.write_bytes(bytes(data))
    res = narfs("verify", check=False)
    assert res.returncode == 1
    assert any("tree file disagrees with its NAR" in ln
               for ln in res.stdout.splitlines() if ln.startswith(f"{tree}: ")), res.stdout
    assert f"repair: removed {tree}" in narfs("verify", "--repair").stdout
    assert narfs("verify").stdout.startswith("healthy: 1 entry,")
