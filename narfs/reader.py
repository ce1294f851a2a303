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

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TypeVar

import trio
import zstandard

from . import nar, nix32, zstdseek
from .backend import Backend, LocalFile, NarFile, NarView
from .cache import remove_file
from .catalog import Entry
from .disklru import DiskLRU
from .errors import CorruptError
from .narstream import decompressed_chunks, parse_checked
from .zstdseek import TABLE_BYTES_PER_FRAME, SeekTable

log = logging.getLogger(__name__)
T = TypeVar("T")

HOT_SUFFIX = ".nar"
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

    def get(self, key: tuple, need: int = 0) -> bytes | None:
        """The frame's bytes kept, if at least its first `need` of them are (a read in the
        middle of a frame decompresses it only up to the end of the read)."""
        data = self._frames.get(key)
        if data is None or len(data) < need:
            return None
        self._frames.move_to_end(key)
        return data

    def __contains__(self, key: tuple) -> bool:
        return key in self._frames

    def fits(self, size: int) -> bool:
        """Whether a frame of `size` bytes can be kept at all."""
        return size + self.ENTRY_OVERHEAD <= self.limit

    def put(self, key: tuple, data: bytes) -> None:
        old = self._frames.get(key)
        if not self.fits(len(data)) or (old is not None and len(old) >= len(data)):
            return
        if old is not None:  # a longer part of the same frame
            del self._frames[key]
            self.size -= len(old) + self.ENTRY_OVERHEAD
        self._frames[key] = data
        self.size += len(data) + self.ENTRY_OVERHEAD
        while self.size > self.limit:
            _, old = self._frames.popitem(last=False)
            self.size -= len(old) + self.ENTRY_OVERHEAD


class HotTier(DiskLRU):
    """Non-seekable NARs decompressed once, named by their NarHash (content-addressed, so two
    store paths with one NAR share a file and a changed narinfo can never match a stale file).

    Invariant: a file under its final name is a complete NAR whose sha256 was checked while it
    was written (temporary, fsync, rename). Thread-safe: fills run in worker threads.
    """

    def __init__(self, directory: str, limit: int) -> None:
        super().__init__(directory, limit, kept=lambda name: name.endswith(HOT_SUFFIX))
        self.fills = 0

    def open_sync(self, nar_hash: str, nar_size: int,
                  produce: Callable[[Callable[[bytes], None]], None]) -> int:
        """A descriptor of the decompressed NAR; `produce(write)` decompresses it when absent."""
        name = nar_hash.split(":")[-1] + HOT_SUFFIX
        fd = self.open(name, nar_size)
        if fd is not None:
            return fd
        self.make_room(nar_size)
        fd, tmp = self.temporary(name)
        try:
            _fill(fd, nar_hash, nar_size, produce)
            self.adopt(name, tmp, nar_size)
        except BaseException:
            os.close(fd)
            remove_file(tmp)
            raise
        with self._lock:
            self.fills += 1
        return fd


def _fill(fd: int, nar_hash: str, nar_size: int,
          produce: Callable[[Callable[[bytes], None]], None]) -> None:
    """Write what `produce(write)` decompresses to `fd`, cut off the moment it outgrows
    NarSize, checked against NarHash, and fsynced."""
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
        raise CorruptError(f"NAR decompresses to {written} bytes, NarSize says {nar_size}")
    got = nix32.format_sha256(sha.digest())
    if got != nar_hash:
        raise CorruptError(f"NAR hashes to {got}, narinfo says {nar_hash}")
    os.fsync(fd)


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

    def frames_sync(self, indices: list[int], upto: int | None = None
                    ) -> tuple[list[bytes], CorruptError | None]:
        """Frames `indices` decompressed in turn, up to the first damaged one (with its error):
        one worker-thread call for all the frames a read misses. `upto`: the last of them only
        up to that many bytes (where the read ends)."""
        assert self.table is not None
        dctx = _dctx()
        out: list[bytes] = []
        comp = dec = 0
        try:
            for n, i in enumerate(indices):
                frame = self.table.frames[i]
                data = self.file.pread(frame.comp_offset, frame.comp_size)
                part = upto if n == len(indices) - 1 else None
                out.append(zstdseek.decompress_frame(data, frame, dctx, part))
                comp += frame.comp_size
                dec += len(out[-1])
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
                for chunk in decompressed_chunks(NarView(f), entry.compression):
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
            table = (zstdseek.read_table(NarView(f), f.size, self.max_table_frames)
                     or zstdseek.index_frames(NarView(f), f.size, self.max_table_frames))
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
            frames = await self._frames(src, indices, offset + size)
            for i, data in zip(indices, frames, strict=True):
                frame = src.table.frames[i]
                lo = max(offset - frame.offset, 0)
                hi = min(offset + size - frame.offset, frame.size)
                parts.append(data[lo:hi] if (lo, hi) != (0, len(data)) else data)
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
            hi = min(offset + size - frame.offset, frame.size)
            data = self.frames.get((*src.key, i), hi)
            if data is None:
                return None
            lo = max(offset - frame.offset, 0)
            parts.append(data[lo:hi])
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _frames(self, src: Source, indices: range, end: int) -> list[bytes]:
        """Frames `indices` of `src`, each at least up to NAR offset `end`: from the frame
        cache, else decompressed, all those missing in one worker-thread call (a read over
        thousands of tiny frames pays one thread hop, not one per frame), and none by two
        reads at once: a frame another read is decompressing is waited for, and shares its
        CorruptError.

        A frame of a verified file (backend.NarFile.verified) nothing of which is kept is
        decompressed only up to `end` (a small read in the middle of a 4 MiB frame stops
        halfway); one whose kept part is too short is decompressed whole, so reads going
        through a frame decompress it at most twice."""
        assert src.table is not None
        found: dict[int, bytes] = {}
        mine: list[int] = []
        theirs: list[int] = []
        upto = None
        for i in indices:
            frame = src.table.frames[i]
            need = min(end - frame.offset, frame.size)
            data = self.frames.get((*src.key, i), need)
            if data is not None:
                found[i] = data
            elif (*src.key, i) in self._inflight:
                theirs.append(i)
            else:
                mine.append(i)
                fresh = (*src.key, i) not in self.frames
                upto = need if fresh and need < frame.size else None
        self.stats.add(frame_hits=len(found))
        if mine:
            if not src.file.verified or mine[-1] != indices[-1]:
                upto = None
            flight = _Flight()  # one for the batch: only the damaged frame's waiters fail
            for i in mine:
                self._inflight[(*src.key, i)] = flight
            error = None
            try:
                out, error = await trio.to_thread.run_sync(src.frames_sync, mine, upto,
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
            found[i] = await self._frame(src, i, min(end - src.table.frames[i].offset,
                                                     src.table.frames[i].size))
        return [found[i] for i in indices]

    async def _frame(self, src: Source, index: int, need: int) -> bytes:
        """One frame another read was decompressing (see _frames), at least `need` bytes of
        it: if that read stopped short of them, decompressed whole."""
        key = (*src.key, index)

        def make() -> bytes:
            out, error = src.frames_sync([index])
            if error is not None:
                raise error
            return out[0]

        data = await self._once(key, lambda: self.frames.get(key, need), make)
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
        parse_checked(decompressed_chunks(NarView(src.file), compression),
                      builder, entry.nar_size, entry.nar_hash)
        return builder.root

    def close(self) -> None:
        for src in self._sources.values():
            src.close()
        self._sources.clear()
