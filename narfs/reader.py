"""The mount's read path: bytes at an offset of a NAR, as cheaply as its format allows.

NARs come from a Backend (backend.py) as NarFiles, read only through their pread.
- Seekable zstd (what narfs writes): only the frames covering the bytes are decompressed; the
  decompressed frames live in a FrameCache bounded in bytes (settings.frame_cache_mb).
- Uncompressed NARs are read in place.
- Everything else (xz, bzip2, gzip, zstd without a seek table, as `nix copy` writes them) has no
  random access: the HotTier holds such a NAR decompressed once under `<cache>/.narfs/hot/`,
  checked against its NarHash, bounded in bytes (settings.hot_tier_mb) and evicted
  least-recently-used; reads are then plain preads at narOffset.

Reads cost what they ask for, within bounds named by the configuration: a zstd NAR is read frame
by frame only when its frames fit in the frame cache (else every small read would decompress a
whole frame again) and its seek table fits in its share of memory, frame_cache_mb / max_open
(zstdseek.TABLE_BYTES_PER_FRAME a frame: at most frame_cache_mb for the tables of all open
NARs, plus those kept open by a read in flight). Any other zstd NAR goes through the hot tier.

Every NAR is untrusted: a damaged frame, a seek table that lies, a NAR shorter or longer than its
narinfo says, raise CorruptError, which the filesystem turns into EIO for that read only.
Blocking work runs in worker threads: the methods named `*_sync` are the thread side.

Concurrency rules (tests/t1_reader.py tests what they give: single-flight loads, a source
closed only after its last read, bounded caches):
- Only the trio thread touches Reader._sources, Reader._inflight, the FrameCache and
  Source.users/retired; they have no lock.
- Worker threads run the `*_sync` methods (preads only: no shared file position), which use
  the Backend and its NarFiles (thread-safe by the protocol), HotTier (its own lock) and
  Stats.add (its own lock), and of the Reader only its fixed bounds (frames.limit,
  max_table_frames).
- Stretches without a checkpoint are relied on: in read() and listing(), from `source()`
  returning to `src.users += 1` (else the source could be evicted and closed in between); in
  source() and _frame(), from `_once` returning to storing its value, and in _frames(), from
  setting its flights done to putting their frames (waiters wake then, and must find them).
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
from .cache import TMP_PREFIX, new_temporary, remove_file
from .catalog import Entry
from .errors import CorruptError
from .narstream import decompressed_chunks, parse_checked
from .zstdseek import TABLE_BYTES_PER_FRAME, SeekTable

log = logging.getLogger(__name__)
T = TypeVar("T")

HOT_SUFFIX = ".nar"
STALE_TMP = 3600  # a hot-tier temporary older than this belongs to no live fill
# Frames smaller than this (but the last) make a NAR go through the hot tier: a read of 128 KiB
# then spans at most ~2000 frames, where a table of empty or one-byte frames made it 100,000s
# (seconds of the trio thread). narfs writes 4 KiB frames at least, Nix 2.35 16 MiB ones.
MIN_FRAME = 64


@dataclass
class Stats:
    """Counters for tests and benchmarks (exposed as the `user.narfs.stats` xattr)."""

    frames_decompressed: int = 0
    frame_bytes_read: int = 0  # compressed bytes read to decompress frames
    frame_hits: int = 0
    nar_parses: int = 0
    bytes_decompressed: int = 0  # by frames and hot-tier fills (listings' parses not counted)
    table_bytes: int = 0  # not a counter: what the seek tables of open NARs hold now

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
    """Decompressed frames, least-recently-used first out, at most `limit` bytes in all.

    Each frame is charged its bytes plus ENTRY_OVERHEAD, what holding it costs besides (the
    bytes object, its key, the dict's entry): a seek table of one-byte frames must not hold
    two hundred times the bound in bookkeeping."""

    ENTRY_OVERHEAD = 256

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self._frames: OrderedDict[tuple, bytes] = OrderedDict()

    def get(self, key: tuple) -> bytes | None:
        data = self._frames.get(key)
        if data is not None:
            self._frames.move_to_end(key)
        return data

    def fits(self, size: int) -> bool:
        """Whether a frame of `size` bytes can be kept at all."""
        return size + self.ENTRY_OVERHEAD <= self.limit

    def put(self, key: tuple, data: bytes) -> None:
        if not self.fits(len(data)) or key in self._frames:
            return
        self._frames[key] = data
        self.size += len(data) + self.ENTRY_OVERHEAD
        while self.size > self.limit:
            _, old = self._frames.popitem(last=False)
            self.size -= len(old) + self.ENTRY_OVERHEAD


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
                if e.name.startswith(TMP_PREFIX):
                    if now - st.st_mtime > STALE_TMP:
                        remove_file(e.path)
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
        fd, tmp = new_temporary(self.dir, os.path.basename(path))
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
            remove_file(tmp)
            raise
        return fd

    def _make_room(self, needed: int, keep: int = 0) -> None:
        """Evict oldest-used files until `needed` more bytes fit, sparing the `keep` newest.
        A NAR larger than the whole tier still goes in, alone: refusing it would make its
        files unreadable. Open descriptors keep an evicted file readable until they close."""
        while len(self._files) > keep and self.size + needed > self.limit:
            name, size = self._files.popitem(last=False)
            self.size -= size
            remove_file(os.path.join(self.dir, name))
            log.debug("hot tier: evicted %s (%d bytes)", name, size)


class Source:
    """One open NAR: the backend's file (seekable zstd, uncompressed) or its decompressed copy
    in the hot tier. `users` counts reads in flight, so eviction from the open-source LRU
    closes the file only once no worker thread can still be reading it."""

    def __init__(self, key: tuple, file: NarFile, nar_size: int, table: SeekTable | None,
                 stats: Stats) -> None:
        self.key = key
        self.file = file
        self.closed = False
        self.stats = stats
        if table is not None:
            stats.add(table_bytes=table.nbytes)
        self.nar_size = nar_size
        self.table = table
        self.users = 0
        self.retired = False

    def frames_sync(self, indices: list[int]) -> tuple[list[bytes], CorruptError | None]:
        """Frames `indices` decompressed in turn, up to the first damaged one (with its error):
        one worker-thread call for all the frames a read misses."""
        assert self.table is not None
        f, dctx = _At(self.file), _dctx()
        out: list[bytes] = []
        comp = dec = 0
        try:
            for i in indices:
                frame = self.table.frames[i]
                out.append(zstdseek.read_frame(f, frame, dctx))
                comp += frame.comp_size
                dec += frame.size
        except CorruptError as e:
            return out, e
        finally:
            self.stats.add(frames_decompressed=len(out), frame_bytes_read=comp,
                           bytes_decompressed=dec)
        return out, None

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
            if self.table is not None:
                self.stats.add(table_bytes=-self.table.nbytes)


class _Flight:
    """One make in progress (of one key, or a batch of frames): waiters wait for `done`, then
    find the value or share `error`, if it is their `key`'s (None: any key's)."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: str | None = None
        self.key: tuple | None = None


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
        # Each open NAR's seek table holds at most an equal share of the frame cache's bound,
        # so the tables of all open NARs together hold at most as much again as the frames.
        self.max_table_frames = max(frame_cache_bytes // max_open // TABLE_BYTES_PER_FRAME - 1,
                                    0)
        self.stats = Stats()
        self._sources: OrderedDict[tuple, Source] = OrderedDict()
        self._inflight: dict[tuple, _Flight] = {}

    @staticmethod
    def key(entry: Entry) -> tuple:
        return (entry.hash, entry.url, entry.nar_hash)

    # --- opening ------------------------------------------------------------------------

    def _open_sync(self, entry: Entry) -> Source:
        """The NAR opened for reads at any offset. Seekable when the memory bounds can hold
        it: a seek table within this NAR's share of them and frames no larger than the frame
        cache (a larger frame would be decompressed whole again for every small read, as it
        cannot stay). Anything else is decompressed once, as a stream, into the hot tier:
        bounded on disk, cut off past NarSize, checked against NarHash, then read by pread."""
        key = self.key(entry)
        f = self.backend.open_nar(entry)
        try:
            if entry.compression == "zstd":
                table = self._table_sync(f, entry)
                if table is not None and not self.frames.fits(table.max_frame):
                    log.info("%s: frames of up to %d bytes, more than the frame cache holds; "
                             "reading it through the hot tier", entry.url, table.max_frame)
                elif table is not None and table.min_frame < MIN_FRAME:
                    log.info("%s: frames of %d bytes, too small to read one by one; reading "
                             "it through the hot tier", entry.url, table.min_frame)
                elif table is not None:
                    return Source(key, f, entry.nar_size, table, self.stats)
            if entry.compression == "none":
                if f.size != entry.nar_size:
                    raise CorruptError(f"uncompressed NAR is {f.size} bytes, NarSize says "
                                       f"{entry.nar_size}")
                return Source(key, f, entry.nar_size, None, self.stats)

            def produce(write: Callable[[bytes], None]) -> None:
                for chunk in decompressed_chunks(_At(f), entry.compression):
                    self.stats.add(bytes_decompressed=len(chunk))
                    write(chunk)

            hot = LocalFile(self.hot.open_sync(entry.nar_hash, entry.nar_size, produce))
            f.close()
            return Source(key, hot, entry.nar_size, None, self.stats)
        except BaseException:
            f.close()
            raise

    def _table_sync(self, f: NarFile, entry: Entry) -> SeekTable | None:
        """The NAR's frames: narfs's seekable NARs carry a seek table; Nix 2.35's independent
        frames can be indexed from their headers (nixversions); single-frame NARs cannot.
        None too when the table has more frames than this NAR's share of memory holds."""
        try:
            table = (zstdseek.read_table(_At(f), f.size, self.max_table_frames)
                     or zstdseek.index_frames(_At(f), f.size, self.max_table_frames))
        except zstdseek.TooManyFrames as e:
            size = e.size  # checked whole all the same: a lying table is still corrupt
            log.info("%s: seek table of %d frames, more than a NAR's share of memory; "
                     "reading it through the hot tier", entry.url, e.frames)
            table = None
        else:
            if table is None:
                return None
            size = table.size
        if size != entry.nar_size:
            raise CorruptError(f"seek table covers {size} bytes, NarSize says "
                               f"{entry.nar_size}")
        return table

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
            if flight.error is not None and flight.key in (None, key):
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
            indices = src.table.covering(offset, size)
            for i, data in zip(indices, await self._frames(src, indices), strict=True):
                frame = src.table.frames[i]
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

    async def _frames(self, src: Source, indices: range) -> list[bytes]:
        """Frames `indices` of `src`: from the frame cache, else decompressed, all those
        missing in one worker-thread call (a read over thousands of tiny frames pays one thread
        hop, not one per frame), and none by two reads at once: a frame another read is
        decompressing is waited for, and shares its CorruptError."""
        found: dict[int, bytes] = {}
        mine: list[int] = []
        theirs: list[int] = []
        for i in indices:
            data = self.frames.get((*src.key, i))
            if data is not None:
                found[i] = data
            elif (*src.key, i) in self._inflight:
                theirs.append(i)
            else:
                mine.append(i)
        self.stats.add(frame_hits=len(found))
        if mine:
            flight = _Flight()  # one for the batch: only the damaged frame's waiters fail
            for i in mine:
                self._inflight[(*src.key, i)] = flight
            error = None
            try:
                out, error = await trio.to_thread.run_sync(src.frames_sync, mine,
                                                           limiter=self.limiter)
                if error is not None:
                    flight.error, flight.key = str(error), (*src.key, mine[len(out)])
            finally:
                for i in mine:
                    del self._inflight[(*src.key, i)]
                flight.done.set()
            # No checkpoint from here to the puts: woken waiters find their frames cached
            # (unless this read alone outgrows the cache; then they decompress them again).
            for i, data in zip(mine, out, strict=False):
                self.frames.put((*src.key, i), data)
                found[i] = data
            if error is not None:
                raise error
        for i in theirs:
            found[i] = await self._frame(src, i)
        return [found[i] for i in indices]

    async def _frame(self, src: Source, index: int) -> bytes:
        """One frame another read was decompressing (see _frames)."""
        key = (*src.key, index)

        def make() -> bytes:
            out, error = src.frames_sync([index])
            if error is not None:
                raise error
            return out[0]

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
