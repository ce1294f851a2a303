"""Benchmarks of issue 4: what a build pays for narfs-hook, and how soon `narfs watch` archives.

    python tests/bench/bench_watch.py --out DIR [--iterations 200] [--runs 15]

Rows (merged into DIR/results.json by (benchmark, anchor), and printed):
- hook time per build: `narfs-hook` run as Nix runs it (a program with OUT_PATHS, or with only
  DRV_PATH as Nix 2.8.0 does), against the seed's hook (`nix-store --add-root ... -r` per path),
  both timed from fork to exit, interleaved, median of --iterations.
- build end → committed: a salted small path built with the hook while `narfs watch` runs,
  from the pin's appearance (the hook runs at build end) to its narinfo's appearance (the
  commit), timed with inotify; against the 2 s target of issue 4, and against what the seed
  service does per pin (`nix path-info -r` then `nix copy --to file://...?compression=zstd`).

Real Nix, single-user (NIX_REMOTE=local). Everything it builds, pins and writes is removed at
the end, also on failure. Not collected by pytest (not named test_*).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from inotify_simple import INotify, flags

HOOK = Path(__file__).resolve().parents[2] / "systemd" / "narfs-hook"
GCROOTS = Path("/nix/var/nix/gcroots")
NIX = ["nix", "--extra-experimental-features", "nix-command"]
# The seed's post-build-hook, as a program (its mkdir and loop, one nix-store call per path).
SEED_HOOK = """#!/bin/sh
export IFS=' '
mkdir -p "$SEED_ROOTS"
for path in $OUT_PATHS; do
  nix-store --add-root "$SEED_ROOTS/$(basename $path)" -r $path >/dev/null
done
"""

os.environ["NIX_REMOTE"] = "local"
os.environ["NIX_CONFIG"] = "substituters =\nbuild-users-group =\n"


def run(cmd: list[str], **kw) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])} failed ({proc.returncode}):\n{proc.stderr}")
    return proc.stdout


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   check=True)
    return time.perf_counter() - t0


class Bench:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.top = GCROOTS / f"narfs-bench-{uuid.uuid4().hex[:12]}"
        self.roots = self.top / "roots"
        self.seed_roots = self.top / "seed"
        self.built: list[str] = []
        self.cache = work / "cache"
        self.config = work / "narfs.toml"
        self.env = {**os.environ, "NARFS_CONFIG": str(self.config)}
        self.service: subprocess.Popen | None = None

    def narfs(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "narfs.cli", *args]

    def build(self, hook: bool) -> tuple[str, subprocess.Popen]:
        """Start a salted one-file build; returns its .drv and the nix-build process."""
        expr = ("derivation { name = \"narfs-bench\"; system = builtins.currentSystem; "
                "builder = \"/bin/sh\"; salt = \"" + uuid.uuid4().hex + "\"; "
                "args = [ \"-c\" \"echo $salt > $out\" ]; }")
        drv = run(["nix-instantiate", "-E", expr]).strip()
        cmd = ["nix-build", drv, "--no-out-link"]
        if hook:
            cmd += ["--option", "post-build-hook", str(HOOK)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True, env={**os.environ, "NARFS_ROOTS": str(self.roots)})
        return drv, proc

    def finish(self, proc: subprocess.Popen) -> str:
        out, _ = proc.communicate(timeout=120)
        if proc.returncode:
            raise SystemExit(f"nix-build failed ({proc.returncode})")
        path = out.split()[0]
        self.built.append(path)
        return path

    # --- hook -----------------------------------------------------------------------------

    def hook_rows(self, iterations: int) -> list[dict]:
        seed = self.work / "seed-hook"
        seed.write_text(SEED_HOOK)
        seed.chmod(0o755)
        paths = []
        for _ in range(8):
            drv, proc = self.build(hook=False)
            paths.append((drv, self.finish(proc)))
        times: dict[str, list[float]] = {"out_paths": [], "drv_only": [], "seed": []}
        base = {**os.environ, "NARFS_ROOTS": str(self.roots), "SEED_ROOTS": str(self.seed_roots)}
        for i in range(iterations):
            drv, path = paths[i % len(paths)]
            for kind in ("out_paths", "drv_only", "seed"):
                env = {**base, "DRV_PATH": drv, "OUT_PATHS": "" if kind == "drv_only" else path}
                times[kind].append(timed([str(seed if kind == "seed" else HOOK)], env))
                for d in (self.roots, self.seed_roots):  # a fresh pin each time
                    link = d / os.path.basename(path)
                    if link.is_symlink():
                        link.unlink()
        seed_s = statistics.median(times["seed"])
        return [
            row("hook time per build (OUT_PATHS set)", statistics.median(times["out_paths"]),
                "seed hook: nix-store --add-root -r", seed_s),
            row("hook time per build (Nix 2.8.0: only DRV_PATH)",
                statistics.median(times["drv_only"]), "seed hook: nix-store --add-root -r",
                seed_s),
        ]

    # --- service latency ------------------------------------------------------------------

    def latency_rows(self, runs: int) -> list[dict]:
        run(self.narfs("init", "--cache", str(self.cache), "--secret-key",
                       str(self.work / "secret.key")), env=self.env)
        self.roots.mkdir(parents=True, exist_ok=True)
        log = open(self.work / "watch.log", "wb")  # closed when the process ends
        self.service = subprocess.Popen(self.narfs("watch", "--roots", str(self.roots)),
                                        env=self.env, stdout=log, stderr=subprocess.STDOUT)
        wait_file(self.cache / ".narfs" / "watch.json", 20)
        ino = INotify()
        w_roots = ino.add_watch(str(self.roots), flags.CREATE | flags.DELETE)
        ino.add_watch(str(self.cache), flags.MOVED_TO)
        latencies, unpinned = [], []
        for _ in range(runs):
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
                    elif name and ev.wd == w_roots and ev.mask & flags.DELETE \
                            and ev.name == name:
                        t_unpin = now
            self.finish(proc)
            assert t_pin is not None and t_commit is not None
            latencies.append(t_commit - t_pin)
            unpinned.append(t_unpin - t_pin)
        ino.close()
        narfs_s = statistics.median(latencies)
        seed_s = self.seed_copy(runs)
        return [
            row("build end → committed, small path (narfs watch)", narfs_s,
                "issue 4 target", 2.0),
            row("build end → committed, small path (narfs watch)", narfs_s,
                "seed service: nix path-info -r + nix copy --to file://?compression=zstd",
                seed_s),
            row("build end → unpinned, small path (narfs watch)",
                statistics.median(unpinned), "issue 4 target", 2.0),
        ]

    def seed_copy(self, runs: int) -> float:
        """What the seed service spends per pin on a path of the same kind."""
        times = []
        dest = self.work / "seed-cache"
        for _ in range(runs):
            _, proc = self.build(hook=False)
            path = self.finish(proc)
            t0 = time.perf_counter()
            closure = run([*NIX, "path-info", "-r", path]).split()
            run([*NIX, "copy", "--to", f"file://{dest}?compression=zstd", *closure])
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

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


def row(benchmark: str, narfs_s: float, anchor: str, anchor_s: float) -> dict:
    return {"benchmark": benchmark, "narfs_s": round(narfs_s, 6), "anchor": anchor,
            "anchor_s": round(anchor_s, 6), "ratio": round(narfs_s / anchor_s, 4)}


def merge(out: Path, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.json"
    old = json.loads(results.read_text()) if results.exists() else []
    keys = {(r["benchmark"], r["anchor"]) for r in rows}
    merged = [r for r in old if (r.get("benchmark"), r.get("anchor")) not in keys] + rows
    tmp = results.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(merged, indent=1, ensure_ascii=False) + "\n")
    tmp.rename(results)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="directory for results.json")
    parser.add_argument("--iterations", type=int, default=200, help="hook runs per variant")
    parser.add_argument("--runs", type=int, default=15, help="builds for the latency rows")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="narfs-bench-watch-") as work:
        bench = Bench(Path(work))
        try:
            rows = bench.hook_rows(args.iterations) + bench.latency_rows(args.runs)
        finally:
            bench.close()
    merge(args.out, rows)
    for r in rows:
        print(f"{r['benchmark']}: narfs {r['narfs_s'] * 1000:.1f} ms vs {r['anchor']} "
              f"{r['anchor_s'] * 1000:.1f} ms (ratio {r['ratio']:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
