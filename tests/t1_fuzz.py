"""Issue 7: a short coverage-guided run over every cache parser, seeded with real inputs.

The long run is the same harness with a larger -max_total_time (see tests/fuzz/fuzz_parsers.py).
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from narfs import listing, nar
from narfs.narinfo import NarInfo
from narfs.zstdseek import SeekableWriter

HARNESS = Path(__file__).parent / "fuzz" / "fuzz_parsers.py"
SECONDS = int(os.environ.get("NARFS_FUZZ_SECONDS", "8"))


def sample_tree(root: Path) -> None:
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "dir" / "sub" / "file").write_bytes(b"data" * 10)
    exe = root / "dir" / "run"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    (root / "link").symlink_to("dir/run")
    (root / "empty").write_bytes(b"")


def seeds(target: str, tmp: Path) -> Path:
    tree = tmp / "tree"
    tree.mkdir()
    sample_tree(tree)
    ser = nar.NarSerialiser(tree)
    data = b"".join(ser)
    corpus = tmp / "corpus"
    corpus.mkdir()
    if target == "nar":
        (corpus / "tree").write_bytes(data)
        (corpus / "file").write_bytes(nar.dump_bytes(tree / "empty"))
    elif target == "listing":
        (corpus / "ls").write_bytes(listing.render(ser.listing))
    elif target == "seektable":
        for frame in (64, 4096):
            out = io.BytesIO()
            w = SeekableWriter(out, frame, 3)
            w.write(data)
            w.close()
            (corpus / f"seek{frame}").write_bytes(out.getvalue())
    elif target == "narinfo":
        info = NarInfo(
            store_path="/nix/store/" + "a" * 32 + "-hello-2.12", url="nar/" + "b" * 52 + ".nar.zst",
            compression="zstd", file_hash="sha256:" + "b" * 52, file_size=1234,
            nar_hash="sha256:" + "c" * 52, nar_size=5678,
            references=["d" * 32 + "-glibc-2.37"], deriver="e" * 32 + "-hello-2.12.drv",
            sigs=["cache.nixos.org-1:" + "A" * 86 + "=="], ca=None)
        (corpus / "narinfo").write_text(info.render())
    return corpus


@pytest.mark.parametrize("target", ["nar", "narinfo", "seektable", "listing"])
def test_fuzz_target_finds_no_crash(target: str, tmp_path: Path) -> None:
    corpus = seeds(target, tmp_path)
    proc = subprocess.run(
        [sys.executable, str(HARNESS), target, f"-max_total_time={SECONDS}",
         "-rss_limit_mb=2048", "-timeout=10", str(corpus)],
        capture_output=True, text=True, timeout=SECONDS + 120, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"fuzzing {target} found a crash:\n{out[-4000:]}"
    runs = re.search(r"Done (\d+) runs", out)
    assert runs and int(runs.group(1)) > 1000, f"fuzzer barely ran:\n{out[-2000:]}"
    print(f"{target}: {runs.group(1)} inputs, no crash")
