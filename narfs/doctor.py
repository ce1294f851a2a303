"""`narfs doctor`: one screen that checks the whole setup and names the fix for each problem.

Each check looks at one piece of the data flow (DESIGN.md: Nix → hook → roots dir → watch →
cache → mount) and yields lines `(level, what, fix)`. The exit status is 1 when any line is a
problem (FAIL or WARN), so a script or a monitoring timer can run it too. Nothing here writes.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator

from . import nixversions
from .cache import Cache
from .config import Settings, config_path, hook_path, trusted_key
from .errors import NarfsError
from .mounttable import fuse_problem, narfs_mounts
from .nixquery import nix_settings, nix_version
from .nixversions import NixVersion
from .progress import ago, human_size, plural
from .storepath import GC_ROOTS_DIR
from .watchstate import pid_is_watch, pins_waiting, watch_state

OK, INFO, WARN, FAIL = "ok", "--", "WARN", "FAIL"
Line = tuple[str, str, str]  # level, what was found, the fix ("" when none is needed)

HOOK_DEFAULT_ROOTS = f"{GC_ROOTS_DIR}/narfs"
PIN_LATE = 600.0  # a pin waiting longer than this means the service is not keeping up
FREE_MIN = 1 << 30
FREE_MIN_RATIO = 0.05
STAT_TIMEOUT = 2.0


def check_nix(v: NixVersion | str) -> Iterator[Line]:
    oldest = ".".join(map(str, nixversions.OLDEST))
    if isinstance(v, str):
        yield FAIL, f"Nix: {v}", "install Nix (Debian: tools/install-debian) or put it on PATH"
    elif not v.lix and v.release[:2] < nixversions.OLDEST:
        yield FAIL, f"Nix {v.release[0]}.{v.release[1]}: older than {oldest}", \
            f"upgrade Nix (narfs supports {oldest} and newer, and Lix)"
    else:
        yield OK, f"Nix {'.'.join(map(str, v.release))}{' (Lix)' if v.lix else ''}", ""


def check_nix_conf(settings: Settings, cache: Cache, v: NixVersion | str) -> Iterator[Line]:
    conf = None if isinstance(v, str) else nix_settings(v)
    where = "/etc/nix/nix.conf (NixOS: nix.settings)"
    if conf is None:
        yield WARN, "nix.conf: cannot read Nix's settings (nix config show failed)", ""
        return
    hook = conf.get("post-build-hook") or ""
    if not isinstance(hook, str) or not hook:
        yield FAIL, "nix.conf: no post-build-hook: builds are not pinned, nothing is archived", \
            f"add `post-build-hook = {hook_path()}` to {where}"
    elif not os.path.isfile(hook) or not os.access(hook, os.X_OK):
        yield FAIL, f"nix.conf: post-build-hook {hook} is not an executable file", \
            f"install narfs-hook there (chmod 0755 {hook}) or fix the path in {where}"
    else:
        st = os.stat(hook)
        if not st.st_mode & 0o100 or st.st_mode & 0o022:
            yield WARN, f"nix.conf: post-build-hook {hook} is writable by others or not " \
                "executable by its owner (the daemon runs it as root)", f"chmod 0755 {hook}"
        else:
            yield OK, f"nix.conf: post-build-hook {hook}", ""
        yield from check_hook_roots(hook, settings)
    subs = [*_words(conf.get("substituters")), *_words(conf.get("extra-substituters"))]
    mine = [s for s in subs if s.split("?")[0].rstrip("/") == f"file://{cache.root}"]
    if mine:
        yield OK, f"nix.conf: substituter {mine[0]}", ""
    else:
        yield WARN, f"nix.conf: file://{cache.root} is not a substituter: builds are not " \
            "fetched back from the archive", \
            f"add `extra-substituters = file://{cache.root}` to {where}"
    try:
        key = trusted_key(settings)
    except NarfsError as e:
        yield FAIL, f"signing key: {e}", "run `narfs init` (it creates one) or fix the path"
        return
    if key is None:
        yield WARN, "signing key: none configured: narinfos are unsigned", "run `narfs init`"
        return
    keys = [*_words(conf.get("trusted-public-keys")),
            *_words(conf.get("extra-trusted-public-keys"))]
    if key.text() in keys:
        yield OK, f"nix.conf: trusts narfs's key {key.name}", ""
    else:
        yield FAIL, f"nix.conf: narfs's key {key.name} is not trusted: Nix refuses to " \
            "substitute from the archive", \
            f"add `extra-trusted-public-keys = {key.text()}` to {where}"


def _words(value: object) -> list[str]:
    if isinstance(value, list):
        return [str(v) for v in value]
    return str(value or "").split()


def check_hook_roots(hook: str, settings: Settings) -> Iterator[Line]:
    """The hook pins in $NARFS_ROOTS or its default; the service watches roots_dir."""
    try:
        with open(hook, errors="replace") as f:
            text = f.read(1 << 16)
    except OSError:
        return
    m = re.search(r"NARFS_ROOTS:-([^}\s]+)\}", text)
    if m is None:
        return  # not narfs's own hook script: nothing to compare
    hook_roots = os.environ.get("NARFS_ROOTS") or m[1]
    if os.path.abspath(hook_roots) != os.path.abspath(settings.roots_dir):
        yield FAIL, f"roots dir: the hook pins in {hook_roots}, narfs watch watches " \
            f"{settings.roots_dir}: nothing pinned is ever archived", \
            f"set roots_dir = \"{hook_roots}\" in {config_path()}, or NARFS_ROOTS for Nix"


def check_roots(settings: Settings) -> Iterator[Line]:
    roots = settings.roots_dir
    real = os.path.realpath(roots)
    if not (real + "/").startswith(GC_ROOTS_DIR + "/"):
        yield FAIL, f"roots dir {roots}: not under {GC_ROOTS_DIR}: its pins are not GC " \
            "roots, Nix may collect a build before it is archived", \
            f"set roots_dir under {GC_ROOTS_DIR} (default {HOOK_DEFAULT_ROOTS})"
    pins = pins_waiting(roots)
    if pins.error:
        yield INFO, f"pins: {roots} {pins.error}", ""
    elif pins.count and pins.oldest is not None and time.time() - pins.oldest > PIN_LATE:
        yield WARN, f"pins: {plural(pins.count, 'pin')} waiting, the oldest pinned " \
            f"{ago(pins.oldest)}", "see the service's last error below, or `narfs status`"
    else:
        oldest = f", the oldest pinned {ago(pins.oldest)}" if pins.oldest is not None else ""
        yield OK, f"pins: {plural(pins.count, 'pin')} waiting{oldest}", ""


def check_service(cache: Cache, settings: Settings) -> Iterator[Line]:
    state = watch_state(cache)
    running = "stopped" not in state and pid_is_watch(state.get("pid"))
    if running:
        yield OK, f"narfs watch: running (pid {state['pid']})", ""
    else:
        yield FAIL, "narfs watch: not running: pinned builds are not archived", \
            "systemctl enable --now narfs-watch (systemd/narfs-watch.service)"
    error, when_ = state.get("last_error"), state.get("last_error_time")
    if error and running:
        stamp = f" ({ago(when_)})" if when_ else ""
        yield WARN, f"last error{stamp}: {error[:200]}", "see `journalctl -u narfs-watch`"
    elif error:
        yield INFO, f"last error before it stopped: {error[:200]}", ""


def check_cache(cache: Cache) -> Iterator[Line]:
    try:
        cache.check()
    except NarfsError as e:
        yield FAIL, f"cache: {e}", ""
        return
    if not os.access(cache.root, os.W_OK):
        yield WARN, f"cache {cache.root}: not writable by this user (the service writes it " \
            "as root)", ""
    else:
        yield OK, f"cache {cache.root}: a writable binary cache", ""
    usage = shutil.disk_usage(cache.root)
    if usage.free < FREE_MIN or usage.free < usage.total * FREE_MIN_RATIO:
        yield FAIL, f"cache: {human_size(usage.free)} free of {human_size(usage.total)}", \
            "free space, or retire old paths with `narfs gc --max-size SIZE`"
    else:
        yield OK, f"cache: {human_size(usage.free)} free", ""


def _stat_within(path: str, timeout: float) -> str | None:
    """None when `path` answers a stat in time; else why not (a dead or hung FUSE mount)."""
    result: list[str | None] = []

    def probe() -> None:
        try:
            os.stat(path)
            result.append(None)
        except OSError as e:
            result.append(e.strerror or str(e))

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return result[0] if result else f"no answer within {timeout:.0f} s"


def check_mounts(cache: Cache, settings: Settings) -> Iterator[Line]:
    problem = fuse_problem()
    if problem:
        yield (WARN if os.geteuid() else FAIL), f"FUSE: {problem}", ""
    else:
        yield OK, "FUSE: /dev/fuse usable by this user", ""
    mounts = [m for m in narfs_mounts() if os.path.abspath(m.cache_dir) == cache.root]
    if not mounts:
        yield INFO, f"mount: not mounted (narfs mount {settings.mountpoint})", ""
    for m in mounts:
        why = _stat_within(m.mountpoint, STAT_TIMEOUT)
        if why is None:
            yield OK, f"mount {m.mountpoint}: answering", ""
        else:
            yield FAIL, f"mount {m.mountpoint}: dead ({why})", \
                f"fusermount3 -u {m.mountpoint}, then narfs mount {m.mountpoint} (or " \
                "systemctl restart narfs-mount)"


def main(args: argparse.Namespace, settings: Settings) -> int:
    cache = Cache(settings.cache_dir)
    v = nix_version()
    checks: list[Callable[[], Iterator[Line]]] = [
        lambda: check_nix(v), lambda: check_nix_conf(settings, cache, v),
        lambda: check_roots(settings),
        lambda: check_service(cache, settings), lambda: check_cache(cache),
        lambda: check_mounts(cache, settings)]
    problems = 0
    print(f"narfs doctor: {config_path()}, cache {cache.root}, roots {settings.roots_dir}")
    for check in checks:
        for level, what, fix in check():
            print(f"{level:4}  {what}")
            if fix:
                print(f"      fix: {fix}")
            problems += level in (WARN, FAIL)
    print("no problems found" if not problems else f"{plural(problems, 'problem')} found")
    return 1 if problems else 0
