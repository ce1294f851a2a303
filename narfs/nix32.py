"""Nix's base-32 encoding (``BaseNix32``): the hash part of store paths and narinfo hashes."""

import base64

ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"
_INDEX = {c: i for i, c in enumerate(ALPHABET)}


def encoded_length(nbytes: int) -> int:
    return (nbytes * 8 - 1) // 5 + 1


def encode(data: bytes) -> str:
    """Characters run from the most significant 5-bit group down, over a little-endian number."""
    n = int.from_bytes(data, "little")
    groups = range(encoded_length(len(data)) - 1, -1, -1)
    return "".join(ALPHABET[(n >> (5 * i)) & 0x1F] for i in groups)


def decode(text: str, nbytes: int = 32) -> bytes:
    if len(text) != encoded_length(nbytes):
        want = encoded_length(nbytes)
        raise ValueError(f"nix-base32 string of length {len(text)}, expected {want}")
    n = 0
    for c in text:
        try:
            n = (n << 5) | _INDEX[c]
        except KeyError:
            raise ValueError(f"invalid nix-base32 character {c!r}") from None
    if n >> (nbytes * 8):
        raise ValueError("nix-base32 string encodes more bits than the hash holds")
    return n.to_bytes(nbytes, "little")


def parse_sha256(text: str) -> bytes:
    """Accept `sha256:<nix32>`, `sha256:<hex>` and SRI `sha256-<base64>`; return the digest."""
    if text.startswith("sha256-"):
        raw = base64.b64decode(text[7:], validate=True)
    elif text.startswith("sha256:"):
        body = text[7:]
        raw = bytes.fromhex(body) if len(body) == 64 else decode(body, 32)
    else:
        raise ValueError(f"not a sha256 hash: {text[:80]!r}")
    if len(raw) != 32:
        raise ValueError("sha256 digest is not 32 bytes")
    return raw


def format_sha256(digest: bytes) -> str:
    """The form narinfos and fingerprints use."""
    return "sha256:" + encode(digest)
