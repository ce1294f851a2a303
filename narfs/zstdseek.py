"""The zstd seekable format (facebook/zstd contrib/seekable_format).

A file is independent zstd frames followed by one skippable frame holding the seek table, so any
zstd decoder reads it as one stream while narfs can decompress only the frames it needs.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import struct
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO

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


class SeekTable:
    """The frames of a seekable file, with lookups by decompressed offset."""

    def __init__(self, frames: list[Frame]) -> None:
        self.frames = frames
        self._starts = [f.offset for f in frames]
        self.size = frames[-1].offset + frames[-1].size if frames else 0
        self.comp_size = frames[-1].comp_offset + frames[-1].comp_size if frames else 0

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


def read_table(f: SeekableReadable, file_size: int) -> SeekTable | None:
    """The seek table at the end of `f`, or None when the file has none (plain zstd).

    Every number is checked against the file before use: a lying table raises CorruptError.
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
    raw = f.read(nframes * entry)
    frames = []
    comp = dec = 0
    for i in range(nframes):
        c, d = struct.unpack_from("<II", raw, i * entry)
        if d > MAX_FRAME or c == 0:
            raise CorruptError(f"seek table frame {i} has impossible sizes ({c}, {d})")
        frames.append(Frame(comp, c, dec, d))
        comp += c
        dec += d
    if comp != start:
        raise CorruptError(f"seek table frames cover {comp} bytes, the data is {start}")
    return SeekTable(frames)


ZSTD_MAGIC = 0xFD2FB528
SKIPPABLE_MASK = 0xFFFFFFF0  # skippable frames: magic 0x184D2A50 to 0x184D2A5F
MAX_INDEXED_FRAME = 64 << 20  # larger frames go through the hot tier: one read, one frame
MAX_INDEXED_FRAMES = 1 << 20
_BLOCK_HEADER = 3


def index_frames(f: SeekableReadable, file_size: int) -> SeekTable | None:
    """A seek table read off the frame headers of a zstd file made of independent frames that
    each declare their decompressed size, as Nix 2.35 writes NARs (16 MiB frames, no seek
    table); None when a frame does not declare its size or is too large to read one at a time.

    Frame and block headers are walked without decompressing anything: a few small reads per
    128 KiB block, once per opened NAR. Every size is checked against the file.
    """
    frames: list[Frame] = []
    pos = dec = 0
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
                or len(frames) >= MAX_INDEXED_FRAMES:
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
        if size:
            frames.append(Frame(pos, end - pos, dec, size))
        dec += size
        pos = end
    if pos != file_size:
        raise CorruptError("zstd stream runs past the end of the file")
    return SeekTable(frames)


def read_frame(f: SeekableReadable, frame: Frame,
               dctx: zstandard.ZstdDecompressor | None = None) -> bytes:
    """Decompress one frame, insisting it yields exactly the size the table promises.

    Memory stays bounded by the table's size for the frame (at most MAX_FRAME): a frame header
    that promises another size is refused before decompressing, and a frame without a size in
    its header is read through a stream that stops one byte past the promise.
    """
    f.seek(frame.comp_offset)
    data = f.read(frame.comp_size)
    where = f"zstd frame at {frame.comp_offset}"
    if len(data) != frame.comp_size:
        raise CorruptError(f"{where} is truncated")
    dctx = dctx or zstandard.ZstdDecompressor()
    try:
        declared = zstandard.get_frame_parameters(data).content_size
        if declared == frame.size:
            out = dctx.decompress(data, max_output_size=frame.size)
        elif declared == zstandard.CONTENTSIZE_UNKNOWN:
            out = dctx.stream_reader(io.BytesIO(data)).read(frame.size + 1)
        else:
            raise CorruptError(f"{where} declares {declared} bytes, the seek table {frame.size}")
    except zstandard.ZstdError as e:
        raise CorruptError(f"{where} is damaged: {e}") from None
    if len(out) != frame.size:
        raise CorruptError(f"{where} holds {len(out)} bytes, the seek table says {frame.size}")
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
