"""`narfs watch`: archive whatever the roots dir pins, then unpin it (issue 4).

The layers, each testable without the ones above it:
- `Notifier` (notify.py): sd_notify(3) datagrams (READY, STATUS, STOPPING) to $NOTIFY_SOCKET.
- `RootsDir`: the roots dir, kept existing, and an inotify watch saying which names to look at.
- `classify` (watchstate.py): what one entry of the roots dir is: a pin holding a store
  path, or bad input.
- `Service`: the jobs that archive each pinned path's closure with retry, the cache it writes
  into, and the state file `narfs status` reads.

Invariants:
- The pins on disk are the only queue; nothing else is persisted. A pin is removed only after
  the whole closure of its store path is committed (the Archiver publishes narinfos
  references-first and each publish fsyncs the directory: contract 3), or once Nix says the path
  is no longer valid. So after kill -9 at any instant the next start's catch-up scan finds every
  pin still owed, and the cache holds complete entries plus temporaries that start clears.
- Bad input is never guessed at: an entry that is not a symlink, or a symlink out of /nix/store,
  is reported once (one log line per distinct entry, no retry loop) and left where it is; a
  person made it, and the issue keeps pins until their paths are archived.
- One job per store path. The same path pinned under several names, and events arriving while
  it is archived, join the running job; every pin that joined is removed with it.
- No two jobs write the same store path at once: a job whose missing closure overlaps paths
  another job is writing waits for that job, then looks again. Skipping those paths instead
  could publish a path before a reference the other job has not committed yet.

State file (`<cache>/.narfs/watch.json`, rewritten at most once a second, atomically): pid,
started, updated, stopped (null while running), roots_dir, cache_ready, queue (valid pins
waiting, including those being archived or retried), archiving, retrying, ignored (bad entries
left in the roots dir), archived (store paths written since start), unpinned, last_error,
last_error_time, oldest_pin_time (mtime of the oldest waiting pin; times are Unix seconds).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import math
import os
import signal
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import trio
from inotify_simple import INotify, flags

from . import config, nixquery
from .archive import Archiver
from .cache import TMP_PREFIX, Cache, describe_os_error, remove_file, write_atomic
from .config import Settings
from .errors import NarfsError
from .notify import Notifier
from .progress import human_size, plural
from .storepath import GC_ROOTS_DIR, base_name, hash_part, store_path_of
from .watchstate import STATE_FILE, RootsEntry, classify_all

log = logging.getLogger(__name__)

LOCK_FILE = "watch.lock"
RETRY_FIRST = 5.0  # a failed path is retried after 5 s, 10 s, 20 s, ... up to RETRY_MAX
RETRY_MAX = 600.0
SETUP_RETRY_MAX = 60.0  # the cache or the roots dir not usable: look again at least each minute
STATE_INTERVAL = 1.0  # state file and STATUS= at most this often
# Deletions are watched too, so a pin removed by hand leaves the queue at once.
WATCH_MASK = (flags.CREATE | flags.MOVED_TO | flags.DELETE | flags.MOVED_FROM | flags.ONLYDIR
              | flags.DELETE_SELF | flags.MOVE_SELF)
_LOST = flags.Q_OVERFLOW | flags.IGNORED | flags.DELETE_SELF | flags.MOVE_SELF | flags.UNMOUNT


def backoff(attempts: int, first: float = RETRY_FIRST, cap: float = RETRY_MAX) -> float:
    """Seconds to wait after the `attempts`-th consecutive failure (1, 2, ...)."""
    return min(first * 2 ** min(attempts - 1, 30), cap)


class AlreadyRunning(NarfsError):
    """Another `narfs watch` holds the cache: two would race each other's unpins."""


def already_running(cache: Cache) -> AlreadyRunning:
    return AlreadyRunning(f"{cache.root}: refused: another narfs watch is already archiving "
                          "into this cache; stop it first (systemctl stop narfs-watch)")


# --- the roots dir ------------------------------------------------------------------------------


class RootsDir:
    """The roots dir, and an inotify watch on it that says which names to look at again.

    Choice: the service creates the roots dir (missing parents too, mode 0755) instead of
    watching a parent for it to appear. The hook creates it the same way, so whoever comes first
    wins, and a dir that cannot be created is an error worth a log line rather than a silent
    wait. A dir removed or moved away while the service runs is created again and rescanned.
    """

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.inotify: INotify | None = None

    def ensure(self) -> None:
        """Create the dir and missing parents; blocking."""
        missing = []
        d = self.path
        while not os.path.lexists(d):
            missing.append(d)
            d = os.path.dirname(d)
        for d in reversed(missing):
            try:
                os.mkdir(d, 0o755)
            except FileExistsError:
                pass
        if missing:
            log.info("created the roots directory %s", self.path)
        if not os.path.isdir(self.path):
            raise NarfsError(f"{self.path}: the roots directory exists and is not a directory; "
                             "move it away or set roots_dir")

    def watch(self) -> None:
        """(Re)start the inotify watch; before a scan, so no pin falls between the two."""
        self.close()
        inotify = INotify(nonblocking=True)
        try:
            inotify.add_watch(self.path, WATCH_MASK)
        except BaseException:
            inotify.close()
            raise
        self.inotify = inotify

    def names(self) -> list[str]:
        """Every name in the dir now; blocking."""
        return sorted(os.listdir(self.path))

    async def changes(self) -> list[str] | None:
        """Names that changed (in order, once each); None when the watch is lost (the dir went
        away or the kernel queue overflowed) and the caller must watch and scan again."""
        assert self.inotify is not None
        while True:
            await trio.lowlevel.wait_readable(self.inotify.fileno())
            events = self.inotify.read(timeout=0)
            if not events:
                continue
            if any(ev.mask & _LOST for ev in events):
                overflow = any(ev.mask & flags.Q_OVERFLOW for ev in events)
                log.warning("%s: %s; looking at every entry again", self.path,
                            "inotify queue overflowed" if overflow else
                            "the roots directory was removed or moved")
                return None
            return list(dict.fromkeys(ev.name for ev in events if ev.name))

    def close(self) -> None:
        if self.inotify is not None:
            self.inotify.close()
            self.inotify = None


# --- the service ------------------------------------------------------------------------------


@dataclass
class Job:
    """One store path to archive, and the names that pin it."""

    path: str
    pins: set[str] = field(default_factory=set)
    attempts: int = 0  # consecutive failures
    state: str = "waiting"  # waiting | archiving | retrying


class Service:
    def __init__(self, settings: Settings, roots: RootsDir, notifier: Notifier,
                 executor: ThreadPoolExecutor) -> None:
        self.settings = settings
        self.cache = Cache(settings.cache_dir)
        self.roots = roots
        self.notifier = notifier
        self.executor = executor
        self.archiver: Archiver | None = None
        self.cache_ready = trio.Event()
        self.parallel = trio.CapacityLimiter(max(1, settings.parallel_paths))
        self.pins: dict[str, RootsEntry] = {}  # name → a valid pin not yet removed
        self.jobs: dict[str, Job] = {}  # store path → the job archiving it
        self.writing: dict[str, trio.Event] = {}  # store path → set when its writer is done
        self.reported: dict[str, tuple[int, str]] = {}  # bad entry name → ident reported
        self.archived = 0
        self.unpinned = 0
        self.last_error: str | None = None
        self.last_error_time: float | None = None
        self.started = time.time()
        self.stopped: float | None = None
        self.stopping = False
        self._changed = trio.Event()
        self._held = contextlib.ExitStack()  # the cache's writer lock and the watch lock
        self._nursery: trio.Nursery | None = None

    # --- running --------------------------------------------------------------------------

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._open_cache)
            nursery.start_soon(self._publish_state)
            await self._watch_roots()
            self.notifier.send("READY=1", f"STATUS={self.status_line()}")
            while True:
                names = await self.roots.changes()
                if names is None:
                    await self._watch_roots()
                else:
                    await self.look_at(names)

    def stop(self) -> None:
        """Make in-flight NAR writes end at their next chunk (their pins stay)."""
        self.stopping = True
        if self.archiver is not None:
            self.archiver.stop.set()

    async def close(self) -> None:
        """Last state file, then let go of the cache; after cancellation, so shielded."""
        self.stopped = time.time()
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            await self.write_state()
        self.roots.close()
        self._held.close()

    def changed(self) -> None:
        self._changed.set()

    def error(self, message: str) -> None:
        log.warning("%s", message)
        self.last_error = message
        self.last_error_time = time.time()
        self.changed()

    # --- the cache ------------------------------------------------------------------------

    async def _open_cache(self) -> None:
        """Hold the cache as a writer (the first writer in clears leftovers) and make the
        Archiver; a cache that is missing, unwritable or full is waited for, not fatal."""
        delay = RETRY_FIRST
        while True:
            try:
                self.archiver = await trio.to_thread.run_sync(self._open_cache_sync)
                break
            except AlreadyRunning:
                raise
            except NarfsError as e:
                problem = str(e)
            except OSError as e:
                problem = describe_os_error(e, self.cache.root)
            self.error(f"not archiving yet: {problem}; pins wait, retrying in {delay:.0f} s")
            await trio.sleep(delay)
            delay = min(delay * 2, SETUP_RETRY_MAX)
        log.info("archiving into %s, pins from %s", self.cache.root, self.roots.path)
        self.cache_ready.set()
        self.changed()

    def _open_cache_sync(self) -> Archiver:
        with contextlib.ExitStack() as stack:
            stack.enter_context(self.cache.writer())
            fd = os.open(self.cache.state_path(LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                         0o644)
            stack.callback(os.close, fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise already_running(self.cache) from None
            # The state file's own temporaries: only a watch writes them, and we hold its lock.
            state_dir = os.path.dirname(self.cache.state_path(STATE_FILE))
            for name in os.listdir(state_dir):
                if name.startswith(f"{TMP_PREFIX}{STATE_FILE}-"):
                    remove_file(os.path.join(state_dir, name))
            archiver = Archiver.from_settings(self.settings, self.executor)
            self._held = stack.pop_all()
        return archiver

    # --- the roots dir --------------------------------------------------------------------

    async def _watch_roots(self) -> None:
        """Create and watch the roots dir, then look at everything in it (the catch-up scan)."""
        delay = RETRY_FIRST
        while True:
            try:
                await trio.to_thread.run_sync(self.roots.ensure)
                self.roots.watch()
                names = await trio.to_thread.run_sync(self.roots.names)
                break
            except NarfsError as e:
                problem = str(e)
            except OSError as e:
                problem = f"{self.roots.path}: {e.strerror or e}"
            self.error(f"cannot watch the roots directory: {problem}; retrying in {delay:.0f} s")
            await trio.sleep(delay)
            delay = min(delay * 2, SETUP_RETRY_MAX)
        # Names known before but gone now are looked at too, so they leave the queue.
        here = set(names)
        await self.look_at([*names, *(n for n in [*self.pins, *self.reported] if n not in here)])
        log.info("watching %s: %s waiting", self.roots.path, plural(len(self.pins), "pin"))

    async def look_at(self, names: Iterable[str]) -> None:
        """Bring the queue up to date with what these names are now on disk."""
        names = list(names)
        if not names:
            return
        for name, entry in await trio.to_thread.run_sync(classify_all, self.roots.path, names):
            self._update(name, entry)
        self.changed()

    def _update(self, name: str, entry: RootsEntry | None) -> None:
        old = self.pins.get(name)
        if old is not None and (entry is None or entry.path != old.path):
            del self.pins[name]
            job = self.jobs.get(old.path or "")
            if job is not None:
                job.pins.discard(name)
        if entry is None:
            self.reported.pop(name, None)
            return
        if entry.path is None:
            if self.reported.get(name) != entry.ident:
                self.reported[name] = entry.ident
                log.warning("%s: %s", os.path.join(self.roots.path, name), entry.problem)
            return
        self.reported.pop(name, None)
        self.pins[name] = entry
        job = self.jobs.get(entry.path)
        if job is None:
            job = self.jobs[entry.path] = Job(entry.path)
            assert self._nursery is not None
            self._nursery.start_soon(self._run_job, job)
        job.pins.add(name)

    # --- jobs -----------------------------------------------------------------------------

    async def _run_job(self, job: Job) -> None:
        try:
            while await self._still_pinned(job):
                job.state = "waiting"
                await self.cache_ready.wait()
                async with self.parallel:
                    job.state = "archiving"
                    self.changed()
                    try:
                        valid = await self._archive(job.path)
                    except NarfsError as e:
                        problem = str(e)
                    except OSError as e:
                        problem = describe_os_error(e, self.cache.root)
                    except Exception as e:  # a bug must not stop the other pins' archiving
                        log.exception("%s: unexpected error", job.path)
                        problem = f"unexpected error {e!r} (a bug: please report it)"
                    else:
                        if not valid:
                            log.warning("%s: no longer a valid store path (deleted from the "
                                        "store); removing its pin, nothing to archive", job.path)
                        self._unpin(job)
                        return
                if self.stopping:  # an interrupted write is no failure; its pin stays
                    return
                job.attempts += 1
                job.state = "retrying"
                delay = backoff(job.attempts)
                self.error(f"{job.path}: not archived: {problem}; its pin stays, retry "
                           f"{job.attempts} in {delay:.0f} s")
                await trio.sleep(delay)
        finally:
            if self.jobs.get(job.path) is job:
                del self.jobs[job.path]
            self.changed()

    async def _still_pinned(self, job: Job) -> bool:
        """Drop names that no longer pin the job's path (removed or repointed meanwhile)."""
        names = sorted(job.pins)
        for name, entry in await trio.to_thread.run_sync(classify_all, self.roots.path, names):
            if entry is None or entry.path != job.path:
                job.pins.discard(name)
                if name in self.pins and self.pins[name].path == job.path:
                    del self.pins[name]
        return bool(job.pins)

    async def _archive(self, path: str) -> bool:
        """Archive the closure of `path` and commit it; False when the store no longer holds
        `path`. Raises NarfsError (or OSError) when any path of the closure is not archived."""
        # Validity is asked only when path-info fails: one Nix call (~13 ms) per pin, not two.
        try:
            infos = await nixquery.closure_infos([path])
        except NarfsError:
            if await nixquery.invalid_paths([path]):
                return False
            raise
        if path not in infos:
            return False
        while busy := {self.writing[p] for p in infos if p in self.writing}:
            for done in busy:
                await done.wait()
        # No checkpoint from the check above to here: the claim is atomic.
        done = trio.Event()
        mine = [p for p in infos if not self.cache.has(hash_part(p))]
        for p in mine:
            self.writing[p] = done
        assert self.archiver is not None
        try:
            result = await self.archiver.archive_infos(infos, progress=False)
        finally:
            for p in mine:
                del self.writing[p]
            done.set()
        self.archived += len(result.archived)
        self.changed()
        if result.failed:
            first, reason = next(iter(result.failed.items()))
            more = len(result.failed) - 1
            where = "" if first == path else f"its closure's {first}: "
            more_text = f" (and {plural(more, 'more path')})" if more else ""
            raise NarfsError(where + reason + more_text)
        return True

    def _unpin(self, job: Job) -> None:
        """Remove the job's pins now that its closure is committed.

        Deliberately synchronous (readlink and unlink of a symlink: microseconds): with no
        checkpoint between the last name joining the job and the job leaving `self.jobs`, no
        pin can join a job that has already unpinned.
        """
        removed = 0
        for name in sorted(job.pins):
            if name in self.pins and self.pins[name].path == job.path:
                del self.pins[name]
            full = os.path.join(self.roots.path, name)
            try:
                target = os.readlink(full)
            except OSError:  # gone, or no longer a link: not a pin of this path any more
                continue
            if store_path_of(target, self.roots.path) != job.path:
                continue  # repointed meanwhile: its new target has a job of its own
            try:
                os.unlink(full)
                removed += 1
            except FileNotFoundError:
                pass
            except OSError as e:
                self.error(f"{full}: cannot remove the pin ({e.strerror}); its path is archived, "
                           "remove it by hand")
        job.pins.clear()
        self.unpinned += removed
        if removed:
            log.info("unpinned %s", base_name(job.path))

    # --- state file and STATUS= -----------------------------------------------------------

    def snapshot(self) -> dict:
        states = [j.state for j in self.jobs.values()]
        return {
            "pid": os.getpid(),
            "started": self.started,
            "updated": time.time(),
            "stopped": self.stopped,
            "roots_dir": self.roots.path,
            "cache_ready": self.cache_ready.is_set(),
            "queue": len(self.pins),
            "archiving": states.count("archiving"),
            "retrying": states.count("retrying"),
            "ignored": len(self.reported),
            "archived": self.archived,
            "unpinned": self.unpinned,
            "last_error": self.last_error,
            "last_error_time": self.last_error_time,
            "oldest_pin_time": min((e.mtime for e in self.pins.values()), default=None),
        }

    def status_line(self) -> str:
        s = self.snapshot()
        line = (f"{self.archiving_now()}{plural(s['queue'], 'pin')} waiting "
                f"({s['archiving']} archiving, {s['retrying']} retrying), "
                f"{plural(s['archived'], 'path')} archived")
        if not s["cache_ready"]:
            line = "waiting for the cache; " + line
        if self.last_error:
            line += f"; last error: {self.last_error}"
        return line[:1000]

    def archiving_now(self) -> str:
        """`archiving <name> (37% of 200.0 MiB); ` for the paths being written now."""
        if self.archiver is None:
            return ""
        now = sorted(list(self.archiver.in_progress.items()))
        if not now:
            return ""
        path, (done, total) = now[0]
        more = f" and {plural(len(now) - 1, 'more path')}" if len(now) > 1 else ""
        return (f"archiving {base_name(path)} ({100 * done // max(total, 1)}% of "
                f"{human_size(total)}){more}; ")

    async def write_state(self) -> None:
        self.notifier.send(f"STATUS={self.status_line()}")
        if not self.cache_ready.is_set():  # a cache not yet checked is not written to
            return
        data = (json.dumps(self.snapshot(), indent=1) + "\n").encode()
        try:
            await trio.to_thread.run_sync(
                write_atomic, self.cache.state_path(STATE_FILE), data)
        except OSError as e:  # a full or read-only cache: archiving reports that already
            log.debug("cannot write %s: %s", STATE_FILE, e)

    async def _publish_state(self) -> None:
        while True:
            # While a path is written, STATUS= moves with its bytes once a second; the state
            # file is rewritten (and fsynced) only on changes, so a stop never waits for one.
            with trio.move_on_after(STATE_INTERVAL if self.jobs else math.inf) as tick:
                await self._changed.wait()
            if tick.cancelled_caught:
                self.notifier.send(f"STATUS={self.status_line()}")
                continue
            self._changed = trio.Event()
            await self.write_state()
            await trio.sleep(STATE_INTERVAL)


# --- entry point -----------------------------------------------------------------------------


async def serve(settings: Settings, notifier: Notifier, executor: ThreadPoolExecutor) -> int:
    """Run until SIGTERM or SIGINT, then stop within a few seconds, leaving nothing half-done.

    On a signal: STOPPING=1; NAR writes in worker threads notice `Archiver.stop` at their next
    chunk, delete their temporary and return (threads are never abandoned, so nothing is left
    writing behind our back); every other await is cancelled. What was not committed keeps its
    pin and is archived on the next start.
    """
    service = Service(settings, RootsDir(settings.roots_dir), notifier, executor)
    try:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(service.run)
                async for signum in signals:
                    log.info("stopping on %s; unfinished paths keep their pins",
                             signal.Signals(signum).name)
                    notifier.send("STOPPING=1")
                    service.stop()
                    nursery.cancel_scope.cancel()
                    break
    finally:
        await service.close()
    return 0


def refuse_second_watch(cache: Cache) -> None:
    """Say at once that another watch holds this cache, before any other log line (the
    service's own check comes later, once the cache is usable)."""
    try:
        fd = os.open(os.path.join(cache.root, ".narfs", LOCK_FILE), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return  # no lock file yet: no watch has ever held this cache
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise already_running(cache) from None
    finally:
        os.close(fd)


def warn_if_not_gc_roots(roots_dir: str) -> None:
    real = os.path.realpath(roots_dir)
    if not (real + "/").startswith(GC_ROOTS_DIR + "/"):
        log.warning("%s: not under %s, so its pins are not GC roots: Nix may collect a build "
                    "before it is archived; use a directory under %s (the default is "
                    "%s/narfs)", roots_dir, GC_ROOTS_DIR, GC_ROOTS_DIR, GC_ROOTS_DIR)


def main(args: argparse.Namespace, settings: Settings) -> int:
    refuse_second_watch(Cache(settings.cache_dir))
    warn_if_not_gc_roots(settings.roots_dir)
    configured = config.load().roots_dir
    if os.path.abspath(settings.roots_dir) != os.path.abspath(configured):
        log.warning("--roots %s: narfs-hook pins in %s (roots_dir in %s), which this watch does "
                    "not look at; set roots_dir there instead", settings.roots_dir, configured,
                    config.config_path())
    notifier = Notifier.from_environment()
    try:
        with ThreadPoolExecutor(settings.threads, thread_name_prefix="zstd") as executor:
            return trio.run(serve, settings, notifier, executor)
    finally:
        notifier.close()
