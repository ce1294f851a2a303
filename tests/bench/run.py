#!/usr/bin/env python3
"""One benchmark command: narfs against every anchor, side by side, in one run (issue 6).

    python tests/bench/run.py [--quick] [--out DIR] [--only SECTIONS] [--skip SECTIONS]
    python tests/bench/run.py --report-only [--out DIR]

Run as root on a machine with Nix (single-user; NIX_REMOTE=local is set here), FUSE, zstd and
the test extras (ratarmount, matplotlib). It builds one corpus from real trees (/usr/include and
/usr/share/doc added to the store, a large file, a salted closure of small paths; common.py),
runs each narfs operation and its anchor alternately on the same data, and writes

  DIR/results.json   rows {benchmark, narfs_s, anchor, anchor_s, ratio = narfs_s/anchor_s
                     (medians), unit, target, n, notes, ...}; `target` is the largest ratio
                     the issues accept
  DIR/report.md      the table, what each ratio means, the plots (DIR/*.png)
  DIR/series.json    raw data behind the plots; DIR/meta.json the run's profile and times

Sections (--only/--skip take these, and the sub-sections the modules know):
  archive   narfs archive vs nix copy --to file://DIR?compression=zstd: large trees, a large
            file, a closure of small paths; compressed size; and (limit) vs `zstd -3 -T0`
            over the same NAR bytes, the physical limit (bench_archive.py)
  mount     cold read vs nix store cat, ls -lR / grep -r cold and warm vs the native
            directory and ratarmount, mount start / ls / RSS with many paths (bench_mount.py)
  restore   narfs restore vs nix copy --from; verify vs zstd -t (bench_restore.py)
  watch     narfs-hook vs nix-store --add-root; build end → archived (bench_watch.py)

--quick finishes within 8 minutes on a 2-core machine (about 4.5 here): 20,000 synthetic
paths instead of 100,000, a 128 MiB large file (full: 256), restore of the wide closure only,
its 3 trees copied 4 times with a 20 s settle (full: 6 times, 70 s, and the chain closure too);
5 repetitions either way; the full run also archives both trees together. Everything added to
/nix/store is deleted at the end, every mount unmounted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import textwrap
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_archive
import bench_mount
import bench_restore
import bench_watch
from common import (
    context,
    fmt,
    merge,
    met,
    profile_for,
    show,
    write_json,
)

SECTIONS = ("archive", "mount", "restore", "watch")
ANCHOR_MEANING = {
    "nix copy": "`nix copy --to file://DIR?compression=zstd` of the same paths into a fresh "
                "directory (for sizes: its NAR files' bytes)",
    "nix copy --from": "`nix copy --from file://DIR` (signatures required) of the same closure "
                       "from the same narfs-written cache",
    "nix store cat": "`nix store cat --store file://DIR` of the same file, page cache dropped",
    "native directory": "the same command on the same trees in /nix/store, on local disk",
    "ratarmount": "the same command through ratarmount mounting the same trees as a "
                  "multi-frame .tar.zst (4 MiB frames, level 3)",
    "nix-store --add-root": "the seed's post-build-hook (`nix-store --add-root LINK -r` per "
                            "path), fork to exit",
    "zstd": "`zstd -3 -T0` over the NAR bytes already in the page cache (compression alone), "
            "or `zstd -t` over the same NAR files (verify)",
    "target": "the issue's number itself (anchor value = the target)",
}


RUNNERS = {"archive": bench_archive.rows, "mount": bench_mount.rows,
           "restore": bench_restore.rows, "watch": bench_watch.rows}


# --- report -------------------------------------------------------------------------------

def cell(text: str) -> str:
    """Text for a Markdown table cell (`ls MOUNTPOINT | wc -l` holds a pipe)."""
    return text.replace("|", "\\|")


def table(rows: list[dict]) -> str:
    lines = ["| benchmark | narfs | anchor | anchor value | ratio | target | |",
             "| --- | ---: | --- | ---: | ---: | ---: | --- |"]
    for r in rows:
        ok = met(r)
        verdict = "" if ok is None else "met" if ok else "**missed**"
        target = f"≤ {r['target']:g}" if "target" in r else ""
        lines.append(f"| {cell(r['benchmark'])} | {fmt(r['narfs_s'], r['unit'])} | {r['anchor']} | "
                     f"{fmt(r['anchor_s'], r['unit'])} | {r['ratio']:.3g} | {target} | "
                     f"{verdict} |")
    return "\n".join(lines)


def plots(out: Path, rows: list[dict], series: dict) -> list[tuple[str, str]]:
    """PNG files in `out`; returns (file name, caption) for each one drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = []

    # 1. every ratio, log scale, with its target
    fig, ax = plt.subplots(figsize=(10, 0.32 * len(rows) + 1.5))
    labels = [f"{r['benchmark'][:58]} / {r['anchor']}" for r in rows]
    colours = ["#999999" if met(r) is None else "#2a9d4a" if met(r) else "#d1495b"
               for r in rows]
    y = range(len(rows))
    ax.barh(list(y), [r["ratio"] for r in rows], color=colours)
    for i, r in enumerate(rows):
        if "target" in r:
            ax.plot([r["target"]] * 2, [i - 0.4, i + 0.4], color="black", lw=2)
    ax.axvline(1.0, color="black", lw=0.5, ls=":")
    ax.set_xscale("log")
    ax.set_yticks(list(y), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ratio narfs / anchor (log; black tick: target, green met, red missed)")
    fig.tight_layout()
    fig.savefig(out / "ratios.png", dpi=110)
    plt.close(fig)
    drawn.append(("ratios.png", "Every ratio against its target (lower is better for narfs)"))

    # 2. ls -lR and grep -r, cold and warm: narfs, native directory, ratarmount
    tree = [r for r in rows if "temperature" in r]
    if tree:
        groups = list(dict.fromkeys((r["op"], r["temperature"]) for r in tree))
        sides = ["narfs", *dict.fromkeys(r["anchor"] for r in tree)]
        fig, ax = plt.subplots(figsize=(9, 4.5))
        width = 0.8 / len(sides)
        for j, side in enumerate(sides):
            vals = []
            for g in groups:
                match = [r for r in tree if (r["op"], r["temperature"]) == g]
                if side == "narfs":
                    vals.append(match[0]["narfs_s"] if match else 0)
                else:
                    vals.append(next((r["anchor_s"] for r in match if r["anchor"] == side), 0))
            xs = [i + (j - (len(sides) - 1) / 2) * width for i in range(len(groups))]
            ax.bar(xs, vals, width, label=side)
        ax.set_xticks(range(len(groups)), [f"{op}\n{temp}" for op, temp in groups])
        ax.set_yscale("log")
        ax.set_ylabel("seconds (median, log)")
        ax.set_title(tree[0]["benchmark"].split(" over ")[1].rsplit(",", 1)[0])
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "tree_ops.png", dpi=110)
        plt.close(fig)
        drawn.append(("tree_ops.png", "`ls -lR` and `grep -r`, cold (fresh mount, page cache "
                                      "dropped) and warm: narfs against the native directory "
                                      "and ratarmount"))

    # 3. cold read latency by position in a large NAR
    pos = series.get("read_by_position")
    if pos and pos["points"]:
        pts = sorted(pos["points"], key=lambda p: p["nar_offset"])
        xs = [p["nar_offset"] / (1 << 20) for p in pts]
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.plot(xs, [p["narfs_s"] * 1000 for p in pts], "o-", label="narfs mount (fresh)")
        ax.plot(xs, [p["anchor_s"] * 1000 for p in pts], "s-", label="nix store cat")
        ax.set_yscale("log")
        ax.set_xlabel(f"position of the file in the NAR of {pos['path']} (MiB of "
                      f"{pos['nar_size'] / (1 << 20):.0f})")
        ax.set_ylabel("cold read of the whole file, ms (log)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "read_by_position.png", dpi=110)
        plt.close(fig)
        drawn.append(("read_by_position.png", "Cold read of one small file by its position "
                                              "in a large path: narfs decompresses the frames "
                                              "that cover it, Nix the whole NAR"))

    # 4. per-run spread where the runs are kept: hook and build-to-archived
    spread = [r for r in rows if r.get("narfs_runs") and r["anchor"] in
              ("nix-store --add-root", "nix copy --from", "nix copy")
              and r["unit"] == "s" and not r["benchmark"].startswith("compressed")]
    if spread:
        cols = min(4, len(spread))
        nrows = -(-len(spread) // cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 3.4 * nrows),
                                 squeeze=False)
        for ax in axes.flat[len(spread):]:
            ax.set_visible(False)
        for ax, r in zip(axes.flat, spread, strict=False):
            ax.boxplot([[x * 1000 for x in r["narfs_runs"]],
                        [x * 1000 for x in r["anchor_runs"]]],
                       tick_labels=["narfs", r["anchor"]])
            ax.set_title(textwrap.fill(r["benchmark"], 36), fontsize=8)
            ax.set_ylim(bottom=0)
            ax.tick_params(labelsize=7)
            ax.set_ylabel("ms", fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "runs.png", dpi=110)
        plt.close(fig)
        drawn.append(("runs.png", "Every run, where the spread matters: archive, restore, "
                                  "the hook and build end → archived"))
    return drawn


def write_report(out: Path) -> Path:
    rows = json.loads((out / "results.json").read_text())
    series = json.loads((out / "series.json").read_text()) if (out / "series.json").exists() \
        else {}
    meta = json.loads((out / "meta.json").read_text()) if (out / "meta.json").exists() else {}
    drawn = plots(out, rows, series)
    missed = [r for r in rows if met(r) is False]
    parts = ["# narfs benchmarks", ""]
    if meta:
        parts += [f"{meta.get('date', '')}: profile `{meta.get('profile', '?')}`, "
                  f"{meta.get('cores')} cores, {meta.get('kernel', '')}, narfs "
                  f"{meta.get('revision', '')}; wall time {meta.get('wall_s', 0):.0f} s; "
                  f"load average {meta.get('load_start', 0):.1f} at the start, "
                  f"{meta.get('load_end', 0):.1f} at the end.", ""]
        if meta.get("errors"):
            parts += ["Sections that failed: " + "; ".join(meta["errors"]), ""]
    parts += ["Every figure is a median of runs alternated with the anchor's on the same data "
              "(ratio = narfs / anchor: below 1 narfs is faster or smaller). `target` is the "
              "largest ratio the issues accept.", "", table(rows), ""]
    parts += ["## What the anchors are", ""]
    parts += [f"- `{a}`: {text}" for a, text in ANCHOR_MEANING.items()
              if any(r["anchor"] == a for r in rows)]
    parts += ["", "## Targets missed", ""]
    parts += [f"- {r['benchmark']} vs {r['anchor']}: ratio {r['ratio']:.3g}, target ≤ "
              f"{r['target']:g} ({r['ratio'] / r['target']:.2g}× over)" for r in missed] \
        or ["None."]
    parts += ["", "## Plots", ""]
    for name, caption in drawn:
        parts += [f"![{caption}]({name})", "", f"*{caption}.*", ""]
    parts += ["## Notes per row", ""]
    parts += [f"- {r['benchmark']} / {r['anchor']}: {r['notes']}" for r in rows
              if r.get("notes")]
    path = out / "report.md"
    path.write_text("\n".join(parts) + "\n")
    return path


# --- main ---------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 2)[2])
    ap.add_argument("--quick", action="store_true", help="smaller data, ≤ 8 minutes")
    ap.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tests/test_bench
    ap.add_argument("--out", type=Path, default=Path("bench-out"), help="default bench-out/")
    ap.add_argument("--only", default="", help=f"comma list of {', '.join(SECTIONS)}")
    ap.add_argument("--skip", default="", help="comma list of sections or sub-sections")
    ap.add_argument("--reps", type=int, help="override the profile's repetitions")
    ap.add_argument("--report-only", action="store_true",
                    help="redraw report.md and the plots from DIR/results.json")
    args = ap.parse_args()
    out = args.out
    if args.report_only:
        print(f"wrote {write_report(out)}")
        return 0
    if os.geteuid() != 0:
        raise SystemExit("run as root: the benchmarks add to /nix/store, mount and drop caches")
    only = [s for s in args.only.split(",") if s] or list(SECTIONS)
    skip = set(filter(None, args.skip.split(",")))
    unknown = set(only) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown section {sorted(unknown)[0]!r}; known: {', '.join(SECTIONS)}")
    profile = profile_for(args.quick, args.smoke)
    if args.reps:
        profile = replace(profile, reps=args.reps)
    out.mkdir(parents=True, exist_ok=True)
    partial = bool(args.only or skip)
    if not partial:  # a whole run replaces the last one's results
        for old in [*out.glob("*.png"), out / "results.json", out / "series.json"]:
            old.unlink(missing_ok=True)
    series_path = out / "series.json"
    series = json.loads(series_path.read_text()) if partial and series_path.exists() else {}
    revision = subprocess.run(["git", "-C", str(Path(__file__).parent), "describe", "--always",
                               "--dirty"], capture_output=True, text=True).stdout.strip()
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "profile": profile.name, "profile_settings": asdict(profile),
            "cores": os.cpu_count(), "kernel": platform.release(), "revision": revision,
            "load_start": os.getloadavg()[0], "sections": {}, "errors": []}
    t_start = time.perf_counter()
    all_rows: list[dict] = []
    with context(profile, skip) as ctx:
        for section in SECTIONS:
            if section not in only or section in skip:
                continue
            print(f"\n=== {section} ({profile.name}) ===", flush=True)
            t = time.perf_counter()
            try:
                rows = RUNNERS[section](ctx, args.quick)
            except (Exception, SystemExit) as e:
                traceback.print_exc()
                meta["errors"].append(f"{section}: {str(e).strip().splitlines()[0][:200]}")
                rows = []
            meta["sections"][section] = round(time.perf_counter() - t, 1)
            print(f"=== {section}: {meta['sections'][section]:.0f} s", flush=True)
            all_rows += rows
            merge(out, rows)  # what is done survives a later failure
            series.update(ctx.series)
            write_json(series_path, series)
    meta["wall_s"] = time.perf_counter() - t_start
    meta["load_end"] = os.getloadavg()[0]
    write_json(out / "meta.json", meta)
    if not (out / "results.json").exists():
        write_json(out / "results.json", [])
    report = write_report(out)
    print()
    show(all_rows)
    print(f"\n{len(all_rows)} rows in {out / 'results.json'}; report {report}; "
          f"wall {meta['wall_s']:.0f} s" + (f"; FAILED: {meta['errors']}" if meta["errors"]
                                             else ""))
    return 1 if meta["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
