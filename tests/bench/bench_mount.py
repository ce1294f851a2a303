#!/usr/bin/env python3
"""Benchmark `narfs mount` (issue 3).

    python tests/bench/bench_mount.py --out bench-out [--paths 100000] [--reps 3]

Run as root on a machine with Nix (single-user, NIX_REMOTE=local) and FUSE. Rows:

  * cold read of one small file deep in a 130 MB store path (a copy of /usr/include), on a
    fresh mount with the page cache dropped, against `nix store cat --store file://DIR`;
  * `ls -lR` and `grep -r` over that path through the mount against the same tree in
    /nix/store on local disk, warm (second run) and cold (fresh mount, page cache dropped);
  * a cache of N tiny synthetic paths (written with narfs's own writers, not via Nix): time
    until `narfs mount` returns once the catalog exists, the first `ls MOUNTPOINT | wc -l`,
    and the mount's RSS, against the issue's targets (2 s, 2 s, 200 MB).

Prints a table and merges rows {benchmark, narfs_s, anchor, anchor_s, ratio} into
OUT/results.json (rows of the same benchmark are replaced). Everything it adds to the store is
deleted at the end; every mount is unmounted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import synthetic

NIX = ["nix", "--extra-experimental-features", "nix-command"]
ENV = {**os.environ, "NIX_REMOTE": "local",
       "NIX_CONFIG": "substituters =\nbuild-users-group =\n"}
NARFS = [sys.executable, "-m", "narfs.cli", "-q"]


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, **kw)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd[:6]))} failed ({proc.returncode}):\n"
                         f"{proc.stderr}")
    return proc


def timed(cmd: list[str], **kw) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True,
                   env=ENV, **kw)
    return time.perf_counter() - t


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


class Mount:
    """`narfs mount` (daemonised, as users run it); `ready` is how long the command took."""

    def __init__(self, cache: Path, mountpoint: Path) -> None:
        self.cache = cache
        self.path = mountpoint
        self.ready = 0.0

    def __enter__(self) -> Mount:
        self.path.mkdir(exist_ok=True)
        t = time.perf_counter()
        run([*NARFS, "mount", "--cache", str(self.cache), str(self.path)])
        self.ready = time.perf_counter() - t
        return self

    def pid(self) -> int:
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    argv = (d / "cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                if b"mount" in argv and str(self.path).encode() in argv:
                    return int(d.name)
        raise SystemExit(f"no narfs process serves {self.path}")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid()}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def __exit__(self, *exc: object) -> None:
        pid = self.pid()
        if subprocess.run(["fusermount3", "-u", str(self.path)]).returncode:
            subprocess.run(["fusermount3", "-uz", str(self.path)])
        for _ in range(200):
            if not Path(f"/proc/{pid}").exists():
                break
            time.sleep(0.05)


def row(benchmark: str, narfs_s: float, anchor: str, anchor_s: float,
        target: float | None = None) -> dict:
    r = {"benchmark": benchmark, "narfs_s": round(narfs_s, 4), "anchor": anchor,
         "anchor_s": round(anchor_s, 4), "ratio": round(narfs_s / anchor_s, 4)}
    if target is not None:
        r["target_ratio"] = target
    print(f"{benchmark:<48} narfs {narfs_s:9.4f}  {anchor:<34} {anchor_s:9.4f}  "
          f"ratio {r['ratio']:.4f}" + (f" (target ≤ {target})" if target else ""), flush=True)
    return r


def best(reps: int, fn: Callable[[], float]) -> float:
    return statistics.median(fn() for _ in range(reps))


def tree_rows(work: Path, reps: int) -> list[dict]:
    rows = []
    src = work / f"narfs-bench-include-{uuid.uuid4().hex[:8]}"
    shutil.copytree("/usr/include", src, symlinks=True)
    store_path = run(["nix-store", "--add", str(src)]).stdout.strip()
    shutil.rmtree(src)
    try:
        cache = work / "cache"
        run([*NARFS, "init", "--cache", str(cache), "--secret-key", str(work / "key")])
        run([*NARFS, "archive", "--cache", str(cache), store_path])
        name = os.path.basename(store_path)
        deep = max((p for p in Path(store_path).rglob("*") if p.is_file()
                    and p.stat().st_size < 50_000), key=lambda p: (len(p.parts), str(p)))
        rel = deep.relative_to(store_path)
        nar_size = json.loads(run([*NIX, "path-info", "--json", store_path]).stdout)[0]
        print(f"tree: {store_path} ({nar_size['narSize'] >> 20} MiB NAR), deep file {rel}")
        mnt = work / "mnt"

        def cold_read() -> float:
            with Mount(cache, mnt) as m:
                drop_caches()
                t = time.perf_counter()
                (m.path / name / rel).read_bytes()
                return time.perf_counter() - t

        def nix_cat() -> float:
            drop_caches()
            return timed([*NIX, "store", "cat", "--store", f"file://{cache}",
                          f"{store_path}/{rel}"])

        rows.append(row("cold read of a deep file in a 130 MB path", best(reps, cold_read),
                        "nix store cat --store file://DIR", best(reps, nix_cat), 0.02))
        for what, cmd in (("ls -lR", ["ls", "-lR"]), ("grep -r", ["grep", "-r", "define"])):
            def local_cold(cmd: list[str] = cmd) -> float:
                drop_caches()
                return timed([*cmd, store_path])

            def mount_cold(cmd: list[str] = cmd) -> float:
                with Mount(cache, mnt) as m:
                    drop_caches()
                    return timed([*cmd, str(m.path / name)])

            rows.append(row(f"{what} cold (fresh mount)", best(reps, mount_cold),
                            f"{what} on local disk, cold", best(reps, local_cold), 5))
            with Mount(cache, mnt) as m:
                timed([*cmd, str(m.path / name)])
                timed([*cmd, store_path])
                warm_mount = best(reps, lambda cmd=cmd, m=m: timed([*cmd, str(m.path / name)]))
                warm_local = best(reps, lambda cmd=cmd: timed([*cmd, store_path]))
            rows.append(row(f"{what} warm", warm_mount, f"{what} on local disk, warm",
                            warm_local, 1.5))
    finally:
        subprocess.run(["nix-store", "--delete", store_path], capture_output=True, env=ENV)
    return rows


def many_rows(work: Path, n: int) -> list[dict]:
    cache = work / "many"
    t = time.perf_counter()
    synthetic.make_cache(str(cache), n)
    print(f"{n} synthetic paths written in {time.perf_counter() - t:.1f} s", flush=True)
    mnt = work / "mnt-many"
    with Mount(cache, mnt) as m:  # builds the catalog, then learns every top in the background
        print(f"first mount (catalog built): {m.ready:.1f} s", flush=True)
        t = time.perf_counter()
        count = len(os.listdir(m.path))
        print(f"first listing (tops learnt): {time.perf_counter() - t:.1f} s", flush=True)
        assert count == n + 1, count
    with Mount(cache, mnt) as m:
        ready = m.ready
        t = time.perf_counter()
        out = subprocess.run(f"ls {m.path} | wc -l", shell=True, capture_output=True,
                             text=True).stdout
        listed = time.perf_counter() - t
        assert int(out) == n, out
        time.sleep(3)  # let the start-up sync finish: RSS at rest, after it
        rss = m.rss_mb()
    return [row(f"{n} paths: mount ready (catalog exists)", ready, "target", 2.0),
            row(f"{n} paths: ls MOUNTPOINT | wc -l", listed, "target", 2.0),
            {**row(f"{n} paths: mount RSS (MB)", rss, "target (MB)", 200.0), "unit": "MB"}]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="directory for results.json")
    ap.add_argument("--paths", type=int, default=100_000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-tree", action="store_true")
    ap.add_argument("--skip-many", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the benchmark drops the page cache")
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="narfs-bench-mount-") as tmp:
        work = Path(tmp)
        (work / "narfs.toml").write_text(f'cache_dir = "{work / "cache"}"\n')
        ENV["NARFS_CONFIG"] = str(work / "narfs.toml")  # not the machine's /etc/narfs
        if not args.skip_tree:
            rows += tree_rows(work, args.reps)
        if not args.skip_many:
            rows += many_rows(work, args.paths)
    out = args.out / "results.json"
    old = json.loads(out.read_text()) if out.exists() else []
    names = {r["benchmark"] for r in rows}
    out.write_text(json.dumps([r for r in old if r["benchmark"] not in names] + rows,
                              indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
