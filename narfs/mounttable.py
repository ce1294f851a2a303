"""narfs mounts as /proc/mounts shows them: fsname `narfs:<cache dir>`, type `fuse.narfs`.

The one reader of the mount table: `narfs umount`, `status` and `restore <file in a mount>` (which
turns a file inside a mount into its store path and its cache) all go through it.

What the kernel's table cannot say (which mode a mount serves in) each mount process writes to
`<cache>/.narfs/mount-<pid>.json` while it runs; `mode_of` reads it back, as untrusted as the rest
of the cache directory.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from .cache import read_small
from .errors import CorruptError

FSTYPE = "fuse.narfs"
FSNAME_PREFIX = "narfs:"
STATE_PREFIX = "mount-"
MAX_STATE = 4096


def state_name(pid: int) -> str:
    return f"{STATE_PREFIX}{pid}.json"


def state_text(mountpoint: str, mode: str) -> bytes:
    return json.dumps({"pid": os.getpid(), "mountpoint": mountpoint, "mode": mode}).encode()


def remove_stale_states(state_dir: str) -> None:
    """State files of mount processes that ended without removing theirs (SIGKILL, a crash)."""
    try:
        names = os.listdir(state_dir)
    except OSError:
        return
    for name in names:
        pid = name[len(STATE_PREFIX):-len(".json")]
        if (name.startswith(STATE_PREFIX) and name.endswith(".json") and pid.isdigit()
                and name == state_name(int(pid)) and not os.path.exists(f"/proc/{pid}")):
            try:
                os.unlink(os.path.join(state_dir, name))
            except OSError:
                pass


def mode_of(state_dir: str, mountpoint: str) -> str | None:
    """The mode a live mount at `mountpoint` reported, or None when no live process did."""
    try:
        names = os.listdir(state_dir)
    except OSError:
        return None
    for name in names:
        if not (name.startswith(STATE_PREFIX) and name.endswith(".json")):
            continue
        try:
            doc = json.loads(read_small(os.path.join(state_dir, name), MAX_STATE))
        except (OSError, CorruptError, ValueError):
            continue
        if not isinstance(doc, dict) or doc.get("mountpoint") != mountpoint:
            continue
        pid, mode = doc.get("pid"), doc.get("mode")
        if (isinstance(pid, int) and not isinstance(pid, bool) and pid > 0
                and name == state_name(pid) and mode in ("fast", "stock")
                and os.path.exists(f"/proc/{pid}")):
            return mode
    return None


def _unescape(field: str) -> str:
    """/proc/mounts escapes space, tab, newline and backslash as octal (`\\040`)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


@dataclass(frozen=True)
class Mount:
    mountpoint: str
    cache_dir: str


def _made_by_us(options: list[str]) -> bool:
    owner = next((o[8:] for o in options if o.startswith("user_id=")), None)
    return owner is not None and owner.isdigit() and int(owner) in (0, os.getuid())


def narfs_mounts(mounts_file: str = "/proc/self/mounts", trusted: bool = True) -> list[Mount]:
    """Every live narfs mount and the cache it serves.

    With `trusted`, only mounts made by root or by this user count: anybody may make a FUSE
    mount of type fuse.narfs with any fsname, and restore would then read the cache it names."""
    try:
        with open(mounts_file, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        fields = line.split()
        if len(fields) < 3 or fields[2] != FSTYPE:
            continue
        fsname, mountpoint = _unescape(fields[0]), _unescape(fields[1])
        options = fields[3].split(",") if len(fields) > 3 else []
        if trusted and not _made_by_us(options):
            continue
        if fsname.startswith(FSNAME_PREFIX):  # the mount escapes commas for libfuse
            cache_dir = fsname[len(FSNAME_PREFIX):].replace("\\,", ",")
            found.append(Mount(mountpoint, cache_dir))
    return found


def mount_containing(path: str) -> tuple[Mount, str] | None:
    """The innermost narfs mount holding `path` (taken lexically: abspath, never realpath, so
    symlinks inside the mount are not followed) and the path relative to its mountpoint."""
    target = os.path.abspath(path)
    best: tuple[Mount, str] | None = None
    for m in narfs_mounts():
        mp = m.mountpoint.rstrip("/") or "/"
        if target == mp:
            rel = ""
        elif target.startswith(mp.rstrip("/") + "/"):
            rel = target[len(mp.rstrip("/")) + 1:]
        else:
            continue
        if best is None or len(mp) > len(best[0].mountpoint):
            best = (m, rel)
    return best


FUSE_DEVICE = "/dev/fuse"


def fuse_problem(device: str = FUSE_DEVICE) -> str | None:
    """Why this user cannot use FUSE, or None. libfuse opens the device itself (fusermount3
    only mounts), so a user who cannot open it cannot mount at all."""
    if not os.path.exists(device):
        return (f"{device} does not exist; load the module (modprobe fuse) or, in a "
                "container, pass the device in")
    if not os.access(device, os.R_OK | os.W_OK):
        return (f"{device}: permission denied for this user; run as root, or have root make "
                f"it usable (chmod 0666 {device}, as Debian's fuse3 package does)")
    return None
