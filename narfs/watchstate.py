"""What `narfs watch` shares with the commands that report on it: its state file
(`.narfs/watch.json`), and what a pin in the roots dir is (`classify`), so that `narfs status`
and `narfs doctor` count the pins waiting exactly as the service does.

Everything here was written by another process and is untrusted: a bad value reads as absent.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass

from .cache import Cache, read_small
from .errors import CorruptError
from .storepath import STORE_DIR, store_path_of

STATE_FILE = "watch.json"
MAX_STATE = 1 << 16


@dataclass(frozen=True)
class RootsEntry:
    """One name in the roots dir, as found: a pin (`path` set) or bad input (`problem` set)."""

    name: str
    path: str | None = None
    problem: str | None = None
    ident: tuple[int, str] = (0, "")  # inode and target: bad input is reported once per ident
    mtime: float = 0.0


def classify(roots: str, name: str) -> RootsEntry | None:
    """What `roots/name` is now; None when it is gone. Blocking: lstat and readlink."""
    full = os.path.join(roots, name)
    try:
        st = os.lstat(full)
        target = os.readlink(full) if stat.S_ISLNK(st.st_mode) else None
    except FileNotFoundError:
        return None
    except OSError as e:
        return RootsEntry(name, problem=f"cannot read it ({e.strerror}); left alone")
    if target is None:
        kind = ("a directory" if stat.S_ISDIR(st.st_mode) else
                "a regular file" if stat.S_ISREG(st.st_mode) else "not a file or link")
        return RootsEntry(name, ident=(st.st_ino, ""), mtime=st.st_mtime, problem=(
            f"not a symlink ({kind}); narfs pins are symlinks into {STORE_DIR}; left alone, "
            "remove it by hand"))
    path = store_path_of(target, roots)
    if path is None:
        return RootsEntry(name, ident=(st.st_ino, target), mtime=st.st_mtime, problem=(
            f"points to {target}, which is not a path in {STORE_DIR}; left alone, remove "
            "it by hand"))
    return RootsEntry(name, path=path, ident=(st.st_ino, target), mtime=st.st_mtime)


def classify_all(roots: str, names: Iterable[str]) -> list[tuple[str, RootsEntry | None]]:
    return [(name, classify(roots, name)) for name in names]


@dataclass
class Pins:
    count: int
    oldest: float | None
    error: str | None = None


def pins_waiting(roots_dir: str) -> Pins:
    """Pins narfs-hook left for `narfs watch` in the roots dir, counted as the service counts
    them (`classify`)."""
    try:
        names = os.listdir(roots_dir)
    except FileNotFoundError:
        return Pins(0, None, "does not exist (no build pinned yet)")
    except OSError as e:
        return Pins(0, None, f"unreadable ({e.strerror})")
    pins = [e for _, e in classify_all(roots_dir, names) if e is not None and e.path]
    return Pins(len(pins), min((e.mtime for e in pins), default=None))


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
        doc = json.loads(read_small(path, MAX_STATE))  # the state file is untrusted too
    except (OSError, CorruptError, ValueError):
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
