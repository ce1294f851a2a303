"""The filesystem on the kernel's side: pyfuse3 operations over the archive view (view.py).

view.py holds the model: the layout of a mount, inode numbers, trees, lookup counts, access
records and which files a read may prefetch. This adapter turns its nodes into attributes and
its errors into errnos, keeps file handles, and makes the kernel calls.

Contents are immutable: entries and attributes carry long timeouts, files open with keep_cache,
and readdir returns attributes (readdirplus). Only the root and `.by-name` change, as paths are
archived or retired; `refresh` applies those changes to the view and tells the kernel to drop
what disappeared and to forget its cached listings and `latest` targets of the directories that
changed.

Two modes, chosen when the mount starts (`fast_capable`, `NarFS.fast`):
- fast (pyfuse3 with narfs's patch, patches/pyfuse3-fast.patch): open and opendir answer ENOSYS,
  so the kernel opens files and directories without asking narfs, never sends RELEASE, keeps
  file contents and directory listings in its page cache, and caches symlink targets. READ and
  READDIR then carry the inode in place of a file handle. A warm `grep -r` sends no requests.
- stock (pyfuse3 as PyPI ships it): open hands out a file handle per open file, opendir returns
  the inode as the handle; every open and listing is a round trip through Python.

Prefetch (fast mode): before a read in a directory listed in full to the kernel is answered,
the files beside it whose bytes the frame cache holds (`ArchiveView.prefetch_candidates`) are
handed to the kernel's page cache (notify_store, from a worker thread: the kernel locks the
pages it fills); their reads then never become requests. Answering first would race the reader,
which then asks for most of them anyway. A single file read by path (no listing) costs nothing.

Access records for gc (what counts: view.py): the kernel serves repeated reads from its page
cache without asking narfs; so that a path in steady use keeps being recorded, the contents of
files read are dropped from the kernel's cache once per access window (`expire`), and the next
read after that reaches narfs again.

No extended attributes: getxattr answers ENOSYS, which the kernel remembers for the whole
connection. `ls -l` asks for three per file (ACLs, SELinux); a round trip through Python each
would make a large listing ten times slower than the local disk.

Every handler turns unexpected exceptions into EIO with a log line: pyfuse3 only catches
FUSEError, and anything else would end the mount. Every request that reaches a handler is counted
per operation (`stats()["requests"]`), so tests can show what the kernel still asks. Threads:
docs/concurrency.md.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar

import pyfuse3
import trio

from .errors import CorruptError, NarfsError
from .reader import Reader
from .storepath import STORE_DIR
from .tree import DIR, EXE, LNK, REG
from .view import (
    ArchiveView,
    Broken,
    Invalid,
    IsADirectory,
    Node,
    NotADirectory,
    NotFound,
    ViewError,
)

log = logging.getLogger(__name__)

FOREVER = 86400.0  # kernel cache timeout for immutable entries (store path contents)
SHORT = 1.0  # stock mode: the by-name view and the root change as paths come and go
BLKSIZE = 128 << 10  # matches FUSE's largest read, so tools read in big chunks
MAX_LOGGED = 1000
MAX_READ_INODES = 1_000_000  # files whose cached contents `expire` drops, per window

_MODES = {DIR: stat.S_IFDIR | 0o555, REG: stat.S_IFREG | 0o444, EXE: stat.S_IFREG | 0o555,
          LNK: stat.S_IFLNK | 0o777}
ERRNO: dict[type[ViewError], int] = {
    NotFound: errno.ENOENT, NotADirectory: errno.ENOTDIR, IsADirectory: errno.EISDIR,
    Invalid: errno.EINVAL, Broken: errno.EIO}

T = TypeVar("T")
P = ParamSpec("P")
Handler = Callable[Concatenate["NarFS", P], Coroutine[Any, Any, T]]


def _guard(fn: Handler[P, T]) -> Handler[P, T]:
    """FUSEError passes; the view's errors become their errnos (ERRNO); damaged input becomes
    EIO with one log line; anything else EIO with a traceback, because pyfuse3 would end the
    mount on it."""

    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: NarFS, *args: P.args, **kwargs: P.kwargs) -> T:
        self.requests[name] += 1
        try:
            return await fn(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except ViewError as e:
            raise pyfuse3.FUSEError(ERRNO[type(e)]) from None
        except (NarfsError, OSError) as e:
            self.log_once(logging.ERROR, f"{fn.__name__}: {e}")
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:
            log.exception("%s%r failed", fn.__name__, args[:2])
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def fast_capable() -> bool:
    """Whether this pyfuse3 carries narfs's patch: the inode reaches read and readdir when open
    and opendir answer ENOSYS, and FileInfo has cache_readdir (the patch adds both at once)."""
    return hasattr(pyfuse3.FileInfo(), "cache_readdir")


class NarFS(pyfuse3.Operations):
    supports_dot_lookup = False  # no NFS export: `..` lookups never come

    def __init__(self, view: ArchiveView, reader: Reader, fast: bool = False) -> None:
        super().__init__()
        self.view = view
        self.reader = reader
        self.fast = fast
        # The root and `.by-name` change as paths come and go. `refresh` invalidates what
        # changed, which the fast mode relies on alone: its listings are cached until then.
        self.dynamic_timeout = FOREVER if fast else SHORT
        # Read by the patched pyfuse3 at init; `latest` targets change, and `refresh` tells
        # the kernel when (an attribute stock pyfuse3 ignores).
        self.enable_symlink_caching = fast
        self.read_inodes: set[int] = set()  # files read since the last `expire`
        self.handles: dict[int, int] = {}  # stock mode: fh → inode
        self.requests: Counter[str] = Counter()
        self.live = False  # set by the mount layer while the FUSE session exists
        self.prefetched = 0  # files handed to the kernel's page cache
        self._next_fh = 1
        self._logged: set[str] = set()

    def log_once(self, level: int, message: str) -> None:
        """A line per distinct problem: a damaged file read by eight greps is one line."""
        if message in self._logged:
            return
        if len(self._logged) < MAX_LOGGED:
            self._logged.add(message)
        log.log(level, "%s", message)

    def _attr(self, node: Node) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = node.inode
        e.generation = 0
        e.entry_timeout = e.attr_timeout = self.dynamic_timeout if node.dynamic else FOREVER
        e.st_mode = _MODES[node.kind]
        e.st_nlink = node.nlink
        e.st_uid = 0
        e.st_gid = 0
        e.st_size = node.size
        e.st_blksize = BLKSIZE
        e.st_blocks = (node.size + 511) // 512 if node.kind != DIR else 0
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = node.mtime_ns
        return e

    # --- keeping the kernel in step -----------------------------------------------------

    async def refresh(self, only: Iterable[str] | None = None) -> tuple[int, int]:
        """`ArchiveView.refresh`, then the kernel drops what went and what changed; returns
        (added, removed) counts."""
        changes = await self.view.refresh(only)
        if self.live:
            for parent, name, ino in changes.gone:
                pyfuse3.invalidate_entry_async(parent, name, deleted=ino, ignore_enoent=True)
            if changes.inodes:
                # Blocking kernel calls: a worker thread, never the loop that answers requests;
                # and abandoned on cancel, since once the loop has stopped nothing may ever
                # answer the requests the kernel waits for, and the unmount must not wait for
                # the thread.
                await trio.to_thread.run_sync(_invalidate_inodes, changes.inodes,
                                              abandon_on_cancel=True)
        return changes.added, changes.removed

    async def expire(self) -> None:
        """Drop the kernel's cached contents of the files read since the last call, so that
        their next read reaches narfs and is recorded as an access (see the module doc)."""
        inodes, self.read_inodes = list(self.read_inodes), set()
        if inodes and self.live:
            await trio.to_thread.run_sync(_invalidate_inodes, inodes, abandon_on_cancel=True)

    # --- handlers -----------------------------------------------------------------------

    @_guard
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None
                      ) -> pyfuse3.EntryAttributes:
        return self._attr(await self.view.getattr(inode))

    @_guard
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        return self._attr(await self.view.lookup(parent_inode, name))

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        self.requests["forget"] += 1
        try:
            self.view.forget(inode_list)
        except Exception:  # forget must never raise: there is no request to fail
            log.exception("forget failed")

    @_guard
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> bytes:
        return await self.view.readlink(inode)

    @_guard
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> int:
        if self.fast:  # the kernel opens directories itself from now on and caches listings
            raise pyfuse3.FUSEError(errno.ENOSYS)
        return inode  # directories need no state: the inode is the handle

    @_guard
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """Cursors (next_id, a signed 64-bit number) are the view's (`ArchiveView.listdir`);
        an entry counts as a lookup when readdir_reply takes it."""

        def reply(name: bytes, node: Node, next_id: int) -> bool:
            return pyfuse3.readdir_reply(token, name, self._attr(node), next_id)

        await self.view.listdir(fh, start_id, reply)

    @_guard
    async def releasedir(self, fh: int) -> None:
        pass

    @_guard
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext | None = None
                   ) -> pyfuse3.FileInfo:
        if self.fast:  # zero-message opens: no OPEN or RELEASE for any file from now on
            raise pyfuse3.FUSEError(errno.ENOSYS)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        await self.view.file(inode)  # EIO for a damaged path, EISDIR, ... at open, as before
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = inode
        # Contents never change: the kernel may keep its page cache across opens.
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @_guard
    async def read(self, fh: int, off: int, size: int) -> bytes:
        inode = fh if self.fast else self.handles[fh]  # fast: the patched pyfuse3 gives the inode
        key, entry, offset, length = await self.view.file(inode)
        self.view.record_read(key)
        if len(self.read_inodes) < MAX_READ_INODES:
            self.read_inodes.add(inode)
        if off >= length:
            return b""
        try:
            data = await self.reader.read(entry, offset + off, min(size, length - off))
        except (NarfsError, OSError) as e:  # name the path: the reader knows only its NAR
            raise CorruptError(f"{STORE_DIR}/{entry.name}: {e}") from None
        if self.fast and self.live:  # live: a FUSE session to hand the files to
            files = self.view.prefetch_candidates(key, entry, inode)
            if files:
                self.prefetched += await trio.to_thread.run_sync(_store_files, files,
                                                                 abandon_on_cancel=True)
                if len(self.read_inodes) < MAX_READ_INODES:  # `expire` drops them too
                    self.read_inodes.update(ino for ino, _ in files)
        return data

    @_guard
    async def release(self, fh: int) -> None:
        self.handles.pop(fh, None)

    @_guard
    async def flush(self, fh: int) -> None:
        raise pyfuse3.FUSEError(errno.ENOSYS)  # nothing to flush; the kernel stops asking

    @_guard
    async def statfs(self, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = s.f_bfree = s.f_bavail = 0
        s.f_files = len(self.view.paths)
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    # --- for the mount layer ------------------------------------------------------------

    @property
    def mode(self) -> str:
        return "fast" if self.fast else "stock"

    def stats(self) -> dict[str, object]:
        out: dict[str, object] = dict(self.reader.stats.as_dict())
        out.update(frame_cache_bytes=self.reader.frames.size, hot_fills=self.reader.hot.fills,
                   hot_bytes=self.reader.hot.size, **self.view.stats(),
                   open_files=len(self.handles), mode=self.mode,
                   requests=dict(self.requests), prefetched=self.prefetched)
        return out


def _store_files(files: list[tuple[int, bytes]]) -> int:
    """Blocking (the kernel locks the pages it fills): run in a worker thread."""
    stored = 0
    for ino, data in files:
        try:
            pyfuse3.notify_store(ino, 0, data)
            stored += 1
        except OSError:  # ENOENT: the kernel does not know the inode; nothing to fill
            pass
    return stored


def _invalidate_inodes(inodes: Iterable[int]) -> None:
    """Blocking (the kernel may wait for requests on these inodes): run in a worker thread."""
    for ino in inodes:
        try:
            pyfuse3.invalidate_inode(ino)
        except OSError as e:
            if e.errno != errno.ENOENT:  # ENOENT: the kernel holds nothing of it
                log.warning("invalidating inode %d: %s", ino, e)
