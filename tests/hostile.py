"""Hostile and damaged cache entries, built by hand: each case is one narinfo (+ NAR, + .ls).

Every entry is signed with the cache's own key, so whatever refuses it does so because of its
content, not its signature. `write_case` returns the store path the entry claims (or None when
the narinfo is unreadable by design).
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import uuid
from array import array
from collections.abc import Callable
from pathlib import Path

import zstandard

from narfs import listing, nix32
from narfs.nar import ListingBuilder, encode_str, parse
from narfs.narinfo import NarInfo
from narfs.signing import SecretKey
from narfs.zstdseek import FOOTER, SEEKABLE_MAGIC, SKIPPABLE_MAGIC, SeekableWriter

S = encode_str


def node_file(data: bytes, executable: bool = False) -> bytes:
    body = S(b"(") + S(b"type") + S(b"regular")
    if executable:
        body += S(b"executable") + S(b"")
    return body + S(b"contents") + S(data) + S(b")")


def node_link(target: bytes) -> bytes:
    return S(b"(") + S(b"type") + S(b"symlink") + S(b"target") + S(target) + S(b")")


def node_dir(entries: list[tuple[bytes, bytes]]) -> bytes:
    out = S(b"(") + S(b"type") + S(b"directory")
    for name, node in entries:
        out += S(b"entry") + S(b"(") + S(b"name") + S(name) + S(b"node") + node + S(b")")
    return out + S(b")")


def nar(node: bytes) -> bytes:
    return S(b"nix-archive-1") + node


GOOD_TREE = nar(node_dir([(b"bin", node_dir([(b"tool", node_file(b"#!/bin/sh\n", True))])),
                          (b"readme", node_file(b"good data\n"))]))


def _deep(n: int) -> bytes:
    node = node_file(b"bottom")
    for _ in range(n):
        node = node_dir([(b"d", node)])
    return nar(node)


def _size_lie() -> bytes:
    body = S(b"(") + S(b"type") + S(b"regular") + S(b"contents") + struct.pack("<Q", 1 << 60)
    return nar(body + b"short")


# case → NAR bytes; the NAR is what makes these hostile.
BAD_NARS: dict[str, Callable[[], bytes]] = {
    "dotdot-name": lambda: nar(node_dir([(b"..", node_file(b"escape"))])),
    "slash-name": lambda: nar(node_dir([(b"a/b", node_file(b"escape"))])),
    "empty-name": lambda: nar(node_dir([(b"", node_file(b"x"))])),
    "nul-name": lambda: nar(node_dir([(b"a\0b", node_file(b"x"))])),
    "symlink-then-dir": lambda: nar(node_dir([
        (b"a", node_link(b"/tmp")), (b"a", node_dir([(b"owned", node_file(b"x"))]))])),
    "unsorted": lambda: nar(node_dir([(b"b", node_file(b"1")), (b"a", node_file(b"2"))])),
    "size-lie": _size_lie,
    "truncated": lambda: GOOD_TREE[: len(GOOD_TREE) // 2],
    "wrong-magic": lambda: S(b"nix-archive-2") + GOOD_TREE[len(S(b"nix-archive-1")):],
    "deep-nesting": lambda: _deep(5000),
}

# cases where the NAR is fine but the narinfo or the compressed file lies
BAD_ENTRIES = ["seek-table-lies", "zstd-garbage", "url-escapes", "storepath-mismatch",
               "wrong-narhash", "wrong-narsize", "garbage-narinfo"]

CASES = [*BAD_NARS, *BAD_ENTRIES]


def fake_path(name: str) -> str:
    h = nix32.encode(hashlib.sha256(uuid.uuid4().bytes).digest()[:20])
    return f"/nix/store/{h}-{name}"


def _compress(data: bytes, frame: int = 64) -> bytes:
    out = io.BytesIO()
    w = SeekableWriter(out, frame, 3)
    w.write(data)
    w.close()
    return out.getvalue()


def seekable_by_hand(data: bytes, frame: int) -> bytes:
    """Seekable zstd of `data` in `frame`-byte frames, each distinct frame compressed once: a
    table of a million frames of repetitive data in a second or two."""
    cctx = zstandard.ZstdCompressor()
    memo: dict[bytes, bytes] = {}
    parts, sizes = [], array("I")
    for i in range(0, len(data), frame):
        chunk = data[i:i + frame]
        comp = memo.get(chunk)
        if comp is None:
            comp = memo[chunk] = cctx.compress(chunk)
        parts.append(comp)
        sizes.extend((len(comp), len(chunk)))
    body = sizes.tobytes() + FOOTER.pack(len(parts), 0, SEEKABLE_MAGIC)
    return b"".join(parts) + struct.pack("<II", SKIPPABLE_MAGIC, len(body)) + body


def _listing_for(data: bytes) -> bytes | None:
    b = ListingBuilder()
    try:
        parse(io.BytesIO(data), b, len(data))
        return listing.render(b.root)
    except (Exception, RecursionError):  # json nests no deeper than Python's recursion limit
        return None


def write_entry(cache: Path, key: SecretKey, data: bytes, name: str,
                tamper: str | None = None) -> str:
    """Write one signed entry for NAR `data`; `tamper` names a lie to tell about it."""
    path = fake_path(name)
    h = path[11:43]
    compressed = _compress(data)
    if tamper == "seek-table-lies":
        # Claim the first frame decompresses to more than it does.
        end = len(compressed) - 9
        nframes = struct.unpack_from("<I", compressed, end)[0]
        table = end - nframes * 8
        c, d = struct.unpack_from("<II", compressed, table)
        compressed = compressed[:table] + struct.pack("<II", c, d + 7) + compressed[table + 8:]
    elif tamper == "zstd-garbage":
        compressed = os.urandom(len(compressed))
    file_hash = nix32.encode(hashlib.sha256(compressed).digest())
    url = f"nar/{file_hash}.nar.zst"
    (cache / "nar").mkdir(exist_ok=True)
    (cache / url).write_bytes(compressed)
    nar_hash = nix32.format_sha256(hashlib.sha256(data).digest())
    nar_size = len(data)
    store_path = path
    if tamper == "url-escapes":
        url = "../../../../etc/passwd"
    elif tamper == "storepath-mismatch":
        store_path = fake_path(name)
    elif tamper == "wrong-narhash":
        nar_hash = nix32.format_sha256(hashlib.sha256(b"other").digest())
    elif tamper == "wrong-narsize":
        nar_size += 8
    info = NarInfo(store_path=store_path, url=url, compression="zstd",
                   file_hash=f"sha256:{file_hash}", file_size=len(compressed),
                   nar_hash=nar_hash, nar_size=nar_size, references=[])
    info.sign(key)
    text = info.render().encode()
    if tamper == "garbage-narinfo":
        text = os.urandom(300)
    (cache / f"{h}.narinfo").write_bytes(text)
    ls = _listing_for(data)
    if ls is not None and tamper is None:
        (cache / f"{h}.ls").write_bytes(ls)
    return path


def write_case(cache: Path, key: SecretKey, case: str) -> str:
    if case in BAD_NARS:
        return write_entry(cache, key, BAD_NARS[case](), f"hostile-{case}")
    return write_entry(cache, key, GOOD_TREE, f"hostile-{case}", tamper=case)


# --- components of the cache that are not what they should be (issue 11) ----------------------
#
# (component, what is put in its place). A component is a path relative to the cache root;
# `{narinfo}`, `{ls}` and `{nar}` stand for the good entry's files. "outside-file" and
# "outside-dir" are symlinks to a file or directory outside the cache (a copy of what was
# there), "dev-zero" a character device like /dev/zero, "fifo" and "socket" what they say.
COMPONENTS: list[tuple[str, str]] = [
    ("nar", "outside-dir"),
    (".narfs", "outside-dir"),
    (".narfs/catalog.sqlite", "outside-file"),
    (".narfs/catalog.sqlite-wal", "outside-file"),
    (".narfs/catalog.sqlite", "fifo"),
    (".narfs/lock", "fifo"),
    (".narfs/lock", "outside-file"),
    (".narfs/publish.lock", "outside-file"),
    (".narfs/watch.json", "fifo"),
    (".narfs/keys", "fifo"),
    (".narfs/mount.log", "outside-file"),
    (".narfs/trees", "outside-dir"),
    (".narfs/hot", "outside-dir"),
    ("{narinfo}", "fifo"),
    ("{narinfo}", "outside-file"),
    ("{narinfo}", "socket"),
    ("{ls}", "fifo"),
    ("{ls}", "dev-zero"),
    ("{nar}", "fifo"),
    ("{nar}", "outside-file"),
    ("{nar}", "dev-zero"),
    ("{nar}", "socket"),
    ("nix-cache-info", "fifo"),
]


def plant(cache: Path, component: str, kind: str, outside: Path, files: dict[str, str]) -> Path:
    """Put `kind` where `component` is (moving what was there to `outside`); returns its path."""
    import shutil
    import socket
    import stat as stat_

    path = cache / component.format(**files)
    if path.exists() or path.is_symlink():
        copy = outside / path.name
        shutil.move(str(path), str(copy))
    else:
        copy = outside / path.name
        if kind == "outside-dir":
            copy.mkdir()
        else:
            copy.write_bytes(b"outside the cache\n")
    if kind in ("outside-file", "outside-dir"):
        path.symlink_to(copy)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        try:
            os.mknod(path, 0o600 | stat_.S_IFCHR, os.makedev(1, 5))
        except PermissionError:  # a container that forbids device nodes
            import pytest
            pytest.skip("cannot make a device node here")
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        cwd = os.getcwd()
        os.chdir(path.parent)  # a socket's path must fit in 108 bytes; its name does
        try:
            s.bind(path.name)
        finally:
            os.chdir(cwd)
            s.close()
    return path
