"""Store path names: what Nix accepts, checked wherever one comes from outside."""

import os
import re

from .errors import CorruptError, NarfsError

STORE_DIR = "/nix/store"
GC_ROOTS_DIR = "/nix/var/nix/gcroots"  # a symlink anywhere under it is a GC root
HASH_LEN = 32
_BASE = re.compile(r"[0123456789abcdfghijklmnpqrsvwxyz]{32}-[A-Za-z0-9+\-._?=]{1,211}")
_HASH = re.compile(r"[0123456789abcdfghijklmnpqrsvwxyz]{32}")


def is_base_name(name: str) -> bool:
    return bool(_BASE.fullmatch(name)) and not name[HASH_LEN + 1:].startswith(".")


def is_hash(text: str) -> bool:
    return bool(_HASH.fullmatch(text))


def check_base_name(name: str) -> str:
    """Validate a `<hash>-<name>` from untrusted data."""
    if not is_base_name(name):
        raise CorruptError(f"not a valid store path name: {name[:80]!r}")
    return name


def base_name(path: str) -> str:
    """`/nix/store/<hash>-<name>` → `<hash>-<name>`, for paths from untrusted data."""
    prefix = STORE_DIR + "/"
    if not path.startswith(prefix):
        raise CorruptError(f"not a store path: {path[:80]!r}")
    return check_base_name(path[len(prefix):])


def hash_part(name_or_path: str) -> str:
    return name_or_path.rsplit("/", 1)[-1][:HASH_LEN]


def name_part(name_or_path: str) -> str:
    return name_or_path.rsplit("/", 1)[-1][HASH_LEN + 1:]


def user_store_path(arg: str) -> str:
    """A store path a user typed: accept a file inside one, or a symlink to one such as
    `./result` (as Nix's commands do; even once the path it names was garbage-collected, which
    is what restore is for); give the top-level path."""
    prefix = STORE_DIR + "/"
    if not arg.startswith(prefix) and os.path.islink(arg):
        resolved = os.path.realpath(arg)
        if resolved.startswith(prefix):
            arg = resolved
    if not arg.startswith(prefix):
        raise NarfsError(f"{arg}: not in {STORE_DIR}; give a store path such as "
                         f"{STORE_DIR}/<hash>-<name>")
    top = arg[len(prefix):].split("/", 1)[0]
    if not is_base_name(top):
        raise NarfsError(f"{arg}: not a valid store path name")
    return prefix + top


def store_path_of(target: str, roots: str) -> str | None:
    """The top-level store path a pin's link target holds, or None when it is outside the store.

    A relative target counts from the roots dir, as Nix's GC reads it; a target inside a store
    path pins (and so archives) the whole path.
    """
    full = os.path.normpath(os.path.join(roots, target))
    prefix = STORE_DIR + "/"
    if not full.startswith(prefix):
        return None
    base = full[len(prefix):].split("/", 1)[0]
    return prefix + base if is_base_name(base) else None
