"""Issue 12, below FUSE: which mount mode a pyfuse3 and a setting give (narfs/mount.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyfuse3
import pytest

from narfs import fs, mount, mounttable
from narfs.errors import NarfsError


def test_fast_needs_the_patch_and_stock_is_always_there(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    assert fs.fast_capable() == hasattr(pyfuse3.FileInfo(), "cache_readdir")
    monkeypatch.setattr(mount, "fast_capable", lambda: False)
    assert mount.choose_mode("auto") is False
    assert mount.choose_mode("stock") is False
    with pytest.raises(NarfsError, match="tools/install-pyfuse3"):
        mount.choose_mode("fast")
    assert "lacks narfs's patch" in mount.describe_mode(False, "auto")
    monkeypatch.setattr(mount, "fast_capable", lambda: True)
    assert mount.choose_mode("auto") is True
    assert mount.choose_mode("fast") is True
    assert mount.choose_mode("stock") is False
    assert "fuse_mode = stock" in mount.describe_mode(False, "stock")


def test_status_reads_each_mounts_mode_from_untrusted_state_files(tmp_path: Path) -> None:
    """`<cache>/.narfs/mount-<pid>.json`: only a live process's own file counts; symlinks,
    FIFOs and lying contents are skipped without hanging; dead processes' files are removed."""
    d = tmp_path / ".narfs"
    d.mkdir()
    (d / mounttable.state_name(os.getpid())).write_bytes(mounttable.state_text("/mnt/a", "fast"))
    assert mounttable.mode_of(str(d), "/mnt/a") == "fast"
    assert mounttable.mode_of(str(d), "/mnt/b") is None
    dead = 2**22 + 12345  # above pid_max's default ceiling: no such process
    (d / mounttable.state_name(dead)).write_text(json.dumps(
        {"pid": dead, "mountpoint": "/mnt/b", "mode": "stock"}))
    (d / "mount-1.json").symlink_to(d / mounttable.state_name(os.getpid()))  # pid 1 is alive
    os.mkfifo(d / "mount-2.json")
    (d / "mount-3.json").write_text(json.dumps({"pid": os.getpid(), "mountpoint": "/mnt/c",
                                                "mode": "fast"}))  # names another pid
    assert mounttable.mode_of(str(d), "/mnt/b") is None
    assert mounttable.mode_of(str(d), "/mnt/c") is None
    mounttable.remove_stale_states(str(d))
    assert not (d / mounttable.state_name(dead)).exists()
    assert (d / mounttable.state_name(os.getpid())).exists()
