"""The NAR format: a streaming serialiser for store trees and a validating streaming parser.

Both directions keep memory bounded: file contents move in chunks, never whole. The parser treats
its input as hostile (DESIGN contract 5): every name is checked, every size is bounded before it
is used, and nesting depth is capped, so a bad NAR becomes a CorruptError and nothing else.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Iterator
from typing import Protocol

from .errors import CorruptError, NarfsError

MAGIC = b"nix-archive-1"
CHUNK = 1 << 20  # what streams of file contents and NARs move at a time
MAX_NAME = 255  # NAME_MAX: no filesystem could hold a longer name
MAX_TARGET = 4095  # PATH_MAX - 1
MAX_DEPTH = 1024  # PATH_MAX bounds real trees far below this
MAX_TOKEN = 64  # longest keyword ("nix-archive-1" and friends are shorter)

_U64 = struct.Struct("<Q")
_FLUSH = 1 << 16

Path = tuple[bytes, ...]


class Readable(Protocol):
    """What the parsers read from: a file, a decompressing stream, or narfs's own views."""

    def read(self, n: int, /) -> bytes: ...


class SeekableReadable(Readable, Protocol):
    def seek(self, pos: int, whence: int = 0, /) -> int: ...


def _padding(n: int) -> int:
    return (8 - n % 8) % 8


def encode_str(data: bytes) -> bytes:
    return _U64.pack(len(data)) + data + b"\0" * _padding(len(data))


_OPEN = encode_str(b"(")
_CLOSE = encode_str(b")")
_HEAD = encode_str(MAGIC)
_TYPE = encode_str(b"type")
_REGULAR = _OPEN + _TYPE + encode_str(b"regular")
_EXECUTABLE = encode_str(b"executable") + encode_str(b"")
_CONTENTS = encode_str(b"contents")
_SYMLINK = _OPEN + _TYPE + encode_str(b"symlink") + encode_str(b"target")
_DIRECTORY = _OPEN + _TYPE + encode_str(b"directory")
_ENTRY = encode_str(b"entry") + _OPEN + encode_str(b"name")
_NODE = encode_str(b"node")


class NarSerialiser:
    """Iterate over a NAR of the tree at `root`, in chunks; `listing` is its `.ls` root afterwards.

    Names are emitted sorted bytewise, as Nix does. `offset` counts the bytes emitted so far, which
    gives each regular file's narOffset for the listing.
    """

    def __init__(self, root: str | bytes) -> None:
        self.root = os.fsencode(root)
        self.offset = 0
        self.listing: dict | None = None
        self._buf = bytearray()

    def __iter__(self) -> Iterator[bytes]:
        """Iterative, so a deep tree costs no Python stack (nested generators would hit the
        recursion limit near 1000 levels); depth is capped at MAX_DEPTH like the parser's, so
        narfs never writes a NAR it would refuse to read."""
        buf = self._buf
        buf += _HEAD
        root: dict = {}
        stack: list[tuple[bytes, Iterator[bytes], dict]] = []  # open dirs: path, names, entries
        path, node = self.root, root
        while True:
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                yield from self._regular(path, st, node)
            elif stat.S_ISLNK(st.st_mode):
                target = os.readlink(path)
                node.update(type="symlink", target=os.fsdecode(target))
                buf += _SYMLINK + encode_str(target) + _CLOSE
            elif stat.S_ISDIR(st.st_mode):
                if len(stack) >= MAX_DEPTH:
                    raise NarfsError(f"{os.fsdecode(path)}: nests deeper than {MAX_DEPTH} "
                                     "directories; narfs cannot archive it")
                entries: dict = {}
                node.update(type="directory", entries=entries)
                buf += _DIRECTORY
                stack.append((path, iter(sorted(os.listdir(path))), entries))
            else:
                raise NarfsError(f"{os.fsdecode(path)}: not a regular file, directory or "
                                 "symlink; a store path cannot hold it")
            if not stat.S_ISDIR(st.st_mode) and stack:
                buf += _CLOSE  # closes the entry holding this node
            if len(buf) >= _FLUSH:
                yield self._take()
            # Walk up to the next entry: close every directory whose names are exhausted.
            while stack:
                dirpath, names, entries = stack[-1]
                name = next(names, None)
                if name is not None:
                    buf += _ENTRY + encode_str(name) + _NODE
                    node = entries[os.fsdecode(name)] = {}
                    path = dirpath + b"/" + name
                    break
                stack.pop()
                buf += _CLOSE  # the directory
                if stack:
                    buf += _CLOSE  # the entry holding it
            else:
                break
        self.listing = root
        if buf:
            yield self._take()

    def _take(self) -> bytes:
        data = bytes(self._buf)
        self.offset += len(data)
        self._buf.clear()
        return data

    def _regular(self, path: bytes, st: os.stat_result, node: dict) -> Iterator[bytes]:
        size = st.st_size
        self._buf += _REGULAR
        node.update(type="regular", size=size)
        if st.st_mode & stat.S_IXUSR:
            self._buf += _EXECUTABLE
            node["executable"] = True
        self._buf += _CONTENTS + _U64.pack(size)
        node["narOffset"] = self.offset + len(self._buf)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            left = size
            if size < _FLUSH:
                data = os.read(fd, size) if size else b""
                left -= len(data)
                self._buf += data
            else:
                yield self._take()
                while left > 0:
                    data = os.read(fd, min(CHUNK, left))
                    if not data:
                        break
                    left -= len(data)
                    self.offset += len(data)
                    yield data
            if left or os.read(fd, 1):
                raise NarfsError(f"{os.fsdecode(path)}: file changed size while being archived; "
                                 "store paths must not be modified")
        finally:
            os.close(fd)
        self._buf += b"\0" * _padding(size) + _CLOSE


def dump_bytes(root: str | bytes) -> bytes:
    """The whole NAR in memory; for tests and small trees only."""
    return b"".join(NarSerialiser(root))


class NarVisitor(Protocol):
    """What the parser reports, in NAR order. Paths are tuples of validated names."""

    def directory(self, path: Path) -> None: ...

    def symlink(self, path: Path, target: bytes) -> None: ...

    def regular(self, path: Path, executable: bool, size: int, offset: int,
                chunks: Iterator[bytes]) -> None:
        """`chunks` yields the contents; whatever the visitor does not consume is skipped."""


class _Reader:
    def __init__(self, stream: Readable, limit: int | None) -> None:
        self.stream = stream
        self.offset = 0
        self.limit = limit  # total size when known: lets sizes be checked before reading

    def exact(self, n: int) -> bytes:
        data = self.stream.read(n)
        if len(data) != n:
            raise CorruptError(f"NAR truncated at byte {self.offset + len(data)}")
        self.offset += n
        return data

    def u64(self) -> int:
        return _U64.unpack(self.exact(8))[0]

    def bounded(self, n: int, what: str) -> None:
        if self.limit is not None and self.offset + n > self.limit:
            raise CorruptError(f"NAR claims a {what} of {n} bytes at byte {self.offset}, "
                               f"past its end ({self.limit})")

    def padding(self, n: int) -> None:
        pad = _padding(n)
        if pad and self.exact(pad) != b"\0" * pad:
            raise CorruptError(f"NAR padding not zero at byte {self.offset - pad}")

    def string(self, maxlen: int, what: str) -> bytes:
        n = self.u64()
        if n > maxlen:
            raise CorruptError(f"NAR {what} of {n} bytes at byte {self.offset - 8} "
                               f"(at most {maxlen})")
        data = self.exact(n)
        self.padding(n)
        return data

    def token(self) -> bytes:
        return self.string(MAX_TOKEN, "token")

    def expect(self, want: bytes) -> None:
        got = self.token()
        if got != want:
            raise CorruptError(f"NAR has {got[:32]!r} where {want!r} belongs "
                               f"(byte {self.offset})")

    def contents(self, size: int) -> Iterator[bytes]:
        left = size
        while left:
            data = self.exact(min(CHUNK, left))
            left -= len(data)
            yield data


def check_name(name: bytes) -> None:
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise CorruptError(f"NAR entry has an unsafe name {name[:64]!r}")


def parse(stream: Readable, visitor: NarVisitor, size: int | None = None) -> int:
    """Parse a whole NAR from `stream`, reporting to `visitor`; return the NAR's length.

    Iterative, so nesting depth costs no Python stack; depth is still capped at MAX_DEPTH.
    Invariant kept: within a directory, names arrive strictly increasing (sorted, no duplicates),
    which also rules out a symlink followed by a directory of the same name.
    """
    r = _Reader(stream, size)
    r.expect(MAGIC)
    stack: list[tuple[Path, bytes | None]] = []  # open directories: (path, last name seen)
    path: Path = ()
    while True:
        # A node starts here.
        r.expect(b"(")
        r.expect(b"type")
        kind = r.token()
        if kind == b"regular":
            tok = r.token()
            executable = False
            if tok == b"executable":
                r.expect(b"")
                executable = True
                tok = r.token()
            if tok != b"contents":
                raise CorruptError(f"NAR regular file without contents at byte {r.offset}")
            n = r.u64()
            r.bounded(n, "file")
            offset = r.offset
            chunks = r.contents(n)
            visitor.regular(path, executable, n, offset, chunks)
            for _ in chunks:  # skip what the visitor left unread
                pass
            r.padding(n)
            r.expect(b")")
        elif kind == b"symlink":
            r.expect(b"target")
            target = r.string(MAX_TARGET, "symlink target")
            if not target or b"\0" in target:
                raise CorruptError(f"NAR symlink {_show(path)} has an empty or NUL target")
            visitor.symlink(path, target)
            r.expect(b")")
        elif kind == b"directory":
            if len(stack) >= MAX_DEPTH:
                raise CorruptError(f"NAR nests deeper than {MAX_DEPTH} directories")
            visitor.directory(path)
            stack.append((path, None))
        else:
            raise CorruptError(f"NAR node of unknown type {kind[:32]!r}")
        # The node is complete unless it opened a directory; walk back up to the next entry.
        if kind != b"directory" and stack:
            r.expect(b")")  # closes the entry holding this node
        while stack:
            dirpath, last = stack[-1]
            tok = r.token()
            if tok == b"entry":
                r.expect(b"(")
                r.expect(b"name")
                name = r.string(MAX_NAME, "name")
                check_name(name)
                if last is not None and name <= last:
                    raise CorruptError(f"NAR directory {_show(dirpath)} has entries unsorted or "
                                       f"duplicated ({name[:64]!r} after {last[:64]!r})")
                stack[-1] = (dirpath, name)
                r.expect(b"node")
                path = (*dirpath, name)
                break
            if tok != b")":
                raise CorruptError(f"NAR has {tok[:32]!r} inside a directory at byte {r.offset}")
            stack.pop()
            if stack:
                r.expect(b")")
        else:
            break
    if r.stream.read(1):
        raise CorruptError(f"NAR has trailing data after byte {r.offset}")
    return r.offset


def _show(path: Path) -> str:
    return "/" + "/".join(os.fsdecode(p) for p in path)


class DepthGauge:
    """Keeps the depth of the deepest node seen (the root is 0): Nix 2.34 refuses NARs nested
    64 deep, so restore and verify need it (nixversions.restore_depth_limit)."""

    deepest = 0

    def _saw(self, path: Path) -> None:
        if len(path) > self.deepest:
            self.deepest = len(path)


class ListingBuilder(DepthGauge):
    """A NarVisitor that builds the `.ls` root node (DESIGN: Listing) of the NAR it is fed."""

    def __init__(self) -> None:
        self.root: dict = {}

    def _slot(self, path: Path) -> dict:
        node = self.root
        for name in path[:-1]:
            node = node["entries"][os.fsdecode(name)]
        if not path:
            return node
        child: dict = {}
        node["entries"][os.fsdecode(path[-1])] = child
        self._saw(path)
        return child

    def directory(self, path: Path) -> None:
        self._slot(path).update(type="directory", entries={})

    def symlink(self, path: Path, target: bytes) -> None:
        self._slot(path).update(type="symlink", target=os.fsdecode(target))

    def regular(self, path: Path, executable: bool, size: int, offset: int,
                chunks: Iterator[bytes]) -> None:
        node = self._slot(path)
        node.update(type="regular", size=size)
        if executable:
            node["executable"] = True
        node["narOffset"] = offset


class Validator(DepthGauge):
    """A NarVisitor that keeps only the depth: for parsing a NAR to know it is well formed."""

    def directory(self, path: Path) -> None:
        self._saw(path)

    def symlink(self, path: Path, target: bytes) -> None:
        self._saw(path)

    def regular(self, path: Path, executable: bool, size: int, offset: int,
                chunks: Iterator[bytes]) -> None:
        self._saw(path)


def listing_of(stream: Readable, size: int | None = None) -> dict:
    """Parse a NAR stream into a `.ls` root node, validating it on the way."""
    builder = ListingBuilder()
    parse(stream, builder, size)
    return builder.root
