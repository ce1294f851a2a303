"""What `narfs watch` leaves for other commands to read: its state file (`.narfs/watch.json`)
and the pins waiting for it in the roots dir. `narfs status` and `narfs doctor` read them.

Everything here was written by another process and is untrusted: a bad value reads as absent.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass

from .cache import Cache
from .storepath import store_path_of

STATE_FILE = "watch.json"
MAX_STATE = 1 << 16


@dataclass
class Pins:
    count: int
    oldest: float | None
    error: str | None = None


def pins_waiting(roots_dir: str) -> Pins:
    """Pins narfs-hook left for `narfs watch` (symlinks in the roots dir), counted directly."""
    count, oldest = 0, None
    try:
        with os.scandir(roots_dir) as it:
            for e in it:
                # Only what narfs watch counts as a pin: a symlink into the store.
                try:
                    if not e.is_symlink() or store_path_of(os.readlink(e.path),
                                                           roots_dir) is None:
                        continue
                except OSError:
                    continue
                try:
                    mtime = e.stat(follow_symlinks=False).st_mtime
                except FileNotFoundError:
                    continue
                count += 1
                oldest = mtime if oldest is None else min(oldest, mtime)
    except FileNotFoundError:
        return Pins(0, None, "does not exist (no build pinned yet)")
    except OSError as e:
        return Pins(0, None, f"unreadable ({e.strerror})")
    return Pins(count, oldest)


def pid_is_watch(pid: object) -> bool:
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read(8192).split(b"\0")
    except OSError:
        return False
    return any(b"narfs" in a for a in argv) and b"watch" in argv


def watch_state(cache: Cache) -> dict:
    """`narfs watch`'s state file, validated field by field; {} when absent or unreadable."""
    path = os.path.join(cache.root, ".narfs", STATE_FILE)
    try:
        # Not through a symlink, not blocking on a FIFO: the state file is untrusted too.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return {}
            doc = json.loads(f.read(MAX_STATE))
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict):
        return {}
    when = (int, float)
    types: dict[str, type | tuple[type, ...]] = {
        "pid": int, "started": when, "stopped": when, "queue": int, "archiving": int,
        "retrying": int, "ignored": int, "archived": int, "last_error": str,
        "last_error_time": when, "oldest_pin_time": when, "roots_dir": str}
    return {k: doc[k] for k, t in types.items()
            if isinstance(doc.get(k), t) and not isinstance(doc.get(k), bool)}
