"""`.ls` listings: rendered as Nix writes them, read back as untrusted input."""

from __future__ import annotations

import json
from typing import TypeGuard

from .errors import CorruptError
from .nar import MAX_DEPTH, MAX_NAME, MAX_TARGET

MAX_SIZE = 256 << 20


# A listing nests two JSON levels per directory, and json (encoder and decoder) stops near
# Python's recursion limit: trees deeper than this (Nix makes them; see nar.MAX_DEPTH) get no
# `.ls` and no catalog listing, and are read from their NAR instead.
MAX_LS_DEPTH = 256


def depth(root: dict) -> int:
    """How many directories deep the tree goes (iteratively: it may be deep)."""
    deepest = 0
    stack = [(root, 0)]
    while stack:
        node, d = stack.pop()
        deepest = max(deepest, d)
        entries = node.get("entries") if isinstance(node, dict) else None
        if isinstance(entries, dict):
            stack.extend((child, d + 1) for child in entries.values())
    return deepest


def render(root: dict) -> bytes | None:
    """The `.ls` document, or None for a tree deeper than MAX_LS_DEPTH."""
    if depth(root) > MAX_LS_DEPTH:
        return None
    return json.dumps({"version": 1, "root": root}, separators=(",", ":")).encode()


def parse(data: bytes, nar_size: int | None = None) -> dict:
    """Validate a listing and return its root node.

    Invariants on return: every node has a known type; names are safe single components;
    every regular file's [narOffset, narOffset+size) lies inside the NAR when its size is known.
    narOffset may be absent (Hydra's listings since 2026, Harmonia's): whoever reads file
    contents through a listing needs it and completes the listing from the NAR instead.
    """
    if len(data) > MAX_SIZE:
        raise CorruptError(f"listing is {len(data)} bytes, larger than narfs accepts")
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        raise CorruptError("listing is not valid JSON") from None
    if not isinstance(doc, dict) or doc.get("version") != 1 \
            or not isinstance(doc.get("root"), dict):
        raise CorruptError("listing is not a version 1 .ls document")
    root = doc["root"]
    stack = [(root, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise CorruptError("listing nests too deep")
        kind = node.get("type")
        if kind == "directory":
            entries = node.get("entries")
            if not isinstance(entries, dict):
                raise CorruptError("listing directory without entries")
            for name, child in entries.items():
                raw = name.encode("utf-8", "surrogateescape")
                if (not name or name in (".", "..") or "/" in name or "\0" in name
                        or len(raw) > MAX_NAME or not isinstance(child, dict)):
                    raise CorruptError(f"listing has an unsafe entry {name[:64]!r}")
                stack.append((child, depth + 1))
        elif kind == "regular":
            size, offset = node.get("size"), node.get("narOffset")
            if not is_count(size) or (offset is not None and not is_count(offset)):
                raise CorruptError("listing regular file without a valid size")
            if nar_size is not None and offset is not None and offset + size > nar_size:
                raise CorruptError("listing points a file outside its NAR")
            if node.get("executable", False) not in (True, False):
                raise CorruptError("listing executable flag is not a boolean")
        elif kind == "symlink":
            target = node.get("target")
            if not isinstance(target, str) or not target or "\0" in target \
                    or len(target.encode("utf-8", "surrogateescape")) > MAX_TARGET:
                raise CorruptError("listing symlink without a valid target")
        else:
            raise CorruptError(f"listing node of unknown type {str(kind)[:20]!r}")
    return root


def is_count(value: object) -> TypeGuard[int]:
    """A size or offset from untrusted JSON: an int (not a bool), non-negative, far from
    overflowing anything it is added to."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 62


def agrees(ls: dict, from_nar: dict) -> bool:
    """Whether a `.ls` root says what the listing parsed from its NAR says. Listings written by
    Hydra (since 2026) and Harmonia carry no narOffset at all; such a listing agrees when all
    the rest matches (the mount completes it from the NAR)."""
    if ls == from_nar:
        return True
    return not _any_offset(ls) and ls == _without_offsets(from_nar)


def _any_offset(root: dict) -> bool:
    stack = [root]
    while stack:
        node = stack.pop()
        if "narOffset" in node:
            return True
        stack.extend(node.get("entries", {}).values())
    return False


def _without_offsets(root: dict) -> dict:
    out: dict = {}
    stack = [(root, out)]
    while stack:
        node, copy = stack.pop()
        copy.update((k, v) for k, v in node.items() if k not in ("narOffset", "entries"))
        if "entries" in node:
            copy["entries"] = {}
            for name, child in node["entries"].items():
                copy["entries"][name] = {}
                stack.append((child, copy["entries"][name]))
    return out
