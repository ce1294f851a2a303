#!/usr/bin/env python3
"""Benchmark `narfs archive` against `nix copy --to 'file://DIR?compression=zstd'` (issue 2).

    python tests/bench/bench_archive.py [--out bench-out] [--quick] [--reps 5] [--small 500]
        [--skip include,doc,both,large,small,limit,frames] [--dest /dev/shm]

Run as root on a machine with Nix (single-user, NIX_REMOTE=local). On the corpus of common.py,
in the same run, alternating which goes first, it times both commands end to end (process
start included; each into a fresh directory) and compares compressed sizes:

  * large real trees: /usr/include and /usr/share/doc added with `nix-store --add` (through
    read-only bind mounts with unique names, so the paths are this run's alone), each alone
    and (full profile) both together; a large file (shared libraries end to end);
  * a closure of 500 small salted paths, built by one `nix-build`;
  * limit: `narfs archive` of a path against `zstd -3 -T0` over the same NAR bytes (a file in
    the page cache): how close archiving comes to compression alone on this machine;
  * frames (when run alone): the NAR of /usr/include compressed in 1, 2, 4, 8 MiB frames at
    zstd levels 3..6, against Nix's own zstd NAR: size, compression speed and the cost of
    reading one small file (decompressing the frames that cover it, against decompressing
    Nix's single-frame NAR up to that file).

Rows are merged into OUT/results.json. Everything added to the store is deleted at the end.
Targets (issue 2): wall ≤ 0.5× nix copy on large trees, ≤ 1.0× on small paths, compressed
size ≤ 1.05×.
"""

from __future__ import annotations

import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zstandard

sys.path.insert(0, str(Path(__file__).parent))
from common import (
    ENV,
    NARFS,
    NIX,
    Context,
    MiB,
    alternate,
    row,
    run,
    runs_row,
    show,
    standalone,
    timed,
)

from narfs import zstdseek
from narfs.config import Settings
from narfs.nar import NarSerialiser
from narfs.narinfo import parse as parse_narinfo


class Runner:
    """Runs both commands into fresh directories under `dest`."""

    def __init__(self, ctx: Context, dest: Path) -> None:
        self.dest = dest
        self.key = ctx.key
        self.env = ctx.env
        dest.mkdir(parents=True, exist_ok=True)

    def narfs(self, paths: list[str]) -> tuple[float, float, Path]:
        cache = self.dest / "narfs-cache"
        shutil.rmtree(cache, ignore_errors=True)
        run([*NARFS, "init", "--cache", str(cache), "--secret-key", str(self.key)],
            env=self.env)
        wall, cpu = timed_cpu([*NARFS, "archive", "--cache", str(cache), "--secret-key",
                               str(self.key), *paths], self.env)
        return wall, cpu, cache

    def nix(self, paths: list[str]) -> tuple[float, float, Path]:
        cache = self.dest / "nix-cache"
        shutil.rmtree(cache, ignore_errors=True)
        wall, cpu = timed_cpu([*NIX, "copy", "--to", f"file://{cache}?compression=zstd",
                               *paths], ENV)
        return wall, cpu, cache


def timed_cpu(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system, the command and what it waited for)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    run(cmd, env=env)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def file_sizes(cache: Path) -> dict[str, int]:
    out = {}
    for p in cache.glob("*.narinfo"):
        info = parse_narinfo(p.read_bytes())
        out[info.store_path] = info.file_size or 0
    return out


def compare(runner: Runner, name: str, label: str, paths: list[str], reps: int,
            target: float | None) -> list[dict]:
    """Wall time of both commands, alternated, and the compressed size: two rows."""
    # Warm the page cache for both (the first reader would otherwise pay for the disk).
    for p in paths[:1000]:
        subprocess.run(["nix-store", "--dump", p], stdout=subprocess.DEVNULL, env=ENV)
    cpu: dict[str, list[float]] = {"narfs": [], "nix copy": []}
    sizes: dict[str, dict[str, int]] = {}

    def one(who: str) -> float:
        seconds, cpu_seconds, cache = (runner.narfs if who == "narfs" else runner.nix)(paths)
        cpu[who].append(cpu_seconds)
        sizes[who] = file_sizes(cache)
        return seconds

    times = alternate(reps, {"narfs": lambda: one("narfs"), "nix copy": lambda: one("nix copy")},
                      name)
    assert set(sizes["narfs"]) == set(sizes["nix copy"]) == set(paths), "caches differ in paths"
    nb, xb = sum(sizes["narfs"].values()), sum(sizes["nix copy"].values())
    med = statistics.median
    return [
        runs_row(name, times, "narfs", "nix copy", target=target,
                 notes="wall, process start included, each into a fresh directory; anchor "
                       "nix copy --to file://DIR?compression=zstd",
                 paths=len(paths), min_ratio=min(times["narfs"]) / min(times["nix copy"]),
                 narfs_cpu_s=med(cpu["narfs"]), anchor_cpu_s=med(cpu["nix copy"])),
        row(f"compressed size: {label}", nb, "nix copy", xb, target=1.05, unit="bytes",
            notes="NAR file bytes: narfs's seekable zstd against nix copy's zstd",
            paths=len(paths)),
    ]


def limit_rows(ctx: Context) -> list[dict]:
    """narfs archive of a path against `zstd -3 -T0` over that path's NAR, the same bytes:
    how close archiving comes to compression alone."""
    work = ctx.work / "limit"
    work.mkdir()
    rows = []
    for label, path in ((ctx.tree_label("include"), ctx.tree("include")),
                        (f"a {ctx.profile.large_mib} MiB file", ctx.large())):
        nar = work / "path.nar"
        with open(nar, "wb") as f:
            subprocess.run(["nix-store", "--dump", path], stdout=f, check=True, env=ENV)
        cache = work / "cache"

        def narfs(path: str = path, cache: Path = cache) -> float:
            shutil.rmtree(cache, ignore_errors=True)
            run([*NARFS, "init", "--cache", str(cache), "--secret-key", str(ctx.key)],
                env=ctx.env)
            return timed([*NARFS, "archive", "--cache", str(cache), "--secret-key",
                          str(ctx.key), path], env=ctx.env)

        def zstd(nar: Path = nar) -> float:
            return timed(["zstd", "-q", "-f", "-3", "-T0", str(nar), "-o",
                          str(work / "path.nar.zst")])

        narfs()  # page cache warm for both: the store tree and the NAR file
        times = alternate(ctx.reps, {"narfs": narfs, "zstd": zstd}, f"limit {label}")
        size = nar.stat().st_size
        rows.append(runs_row(f"compress {label} (physical limit)", times, "narfs", "zstd",
                             notes=f"{size / MiB:.0f} MiB NAR; zstd -3 -T0 file to file, the "
                                   "NAR in the page cache; narfs archive also reads the store, "
                                   "serialises, hashes, writes frames, .ls, a signed narinfo, "
                                   "fsyncs (process start included)",
                             nar_bytes=size))
        show(rows[-1:])
        nar.unlink()
    shutil.rmtree(work, ignore_errors=True)
    return rows


def frame_rows(ctx: Context) -> list[dict]:
    """The frame-size and level study on /usr/include's NAR (issue 2's choice of default)."""
    extra = ctx.profile.extra
    path = ctx.tree("include")
    runner = Runner(ctx, ctx.work / "frames")
    _, _, nix_cache = runner.nix([path])
    return frame_study(path, nix_cache,
                       [int(x) * MiB for x in str(extra.get("frames", "1,2,4,8")).split(",")],
                       [int(x) for x in str(extra.get("levels", "3,4,5,6")).split(",")],
                       ctx.work, int(extra.get("samples", 200)))


def frame_study(path: str, nix_cache: Path, sizes: list[int], levels: list[int],
                work: Path, samples: int) -> list[dict]:
    """Compressed size and small-file read cost per frame size and level, for one path."""
    ser = NarSerialiser(path)
    nar = b"".join(ser)
    info = next(parse_narinfo(p.read_bytes()) for p in nix_cache.glob("*.narinfo")
                if parse_narinfo(p.read_bytes()).store_path == path)
    nix_file = nix_cache / info.url
    nix_bytes = nix_file.stat().st_size
    files: list[tuple[int, int]] = []

    def collect(node: dict) -> None:
        if node["type"] == "directory":
            for child in node["entries"].values():
                collect(child)
        elif node["type"] == "regular" and 0 < node["size"] <= 16 << 10:
            files.append((node["narOffset"], node["size"]))

    assert ser.listing is not None
    collect(ser.listing)
    picks = random.Random(1).sample(files, min(samples, len(files)))

    # Anchor: Nix's NAR is one zstd frame, so a small file costs decompressing up to it.
    anchor = []
    dctx = zstandard.ZstdDecompressor()
    for offset, size in picks[: max(10, samples // 5)]:
        t0 = time.perf_counter()
        with open(nix_file, "rb") as f:
            reader = dctx.stream_reader(f, read_across_frames=True)
            left = offset + size
            while left:
                chunk = reader.read(min(left, MiB))
                if not chunk:
                    break
                left -= len(chunk)
        anchor.append(time.perf_counter() - t0)
    anchor_s = statistics.median(anchor)

    rows = []
    for frame_size in sizes:
        for level in levels:
            out = work / "frames.nar.zst"
            t0 = time.perf_counter()
            with open(out, "wb") as f:
                w = zstdseek.SeekableWriter(f, frame_size, level)
                for i in range(0, len(nar), MiB):
                    w.write(nar[i:i + MiB])
                w.close()
            compress_s = time.perf_counter() - t0
            reads = []
            with open(out, "rb") as f:
                table = zstdseek.read_table(f, out.stat().st_size)
                assert table is not None
                d = zstandard.ZstdDecompressor()
                for offset, size in picks:
                    t0 = time.perf_counter()
                    data = b"".join(zstdseek.read_frame(f, table.frames[i], d)
                                    for i in table.covering(offset, size))
                    reads.append(time.perf_counter() - t0)
                    start = table.frames[table.covering(offset, size)[0]].offset
                    assert data[offset - start:offset - start + size] == \
                        nar[offset:offset + size]
            rows.append(row(
                f"read one small file, {frame_size // MiB} MiB frames, zstd -{level}",
                statistics.median(reads), "zstd", anchor_s, n=len(picks),
                notes="decompress the frames covering the file, against decompressing Nix's "
                      "single-frame zstd NAR up to the file (python-zstandard both)",
                frame_size=frame_size, level=level, narfs_bytes=out.stat().st_size,
                anchor_bytes=nix_bytes, size_ratio=out.stat().st_size / nix_bytes,
                compress_MBps=len(nar) / compress_s / 1e6, nar_bytes=len(nar)))
    return rows


def rows(ctx: Context, quick: bool) -> list[dict]:
    dest = ctx.profile.extra.get("dest")
    dest_dir = Path(tempfile.mkdtemp(prefix="narfs-bench-", dir=dest)) if dest \
        else ctx.work / "archive"
    s = Settings()
    print(f"narfs defaults: frame_size {s.frame_size // MiB} MiB, zstd level {s.zstd_level}, "
          f"{s.threads} threads", flush=True)
    out: list[dict] = []
    try:
        runner = Runner(ctx, dest_dir)
        cases = [(k, f"archive {ctx.tree_label(k)} (large tree)", ctx.tree_label(k),
                  lambda k=k: [ctx.tree(k)], 0.5) for k in ctx.profile.trees]
        if ctx.profile.name == "full":
            both = " + ".join(ctx.tree_label(k) for k in ctx.profile.trees)
            cases.append(("both", f"archive {both} (large trees)", both,
                          lambda: [ctx.tree(k) for k in ctx.profile.trees], 0.5))
        cases += [("large", f"archive a {ctx.profile.large_mib} MiB file", "a large file",
                   lambda: [ctx.large()], None),
                  ("small", f"archive {ctx.profile.small_paths} small paths (one closure)",
                   "small paths", ctx.small, 1.0)]
        for key, name, label, paths, target in cases:
            if key not in ctx.skip:
                out += compare(runner, name, label, paths(), ctx.reps, target)
                show(out[-2:])
        if "limit" not in ctx.skip:
            out += limit_rows(ctx)
    finally:
        if dest:
            shutil.rmtree(dest_dir, ignore_errors=True)
    return out


def rows_alone(ctx: Context, quick: bool) -> list[dict]:
    """Run alone, the frame study comes too (unless --skip frames)."""
    out = rows(ctx, quick)
    if "frames" not in ctx.skip:
        print("frame size study on /usr/include ...", flush=True)
        out += frame_rows(ctx)
    return out


if __name__ == "__main__":
    sys.exit(standalone(__doc__, rows_alone, {
        "--small": ("small_paths", int, "number of small paths"),
        "--samples": ("extra.samples", int, "small files read per frame size (frame study)"),
        "--levels": ("extra.levels", str, "zstd levels for the frame study, e.g. 3,4,5,6"),
        "--frames": ("extra.frames", str, "frame sizes (MiB) for the frame study, e.g. 1,2,4,8"),
        "--dest": ("extra.dest", str, "where the caches are written (default: the work "
                                       "directory); e.g. /dev/shm to take the disk out"),
    }))
