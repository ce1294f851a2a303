"""The mount's read path below the kernel (narfs/reader.py), in-process: no Nix, no FUSE.

S3QL's t2_block_cache.py is the model: the caches are driven directly, over a real cache
directory in a tmp dir, with NARs built here. Each test takes milliseconds.
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import hashlib
import io
import lzma
import os
import random
import struct
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing
import zstandard

from hostile import GOOD_TREE, seekable_by_hand
from narfs import disklru, nix32, reader, zstdseek
from narfs.backend import LocalBackend, LocalFile
from narfs.cache import TMP_PREFIX, Cache
from narfs.catalog import Entry
from narfs.disklru import STALE_TMP, DiskLRU
from narfs.errors import CorruptError
from narfs.nar import listing_of
from narfs.reader import FrameCache, HotTier, Reader
from narfs.zstdseek import SeekableWriter

FRAME = 64  # small frames: a few hundred bytes span several


def nar_hash(data: bytes) -> str:
    return nix32.format_sha256(hashlib.sha256(data).digest())


def seekable(data: bytes, frame: int = FRAME) -> bytes:
    out = io.BytesIO()
    w = SeekableWriter(out, frame, 3)
    w.write(data)
    w.close()
    return out.getvalue()


COMPRESS: dict[str, tuple[str, str, Callable[[bytes], bytes]]] = {
    # kind → (narinfo Compression, file extension, compressor)
    "seekable": ("zstd", "zst", seekable),
    # Independent frames that declare their sizes, no seek table: Nix 2.35's zstd NARs.
    "zstd-frames": ("zstd", "zst", lambda d: b"".join(
        zstandard.ZstdCompressor().compress(d[i:i + FRAME]) for i in range(0, len(d), FRAME))),
    # One zstd frame without a content size: neither a seek table nor frame headers index it.
    "zstd-stream": ("zstd", "zst",
                    lambda d: zstandard.ZstdCompressor(write_content_size=False).compress(d)),
    "xz": ("xz", "xz", lzma.compress),
    "bzip2": ("bzip2", "bz2", bz2.compress),
    "gzip": ("gzip", "gz", gzip.compress),
    "none": ("none", "", lambda d: d),
}


def put(root: Path, data: bytes, kind: str = "seekable", blob: bytes | None = None,
        nar_size: int | None = None) -> Entry:
    """A cache entry for NAR `data` (its file holds `blob` when given: a lie to tell)."""
    compression, ext, compress = COMPRESS[kind]
    blob = compress(data) if blob is None else blob
    file_hash = nix32.encode(hashlib.sha256(blob).digest())
    url = f"nar/{file_hash}.nar" + (f".{ext}" if ext else "")
    (root / "nar").mkdir(exist_ok=True)
    (root / url).write_bytes(blob)
    h = nix32.encode(hashlib.sha256(data + kind.encode()).digest()[:20])
    return Entry(hash=h, name=f"{h}-t1", url=url, compression=compression,
                 file_size=len(blob), nar_size=len(data) if nar_size is None else nar_size,
                 nar_hash=nar_hash(data), references=[], archived=0.0, mtime_ns=0)


class VerifiedBackend(LocalBackend):
    """A backend whose files vouch for each byte, as a remote mount's signed frames do."""

    def open_nar(self, entry: Entry) -> LocalFile:
        f = super().open_nar(entry)
        f.verified = True
        return f


def make_reader(root: Path, frame_cache: int = 1 << 20, hot_limit: int = 1 << 20,
                max_open: int = 64, tokens: int = 4, verified: bool = False) -> Reader:
    hot = HotTier(str(root / ".narfs" / "hot"), hot_limit)
    backend = (VerifiedBackend if verified else LocalBackend)(Cache(str(root)))
    return Reader(backend, hot, frame_cache, trio.CapacityLimiter(tokens), max_open)


def fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


# --- FrameCache ------------------------------------------------------------------------------


COST = 30 + FrameCache.ENTRY_OVERHEAD  # what a 30-byte frame is charged


def test_frame_cache_stays_within_its_bound_and_drops_the_oldest_first() -> None:
    fc = FrameCache(3 * COST + 10)
    for i in range(10):
        fc.put(("n", i), bytes([i]) * 30)
        assert fc.size <= fc.limit
        assert fc.size == sum(len(v) + fc.ENTRY_OVERHEAD for v in fc._frames.values())
    assert list(fc._frames) == [("n", 7), ("n", 8), ("n", 9)]
    assert fc.get(("n", 6)) is None and fc.get(("n", 9)) == b"\x09" * 30


def test_frame_cache_keeps_what_was_used_last() -> None:
    fc = FrameCache(3 * COST)
    for k in "abc":
        fc.put((k,), k.encode() * 30)
    assert fc.get(("a",)) == b"a" * 30  # a is now the newest
    fc.put(("d",), b"d" * 30)
    assert fc.get(("b",)) is None, "the least recently used frame goes first"
    assert fc.get(("a",)) is not None and fc.get(("c",)) is not None


def test_frame_cache_refuses_a_frame_larger_than_itself_and_counts_a_key_once() -> None:
    fc = FrameCache(2 * COST)
    fc.put(("small",), b"s" * 60)
    fc.put(("huge",), b"h" * (2 * COST - fc.ENTRY_OVERHEAD + 1))
    assert fc.get(("huge",)) is None and fc.get(("small",)) == b"s" * 60, \
        "a frame that cannot fit must not flush the cache"
    fc.put(("small",), b"s" * 60)
    assert fc.size == 60 + fc.ENTRY_OVERHEAD


def test_tiny_frames_are_charged_what_holding_them_costs() -> None:
    fc = FrameCache(1 << 20)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for i in range(100_000):
            fc.put(("some-nar", "nar/x.nar.zst", "sha256:x", i), bytes([i & 0xFF]))
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert fc.size <= fc.limit
    assert held <= fc.limit, f"{held} bytes held for a bound of {fc.limit}"


# --- HotTier ---------------------------------------------------------------------------------


def fill(hot: HotTier, data: bytes, size: int | None = None,
         out: bytes | None = None) -> int:
    """open_sync for NAR `data`; the producer writes `out` (default: `data`) in two pieces."""
    out = data if out is None else out

    def produce(write: Callable[[bytes], None]) -> None:
        write(out[:len(out) // 2])
        write(out[len(out) // 2:])

    return hot.open_sync(nar_hash(data), len(data) if size is None else size, produce)


def hot_names(hot: HotTier) -> set[str]:
    return set(os.listdir(hot.dir))


def read_fd(fd: int) -> bytes:
    try:
        return os.pread(fd, 1 << 20, 0)
    finally:
        os.close(fd)


def test_hot_tier_evicts_least_recently_used_within_its_bound(tmp_path: Path) -> None:
    hot = HotTier(str(tmp_path), 100)
    nars = [bytes([i]) * 40 for i in range(4)]
    names = [nar_hash(d).split(":")[-1] + ".nar" for d in nars]
    assert read_fd(fill(hot, nars[0])) == nars[0]
    read_fd(fill(hot, nars[1]))
    assert read_fd(fill(hot, nars[0])) == nars[0]  # a hit: 0 becomes the newest
    assert hot.fills == 2
    read_fd(fill(hot, nars[2]))  # 120 > 100: the oldest used (1) goes
    assert hot_names(hot) == {names[0], names[2]} and hot.size == 80 <= hot.limit
    read_fd(fill(hot, nars[3]))
    assert hot_names(hot) == {names[2], names[3]} and hot.size == 80
    assert hot.fills == 4


def test_hot_tier_takes_a_nar_larger_than_itself_alone(tmp_path: Path) -> None:
    hot = HotTier(str(tmp_path), 100)
    read_fd(fill(hot, b"a" * 60))
    big = os.urandom(250)
    assert read_fd(fill(hot, big)) == big, "a NAR larger than the tier must still be readable"
    assert hot_names(hot) == {nar_hash(big).split(":")[-1] + ".nar"} and hot.size == 250
    read_fd(fill(hot, b"b" * 10))
    assert hot.size == 10, "the oversized NAR goes as soon as anything else comes in"


def test_an_evicted_file_stays_readable_through_an_open_descriptor(tmp_path: Path) -> None:
    hot = HotTier(str(tmp_path), 50)
    first = os.urandom(40)
    fd = fill(hot, first)
    read_fd(fill(hot, os.urandom(40)))
    assert len(hot_names(hot)) == 1
    assert read_fd(fd) == first


def test_hot_tier_restart_scan(tmp_path: Path) -> None:
    old = HotTier(str(tmp_path), 1000)
    nars = [os.urandom(100 + i) for i in range(3)]
    for d in nars:
        read_fd(fill(old, d))
    names = [nar_hash(d).split(":")[-1] + ".nar" for d in nars]
    now = time.time()
    for age, name in zip((10, 30, 20), names, strict=True):  # LRU order: 1, 2, 0
        os.utime(tmp_path / name, (now - age, now - age))
    stale = tmp_path / f"{TMP_PREFIX}1-2-stale.nar"
    live = tmp_path / f"{TMP_PREFIX}3-4-live.nar"
    for t in (stale, live):
        t.write_bytes(b"partial")
    os.utime(stale, (now - STALE_TMP - 60, now - STALE_TMP - 60))
    (tmp_path / ("x" * 52 + ".nar")).symlink_to("/etc/passwd")  # untrusted: not ours
    (tmp_path / ("y" * 52 + ".nar")).mkdir()
    (tmp_path / "notes.txt").write_bytes(b"z" * 500)

    hot = HotTier(str(tmp_path), 1000)
    assert list(hot._files) == [names[1], names[2], names[0]]
    assert hot.size == sum(len(d) for d in nars)
    assert not stale.exists(), "a temporary older than any live fill is removed"
    assert live.exists(), "a fresh temporary may be another mount's fill in progress"
    # Found files are hits, not fills; and the next fill evicts in the scanned order.
    assert read_fd(fill(hot, nars[0])) == nars[0] and hot.fills == 0
    hot.limit = 350
    read_fd(fill(hot, os.urandom(50)))
    assert names[1] not in hot_names(hot) and names[2] in hot_names(hot)
    assert hot.size <= hot.limit and (tmp_path / ("x" * 52 + ".nar")).is_symlink()


def test_a_limit_lowered_before_a_restart_is_kept_at_once(tmp_path: Path) -> None:
    old = HotTier(str(tmp_path), 1000)
    nars = [bytes([i]) * 100 for i in range(5)]
    for d in nars:
        read_fd(fill(old, d))
    now = time.time()
    for i, d in enumerate(nars):  # oldest use first
        name = tmp_path / (nar_hash(d).split(":")[-1] + ".nar")
        os.utime(name, (now - 100 + i, now - 100 + i))
    hot = HotTier(str(tmp_path), 250)
    assert hot.size == 200 and hot_names(hot) == {
        nar_hash(d).split(":")[-1] + ".nar" for d in nars[3:]}, "the newest used stay"
    read_fd(fill(hot, b"n" * 100))
    assert hot.size <= 250
    assert sum(os.path.getsize(tmp_path / n) for n in hot_names(hot)) == hot.size


@pytest.mark.parametrize("lie", ["longer", "shorter", "other-bytes"])
def test_a_stream_that_is_not_its_nar_leaves_nothing(tmp_path: Path, lie: str) -> None:
    hot = HotTier(str(tmp_path), 1000)
    data = os.urandom(100)
    out = {"longer": data + b"!", "shorter": data[:-1], "other-bytes": os.urandom(100)}[lie]
    with pytest.raises(CorruptError):
        fill(hot, data, out=out)
    assert hot_names(hot) == set() and hot.size == 0 and hot.fills == 0
    assert read_fd(fill(hot, data)) == data  # a later honest fill works


def test_a_stream_that_outgrows_its_nar_size_is_stopped_while_it_streams(tmp_path: Path) -> None:
    hot = HotTier(str(tmp_path), 1 << 20)
    written = []

    def endless(write: Callable[[bytes], None]) -> None:
        for _ in range(1000):
            write(b"x" * 100)
            written.append(100)

    with pytest.raises(CorruptError):
        hot.open_sync(nar_hash(b"x" * 150), 150, endless)
    assert sum(written) <= 200, "the fill stops at the first write past NarSize"
    assert hot_names(hot) == set()


def test_a_file_of_the_wrong_size_or_removed_by_another_mount_is_filled_again(
        tmp_path: Path) -> None:
    hot = HotTier(str(tmp_path), 1000)
    data = os.urandom(100)
    name = tmp_path / (nar_hash(data).split(":")[-1] + ".nar")
    read_fd(fill(hot, data))
    name.write_bytes(data[:50])  # damaged behind narfs's back
    assert read_fd(fill(hot, data)) == data and hot.fills == 2
    name.unlink()  # another mount of the same cache evicted it
    assert read_fd(fill(hot, data)) == data and hot.fills == 3
    assert hot.size == 100


@pytest.mark.parametrize("kind", ["symlink", "fifo", "directory"])
def test_a_hot_file_replaced_by_something_else_is_never_followed(tmp_path: Path,
                                                                 kind: str) -> None:
    hot = HotTier(str(tmp_path), 1000)
    data = os.urandom(100)
    name = tmp_path / (nar_hash(data).split(":")[-1] + ".nar")
    read_fd(fill(hot, data))
    name.unlink()
    if kind == "symlink":
        (tmp_path / "elsewhere").write_bytes(b"x" * 100)  # even of the right size
        name.symlink_to(tmp_path / "elsewhere")
    elif kind == "fifo":
        os.mkfifo(name)  # opening it for reading would wait for a writer forever
    else:
        name.mkdir()
    try:
        fd = fill(hot, data)
    except OSError:
        assert kind == "directory", "only a directory cannot be replaced by the fill"
        return
    assert read_fd(fd) == data and hot.fills == 2
    assert name.is_file() and not name.is_symlink()


def test_fills_from_many_threads_keep_the_books_and_the_bound(tmp_path: Path) -> None:
    hot = HotTier(str(tmp_path), 1000)
    nars = [bytes([i]) * (50 + 10 * (i % 7)) for i in range(40)]
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for j in range(30):
                d = nars[(k * 7 + j) % len(nars)]
                assert read_fd(fill(hot, d)) == d
        except BaseException as e:  # surfaced below: a thread's failure is the test's
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and not any(t.is_alive() for t in threads)
    on_disk = {n: os.path.getsize(tmp_path / n) for n in hot_names(hot)}
    assert on_disk == dict(hot._files), "the tier's books match the directory"
    assert hot.size == sum(on_disk.values()) <= hot.limit


def test_an_eviction_never_unlinks_a_file_another_thread_just_adopted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The race CI once hit in the test above: thread A renames its new copy of X into place,
    thread C's eviction of the old X unlinks it, then A books X: the books named a file that
    was gone. Forced here: A is held right after its rename while C adopts Y (which evicts X)."""
    lru = DiskLRU(str(tmp_path / "lru"), 100)

    def put(name: str, size: int) -> None:
        fd, tmp = lru.temporary(name)
        os.write(fd, b"x" * size)
        os.close(fd)
        lru.adopt(name, tmp, size)

    put("X", 60)
    renamed, go = threading.Event(), threading.Event()
    real = os.rename

    def rename(src: str, dst: str) -> None:
        real(src, dst)
        if dst.endswith("/X") and not renamed.is_set():
            renamed.set()
            go.wait(5)

    monkeypatch.setattr(disklru.os, "rename", rename)
    a = threading.Thread(target=put, args=("X", 60))
    a.start()
    assert renamed.wait(5)
    c = threading.Thread(target=put, args=("Y", 60))
    c.start()
    c.join(0.5)  # done by now if nothing keeps its eviction from the rename just made
    go.set()
    a.join(5)
    c.join(5)
    on_disk = {n: os.path.getsize(tmp_path / "lru" / n) for n in os.listdir(tmp_path / "lru")}
    assert on_disk == dict(lru._files) and lru.size == sum(on_disk.values()) <= 100


# --- Reader: every compression reads the same bytes --------------------------------------------


@pytest.mark.parametrize("kind", list(COMPRESS))
def test_reads_return_the_nar_bytes_for_every_compression(tmp_path: Path, kind: str) -> None:
    rng = random.Random(kind)
    data = rng.randbytes(300) + b"abc" * 200 + rng.randbytes(123)
    entry = put(tmp_path, data, kind)
    r = make_reader(tmp_path)
    ranges = [(0, 1), (0, len(data)), (63, 2), (64, 64), (100, 10_000), (len(data) - 1, 5),
              (len(data), 5), (len(data) + 100, 5), (5, 0),
              *((rng.randrange(len(data)), rng.randrange(1, 400)) for _ in range(30))]

    async def main() -> None:
        for offset, size in ranges:
            assert await r.read(entry, offset, size) == data[offset:offset + size], \
                (offset, size)

    trio.run(main)
    if kind in ("seekable", "zstd-frames"):
        assert r.stats.frames_decompressed == len(data) // FRAME + 1, \
            "each frame is decompressed once (whole: a local file), then served from the " \
            "frame cache"
        assert r.hot.fills == 0
    elif kind != "none":
        assert r.hot.fills == 1
    r.close()


@pytest.mark.parametrize("kind", ["seekable", "none"])
def test_a_listing_is_built_only_from_the_nar_its_narinfo_vouches_for(tmp_path: Path,
                                                                      kind: str) -> None:
    entry = put(tmp_path, GOOD_TREE, kind)
    other = GOOD_TREE.replace(b"good data", b"evil data")
    # The narinfo vouches for GOOD_TREE's bytes, the file holds others of the same size.
    liar = dataclasses.replace(put(tmp_path, other, kind), nar_hash=entry.nar_hash)
    r = make_reader(tmp_path)

    async def main() -> None:
        assert await r.listing(entry) == listing_of(io.BytesIO(GOOD_TREE), len(GOOD_TREE))
        with pytest.raises(CorruptError):
            await r.listing(liar)

    trio.run(main)
    assert all(s.users == 0 for s in r._sources.values())


def test_listing_of_a_hot_tier_nar_reuses_the_fill(tmp_path: Path) -> None:
    entry = put(tmp_path, GOOD_TREE, "xz")
    r = make_reader(tmp_path)

    async def main() -> dict:
        root = await r.listing(entry)
        assert await r.read(entry, 0, 13) == GOOD_TREE[:13]
        return root

    assert trio.run(main) == listing_of(io.BytesIO(GOOD_TREE), len(GOOD_TREE))
    assert r.hot.fills == 1 and r.stats.nar_parses == 1


# --- Reader: single-flight ---------------------------------------------------------------------


def test_concurrent_reads_of_one_frame_decompress_it_once(tmp_path: Path) -> None:
    data = os.urandom(FRAME * 4)
    entry = put(tmp_path, data)
    r = make_reader(tmp_path, tokens=8)

    async def main() -> list[bytes]:
        got: list[bytes] = []

        async def one() -> None:
            got.append(await r.read(entry, FRAME + 3, 10))

        async with trio.open_nursery() as n:
            for _ in range(12):
                n.start_soon(one)
        return got

    assert trio.run(main) == [data[FRAME + 3:FRAME + 13]] * 12
    assert r.stats.frames_decompressed == 1
    assert r.stats.frame_hits + 1 <= 12 and not r._inflight


def test_concurrent_reads_of_a_non_seekable_nar_fill_the_hot_tier_once(tmp_path: Path) -> None:
    data = os.urandom(5000)
    entry = put(tmp_path, data, "xz")
    r = make_reader(tmp_path, tokens=8)

    async def main() -> None:
        async with trio.open_nursery() as n:
            for i in range(10):
                n.start_soon(r.read, entry, i * 100, 100)

    trio.run(main)
    assert r.hot.fills == 1 and len(r._sources) == 1 and not r._inflight


def test_a_failed_load_is_shared_by_its_waiters_and_retried_later(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(FRAME * 3)
    blob = bytearray(seekable(data))
    blob[20] ^= 0xFF  # damage the first frame's compressed bytes
    entry = put(tmp_path, data, blob=bytes(blob))
    r = make_reader(tmp_path, tokens=8)
    errors: list[Exception] = []
    attempts = []
    real = zstdseek.decompress_frame

    def counted(f, frame, dctx=None, upto=None):
        attempts.append(frame.offset)
        return real(f, frame, dctx, upto)

    monkeypatch.setattr(reader.zstdseek, "decompress_frame", counted)

    async def main() -> None:
        async def one() -> None:
            try:
                await r.read(entry, 0, 10)
            except CorruptError as e:
                errors.append(e)

        with trio.fail_after(10):
            async with trio.open_nursery() as n:
                for _ in range(5):
                    n.start_soon(one)
        assert await r.read(entry, FRAME * 2, 5) == data[FRAME * 2:FRAME * 2 + 5]

        with pytest.raises(CorruptError):  # a later read tries again (the file may be fixed)
            await r.read(entry, 0, 10)

    trio.run(main)
    assert len(errors) == 5, "every reader of the damaged frame gets the error"
    assert attempts == [0, FRAME * 2, 0], "concurrent readers share one attempt"
    assert not r._inflight and r.frames.size == FRAME + r.frames.ENTRY_OVERHEAD


def test_a_read_in_the_middle_of_a_frame_decompresses_it_only_to_the_read_s_end(
        tmp_path: Path) -> None:
    """A cold read of a small file deep in a big frame stops decompressing where the read
    ends; reads going on through that frame then decompress it whole, once."""
    big = 1 << 20
    data = os.urandom(big * 2)
    entry = put(tmp_path, data, blob=seekable(data, big))
    r = make_reader(tmp_path, frame_cache=8 << 20, verified=True)

    async def main() -> None:
        assert await r.read(entry, 300_000, 50_000) == data[300_000:350_000]
        assert r.stats.bytes_decompressed == 350_000, "stopped at the end of the read"
        assert await r.read(entry, 320_000, 1000) == data[320_000:321_000]  # within it: kept
        assert r.stats.bytes_decompressed == 350_000
        for offset in range(350_000, big * 2, 128 << 10):  # on through both frames, as cat
            assert await r.read(entry, offset, 128 << 10) == data[offset:offset + (128 << 10)]
        assert r.cached(entry, 0, big * 2) == data

        # concurrent reads of one fresh frame, one ending early: both get their bytes
        r2 = make_reader(tmp_path, frame_cache=8 << 20, verified=True)
        got: dict[str, bytes] = {}

        async def read(name: str, offset: int, size: int) -> None:
            got[name] = await r2.read(entry, offset, size)

        async with trio.open_nursery() as n:
            n.start_soon(read, "short", 10, 10)
            n.start_soon(read, "long", big - 100, 200)
        assert got == {"short": data[10:20], "long": data[big - 100:big + 100]}
        r2.close()

    trio.run(main)
    # each frame twice at most: in part (to the end of the first read in it), then whole
    assert r.stats.frames_decompressed == 4
    assert r.stats.bytes_decompressed < 350_000 + big * 2 + (128 << 10)
    r.close()
    local = make_reader(tmp_path, frame_cache=8 << 20)  # only a frame's end checks its bytes
    assert trio.run(local.read, entry, 300_000, 50_000) == data[300_000:350_000]
    assert local.stats.bytes_decompressed == big
    local.close()


def test_a_read_over_many_frames_decompresses_them_in_one_worker_call(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(FRAME * 20)
    entry = put(tmp_path, data)
    r = make_reader(tmp_path, tokens=8)
    calls: list[list[int]] = []
    real = reader.Source.frames_sync

    def counted(self: reader.Source, indices: list[int], upto: int | None = None) -> tuple:
        calls.append(list(indices))
        return real(self, indices, upto)

    monkeypatch.setattr(reader.Source, "frames_sync", counted)

    async def main() -> None:
        assert await r.read(entry, 10, FRAME * 5) == data[10:10 + FRAME * 5]
        async with trio.open_nursery() as n:  # overlapping reads share frames 5 and 6
            n.start_soon(r.read, entry, FRAME * 5, FRAME * 4)
            n.start_soon(r.read, entry, FRAME * 5, FRAME * 2)

    trio.run(main)
    assert calls[0] == list(range(6)), "one thread hop for the read's six frames"
    assert sorted(i for c in calls for i in c) == list(range(9)), "each frame decompressed once"
    assert r.stats.frames_decompressed == 9


def test_only_the_damaged_frame_of_a_batch_fails_its_waiters(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(FRAME * 3)
    blob = bytearray(seekable(data))
    table = zstdseek.read_table(io.BytesIO(bytes(blob)), len(blob))
    assert table is not None
    blob[table.frames[1].comp_offset + 6] ^= 0xFF  # frame 1's compressed bytes
    entry = put(tmp_path, data, blob=bytes(blob))
    r = make_reader(tmp_path, tokens=8)
    entered, release = threading.Event(), threading.Event()
    real = zstdseek.decompress_frame

    def gated(f, frame, dctx=None, upto=None):  # the batch's first frame waits for the test
        if not entered.is_set():
            entered.set()
            assert release.wait(10), "the test never released the batch"
        return real(f, frame, dctx, upto)

    monkeypatch.setattr(reader.zstdseek, "decompress_frame", gated)

    async def main() -> None:
        got: dict[str, object] = {}

        async def batch() -> None:
            try:
                await r.read(entry, 0, FRAME * 3)
            except CorruptError as e:
                got["batch"] = e

        async def waiter(name: str, offset: int) -> None:
            try:
                got[name] = await r.read(entry, offset, 4)
            except CorruptError as e:
                got[name] = e

        async with trio.open_nursery() as n:
            n.start_soon(batch)
            assert await trio.to_thread.run_sync(entered.wait, 10)
            n.start_soon(waiter, "frame 1", FRAME + 1)
            n.start_soon(waiter, "frame 2", FRAME * 2 + 1)
            await trio.testing.wait_all_tasks_blocked()
            release.set()
        assert isinstance(got["batch"], CorruptError)
        assert isinstance(got["frame 1"], CorruptError), "the damaged frame's waiter shares it"
        assert got["frame 2"] == data[FRAME * 2 + 1:FRAME * 2 + 5], \
            "a frame the batch never reached is decompressed by its own reader"

    trio.run(main)
    assert not r._inflight


# --- Reader: lying inputs ----------------------------------------------------------------------


def table_lie(blob: bytes, edit: Callable[[list[list[int]]], None]) -> bytes:
    """`blob` with its seek table's (compressed, decompressed) sizes edited."""
    end = len(blob) - 9
    n = struct.unpack_from("<I", blob, end)[0]
    start = end - n * 8
    rows = [list(struct.unpack_from("<II", blob, start + 8 * i)) for i in range(n)]
    edit(rows)
    return blob[:start] + b"".join(struct.pack("<II", *r) for r in rows) + blob[end:]


def swap_sizes(rows: list[list[int]]) -> None:
    rows[0][1] += 7
    rows[1][1] -= 7  # NarSize still adds up


def shift_comp(rows: list[list[int]]) -> None:
    rows[0][0] += 5
    rows[1][0] -= 5


def grow(rows: list[list[int]]) -> None:
    rows[-1][1] += 1


@pytest.mark.parametrize("lie", [swap_sizes, shift_comp])
def test_a_lying_seek_table_costs_the_frames_it_lies_about(tmp_path: Path,
                                                          lie: Callable) -> None:
    f = 2 * FRAME  # the lie moves 7 bytes: every frame but the last stays over MIN_FRAME
    data = os.urandom(f * 3)
    entry = put(tmp_path, data, blob=table_lie(seekable(data, f), lie))
    r = make_reader(tmp_path)

    async def main() -> None:
        # Frame 0 itself is intact when only its compressed length lies (zstd stops at the
        # frame's end): its bytes may be served, but never wrong ones.
        for offset in (0, f + 1):
            try:
                assert await r.read(entry, offset, 4) == data[offset:offset + 4]
            except CorruptError:
                continue
            assert lie is shift_comp and offset == 0
        with pytest.raises(CorruptError):
            await r.read(entry, f + 1, 4)
        assert await r.read(entry, f * 2, f) == data[f * 2:]
        assert r.hot.fills == 0, "read frame by frame"

    trio.run(main)


@pytest.mark.parametrize("case", ["table-longer-than-nar-size", "nar-size-lies",
                                  "uncompressed-size-lies", "hot-hash-lies",
                                  "frames-past-the-data"])
def test_a_nar_that_disagrees_with_its_narinfo_is_corrupt(tmp_path: Path, case: str) -> None:
    data = os.urandom(FRAME * 3)
    entry = {
        "table-longer-than-nar-size": lambda: put(tmp_path, data,
                                                  blob=table_lie(seekable(data), grow)),
        "nar-size-lies": lambda: put(tmp_path, data, nar_size=len(data) - 1),
        "uncompressed-size-lies": lambda: put(tmp_path, data, "none", nar_size=len(data) + 1),
        "hot-hash-lies": lambda: put(tmp_path, data, "xz", blob=lzma.compress(data[::-1])),
        "frames-past-the-data": lambda: put(tmp_path, data, blob=table_lie(
            seekable(data), lambda rows: rows.append([1, 1]))),
    }[case]()
    r = make_reader(tmp_path)

    async def main() -> None:
        with pytest.raises(CorruptError):
            await r.read(entry, 0, 4)
        assert not r._sources and not r._inflight

    trio.run(main)
    assert os.listdir(r.hot.dir) == []


@pytest.mark.parametrize("kind", ["zstd-stream", "xz", "bzip2", "gzip"])
def test_a_damaged_non_seekable_nar_is_corrupt_and_leaves_the_hot_tier_empty(
        tmp_path: Path, kind: str) -> None:
    data = b"".join(b"line %d of a compressible NAR\n" % i for i in range(300))
    blob = bytearray(COMPRESS[kind][2](data))
    blob[len(blob) // 3] ^= 0x55  # inside the compressed data, not a trailing checksum
    entry = put(tmp_path, data, kind, blob=bytes(blob))
    r = make_reader(tmp_path)

    async def main() -> None:
        with pytest.raises(CorruptError):
            await r.read(entry, 0, 4)

    trio.run(main)
    assert os.listdir(r.hot.dir) == [] and r.hot.size == 0


def test_a_truncated_uncompressed_nar_is_corrupt_at_the_read(tmp_path: Path) -> None:
    data = os.urandom(500)
    entry = put(tmp_path, data, "none")
    r = make_reader(tmp_path)

    async def main() -> None:
        assert await r.read(entry, 0, 10) == data[:10]  # opened while whole
        os.truncate(tmp_path / entry.url, 300)
        assert await r.read(entry, 100, 10) == data[100:110]
        with pytest.raises(CorruptError):
            await r.read(entry, 295, 10)

    trio.run(main)


# --- Reader: Source lifetime -------------------------------------------------------------------


def test_an_evicted_source_closes_only_after_its_read_in_flight(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = os.urandom(FRAME * 2), os.urandom(FRAME * 2)
    ea, eb = put(tmp_path, a), put(tmp_path, b)
    r = make_reader(tmp_path, max_open=1)
    entered, release = threading.Event(), threading.Event()
    real = zstdseek.decompress_frame

    def gated(f, frame, dctx=None, upto=None):  # the first frame read waits until the test says so
        if not entered.is_set():
            entered.set()
            assert release.wait(10), "the test never released the read"
        return real(f, frame, dctx, upto)

    monkeypatch.setattr(reader.zstdseek, "decompress_frame", gated)

    async def main() -> None:
        got: list[bytes] = []

        async def read_a() -> None:
            got.append(await r.read(ea, 1, 10))

        async with trio.open_nursery() as n:
            n.start_soon(read_a)
            try:
                assert await trio.to_thread.run_sync(entered.wait, 10)
                src_a = r._sources[r.key(ea)]
                assert src_a.users == 1
                assert await r.read(eb, 0, 5) == b[:5]  # opens b: a is evicted (max_open 1)
                assert list(r._sources) == [r.key(eb)] and src_a.retired
                assert not src_a.closed and fd_open(src_a.file.fd), \
                    "closed under a read in flight"
            finally:
                release.set()
        assert got == [a[1:11]]
        assert src_a.closed and src_a.users == 0

    trio.run(main)
    r.close()


def test_an_idle_evicted_source_is_closed_at_once_and_close_closes_all(tmp_path: Path) -> None:
    entries = [put(tmp_path, os.urandom(100 + i), "none") for i in range(3)]
    r = make_reader(tmp_path, max_open=2)

    opened = []

    async def main() -> None:
        for e in entries:
            await r.read(e, 0, 1)
            opened.append(r._sources[r.key(e)])

    trio.run(main)
    assert opened[0].retired and opened[0].closed and len(r._sources) == 2
    fds = [s.file.fd for s in opened[1:]]
    assert all(map(fd_open, fds))
    r.close()
    assert not r._sources and all(s.closed for s in opened)
    assert not any(map(fd_open, fds))


# --- Reader: reads cost what they ask for (issue 11) --------------------------------------------


def small_reads(r: Reader, entry: Entry, data: bytes, count: int, size: int) -> None:
    rng = random.Random(count)

    async def main() -> None:
        for _ in range(count):
            offset = rng.randrange(len(data))
            assert await r.read(entry, offset, size) == data[offset:offset + size]

    trio.run(main)


def test_a_frame_larger_than_the_frame_cache_is_decompressed_once(tmp_path: Path) -> None:
    data = os.urandom(64 << 10)
    entry = put(tmp_path, data, blob=seekable(data, frame=len(data)))  # one 64 KiB frame
    r = make_reader(tmp_path, frame_cache=16 << 10)
    small_reads(r, entry, data, 1000, 512)
    assert r.stats.bytes_decompressed == len(data), \
        "the frame cannot stay in the frame cache: it is decompressed once, into the hot tier"
    assert r.stats.frames_decompressed == 0 and r.hot.fills == 1 and r.frames.size == 0
    r.close()


def test_frames_the_frame_cache_holds_are_read_one_at_a_time(tmp_path: Path) -> None:
    data = os.urandom(64 << 10)
    entry = put(tmp_path, data, blob=seekable(data, frame=8 << 10))
    r = make_reader(tmp_path, frame_cache=16 << 10)
    small_reads(r, entry, data, 200, 512)
    assert r.hot.fills == 0 and r.stats.frames_decompressed >= 8
    assert r.frames.size <= 16 << 10
    r.close()


@pytest.mark.parametrize("frames, seekable_", [(3000, True), (4000, False)])
def test_a_seek_table_is_held_compactly_within_its_share_of_memory(
        tmp_path: Path, frames: int, seekable_: bool) -> None:
    data = os.urandom(frames * FRAME)
    entry = put(tmp_path, data)
    # 4 MiB of frame cache, 64 open NARs: 64 KiB of table each, 3276 frames.
    r = make_reader(tmp_path, frame_cache=4 << 20)
    small_reads(r, entry, data, 50, 7)
    if seekable_:
        assert r.stats.table_bytes == zstdseek.TABLE_BYTES_PER_FRAME * frames + 8
        assert r.hot.fills == 0
    else:
        assert r.stats.table_bytes == 0 and r.hot.fills == 1
    assert r.stats.table_bytes <= (4 << 20) // r.max_open
    r.close()
    assert r.stats.table_bytes == 0, "a closed NAR's table is let go"


@pytest.mark.parametrize("tiny", ["one-byte", "empty"])
def test_a_table_of_tiny_frames_goes_through_the_hot_tier(tmp_path: Path, tiny: str) -> None:
    n = 20_000  # a table well within its share of the frame cache
    if tiny == "one-byte":
        data = os.urandom(n)
        blob = seekable_by_hand(data, 1)
    else:  # empty frames between two real ones: a read across them covers them all
        data = os.urandom(2 * FRAME)
        halves = [zstandard.ZstdCompressor().compress(data[i:i + FRAME]) for i in (0, FRAME)]
        empty = zstandard.ZstdCompressor().compress(b"")
        blob = halves[0] + empty * n + halves[1] + zstdseek.encode_table(
            [(len(halves[0]), FRAME), *[(len(empty), 0)] * n, (len(halves[1]), FRAME)])
    entry = put(tmp_path, data, blob=blob)
    r = make_reader(tmp_path, frame_cache=64 << 20)

    async def main() -> None:
        assert await r.read(entry, 0, len(data)) == data

    trio.run(main)
    assert r.stats.frames_decompressed == 0 and r.hot.fills == 1, \
        "a read must not decompress thousands of frames for a few bytes each"
    r.close()


MILLION = 1 << 20


@pytest.fixture(scope="module")
def million(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    data = os.urandom(MILLION)
    return data, seekable_by_hand(data, 1)


def test_a_seek_table_of_a_million_frames_is_checked_but_never_held(
        tmp_path: Path, million: tuple[bytes, bytes]) -> None:
    data, blob = million
    entry = put(tmp_path, data, blob=blob)
    r = make_reader(tmp_path, frame_cache=1 << 20)
    tracemalloc.start()
    try:
        small_reads(r, entry, data, 100, 64)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # The bound: the table's share of the frame cache (here 16 KiB, 819 frames: not enough, so
    # the NAR is read once into the hot tier) plus one chunk of table entries being checked.
    # A list of Frame objects took ~180 MiB here; compact arrays without a bound 20 MiB.
    assert peak < 8 << 20, peak
    assert r.stats.table_bytes == 0 and r.hot.fills == 1
    assert r.stats.bytes_decompressed == len(data)
    r.close()


def table_entry(blob: bytes, i: int, c: int | None = None, d: int | None = None) -> bytes:
    n = struct.unpack_from("<I", blob, len(blob) - 9)[0]
    at = len(blob) - 9 - (n - i) * 8
    old_c, old_d = struct.unpack_from("<II", blob, at)
    return blob[:at] + struct.pack("<II", old_c if c is None else c,
                                   old_d if d is None else d) + blob[at + 8:]


@pytest.mark.parametrize("lie", ["size", "compressed-size", "impossible", "claims-more"])
def test_a_lying_table_of_a_million_frames_is_corrupt(
        tmp_path: Path, million: tuple[bytes, bytes], lie: str) -> None:
    data, blob = million
    blob = {
        "size": lambda: table_entry(blob, 700_000, d=2),  # sums to NarSize + 1
        "compressed-size": lambda: table_entry(blob, 300_000, c=11),  # past the data
        "impossible": lambda: table_entry(blob, 900_000, c=0),
        "claims-more": lambda: blob[:-9] + zstdseek.FOOTER.pack(
            MILLION * 4, 0, zstdseek.SEEKABLE_MAGIC),
    }[lie]()
    entry = put(tmp_path, data, blob=blob)
    for frame_cache in (1 << 20, 64 << 20):  # not held, and held
        r = make_reader(tmp_path, frame_cache=frame_cache)

        async def main(r: Reader) -> None:
            with pytest.raises(CorruptError):
                await r.read(entry, 0, 4)

        trio.run(main, r)
        assert r.stats.table_bytes == 0 and r.hot.fills == 0 and not os.listdir(r.hot.dir)
