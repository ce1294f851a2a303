"""Issue 7: kill -9 at random instants of `narfs archive` and `narfs watch`; nothing is lost.

One closure (a chain of small paths, three paths of 16 MiB, a top referring to all) is built
once. The cache is set to 256 KiB frames, so a big path is 64 frames and its NAR is written over
tens of milliseconds, and the closure spans two commit batches (BATCH_BYTES), so a kill can also
land between two commits. Each test first times one uninterrupted run, then loops: start the
command, wait a delay drawn from a seeded RNG over that duration (a deliberate random instant,
not a wait for an event), SIGKILL, and check the invariants on disk (`Invariants.check`):

- every narinfo parses, is signed by the cache's key, its `.ls` is there and parses, its NAR
  exists with FileSize and FileHash, and decompresses to NarSize bytes hashing to NarHash;
- every reference of a published narinfo is published (closures complete);
- watch: a pin is gone only if the whole closure of its path is published.

A run that finishes before its kill resumes nothing; when the cache holds everything it is
emptied (temporaries kept) so the next run has work again. At the end one uninterrupted run
completes, no `.narfs-tmp-*` is left anywhere under the cache, and `nix store verify` accepts
the closure with our key. Figures are printed (run with -s to see them).

Also here: `narfs archive` into a full disk (a small tmpfs), then resuming once there is space.
Read-only caches are in tests/t4_archive_cli.py, the service's disk-full and read-only cases in
tests/t4_watch.py.

Seed and counts: NARFS_CRASH_SEED, NARFS_CRASH_ARCHIVE_KILLS, NARFS_CRASH_WATCH_KILLS.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import zstandard

from conftest import Narfs
from narfs import narinfo as narinfo_mod
from narfs import nix32
from narfs.signing import PublicKey, load_secret_key
from nixtools import NIX, NixStore, nix_string, run

TMP = ".narfs-tmp-"
GCROOTS = Path("/nix/var/nix/gcroots")
SEED = int(os.environ.get("NARFS_CRASH_SEED", "20240607"))
ARCHIVE_KILLS = int(os.environ.get("NARFS_CRASH_ARCHIVE_KILLS", "60"))
WATCH_KILLS = int(os.environ.get("NARFS_CRASH_WATCH_KILLS", "50"))
FRAME = 256 << 10
LEVEL = 10  # zstd level: slower writes, a wider middle, for no more bytes to check
BIG_MIB = 16
SPREAD = 1.0  # instants are drawn from [0, SPREAD × one uninterrupted run]

pytestmark = pytest.mark.skipif(shutil.which("nix-build") is None, reason="needs Nix")


# --- the closure --------------------------------------------------------------------------------


@dataclass
class Closure:
    top: str
    paths: list[str]  # every path of the closure
    closures: dict[str, set[str]]  # path → hashes of its closure (itself included)


def _big(store: NixStore, name: str, mib: int) -> str:
    """A path holding `mib` MiB of base64'd noise (compresses to ~75%: real work for zstd)."""
    script = (f'mkdir "$out" && head -c {mib * 3 // 4}M /dev/urandom | base64 -w 76 '
              f'> "$out/big" && echo small > "$out/small"')
    return store.build_expr(
        f"derivation {{ name = {nix_string(name)}; system = builtins.currentSystem; "
        f"builder = \"/bin/sh\"; PATH = \"/usr/bin:/bin\"; salt = \"{uuid.uuid4().hex}\"; "
        f"args = [ \"-c\" {nix_string(script)} ]; }}")[0]


@pytest.fixture(scope="module")
def closure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Closure]:
    store = NixStore(tmp_path_factory.mktemp("nix"))
    try:
        chain = store.closure(3, "narfs-crash-chain")
        bigs = [_big(store, f"narfs-crash-big{i}", BIG_MIB) for i in range(3)]
        top = store.text("top of the crash closure", "narfs-crash-top", refs=[chain[-1], *bigs])
        paths = run(["nix-store", "--query", "--requisites", top]).stdout.split()
        assert len(paths) == 7, paths
        closures = {p: {os.path.basename(q)[:32] for q in
                        run(["nix-store", "--query", "--requisites", p]).stdout.split()}
                    for p in paths}
        yield Closure(top, paths, closures)
    finally:
        store.cleanup()


# --- what must hold after every kill ----------------------------------------------------------


def temporaries(cache: Path) -> set[Path]:
    """Every `.narfs-tmp-*` under the cache, at any depth."""
    return {Path(d) / n for d, dirs, files in os.walk(cache) for n in [*dirs, *files]
            if n.startswith(TMP)}


class Invariants:
    """The cache as Nix would see it, checked with code independent of narfs's reader: plain
    sha256 and a plain zstd stream decoder. An entry that passed is not checked again while its
    narinfo bytes and its NAR's inode, size and mtime stay the same."""

    def __init__(self, cache: Path, key: PublicKey) -> None:
        self.cache = cache
        self.key = key
        self.passed: set[tuple] = set()

    def published(self) -> dict[str, narinfo_mod.NarInfo]:
        out = {}
        for p in self.cache.iterdir():
            if p.name.endswith(".narinfo") and not p.name.startswith(TMP):
                try:
                    out[p.name[:-8]] = narinfo_mod.parse(p.read_bytes(), expect_hash=p.name[:-8])
                except Exception:  # reported by check()
                    pass
        return out

    def check(self) -> list[str]:
        problems: list[str] = []
        infos: dict[str, narinfo_mod.NarInfo] = {}
        for p in sorted(self.cache.iterdir()):
            if not p.name.endswith(".narinfo") or p.name.startswith(TMP):
                continue
            h = p.name[:-8]
            data = p.read_bytes()
            try:
                info = narinfo_mod.parse(data, expect_hash=h)
            except Exception as e:
                problems.append(f"{p.name}: does not parse: {e}")
                continue
            infos[h] = info
            problems += self._entry(h, data, info)
        for info in infos.values():
            for ref in info.references:
                if ref[:32] not in infos:
                    problems.append(f"{info.store_path} is published, its reference {ref} "
                                    "is not")
        return problems

    def _entry(self, h: str, data: bytes, info: narinfo_mod.NarInfo) -> list[str]:
        nar = self.cache / info.url
        try:
            st = nar.stat()
        except FileNotFoundError:
            return [f"{info.store_path}: narinfo published, NAR {info.url} missing"]
        key = (h, hashlib.sha256(data).digest(), st.st_ino, st.st_size, st.st_mtime_ns)
        if key in self.passed:
            return []
        problems = []
        if not info.signed_by(self.key):
            problems.append(f"{info.store_path}: not signed by {self.key.name}")
        ls = self.cache / f"{h}.ls"
        try:
            json.loads(ls.read_bytes())
        except (FileNotFoundError, ValueError) as e:
            problems.append(f"{info.store_path}: narinfo published, listing {ls.name} not "
                            f"whole ({e})")
        raw = nar.read_bytes()
        if len(raw) != info.file_size:
            problems.append(f"{info.store_path}: NAR {info.url} is {len(raw)} bytes, FileSize "
                            f"{info.file_size}")
        if nix32.format_sha256(hashlib.sha256(raw).digest()) != info.file_hash:
            problems.append(f"{info.store_path}: NAR {info.url} does not match its FileHash")
        try:
            with zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True) as r:
                sha, size = hashlib.sha256(), 0
                while chunk := r.read(1 << 20):
                    sha.update(chunk)
                    size += len(chunk)
            if size != info.nar_size or nix32.format_sha256(sha.digest()) != info.nar_hash:
                problems.append(f"{info.store_path}: NAR decompresses to {size} bytes that do "
                                f"not match NarSize/NarHash")
        except zstandard.ZstdError as e:
            problems.append(f"{info.store_path}: NAR {info.url} does not decompress: {e}")
        if not problems:
            self.passed.add(key)
        return problems


def empty_cache(cache: Path) -> None:
    """Remove every committed entry, keeping temporaries (the next start must clear those)."""
    for p in [*cache.glob("*.narinfo"), *cache.glob("*.ls"), *(cache / "nar").iterdir()]:
        if not p.name.startswith(TMP):
            p.unlink()


def nix_verify(cache: Path, paths: list[str], key: str) -> None:
    run([*NIX, "store", "verify", "--store", f"file://{cache}", "--sigs-needed", "1",
         "--trusted-public-keys", key, *paths])


@dataclass
class Figures:
    command: str
    duration: float = 0.0  # one uninterrupted run, seconds
    tried: int = 0  # SIGKILLs sent to a live process
    mid_write: int = 0  # ... after which the cache held temporaries that run had made
    busy: int = 0  # ... while work was still owed (watch: pins left)
    partial: int = 0  # ... after which part of the closure, not all, was published
    finished: int = 0  # runs that ended before their instant came
    resets: int = 0
    violations: list[str] = field(default_factory=list)

    def print(self) -> None:
        print(f"\n[crash] narfs {self.command}: seed {SEED}, uninterrupted run "
              f"{self.duration:.2f} s; kills tried {self.tried}, landed mid-write (temporaries "
              f"seen) {self.mid_write}, with work owed {self.busy}, between two commits "
              f"{self.partial}, runs finished before the kill {self.finished}, cache emptied "
              f"{self.resets}x, invariant violations {len(self.violations)}")

    def killed(self, before: set[Path], after: set[Path], published_before: set[str],
               published: set[str], everything: set[str]) -> bool:
        """Count one kill; whether it left temporaries that its run had made."""
        self.tried += 1
        mid_write = bool({p for p in after - before if p.parent.name != ".narfs"})
        self.mid_write += mid_write
        self.partial += bool(published - published_before) and published != everything
        return mid_write


def configure(narfs: Narfs) -> None:
    narfs.config.write_text(narfs.config.read_text()
                            + f"frame_size = {FRAME}\nzstd_level = {LEVEL}\n")


def no_tracebacks(log: Path) -> None:
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, text[-5000:]


# --- narfs archive ----------------------------------------------------------------------------


def test_kill_archive_at_random_instants(narfs: Narfs, closure: Closure, tmp_path: Path) -> None:
    configure(narfs)
    cache = narfs.cache
    inv = Invariants(cache, load_secret_key(str(narfs.key)).public)
    fig = Figures("archive")
    log = tmp_path / "archive.log"
    everything = {os.path.basename(p)[:32] for p in closure.paths}

    t0 = time.monotonic()
    narfs("archive", closure.top)
    fig.duration = time.monotonic() - t0
    assert set(inv.published()) == everything
    assert inv.check() == []

    rng = random.Random(SEED)
    left_temporaries = False
    # Go on past the count until a kill has left temporaries: the final run must clear them.
    while fig.tried < ARCHIVE_KILLS or (not left_temporaries and fig.tried < ARCHIVE_KILLS + 30):
        if set(inv.published()) == everything:
            empty_cache(cache)
            fig.resets += 1
        before, published_before = temporaries(cache), set(inv.published())
        delay = rng.uniform(0, SPREAD * fig.duration)
        with open(log, "ab") as out:
            proc = narfs.popen("archive", closure.top, stdout=out, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.returncode == -signal.SIGKILL:
            fig.busy += 1
            left_temporaries = fig.killed(before, temporaries(cache), published_before,
                                          set(inv.published()), everything)
        else:
            assert proc.returncode == 0, f"narfs archive exited {proc.returncode}; see {log}"
            fig.finished += 1
            left_temporaries = False
        fig.violations += [f"kill {fig.tried} at {delay:.3f} s: {v}" for v in inv.check()]

    fig.print()
    assert fig.violations == [], "\n".join(fig.violations[:20])
    assert temporaries(cache), "the last kill left no temporaries to clear"
    final = narfs("archive", closure.top)
    assert final.returncode == 0 and "FAILED" not in final.stdout, final.stdout
    assert set(inv.published()) == everything
    assert inv.check() == []
    assert temporaries(cache) == set(), "the next start left temporaries behind"
    nix_verify(cache, closure.paths, narfs.public_key)
    no_tracebacks(log)
    # A crash test whose kills never hit a write proves nothing.
    assert fig.mid_write >= fig.tried // 8, "too few kills landed mid-write"


# --- narfs watch ------------------------------------------------------------------------------


class Roots:
    """A roots dir under /nix/var/nix/gcroots holding pins; removed by close()."""

    def __init__(self, pinned: list[str]) -> None:
        self.top = GCROOTS / f"narfs-test-{uuid.uuid4().hex[:12]}"
        self.dir = self.top / "roots"
        self.pinned = pinned

    def pin_all(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        for p in self.pinned:
            link = self.dir / os.path.basename(p)
            if not link.is_symlink():
                link.symlink_to(p)

    def pins(self) -> dict[str, str]:
        found: dict[str, str] = {}
        if self.dir.is_dir():
            for p in self.dir.iterdir():
                try:
                    found[p.name] = os.readlink(p)
                except FileNotFoundError:  # unpinned between the listing and the read
                    pass
        return found

    def close(self) -> None:
        shutil.rmtree(self.top, ignore_errors=True)


class Watch:
    def __init__(self, narfs: Narfs, roots: Roots, log: Path) -> None:
        with open(log, "ab") as out:
            self.proc = narfs.popen("watch", "--roots", str(roots.dir), stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT)
        self.log = log

    def kill(self) -> bool:
        """SIGKILL; whether the process was alive to receive it."""
        alive = self.proc.poll() is None
        if alive:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        return alive


def wait_until(cond, timeout: float, what: str, watch: Watch) -> float:
    t0 = time.monotonic()
    while not cond():
        if watch.proc.poll() is not None:
            raise AssertionError(f"narfs watch exited ({watch.proc.returncode}) while waiting "
                                 f"for {what}:\n{watch.log.read_text()[-3000:]}")
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}:\n"
                                 f"{watch.log.read_text()[-3000:]}")
        time.sleep(0.005)
    return time.monotonic() - t0


def test_kill_watch_at_random_instants(narfs: Narfs, closure: Closure, tmp_path: Path) -> None:
    configure(narfs)
    cache = narfs.cache
    inv = Invariants(cache, load_secret_key(str(narfs.key)).public)
    fig = Figures("watch")
    log = tmp_path / "watch.log"
    # Three pins with overlapping closures: the top, one big path, one link of the chain.
    pinned = [closure.top, *(p for p in closure.paths if "-narfs-crash-big1" in p
                             or "-narfs-crash-chain-1" in p)]
    assert len(pinned) == 3
    by_name = {os.path.basename(p): p for p in pinned}
    everything = {os.path.basename(p)[:32] for p in closure.paths}
    roots = Roots(pinned)
    watches: list[Watch] = []
    try:
        roots.pin_all()
        t0 = time.monotonic()
        watches.append(w := Watch(narfs, roots, log))
        wait_until(lambda: not roots.pins(), 60, "every pin removed (uninterrupted run)", w)
        fig.duration = time.monotonic() - t0
        w.kill()
        assert set(inv.published()) == everything
        assert inv.check() == []

        rng = random.Random(SEED + 1)
        left_temporaries = False
        while fig.tried < WATCH_KILLS or (not left_temporaries and fig.tried < WATCH_KILLS + 30):
            if not roots.pins():
                empty_cache(cache)
                fig.resets += 1
                roots.pin_all()
            before_pins = roots.pins()
            before, published_before = temporaries(cache), set(inv.published())
            delay = rng.uniform(0, SPREAD * fig.duration)
            watches.append(w := Watch(narfs, roots, log))
            time.sleep(delay)
            owed = bool(roots.pins())
            assert w.kill(), f"narfs watch died on its own:\n{log.read_text()[-3000:]}"
            fig.busy += owed
            published = set(inv.published())
            left_temporaries = fig.killed(before, temporaries(cache), published_before,
                                          published, everything)
            after_pins = roots.pins()
            for name, target in before_pins.items():
                path = by_name[name]
                assert os.path.realpath(target) == path
                if name not in after_pins and not closure.closures[path] <= published:
                    missing = sorted(closure.closures[path] - published)
                    fig.violations.append(f"kill {fig.tried} at {delay:.3f} s: pin {name} "
                                          f"removed, its closure lacks {missing}")
            fig.violations += [f"kill {fig.tried} at {delay:.3f} s: {v}" for v in inv.check()]

        fig.print()
        assert fig.violations == [], "\n".join(fig.violations[:20])
        assert temporaries(cache), "the last kill left no temporaries to clear"
        watches.append(w := Watch(narfs, roots, log))
        wait_until(lambda: not roots.pins(), 60, "every pin removed by the final run", w)
        # Then a clean stop: the state file's own temporaries go too.
        w.proc.send_signal(signal.SIGTERM)
        assert w.proc.wait(10) == 0
        assert inv.check() == []
        assert set(inv.published()) == everything
        assert temporaries(cache) == set(), "the next start left temporaries behind"
        nix_verify(cache, closure.paths, narfs.public_key)
        no_tracebacks(log)
        assert fig.mid_write >= fig.tried // 8, "too few kills landed mid-write"
    finally:
        for w in watches:
            w.kill()
        roots.close()


# --- disk full --------------------------------------------------------------------------------


def test_archive_into_a_full_disk_then_resume(narfs: Narfs, closure: Closure,
                                              tmp_path: Path) -> None:
    """A 6 MiB tmpfs: the small paths fit, the 16 MiB ones do not. Clear errors, nothing
    half-published (no referrer of a failed path), no temporaries; more space → completes.
    (Read-only caches: tests/t4_archive_cli.py; the service on a full disk: t4_watch.py.)"""
    configure(narfs)
    disk = tmp_path / "disk"
    disk.mkdir()
    run(["mount", "-t", "tmpfs", "-o", "size=6m,mode=0755", "tmpfs", str(disk)])
    try:
        cache = disk / "cache"
        narfs("init", "--cache", str(cache), "--secret-key", str(narfs.key))
        inv = Invariants(cache, load_secret_key(str(narfs.key)).public)
        full = narfs("archive", "--cache", str(cache), closure.top, check=False)
        assert full.returncode == 1, full.stdout + full.stderr
        assert "Traceback" not in full.stderr, full.stderr
        errors = [line for line in full.stderr.splitlines() if line.startswith("narfs: error: ")]
        bigs = [p for p in closure.paths if "-narfs-crash-big" in p]
        for p in bigs:
            assert any(p in line and "no space left" in line for line in errors), full.stderr
        assert any(closure.top in line and "not published" in line for line in errors), \
            full.stderr
        assert inv.check() == []
        published = set(inv.published())
        assert published == {os.path.basename(p)[:32] for p in closure.paths
                             if "-narfs-crash-chain-" in p}
        assert temporaries(cache) == set(), "a failed write left its temporary"

        run(["mount", "-o", "remount,size=200m", str(disk)])
        narfs("archive", "--cache", str(cache), closure.top)
        assert inv.check() == []
        assert len(inv.published()) == len(closure.paths)
        assert temporaries(cache) == set()
        nix_verify(cache, closure.paths, narfs.public_key)
    finally:
        if run(["umount", str(disk)], check=False).returncode:
            run(["umount", "-l", str(disk)], check=False)
