"""Archiving store closures into the cache: NAR → seekable zstd + listing → signed narinfo.

Paths go in batches, references first. A batch is written by one worker thread (a large path's
frames are compressed by the executor's threads meanwhile) and several batches are written at
once under a CapacityLimiter; batches are committed one after the other, in order. A path's
narinfo is published only after every reference of it in the same run is published, so the cache
never shows a path whose closure is incomplete, and a NAR whose sha256 differs from the narHash
Nix registered is refused.

Commit protocol (DESIGN contract 3), kept per batch so that a thousand small paths cost a few
syncs rather than five thousand fsyncs:
  1. each path's NAR, `.ls` and narinfo go to temporaries (`.narfs-tmp-*`) beside their final
     names, unsynced;
  2. syncfs: every temporary's bytes are durable;
  3. NARs and `.ls` are renamed into place; fsync of nar/ and of the cache directory;
  4. the narinfos are renamed into place, references first: each appearance is a commit;
     then fsync of the cache directory.
A crash leaves either no narinfo or a complete, durable entry, plus temporaries that the next
writer removes (Cache.writer).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import trio

from . import frameauth, listing, nix32, nixquery, pathindex
from .cache import Cache, describe_os_error, fsync_dir, new_temporary, remove_file
from .config import Settings
from .errors import NarfsError
from .nar import NarSerialiser
from .narinfo import NarInfo
from .nixversions import PathInfo
from .progress import Progress, human_size, plural
from .signing import SecretKey, load_secret_key
from .storepath import base_name, hash_part, name_part
from .zstdseek import SeekableWriter

log = logging.getLogger(__name__)

BATCH_PATHS = 128  # a batch ends at this many paths ...
BATCH_BYTES = 32 << 20  # ... or this many NAR bytes, whichever comes first
PROGRESS_STEP = 1 << 20  # a bar moves at most once a MiB of NAR (tqdm redraws at most 10/s)


def _syncfs_func():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syncfs
    except (OSError, AttributeError):
        return None


_SYNCFS = _syncfs_func()


def syncfs(path: str) -> None:
    """Make everything written to the filesystem holding `path` durable, in one call."""
    if _SYNCFS is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _SYNCFS(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
    finally:
        os.close(fd)


@dataclass
class Result:
    archived: list[NarInfo] = field(default_factory=list)
    skipped: int = 0  # already in the cache
    failed: dict[str, str] = field(default_factory=dict)  # store path → one-line reason
    seconds: float = 0.0

    @property
    def nar_bytes(self) -> int:
        return sum(i.nar_size for i in self.archived)

    @property
    def file_bytes(self) -> int:
        return sum(i.file_size or 0 for i in self.archived)

    def summary(self) -> str:
        if not self.archived and not self.failed:
            return f"nothing to archive: {plural(self.skipped, 'path')} already in the cache"
        ratio = self.file_bytes / self.nar_bytes if self.nar_bytes else 1.0
        line = (f"archived {plural(len(self.archived), 'path')}: "
                f"{human_size(self.nar_bytes)} NAR → "
                f"{human_size(self.file_bytes)} compressed (ratio {ratio:.2f}) "
                f"in {self.seconds:.1f} s")
        if self.skipped:
            line += f"; {self.skipped} already archived"
        if self.failed:
            line += f"; {len(self.failed)} FAILED"
        return line


def topological(infos: dict[str, PathInfo]) -> list[str]:
    """Paths ordered references-first (self-references ignored); ties broken by path."""
    order: list[str] = []
    state: dict[str, int] = {}
    for start in sorted(infos):
        if start in state:
            continue
        stack = [(start, iter(sorted(infos[start].references)))]
        state[start] = 1
        while stack:
            path, refs = stack[-1]
            for ref in refs:
                if ref in infos and ref not in state:
                    state[ref] = 1
                    stack.append((ref, iter(sorted(infos[ref].references))))
                    break
            else:
                stack.pop()
                state[path] = 2
                order.append(path)
    return order


class Archiver:
    """Writes entries into one cache. Dependencies come in so each part is testable alone."""

    def __init__(self, cache: Cache, settings: Settings, key: SecretKey | None,
                 executor: ThreadPoolExecutor) -> None:
        self.cache = cache
        self.settings = settings
        self.key = key
        self.executor = executor
        self.limiter = trio.CapacityLimiter(settings.threads)
        # Set by a stopping service (`narfs watch`): NAR writes end at their next chunk, remove
        # their temporary and fail the path, so shutdown neither waits for nor leaves a big write.
        self.stop = threading.Event()
        # NAR bytes written so far of each path being written: [done, total] (the service's
        # STATUS= names the path and its progress; plain ints, updated from worker threads).
        self.in_progress: dict[str, list[int]] = {}

    @classmethod
    def from_settings(cls, settings: Settings, executor: ThreadPoolExecutor) -> Archiver:
        """The one place an Archiver is assembled from settings (narfs archive, narfs watch):
        the cache must be writable and the key, when one is configured, valid."""
        cache = Cache(settings.cache_dir)
        cache.check_writable()
        key = None
        if settings.secret_key_file:
            key = load_secret_key(settings.secret_key_file)
            cache.record_key(key.public)
        else:
            log.warning("no secret_key_file configured: narinfos are written unsigned "
                        "(run `narfs init` or pass --secret-key)")
        return cls(cache, settings, key, executor)

    async def archive(self, paths: list[str], progress: bool = True) -> Result:
        """Archive the closures of `paths` (valid store paths) and report what happened."""
        return await self.archive_infos(await nixquery.closure_infos(paths), progress)

    async def archive_infos(self, infos: dict[str, PathInfo], progress: bool = True) -> Result:
        """Archive every path of `infos` (a closure) that the cache lacks."""
        start = time.monotonic()
        todo = {p: i for p, i in infos.items() if not self.cache.has(hash_part(p))}
        result = Result(skipped=len(infos) - len(todo))
        bar = Progress(sum(i.nar_size for i in todo.values()), "archiving") if progress \
            else Progress(0, "")
        batches = list(_batches([todo[p] for p in topological(todo)]))
        committed = [trio.Event() for _ in batches]
        try:
            async with trio.open_nursery() as nursery:
                for k, batch in enumerate(batches):
                    nursery.start_soon(self._batch, batch, committed, k, result, bar)
        finally:
            bar.close()
        result.seconds = time.monotonic() - start
        return result

    async def _batch(self, batch: list[PathInfo], committed: list[trio.Event], k: int,
                     result: Result, bar: Progress) -> None:
        """Write batch `k`, wait until batch k-1 is committed, commit it."""
        try:
            async with self.limiter:
                written = await trio.to_thread.run_sync(self._write_batch, batch, result, bar)
            if k:
                await committed[k - 1].wait()
            async with self.limiter:
                await trio.to_thread.run_sync(self._commit, written, result)
        finally:
            committed[k].set()

    def _fail(self, result: Result, path: str, e: Exception) -> None:
        if isinstance(e, NarfsError):
            result.failed[path] = str(e)
            if self.stop.is_set():  # a stop is not a failure worth an error line
                return
        else:
            assert isinstance(e, OSError)
            result.failed[path] = describe_os_error(e, self.cache.root)
        log.error("%s: %s", path, result.failed[path])

    def _write_batch(self, batch: list[PathInfo], result: Result,
                     bar: Progress | None = None) -> list[_Written]:
        """Step 1 for every path of a batch (in a worker thread); failures go to `result`."""
        written = []
        for info in batch:
            try:
                written.append(self.write_files(info, bar))
            except (NarfsError, OSError) as e:
                self._fail(result, info.path, e)
        return written

    def _commit(self, written: list[_Written], result: Result) -> None:
        """Steps 2-4 for the written paths of a batch (in a worker thread)."""
        cache = self.cache
        ready = []
        for w in written:  # references first, so a failure here reaches its referrers
            bad = next((r for r in w.info.references if r != w.info.path and r in result.failed),
                       None)
            if bad is not None:
                w.discard()
                self._fail(result, w.info.path,
                           NarfsError(f"not published: its reference {bad} failed"))
            else:
                ready.append(w)
        if not ready:
            return
        try:
            syncfs(cache.root)
            for w in ready:
                os.rename(w.nar_tmp, cache.nar_path(w.entry.url))
                if w.listing_tmp:
                    os.rename(w.listing_tmp, cache.listing_path(w.entry.hash))
            cache.sync_nar_dir()
            fsync_dir(cache.root)
            with cache.publish_lock(exclusive=False):
                for w in ready:
                    gone = self._retired_meanwhile(w)
                    if gone is not None:
                        w.discard()
                        self._fail(result, w.info.path, NarfsError(
                            f"not published: {gone} was retired from the cache meanwhile "
                            "(narfs gc); archive it again"))
                        continue
                    os.rename(w.narinfo_tmp, cache.narinfo_path(w.entry.hash))
                    result.archived.append(w.entry)
                    log.info("archived %s (%s, ratio %.2f)", base_name(w.info.path),
                             human_size(w.info.nar_size),
                             (w.entry.file_size or 0) / max(w.info.nar_size, 1))
            fsync_dir(cache.root)
            frameauth.publish(cache, self.key, [w.entry for w in ready
                                                if w.entry in result.archived])
            pathindex.publish(cache)
        except OSError as e:
            for w in ready:
                w.discard()
                if w.entry not in result.archived:
                    self._fail(result, w.info.path, e)

    def _retired_meanwhile(self, w: _Written) -> str | None:
        """What of a narinfo's NAR and references gc removed since they were checked
        (called under the publish lock); None when everything is still there."""
        if not os.path.exists(self.cache.nar_path(w.entry.url)):
            return w.entry.url
        for ref in w.entry.references:
            if ref != w.entry.name and not self.cache.has(hash_part(ref)):
                return ref
        return None

    @staticmethod
    def _temporary(final: str, data: bytes) -> str:
        """A new temporary beside `final` holding `data`; not synced (see _commit)."""
        fd, tmp = new_temporary(*os.path.split(final))
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        except BaseException:
            remove_file(tmp)
            raise
        return tmp

    def write_files(self, info: PathInfo, bar: Progress | None = None) -> _Written:
        """Step 1 for one path: its NAR, listing and signed narinfo, as temporaries.

        Runs in a worker thread. The NAR's final name is the hash of its compressed bytes, so
        it can only be named once it is written. The bar moves with the bytes, so one large
        path shows its progress rather than 0% until it is done.
        """
        cache = self.cache
        s = self.settings
        if self.stop.is_set():
            raise NarfsError("interrupted: narfs is stopping")
        # Named once written (its name is its compressed bytes' hash): a temporary of nar/.
        fd, nar_tmp = new_temporary(cache.nar_dir, "nar")
        listing_tmp = narinfo_tmp = ""
        try:
            with os.fdopen(fd, "wb") as f:
                parallel = info.nar_size > s.frame_size and s.threads > 1
                writer = SeekableWriter(f, s.frame_size, s.zstd_level,
                                        self.executor if parallel else None, s.threads)
                nar_sha = hashlib.sha256()
                ser = NarSerialiser(info.path)
                done = [0, info.nar_size]
                shown = 0
                label = name_part(info.path)
                self.in_progress[info.path] = done
                try:
                    for chunk in ser:
                        if self.stop.is_set():
                            raise NarfsError("interrupted: narfs is stopping")
                        nar_sha.update(chunk)
                        writer.write(chunk)
                        done[0] += len(chunk)
                        if bar is not None and done[0] - shown >= PROGRESS_STEP:
                            bar.advance(done[0] - shown, label)
                            shown = done[0]
                    writer.close()
                finally:
                    writer.abort()
                    self.in_progress.pop(info.path, None)
                    if bar is not None and done[0] > shown:
                        bar.advance(done[0] - shown, label)
            nar_hash = nix32.format_sha256(nar_sha.digest())
            if nar_hash != info.nar_hash or writer.nar_size != info.nar_size:
                raise NarfsError(
                    f"store path is damaged: its NAR hashes to {nar_hash} ({writer.nar_size} "
                    f"bytes) but Nix registered {info.nar_hash} ({info.nar_size} bytes); "
                    f"run `nix-store --verify --check-contents --repair`")
            file_hash = nix32.encode(writer.sha256.digest())
            assert ser.listing is not None
            ls = listing.render(ser.listing)  # None: too deep for a `.ls` (read from the NAR)
            listing_tmp = (self._temporary(cache.listing_path(hash_part(info.path)), ls)
                           if ls is not None else "")
            entry = NarInfo(
                store_path=info.path,
                url=f"nar/{file_hash}.nar.zst",
                compression="zstd",
                file_hash=f"sha256:{file_hash}",
                file_size=writer.size,
                nar_hash=info.nar_hash,
                nar_size=info.nar_size,
                references=sorted(os.path.basename(r) for r in info.references),
                deriver=os.path.basename(info.deriver) if info.deriver else None,
                sigs=list(info.sigs),
                ca=info.ca,
            )
            if self.key is not None:
                entry.sign(self.key)
            narinfo_tmp = self._temporary(cache.narinfo_path(entry.hash), entry.render().encode())
        except BaseException:
            _remove_temporaries(nar_tmp, listing_tmp, narinfo_tmp)
            raise
        return _Written(info, entry, nar_tmp, listing_tmp, narinfo_tmp)


@dataclass
class _Written:
    """One path after step 1: its temporaries and the narinfo they will be published as."""

    info: PathInfo
    entry: NarInfo
    nar_tmp: str
    listing_tmp: str  # "" when the path has no `.ls`
    narinfo_tmp: str

    def discard(self) -> None:
        _remove_temporaries(self.nar_tmp, self.listing_tmp, self.narinfo_tmp)


def _remove_temporaries(*paths: str) -> None:
    for tmp in paths:
        if tmp:
            remove_file(tmp)


def _batches(infos: list[PathInfo]) -> Iterator[list[PathInfo]]:
    """Consecutive runs of `infos` (kept in order) of at most BATCH_PATHS paths and about
    BATCH_BYTES of NAR."""
    batch: list[PathInfo] = []
    size = 0
    for info in infos:
        batch.append(info)
        size += info.nar_size
        if len(batch) >= BATCH_PATHS or size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch
