#!/usr/bin/env python3
"""ratarmount as an anchor for `narfs mount` (issue 3): the same store trees as one
multi-frame .tar.zst, mounted by ratarmount (PyPI; FUSE through mfusepy).

    python tests/bench/bench_ratarmount.py [--out bench-out] [--quick] [--reps 5]

The archive is `tar -C /nix/store -cf - <paths>` cut into independent zstd frames of narfs's
own frame size and level (4 MiB, level 3), concatenated: ratarmount's indexed_zstd seeks to
frame boundaries, as narfs does with its seek table, so both decompress only the frames a read
needs. (`zstd -T0 -B` writes one frame of many blocks: not seekable, so not a fair anchor.)
Its index (`.index.sqlite` beside the archive) is built once before any timing, as narfs's
catalog exists before its timed mounts.

Run alone, this times `ls -lR` and `grep -r` cold and warm through narfs, the native
directories and ratarmount, interleaved (bench_mount.tree_rows); run.py includes those rows.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import zstandard

sys.path.insert(0, str(Path(__file__).parent))
from common import Context, MiB, is_mounted, run, standalone, unmount

from narfs.config import Settings


def command() -> str:
    """ratarmount beside this Python (a venv's bin/ need not be on PATH), else on PATH."""
    here = Path(sys.executable).parent / "ratarmount"
    found = str(here) if os.access(here, os.X_OK) else shutil.which("ratarmount")
    if not found:
        raise SystemExit("ratarmount not found: pip install -e '.[test,bench]'")
    return found


def version() -> str:
    """`ratarmount --version`, after checking that `ratarmount --help` works at all."""
    run([command(), "--help"])
    return run([command(), "--version"]).stdout.split("\n")[0].strip()


def make_archive(paths: list[str], dest: Path, frame_size: int, level: int) -> int:
    """The store paths as a tar (names are their base names) in independent zstd frames of
    `frame_size` uncompressed bytes; returns the number of frames."""
    bases = [p.removeprefix("/nix/store/") for p in paths]
    tar = subprocess.Popen(["tar", "-C", "/nix/store", "-cf", "-", *bases],
                           stdout=subprocess.PIPE)
    assert tar.stdout is not None
    cctx = zstandard.ZstdCompressor(level=level, write_checksum=True)
    frames = 0
    with open(dest, "wb") as out:
        while True:
            chunk = tar.stdout.read(frame_size)
            while chunk and len(chunk) < frame_size:  # a pipe returns what it has
                more = tar.stdout.read(frame_size - len(chunk))
                if not more:
                    break
                chunk += more
            if not chunk:
                break
            out.write(cctx.compress(chunk))
            frames += 1
    if tar.wait():
        raise SystemExit(f"tar of {bases} failed ({tar.returncode})")
    return frames


class Trees:
    """The corpus trees through a fresh ratarmount mount; the archive and its index are
    made on first use."""

    def __init__(self, ctx: Context, paths: list[str], mountpoint: Path) -> None:
        self.ctx = ctx
        self.paths = paths
        self.mountpoint = mountpoint
        self.archive = ctx.work / "trees.tar.zst"
        self.log = ctx.work / "ratarmount.log"
        self.ready = False

    def _prepare(self) -> None:
        if self.ready:
            return
        settings = Settings()
        t = time.perf_counter()
        frames = make_archive(self.paths, self.archive, settings.frame_size,
                              settings.zstd_level)
        print(f"ratarmount: {version()}; {self.archive.stat().st_size / MiB:.1f} MiB in "
              f"{frames} frames ({time.perf_counter() - t:.1f} s)", flush=True)
        self.ready = True
        with self._mounted():  # the first mount builds the index
            pass

    @contextlib.contextmanager
    def _mounted(self) -> Iterator[None]:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            proc = subprocess.Popen([command(), "-f", str(self.archive),
                                     str(self.mountpoint)], stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 300
            while not is_mounted(self.mountpoint):
                if proc.poll() is not None:
                    raise SystemExit(f"ratarmount exited {proc.returncode}; see {self.log}")
                if time.monotonic() > deadline:
                    raise SystemExit(f"ratarmount did not mount within 300 s; see {self.log}")
                time.sleep(0.02)
            yield
        finally:
            unmount(self.mountpoint, proc.pid)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    @contextlib.contextmanager
    def opened(self) -> Iterator[list[str]]:
        self._prepare()
        with self._mounted():
            yield [str(self.mountpoint / p.removeprefix("/nix/store/")) for p in self.paths]


def rows(ctx: Context, quick: bool) -> list[dict]:
    import bench_mount

    return bench_mount.tree_rows(ctx, ratarmount=True)


if __name__ == "__main__":
    sys.exit(standalone(__doc__, rows))
