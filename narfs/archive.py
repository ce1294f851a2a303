"""Archiving store closures into the cache: NAR → seekable zstd + listing → signed narinfo.

Per path, one thread serialises the tree and hashes the NAR while worker threads compress its
frames; several paths run at once under a CapacityLimiter. A path's narinfo is published only
after every reference of it in the same run is published, so the cache never shows a path whose
closure is incomplete, and a NAR whose sha256 differs from the narHash Nix registered is refused.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import trio

from . import listing, nix32, store
from .cache import TMP_PREFIX, Cache, describe_os_error
from .config import Settings
from .errors import NarfsError
from .nar import NarSerialiser
from .narinfo import NarInfo
from .progress import Progress, human_size
from .signing import SecretKey
from .store import PathInfo
from .storepath import hash_part, name_part
from .zstdseek import SeekableWriter

log = logging.getLogger(__name__)


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
            return f"nothing to archive: all {self.skipped} paths are already in the cache"
        ratio = self.file_bytes / self.nar_bytes if self.nar_bytes else 1.0
        line = (f"archived {len(self.archived)} paths: {human_size(self.nar_bytes)} NAR → "
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

    async def archive(self, paths: list[str], progress: bool = True) -> Result:
        """Archive the closures of `paths` (valid store paths) and report what happened."""
        return await self.archive_infos(await store.closure_infos(paths), progress)

    async def archive_infos(self, infos: dict[str, PathInfo], progress: bool = True) -> Result:
        """Archive every path of `infos` (a closure) that the cache lacks."""
        start = time.monotonic()
        todo = {p: i for p, i in infos.items() if not self.cache.has(hash_part(p))}
        result = Result(skipped=len(infos) - len(todo))
        bar = Progress(sum(i.nar_size for i in todo.values()), "archiving") if progress \
            else Progress(0, "")
        done = {p: trio.Event() for p in todo}
        try:
            async with trio.open_nursery() as nursery:
                for p in topological(todo):
                    nursery.start_soon(self._one, todo[p], done, result, bar)
        finally:
            bar.close()
        result.seconds = time.monotonic() - start
        return result

    async def _one(self, info: PathInfo, done: dict[str, trio.Event], result: Result,
                   bar: Progress) -> None:
        try:
            t0 = time.monotonic()
            async with self.limiter:
                entry = await trio.to_thread.run_sync(self.write_files, info)
            for ref in info.references:
                if ref != info.path and ref in done:
                    await done[ref].wait()
                    if ref in result.failed:
                        raise NarfsError(f"not published: its reference {ref} failed")
            async with self.limiter:
                await trio.to_thread.run_sync(self.cache.publish, entry)
            result.archived.append(entry)
            bar.advance(info.nar_size, name_part(info.path))
            log.info("archived %s (%s, ratio %.2f, %.2f s)", info.path[11:],
                     human_size(info.nar_size), (entry.file_size or 0) / max(info.nar_size, 1),
                     time.monotonic() - t0)
        except NarfsError as e:
            result.failed[info.path] = str(e)
            log.error("%s: %s", info.path, e)
        except OSError as e:
            result.failed[info.path] = describe_os_error(e, self.cache.root)
            log.error("%s: %s", info.path, result.failed[info.path])
        finally:
            done[info.path].set()

    def write_files(self, info: PathInfo) -> NarInfo:
        """Write the NAR and listing of one path (durably, not yet published); return its narinfo.

        Runs in a worker thread. The NAR is first written under a temporary name because its
        final name is the hash of its compressed bytes.
        """
        cache = self.cache
        s = self.settings
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".nar.zst", dir=cache.nar_dir)
        try:
            with os.fdopen(fd, "wb") as f:
                parallel = info.nar_size > s.frame_size and s.threads > 1
                writer = SeekableWriter(f, s.frame_size, s.zstd_level,
                                        self.executor if parallel else None, s.threads)
                nar_sha = hashlib.sha256()
                ser = NarSerialiser(info.path)
                try:
                    for chunk in ser:
                        nar_sha.update(chunk)
                        writer.write(chunk)
                    writer.close()
                finally:
                    writer.abort()
                f.flush()
                os.fsync(f.fileno())
            nar_hash = nix32.format_sha256(nar_sha.digest())
            if nar_hash != info.nar_hash or writer.nar_size != info.nar_size:
                raise NarfsError(
                    f"store path is damaged: its NAR hashes to {nar_hash} ({writer.nar_size} "
                    f"bytes) but Nix registered {info.nar_hash} ({info.nar_size} bytes); "
                    f"run `nix-store --verify --check-contents --repair`")
            file_hash = nix32.encode(writer.sha256.digest())
            url = f"nar/{file_hash}.nar.zst"
            os.chmod(tmp, 0o644)
            os.rename(tmp, cache.nar_path(url))
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        assert ser.listing is not None
        cache.write_atomic(cache.listing_path(hash_part(info.path)), listing.render(ser.listing))
        cache.sync_nar_dir()
        entry = NarInfo(
            store_path=info.path,
            url=url,
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
        return entry
