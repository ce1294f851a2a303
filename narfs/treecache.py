"""The loaded trees of a mount's paths (tree.py's compact trees), for the view (view.py).

A path's tree comes from the first usable source of: its tree file (`<trees dir>/<hash>.tree`,
written for paths of TREE_FILE_MIN nodes or more), the catalog's listing, the cache's `.ls`,
the NAR itself. A source that fails validation is logged and the next one tried; when all
fail the path is `broken` (`NoListing`) until its narinfo changes. A source that cannot be
asked now (errors.Unavailable: a remote server down or slow) fails only the request: the path
is not marked broken, and the NAR, on the same server, is not tried instead. One load per path
at a time; the others wait for it.

Lookup counts: the kernel's count per path, summed over its nodes (`ref`, `unref`); a tree
whose count falls to zero is parked in an LRU bounded by IDLE_NODES nodes (at least one tree is
kept), and dropped beyond it; it is built again, with the same inode numbers, when next
needed. The view learns of each drop (`on_drop`).

Everything here runs on the trio thread, except the blocking work it hands to worker threads:
catalog calls through the view's `db` (one at a time), tree files, listings and tree building
under the reader's limiter. See docs/concurrency.md.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Protocol

import trio

from .cache import read_small, write_atomic
from .catalog import Entry
from .errors import CorruptError, NarfsError, Unavailable
from .reader import Reader
from .storepath import HASH_LEN
from .tree import MAX_TREE_FILE, Tree

log = logging.getLogger(__name__)

IDLE_NODES = 500_000  # nodes of trees the kernel no longer references, kept for reuse
TREE_FILE_MIN = 1000  # nodes: smaller trees build from their listing in a millisecond anyway


# --- what the mount's model is given --------------------------------------------------------------


class PathSet(Protocol):
    """What the mount's model (view.py, this module) uses of the catalog
    (narfs.catalog.Catalog), exactly: a remote path set can stand in for it. All blocking:
    called in a worker thread under the view's `db_limiter`."""

    def index(self) -> tuple[list[tuple[str, str, float]], dict[str, list]]: ...
    def get(self, h: str) -> Entry | None: ...
    def listing(self, h: str) -> dict | None: ...
    def put_listings(self, items: Iterable[tuple[str, dict | None, list | None]]) -> None: ...
    def sync(self, only: Iterable[str] | None = None) -> tuple[list[str], list[str]]: ...
    def touch(self, hashes: Iterable[str], when: float | None = None) -> None: ...


class Listings(Protocol):
    """What the mount's model uses of where bytes come from (narfs.backend.Backend), exactly."""

    def read_listing(self, h: str, nar_size: int | None = None) -> dict | None: ...
    def newest(self, versions: list[tuple[float, str]]) -> tuple[float, str]: ...


class Shown(Protocol):
    """What the tree cache reads of an archived path the view shows (view.Archived)."""

    base: str  # <hash>-<name>
    slot: int
    top: list | None  # its top node in short (Tree.top()), learnt from its tree


class NoSuchPath(Exception):
    """Not an archived path (any more), or no catalog entry for it."""


class NoListing(Exception):
    """No source gives a usable listing of the path (logged once, when it broke)."""


class TreeCache:
    """The loaded trees of the archived paths, by hash: where they come from (the module doc;
    one load per path at a time), the paths whose listing cannot be had (`broken`), the
    kernel's lookup count per path (`refs`), and the LRU of trees no count holds, bounded by
    IDLE_NODES nodes. `paths` is the view's (ArchiveView.paths), read only."""

    def __init__(self, paths: Mapping[str, Shown], listings: Listings, catalog: PathSet,
                 reader: Reader, db: Callable[..., Awaitable[Any]], directory: str,
                 on_drop: Callable[[str], None]) -> None:
        self.paths = paths
        self.listings = listings
        self.catalog = catalog
        self.reader = reader
        self.db = db  # a catalog call in a worker thread, under the view's db limiter
        self.dir = directory  # compact trees of big paths (tree.py); checked by the caller
        self.on_drop = on_drop  # the view forgets what it derived from a dropped tree
        # hashes with a tree file, listed at start (None before: every load looks), so a path
        # without one costs no look, one thread hop less on a cold path's first lookup
        self.tree_files: set[str] | None = None
        # what loads learnt since the last save(), kept off the way of the lookups that built
        # them: listings and tops for the catalog (one transaction, with the access times),
        # trees of TREE_FILE_MIN nodes or more for tree files
        self.unsaved: dict[str, tuple[dict, list]] = {}
        self.unwritten: dict[str, tuple[Tree, Entry]] = {}
        self.loaded: dict[str, Tree] = {}
        self.entries: dict[str, Entry] = {}  # catalog entries of the paths whose tree is loaded
        self.refs: dict[str, int] = {}  # kernel lookup count per path, summed over its nodes
        self.idle: OrderedDict[str, int] = OrderedDict()  # unreferenced trees → node count
        self.idle_nodes = 0
        self.broken: dict[str, str] = {}  # paths whose listing cannot be had → why
        self._loading: dict[str, trio.Event] = {}

    async def get(self, h: str) -> Tree:
        """The tree of path `h`, loaded if need be (see the module doc for its sources)."""
        while True:
            tree = self.loaded.get(h)
            if tree is not None:
                if h in self.idle:
                    self.idle.move_to_end(h)
                return tree
            if h in self.broken:
                raise NoListing(h)
            event = self._loading.get(h)
            if event is None:
                break
            await event.wait()
        event = self._loading[h] = trio.Event()
        try:
            tree = await self._load(h)
        finally:
            del self._loading[h]
            event.set()
        return tree

    async def start(self) -> None:
        self.tree_files = await trio.to_thread.run_sync(self._list_tree_files, self.dir,
                                                        limiter=self.reader.limiter)

    @staticmethod
    def _list_tree_files(directory: str) -> set[str]:
        try:
            names = os.listdir(directory)
        except OSError:  # none yet, or not a directory (the view checks what it reads)
            return set()
        return {n[:HASH_LEN] for n in names if n.endswith(".tree") and len(n) == HASH_LEN + 5}

    async def save(self) -> None:
        """Store what loads learnt since the last save: listings and tops in the catalog, big
        trees in tree files (derived data: a crash loses only time)."""
        if self.unsaved:
            items, self.unsaved = self.unsaved, {}
            await self.db(self.catalog.put_listings,
                          [(h, root, top) for h, (root, top) in items.items()])
        if self.unwritten:
            trees, self.unwritten = self.unwritten, {}
            for h, (tree, entry) in trees.items():
                if h in self.paths and await trio.to_thread.run_sync(
                        self._write_tree, os.path.join(self.dir, f"{h}.tree"), tree, entry,
                        limiter=self.reader.limiter) and self.tree_files is not None:
                    self.tree_files.add(h)

    def _catalog_sync(self, h: str, with_listing: bool) -> tuple[Entry | None, dict | None]:
        entry = self.catalog.get(h)
        return entry, self.catalog.listing(h) if with_listing and entry is not None else None

    async def _load(self, h: str) -> Tree:
        p = self.paths.get(h)
        tree_file = os.path.join(self.dir, f"{h}.tree")
        look = self.tree_files is None or h in self.tree_files
        # one catalog call for the entry and, when no tree file comes first, its listing
        entry, listed = await self.db(self._catalog_sync, h, not look)
        if p is None or entry is None:
            raise NoSuchPath(h)
        reason = "no listing"
        tree = None
        for source in ("tree", "catalog", "ls", "nar"):
            try:
                if source == "tree":
                    if not look:
                        continue
                    tree = await trio.to_thread.run_sync(self._read_tree, tree_file, h, p.slot,
                                                         entry, limiter=self.reader.limiter)
                    if tree is not None:
                        break
                    if self.tree_files is not None:
                        self.tree_files.discard(h)
                    continue
                if source == "catalog":
                    root = listed if not look else await self.db(self.catalog.listing, h)
                elif source == "ls":
                    root = await trio.to_thread.run_sync(
                        self.listings.read_listing, h, entry.nar_size,
                        limiter=self.reader.limiter)
                else:
                    root = await self.reader.listing(entry)
                if root is None:
                    continue
                tree = await trio.to_thread.run_sync(Tree.build, h, p.slot, root, entry.nar_size,
                                                     limiter=self.reader.limiter)
            except Unavailable as e:
                # The server cannot be asked now: EIO for this request only. The NAR lives on
                # the same server, and the path may be fine a minute from now.
                log.warning("%s: listing not fetched (%s); not marked broken", p.base, e)
                raise
            except (NarfsError, OSError) as e:
                reason = str(e)
                if source != "nar":
                    log.warning("%s: %s listing unusable (%s); trying the next source",
                                p.base, source, e)
                continue
            if source != "catalog":
                self.unsaved[h] = (root, tree.top())
            if len(tree) >= TREE_FILE_MIN:
                self.unwritten[h] = (tree, entry)
            break
        if tree is None:
            self.broken[h] = reason
            log.error("%s: left out of the mount: %s", p.base, reason)
            raise NoListing(h)
        if self.paths.get(h) is p:  # not retired while loading
            p.top = tree.top()
        self.loaded[h] = tree
        self.entries[h] = entry
        if self.refs.get(h, 0) == 0:
            self._park(h)
        return tree

    @staticmethod
    def _read_tree(path: str, h: str, slot: int, entry: Entry) -> Tree | None:
        # read_small: a symlink, FIFO or device put in a tree file's place is refused, never
        # followed or waited on (a FIFO used to hang a worker thread, and so the unmount).
        try:
            data = read_small(path, MAX_TREE_FILE)
        except FileNotFoundError:
            return None
        except (CorruptError, OSError) as e:
            log.warning("%s: %s; building the tree again", path, e)
            return None
        try:
            return Tree.loads(h, slot, data, entry.nar_hash)
        except CorruptError as e:
            log.warning("%s: %s; building the tree again", path, e)
            return None

    @staticmethod
    def _write_tree(path: str, tree: Tree, entry: Entry) -> bool:
        """Best effort: the tree file only saves time, so failing to write it is no error.
        Through the cache's temporaries (a crash's leftover is one `verify` names), unsynced:
        derived data a crash may lose. Whether it was written."""
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_atomic(path, tree.dumps(entry.nar_hash), sync=False)
        except OSError as e:
            log.debug("%s: not written (%s)", path, e)
            return False
        return True

    def prune(self) -> None:
        """Delete tree files of paths no longer archived (blocking: run in a thread)."""
        try:
            names = os.listdir(self.dir)
        except OSError:
            return
        for name in names:
            if name[:HASH_LEN] not in self.paths:
                try:
                    os.unlink(os.path.join(self.dir, name))
                except OSError:
                    pass

    def _park(self, h: str) -> None:
        """Park an unreferenced tree; drop the oldest beyond IDLE_NODES."""
        if h in self.idle:  # a forget beyond the count: parked already, counted once
            return
        n = len(self.loaded[h])
        self.idle[h] = n
        self.idle_nodes += n
        while self.idle_nodes > IDLE_NODES and len(self.idle) > 1:
            old, _ = next(iter(self.idle.items()))
            self.drop(old)

    # --- lookup counts ------------------------------------------------------------------

    def ref(self, h: str) -> None:
        count = self.refs.get(h, 0)
        if count == 0 and h in self.idle:
            self.idle_nodes -= self.idle.pop(h)
        self.refs[h] = count + 1

    def unref(self, h: str, n: int) -> None:
        """The kernel forgot `n` lookups of path `h`'s nodes: at zero, park its tree, or drop
        it when the path was retired meanwhile."""
        left = self.refs.get(h, 0) - n
        if left > 0:
            self.refs[h] = left
            return
        self.refs.pop(h, None)
        if h in self.loaded and h in self.paths:
            self._park(h)
        else:
            self.drop(h)

    def retire(self, h: str) -> None:
        """Path `h` left the archive: its tree goes now, or when the kernel forgets it."""
        self.entries.pop(h, None)
        self.broken.pop(h, None)
        if self.refs.get(h, 0) == 0:
            self.drop(h)

    def drop(self, h: str) -> None:
        self.loaded.pop(h, None)
        self.entries.pop(h, None)
        if h in self.idle:
            self.idle_nodes -= self.idle.pop(h)
        self.on_drop(h)
