"""`.narinfo` files: parsed as untrusted input, rendered exactly as Nix renders them."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from . import nix32
from .errors import CorruptError
from .signing import PublicKey, SecretKey, fingerprint
from .storepath import STORE_DIR, base_name, check_base_name, hash_part

MAX_SIZE = 1 << 20  # a narinfo with a million references is not a narinfo
MAX_INT = 1 << 62
_URL = re.compile(r"nar/[A-Za-z0-9._+-]{1,255}")
COMPRESSIONS = {"none": "", "zstd": ".zst", "xz": ".xz", "bzip2": ".bz2", "br": ".br",
                "gzip": ".gz", "lzip": ".lz", "lz4": ".lz4"}


@dataclass
class NarInfo:
    store_path: str
    url: str
    compression: str
    file_hash: str | None
    file_size: int | None
    nar_hash: str
    nar_size: int
    references: list[str] = field(default_factory=list)  # base names, sorted
    deriver: str | None = None  # base name
    system: str | None = None
    sigs: list[str] = field(default_factory=list)
    ca: str | None = None

    @property
    def hash(self) -> str:
        return hash_part(self.store_path)

    @property
    def name(self) -> str:
        return self.store_path[len(STORE_DIR) + 1:]

    def fingerprint(self) -> bytes:
        refs = [f"{STORE_DIR}/{r}" for r in self.references]
        return fingerprint(self.store_path, self.nar_hash, self.nar_size, refs)

    def sign(self, key: SecretKey) -> None:
        """Add (or replace) this key's signature, keeping every other one."""
        self.sigs = [s for s in self.sigs if not s.startswith(key.name + ":")]
        self.sigs.append(key.sign(self.fingerprint()))

    def signed_by(self, key: PublicKey) -> bool:
        message = self.fingerprint()
        return any(key.verifies(message, s) for s in self.sigs)

    def render(self) -> str:
        lines = [f"StorePath: {self.store_path}", f"URL: {self.url}",
                 f"Compression: {self.compression}"]
        if self.file_hash is not None:
            lines.append(f"FileHash: {self.file_hash}")
        if self.file_size is not None:
            lines.append(f"FileSize: {self.file_size}")
        lines += [f"NarHash: {self.nar_hash}", f"NarSize: {self.nar_size}",
                  "References: " + " ".join(self.references)]
        if self.deriver:
            lines.append(f"Deriver: {self.deriver}")
        if self.system:
            lines.append(f"System: {self.system}")
        lines += [f"Sig: {s}" for s in self.sigs]
        if self.ca:
            lines.append(f"CA: {self.ca}")
        return "\n".join(lines) + "\n"


def _int(value: str, key: str) -> int:
    if not value.isdigit() or int(value) > MAX_INT:
        raise CorruptError(f"narinfo {key} is not a size: {value[:40]!r}")
    return int(value)


def _hash(value: str, key: str) -> str:
    try:
        return nix32.format_sha256(nix32.parse_sha256(value))
    except ValueError as e:
        raise CorruptError(f"narinfo {key}: {e}") from None


def parse(data: bytes, expect_hash: str | None = None) -> NarInfo:
    """Parse an untrusted narinfo; `expect_hash` is the hash its file name claims.

    Invariants on return: the store path is valid and matches the file name, the URL names a
    file directly inside the cache's `nar/` directory, sizes are bounded integers, hashes are
    sha256 in Nix's base-32 form.
    """
    if len(data) > MAX_SIZE:
        raise CorruptError(f"narinfo is {len(data)} bytes, larger than any real one")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise CorruptError("narinfo is not UTF-8 text") from None
    fields: dict[str, str] = {}
    sigs: list[str] = []
    for line in text.splitlines():
        if not line:
            continue
        key, sep, value = line.partition(": ")
        if not sep:
            raise CorruptError(f"narinfo line is not `Key: value`: {line[:60]!r}")
        if key == "Sig":
            sigs.append(value)
        elif key in fields:
            raise CorruptError(f"narinfo has {key} twice")
        else:
            fields[key] = value
    for key in ("StorePath", "URL", "NarHash", "NarSize"):
        if key not in fields:
            raise CorruptError(f"narinfo lacks {key}")
    store_path = fields["StorePath"]
    base_name(store_path)
    if expect_hash is not None and hash_part(store_path) != expect_hash:
        raise CorruptError(f"narinfo {expect_hash}.narinfo describes {store_path}")
    url = fields["URL"]
    if not _URL.fullmatch(url) or ".." in url:
        raise CorruptError(f"narinfo URL {url[:80]!r} points outside the cache's nar/ directory")
    refs = fields.get("References", "").split()
    for ref in refs:
        check_base_name(ref)
    deriver = fields.get("Deriver") or None
    if deriver is not None and deriver != "unknown-deriver":
        check_base_name(deriver)
    compression = fields.get("Compression", "bzip2")
    if compression not in COMPRESSIONS:
        raise CorruptError(f"narinfo Compression {compression[:20]!r} is unknown")
    return NarInfo(
        store_path=store_path,
        url=url,
        compression=compression,
        file_hash=_hash(fields["FileHash"], "FileHash") if "FileHash" in fields else None,
        file_size=_int(fields["FileSize"], "FileSize") if "FileSize" in fields else None,
        nar_hash=_hash(fields["NarHash"], "NarHash"),
        nar_size=_int(fields["NarSize"], "NarSize"),
        references=sorted(refs),
        deriver=deriver,
        system=fields.get("System"),
        sigs=sigs,
        ca=fields.get("CA"),
    )
