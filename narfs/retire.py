"""Retiring entries from a cache without breaking a closure (gc's retirement, verify's repair).

Removal order for one batch: every narinfo is un-published first (Nix stops seeing the entries),
referrers before their references, then listings, then the NAR files no remaining narinfo names
(two narinfos may share one NAR). All of it under the exclusive publish lock, so no writer
publishes a narinfo whose NAR or reference is being removed.
"""

from __future__ import annotations

import os
import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from . import narinfo, pathindex
from .cache import Cache, read_small, remove_file, size_of
from .catalog import Catalog
from .errors import CorruptError

_URL_LINE = re.compile(rb"^URL: (nar/[A-Za-z0-9._+-]{1,255})$", re.M)


def referrers_first(refs: dict[str, list[str]]) -> list[str]:
    """Hashes ordered so that every path comes before the paths it references (Kahn's
    algorithm over `refs`: hash → referenced hashes; references outside `refs` ignored).
    A cycle (impossible in a store, but the input is untrusted) is appended as it stands."""
    indegree = dict.fromkeys(refs, 0)
    for h, rs in refs.items():
        for r in set(rs):
            if r in indegree and r != h:
                indegree[r] += 1
    queue = deque(sorted(h for h, n in indegree.items() if n == 0))
    order = []
    while queue:
        h = queue.popleft()
        order.append(h)
        for r in sorted(set(refs[h])):
            if r in indegree and r != h:
                indegree[r] -= 1
                if indegree[r] == 0:
                    queue.append(r)
    if len(order) < len(refs):
        placed = set(order)
        order += sorted(h for h in refs if h not in placed)
    return order


@dataclass
class Freed:
    narinfos: int = 0
    nar_files: int = 0
    bytes: int = 0


def urls_in_use(cache: Cache, catalog: Catalog) -> set[str]:
    """NAR URLs the published narinfos name, read from the narinfos themselves: the catalog is
    derived data, and a URL it got wrong must not cost another entry its NAR. A narinfo that
    does not parse still protects the NAR its URL line names. (The catalog is synced too, so
    it drops what was retired.)"""
    catalog.sync()
    urls: set[str] = set()
    for h in cache.hashes():
        try:
            data = read_small(cache.narinfo_path(h), narinfo.MAX_SIZE)
        except (CorruptError, OSError):
            continue
        urls.update(m.decode() for m in _URL_LINE.findall(data))
    return urls


def retire(cache: Cache, catalog: Catalog, doomed: Iterable[tuple[str, str | None]]) -> Freed:
    """Remove entries given as (hash, NAR URL or None) in a closure-safe order (referrers
    first): un-publish every narinfo, then drop listings and the NARs nothing names any more."""
    doomed = list(doomed)
    freed = Freed()
    with cache.publish_lock(exclusive=True):
        _retire(cache, catalog, doomed, freed)
    pathindex.publish(cache)  # remote mounts follow the index: retired paths leave them
    return freed


def _retire(cache: Cache, catalog: Catalog, doomed: list[tuple[str, str | None]],
            freed: Freed) -> None:
    for h, _ in doomed:
        freed.bytes += size_of(cache.narinfo_path(h))
        cache.unpublish(h)
        freed.narinfos += 1
    for h, _ in doomed:
        freed.bytes += remove_file(cache.listing_path(h))
    keep = urls_in_use(cache, catalog)
    for url in sorted({u for _, u in doomed if u is not None} - keep):
        n = remove_file(cache.nar_path(url))
        freed.nar_files += n > 0
        freed.bytes += n
    if os.path.isdir(cache.nar_dir):
        cache.sync_nar_dir()
