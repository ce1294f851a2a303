"""Tests of the deployment files in systemd/: units, nginx server block, nix.conf and
narfs.toml examples, the NixOS module and the hook's syntax.

Each file is checked with the real tool where the machine has it (systemd-analyze,
nginx, Nix), and by reading it otherwise, so a typo fails here and not on a server.

Facts found while writing these (Debian 12, systemd 252, Nix 2.8.0, nginx 1.22):
- `systemd-analyze verify` works without systemd as PID 1; it fails a unit whose
  ExecStart= binary is missing, so the units are checked with a stub `narfs`.
- Nix, run as root on the local store, remounts /nix/store read-write for itself
  when it finds it read-only (makeStoreWritable). Under ProtectSystem=strict,
  /nix/store is read-only but not a mount point on a non-NixOS install, the
  remount fails ("remounting /nix/store writable: Invalid argument") and so does
  every nix command. BindReadOnlyPaths=/nix/store makes it one; see
  test_nix_store_works_under_protect_system_strict.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from narfs.nixversions import config_show_args, detect
from nixtools import NIX, NixStore, path_infos, run

SYSTEMD = Path(__file__).resolve().parent.parent / "systemd"
UNITS = ("narfs-watch.service", "narfs-mount.service", "narfs-gc.service", "narfs-gc.timer")
NARFS = "/usr/local/bin/narfs"
CONFIG_ENV = "NARFS_CONFIG=/etc/narfs/narfs.toml"
HASH32 = "0123456789abcdfghijklmnpqrsvwxyz"  # Nix's base32 alphabet

needs_nix = pytest.mark.skipif(shutil.which("nix-instantiate") is None, reason="needs Nix")


# ---------------------------------------------------------------- units

def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """systemd's unit syntax: sections of repeatable Key=Value lines, # and ; comments."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        assert not line.endswith("\\"), f"{path.name}:{n}: keep unit lines unbroken"
        if line.startswith("["):
            assert line.endswith("]"), f"{path.name}:{n}: {raw!r}"
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path.name}:{n}: key before any section"
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z]+", key), f"{path.name}:{n}: {raw!r}"
        current.setdefault(key, []).append(value.strip())
    return sections


def one(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> str:
    values = unit[section].get(key, [])
    assert len(values) == 1, f"[{section}] {key}: {values}"
    return values[0]


def words(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> list[str]:
    return [w for v in unit[section].get(key, []) for w in v.split()]


@pytest.fixture(scope="module")
def units() -> dict[str, dict[str, dict[str, list[str]]]]:
    return {name: parse_unit(SYSTEMD / name) for name in UNITS}


def test_watch_unit(units: dict) -> None:
    u = units["narfs-watch.service"]
    assert one(u, "Service", "Type") == "notify"
    assert one(u, "Service", "ExecStart") == f"{NARFS} watch"
    # the sandbox binds /nix/store and /nix/var, which Nix makes only on first use
    assert one(u, "Service", "ExecStartPre") == "+/bin/mkdir -p /nix/store /nix/var/nix"
    assert one(u, "Service", "Restart") == "always"
    assert one(u, "Service", "RestartSec")
    assert one(u, "Service", "TimeoutStopSec") == "30"
    assert CONFIG_ENV in words(u, "Service", "Environment")
    assert one(u, "Service", "ProtectSystem") == "strict"
    # the cache dir, the roots dir, and Nix's state that every nix-store call writes
    rw = words(u, "Service", "ReadWritePaths")
    assert {"/var/lib/narfs", "-/nix/var", "-/nix/var/nix/gcroots/narfs"} <= set(rw)
    assert words(u, "Service", "BindReadOnlyPaths") == ["-/nix/store"]
    assert one(u, "Service", "PrivateTmp") == "yes"
    assert one(u, "Service", "NoNewPrivileges") == "yes"
    assert one(u, "Service", "ProtectHome") == "read-only"
    # Nix needs unshare(CLONE_NEWNS) and mount(2) to remount the store for itself
    assert words(u, "Service", "RestrictNamespaces") == ["mnt"]
    assert "@mount" not in one(u, "Service", "SystemCallFilter")
    assert "CAP_SYS_ADMIN" not in one(u, "Service", "CapabilityBoundingSet")
    assert one(u, "Install", "WantedBy") == "multi-user.target"


def test_gc_unit_and_timer(units: dict) -> None:
    gc, timer = units["narfs-gc.service"], units["narfs-gc.timer"]
    watch = units["narfs-watch.service"]
    assert one(gc, "Service", "Type") == "oneshot"
    assert one(gc, "Service", "ExecStart") == f"{NARFS} gc"
    assert CONFIG_ENV in words(gc, "Service", "Environment")
    assert "Install" not in gc  # started by the timer only
    # gc runs nix as root like the watch: the same sandbox, minus the roots dir
    skip = {"Type", "ExecStartPre", "ExecStart", "Restart", "RestartSec", "TimeoutStopSec", "Nice",
            "CPUSchedulingPolicy", "IOSchedulingClass", "IOSchedulingPriority", "ReadWritePaths"}
    watch_sandbox = {k: v for k, v in watch["Service"].items() if k not in skip}
    gc_sandbox = {k: v for k, v in gc["Service"].items() if k not in skip}
    assert gc_sandbox == watch_sandbox
    assert words(gc, "Service", "ReadWritePaths") == ["/var/lib/narfs", "-/nix/var"]
    assert one(timer, "Timer", "OnCalendar") == "daily"
    assert one(timer, "Timer", "Persistent") == "true"
    assert one(timer, "Timer", "RandomizedDelaySec")
    assert one(timer, "Install", "WantedBy") == "timers.target"


# Options that give a service its own mount namespace: a FUSE mount made inside one
# would be invisible outside the service.
NAMESPACING = {
    "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateMounts",
    "PrivateNetwork", "PrivateUsers", "ReadWritePaths", "ReadOnlyPaths", "InaccessiblePaths",
    "BindPaths", "BindReadOnlyPaths", "TemporaryFileSystem", "ProtectKernelTunables",
    "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups", "ProtectHostname",
    "ProtectProc", "ProcSubset", "RootDirectory", "RootImage", "MountAPIVFS",
    "StateDirectory", "RuntimeDirectory", "CacheDirectory", "LogsDirectory", "DynamicUser",
}


def test_mount_unit(units: dict) -> None:
    u = units["narfs-mount.service"]
    assert one(u, "Service", "Type") == "notify"
    assert one(u, "Service", "ExecStart") == f"{NARFS} mount --foreground /mnt/nar-archive"
    assert "ExecStop" not in u["Service"]
    assert "local-fs.target" in words(u, "Unit", "After")
    assert CONFIG_ENV in words(u, "Service", "Environment")
    assert one(u, "Service", "TimeoutStopSec") == "30"
    assert not NAMESPACING & set(u["Service"]), NAMESPACING & set(u["Service"])
    assert one(u, "Install", "WantedBy") == "multi-user.target"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """verify wants every ExecStart= binary to exist: point the units at a stub narfs."""
    stub = tmp_path / "bin" / "narfs"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    copies = []
    for name in UNITS:
        copy = tmp_path / name
        copy.write_text((SYSTEMD / name).read_text().replace(NARFS, str(stub)))
        copies.append(str(copy))
    proc = run(["systemd-analyze", "verify", "--man=no", *copies], cwd=tmp_path, check=False)
    ours = [line for line in proc.stderr.splitlines() if any(n in line for n in UNITS)]
    assert proc.returncode == 0 and not ours, proc.stderr


def test_nix_store_works_under_protect_system_strict() -> None:
    """Emulates the watch unit's mounts with unshare(1): / read-only, /nix/var
    writable, and /nix/store read-only but its own mount point."""
    if shutil.which("unshare") is None or shutil.which("nix-store") is None:
        pytest.skip("needs unshare and nix-store")
    script = """
        set -e
        mount --make-rprivate /
        mount --bind /nix/var /nix/var
        if [ "$1" = bind ]; then
            mount --bind /nix/store /nix/store
            mount -o remount,bind,ro /nix/store
        fi
        mount -o remount,bind,ro /
        if touch /nix/store/.narfs-probe 2>/dev/null; then
            rm -f /nix/store/.narfs-probe
            echo "the store is writable: not what the unit sets up" >&2
            exit 7
        fi
        exec nix-store --gc --print-roots
    """
    probe = run(["unshare", "-m", "true"], check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot unshare a mount namespace here: {probe.stderr.strip()}")
    if not os.path.ismount("/nix/store"):  # as on Debian; NixOS bind-mounts it already
        without = run(["unshare", "-m", "sh", "-c", script, "sh", "plain"], check=False)
        assert without.returncode != 0, without.stderr
        assert "remounting /nix/store writable" in without.stderr
    with_bind = run(["unshare", "-m", "sh", "-c", script, "sh", "bind"], check=False)
    assert with_bind.returncode == 0, with_bind.stderr


# ---------------------------------------------------------------- examples

def test_toml_example_matches_the_other_files() -> None:
    conf = tomllib.loads((SYSTEMD / "narfs.toml.example").read_text())
    assert conf == {
        "cache_dir": "/var/lib/narfs/cache",
        "secret_key_file": "/var/lib/narfs/secret.key",
        "roots_dir": "/nix/var/nix/gcroots/narfs",
        "mountpoint": "/mnt/nar-archive",
    }
    hook = (SYSTEMD / "narfs-hook").read_text()
    assert "roots=${NARFS_ROOTS:-" + conf["roots_dir"] + "}" in hook
    assert f"root {conf['cache_dir']};" in (SYSTEMD / "nginx-narfs.conf").read_text()
    assert f"file://{conf['cache_dir']}?priority=10" in (SYSTEMD / "nix.conf.example").read_text()
    assert conf["mountpoint"] in (SYSTEMD / "narfs-mount.service").read_text()


@needs_nix
def test_nix_conf_example_is_accepted_by_nix(tmp_path: Path) -> None:
    """Nix reads the example (with a real key for the placeholder) without warnings."""
    secret, public = tmp_path / "sk", tmp_path / "pk"
    run(["nix-store", "--generate-binary-cache-key", "narfs-test-1", str(secret), str(public)])
    key = public.read_text().strip()
    text = (SYSTEMD / "nix.conf.example").read_text()
    assert text.count("<public key printed by narfs init>") == 1
    (tmp_path / "nix.conf").write_text(text.replace("<public key printed by narfs init>", key))
    env = {**os.environ, "NIX_CONF_DIR": str(tmp_path),
           "NIX_USER_CONF_FILES": str(tmp_path / "none")}
    env.pop("NIX_CONFIG", None)  # conftest's would override the example
    proc = run([*NIX, *config_show_args(trio.run(detect))], env=env)
    assert proc.stderr == ""
    shown = dict(line.split(" = ", 1) for line in proc.stdout.splitlines() if " = " in line)
    assert shown["post-build-hook"] == "/usr/local/bin/narfs-hook"
    assert shown["substituters"].split() == [
        "https://cache.nixos.org/", "file:///var/lib/narfs/cache?priority=10"]
    assert key in shown["trusted-public-keys"].split()


# ---------------------------------------------------------------- hook syntax

def test_hook_parses_as_posix_sh() -> None:
    hook = str(SYSTEMD / "narfs-hook")
    for shell in ("sh", "dash", "bash"):
        if shutil.which(shell):
            flags = ["--posix", "-n"] if shell == "bash" else ["-n"]
            proc = run([shell, *flags, hook], check=False)
            assert (proc.returncode, proc.stderr) == (0, ""), (shell, proc.stderr)


# ---------------------------------------------------------------- NixOS module

@needs_nix
def test_nixos_module_parses() -> None:
    # --parse also resolves every variable (the module avoids `with lib;` so it can)
    run(["nix-instantiate", "--parse", str(SYSTEMD / "narfs.nix")])


# A minimal stand-in for nixpkgs' lib and pkgs: enough to evaluate the module's
# options and config with plain Nix, so bad attribute paths and type errors show.
STUB_EVAL = r"""
{ modulePath, overridesJSON, package, dash }:
let
  recursiveUpdate = a: b: a // builtins.mapAttrs (n: v:
    if builtins.isAttrs v && builtins.isAttrs (a.${n} or null)
    then recursiveUpdate a.${n} v else v) b;
  lib = {
    mkOption = o: o // { _isOption = true; };
    mkEnableOption = d: { _isOption = true; default = false; description = d; };
    mkIf = cond: v: if cond then v else { };
    mkMerge = builtins.foldl' recursiveUpdate { };
    optional = c: x: if c then [ x ] else [ ];
    optionalString = c: s: if c then s else "";
    concatStringsSep = builtins.concatStringsSep;
    escapeShellArg = s: "'" + builtins.replaceStrings [ "'" ] [ "'\\''" ] s + "'";
    literalExpression = text: { _type = "literalExpression"; inherit text; };
    types = { str = "str"; int = "int"; bool = "bool"; package = "package"; nullOr = t: "nullOr"; };
  };
  pkgs = {
    narfs = package;
    inherit dash;
    fuse3 = "/nix/store/00000000000000000000000000000000-fuse3";
    coreutils = "/nix/store/00000000000000000000000000000000-coreutils";
    util-linux = "/nix/store/00000000000000000000000000000000-util-linux";
    # the script's text rides along after '#', for the test to run it
    writeScript = name: text: "/nix/store/00000000000000000000000000000000-${name}#${text}";
  };
  module = import modulePath;
  defaultsOf = builtins.mapAttrs (n: o: if o._isOption or false then o.default else defaultsOf o);
  options = (module { config = throw "options must not need config"; inherit lib pkgs; }).options;
  config = {
    services.narfs = recursiveUpdate (defaultsOf options.services.narfs)
      (builtins.fromJSON overridesJSON);
    nix.package = "/nix/store/00000000000000000000000000000000-nix";
  };
in (module { inherit config lib pkgs; }).config
"""


@pytest.fixture(scope="module")
def store_path(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh store path (a directory holding `content`), deleted again at teardown."""
    if shutil.which("nix-build") is None:
        pytest.skip("needs Nix")
    store = NixStore(tmp_path_factory.mktemp("nix"))
    try:
        yield store.text(f"narfs systemd test {uuid.uuid4().hex}\n", "narfs-test-systemd")
    finally:
        store.cleanup()


@pytest.fixture(scope="module")
def fake_package() -> Iterator[Path]:
    """A "package" whose bin/narfs-hook is the hook in this tree."""
    with tempfile.TemporaryDirectory(prefix="narfs-pkg-") as d:
        (Path(d) / "bin").mkdir()
        (Path(d) / "bin" / "narfs-hook").symlink_to(SYSTEMD / "narfs-hook")
        yield Path(d)


def eval_module(tmp_path: Path, package: Path, overrides: dict) -> dict:
    stub = tmp_path / "stub.nix"
    stub.write_text(STUB_EVAL)
    dash = shutil.which("dash") or "/bin/dash"
    proc = run([
        "nix-instantiate", "--eval", "--strict", "--json", str(stub),
        "--argstr", "modulePath", str(SYSTEMD / "narfs.nix"),
        "--argstr", "overridesJSON", json.dumps(overrides),
        "--argstr", "package", str(package),
        "--argstr", "dash", str(Path(dash).resolve().parent.parent),
    ])
    return json.loads(proc.stdout)


@needs_nix
def test_nixos_module_defaults(tmp_path: Path, fake_package: Path) -> None:
    cfg = eval_module(tmp_path, fake_package, {"enable": True, "publicKey": "k-1:abc="})
    assert cfg["nix"]["settings"] == {
        "post-build-hook": f"{fake_package}/bin/narfs-hook",
        "substituters": ["file:///var/lib/narfs/cache?priority=10"],
        "trusted-public-keys": ["k-1:abc="],
    }
    toml = tomllib.loads(cfg["environment"]["etc"]["narfs/narfs.toml"]["text"])
    assert toml == tomllib.loads((SYSTEMD / "narfs.toml.example").read_text())
    services = cfg["systemd"]["services"]
    assert set(services) == {"narfs-watch", "narfs-gc", "narfs-mount"}
    watch = services["narfs-watch"]["serviceConfig"]
    assert (watch["Type"], watch["Restart"], watch["TimeoutStopSec"]) == ("notify", "always", 30)
    assert watch["ExecStart"] == f"{fake_package}/bin/narfs watch"
    assert watch["ExecStartPre"] == f"{fake_package}/bin/narfs init"
    assert services["narfs-watch"]["environment"]["NARFS_CONFIG"] == "/etc/narfs/narfs.toml"
    assert watch["ReadWritePaths"] == ["/var/lib/narfs/cache", "/nix/var/nix/gcroots/narfs"]
    narfs = f"{fake_package}/bin/narfs"
    assert services["narfs-gc"]["serviceConfig"]["ExecStart"] == f"{narfs} gc --older-than '365d'"
    mount = services["narfs-mount"]["serviceConfig"]
    assert mount["ExecStart"] == f"{narfs} mount --foreground '/mnt/nar-archive'"
    assert not NAMESPACING & set(mount)
    assert cfg["systemd"]["timers"]["narfs-gc"]["timerConfig"]["OnCalendar"] == "daily"
    assert "nginx" not in cfg.get("services", {})


@needs_nix
def test_nixos_module_options(tmp_path: Path, fake_package: Path, store_path: str) -> None:
    roots = tmp_path / "roots"
    cfg = eval_module(tmp_path, fake_package, {
        "enable": True, "rootsDir": str(roots), "mountpoint": None, "cacheDir": "/srv/cache",
        "gc": {"maxSize": "500G", "dates": "weekly"},
        "nginx": {"enable": True, "virtualHost": "arch"},
    })
    assert "narfs-mount" not in cfg["systemd"]["services"]
    assert "mountpoint" not in tomllib.loads(cfg["environment"]["etc"]["narfs/narfs.toml"]["text"])
    gc = cfg["systemd"]["services"]["narfs-gc"]["serviceConfig"]["ExecStart"]
    assert gc.endswith("narfs gc --older-than '365d' --max-size '500G'")
    assert cfg["systemd"]["timers"]["narfs-gc"]["timerConfig"]["OnCalendar"] == "weekly"
    assert cfg["nix"]["settings"]["trusted-public-keys"] == []
    vhost = cfg["services"]["nginx"]["virtualHosts"]["arch"]
    assert vhost["root"] == "/srv/cache"
    example = (SYSTEMD / "nginx-narfs.conf").read_text()
    conf_locations = re.findall(r"^\s*location (.+?) \{$", example, re.M)
    assert sorted(vhost["locations"]) == sorted(conf_locations)

    # A non-default roots dir reaches the hook through a wrapper: run it.
    hook = cfg["nix"]["settings"]["post-build-hook"]
    assert hook.startswith("/nix/store/") and "#" in hook
    wrapper = tmp_path / "wrapper"
    wrapper.write_text(hook.split("#", 1)[1])
    wrapper.chmod(0o755)
    proc = subprocess.run([str(wrapper)], env={"PATH": os.environ["PATH"], "OUT_PATHS": store_path},
                          capture_output=True, text=True, timeout=30)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert os.readlink(roots / os.path.basename(store_path)) == store_path


# ---------------------------------------------------------------- nginx

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_user() -> str:
    for name in ("www-data", "nginx", "nobody"):
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            continue
        return f"{name} {grp.getgrgid(pw.pw_gid).gr_name}"
    return "root root"


def nginx_conf(base: Path, cache: Path, port: int) -> Path:
    server = (SYSTEMD / "nginx-narfs.conf").read_text()
    server, n1 = re.subn(r"^(\s*)listen 5000;$", rf"\1listen 127.0.0.1:{port};", server,
                         flags=re.M)
    server, n2 = re.subn(r"^\s*listen \[::\]:5000;\n", "", server, flags=re.M)
    server, n3 = re.subn(r"^(\s*)root /var/lib/narfs/cache;$", rf"\1root {cache};", server,
                         flags=re.M)
    assert (n1, n2, n3) == (1, 1, 1), "the example's listen/root lines changed shape"
    conf = base / "nginx.conf"
    conf.write_text(f"""
user {worker_user()};
worker_processes 1;
daemon off;
pid {base}/nginx.pid;
error_log {base}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {base}/client_body;
    proxy_temp_path {base}/proxy;
{server}
}}
""")
    return conf


NARINFO = "0" * 32 + ".narinfo"
LISTING = "1" * 32 + ".ls"
NAR = "nar/" + "a" * 52 + ".nar.zst"


@pytest.fixture(scope="module")
def served_cache(request: pytest.FixtureRequest) -> Iterator[tuple[str, Path, str]]:
    """nginx serving a cache dir that also holds things it must refuse, plus a
    store path copied in by `nix copy`; yields (base URL, cache dir, store path)."""
    nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    if nginx is None:
        pytest.skip("nginx not installed")
    base = Path(tempfile.mkdtemp(prefix="narfs-nginx-"))
    base.chmod(0o755)  # the worker user must reach the cache dir
    cache = base / "cache"
    (cache / "nar").mkdir(parents=True)
    files = {
        "nix-cache-info": "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 10\n",
        NARINFO: "StorePath: /nix/store/" + "0" * 32 + "-x\n",
        LISTING: '{"version":1,"root":{"type":"regular","size":0}}',
        NAR: "not really zstd",
        # narfs's own state and temporaries (narfs/cache.py), and a misplaced key
        ".narfs/catalog.sqlite": "narfs state", ".narfs/catalog.sqlite-wal": "",
        ".narfs/watch.json": "{}", ".narfs/hot/" + "c" * 52 + ".nar": "hot",
        ".narfs-tmp-1234": "partial", "nar/.narfs-tmp-5678": "partial",
        NARINFO + ".narfs-tmp-9": "partial", "secret.key": "k:s",
    }
    for name, text in files.items():
        (cache / name).parent.mkdir(parents=True, exist_ok=True)
        (cache / name).write_text(text)
    copied = ""
    proc: subprocess.Popen[bytes] | None = None
    try:
        if shutil.which("nix"):
            copied = request.getfixturevalue("store_path")
            run([*NIX, "copy", "--to",
                 f"file://{cache}?compression=zstd&write-nar-listing=true", copied])
        for root, dirs, names in os.walk(cache):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o755)
            for f in names:
                os.chmod(os.path.join(root, f), 0o644)
        port = free_port()
        conf = nginx_conf(base, cache, port)
        args = [nginx, "-c", str(conf), "-p", str(base), "-e", str(base / "error.log")]
        test = run([*args, "-t"], check=False)
        assert test.returncode == 0, test.stderr
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            assert proc.poll() is None, (base / "error.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "nginx did not start listening"
                time.sleep(0.02)
        yield f"http://127.0.0.1:{port}", cache, copied
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        shutil.rmtree(base, ignore_errors=True)


def fetch(url: str) -> tuple[int, str, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=10) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("Content-Type", ""), b""


@pytest.mark.parametrize(("path", "content_type"), [
    ("nix-cache-info", "text/x-nix-cache-info"),
    (NARINFO, "text/x-nix-narinfo"),
    (LISTING, "application/json"),
    (NAR, "application/x-nix-nar"),
])
def test_nginx_serves_the_cache(
    served_cache: tuple[str, Path, str], path: str, content_type: str
) -> None:
    url, cache, _ = served_cache
    status, ctype, body = fetch(f"{url}/{path}")
    assert (status, ctype) == (200, content_type)
    assert body == (cache / path).read_bytes()


@pytest.mark.parametrize("path", [
    ".narfs/catalog.sqlite", ".narfs/catalog.sqlite-wal", ".narfs/watch.json",
    ".narfs/hot/" + "c" * 52 + ".nar", ".narfs/", ".narfs-tmp-1234", "nar/.narfs-tmp-5678",
    NARINFO + ".narfs-tmp-9", "secret.key", "", "nar/", "nar", "missing.narinfo",
    "0" * 31 + ".narinfo", "nar/../.narfs/watch.json",
])
def test_nginx_refuses_everything_else(served_cache: tuple[str, Path, str], path: str) -> None:
    url, _, _ = served_cache
    status, _, body = fetch(f"{url}/{path}")
    assert status in (403, 404), (path, status, body[:200])


@needs_nix
def test_nix_substitutes_through_nginx(served_cache: tuple[str, Path, str]) -> None:
    """A real Nix client reads a cache written by `nix copy`, through the server block."""
    url, cache, store_path = served_cache
    if not store_path:
        pytest.skip("no store path was copied")
    assert store_path in path_infos("--store", url, store_path)
    content = f"{store_path}/content"
    assert run([*NIX, "store", "cat", "--store", url, content]).stdout == Path(content).read_text()
    listing = cache / (os.path.basename(store_path)[:32] + ".ls")
    status, ctype, body = fetch(f"{url}/{listing.name}")
    assert (status, ctype) == (200, "application/json")
    assert json.loads(body)["root"]["entries"]["content"]["type"] == "regular"
    nar = next(p for p in (cache / "nar").iterdir()
               if not p.name.startswith(".") and p.name != NAR[4:])
    assert stat.S_ISREG(nar.stat().st_mode) and nar.name.endswith(".nar.zst")
    assert fetch(f"{url}/nar/{nar.name}")[:2] == (200, "application/x-nix-nar")


def test_toml_example_names_every_setting_and_only_real_ones() -> None:
    """README sends users to the example for every key: set or commented out, each Settings
    field appears, and the file loads as a narfs config."""
    from dataclasses import fields

    from narfs.config import Settings

    text = (SYSTEMD / "narfs.toml.example").read_text()
    named = set(re.findall(r"^#? ?([a-z_]+) = ", text, re.M))
    assert named == {f.name for f in fields(Settings)}
    assert set(tomllib.loads(text)) <= named
