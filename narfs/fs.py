"""The filesystem: every archived store path, read-only, through pyfuse3.

Layout of a mount:

    <hash>-<name>/...                 each archived path, exactly as in /nix/store
    .by-name/<name>/latest            → ../../<hash>-<name>, the most recently archived
    .by-name/<name>/<date>-<hash8>    → ../../<hash>-<name>, one per archived path of that name
                                        (<date> is the archive time, UTC, %Y-%m-%dT%H%M%SZ, so
                                        the names sort oldest first)

Inodes are derived from store path hashes (see tree.py), so they survive remounts. Contents are
immutable: entries and attributes carry long timeouts, files open with keep_cache, and readdir
returns attributes (readdirplus). Only the root and `.by-name` change, as paths are archived or
retired; `refresh` applies those changes and tells the kernel to drop what disappeared and to
forget its cached listings and `latest` targets of the directories that changed.

Two modes, chosen when the mount starts (`fast_capable`, `NarFS.fast`):
- fast (pyfuse3 with narfs's patch, patches/pyfuse3-fast.patch): open and opendir answer ENOSYS,
  so the kernel opens files and directories without asking narfs, never sends RELEASE, keeps
  file contents and directory listings in its page cache, and caches symlink targets. READ and
  READDIR then carry the inode in place of a file handle. A warm `grep -r` sends no requests.
- stock (pyfuse3 as PyPI ships it): open hands out a file handle per open file, opendir returns
  the inode as the handle; every open and listing is a round trip through Python.

Prefetch (fast mode): a frame decompressed for one read holds its neighbours in the NAR too, the
files a `grep -r` reads next. Before a read in a directory narfs has listed to the kernel (so the
kernel knows its files' inodes) is answered, `_prefetch` hands the directory's other files whose
bytes the frame cache holds to the kernel's page cache (notify_store, from a worker thread: the
kernel locks the pages it fills); their reads then never become requests. Files in frames not yet
decompressed wait for the next read in that directory. Answering first would race the reader,
which then asks for most of them anyway. A single file read by path (no listing) costs nothing.

Access records for gc: a path counts as used when narfs serves a READ of one of its files
(restore records its own). Listings, lookups, stat, readlink and opens do not count, so indexers
(updatedb, backup tools walking the tree) keep nothing alive. The kernel serves repeated reads
from its page cache without asking narfs; so that a path in steady use keeps being recorded, the
contents of files read are dropped from the kernel's cache once per ACCESS_WINDOW (`expire`),
and the next read after that reaches narfs again.

Lookup counts: every entry handed to the kernel (lookup, readdir_reply that returned True) adds
one to its path's count, `forget` subtracts; a path's tree may be dropped once its count is zero
(it is rebuilt from the catalog, with the same inode numbers, when next needed). Trees with a
zero count wait in a bounded LRU. By-name and root inodes are computed, so they are not counted.

No extended attributes: getxattr answers ENOSYS, which the kernel remembers for the whole
connection. `ls -l` asks for three per file (ACLs, SELinux); a round trip through Python each
would make a large listing ten times slower than the local disk.

Every handler turns unexpected exceptions into EIO with a log line: pyfuse3 only catches
FUSEError, and anything else would end the mount. Every request that reaches a handler is counted
per operation (`stats()["requests"]`), so tests can show what the kernel still asks. Blocking
work runs in worker threads: sqlite under `db_limiter` (one at a time), NAR and listing work
under the reader's limiter.
"""

from __future__ import annotations

import bisect
import errno
import functools
import logging
import os
import stat
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import pyfuse3
import trio

from .cache import Cache, read_small
from .catalog import Catalog, Entry
from .errors import CorruptError, NarfsError
from .progress import plural
from .reader import Reader
from .storepath import HASH_LEN, STORE_DIR, is_hash
from .tree import (
    BYNAME_DIR,
    BYNAME_INODE,
    BYNAME_LINK,
    DIR,
    EXE,
    INDEX_BITS,
    INDEX_MASK,
    LNK,
    MAX_TREE_FILE,
    REG,
    ROOT_INODE,
    Slots,
    Tree,
)

log = logging.getLogger(__name__)

FOREVER = 86400.0  # kernel cache timeout for immutable entries (store path contents)
SHORT = 1.0  # stock mode: the by-name view and the root change as paths come and go
STORE_MTIME_NS = 1_000_000_000  # Nix sets every mtime in the store to 1
BLKSIZE = 128 << 10  # matches FUSE's largest read, so tools read in big chunks
IDLE_NODES = 500_000  # nodes of trees the kernel no longer references, kept for reuse
TOPS_BATCH = 256
BULK = 1000
TREE_FILE_MIN = 1000  # nodes: smaller trees build from their listing in a millisecond anyway
BYNAME = b".by-name"
LATEST = b"latest"
MAX_LOGGED = 1000
MAX_READ_INODES = 1_000_000  # files whose cached contents `expire` drops, per window

_MODES = {DIR: stat.S_IFDIR | 0o555, REG: stat.S_IFREG | 0o444, EXE: stat.S_IFREG | 0o555,
          LNK: stat.S_IFLNK | 0o777}

T = TypeVar("T")


def _guard(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """FUSEError passes; damaged input becomes EIO with one log line; anything else EIO with a
    traceback, because pyfuse3 would end the mount on it."""

    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: NarFS, *args: Any) -> T:
        self.requests[name] += 1
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except (NarfsError, OSError) as e:
            self.log_once(logging.ERROR, f"{fn.__name__}: {e}")
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:
            log.exception("%s%r failed", fn.__name__, args[:2])
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def fast_capable() -> bool:
    """Whether this pyfuse3 carries narfs's patch: the inode reaches read and readdir when open
    and opendir answer ENOSYS, and FileInfo has cache_readdir (the patch adds both at once)."""
    return hasattr(pyfuse3.FileInfo(), "cache_readdir")


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


class NarFS(pyfuse3.Operations):
    supports_dot_lookup = False  # no NFS export: `..` lookups never come

    def __init__(self, cache: Cache, catalog: Catalog, reader: Reader,
                 db_limiter: trio.CapacityLimiter, fast: bool = False) -> None:
        super().__init__()
        self.fast = fast
        # The root and `.by-name` change as paths come and go. `refresh` invalidates what
        # changed, which the fast mode relies on alone: its listings are cached until then.
        self.dynamic_timeout = FOREVER if fast else SHORT
        # Read by the patched pyfuse3 at init; `latest` targets change, and `refresh` tells
        # the kernel when (an attribute stock pyfuse3 ignores).
        self.enable_symlink_caching = fast
        self.cache = cache
        self.catalog = catalog
        self.reader = reader
        self.db_limiter = db_limiter
        self.slots = Slots()
        self.paths: dict[str, Archived] = {}
        self.root_order: list[int] = []  # slots of the root's entries, sorted: readdir cursor
        self.names: dict[str, NameDir] = {}
        self.name_order: list[int] = []
        self.trees: dict[str, Tree] = {}
        self.entries: dict[str, Entry] = {}  # catalog entries of the paths whose tree is loaded
        self.refs: dict[str, int] = {}  # kernel lookup count per path, summed over its nodes
        self.idle: OrderedDict[str, int] = OrderedDict()  # unreferenced trees → node count
        self.idle_nodes = 0
        self.broken: dict[str, str] = {}  # paths whose listing cannot be had → why
        self.accessed: set[str] = set()  # paths read since the last flush (for gc)
        self.read_inodes: set[int] = set()  # files read since the last `expire`
        self.handles: dict[int, int] = {}  # stock mode: fh → inode
        self.requests: Counter[str] = Counter()
        self.live = False  # set by the mount layer while the FUSE session exists
        self._parents: dict[str, tuple[Tree, list[int], list[int]]] = {}
        # Per path: directories listed in full to the kernel → their files `_prefetch` has not
        # handed over yet (None until the first read in the directory).
        self._listed: dict[str, dict[int, list[int] | None]] = {}
        self.prefetched = 0  # files handed to the kernel's page cache
        self._next_fh = 1
        self._loading: dict[str, trio.Event] = {}
        self._logged: set[str] = set()
        self.changed_ns = time.time_ns()
        self.trees_dir = cache.state_path("trees")  # compact trees of big paths (tree.py)

    # --- helpers ------------------------------------------------------------------------

    def log_once(self, level: int, message: str) -> None:
        """A line per distinct problem: a damaged file read by eight greps is one line."""
        if message in self._logged:
            return
        if len(self._logged) < MAX_LOGGED:
            self._logged.add(message)
        log.log(level, "%s", message)

    async def db(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(functools.partial(fn, *args),
                                             limiter=self.db_limiter)

    @staticmethod
    def _attr(ino: int, kind: int, size: int, nlink: int, mtime_ns: int = STORE_MTIME_NS,
              timeout: float = FOREVER) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = ino
        e.generation = 0
        e.entry_timeout = timeout
        e.attr_timeout = timeout
        e.st_mode = _MODES[kind]
        e.st_nlink = nlink
        e.st_uid = 0
        e.st_gid = 0
        e.st_size = size
        e.st_blksize = BLKSIZE
        e.st_blocks = (size + 511) // 512 if kind != DIR else 0
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = mtime_ns
        return e

    def _top_attr(self, p: Archived) -> pyfuse3.EntryAttributes:
        assert p.top is not None
        kind, size, extra = p.top
        if kind == LNK:
            return self._attr(p.inode, LNK, len(os.fsencode(extra)), 1)
        return self._attr(p.inode, kind, size, extra if kind == DIR else 1)

    def _tree_attr(self, tree: Tree, index: int) -> pyfuse3.EntryAttributes:
        return self._attr(tree.inode(index), tree.kinds[index], tree.sizes[index],
                          tree.nlinks[index])

    def _dir_attr(self, ino: int, mtime_ns: int) -> pyfuse3.EntryAttributes:
        # nlink 1 on the dynamic directories: "not counted", as btrfs does; find copes.
        return self._attr(ino, DIR, 0, 1, mtime_ns, self.dynamic_timeout)

    def _link_attr(self, ino: int, target: bytes, archived: float) -> pyfuse3.EntryAttributes:
        return self._attr(ino, LNK, len(target), 1, int(archived * 1e9), self.dynamic_timeout)

    def _ref(self, h: str, n: int = 1) -> None:
        count = self.refs.get(h, 0)
        if count == 0 and h in self.idle:
            self.idle_nodes -= self.idle.pop(h)
        self.refs[h] = count + n

    # --- the set of paths ---------------------------------------------------------------

    async def start(self) -> None:
        """Load the root listing from the catalog: what makes the mount ready."""
        rows, tops = await self.db(self.catalog.index)
        for h, base, archived in sorted(rows):
            self._add(h, base, archived, tops.get(h), sort=False)
        self._sort()
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
        self.entries.pop(h, None)
        self.broken.pop(h, None)
        if self.refs.get(h, 0) == 0:
            self._drop_tree(h)
        return gone

    def _drop_tree(self, h: str) -> None:
        self.trees.pop(h, None)
        self.entries.pop(h, None)
        self._parents.pop(h, None)
        self._listed.pop(h, None)
        if h in self.idle:
            self.idle_nodes -= self.idle.pop(h)

    async def refresh(self, only: Iterable[str] | None = None) -> tuple[int, int]:
        """Bring the catalog in step with the cache directory (all of it, or the hashes in
        `only`) and the mount in step with the catalog; returns (added, removed) counts."""
        added, removed = await self.db(self.catalog.sync, only)
        gone: list[tuple[int, bytes, int]] = []
        touched: set[str] = set()  # names whose versions changed
        for h in removed:
            if h in self.paths:
                touched.add(self.paths[h].name)
                gone += self._remove(h)
        news = await self.db(lambda: [(h, self.catalog.get(h)) for h in added])
        bulk = len(news) > BULK  # sort once rather than insert 100,000 times into a list
        for h, entry in news:
            if entry is None:
                continue
            if h in self.paths:  # narinfo rewritten (e.g. recompressed): same contents
                gone += self._remove(h)
            self.broken.pop(h, None)
            self._add(h, entry.name, entry.archived, None, sort=not bulk)
            touched.add(self.paths[h].name)
        if bulk:
            self._sort()
        if added or removed:
            self.changed_ns = time.time_ns()
            log.info("catalog: %s added, %d retired; %d archived",
                     plural(len(added), "path"), len(removed), len(self.paths))
        if self.live:
            for parent, name, ino in gone:
                pyfuse3.invalidate_entry_async(parent, name, deleted=ino, ignore_enoent=True)
            if touched:
                await self._invalidate_listings(touched)
        return len(added), len(removed)

    async def _invalidate_listings(self, names: set[str]) -> None:
        """The kernel may hold the old listings of the root, `.by-name` and the changed names'
        directories (cached in fast mode), and old `latest` targets: drop them now rather than
        when a timeout runs out."""
        inodes = [ROOT_INODE, BYNAME_INODE]
        for name in names:
            slot = self.slots.name(name)
            inodes += [slot << INDEX_BITS | BYNAME_DIR, slot << INDEX_BITS | BYNAME_LINK]
        # Blocking kernel calls: a worker thread, never the loop that answers requests; and
        # abandoned on cancel, since once the loop has stopped nothing may ever answer the
        # requests the kernel waits for, and the unmount must not wait for the thread.
        await trio.to_thread.run_sync(_invalidate_inodes, inodes, abandon_on_cancel=True)

    async def expire(self) -> None:
        """Drop the kernel's cached contents of the files read since the last call, so that
        their next read reaches narfs and is recorded as an access (see the module doc)."""
        inodes, self.read_inodes = list(self.read_inodes), set()
        if inodes and self.live:
            await trio.to_thread.run_sync(_invalidate_inodes, inodes, abandon_on_cancel=True)

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
            elif h not in self.broken:
                try:  # no usable listing in the catalog or the `.ls`: parse the NAR
                    await self.tree(h)
                except pyfuse3.FUSEError:
                    pass

    def _tops_sync(self, hashes: list[str]) -> dict[str, list]:
        """Tops from listings the catalog or `.ls` files hold, stored back in one commit."""
        tops: dict[str, list] = {}
        store = []
        for h in hashes:
            entry = self.catalog.get(h)
            if entry is None or h in self.broken:
                continue
            root = self.catalog.listing(h)
            fresh = root is None
            try:
                if root is None:
                    root = self.cache.read_listing(h, entry.nar_size)
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

    # --- trees --------------------------------------------------------------------------

    async def tree(self, h: str) -> Tree:
        """The loaded tree of a path: from the catalog's listing, else the `.ls`, else the NAR.
        A source that fails validation is logged and the next one tried; when all fail the
        path is marked broken (EIO, left out of the root listing) until its narinfo changes."""
        while True:
            tree = self.trees.get(h)
            if tree is not None:
                if h in self.idle:
                    self.idle.move_to_end(h)
                return tree
            if h in self.broken:
                raise pyfuse3.FUSEError(errno.EIO)
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

    async def _load(self, h: str) -> Tree:
        p = self.paths.get(h)
        entry = await self.db(self.catalog.get, h)
        if p is None or entry is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        reason = "no listing"
        tree = None
        tree_file = os.path.join(self.trees_dir, f"{h}.tree")
        for source in ("tree", "catalog", "ls", "nar"):
            try:
                if source == "tree":
                    tree = await trio.to_thread.run_sync(self._read_tree, tree_file, h, p.slot,
                                                         entry, limiter=self.reader.limiter)
                    if tree is not None:
                        break
                    continue
                if source == "catalog":
                    root = await self.db(self.catalog.listing, h)
                elif source == "ls":
                    root = await trio.to_thread.run_sync(
                        self.cache.read_listing, h, entry.nar_size, limiter=self.reader.limiter)
                else:
                    root = await self.reader.listing(entry)
                if root is None:
                    continue
                tree = await trio.to_thread.run_sync(Tree.build, h, p.slot, root, entry.nar_size,
                                                     limiter=self.reader.limiter)
            except (NarfsError, OSError) as e:
                reason = str(e)
                if source != "nar":
                    log.warning("%s: %s listing unusable (%s); trying the next source",
                                p.base, source, e)
                continue
            if source != "catalog":
                await self.db(self.catalog.put_listing, h, root, tree.top())
            if len(tree) >= TREE_FILE_MIN:
                await trio.to_thread.run_sync(self._write_tree, tree_file, tree, entry,
                                              limiter=self.reader.limiter)
            break
        if tree is None:
            self.broken[h] = reason
            log.error("%s: left out of the mount: %s", p.base, reason)
            raise pyfuse3.FUSEError(errno.EIO)
        if self.paths.get(h) is p:  # not retired while loading
            p.top = tree.top()
        self.trees[h] = tree
        self.entries[h] = entry
        if self.refs.get(h, 0) == 0:
            self._idle(h)
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
    def _write_tree(path: str, tree: Tree, entry: Entry) -> None:
        """Best effort: the tree file only saves time, so failing to write it is no error."""
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(tree.dumps(entry.nar_hash))
            os.rename(tmp, path)
        except OSError as e:
            log.debug("%s: not written (%s)", path, e)
            try:
                os.unlink(tmp)
            except OSError:
                pass

    def prune_trees(self) -> None:
        """Delete tree files of paths no longer archived (blocking: run in a thread)."""
        try:
            names = os.listdir(self.trees_dir)
        except OSError:
            return
        for name in names:
            if name[:HASH_LEN] not in self.paths:
                try:
                    os.unlink(os.path.join(self.trees_dir, name))
                except OSError:
                    pass

    def _idle(self, h: str) -> None:
        """Park an unreferenced tree; drop the oldest beyond IDLE_NODES."""
        n = len(self.trees[h])
        self.idle[h] = n
        self.idle_nodes += n
        while self.idle_nodes > IDLE_NODES and len(self.idle) > 1:
            old, _ = next(iter(self.idle.items()))
            self._drop_tree(old)

    def _owner(self, ino: int) -> tuple[str, str]:
        owner = self.slots.owner(ino >> INDEX_BITS)
        if owner is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return owner

    # --- handlers -----------------------------------------------------------------------

    @_guard
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None
                      ) -> pyfuse3.EntryAttributes:
        if inode == ROOT_INODE:
            return self._dir_attr(ROOT_INODE, self.changed_ns)
        if inode == BYNAME_INODE:
            return self._dir_attr(BYNAME_INODE, self.changed_ns)
        kind, key = self._owner(inode)
        index = inode & INDEX_MASK
        if kind == "n":
            d = self.names.get(key)
            if d is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            newest = self.cache.newest(d.versions)
            if index == BYNAME_DIR:
                return self._dir_attr(inode, int(newest[0] * 1e9))
            return self._link_attr(inode, self._target(newest[1]), newest[0])
        if index == BYNAME_LINK:
            p = self.paths.get(key)
            if p is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._link_attr(inode, self._target(key), p.archived)
        tree = await self.tree(key)
        if index >= len(tree):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._tree_attr(tree, index)

    def _target(self, h: str) -> bytes:
        return b"../../" + self.paths[h].base.encode()

    @_guard
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        if name == b".":
            return await self.getattr(parent_inode)
        if parent_inode == ROOT_INODE:
            if name == BYNAME:
                return self._dir_attr(BYNAME_INODE, self.changed_ns)
            h = name[:HASH_LEN].decode("ascii", "replace")
            p = self.paths.get(h)
            if p is None or p.base.encode() != name:
                raise pyfuse3.FUSEError(errno.ENOENT)
            tree = await self.tree(h)
            self._ref(h)
            return self._tree_attr(tree, 0)
        if parent_inode == BYNAME_INODE:
            d = self.names.get(name.decode("ascii", "replace"))
            if d is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._dir_attr(d.inode, int(d.versions[-1][0] * 1e9))
        kind, key = self._owner(parent_inode)
        index = parent_inode & INDEX_MASK
        if kind == "n":
            d = self.names.get(key)
            if d is None or index != BYNAME_DIR:
                raise pyfuse3.FUSEError(errno.ENOENT)
            if name == LATEST:
                archived, h = self.cache.newest(d.versions)
                return self._link_attr(d.slot << INDEX_BITS | BYNAME_LINK, self._target(h),
                                       archived)
            for archived, h in d.versions:
                if version_name(archived, h) == name:
                    return self._link_attr(self.paths[h].slot << INDEX_BITS | BYNAME_LINK,
                                           self._target(h), archived)
            raise pyfuse3.FUSEError(errno.ENOENT)
        tree = await self.tree(key)
        if index >= len(tree) or tree.kinds[index] != DIR:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        child = tree.lookup(index, name)
        if child is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        self._ref(key)
        return self._tree_attr(tree, child)

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        self.requests["forget"] += 1
        try:
            for inode, n in inode_list:
                if inode in (ROOT_INODE, BYNAME_INODE) or inode & INDEX_MASK >= BYNAME_LINK:
                    continue
                owner = self.slots.owner(inode >> INDEX_BITS)
                if owner is None or owner[0] != "p":
                    continue
                h = owner[1]
                left = self.refs.get(h, 0) - n
                if left > 0:
                    self.refs[h] = left
                    continue
                self.refs.pop(h, None)
                if h in self.trees and h in self.paths:
                    self._idle(h)
                else:
                    self._drop_tree(h)
        except Exception:  # forget must never raise: there is no request to fail
            log.exception("forget failed")

    @_guard
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> bytes:
        kind, key = self._owner(inode)
        index = inode & INDEX_MASK
        if kind == "n":
            d = self.names.get(key)
            if d is None or index != BYNAME_LINK:
                raise pyfuse3.FUSEError(errno.EINVAL)
            return self._target(self.cache.newest(d.versions)[1])
        if index == BYNAME_LINK:
            if key not in self.paths:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._target(key)
        tree = await self.tree(key)
        target = tree.targets.get(index)
        if target is None:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return target

    @_guard
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> int:
        if self.fast:  # the kernel opens directories itself from now on and caches listings
            raise pyfuse3.FUSEError(errno.ENOSYS)
        return inode  # directories need no state: the inode is the handle

    @_guard
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """Cursors (next_id, a signed 64-bit number) are slot + 1 in the dynamic directories,
        whose entries are kept sorted by slot, and child position + 1 in store paths' immutable
        directories: either stays valid however entries come and go between calls."""
        if fh == ROOT_INODE:
            await self._readdir_root(start_id, token)
            return
        if fh == BYNAME_INODE:
            i = bisect.bisect_left(self.name_order, start_id)
            for slot in self.name_order[i:]:
                _, name = self.slots.owner(slot)  # type: ignore[misc]
                d = self.names[name]
                attr = self._dir_attr(d.inode, int(d.versions[-1][0] * 1e9))
                if not pyfuse3.readdir_reply(token, name.encode(), attr, slot + 1):
                    return
            return
        kind, key = self._owner(fh)
        if kind == "n":
            d = self.names.get(key)
            if d is None:
                return
            newest_archived, newest = self.cache.newest(d.versions)
            items = [(d.slot, LATEST, newest, newest_archived)]
            items += [(self.paths[h].slot, version_name(a, h), h, a) for a, h in d.versions]
            for slot, name, h, archived in sorted(items):
                if slot < start_id:
                    continue
                attr = self._link_attr(slot << INDEX_BITS | BYNAME_LINK, self._target(h),
                                       archived)
                if not pyfuse3.readdir_reply(token, name, attr, slot + 1):
                    return
            return
        tree = await self.tree(key)
        index = fh & INDEX_MASK
        first, count = tree.first[index], tree.count[index]
        for pos in range(start_id, count):
            child = first + pos
            if not pyfuse3.readdir_reply(token, tree.names[child], self._tree_attr(tree, child),
                                         pos + 1):
                return
            self._ref(key)
        if self.fast:  # the kernel now knows every entry's inode: `_prefetch` may fill them
            self._listed.setdefault(key, {}).setdefault(index, None)

    async def _readdir_root(self, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if start_id == 0:  # `.by-name` has slot 0: first
            if not pyfuse3.readdir_reply(token, BYNAME,
                                         self._dir_attr(BYNAME_INODE, self.changed_ns), 1):
                return
            start_id = 1
        while True:
            # Re-find the cursor each batch: paths may come and go while tops load.
            i = bisect.bisect_left(self.root_order, start_id)
            batch = self.root_order[i:i + TOPS_BATCH // 4]
            if not batch:
                return
            owners = [self.slots.owner(slot)[1] for slot in batch]  # type: ignore[index]
            await self._tops([h for h in owners if h in self.paths and
                              self.paths[h].top is None])
            for slot, h in zip(batch, owners, strict=True):
                p = self.paths.get(h)
                start_id = slot + 1
                if p is None or p.top is None:
                    continue  # retired meanwhile, or broken (logged when it broke)
                if not pyfuse3.readdir_reply(token, p.base.encode(), self._top_attr(p),
                                             slot + 1):
                    return
                self._ref(h)

    @_guard
    async def releasedir(self, fh: int) -> None:
        pass

    async def _file(self, inode: int) -> tuple[str, Entry, int, int]:
        """A regular file's path hash, catalog entry, narOffset and size."""
        kind, key = self._owner(inode)
        index = inode & INDEX_MASK
        if kind != "p" or index >= BYNAME_LINK:
            raise pyfuse3.FUSEError(errno.EINVAL)
        tree = await self.tree(key)
        if index >= len(tree) or tree.kinds[index] not in (REG, EXE):
            raise pyfuse3.FUSEError(errno.EISDIR if index < len(tree) and
                                    tree.kinds[index] == DIR else errno.EINVAL)
        entry = self.entries.get(key) or await self.db(self.catalog.get, key)
        if entry is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return key, entry, tree.offsets[index], tree.sizes[index]

    @_guard
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext | None = None
                   ) -> pyfuse3.FileInfo:
        if self.fast:  # zero-message opens: no OPEN or RELEASE for any file from now on
            raise pyfuse3.FUSEError(errno.ENOSYS)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        await self._file(inode)  # EIO for a damaged path, EISDIR, ... at open, as before
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = inode
        # Contents never change: the kernel may keep its page cache across opens.
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @_guard
    async def read(self, fh: int, off: int, size: int) -> bytes:
        inode = fh if self.fast else self.handles[fh]  # fast: the patched pyfuse3 gives the inode
        key, entry, offset, length = await self._file(inode)
        self.accessed.add(key)
        if len(self.read_inodes) < MAX_READ_INODES:
            self.read_inodes.add(inode)
        if off >= length:
            return b""
        try:
            data = await self.reader.read(entry, offset + off, min(size, length - off))
        except (NarfsError, OSError) as e:  # name the path: the reader knows only its NAR
            raise CorruptError(f"{STORE_DIR}/{entry.name}: {e}") from None
        if self.fast and key in self._listed:
            await self._prefetch(key, entry, inode)
        return data

    async def _prefetch(self, h: str, entry: Entry, reading: int) -> None:
        """See the module doc. Never the file being read: the kernel holds its pages locked
        until this read is answered."""
        tree = self.trees.get(h)
        listed = self._listed.get(h)
        if tree is None or not listed:
            return
        parent = self._parent(h, tree, reading & INDEX_MASK)
        if parent is None or parent not in listed:
            return
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
        if files and self.live:
            self.prefetched += await trio.to_thread.run_sync(_store_files, files,
                                                             abandon_on_cancel=True)
            if len(self.read_inodes) < MAX_READ_INODES:  # `expire` drops them too
                self.read_inodes.update(ino for ino, _ in files)

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

    @_guard
    async def release(self, fh: int) -> None:
        self.handles.pop(fh, None)

    @_guard
    async def flush(self, fh: int) -> None:
        raise pyfuse3.FUSEError(errno.ENOSYS)  # nothing to flush; the kernel stops asking

    @_guard
    async def statfs(self, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = s.f_bfree = s.f_bavail = 0
        s.f_files = len(self.paths)
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    # --- for the mount layer ------------------------------------------------------------

    @property
    def mode(self) -> str:
        return "fast" if self.fast else "stock"

    def stats(self) -> dict[str, object]:
        out: dict[str, object] = dict(self.reader.stats.as_dict())
        out.update(frame_cache_bytes=self.reader.frames.size, hot_fills=self.reader.hot.fills,
                   hot_bytes=self.reader.hot.size, paths=len(self.paths),
                   trees=len(self.trees), idle_nodes=self.idle_nodes,
                   open_files=len(self.handles), broken=len(self.broken), mode=self.mode,
                   requests=dict(self.requests), prefetched=self.prefetched)
        return out

    async def flush_access(self) -> None:
        """Record last access of the paths read since the last flush, in one transaction."""
        if not self.accessed:
            return
        hashes, self.accessed = [h for h in self.accessed if is_hash(h)], set()
        await self.db(self.catalog.touch, hashes)


def _store_files(files: list[tuple[int, bytes | memoryview]]) -> int:
    """Blocking (the kernel locks the pages it fills): run in a worker thread."""
    stored = 0
    for ino, data in files:
        try:
            pyfuse3.notify_store(ino, 0, data)
            stored += 1
        except OSError:  # ENOENT: the kernel does not know the inode; nothing to fill
            pass
    return stored


def _invalidate_inodes(inodes: Iterable[int]) -> None:
    """Blocking (the kernel may wait for requests on these inodes): run in a worker thread."""
    for ino in inodes:
        try:
            pyfuse3.invalidate_inode(ino)
        except OSError as e:
            if e.errno != errno.ENOENT:  # ENOENT: the kernel holds nothing of it
                log.warning("invalidating inode %d: %s", ino, e)


def _remove_sorted(items: list[int], value: int) -> None:
    i = bisect.bisect_left(items, value)
    if i < len(items) and items[i] == value:
        del items[i]
