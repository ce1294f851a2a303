"""`narfs gc`: retire archived paths by last access, never breaking a kept closure.

Last access is the latest of the archive time (the narinfo's mtime), reads through a narfs mount
and `narfs restore` (the catalog's access table). Downloads that nginx or a `file://`
substituter serve straight from the directory are NOT seen: a cache other machines substitute
from needs an --older-than long enough for that, or a mount/restore on the machines that matter.

Closure safety: a path is as recent as the most recent path whose closure holds it (its
*effective* access), and paths go in order of effective access, referrers before their
references on ties. Whatever is retired is therefore a prefix of that order, so every kept
path's references are kept, and at each instant of the removal (narinfos first, referrers
first) the published narinfos form complete closures.

The removal itself (narinfos first, then listings and unused NARs) is retire.py's.
"""

from __future__ import annotations

import argparse
import logging
import re
import time
from dataclasses import dataclass

from .cache import Cache, size_of
from .catalog import Catalog, Entry
from .config import Settings
from .errors import CorruptError, NarfsError
from .progress import human_size, plural, when
from .retire import referrers_first, retire
from .storepath import STORE_DIR, hash_part

log = logging.getLogger(__name__)

DEFAULT_AGE = "365d"  # what the seed's `find -atime 365 -delete` meant; the timer runs `narfs gc`
# No `m`: users mean minutes and months by it alike (`6M` retired nearly everything once).
_AGE_UNITS = {"s": 1, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}
AGE_FORMS = "365d, 12h, 90min, 2w, 1y (units s, min, h, d, w, y)"
MAX_AGE = 1000 * 365 * 86400  # older than any Nix store: a bigger age is a typo
MAX_SIZE = 1 << 60  # an exbibyte: a bigger size is a typo


def _shown(text: str) -> str:
    """A user's value in an error line, cut short: the line stays one line on a terminal."""
    return repr(text if len(text) <= 40 else text[:37] + "...")


def parse_age(text: str) -> float:
    """`365d` (Nix's own form), `12h`, `30s`, `2w`, `90min`, `1y`: the unit is required,
    because a bare `30` meant as days would retire everything older than 30 seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m:
        raise NarfsError(f"--older-than {_shown(text)}: not an age; write it like {AGE_FORMS}")
    number, unit = m.groups()
    if not unit:
        raise NarfsError(f"--older-than {_shown(text)}: an age needs a unit; write "
                         f"{number[:20]}d for {number[:20]} days (units s, min, h, d, w, y)")
    if unit.lower().startswith("m") and unit.lower() != "min":
        days = f"{float(number) * 30:g}d" if len(number) <= 6 else "days (d)"
        raise NarfsError(f"--older-than {_shown(text)}: {unit[:10]!r} could mean minutes or "
                         f"months; write {number[:20]}min for minutes, or {days} for months")
    if unit.lower() not in _AGE_UNITS:
        raise NarfsError(f"--older-than {_shown(text)}: unknown unit {unit[:10]!r}; write it like "
                         f"{AGE_FORMS}")
    seconds = float(number) * _AGE_UNITS[unit.lower()]
    if seconds > MAX_AGE:
        raise NarfsError(f"--older-than {_shown(text)}: longer than 1000 years; write it like "
                         f"{AGE_FORMS}")
    return seconds


def parse_size(text: str) -> int:
    """`500G`, `10M`, `1.5T` (powers of 1024, `GiB` too), `500GB` (powers of 1000), bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:([kmgtp])(ib|b)?|b)?\s*", text.lower())
    if not m:
        raise NarfsError(f"--max-size {_shown(text)}: not a size; write it like 500G, 10M or bytes")
    number, prefix, suffix = m.groups()
    power = 0 if prefix is None else "kmgtp".index(prefix) + 1
    size = float(number) * (1000 if suffix == "b" else 1024) ** power
    if size > MAX_SIZE:
        raise NarfsError(f"--max-size {_shown(text)}: larger than an exbibyte; write it like 500G")
    return int(size)


# --- order ----------------------------------------------------------------------------------

def effective_access(entries: dict[str, Entry], access: dict[str, float]
                     ) -> list[tuple[str, float]]:
    """(hash, effective access) in retirement order: oldest first, referrers before references
    on ties. Effective access = own last access, or a referrer's effective access if later."""
    refs = {h: [hash_part(r) for r in e.references] for h, e in entries.items()}
    order = referrers_first(refs)
    eff = dict(access)
    for h in order:  # referrers come first, so eff[h] is final when h is reached
        for r in refs[h]:
            if r in eff and r != h and eff[r] < eff[h]:
                eff[r] = eff[h]
    for _ in range(len(order)):  # only for cycles: relax until nothing changes
        changed = False
        for h in order:
            for r in refs[h]:
                if r in eff and r != h and eff[r] < eff[h]:
                    eff[r] = eff[h]
                    changed = True
        if not changed:
            break
    position = {h: i for i, h in enumerate(order)}
    return sorted(((h, eff[h]) for h in order), key=lambda x: (x[1], position[x[0]]))


def true_url(cache: Cache, h: str) -> str | None:
    """The NAR URL `h`'s narinfo names (None if it does not parse): what gc deletes is
    decided by the narinfo, never by the catalog's copy of it."""
    try:
        return cache.read_narinfo(h).url
    except (CorruptError, OSError):
        return None


# --- the command ----------------------------------------------------------------------------

@dataclass
class Candidate:
    entry: Entry
    access: float  # own last access
    effective: float
    disk: int  # bytes this entry alone holds on disk (its NAR counted while shared, see plan)


def plan(entries: dict[str, Entry], access: dict[str, float], disk: dict[str, int],
         nar_disk: dict[str, int], older_than: float | None, max_size: int | None,
         now: float) -> tuple[list[Candidate], int, int]:
    """The entries to retire (a prefix of the retirement order), the disk bytes before, and
    after. `disk`: hash → narinfo + listing bytes; `nar_disk`: URL → NAR file bytes."""
    users: dict[str, int] = {}
    for e in entries.values():
        users[e.url] = users.get(e.url, 0) + 1
    total = sum(disk.values()) + sum(nar_disk.get(u, 0) for u in users)
    before = total
    cutoff = now - older_than if older_than is not None else None
    chosen = []
    for h, eff in effective_access(entries, access):
        old = cutoff is not None and eff < cutoff
        big = max_size is not None and total > max_size
        if not (old or big):
            break
        e = entries[h]
        users[e.url] -= 1
        freed = disk[h] + (nar_disk.get(e.url, 0) if users[e.url] == 0 else 0)
        total -= freed
        chosen.append(Candidate(e, access[h], eff, freed))
    return chosen, before, total


def main(args: argparse.Namespace, settings: Settings) -> int:
    cache = Cache(settings.cache_dir)
    cache.check()
    older_than = parse_age(args.older_than) if args.older_than else None
    max_size = parse_size(args.max_size) if args.max_size is not None else None
    if older_than is None and max_size is None:
        older_than = parse_age(DEFAULT_AGE)
        print(f"narfs gc: no --older-than or --max-size given: retiring what nothing has used "
              f"for {DEFAULT_AGE}")
    if args.dry_run:  # no writer lock: taking it may clear leftovers, and dry runs change nothing
        return _gc(cache, older_than, max_size, dry_run=True)
    with cache.writer():
        return _gc(cache, older_than, max_size, dry_run=False, yes=args.yes)


def too_much(chosen: list[Candidate], entries: int, before: int, after: int) -> bool:
    """More than half of the archive's paths or bytes: more than any routine gc retires."""
    return len(chosen) * 2 > entries or (before - after) * 2 > before


def _gc(cache: Cache, older_than: float | None, max_size: int | None, dry_run: bool,
        yes: bool = False) -> int:
    now = time.time()
    with Catalog(cache) as catalog:
        catalog.sync()
        entries = {e.hash: e for e in catalog.entries()}
        access = {h: catalog.last_access(e) for h, e in entries.items()}
        disk = {h: size_of(cache.narinfo_path(h)) + size_of(cache.listing_path(h))
                for h in entries}
        nar_disk = {e.url: size_of(cache.nar_path(e.url)) for e in entries.values()}
        chosen, before, after = plan(entries, access, disk, nar_disk, older_than, max_size, now)
        # --max-size says how much may go; an age alone can say far more than was meant.
        refuse = not dry_run and not yes and max_size is None and bool(chosen) \
            and too_much(chosen, len(entries), before, after)
        dry_run = dry_run or refuse
        verb = "would retire" if dry_run else "retired"
        if not dry_run and chosen:
            freed = retire(cache, catalog, ((c.entry.hash, true_url(cache, c.entry.hash))
                                            for c in chosen))
            catalog.sync()
            after = before - freed.bytes
        for c in chosen:
            why = "" if c.effective == c.access else \
                f", kept in use until {when(c.effective)} by a path referring to it"
            print(f"{verb} {STORE_DIR}/{c.entry.name} (last access {when(c.access)}{why}; "
                  f"{human_size(c.entry.nar_size)} NAR)")
        if older_than is not None:
            cutoff = now - older_than
            held = sum(1 for h, a in access.items() if a < cutoff
                       and h not in {c.entry.hash for c in chosen})
            if held:
                print(f"kept {plural(held, 'path')} unused for longer than "
                      f"{args_age(older_than)} because newer paths refer to them")
    kept = len(entries) - len(chosen)
    if not chosen:
        print(f"nothing to retire: {plural(kept, 'path')}, {human_size(before)} on disk")
    else:
        nar = sum(c.entry.nar_size for c in chosen)
        print(f"{verb} {plural(len(chosen), 'path')} ({human_size(nar)} NAR): "
              f"{'would free' if dry_run else 'freed'} {human_size(before - after)} on disk; "
              f"kept {plural(kept, 'path')}, {human_size(after)}")
    if refuse:
        raise NarfsError(f"{cache.root}: gc would retire {len(chosen)} of {len(entries)} paths "
                         f"({human_size(before - after)} of {human_size(before)}), more than "
                         "half the archive; check the list above, then add --yes to retire them "
                         "(or --max-size to bound what stays)")
    if max_size is not None and after > max_size:
        print(f"narfs gc: the cache still holds {human_size(after)} > --max-size "
              f"{human_size(max_size)}")
    return 0


def args_age(seconds: float) -> str:
    for unit, n in (("w", 7 * 86400), ("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= n and seconds % n == 0:
            return f"{seconds / n:.0f}{unit}"
    return f"{seconds:.0f}s"
