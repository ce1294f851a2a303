"""Store paths as inode trees: the numbering scheme and a compact, validated tree per listing.

Inode numbers are derived, not allocated, so they are the same on every mount:

    inode = slot << 24 | index

`slot` (40 bits) comes from the first 8 nix-base32 characters of the store path hash (8 × 5
bits); `index` is the node's position in the path's listing, breadth-first with entries sorted
bytewise (0 is the path itself). Slot 0 is narfs's own: the mount root (inode 1) and `.by-name`
(inode 2). Two indices in every slot are reserved for the by-name view (BYNAME_DIR, BYNAME_LINK),
so a path may hold MAX_NODES nodes; a larger listing is refused (no real store path comes close:
a listing that big exceeds listing.MAX_SIZE first).

Collisions (two hashes, or a hash and a by-name name, wanting one slot) are resolved by probing
the following slots, in sorted order at mount time and in arrival order afterwards; a slot once
given is never reused within one mount, so the kernel never sees one inode mean two things.
"""

from __future__ import annotations

import bisect
import hashlib
import struct
import sys
from array import array
from collections import deque

from .errors import CorruptError
from .listing import is_count
from .nar import MAX_DEPTH, MAX_NAME, MAX_TARGET, check_name

INDEX_BITS = 24
INDEX_MASK = (1 << INDEX_BITS) - 1
SLOT_MASK = (1 << 40) - 1
BYNAME_DIR = INDEX_MASK  # in a name's slot: the `.by-name/<name>` directory
BYNAME_LINK = INDEX_MASK - 1  # in a hash's slot: its version link; in a name's slot: `latest`
MAX_NODES = INDEX_MASK - 1
ROOT_INODE = 1
BYNAME_INODE = 2

DIR, REG, EXE, LNK = 0, 1, 2, 3
TREE_MAGIC = "narfs-tree-1 "
MAX_TREE_FILE = 1 << 30  # the largest tree file read back (derived data: bounded like the rest)

# nix-base32 digits → the digits int(x, 32) understands, preserving order.
_TO_B32 = str.maketrans("0123456789abcdfghijklmnpqrsvwxyz", "0123456789abcdefghijklmnopqrstuv")


def hash_slot(h: str) -> int:
    return int(h[:8].translate(_TO_B32), 32)


def name_slot(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:5], "big")


class Slots:
    """Owner of each 40-bit slot for this mount: a store path hash or a by-name name."""

    def __init__(self) -> None:
        self._owner: dict[int, tuple[str, str]] = {0: ("", "")}
        self._of: dict[tuple[str, str], int] = {}

    def assign(self, key: tuple[str, str], preferred: int) -> int:
        slot = self._of.get(key)
        if slot is not None:
            return slot
        slot = preferred
        while slot in self._owner:
            slot = (slot + 1) & SLOT_MASK
        self._owner[slot] = key
        self._of[key] = slot
        return slot

    def path(self, h: str) -> int:
        return self.assign(("p", h), hash_slot(h))

    def name(self, name: str) -> int:
        return self.assign(("n", name), name_slot(name))

    def owner(self, slot: int) -> tuple[str, str] | None:
        return self._owner.get(slot)


def encode_name(name: str) -> bytes:
    """Listing names are str (JSON); the bytes on disk are their UTF-8 with surrogateescape."""
    try:
        return name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise CorruptError(f"listing name {name[:40]!r} is not encodable") from None


class Tree:
    """One store path's nodes in breadth-first order: a directory's children are contiguous and
    sorted, so lookup is a bisection. Arrays rather than objects: a big path costs tens of bytes
    per node, and the tree can be dropped and rebuilt with the same inode numbers at any time."""

    __slots__ = ("count", "first", "hash", "kinds", "names", "nlinks", "offsets", "sizes",
                 "slot", "targets")

    def __init__(self, h: str, slot: int) -> None:
        self.hash = h
        self.slot = slot
        self.names: list[bytes] = [b""]
        self.kinds = array("B")
        self.sizes = array("Q")
        self.offsets = array("Q")
        self.first = array("I")
        self.count = array("I")
        self.nlinks = array("I")
        self.targets: dict[int, bytes] = {}

    @classmethod
    def build(cls, h: str, slot: int, root: dict, nar_size: int) -> Tree:
        """Build from a listing root node, validating it as untrusted input (any source)."""
        self = cls(h, slot)
        depth = [0]
        pending: deque[dict] = deque([root])
        i = 0
        while pending:
            node = pending.popleft()
            if not isinstance(node, dict):
                raise CorruptError("listing node is not an object")
            kind = node.get("type")
            size = offset = first = count = 0
            nlink = 1
            if kind == "directory":
                entries = node.get("entries")
                if not isinstance(entries, dict):
                    raise CorruptError("listing directory without entries")
                if depth[i] >= MAX_DEPTH:
                    raise CorruptError(f"listing nests deeper than {MAX_DEPTH}")
                named = sorted((encode_name(k), v) for k, v in entries.items()
                               if isinstance(k, str))
                if len(named) != len(entries):
                    raise CorruptError("listing has a non-string name")
                first, count = len(self.names), len(named)
                if first + count > MAX_NODES:
                    raise CorruptError(f"store path has more than {MAX_NODES} files")
                nlink = 2
                last = None
                for name, child in named:
                    if name == last:
                        raise CorruptError(f"listing has {name[:64]!r} twice")
                    last = name
                    if len(name) > MAX_NAME:
                        raise CorruptError(f"listing name longer than {MAX_NAME} bytes")
                    check_name(name)
                    self.names.append(name)
                    depth.append(depth[i] + 1)
                    pending.append(child)
                    if isinstance(child, dict) and child.get("type") == "directory":
                        nlink += 1
                code = DIR
            elif kind == "regular":
                raw_size, raw_offset = node.get("size"), node.get("narOffset")
                if not is_count(raw_size) or not is_count(raw_offset) \
                        or raw_offset + raw_size > nar_size:
                    raise CorruptError("listing regular file without a valid size and "
                                       "narOffset inside the NAR")
                size, offset = raw_size, raw_offset
                executable = node.get("executable", False)
                if executable not in (True, False):
                    raise CorruptError("listing executable flag is not a boolean")
                code = EXE if executable else REG
            elif kind == "symlink":
                target = node.get("target")
                if not isinstance(target, str) or not target or "\0" in target:
                    raise CorruptError("listing symlink without a valid target")
                raw = encode_name(target)
                if len(raw) > MAX_TARGET:
                    raise CorruptError("listing symlink target too long")
                self.targets[i] = raw
                size = len(raw)
                code = LNK
            else:
                raise CorruptError(f"listing node of unknown type {str(kind)[:20]!r}")
            self.kinds.append(code)
            self.sizes.append(size)
            self.offsets.append(offset)
            self.first.append(first)
            self.count.append(count)
            self.nlinks.append(nlink)
            i += 1
        return self

    # --- a compact form, so a big path's tree loads in a millisecond instead of being rebuilt
    # from its JSON listing (tens of milliseconds for ten thousand files) ---------------------

    def dumps(self, nar_hash: str) -> bytes:
        n = len(self)
        head = f"{TREE_MAGIC}{sys.byteorder} {nar_hash} {n}\n".encode()
        names = b"\0".join(self.names[1:])
        links = b"\0".join(self.targets[i] for i in sorted(self.targets))
        return b"".join([head, self.kinds.tobytes(), self.sizes.tobytes(), self.offsets.tobytes(),
                         self.first.tobytes(), self.count.tobytes(), self.nlinks.tobytes(),
                         struct.pack("=QQ", len(names), len(links)), names, b"\0", links])

    @classmethod
    def loads(cls, h: str, slot: int, data: bytes, nar_hash: str) -> Tree:
        """Read what `dumps` wrote: derived data narfs wrote itself, checked for damage (and
        for being another NAR's) rather than validated name by name again."""
        end = data.find(b"\n", 0, 200)
        try:
            magic, order, got_hash, count = data[:end].decode().split(" ")
            n = int(count)
        except ValueError:
            raise CorruptError("tree file header is damaged") from None
        if f"{magic} " != TREE_MAGIC or order != sys.byteorder or got_hash != nar_hash \
                or not 0 < n <= MAX_NODES:
            raise CorruptError("tree file is not this NAR's")
        try:
            return cls._loads(cls(h, slot), data, end + 1, n)
        except (ValueError, struct.error, IndexError):
            raise CorruptError("tree file is damaged") from None

    def _loads(self, data: bytes, pos: int, n: int) -> Tree:
        for arr in (self.kinds, self.sizes, self.offsets, self.first, self.count, self.nlinks):
            size = n * arr.itemsize
            arr.frombytes(data[pos:pos + size])
            pos += size
        if pos + 16 > len(data):
            raise CorruptError("tree file is truncated")
        names_len, links_len = struct.unpack_from("=QQ", data, pos)
        pos += 16
        names = data[pos:pos + names_len].split(b"\0") if n > 1 else []
        pos += names_len + 1
        links = data[pos:pos + links_len].split(b"\0") if links_len else []
        lnk = [i for i, k in enumerate(self.kinds) if k == LNK]
        if (len(names) != n - 1 or len(links) != len(lnk) or pos + links_len != len(data)
                or max(self.kinds) > LNK or b"/" in data[pos - names_len - 1:pos]
                or not all(names) or b"." in names or b".." in names):
            raise CorruptError("tree file is damaged")
        for i in range(n):
            if self.kinds[i] == DIR and ((self.first[i] <= i and self.count[i])
                                         or self.first[i] + self.count[i] > n):
                raise CorruptError("tree file is damaged")
        self.names += names
        self.targets = dict(zip(lnk, links, strict=True))
        return self

    def __len__(self) -> int:
        return len(self.kinds)

    def inode(self, index: int) -> int:
        return self.slot << INDEX_BITS | index

    def lookup(self, index: int, name: bytes) -> int | None:
        lo = self.first[index]
        hi = lo + self.count[index]
        i = bisect.bisect_left(self.names, name, lo, hi)
        return i if i < hi and self.names[i] == name else None

    def top(self) -> list:
        """What the root listing needs of this path without building its tree again."""
        kind = self.kinds[0]
        if kind == LNK:
            return [kind, 0, self.targets[0].decode("utf-8", "surrogateescape")]
        return [kind, self.sizes[0], self.nlinks[0]]
