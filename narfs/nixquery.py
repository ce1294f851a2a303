"""What narfs asks of Nix: path metadata and validity, in as few calls as possible; the
version and effective settings of the `nix` on PATH (doctor, remote mounts' trusted keys)."""

from __future__ import annotations

import json
import logging
import subprocess

import trio

from . import nixversions
from .errors import NarfsError
from .nixversions import NixVersion, PathInfo

log = logging.getLogger(__name__)

NIX = ["nix", "--extra-experimental-features", "nix-command"]


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


async def _path_infos(*args: str) -> dict[str, PathInfo]:
    """`nix path-info` JSON, whatever the version prints, as PathInfo by store path."""
    v = await nixversions.detect()
    out = await run([*NIX, "path-info", *nixversions.path_info_args(v), *args])
    return {i.path: i for i in nixversions.path_infos(out, v)}


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
    return await _path_infos("--recursive", *paths)


async def all_infos() -> dict[str, PathInfo]:
    return await _path_infos("--all")


# --- blocking: for doctor and the remote mount's setup, outside any trio loop -------------


def _nix(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*NIX, *args], capture_output=True, text=True, timeout=60)


def nix_version() -> NixVersion | str:
    """The `nix` on PATH, or why it cannot be used."""
    try:
        proc = subprocess.run(["nix", "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"nix --version: {e}"
    try:
        return nixversions.parse_version((proc.stdout.splitlines() or [""])[0])
    except NarfsError as e:
        return str(e)


def nix_settings(v: NixVersion) -> dict[str, object] | None:
    """Nix's effective settings (nix.conf, includes, $NIX_CONFIG), or None."""
    try:
        proc = _nix(*nixversions.config_show_args(v), "--json")
        doc = json.loads(proc.stdout) if proc.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return None
    if not isinstance(doc, dict):
        return None
    return {k: v.get("value") if isinstance(v, dict) else v for k, v in doc.items()}
