"""Settings: `$NARFS_CONFIG` or /etc/narfs/narfs.toml, then command-line flags on top."""

from __future__ import annotations

import os
import re
import shutil
import sysconfig
import tomllib
from dataclasses import dataclass, fields, replace
from typing import Any

from . import signing
from .errors import NarfsError

DEFAULT_CONFIG = "/etc/narfs/narfs.toml"
DEFAULT_KEY = "/var/lib/narfs/secret.key"


@dataclass(frozen=True)
class Settings:
    cache_dir: str = "/var/lib/narfs/cache"
    secret_key_file: str = ""  # empty: archives are unsigned (`narfs init` sets one)
    roots_dir: str = "/nix/var/nix/gcroots/narfs"
    mountpoint: str = "/mnt/nar-archive"
    # 4 MiB frames, measured on /usr/include's NAR against Nix's one-frame zstd: 1.024x the size
    # and 2 ms to reach a small file; 2 MiB is 1.14x (1 ms), 1 MiB 1.38x (0.5 ms). The smallest
    # frame within the 1.05x size budget (tests/bench/bench_archive.py measures it).
    frame_size: int = 4 << 20
    zstd_level: int = 3
    jobs: int = 0  # threads for compression and hashing; 0 = one per core
    frame_cache_mb: int = 256  # decompressed frames the mount keeps
    hot_tier_mb: int = 4096  # decompressed non-seekable NARs the mount keeps on disk
    parallel_paths: int = 4  # store paths `narfs watch` archives at once
    allow_other: bool = False
    fuse_mode: str = "auto"  # auto | fast | stock: see `narfs mount --fuse-mode`
    # Seconds: the mount drops the kernel's cached contents of the files read this often, so a
    # path in steady use keeps being recorded as accessed for gc (README: what counts as use).
    access_window: int = 3600
    public_key: str = ""  # trusted key for restore/verify; default: derived from the secret key
    # A remote mount (`narfs mount http://...`): how often it polls the server's path index,
    # and how long one request may take before the read that needs it fails (EIO).
    remote_poll: int = 30
    remote_timeout: int = 10
    remote_cache_mb: int = 1024  # fetched NAR bytes a remote mount keeps on disk

    @property
    def state_dir(self) -> str:
        """narfs's own derived data (catalog, hot tier), kept beside the cache it describes."""
        return os.path.join(self.cache_dir, ".narfs")

    @property
    def threads(self) -> int:
        return self.jobs or os.cpu_count() or 1


_TYPES = {f.name: f.type for f in fields(Settings)}
# What each number may be: beyond these a value is a typo (and some would exhaust memory).
_RANGES = {"frame_size": (4096, 1 << 30), "zstd_level": (1, 22), "jobs": (0, 1024),
           "frame_cache_mb": (1, 1 << 20), "hot_tier_mb": (0, 1 << 24),
           "parallel_paths": (1, 1024), "access_window": (1, 1 << 31),
           "remote_poll": (1, 86400), "remote_timeout": (1, 600), "remote_cache_mb": (0, 1 << 24)}
assert _RANGES.keys() == {k for k, t in _TYPES.items() if t == "int"}
# The one form of the roots_dir line that narfs-hook (sh, no TOML parser) reads too.
_ROOTS_LINE = re.compile(r"""^[ \t]*roots_dir[ \t]*=[ \t]*(?:"([^"\\\n]*)"|'([^'\n]*)')"""
                         r"""[ \t]*(?:#.*)?$""", re.M)


def config_path() -> str:
    return os.environ.get("NARFS_CONFIG") or DEFAULT_CONFIG


def load(overrides: dict[str, object] | None = None, must_exist: bool = True) -> Settings:
    """Settings from the config file (if any) with `overrides` (flags given) on top.

    A config file named by $NARFS_CONFIG must exist unless `must_exist` is False (`narfs init`
    creates it)."""
    path = config_path()
    values: dict[str, object] = {}
    text = ""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", errors="replace")
        values = tomllib.loads(text)
    except FileNotFoundError:
        if "NARFS_CONFIG" in os.environ and must_exist:
            raise NarfsError(f"{path}: config file named by $NARFS_CONFIG does not exist; "
                             "create it or unset NARFS_CONFIG") from None
    except tomllib.TOMLDecodeError as e:
        raise NarfsError(f"{path}: not valid TOML ({e}); fix the file") from None
    except PermissionError:
        raise NarfsError(f"{path}: config file not readable; run as root or fix its "
                         "permissions") from None
    # Any: each value is checked against its field's type just below, at run time.
    checked: dict[str, Any] = {}
    for key, value in values.items():
        if key not in _TYPES:
            raise NarfsError(f"{path}: unknown setting {key!r}; known: {', '.join(_TYPES)}")
        want = {"str": str, "int": int, "bool": bool}[str(_TYPES[key])]
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise NarfsError(f"{path}: setting {key} must be a {want.__name__}")
        checked[key] = value
    settings = replace(Settings(), **checked)
    if "roots_dir" in values or _ROOTS_LINE.search(text):
        _check_roots_line(path, text, values.get("roots_dir"))
    given: dict[str, Any] = {k: v for k, v in (overrides or {}).items() if v is not None}
    settings = replace(settings, **given)
    if settings.fuse_mode not in ("auto", "fast", "stock"):
        raise NarfsError(f"{path}: fuse_mode must be auto, fast or stock")
    for key, (low, high) in _RANGES.items():
        value = getattr(settings, key)
        if not low <= value <= high:
            shown = str(value) if len(str(value)) <= 24 else f"{str(value)[:20]}..."
            raise NarfsError(f"{path}: setting {key} = {shown} is out of range; it must be "
                             f"between {low} and {high}")
    return settings


def _check_roots_line(path: str, text: str, value: object) -> None:
    """narfs-hook reads roots_dir with shell builtins (it must take milliseconds): refuse any
    spelling of it that the hook would read differently from TOML, so the hook, `narfs watch`
    and `narfs status` always agree on one roots dir."""
    found = [a or b for a, b in _ROOTS_LINE.findall(text)]
    if len(found) != 1 or found[0] != value or not found[0].startswith("/"):
        raise NarfsError(f'{path}: write roots_dir as one line, roots_dir = "/absolute/dir" '
                         "(no escapes), as narfs-hook reads it without a TOML parser")


def render(settings: Settings, keys: tuple[str, ...]) -> str:
    """TOML for the named settings, for the config file `narfs init` writes."""
    lines = ["# narfs settings; see systemd/narfs.toml.example for every key"]
    for key in keys:
        value = getattr(settings, key)
        lines.append(f"{key} = {value!r}".replace("'", '"') if isinstance(value, str)
                     else f"{key} = {str(value).lower() if isinstance(value, bool) else value}")
    return "\n".join(lines) + "\n"


def hook_path() -> str:
    """The narfs-hook installed beside this narfs (its venv's bin), else the one on PATH."""
    beside = os.path.join(sysconfig.get_path("scripts"), "narfs-hook")
    return beside if os.path.exists(beside) else shutil.which("narfs-hook") or beside


def trusted_key(settings: Settings) -> signing.PublicKey | None:
    """The key restore, verify and doctor trust: `public_key`, else the secret key's public
    half; None when the settings name neither."""
    if settings.public_key:
        return signing.parse_public_key(settings.public_key, "setting public_key")
    if settings.secret_key_file:
        try:
            return signing.load_secret_key(settings.secret_key_file).public
        except NarfsError as e:
            raise NarfsError(f"{e} (or set public_key in the config: checking signatures "
                             "needs only the public key)") from None
    return None
