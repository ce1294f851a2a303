"""`narfs doctor` (issue 16): a whole, working setup passes; each broken piece is named with
its fix and makes the exit status non-zero."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Narfs
from narfs.storepath import GC_ROOTS_DIR

HOOK = Path(__file__).resolve().parent.parent / "systemd" / "narfs-hook"


@pytest.fixture
def roots() -> Iterator[Path]:
    top = Path(GC_ROOTS_DIR) / f"narfs-test-{uuid.uuid4().hex[:12]}"
    try:
        yield top / "roots"
    finally:
        shutil.rmtree(top, ignore_errors=True)


def configure(narfs: Narfs, roots: Path, hook_roots: Path) -> None:
    lines = [x for x in narfs.config.read_text().splitlines() if not x.startswith("roots_dir")]
    narfs.config.write_text("\n".join([*lines, f'roots_dir = "{roots}"', ""]))
    narfs.env["NIX_CONFIG"] = (f"{os.environ.get('NIX_CONFIG', '')}\n"
                               f"post-build-hook = {HOOK}\n"
                               f"extra-substituters = file://{narfs.cache}\n"
                               f"extra-trusted-public-keys = {narfs.public_key}\n")
    narfs.env["NARFS_ROOTS"] = str(hook_roots)  # what the hook would get from Nix


def doctor(narfs: Narfs) -> tuple[int, str]:
    proc = narfs("doctor", check=False)
    assert not proc.stderr, proc.stderr
    return proc.returncode, proc.stdout


def test_doctor(narfs: Narfs, roots: Path) -> None:
    # Nothing set up in Nix: the hook, the substituter and the key are named, with the lines.
    code, out = doctor(narfs)
    assert code == 1
    assert "FAIL  nix.conf: no post-build-hook" in out and "fix: add `post-build-hook = " in out
    assert f"fix: add `extra-substituters = file://{narfs.cache}`" in out
    assert f"fix: add `extra-trusted-public-keys = {narfs.public_key}`" in out
    assert "FAIL  narfs watch: not running" in out and "fix: systemctl enable --now" in out

    configure(narfs, roots, roots)
    watch = narfs.popen("watch", stderr=subprocess.DEVNULL)
    try:
        state = narfs.cache / ".narfs" / "watch.json"
        deadline = time.monotonic() + 30
        while not state.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        code, out = doctor(narfs)
        assert code == 0, out
        assert out.splitlines()[-1] == "no problems found"
        assert f"ok    nix.conf: post-build-hook {HOOK}" in out
        assert f"ok    narfs watch: running (pid {watch.pid})" in out
        assert "ok    pins: 0 pins waiting" in out

        # The hook pinning where the service does not look.
        narfs.env["NARFS_ROOTS"] = str(roots.parent / "elsewhere")
        code, out = doctor(narfs)
        assert code == 1
        assert f"FAIL  roots dir: the hook pins in {roots.parent / 'elsewhere'}" in out
        narfs.env["NARFS_ROOTS"] = str(roots)
    finally:
        watch.terminate()
        watch.wait(30)
    code, out = doctor(narfs)
    assert code == 1 and "FAIL  narfs watch: not running" in out
    assert out.splitlines()[-1] == "1 problem found"

    # A pin left waiting for an hour: named with its age.
    pin = roots / ("0" * 32 + "-narfs-doctor")
    pin.symlink_to(f"/nix/store/{pin.name}")
    os.utime(pin, (time.time() - 3600,) * 2, follow_symlinks=False)
    code, out = doctor(narfs)
    assert code == 1 and "WARN  pins: 1 pin waiting, the oldest pinned 1 h ago" in out, out
