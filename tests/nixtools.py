"""Real Nix for tests: salted builds in the machine's shared /nix, cleaned up afterwards.

Every path a test creates goes through `NixStore`, which roots it with an out-link in the test's
tmp dir while the test runs and `nix-store --delete`s exactly those paths (and their .drv files)
at teardown. Nothing else in /nix is touched.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import trio

from narfs import nixversions
from narfs.nixversions import NixVersion, PathInfo

NIX = ["nix", "--extra-experimental-features", "nix-command"]


def run(cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def nix_string(s: str) -> str:
    return json.dumps(s).replace("${", "\\${")


class NixStore:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.links: list[Path] = []
        self.paths: list[str] = []  # created outputs, oldest first

    def build_expr(self, expr: str) -> list[str]:
        link = self.workdir / f"result-{uuid.uuid4().hex[:8]}"
        out = run(["nix-build", "-E", expr, "--out-link", str(link)]).stdout.split()
        self.links.append(link)
        self.paths += [p for p in out if p not in self.paths]
        return out

    def tree(self, src: Path | str, name: str = "narfs-test", refs: list[str] = (),
             salt: str | None = None) -> str:
        """A store path holding a copy of `src` (a file or a tree), referencing `refs`.

        `refs` are written into `<out>/.refs` (so `src` must be a directory when refs are
        given); they become real references because they are inputs via builtins.storePath.
        """
        salt = salt or uuid.uuid4().hex
        script = "/bin/cp -a \"$src\" \"$out\""
        if refs:
            script += " && /bin/chmod u+w \"$out\" && echo $refs > \"$out/.refs\""
        ref_list = " ".join(f"(builtins.storePath {nix_string(r)})" for r in refs)
        expr = (f"derivation {{ name = {nix_string(name)}; system = builtins.currentSystem; "
                f"builder = \"/bin/sh\"; PATH = \"/usr/bin:/bin\"; salt = {nix_string(salt)}; "
                f"src = {nix_string(str(src))}; refs = [ {ref_list} ]; "
                f"args = [ \"-c\" {nix_string(script)} ]; }}")
        return self.build_expr(expr)[0]

    def text(self, content: str, name: str = "narfs-test", refs: list[str] = ()) -> str:
        """A small store path: a directory with one file `content`, referencing `refs`."""
        src = self.workdir / f"src-{uuid.uuid4().hex[:8]}"
        src.mkdir()
        (src / "content").write_text(content)
        return self.tree(src, name, refs)

    def closure(self, n: int, name: str = "narfs-test") -> list[str]:
        """A chain of `n` small paths, each referencing the previous; returns them oldest first."""
        out: list[str] = []
        for i in range(n):
            out.append(self.text(f"{name} {i} {uuid.uuid4().hex}", f"{name}-{i}",
                                 out[-1:]))
        return out

    def unroot(self) -> None:
        for link in self.links:
            if link.is_symlink():
                link.unlink()
        self.links.clear()

    def cleanup(self) -> None:
        """Delete every path this object created, newest first, with the .drv files."""
        self.unroot()
        drvs = []
        for p in self.paths:
            q = run(["nix-store", "--query", "--deriver", p], check=False).stdout.strip()
            if q.endswith(".drv") and os.path.exists(q):
                drvs.append(q)
        everything = [p for p in self.paths + drvs if os.path.exists(p)]
        if everything and run(["nix-store", "--delete", *everything], check=False).returncode:
            for p in reversed(everything):  # some are gone or still alive: do what can be done
                run(["nix-store", "--delete", p], check=False)
        self.paths.clear()


def rich_tree(root: Path, big: int = 0) -> Path:
    """Every kind of node Nix stores: executables (several exec-bit patterns), symlinks
    (relative, absolute, dangling, to a directory), empty files and dirs, nesting, non-ASCII
    names, names that sort differently bytewise than by case rules; with `big`, a file of that
    many bytes (half incompressible) spanning several zstd frames."""
    root.mkdir()
    (root / "empty-file").write_bytes(b"")
    (root / "empty-dir").mkdir()
    (root / "bin").mkdir()
    for name, mode in (("tool", 0o755), ("user-only", 0o744), ("group-only", 0o654)):
        f = root / "bin" / name
        f.write_text(f"#!/bin/sh\necho {name}\n")
        f.chmod(mode)
    (root / "rel-link").symlink_to("bin/tool")
    (root / "abs-link").symlink_to("/etc/hostname")
    (root / "dangling").symlink_to("does/not/exist")
    (root / "dir-link").symlink_to("nested")
    (root / "ünïcödé — 名前.txt").write_text("non-ASCII name\n")
    (root / "B").write_text("upper\n")
    (root / "a").write_text("lower\n")
    (root / "a b").write_text("space\n")
    deep = root / "nested"
    for i in range(12):
        deep = deep / f"level-{i}"
    deep.mkdir(parents=True)
    (deep / "leaf").write_bytes(bytes(range(256)) * 40)
    (root / "nested" / "empty-dir").mkdir()
    if big:
        (root / "big.bin").write_bytes(os.urandom(big // 2) + b"narfs" * (big // 10))
    return root


@functools.cache
def nix_version() -> NixVersion:
    return trio.run(nixversions.detect)


def path_infos(*args: str) -> dict[str, PathInfo]:
    """`nix path-info ARGS` as narfs reads it (narfs/nixversions.py), by store path: the tests
    never depend on one version's JSON shape."""
    v = nix_version()
    out = subprocess.run([*NIX, "path-info", *nixversions.path_info_args(v), *args],
                         capture_output=True, check=True).stdout
    return {i.path: i for i in nixversions.path_infos(out, v)}


def gc_roots() -> dict[str, str]:
    """`nix-store --gc --print-roots` as link → store path, in whatever form this Nix prints."""
    out = run(["nix-store", "--gc", "--print-roots"]).stdout.splitlines()
    return dict(r for r in map(nixversions.parse_root_line, out) if r is not None)


def delete_paths(paths: list[str]) -> None:
    """Delete store paths so a restore has to bring them back; fails loudly if they stay.

    The .drv files that name them as inputs go too: Nix keeps a path alive while one refers
    to it. Those .drv files belong to the test's own salted builds.
    """
    drvs = {r for p in paths
            for r in run(["nix-store", "--query", "--referrers", p]).stdout.split()
            if r.endswith(".drv")}
    run(["nix-store", "--delete", *paths, *sorted(drvs)])
    for p in paths:
        assert not os.path.exists(p), f"{p} still in the store after nix-store --delete"


class Narfs:
    """The installed `narfs` command, configured for one test's cache via $NARFS_CONFIG."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cache = root / "cache"
        self.key = root / "secret.key"
        self.config = root / "narfs.toml"
        self.env = {**os.environ, "NARFS_CONFIG": str(self.config)}

    def __call__(self, *args: str, check: bool = True, timeout: float = 600,
                 **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "narfs.cli", *args], capture_output=True,
                              text=True, env=kw.pop("env", self.env), timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise AssertionError(f"narfs {' '.join(args)} exited {proc.returncode}:\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc

    def popen(self, *args: str, **kw) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "narfs.cli", *args], env=self.env,
                                **kw)

    @property
    def public_key(self) -> str:
        from narfs.signing import load_secret_key

        return load_secret_key(str(self.key)).public.text()


def tree_with_a_file_deep_in_it(src: Path, mib_each_side: int) -> Path:
    """A directory of `mib_each_side` 1 MiB files of random bytes, `m-target` (50 KB), and as
    many again after it: a small file in the middle of a big path. Returns `src`."""
    src.mkdir()
    for i in range(mib_each_side):
        (src / f"a{i:02}.bin").write_bytes(os.urandom(1 << 20))
    (src / "m-target").write_bytes(os.urandom(50_000))
    for i in range(mib_each_side):
        (src / f"z{i:02}.bin").write_bytes(os.urandom(1 << 20))
    return src


def on_a_terminal(narfs: Narfs, *args: str, env: dict[str, str] | None = None) -> str:
    """Run narfs under script(1), as on a terminal 120 columns wide (`env` added to its
    environment); its whole output."""
    import shlex

    # script's terminal has no size unless given one, and tqdm draws nothing 0 columns wide.
    cmd = "stty cols 120 rows 40; " + shlex.join([sys.executable, "-m", "narfs.cli", *args])
    proc = subprocess.run(["script", "-qec", cmd, "/dev/null"], capture_output=True,
                          text=True, env={**narfs.env, **(env or {})}, timeout=300)
    assert proc.returncode == 0, f"narfs {' '.join(args)} on a terminal:\n{proc.stdout}"
    return proc.stdout


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The error a failed narfs command printed: exactly one `narfs: error:` line."""
    assert proc.returncode != 0, proc.stdout
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("narfs: error: ")
    return proc.stderr


@contextlib.contextmanager
def nobody_narfs() -> Iterator[Narfs]:
    """An initialised cache and config that the user `nobody` can read (pytest's tmp dirs are
    root's alone), removed afterwards."""
    shared = Path(tempfile.mkdtemp(prefix="narfs-nobody-", dir="/tmp"))
    try:
        shared.chmod(0o755)
        n = Narfs(shared)
        n.cache.mkdir()
        n("init", "--cache", str(n.cache), "--secret-key", str(n.key))
        n.config.chmod(0o644)
        yield n
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(shared)], check=False)


def nix_copy_from(cache: Path, paths: list[str], public_key: str) -> None:
    """Restore through Nix itself, signatures required and only our key trusted."""
    run(["nix", "--extra-experimental-features", "nix-command", "copy", "--from",
         f"file://{cache}", "--option", "trusted-public-keys", public_key,
         "--option", "require-sigs", "true", *paths])


@contextlib.contextmanager
def nix_daemon(directory: Path, config: str = "",
               env: dict[str, str] | None = None) -> Iterator[dict[str, str]]:
    """A nix-daemon of the machine's store on a private socket in `directory` (its log there
    too), `config` added to its settings and `env` to its environment; yields the environment
    of a client that reaches the store through it (multi-user Nix). Stopped when the block
    ends."""
    sock = directory / "daemon.sock"
    env = {**os.environ, **(env or {}), "NIX_DAEMON_SOCKET_PATH": str(sock),
           "NIX_CONFIG": os.environ.get("NIX_CONFIG", "") + config}
    env.pop("NIX_REMOTE", None)
    log = directory / "daemon.log"
    with open(log, "wb") as out:
        daemon = subprocess.Popen(["nix-daemon"], env=env, stdin=subprocess.DEVNULL,
                                  stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while not sock.exists():
            assert daemon.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        yield {**os.environ, "NIX_REMOTE": "daemon", "NIX_DAEMON_SOCKET_PATH": str(sock)}
    finally:
        daemon.terminate()
        try:
            daemon.wait(10)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
