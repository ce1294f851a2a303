#!/usr/bin/env python3
"""Benchmark `narfs archive` against `nix copy --to 'file://DIR?compression=zstd'` (issue 2).

    python tests/bench/bench_archive.py --out bench-out [--reps 3] [--small 500]

Run as root on a machine with Nix (single-user, NIX_REMOTE=local). On the same store paths in
the same run, alternating which goes first, it times both commands end to end (process start
included; each into a fresh directory) and compares compressed sizes:

  * large real trees: /usr/include and /usr/share/doc added with `nix-store --add`
    (through read-only bind mounts with unique names, so the paths are this run's alone);
  * 500 small salted paths, built by one `nix-build`;
  * frame size and level: the NAR of /usr/include compressed in 1, 2, 4, 8 MiB frames at
    zstd levels 3..6, against Nix's own zstd NAR: size, compression speed and the cost of
    reading one small file (decompressing the frames that cover it, against decompressing
    Nix's single-frame NAR up to that file).

Prints a table and writes rows {benchmark, narfs_s, anchor, anchor_s, ratio, ...} to
OUT/results.json. Everything it adds to the store is deleted at the end. Targets (issue 2):
wall ≤ 0.5× nix copy on large trees, ≤ 1.0× on small paths, compressed size ≤ 1.05×.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import zstandard

from narfs import zstdseek
from narfs.config import Settings
from narfs.nar import NarSerialiser
from narfs.narinfo import parse as parse_narinfo

NIX = ["nix", "--extra-experimental-features", "nix-command"]
ENV = {**os.environ, "NIX_REMOTE": "local",
       "NIX_CONFIG": "substituters =\nbuild-users-group =\n"}
MiB = 1 << 20


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=kw.pop("env", ENV), **kw)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


class Paths:
    """What the benchmark adds to the store, deleted again by `cleanup`."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.paths: list[str] = []
        self.links: list[Path] = []

    def add_tree(self, src: str) -> str:
        view = self.work / f"{os.path.basename(src)}-narfs-bench-{uuid.uuid4().hex[:8]}"
        view.mkdir()
        run(["mount", "--bind", "-o", "ro", src, str(view)])
        try:
            path = run(["nix-store", "--add", str(view)]).stdout.strip()
        finally:
            run(["umount", str(view)])
            view.rmdir()
        self.paths.append(path)
        return path

    def build_small(self, n: int) -> list[str]:
        """`n` small salted paths (a few files of text and random bytes each), one nix-build."""
        salt = uuid.uuid4().hex
        script = ("mkdir -p $out/bin $out/share/doc && echo \"$salt $i\" > $out/share/doc/README"
                  " && head -c $((512 + i * 37 % 8192)) /dev/urandom | base64 > $out/data"
                  " && printf '#!/bin/sh\\necho %s\\n' $i > $out/bin/tool"
                  " && chmod +x $out/bin/tool")
        expr = (f"builtins.genList (i: derivation {{ name = \"narfs-bench-small-${{toString i}}\";"
                f" system = builtins.currentSystem; builder = \"/bin/sh\";"
                f" PATH = \"/usr/bin:/bin\"; salt = \"{salt}\"; i = toString i;"
                f" args = [ \"-c\" {json.dumps(script)} ]; }}) {n}")
        link = self.work / "small"
        out = run(["nix-build", "-E", expr, "--out-link", str(link), "-j", "4"]).stdout.split()
        self.links += [p for p in self.work.iterdir() if p.name.startswith("small")]
        self.paths += out
        return out

    def cleanup(self) -> None:
        for link in self.links:
            if link.is_symlink():
                link.unlink()
        drvs = []
        for p in self.paths:
            q = subprocess.run(["nix-store", "--query", "--deriver", p], capture_output=True,
                               text=True, env=ENV).stdout.strip()
            if q.endswith(".drv") and os.path.exists(q):
                drvs.append(q)
        doomed = [p for p in self.paths + drvs if os.path.exists(p)]
        if doomed:
            subprocess.run(["nix-store", "--delete", *doomed], capture_output=True, env=ENV)


class Runner:
    """Runs both commands into fresh directories and keeps their timings."""

    def __init__(self, work: Path, dest: Path) -> None:
        self.work = dest
        self.key = work / "bench.key"
        self.config = work / "narfs.toml"
        self.narfs_env = {**ENV, "NARFS_CONFIG": str(self.config)}
        run([sys.executable, "-m", "narfs.cli", "-q", "init", "--cache", str(work / "init"),
             "--secret-key", str(self.key)], env=self.narfs_env)

    def narfs(self, paths: list[str]) -> tuple[float, float, Path]:
        cache = self.work / "narfs-cache"
        shutil.rmtree(cache, ignore_errors=True)
        run([sys.executable, "-m", "narfs.cli", "-q", "init", "--cache", str(cache),
             "--secret-key", str(self.key)], env=self.narfs_env)
        wall, cpu = timed([sys.executable, "-m", "narfs.cli", "-q", "archive", "--cache",
                           str(cache), "--secret-key", str(self.key), *paths], self.narfs_env)
        return wall, cpu, cache

    def nix(self, paths: list[str]) -> tuple[float, float, Path]:
        cache = self.work / "nix-cache"
        shutil.rmtree(cache, ignore_errors=True)
        wall, cpu = timed([*NIX, "copy", "--to", f"file://{cache}?compression=zstd", *paths], ENV)
        return wall, cpu, cache


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
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


def compare(runner: Runner, name: str, paths: list[str], reps: int, target: float) -> dict:
    # Warm the page cache for both (the first reader would otherwise pay for the disk).
    for p in paths[:1000]:
        subprocess.run(["nix-store", "--dump", p], stdout=subprocess.DEVNULL, env=ENV)
    wall: dict[str, list[float]] = {"narfs": [], "nix": []}
    cpu: dict[str, list[float]] = {"narfs": [], "nix": []}
    sizes: dict[str, dict[str, int]] = {}
    for rep in range(reps):
        order = [("narfs", runner.narfs), ("nix", runner.nix)]
        if rep % 2:
            order.reverse()
        for who, fn in order:
            seconds, cpu_seconds, cache = fn(paths)
            wall[who].append(seconds)
            cpu[who].append(cpu_seconds)
            sizes[who] = file_sizes(cache)
    assert set(sizes["narfs"]) == set(sizes["nix"]) == set(paths), "caches differ in paths"
    nb, xb = sum(sizes["narfs"].values()), sum(sizes["nix"].values())
    med = statistics.median
    row = {"benchmark": name, "narfs_s": med(wall["narfs"]),
           "anchor": "nix copy --to file://DIR?compression=zstd",
           "anchor_s": med(wall["nix"]), "target": target, "paths": len(paths),
           "narfs_bytes": nb, "anchor_bytes": xb, "size_ratio": nb / xb,
           "min_ratio": min(wall["narfs"]) / min(wall["nix"]),
           "narfs_cpu_s": med(cpu["narfs"]), "anchor_cpu_s": med(cpu["nix"]),
           "narfs_runs": wall["narfs"], "anchor_runs": wall["nix"]}
    row["ratio"] = row["narfs_s"] / row["anchor_s"]
    return row


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
            narfs_s = statistics.median(reads)
            rows.append({
                "benchmark": f"read one small file, {frame_size // MiB} MiB frames, "
                             f"zstd -{level}",
                "narfs_s": narfs_s,
                "anchor": "nix zstd NAR (one frame): decompress up to the file",
                "anchor_s": anchor_s, "ratio": narfs_s / anchor_s,
                "frame_size": frame_size, "level": level,
                "narfs_bytes": out.stat().st_size, "anchor_bytes": nix_bytes,
                "size_ratio": out.stat().st_size / nix_bytes,
                "compress_MBps": len(nar) / compress_s / 1e6, "nar_bytes": len(nar),
                "samples": len(picks)})
    return rows


def show(rows: list[dict]) -> None:
    print(f"{'benchmark':58} {'narfs s':>9} {'anchor s':>9} {'ratio':>6} {'size×':>6}"
          f" {'target':>6}  extra")
    for r in rows:
        extra = (f"{r['compress_MBps']:.0f} MB/s compress" if "compress_MBps" in r
                 else f"min ratio {r['min_ratio']:.2f}, CPU s {r['narfs_cpu_s']:.2f} vs "
                      f"{r['anchor_cpu_s']:.2f}; runs {_fmt(r['narfs_runs'])} vs "
                      f"{_fmt(r['anchor_runs'])}")
        target = f"≤{r['target']}" if "target" in r else ""
        print(f"{r['benchmark'][:58]:58} {r['narfs_s']:9.4f} {r['anchor_s']:9.4f} "
              f"{r['ratio']:6.2f} {r['size_ratio']:6.3f} {target:>6}  {extra}")


def _fmt(xs: list[float]) -> str:
    return "/".join(f"{x:.2f}" for x in xs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="directory for results.json")
    ap.add_argument("--reps", type=int, default=3, help="timed runs of each command (median)")
    ap.add_argument("--small", type=int, default=500, help="number of small paths")
    ap.add_argument("--samples", type=int, default=200, help="small files read per frame size")
    ap.add_argument("--levels", default="3,4,5,6", help="zstd levels for the frame study")
    ap.add_argument("--frames", default="1,2,4,8", help="frame sizes (MiB) for the study")
    ap.add_argument("--skip", default="", help="comma list of: include,doc,both,small,frames")
    ap.add_argument("--dest", type=Path, help="where the caches are written (default: a temporary "
                    "directory under $TMPDIR); e.g. /dev/shm to take the disk out of the figures")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the benchmark adds to /nix/store and bind-mounts trees")
    skip = set(filter(None, args.skip.split(",")))
    args.out.mkdir(parents=True, exist_ok=True)
    s = Settings()
    print(f"narfs defaults: frame_size {s.frame_size // MiB} MiB, zstd level {s.zstd_level}, "
          f"{s.threads} threads; {os.cpu_count()} cores", flush=True)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="narfs-bench-") as tmp:
        work = Path(tmp)
        store = Paths(work)
        dest = Path(tempfile.mkdtemp(prefix="narfs-bench-", dir=args.dest)) if args.dest \
            else work
        try:
            runner = Runner(work, dest)
            include = store.add_tree("/usr/include")
            doc = store.add_tree("/usr/share/doc") if "doc" not in skip else None
            for name, paths, key in (("/usr/include", [include], "include"),
                                     ("/usr/share/doc", [doc], "doc"),
                                     ("/usr/include + /usr/share/doc", [include, doc], "both")):
                if key in skip or None in paths:
                    continue
                print(f"timing {name} ...", flush=True)
                rows.append(compare(runner, f"archive {name}", paths, args.reps, 0.5))
                show(rows[-1:])
            if "small" not in skip:
                print(f"building {args.small} small paths ...", flush=True)
                small = store.build_small(args.small)
                print(f"timing {args.small} small paths ...", flush=True)
                rows.append(compare(runner, f"archive {args.small} small paths", small,
                                    args.reps, 1.0))
                show(rows[-1:])
            if "frames" not in skip:
                print("frame size study on /usr/include ...", flush=True)
                _, _, nix_cache = runner.nix([include])
                rows += frame_study(include, nix_cache,
                                    [int(x) * MiB for x in args.frames.split(",")],
                                    [int(x) for x in args.levels.split(",")], work,
                                    args.samples)
        finally:
            store.cleanup()
            if args.dest:
                shutil.rmtree(dest, ignore_errors=True)
    print()
    show(rows)
    out = args.out / "results.json"
    out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
