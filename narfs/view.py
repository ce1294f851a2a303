"""The mount's view of the archive: which paths it shows, where, and their trees. No FUSE here.

fs.py puts this view on the kernel's side of a mount (pyfuse3); tests drive it directly. It
holds the set of archived paths, the `.by-name` directories, the paths read since the last
flush, and what a read may hand the kernel next (prefetch); each path's tree is loaded and kept
by its TreeCache (treecache.py), with the kernel's lookup counts. Errors are its own
(`NotFound`, `NotADirectory`, ...): the adapter maps them to errnos.

Layout of a mount:

    <hash>-<name>/...                 each archived path, exactly as in /nix/store
    .by-name/<name>/latest            → ../../<hash>-<name>, the most recently archived
    .by-name/<name>/<date>-<hash8>    → ../../<hash>-<name>, one per archived path of that name
                                        (<date> is the archive time, UTC, %Y-%m-%dT%H%M%SZ, so
                                        the names sort oldest first)

Inodes are derived from store path hashes (see tree.py), so they survive remounts. Contents are
immutable; only the root and `.by-name` change, as paths are archived or retired. `refresh`
applies those changes and returns what the kernel must forget (`Changes`).

A path whose tree cannot be had (treecache.py: tree file, catalog, `.ls`, NAR) is `broken`:
left out of the root listing, `Broken` on use, until its narinfo changes.

Lookup counts: every node handed to the kernel (`lookup`, an entry `listdir`'s `reply` accepted)
adds one to its path's count, `forget` subtracts; a path's tree may be dropped once its count
is zero (see treecache.py; what the view derived from it, such as which of its directories the
kernel has listed, goes with it). By-name and root inodes are computed, so they are not
counted.

Directory listings are cursor-based (`listdir(inode, cursor, reply)`): a cursor is slot + 1 in
the dynamic directories, whose entries are kept sorted by slot, and child position + 1 in store
paths' immutable directories, so it stays valid however paths come and go between calls.

Access records for gc: a path counts as used when one of its files is read (`record_read`;
restore records its own). Listings, lookups, stat, readlink and opens do not count, so indexers
(updatedb, backup tools walking the tree) keep nothing alive. `flush` writes them.

Prefetch (when `prefetch` is on: the fast mode): a frame decompressed for one read holds its
neighbours in the NAR too, the files a `grep -r` reads next. Once a directory has been listed in
full to the kernel (so the kernel knows its files' inodes), `prefetch_candidates` gives, for a
read in it, the directory's other files whose bytes the frame cache holds, each once; files in
frames not yet decompressed wait for the next read in that directory. Never the file being read:
the kernel holds its pages locked until that read is answered.

Threads: everything here runs on the trio thread, except the blocking work it hands to worker
threads (sqlite under `db_limiter`, one at a time; listings, tree files and tree building under
the reader's limiter). See docs/concurrency.md.
"""

from __future__ import annotations

import bisect
import functools
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

import trio

from .catalog import Entry
from .errors import NarfsError
from .progress import plural
from .reader import Reader
from .storepath import HASH_LEN, is_hash
from .tree import (
    BYNAME_DIR,
    BYNAME_INODE,
    BYNAME_LINK,
    DIR,
    EXE,
    INDEX_BITS,
    INDEX_MASK,
    LNK,
    REG,
    ROOT_INODE,
    Slots,
    Tree,
)
from .treecache import Listings, NoListing, NoSuchPath, PathSet, TreeCache

log = logging.getLogger(__name__)

TOPS_BATCH = 256
BULK = 1000
BYNAME = b".by-name"
LATEST = b"latest"
STORE_MTIME_NS = 1_000_000_000  # Nix sets every mtime in the store to 1

T = TypeVar("T")


# --- what it answers -----------------------------------------------------------------------


class ViewError(Exception):
    """A request the view cannot answer; the adapter maps each kind to an errno."""


class NotFound(ViewError):
    pass


class NotADirectory(ViewError):
    pass


class IsADirectory(ViewError):
    pass


class Invalid(ViewError):
    """Not a node of the kind asked for (readlink of a file, read of a directory's link)."""


class Broken(ViewError):
    """The path's listing cannot be had (logged once, when it broke)."""


class Node(NamedTuple):
    """A node as the kernel sees it. `dynamic`: in the root or `.by-name`, which change."""

    inode: int
    kind: int  # tree.DIR, REG, EXE, LNK
    size: int
    nlink: int
    mtime_ns: int = STORE_MTIME_NS
    dynamic: bool = False
    counted: str | None = None  # the path whose lookup count handing it out adds to


@dataclass
class Changes:
    """What a `refresh` changed, for the kernel to forget."""

    added: int = 0
    removed: int = 0
    gone: list[tuple[int, bytes, int]] = field(default_factory=list)  # (parent, name, inode)
    inodes: list[int] = field(default_factory=list)  # whose listings or targets changed


def version_name(archived: float, h: str) -> bytes:
    return (time.strftime("%Y-%m-%dT%H%M%SZ", time.gmtime(archived)) + "-" + h[:8]).encode()


class Archived:
    """One store path in the root listing. `top` is its top node in short (Tree.top())."""

    __slots__ = ("archived", "base", "hash", "slot", "top")

    def __init__(self, h: str, base: str, archived: float, slot: int,
                 top: list | None) -> None:
        self.hash = h
        self.base = base
        self.archived = archived
        self.slot = slot
        self.top = top

    @property
    def name(self) -> str:
        return self.base[HASH_LEN + 1:]

    @property
    def inode(self) -> int:
        return self.slot << INDEX_BITS


class NameDir:
    """`.by-name/<name>`: every archived path of one name, oldest first."""

    __slots__ = ("name", "slot", "versions")

    def __init__(self, name: str, slot: int) -> None:
        self.name = name
        self.slot = slot
        self.versions: list[tuple[float, str]] = []  # (archived, hash), sorted

    @property
    def inode(self) -> int:
        return self.slot << INDEX_BITS | BYNAME_DIR


def tree_node(tree: Tree, index: int) -> Node:
    return Node(tree.inode(index), tree.kinds[index], tree.sizes[index], tree.nlinks[index],
                counted=tree.hash)


class ArchiveView:
    def __init__(self, listings: Listings, catalog: PathSet, reader: Reader,
                 db_limiter: trio.CapacityLimiter, trees_dir: str,
                 prefetch: bool = False) -> None:
        self.listings = listings
        self.catalog = catalog
        self.reader = reader
        self.db_limiter = db_limiter
        self.prefetch = prefetch
        self.slots = Slots()
        self.paths: dict[str, Archived] = {}
        self.root_order: list[int] = []  # slots of the root's entries, sorted: readdir cursor
        self.names: dict[str, NameDir] = {}
        self.name_order: list[int] = []
        self.trees = TreeCache(self.paths, listings, catalog, reader, self.db, trees_dir,
                               self._dropped)
        self.accessed: set[str] = set()  # paths read since the last flush (for gc)
        self.changed_ns = time.time_ns()
        self._parents: dict[str, tuple[Tree, list[int], list[int]]] = {}
        # Per path: directories listed in full to the kernel → their files not handed over by
        # `prefetch_candidates` yet (None until the first read in the directory).
        self._listed: dict[str, dict[int, list[int] | None]] = {}

    async def db(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(functools.partial(fn, *args),
                                             limiter=self.db_limiter)

    # --- the set of paths ---------------------------------------------------------------

    async def start(self) -> None:
        """Load the root listing from the catalog: what makes the mount ready."""
        rows, tops = await self.db(self.catalog.index)
        for h, base, archived in sorted(rows):
            self._add(h, base, archived, tops.get(h), sort=False)
        self._sort()
        await self.trees.start()
        log.info("%s archived", plural(len(self.paths), "path"))

    def _add(self, h: str, base: str, archived: float, top: list | None,
             sort: bool = True) -> None:
        p = Archived(h, base, archived, self.slots.path(h), top)
        self.paths[h] = p
        (bisect.insort if sort else list.append)(self.root_order, p.slot)
        name = p.name
        d = self.names.get(name)
        if d is None:
            d = self.names[name] = NameDir(name, self.slots.name(name))
            (bisect.insort if sort else list.append)(self.name_order, d.slot)
        (bisect.insort if sort else list.append)(d.versions, (archived, h))

    def _sort(self) -> None:
        self.root_order.sort()
        self.name_order.sort()
        for d in self.names.values():
            d.versions.sort()

    def _remove(self, h: str) -> list[tuple[int, bytes, int]]:
        """Forget a retired path; return the kernel entries to invalidate."""
        p = self.paths.pop(h)
        gone = [(ROOT_INODE, p.base.encode(), p.inode)]
        _remove_sorted(self.root_order, p.slot)
        d = self.names[p.name]
        d.versions.remove((p.archived, h))
        gone.append((d.inode, version_name(p.archived, h), p.slot << INDEX_BITS | BYNAME_LINK))
        if not d.versions:
            del self.names[p.name]
            _remove_sorted(self.name_order, d.slot)
            gone.append((BYNAME_INODE, p.name.encode(), d.inode))
        self.trees.retire(h)
        return gone

    def _dropped(self, h: str) -> None:
        """Path `h`'s tree was dropped: the kernel knows none of its inodes any more."""
        self._parents.pop(h, None)
        self._listed.pop(h, None)

    async def refresh(self, only: Iterable[str] | None = None) -> Changes:
        """Bring the catalog in step with the cache (all of it, or the hashes in `only`) and
        the view in step with the catalog. The kernel may hold entries of what went (`gone`),
        and listings of the root, `.by-name` and the changed names' directories and their
        `latest` targets (`inodes`), cached until told."""
        added, removed = await self.db(self.catalog.sync, only)
        news = await self.db(lambda: [(h, self.catalog.get(h)) for h in added])
        # No checkpoint from here to the return: no request is answered from a half-applied
        # refresh, and the caller tells the kernel before any is answered from the new one.
        changes = Changes(len(added), len(removed))
        touched: set[str] = set()  # names whose versions changed
        for h in removed:
            if h in self.paths:
                touched.add(self.paths[h].name)
                changes.gone += self._remove(h)
        bulk = len(news) > BULK  # sort once rather than insert 100,000 times into a list
        for h, entry in news:
            if entry is None:
                continue
            if h in self.paths:  # narinfo rewritten (e.g. recompressed): same contents
                changes.gone += self._remove(h)
            self.trees.broken.pop(h, None)
            self._add(h, entry.name, entry.archived, None, sort=not bulk)
            touched.add(self.paths[h].name)
        if bulk:
            self._sort()
        if added or removed:
            self.changed_ns = time.time_ns()
            log.info("catalog: %s added, %d retired; %d archived",
                     plural(len(added), "path"), len(removed), len(self.paths))
        if touched:
            changes.inodes = [ROOT_INODE, BYNAME_INODE]
            for name in touched:
                slot = self.slots.name(name)
                changes.inodes += [slot << INDEX_BITS | BYNAME_DIR,
                                   slot << INDEX_BITS | BYNAME_LINK]
        return changes

    async def fill_tops(self) -> None:
        """Learn the top node of every path that lacks one, in the background, so the first
        `ls -l` of a big archive does not wait for thousands of listings."""
        missing = [h for h, p in self.paths.items() if p.top is None]
        for i in range(0, len(missing), TOPS_BATCH):
            await self._tops([h for h in missing[i:i + TOPS_BATCH]
                              if h in self.paths and self.paths[h].top is None])
        if missing:
            log.info("learnt the top nodes of %s", plural(len(missing), "path"))

    async def _tops(self, hashes: list[str]) -> None:
        if not hashes:
            return
        found = await self.db(self._tops_sync, hashes)
        for h in hashes:
            p = self.paths.get(h)
            if p is None:
                continue
            if h in found:
                p.top = found[h]
            elif h not in self.trees.broken:
                try:  # no usable listing in the catalog or the `.ls`: parse the NAR
                    await self.tree(h)
                except ViewError:
                    pass

    def _tops_sync(self, hashes: list[str]) -> dict[str, list]:
        """Tops from listings the catalog or `.ls` files hold, stored back in one commit."""
        tops: dict[str, list] = {}
        store = []
        for h in hashes:
            entry = self.catalog.get(h)
            if entry is None or h in self.trees.broken:
                continue
            root = self.catalog.listing(h)
            fresh = root is None
            try:
                if root is None:
                    root = self.listings.read_listing(h, entry.nar_size)
                if root is None:
                    continue
                top = Tree.build(h, 0, root, entry.nar_size).top()
            except (NarfsError, OSError):
                continue  # left to `tree()`, which falls back to the NAR and logs
            tops[h] = top
            store.append((h, root if fresh else None, top))
        if store:
            self.catalog.put_listings(store)
        return tops

    async def tree(self, h: str) -> Tree:
        try:
            return await self.trees.get(h)
        except NoSuchPath:
            raise NotFound(h) from None
        except NoListing:
            raise Broken(h) from None

    # --- lookup counts ------------------------------------------------------------------

    def handed(self, node: Node) -> None:
        """The kernel took `node` (a lookup reply, an accepted listing entry): count it."""
        if node.counted is not None:
            self.trees.ref(node.counted)

    def forget(self, inode_list: Iterable[tuple[int, int]]) -> None:
        for inode, n in inode_list:
            if inode in (ROOT_INODE, BYNAME_INODE) or inode & INDEX_MASK >= BYNAME_LINK:
                continue
            owner = self.slots.owner(inode >> INDEX_BITS)
            if owner is not None and owner[0] == "p":
                self.trees.unref(owner[1], n)

    # --- nodes --------------------------------------------------------------------------

    def _owner(self, ino: int) -> tuple[str, str]:
        owner = self.slots.owner(ino >> INDEX_BITS)
        if owner is None:
            raise NotFound(ino)
        return owner

    def _root_dir(self, ino: int) -> Node:
        # nlink 1 on the dynamic directories: "not counted", as btrfs does; find copes.
        return Node(ino, DIR, 0, 1, self.changed_ns, True)

    @staticmethod
    def _name_dir(d: NameDir, archived: float) -> Node:
        return Node(d.inode, DIR, 0, 1, int(archived * 1e9), True)

    def _link(self, ino: int, h: str, archived: float) -> Node:
        return Node(ino, LNK, len(self.target(h)), 1, int(archived * 1e9), True)

    def target(self, h: str) -> bytes:
        """Where a by-name link to path `h` points."""
        return b"../../" + self.paths[h].base.encode()

    @staticmethod
    def _top(p: Archived) -> Node:
        assert p.top is not None
        kind, size, extra = p.top
        if kind == LNK:
            return Node(p.inode, LNK, len(os.fsencode(extra)), 1, counted=p.hash)
        return Node(p.inode, kind, size, extra if kind == DIR else 1, counted=p.hash)

    async def getattr(self, inode: int) -> Node:
        if inode in (ROOT_INODE, BYNAME_INODE):
            return self._root_dir(inode)
        kind, key = self._owner(inode)
        index = inode & INDEX_MASK
        if kind == "n":
            d = self.names.get(key)
            if d is None:
                raise NotFound(inode)
            archived, newest = self.listings.newest(d.versions)
            if index == BYNAME_DIR:
                return self._name_dir(d, archived)
            return self._link(inode, newest, archived)
        if index == BYNAME_LINK:
            p = self.paths.get(key)
            if p is None:
                raise NotFound(inode)
            return self._link(inode, key, p.archived)
        tree = await self.tree(key)
        if index >= len(tree):
            raise NotFound(inode)
        return tree_node(tree, index)

    async def lookup(self, parent: int, name: bytes) -> Node:
        """The child `name` of directory `parent`, counted (`handed`); `.` is not counted."""
        if name == b".":
            return await self.getattr(parent)
        node = await self._lookup(parent, name)
        self.handed(node)
        return node

    async def _lookup(self, parent: int, name: bytes) -> Node:
        if parent == ROOT_INODE:
            if name == BYNAME:
                return self._root_dir(BYNAME_INODE)
            h = name[:HASH_LEN].decode("ascii", "replace")
            p = self.paths.get(h)
            if p is None or p.base.encode() != name:
                raise NotFound(name)
            return tree_node(await self.tree(h), 0)
        if parent == BYNAME_INODE:
            d = self.names.get(name.decode("ascii", "replace"))
            if d is None:
                raise NotFound(name)
            return self._name_dir(d, d.versions[-1][0])
        kind, key = self._owner(parent)
        index = parent & INDEX_MASK
        if kind == "n":
            d = self.names.get(key)
            if d is None or index != BYNAME_DIR:
                raise NotFound(name)
            if name == LATEST:
                archived, h = self.listings.newest(d.versions)
                return self._link(d.slot << INDEX_BITS | BYNAME_LINK, h, archived)
            for archived, h in d.versions:
                if version_name(archived, h) == name:
                    return self._link(self.paths[h].slot << INDEX_BITS | BYNAME_LINK, h,
                                      archived)
            raise NotFound(name)
        tree = await self.tree(key)
        if index >= len(tree) or tree.kinds[index] != DIR:
            raise NotADirectory(parent)
        child = tree.lookup(index, name)
        if child is None:
            raise NotFound(name)
        return tree_node(tree, child)

    async def readlink(self, inode: int) -> bytes:
        kind, key = self._owner(inode)
        index = inode & INDEX_MASK
        if kind == "n":
            d = self.names.get(key)
            if d is None or index != BYNAME_LINK:
                raise Invalid(inode)
            return self.target(self.listings.newest(d.versions)[1])
        if index == BYNAME_LINK:
            if key not in self.paths:
                raise NotFound(inode)
            return self.target(key)
        tree = await self.tree(key)
        target = tree.targets.get(index)
        if target is None:
            raise Invalid(inode)
        return target

    # --- listings -----------------------------------------------------------------------

    async def listdir(self, inode: int, cursor: int,
                      reply: Callable[[bytes, Node, int], bool]) -> None:
        """Hand directory `inode`'s entries from `cursor` on to `reply(name, node, next)`
        until it returns False; each entry it accepts is counted (`handed`)."""
        if inode == ROOT_INODE:
            await self._list_root(cursor, reply)
            return
        if inode == BYNAME_INODE:
            i = bisect.bisect_left(self.name_order, cursor)
            for slot in self.name_order[i:]:
                owner = self.slots.owner(slot)
                assert owner is not None  # name_order holds assigned slots only
                nd = self.names[owner[1]]
                if not reply(nd.name.encode(), self._name_dir(nd, nd.versions[-1][0]), slot + 1):
                    return
            return
        kind, key = self._owner(inode)
        if kind == "n":
            d = self.names.get(key)
            if d is None:
                return
            newest_archived, newest = self.listings.newest(d.versions)
            items = [(d.slot, LATEST, newest, newest_archived)]
            items += [(self.paths[h].slot, version_name(a, h), h, a) for a, h in d.versions]
            for slot, name, h, archived in sorted(items):
                if slot < cursor:
                    continue
                if not reply(name, self._link(slot << INDEX_BITS | BYNAME_LINK, h, archived),
                             slot + 1):
                    return
            return
        tree = await self.tree(key)
        index = inode & INDEX_MASK
        if index >= len(tree) or tree.kinds[index] != DIR:
            raise NotADirectory(inode)
        first, count = tree.first[index], tree.count[index]
        for pos in range(cursor, count):
            child = first + pos
            node = tree_node(tree, child)
            if not reply(tree.names[child], node, pos + 1):
                return
            self.handed(node)
        if self.prefetch:  # the kernel now knows every entry's inode: prefetch may fill them
            self._listed.setdefault(key, {}).setdefault(index, None)

    async def _list_root(self, cursor: int, reply: Callable[[bytes, Node, int], bool]) -> None:
        if cursor == 0:  # `.by-name` has slot 0: first
            if not reply(BYNAME, self._root_dir(BYNAME_INODE), 1):
                return
            cursor = 1
        while True:
            # Re-find the cursor each batch: paths may come and go while tops load.
            i = bisect.bisect_left(self.root_order, cursor)
            batch = self.root_order[i:i + TOPS_BATCH // 4]
            if not batch:
                return
            owners = []
            for slot in batch:
                owner = self.slots.owner(slot)
                assert owner is not None  # root_order holds assigned slots only
                owners.append(owner[1])
            await self._tops([h for h in owners if h in self.paths and
                              self.paths[h].top is None])
            for slot, h in zip(batch, owners, strict=True):
                p = self.paths.get(h)
                cursor = slot + 1
                if p is None or p.top is None:
                    continue  # retired meanwhile, or broken (logged when it broke)
                node = self._top(p)
                if not reply(p.base.encode(), node, slot + 1):
                    return
                self.handed(node)

    # --- files --------------------------------------------------------------------------

    async def file(self, inode: int) -> tuple[str, Entry, int, int]:
        """A regular file's path hash, catalog entry, narOffset and size."""
        kind, key = self._owner(inode)
        index = inode & INDEX_MASK
        if kind != "p" or index >= BYNAME_LINK:
            raise Invalid(inode)
        tree = await self.tree(key)
        if index >= len(tree) or tree.kinds[index] not in (REG, EXE):
            if index < len(tree) and tree.kinds[index] == DIR:
                raise IsADirectory(inode)
            raise Invalid(inode)
        entry = self.trees.entries.get(key) or await self.db(self.catalog.get, key)
        if entry is None:
            raise NotFound(inode)
        return key, entry, tree.offsets[index], tree.sizes[index]

    def record_read(self, h: str) -> None:
        self.accessed.add(h)

    async def flush(self) -> None:
        """Record in the catalog what the mount learnt since the last flush: the last access
        of the paths read, and the listings of the trees built (TreeCache.save)."""
        await self.trees.save()
        if not self.accessed:
            return
        hashes, self.accessed = [h for h in self.accessed if is_hash(h)], set()
        await self.db(self.catalog.touch, hashes)

    def prefetch_candidates(self, h: str, entry: Entry, reading: int
                            ) -> list[tuple[int, bytes]]:
        """Files beside `reading` to hand the kernel now (see the module doc), each once."""
        tree = self.trees.loaded.get(h)
        listed = self._listed.get(h)
        if tree is None or not listed:
            return []
        parent = self._parent(h, tree, reading & INDEX_MASK)
        if parent is None or parent not in listed:
            return []
        waiting = listed[parent]
        if waiting is None:
            first = tree.first[parent]
            waiting = [c for c in range(first, first + tree.count[parent])
                       if tree.kinds[c] in (REG, EXE) and tree.sizes[c]]
        files, left = [], []
        for child in waiting:
            ino = tree.inode(child)
            data = (None if ino == reading else
                    self.reader.cached(entry, tree.offsets[child], tree.sizes[child]))
            if data is None:
                if ino != reading:
                    left.append(child)
            else:
                files.append((ino, data))
        listed[parent] = left
        return files

    def _parent(self, h: str, tree: Tree, index: int) -> int | None:
        """The directory holding node `index` (children are contiguous: see tree.py)."""
        got = self._parents.get(h)
        if got is None or got[0] is not tree:
            dirs = [d for d in range(len(tree)) if tree.kinds[d] == DIR and tree.count[d]]
            got = self._parents[h] = (tree, [tree.first[d] for d in dirs], dirs)
        _, firsts, dirs = got
        k = bisect.bisect_right(firsts, index) - 1
        if k < 0 or index >= firsts[k] + tree.count[dirs[k]]:
            return None
        return dirs[k]

    def stats(self) -> dict[str, int]:
        return {"paths": len(self.paths), "trees": len(self.trees.loaded),
                "idle_nodes": self.trees.idle_nodes, "broken": len(self.trees.broken)}


def _remove_sorted(items: list[int], value: int) -> None:
    i = bisect.bisect_left(items, value)
    if i < len(items) and items[i] == value:
        del items[i]
