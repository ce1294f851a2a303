"""The catalog: derived data that makes the mount and the commands fast (DESIGN contract 4).

A sqlitedict database in `<cache>/.narfs/catalog.sqlite` (WAL, JSON values, never pickle):

  paths     hash → entry (narinfo fields the mount and commands need, archive time, mtime)
  listings  hash → `.ls` root node (from the `.ls` file, or parsed from the NAR when absent)
  access    hash → last access (epoch seconds): reads through the mount, restores

Invariant: the cache directory is the truth. `sync()` reconciles the catalog with it (new,
changed and removed narinfos), and a missing or damaged catalog is rebuilt from it, so deleting
the file loses nothing but access times (which fall back to archive times).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

from sqlitedict import SqliteDict

from .cache import Cache
from .errors import CorruptError
from .narinfo import NarInfo

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


def _table(path: str, name: str) -> SqliteDict:
    return SqliteDict(path, tablename=name, autocommit=False, journal_mode="WAL",
                      encode=json.dumps, decode=json.loads, outer_stack=False, timeout=30)


class Catalog:
    def __init__(self, cache: Cache, path: str | None = None) -> None:
        self.cache = cache
        self.path = path or cache.state_path(FILENAME)
        self.bad: dict[str, str] = {}  # hash → why its narinfo was not taken (last sync)
        self._lock = threading.Lock()
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
        if "version" not in self.meta and len(self.paths) == 0:
            self.meta["version"] = VERSION
            self.meta.commit()

    def close(self) -> None:
        for name in ("meta", "paths", "listings", "access"):
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

    def sync(self) -> tuple[list[str], list[str]]:
        """Reconcile with the cache directory; return (added or changed, removed) hashes."""
        with self._lock:
            on_disk: dict[str, os.stat_result] = {}
            for h in self.cache.hashes():
                try:
                    on_disk[h] = os.stat(self.cache.narinfo_path(h))
                except FileNotFoundError:
                    pass
            known = {h: e["mtime_ns"] for h, e in self.paths.items()}
            added = []
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
                        self._drop(h)
                    continue
                self.bad.pop(h, None)
                self.paths[h] = asdict(Entry.of(info, st))
                if h in self.listings:
                    del self.listings[h]
                added.append(h)
            removed = [h for h in known if h not in on_disk]
            for h in removed:
                self._drop(h)
            for h in [h for h in self.bad if h not in on_disk]:
                del self.bad[h]
            if added or removed:
                self.paths.commit()
                self.listings.commit()
                self.access.commit()
            return added, removed

    def _drop(self, h: str) -> None:
        for table in (self.paths, self.listings, self.access):
            if h in table:
                del table[h]

    # --- reading --------------------------------------------------------------------------

    def entries(self) -> Iterator[Entry]:
        for value in self.paths.values():
            yield Entry(**value)

    def get(self, h: str) -> Entry | None:
        value = self.paths.get(h)
        return Entry(**value) if value is not None else None

    def listing(self, h: str) -> dict | None:
        return self.listings.get(h)

    def put_listing(self, h: str, root: dict) -> None:
        self.listings[h] = root
        self.listings.commit()

    # --- access times -------------------------------------------------------------------

    def touch(self, hashes: Iterable[str], when: float | None = None) -> None:
        """Record an access (batched by the caller: one transaction per call)."""
        when = time.time() if when is None else when
        for h in hashes:
            if when > self.access.get(h, 0):
                self.access[h] = when
        self.access.commit()

    def last_access(self, entry: Entry) -> float:
        """The latest of archive time and recorded accesses."""
        return max(entry.archived, self.access.get(entry.hash, 0.0))
