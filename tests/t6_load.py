"""Issue 7: 8 parallel `grep -r` over the mount while `narfs watch` archives new builds.

Six paths (text spread over 1 MiB zstd frames, plus one tree of many small files) are archived
before the mount starts; four more are pinned one by one while the greps run, so the service
writes into the cache and the mount takes them in live. For LOAD_SECONDS, 8 threads each run
`grep -r -n -a -F PATTERN .` in one path at a time, through the mount, for every path the mount
lists; the sorted output must equal grep's over the same path in /nix/store. Before each grep the
kernel's cached pages of that path are dropped (posix_fadvise, per file), so reads reach narfs
rather than the page cache (the mount sets keep_cache). The frame cache is FRAME_CACHE_MB (16),
far less than the 96 MiB of NAR read, so frames are evicted and decompressed again.

Shown: zero wrong results and zero grep errors; the mount's RSS stays below its idle RSS plus
the frame cache plus a frame per worker thread plus slack; its descriptors come back to the idle
count plus at most one open NAR per path (the reader keeps up to 64 open); every pinned build is
archived and reads right. Figures are printed (-s).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from mounting import mounted

from conftest import Narfs
from nixtools import NixStore, nix_string

GCROOTS = Path("/nix/var/nix/gcroots")
LOAD_SECONDS = float(os.environ.get("NARFS_LOAD_SECONDS", "20"))
GREPS = 8
FRAME_CACHE_MB = 16
FRAME = 1 << 20
SLACK_MB = 48  # above idle + frame cache: worker threads' malloc arenas, zstd contexts, pyfuse3
# buffers; measured up to ~40 MiB, flat over a 40 s run (a plateau, not growth)
FD_SLACK = 8
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

pytestmark = pytest.mark.skipif(shutil.which("nix-build") is None, reason="needs Nix")


def _text_path(store: NixStore, name: str, mib: int) -> str:
    """`mib` MiB of base64 lines in two files, so a 3-character pattern matches a few dozen
    lines per MiB, spread over every frame."""
    script = (f'mkdir -p "$out/sub" && head -c {mib * 3 // 8}M /dev/urandom | base64 -w 76 '
              f'> "$out/a.txt" && head -c {mib * 3 // 8}M /dev/urandom | base64 -w 76 '
              f'> "$out/sub/b.txt"')
    return store.build_expr(
        f"derivation {{ name = {nix_string(name)}; system = builtins.currentSystem; "
        f"builder = \"/bin/sh\"; PATH = \"/usr/bin:/bin\"; salt = \"{uuid.uuid4().hex}\"; "
        f"args = [ \"-c\" {nix_string(script)} ]; }}")[0]


def _tree_path(store: NixStore, src: Path) -> str:
    """Many small files in nested directories: lookups, readdir and opens rather than bytes."""
    rng = random.Random(7)
    for d in range(12):
        sub = src / f"dir{d:02}" / "inner"
        sub.mkdir(parents=True)
        for f in range(25):
            words = ["".join(rng.choices(ALPHABET, k=76)) for _ in range(rng.randrange(1, 40))]
            (sub / f"file{f:02}.txt").write_text("\n".join(words) + "\n")
    (src / "link").symlink_to("dir00/inner/file00.txt")
    return store.tree(src, "narfs-load-tree")


@dataclass
class Paths:
    before: list[str]  # archived before the mount starts
    during: list[str]  # pinned one by one during the load
    patterns: list[str]
    expected: dict[tuple[str, str], list[str]] = field(default_factory=dict)


def drop_page_cache(root: Path) -> None:
    """Evict the kernel's cached pages of every file under `root` (the mount keeps them across
    opens: keep_cache), so the next grep reads through narfs again. Per file, not system-wide."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def grep(cwd: str | Path, pattern: str) -> subprocess.CompletedProcess:
    return subprocess.run(["grep", "-r", "-n", "-a", "-F", pattern, "."], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Paths]:
    tmp = tmp_path_factory.mktemp("load")
    store = NixStore(tmp / "nix")
    try:
        before = [_text_path(store, f"narfs-load-a{i}", 16) for i in range(5)]
        before.append(_tree_path(store, tmp / "tree"))
        during = [_text_path(store, f"narfs-load-b{i}", 4) for i in range(4)]
        rng = random.Random(11)
        p = Paths(before, during, ["".join(rng.choices(ALPHABET, k=3)) for _ in range(6)])
        for path in before + during:
            for pattern in p.patterns:
                out = grep(path, pattern)
                assert out.returncode in (0, 1), out.stderr
                p.expected[path, pattern] = sorted(out.stdout.splitlines())
        assert sum(len(v) for v in p.expected.values()) > 1000  # the patterns do match
        yield p
    finally:
        store.cleanup()


@dataclass
class Load:
    greps: int = 0
    lines: int = 0
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, lines: int, error: str | None) -> None:
        with self.lock:
            self.greps += 1
            self.lines += lines
            if error is not None:
                self.errors.append(error)


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_parallel_greps_while_the_service_archives(narfs: Narfs, paths: Paths,
                                                   tmp_path: Path) -> None:
    narfs.config.write_text(narfs.config.read_text()
                            + f"frame_size = {FRAME}\nframe_cache_mb = {FRAME_CACHE_MB}\n")
    narfs("archive", *paths.before)
    top = GCROOTS / f"narfs-test-{uuid.uuid4().hex[:12]}"
    roots = top / "roots"
    roots.mkdir(parents=True)
    watch = None
    try:
        with mounted(narfs, tmp_path / "mnt") as m:
            proc = psutil.Process(m.proc.pid)
            for path in paths.before:  # warm up: every path once, so idle RSS is a fair base
                os.listdir(m / os.path.basename(path))
            time.sleep(0.5)
            idle_rss, idle_fds = proc.memory_info().rss, fds(m.proc.pid)
            frames_before = m.stats()["frames_decompressed"]
            with open(tmp_path / "watch.log", "wb") as log:
                watch = narfs.popen("watch", "--roots", str(roots), stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT)

            load = Load()
            deadline = time.monotonic() + LOAD_SECONDS
            visible = list(paths.before)

            def worker(k: int) -> None:
                rng = random.Random(100 + k)
                while time.monotonic() < deadline:
                    path = rng.choice(visible)
                    pattern = rng.choice(paths.patterns)
                    try:
                        drop_page_cache(m / os.path.basename(path))
                        out = grep(m / os.path.basename(path), pattern)
                    except (OSError, subprocess.TimeoutExpired) as e:
                        load.record(0, f"{path} {pattern}: {e}")
                        continue
                    got = sorted(out.stdout.splitlines())
                    error = None
                    if out.returncode not in (0, 1) or out.stderr:
                        error = f"{path} {pattern}: grep exited {out.returncode}: {out.stderr}"
                    elif got != paths.expected[path, pattern]:
                        error = (f"{path} {pattern}: {len(got)} lines through the mount, "
                                 f"{len(paths.expected[path, pattern])} in the store")
                    load.record(len(got), error)

            threads = [threading.Thread(target=worker, args=(k,)) for k in range(GREPS)]
            for t in threads:
                t.start()
            rss, most_fds = [], 0
            pending = list(paths.during)
            step = LOAD_SECONDS / (len(pending) + 1)
            next_pin = time.monotonic() + step
            while time.monotonic() < deadline:
                if pending and time.monotonic() >= next_pin:  # a build arrives
                    path = pending.pop(0)
                    (roots / os.path.basename(path)).symlink_to(path)
                    next_pin += step
                listed = set(os.listdir(m.path))
                visible += [p for p in paths.during
                            if p not in visible and os.path.basename(p) in listed]
                rss.append(proc.memory_info().rss)
                most_fds = max(most_fds, fds(m.proc.pid))
                time.sleep(0.1)
            for t in threads:
                t.join(timeout=150)
                assert not t.is_alive(), "a grep worker hung"

            # Every pinned build was archived (its pin gone) and reads right through the mount.
            wait_deadline = time.monotonic() + 60
            while any(roots.iterdir()):
                assert watch.poll() is None, (tmp_path / "watch.log").read_text()
                assert time.monotonic() < wait_deadline, "pins not archived within 60 s"
                time.sleep(0.1)
            for path in paths.during:
                if not os.path.isdir(m / os.path.basename(path)):
                    load.errors.append(f"{path}: archived, but not in the mount after the load")
                    continue
                for pattern in paths.patterns:
                    got = grep(m / os.path.basename(path), pattern)
                    if sorted(got.stdout.splitlines()) != paths.expected[path, pattern]:
                        load.errors.append(f"{path} {pattern}: wrong after the load: "
                                           f"{got.returncode} {got.stderr}")
            time.sleep(0.5)
            end_fds = fds(m.proc.pid)
            stats = m.stats()
            frames = stats["frames_decompressed"] - frames_before
            assert m.alive(), m.log()
            during_count = sum(p in visible for p in paths.during)

            mib = 1 << 20
            bound = idle_rss + (FRAME_CACHE_MB + GREPS * 2 * FRAME // mib + SLACK_MB) * mib
            n_paths = len(paths.before) + len(paths.during)
            print(f"\n[load] {LOAD_SECONDS:.0f} s, {GREPS} parallel greps: {load.greps} greps "
                  f"({load.lines} matching lines), errors or wrong results "
                  f"{len(load.errors)}; {during_count}/{len(paths.during)} paths archived by "
                  f"the service appeared during the load; RSS idle {idle_rss / mib:.0f} MiB, "
                  f"max {max(rss) / mib:.0f} MiB (bound {bound / mib:.0f} MiB, frame cache "
                  f"{FRAME_CACHE_MB} MiB), {frames} frames decompressed; fds idle {idle_fds}, "
                  f"max {most_fds}, after {end_fds}")
            print("[load] RSS MiB over time:", [r >> 20 for r in rss[:: max(1, len(rss) // 20)]])
            assert max(rss) < bound, f"mount RSS {max(rss)} above {bound}"
            # The reader keeps at most one descriptor per NAR open (up to 64): one per path.
            assert end_fds <= idle_fds + n_paths + FD_SLACK, \
                f"descriptor leak: {idle_fds} idle, {end_fds} after the load"
            assert most_fds <= idle_fds + n_paths + GREPS * 2 + FD_SLACK, \
                f"descriptor leak: {idle_fds} idle, {most_fds} during the load"
            assert load.errors == [], "\n".join(load.errors[:10])
            assert load.greps >= 8 * GREPS, "the load never got going"
            assert during_count >= 2, "the service's paths did not appear while grep ran"
            assert stats["frame_cache_bytes"] <= FRAME_CACHE_MB << 20, stats
            assert frames * FRAME > 2 * sum(16 << 20 for _ in paths.before), \
                "the greps were served from the page cache, not by the mount"
        assert "Traceback" not in m.log(), m.log()
    finally:
        if watch is not None:
            watch.terminate()
            try:
                watch.wait(10)
            except subprocess.TimeoutExpired:
                watch.kill()
                watch.wait()
        shutil.rmtree(top, ignore_errors=True)
    log_text = (tmp_path / "watch.log").read_text()
    assert "Traceback" not in log_text, log_text
