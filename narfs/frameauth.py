"""Signed frame hashes (`<hash>.auth`): what lets a remote mount check every listing and every
frame it reads against the cache's key without reading whole NARs (docs/SECURITY.md, "Remote
mounts").

A narinfo's signature covers the store path, NarHash, NarSize and references, i.e. the whole
NAR; checking NarHash means reading all of it. Beside each narinfo narfs writes

    {"version": 1, "storePath": ..., "narHash": ..., "narSize": N, "fileSize": N,
     "ls": "<base64 sha256 of the .ls file>" | null,
     "frames": [[compressed size, size, "<base64 sha256 of the compressed frame>"], ...],
     "sig": "<key name>:<base64 Ed25519 signature>"}

signed by the cache's key over `narfs-auth-1;<storePath>;<narHash>;<sha256 of the document
without "sig", canonical JSON>`. A client that trusts the key and holds the path's verified
narinfo (same storePath and narHash) then knows the NAR file's size and seek table without
fetching them, and checks each frame it fetches and the `.ls` against their hashes: a server
that changes any byte gives EIO, never other bytes. The frames of a seekable NAR are followed
by exactly `zstdseek.encode_table(sizes)` (narfs writes no checksums), so the table the client
builds from the document is the file's own.

Cost: ~60 bytes a frame (a 100 MiB path in 4 MiB frames: ~2 KB); one sha256 pass over the
compressed NAR when archiving (33 ms for a 100 MiB NAR compressed to 50 MiB, against 0.33 s
to compress it on one thread); one request per path opened (it replaces the request for the
seek table at the NAR's end); one sha256 per frame read.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

from .cache import Cache, read_small, write_atomic
from .errors import CorruptError
from .narinfo import NarInfo
from .signing import PublicKey, SecretKey
from .storepath import is_hash
from .zstdseek import Frame, SeekTable, encode_table, read_table

log = logging.getLogger(__name__)

SUFFIX = ".auth"
VERSION = 1
MAX_SIZE = 64 << 20  # 1 TiB of NAR in 1 MiB frames
_CHUNK = 1 << 20


def path(cache: Cache, h: str) -> str:
    return os.path.join(cache.root, f"{h}{SUFFIX}")


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def _fingerprint(doc: dict) -> bytes:
    body = {k: v for k, v in doc.items() if k != "sig"}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"))
                            .encode()).hexdigest()
    return f"narfs-auth-1;{doc['storePath']};{doc['narHash']};{digest}".encode()


def document(info: NarInfo, nar_path: str, ls: bytes | None) -> dict | None:
    """The unsigned document for a seekable NAR narfs wrote; None when the NAR is not one."""
    with open(nar_path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        table = read_table(f, size)
        if table is None or table.comp_size + len(
                encode_table([(fr.comp_size, fr.size) for fr in table.frames])) != size:
            return None
        frames = []
        for fr in table.frames:
            f.seek(fr.comp_offset)
            sha = hashlib.sha256()
            left = fr.comp_size
            while left:
                chunk = f.read(min(left, _CHUNK))
                if not chunk:
                    raise CorruptError(f"{nar_path}: ends inside frame at {fr.comp_offset}")
                sha.update(chunk)
                left -= len(chunk)
            frames.append([fr.comp_size, fr.size, _b64(sha.digest())])
    return {"version": VERSION, "storePath": info.store_path, "narHash": info.nar_hash,
            "narSize": info.nar_size, "fileSize": size,
            "ls": _b64(hashlib.sha256(ls).digest()) if ls is not None else None,
            "frames": frames}


def build(info: NarInfo, nar_path: str, ls: bytes | None, key: SecretKey) -> bytes | None:
    """The signed document for a seekable NAR narfs wrote; None when the NAR is not one."""
    doc = document(info, nar_path, ls)
    if doc is None:
        return None
    doc["sig"] = key.sign(_fingerprint(doc))
    return json.dumps(doc, separators=(",", ":")).encode()


def _listing_bytes(cache: Cache, h: str) -> bytes | None:
    try:
        return read_small(cache.listing_path(h), MAX_SIZE)
    except FileNotFoundError:
        return None


def problem(cache: Cache, info: NarInfo, key: PublicKey) -> str | None:
    """Why the path's `.auth` is not the one a remote mount needs (missing, not signed by
    `key`, or not matching the NAR's frames or the `.ls`), or None; None too for a NAR without
    frames to sign. For `narfs verify`, on an entry whose NAR matched its NarHash."""
    where = path(cache, info.hash)
    want = document(info, cache.nar_path(info.url), _listing_bytes(cache, info.hash))
    if want is None:
        return None
    try:
        data = read_small(where, MAX_SIZE)
    except FileNotFoundError:
        return (f"signed frame hashes {info.hash}{SUFFIX} missing: remote mounts fetch "
                "this path whole")
    except (OSError, CorruptError) as e:
        return f"signed frame hashes {info.hash}{SUFFIX} unreadable: {e}"
    try:
        verify(data, info, [key], where)
        got = json.loads(data)
    except CorruptError as e:
        return f"signed frame hashes {e}"
    if {k: v for k, v in got.items() if k != "sig"} != want:
        return (f"signed frame hashes {info.hash}{SUFFIX} do not match its NAR's frames or its "
                "listing: remote mounts refuse them")
    return None


def publish(cache: Cache, key: SecretKey | None, infos: Iterable[NarInfo]) -> None:
    """Write the `.auth` of paths just published (after their narinfos: a crash in between
    leaves a path without one, which clients read unauthenticated, with a warning, until the
    next archive of it). Failures are logged: the archive is intact without them."""
    if key is None:
        return
    for info in infos:
        try:
            data = build(info, cache.nar_path(info.url), _listing_bytes(cache, info.hash), key)
            if data is not None:
                write_atomic(path(cache, info.hash), data)
        except (OSError, CorruptError) as e:
            log.warning("%s: signed frame hashes not written (%s); remote mounts read this "
                        "path unauthenticated", info.store_path, e)


def drop_orphans(cache: Cache, names: Iterable[str]) -> None:
    """Remove the `.auth` files among directory entry `names` whose narinfo is gone (gc)."""
    for name in names:
        if name.endswith(SUFFIX) and is_hash(h := name[:-len(SUFFIX)]) and not cache.has(h):
            try:
                os.unlink(os.path.join(cache.root, name))
            except FileNotFoundError:
                pass


@dataclass
class Auth:
    """A verified `.auth`: the file's size, its seek table and the hashes to check."""

    file_size: int
    ls: bytes | None
    table: SeekTable
    hashes: list[bytes]
    tail: bytes  # the seek table frame the file ends with

    def check_frame(self, index: int, data: bytes, where: str) -> None:
        if hashlib.sha256(data).digest() != self.hashes[index]:
            raise CorruptError(f"{where}: frame {index} is not the one the cache's key signed "
                               "(changed on the server)")

    def check_listing(self, data: bytes, where: str) -> None:
        if self.ls is not None and hashlib.sha256(data).digest() != self.ls:
            raise CorruptError(f"{where}: not the listing the cache's key signed (changed on "
                               "the server)")


def verify(data: bytes, info: NarInfo, keys: list[PublicKey], where: str) -> Auth:
    """Parse and check an `.auth` against trusted keys and the (verified) narinfo."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        raise CorruptError(f"{where}: not JSON") from None
    if not isinstance(doc, dict) or doc.get("version") != VERSION:
        raise CorruptError(f"{where}: not a narfs frame-hash file of version 1")
    sig = doc.get("sig")
    if doc.get("storePath") != info.store_path or doc.get("narHash") != info.nar_hash \
            or doc.get("narSize") != info.nar_size:
        raise CorruptError(f"{where}: written for another NAR than its narinfo's")
    if not isinstance(sig, str) or not any(k.verifies(_fingerprint(doc), sig) for k in keys):
        raise CorruptError(f"{where}: not signed by a trusted key")
    frames, size, ls = doc.get("frames"), doc.get("fileSize"), doc.get("ls")
    if not isinstance(frames, list) or type(size) is not int:
        raise CorruptError(f"{where}: malformed")
    out, hashes = [], []
    comp = dec = 0
    try:
        for c, d, digest in frames:
            raw = base64.b64decode(digest, validate=True)
            if type(c) is not int or type(d) is not int or c <= 0 or d < 0 or len(raw) != 32:
                raise ValueError
            out.append(Frame(comp, c, dec, d))
            hashes.append(raw)
            comp += c
            dec += d
        ls_digest = None if ls is None else base64.b64decode(ls, validate=True)
    except (ValueError, TypeError):
        raise CorruptError(f"{where}: malformed frame list") from None
    tail = encode_table([(f.comp_size, f.size) for f in out])
    if dec != info.nar_size or comp + len(tail) != size:
        raise CorruptError(f"{where}: frames do not add up to the NAR's sizes")
    return Auth(size, ls_digest, SeekTable(out), hashes, tail)
