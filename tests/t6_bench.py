"""The benchmark command (tests/bench/run.py, issue 6) in its smoke profile: tiny trees, one
repetition, 2,000 synthetic paths. Every required row is there and well formed, and the report
has its table and plots. Timings are reported, never asserted."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

RUN = Path(__file__).parent / "bench" / "run.py"

# (benchmark name pattern, anchor): what issue 6 asks for, by name + anchor
REQUIRED = [
    (r"^archive .+ \(large tree\)$", "nix copy"),
    (r"^archive \d+ small paths", "nix copy"),
    (r"^compressed size: ", "nix copy"),
    (r"^restore wide closure", "nix copy --from"),
    (r"^cold read of one file deep in a .* path$", "nix store cat"),
    (r"^ls -lR over .+, cold$", "native directory"),
    (r"^ls -lR over .+, warm$", "native directory"),
    (r"^grep -r over .+, cold$", "native directory"),
    (r"^grep -r over .+, warm$", "native directory"),
    (r"^ls -lR over .+, cold$", "ratarmount"),
    (r"^ls -lR over .+, warm$", "ratarmount"),
    (r"^grep -r over .+, cold$", "ratarmount"),
    (r"^grep -r over .+, warm$", "ratarmount"),
    (r"^narfs-hook per build", "nix-store --add-root"),
    (r"^build end → archived", "target"),
    (r"^mount start, 2,000 archived paths", "target"),
    (r"^ls MOUNTPOINT \| wc -l, 2,000 archived paths", "target"),
    (r"^mount RSS, 2,000 archived paths", "target"),
    (r"^compress .+ \(physical limit\)$", "zstd"),
]
PLOTS = ["ratios.png", "tree_ops.png", "read_by_position.png", "runs.png"]


def _check_tools() -> None:
    """Root is the suite's premise; the rest the README's install command provides, so a
    missing one fails (a skip would hide a broken install step)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (drops the page cache, mounts, adds to /nix/store)")
    for tool in ("nix-store", "fusermount3", "zstd"):
        assert shutil.which(tool), f"{tool} not installed"
    beside = Path(sys.executable).parent / "ratarmount"  # a venv's bin/ need not be on PATH
    assert os.access(beside, os.X_OK) or shutil.which("ratarmount"), \
        "ratarmount not installed (pip install -e '.[test,bench]')"
    import matplotlib  # noqa: F401  (the report's plots)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_smoke_run_writes_every_row_and_the_report(tmp_path: Path) -> None:
    _check_tools()
    out = tmp_path / "out"
    scratch = tmp_path / "tmp"  # the run's mounts live here, apart from any other run's
    scratch.mkdir()
    proc = subprocess.run([sys.executable, str(RUN), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=400,
                          env={**os.environ, "TMPDIR": str(scratch)})
    print(proc.stdout[-6000:])  # the figures, for whoever reads the log
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    rows = json.loads((out / "results.json").read_text())
    assert isinstance(rows, list) and rows
    for r in rows:
        for key in ("benchmark", "narfs_s", "anchor", "anchor_s", "ratio"):
            assert key in r, (key, r)
        for key in ("narfs_s", "anchor_s", "ratio"):
            assert isinstance(r[key], int | float) and math.isfinite(r[key]), (key, r)
        assert r["narfs_s"] > 0 and r["anchor_s"] > 0, r
        assert math.isclose(r["ratio"], r["narfs_s"] / r["anchor_s"], rel_tol=1e-9), r
    for pattern, anchor in REQUIRED:
        assert any(re.search(pattern, r["benchmark"]) and r["anchor"] == anchor
                   for r in rows), f"no row {pattern!r} against {anchor!r}"
    allowed = {"nix copy", "nix copy --from", "nix store cat", "ratarmount", "native directory",
               "nix-store --add-root", "zstd", "target"}
    assert {r["anchor"] for r in rows} <= allowed

    with open("/proc/self/mounts") as f:  # every mount of the run is gone
        assert not [line for line in f if str(scratch) in line]

    report = (out / "report.md").read_text()
    assert "| benchmark | narfs | anchor | anchor value | ratio | target |" in report
    for r in rows:
        assert f"| {r['benchmark'].replace('|', chr(92) + '|')} |" in report, r["benchmark"]
    for name in PLOTS:
        assert f"]({name})" in report, name
        png = out / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
