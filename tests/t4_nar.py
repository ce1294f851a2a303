"""Issue 2, NAR: narfs's serialiser equals `nix-store --dump` byte for byte; its parser is safe.

The serialiser is compared with Nix on a real tree in the store (a copy of /usr/include) and on
hypothesis-generated trees. The parser is fed hand-built bad NARs and random mutations of good
ones: it must answer CorruptError and nothing else.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from narfs import nix32, nixversions
from narfs.errors import CorruptError, NarfsError
from narfs.nar import (
    MAX_DEPTH,
    ListingBuilder,
    NarSerialiser,
    dump_bytes,
    encode_str,
    listing_of,
    parse,
)
from nixtools import nix_version, path_infos, run

# --- comparing streams -----------------------------------------------------------------------


def first_difference(mine: Iterator[bytes], theirs: io.BufferedIOBase) -> int | None:
    """Offset of the first byte where two streams differ, or None when they are equal."""
    offset = 0
    for chunk in mine:
        other = theirs.read(len(chunk))
        if other != chunk:
            for i, (a, b) in enumerate(zip(chunk, other, strict=False)):
                if a != b:
                    return offset + i
            return offset + min(len(chunk), len(other))
        offset += len(chunk)
    return offset if theirs.read(1) else None


def nix_dump(path: str | bytes) -> bytes:
    return subprocess.run([b"nix-store", b"--dump", os.fsencode(path)], capture_output=True,
                          check=True).stdout


# --- a real tree: /usr/include in the store -------------------------------------------------


@pytest.fixture(scope="module")
def usr_include(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """/usr/include added to the store with nix-store --add, deleted afterwards.

    It is added through a read-only bind mount with a unique name, so its store path is this
    test's alone: another test adding /usr/include at the same time can neither delete it under
    us nor lose it to our teardown. (Same bytes as /usr/include; only the name differs.)
    """
    if not os.path.isdir("/usr/include") or not os.listdir("/usr/include"):
        pytest.fail("/usr/include is missing or empty; install libc6-dev (apt-get install "
                    "libc6-dev) to give the test a real tree")
    view = tmp_path_factory.mktemp("usr") / f"include-narfs-test-{uuid.uuid4().hex[:8]}"
    view.mkdir()
    run(["mount", "--bind", "-o", "ro", "/usr/include", str(view)])
    try:
        path = run(["nix-store", "--add", str(view)]).stdout.strip()
    finally:
        run(["umount", str(view)])
    try:
        assert path.startswith("/nix/store/") and os.path.isdir(path), path
        yield path
    finally:
        run(["nix-store", "--delete", path], check=False)


def test_serialiser_equals_nix_store_dump_on_usr_include(usr_include: str,
                                                         tmp_path: Path) -> None:
    dump = tmp_path / "dump.nar"
    with open(dump, "wb") as out:
        subprocess.run(["nix-store", "--dump", usr_include], stdout=out, check=True)
    ser = NarSerialiser(usr_include)
    sha = hashlib.sha256()

    def hashed() -> Iterator[bytes]:
        for chunk in ser:
            sha.update(chunk)
            yield chunk

    with open(dump, "rb") as theirs:
        diff = first_difference(hashed(), theirs)
    assert diff is None, f"narfs's NAR of {usr_include} differs from nix-store --dump at {diff}"
    assert ser.offset == dump.stat().st_size
    registered = path_infos(usr_include)[usr_include]
    assert nix32.format_sha256(sha.digest()) == registered.nar_hash
    assert ser.offset == registered.nar_size
    # The parser reads the same NAR back into the listing the serialiser produced.
    with open(dump, "rb") as f:
        assert listing_of(f, ser.offset) == ser.listing


# --- generated trees ------------------------------------------------------------------------

# Names: anything Linux allows in one component (no "/" or NUL, not "." or ".."), including
# non-ASCII UTF-8, bytes that are not UTF-8, spaces, newlines and leading dashes.
_name_bytes = st.one_of(
    st.text(st.characters(exclude_characters="/\0", exclude_categories=["Cs"]),
            min_size=1, max_size=12).map(lambda s: s.encode()),
    st.binary(min_size=1, max_size=10).map(lambda b: b.replace(b"/", b"_").replace(b"\0", b"-")),
    st.sampled_from([b"-", b"--x", b"a b", b"\n", b"...", b".hidden", b"A", b"a", b"\xff",
                     "ünï".encode(), "名前".encode(), b"x" * 255]),
).filter(lambda n: n not in (b".", b".."))

_target = st.binary(min_size=1, max_size=60).map(lambda b: b.replace(b"\0", b"x"))
_mode = st.sampled_from([0o644, 0o755, 0o744, 0o700, 0o600, 0o654, 0o444, 0o555])


@st.composite
def _contents(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 9)) == 0:  # now and then a file past the serialiser's 64 KiB buffer
        return random.Random(draw(st.integers(0, 1000))).randbytes(
            draw(st.integers(65_530, 300_000)))
    return draw(st.binary(max_size=300))


_file = st.tuples(st.just("file"), _contents(), _mode)
_link = st.tuples(st.just("link"), _target)
_tree = st.recursive(
    st.one_of(_file, _link),
    lambda children: st.tuples(st.just("dir"),
                               st.dictionaries(_name_bytes, children, max_size=5)),
    max_leaves=14,
)


def materialise(path: bytes, node: tuple) -> None:
    kind = node[0]
    if kind == "file":
        with open(path, "wb") as f:
            f.write(node[1])
        os.chmod(path, node[2])
    elif kind == "link":
        os.symlink(node[1], path)
    else:
        os.mkdir(path)
        for name, child in node[1].items():
            materialise(path + b"/" + name, child)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=_tree)
def test_serialiser_equals_nix_store_dump_on_generated_trees(tree: tuple,
                                                            tmp_path_factory) -> None:
    root = os.fsencode(tmp_path_factory.mktemp("tree")) + b"/root"
    try:
        materialise(root, tree)
        ser = NarSerialiser(root)
        mine = b"".join(ser)
        theirs = nix_dump(root)
        assert mine == theirs
        assert ser.offset == len(mine)
        # parse(serialise(tree)) reproduces the serialiser's listing.
        builder = ListingBuilder()
        assert parse(io.BytesIO(mine), builder, len(mine)) == len(mine)
        assert builder.root == ser.listing
        assert listing_of(io.BytesIO(mine)) == ser.listing  # size unknown: streaming mode
    finally:
        shutil.rmtree(os.path.dirname(root))


# --- hand-built NARs --------------------------------------------------------------------------

S = encode_str


def reg(data: bytes, executable: bool = False) -> bytes:
    return (S(b"(") + S(b"type") + S(b"regular") + (S(b"executable") + S(b"") if executable
            else b"") + S(b"contents") + S(data) + S(b")"))


def link(target: bytes) -> bytes:
    return S(b"(") + S(b"type") + S(b"symlink") + S(b"target") + S(target) + S(b")")


def directory(*entries: tuple[bytes, bytes]) -> bytes:
    body = b"".join(S(b"entry") + S(b"(") + S(b"name") + S(n) + S(b"node") + node + S(b")")
                    for n, node in entries)
    return S(b"(") + S(b"type") + S(b"directory") + body + S(b")")


def nar(node: bytes) -> bytes:
    return S(b"nix-archive-1") + node


GOOD = nar(directory(
    (b"a", reg(b"hello")), (b"b", link(b"a")), (b"bin", directory((b"x", reg(b"#!", True)))),
    (b"e", directory()), (b"z", reg(b""))))


def parse_both(data: bytes) -> None:
    """Parse with the size known (files) and unknown (streams): both must agree."""
    parse(io.BytesIO(data), ListingBuilder(), len(data))
    parse(io.BytesIO(data), ListingBuilder())


def test_good_hand_built_nar_parses() -> None:
    assert listing_of(io.BytesIO(GOOD), len(GOOD)) == {
        "type": "directory", "entries": {
            "a": {"type": "regular", "size": 5, "narOffset": GOOD.index(b"hello")},
            "b": {"type": "symlink", "target": "a"},
            "bin": {"type": "directory", "entries": {
                "x": {"type": "regular", "size": 2, "executable": True,
                      "narOffset": GOOD.index(b"#!")}}},
            "e": {"type": "directory", "entries": {}},
            "z": {"type": "regular", "size": 0, "narOffset": GOOD.rindex(S(b"")) + 8}}}
    parse_both(nar(reg(b"single file")))
    parse_both(nar(link(b"/somewhere")))


BAD = {
    "bad magic": S(b"nix-archive-2") + reg(b"x"),
    "no magic": reg(b"x"),
    "empty": b"",
    "name ..": nar(directory((b"..", reg(b"x")))),
    "name .": nar(directory((b".", reg(b"x")))),
    "name with /": nar(directory((b"a/b", reg(b"x")))),
    "name /": nar(directory((b"/", reg(b"x")))),
    "empty name": nar(directory((b"", reg(b"x")))),
    "NUL in name": nar(directory((b"a\0b", reg(b"x")))),
    "name too long": nar(directory((b"x" * 256, reg(b"x")))),
    "duplicate": nar(directory((b"a", reg(b"x")), (b"a", reg(b"y")))),
    "unsorted": nar(directory((b"b", reg(b"x")), (b"a", reg(b"y")))),
    "symlink then directory of the same name": nar(directory(
        (b"a", link(b"/etc")), (b"a", directory((b"passwd", reg(b"pwned")))))),
    "directory then symlink of the same name": nar(directory(
        (b"a", directory()), (b"a", link(b"/etc")))),
    "nested duplicate": nar(directory((b"d", directory((b"x", reg(b"")), (b"x", reg(b"")))))),
    "empty symlink target": nar(link(b"")),
    "NUL in symlink target": nar(link(b"a\0b")),
    "symlink target too long": nar(link(b"a" * 5000)),
    "unknown type": nar(S(b"(") + S(b"type") + S(b"fifo") + S(b")")),
    "regular without contents": nar(S(b"(") + S(b"type") + S(b"regular") + S(b")")),
    "executable flag with a value": nar(
        S(b"(") + S(b"type") + S(b"regular") + S(b"executable") + S(b"yes") + S(b"contents")
        + S(b"x") + S(b")")),
    "size 2**60": nar(S(b"(") + S(b"type") + S(b"regular") + S(b"contents")
                      + (1 << 60).to_bytes(8, "little") + b"x" * 64),
    "size 2**64-1": nar(S(b"(") + S(b"type") + S(b"regular") + S(b"contents")
                        + b"\xff" * 8 + b"x" * 64),
    "token length 2**63": nar(b"\0" * 7 + b"\x80" + b"(" + b"\0" * 7),
    "non-zero padding in contents": nar(reg(b"abc")).replace(b"abc\0\0\0\0\0", b"abc\0\0\0\0X"),
    "non-zero padding in a token": S(b"nix-archive-1").replace(b"1\0\0\0", b"1\0\0X")
    + reg(b"x"),
    "missing close": nar(reg(b"x"))[:-16],
    "trailing data": nar(reg(b"x")) + S(b")"),
    "trailing garbage": nar(reg(b"x")) + b"\0",
    "entry without node": nar(S(b"(") + S(b"type") + S(b"directory") + S(b"entry") + S(b"(")
                              + S(b"name") + S(b"a") + S(b")") + S(b")")),
    "junk in directory": nar(S(b"(") + S(b"type") + S(b"directory") + S(b"junk") + S(b")")),
    "two roots": nar(reg(b"x")) + reg(b"y"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_nar_is_corrupt(case: str) -> None:
    data = BAD[case]
    with pytest.raises(CorruptError):
        parse(io.BytesIO(data), ListingBuilder(), len(data))
    with pytest.raises(CorruptError):
        parse(io.BytesIO(data), ListingBuilder())


def test_every_truncation_is_corrupt() -> None:
    for n in range(len(GOOD)):
        with pytest.raises(CorruptError):
            parse(io.BytesIO(GOOD[:n]), ListingBuilder())
        with pytest.raises(CorruptError):
            parse(io.BytesIO(GOOD[:n]), ListingBuilder(), n)


class _HugeStream(io.RawIOBase):
    """Claims a file of 2**60 bytes of zeros: a parser that believes the size would never end
    or allocate it; a bounded one stops at the size it was told."""

    def __init__(self, head: bytes) -> None:
        self.head, self.pos, self.served = head, 0, 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        assert 0 <= n <= 1 << 24, f"parser asked for {n} bytes at once"
        self.served += n
        if self.served > 64 << 20:
            raise AssertionError("parser kept reading a NAR whose size it was told")
        out = self.head[self.pos:self.pos + n]
        self.pos += len(out)
        return out + b"\0" * (n - len(out))


def test_huge_size_is_refused_before_it_is_read() -> None:
    head = nar(S(b"(") + S(b"type") + S(b"regular") + S(b"contents")) + (1 << 60).to_bytes(
        8, "little")
    with pytest.raises(CorruptError, match="past its end"):
        parse(_HugeStream(head), ListingBuilder(), 4096)  # type: ignore[arg-type]


def test_nesting_5000_deep_is_corrupt_without_recursion() -> None:
    depth = 5000
    opening = S(b"(") + S(b"type") + S(b"directory") + S(b"entry") + S(b"(") + S(b"name") + \
        S(b"d") + S(b"node")
    data = nar(opening * depth + reg(b"x") + (S(b")") + S(b")")) * depth)
    with pytest.raises(CorruptError, match="deeper"):
        parse(io.BytesIO(data), ListingBuilder(), len(data))
    # Up to the limit is fine: the cap, not Python's stack, decides.
    ok = MAX_DEPTH - 1
    data = nar(opening * ok + reg(b"x") + (S(b")") + S(b")")) * ok)
    parse_both(data)


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from([GOOD, _RICH])))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["set", "flip", "insert", "delete", "truncate", "u64"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 16))]
        elif op == "truncate":
            del data[pos:]
        elif op == "u64":  # overwrite a length field (lengths sit at multiples of 8)
            at = pos - pos % 8
            data[at:at + 8] = draw(st.sampled_from(
                [0, 1, 7, 8, 255, 1 << 31, 1 << 60, (1 << 64) - 1])).to_bytes(8, "little")
    return bytes(data)


def _rich() -> bytes:
    return nar(directory(
        (b"bin", directory((b"sh", reg(b"#!/bin/sh\n" * 3, True)))),
        (b"lib", directory((b"libx.so", reg(bytes(range(200)))), (b"link", link(b"libx.so")))),
        ("ünï".encode(), reg(b"u")), (b"zz", directory((b"deep", directory((b"f", reg(b""))))))))


_RICH = _rich()


def _names(node: dict) -> Iterator[str]:
    if node.get("type") == "directory":
        for name, child in node["entries"].items():
            yield name
            yield from _names(child)


@settings(max_examples=400, deadline=None)
@given(data=_mutated())
def test_mutated_nars_raise_corrupt_error_or_parse_safely(data: bytes) -> None:
    for size in (len(data), None):
        try:
            root = listing_of(io.BytesIO(data), size)
        except CorruptError:
            continue
        for name in _names(root):  # whatever is accepted is safe to unpack
            assert name and name not in (".", "..") and "/" not in name and "\0" not in name


def test_serialiser_output_round_trips_through_parser_on_a_real_tree(tmp_path: Path) -> None:
    """dump_bytes on an ordinary directory (no store) equals nix-store --dump of it."""
    root = tmp_path / "t"
    (root / "x" / "y").mkdir(parents=True)
    (root / "x" / "y" / "f").write_bytes(b"data" * 100_000)
    (root / "l").symlink_to("x/y/f")
    data = dump_bytes(root)
    assert data == nix_dump(root)
    assert listing_of(io.BytesIO(data), len(data))["entries"]["l"] == {
        "type": "symlink", "target": "x/y/f"}


def nested(root: Path, levels: int) -> Path:
    """`levels` directories in all, root included (os.makedirs would recurse too deep)."""
    path = os.fsencode(root)
    os.mkdir(path)
    for _ in range(levels - 1):
        path += b"/d"
        os.mkdir(path)
    with open(path + b"/leaf", "wb") as f:
        f.write(b"deep\n")
    return root


def test_serialiser_handles_the_deepest_tree_the_parser_accepts(tmp_path: Path) -> None:
    """As deep as the parser allows: equal to Nix, no RecursionError; one more level is a
    clear NarfsError (narfs never writes a NAR it would refuse to read back). Nix 2.34 stops at
    64 levels (nixversions): there the comparison with Nix is made at Nix's own limit."""
    limit = nixversions.restore_depth_limit(nix_version())
    try:
        ok = nested(tmp_path / "ok", MAX_DEPTH)
        data = dump_bytes(ok)
        listing_of(io.BytesIO(data), len(data))
        too_deep = nested(tmp_path / "too-deep", MAX_DEPTH + 1)
        with pytest.raises(NarfsError, match="deeper than"):
            dump_bytes(too_deep)
        if limit is None:
            assert data == nix_dump(ok)
            assert len(nix_dump(too_deep)) > len(data)  # Nix itself copes
        else:
            at_limit = nested(tmp_path / "at-limit", limit - 1)
            assert dump_bytes(at_limit) == nix_dump(at_limit)
    finally:  # shutil.rmtree (pytest's clean-up) recurses, and would fail on these
        run(["rm", "-rf", str(tmp_path / "ok"), str(tmp_path / "too-deep"),
             str(tmp_path / "at-limit")])


def test_serialiser_refuses_what_a_store_path_cannot_hold(tmp_path: Path) -> None:
    root = tmp_path / "t"
    root.mkdir()
    os.mkfifo(root / "fifo")
    with pytest.raises(NarfsError, match="not a regular file, directory or symlink"):
        dump_bytes(root)
