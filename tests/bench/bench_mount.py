#!/usr/bin/env python3
"""Benchmark `narfs mount` (issue 3).

    python tests/bench/bench_mount.py [--out bench-out] [--quick] [--paths 100000] [--reps 5]
                                      [--skip read,positions,tree,ratarmount,many]

Run as root on a machine with Nix (single-user, NIX_REMOTE=local) and FUSE. On the corpus of
common.py (/usr/include and /usr/share/doc added to the store, a large file, a closure of small
paths, all archived by narfs into one cache), alternating narfs with its anchor:

  * read: cold read of one small file deep in /usr/include's path (a 111 MiB NAR), on a fresh
    mount with the page cache dropped, against `nix store cat --store file://DIR`; and the same
    for files spread along the NAR (the read-by-position plot);
  * tree: `ls -lR` and `grep -r` over both trees, warm (after one run) and cold (fresh mount,
    caches dropped), through the mount against the native directories in /nix/store and
    against ratarmount mounting the same trees as a multi-frame .tar.zst (bench_ratarmount.py);
    the mount runs in its fast mode when pyfuse3 carries narfs's patch (issue 12), and the
    same commands through a stock-mode mount (`--fuse-mode stock`) give the rows beside them;
  * many: a cache of N tiny synthetic paths (narfs's own writers, not Nix): `narfs mount`
    returning once the catalog exists, `ls MOUNTPOINT | wc -l`, and the mount's RSS, against
    the issue's targets (2 s, 2 s, 200 MB).

Rows are merged into OUT/results.json. Everything added to the store is deleted at the end;
every mount is unmounted.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_ratarmount
import synthetic
from common import (
    NIX,
    Context,
    Mount,
    alternate,
    drop_caches,
    median,
    row,
    runs_row,
    show,
    standalone,
    timed,
)

from narfs.fs import fast_capable
from narfs.narinfo import parse as parse_narinfo

OPS = {"ls -lR": ["ls", "-lR"],
       # a rare identifier: grep reads every byte, as a search for a symbol does
       "grep -r": ["grep", "-r", "PTHREAD_MUTEX_INITIALIZER"]}
# Issue 12, against the native directory: (op, temperature) → the largest ratio accepted.
TREE_TARGETS = {("ls -lR", "cold"): 1.2, ("grep -r", "cold"): 1.5,
                ("ls -lR", "warm"): 1.0, ("grep -r", "warm"): 1.0}
NATIVE = "native directory"
STOCK = "narfs, stock pyfuse3"


def regular_files(node: dict, prefix: str = "") -> Iterator[tuple[str, int, int]]:
    """(relative path, size, narOffset) of every regular file in a listing."""
    if node["type"] == "directory":
        for name, child in node["entries"].items():
            yield from regular_files(child, f"{prefix}/{name}" if prefix else name)
    elif node["type"] == "regular":
        yield prefix, node["size"], node["narOffset"]


def read_rows(ctx: Context) -> list[dict]:
    cache, path = ctx.cache(), ctx.tree("include")
    name = os.path.basename(path)
    root = json.loads((cache / f"{name[:32]}.ls").read_bytes())["root"]
    nar_size = parse_narinfo((cache / f"{name[:32]}.narinfo").read_bytes()).nar_size or 0
    files = [f for f in regular_files(root) if 0 < f[1] < 50_000]
    deep = max(files, key=lambda f: (f[0].count("/"), f[0]))[0]
    mib = nar_size / (1 << 20)
    print(f"read: {path} ({mib:.0f} MiB NAR), deep file {deep}", flush=True)
    mnt = ctx.work / "mnt-read"

    def narfs_cold(rel: str) -> float:
        with Mount(cache, mnt, ctx.env) as m:
            drop_caches()
            t = time.perf_counter()
            (m.path / name / rel).read_bytes()
            return time.perf_counter() - t

    def nix_cat(rel: str) -> float:
        drop_caches()
        return timed([*NIX, "store", "cat", "--store", f"file://{cache}", f"{path}/{rel}"])

    times = alternate(ctx.reps, {"narfs": lambda: narfs_cold(deep),
                                 "nix store cat": lambda: nix_cat(deep)}, "cold read")
    rows = [runs_row(f"cold read of one file deep in a {mib:.0f} MiB path", times, "narfs",
                     "nix store cat", target=0.02,
                     notes=f"{ctx.tree_label('include')}: {deep}; fresh mount, page cache "
                           "dropped; nix store cat --store file://DIR")]
    if "positions" not in ctx.skip:  # one cold read per position: a profile, not a median
        picks: list[tuple[str, int, int]] = []
        by_offset = sorted(files, key=lambda f: f[2])
        for k in range(ctx.profile.positions):
            want = (k + 0.5) / ctx.profile.positions * nar_size
            picks.append(min(by_offset, key=lambda f: abs(f[2] - want)))
        series = []
        for rel, size, offset in dict.fromkeys(picks):
            t = alternate(1, {"narfs": lambda rel=rel: narfs_cold(rel),
                              "nix store cat": lambda rel=rel: nix_cat(rel)})
            series.append({"file": rel, "size": size, "nar_offset": offset,
                           "narfs_s": t["narfs"][0], "anchor_s": t["nix store cat"][0]})
            print(f"  position {offset / (1 << 20):6.1f} MiB: narfs {t['narfs'][0]:.4f} s, "
                  f"nix store cat {t['nix store cat'][0]:.4f} s", flush=True)
        ctx.series["read_by_position"] = {"path": ctx.tree_label("include"),
                                          "nar_size": nar_size, "points": series}
    return rows


class Native:
    """The trees where Nix keeps them, on local disk."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths

    @contextlib.contextmanager
    def opened(self) -> Iterator[list[str]]:
        yield self.paths


class NarfsTrees:
    """The same trees through a fresh `narfs mount` of the corpus cache."""

    def __init__(self, ctx: Context, mountpoint: Path, bases: list[str], mode: str) -> None:
        self.ctx = ctx
        self.mountpoint = mountpoint
        self.bases = bases
        self.mode = mode

    @contextlib.contextmanager
    def opened(self) -> Iterator[list[str]]:
        with Mount(self.ctx.cache(), self.mountpoint, self.ctx.env,
                   ("--fuse-mode", self.mode)) as m:
            yield [str(m.path / b) for b in self.bases]


def tree_rows(ctx: Context, ratarmount: bool = True) -> list[dict]:
    """ls -lR and grep -r, cold and warm: narfs against the native directory and ratarmount,
    and narfs in stock mode beside them, all interleaved in each repetition."""
    keys = list(ctx.profile.trees)
    paths = [ctx.tree(k) for k in keys]
    bases = [os.path.basename(p) for p in paths]
    label = " + ".join(ctx.tree_label(k) for k in keys)
    fast = fast_capable()
    mode = ("fast mode" if fast else "stock mode: this pyfuse3 lacks narfs's patch "
            "(tools/install-pyfuse3)")
    print(f"tree: narfs in {mode}", flush=True)
    sides: dict = {"narfs": NarfsTrees(ctx, ctx.work / "mnt-tree", bases,
                                       "fast" if fast else "stock"), NATIVE: Native(paths)}
    if ratarmount:
        sides["ratarmount"] = bench_ratarmount.Trees(ctx, paths, ctx.work / "mnt-ratar")
    if fast:
        sides[STOCK] = NarfsTrees(ctx, ctx.work / "mnt-stock", bases, "stock")
    anchors = [s for s in sides if s not in ("narfs", STOCK)]
    rows = []
    for op, cmd in OPS.items():
        def cold(side: str, cmd: list[str] = cmd) -> float:
            with sides[side].opened() as dirs:
                drop_caches()
                return timed([*cmd, *dirs], ok=(0, 1))

        times = alternate(ctx.reps, {s: lambda s=s: cold(s) for s in sides}, f"{op} cold")
        for a in anchors:
            rows.append(runs_row(f"{op} over {label}, cold", times, "narfs", a,
                                 target=TREE_TARGETS[op, "cold"] if a == NATIVE else 1.0,
                                 notes=f"narfs in {mode}; fresh mount (ratarmount: index "
                                       "exists), page cache dropped", op=op,
                                 temperature="cold"))
        if STOCK in sides:
            rows.append(runs_row(f"{op} over {label}, cold, stock pyfuse3", times, STOCK,
                                 NATIVE, notes="narfs in stock mode (--fuse-mode stock); "
                                 "fresh mount, page cache dropped"))
        with contextlib.ExitStack() as stack:
            dirs = {s: stack.enter_context(side.opened()) for s, side in sides.items()}
            for s in sides:  # warm: the first run fills the caches
                timed([*cmd, *dirs[s]], ok=(0, 1))
            times = alternate(ctx.reps, {
                s: lambda s=s, cmd=cmd, dirs=dirs: timed([*cmd, *dirs[s]], ok=(0, 1))
                for s in sides}, f"{op} warm")
        for a in anchors:
            rows.append(runs_row(f"{op} over {label}, warm", times, "narfs", a,
                                 target=TREE_TARGETS[op, "warm"] if a == NATIVE else 1.0,
                                 notes=f"narfs in {mode}; same mount, after one run", op=op,
                                 temperature="warm"))
        if STOCK in sides:
            rows.append(runs_row(f"{op} over {label}, warm, stock pyfuse3", times, STOCK,
                                 NATIVE, notes="narfs in stock mode (--fuse-mode stock); same "
                                 "mount, after one run"))
    return rows


def many_rows(ctx: Context) -> list[dict]:
    n = ctx.profile.synthetic_paths
    cache = ctx.work / "many"
    t = time.perf_counter()
    synthetic.make_cache(str(cache), n)
    print(f"many: {n} synthetic paths written in {time.perf_counter() - t:.1f} s", flush=True)
    mnt = ctx.work / "mnt-many"
    with Mount(cache, mnt, ctx.env) as m:  # builds the catalog, learns every top
        print(f"  first mount (catalog built): {m.ready:.1f} s", flush=True)
        t = time.perf_counter()
        count = len(os.listdir(m.path))
        print(f"  first listing: {time.perf_counter() - t:.1f} s", flush=True)
        assert count == n + 1, count  # + the .by-name view
    ready, listed = [], []
    rss = 0.0
    for i in range(ctx.reps):
        with Mount(cache, mnt, ctx.env) as m:
            ready.append(m.ready)
            t = time.perf_counter()
            out = subprocess.run(f"ls {m.path} | wc -l", shell=True, capture_output=True,
                                 text=True).stdout
            listed.append(time.perf_counter() - t)
            assert int(out) == n, out
            if i == ctx.reps - 1:
                time.sleep(3)  # RSS at rest, after the start-up sync
                rss = m.rss_mb()
    note = f"{n:,} synthetic paths" + ("" if n >= 100_000 else
                                        f" ({ctx.profile.name} run; issue 3 asks 100,000)")
    return [row(f"mount start, {n:,} archived paths (catalog exists)", median(ready),
                "target", 2.0, target=1.0, n=len(ready), notes=note + "; `narfs mount` "
                "returning, daemonised", narfs_runs=ready),
            row(f"ls MOUNTPOINT | wc -l, {n:,} archived paths", median(listed), "target",
                2.0, target=1.0, n=len(listed), notes=note + "; first listing of a fresh "
                "mount", narfs_runs=listed),
            row(f"mount RSS, {n:,} archived paths", rss, "target", 200.0, target=1.0,
                unit="MB", notes=note + "; after the listing and 3 s at rest")]


def rows(ctx: Context, quick: bool) -> list[dict]:
    out: list[dict] = []
    if "read" not in ctx.skip:
        out += read_rows(ctx)
        show(out[-1:])
    if "tree" not in ctx.skip:
        tree = tree_rows(ctx, ratarmount="ratarmount" not in ctx.skip)
        out += tree
        show(tree)
    if "many" not in ctx.skip:
        out += many_rows(ctx)
        show(out[-3:])
    return out


if __name__ == "__main__":
    sys.exit(standalone(__doc__, rows, {
        "--paths": ("synthetic_paths", int, "synthetic archived paths for the scale rows")}))
