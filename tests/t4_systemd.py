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

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import tempfile
import tomllib
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from narfs.nixversions import config_show_args, detect
from nginxserver import serving, world_readable
from nixeval import evaluate, repo_files
from nixtools import NIX, Narfs, NixStore, path_infos, run

REPO = Path(__file__).resolve().parent.parent
SYSTEMD = REPO / "systemd"
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
    # the remote mount template as an instance of it (a template itself is not verified)
    named = {name: name for name in UNITS} | {"narfs-mount-remote@mnt-x.service": REMOTE_UNIT}
    for name, source in named.items():
        copy = tmp_path / name
        copy.write_text((SYSTEMD / source).read_text().replace(NARFS, str(stub)))
        copies.append(str(copy))
    proc = run(["systemd-analyze", "verify", "--man=no", *copies], cwd=tmp_path, check=False)
    ours = [line for line in proc.stderr.splitlines() if any(n in line for n in named)]
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
        # Nix 2.34 quotes the path: read the message, not one version's punctuation.
        assert re.search(r'remounting "?/nix/store"? writable', without.stderr), without.stderr
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
    shown, warnings = nix_config(tmp_path)
    assert warnings == ""
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


# ---------------------------------------------------------------- NixOS module and package
#
# systemd/narfs.nix, package.nix, flake.nix and default.nix are evaluated by nixpkgs' own
# lib (lib.evalModules: the NixOS module system) against tests/nix/nixos-options.nix, the
# NixOS options the module sets declared with NixOS's types, and tests/nix/pkgs.nix, a
# stand-in pkgs with nixpkgs' names. Nothing is built. nixpkgs' lib is found in a `shared/`
# folder beside the checkout (CI: ../shared/nixpkgs-lib) or at $NARFS_NIXPKGS_LIB.
#
# Found while writing these: lib.fileset needs builtins.readFileType (Nix 2.14), so
# package.nix filters its source with lib.sourceByRegex, which Nix 2.8 evaluates; the
# module system itself evaluates with Nix 2.8.

NIX_FILES = (REPO / "package.nix", REPO / "flake.nix", REPO / "default.nix",
             SYSTEMD / "narfs.nix", *sorted((REPO / "tests" / "nix").glob("*.nix")))


@needs_nix
@pytest.mark.parametrize("path", NIX_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_nix_files_parse(path: Path) -> None:
    # --parse also resolves every variable (no `with` at the top), without nixpkgs
    run(["nix-instantiate", "--parse", str(path)])


ENABLED = {"services": {"narfs": {"enable": True}}}
STORE_NAME = re.compile(r"/nix/store/[0-9a-f]{32}-")


def as_unit_values(section: dict) -> dict[str, list[str]]:
    """A serviceConfig/timerConfig as NixOS writes it into the unit file: a list is one line
    per element, a bool is true/false; then split into words, as systemd splits lists."""
    out: dict[str, list[str]] = {}
    for key, value in section.items():
        for v in value if isinstance(value, list) else [value]:
            text = ("true" if v else "false") if isinstance(v, bool) else str(v)
            out.setdefault(key, []).extend(text.split())
    return out


def debian_paths(values: dict[str, list[str]], package: str) -> dict[str, list[str]]:
    """Store paths as the Debian units spell them: narfs in /usr/local/bin, the rest in /bin."""
    def fix(word: str) -> str:
        word = word.replace(f"{package}/bin/", "/usr/local/bin/")
        return re.sub(r"/nix/store/[0-9a-f]{32}-(coreutils|util-linux)/bin/", "/bin/", word)
    return {k: [fix(w) for w in v] for k, v in values.items()}


def file_values(unit: dict[str, dict[str, list[str]]], section: str) -> dict[str, list[str]]:
    booleans = {"yes": "true", "no": "false"}
    return {k: [booleans.get(w, w) for v in vs for w in v.split()]
            for k, vs in unit[section].items()}


@pytest.fixture(scope="module")
def defaults() -> dict:
    return evaluate(ENABLED)


def test_nixos_module_units_are_the_files_in_systemd(defaults: dict, units: dict) -> None:
    """narfs-watch, narfs-mount, narfs-gc and the timer: the Debian units line for line, the
    same hardening included; only paths differ (the package's, the store's)."""
    package = defaults["narfsPackage"]["path"]
    assert defaults["failedAssertions"] == []
    for name in ("narfs-watch", "narfs-mount", "narfs-gc"):
        nixos, debian = defaults["services"][name], units[f"{name}.service"]
        service = file_values(debian, "Service")
        assert service.pop("Environment") == ["NARFS_CONFIG=/etc/narfs/narfs.toml"]
        assert nixos["environment"] == {"NARFS_CONFIG": "/etc/narfs/narfs.toml"}, name
        assert debian_paths(as_unit_values(nixos["serviceConfig"]), package) == service, name
        assert nixos["description"] == one(debian, "Unit", "Description")
        assert nixos["documentation"] == words(debian, "Unit", "Documentation")
        # ordered after narfs-init, which makes the cache and key the Debian user makes
        # with `narfs init`; otherwise the same dependencies
        assert nixos["after"] == [*words(debian, "Unit", "After"), "narfs-init.service"]
        assert nixos["wants"] == words(debian, "Unit", "Wants")
        assert nixos["wantedBy"] == (words(debian, "Install", "WantedBy")
                                     if "Install" in debian else []), name
        assert set(debian["Unit"]) <= {"Description", "Documentation", "After", "Wants"}
        assert nixos["unitConfig"] == {}, name
        # those that run nix have the system's Nix (nix.package) on PATH, before the package's
        assert [STORE_NAME.sub("", p) for p in nixos["path"]] == (
            [] if name == "narfs-mount" else ["nix"]), name
    timer, debian = defaults["timers"]["narfs-gc"], units["narfs-gc.timer"]
    assert as_unit_values(timer["timerConfig"]) == file_values(debian, "Timer")
    assert timer["wantedBy"] == words(debian, "Install", "WantedBy")
    assert timer["description"] == one(debian, "Unit", "Description")
    assert defaults["services"]["narfs-watch"]["requires"] == ["narfs-init.service"]


def test_nixos_module_settings_are_the_example_files(defaults: dict) -> None:
    package = defaults["narfsPackage"]["path"]
    example = (SYSTEMD / "nix.conf.example").read_text()
    substituter = re.search(r"^extra-substituters = (\S+)$", example, re.M).group(1)
    settings = defaults["nixSettings"]
    assert settings["post-build-hook"] == f"{package}/bin/narfs-hook"
    # NixOS's own cache.nixos.org stays, after the archive (which has the lower priority)
    assert settings["substituters"] == [substituter, "https://cache.nixos.org/"]
    # no key configured: the one narfs-init makes, from a file nix.conf includes
    assert settings["trusted-public-keys"] == [
        "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="]
    assert defaults["nixExtraOptions"] == "!include /var/lib/narfs/nix.conf\n"
    toml = tomllib.loads(defaults["etc"]["narfs/narfs.toml"]["text"])
    assert toml == tomllib.loads((SYSTEMD / "narfs.toml.example").read_text())
    assert sorted(defaults["tmpfiles"]) == sorted([
        "d /var/lib/narfs 0755 root root -", "d /var/lib/narfs/cache 0755 root root -",
        "d /nix/var/nix/gcroots/narfs 0755 root root -"])
    assert defaults["systemPackages"] == [package]
    assert defaults["nginx"]["enable"] is False and defaults["nginx"]["virtualHosts"] == {}
    assert set(defaults["services"]) == {"narfs-init", "narfs-watch", "narfs-mount", "narfs-gc"}


def test_nixos_module_init_unit(defaults: dict, units: dict) -> None:
    """narfs-init: `narfs init`, then the trust script; before nix-daemon and the watch, in
    the watch's sandbox."""
    init = defaults["services"]["narfs-init"]
    package = defaults["narfsPackage"]["path"]
    config = init["serviceConfig"]
    narfs_init, trust = config.pop("ExecStart")
    assert narfs_init == f"{package}/bin/narfs init"
    assert re.fullmatch(r"/nix/store/\w{32}-narfs-trust-key /var/lib/narfs/secret\.key "
                        r"/var/lib/narfs/nix\.conf", trust), trust
    assert (config.pop("Type"), config.pop("RemainAfterExit")) == ("oneshot", True)
    watch = dict(defaults["services"]["narfs-watch"]["serviceConfig"])
    for key in ("Type", "ExecStartPre", "ExecStart", "Restart", "RestartSec", "TimeoutStopSec",
                "Nice",
                "CPUSchedulingPolicy", "IOSchedulingClass", "IOSchedulingPriority",
                "ReadWritePaths"):
        watch.pop(key)
    assert config.pop("ReadWritePaths") == ["/var/lib/narfs", "-/nix/var"]
    assert config == watch
    assert init["before"] == ["nix-daemon.service", "narfs-watch.service"]
    assert init["wantedBy"] == ["multi-user.target"]
    assert init["environment"] == {"NARFS_CONFIG": "/etc/narfs/narfs.toml"}


def nixos_nix_conf(settings: dict, extra: str) -> str:
    """nix.conf as NixOS renders nix.settings: lists space-joined, bools true/false."""
    def atom(v: object) -> str:
        return ("true" if v else "false") if isinstance(v, bool) else str(v)
    lines = [f"{k} = {' '.join(map(atom, v)) if isinstance(v, list) else atom(v)}"
             for k, v in sorted(settings.items()) if v is not None]
    return "\n".join(lines) + "\n" + extra


def nix_config(conf_dir: Path) -> tuple[dict[str, str], str]:
    """What this Nix makes of CONF_DIR/nix.conf alone, and what it said on stderr."""
    env = {**os.environ, "NIX_CONF_DIR": str(conf_dir),
           "NIX_USER_CONF_FILES": str(conf_dir / "none")}
    env.pop("NIX_CONFIG", None)  # conftest's would override the file
    proc = run([*NIX, *config_show_args(trio.run(detect))], env=env)
    lines = proc.stdout.splitlines()
    return dict(line.split(" = ", 1) for line in lines if " = " in line), proc.stderr


@needs_nix
def test_nixos_module_makes_nix_trust_the_key_it_creates(tmp_path: Path, defaults: dict) -> None:
    """The trust script on a real key, with a systemctl that records its calls, then the
    nix.conf NixOS would write from the module, read by this machine's Nix."""
    secret, public = tmp_path / "secret.key", tmp_path / "public.key"
    run(["nix-store", "--generate-binary-cache-key", "narfs-test-1", str(secret), str(public)])
    key = public.read_text().strip()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "systemctl.calls"
    (bindir / "systemctl").write_text(f'#!/bin/sh\necho "$*" >>{calls}\n')
    (bindir / "systemctl").chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
    conf = tmp_path / "narfs-key.conf"
    script = str(SYSTEMD / "narfs-trust-key.sh")

    def trust(*expected: str) -> subprocess.CompletedProcess:
        return run(["sh", script, str(secret), str(conf), *expected], env=env, check=False)

    first = trust()
    assert first.returncode == 0, first.stderr
    assert conf.read_text() == f"extra-trusted-public-keys = {key}\n"
    assert calls.read_text() == "--no-block try-restart nix-daemon.service\n"
    assert trust().returncode == 0
    assert calls.read_text().count("\n") == 1  # unchanged: nix-daemon left alone
    assert trust(key).returncode == 0
    wrong = trust("other-1:" + key.split(":")[1])
    assert wrong.returncode == 1
    assert wrong.stderr == (f"narfs: {secret} is the key of {key}, not of "
                            f"services.narfs.publicKey (other-1:{key.split(':')[1]}): set "
                            f"publicKey to {key}, or leave it unset\n")

    extra = defaults["nixExtraOptions"].replace("/var/lib/narfs/nix.conf", str(conf))
    (tmp_path / "nix.conf").write_text(nixos_nix_conf(defaults["nixSettings"], extra))
    shown, warnings = nix_config(tmp_path)
    assert warnings == ""
    assert shown["post-build-hook"] == defaults["nixSettings"]["post-build-hook"]
    assert shown["substituters"].split() == defaults["nixSettings"]["substituters"]
    assert shown["trusted-public-keys"].split() == [
        *defaults["nixSettings"]["trusted-public-keys"], key]


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


def test_nixos_module_options(tmp_path: Path, fake_package: Path, store_path: str) -> None:
    roots = tmp_path / "roots"
    cfg = evaluate({
        "services": {"narfs": {
            "enable": True, "rootsDir": str(roots), "mountpoint": None,
            "cacheDir": "/srv/cache", "publicKey": "k-1:abc=", "priority": 30,
            "settings": {"allow_other": True, "frame_cache_mb": 512},
            "gc": {"olderThan": "180d", "maxSize": "500G", "dates": "weekly"},
            "serve": {"enable": True, "virtualHost": "arch", "openFirewall": True}}},
        "networking": {"enableIPv6": False},
    }, package_dir=fake_package, bin_dirs={"dash": str(Path(shutil.which("dash") or
                                                             "/bin/dash").parent.parent)})
    # pins outside /nix/var/nix/gcroots are no GC roots: NixOS refuses to build it
    assert cfg["failedAssertions"] == [
        f"services.narfs.rootsDir ({roots}) must be under /nix/var/nix/gcroots, or the pins "
        "are no GC roots."]
    assert "narfs-mount" not in cfg["services"]
    toml = tomllib.loads(cfg["etc"]["narfs/narfs.toml"]["text"])
    assert toml == {"cache_dir": "/srv/cache", "secret_key_file": "/var/lib/narfs/secret.key",
                    "roots_dir": str(roots), "allow_other": True, "frame_cache_mb": 512}
    services = cfg["services"]
    assert services["narfs-gc"]["serviceConfig"]["ExecStart"] == (
        f"{fake_package}/bin/narfs gc --older-than 180d --max-size 500G")
    assert cfg["timers"]["narfs-gc"]["timerConfig"]["OnCalendar"] == "weekly"
    for name in ("narfs-watch", "narfs-gc", "narfs-init"):
        assert "/srv/cache" in services[name]["serviceConfig"]["ReadWritePaths"], name
    assert f"-{roots}" in services["narfs-watch"]["serviceConfig"]["ReadWritePaths"]
    assert "d /srv/cache 0755 root root -" in cfg["tmpfiles"]
    # the key given: trusted as it is, and narfs-init checks the key file against it
    settings = cfg["nixSettings"]
    assert settings["trusted-public-keys"][-1] == "k-1:abc="
    assert settings["substituters"][0] == "file:///srv/cache?priority=30"
    assert cfg["nixExtraOptions"] == ""
    assert services["narfs-init"]["serviceConfig"]["ExecStart"][1].endswith(" k-1:abc=")

    vhost = cfg["nginx"]["virtualHosts"]["arch"]
    assert cfg["nginx"]["enable"] is True
    assert (vhost["root"], vhost["serverName"]) == ("/srv/cache", "arch")
    assert [(lst["addr"], lst["port"]) for lst in vhost["listen"]] == [("0.0.0.0", 5000)]
    assert cfg["firewallTCP"] == [5000]
    example = (SYSTEMD / "nginx-narfs.conf").read_text()
    assert sorted(vhost["locations"]) == sorted(
        re.findall(r"^\s*location (.+?) \{$", example, re.M))
    assert f"listen {vhost['listen'][0]['port']};" in example
    for location, body in re.findall(r"^\s*location (.+?) \{\n(.*?)\n\s*\}", example, re.M | re.S):
        got = vhost["locations"][location]
        lines = [line.strip() for line in body.splitlines()
                 if line.strip() and not line.strip().startswith("#")]
        if got["return"] is not None:
            assert lines == [f"return {got['return']};"], location
        else:
            assert lines == [line.strip() for line in got["extraConfig"].splitlines()], location

    # A non-default roots dir reaches the hook through a wrapper: run it.
    assert settings["post-build-hook"].endswith("-narfs-hook")
    wrapper = tmp_path / "wrapper"
    wrapper.write_text(cfg["hookText"])
    wrapper.chmod(0o755)
    proc = subprocess.run([str(wrapper)], env={"PATH": os.environ["PATH"], "OUT_PATHS": store_path},
                          capture_output=True, text=True, timeout=30)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert os.readlink(roots / os.path.basename(store_path)) == store_path


REMOTE_UNIT = "narfs-mount-remote@.service"


def test_nixos_module_remote_mounts_are_the_template_unit() -> None:
    """services.narfs.remoteMounts (no services.narfs.enable needed: a client only mounts)
    makes one unit per mountpoint running `narfs mount --foreground URL MOUNTPOINT`: the
    Debian template line for line, its %f and ${NARFS_URL} filled in; unlike narfs-mount it
    may use IP (its server)."""
    url = "https://archive.example.org/cache"
    cfg = evaluate({"services": {"narfs": {"remoteMounts": {"/mnt/arch-ive": url}}}})
    assert cfg["failedAssertions"] == []
    name = "narfs-remote-mnt-arch\\x2dive"  # systemd-escape --path /mnt/arch-ive
    assert sorted(cfg["services"]) == [name]
    nixos, debian = cfg["services"][name], parse_unit(SYSTEMD / REMOTE_UNIT)
    service = file_values(debian, "Service")
    assert service.pop("EnvironmentFile") == ["/etc/narfs/remote%f.env"]
    filled = {k: [w.replace("%f", "/mnt/arch-ive").replace("${NARFS_URL}", url) for w in v]
              for k, v in service.items()}
    values = as_unit_values(nixos["serviceConfig"])
    assert debian_paths(values, cfg["narfsPackage"]["path"]) == filled
    assert values["ExecStart"][-4:] == ["mount", "--foreground", url, "/mnt/arch-ive"]
    assert "AF_INET" in values["RestrictAddressFamilies"] and "IPAddressDeny" not in values
    assert nixos["description"] == one(debian, "Unit", "Description").replace(
        "%f", "/mnt/arch-ive")
    assert nixos["after"] == words(debian, "Unit", "After")
    assert nixos["wants"] == words(debian, "Unit", "Wants")
    assert nixos["wantedBy"] == words(debian, "Install", "WantedBy")
    # nix.conf's trusted keys and netrc-file are read through the system's Nix
    assert [STORE_NAME.sub("", p) for p in nixos["path"]] == ["nix"]
    # what a unit's command line cannot carry unquoted is refused
    bad = evaluate({"services": {"narfs": {"remoteMounts": {"/mnt/my archive": url}}}})
    assert any("/mnt/my archive" in a for a in bad["failedAssertions"]), bad
    proc = evaluate({"services": {"narfs": {"remoteMounts": {"/mnt/x": "https://h/%i"}}}},
                    check=False)
    assert proc["returncode"] != 0 and "remoteMounts" in proc["stderr"]


@pytest.mark.parametrize(("option", "value"), [
    ("cacheDir", "relative/cache"), ("cacheDir", "/srv/my cache"), ("mountpoint", "/mnt/%i"),
    ("gc", {"olderThan": "one year"}), ("publicKey", "no-key-here"),
    ("serve", {"enable": True, "port": 70000}),
])
def test_nixos_module_refuses_bad_values(option: str, value: object) -> None:
    """Values that would need quoting in a unit or narfs.toml, or mean nothing to narfs."""
    proc = evaluate({"services": {"narfs": {"enable": True, option: value}}}, check=False)
    assert proc["returncode"] != 0
    assert f"services.narfs.{option}" in proc["stderr"], proc["stderr"]


def test_nixos_module_from_the_flake_uses_the_flakes_package(defaults: dict) -> None:
    via_flake = evaluate(ENABLED, via="flake")
    assert via_flake["narfsPackage"]["path"] == via_flake["flakePackage"]["path"]
    # without the flake, the module builds package.nix with the system's pkgs
    assert defaults["narfsPackage"]["path"] == defaults["defaultNixPackage"]["path"]
    assert defaults["narfsPackage"]["path"] == defaults["overlayPackage"]["path"]
    assert via_flake["flakePackage"]["path"] != defaults["narfsPackage"]["path"]
    assert via_flake["services"]["narfs-watch"]["serviceConfig"]["ExecStart"] == (
        f"{via_flake['flakePackage']['path']}/bin/narfs watch")


def test_package_expression(tmp_path: Path, defaults: dict, store_path: str) -> None:
    """package.nix against the stand-in python3Packages: what it asks nixpkgs to build."""
    pkg = defaults["narfsPackage"]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert (pkg["pname"], pkg["version"]) == ("narfs", project["version"])
    assert (pkg["pyproject"], pkg["buildSystem"], pkg["doCheck"]) == (True, ["setuptools"], False)
    wanted = {re.split(r"[<>=!~ \[]", d, maxsplit=1)[0].lower() for d in project["dependencies"]}
    assert {d["pname"] for d in pkg["dependencies"]} == wanted
    # narfs's pyfuse3 patch (issue 12), applied to nixpkgs' pyfuse3 once it is in the tree
    patch = REPO / "patches" / "pyfuse3-fast.patch"
    pyfuse3 = next(d for d in pkg["dependencies"] if d["pname"] == "pyfuse3")
    assert pyfuse3["patches"] == ([str(patch)] if patch.exists() else [])
    assert all(d["patches"] == [] for d in pkg["dependencies"] if d["pname"] != "pyfuse3")
    # fuse3 and Nix on the wrapper's PATH, after the caller's
    arg, var, sep, path = pkg["makeWrapperArgs"]
    assert (arg, var, sep) == ("--suffix", "PATH", ":")
    assert [STORE_NAME.sub("", p) for p in path.split(":")] == ["fuse3/bin", "nix/bin"]
    assert (pkg["mainProgram"], pkg["license"], pkg["linux"]) == ("narfs", "MIT", True)
    assert "narfs.cli" in pkg["pythonImportsCheck"]
    # the source: what the wheel is built from, and nothing else
    files = repo_files()
    wanted_src = {f for f in files if re.fullmatch(r"narfs/.*\.py", f)}
    wanted_src |= {"pyproject.toml", "README.md", "systemd/narfs-hook"}
    assert set(pkg["srcFiles"]) == wanted_src
    assert pkg["srcRoot"] == str(REPO)

    # postPatch's substitutions apply to the hook (--replace-fail), and the hook still works
    dash = shutil.which("dash")
    if dash is None:
        pytest.skip("dash not installed")
    cfg = evaluate(ENABLED, bin_dirs={"dash": str(Path(dash).parent.parent),
                                      "coreutils": "/usr"})
    hook = (SYSTEMD / "narfs-hook").read_text()
    args = shlex.split(cfg["narfsPackage"]["postPatch"].replace("\\\n", " "))
    assert args[:2] == ["substituteInPlace", "systemd/narfs-hook"]
    for flag, old, new in zip(args[2::3], args[3::3], args[4::3], strict=True):
        assert flag == "--replace-fail" and old in hook, old
        hook = hook.replace(old, new)
    assert hook.startswith(f"#!{Path(dash).parent}/dash\n")
    assert "PATH=${PATH:+$PATH:}/usr/bin:" in hook
    patched = tmp_path / "narfs-hook"
    patched.write_text(hook)
    patched.chmod(0o755)
    roots = tmp_path / "roots"
    proc = subprocess.run([str(patched)], env={"OUT_PATHS": store_path, "NARFS_ROOTS": str(roots),
                                               "NARFS_CONFIG": "/dev/null"},
                          capture_output=True, text=True, timeout=30)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert os.readlink(roots / os.path.basename(store_path)) == store_path


def test_init_prints_a_nixos_form_the_module_accepts(tmp_path: Path) -> None:
    n = Narfs(tmp_path / "n")
    n.root.mkdir()
    out = n("init", "--cache", str(n.cache), "--secret-key", str(n.key)).stdout
    form = re.search(r"^services\.narfs = \{\n.*?^\};$", out, re.M | re.S)
    assert form, out
    module = tmp_path / "from-init.nix"
    module.write_text("{\n" + form.group(0) + "\n}\n")
    cfg = evaluate({}, modules=(module,))
    assert cfg["failedAssertions"] == []
    settings = cfg["nixSettings"]
    assert settings["trusted-public-keys"][-1] == n.public_key
    assert settings["substituters"][0] == f"file://{n.cache}?priority=10"
    init = cfg["services"]["narfs-init"]["serviceConfig"]["ExecStart"][1]
    assert init.endswith(f" {n.key} /var/lib/narfs/nix.conf {n.public_key}")
    # and it is the same as the nix.conf lines printed above it
    conf = dict(re.findall(r"^([a-z-]+) = (.*)$", out, re.M))
    assert conf["extra-trusted-public-keys"] == n.public_key
    assert settings["substituters"][0].startswith(conf["extra-substituters"])


# ---------------------------------------------------------------- nginx

NARINFO = "0" * 32 + ".narinfo"
LISTING = "1" * 32 + ".ls"
NAR = "nar/" + "a" * 52 + ".nar.zst"
INDEX = "narfs-index.zst"


@pytest.fixture(scope="module")
def served_cache(request: pytest.FixtureRequest) -> Iterator[tuple[str, Path, str]]:
    """nginx serving a cache dir that also holds things it must refuse, plus a
    store path copied in by `nix copy`; yields (base URL, cache dir, store path)."""
    base = Path(tempfile.mkdtemp(prefix="narfs-served-"))
    base.chmod(0o755)  # the worker user must reach the cache dir
    cache = base / "cache"
    (cache / "nar").mkdir(parents=True)
    files = {
        "nix-cache-info": "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 10\n",
        NARINFO: "StorePath: /nix/store/" + "0" * 32 + "-x\n",
        LISTING: '{"version":1,"root":{"type":"regular","size":0}}',
        NAR: "not really zstd",
        INDEX: "zstd",
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
    try:
        if shutil.which("nix"):
            copied = request.getfixturevalue("store_path")
            run([*NIX, "copy", "--to",
                 f"file://{cache}?compression=zstd&write-nar-listing=true", copied])
        world_readable(cache)
        with serving(cache) as server:
            yield server.url, cache, copied
    finally:
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
    (INDEX, "application/zstd"),
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
