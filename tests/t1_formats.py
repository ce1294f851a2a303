"""Seekable zstd and NAR streams (narfs/zstdseek.py, narfs/narstream.py) where tests/t4_formats.py
(checked against Nix and the zstd CLI) and tests/t6_nixversions.py leave off: no Nix, no FUSE.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import lzma
import os
import struct
import tracemalloc
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import zstandard

from hostile import GOOD_TREE
from narfs import nix32
from narfs.errors import CorruptError, NarfsError
from narfs.nar import ListingBuilder
from narfs.narstream import NarStream, decompressed_chunks, decompressing, parse_checked
from narfs.zstdseek import (
    CHECKSUM_FLAG,
    FOOTER,
    MAX_FRAME,
    SEEKABLE_MAGIC,
    SKIPPABLE_MAGIC,
    Frame,
    SeekableWriter,
    SeekTable,
    decompress_frame,
    encode_table,
    read_frame,
    read_table,
)


def write(data: bytes, frame: int, executor: ThreadPoolExecutor | None = None,
          pieces: int = 7) -> tuple[bytes, SeekableWriter]:
    out = io.BytesIO()
    w = SeekableWriter(out, frame, 3, executor, threads=2)
    step = max(1, len(data) // pieces)
    for i in range(0, len(data), step):
        w.write(data[i:i + step])
    w.close()
    return out.getvalue(), w


def table_of(blob: bytes) -> SeekTable:
    table = read_table(io.BytesIO(blob), len(blob))
    assert table is not None
    return table


# --- the seek table ---------------------------------------------------------------------------


def with_table(frames: list[bytes], body: bytes) -> bytes:
    return b"".join(frames) + struct.pack("<II", SKIPPABLE_MAGIC, len(body)) + body


def test_a_table_with_checksums_as_the_reference_tool_writes_is_read() -> None:
    parts = [b"first frame " * 10, b"second", b"third " * 50]
    frames = [zstandard.ZstdCompressor().compress(p) for p in parts]
    body = b"".join(struct.pack("<III", len(f), len(p), 0xDEADBEEF)
                    for f, p in zip(frames, parts, strict=True))
    blob = with_table(frames, body + FOOTER.pack(len(parts), CHECKSUM_FLAG, SEEKABLE_MAGIC))
    table = table_of(blob)
    assert [(f.comp_size, f.size) for f in table.frames] == \
        [(len(f), len(p)) for f, p in zip(frames, parts, strict=True)]
    f = io.BytesIO(blob)
    assert b"".join(read_frame(f, fr) for fr in table.frames) == b"".join(parts)


@pytest.mark.parametrize("lie", ["reserved-bits", "too-many-frames", "empty-frame",
                                 "huge-frame", "frames-short-of-the-data", "header-size"])
def test_a_lying_table_is_corrupt(lie: str) -> None:
    frames = [zstandard.ZstdCompressor().compress(b"x" * 100)] * 2
    rows = [[len(frames[0]), 100], [len(frames[1]), 100]]
    descriptor, count = 0, 2
    if lie == "reserved-bits":
        descriptor = 0x04
    elif lie == "too-many-frames":
        count = 1 << 30
    elif lie == "empty-frame":
        rows[1][0] = 0
    elif lie == "huge-frame":
        rows[1][1] = MAX_FRAME + 1
    elif lie == "frames-short-of-the-data":
        rows[1][0] -= 1
    body = b"".join(struct.pack("<II", *r) for r in rows)
    body += FOOTER.pack(count, descriptor, SEEKABLE_MAGIC)
    blob = with_table(frames, body)
    if lie == "header-size":
        blob = blob.replace(struct.pack("<II", SKIPPABLE_MAGIC, len(body)),
                            struct.pack("<II", SKIPPABLE_MAGIC, len(body) + 8))
    with pytest.raises(CorruptError):
        read_table(io.BytesIO(blob), len(blob))


def test_files_without_a_table_are_not_seekable() -> None:
    plain = zstandard.ZstdCompressor().compress(b"plain" * 100)
    for blob in (b"", b"short", plain, plain + b"\0" * 9):
        assert read_table(io.BytesIO(blob), len(blob)) is None


def test_covering_at_the_edges() -> None:
    table = SeekTable([Frame(0, 5, 0, 10), Frame(5, 5, 10, 10), Frame(10, 5, 20, 5)])
    assert table.size == 25 and table.comp_size == 15
    assert list(table.covering(0, 10)) == [0]
    assert list(table.covering(9, 2)) == [0, 1]
    assert list(table.covering(10, 1)) == [1]
    assert list(table.covering(19, 100)) == [1, 2]
    assert list(table.covering(24, 1)) == [2]
    assert list(table.covering(25, 1)) == [] and list(table.covering(3, 0)) == []
    empty = SeekTable([])
    assert empty.size == 0 and list(empty.covering(0, 10)) == []


# --- one frame ------------------------------------------------------------------------------


def test_a_frame_without_a_content_size_is_held_to_the_table() -> None:
    data = os.urandom(1000)
    comp = zstandard.ZstdCompressor(write_content_size=False).compress(data)
    f = io.BytesIO(comp)
    assert read_frame(f, Frame(0, len(comp), 0, 1000)) == data
    for promised in (999, 1001):
        with pytest.raises(CorruptError):
            read_frame(f, Frame(0, len(comp), 0, promised))


def test_a_frame_that_declares_another_size_is_refused_before_decompressing() -> None:
    comp = zstandard.ZstdCompressor().compress(b"\0" * 1000)
    with pytest.raises(CorruptError, match="declares 1000"):
        read_frame(io.BytesIO(comp), Frame(0, len(comp), 0, 10))


def test_a_decompression_bomb_costs_the_promised_size_only() -> None:
    comp = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * (64 << 20))
    tracemalloc.start()
    try:
        with pytest.raises(CorruptError):
            read_frame(io.BytesIO(comp), Frame(0, len(comp), 0, 1000))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak} bytes allocated to refuse a 1000-byte frame"


def test_a_frame_can_be_decompressed_up_to_where_a_read_ends() -> None:
    data = os.urandom(200_000)
    for content_size in (True, False):
        comp = zstandard.ZstdCompressor(write_content_size=content_size).compress(data)
        frame = Frame(0, len(comp), 0, len(data))
        assert decompress_frame(comp, frame) == data
        assert decompress_frame(comp, frame, upto=1000) == data[:1000]
        assert decompress_frame(comp, frame, upto=len(data) + 5) == data
        with pytest.raises(CorruptError, match=r"declares|fewer"):  # it ends before the read
            decompress_frame(comp, Frame(0, len(comp), 0, len(data) + 10), upto=len(data) + 5)
        with pytest.raises(CorruptError, match="truncated"):
            decompress_frame(comp[:-1], frame, upto=10)


def test_a_truncated_or_damaged_frame_is_corrupt() -> None:
    data = os.urandom(500)
    comp = zstandard.ZstdCompressor(write_checksum=True).compress(data)
    with pytest.raises(CorruptError, match="truncated"):
        read_frame(io.BytesIO(comp[:-1]), Frame(0, len(comp), 0, 500))
    bad = bytearray(comp)
    bad[len(bad) // 2] ^= 0x40
    with pytest.raises(CorruptError):
        read_frame(io.BytesIO(bytes(bad)), Frame(0, len(comp), 0, 500))


# --- the writer -------------------------------------------------------------------------------


def test_threads_write_the_same_file_as_one() -> None:
    data = os.urandom(5000) + b"abc" * 5000
    serial, ws = write(data, 1024)
    with ThreadPoolExecutor(3) as ex:
        threaded, wt = write(data, 1024, ex, pieces=31)
    assert threaded == serial
    assert ws.sha256.hexdigest() == wt.sha256.hexdigest() == hashlib.sha256(serial).hexdigest()
    assert ws.size == len(serial) and ws.nar_size == len(data)
    table = table_of(serial)
    assert [f.size for f in table.frames] == [1024] * (len(data) // 1024) + [len(data) % 1024]
    assert b"".join(decompressed_chunks(io.BytesIO(serial), "zstd")) == data


def test_an_empty_stream_is_one_empty_frame() -> None:
    blob, w = write(b"", 64)
    table = table_of(blob)
    assert table.size == 0 and [f.size for f in table.frames] == [0] and w.nar_size == 0
    assert zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob),
                                                       read_across_frames=True).read() == b""


def test_an_exact_multiple_of_the_frame_size_has_no_empty_last_frame() -> None:
    blob, _ = write(b"z" * 256, 64)
    assert [f.size for f in table_of(blob).frames] == [64] * 4


@pytest.mark.parametrize("size", [0, -1, MAX_FRAME + 1])
def test_frame_sizes_outside_the_format_are_refused(size: int) -> None:
    with pytest.raises(ValueError):
        SeekableWriter(io.BytesIO(), size, 3)


def test_encode_table_is_what_read_table_reads() -> None:
    sizes = [(3, 10), (4, 0), (5, 7)]
    frames = [b"a" * 3, b"b" * 4, b"c" * 5]
    blob = b"".join(frames) + encode_table(sizes)
    table = table_of(blob)
    assert [(f.comp_offset, f.comp_size, f.offset, f.size) for f in table.frames] == \
        [(0, 3, 0, 10), (3, 4, 10, 0), (7, 5, 10, 7)]


# --- NAR streams ------------------------------------------------------------------------------

COMPRESSORS = {"zstd": zstandard.ZstdCompressor().compress, "xz": lzma.compress,
               "bzip2": bz2.compress, "gzip": gzip.compress, "none": lambda d: d}
NAR_HASH = nix32.format_sha256(hashlib.sha256(GOOD_TREE).digest())


@pytest.mark.parametrize("compression", list(COMPRESSORS))
def test_every_compression_parses_and_checks(compression: str) -> None:
    blob = COMPRESSORS[compression](GOOD_TREE)
    builder = ListingBuilder()
    stream = parse_checked(decompressed_chunks(io.BytesIO(blob), compression), builder,
                           len(GOOD_TREE), NAR_HASH)
    assert stream.size == len(GOOD_TREE) and stream.nar_hash() == NAR_HASH
    assert set(builder.root["entries"]) == {"bin", "readme"}


@pytest.mark.parametrize("compression", list(COMPRESSORS))
def test_truncated_or_damaged_files_are_corrupt_in_every_compression(compression: str) -> None:
    blob = COMPRESSORS[compression](GOOD_TREE)
    damaged = bytearray(blob)
    damaged[len(damaged) // 2] ^= 0x55
    for bad in (blob[:len(blob) // 2], blob[:-1], bytes(damaged)):
        with pytest.raises(CorruptError):
            parse_checked(decompressed_chunks(io.BytesIO(bad), compression), ListingBuilder(),
                          len(GOOD_TREE), NAR_HASH)


@pytest.mark.parametrize(("size", "nar_hash"), [
    (len(GOOD_TREE) + 8, NAR_HASH),  # the narinfo promises more
    (len(GOOD_TREE) - 8, NAR_HASH),  # or less
    (len(GOOD_TREE), nix32.format_sha256(hashlib.sha256(b"other").digest())),
])
def test_a_nar_that_is_not_the_narinfos_is_corrupt(size: int, nar_hash: str) -> None:
    with pytest.raises(CorruptError):
        parse_checked(iter([GOOD_TREE]), ListingBuilder(), size, nar_hash)


def test_the_stream_stops_at_its_limit_while_it_streams() -> None:
    pulled = []

    def endless() -> Iterator[bytes]:
        for _ in range(1000):  # "endless" to a stream allowed 250 bytes
            pulled.append(1)
            yield b"x" * 100

    s = NarStream(endless(), 250)
    with pytest.raises(CorruptError):
        s.drain()
    assert len(pulled) == 3


def test_reads_are_served_across_chunks_and_counted() -> None:
    chunks = [b"ab", b"", b"cdef", b"g"]
    s = NarStream(iter(chunks), 100)
    assert [s.read(3), s.read(1), s.read(10), s.read(1)] == [b"abc", b"d", b"efg", b""]
    assert s.size == 7 and s.nar_hash() == nix32.format_sha256(hashlib.sha256(b"abcdefg").digest())
    s.check(7, s.nar_hash())


def test_an_unreadable_compression_is_one_line() -> None:
    with pytest.raises(NarfsError, match="restore the path into the store through Nix"):
        decompressing(io.BytesIO(b""), "lzip")


def test_concatenated_zstd_frames_and_skippable_frames_read_as_one_stream() -> None:
    parts = [b"one " * 10, b"two " * 10]
    skip = struct.pack("<II", SKIPPABLE_MAGIC, 4) + b"SKIP"
    blob = zstandard.ZstdCompressor().compress(parts[0]) + skip + \
        zstandard.ZstdCompressor().compress(parts[1])
    assert b"".join(decompressed_chunks(io.BytesIO(blob), "zstd")) == b"".join(parts)
