"""`narfs ls` and `narfs status`: what is archived, how big, how compressed, what waits.

Everything read here that another process wrote (watch.json, /proc/mounts, narinfos) is treated
as untrusted: a bad value shows as unknown, never as a traceback.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass

from .cache import Cache
from .catalog import Catalog, Entry
from .config import Settings
from .errors import CorruptError, NarfsError
from .mounts import mode_of, narfs_mounts
from .progress import human_size, plural
from .storepath import STORE_DIR, store_path_of

log = logging.getLogger(__name__)

WATCH_STATE = "watch.json"
MAX_STATE = 1 << 16


# --- reading the archive --------------------------------------------------------------------

def open_catalog(cache: Cache, sync: bool = True) -> Catalog | None:
    """The cache's catalog, in step with the directory unless `sync` is False (recording
    accesses needs no scan); None when this user cannot write it (commands that only read then
    fall back to the narinfos themselves)."""
    state = os.path.join(cache.root, ".narfs")
    if not os.access(state if os.path.isdir(state) else cache.root, os.W_OK):
        return None
    catalog = Catalog(cache)
    if sync:
        catalog.sync()
    return catalog


def scan_entries(cache: Cache) -> Iterator[Entry]:
    """Entries read straight from the narinfos (no catalog): unreadable ones are logged."""
    for h in cache.hashes():
        try:
            info = cache.read_narinfo(h)
            st = os.stat(cache.narinfo_path(h))
        except (CorruptError, OSError) as e:
            log.warning("%s", e)
            continue
        yield Entry.of(info, st)


def entries_with_access(cache: Cache) -> list[tuple[Entry, float]]:
    catalog = open_catalog(cache)
    if catalog is None:
        log.info("%s: catalog not writable by this user; reading narinfos (no access times)",
                 cache.root)
        return [(e, e.archived) for e in scan_entries(cache)]
    with catalog:
        return [(e, catalog.last_access(e)) for e in catalog.entries()]


def when(t: float | None) -> str:
    if not t:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def ago(t: float, now: float | None = None) -> str:
    s = max(0.0, (now or time.time()) - t)
    for unit, n in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= n:
            return f"{s / n:.0f} {unit} ago"
    return f"{s:.0f} s ago"


def matches(pattern: str | None, base: str) -> bool:
    """A shell-style pattern matches `<hash>-<name>` or `<name>` (so `hello*` finds
    hello-2.12); a store path prefix is allowed; a plain word matches as a substring."""
    if not pattern:
        return True
    pattern = pattern.removeprefix(STORE_DIR + "/")
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(base, pattern) or fnmatch.fnmatchcase(base[33:], pattern)
    return pattern in base


def ls_main(args: argparse.Namespace, settings: Settings) -> int:
    cache = Cache(settings.cache_dir)
    cache.check()
    rows = [(e, a) for e, a in entries_with_access(cache) if matches(args.pattern, e.name)]
    if not rows:
        if args.pattern:
            raise NarfsError(f"no archived path matches {args.pattern!r} in {cache.root}")
        print(f"{cache.root}: nothing archived yet")
        return 0
    rows.sort(key=lambda r: (r[0].name[33:], r[0].archived, r[0].name))
    print(f"{'NAR':>10} {'COMPRESSED':>10}  {'ARCHIVED':16}  {'LAST ACCESS':16}  STORE PATH")
    for e, access in rows:
        comp = human_size(e.file_size) if e.file_size is not None else "?"
        print(f"{human_size(e.nar_size):>10} {comp:>10}  {when(e.archived):16}  "
              f"{when(access):16}  {STORE_DIR}/{e.name}")
    nar = sum(e.nar_size for e, _ in rows)
    comp = sum(e.file_size or 0 for e, _ in rows)
    print(f"{plural(len(rows), 'path')}, {human_size(nar)} NAR, {human_size(comp)} compressed")
    return 0


# --- status ---------------------------------------------------------------------------------

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
    path = os.path.join(cache.root, ".narfs", WATCH_STATE)
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
    types = {"pid": int, "started": (int, float), "stopped": (int, float), "queue": int,
             "archiving": int, "retrying": int, "ignored": int, "archived": int,
             "last_error": str, "last_error_time": (int, float), "oldest_pin_time": (int, float),
             "roots_dir": str}
    return {k: doc[k] for k, t in types.items()
            if isinstance(doc.get(k), t) and not isinstance(doc.get(k), bool)}


def status_main(args: argparse.Namespace, settings: Settings) -> int:
    cache = Cache(settings.cache_dir)
    cache.check()
    rows = entries_with_access(cache)
    nar = sum(e.nar_size for e, _ in rows)
    comp = sum(e.file_size or 0 for e, _ in rows)
    now = time.time()
    print(f"cache:        {cache.root}")
    ratio = f" (ratio {comp / nar:.2f})" if nar else ""
    print(f"archived:     {plural(len(rows), 'path')}, {human_size(nar)} NAR → {human_size(comp)} "
          f"compressed{ratio}")
    if rows:
        newest = max(e.archived for e, _ in rows)
        print(f"newest:       {when(newest)} ({ago(newest, now)})")
    pins = pins_waiting(settings.roots_dir)
    if pins.error:
        print(f"pins waiting: {settings.roots_dir} {pins.error}")
    elif pins.count:
        assert pins.oldest is not None
        print(f"pins waiting: {pins.count} (oldest pinned {when(pins.oldest)}, "
              f"{ago(pins.oldest, now)})")
    else:
        print("pins waiting: none")
    state = watch_state(cache)
    if "stopped" not in state and pid_is_watch(state.get("pid")):
        line = f"running (pid {state['pid']}"
        if "started" in state:
            line += f", since {when(state['started'])}"
        line += ")"
        for key, what in (("queue", "queued"), ("archiving", "archiving"),
                          ("retrying", "retrying"), ("archived", "archived since start")):
            if state.get(key) or (key == "queue" and key in state):
                line += f", {state[key]} {what}"
        print(f"watch:        {line}")
        watched = state.get("roots_dir")
        if watched and os.path.abspath(watched) != os.path.abspath(settings.roots_dir):
            print(f"              watches {watched}, but narfs-hook pins in {settings.roots_dir} "
                  "(roots_dir): restart narfs watch so both use one roots dir")
        if state.get("ignored"):
            print(f"              {plural(state['ignored'], 'entry', 'entries')} in "
                  f"{settings.roots_dir} not pinning store paths (see the watch log)")
    elif "stopped" in state:
        print(f"watch:        not running (stopped {when(state['stopped'])})")
    else:
        print("watch:        not running" + (" (stale state file)" if state else ""))
    if state.get("last_error"):
        t = state.get("last_error_time")
        stamp = f"{when(t)}: " if t else ""
        print(f"last error:   {stamp}{state['last_error'][:300]}")
    else:
        print("last error:   none recorded")
    mounts = [m.mountpoint for m in narfs_mounts()
              if os.path.abspath(m.cache_dir) == cache.root]
    state_dir = os.path.join(cache.root, ".narfs")
    modes = {mp: mode_of(state_dir, mp) for mp in mounts}
    shown = [f"{mp} ({modes[mp]} mode)" if modes[mp] else f"{mp} (mode unknown)"
             for mp in mounts]
    print(f"mounted at:   {', '.join(shown) if shown else 'not mounted'}")
    return 0

