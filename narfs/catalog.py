"""The catalog: derived data that makes the mount and the commands fast (DESIGN contract 4).

A sqlitedict database in `<cache>/.narfs/catalog.sqlite` (WAL, JSON values, never pickle):

  paths     hash → entry (narinfo fields the mount and commands need, archive time, mtime)
  listings  hash → `.ls` root node (from the `.ls` file, or parsed from the NAR when absent)
  access    hash → last access (epoch seconds): reads through the mount, restores
  tops      hash → the path's top node in short (kind, size, nlink or target), which the mount's
            root listing needs for every path without decoding every listing

Invariant: the cache directory is the truth. `sync()` reconciles the catalog with it (new,
changed and removed narinfos), and a missing or damaged catalog is rebuilt from it, so deleting
the file loses nothing but access times (which fall back to archive times).

Several processes sync one catalog (every mount, gc, verify, restore, ...), so what one sync
writes, another finds already done. A follower (the mount) therefore must not learn changes
from what its sync wrote: once it has read `index()`, every `sync()` of that Catalog object
reports the changes against what this object has reported before (its view), whoever wrote
them to the database. Deletes tolerate a row another process deleted first.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TypeGuard

from sqlitedict import SqliteDict

from . import listing
from .cache import Cache
from .errors import CorruptError
from .narinfo import NarInfo
from .storepath import is_hash

log = logging.getLogger(__name__)

FILENAME = "catalog.sqlite"
VERSION = 1


@dataclass(frozen=True)
class Entry:
    hash: str
    name: str  # <hash>-<name>
    url: str
    compression: str
    file_size: int | None
    nar_size: int
    nar_hash: str
    references: list[str]  # base names
    archived: float  # the narinfo's mtime: when it was published
    mtime_ns: int

    @classmethod
    def of(cls, info: NarInfo, st: os.stat_result) -> Entry:
        return cls(hash=info.hash, name=info.name, url=info.url, compression=info.compression,
                   file_size=info.file_size, nar_size=info.nar_size, nar_hash=info.nar_hash,
                   references=info.references, archived=st.st_mtime, mtime_ns=st.st_mtime_ns)

    @classmethod
    def load(cls, h: str, value: object) -> Entry | None:
        """The entry catalog value `value` holds for hash `h`; None when it is damaged (or
        written by another version of narfs): the catalog file is read as untrusted too."""
        if not isinstance(value, dict) or value.keys() != _ENTRY_TYPES.keys():
            return None
        for key, types in _ENTRY_TYPES.items():
            if not isinstance(value[key], types) or isinstance(value[key], bool):
                return None
        if value["hash"] != h or not value["name"].startswith(f"{h}-") \
                or not all(isinstance(r, str) for r in value["references"]):
            return None
        return cls(**value)


_ENTRY_TYPES: dict[str, type | tuple[type, ...]] = {
    "hash": str, "name": str, "url": str, "compression": str, "file_size": (int, type(None)),
    "nar_size": int, "nar_hash": str, "references": list, "archived": (int, float),
    "mtime_ns": int}
assert _ENTRY_TYPES.keys() == {f.name for f in fields(Entry)}


def _decode(text: str | bytes) -> object:
    """JSON, never pickle. A value that is not JSON decodes to None, which every reader
    treats as damaged (the next sync rewrites it from its narinfo) instead of raising."""
    try:
        return json.loads(text)
    except (ValueError, TypeError, RecursionError):
        return None


def _time(value: object) -> float:
    """A recorded access time; anything else counts as no access."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
        else 0.0


def _top_ok(top: object) -> TypeGuard[list]:
    """The mount's short form of a path's top node: [kind, size, nlink] or [LNK, 0, target]."""
    return (isinstance(top, list) and len(top) == 3 and top[0] in (0, 1, 2, 3)
            and type(top[0]) is int and type(top[1]) is int and top[1] >= 0
            and type(top[2]) is (str if top[0] == 3 else int))


def _drop_special_files(state_dir: str) -> None:
    """SQLite follows symlinks and blocks on FIFOs: a catalog file (or its -wal, -shm,
    -journal) that is not a regular file is removed (the link itself, never its target); the
    catalog is derived data and is rebuilt."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        path = os.path.join(state_dir, FILENAME + suffix)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode):
            log.warning("%s: not a regular file; removed it (the catalog is rebuilt)", path)
            os.unlink(path)


def _table(path: str, name: str) -> SqliteDict:
    return SqliteDict(path, tablename=name, autocommit=False, journal_mode="WAL",
                      encode=json.dumps, decode=_decode, outer_stack=False, timeout=30)


class Catalog:
    def __init__(self, cache: Cache, path: str | None = None) -> None:
        self.cache = cache
        if path is None:
            _drop_special_files(cache.state_dir())
        self.path = path or cache.state_path(FILENAME)
        self.bad: dict[str, str] = {}  # hash → why its narinfo was not taken (last sync)
        self.damaged: set[str] = set()  # hashes whose catalog value was unusable (logged once)
        self._lock = threading.Lock()
        self._view: dict[str, int | None] | None = None  # hash → mtime_ns, once index() ran
        self._open()

    def _check(self) -> None:
        """Raise if the file is not a healthy catalog; checked with sqlite3 before sqlitedict
        opens it, because sqlitedict's worker thread reports such errors as tracebacks."""
        if not os.path.exists(self.path):
            return
        conn = sqlite3.connect(self.path)
        try:
            if conn.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("quick_check failed")
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
            if tables and "meta" in tables:
                row = conn.execute("SELECT value FROM meta WHERE key='version'").fetchone()
                if row is None or json.loads(row[0]) != VERSION:
                    raise sqlite3.DatabaseError("unknown catalog version")
        finally:
            conn.close()

    def _open(self) -> None:
        try:
            self._check()
            self._open_tables()
        except (sqlite3.DatabaseError, ValueError, RuntimeError) as e:
            log.warning("%s: catalog unreadable (%s); rebuilding it from the cache", self.path, e)
            self.close()
            for suffix in ("", "-wal", "-shm"):
                try:
                    os.unlink(self.path + suffix)
                except FileNotFoundError:
                    pass
            self._open_tables()
            self.meta["version"] = VERSION
            self.meta.commit()

    def _open_tables(self) -> None:
        self.meta = _table(self.path, "meta")
        self.paths = _table(self.path, "paths")
        self.listings = _table(self.path, "listings")
        self.access = _table(self.path, "access")
        self.tops = _table(self.path, "tops")
        if "version" not in self.meta and len(self.paths) == 0:
            self.meta["version"] = VERSION
            self.meta.commit()

    def close(self) -> None:
        for name in ("meta", "paths", "listings", "access", "tops"):
            table = getattr(self, name, None)
            if table is not None:
                try:
                    table.close()
                except Exception:  # a damaged database may fail to close; it is being dropped
                    log.debug("closing catalog table %s failed", name, exc_info=True)
                setattr(self, name, None)

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- keeping in step with the directory -------------------------------------------------

    def sync(self, only: Iterable[str] | None = None) -> tuple[list[str], list[str]]:
        """Reconcile with the cache directory; return (added or changed, removed) hashes.

        `only` (hashes, e.g. the narinfo names inotify reported) limits the work to those
        paths, so a live mount of a large cache keeps in step without a full scan per change.
        """
        with self._lock:
            on_disk: dict[str, os.stat_result] = {}
            subset = None if only is None else {h for h in only if is_hash(h)}
            for h in self.cache.hashes() if subset is None else subset:
                try:
                    on_disk[h] = os.stat(self.cache.narinfo_path(h))
                except FileNotFoundError:
                    pass
            # A damaged value knows no mtime, so its narinfo is read again and it is rewritten.
            if subset is None:
                known = {h: e.mtime_ns if (e := Entry.load(h, v)) else None
                         for h, v in self.paths.items()}
            else:
                known = {h: e.mtime_ns if (e := Entry.load(h, v)) else None for h in subset
                         if (v := self.paths.get(h)) is not None or h in self.paths}
            added: dict[str, dict] = {}
            dropped = [h for h in known if h not in on_disk]
            for h, st in on_disk.items():
                if known.get(h) == st.st_mtime_ns:
                    continue
                try:
                    info = self.cache.read_narinfo(h)
                except (CorruptError, OSError) as e:
                    if self.bad.get(h) != str(e):
                        log.error("%s", e)
                    self.bad[h] = str(e)
                    if h in known:
                        dropped.append(h)
                    continue
                self.bad.pop(h, None)
                added[h] = asdict(Entry.of(info, st))
            for h in [h for h in self.bad
                      if h not in on_disk and (subset is None or h in subset)]:
                del self.bad[h]
            if added or dropped:
                for h, value in added.items():
                    self.paths[h] = value
                    self.damaged.discard(h)
                self._drop(dropped, stale=list(added))
            if self._view is None:
                return list(added), dropped
            # What the database holds now, for the hashes looked at: its entries as synced.
            current = {h: st.st_mtime_ns for h, st in on_disk.items()
                       if h in added or known.get(h) == st.st_mtime_ns}
            return self._follow(current, set(current) | set(self._view) if subset is None
                                else subset)

    def _follow(self, current: dict[str, int], scope: Iterable[str]
                ) -> tuple[list[str], list[str]]:
        """The changes since this object's last report, for the hashes in `scope`."""
        view = self._view
        assert view is not None
        added = [h for h, mtime in current.items() if view.get(h, -1) != mtime]
        removed = [h for h in scope if h in view and h not in current]
        for h in removed:
            del view[h]
        for h in added:
            view[h] = current[h]
        return added, removed

    def _drop(self, hashes: list[str], stale: Iterable[str] = ()) -> None:
        """Remove `hashes` from every table, and the derived listings of `stale` ones.

        Table by table, each committed before the next is written: every table is its own
        sqlitedict connection, and a second connection writing while the first holds its
        write transaction open waits on the database lock until it times out.
        """
        for table, derived in ((self.paths, False), (self.listings, True), (self.tops, True),
                               (self.access, False)):
            for h in (*hashes, *stale) if derived else hashes:
                try:
                    del table[h]
                except KeyError:  # not there, or another mount's sync deleted it just now
                    pass
            table.commit()

    # --- reading --------------------------------------------------------------------------

    def entries(self) -> Iterator[Entry]:
        for h, value in self.paths.items():
            entry = self._load(h, value)
            if entry is not None:
                yield entry

    def get(self, h: str) -> Entry | None:
        value = self.paths.get(h)
        return self._load(h, value) if value is not None or h in self.paths else None

    def _load(self, h: str, value: object) -> Entry | None:
        entry = Entry.load(h, value)
        if entry is None and h not in self.damaged:
            self.damaged.add(h)
            log.warning("%s: catalog entry of %s is damaged; ignored until a sync rewrites it "
                        "from its narinfo", self.path, h)
        return entry

    def listing(self, h: str) -> dict | None:
        value = self.listings.get(h)
        return value if isinstance(value, dict) else None

    def put_listings(self, items: Iterable[tuple[str, dict | None, list | None]]) -> None:
        """Store listings and/or the mount's tops (None: keep what is there) of paths the
        catalog holds, in one commit."""
        tops = []
        with self._lock:
            for h, root, top in items:
                if h not in self.paths:  # retired meanwhile: never resurrect a dropped path
                    continue
                if root is not None and listing.depth(root) <= listing.MAX_LS_DEPTH:
                    self.listings[h] = root  # deeper ones: json cannot nest them
                if top is not None:
                    tops.append((h, top))
            self.listings.commit()  # before the next table is written: see _drop
            for h, top in tops:
                self.tops[h] = top
            self.tops.commit()

    def index(self) -> tuple[list[tuple[str, str, float]], dict[str, list]]:
        """(hash, name, archived) of every path, and the tops known: what a mount needs to
        start. Read in bulk through sqlite3 (WAL allows it beside sqlitedict's connection):
        decoding 100,000 entries one by one through sqlitedict takes seconds, this 0.2 s."""
        conn = sqlite3.connect(Path(self.path).as_uri() + "?mode=ro", uri=True)
        try:
            rows = conn.execute(
                "SELECT key, json_extract(value, '$.name'), json_extract(value, '$.archived'), "
                "json_extract(value, '$.mtime_ns') FROM paths WHERE json_valid(value)").fetchall()
            try:
                tops = {k: t for k, v in conn.execute("SELECT key, value FROM tops")
                        if _top_ok(t := _decode(v))}
            except sqlite3.OperationalError:  # a catalog from before the table existed
                tops = {}
        finally:
            conn.close()
        # Damaged rows are left out (the mount's first sync rewrites them from the narinfos).
        rows = [(h, name, archived, mtime) for h, name, archived, mtime in rows
                if isinstance(h, str) and isinstance(name, str) and name.startswith(f"{h}-")
                and isinstance(archived, int | float)]
        with self._lock:  # the caller shows these now: later syncs report against them
            self._view = {h: mtime if type(mtime) is int else None for h, _, _, mtime in rows}
        return [(h, name, archived) for h, name, archived, _ in rows], tops

    # --- access times -------------------------------------------------------------------

    def touch(self, hashes: Iterable[str], when: float | None = None) -> None:
        """Record an access (batched by the caller: one transaction per call)."""
        when = time.time() if when is None else when
        for h in hashes:
            if when > _time(self.access.get(h)):
                self.access[h] = when
        self.access.commit()

    def last_access(self, entry: Entry) -> float:
        """The latest of archive time and recorded accesses."""
        return max(entry.archived, _time(self.access.get(entry.hash)))


# --- how commands open it -------------------------------------------------------------------

def open_catalog(cache: Cache, sync: bool = True) -> Catalog | None:
    """The cache's catalog, in step with the directory unless `sync` is False (recording
    accesses needs no scan); None when this user cannot write it (commands that only read then
    fall back to the narinfos themselves)."""
    state = os.path.join(cache.root, ".narfs")
    if not os.access(state if os.path.isdir(state) else cache.root, os.W_OK):
        return None
    catalog = Catalog(cache)
    if sync:
        catalog.sync()
    return catalog


def scan_entries(cache: Cache) -> Iterator[Entry]:
    """Entries read straight from the narinfos (no catalog): unreadable ones are logged."""
    for h in cache.hashes():
        try:
            info = cache.read_narinfo(h)
            st = os.stat(cache.narinfo_path(h))
        except (CorruptError, OSError) as e:
            log.warning("%s", e)
            continue
        yield Entry.of(info, st)


def entries_with_access(cache: Cache) -> list[tuple[Entry, float]]:
    """Every archived entry and its last access; archive times stand in for accesses when this
    user cannot write the catalog."""
    catalog = open_catalog(cache)
    if catalog is None:
        log.info("%s: catalog not writable by this user; reading narinfos (no access times)",
                 cache.root)
        return [(e, e.archived) for e in scan_entries(cache)]
    with catalog:
        return [(e, catalog.last_access(e)) for e in catalog.entries()]
