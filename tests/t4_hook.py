"""Tests of narfs-hook, the Nix post-build-hook (systemd/narfs-hook), against a real Nix store.

The hook is a sh script, so it is run as a program, with real store paths from salted
throwaway derivations that are deleted again at teardown.

Facts about Nix 2.8.0 these tests rely on (checked on the machine they were written on):

- Nix runs the hook with the environment of the process that runs the build, plus
  DRV_PATH, OUT_PATHS and NIX_CONFIG. Single-user (no daemon) that is the environment
  of the nix-build caller, so NARFS_ROOTS set there reaches the hook and no wrapper
  script is needed. With a daemon it is the daemon's environment instead (hence the
  NixOS module wraps the hook when roots_dir is not the default).
- Nix 2.8.0 sets OUT_PATHS *empty* (NixOS/nix#6446; DRV_PATH is right). The hook then
  reads the output paths from the .drv file, which the end-to-end test exercises.
- The hook's stderr shows up in the build log prefixed with "post-build-hook: ".
- A symlink in a directory under /nix/var/nix/gcroots is a GC root: `nix-store --gc
  --print-roots` lists it and `nix-store --delete` refuses the path.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import Narfs
from nixtools import gc_roots, nix_string, run

HOOK_IN_TREE = Path(__file__).resolve().parent.parent / "systemd" / "narfs-hook"
GCROOTS = Path("/nix/var/nix/gcroots")
# "narfs-hook: <what>, <path>: <fix>"
REPORT = re.compile(r"^narfs-hook: [^,\n]+, [^\n]+: [^\n]+$")

pytestmark = pytest.mark.skipif(
    shutil.which("nix-store") is None or shutil.which("nix-instantiate") is None,
    reason="needs Nix (nix-store, nix-instantiate, nix-build)",
)


def hook_path() -> Path:
    """The hook in this tree, else the installed one (pip installs it as a script)."""
    if HOOK_IN_TREE.is_file():
        return HOOK_IN_TREE
    found = shutil.which("narfs-hook")
    if found is None:
        pytest.fail("narfs-hook is neither at systemd/narfs-hook nor on PATH")
    return Path(found)


# Not conftest's NixStore: it builds with nix-build --out-link, which roots (and
# returns) only the "out" output, while these tests need every output of a
# multi-output build, unrooted, so that only the hook's pin keeps them alive.
# (conftest sets NIX_REMOTE=local and empties the substituters.)

def salted_expr(outputs: tuple[str, ...], extra: str = "") -> str:
    """A derivation no one else has built, with the given outputs, each a one-line file."""
    salt = uuid.uuid4().hex
    script = "; ".join(f"echo {salt} > ${o}" for o in outputs)
    outs = " ".join(nix_string(o) for o in outputs)
    return (
        'derivation { name = "narfs-test-hook"; system = builtins.currentSystem; '
        f'builder = "/bin/sh"; {extra} outputs = [ {outs} ]; '
        f'args = [ "-c" {nix_string(script)} ]; }}'
    )


def delete_from_store(paths: list[str]) -> None:
    """Best-effort removal of the test's store paths (the .drv with its outputs)."""
    existing = [p for p in paths if os.path.lexists(p)]
    if existing:
        run(["nix-store", "--delete", *existing], check=False)


class Build:
    def __init__(self, drv: str, outputs: list[str]) -> None:
        self.drv = drv
        self.outputs = outputs


@pytest.fixture(scope="module")
def built() -> Iterator[Build]:
    """A fresh three-output build; its paths are unpinned here, so tests pin them."""
    drv = run(["nix-instantiate", "-E", salted_expr(("out", "dev", "doc"))]).stdout.strip()
    outputs: list[str] = []
    try:
        outputs = run(["nix-store", "--realise", drv]).stdout.split()
        assert len(outputs) == 3, outputs
        yield Build(drv, outputs)
    finally:
        if not outputs:
            outputs = run(["nix-store", "--query", "--outputs", drv], check=False).stdout.split()
        delete_from_store([*outputs, drv])


def run_hook(env: dict[str, str], roots: Path | None = None) -> subprocess.CompletedProcess[str]:
    # /dev/null as the config: not a regular file, so the hook reads no roots_dir from it
    # (whatever /etc/narfs/narfs.toml this machine has).
    full = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "NARFS_CONFIG": "/dev/null", **env}
    if roots is not None:
        full["NARFS_ROOTS"] = str(roots)
    return subprocess.run([str(hook_path())], env=full, capture_output=True, text=True, timeout=30)


def report_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    lines = proc.stderr.splitlines()
    for line in lines:
        assert REPORT.match(line), f"not a one-line report: {line!r}"
    return lines


def assert_pinned(roots: Path, paths: list[str]) -> None:
    for p in paths:
        link = roots / os.path.basename(p)
        assert link.is_symlink(), f"{link} missing"
        assert os.readlink(link) == p


def test_hook_is_an_executable_sh_script() -> None:
    hook = hook_path()
    assert os.access(hook, os.X_OK)
    assert hook.read_text().startswith("#!/bin/sh\n")


def test_pins_every_out_path_and_creates_roots_dir(tmp_path: Path, built: Build) -> None:
    roots = tmp_path / "missing" / "roots"
    proc = run_hook({"OUT_PATHS": " ".join(built.outputs)}, roots)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert_pinned(roots, built.outputs)
    assert sorted(os.listdir(roots)) == sorted(os.path.basename(p) for p in built.outputs)
    assert roots.stat().st_mode & 0o777 == 0o755


def test_blank_separated_out_paths_and_idempotence(tmp_path: Path, built: Build) -> None:
    roots = tmp_path / "roots"
    out_paths = "  " + "\n\t ".join(built.outputs) + " "
    for _ in range(2):  # the second run finds every pin in place and leaves it
        proc = run_hook({"OUT_PATHS": out_paths}, roots)
        assert (proc.returncode, proc.stderr) == (0, "")
    assert_pinned(roots, built.outputs)
    assert len(os.listdir(roots)) == 3


def test_reads_outputs_from_drv_when_out_paths_is_empty(tmp_path: Path, built: Build) -> None:
    """Nix 2.8.0 passes OUT_PATHS="" (NixOS/nix#6446): DRV_PATH has to do."""
    roots = tmp_path / "roots"
    proc = run_hook({"OUT_PATHS": "", "DRV_PATH": built.drv}, roots)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert_pinned(roots, built.outputs)


def test_unreadable_drv_is_reported(tmp_path: Path) -> None:
    roots = tmp_path / "roots"
    for drv in (str(tmp_path / "x.drv"), "/nix/store/00000000000000000000000000000000-missing.drv"):
        proc = run_hook({"OUT_PATHS": "", "DRV_PATH": drv}, roots)
        assert proc.returncode == 0
        [line] = report_lines(proc)
        assert drv in line
    assert not roots.exists() or os.listdir(roots) == []


def test_floating_ca_outputs_are_reported(tmp_path: Path) -> None:
    """Their paths are not in the .drv; with Nix 2.8.0's empty OUT_PATHS there is no
    cheap way to learn them (`nix-store --query --outputs` refuses too)."""
    expr = salted_expr(("out",), '__contentAddressed = true; outputHashMode = "recursive"; '
                                 'outputHashAlgo = "sha256";')
    drv = run(["nix-instantiate", "--extra-experimental-features", "ca-derivations",
               "-E", expr]).stdout.strip()
    roots = tmp_path / "roots"
    try:
        assert '("out","","r:sha256","")' in Path(drv).read_text()
        proc = run_hook({"OUT_PATHS": "", "DRV_PATH": drv}, roots)
        assert proc.returncode == 0
        [line] = report_lines(proc)
        assert f", {drv}: " in line
        assert not roots.exists()
    finally:
        delete_from_store([drv])


def test_repoints_a_wrong_pin_without_writing_through_it(tmp_path: Path, built: Build) -> None:
    roots = tmp_path / "roots"
    roots.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    link = roots / os.path.basename(built.outputs[0])
    link.symlink_to(elsewhere)  # a link to a directory: plain `ln -sf` would write into it
    proc = run_hook({"OUT_PATHS": built.outputs[0]}, roots)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert os.readlink(link) == built.outputs[0]
    assert os.listdir(elsewhere) == []


def test_leaves_a_non_symlink_in_place_and_reports(tmp_path: Path, built: Build) -> None:
    roots = tmp_path / "roots"
    roots.mkdir()
    squatter = roots / os.path.basename(built.outputs[0])
    squatter.mkdir()  # `ln -s` onto a directory would create a link inside it
    proc = run_hook({"OUT_PATHS": " ".join(built.outputs[:2])}, roots)
    assert proc.returncode == 0
    [line] = report_lines(proc)
    assert str(squatter) in line
    assert squatter.is_dir() and not squatter.is_symlink() and os.listdir(squatter) == []
    assert_pinned(roots, built.outputs[1:2])


def test_non_store_paths_are_reported_and_the_rest_pinned(tmp_path: Path, built: Build) -> None:
    roots = tmp_path / "roots"
    bad = [
        str(tmp_path),                                      # not in the store
        built.outputs[0] + "/inside",                       # not top-level
        "/nix/store/00000000000000000000000000000000-gone",  # not there
        "/nix/store/*",                                     # must not be globbed
        "relative/path",
    ]
    proc = run_hook({"OUT_PATHS": " ".join([bad[0], built.outputs[1], *bad[1:]])}, roots)
    assert proc.returncode == 0
    lines = report_lines(proc)
    assert len(lines) == len(bad)
    for path, line in zip(bad, lines, strict=True):
        assert f", {path}: " in line
    assert sorted(os.listdir(roots)) == [os.path.basename(built.outputs[1])]
    assert_pinned(roots, built.outputs[1:2])


@pytest.mark.parametrize("where", ["file", "under-file"])
def test_unwritable_roots_dir_is_reported_and_exit_0(
    tmp_path: Path, built: Build, where: str
) -> None:
    blocker = tmp_path / "roots-is-a-file"
    blocker.write_text("not a directory\n")
    roots = blocker if where == "file" else blocker / "roots"
    proc = run_hook({"OUT_PATHS": " ".join(built.outputs)}, roots)
    assert proc.returncode == 0
    [line] = report_lines(proc)
    assert f", {roots}: " in line
    assert blocker.read_text() == "not a directory\n"


@pytest.mark.parametrize("env", [{"OUT_PATHS": ""}, {"OUT_PATHS": "  "}, {}],
                         ids=["empty", "blank", "unset"])
def test_nothing_to_pin_is_reported_and_exit_0(tmp_path: Path, env: dict[str, str]) -> None:
    roots = tmp_path / "roots"
    proc = run_hook(env, roots)
    assert proc.returncode == 0
    [line] = report_lines(proc)
    assert "OUT_PATHS" in line
    assert not roots.exists()


def test_concurrent_hooks_pin_once_and_quietly(tmp_path: Path, built: Build) -> None:
    roots = tmp_path / "roots"
    env = {"OUT_PATHS": " ".join(built.outputs)}
    with ThreadPoolExecutor(8) as pool:
        procs = list(pool.map(lambda _: run_hook(env, roots), range(16)))
    for proc in procs:
        assert (proc.returncode, proc.stderr) == (0, "")
    assert_pinned(roots, built.outputs)
    assert len(os.listdir(roots)) == 3


@pytest.fixture
def gcroots_dir() -> Iterator[Path]:
    """A roots dir inside Nix's gcroots, removed however the test ends."""
    assert os.access(GCROOTS, os.W_OK), f"{GCROOTS} is not writable: run the tests as root"
    roots = GCROOTS / f"narfs-test-{uuid.uuid4().hex}"
    try:
        yield roots
    finally:
        shutil.rmtree(roots, ignore_errors=True)


def test_end_to_end_nix_build_pins_a_gc_root(gcroots_dir: Path) -> None:
    expr = salted_expr(("out", "lib"))
    # Nix hands its own environment to the hook: NARFS_ROOTS set here reaches it.
    env = {**os.environ, "NARFS_ROOTS": str(gcroots_dir), "NARFS_CONFIG": "/dev/null"}
    drv = run(["nix-instantiate", "-E", expr]).stdout.strip()
    outputs = run(["nix-store", "--query", "--outputs", drv]).stdout.split()
    try:
        proc = run(["nix-build", "--option", "post-build-hook", str(hook_path()),
                    "--no-out-link", "-E", expr], env=env)
        assert "post-build-hook: narfs-hook" not in proc.stderr, proc.stderr
        assert_pinned(gcroots_dir, outputs)

        roots = gc_roots()
        for p in outputs:
            assert roots.get(str(gcroots_dir / os.path.basename(p))) == p, roots

        refused = run(["nix-store", "--delete", outputs[0]], check=False)
        assert refused.returncode != 0
        assert "still alive" in refused.stderr
        assert os.path.exists(outputs[0])
        assert_pinned(gcroots_dir, outputs)
    finally:
        shutil.rmtree(gcroots_dir, ignore_errors=True)
        delete_from_store([*outputs, drv])
    assert not any(os.path.lexists(p) for p in outputs), "unpinned outputs were not deleted"


def set_roots_line(config: Path, line: str) -> None:
    kept = [ln for ln in config.read_text().splitlines()
            if not ln.lstrip().startswith("roots_dir")]
    config.write_text("\n".join([*kept, line]) + "\n")


def test_roots_dir_in_the_config_is_where_hook_watch_and_status_look(
        tmp_path: Path, built: Build, narfs: Narfs) -> None:
    """Issue 11: after roots_dir changes in narfs.toml, the hook pins where `narfs watch`
    and `narfs status` look, not in $NARFS_ROOTS or the default."""
    pins, elsewhere = tmp_path / "pins", tmp_path / "elsewhere"
    set_roots_line(narfs.config, f'roots_dir = "{pins}"')
    env = {"OUT_PATHS": " ".join(built.outputs), "NARFS_CONFIG": str(narfs.config)}
    proc = run_hook(env)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert_pinned(pins, built.outputs)
    assert "pins waiting: 3 " in narfs("status").stdout

    # NARFS_ROOTS left over in the daemon's environment loses to the config, and says so.
    moved = tmp_path / "moved"
    set_roots_line(narfs.config, f"  roots_dir\t=  '{moved}'   # changed by the user")
    proc = run_hook(env, elsewhere)
    assert proc.returncode == 0
    [line] = report_lines(proc)
    assert "NARFS_ROOTS ignored" in line and str(moved) in line, line
    assert_pinned(moved, built.outputs)
    assert not elsewhere.exists()
    status = narfs("status").stdout
    assert "pins waiting: 3 " in status, status

    # A watch started before the change (or with --roots) still looks elsewhere: status says so.
    watch = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "narfs",
                              "watch"])
    try:
        (narfs.cache / ".narfs" / "watch.json").write_text(json.dumps(
            {"pid": watch.pid, "started": 1.0, "roots_dir": str(pins)}))
        status = narfs("status").stdout
        assert f"watches {pins}, but narfs-hook pins in {moved}" in status, status
    finally:
        watch.kill()
        watch.wait()

    # A spelling the hook would read differently from TOML is refused by narfs itself.
    for bad in (f'roots_dir = "{pins}\\\\x"', f'roots_dir = """{pins}"""', 'roots_dir = "rel"'):
        set_roots_line(narfs.config, bad)
        res = narfs("status", check=False)
        assert res.returncode == 1 and "roots_dir" in res.stderr, (bad, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1
