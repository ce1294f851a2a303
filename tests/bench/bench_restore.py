#!/usr/bin/env python3
"""Benchmark `narfs restore` and `narfs verify` (issue 5).

    python tests/bench/bench_restore.py --out bench-out [--reps 3] [--small 30]

Run as root on a machine with Nix (single-user, NIX_REMOTE=local). Rows:

  * restore of a closure into /nix/store: `narfs restore TOP` against
    `nix copy --from file://DIR --option trusted-public-keys K --option require-sigs true TOP`,
    from the same narfs-written cache, same run, in ABBA order. Each timed run restores its own
    copy of the closure (same trees, another salt); all copies are deleted, the disk synced and
    70 s waited before the first run: ext4 without a journal (this machine's) passes over inodes
    freed in the last 1-6 minutes when it allocates, so a delete-then-restore loop times that
    scan, which grows every round, instead of the commands. Two shapes:
      - "wide": a project on three large trees (copies of /usr/include, /usr/lib/python3,
        /usr/share/doc) and N small paths, none referring to another, all referenced by a top
        path (how real closures look: many independent dependencies);
      - "chain": the same three trees each referring to the one before (the worst case for
        narfs: nothing can be unpacked side by side, one `nix copy` does it all).
    Target (issue 5): ≤ 1.0× nix copy.
  * verify: `narfs verify` over the cache (every NAR decompressed, hashed twice, parsed and
    compared with its listing, every signature checked) against `zstd -t` over the same NAR
    files (decompression and checksums only), warm page cache.

Prints a table and merges rows {benchmark, narfs_s, anchor, anchor_s, ratio} into
OUT/results.json (rows of the same benchmark are replaced). Everything it adds to the store is
deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from narfs.signing import load_secret_key

NIX = ["nix", "--extra-experimental-features", "nix-command"]
ENV = {**os.environ, "NIX_REMOTE": "local",
       "NIX_CONFIG": "substituters =\nbuild-users-group =\n"}
TREES = {"include": "/usr/include", "python": "/usr/lib/python3", "doc": "/usr/share/doc"}
MiB = 1 << 20


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=kw.pop("env", ENV), **kw)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def nix_string(s: str) -> str:
    return json.dumps(s).replace("${", "\\${")


def drv(name: str, script: str, salt: str, refs: str = "[ ]", extra: str = "") -> str:
    """A derivation whose builder runs `script`; `refs` (a Nix list expression) become
    references through $refs."""
    return (f"derivation {{ name = {nix_string(name)}; system = builtins.currentSystem; "
            f"builder = \"/bin/sh\"; PATH = \"/usr/bin:/bin\"; salt = {nix_string(salt)}; "
            f"refs = {refs}; {extra} args = [ \"-c\" {nix_string(script)} ]; }}")


def closure_expr(shape: str, small: int, salt: str) -> str:
    """A Nix expression for the top path of one benchmark closure (builders copy host trees:
    Nix here builds without a sandbox, as root)."""
    with_refs = " && chmod u+w $out && echo $refs > $out/.refs"
    lets = []
    if shape == "wide":
        for key, src in TREES.items():
            lets.append(f"{key} = {drv(f'narfs-bench-{key}', f'cp -a {src} $out', salt)};")
        script = ("mkdir -p $out/bin $out/share && echo $i > $out/share/VERSION"
                  " && head -c 4096 /dev/urandom | base64 > $out/share/data"
                  " && printf '#!/bin/sh\\necho %s\\n' $i > $out/bin/tool"
                  " && chmod +x $out/bin/tool")
        lib = drv("narfs-bench-lib", script, salt, extra="i = toString i;")
        lets.append(f"small = builtins.genList (i: {lib}) {small};")
        top_refs = f"[ {' '.join(TREES)} ] ++ small"
    else:
        prev = ""
        for key, src in TREES.items():
            script = f"cp -a {src} $out" + (with_refs if prev else "")
            lets.append(f"{key} = {drv(f'narfs-bench-chain-{key}', script, salt, f'[ {prev} ]')};")
            prev = key
        top_refs = f"[ {prev} ]"
    top = drv(f"narfs-bench-{shape}-top", "mkdir $out && echo $refs > $out/.refs", salt, top_refs)
    return "let " + " ".join(lets) + f" in {top}"


class Bench:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.key = work / "bench.key"
        self.cache = work / "cache"
        self.config = work / "narfs.toml"
        self.env = {**ENV, "NARFS_CONFIG": str(self.config)}
        self.narfs("init", "--cache", str(self.cache), "--secret-key", str(self.key))
        self.verify_cache = work / "verify-cache"
        self.narfs("init", "--cache", str(self.verify_cache), "--secret-key", str(self.key))
        self.tops: list[str] = []
        self.drvs: list[str] = []

    def narfs(self, *args: str) -> subprocess.CompletedProcess:
        return run([sys.executable, "-m", "narfs.cli", "-q", *args], env=self.env)

    @property
    def public_key(self) -> str:
        return load_secret_key(str(self.key)).public.text()

    def build(self, shape: str, small: int) -> tuple[str, list[str]]:
        link = self.work / f"result-{shape}"
        expr = closure_expr(shape, small, uuid.uuid4().hex)
        top = run(["nix-build", "-E", expr, "--out-link", str(link), "-j", "4"]).stdout.split()[0]
        self.tops.append(top)
        deriver = run(["nix-store", "--query", "--deriver", top]).stdout.strip()
        self.drvs += run(["nix-store", "--query", "--requisites", deriver]).stdout.split()
        self.narfs("archive", top)
        closure = run(["nix-store", "--query", "--requisites", top]).stdout.split()
        link.unlink()
        return top, closure

    def delete(self, closure: list[str]) -> None:
        present = [p for p in closure if os.path.exists(p)]
        if present:
            run(["nix-store", "--delete", *present])
        os.sync()  # clean inode-table blocks: ext4 then waits 60 s, not 6 min, to reuse them

    def restore(self, tool: str, top: str, closure: list[str]) -> float:
        if any(os.path.exists(p) for p in closure):
            raise SystemExit(f"{top}: its closure should be absent before a timed restore")
        if tool == "narfs":
            cmd = [sys.executable, "-m", "narfs.cli", "-q", "restore", top]
            env = self.env
        else:
            cmd = [*NIX, "copy", "--from", f"file://{self.cache}", "--option",
                   "trusted-public-keys", self.public_key, "--option", "require-sigs", "true",
                   top]
            env = ENV
        t0 = time.perf_counter()
        run(cmd, env=env)
        seconds = time.perf_counter() - t0
        missing = [p for p in closure if not os.path.exists(p)]
        if missing:
            raise SystemExit(f"{tool} left {len(missing)} paths of the closure out")
        return seconds

    def cleanup(self) -> None:
        for top in self.tops:
            closure = subprocess.run(["nix-store", "--query", "--requisites", top],
                                     capture_output=True, text=True, env=ENV).stdout.split()
            if closure:
                subprocess.run(["nix-store", "--delete", *closure], capture_output=True,
                               env=ENV)
        drvs = [d for d in dict.fromkeys(self.drvs) if os.path.exists(d)]
        if drvs:
            subprocess.run(["nix-store", "--delete", *drvs], capture_output=True, env=ENV)


ORDER = ("narfs", "nix", "nix", "narfs")  # ABBA: a drift during the run favours neither


def compare_restore(b: Bench, shape: str, small: int, reps: int, settle: float) -> dict:
    """Each timed run restores its own copy of the closure (same trees, another salt), all
    deleted before the first run: ext4 without a journal (as here) skips inodes freed in the
    last 1-6 minutes when it allocates, so a delete-then-restore loop would time that scan
    (it grows with every round) rather than the two commands."""
    print(f"building {2 * reps} copies of the {shape} closure ...", flush=True)
    copies = [b.build(shape, small) for _ in range(2 * reps)]
    if shape == "wide":  # verify is timed on a cache of this closure alone (no shared NARs)
        b.narfs("archive", "--cache", str(b.verify_cache), copies[0][0])
    for _, closure in copies:
        b.delete(closure)
    print(f"  settling {settle:.0f} s after the deletes ...", flush=True)
    time.sleep(settle)
    infos = json.loads(run([*NIX, "path-info", "--json", "-r", "--store", f"file://{b.cache}",
                            copies[0][0]]).stdout)
    size = sum(d["narSize"] for d in infos)
    times: dict[str, list[float]] = {"narfs": [], "nix": []}
    for i, (top, closure) in enumerate(copies):
        tool = ORDER[i % len(ORDER)]
        times[tool].append(b.restore(tool, top, closure))
        print(f"  {shape} run {i + 1}: {tool} {times[tool][-1]:.2f} s", flush=True)
    for _, closure in copies:
        b.delete(closure)
    narfs_s, nix_s = statistics.median(times["narfs"]), statistics.median(times["nix"])
    return {"benchmark": f"restore {shape} closure ({len(copies[0][1])} paths, "
                         f"{size / MiB:.0f} MiB)",
            "narfs_s": narfs_s, "anchor": "nix copy --from file://DIR (require-sigs)",
            "anchor_s": nix_s, "ratio": narfs_s / nix_s, "target": 1.0,
            "narfs_runs": times["narfs"], "anchor_runs": times["nix"]}


def compare_verify(b: Bench, reps: int) -> dict:
    cache = b.verify_cache
    nars = sorted(str(p) for p in (cache / "nar").iterdir())
    comp = sum(os.path.getsize(p) for p in nars)
    nar_bytes = 0
    for info in cache.glob("*.narinfo"):
        for line in info.read_text().splitlines():
            if line.startswith("NarSize: "):
                nar_bytes += int(line.split()[1])
    narfs_t, zstd_t = [], []
    b.narfs("verify", "--cache", str(cache))  # warm the page cache
    for _ in range(reps):
        t0 = time.perf_counter()
        b.narfs("verify", "--cache", str(cache))
        narfs_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        run(["zstd", "-q", "-t", *nars])
        zstd_t.append(time.perf_counter() - t0)
    narfs_s, zstd_s = statistics.median(narfs_t), statistics.median(zstd_t)
    return {"benchmark": f"verify {len(nars)} NARs ({nar_bytes / MiB:.0f} MiB NAR, "
                         f"{comp / MiB:.0f} MiB zstd)",
            "narfs_s": narfs_s, "anchor": "zstd -t (same files)", "anchor_s": zstd_s,
            "ratio": narfs_s / zstd_s, "narfs_MiB_per_s": nar_bytes / MiB / narfs_s,
            "anchor_MiB_per_s": nar_bytes / MiB / zstd_s, "cores": os.cpu_count()}


def show(rows: list[dict]) -> None:
    print(f"{'benchmark':60} {'narfs s':>8} {'anchor s':>9} {'ratio':>6}")
    for r in rows:
        print(f"{r['benchmark']:60} {r['narfs_s']:8.2f} {r['anchor_s']:9.2f} {r['ratio']:6.2f}"
              f"  ({r['anchor']})")


def merge(out: Path, rows: list[dict]) -> None:
    path = out / "results.json"
    old = []
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = []
    names = {r["benchmark"] for r in rows}
    path.write_text(json.dumps([r for r in old if r.get("benchmark") not in names] + rows,
                               indent=1) + "\n")
    print(f"merged {len(rows)} rows into {path}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="directory for results.json")
    ap.add_argument("--reps", type=int, default=3, help="timed runs of each command (median)")
    ap.add_argument("--small", type=int, default=30, help="small paths in the wide closure")
    ap.add_argument("--settle", type=float, default=70,
                    help="seconds to wait after deleting, before the timed restores")
    ap.add_argument("--skip", default="", help="comma list of: wide,chain,verify")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the benchmark adds to and deletes from /nix/store")
    skip = set(filter(None, args.skip.split(",")))
    if "wide" in skip and "verify" not in skip:
        raise SystemExit("verify is timed on the wide closure: do not skip wide")
    args.out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"warning: load average {load:.1f}: other work on this machine skews the figures",
              flush=True)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="narfs-bench-restore-") as tmp:
        b = Bench(Path(tmp))
        try:
            for shape in ("wide", "chain"):
                if shape not in skip:
                    rows.append(compare_restore(b, shape, args.small, args.reps, args.settle))
                    show(rows[-1:])
            if "verify" not in skip:
                print("timing verify ...", flush=True)
                rows.append(compare_verify(b, args.reps))
                show(rows[-1:])
        finally:
            b.cleanup()
    print()
    show(rows)
    merge(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
