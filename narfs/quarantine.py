"""The quarantine: entries `narfs verify --repair` takes out of the cache without deleting them.

An entry whose NAR still matches its NarHash is never deleted (DESIGN contract 3). When its
signature does not verify, its closure is incomplete or its narinfo disagrees with its NAR
file, `--repair` moves it to `.narfs/quarantine/<hash>/`: `narinfo`, `ls` (when the cache had
one), `nar` and `why`. They are hard links made before the entry is un-published, so no copy is
made and at no instant is the only copy gone. `narfs quarantine` (cli.py) lists what is held,
`narfs quarantine --restore TARGET...|all` publishes it again, references first: an entry
whose references are not in the cache stays until they are.

The quarantine lives inside the cache directory, so it is as untrusted as the rest: every
directory on the way is opened without following symlinks, and what comes back is parsed and
checked again before it is published.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import stat
import time
from dataclasses import dataclass

from . import narinfo, pathindex
from .cache import Cache, fsync_dir, read_small, write_atomic
from .errors import CorruptError, NarfsError
from .narinfo import NarInfo
from .retire import referrers_first
from .storepath import STORE_DIR, hash_part, is_hash

log = logging.getLogger(__name__)

DIRNAME = "quarantine"
RESTORE_HINT = "narfs quarantine --restore all"


def _open_dir(cache: Cache, create: bool) -> int | None:
    """An fd of `.narfs/quarantine`, each component opened without following symlinks;
    None when it does not exist and `create` is False."""
    fd = os.open(cache.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in (".narfs", DIRNAME):
            if create:
                try:
                    os.mkdir(name, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
            try:
                sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                              dir_fd=fd)
            except FileNotFoundError:
                if create:
                    raise
                return None
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise NarfsError(f"{cache.root}/.narfs/{DIRNAME if name == DIRNAME else ''}"
                                     ": not a directory (a symlink or a file); remove it, "
                                     "narfs recreates it") from None
                raise
            os.close(fd)
            fd = sub
        return fd
    except BaseException:
        os.close(fd)
        raise


def hold(cache: Cache, h: str, url: str | None, store_path: str, why: str) -> str:
    """Link an entry's files into the quarantine (before it is un-published); returns the
    directory. An entry held before is replaced by this newer copy."""
    qfd = _open_dir(cache, create=True)
    assert qfd is not None
    try:
        shutil.rmtree(h, dir_fd=qfd, ignore_errors=True)  # never follows symlinks (dir_fd)
        os.mkdir(h, 0o755, dir_fd=qfd)
        efd = os.open(h, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=qfd)
        try:
            files = [(cache.narinfo_path(h), "narinfo"), (cache.listing_path(h), "ls")]
            if url is not None:
                files.append((cache.nar_path(url), "nar"))
            for src, dst in files:
                try:
                    os.link(src, dst, dst_dir_fd=efd, follow_symlinks=False)
                except FileNotFoundError:
                    pass
            note = json.dumps({"store_path": store_path, "why": why, "when": time.time()})
            wfd = os.open("why", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644,
                          dir_fd=efd)
            with os.fdopen(wfd, "w") as f:
                f.write(note + "\n")
            os.fsync(efd)
        finally:
            os.close(efd)
        os.fsync(qfd)
    finally:
        os.close(qfd)
    return os.path.join(cache.root, ".narfs", DIRNAME, h)


@dataclass
class Held:
    hash: str
    store_path: str
    why: str
    since: float
    info: NarInfo | None  # None: its narinfo no longer parses


def held(cache: Cache) -> list[Held]:
    """Everything in the quarantine, oldest first."""
    qfd = _open_dir(cache, create=False)
    if qfd is None:
        return []
    out = []
    try:
        for h in sorted(os.listdir(qfd)):
            if not is_hash(h):
                continue
            try:
                efd = os.open(h, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                              dir_fd=qfd)
            except OSError:
                continue
            try:
                try:
                    note = json.loads(read_small("why", 1 << 16, dir_fd=efd))
                    why, since = str(note["why"]), float(note["when"])
                except (OSError, CorruptError, ValueError, KeyError, TypeError):
                    why, since = "(no reason recorded)", 0.0
                try:
                    raw = read_small("narinfo", narinfo.MAX_SIZE, dir_fd=efd)
                    info: NarInfo | None = narinfo.parse(raw, expect_hash=h)
                except (OSError, CorruptError):
                    info = None
            finally:
                os.close(efd)
            path = info.store_path if info else f"{h}.narinfo"
            out.append(Held(h, path, why, since, info))
    finally:
        os.close(qfd)
    out.sort(key=lambda e: (e.since, e.hash))
    return out


def select(entries: list[Held], targets: list[str]) -> list[Held]:
    if targets == ["all"]:
        return entries
    chosen = []
    for t in targets:
        t = t.rstrip("/")
        found = [e for e in entries
                 if t in (e.hash, e.store_path, os.path.basename(e.store_path))
                 or (t.startswith(f"{STORE_DIR}/") and hash_part(t) == e.hash)]
        if not found:
            raise NarfsError(f"{t}: not in the quarantine; `narfs quarantine` lists what is")
        chosen += [e for e in found if e not in chosen]
    return chosen


def restore(cache: Cache, entries: list[Held]) -> tuple[list[str], int]:
    """Publish held entries again, references first, with the archive's commit order (NAR,
    listing, then the narinfo under the shared publish lock after checking its references).
    Returns the lines saying what happened and how many stay held."""
    lines: list[str] = []
    left = 0
    ok = {e.hash: e for e in entries if e.info is not None}
    for e in entries:
        if e.info is None:
            lines.append(f"kept {e.store_path}: its quarantined narinfo no longer parses")
            left += 1
    refs = {h: [hash_part(r) for r in e.info.references] for h, e in ok.items() if e.info}
    qfd = _open_dir(cache, create=False)
    if qfd is None:
        return lines, left
    try:
        for h in reversed(referrers_first(refs)):
            e = ok[h]
            assert e.info is not None
            if cache.has(h):
                shutil.rmtree(h, dir_fd=qfd, ignore_errors=True)
                lines.append(f"dropped the quarantined copy of {e.store_path}: the cache holds "
                             "it again (archived since)")
                continue
            try:
                line = _publish(cache, qfd, e.info)
            except (OSError, CorruptError) as err:
                line = f"kept {e.store_path}: {err}"
            if line.startswith("kept "):
                left += 1
            else:
                shutil.rmtree(h, dir_fd=qfd, ignore_errors=True)
            lines.append(line)
        os.fsync(qfd)
    finally:
        os.close(qfd)
        pathindex.publish(cache)
    return lines, left


def _publish(cache: Cache, qfd: int, info: NarInfo) -> str:
    h = info.hash
    efd = os.open(h, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=qfd)
    try:
        data = read_small("narinfo", narinfo.MAX_SIZE, dir_fd=efd)
        try:
            st = os.stat("nar", dir_fd=efd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise CorruptError("its quarantined NAR is not a regular file")
        if st is not None and info.file_size is not None and st.st_size != info.file_size:
            raise CorruptError(f"its quarantined NAR is {st.st_size} bytes, FileSize says "
                               f"{info.file_size}")
        try:
            ls = read_small("ls", 64 << 20, dir_fd=efd)
        except FileNotFoundError:
            ls = None
        with cache.publish_lock(exclusive=False):
            missing = [r for r in info.references
                       if hash_part(r) != h and not cache.has(hash_part(r))]
            if missing:
                return (f"kept {info.store_path}: it references {STORE_DIR}/{missing[0]}, which "
                        "is not in the cache; restore or archive that first")
            if not os.path.isfile(cache.nar_path(info.url)):
                if st is None:
                    raise CorruptError(f"its NAR {info.url} is neither held nor in the cache")
                os.link("nar", cache.nar_path(info.url), src_dir_fd=efd,
                        follow_symlinks=False)
                cache.sync_nar_dir()
            if ls is not None:
                write_atomic(cache.listing_path(h), ls)
            write_atomic(cache.narinfo_path(h), data)
            fsync_dir(cache.root)
    finally:
        os.close(efd)
    return f"restored {info.store_path}"
