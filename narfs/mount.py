"""`narfs mount` and `narfs umount`: the mount's lifecycle around the filesystem in fs.py.

- Without --foreground the command forks (before any thread exists: sqlitedict and trio start
  threads), the child mounts and serves, and the parent returns once the child reports the mount
  answering requests, like sshfs; the child logs to `<cache>/.narfs/mount.log`.
- With --foreground it serves in the calling process and sends READY=1 to $NOTIFY_SOCKET.
- SIGTERM, SIGINT and SIGHUP end the FUSE loop and unmount; an unmount from outside
  (`fusermount3 -u`, `narfs umount`) ends the loop, and so the process. Last access times are
  flushed on the way out either way. SIGUSR1 logs the read path's counters.
- Live: inotify on the cache directory (names `<hash>.narinfo`) → catalog sync of just those
  hashes → the mount; a full sync runs at start and every FULL_SYNC seconds as a safety net (and
  every POLL seconds when inotify is unavailable).
- Mode (fs.py): fast when pyfuse3 carries narfs's patch (or `fuse_mode = "fast"` demands it),
  stock otherwise or when `fuse_mode = "stock"`. The log says which, and so does `narfs status`
  through `<cache>/.narfs/mount-<pid>.json` (mounttable.py), removed at unmount.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import signal
import stat
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

import pyfuse3
import trio

from .backend import Backend, LocalBackend
from .cache import Cache, write_atomic
from .catalog import Catalog
from .config import Settings
from .errors import NarfsError
from .fs import NarFS, fast_capable
from .mounttable import fuse_problem, narfs_mounts, remove_stale_states, state_name, state_text
from .notify import Notifier
from .progress import plural
from .reader import HotTier, Reader
from .remote import RemoteBackend, is_url, open_remote
from .storepath import is_hash
from .view import ArchiveView

log = logging.getLogger(__name__)

FULL_SYNC = 300.0
POLL = 2.0
DEBOUNCE = 0.05
FLUSH = 10.0
LOG_NAME = "mount.log"
LOG_MAX = 8 << 20
# ro: a narfs mount always is; accepted because mount(8) users type it.
KNOWN_OPTIONS = {"allow_other", "ro", "nonempty"}


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def fuse_options(cache_root: str, allow_other: bool) -> set[str]:
    """`fsname=narfs:<cache>` and type fuse.narfs let `narfs status`/`restore` map a mount back
    to its cache through /proc/mounts. libfuse splits options at commas: escape them."""
    fsname = "narfs:" + cache_root.replace("\\", "\\\\").replace(",", "\\,")
    options = set(pyfuse3.default_options) | {"ro", f"fsname={fsname}", "subtype=narfs"}
    if allow_other:
        options.add("allow_other")
    return options


def parse_options(given: list[str]) -> set[str]:
    options = {o for arg in given for o in arg.split(",") if o}
    unknown = options - KNOWN_OPTIONS
    if unknown:
        raise NarfsError(f"unknown mount option {sorted(unknown)[0]!r}; known: "
                         f"{', '.join(sorted(KNOWN_OPTIONS))}")
    return options


def check_mountpoint(mountpoint: str, nonempty: bool) -> None:
    dead = (f"{mountpoint}: a dead mount is there (its process ended); "
            f"`fusermount3 -u {mountpoint}` first")
    try:
        if not stat.S_ISDIR(os.stat(mountpoint).st_mode):  # a dead mount: ENOTCONN
            raise FileNotFoundError
        if mountpoint in {m.mountpoint for m in narfs_mounts(trusted=False)}:
            os.listdir(mountpoint)  # a dead one: ENOTCONN (a stat may come from the kernel's cache)
            raise NarfsError(f"{mountpoint}: a narfs mount is already there; "
                             f"`narfs umount {mountpoint}` first")
        entries = os.listdir(mountpoint)
    except (FileNotFoundError, NotADirectoryError):
        raise NarfsError(f"{mountpoint}: mount point is not a directory; create it first "
                         f"(mkdir -p {mountpoint})") from None
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise NarfsError(dead) from None
        raise NarfsError(f"{mountpoint}: cannot read the mount point ({e.strerror})") from None
    if entries and not nonempty:
        hidden = plural(len(entries), "entry", "entries")
        raise NarfsError(f"{mountpoint}: mount point is not empty (the mount would hide its "
                         f"{hidden}); use an empty directory, or -o nonempty to mount over them")


def main(args: argparse.Namespace, settings: Settings) -> int:
    if args.mountpoint is None:  # one positional: the mount point
        args.mountpoint, args.source = args.source, None
    if args.source:
        settings = replace(settings, cache_dir=args.source)
    options = parse_options(args.options)
    mountpoint = os.path.realpath(args.mountpoint or settings.mountpoint)  # as /proc/mounts
    check_mountpoint(mountpoint, "nonempty" in options)
    problem = fuse_problem()
    if problem:
        raise NarfsError(f"cannot mount {mountpoint}: {problem}")
    if args.paths and not is_url(settings.cache_dir):
        raise NarfsError("--path names store paths of a remote cache: narfs mount "
                         "--path STOREPATH http(s)://host/path MOUNTPOINT")
    remote = open_remote(settings.cache_dir, settings, args.paths) \
        if is_url(settings.cache_dir) else None
    cache = remote.mirror if remote else Cache(settings.cache_dir)
    cache.check()
    where = remote.where if remote else cache.root
    if not where.isascii():
        raise NarfsError(f"{where}: FUSE mount options must be ASCII; use a cache path or "
                         "URL without non-ASCII characters")
    allow_other = settings.allow_other or "allow_other" in options
    fast = choose_mode(settings.fuse_mode)
    if args.foreground:
        return serve(cache, settings, mountpoint, allow_other, Notifier.from_environment(),
                     fast, remote)
    return _daemonise(cache, settings, mountpoint, allow_other, fast, remote)


def choose_mode(wanted: str) -> bool:
    """True for the fast mode (fs.py): when pyfuse3 allows it, unless the settings say stock."""
    capable = fast_capable()
    if wanted == "fast" and not capable:
        raise NarfsError(f"fuse_mode = fast: pyfuse3 {pyfuse3.__version__} lacks narfs's patch; "
                         "install it with tools/install-pyfuse3 VENV, or use fuse_mode = auto")
    return capable and wanted != "stock"


def describe_mode(fast: bool, wanted: str) -> str:
    if fast:
        return (f"fast mode: zero-message opens, cached directories and symlinks (pyfuse3 "
                f"{pyfuse3.__version__} with narfs's patch)")
    why = ("fuse_mode = stock" if wanted == "stock" else
           f"pyfuse3 {pyfuse3.__version__} lacks narfs's patch; see tools/install-pyfuse3")
    return f"stock mode: every open and listing is a request to narfs ({why})"


def _daemonise(cache: Cache, settings: Settings, mountpoint: str, allow_other: bool,
               fast: bool, remote: RemoteBackend | None) -> int:
    """Fork; return in the parent once the child's mount answers, or with its error line."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a daemon that serves the mount
        code = 1
        try:
            os.close(r)
            os.setsid()
            _detach_stdio(cache)
            code = serve(cache, settings, mountpoint, allow_other, _PipeReady(w), fast, remote)
        except NarfsError as e:
            log.error("%s", e)
            _report(w, str(e))
        except BaseException as e:
            log.exception("mount failed")
            _report(w, f"{mountpoint}: mount failed: {e}")
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        message = f.read().decode(errors="replace")
    if message == "ready":
        return 0
    _, status = os.waitpid(pid, 0)
    if not message:
        message = f"{mountpoint}: the mount process ended ({status}) before the mount was live"
    log_file = cache.state_path(LOG_NAME)
    # Point only at a log this user can read (the mount's own log may be root's).
    raise NarfsError(message + (f"; see {log_file}" if os.access(log_file, os.R_OK) else ""))


def _report(fd: int, message: str) -> None:
    try:
        os.write(fd, message.encode())
    except OSError:
        pass


class _PipeReady(Notifier):
    """Readiness for the parent of a daemonised mount: "ready" on the pipe, then close it."""

    def __init__(self, fd: int) -> None:
        super().__init__(None)
        self.fd = fd

    def send(self, *fields: str) -> None:
        if "READY=1" in fields and self.fd >= 0:
            _report(self.fd, "ready")
            os.close(self.fd)
            self.fd = -1


def _detach_stdio(cache: Cache) -> None:
    """Point stdio at the mount log, so logging (and any stray traceback) lands there and the
    parent's pipes, e.g. a caller's captured stdout, close when the parent exits."""
    path = cache.state_path(LOG_NAME)
    try:
        if os.path.getsize(path) > LOG_MAX:
            os.replace(path, path + ".1")
    except OSError:
        pass
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:
        fd = os.open(os.devnull, os.O_WRONLY)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.close(null)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter("%(asctime)s narfs[%(process)d]: %(message)s"))


def serve(cache: Cache, settings: Settings, mountpoint: str, allow_other: bool,
          notifier: Notifier, fast: bool, remote: RemoteBackend | None = None) -> int:
    """Mount, serve until unmounted or signalled, unmount. Blocking; returns the exit code.
    A remote mount (`remote`) serves its mirror directory `cache` (remote.py)."""
    catalog = Catalog(cache)
    try:
        return trio.run(_serve, cache, catalog, settings, mountpoint, allow_other, notifier,
                        fast, remote)
    finally:
        catalog.close()
        notifier.close()
        if remote is not None:
            remote.close()


async def _serve(cache: Cache, catalog: Catalog, settings: Settings, mountpoint: str,
                 allow_other: bool, notifier: Notifier, fast: bool,
                 remote: RemoteBackend | None) -> int:
    limiter = trio.CapacityLimiter(max(2, settings.threads))
    hot = await trio.to_thread.run_sync(HotTier, cache.state_path("hot"),
                                        settings.hot_tier_mb << 20)
    if remote is not None:
        await trio.to_thread.run_sync(remote.start, catalog)
    backend: Backend = remote or LocalBackend(cache)
    reader = Reader(backend, hot, settings.frame_cache_mb << 20, limiter)
    view = ArchiveView(backend, catalog, reader, trio.CapacityLimiter(1),
                       cache.state_path("trees"), prefetch=fast)
    fs = NarFS(view, reader, fast)
    await view.start()
    if not view.paths:  # a new catalog: fill it first, so the mount does not come up empty
        await fs.refresh()
    # Signals are caught from before the mount exists: a SIGTERM in the first instants (a
    # service stopped while starting) must unmount, not kill the process and leave the
    # mount point dead ("Transport endpoint is not connected").
    with trio.open_signal_receiver(*STOP_SIGNALS, signal.SIGUSR1) as signals:
        # libfuse waits for fusermount3 with waitpid(), which a signal interrupts (EINTR: the
        # mount fails half made). This thread holds them back until the mount exists; they
        # are then delivered to `signals`.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            pyfuse3.init(fs, mountpoint, fuse_options(backend.where, allow_other))
        except RuntimeError:
            raise NarfsError(f"{mountpoint}: mounting failed (is /dev/fuse available and "
                             "fusermount3 installed? allow_other needs user_allow_other in "
                             "/etc/fuse.conf for non-root users)") from None
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        fs.live = True
        log.info("mounted %s on %s", backend.where, mountpoint)
        log.info("%s", describe_mode(fast, settings.fuse_mode))
        state = cache.state_path(state_name(os.getpid()))
        _write_state(cache, state, mountpoint, fs.mode)
        return await _run(fs, reader, notifier, signals, mountpoint, cache.root, state,
                          settings.access_window)


async def _run(fs: NarFS, reader: Reader, notifier: Notifier, signals: AsyncIterator[int],
               mountpoint: str, root: str, state: str, access_window: float) -> int:
    """The FUSE loop and its helper tasks, until unmounted or signalled; then unmount."""
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_fuse_main, nursery)
            nursery.start_soon(_announce, mountpoint, notifier)
            nursery.start_soon(_signals, signals, fs, notifier)
            nursery.start_soon(_keep_in_step, fs, root)
            if isinstance(reader.backend, RemoteBackend):
                nursery.start_soon(reader.backend.follow)  # its mirror, the root, follows it
            nursery.start_soon(_every, FLUSH, fs.view.flush,
                               "recording last access times and listings")
            nursery.start_soon(_every, access_window, fs.expire,
                               "dropping the kernel's cached contents of read files")
    finally:
        with trio.CancelScope(shield=True):
            try:
                await fs.view.flush()
            except Exception:
                log.exception("recording last access times and listings failed")
        fs.live = False
        pyfuse3.close(unmount=True)
        reader.close()
        try:
            os.unlink(state)
        except OSError:
            pass
        log.info("unmounted %s", mountpoint)
    return 0


def _write_state(cache: Cache, path: str, mountpoint: str, mode: str) -> None:
    """For `narfs status`; best effort: a mount serves the same without it."""
    remove_stale_states(os.path.dirname(path))
    try:
        write_atomic(path, state_text(mountpoint, mode))
    except OSError as e:
        log.warning("%s: not written (%s); narfs status will not show the mode", path, e)


async def _fuse_main(nursery: trio.Nursery) -> None:
    await pyfuse3.main()
    nursery.cancel_scope.cancel()  # unmounted: the helper tasks end with the loop


async def _announce(mountpoint: str, notifier: Notifier) -> None:
    """Ready once a stat through the kernel is answered by this process's loop."""
    # Abandoned on cancel: when the loop ends before this stat is answered, nothing will answer
    # it until the unmount, which must not wait for it.
    st = await trio.to_thread.run_sync(os.stat, mountpoint, abandon_on_cancel=True)
    if st.st_ino != pyfuse3.ROOT_INODE:
        log.warning("%s: mount point does not show the mount's root", mountpoint)
    notifier.send("READY=1", f"STATUS=serving {mountpoint}")
    # After this stat returned: an unmount from now on finds no request of the mount's own in
    # flight there (one would make it fail with EBUSY).
    log.info("serving %s", mountpoint)


async def _signals(signals: AsyncIterator[int], fs: NarFS, notifier: Notifier) -> None:
    """SIGTERM, SIGINT, SIGHUP: unmount. SIGUSR1: log the read path's counters (frames
    decompressed, cache sizes, ...) as one JSON line, for tests, benchmarks and debugging."""
    async for signum in signals:
        if signum == signal.SIGUSR1:
            log.info("stats %s", json.dumps(fs.stats(), sort_keys=True))
            continue
        log.info("%s: unmounting", signal.Signals(signum).name)
        notifier.send("STOPPING=1")
        pyfuse3.terminate()  # main() returns, even when it has not started yet
        return


async def _every(period: float, job: Callable[[], Awaitable[None]], what: str) -> None:
    """`job` every `period` seconds until cancelled; a failure is logged, not fatal."""
    while True:
        await trio.sleep(period)
        try:
            await job()
        except Exception:
            log.exception("%s failed", what)


async def _keep_in_step(fs: NarFS, root: str) -> None:
    """Full sync now (the catalog may lag the directory), then follow inotify."""
    await _refresh(fs, None)
    await trio.to_thread.run_sync(fs.view.trees.prune, limiter=fs.reader.limiter)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fs.view.fill_tops)
        try:
            from inotify_simple import INotify, flags
            inotify = INotify(nonblocking=True)
            inotify.add_watch(root, flags.MOVED_TO | flags.MOVED_FROM | flags.DELETE
                              | flags.CLOSE_WRITE | flags.DELETE_SELF | flags.MOVE_SELF)
        except (ImportError, OSError) as e:
            log.warning("%s: cannot watch the cache directory (%s); polling every %.0f s",
                        root, e, POLL)
            while True:
                await trio.sleep(POLL)
                await _refresh(fs, None)
        with inotify:
            while True:
                with trio.move_on_after(FULL_SYNC) as scope:
                    await trio.lowlevel.wait_readable(inotify.fileno())
                if scope.cancelled_caught:
                    await _refresh(fs, None)
                    continue
                await trio.sleep(DEBOUNCE)  # one sync for a burst (`narfs archive` of a closure)
                hashes: set[str] | None = set()
                for ev in inotify.read(timeout=0):
                    if ev.mask & (flags.Q_OVERFLOW | flags.DELETE_SELF | flags.MOVE_SELF):
                        hashes = None
                    elif hashes is not None and ev.name.endswith(".narinfo"):
                        if is_hash(ev.name[:-8]):
                            hashes.add(ev.name[:-8])
                if hashes is None or hashes:
                    await _refresh(fs, hashes)


async def _refresh(fs: NarFS, hashes: set[str] | None) -> None:
    try:
        added, _ = await fs.refresh(hashes)
    except Exception:  # a failed sync must not end the mount: the next event or timer retries
        log.exception("keeping the mount in step with the cache failed")
        return
    if added:
        await fs.view.fill_tops()


# --- /proc/mounts and umount --------------------------------------------------------------


def umount_main(args: argparse.Namespace, settings: Settings) -> int:
    mountpoint = os.path.realpath(args.mountpoint or settings.mountpoint)
    if mountpoint not in {m.mountpoint for m in narfs_mounts(trusted=False)}:
        raise NarfsError(f"{mountpoint}: not a narfs mount (see /proc/mounts)")
    proc = subprocess.run(["fusermount3", "-u", mountpoint], capture_output=True, text=True)
    if proc.returncode != 0:
        err = proc.stderr.strip().splitlines()
        reason = err[-1] if err else f"fusermount3 exited {proc.returncode}"
        if "busy" in reason.lower():
            raise NarfsError(f"{mountpoint}: busy ({reason}); close the files and shells "
                             f"using it, or `umount -l {mountpoint}`")
        raise NarfsError(f"{mountpoint}: unmounting failed: {reason}")
    return 0

