"""Issue 15: the pieces of a remote mount that need no server (fast, in-process): signed frame
hashes (frameauth.py) and the bounded on-disk cache of fetched ranges (remote.RangeCache)."""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path

import pytest

from narfs import frameauth
from narfs.errors import CorruptError
from narfs.narinfo import NarInfo
from narfs.remote import RangeCache, client_dir
from narfs.signing import generate_secret_key, parse_secret_key
from narfs.zstdseek import SeekableWriter, read_table

KEY = parse_secret_key(generate_secret_key("cache-1"))
OTHER = parse_secret_key(generate_secret_key("cache-1"))  # same name, another key


@pytest.fixture
def signed(tmp_path: Path) -> tuple[NarInfo, Path, bytes]:
    data = os.urandom(300_000) + b"x" * 300_000
    nar = tmp_path / "x.nar.zst"
    with open(nar, "wb") as f:
        w = SeekableWriter(f, 100_000, 3, None, 1)
        w.write(data)
        w.close()
    info = NarInfo(store_path="/nix/store/" + "0" * 32 + "-x", url="nar/x.nar.zst",
                   compression="zstd", file_hash=None, file_size=nar.stat().st_size,
                   nar_hash="sha256:" + "1" * 52, nar_size=len(data))
    doc = frameauth.build(info, str(nar), b'{"ls":1}', KEY)
    assert doc is not None
    return info, nar, doc


def test_signed_frame_hashes_round_trip(signed: tuple[NarInfo, Path, bytes]) -> None:
    info, nar, doc = signed
    auth = frameauth.verify(doc, info, [OTHER.public, KEY.public], "x.auth")
    with open(nar, "rb") as f:
        table = read_table(f, nar.stat().st_size)
        assert table is not None
        assert [(a.comp_offset, a.comp_size, a.size) for a in auth.table.frames] == \
            [(b.comp_offset, b.comp_size, b.size) for b in table.frames]
        assert auth.file_size == nar.stat().st_size
        f.seek(auth.table.comp_size)
        assert f.read() == auth.tail  # the file's own seek table, without reading it
        for i, fr in enumerate(table.frames):
            f.seek(fr.comp_offset)
            auth.check_frame(i, f.read(fr.comp_size), "x")
    auth.check_listing(b'{"ls":1}', "x.ls")
    with pytest.raises(CorruptError, match="frame 1 is not the one"):
        auth.check_frame(1, b"other bytes", "x")
    with pytest.raises(CorruptError, match="not the listing"):
        auth.check_listing(b'{"ls":2}', "x.ls")


@pytest.mark.parametrize("change", ["frame hash", "frame size", "file size", "ls", "sig",
                                    "store path", "nar hash", "key"])
def test_a_changed_document_is_refused(signed: tuple[NarInfo, Path, bytes],
                                       change: str) -> None:
    info, _, doc = signed
    d = json.loads(doc)
    keys = [KEY.public]
    if change == "frame hash":
        d["frames"][0][2] = d["frames"][1][2]
    elif change == "frame size":  # moved bytes between two frames: sizes still add up
        d["frames"][0][1] += 1
        d["frames"][1][1] -= 1
    elif change == "file size":
        d["fileSize"] += 1
    elif change == "ls":
        d["ls"] = None
    elif change == "sig":
        d["sig"] = KEY.sign(b"something else")
    elif change == "store path":
        info = NarInfo(**{**info.__dict__, "store_path": "/nix/store/" + "2" * 32 + "-x"})
    elif change == "nar hash":
        info = NarInfo(**{**info.__dict__, "nar_hash": "sha256:" + "3" * 52})
    else:
        keys = [OTHER.public]
    with pytest.raises(CorruptError):
        frameauth.verify(json.dumps(d).encode(), info, keys, "x.auth")


def test_range_cache_is_bounded_and_survives_a_restart(tmp_path: Path) -> None:
    d = str(tmp_path / "ranges")
    rc = RangeCache(d, 250)
    names = [RangeCache.name("nar/x", i * 100, 100) for i in range(4)]
    for i, name in enumerate(names):
        rc.put(name, bytes([i]) * 100)
    assert rc.size <= 250
    assert rc.get(names[0], 100) is None  # the oldest went first
    assert rc.get(names[3], 100) == bytes([3]) * 100
    assert rc.get(names[3], 99) is None  # a size other than asked is not taken
    again = RangeCache(d, 100)  # a lower limit at the next mount
    assert again.size <= 100 and len(os.listdir(d)) == 1
    assert again.get(names[3], 100) == bytes([3]) * 100


def test_a_range_written_in_the_background_is_found_meanwhile_and_settled_at_unmount(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fetched frame is written to the ranges cache after the read answered (put_soon):
    get() finds its bytes while the write is under way, and settle() (at unmount) waits for
    it, so the next mount has it on disk."""
    d = str(tmp_path / "ranges")
    rc = RangeCache(d, 1 << 20)
    name = RangeCache.name("nar/x", 0, 6)
    gate = threading.Event()
    real = RangeCache.put

    def slow_put(self: RangeCache, n: str, data: bytes) -> None:
        assert gate.wait(10)
        real(self, n, data)

    monkeypatch.setattr(RangeCache, "put", slow_put)
    rc.put_soon(name, b"abcdef")
    assert rc.get(name, 6) == b"abcdef" and os.listdir(d) == []
    gate.set()
    rc.settle(10)
    assert RangeCache(d, 1 << 20).get(name, 6) == b"abcdef"


def test_client_dir_is_per_server_and_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", "/x")
    a = client_dir("http://host:5000/")
    assert os.path.dirname(a) == "/x/narfs/remote"
    # a name Nix takes literally in a file:// URL (Nix 2.34 decodes percent-escapes)
    assert re.fullmatch(r"host_5000-[0-9a-f]{12}", os.path.basename(a)), a
    assert client_dir("http://host:5000") == a
    assert client_dir("https://host:5000") != a
    assert client_dir("http://host:5000/../../etc").startswith("/x/narfs/remote/")
    assert "/" not in os.path.relpath(client_dir("http://h/a/../../b"), "/x/narfs/remote")
