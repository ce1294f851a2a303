"""Issue 2, formats: every on-disk format narfs writes agrees with what Nix itself writes.

nix-base32, narinfo rendering, Ed25519 signatures and key files, the zstd seekable format and
`.ls` listings are each checked against the real Nix 2.8 (or the real `zstd` CLI), not against
narfs's own idea of them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import Narfs
from narfs import listing, nix32, signing, zstdseek
from narfs import narinfo as narinfo_mod
from narfs.errors import CorruptError, NarfsError
from narfs.nar import listing_of
from narfs.narstream import decompressed_chunks
from nixtools import NIX, NixStore, path_infos, rich_tree, run

# --- nix-base32 ----------------------------------------------------------------------------


def nix_reference_base32(data: bytes) -> str:
    """Nix's printHash32 loop (libutil/hash.cc), transcribed literally as an independent oracle."""
    chars = "0123456789abcdfghijklmnpqrsvwxyz"
    out = []
    length = (len(data) * 8 - 1) // 5 + 1
    for n in range(length - 1, -1, -1):
        b = n * 5
        i, j = b // 8, b % 8
        c = data[i] >> j
        if i < len(data) - 1:
            c |= data[i + 1] << (8 - j)
        out.append(chars[c & 0x1F])
    return "".join(out)


def test_nix32_agrees_with_nix_hash_to_base32() -> None:
    rng = random.Random(2)
    digests = [hashlib.sha256(b"").digest(), b"\0" * 32, b"\xff" * 32,
               *(rng.randbytes(32) for _ in range(40))]
    out = run([*NIX, "hash", "to-base32", "--type", "sha256",
               *(d.hex() for d in digests)]).stdout.split()
    assert out == [nix32.encode(d) for d in digests]
    assert [nix32.decode(s) for s in out] == digests
    # nix-hash, the older tool, and other digest lengths (md5 16, sha1 20, sha512 64 bytes).
    for algo, size in (("sha256", 32), ("md5", 16), ("sha1", 20), ("sha512", 64)):
        d = rng.randbytes(size)
        want = run(["nix-hash", "--type", algo, "--to-base32", d.hex()]).stdout.strip()
        assert nix32.encode(d) == want, algo
        assert nix32.decode(want, size) == d, algo
        assert len(want) == nix32.encoded_length(size)


def test_parse_sha256_accepts_every_form_nix_prints() -> None:
    d = hashlib.sha256(b"narfs").digest()
    sri = run([*NIX, "hash", "to-sri", "--type", "sha256", d.hex()]).stdout.strip()
    for text in (sri, "sha256:" + d.hex(), "sha256:" + nix32.encode(d)):
        assert nix32.parse_sha256(text) == d, text
    assert nix32.format_sha256(d) == "sha256:" + nix32.encode(d)
    for bad in ("md5:" + d.hex(), "sha256:" + "e" * 52, "sha256:" + "0" * 51, "sha256-AAAA"):
        with pytest.raises(ValueError):
            nix32.parse_sha256(bad)


@given(st.binary(min_size=1, max_size=80))
def test_nix32_round_trip(data: bytes) -> None:
    text = nix32.encode(data)
    assert text == nix_reference_base32(data)
    assert len(text) == nix32.encoded_length(len(data))
    assert nix32.decode(text, len(data)) == data


@given(st.text(alphabet=nix32.ALPHABET, min_size=52, max_size=52))
def test_nix32_decode_rejects_overflow(text: str) -> None:
    """52 characters carry 260 bits; Nix refuses strings whose top 4 bits are not zero."""
    top = nix32.ALPHABET.index(text[0])
    if top >> 1:  # 52 * 5 = 260 bits: only the lowest bit of the first character fits
        with pytest.raises(ValueError):
            nix32.decode(text)
    else:
        assert nix32.encode(nix32.decode(text)) == text


def test_nix32_decode_rejects_foreign_characters() -> None:
    good = nix32.encode(bytes(32))
    for c in "eotuE/+=":
        with pytest.raises(ValueError):
            nix32.decode(c + good[1:])


# --- trees and caches made by Nix ------------------------------------------------------------


def nix_copy_to(url: str, paths: list[str]) -> None:
    run([*NIX, "copy", "--to", url, *paths])


@pytest.fixture
def nix_paths(nixstore: NixStore, tmp_path: Path) -> list[str]:
    """A salted closure: a dependency, a CA path, and a path referencing both (has a Deriver)."""
    dep = nixstore.text("dependency", "narfs-fmt-dep")
    src = tmp_path / "ca-src"
    src.mkdir()
    (src / "hello").write_text(f"content addressed {os.urandom(8).hex()}\n")
    ca = run(["nix-store", "--add", str(src)]).stdout.strip()
    nixstore.paths.append(ca)  # so the fixture's cleanup deletes it
    # Several references, so their order in the fingerprint matters.
    top = nixstore.tree(rich_tree(tmp_path / "rich"), "narfs-fmt-rich", refs=[dep, ca])
    return [dep, top, ca]


def narinfos(cache: Path) -> dict[str, bytes]:
    return {p.name[:-8]: p.read_bytes() for p in cache.glob("*.narinfo")}


# --- narinfo ---------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["zstd", "xz", "none"])
def test_narinfos_written_by_nix_copy_re_render_identically(
        compression: str, nix_paths: list[str], nixstore: NixStore, tmp_path: Path) -> None:
    # A signature in the local store travels into the narinfo, so the Sig line is covered.
    sec, _ = nix_keypair(tmp_path, "narfs-fmt-test-1")
    run([*NIX, "store", "sign", "--key-file", str(sec), nix_paths[1]])
    cache = tmp_path / "cache"
    nix_copy_to(f"file://{cache}?compression={compression}", nix_paths)
    by_path = path_infos(*nix_paths)
    written = narinfos(cache)
    assert len(written) == 3
    ext = narinfo_mod.COMPRESSIONS[compression]
    for h, raw in written.items():
        info = narinfo_mod.parse(raw, expect_hash=h)
        assert info.render().encode() == raw
        want = by_path[info.store_path]
        assert info.compression == compression
        assert info.url.endswith(".nar" + ext)
        assert info.nar_hash == want.nar_hash and info.nar_size == want.nar_size
        assert [f"/nix/store/{r}" for r in info.references] == want.references
        assert info.sigs == want.sigs and info.ca == want.ca
        if want.deriver:
            assert info.deriver == os.path.basename(want.deriver)
        nar_file = (cache / info.url).read_bytes()
        assert info.file_size == len(nar_file)
        assert info.file_hash == nix32.format_sha256(hashlib.sha256(nar_file).digest())
    signed = narinfo_mod.parse(written[nix_paths[1][11:43]])
    assert len(signed.sigs) == 1 and signed.sigs[0].startswith("narfs-fmt-test-1:")
    assert any(i.ca for i in map(narinfo_mod.parse, written.values()))
    assert any(i.deriver for i in map(narinfo_mod.parse, written.values()))


def test_narinfo_parse_rejects_lies() -> None:
    good = (b"StorePath: /nix/store/" + b"a" * 32 + b"-x\nURL: nar/abc.nar.zst\n"
            b"Compression: zstd\nNarHash: sha256:" + nix32.encode(bytes(32)).encode()
            + b"\nNarSize: 8\nReferences: \n")
    narinfo_mod.parse(good, expect_hash="a" * 32)
    for bad in (good.replace(b"nar/abc", b"nar/../../etc/passwd"),
                good.replace(b"nar/abc", b"/etc/abc"),
                good.replace(b"NarSize: 8", b"NarSize: -8"),
                good.replace(b"NarSize: 8\n", b""),
                good.replace(b"References: ", b"References: ../../etc"),
                good.replace(b"/nix/store/", b"/tmp/store/"),
                good + b"NarSize: 9\n",
                b"\xff" + good):
        with pytest.raises(CorruptError):
            narinfo_mod.parse(bad)
    with pytest.raises(CorruptError):
        narinfo_mod.parse(good, expect_hash="b" * 32)


# --- signatures and keys ---------------------------------------------------------------------


def nix_keypair(where: Path, name: str) -> tuple[Path, Path]:
    sec, pub = where / f"{name}.sec", where / f"{name}.pub"
    run(["nix-store", "--generate-binary-cache-key", name, str(sec), str(pub)])
    return sec, pub


def test_sig_equals_nix_store_sign(nix_paths: list[str], narfs: Narfs, tmp_path: Path) -> None:
    sec, pub = nix_keypair(tmp_path, "narfs-sig-test-1")
    sec.chmod(0o600)
    key = signing.load_secret_key(str(sec))
    assert key.public.text() == pub.read_text().strip()

    unsigned = tmp_path / "unsigned"
    nix_copy_to(f"file://{unsigned}?compression=none", nix_paths)
    nix_signed = tmp_path / "nix-signed"
    shutil.copytree(unsigned, nix_signed)
    run([*NIX, "store", "sign", "--key-file", str(sec), "--store", f"file://{nix_signed}",
         *nix_paths])
    theirs = narinfos(nix_signed)
    assert len(theirs) == 3
    for h, raw in narinfos(unsigned).items():
        info = narinfo_mod.parse(raw, expect_hash=h)
        assert info.sigs == []
        info.sign(key)
        assert info.render().encode() == theirs[h], info.store_path  # the same bytes, Sig too
        assert info.signed_by(key.public)

    # narfs archive with the same key writes the very same Sig (other fields differ: zstd).
    narfs("archive", "--secret-key", str(sec), *nix_paths)
    for h, raw in narinfos(narfs.cache).items():
        mine = narinfo_mod.parse(raw, expect_hash=h)
        assert mine.sigs == narinfo_mod.parse(theirs[h]).sigs, mine.store_path


def test_narfs_key_works_in_nix(nix_paths: list[str], tmp_path: Path) -> None:
    key_file = tmp_path / "narfs.sec"
    key_file.write_text(signing.generate_secret_key("narfs-made-1"))
    key_file.chmod(0o600)
    key = signing.load_secret_key(str(key_file))
    nix_pub = run([*NIX, "key", "convert-secret-to-public"],
                  input=key_file.read_text()).stdout.strip()
    assert nix_pub == key.public.text()
    assert signing.parse_public_key(nix_pub).text() == nix_pub

    cache = tmp_path / "cache"
    nix_copy_to(f"file://{cache}", nix_paths)
    run([*NIX, "store", "sign", "--key-file", str(key_file), "--store", f"file://{cache}",
         *nix_paths])
    verify = [*NIX, "store", "verify", "--store", f"file://{cache}", "--no-contents",
              "--sigs-needed", "1", *nix_paths]
    run([*verify, "--trusted-public-keys", key.public.text()])
    other = signing.parse_secret_key(signing.generate_secret_key("narfs-made-1")).public
    assert run([*verify, "--trusted-public-keys", other.text()], check=False).returncode != 0
    for raw in narinfos(cache).values():
        info = narinfo_mod.parse(raw)
        assert info.signed_by(key.public)
        assert not info.signed_by(other)


def test_key_files_must_be_private_and_well_formed(tmp_path: Path) -> None:
    f = tmp_path / "k"
    f.write_text(signing.generate_secret_key("k-1"))
    f.chmod(0o644)
    with pytest.raises(NarfsError, match="readable by others"):
        signing.load_secret_key(str(f))
    f.chmod(0o600)
    signing.load_secret_key(str(f))
    for text in ("", "k-1", "k-1:notbase64!", "k-1:" + "A" * 43 + "=", ":" + "A" * 88):
        f.write_text(text)
        with pytest.raises(NarfsError, match="not a Nix secret key"):
            signing.load_secret_key(str(f))
    with pytest.raises(NarfsError, match="not found"):
        signing.load_secret_key(str(tmp_path / "missing"))


# --- zstd seekable format --------------------------------------------------------------------


def seekable(data: bytes, frame_size: int, writes: list[int], threads: int) -> bytes:
    out = io.BytesIO()
    with ThreadPoolExecutor(threads) as ex:
        w = zstdseek.SeekableWriter(out, frame_size, 1, ex if threads > 1 else None, threads)
        pos = 0
        for n in writes:
            w.write(data[pos:pos + n])
            pos += n
        w.write(data[pos:])
        w.close()
    blob = out.getvalue()
    assert w.size == len(blob)
    assert w.nar_size == len(data)
    assert w.sha256.digest() == hashlib.sha256(blob).digest()
    return blob


def compressible(seed: int, size: int) -> bytes:
    rng = random.Random(seed)
    words = [rng.randbytes(rng.randint(1, 9)) for _ in range(50)]
    out = bytearray()
    while len(out) < size:
        out += rng.choice(words) if rng.random() < 0.9 else rng.randbytes(3)
    return bytes(out[:size])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(size=st.integers(0, 60_000), seed=st.integers(0, 2**32),
       frame_size=st.integers(1, 20_000),
       writes=st.lists(st.integers(0, 9_000), max_size=8), threads=st.sampled_from([1, 2]),
       probes=st.lists(st.tuples(st.integers(0, 70_000), st.integers(0, 30_000)), max_size=8),
       edges=st.lists(st.tuples(st.integers(0, 12), st.integers(-2, 2), st.integers(0, 3),
                                st.integers(-2, 2)), max_size=8))
def test_seek_table_round_trip(size: int, seed: int, frame_size: int, writes: list[int],
                               threads: int, probes: list[tuple[int, int]],
                               edges: list[tuple[int, int, int, int]]) -> None:
    data = compressible(seed, size)
    blob = seekable(data, frame_size, writes, threads)
    f = io.BytesIO(blob)
    table = zstdseek.read_table(f, len(blob))
    assert table is not None
    assert table.size == len(data)
    want_frames = max(1, -(-len(data) // frame_size))
    assert len(table.frames) == want_frames
    got = b"".join(zstdseek.read_frame(f, fr) for fr in table.frames)
    assert got == data
    for fr in table.frames[:-1]:
        assert fr.size == frame_size
    # Reads that start or end at, just before or just after frame boundaries.
    for k, d, m, e in edges:
        offset = max(0, k * frame_size + d)
        probes.append((offset, max(0, (k + m) * frame_size + e - offset)))
    for offset, length in probes:
        want = [i for i, fr in enumerate(table.frames)
                if length > 0 and fr.offset < offset + length and offset < fr.offset + fr.size]
        assert list(table.covering(offset, length)) == want, (offset, length)
        if want:
            covered = b"".join(zstdseek.read_frame(f, table.frames[i]) for i in want)
            start = table.frames[want[0]].offset
            assert covered[offset - start:offset - start + length] == \
                data[offset:offset + length]
    # Read as one stream, the way Nix (or any zstd decoder) does: the seek table is skipped.
    assert b"".join(decompressed_chunks(io.BytesIO(blob), "zstd")) == data


@settings(max_examples=15, deadline=None)
@given(size=st.integers(0, 300_000), seed=st.integers(0, 2**32),
       frame_size=st.sampled_from([4096, 65536, 100_000, 1 << 20]))
def test_zstd_cli_reads_narfs_seekable_files(size: int, seed: int, frame_size: int) -> None:
    """Any zstd decoder reads the file as one stream: the seek table is a skippable frame."""
    data = compressible(seed, size)
    blob = seekable(data, frame_size, [], 2)
    out = subprocess.run(["/usr/bin/zstd", "-d", "-c", "-q"], input=blob, capture_output=True,
                         check=True).stdout
    assert out == data


def test_seek_table_matches_the_reference_layout() -> None:
    """Byte layout from facebook/zstd contrib/seekable_format/zstd_seekable_compression_format.md.
    """
    data = compressible(7, 10_000)
    blob = seekable(data, 4096, [], 1)
    frames, desc, magic = zstdseek.FOOTER.unpack(blob[-9:])
    assert (frames, desc, magic) == (3, 0, 0x8F92EAB1)
    table_len = 8 + 3 * 8 + 9
    skip_magic, body = int.from_bytes(blob[-table_len:][:4], "little"), \
        int.from_bytes(blob[-table_len:][4:8], "little")
    assert skip_magic == 0x184D2A5E and body == table_len - 8
    comp_total = 0
    for i in range(3):
        entry = blob[-table_len + 8 + 8 * i:][:8]
        c, d = int.from_bytes(entry[:4], "little"), int.from_bytes(entry[4:], "little")
        assert d == (4096 if i < 2 else 10_000 - 8192)
        assert blob[comp_total:comp_total + 4] == b"\x28\xb5\x2f\xfd"  # a zstd frame starts
        comp_total += c
    assert comp_total == len(blob) - table_len


@settings(max_examples=120, deadline=None)
@given(seed=st.integers(0, 2**32), edits=st.lists(
    st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.integers(0, 40))
def test_damaged_seekable_files_raise_corrupt_error_only(seed: int, edits, cut: int) -> None:
    data = compressible(seed, 9_000)
    blob = bytearray(seekable(data, 2_000, [], 1))
    for pos, byte in edits:  # mostly in the seek table and the frames' ends, where lies hurt
        blob[-1 - pos % len(blob)] = byte
    if cut:
        del blob[-cut:]
    f = io.BytesIO(bytes(blob))
    try:
        table = zstdseek.read_table(f, len(blob))
        if table is None:
            return
        got = b"".join(zstdseek.read_frame(f, fr) for fr in table.frames)
    except CorruptError:
        return
    assert got == data  # whatever is accepted is the original, thanks to the frame checksums


# --- listings ----------------------------------------------------------------------------------


def test_listing_equals_nix_write_nar_listing(nixstore: NixStore, narfs: Narfs,
                                              tmp_path: Path) -> None:
    path = nixstore.tree(rich_tree(tmp_path / "rich"), "narfs-fmt-listing")
    nix_cache = tmp_path / "nix-cache"
    nix_copy_to(f"file://{nix_cache}?compression=none&write-nar-listing=true", [path])
    h = path[11:43]
    theirs = json.loads((nix_cache / f"{h}.ls").read_bytes())
    narfs("archive", path)
    mine = json.loads((narfs.cache / f"{h}.ls").read_bytes())
    assert mine == theirs
    # Every kind of node really is in there (so the comparison covers them all).
    root = theirs["root"]["entries"]
    assert root["bin"]["entries"]["tool"]["executable"] is True
    assert "executable" not in root["bin"]["entries"]["group-only"]
    assert root["empty-file"] == {"type": "regular", "size": 0,
                                  "narOffset": root["empty-file"]["narOffset"]}
    assert root["empty-dir"] == {"type": "directory", "entries": {}}
    assert root["dangling"] == {"type": "symlink", "target": "does/not/exist"}
    # The parser's listing of Nix's own NAR is the same too, and passes listing validation.
    info = narinfo_mod.parse((nix_cache / f"{h}.narinfo").read_bytes())
    with open(nix_cache / info.url, "rb") as f:
        assert listing_of(f, info.nar_size) == theirs["root"]
    assert listing.parse((narfs.cache / f"{h}.ls").read_bytes(), info.nar_size) == mine["root"]
    # narOffset really points at the contents inside the NAR.
    nar = (nix_cache / info.url).read_bytes()
    leaf = root["nested"]
    for i in range(12):
        leaf = leaf["entries"][f"level-{i}"]
    leaf = leaf["entries"]["leaf"]
    assert nar[leaf["narOffset"]:leaf["narOffset"] + leaf["size"]] == bytes(range(256)) * 40
