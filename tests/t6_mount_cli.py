"""`narfs mount`/`umount` as mount(8) users expect (issue 16): the configured mountpoint when
none is given, `-o ro` accepted, a non-empty directory refused unless `-o nonempty`, and a
user who cannot use FUSE told why (not pointed at a log they cannot read)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from mounting import is_mounted, unmount

from conftest import Narfs
from narfs.mounttable import FUSE_DEVICE
from nixtools import nobody_narfs, one_line_error


def test_configured_mountpoint_ro_and_nonempty(narfs: Narfs, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    narfs.config.write_text(narfs.config.read_text() + f'mountpoint = "{mnt}"\n')
    (mnt / "left-over").write_text("a file the mount would hide\n")
    try:
        err = one_line_error(narfs("mount", "-o", "ro", check=False))
        assert str(mnt) in err and "not empty" in err and "-o nonempty" in err
        assert not is_mounted(mnt)

        narfs("mount", "-o", "ro,nonempty")  # no MOUNTPOINT: the config's
        assert is_mounted(mnt)
        assert os.listdir(mnt) == [".by-name"]  # the (empty) archive, over the hidden file
        err = one_line_error(narfs("mount", "-o", "nonempty", check=False))
        assert "already there" in err
        narfs("umount")  # no MOUNTPOINT: the config's
        assert not is_mounted(mnt)
        assert os.listdir(mnt) == ["left-over"]
    finally:
        unmount(mnt)

    err = one_line_error(narfs("mount", "-o", "rw", str(mnt), check=False))
    assert "unknown mount option 'rw'" in err


def test_user_without_fuse_gets_the_reason(tmp_path: Path) -> None:
    """/dev/fuse this user cannot open (here: a root-only file bound over it in a private
    mount namespace, as on hosts whose /dev/fuse is 0600): the error names the device and
    the fix, and points at no log."""
    with nobody_narfs() as n:
        shared = n.root
        mnt = shared / "mnt"
        mnt.mkdir()
        blocker = tmp_path / "no-fuse"
        blocker.write_text("")
        blocker.chmod(0o600)
        script = ('mount --bind "$1" "$2" && shift 2 && exec setpriv --reuid nobody '
                  '--regid nogroup --clear-groups "$@"')
        proc = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
             str(blocker), FUSE_DEVICE, sys.executable, "-m", "narfs.cli", "mount", str(mnt)],
            capture_output=True, text=True, env={**n.env, "HOME": "/"}, timeout=60,
            cwd="/")
        err = one_line_error(proc)
        assert f"{FUSE_DEVICE}: permission denied" in err and "run as root" in err
        assert "mount.log" not in err
        assert not is_mounted(mnt)


def test_a_dead_mount_on_the_mount_point_is_named(narfs: Narfs, tmp_path: Path) -> None:
    """The mount process killed: the mount point answers ENOTCONN; mounting again says so and
    names the fix instead of a bare OS error."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = narfs.popen("mount", "--foreground", str(mnt), stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not is_mounted(mnt) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert is_mounted(mnt)
        proc.kill()
        proc.wait(10)
        err = one_line_error(narfs("mount", str(mnt), check=False))
        assert f"a dead mount is there (its process ended); `fusermount3 -u {mnt}` first" \
            in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
        unmount(mnt)
