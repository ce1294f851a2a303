#!/usr/bin/env python3
"""Benchmarks of issue 4: what a build pays for narfs-hook, and how soon `narfs watch` archives.

    python tests/bench/bench_watch.py [--out bench-out] [--quick] [--iterations 200] [--runs 15]
                                      [--skip hook,latency]

Rows (merged into OUT/results.json by (benchmark, anchor), and printed):
- hook time per build: `narfs-hook` run as Nix runs it (a program with OUT_PATHS, or with only
  DRV_PATH as Nix 2.8.0 does), against the seed's hook (`nix-store --add-root ... -r` per path),
  both timed from fork to exit, interleaved, median of --iterations.
- build end → committed: a salted small path built with the hook while `narfs watch` runs,
  from the pin's appearance (the hook runs at build end) to its narinfo's appearance (the
  commit), timed with inotify; against the 2 s target of issue 4, and against what the seed
  service does per pin (`nix path-info -r` then `nix copy --to file://...?compression=zstd`),
  the two interleaved build by build.

Real Nix, single-user (NIX_REMOTE=local). Everything it builds, pins and writes is removed at
the end, also on failure. Not collected by pytest (not named test_*).
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

from inotify_simple import INotify, flags

sys.path.insert(0, str(Path(__file__).parent))
from common import (
    ENV,
    NARFS,
    NIX,
    Context,
    alternate,
    median,
    row,
    run,
    runs_row,
    show,
    standalone,
    timed,
)

HOOK = Path(__file__).resolve().parents[2] / "systemd" / "narfs-hook"
GCROOTS = Path("/nix/var/nix/gcroots")
# The seed's post-build-hook, as a program (its mkdir and loop, one nix-store call per path).
SEED_HOOK = """#!/bin/sh
export IFS=' '
mkdir -p "$SEED_ROOTS"
for path in $OUT_PATHS; do
  nix-store --add-root "$SEED_ROOTS/$(basename $path)" -r $path >/dev/null
done
"""
SEED_SERVICE = "seed service: nix path-info -r + nix copy --to file://DIR?compression=zstd"


class Bench:
    def __init__(self, work: Path, env: dict[str, str]) -> None:
        self.work = work
        self.work.mkdir(parents=True, exist_ok=True)
        self.top = GCROOTS / f"narfs-bench-{uuid.uuid4().hex[:12]}"
        self.roots = self.top / "roots"
        self.seed_roots = self.top / "seed"
        self.built: list[str] = []
        self.cache = work / "cache"
        self.env = env
        self.service: subprocess.Popen | None = None

    def build(self, hook: bool) -> tuple[str, subprocess.Popen]:
        """Start a salted one-file build; returns its .drv and the nix-build process."""
        expr = ("derivation { name = \"narfs-bench\"; system = builtins.currentSystem; "
                "builder = \"/bin/sh\"; salt = \"" + uuid.uuid4().hex + "\"; "
                "args = [ \"-c\" \"echo $salt > $out\" ]; }")
        drv = run(["nix-instantiate", "-E", expr]).stdout.strip()
        cmd = ["nix-build", drv, "--no-out-link"]
        if hook:
            cmd += ["--option", "post-build-hook", str(HOOK)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True, env={**ENV, "NARFS_ROOTS": str(self.roots)})
        return drv, proc

    def finish(self, proc: subprocess.Popen) -> str:
        out, _ = proc.communicate(timeout=120)
        if proc.returncode:
            raise SystemExit(f"nix-build failed ({proc.returncode})")
        path = out.split()[0]
        self.built.append(path)
        return path

    # --- hook -----------------------------------------------------------------------------

    def hook_rows(self, builds: int, iterations: int) -> list[dict]:
        seed = self.work / "seed-hook"
        seed.write_text(SEED_HOOK)
        seed.chmod(0o755)
        paths = []
        for _ in range(builds):
            drv, proc = self.build(hook=False)
            paths.append((drv, self.finish(proc)))
        base = {**ENV, "NARFS_ROOTS": str(self.roots), "SEED_ROOTS": str(self.seed_roots)}
        calls = [0]

        def hook(kind: str) -> float:
            calls[0] += 1
            drv, path = paths[calls[0] % len(paths)]
            env = {**base, "DRV_PATH": drv, "OUT_PATHS": "" if kind == "drv_only" else path}
            seconds = timed([str(seed if kind == "seed" else HOOK)], env)
            for d in (self.roots, self.seed_roots):  # a fresh pin each time
                link = d / os.path.basename(path)
                if link.is_symlink():
                    link.unlink()
            return seconds

        times = alternate(iterations, {"out_paths": lambda: hook("out_paths"),
                                       "drv_only": lambda: hook("drv_only"),
                                       "nix-store --add-root": lambda: hook("seed")})
        notes = ("the seed's hook: nix-store --add-root LINK -r per path, as a /bin/sh "
                 "program; fork to exit; issue 4 aims at ≤ 5 ms")
        return [
            runs_row("narfs-hook per build (OUT_PATHS set)", times, "out_paths",
                     "nix-store --add-root", target=1.0, notes=notes),
            runs_row("narfs-hook per build (Nix 2.8.0: only DRV_PATH)", times, "drv_only",
                     "nix-store --add-root", target=1.0, notes=notes),
        ]

    # --- service latency ------------------------------------------------------------------

    def start_service(self, key: Path) -> None:
        run([*NARFS, "init", "--cache", str(self.cache), "--secret-key", str(key)],
            env=self.env)
        self.roots.mkdir(parents=True, exist_ok=True)
        with open(self.work / "watch.log", "ab") as log:
            self.service = subprocess.Popen(
                [*NARFS, "watch", "--cache", str(self.cache), "--secret-key", str(key),
                 "--roots", str(self.roots)], env=self.env, stdout=log,
                stderr=subprocess.STDOUT)
        wait_file(self.cache / ".narfs" / "watch.json", 30)

    def narfs_latency(self, ino: INotify, w_roots: int) -> tuple[float, float]:
        """One build with the hook: (pin → narinfo, pin → pin removed) in seconds."""
        _, proc = self.build(hook=True)
        name: str | None = None
        t_pin = t_commit = t_unpin = None
        deadline = time.monotonic() + 60
        while t_unpin is None:
            if time.monotonic() > deadline:
                raise SystemExit(f"not archived within 60 s; see {self.work}/watch.log")
            if not select.select([ino], [], [], 1)[0]:
                continue
            now = time.perf_counter()
            for ev in ino.read(timeout=0):
                if ev.wd == w_roots and ev.mask & flags.CREATE and name is None:
                    name, t_pin = ev.name, now
                elif name and ev.wd != w_roots and ev.name == f"{name[:32]}.narinfo":
                    t_commit = now
                elif name and ev.wd == w_roots and ev.mask & flags.DELETE and ev.name == name:
                    t_unpin = now
        self.finish(proc)
        assert t_pin is not None and t_commit is not None
        return t_commit - t_pin, t_unpin - t_pin

    def seed_copy(self) -> float:
        """What the seed service spends per pin on a path of the same kind."""
        _, proc = self.build(hook=False)
        path = self.finish(proc)
        t0 = time.perf_counter()
        closure = run([*NIX, "path-info", "-r", path]).stdout.split()
        run([*NIX, "copy", "--to", f"file://{self.work / 'seed-cache'}?compression=zstd",
             *closure])
        return time.perf_counter() - t0

    def latency_rows(self, runs: int, key: Path) -> list[dict]:
        self.start_service(key)
        ino = INotify()
        w_roots = ino.add_watch(str(self.roots), flags.CREATE | flags.DELETE)
        ino.add_watch(str(self.cache), flags.MOVED_TO)
        unpinned: list[float] = []

        def narfs() -> float:
            committed, gone = self.narfs_latency(ino, w_roots)
            unpinned.append(gone)
            return committed

        try:
            times = alternate(runs, {"narfs": narfs, "nix copy": self.seed_copy},
                              "build end → archived")
        finally:
            ino.close()
        name = "build end → archived (committed), small path"
        return [
            row(name, median(times["narfs"]), "target", 2.0, target=1.0, n=runs,
                notes="narfs watch: pin created by narfs-hook → narinfo renamed into place",
                narfs_runs=times["narfs"]),
            runs_row(name, times, "narfs", "nix copy", notes=SEED_SERVICE),
            row("build end → unpinned, small path", median(unpinned), "target", 2.0,
                target=1.0, n=runs, notes="narfs watch removes the pin after the commit",
                narfs_runs=unpinned),
        ]

    # --- cleanup --------------------------------------------------------------------------

    def close(self) -> None:
        if self.service is not None and self.service.poll() is None:
            self.service.terminate()
            try:
                self.service.wait(10)
            except subprocess.TimeoutExpired:
                self.service.kill()
                self.service.wait()
        shutil.rmtree(self.top, ignore_errors=True)
        drvs = []
        for p in self.built:
            d = subprocess.run(["nix-store", "--query", "--deriver", p], capture_output=True,
                               text=True).stdout.strip()
            if d.endswith(".drv") and os.path.exists(d):
                drvs.append(d)
        gone = [p for p in [*self.built, *drvs] if os.path.exists(p)]
        if gone:
            subprocess.run(["nix-store", "--delete", *gone], capture_output=True)


def wait_file(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"{path} did not appear within {timeout} s")
        time.sleep(0.05)


def rows(ctx: Context, quick: bool) -> list[dict]:
    bench = Bench(ctx.work / "watch", ctx.env)
    out: list[dict] = []
    try:
        if "hook" not in ctx.skip:
            out += bench.hook_rows(ctx.profile.hook_builds, ctx.profile.hook_iterations)
            show(out[-2:])
        if "latency" not in ctx.skip:
            out += bench.latency_rows(ctx.profile.latency_runs, ctx.key)
            show(out[-3:])
    finally:
        bench.close()
    return out


if __name__ == "__main__":
    sys.exit(standalone(__doc__, rows, {
        "--iterations": ("hook_iterations", int, "hook runs per variant"),
        "--runs": ("latency_runs", int, "builds for the latency rows")}))
