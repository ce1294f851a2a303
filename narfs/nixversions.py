"""Every difference between the Nix versions narfs supports, in one place.

narfs supports Nix 2.8 (Debian 12) up to the newest release, and Lix. Each difference below says
which versions behave which way, how it was established (measured here against Debian's nix-bin
2.8.0, 2.26.3 and 2.34.8, or read in Nix's source and release notes), and what narfs does:

- `nix path-info --json` (`path_info_args`, `path_infos`):
  - Nix ≤ 2.18 and Lix: a list of objects carrying `path`; an invalid path is
    `{"path": …, "valid": false}`.
  - Nix 2.19–2.32: one object keyed by store path, `null` for an invalid path (NixOS/nix#9242);
    absent fields are `null` from 2.23 (`deriver`, `ca`, `registrationTime` from a file:// store).
  - Nix ≥ 2.33: `--json-format 1|2` (#14704). Plain `--json` warns on stderr that it "will become
    an error"; 2.26 rejects the flag. narfs asks for format 1 (the 2.19 shape plus `version` and
    `storeDir`). Format 2 nests the objects under `info`, keyed by base name, with a structured
    `ca`; format 3 (2.35) structures signatures. The parser takes all of them, so a Nix that makes
    a newer format the default still works, and anything else is one line naming the version.
  - `narHash` is SRI (`sha256-<base64>`) everywhere; the parser also takes `sha256:<nix32|hex>`.
- NAR depth (`restore_depth_limit`): Nix 2.34 refuses any NAR node 64 or more directories below
  the root (`nix-store --dump`, `--restore`, `nix copy`: "exceeds maximum NAR directory depth of
  64"); 2.26 and 2.8 do not. Such a path can still be unpacked by `narfs restore --to`.
- `nix-store --gc --print-roots` (`parse_root_line`): `LINK -> PATH`; Nix 2.34 quotes the link.
- `nix show-config` (`config_show_args`): a deprecated alias of `nix config show` from 2.20 on,
  which 2.8 does not have.
- post-build-hook: Nix 2.8.0 runs it with `OUT_PATHS` empty (#6446) and 2.30–2.31 on rebuilds
  (#14287): `narfs-hook` then reads the outputs from `$DRV_PATH`. Nix 2.35 runs hooks
  asynchronously, up to `max-jobs` at once (#15451): the hook only makes symlinks, each with one
  atomic `symlink(2)`, so concurrent runs cannot interfere.
- zstd NARs (`zstdseek.index_frames`): Nix 2.35 writes independent 16 MiB frames with the content
  size in each header and no seek table (#15550); narfs indexes the frame headers instead of
  decompressing the whole NAR into the hot tier. Nix of every version reads narfs's seekable NARs.
- A binary cache directory in a `file://` URL (`file_store_url`): Nix ≤ 2.17 takes the path
  verbatim but cannot open a URL with a character outside RFC 3986's path grammar (a space, a `%`
  not followed by two hex digits: "don't know how to open Nix store"), and `#` or `?` cut the
  path short (measured with 2.8). 2.18 percent-decodes the path (NixOS/nix 73696ec716, "fix
  double-encoding of URLs"), so `%41` names `A`; 2.32–2.33 hand the file store the path encoded
  again (c436b7a32a: `file:///tmp/a+b` opened `/tmp/a%2Bb`); 2.34 decodes it (224c8182df) — read
  in the source and its commit messages. No one URL names `/tmp/a b` or `/tmp/50%41` on every
  version, so restore hands Nix a path of letters, digits and `/._-` only, which all read
  verbatim: a cache directory with any other character is reached through a link to it.
- A path nix-daemon or the local store will not take for its signatures (`UNTRUSTED_SIGNATURE`):
  "cannot add path '…' because it lacks a valid signature" up to 2.11, "… lacks a signature by a
  trusted key" from 2.12 (NixOS/nix a2a8cb10ac, read in the source). restore adds the way out:
  for a user not in trusted-users, nix-daemon ignores the trusted-public-keys restore passes.
- `.ls` listings: Hydra's lost `narOffset` in 2026 (hydra#1883) and Harmonia never wrote it; the
  mount then builds the listing from the NAR itself (checked against NarHash), once.
"""

from __future__ import annotations

import binascii
import json
import re
from dataclasses import dataclass, field

import trio

from . import nix32
from .errors import NarfsError

OLDEST = (2, 8)  # Debian 12's nix-bin; older Nix is refused with one line


@dataclass(frozen=True, order=True)
class NixVersion:
    """The `nix` on PATH: (major, minor, patch), and whether it is Lix (whose version numbers
    continue from 2.90 but whose interface forked from Nix 2.18)."""

    release: tuple[int, int, int]
    lix: bool = False
    text: str = field(default="", compare=False)

    def at_least(self, major: int, minor: int) -> bool:
        return not self.lix and self.release[:2] >= (major, minor)

    def __str__(self) -> str:
        return self.text or ".".join(map(str, self.release))


_VERSION = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?")


def parse_version(first_line: str) -> NixVersion:
    """`nix (Nix) 2.34.8`, `nix (Lix, like Nix) 2.93.0`, `nix (Determinate Nix 3.8.2) 2.30.2`:
    the implementation in parentheses, the version last."""
    words = first_line.strip().split()
    m = _VERSION.match(words[-1]) if words else None
    if not m:
        raise NarfsError(f"cannot tell the Nix version from `nix --version`: {first_line!r}")
    release = (int(m[1]), int(m[2]), int(m[3] or 0))
    return NixVersion(release, lix="Lix" in first_line, text=first_line.strip())


_detected: NixVersion | None = None


async def detect() -> NixVersion:
    """The version of the `nix` on PATH, asked once per process (~10 ms)."""
    global _detected
    if _detected is None:
        try:
            proc = await trio.run_process(["nix", "--version"], capture_stdout=True,
                                          capture_stderr=True, check=False)
        except FileNotFoundError:
            raise NarfsError("nix: not found; install Nix (apt-get install nix-bin) or put it "
                             "on PATH") from None
        out = proc.stdout.decode(errors="replace").splitlines()
        if proc.returncode != 0 or not out:
            raise NarfsError(f"nix --version failed (exit {proc.returncode}); check the Nix "
                             "installation")
        version = parse_version(out[0])
        if not version.lix and version.release[:2] < OLDEST:
            raise NarfsError(f"Nix {version.release[0]}.{version.release[1]} is too old: narfs "
                             f"needs Nix {OLDEST[0]}.{OLDEST[1]} or newer, or Lix")
        _detected = version
    return _detected


# --- nix path-info --json ---------------------------------------------------------------------

def path_info_args(v: NixVersion) -> list[str]:
    """The flags that make `nix path-info` print JSON without a deprecation warning."""
    return ["--json", "--json-format", "1"] if v.at_least(2, 33) else ["--json"]


@dataclass
class PathInfo:
    """One valid path as `nix path-info --json` describes it, every field checked."""

    path: str
    nar_hash: str  # sha256:<nix32>
    nar_size: int
    references: list[str] = field(default_factory=list)  # full store paths
    deriver: str | None = None  # full store path
    sigs: list[str] = field(default_factory=list)
    ca: str | None = None
    registration_time: int = 0


def path_infos(out: bytes, v: NixVersion, store_dir: str = "/nix/store") -> list[PathInfo]:
    """The valid paths in `nix path-info --json` output of any shape Nix or Lix prints.

    Invalid paths (`valid: false`, `null`) are left out. A shape narfs does not know is one
    NarfsError naming the Nix version, never a KeyError deep in a command.
    """
    def unknown(what: str) -> NarfsError:
        return NarfsError(f"nix path-info --json of {v} printed {what}; narfs does not know "
                          "this output: please report it with your Nix version")

    try:
        doc = json.loads(out)
    except ValueError:
        raise unknown("something that is not JSON") from None
    items: list[tuple[str | None, object]]
    if isinstance(doc, list):  # Nix ≤ 2.18, Lix
        items = [(None, d) for d in doc]
    elif isinstance(doc, dict) and isinstance(doc.get("info"), dict):  # format ≥ 2
        items = list(doc["info"].items())
    elif isinstance(doc, dict):  # Nix 2.19+, format 1
        items = list(doc.items())
    else:
        raise unknown(f"a JSON {type(doc).__name__}")
    infos = []
    for key, d in items:
        if d is None:
            continue
        if not isinstance(d, dict):
            raise unknown(f"a {type(d).__name__} for {key}")
        if d.get("valid") is False:
            continue
        try:
            infos.append(_raw_info(key, d, store_dir))
        except (KeyError, TypeError, ValueError) as e:
            raise unknown(f"an entry narfs cannot read ({key or d.get('path')}: {e})") from None
    return infos


def _full(name: str, store_dir: str) -> str:
    return name if name.startswith("/") else f"{store_dir}/{name}"


def _raw_info(key: str | None, d: dict, store_dir: str) -> PathInfo:
    path = d.get("path") or key
    if not isinstance(path, str):
        raise ValueError("no path")
    refs = d.get("references") or []
    sigs = d.get("signatures") or []
    if not isinstance(refs, list) or not isinstance(sigs, list):
        raise TypeError("references or signatures is not a list")
    deriver = d.get("deriver")
    return PathInfo(
        path=_full(path, store_dir),
        nar_hash=nix32.format_sha256(parse_hash(d["narHash"])),
        nar_size=_count(d["narSize"]),
        references=sorted(_full(str(r), store_dir) for r in refs),
        deriver=_full(deriver, store_dir) if isinstance(deriver, str) and deriver else None,
        sigs=[_signature(s) for s in sigs],
        ca=_content_address(d.get("ca")),
        registration_time=_count(d.get("registrationTime") or 0),
    )


def _count(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 62:
        raise ValueError(f"{value!r} is not a size")
    return value


def parse_hash(value: object) -> bytes:
    """A sha256 as Nix prints it: a string (`nix32.parse_sha256`) or the structured
    `{"algorithm": "sha256", "format": "base64|nix32|base16|sri", "hash": …}` of newer formats."""
    if isinstance(value, dict):
        if value.get("algorithm") != "sha256":
            raise ValueError(f"hash algorithm {str(value.get('algorithm'))[:20]!r}")
        body, fmt = value.get("hash"), value.get("format", "sri")
        if not isinstance(body, str):
            raise ValueError("hash is not a string")
        if fmt == "base64":
            value = "sha256-" + body
        elif fmt in ("nix32", "base16"):
            value = "sha256:" + body
        else:
            value = body
    if not isinstance(value, str):
        raise ValueError("hash is not a string")
    try:
        return nix32.parse_sha256(value)
    except binascii.Error as e:
        raise ValueError(f"bad sha256 {value[:80]!r}: {e}") from None


def _signature(value: object) -> str:
    """`name:base64` (formats 1–2) or `{"keyName", "sig"}` (format 3)."""
    if isinstance(value, dict):
        value = f"{value.get('keyName')}:{value.get('sig')}"
    if not isinstance(value, str) or ":" not in value:
        raise ValueError(f"signature {str(value)[:80]!r}")
    return value


_CA_METHODS = {"nar": "fixed:r:", "flat": "fixed:", "text": "text:", "git": "fixed:git:"}


def _content_address(value: object) -> str | None:
    """The narinfo form of `ca`: a string as Nix ≤ format 1 prints it, or format 2's
    `{"method", "hash"}` turned back into it."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and value.get("method") in _CA_METHODS:
        h = value.get("hash")
        algo = h.get("algorithm") if isinstance(h, dict) else str(h).split("-", 1)[0]
        if algo != "sha256":
            raise ValueError(f"content address with {algo!r}")
        return f"{_CA_METHODS[value['method']]}sha256:{nix32.encode(parse_hash(h))}"
    raise ValueError(f"content address {str(value)[:80]!r}")


# --- other differences -----------------------------------------------------------------------

NAR_DEPTH_LIMIT = 64  # Nix 2.34: a node this many directories below the root is refused


def restore_depth_limit(v: NixVersion) -> int | None:
    """The deepest NAR node (root = 0) this Nix refuses to import, or None when unlimited.
    Measured: 2.34.8 refuses depth 64, 2.26.3 and 2.8.0 take any depth."""
    return NAR_DEPTH_LIMIT if v.at_least(2, 34) else None


def depth_refusal(v: NixVersion | None, deepest: int) -> str | None:
    """Why this Nix cannot import a NAR whose deepest node is `deepest` levels down, or None."""
    limit = restore_depth_limit(v) if v is not None else None
    if v is None or limit is None or deepest < limit:
        return None
    return (f"nests {deepest} directories deep and Nix {'.'.join(map(str, v.release))} refuses "
            f"NARs nested {limit} or deeper, so it cannot go back into /nix/store through this "
            "Nix; `narfs restore --to DIR` unpacks it anywhere else")


_PLAIN_PATH = re.compile(r"/[A-Za-z0-9/._-]*")


def file_store_url(path: str) -> str | None:
    """`file://PATH` when every Nix reads it as PATH, else None (see the module docstring)."""
    return f"file://{path}" if _PLAIN_PATH.fullmatch(path) else None


UNTRUSTED_SIGNATURE = re.compile(r"lacks a (valid signature|signature by a trusted key)")


def config_show_args(v: NixVersion) -> list[str]:
    """`nix config show` where it exists (2.20+, Lix), else the older `nix show-config`."""
    return ["config", "show"] if v.lix or v.at_least(2, 20) else ["show-config"]


def parse_root_line(line: str) -> tuple[str, str] | None:
    """(link, store path) of one `nix-store --gc --print-roots` line; Nix 2.34 quotes the link."""
    link, sep, path = line.rpartition(" -> ")
    if not sep:
        return None
    if len(link) >= 2 and link[0] == link[-1] and link[0] in "'\"":
        link = link[1:-1]
    return link, path.strip()
