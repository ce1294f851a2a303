"""Issue 2, the commands: `narfs init` and `narfs archive` as a user meets them.

Bad input gets one clear line, a non-zero exit and an untouched cache; init is idempotent and
prints working nix.conf lines; a damaged store path is refused while the rest is archived; a
SIGKILL in the middle of a large path leaves nothing a rerun trips over.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Narfs
from narfs import narinfo as narinfo_mod
from narfs.progress import human_size
from narfs.signing import generate_secret_key, load_secret_key
from nixtools import NIX, NixStore, delete_paths, nix_string, on_a_terminal, path_infos, run

TMP = ".narfs-tmp-"


def snapshot(root: Path) -> dict[str, tuple[int, int, int, int]]:
    """Every entry under `root` (root included): type, mode, size, mtime in ns."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [".", *dirnames, *filenames]:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode),
                                             st.st_size, st.st_mtime_ns)
    return out


def one_clear_line(proc: subprocess.CompletedProcess, *words: str) -> str:
    assert proc.returncode != 0, f"exit 0 for bad input:\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"want one line on stderr, got:\n{proc.stderr}"
    line = lines[0]
    assert line.startswith("narfs: error: "), line
    for w in words:
        assert w in line, f"{w!r} not in {line!r}"
    return line


def cache_is_whole(cache: Path) -> list[narinfo_mod.NarInfo]:
    """Every NAR and listing belongs to a narinfo and every narinfo's NAR exists; no temps."""
    infos = [narinfo_mod.parse(p.read_bytes(), expect_hash=p.name[:-8])
             for p in cache.glob("*.narinfo")]
    nars = {p.name for p in (cache / "nar").iterdir()}
    assert nars == {os.path.basename(i.url) for i in infos}
    assert {p.name[:-3] for p in cache.glob("*.ls")} == {i.hash for i in infos}
    leftovers = [p for d in (cache, cache / "nar") for p in d.iterdir()
                 if p.name.startswith(TMP)]
    assert not leftovers, leftovers
    return infos


@pytest.fixture(scope="module")
def small_path(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One valid salted store path shared by the bad-input tests (which never archive it)."""
    store = NixStore(tmp_path_factory.mktemp("nix"))
    try:
        yield store.text(f"bad input target {uuid.uuid4().hex}", "narfs-cli-small")
    finally:
        store.cleanup()


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("arg,words", [
    ("/tmp", ["/tmp", "not in /nix/store"]),
    ("/etc/hostname", ["/etc/hostname", "not in /nix/store"]),
    ("relative/path", ["relative/path", "not in /nix/store"]),
    ("/nix/store", ["not in /nix/store"]),
    ("/nix/store/not-a-store-path-name", ["not a valid store path name"]),
    ("/nix/store/" + "0" * 32 + "-narfs-never-built", ["0" * 32, "not a valid path"]),
])
def test_bad_store_paths_are_refused(narfs: Narfs, arg: str, words: list[str]) -> None:
    before = snapshot(narfs.cache)
    one_clear_line(narfs("archive", arg, check=False), *words)
    assert snapshot(narfs.cache) == before


def test_invalid_path_among_valid_ones_archives_nothing(narfs: Narfs, small_path: str) -> None:
    before = snapshot(narfs.cache)
    missing = "/nix/store/" + "1" * 32 + "-narfs-never-built"
    one_clear_line(narfs("archive", small_path, missing, check=False), missing)
    assert snapshot(narfs.cache) == before


def test_no_paths_is_refused(narfs: Narfs) -> None:
    one_clear_line(narfs("archive", check=False), "--all")


def test_read_only_cache_is_refused(narfs: Narfs, small_path: str) -> None:
    """Root ignores mode bits, so the cache is made read-only with a read-only bind mount."""
    before = snapshot(narfs.cache)
    run(["mount", "--bind", str(narfs.cache), str(narfs.cache)])
    try:
        run(["mount", "-o", "remount,bind,ro", str(narfs.cache)])
        probe = narfs.cache / "probe"
        with pytest.raises(OSError):  # the setup really stops root
            probe.write_text("x")
        one_clear_line(narfs("archive", small_path, check=False), str(narfs.cache),
                       "not writable")
    finally:
        run(["umount", str(narfs.cache)])
    assert snapshot(narfs.cache) == before


def test_read_only_nar_dir_is_refused(narfs: Narfs, small_path: str) -> None:
    nar_dir = narfs.cache / "nar"
    before = snapshot(narfs.cache)
    run(["mount", "--bind", str(nar_dir), str(nar_dir)])
    try:
        run(["mount", "-o", "remount,bind,ro", str(nar_dir)])
        one_clear_line(narfs("archive", small_path, check=False), str(nar_dir), "not writable")
    finally:
        run(["umount", str(nar_dir)])
    assert snapshot(narfs.cache) == before


def test_directory_that_is_not_a_cache_is_refused(narfs: Narfs, small_path: str,
                                                  tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "somebody's file").write_text("keep me\n")
    before = snapshot(plain)
    one_clear_line(narfs("archive", "--cache", str(plain), small_path, check=False),
                   str(plain), "not a binary cache", "narfs init")
    assert snapshot(plain) == before
    # A missing or empty directory becomes a cache (t6_cli_habits.py), as with nix copy.


def _key_cases(tmp_path: Path) -> dict[str, tuple[Path, list[str]]]:
    good = generate_secret_key("narfs-cli-test-1")
    world = tmp_path / "world-readable.key"
    world.write_text(good)
    world.chmod(0o644)
    group = tmp_path / "group-readable.key"
    group.write_text(good)
    group.chmod(0o640)
    malformed = tmp_path / "malformed.key"
    malformed.write_text("narfs-cli-test-1:this is not base64\n")
    malformed.chmod(0o600)
    public = tmp_path / "public-instead.key"
    public.write_text(load_secret_key_text(good))
    public.chmod(0o600)
    directory = tmp_path / "directory.key"
    directory.mkdir(mode=0o700)
    return {
        "missing": (tmp_path / "missing.key", ["missing.key", "not found"]),
        "world-readable": (world, ["world-readable.key", "readable by others", "chmod 600"]),
        "group-readable": (group, ["group-readable.key", "readable by others"]),
        "malformed": (malformed, ["malformed.key", "not a Nix secret key"]),
        "public key instead": (public, ["public-instead.key", "not a Nix secret key"]),
        "directory": (directory, ["directory.key"]),
    }


def load_secret_key_text(secret: str) -> str:
    from narfs.signing import parse_secret_key

    return parse_secret_key(secret).public.text()


@pytest.mark.parametrize("case", ["missing", "world-readable", "group-readable", "malformed",
                                  "public key instead", "directory"])
def test_bad_key_files_are_refused(narfs: Narfs, small_path: str, tmp_path: Path,
                                   case: str) -> None:
    key, words = _key_cases(tmp_path)[case]
    before = snapshot(narfs.cache)
    one_clear_line(narfs("archive", "--secret-key", str(key), small_path, check=False), *words)
    assert snapshot(narfs.cache) == before


# --- init -----------------------------------------------------------------------------------


def test_init_twice_changes_nothing_and_prints_working_nix_conf(
        tmp_path: Path, nixstore: NixStore) -> None:
    n = Narfs(tmp_path / "n")
    n.root.mkdir()
    first = n("init", "--cache", str(n.cache), "--secret-key", str(n.key))
    assert "created: binary cache" in first.stdout
    assert "created: signing key" in first.stdout
    assert stat.S_IMODE(n.key.stat().st_mode) == 0o600
    assert load_secret_key(str(n.key))  # a key narfs (and Nix, see test_formats) can use
    cache_info = (n.cache / "nix-cache-info").read_text()
    fields = dict(line.split(": ", 1) for line in cache_info.splitlines())
    assert fields["StoreDir"] == "/nix/store"
    assert fields["WantMassQuery"] == "1"
    assert int(fields["Priority"]) < 40  # cache.nixos.org's: the archive is asked first
    assert (n.cache / "nar").is_dir()

    before = snapshot(n.root)
    second = n("init", "--cache", str(n.cache), "--secret-key", str(n.key))
    assert snapshot(n.root) == before
    assert "created" not in second.stdout
    assert "unchanged: binary cache" in second.stdout
    assert "unchanged: signing key" in second.stdout

    conf = {}
    for out in (first.stdout, second.stdout):
        lines = dict(re.findall(r"^([a-z-]+) = (.*)$", out, re.M))
        assert set(lines) == {"extra-substituters", "extra-trusted-public-keys",
                              "post-build-hook"}, out
        conf = conf or lines
        assert lines == conf  # the same lines both times
    assert conf["extra-substituters"] == f"file://{n.cache}"
    assert conf["extra-trusted-public-keys"] == n.public_key
    assert os.path.isabs(conf["post-build-hook"])
    assert conf["post-build-hook"].endswith("narfs-hook")

    # The printed lines work: Nix substitutes an archived path from the cache with them,
    # signatures required.
    p = nixstore.text(f"substituted back {uuid.uuid4().hex}", "narfs-cli-subst")
    n("archive", p)
    nixstore.unroot()
    delete_paths([p])
    run(["nix-store", "--realise", p, "--option", "extra-substituters",
         conf["extra-substituters"], "--option", "extra-trusted-public-keys",
         conf["extra-trusted-public-keys"], "--option", "require-sigs", "true"])
    run(["nix-store", "--verify-path", p])


def test_init_warns_when_nix_would_misread_the_cache_path(tmp_path: Path) -> None:
    """Nix 2.8 cannot open a file:// cache with a space, 2.18+ percent-decode its path: the
    substituter line init prints would not name the cache, and init says so in one line."""
    n = Narfs(tmp_path / "n")
    n.root.mkdir()
    odd = tmp_path / "my cache 50%41"
    out = n("init", "--cache", str(odd), "--secret-key", str(n.key))
    warning = [line for line in out.stderr.splitlines() if "symlink" in line]
    assert len(warning) == 1 and str(odd) in warning[0], out.stderr
    plain = n("init", "--cache", str(n.cache), "--secret-key", str(n.key))
    assert "symlink" not in plain.stderr


def test_init_on_a_nix_copy_cache_keeps_it(tmp_path: Path, nixstore: NixStore) -> None:
    """A cache `nix copy` made is already a binary cache: init leaves its files alone."""
    p = nixstore.text("made by nix copy", "narfs-cli-nixcopy")
    cache = tmp_path / "nixcopy"
    run([*NIX, "copy", "--to", f"file://{cache}", p])
    before = {k: v for k, v in snapshot(cache).items() if k != "."}
    n = Narfs(tmp_path / "n")
    n.root.mkdir()
    out = n("init", "--cache", str(cache), "--secret-key", str(n.key))
    assert "unchanged: binary cache" in out.stdout
    after = {k: v for k, v in snapshot(cache).items() if k != "." and not k.startswith(".narfs")}
    assert after == before


# --- archive ---------------------------------------------------------------------------------

SUMMARY = re.compile(r"archived (\d+) paths: (\d+(?:\.\d)? [KMGT]?i?B) NAR → "
                     r"(\d+(?:\.\d)? [KMGT]?i?B) compressed \(ratio (\d+\.\d\d)\) in "
                     r"(\d+\.\d) s$")


def test_summary_line(narfs: Narfs, nixstore: NixStore, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "text").write_text("compressible line\n" * 50_000)
    top = nixstore.tree(src, "narfs-cli-summary", refs=nixstore.closure(2, "narfs-cli-chain"))
    t0 = time.monotonic()
    out = narfs("archive", top)
    wall = time.monotonic() - t0
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, out.stdout  # one summary line; no progress bar off a terminal
    m = SUMMARY.fullmatch(lines[0])
    assert m, lines[0]
    infos = cache_is_whole(narfs.cache)
    assert int(m[1]) == len(infos) == 3
    nar = sum(i.nar_size for i in infos)
    comp = sum(i.file_size or 0 for i in infos)
    assert m[2] == human_size(nar)
    assert m[3] == human_size(comp)
    assert m[4] == f"{comp / nar:.2f}"
    assert float(m[4]) < 0.2  # it really is compressed
    assert float(m[5]) <= wall + 0.05
    for i in infos:
        assert i.compression == "zstd" and i.url.endswith(".nar.zst")
        assert i.signed_by(load_secret_key(str(narfs.key)).public)

    again = narfs("archive", top)
    assert again.stdout.strip() == "nothing to archive: 3 paths already in the cache"


def _damage(path: str) -> str:
    """Change one byte of a file inside a store path, keeping size, mode and mtime."""
    f = os.path.join(path, "content")
    st = os.stat(f)
    os.chmod(f, 0o644)
    try:
        with open(f, "r+b") as fh:
            first = fh.read(1)
            fh.seek(0)
            fh.write(bytes([first[0] ^ 0x20]))
    finally:
        os.chmod(f, stat.S_IMODE(st.st_mode))
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    return f


def test_damaged_store_path_is_refused_and_the_rest_archived(narfs: Narfs,
                                                             nixstore: NixStore) -> None:
    healthy = nixstore.text(f"healthy {uuid.uuid4().hex}", "narfs-cli-healthy")
    damaged = nixstore.text(f"damaged {uuid.uuid4().hex}", "narfs-cli-damaged")
    try:
        _damage(damaged)
        check = run(["nix-store", "--verify-path", damaged], check=False)
        assert check.returncode != 0  # Nix agrees it is damaged
        proc = narfs("archive", damaged, healthy, check=False)
        assert proc.returncode != 0
        assert "Traceback" not in proc.stderr
        named = [line for line in proc.stderr.splitlines()
                 if line.startswith("narfs: error: ") and damaged in line]
        assert len(named) == 1, proc.stderr
        assert "damaged" in named[0]
        assert not [line for line in proc.stderr.splitlines()
                    if healthy in line and "error" in line], proc.stderr
        assert "FAILED" in proc.stdout
        infos = cache_is_whole(narfs.cache)
        assert [i.store_path for i in infos] == [healthy]
        assert not (narfs.cache / f"{damaged[11:43]}.narinfo").exists()
        assert not (narfs.cache / f"{damaged[11:43]}.ls").exists()
    finally:
        nixstore.unroot()
        delete_paths([damaged])
    nixstore.paths.remove(damaged)


def test_path_whose_reference_is_damaged_is_not_published(narfs: Narfs,
                                                          nixstore: NixStore) -> None:
    """The closure rule: a narinfo never appears before those of its references."""
    dep = nixstore.text(f"damaged dependency {uuid.uuid4().hex}", "narfs-cli-bad-dep")
    top = nixstore.text(f"needs the dependency {uuid.uuid4().hex}", "narfs-cli-top",
                        refs=[dep])
    try:
        _damage(dep)
        proc = narfs("archive", top, check=False)
        assert proc.returncode != 0
        assert "Traceback" not in proc.stderr
        errors = [line for line in proc.stderr.splitlines() if line.startswith("narfs: error: ")]
        assert len(errors) == 2, proc.stderr
        assert any(dep in line and "damaged" in line for line in errors), proc.stderr
        assert any(line.startswith(f"narfs: error: {top}:") and dep in line
                   for line in errors), proc.stderr
        assert cache_is_whole(narfs.cache) == []  # not even a NAR or listing of `top` is left
    finally:
        nixstore.unroot()
        delete_paths([top, dep])


def _large_path(nixstore: NixStore, mib: int) -> str:
    """A store path with one file of `mib` MiB of base64'd random bytes: compressible enough
    to take zstd some work, built fast by coreutils inside the builder."""
    script = (f"/usr/bin/head -c {mib * 3 // 4}M /dev/urandom | /usr/bin/base64 -w 76 "
              f"> \"$out\"")
    expr = (f"derivation {{ name = \"narfs-cli-large\"; system = builtins.currentSystem; "
            f"builder = \"/bin/sh\"; salt = {nix_string(uuid.uuid4().hex)}; "
            f"args = [ \"-c\" {nix_string(script)} ]; }}")
    return nixstore.build_expr(expr)[0]


def _wait_for(what: str, cond, timeout: float, proc: subprocess.Popen | None = None,
              interval: float = 0.001):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"narfs exited ({proc.returncode}) before {what}:\n{out}\n{err}")
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_sigkill_in_the_middle_of_a_large_path(narfs: Narfs, nixstore: NixStore) -> None:
    big = _large_path(nixstore, 200)
    assert os.path.getsize(big) > 190 << 20
    h = big[11:43]
    nar_dir = narfs.cache / "nar"

    def growing_temporary() -> Path | None:
        for p in nar_dir.iterdir():
            try:
                if p.name.startswith(TMP) and p.stat().st_size >= 8 << 20:
                    return p
            except FileNotFoundError:
                pass
        return None

    proc = narfs.popen("archive", big, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True)
    try:
        tmp = _wait_for("a growing .narfs-tmp-* file in cache/nar", growing_temporary, 60, proc)
        assert proc.poll() is None, "narfs finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert tmp.exists()  # killed mid-write: the temporary is what is left
    assert not (narfs.cache / f"{h}.narinfo").exists()
    assert list(narfs.cache.glob("*.narinfo")) == []

    again = narfs("archive", big)
    assert "archived 1 path:" in again.stdout, again.stdout
    infos = cache_is_whole(narfs.cache)  # also: no .narfs-tmp-* anywhere
    assert [i.store_path for i in infos] == [big]
    run([*NIX, "store", "verify", "--store", f"file://{narfs.cache}", "--sigs-needed", "1",
         "--trusted-public-keys", narfs.public_key, big])


def _valid_paths() -> set[str]:
    return set(path_infos("--all"))


def _failures(proc: subprocess.CompletedProcess) -> list[str]:
    return re.findall(r"^narfs: error: (/nix/store/[^:\s]+):", proc.stderr, re.M)


def test_archive_all(narfs: Narfs, nixstore: NixStore) -> None:
    """Every valid path gets archived. The store is shared with other tests running at the same
    time, so a path they delete mid-run may fail (it must then be gone) and paths they add
    between the runs may be archived by the second run; nothing else is allowed."""
    mine = nixstore.closure(2, "narfs-cli-all")
    before = _valid_paths()
    first = narfs("archive", "--all", check=False, timeout=900)
    assert "Traceback" not in first.stderr, first.stderr
    after = _valid_paths()
    vanished = before - after
    for p in _failures(first):
        assert p in vanished or p not in after, f"{p} failed though still valid:\n{first.stderr}"
    assert first.returncode == 0 or _failures(first), first.stderr
    infos = {i.store_path: i for i in cache_is_whole(narfs.cache)}
    assert set(mine) <= set(infos)
    missing = (before & after) - set(infos)
    assert not missing, f"valid paths not archived by --all: {sorted(missing)[:5]}"

    stamps = {p.name: p.stat().st_mtime_ns for p in narfs.cache.glob("*.narinfo")}
    second = narfs("archive", "--all", check=False, timeout=900)
    assert "Traceback" not in second.stderr, second.stderr
    for p in _failures(second):
        assert p not in _valid_paths(), f"{p} failed though still valid:\n{second.stderr}"
    now = {p.name: p.stat().st_mtime_ns for p in narfs.cache.glob("*.narinfo")}
    assert {k: now[k] for k in stamps} == stamps  # nothing archived twice
    if set(now) == set(stamps):
        assert second.stdout.strip().startswith("nothing to archive"), second.stdout
        assert second.returncode == 0


def test_a_terminal_gets_a_progress_bar_and_logs_get_lines(narfs: Narfs, nixstore: NixStore,
                                                           tmp_path: Path) -> None:
    """On a terminal: a progress bar, no line per path; elsewhere: one plain line per path.
    Both end with the summary line."""
    big = tmp_path / "big"
    big.mkdir()
    (big / "data").write_bytes(os.urandom(24 << 20))
    on_tty = nixstore.tree(big, "narfs-progress-tty")
    piped = nixstore.text("piped", "narfs-progress-pipe")
    # tqdm redraws at most every 0.1 s, and a fast machine writes the path in less: drawing
    # every update (tqdm's TQDM_* defaults) shows whether the bar moves within the one path.
    tty = on_a_terminal(narfs, "archive", on_tty, env={"TQDM_MININTERVAL": "0"})
    assert re.search(r"archiving: +\d+%\|", tty), f"no progress bar:\n{tty!r}"
    # One path, and yet the bar moves within it: bytes, not paths (issue 16).
    assert re.search(r"archiving: +([1-9]\d?)%\|", tty), f"0% until done:\n{tty!r}"
    assert "narfs: archived" not in tty, "per-path log lines on a terminal"
    assert "archived 1 path:" in tty
    out = narfs("archive", piped)
    assert "%|" not in out.stderr, "a progress bar drawn into a pipe"
    assert re.search(r"^narfs: archived [a-z0-9]{32}-narfs-progress-pipe \(", out.stderr, re.M)
    assert "archived 1 path:" in out.stdout
