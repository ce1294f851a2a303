"""Where a mount's bytes come from: one interface, the local cache directory its first
implementation (an HTTP cache is the second).

A `Backend` hands out NARs as `NarFile`s (compressed as their narinfo's URL names them), `.ls`
listings and the derived-state directory; the read path (reader.py) and the filesystem model
use nothing else of the cache. Everything a backend returns is as untrusted as the cache it
reads: sizes, listings and bytes are checked by their users (DESIGN contract 5).
"""

from __future__ import annotations

import os
from typing import Protocol

from .cache import Cache
from .catalog import Entry


class NarFile(Protocol):
    """One open NAR file, compressed as its narinfo's URL names it."""

    size: int  # its length in bytes
    # Whether every byte it hands out was checked against a signed hash (a remote file's
    # frames): a read may then stop decompressing a frame where it ends, since the frame's
    # own checksum, which only its end holds, adds nothing. A local file's damage is caught by
    # that checksum alone, so its frames are always decompressed whole.
    verified: bool

    def pread(self, offset: int, size: int) -> bytes:
        """Blocking and thread-safe (no shared position); short only at end of file; OSError
        or CorruptError on failure."""
        ...

    def close(self) -> None: ...


class Backend(Protocol):
    where: str  # the cache dir or URL, for messages
    state_dir: str  # derived state of this mount: <cache>/.narfs locally

    def open_nar(self, entry: Entry) -> NarFile:
        """Blocking."""
        ...

    def read_listing(self, h: str, nar_size: int | None = None) -> dict | None:
        """Blocking; the `.ls` root node, None when there is none."""
        ...

    def newest(self, versions: list[tuple[float, str]]) -> tuple[float, str]: ...


class LocalFile:
    """A NarFile over a descriptor of a local regular file (a cache NAR or a hot-tier file).
    Its size is taken once, at open: a file that shrinks later gives short reads, which the
    reader reports as a truncated NAR."""

    verified = False

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.size = os.fstat(fd).st_size

    def pread(self, offset: int, size: int) -> bytes:
        data = os.pread(self.fd, size, offset)
        while 0 < len(data) < size:  # short only at the end, as the protocol says
            more = os.pread(self.fd, size - len(data), offset + len(data))
            if not more:
                break
            data += more
        return data

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class NarView:
    """A file-like view of a NarFile through its pread (for decompressors and parsers): several
    threads may read one NAR at once, each with its own position, and none disturbs another."""

    def __init__(self, f: NarFile, pos: int = 0) -> None:
        self.f = f
        self.pos = pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else self.pos + pos
        return self.pos

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = max(self.f.size - self.pos, 0)
        data = self.f.pread(self.pos, n)
        self.pos += len(data)
        return data

    def readable(self) -> bool:
        return True


class LocalBackend:
    """The cache directory (narfs.cache.Cache), read as untrusted as Cache reads it."""

    def __init__(self, cache: Cache) -> None:
        self.cache = cache
        self.where = cache.root
        self.state_dir = cache.state_dir()

    def open_nar(self, entry: Entry) -> LocalFile:
        # Cache.open_nar refuses symlinks, FIFOs and devices, and confines the URL to nar/.
        with self.cache.open_nar(entry) as f:
            return LocalFile(os.dup(f.fileno()))

    def read_listing(self, h: str, nar_size: int | None = None) -> dict | None:
        return self.cache.read_listing(h, nar_size)

    def newest(self, versions: list[tuple[float, str]]) -> tuple[float, str]:
        return self.cache.newest(versions)

    def state_path(self, name: str) -> str:
        return self.cache.state_path(name)
