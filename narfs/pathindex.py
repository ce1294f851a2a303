"""The published path index: what a remote mount needs to show the root and `.by-name`.

`<cache>/narfs-index.zst` (served by the nginx example, ignored by Nix) is zstd-compressed JSON:

    {"version": 1, "paths": [[hash, name, archived, top], ...]}

one row per published narinfo, sorted by hash: `name` without the hash, `archived` the
narinfo's mtime (what the catalog calls archive time), `top` the path's top node in the mount's
short form (tree.Tree.top(): [kind, size, nlink] or [LNK, 0, target]) or null when its `.ls` is
missing or unreadable. A remote mount polls this one file (conditional requests) instead of
listing the cache, which HTTP cannot do. It is a hint, never an authority: the client shows a
path only once its narinfo verifies against a trusted key, and the top is replaced by the tree
built from the path's listing when it loads.

`publish(cache)` rewrites it from the directory (temporary + rename, under its own lock so two
writers never publish a stale scan over a newer one). Rows of the previous index whose narinfo
mtime is unchanged are reused, so a rewrite reads only the narinfos and listings that are new:
its cost is one scandir, one stat per narinfo, and compressing the file. Measured here
(tests/t1_pathindex.py, a loaded 2-core machine): 10,000 paths 0.11 s and 309 KB, 100,000 paths
1.2 s and 3.2 MB (32 bytes a path); a first write, reading every narinfo, 0.5 s and 5.7 s. Every
command that changes the set of narinfos calls it once, after its change.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager

import zstandard

from . import frameauth
from .cache import Cache, read_small, write_atomic
from .errors import CorruptError, NarfsError
from .storepath import is_base_name, is_hash, name_part
from .tree import DIR, EXE, LNK, REG

log = logging.getLogger(__name__)

FILENAME = "narfs-index.zst"
LOCK = "index.lock"
VERSION = 1
MAX_COMPRESSED = 64 << 20
MAX_SIZE = 512 << 20  # decompressed; ~100 bytes a path
LEVEL = 3

Row = tuple[str, str, float, list | None]  # hash, name (without hash), archived, top


def top_of(root: dict) -> list | None:
    """The short top node (as tree.Tree.top() gives it) of a listing root; None when the
    node is not one a tree could be built from."""
    kind = root.get("type")
    if kind == "directory":
        entries = root.get("entries")
        if not isinstance(entries, dict):
            return None
        subdirs = sum(1 for c in entries.values()
                      if isinstance(c, dict) and c.get("type") == "directory")
        return [DIR, 0, 2 + subdirs]
    if kind == "regular":
        size = root.get("size")
        if type(size) is not int or size < 0:
            return None
        return [EXE if root.get("executable") is True else REG, size, 1]
    if kind == "symlink":
        target = root.get("target")
        return [LNK, 0, target] if isinstance(target, str) and target else None
    return None


def _top_ok(top: object) -> bool:
    return (isinstance(top, list) and len(top) == 3 and type(top[0]) is int
            and top[0] in (DIR, REG, EXE, LNK) and type(top[1]) is int and top[1] >= 0
            and type(top[2]) is (str if top[0] == LNK else int))


def encode(rows: list[Row]) -> bytes:
    text = json.dumps({"version": VERSION, "paths": [list(r) for r in rows]},
                      separators=(",", ":"))
    return zstandard.ZstdCompressor(level=LEVEL).compress(text.encode())


def decode(data: bytes) -> list[Row]:
    """The rows of an index file; untrusted (a file in the cache dir, or an HTTP body): any
    row that is not well formed is dropped, a file that is not an index raises CorruptError."""
    if len(data) > MAX_COMPRESSED:
        raise CorruptError(f"larger than {MAX_COMPRESSED} bytes")
    try:
        text = zstandard.ZstdDecompressor().decompress(data, max_output_size=MAX_SIZE)
        doc = json.loads(text)
    except (zstandard.ZstdError, ValueError, RecursionError) as e:
        raise CorruptError(f"not a narfs path index ({e})") from None
    if not isinstance(doc, dict) or doc.get("version") != VERSION \
            or not isinstance(doc.get("paths"), list):
        raise CorruptError("not a narfs path index of version 1")
    rows: list[Row] = []
    seen: set[str] = set()
    for row in doc["paths"]:
        if not (isinstance(row, list) and len(row) == 4):
            continue
        h, name, archived, top = row
        if not (isinstance(h, str) and is_hash(h) and h not in seen and isinstance(name, str)
                and is_base_name(f"{h}-{name}") and type(archived) in (int, float)
                and 0 <= archived < 1e11):
            continue
        seen.add(h)
        rows.append((h, name, float(archived), top if _top_ok(top) else None))
    return rows


def read(cache: Cache) -> list[Row]:
    """The cache's current index; [] when there is none or it is unusable (it is rewritten)."""
    path = os.path.join(cache.root, FILENAME)
    try:
        return decode(read_small(path, MAX_COMPRESSED))
    except FileNotFoundError:
        return []
    except (CorruptError, OSError) as e:
        log.warning("%s: %s; writing it again from the narinfos", path, e)
        return []


@contextmanager
def _locked(cache: Cache) -> Iterator[None]:
    fd = os.open(cache.state_path(LOCK), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _row(cache: Cache, h: str, archived: float) -> Row | None:
    try:
        info = cache.read_narinfo(h)
    except (CorruptError, OSError):
        return None  # verify names it; a client would refuse it anyway
    try:
        root = cache.read_listing(h, info.nar_size)
    except (CorruptError, OSError):
        root = None
    return h, name_part(info.name), archived, top_of(root) if root is not None else None


def scan(cache: Cache, previous: list[Row]) -> list[Row]:
    """The rows for the narinfos in the directory now, reusing `previous` where it matches."""
    old = {r[0]: r for r in previous}
    rows = []
    auth = []
    with os.scandir(cache.root) as it:
        for e in it:
            name = e.name
            if name.endswith(frameauth.SUFFIX):
                auth.append(name)
            if not (name.endswith(".narinfo") and is_hash(name[:-8])):
                continue
            try:
                st = e.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            h = name[:-8]
            prev = old.get(h)
            if prev is not None and prev[2] == st.st_mtime:
                rows.append(prev)
            elif (row := _row(cache, h, st.st_mtime)) is not None:
                rows.append(row)
    rows.sort()
    frameauth.drop_orphans(cache, auth)  # what remote mounts read goes with the narinfo
    return rows


def publish(cache: Cache) -> int:
    """Rewrite the index to list the narinfos the directory holds now; returns how many.
    A failure is logged, not raised: the archive is intact without it, and the next change
    writes it again."""
    try:
        with _locked(cache):
            rows = scan(cache, read(cache))
            write_atomic(os.path.join(cache.root, FILENAME), encode(rows))
    except (OSError, NarfsError) as e:
        log.warning("%s: path index not written (%s); remote mounts see the change once "
                    "it is", os.path.join(cache.root, FILENAME), e)
        return 0
    return len(rows)
