"""A NAR read back out of a cache file: decompressed, counted, hashed and parsed.

One place for what restore --to, verify and the mount each need: the bytes of a NAR from any
compression Python reads, held to the narinfo's NarSize while they stream (so a lying file
cannot make us read or allocate past it), and checked against its NarHash at the end.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import zlib
from collections.abc import Iterator
from typing import IO, cast

import zstandard

from . import nar, nix32
from .errors import CorruptError, NarfsError

# zlib.error is gzip's: damaged deflate data (neither an OSError nor a ValueError)
_DECODE_ERRORS = (zstandard.ZstdError, lzma.LZMAError, zlib.error, EOFError, OSError, ValueError)


def decompressing(f: nar.Readable, compression: str) -> nar.Readable:
    """A stream of the NAR inside cache file `f`: zstd (seekable or not: skippable frames are
    skipped), xz, bzip2, gzip or none."""
    # The decompressors only ever call f.read(n); their stubs ask for a whole file object.
    raw = cast(IO[bytes], f)
    if compression == "zstd":
        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    if compression == "xz":
        return lzma.LZMAFile(raw)
    if compression == "bzip2":
        return bz2.BZ2File(raw)
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw)
    if compression == "none":
        return f
    raise NarfsError(f"compression {compression!r} cannot be read by narfs itself; restore the "
                     "path into the store through Nix instead")


def decompressed_chunks(f: nar.Readable, compression: str) -> Iterator[bytes]:
    stream = decompressing(f, compression)
    try:
        while data := stream.read(nar.CHUNK):
            yield data
    except _DECODE_ERRORS as e:
        raise CorruptError(f"{compression} data is damaged: {e}") from None


class NarStream:
    """The decompressed NAR as a readable stream: counts and hashes every byte that comes out
    of `chunks` (so NarHash and NarSize are those of the whole stream), refuses more than
    `limit` bytes, and serves the parser's many small reads from a buffer."""

    def __init__(self, chunks: Iterator[bytes], limit: int) -> None:
        self.chunks = chunks
        self.limit = limit
        self.size = 0
        self.sha = hashlib.sha256()
        self._buf = b""
        self._pos = 0

    def _more(self) -> bool:
        for data in self.chunks:
            if not data:
                continue
            self.size += len(data)
            if self.size > self.limit:
                raise CorruptError(f"NAR decompresses to more than its NarSize {self.limit}")
            self.sha.update(data)
            self._buf = self._buf[self._pos:] + data
            self._pos = 0
            return True
        return False

    def read(self, n: int) -> bytes:
        pos = self._pos
        end = pos + n
        if end > len(self._buf):  # the parser's many small reads mostly skip this
            while len(self._buf) - self._pos < n and self._more():
                pass
            pos = self._pos
            end = min(pos + n, len(self._buf))
        self._pos = end
        return self._buf[pos:end]

    def drain(self) -> None:
        self._pos = len(self._buf)
        while self._more():
            self._pos = len(self._buf)

    def nar_hash(self) -> str:
        return nix32.format_sha256(self.sha.digest())

    def check(self, nar_size: int, nar_hash: str) -> None:
        """After the whole stream: it must be exactly the NAR its narinfo vouches for."""
        if self.size != nar_size or self.nar_hash() != nar_hash:
            raise CorruptError(f"NAR is {self.size} bytes hashing to {self.nar_hash()}, the "
                               f"narinfo says {nar_size} bytes, {nar_hash}")


def parse_checked(chunks: Iterator[bytes], visitor: nar.NarVisitor, nar_size: int,
                  nar_hash: str) -> NarStream:
    """Parse a whole NAR into `visitor`, then insist on its NarSize and NarHash.

    The visitor sees the entries before the hash is known: callers that write (restore --to)
    keep their output out of place until this returns.
    """
    stream = NarStream(chunks, nar_size)
    nar.parse(stream, visitor, nar_size)
    stream.drain()
    stream.check(nar_size, nar_hash)
    return stream
