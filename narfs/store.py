"""What narfs asks of Nix: path metadata and validity, in as few calls as possible."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import trio

from . import nix32
from .errors import NarfsError

log = logging.getLogger(__name__)

NIX = ["nix", "--extra-experimental-features", "nix-command"]


@dataclass
class PathInfo:
    path: str
    nar_hash: str  # sha256:<nix32>
    nar_size: int
    references: list[str] = field(default_factory=list)  # full store paths
    deriver: str | None = None
    sigs: list[str] = field(default_factory=list)
    ca: str | None = None
    registration_time: int = 0


async def run(cmd: list[str], stdin: bytes | None = None) -> bytes:
    """Run a Nix command; a failure becomes one NarfsError line carrying Nix's own message."""
    try:
        proc = await trio.run_process(cmd, stdin=stdin, capture_stdout=True,
                                      capture_stderr=True, check=False)
    except FileNotFoundError:
        raise NarfsError(f"{cmd[0]}: not found; install Nix (apt-get install nix-bin) or "
                         "put it on PATH") from None
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        msg = err[-1] if err else f"exit status {proc.returncode}"
        raise NarfsError(f"{' '.join(cmd[:4])}: {msg}")
    return proc.stdout


def _info(doc: dict) -> PathInfo:
    deriver = doc.get("deriver")
    return PathInfo(
        path=doc["path"],
        nar_hash=nix32.format_sha256(nix32.parse_sha256(doc["narHash"])),
        nar_size=int(doc["narSize"]),
        references=sorted(doc.get("references", [])),
        deriver=deriver or None,
        sigs=list(doc.get("signatures", [])),
        ca=doc.get("ca") or None,
        registration_time=int(doc.get("registrationTime", 0)),
    )


async def invalid_paths(paths: list[str]) -> list[str]:
    """Those of `paths` the store does not hold."""
    if not paths:
        return []
    out = await run(["nix-store", "--check-validity", "--print-invalid", *paths])
    return out.decode().split()


async def closure_infos(paths: list[str]) -> dict[str, PathInfo]:
    """Metadata for the closures of `paths`, from one `nix path-info --json -r` call."""
    if not paths:
        return {}
    out = await run([*NIX, "path-info", "--json", "--recursive", *paths])
    return {d["path"]: _info(d) for d in json.loads(out) if d.get("valid", True)}


async def all_infos() -> dict[str, PathInfo]:
    out = await run([*NIX, "path-info", "--json", "--all"])
    return {d["path"]: _info(d) for d in json.loads(out) if d.get("valid", True)}
