"""Every Nix version difference narfs knows (narfs/nixversions.py): the parsers against output
captured from each version, and the live `nix` on PATH (this suite also runs in chroots with
Debian's Nix 2.26 and 2.34, see .ci/run)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import trio
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from mounting import mounted
from t6_mount import assert_same

import hostile
from conftest import Narfs
from narfs import narinfo, nix32, nixversions, zstdseek
from narfs.errors import CorruptError, NarfsError
from narfs.nixversions import NixVersion, parse_version
from narfs.signing import load_secret_key
from nixtools import NIX, NixStore, rich_tree, run, tree_with_a_file_deep_in_it

P = "/nix/store/ab3li50xq0nl4q5lxdyinb8w8y13my9s-f"
NAR_HASH = "sha256:1xmr8jicvzszfzpz46g37mlpvbzjl2wpwvl2b05psipssyp1sm8h"  # the SRI below
SRI = "sha256-EFUdrtf6Rn0LWIJufrmg8q99aT3jGfLvd1//zaJEufY="
CA = "fixed:r:sha256:1xmr8jicvzszfzpz46g37mlpvbzjl2wpwvl2b05psipssyp1sm8h"
INVALID = "/nix/store/00000000000000000000000000000000-x"

# `nix path-info --json P INVALID` as each version prints it (captured 2026-12 from Debian's
# nix-bin; Lix's shape is 2.18's, from its source).
NIX_2_8 = [{"path": INVALID, "valid": False},
           {"path": P, "narHash": SRI, "narSize": 120, "references": [], "ca": CA,
            "registrationTime": 1796285315}]
NIX_2_26 = {INVALID: None,
            P: {"ca": CA, "deriver": None, "narHash": SRI, "narSize": 120, "references": [],
                "registrationTime": 1796285165, "signatures": [], "ultimate": False}}
NIX_2_34_FORMAT_1 = {P: {"ca": CA, "deriver": None, "narHash": SRI, "narSize": 120,
                         "references": [], "registrationTime": 1796285165, "signatures": [],
                         "storeDir": "/nix/store", "ultimate": False, "version": 1}}
NIX_2_34_FORMAT_2 = {"info": {P[11:]: {"ca": {"hash": SRI, "method": "nar"}, "deriver": None,
                                       "narHash": SRI, "narSize": 120, "references": [],
                                       "registrationTime": 1796285165, "signatures": [],
                                       "storeDir": "/nix/store", "ultimate": False,
                                       "version": 2}},
                     "storeDir": "/nix/store", "version": 2}
V2_8 = NixVersion((2, 8, 0))
V2_26 = NixVersion((2, 26, 3))
V2_34 = NixVersion((2, 34, 8))
LIX = NixVersion((2, 93, 0), lix=True)


@pytest.mark.parametrize("doc, v", [(NIX_2_8, V2_8), (NIX_2_8, LIX), (NIX_2_26, V2_26),
                                    (NIX_2_34_FORMAT_1, V2_34), (NIX_2_34_FORMAT_2, V2_34)],
                         ids=["2.8", "lix", "2.26", "2.34-format-1", "2.34-format-2"])
def test_path_info_of_every_shape_reads_the_same(doc: object, v: NixVersion) -> None:
    [info] = nixversions.path_infos(json.dumps(doc).encode(), v)
    assert (info.path, info.nar_hash, info.nar_size, info.ca) == (P, NAR_HASH, 120, CA)
    assert info.references == [] and info.sigs == [] and info.deriver is None


def test_path_info_nulls_and_base_names_become_full_paths() -> None:
    ref = "0c1kpmyc9zbpnsqg5gjq7hxk8v1i8yxf-dep"
    doc = {"info": {P[11:]: {"narHash": {"algorithm": "sha256", "format": "base64",
                                         "hash": SRI[7:]},
                             "narSize": 120, "references": [ref], "deriver": "x-f.drv",
                             "signatures": [{"keyName": "k-1", "sig": "c2ln"}],
                             "registrationTime": None, "ca": None}}}
    [info] = nixversions.path_infos(json.dumps(doc).encode(), V2_34)
    assert info.references == [f"/nix/store/{ref}"]
    assert info.deriver == "/nix/store/x-f.drv"
    assert info.sigs == ["k-1:c2ln"] and info.registration_time == 0 and info.ca is None
    assert info.nar_hash == NAR_HASH


@pytest.mark.parametrize("out", [b"not json", b"42", b'{"p": 7}', b'[{"path": "/nix/store/x"}]',
                                 b'{"/nix/store/x": {"narHash": "md5-x", "narSize": 1}}',
                                 b'{"/nix/store/x": {"narHash": "' + SRI.encode()
                                 + b'", "narSize": -1}}'])
def test_unknown_shape_is_one_line_naming_the_version(out: bytes) -> None:
    with pytest.raises(NarfsError) as e:
        nixversions.path_infos(out, V2_34)
    assert "2.34.8" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("line, release, lix", [
    ("nix (Nix) 2.8.0", (2, 8, 0), False),
    ("nix (Nix) 2.34.8", (2, 34, 8), False),
    ("nix (Lix, like Nix) 2.92.0-dev-pre20250117-0d14c2b", (2, 92, 0), True),
    ("nix (Determinate Nix 3.8.2) 2.30.2", (2, 30, 2), False),
    ("nix (Nix) 2.18", (2, 18, 0), False),
])
def test_version_line(line: str, release: tuple[int, int, int], lix: bool) -> None:
    v = parse_version(line)
    assert (v.release, v.lix) == (release, lix)


def test_flags_follow_the_version() -> None:
    assert nixversions.path_info_args(V2_26) == ["--json"]
    assert nixversions.path_info_args(LIX) == ["--json"]  # Lix's 2.9x has no --json-format
    assert nixversions.path_info_args(V2_34)[-2:] == ["--json-format", "1"]
    assert nixversions.restore_depth_limit(V2_26) is None
    assert nixversions.restore_depth_limit(LIX) is None
    assert nixversions.restore_depth_limit(V2_34) == 64
    assert nixversions.config_show_args(V2_8) == ["show-config"]
    assert nixversions.config_show_args(V2_34) == ["config", "show"]


def test_print_roots_lines_of_every_version() -> None:
    assert nixversions.parse_root_line(f"/r/a b -> {P}") == ("/r/a b", P)
    assert nixversions.parse_root_line(f"'/r/a b' -> {P}") == ("/r/a b", P)  # 2.34
    assert nixversions.parse_root_line("{censored} -> " + P) == ("{censored}", P)
    assert nixversions.parse_root_line("garbage") is None


# --- against the live Nix ---------------------------------------------------------------------

def live() -> NixVersion:
    return trio.run(nixversions.detect)


def test_detects_the_nix_on_path() -> None:
    first = subprocess.run(["nix", "--version"], capture_output=True, text=True,
                           check=True).stdout.splitlines()[0]
    v = live()
    assert v == parse_version(first) and v.release >= (2, 8, 0)


def test_path_info_flags_are_accepted_without_a_warning(tmp_path: Path) -> None:
    """The flags narfs passes make this Nix print JSON narfs reads, and nothing on stderr."""
    v = live()
    f = tmp_path / "f"
    f.write_text("narfs nixversions\n")
    path = subprocess.run(["nix-store", "--add", str(f)], capture_output=True, text=True,
                          check=True).stdout.strip()
    try:
        proc = subprocess.run(["nix", "--extra-experimental-features", "nix-command",
                               "path-info", *nixversions.path_info_args(v), path],
                              capture_output=True, check=True)
        assert proc.stderr == b"", proc.stderr
        [info] = nixversions.path_infos(proc.stdout, v)
        assert info.path == path and info.nar_size > 0
    finally:
        subprocess.run(["nix-store", "--delete", path], capture_output=True, check=False)


def test_config_show_works_on_this_nix() -> None:
    v = live()
    proc = subprocess.run(["nix", "--extra-experimental-features", "nix-command",
                           *nixversions.config_show_args(v)], capture_output=True, text=True,
                          check=True)
    assert "store =" in proc.stdout and "deprecated" not in proc.stderr, proc.stderr


def test_a_nar_too_deep_for_this_nix_is_said_by_verify_and_restore(narfs: Narfs,
                                                                     tmp_path: Path) -> None:
    """Nix 2.34 refuses NARs nested 64 deep; older Nix takes them. verify warns (exit 0: the
    data is intact), restore refuses in one line before Nix runs, `restore --to` unpacks it."""
    limit = nixversions.restore_depth_limit(live())
    path = hostile.write_entry(narfs.cache, load_secret_key(str(narfs.key)), hostile._deep(70),
                               "narfs-deep")
    verify = narfs("verify", check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    warnings = [line for line in verify.stdout.splitlines() if line.startswith("warning:")]
    restore = narfs("restore", path, check=False)
    try:
        if limit is None:
            assert warnings == [], verify.stdout
            assert restore.returncode == 0, restore.stderr
            run(["nix-store", "--verify-path", path])
        else:
            assert warnings == [f"warning: {path}: nests 70 directories deep and Nix "
                                f"{'.'.join(map(str, live().release))} refuses NARs nested "
                                "64 or deeper, so it cannot go back into /nix/store through "
                                "this Nix; `narfs restore --to DIR` unpacks it anywhere else"]
            assert restore.returncode != 0
            [line] = restore.stderr.strip().splitlines()
            assert f"{path}: nests 70 directories deep" in line and "restore --to" in line
            assert not os.path.exists(path)
    finally:
        if os.path.exists(path):
            run(["nix-store", "--delete", path])
    narfs("restore", "--to", str(tmp_path / "out"), path)
    assert (tmp_path / "out" / "/".join(["d"] * 70)).read_bytes() == b"bottom"


def _nix_copy_cache(tmp_path: Path, paths: list[str], url_opts: str) -> Narfs:
    n = Narfs(tmp_path / "narfs")
    n.root.mkdir()
    n.config.write_text(f'cache_dir = "{n.cache}"\n')
    run([*NIX, "copy", "--to", f"file://{n.cache}?{url_opts}", *paths])
    return n


def _as_nix_2_35(cache: Path, frame: int) -> None:
    """Rewrite every NAR of an uncompressed cache the way Nix 2.35 writes zstd NARs:
    independent frames declaring their content size, no seek table (NixOS/nix#15550). The
    signature covers neither URL nor FileHash, so the narinfos stay validly signed."""
    zc = zstandard.ZstdCompressor(level=1, write_content_size=True, write_checksum=True)
    for f in cache.glob("*.narinfo"):
        info = narinfo.parse(f.read_bytes())
        raw = (cache / info.url).read_bytes()
        data = b"".join(zc.compress(raw[i:i + frame]) for i in range(0, len(raw), frame))
        file_hash = nix32.encode(hashlib.sha256(data).digest())
        (cache / info.url).unlink()
        info.url, info.compression = f"nar/{file_hash}.nar.zst", "zstd"
        info.file_hash, info.file_size = f"sha256:{file_hash}", len(data)
        (cache / info.url).write_bytes(data)
        f.write_text(info.render())


def test_nix_2_35_zstd_nars_are_read_frame_by_frame(nixstore: NixStore, tmp_path: Path) -> None:
    """Independent frames with their sizes in the headers are indexed, not copied whole into
    the hot tier: 50 KB deep in a 24 MiB path costs one or two 1 MiB frames."""
    src = tree_with_a_file_deep_in_it(tmp_path / "big", 12)
    p = nixstore.tree(src, "narfs-nix-2-35")
    n = _nix_copy_cache(tmp_path, [p], "compression=none&write-nar-listing=true")
    _as_nix_2_35(n.cache, 1 << 20)
    with mounted(n, tmp_path / "mnt") as m:
        before = m.stats()
        data = (m / os.path.basename(p) / "m-target").read_bytes()
        after = m.stats()
    assert data == (src / "m-target").read_bytes()
    assert after["hot_fills"] == 0, after
    assert 1 <= after["frames_decompressed"] - before["frames_decompressed"] <= 2, after
    verify = n("verify", check=False)  # reads every frame, checks NarHash
    assert verify.returncode == 0, verify.stdout + verify.stderr
    # Nix itself reads such a NAR as one stream.
    cat = subprocess.run([*NIX, "store", "cat", "--store", f"file://{n.cache}",
                          f"{p}/m-target"], capture_output=True, check=True)
    assert cat.stdout == data


def _strip_offsets(node: dict) -> None:
    node.pop("narOffset", None)
    for child in node.get("entries", {}).values():
        _strip_offsets(child)


def test_listings_without_nar_offsets_are_completed_from_the_nar(nixstore: NixStore,
                                                                  tmp_path: Path) -> None:
    """Hydra's and Harmonia's `.ls` have no narOffset: the mount builds the listing from the NAR
    (checked against NarHash) once and reads right; verify does not call the cache damaged."""
    rich = nixstore.tree(rich_tree(tmp_path / "tree", 1 << 20), "narfs-hydra-ls")
    n = _nix_copy_cache(tmp_path, [rich], "compression=zstd&write-nar-listing=true")
    [ls] = n.cache.glob("*.ls")
    doc = json.loads(ls.read_bytes())
    _strip_offsets(doc["root"])
    ls.write_text(json.dumps(doc))
    for _ in range(2):
        with mounted(n, tmp_path / "mnt") as m:
            assert_same(m / os.path.basename(rich), rich)
            parses = m.stats()["nar_parses"]
        assert parses == (1 if _ == 0 else 0), parses  # the completed listing is kept
    verify = n("verify", check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert json.loads(ls.read_bytes()) == doc, "verify must not rewrite an honest listing"


# --- a Nix narfs does not know --------------------------------------------------------------
# No future or too-old Nix is installable here, so these put a stand-in `nix` first on PATH that
# passes everything to the real one except the one answer it changes.

def stand_in_nix(tmp_path: Path, case: str) -> dict[str, str]:
    real = shutil.which("nix")
    assert real
    bindir = tmp_path / f"nix-{case}"
    bindir.mkdir()
    answer = {"too-old": 'case "$*" in *--version*) echo "nix (Nix) 2.7.0"; exit 0;; esac',
              "future-json": 'case "$*" in *path-info*) echo \'{"version": 9, "paths": {}}\';'
                             " exit 0;; esac"}[case]
    (bindir / "nix").write_text(f'#!/bin/sh\n{answer}\nexec {real} "$@"\n')
    (bindir / "nix").chmod(0o755)
    return {"PATH": f"{bindir}:{os.environ['PATH']}"}


@pytest.mark.parametrize("case, says", [
    ("too-old", "Nix 2.7 is too old: narfs needs Nix 2.8 or newer, or Lix"),
    ("future-json", "nix path-info --json of nix (Nix) "),
])
def test_an_unknown_nix_is_one_line_and_nothing_is_written(narfs: Narfs, nixstore: NixStore,
                                                           tmp_path: Path, case: str,
                                                           says: str) -> None:
    p = nixstore.text("narfs unknown nix")
    def published() -> list[str]:  # .narfs/ holds narfs's locks, made by any writer
        return sorted(str(f.relative_to(narfs.cache)) for f in narfs.cache.rglob("*")
                      if ".narfs" not in f.parts)

    before = published()
    proc = narfs("archive", p, check=False,
                 env={**narfs.env, **stand_in_nix(tmp_path, case)})
    assert proc.returncode != 0
    [line] = proc.stderr.strip().splitlines()
    assert says in line, line
    assert published() == before


def test_watch_with_an_unknown_nix_keeps_the_pin(narfs: Narfs, nixstore: NixStore,
                                                 tmp_path: Path) -> None:
    """The service reports the Nix it cannot read and leaves the pin, so nothing is lost."""
    p = nixstore.text("narfs unknown nix watch")
    roots = Path("/nix/var/nix/gcroots") / f"narfs-test-{uuid.uuid4().hex[:12]}"
    roots.mkdir()
    pin = roots / os.path.basename(p)
    pin.symlink_to(p)
    log = tmp_path / "watch.log"
    env = {**narfs.env, **stand_in_nix(tmp_path, "future-json")}
    try:
        with open(log, "wb") as out:
            service = subprocess.Popen([sys.executable, "-m", "narfs.cli", "watch", "--roots",
                                        str(roots)], env=env, stdout=out,
                                       stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            while "narfs does not know this output" not in log.read_text():
                assert service.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            assert "Traceback" not in log.read_text()
            assert pin.is_symlink() and not list(narfs.cache.glob("*.narinfo"))
        finally:
            service.terminate()
            service.wait(10)
    finally:
        shutil.rmtree(roots)


# --- Nix 2.35's zstd NARs, in-process -----------------------------------------------------------

def _independent_frames(data: bytes, frame: int, checksum: bool = True) -> bytes:
    zc = zstandard.ZstdCompressor(write_content_size=True, write_checksum=checksum)
    return b"".join(zc.compress(data[i:i + frame]) for i in range(0, len(data), frame))


@settings(max_examples=40, deadline=None)
@given(data=st.binary(max_size=20_000), frame=st.integers(1, 5000), checksum=st.booleans(),
       skippable=st.binary(max_size=40))
def test_frame_headers_index_what_the_frames_hold(data: bytes, frame: int, checksum: bool,
                                                  skippable: bytes) -> None:
    blob = _independent_frames(data, frame, checksum)
    # a skippable frame (user metadata) anywhere is stepped over
    blob = struct.pack("<II", 0x184D2A53, len(skippable)) + skippable + blob
    table = zstdseek.index_frames(io.BytesIO(blob), len(blob))
    assert table is not None and table.size == len(data)
    f = io.BytesIO(blob)
    assert b"".join(zstdseek.read_frame(f, fr) for fr in table.frames) == data


def test_frames_without_sizes_or_too_large_are_not_indexed() -> None:
    data = os.urandom(3000)
    stream = zstandard.ZstdCompressor().compressobj()  # streaming: no content size, like Nix
    blob = stream.compress(data) + stream.flush()
    assert zstdseek.index_frames(io.BytesIO(blob), len(blob)) is None
    big = zstandard.ZstdCompressor(write_content_size=True).compress(
        bytes(zstdseek.MAX_INDEXED_FRAME + 1))
    assert zstdseek.index_frames(io.BytesIO(big), len(big)) is None


@pytest.mark.parametrize("damage", ["truncated", "reserved-block", "garbage-magic", "tail"])
def test_lying_frame_headers_are_corrupt(damage: str) -> None:
    blob = bytearray(_independent_frames(os.urandom(5000), 2000, checksum=False))
    if damage == "truncated":
        blob = blob[:-10]
    elif damage == "reserved-block":
        header = zstandard.frame_header_size(bytes(blob[:18]))
        blob[header] |= 0b110  # block type 3
    elif damage == "garbage-magic":
        blob[:4] = b"\0\0\0\0"
    else:
        blob += b"\x28\xb5\x2f"  # three bytes of a magic, then the end
    with pytest.raises(CorruptError):
        zstdseek.index_frames(io.BytesIO(bytes(blob)), len(blob))
