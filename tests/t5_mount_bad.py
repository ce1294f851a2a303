"""Issue 3: hostile or damaged cache entries cost EIO or their own absence, never the mount.

One cache holds a good path beside one path per kind of damage; one mount serves them all. Each
test checks its case, then that the mount process is alive and the good path still reads.
"""

from __future__ import annotations

import hashlib
import io
import lzma
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from mounting import Mount, mounted

from conftest import Narfs
from hostile import seekable_by_hand
from narfs import listing, nar, nix32
from narfs.nar import encode_str
from narfs.narinfo import NarInfo
from narfs.zstdseek import SeekableWriter

pytestmark = pytest.mark.usefixtures("fuse_mode")  # conftest: fast and stock


def _s(*tokens: bytes) -> bytes:
    return b"".join(encode_str(t) for t in tokens)


def regular(content: bytes) -> bytes:
    return _s(b"(", b"type", b"regular", b"contents") + encode_str(content) + _s(b")")


def directory(entries: list[tuple[bytes, bytes]]) -> bytes:
    """A directory node with entries exactly as given: unsorted, duplicated, unsafe."""
    body = b"".join(_s(b"entry", b"(", b"name") + encode_str(name) + _s(b"node") + node
                    + _s(b")") for name, node in entries)
    return _s(b"(", b"type", b"directory") + body + _s(b")")


def make_nar(node: bytes) -> bytes:
    return encode_str(b"nix-archive-1") + node


A = os.urandom(64 << 10)
B = os.urandom(64 << 10)
GOOD = make_nar(directory([(b"a", regular(A)), (b"b", regular(B))]))
UNSAFE = {
    "dotdot": [(b"..", regular(b"x"))],
    "dot": [(b".", regular(b"x"))],
    "slash": [(b"a/b", regular(b"x"))],
    "empty": [(b"", regular(b"x"))],
    "nul": [(b"a\0b", regular(b"x"))],
    "duplicate": [(b"a", regular(b"x")), (b"a", regular(b"y"))],
    "unsorted": [(b"b", regular(b"x")), (b"a", regular(b"y"))],
}


class Writer:
    """Entries written straight into a cache dir, as a hostile or broken writer would."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache

    def publish(self, name: str, raw: bytes, compression: str = "none",
                ls: dict | None = None, url: str | None = None, frame: int = 16 << 10,
                damage: object = None, blob: bytes | None = None) -> tuple[str, Path]:
        """`blob`: the NAR file's bytes, when made by hand (compressed as `compression`)."""
        h = nix32.encode(os.urandom(20))
        if blob is not None:
            data = blob
        elif compression == "zstd":
            out = io.BytesIO()
            w = SeekableWriter(out, frame, 3)
            w.write(raw)
            w.close()
            data = out.getvalue()
        elif compression == "xz":
            data = lzma.compress(raw)
        else:
            data = raw
        if damage is not None:
            data = damage(data)  # type: ignore[operator]
        ext = {"zstd": ".zst", "xz": ".xz", "none": ""}[compression]
        file_hash = nix32.encode(hashlib.sha256(data).digest())
        nar_file = self.cache / "nar" / f"{file_hash}.nar{ext}"
        nar_file.write_bytes(data)
        info = NarInfo(store_path=f"/nix/store/{h}-{name}", url=url or f"nar/{nar_file.name}",
                       compression=compression, file_hash=f"sha256:{file_hash}",
                       file_size=len(data),
                       nar_hash=nix32.format_sha256(hashlib.sha256(raw).digest()),
                       nar_size=len(raw))
        text = info.render()
        if url is not None:  # narinfo.render would not stop it, but a real writer might lie
            text = text.replace(f"URL: {info.url}", f"URL: {url}")
        if ls is not None:
            (self.cache / f"{h}.ls").write_bytes(listing.render(ls))
        (self.cache / f"{h}.narinfo").write_text(text)
        return f"{h}-{name}", nar_file


def flip(offset_in_data: int):
    def damage(data: bytes) -> bytes:
        b = bytearray(data)
        b[offset_in_data] ^= 0xFF
        return bytes(b)
    return damage


def lie_about_frames(data: bytes) -> bytes:
    """Move one byte of decompressed size from frame 1 to frame 2: totals still agree."""
    nframes = struct.unpack_from("<I", data, len(data) - 9)[0]
    table = len(data) - 9 - nframes * 8
    b = bytearray(data)
    c1, d1 = struct.unpack_from("<II", b, table + 8)
    c2, d2 = struct.unpack_from("<II", b, table + 16)
    struct.pack_into("<II", b, table + 8, c1, d1 - 1)
    struct.pack_into("<II", b, table + 16, c2, d2 + 1)
    return bytes(b)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory, fuse_mode: str
            ) -> Iterator[tuple[Mount, dict[str, str]]]:
    n = Narfs(tmp_path_factory.mktemp("narfs"))
    n("init", "--cache", str(n.cache), "--secret-key", str(n.key))
    w = Writer(n.cache)
    good_ls = nar.listing_of(io.BytesIO(GOOD))
    names: dict[str, str] = {}
    names["good"], _ = w.publish("good", GOOD, "zstd", good_ls)
    # Flip a byte in the second half of the compressed data: the frames holding `b`.
    names["flipped"], _ = w.publish("flipped", GOOD, "zstd", good_ls,
                                    damage=lambda d: flip(len(d) * 3 // 4)(d))
    names["truncated"], _ = w.publish("truncated", GOOD, "zstd", good_ls,
                                      damage=lambda d: d[: len(d) // 2])
    names["lying-table"], _ = w.publish("lying-table", GOOD, "zstd", good_ls,
                                        damage=lie_about_frames)
    names["xz-flipped"], _ = w.publish("xz-flipped", GOOD, "xz", good_ls,
                                       damage=lambda d: flip(len(d) // 2)(d))
    names["url-outside"], _ = w.publish("url-outside", GOOD, "none", good_ls,
                                        url="nar/../../../etc/passwd")
    names["bad-ls"], _ = w.publish("bad-ls", GOOD, "zstd", {
        "type": "directory", "entries": {"..": {"type": "regular", "size": 1,
                                                "narOffset": 0}}})
    for kind, entries in UNSAFE.items():
        names[kind], _ = w.publish(f"unsafe-{kind}", make_nar(directory(entries)), "none")
    with mounted(n, tmp_path_factory.mktemp("mnt") / "mnt") as m:
        yield m, names


def still_fine(m: Mount, names: dict[str, str]) -> None:
    assert m.alive(), m.log()
    assert names["good"] in os.listdir(m.path)
    assert (m / names["good"] / "a").read_bytes() == A
    assert (m / names["good"] / "b").read_bytes() == B


def expect_eio(path: Path) -> None:
    with pytest.raises(OSError) as e:
        path.read_bytes()
    assert e.value.errno == 5, e.value


def test_flipped_bytes_fail_only_the_damaged_file(hostile: tuple[Mount, dict[str, str]]) -> None:
    m, names = hostile
    d = m / names["flipped"]
    assert (d / "a").read_bytes() == A  # frames before the damage decompress fine
    expect_eio(d / "b")
    assert f"/nix/store/{names['flipped']}" in m.log()
    still_fine(m, names)


def test_truncated_nar(hostile: tuple[Mount, dict[str, str]]) -> None:
    m, names = hostile
    assert sorted(os.listdir(m / names["truncated"])) == ["a", "b"]  # the listing is fine
    expect_eio(m / names["truncated"] / "b")
    still_fine(m, names)


def test_lying_seek_table(hostile: tuple[Mount, dict[str, str]]) -> None:
    m, names = hostile
    expect_eio(m / names["lying-table"] / "a")  # frames 1 and 2 hold bytes of `a`
    line = next(ln for ln in m.log().splitlines() if names["lying-table"] in ln)
    assert "seek table" in line
    still_fine(m, names)


def test_damaged_xz_nar_is_not_kept_in_the_hot_tier(hostile: tuple[Mount, dict[str, str]]
                                                    ) -> None:
    m, names = hostile
    expect_eio(m / names["xz-flipped"] / "a")
    assert not list((m.narfs.cache / ".narfs" / "hot").glob("*.nar"))
    still_fine(m, names)


def test_narinfo_url_outside_the_cache_is_left_out(hostile: tuple[Mount, dict[str, str]]
                                                   ) -> None:
    m, names = hostile
    assert names["url-outside"] not in os.listdir(m.path)
    assert not (m / names["url-outside"]).exists()
    assert "points outside the cache" in m.log()
    still_fine(m, names)


def test_unsafe_listing_falls_back_to_the_nar(hostile: tuple[Mount, dict[str, str]]) -> None:
    m, names = hostile
    assert (m / names["bad-ls"] / "b").read_bytes() == B
    assert "unsafe entry" in m.log()
    still_fine(m, names)


@pytest.mark.parametrize("kind", sorted(UNSAFE))
def test_unsafe_names_leave_the_path_out(hostile: tuple[Mount, dict[str, str]],
                                         kind: str) -> None:
    m, names = hostile
    assert names[kind] not in os.listdir(m.path)
    with pytest.raises(OSError) as e:
        os.listdir(m / names[kind])
    assert e.value.errno == 5
    assert f"{names[kind]}: left out of the mount" in m.log()
    still_fine(m, names)


# --- Issue 11: reads cost what they ask for -----------------------------------------------------

FRAME_CACHE_MB = 1  # the configuration's smallest: a NAR's share of it for its seek table 16 KiB
BIG = os.urandom(4 << 20)
BIG_NAR = make_nar(directory([(b"big", regular(BIG))]))
# A million 64-byte frames (MIN_FRAME: small, not too small), of 256 kinds to compress fast.
_POOL = [os.urandom(64) for _ in range(256)]
MANY = b"".join(map(_POOL.__getitem__, os.urandom(1 << 20)))
MANY_NAR = make_nar(directory([(b"many", regular(MANY))]))


def lie_at_the_end(blob: bytes) -> bytes:
    """One more decompressed byte in the last frame's table entry: the table no longer sums to
    NarSize (found only by reading the whole table)."""
    b = bytearray(blob)
    c, d = struct.unpack_from("<II", b, len(b) - 17)
    struct.pack_into("<II", b, len(b) - 17, c, d + 1)
    return bytes(b)


@pytest.fixture(scope="module")
def costly(tmp_path_factory: pytest.TempPathFactory, fuse_mode: str
           ) -> Iterator[tuple[Mount, dict[str, str]]]:
    n = Narfs(tmp_path_factory.mktemp("narfs"))
    n("init", "--cache", str(n.cache), "--secret-key", str(n.key))
    n.config.write_text(n.config.read_text() + f"frame_cache_mb = {FRAME_CACHE_MB}\n")
    w = Writer(n.cache)
    many = seekable_by_hand(MANY_NAR, 64)
    names = {
        # One 4 MiB frame: four times the frame cache.
        "huge-frame": w.publish("huge-frame", BIG_NAR, "zstd", nar.listing_of(io.BytesIO(BIG_NAR)),
                                frame=8 << 20)[0],
        "million-frames": w.publish("million-frames", MANY_NAR, "zstd",
                                    nar.listing_of(io.BytesIO(MANY_NAR)), blob=many)[0],
        "million-lies": w.publish("million-lies", MANY_NAR, "zstd",
                                  nar.listing_of(io.BytesIO(MANY_NAR)),
                                  blob=lie_at_the_end(many))[0],
    }
    with mounted(n, tmp_path_factory.mktemp("mnt") / "mnt") as m:
        yield m, names


def small_reads(path: Path, want: bytes, count: int) -> None:
    """`count` 4 KiB reads spread over the file, each of pages the kernel has not cached."""
    fd = os.open(path, os.O_RDONLY)
    try:
        step = len(want) // count // 4096 * 4096
        for i in range(count):
            assert os.pread(fd, 4096, i * step) == want[i * step:i * step + 4096], i
    finally:
        os.close(fd)


def test_a_frame_larger_than_the_frame_cache_is_decompressed_once(
        costly: tuple[Mount, dict[str, str]]) -> None:
    m, names = costly
    before = m.stats()
    small_reads(m / names["huge-frame"] / "big", BIG, 200)
    after = m.stats()
    # Without the hot tier each read (or readahead) decompressed the whole 4 MiB frame again.
    assert after["bytes_decompressed"] - before["bytes_decompressed"] <= len(BIG_NAR), after
    assert after["frames_decompressed"] == before["frames_decompressed"], after
    assert after["hot_fills"] - before["hot_fills"] == 1, after
    assert m.alive()


def test_a_million_frame_seek_table_stays_within_the_memory_bound(
        costly: tuple[Mount, dict[str, str]]) -> None:
    m, names = costly
    proc = psutil.Process(m.proc.pid)
    rss = proc.memory_info().rss
    before = m.stats()
    small_reads(m / names["million-frames"] / "many", MANY, 100)
    after = m.stats()
    grown = proc.memory_info().rss - rss
    # A list of a million Frame objects was ~180 MiB; the bound is the NAR's share of the frame
    # cache for its table, and the table is checked a chunk (~1 MiB) at a time.
    assert after["table_bytes"] <= (FRAME_CACHE_MB << 20) // 64, after
    assert grown < 64 << 20, grown
    assert after["bytes_decompressed"] - before["bytes_decompressed"] <= len(MANY_NAR), after
    assert after["hot_fills"] - before["hot_fills"] == 1, after


def test_a_million_frame_seek_table_that_lies_is_still_refused(
        costly: tuple[Mount, dict[str, str]]) -> None:
    m, names = costly
    expect_eio(m / names["million-lies"] / "many")
    line = next(ln for ln in m.log().splitlines() if names["million-lies"] in ln)
    assert "seek table" in line, line
    assert m.alive()
