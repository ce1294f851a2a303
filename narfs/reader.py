"""The mount's read path: bytes at an offset of a NAR, as cheaply as its format allows.

- Seekable zstd (what narfs writes): only the frames covering the bytes are decompressed; the
  decompressed frames live in a FrameCache bounded in bytes (settings.frame_cache_mb).
- Uncompressed NARs are read in place.
- Everything else (xz, bzip2, gzip, zstd without a seek table, as `nix copy` writes them) has no
  random access: the HotTier holds such a NAR decompressed once under `<cache>/.narfs/hot/`,
  checked against its NarHash, bounded in bytes (settings.hot_tier_mb) and evicted
  least-recently-used; reads are then plain preads at narOffset.

Every NAR is untrusted: a damaged frame, a seek table that lies, a NAR shorter or longer than its
narinfo says, raise CorruptError, which the filesystem turns into EIO for that read only.
Blocking work runs in worker threads: the methods named `*_sync` are the thread side.

Concurrency rules (tests/t1_reader.py tests what they give: single-flight loads, a source
closed only after its last read, bounded caches):
- Only the trio thread touches Reader._sources, Reader._inflight, the FrameCache and
  Source.users/retired; they have no lock.
- Worker threads run the `*_sync` methods (preads only: no shared file position), which use
  the Cache, HotTier (its own lock) and Stats.add (its own lock), and nothing else of the Reader.
- Stretches without a checkpoint are relied on: in read() and listing(), from `source()`
  returning to `src.users += 1` (else the source could be evicted and closed in between); in
  source() and _frame(), from `_once` returning to storing its value (waiters wake then, and
  must find it).
Checklist for a change here: no `await` inside those stretches; a new blocking call goes to a
worker thread; a new shared structure is either trio-thread only or locked; a new cache has a
bound and a test of it in tests/t1_reader.py.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TypeVar

import trio
import zstandard

from . import nar, nix32, zstdseek
from .backend import Backend, LocalFile, NarFile
from .catalog import Entry
from .errors import CorruptError
from .narstream import decompressed_chunks, parse_checked
from .zstdseek import SeekTable

log = logging.getLogger(__name__)
T = TypeVar("T")

HOT_SUFFIX = ".nar"
HOT_TMP = ".tmp-"
STALE_TMP = 3600  # a hot-tier temporary older than this belongs to no live fill


@dataclass
class Stats:
    """Counters for tests and benchmarks (exposed as the `user.narfs.stats` xattr)."""

    frames_decompressed: int = 0
    frame_bytes_read: int = 0  # compressed bytes read to decompress frames
    frame_hits: int = 0
    nar_parses: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()  # worker threads count too

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class _At:
    """A file-like view of a NarFile through its pread: several threads may read one NAR at
    once, each with its own position, and none disturbs another."""

    def __init__(self, f: NarFile, pos: int = 0) -> None:
        self.f = f
        self.pos = pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else self.pos + pos
        return self.pos

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = max(self.f.size - self.pos, 0)
        data = self.f.pread(self.pos, n)
        self.pos += len(data)
        return data

    def readable(self) -> bool:
        return True


class FrameCache:
    """Decompressed frames, least-recently-used first out, at most `limit` bytes in all."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self._frames: OrderedDict[tuple, bytes] = OrderedDict()

    def get(self, key: tuple) -> bytes | None:
        data = self._frames.get(key)
        if data is not None:
            self._frames.move_to_end(key)
        return data

    def put(self, key: tuple, data: bytes) -> None:
        if len(data) > self.limit or key in self._frames:
            return
        self._frames[key] = data
        self.size += len(data)
        while self.size > self.limit:
            _, old = self._frames.popitem(last=False)
            self.size -= len(old)


class HotTier:
    """Non-seekable NARs decompressed once, named by their NarHash (content-addressed, so two
    store paths with one NAR share a file and a changed narinfo can never match a stale file).

    Invariant: a file under its final name is a complete NAR whose sha256 was checked while it
    was written (temporary, fsync, rename). Thread-safe: fills run in worker threads.
    """

    def __init__(self, directory: str, limit: int) -> None:
        self.dir = directory
        self.limit = limit
        self._lock = threading.Lock()
        self._files: OrderedDict[str, int] = OrderedDict()  # name → size, oldest use first
        self.size = 0
        self.fills = 0
        os.makedirs(directory, mode=0o755, exist_ok=True)
        found = []
        now = time.time()
        with os.scandir(directory) as it:
            for e in it:
                try:
                    st = e.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if e.name.startswith(HOT_TMP):
                    if now - st.st_mtime > STALE_TMP:
                        _unlink(e.path)
                elif e.name.endswith(HOT_SUFFIX) and e.is_file(follow_symlinks=False):
                    found.append((st.st_mtime, e.name, st.st_size))
        for _, name, size in sorted(found):
            self._files[name] = size
            self.size += size
        self._make_room(0)  # the limit may have been lowered since the last mount

    def open_sync(self, nar_hash: str, nar_size: int,
                  produce: Callable[[Callable[[bytes], None]], None]) -> int:
        """A descriptor of the decompressed NAR; `produce(write)` decompresses it when absent."""
        name = nar_hash.split(":")[-1] + HOT_SUFFIX
        path = os.path.join(self.dir, name)
        with self._lock:
            known = name in self._files
            if known:
                self._files.move_to_end(name)
        if known:
            try:
                # O_NONBLOCK: a FIFO put in the file's place must not hang the worker thread.
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
            except OSError as e:
                # Evicted by another mount of the same cache, or replaced by a symlink (ELOOP):
                # absent either way, and the fill's rename replaces whatever is there.
                if e.errno not in (errno.ENOENT, errno.ELOOP):
                    raise
                with self._lock:
                    self.size -= self._files.pop(name, 0)
            else:
                st = os.fstat(fd)
                if stat.S_ISREG(st.st_mode) and st.st_size == nar_size:
                    os.utime(fd)  # the LRU order survives a remount through mtimes
                    return fd
                os.close(fd)
                log.warning("%s: hot-tier file is not a regular file of the NAR's size; "
                            "decompressing again", path)
        with self._lock:
            self._make_room(nar_size)
        fd = self._fill(path, nar_hash, nar_size, produce)
        with self._lock:
            self.fills += 1
            self.size -= self._files.pop(name, 0)
            self._files[name] = nar_size
            self.size += nar_size
            self._make_room(0, keep=1)
        return fd

    def _fill(self, path: str, nar_hash: str, nar_size: int,
              produce: Callable[[Callable[[bytes], None]], None]) -> int:
        tmp = os.path.join(self.dir, f"{HOT_TMP}{os.getpid()}-{threading.get_ident()}-"
                                     f"{os.path.basename(path)}")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            sha = hashlib.sha256()
            written = 0

            def write(data: bytes) -> None:
                nonlocal written
                written += len(data)
                if written > nar_size:
                    raise CorruptError(f"NAR decompresses to more than its NarSize {nar_size}")
                sha.update(data)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]

            produce(write)
            if written != nar_size:
                raise CorruptError(f"NAR decompresses to {written} bytes, NarSize says "
                                   f"{nar_size}")
            got = nix32.format_sha256(sha.digest())
            if got != nar_hash:
                raise CorruptError(f"NAR hashes to {got}, narinfo says {nar_hash}")
            os.fsync(fd)
            os.rename(tmp, path)
        except BaseException:
            os.close(fd)
            _unlink(tmp)
            raise
        return fd

    def _make_room(self, needed: int, keep: int = 0) -> None:
        """Evict oldest-used files until `needed` more bytes fit, sparing the `keep` newest.
        A NAR larger than the whole tier still goes in, alone: refusing it would make its
        files unreadable. Open descriptors keep an evicted file readable until they close."""
        while len(self._files) > keep and self.size + needed > self.limit:
            name, size = self._files.popitem(last=False)
            self.size -= size
            _unlink(os.path.join(self.dir, name))
            log.debug("hot tier: evicted %s (%d bytes)", name, size)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class Source:
    """One open NAR: the backend's file (seekable zstd, uncompressed) or its decompressed copy
    in the hot tier. `users` counts reads in flight, so eviction from the open-source LRU
    closes the file only once no worker thread can still be reading it."""

    def __init__(self, key: tuple, file: NarFile, nar_size: int,
                 table: SeekTable | None) -> None:
        self.key = key
        self.file = file
        self.closed = False
        self.nar_size = nar_size
        self.table = table
        self.users = 0
        self.retired = False

    def frame_sync(self, index: int, stats: Stats) -> bytes:
        assert self.table is not None
        frame = self.table.frames[index]
        data = zstdseek.read_frame(_At(self.file), frame, _dctx())
        stats.add(frames_decompressed=1, frame_bytes_read=frame.comp_size)
        return data

    def pread_sync(self, offset: int, size: int) -> bytes:
        data = self.file.pread(offset, size)
        if len(data) != size:
            raise CorruptError(f"NAR ends at {offset + len(data)}, before its NarSize "
                               f"{self.nar_size}")
        return data

    def close(self) -> None:
        self.retired = True
        if self.users == 0 and not self.closed:
            self.file.close()
            self.closed = True


class _Flight:
    """One make in progress: waiters wait for `done`, then find the value or share `error`."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: str | None = None


_local = threading.local()


def _dctx() -> zstandard.ZstdDecompressor:
    """One decompression context per worker thread: contexts are not thread-safe."""
    d = getattr(_local, "dctx", None)
    if d is None:
        d = _local.dctx = zstandard.ZstdDecompressor()
    return d


class Reader:
    """Reads ranges of store paths' NARs for the filesystem; owns the caches of the read path."""

    def __init__(self, backend: Backend, hot: HotTier, frame_cache_bytes: int,
                 limiter: trio.CapacityLimiter, max_open: int = 64) -> None:
        self.backend = backend
        self.hot = hot
        self.frames = FrameCache(frame_cache_bytes)
        self.limiter = limiter
        self.max_open = max_open
        self.stats = Stats()
        self._sources: OrderedDict[tuple, Source] = OrderedDict()
        self._inflight: dict[tuple, _Flight] = {}

    @staticmethod
    def key(entry: Entry) -> tuple:
        return (entry.hash, entry.url, entry.nar_hash)

    # --- opening ------------------------------------------------------------------------

    def _open_sync(self, entry: Entry) -> Source:
        key = self.key(entry)
        f = self.backend.open_nar(entry)
        try:
            if entry.compression == "zstd":
                # narfs's seekable NARs carry a seek table; Nix 2.35's independent frames can
                # be indexed from their headers (nixversions); single-frame NARs cannot.
                table = (zstdseek.read_table(_At(f), f.size)
                         or zstdseek.index_frames(_At(f), f.size))
                if table is not None:
                    if table.size != entry.nar_size:
                        raise CorruptError(f"seek table covers {table.size} bytes, NarSize "
                                           f"says {entry.nar_size}")
                    return Source(key, f, entry.nar_size, table)
            if entry.compression == "none":
                if f.size != entry.nar_size:
                    raise CorruptError(f"uncompressed NAR is {f.size} bytes, NarSize says "
                                       f"{entry.nar_size}")
                return Source(key, f, entry.nar_size, None)

            def produce(write: Callable[[bytes], None]) -> None:
                for chunk in decompressed_chunks(_At(f), entry.compression):
                    write(chunk)

            hot = LocalFile(self.hot.open_sync(entry.nar_hash, entry.nar_size, produce))
            f.close()
            return Source(key, hot, entry.nar_size, None)
        except BaseException:
            f.close()
            raise

    async def _once(self, key: tuple, get: Callable[[], T | None], make: Callable[[], T]) -> T:
        """The value `get()` finds, else `make()`'s (run in a thread), never two makes of the
        same key at once: concurrent readers of one frame or NAR wait for the first, and share
        its CorruptError too (a damaged NAR is not decompressed again for each of them)."""
        while True:
            value = get()
            if value is not None:
                return value
            flight = self._inflight.get(key)
            if flight is None:
                break
            await flight.done.wait()
            if flight.error is not None:
                raise CorruptError(flight.error)
        flight = self._inflight[key] = _Flight()
        try:
            return await trio.to_thread.run_sync(make, limiter=self.limiter)
        except CorruptError as e:
            flight.error = str(e)
            raise
        finally:
            del self._inflight[key]
            flight.done.set()

    async def source(self, entry: Entry) -> Source:
        key = self.key(entry)

        def make() -> Source:
            return self._open_sync(entry)

        src = self._sources.get(key)
        if src is None:
            src = await self._once(("open", *key), lambda: self._sources.get(key), make)
            if key not in self._sources:
                self._sources[key] = src
                while len(self._sources) > self.max_open:
                    _, old = self._sources.popitem(last=False)
                    old.close()
        self._sources.move_to_end(key)
        return src

    # --- reading ------------------------------------------------------------------------

    async def read(self, entry: Entry, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) of the path's uncompressed NAR (clamped to its end)."""
        src = await self.source(entry)
        size = max(0, min(size, src.nar_size - offset))
        if size == 0:
            return b""
        src.users += 1
        try:
            if src.table is None:
                return await trio.to_thread.run_sync(src.pread_sync, offset, size,
                                                     limiter=self.limiter)
            parts = []
            for i in src.table.covering(offset, size):
                frame = src.table.frames[i]
                data = await self._frame(src, i)
                lo = max(offset - frame.offset, 0)
                hi = min(offset + size - frame.offset, frame.size)
                parts.append(data[lo:hi] if (lo, hi) != (0, frame.size) else data)
            return parts[0] if len(parts) == 1 else b"".join(parts)
        finally:
            src.users -= 1
            if src.retired:
                src.close()

    def cached(self, entry: Entry, offset: int, size: int) -> bytes | None:
        """Bytes [offset, offset+size) of an open NAR if the frame cache holds them all; None
        otherwise (nothing is read or decompressed)."""
        src = self._sources.get(self.key(entry))
        if src is None or src.table is None or offset + size > src.nar_size:
            return None
        parts = []
        for i in src.table.covering(offset, size):
            frame = src.table.frames[i]
            data = self.frames.get((*src.key, i))
            if data is None:
                return None
            lo = max(offset - frame.offset, 0)
            parts.append(data[lo:min(offset + size - frame.offset, frame.size)])
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _frame(self, src: Source, index: int) -> bytes:
        key = (*src.key, index)
        data = self.frames.get(key)
        if data is not None:
            self.stats.frame_hits += 1
            return data

        def make() -> bytes:
            return src.frame_sync(index, self.stats)

        data = await self._once(key, lambda: self.frames.get(key), make)
        self.frames.put(key, data)
        return data

    # --- listings from NAR streams -----------------------------------------------------

    async def listing(self, entry: Entry) -> dict:
        """Parse the path's NAR into a `.ls` root node (for caches without `.ls` files).
        Non-seekable NARs go through the hot tier, so their later reads cost nothing more."""
        src = await self.source(entry)
        src.users += 1
        try:
            return await trio.to_thread.run_sync(self._listing_sync, src, entry,
                                                 limiter=self.limiter)
        finally:
            src.users -= 1
            if src.retired:
                src.close()

    def _listing_sync(self, src: Source, entry: Entry) -> dict:
        self.stats.add(nar_parses=1)
        # The whole NAR is read anyway, so its NarHash is checked too: a listing is never built
        # from bytes other than the ones the (signed) narinfo vouches for.
        compression = "none" if src.table is None else "zstd"  # the hot tier holds plain NARs
        builder = nar.ListingBuilder()
        parse_checked(decompressed_chunks(_At(src.file), compression),
                      builder, entry.nar_size, entry.nar_hash)
        return builder.root

    def close(self) -> None:
        for src in self._sources.values():
            src.close()
        self._sources.clear()
