"""What every benchmark under tests/bench/ shares: running and timing commands, alternating a
narfs operation with its anchor, medians, result rows, merging results.json, the narfs mount, and
the corpus (real trees added to the real /nix/store, a large file, a salted closure of small
paths) that the benchmarks measure on.

Each bench_*.py exposes `rows(ctx, quick) -> list[dict]`; run.py runs them all on one `Context`
and writes the report, and each module stays runnable alone through `standalone`.

A row: {benchmark, narfs_s, anchor, anchor_s, ratio = narfs_s / anchor_s, unit, target, n,
notes, ...}. `anchor` names what narfs is measured against (`nix copy`, `nix copy --from`,
`nix store cat`, `ratarmount`, `native directory`, `nix-store --add-root`, `zstd`), or `target`
when the issue gives only a number (then anchor_s is that number). `target` is the largest ratio
the issues accept. Timings are medians of runs interleaved with the anchor's, in an order that
changes every repetition, so a drift in the load of this shared machine favours neither side.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

NIX = ["nix", "--extra-experimental-features", "nix-command"]
# Single-user Nix on an offline machine: no substituter look-ups (each costs seconds of
# retries), builds as root. Set for every child, as tests/conftest.py does.
os.environ["NIX_REMOTE"] = "local"
os.environ["NIX_CONFIG"] = "substituters =\nbuild-users-group =\n"
os.environ.pop("NARFS_CONFIG", None)  # never the machine's /etc/narfs: each Context has its own
ENV = dict(os.environ)
NARFS = [sys.executable, "-m", "narfs.cli", "-q"]
MiB = 1 << 20
# Command output goes to a real file, not /dev/null: GNU grep stops reading a file at its
# first match when its output is /dev/null, which would time a different job.
SCRATCH = Path("/dev/shm") if os.path.isdir("/dev/shm") else Path(tempfile.gettempdir())


# --- running and timing -------------------------------------------------------------------

def run(cmd: list[str], env: dict[str, str] | None = None,
        **kw) -> subprocess.CompletedProcess:
    """Run to completion; a failure ends the benchmark with the command's stderr."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env or ENV, **kw)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd[:6]))} failed ({proc.returncode}):\n"
                         f"{proc.stderr[-4000:]}")
    return proc


def timed(cmd: list[str], env: dict[str, str] | None = None, shell: bool = False,
          ok: tuple[int, ...] = (0,)) -> float:
    """Wall seconds from fork to exit; stdout to a scratch file, which is then removed.
    An exit code outside `ok` ends the benchmark (grep's 1, "no match", may be fine)."""
    fd, scratch = tempfile.mkstemp(prefix="narfs-bench-out-", dir=SCRATCH)
    try:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, stdout=fd, stderr=subprocess.PIPE, env=env or ENV,
                              shell=shell)
        seconds = time.perf_counter() - t0
    finally:
        os.close(fd)
        os.unlink(scratch)
    if proc.returncode not in ok:
        raise SystemExit(f"{cmd if shell else ' '.join(map(str, cmd[:6]))} failed "
                         f"({proc.returncode}):\n{proc.stderr.decode(errors='replace')[-4000:]}")
    return seconds


def drop_caches() -> None:
    """Empty the page, dentry and inode caches (root only): what "cold" means here."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def alternate(reps: int, fns: dict[str, Callable[[], float]],
              log: str | None = None) -> dict[str, list[float]]:
    """Each measurement `reps` times, interleaved; the order rotates every repetition and runs
    backwards every other round (A B, B A, B A, A B for two), so neither side always goes
    first after the other has warmed or loaded the machine."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(reps):
        k = i % len(names)
        order = names[k:] + names[:k]
        if (i // len(names)) % 2:
            order.reverse()
        for name in order:
            times[name].append(fns[name]())
        if log:
            print(f"  {log} {i + 1}/{reps}: " + ", ".join(
                f"{n} {times[n][-1]:.3f}" for n in names), flush=True)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


# --- rows and results ---------------------------------------------------------------------

def row(benchmark: str, narfs_s: float, anchor: str, anchor_s: float, *,
        target: float | None = None, unit: str = "s", n: int | None = None, notes: str = "",
        **extra: object) -> dict:
    """One result row. `target` is the largest ratio narfs/anchor the issue accepts."""
    if not (math.isfinite(narfs_s) and math.isfinite(anchor_s) and anchor_s > 0):
        raise ValueError(f"{benchmark}: bad measurement narfs={narfs_s} anchor={anchor_s}")
    r: dict = {"benchmark": benchmark, "narfs_s": narfs_s, "anchor": anchor,
               "anchor_s": anchor_s, "ratio": narfs_s / anchor_s, "unit": unit}
    if target is not None:
        r["target"] = target
    if n is not None:
        r["n"] = n
    if notes:
        r["notes"] = notes
    r.update(extra)
    return r


def runs_row(benchmark: str, times: dict[str, list[float]], narfs: str, anchor: str,
             anchor_key: str | None = None, **kw: object) -> dict:
    """A row from `alternate`'s timings: medians, with every run kept for the plots."""
    a = times[anchor_key or anchor]
    return row(benchmark, median(times[narfs]), anchor, median(a), n=len(a),
               narfs_runs=times[narfs], anchor_runs=a, **kw)


def met(r: dict) -> bool | None:
    return None if "target" not in r else r["ratio"] <= r["target"]


def merge(out: Path, rows: list[dict]) -> Path:
    """Add rows to OUT/results.json, replacing those with the same (benchmark, anchor)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    old: list[dict] = []
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = []
    keys = {(r["benchmark"], r["anchor"]) for r in rows}
    merged = [r for r in old if (r.get("benchmark"), r.get("anchor")) not in keys] + rows
    write_json(path, merged)
    return path


def write_json(path: Path, data: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    tmp.rename(path)


def fmt(value: float, unit: str) -> str:
    if unit == "s":
        return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"
    if unit == "bytes":
        return f"{value / MiB:.2f} MiB" if value >= MiB else f"{value / 1024:.1f} KiB"
    return f"{value:.1f} {unit}"


def show(rows: list[dict]) -> None:
    for r in rows:
        target = f"  (target ≤ {r['target']:g})" if "target" in r else ""
        print(f"{r['benchmark'][:60]:60} {fmt(r['narfs_s'], r['unit']):>11}  vs "
              f"{r['anchor']:20} {fmt(r['anchor_s'], r['unit']):>11}  ratio "
              f"{r['ratio']:.3f}{target}", flush=True)


# --- processes and mounts -----------------------------------------------------------------

def is_mounted(mountpoint: Path) -> bool:
    target = os.path.realpath(mountpoint)
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == target for line in f)


def pids_with(*words: bytes) -> list[int]:
    """Processes whose argv holds every one of `words` (as whole arguments)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                argv = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if all(w in argv for w in words):
                found.append(int(d.name))
    return found


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def alive(pid: int) -> bool:
    """Running (a zombie, ended but not yet reaped by its parent, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def unmount(mountpoint: Path, pid: int | None = None) -> None:
    """fusermount3 -u (a lazy unmount as the last resort), then wait for the server to end."""
    if is_mounted(mountpoint):
        if subprocess.run(["fusermount3", "-u", str(mountpoint)],
                          capture_output=True).returncode:
            time.sleep(0.5)
            if is_mounted(mountpoint) and subprocess.run(
                    ["fusermount3", "-u", str(mountpoint)], capture_output=True).returncode:
                subprocess.run(["fusermount3", "-uz", str(mountpoint)], capture_output=True)
    if pid is not None:
        for _ in range(300):
            if not alive(pid):
                return
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):  # our own server, by its id
            os.kill(pid, 9)


class Mount:
    """`narfs mount` as users run it (daemonised); `ready` is how long the command took."""

    def __init__(self, cache: Path, mountpoint: Path, env: dict[str, str],
                 args: tuple[str, ...] = ()) -> None:
        self.cache = cache
        self.path = mountpoint
        self.env = env
        self.args = args  # more `narfs mount` flags, e.g. ("--fuse-mode", "stock")
        self.ready = 0.0
        self.pid: int | None = None

    def __enter__(self) -> Mount:
        self.path.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        run([*NARFS, "mount", "--cache", str(self.cache), *self.args, str(self.path)],
            env=self.env)
        self.ready = time.perf_counter() - t
        pids = pids_with(b"mount", str(self.path).encode())
        if not pids:
            unmount(self.path)
            raise SystemExit(f"no narfs process serves {self.path}")
        self.pid = pids[0]
        return self

    def rss_mb(self) -> float:
        assert self.pid is not None
        return rss_mb(self.pid)

    def __exit__(self, *exc: object) -> None:
        unmount(self.path, self.pid)


# --- the corpus ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Profile:
    """How much data and how many repetitions: `full`, `quick` (≤ 8 min on 2 cores) or
    `smoke` (the test's: tiny trees, one repetition)."""

    name: str
    reps: int
    trees: dict[str, str]  # key → host tree added to the store
    large_mib: int  # one file of real binary data (shared libraries), in a store path
    small_paths: int  # a salted closure: this many small paths and one top referring to all
    synthetic_paths: int  # archived paths of the mount's scale rows (issue 3 asks 100,000)
    positions: int  # files read cold along a large NAR, for the read-by-position plot
    hook_builds: int
    hook_iterations: int
    latency_runs: int
    restore_reps: int
    restore_small: int
    restore_settle: float
    restore_shapes: tuple[str, ...] = ("wide",)
    restore_trees: dict[str, str] | None = None  # None: bench_restore's own (3 large trees)
    extra: dict[str, object] = field(default_factory=dict)


TREES = {"include": "/usr/include", "doc": "/usr/share/doc"}
PROFILES = {
    "full": Profile("full", reps=5, trees=TREES, large_mib=256, small_paths=500,
                    synthetic_paths=100_000, positions=12, hook_builds=8, hook_iterations=200,
                    latency_runs=15, restore_reps=3, restore_small=30, restore_settle=70,
                    restore_shapes=("wide", "chain")),
    "quick": Profile("quick", reps=5, trees=TREES, large_mib=128, small_paths=500,
                     synthetic_paths=20_000, positions=8, hook_builds=8, hook_iterations=40,
                     latency_runs=5, restore_reps=2, restore_small=30, restore_settle=20),
    # trees every machine that runs the test suite has (linux-libc-dev, python3.11)
    "smoke": Profile("smoke", reps=1, trees={"include": "/usr/include/linux",
                                             "doc": "/usr/share/doc/python3.11"},
                     large_mib=8, small_paths=5, synthetic_paths=2_000, positions=2,
                     hook_builds=2, hook_iterations=3, latency_runs=1, restore_reps=1,
                     restore_small=2, restore_settle=0,
                     restore_trees={"include": "/usr/include/linux"}),
}


class Corpus:
    """Store paths this run adds, each rooted by a link in `work` while the run lasts (other
    engineers' tests may run `nix-store --gc` meanwhile), all deleted by `cleanup`."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.work.mkdir(parents=True, exist_ok=True)
        self.links: list[Path] = []
        self.paths: list[str] = []  # oldest first

    def _root(self, path: str) -> None:
        link = self.work / f"root-{uuid.uuid4().hex[:8]}"
        run(["nix-store", "--add-root", str(link), "-r", path])
        self.links.append(link)
        self.paths.append(path)

    def add_tree(self, src: str, key: str) -> str:
        """`src` added with `nix-store --add` under a name of this run's own, through a
        read-only bind mount (no copy, nothing written into the host tree)."""
        view = self.work / f"{key}-narfs-bench-{uuid.uuid4().hex[:8]}"
        view.mkdir()
        run(["mount", "--bind", "-o", "ro", src, str(view)])
        try:
            path = run(["nix-store", "--add", str(view)]).stdout.strip()
        finally:
            run(["umount", str(view)])
            view.rmdir()
        self._root(path)
        return path

    def add_large_file(self, mib: int) -> str:
        """A path holding one file of `mib` MiB: the machine's shared libraries end to end
        (real binary data, about 3:1 with zstd), and a salt."""
        src = self.work / f"large-narfs-bench-{uuid.uuid4().hex[:8]}"
        src.mkdir()
        left = mib * MiB
        with open(src / "blob", "wb") as out:
            out.write(uuid.uuid4().bytes)
            left -= 16
            while left > 0:
                for lib in sorted(Path("/usr/lib/x86_64-linux-gnu").glob("*.so*")):
                    if left <= 0:
                        break
                    if lib.is_file() and not lib.is_symlink():
                        data = lib.read_bytes()[:left]
                        out.write(data)
                        left -= len(data)
        path = run(["nix-store", "--add", str(src)]).stdout.strip()
        shutil.rmtree(src)
        self._root(path)
        return path

    def add_small_closure(self, n: int) -> list[str]:
        """`n` small salted paths (a README, a script, some base64) and a top path referring
        to all of them, built by one nix-build; returns [top, *small]."""
        salt = uuid.uuid4().hex
        script = ("mkdir -p $out/bin $out/share/doc && echo \"$salt $i\" > $out/share/doc/README"
                  " && head -c $((512 + i * 37 % 8192)) /dev/urandom | base64 > $out/data"
                  " && printf '#!/bin/sh\\necho %s\\n' $i > $out/bin/tool"
                  " && chmod +x $out/bin/tool")
        small = (f"builtins.genList (i: derivation {{ name = \"narfs-bench-small-${{toString i}}\";"
                 f" system = builtins.currentSystem; builder = \"/bin/sh\";"
                 f" PATH = \"/usr/bin:/bin\"; salt = \"{salt}\"; i = toString i;"
                 f" args = [ \"-c\" {json.dumps(script)} ]; }}) {n}")
        expr = (f"let small = {small}; in derivation {{ name = \"narfs-bench-closure\";"
                f" system = builtins.currentSystem; builder = \"/bin/sh\";"
                f" PATH = \"/usr/bin:/bin\"; refs = small;"
                f" args = [ \"-c\" \"echo $refs > $out\" ]; }}")
        link = self.work / f"result-small-{uuid.uuid4().hex[:8]}"
        top = run(["nix-build", "-E", expr, "--out-link", str(link), "-j", "4"]).stdout.split()[0]
        self.links.append(link)
        closure = run(["nix-store", "--query", "--requisites", top]).stdout.split()
        small_paths = [p for p in closure if p != top]
        self.paths += [*small_paths, top]
        return [top, *small_paths]

    def cleanup(self) -> None:
        """Unroot, then delete exactly what this corpus created (and its .drv files)."""
        for link in self.links:
            if link.is_symlink():
                link.unlink()
        drvs = []
        for p in self.paths:
            q = subprocess.run(["nix-store", "--query", "--deriver", p], capture_output=True,
                               text=True, env=ENV).stdout.strip()
            if q.endswith(".drv") and os.path.exists(q):
                drvs.append(q)
        doomed = [p for p in dict.fromkeys(self.paths[::-1] + drvs) if os.path.exists(p)]
        if doomed and subprocess.run(["nix-store", "--delete", *doomed], capture_output=True,
                                     env=ENV).returncode:
            for p in doomed:  # newest first: a path goes once nothing left refers to it
                subprocess.run(["nix-store", "--delete", p], capture_output=True, env=ENV)
        self.paths.clear()
        self.links.clear()


class Context:
    """One benchmark run: its work directory, profile, corpus (built on first use) and a narfs
    cache holding the whole corpus (archived on first use), shared by the bench modules."""

    def __init__(self, work: Path, profile: Profile, skip: set[str] | None = None) -> None:
        self.work = work
        self.profile = profile
        self.skip = skip or set()
        self.corpus = Corpus(work / "corpus")
        self.key = work / "secret.key"
        self.config = work / "narfs.toml"
        self.config.write_text(f'cache_dir = "{work / "cache"}"\n')
        self.env = {**ENV, "NARFS_CONFIG": str(self.config)}
        self.series: dict[str, object] = {}  # raw data for the report's plots
        self._trees: dict[str, str] = {}
        self._large: str | None = None
        self._small: list[str] | None = None
        self._cache: Path | None = None

    @property
    def reps(self) -> int:
        return self.profile.reps

    def narfs(self, *args: str) -> subprocess.CompletedProcess:
        return run([*NARFS, *args], env=self.env)

    def tree(self, key: str) -> str:
        if key not in self._trees:
            t = time.perf_counter()
            self._trees[key] = self.corpus.add_tree(self.profile.trees[key], key)
            print(f"corpus: {self.profile.trees[key]} → {self._trees[key]} "
                  f"({time.perf_counter() - t:.1f} s)", flush=True)
        return self._trees[key]

    def tree_label(self, key: str) -> str:
        return self.profile.trees[key]

    def large(self) -> str:
        if self._large is None:
            self._large = self.corpus.add_large_file(self.profile.large_mib)
            print(f"corpus: {self.profile.large_mib} MiB file → {self._large}", flush=True)
        return self._large

    def small(self) -> list[str]:
        """[top, *small paths]: the salted closure."""
        if self._small is None:
            t = time.perf_counter()
            self._small = self.corpus.add_small_closure(self.profile.small_paths)
            print(f"corpus: closure of {len(self._small)} small paths "
                  f"({time.perf_counter() - t:.1f} s)", flush=True)
        return self._small

    def cache(self) -> Path:
        """A narfs cache (signed) holding the whole corpus."""
        if self._cache is None:
            cache = self.work / "cache"
            self.narfs("init", "--cache", str(cache), "--secret-key", str(self.key))
            paths = [self.tree(k) for k in self.profile.trees] + [self.large(),
                                                                  self.small()[0]]
            self.narfs("archive", "--cache", str(cache), "--secret-key", str(self.key), *paths)
            self._cache = cache
        return self._cache

    def close(self) -> None:
        self.corpus.cleanup()


@contextlib.contextmanager
def context(profile: Profile, skip: set[str] | None = None,
            prefix: str = "narfs-bench-") -> Iterator[Context]:
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        ctx = Context(Path(tmp), profile, skip)
        try:
            yield ctx
        finally:
            ctx.close()


def profile_for(quick: bool, smoke: bool = False) -> Profile:
    return PROFILES["smoke" if smoke else "quick" if quick else "full"]


def standalone(doc: str, rows_fn: Callable[[Context, bool], list[dict]],
               options: dict[str, tuple[str, type, str]] | None = None) -> int:
    """`main` of a bench module run alone: --out DIR (merged into DIR/results.json), --quick,
    --reps, --skip, and `options` ({flag: (Profile field or "extra.NAME", type, help)}) on top
    of the profile."""
    ap = argparse.ArgumentParser(description=doc.strip().split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=doc)
    ap.add_argument("--out", type=Path, default=Path("bench-out"),
                    help="directory for results.json (default bench-out)")
    ap.add_argument("--quick", action="store_true", help="the quick profile (smaller data)")
    ap.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--reps", type=int, help="repetitions of each measurement (median)")
    ap.add_argument("--skip", default="", help="comma list of sections to leave out")
    for flag, (_, typ, text) in (options or {}).items():
        ap.add_argument(flag, type=typ, help=text)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the benchmarks add to /nix/store, mount and drop caches")
    profile = profile_for(args.quick, args.smoke)
    if args.reps:
        profile = replace(profile, reps=args.reps)
    for flag, (name, _, _) in (options or {}).items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is None:
            continue
        if name.startswith("extra."):  # a module's own setting, read from profile.extra
            profile = replace(profile, extra={**profile.extra, name[6:]: value})
        else:
            profile = replace(profile, **{name: value})
    with context(profile, set(filter(None, args.skip.split(",")))) as ctx:
        rows = rows_fn(ctx, args.quick)
    path = merge(args.out, rows)
    print()
    show(rows)
    print(f"merged {len(rows)} rows into {path}")
    return 0
