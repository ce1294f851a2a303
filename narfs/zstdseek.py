"""The zstd seekable format (facebook/zstd contrib/seekable_format).

A file is independent zstd frames followed by one skippable frame holding the seek table, so any
zstd decoder reads it as one stream while narfs can decompress only the frames it needs.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import struct
import sys
import threading
from array import array
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import accumulate
from typing import BinaryIO, overload

import zstandard

from .errors import CorruptError
from .nar import SeekableReadable

SKIPPABLE_MAGIC = 0x184D2A5E
SEEKABLE_MAGIC = 0x8F92EAB1
FOOTER = struct.Struct("<IBI")  # frames, descriptor, magic
MAX_FRAME = 1 << 30  # the format's limit on one frame's decompressed size
CHECKSUM_FLAG = 0x80


@dataclass(frozen=True)
class Frame:
    comp_offset: int
    comp_size: int
    offset: int  # in the decompressed stream
    size: int


TABLE_BYTES_PER_FRAME = 20  # what a SeekTable holds per frame: u64 + u32 + u64
_TABLE_CHUNK = 1 << 16  # table entries read and checked at a time (~1 MiB of memory)


class TooManyFrames(Exception):
    """A seek table that is valid (checked whole, as read_table checks any table) but has more
    frames than the caller can hold: the file is to be read as a stream instead."""

    def __init__(self, frames: int, size: int) -> None:
        super().__init__(f"seek table of {frames} frames")
        self.frames = frames
        self.size = size  # the decompressed size the table covers


class FrameList(Sequence[Frame]):
    """A SeekTable's frames, made on demand from its arrays (no Python object per frame)."""

    def __init__(self, table: SeekTable) -> None:
        self._t = table

    def __len__(self) -> int:
        return len(self._t._comp_sizes)

    @overload
    def __getitem__(self, i: int) -> Frame: ...

    @overload
    def __getitem__(self, i: slice) -> list[Frame]: ...

    def __getitem__(self, i: int | slice) -> Frame | list[Frame]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        t = self._t
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return Frame(t._comp_offsets[i], t._comp_sizes[i], t._starts[i],
                     t._starts[i + 1] - t._starts[i])

    def __iter__(self) -> Iterator[Frame]:
        for i in range(len(self)):
            yield self[i]


class SeekTable:
    """The frames of a seekable file, with lookups by decompressed offset.

    Compact: three arrays (each frame's compressed offset and size, and the decompressed start
    of every frame plus the end), TABLE_BYTES_PER_FRAME bytes a frame where a list of Frame
    objects took ten times that; `nbytes` is what it holds, for the reader's bound.
    """

    def __init__(self, frames: Iterable[Frame] = ()) -> None:
        comp_offsets, comp_sizes, starts = array("Q"), array("I"), array("Q")
        end = 0
        sizes = []
        for f in frames:
            comp_offsets.append(f.comp_offset)
            comp_sizes.append(f.comp_size)
            starts.append(f.offset)
            end = f.offset + f.size
            sizes.append(f.size)
        starts.append(end)
        self._set(comp_offsets, comp_sizes, starts, max(sizes, default=0),
                  min(sizes[:-1], default=MAX_FRAME))

    @classmethod
    def _of(cls, comp_offsets: array, comp_sizes: array, starts: array,
            max_frame: int, min_frame: int) -> SeekTable:
        table = cls.__new__(cls)
        table._set(comp_offsets, comp_sizes, starts, max_frame, min_frame)
        return table

    def _set(self, comp_offsets: array, comp_sizes: array, starts: array,
             max_frame: int, min_frame: int) -> None:
        self._comp_offsets = comp_offsets
        self._comp_sizes = comp_sizes
        self._starts = starts  # one more than the frames: the last is the stream's size
        self.size: int = starts[-1]
        self.comp_size: int = comp_offsets[-1] + comp_sizes[-1] if comp_sizes else 0
        self.max_frame = max_frame  # the largest frame's decompressed size
        # The smallest but the last's (MAX_FRAME when there is no other): how many frames one
        # read may have to decompress.
        self.min_frame = min_frame
        self.nbytes = sum(a.itemsize * len(a) for a in (comp_offsets, comp_sizes, starts))

    @property
    def frames(self) -> FrameList:
        # Made on each use: a FrameList kept here would be a cycle, and a dropped table of
        # megabytes would wait for the cyclic garbage collector.
        return FrameList(self)

    def covering(self, offset: int, length: int) -> range:
        """Indices of the frames holding bytes [offset, offset+length)."""
        if length <= 0 or offset >= self.size:
            return range(0)
        first = bisect.bisect_right(self._starts, offset) - 1
        last = bisect.bisect_right(self._starts, min(offset + length, self.size) - 1) - 1
        return range(first, last + 1)


def encode_table(sizes: list[tuple[int, int]]) -> bytes:
    """The skippable frame for frames of (compressed, decompressed) sizes, without checksums."""
    body = b"".join(struct.pack("<II", c, d) for c, d in sizes)
    body += FOOTER.pack(len(sizes), 0, SEEKABLE_MAGIC)
    return struct.pack("<II", SKIPPABLE_MAGIC, len(body)) + body


def read_table(f: SeekableReadable, file_size: int,
               max_frames: int | None = None) -> SeekTable | None:
    """The seek table at the end of `f`, or None when the file has none (plain zstd).

    Every number is checked against the file before use: a lying table raises CorruptError.
    The entries are read and checked a chunk at a time, so a table of millions of frames costs
    only what the returned SeekTable holds; one of more than `max_frames` frames is checked
    all the same, then TooManyFrames is raised instead of holding it.
    """
    if file_size < FOOTER.size + 8:
        return None
    f.seek(file_size - FOOTER.size)
    nframes, descriptor, magic = FOOTER.unpack(f.read(FOOTER.size))
    if magic != SEEKABLE_MAGIC:
        return None
    if descriptor & 0x7C:
        raise CorruptError("seek table descriptor has reserved bits set")
    entry = 12 if descriptor & CHECKSUM_FLAG else 8
    body = nframes * entry + FOOTER.size
    if body + 8 > file_size:
        raise CorruptError(f"seek table claims {nframes} frames, more than the file holds")
    start = file_size - body - 8
    f.seek(start)
    magic, size = struct.unpack("<II", f.read(8))
    if magic != SKIPPABLE_MAGIC or size != body:
        raise CorruptError("seek table frame header does not match its footer")
    hold = max_frames is None or nframes <= max_frames
    held = nframes if hold else 0  # sized once: arrays grown by appending over-allocate
    comp_offsets, comp_sizes = array("Q", bytes(8 * held)), array("I", bytes(4 * held))
    starts = array("Q", bytes(8 * held + 8))
    comp = dec = max_frame = 0
    min_frame = MAX_FRAME
    step = entry // 4
    for first in range(0, nframes, _TABLE_CHUNK):
        n = min(_TABLE_CHUNK, nframes - first)
        raw = f.read(n * entry)
        if len(raw) != n * entry:
            raise CorruptError("seek table is truncated")
        words = array("I", raw)
        if sys.byteorder != "little":
            words.byteswap()
        cs, ds = words[0::step], words[1::step]
        if 0 in cs or max(ds) > MAX_FRAME:
            i = next(i for i in range(n) if cs[i] == 0 or ds[i] > MAX_FRAME)
            raise CorruptError(f"seek table frame {first + i} has impossible sizes "
                               f"({cs[i]}, {ds[i]})")
        if hold:
            comp_offsets[first:first + n] = array("Q", accumulate(cs[:-1], initial=comp))
            comp_sizes[first:first + n] = cs
            starts[first:first + n] = array("Q", accumulate(ds[:-1], initial=dec))
        comp += sum(cs)
        dec += sum(ds)
        max_frame = max(max_frame, max(ds))
        but_last = ds if first + n < nframes else ds[:-1]
        min_frame = min(min_frame, min(but_last, default=MAX_FRAME))
    if comp != start:
        raise CorruptError(f"seek table frames cover {comp} bytes, the data is {start}")
    if not hold:
        raise TooManyFrames(nframes, dec)
    starts[nframes] = dec
    return SeekTable._of(comp_offsets, comp_sizes, starts, max_frame, min_frame)


ZSTD_MAGIC = 0xFD2FB528
SKIPPABLE_MASK = 0xFFFFFFF0  # skippable frames: magic 0x184D2A50 to 0x184D2A5F
MAX_INDEXED_FRAME = 64 << 20  # larger frames go through the hot tier: one read, one frame
MAX_INDEXED_FRAMES = 1 << 20
MAX_COMP_FRAME = (1 << 32) - 1  # a seek table's u32: no frame of MAX_INDEXED_FRAME bytes is near
_BLOCK_HEADER = 3


def index_frames(f: SeekableReadable, file_size: int,
                 max_frames: int = MAX_INDEXED_FRAMES) -> SeekTable | None:
    """A seek table read off the frame headers of a zstd file made of independent frames that
    each declare their decompressed size, as Nix 2.35 writes NARs (16 MiB frames, no seek
    table); None when a frame does not declare its size or is too large to read one at a time,
    or when there are more than `max_frames` frames.

    Frame and block headers are walked without decompressing anything: a few small reads per
    128 KiB block, once per opened NAR. Every size is checked against the file.
    """
    comp_offsets, comp_sizes, starts = array("Q"), array("I"), array("Q")
    pos = dec = max_frame = 0
    min_frame = last = MAX_FRAME
    while pos < file_size:
        f.seek(pos)
        head = f.read(18)  # the largest frame header
        if len(head) < 8:
            raise CorruptError(f"zstd stream ends inside a frame header at {pos}")
        magic, skip = struct.unpack_from("<II", head)
        if magic & SKIPPABLE_MASK == SKIPPABLE_MAGIC & SKIPPABLE_MASK:
            pos += 8 + skip
            continue
        if magic != ZSTD_MAGIC:
            raise CorruptError(f"no zstd frame at {pos}")
        try:
            params = zstandard.get_frame_parameters(head)
            end = pos + zstandard.frame_header_size(head)
        except zstandard.ZstdError as e:
            raise CorruptError(f"zstd frame header at {pos} is damaged: {e}") from None
        size = params.content_size
        if size == zstandard.CONTENTSIZE_UNKNOWN or size > MAX_INDEXED_FRAME \
                or len(comp_sizes) >= max_frames:
            return None
        while True:  # blocks: 3-byte header (last, type, size); an RLE block holds one byte
            f.seek(end)
            raw = f.read(_BLOCK_HEADER)
            if len(raw) != _BLOCK_HEADER:
                raise CorruptError(f"zstd frame at {pos} is truncated")
            header = int.from_bytes(raw, "little")
            kind = (header >> 1) & 3
            if kind == 3:
                raise CorruptError(f"zstd frame at {pos} has a reserved block type")
            end += _BLOCK_HEADER + (1 if kind == 1 else header >> 3)
            if end > file_size:
                raise CorruptError(f"zstd frame at {pos} runs past the end of the file")
            if header & 1:
                break
        end += 4 if params.has_checksum else 0
        if end - pos > MAX_COMP_FRAME:
            raise CorruptError(f"zstd frame at {pos} is {end - pos} bytes, more than any frame "
                               f"of {size} bytes compresses to")
        max_frame = max(max_frame, size)
        if size:
            min_frame, last = min(min_frame, last), size
            comp_offsets.append(pos)
            comp_sizes.append(end - pos)
            starts.append(dec)
        dec += size
        pos = end
    if pos != file_size:
        raise CorruptError("zstd stream runs past the end of the file")
    starts.append(dec)
    return SeekTable._of(comp_offsets, comp_sizes, starts, max_frame, min_frame)


def read_frame(f: SeekableReadable, frame: Frame,
               dctx: zstandard.ZstdDecompressor | None = None) -> bytes:
    """Decompress one frame of a file (decompress_frame)."""
    f.seek(frame.comp_offset)
    return decompress_frame(f.read(frame.comp_size), frame, dctx)


def decompress_frame(data: bytes, frame: Frame,
                     dctx: zstandard.ZstdDecompressor | None = None,
                     upto: int | None = None) -> bytes:
    """Decompress one frame's compressed bytes, insisting it yields exactly the size the table
    promises. With `upto`, only its first `upto` bytes: a read in the middle of a frame stops
    there. Only for bytes checked otherwise (a remote frame's signed hash): the frame's own
    checksum, which catches damage, is at its end.

    Memory stays bounded by the table's size for the frame (at most MAX_FRAME): a frame header
    that promises another size is refused before decompressing, and a frame without a size in
    its header is read through a stream that stops one byte past the promise.
    """
    where = f"zstd frame at {frame.comp_offset}"
    if len(data) != frame.comp_size:
        raise CorruptError(f"{where} is truncated")
    want = frame.size if upto is None else max(0, min(upto, frame.size))
    dctx = dctx or zstandard.ZstdDecompressor()
    try:
        declared = zstandard.get_frame_parameters(data).content_size
        if declared not in (frame.size, zstandard.CONTENTSIZE_UNKNOWN):
            raise CorruptError(f"{where} declares {declared} bytes, the seek table {frame.size}")
        if declared == want:
            out = dctx.decompress(data, max_output_size=want)
        else:
            # a whole frame: one byte more, so a frame longer than its table says shows
            out = dctx.stream_reader(io.BytesIO(data)).read(
                want + 1 if want == frame.size else want)
    except zstandard.ZstdError as e:
        raise CorruptError(f"{where} is damaged: {e}") from None
    if len(out) != want:
        raise CorruptError(f"{where} holds {'more' if len(out) > want else 'fewer'} bytes than "
                           f"the seek table's {frame.size}")
    return out


_COMPRESSORS = threading.local()  # per thread: .cache, (level, frame size) → ZstdCompressor
MAX_WINDOW_LOG = 27  # what zstd decoders accept without being told (--long, windowLogMax)


def _compressor(level: int, frame_size: int) -> zstandard.ZstdCompressor:
    """A compressor for one thread, reused across frames and paths (contexts cost allocations).

    Its window covers a whole frame: level 3 alone would use 2 MiB, which forgets matches in
    the second half of a 4 MiB frame (+2.7% size on /usr/include's NAR, and slower).
    """
    cache: dict[tuple[int, int], zstandard.ZstdCompressor] | None = getattr(
        _COMPRESSORS, "cache", None)
    if cache is None:
        cache = _COMPRESSORS.cache = {}
    cctx = cache.get((level, frame_size))
    if cctx is None:
        params = zstandard.ZstdCompressionParameters.from_level(level, source_size=frame_size)
        window_log = min(max(params.window_log, (frame_size - 1).bit_length()), MAX_WINDOW_LOG)
        params = zstandard.ZstdCompressionParameters.from_level(
            level, source_size=frame_size, window_log=window_log, write_checksum=1,
            write_content_size=1)
        cctx = cache[(level, frame_size)] = zstandard.ZstdCompressor(compression_params=params)
    return cctx


class SeekableWriter:
    """Compress a stream into seekable zstd frames of `frame_size` bytes, `threads` at a time.

    Frames are compressed in worker threads (zstd releases the GIL) and written in order; at most
    `threads + 1` frames are in flight, which bounds memory. `sha256` is the compressed file's
    FileHash once `close()` returns.
    """

    def __init__(self, out: BinaryIO, frame_size: int, level: int,
                 executor: ThreadPoolExecutor | None = None, threads: int = 1) -> None:
        if not 0 < frame_size <= MAX_FRAME:
            raise ValueError(f"frame size {frame_size} outside 1..{MAX_FRAME}")
        self.out = out
        self.frame_size = frame_size
        self.level = level
        self.executor = executor
        self.threads = threads
        self.sha256 = hashlib.sha256()
        self.size = 0  # compressed bytes written
        self.nar_size = 0
        self._buf = bytearray()
        self._sizes: list[tuple[int, int]] = []
        self._pending: deque[tuple[Future[bytes], int]] = deque()  # with decompressed sizes

    def _compress(self, data: bytes) -> bytes:
        return _compressor(self.level, self.frame_size).compress(data)

    def _emit(self, comp: bytes, dsize: int) -> None:
        self.out.write(comp)
        self.sha256.update(comp)
        self.size += len(comp)
        self._sizes.append((len(comp), dsize))

    def _submit(self, frame: bytes) -> None:
        if self.executor is None:
            self._emit(self._compress(frame), len(frame))
            return
        self._pending.append((self.executor.submit(self._compress, frame), len(frame)))
        while len(self._pending) > self.threads:
            self._drain_one()

    def _drain_one(self) -> None:
        fut, dsize = self._pending.popleft()
        self._emit(fut.result(), dsize)

    def write(self, data: bytes) -> None:
        self.nar_size += len(data)
        buf, size = self._buf, self.frame_size
        buf += data
        while len(buf) >= size:
            with memoryview(buf) as view:
                frame = bytes(view[:size])  # one copy (a bytearray slice would make two)
            del buf[:size]  # cheap: CPython moves the bytearray's start, not its bytes
            self._submit(frame)

    def close(self) -> None:
        if self._buf or (not self._sizes and not self._pending):
            self._submit(bytes(self._buf))
            self._buf.clear()
        while self._pending:
            self._drain_one()
        table = encode_table(self._sizes)
        self.out.write(table)
        self.sha256.update(table)
        self.size += len(table)

    def abort(self) -> None:
        for fut, _ in self._pending:
            fut.cancel()
        self._pending.clear()
