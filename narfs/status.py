"""`narfs status`: how much is archived, what waits for `narfs watch`, where the cache is mounted.

Everything read here that another process wrote (watch.json, /proc/mounts, narinfos) is treated
as untrusted: a bad value shows as unknown, never as a traceback.
"""

from __future__ import annotations

import argparse
import os
import time

from .cache import Cache
from .catalog import entries_with_access
from .config import Settings
from .mounttable import mode_of, narfs_mounts
from .progress import ago, human_size, plural, when
from .watchstate import pid_is_watch, pins_waiting, watch_state


def main(args: argparse.Namespace, settings: Settings) -> int:
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

