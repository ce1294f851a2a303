"""The NixOS module, package.nix and flake.nix evaluated by nixpkgs' own lib, as plain data.

tests/nix/eval.nix runs lib.evalModules over systemd/narfs.nix (or flake.nix's module) with
tests/nix/nixos-options.nix, the NixOS options the module sets declared with NixOS's types,
and tests/nix/pkgs.nix, a stand-in pkgs with nixpkgs' names. Nothing is built. nixpkgs' lib
is found in a `shared/nixpkgs-lib` folder beside the checkout or above it (CI:
../shared/nixpkgs-lib), or at $NARFS_NIXPKGS_LIB; without it the caller's test is skipped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from nixtools import run

REPO = Path(__file__).resolve().parent.parent
EVAL = REPO / "tests" / "nix" / "eval.nix"


def nixpkgs_lib() -> Path:
    given = os.environ.get("NARFS_NIXPKGS_LIB")
    candidates = [Path(given)] if given else [
        d / "shared" / "nixpkgs-lib" / "lib" for d in REPO.parents]
    for lib in candidates:
        if (lib / "default.nix").is_file():
            return lib
    pytest.skip("nixpkgs' lib not found: put it at ../shared/nixpkgs-lib/lib beside the "
                "checkout or name it in $NARFS_NIXPKGS_LIB")


def repo_files() -> list[str]:
    """Every file of the checkout, relative (walked: CI's chroots cannot read a worktree's git)."""
    skip = {".git", "__pycache__", ".pytest_cache", ".hypothesis", "bench-out", ".ruff_cache"}
    files = []
    for root, dirs, names in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in skip]
        files += [os.path.relpath(os.path.join(root, n), REPO) for n in names]
    return sorted(files)


def evaluate(config: dict, *, via: str = "module", package_dir: Path | None = None,
             modules: tuple[Path, ...] = (), bin_dirs: dict[str, str] | None = None,
             check: bool = True) -> dict:
    """tests/nix/eval.nix's plain-data view of a NixOS configuration with the module."""
    cmd = ["nix-instantiate", "--eval", "--strict", "--json", str(EVAL),
           "--argstr", "libPath", str(nixpkgs_lib()),
           "--argstr", "configJSON", json.dumps(config),
           "--argstr", "via", via,
           "--argstr", "binJSON", json.dumps(bin_dirs or {}),
           "--argstr", "filesJSON", json.dumps(repo_files()),
           "--arg", "modulePaths", "[ " + " ".join(json.dumps(str(m)) for m in modules) + " ]"]
    if package_dir is not None:
        cmd += ["--argstr", "packageDir", str(package_dir)]
    proc = run(cmd, check=False)
    if not check:
        return {"returncode": proc.returncode, "stderr": proc.stderr}
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)
