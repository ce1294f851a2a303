"""Synthetic caches for benchmarks: many tiny store paths written with narfs's own writers."""

from __future__ import annotations

import hashlib
import io
import os

from narfs import listing, nix32
from narfs.cache import Cache
from narfs.nar import encode_str
from narfs.narinfo import NarInfo
from narfs.zstdseek import SeekableWriter

_HEAD = b"".join(encode_str(t) for t in (
    b"nix-archive-1", b"(", b"type", b"directory", b"entry", b"(", b"name", b"content", b"node",
    b"(", b"type", b"regular", b"contents"))
_TAIL = b"".join(encode_str(t) for t in (b")", b")", b")"))


def tiny_nar(content: bytes) -> tuple[bytes, dict]:
    """The NAR of a directory holding one file `content`, and its listing."""
    nar = _HEAD + encode_str(content) + _TAIL
    root = {"type": "directory", "entries": {"content": {
        "type": "regular", "size": len(content), "narOffset": len(_HEAD) + 8}}}
    return nar, root


def make_cache(root: str, n: int) -> list[str]:
    """A cache of `n` tiny paths (plain writes, no fsync: benchmark data); returns base names."""
    cache = Cache(root)
    cache.init()
    names = []
    for i in range(n):
        h = nix32.encode(hashlib.sha256(f"narfs-bench-{i}".encode()).digest()[:20])
        base = f"{h}-bench-{i % 1000}"
        nar, ls = tiny_nar(f"path {i}\n".encode())
        out = io.BytesIO()
        w = SeekableWriter(out, 1 << 20, 3)
        w.write(nar)
        w.close()
        file_hash = nix32.encode(w.sha256.digest())
        info = NarInfo(store_path=f"/nix/store/{base}", url=f"nar/{file_hash}.nar.zst",
                       compression="zstd", file_hash=f"sha256:{file_hash}",
                       file_size=len(out.getvalue()),
                       nar_hash=nix32.format_sha256(hashlib.sha256(nar).digest()),
                       nar_size=len(nar))
        with open(cache.nar_path(info.url), "wb") as f:
            f.write(out.getvalue())
        with open(cache.listing_path(h), "wb") as f:
            f.write(listing.render(ls))
        with open(cache.narinfo_path(h), "w") as f:
            f.write(info.render())
        names.append(base)
    os.sync()
    return names
