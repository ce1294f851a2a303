"""Files kept in one directory, least recently used out first, at most `limit` bytes in all:
what the mount's hot tier (reader.HotTier) and a remote mount's fetched ranges
(remote.RangeCache) are built on.

The directory is derived state and untrusted like the rest: a kept file is opened without
following a symlink or blocking on a FIFO, and one that is not a regular file of the expected
size is forgotten (the next write's rename replaces it). The LRU order survives a restart
through mtimes (each use touches its file). Several processes may share the directory (every
mount of one cache); none takes a lock on it, so a temporary is removed at start only once it
is old enough to belong to no live writer. Thread-safe: writes run in worker threads.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from .cache import TMP_PREFIX, new_temporary, remove_file

log = logging.getLogger(__name__)

STALE_TMP = 3600  # a temporary older than this belongs to no live writer


class DiskLRU:
    def __init__(self, directory: str, limit: int, mode: int = 0o755,
                 kept: Callable[[str], bool] = lambda name: True) -> None:
        """`kept(name)` says which regular files found at start are this LRU's."""
        self.dir = directory
        self.limit = limit
        self._lock = threading.Lock()
        self._files: OrderedDict[str, int] = OrderedDict()  # name → size, oldest use first
        self.size = 0
        os.makedirs(directory, mode=mode, exist_ok=True)
        found = []
        now = time.time()
        with os.scandir(directory) as it:
            for e in it:
                try:
                    st = e.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if e.name.startswith(TMP_PREFIX):
                    if now - st.st_mtime > STALE_TMP:
                        remove_file(e.path)
                elif stat.S_ISREG(st.st_mode) and kept(e.name):
                    found.append((st.st_mtime, e.name, st.st_size))
        for _, name, size in sorted(found):
            self._files[name] = size
            self.size += size
        self.make_room(0)  # the limit may have been lowered since the last start

    def has(self, name: str) -> bool:
        with self._lock:
            return name in self._files

    def open(self, name: str, size: int) -> int | None:
        """A read-only descriptor of kept file `name` if it is a regular file of `size` bytes
        (and it becomes the most recently used); None when it is not kept."""
        with self._lock:
            if name not in self._files:
                return None
            self._files.move_to_end(name)
        path = os.path.join(self.dir, name)
        try:
            # O_NONBLOCK: a FIFO put in the file's place must not hang the worker thread.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as e:
            # Evicted by another process sharing the directory, or replaced by a symlink
            # (ELOOP) or a socket (ENXIO): not kept, either way.
            if e.errno not in (errno.ENOENT, errno.ELOOP, errno.ENXIO):
                raise
            self._forget(name)
            return None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            os.close(fd)
            log.warning("%s: not a regular file of %d bytes; writing it again", path, size)
            self._forget(name)
            return None
        os.utime(fd)
        return fd

    def temporary(self, name: str) -> tuple[int, str]:
        """A new temporary (descriptor open for writing, path) that `adopt` keeps as `name`."""
        return new_temporary(self.dir, name)

    def adopt(self, name: str, tmp: str, size: int) -> None:
        """Keep temporary `tmp` of `size` bytes as `name`, evicting what no longer fits (but
        never `name` itself: a file larger than the whole limit is kept, alone, until the
        next one comes in, since refusing it would make what it holds unreachable).

        The rename happens under the lock, as evictions' and drops' unlinks do: another
        thread's eviction of an older `name` could otherwise unlink the file just renamed into
        place, and leave the books naming a file that is gone (seen in CI, under load)."""
        with self._lock:
            os.rename(tmp, os.path.join(self.dir, name))
            self.size += size - self._files.pop(name, 0)
            self._files[name] = size
            self._make_room(0, keep=1)

    def make_room(self, needed: int) -> None:
        """Evict until `needed` more bytes fit (before writing a file that large)."""
        with self._lock:
            self._make_room(needed)

    def drop(self, name: str) -> None:
        with self._lock:  # with the books, so a concurrent adopt's new file is not unlinked
            self.size -= self._files.pop(name, 0)
            remove_file(os.path.join(self.dir, name))

    def _forget(self, name: str) -> None:
        with self._lock:
            self.size -= self._files.pop(name, 0)

    def _make_room(self, needed: int, keep: int = 0) -> None:
        """Under the lock: evict oldest-used files, sparing the `keep` newest. Open descriptors
        keep an evicted file readable until they close."""
        while len(self._files) > keep and self.size + needed > self.limit:
            name, size = self._files.popitem(last=False)
            self.size -= size
            remove_file(os.path.join(self.dir, name))
            log.debug("%s: evicted %s (%d bytes)", self.dir, name, size)
