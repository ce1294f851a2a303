"""Mounting narfs in tests: every mount is unmounted and its process ended, whatever happens."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from conftest import Narfs

# The mode `mounted` asks for (`narfs mount --fuse-mode`), set by the `fuse_mode` fixture; None
# leaves it to the mount (auto).
FUSE_MODE: str | None = None


def is_mounted(mountpoint: Path) -> bool:
    target = str(mountpoint)
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == target for line in f)


def mount_line(mountpoint: Path) -> list[str]:
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if fields[1] == str(mountpoint):
                return fields
    raise AssertionError(f"{mountpoint} is not mounted")


def wait_for(cond: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def unmount(mountpoint: Path) -> None:
    """fusermount3 -u; a lazy unmount as the last resort, so no test leaves a mount behind."""
    if not is_mounted(mountpoint):
        return
    # EBUSY while a request is still in flight (on a loaded machine, for seconds): try again
    # for a while before the lazy unmount, which leaves the connection (and the process) up
    # until every reference to the mount is gone.
    deadline = time.monotonic() + 20
    while subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True).returncode:
        if not is_mounted(mountpoint):
            return
        if time.monotonic() > deadline:
            subprocess.run(["fusermount3", "-uz", str(mountpoint)], capture_output=True)
            return
        time.sleep(0.2)


class Mount:
    """A `narfs mount --foreground` process and its mount point."""

    def __init__(self, narfs: Narfs, mountpoint: Path, proc: subprocess.Popen,
                 log: Path) -> None:
        self.narfs = narfs
        self.path = mountpoint
        self.proc = proc
        self.log_path = log

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None and is_mounted(self.path)

    def stats(self) -> dict:
        """The read path's counters: SIGUSR1 makes the mount log them as a JSON line."""
        seen = self.log().count("narfs: stats {")
        self.proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: self.log().count("narfs: stats {") > seen, 10, "the stats line")
        line = [ln for ln in self.log().splitlines() if ln.startswith("narfs: stats {")][-1]
        return json.loads(line.split(" ", 2)[2])

    def __truediv__(self, name: str) -> Path:
        return self.path / name


@contextmanager
def mounted(narfs: Narfs, mountpoint: Path, *args: str, extra_env: dict | None = None,
            wait: bool = True) -> Iterator[Mount]:
    mountpoint.mkdir(exist_ok=True)
    log = mountpoint.parent / f"{mountpoint.name}.log"
    start = log.stat().st_size if log.exists() else 0  # the log of this mount begins there
    env = narfs.env
    narfs.env = {**env, **(extra_env or {})}
    if FUSE_MODE is not None:
        args = ("--fuse-mode", FUSE_MODE, *args)
    try:
        with open(log, "ab") as out:
            proc = narfs.popen("mount", "--foreground", *args, str(mountpoint), stdout=out,
                               stderr=subprocess.STDOUT)
    finally:
        narfs.env = env
    m = Mount(narfs, mountpoint, proc, log)
    try:
        if wait:
            wait_for(lambda: is_mounted(mountpoint) or proc.poll() is not None, 30,
                     "the mount")
            if proc.poll() is not None:
                raise AssertionError(f"narfs mount exited {proc.returncode}:\n{m.log()}")
            os.stat(mountpoint)  # answered once the loop runs
            # and ready, its own readiness stat answered too: until then an unmount (a test's
            # fusermount3 -u) can find that stat in flight and fail with EBUSY
            serving = f"serving {mountpoint}".encode()
            wait_for(lambda: serving in log.read_bytes()[start:] or proc.poll() is not None,
                     30, "the mount's readiness")
        yield m
    finally:
        unmount(mountpoint)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(
                f"narfs mount did not end after the unmount:\n{m.log()}") from None
