#!/usr/bin/env python3
"""Benchmark `narfs restore` and `narfs verify` (issue 5).

    python tests/bench/bench_restore.py [--out bench-out] [--quick] [--restore-reps 3]
        [--small 30] [--settle 70] [--skip wide,chain,verify]

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

Rows are merged into OUT/results.json. --quick: the wide closure only, 2 × 2 copies, 20 s
settle; run.py's smoke profile copies /usr/include/linux alone. Everything it adds to the store
is deleted at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).parent.parent))
from common import (
    ENV,
    NARFS,
    NIX,
    Context,
    MiB,
    alternate,
    run,
    runs_row,
    show,
    standalone,
    timed,
)

from narfs.signing import load_secret_key
from nixtools import path_infos

TREES = {"include": "/usr/include", "python": "/usr/lib/python3", "doc": "/usr/share/doc"}


def nix_string(s: str) -> str:
    return json.dumps(s).replace("${", "\\${")


def drv(name: str, script: str, salt: str, refs: str = "[ ]", extra: str = "") -> str:
    """A derivation whose builder runs `script`; `refs` (a Nix list expression) become
    references through $refs."""
    return (f"derivation {{ name = {nix_string(name)}; system = builtins.currentSystem; "
            f"builder = \"/bin/sh\"; PATH = \"/usr/bin:/bin\"; salt = {nix_string(salt)}; "
            f"refs = {refs}; {extra} args = [ \"-c\" {nix_string(script)} ]; }}")


def closure_expr(shape: str, small: int, salt: str, trees: dict[str, str]) -> str:
    """A Nix expression for the top path of one benchmark closure (builders copy host trees:
    Nix here builds without a sandbox, as root)."""
    with_refs = " && chmod u+w $out && echo $refs > $out/.refs"
    lets = []
    if shape == "wide":
        for key, src in trees.items():
            lets.append(f"{key} = {drv(f'narfs-bench-{key}', f'cp -a {src} $out', salt)};")
        script = ("mkdir -p $out/bin $out/share && echo $i > $out/share/VERSION"
                  " && head -c 4096 /dev/urandom | base64 > $out/share/data"
                  " && printf '#!/bin/sh\\necho %s\\n' $i > $out/bin/tool"
                  " && chmod +x $out/bin/tool")
        lib = drv("narfs-bench-lib", script, salt, extra="i = toString i;")
        lets.append(f"small = builtins.genList (i: {lib}) {small};")
        top_refs = f"[ {' '.join(trees)} ] ++ small"
    else:
        prev = ""
        for key, src in trees.items():
            script = f"cp -a {src} $out" + (with_refs if prev else "")
            lets.append(f"{key} = {drv(f'narfs-bench-chain-{key}', script, salt, f'[ {prev} ]')};")
            prev = key
        top_refs = f"[ {prev} ]"
    top = drv(f"narfs-bench-{shape}-top", "mkdir $out && echo $refs > $out/.refs", salt, top_refs)
    return "let " + " ".join(lets) + f" in {top}"


class Bench:
    def __init__(self, work: Path, trees: dict[str, str] | None = None) -> None:
        self.work = work
        self.work.mkdir(parents=True, exist_ok=True)
        self.trees = trees or TREES
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
        return run([*NARFS, *args], env=self.env)

    @property
    def public_key(self) -> str:
        return load_secret_key(str(self.key)).public.text()

    def build(self, shape: str, small: int) -> tuple[str, list[str]]:
        link = self.work / f"result-{shape}"
        expr = closure_expr(shape, small, uuid.uuid4().hex, self.trees)
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
            cmd = [*NARFS, "restore", top]
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


def compare_restore(b: Bench, shape: str, small: int, reps: int, settle: float) -> dict:
    """Each timed run restores its own copy of the closure (same trees, another salt), all
    deleted before the first run: ext4 without a journal (as here) skips inodes freed in the
    last 1-6 minutes when it allocates, so a delete-then-restore loop would time that scan
    (it grows with every round) rather than the two commands. Runs alternate narfs and Nix
    (A B B A ...), so a drift during the run favours neither."""
    print(f"building {2 * reps} copies of the {shape} closure ...", flush=True)
    copies = [b.build(shape, small) for _ in range(2 * reps)]
    if shape == "wide":  # verify is timed on a cache of this closure alone (no shared NARs)
        b.narfs("archive", "--cache", str(b.verify_cache), copies[0][0])
    for _, closure in copies:
        b.delete(closure)
    print(f"  settling {settle:.0f} s after the deletes ...", flush=True)
    time.sleep(settle)
    infos = path_infos("-r", "--store", f"file://{b.cache}", copies[0][0])
    size = sum(i.nar_size for i in infos.values())
    left = iter(copies)
    times = alternate(reps, {"narfs": lambda: b.restore("narfs", *next(left)),
                             "nix copy --from": lambda: b.restore("nix", *next(left))},
                      f"restore {shape}")
    for _, closure in copies:
        b.delete(closure)
    return runs_row(f"restore {shape} closure ({len(copies[0][1])} paths, {size / MiB:.0f} MiB)",
                    times, "narfs", "nix copy --from", target=1.0,
                    notes=f"anchor nix copy --from file://DIR (require-sigs, the key trusted); "
                          f"each run restores its own copy of the closure; {settle:.0f} s "
                          f"settle after the deletes")


def compare_verify(b: Bench, reps: int) -> dict:
    cache = b.verify_cache
    nars = sorted(str(p) for p in (cache / "nar").iterdir())
    comp = sum(os.path.getsize(p) for p in nars)
    nar_bytes = 0
    for info in cache.glob("*.narinfo"):
        for line in info.read_text().splitlines():
            if line.startswith("NarSize: "):
                nar_bytes += int(line.split()[1])
    b.narfs("verify", "--cache", str(cache))  # warm the page cache
    times = alternate(reps, {"narfs": lambda: timed([*NARFS, "verify", "--cache", str(cache)],
                                                    env=b.env),
                             "zstd": lambda: timed(["zstd", "-q", "-t", *nars])}, "verify")
    r = runs_row(f"verify {len(nars)} NARs ({nar_bytes / MiB:.0f} MiB NAR, "
                 f"{comp / MiB:.0f} MiB zstd)", times, "narfs", "zstd",
                 notes="narfs verify (hashes, signatures, listings, catalog) against zstd -t "
                       "over the same NAR files (decompression and checksums only), warm",
                 cores=os.cpu_count())
    r["narfs_MiB_per_s"] = nar_bytes / MiB / r["narfs_s"]
    r["anchor_MiB_per_s"] = nar_bytes / MiB / r["anchor_s"]
    return r


def rows(ctx: Context, quick: bool) -> list[dict]:
    p = ctx.profile
    shapes = [s for s in p.restore_shapes if s not in ctx.skip]
    if "verify" not in ctx.skip and "wide" not in shapes:
        raise SystemExit("verify is timed on the wide closure: do not skip wide")
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"warning: load average {load:.1f}: other work on this machine skews the figures",
              flush=True)
    b = Bench(ctx.work / "restore", p.restore_trees)
    out: list[dict] = []
    try:
        for shape in shapes:
            out.append(compare_restore(b, shape, p.restore_small, p.restore_reps,
                                       p.restore_settle))
            show(out[-1:])
        if "verify" not in ctx.skip:
            print("timing verify ...", flush=True)
            out.append(compare_verify(b, p.restore_reps))
            show(out[-1:])
    finally:
        b.cleanup()
    return out


if __name__ == "__main__":
    sys.exit(standalone(__doc__, rows, {
        "--small": ("restore_small", int, "small paths in the wide closure"),
        "--settle": ("restore_settle", float,
                     "seconds to wait after deleting, before the timed restores"),
        "--restore-reps": ("restore_reps", int, "timed restores of each tool (2 × this many "
                                                "copies of the closure are built)")}))
