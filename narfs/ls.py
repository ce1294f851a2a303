"""`narfs ls`: the archived paths, one a line, with sizes, archive and last access times."""

from __future__ import annotations

import argparse
import fnmatch

from .cache import Cache
from .catalog import entries_with_access
from .config import Settings
from .errors import NarfsError
from .progress import human_size, plural, when
from .storepath import STORE_DIR, name_part


def matches(pattern: str | None, base: str) -> bool:
    """A shell-style pattern matches `<hash>-<name>` or `<name>` (so `hello*` finds
    hello-2.12); a store path prefix is allowed; a plain word matches as a substring."""
    if not pattern:
        return True
    pattern = pattern.removeprefix(STORE_DIR + "/")
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(base, pattern) or fnmatch.fnmatchcase(name_part(base), pattern)
    return pattern in base


def main(args: argparse.Namespace, settings: Settings) -> int:
    cache = Cache(settings.cache_dir)
    cache.check()
    rows = [(e, a) for e, a in entries_with_access(cache) if matches(args.pattern, e.name)]
    if not rows:
        if args.pattern:
            raise NarfsError(f"no archived path matches {args.pattern!r} in {cache.root}")
        print(f"{cache.root}: nothing archived yet")
        return 0
    rows.sort(key=lambda r: (name_part(r[0].name), r[0].archived, r[0].name))
    print(f"{'NAR':>10} {'COMPRESSED':>10}  {'ARCHIVED':16}  {'LAST ACCESS':16}  STORE PATH")
    for e, access in rows:
        shown = human_size(e.file_size) if e.file_size is not None else "?"
        print(f"{human_size(e.nar_size):>10} {shown:>10}  {when(e.archived):16}  "
              f"{when(access):16}  {STORE_DIR}/{e.name}")
    nar = sum(e.nar_size for e, _ in rows)
    comp = sum(e.file_size or 0 for e, _ in rows)
    print(f"{plural(len(rows), 'path')}, {human_size(nar)} NAR, {human_size(comp)} compressed")
    return 0
