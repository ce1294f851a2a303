"""`narfs verify [--repair]`: check every entry of the cache, name every problem, fix on request.

Per narinfo (in worker threads, several at once: zstd and sha256 release the GIL): it parses,
carries a valid signature by the configured key, its NAR exists and matches FileSize and
FileHash, the seek table agrees with the data and with NarSize, the NAR parses (as untrusted
input) to NarSize bytes hashing to NarHash, and the `.ls` listing equals the NAR's. Then over
the directory: every reference is in the cache (closures complete), no NAR is unreferenced, no
`.ls` lacks its narinfo, no temporaries or unknown files, and the catalog agrees.

Signatures are told apart three ways, because a signature question alone never justifies
deleting intact data (DESIGN contract 3): "signed by a key you don't hold" (only other names,
or an earlier key of the same name that `.narfs/keys` recorded), "signature does not verify"
(a signature by your key's name that your key rejects: an altered narinfo, or an unrecorded
key that had the same name), and, separately, "data damaged" (the NAR is missing or does not
hold what NarHash says).

`--repair` holds the cache alone (no writer may run meanwhile). Entries whose data is damaged
are un-published; every other entry it takes out (a signature that does not verify, an
incomplete closure, a FileHash that disagrees, a referrer of any of those) still has a NAR
matching its NarHash, so it is quarantined (quarantine.py), never deleted. It removes strays,
rewrites listings from their NARs, rebuilds the catalog in place (keeping access times) and
names every store path it took out. Unsigned entries and entries signed by keys you don't
hold are reported but kept. `--adopt NAME` re-signs, with your key, the entries signed by NAME
whose NAR matches its NarHash: the user's explicit word that NAME's entries are theirs.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import BinaryIO

import trio
import zstandard

from . import (
    frameauth,
    listing,
    nar,
    nix32,
    nixquery,
    nixversions,
    pathindex,
    quarantine,
    zstdseek,
)
from .cache import (
    CACHE_INFO,
    TMP_PREFIX,
    Cache,
    cache_info_text,
    fsync_dir,
    kind_of,
    read_small,
    write_atomic,
)
from .catalog import Catalog, Entry, open_catalog
from .config import Settings, trusted_key
from .errors import CorruptError, NarfsError
from .narinfo import NarInfo
from .narstream import NarStream, decompressed_chunks
from .progress import Progress, human_size, plural
from .retire import referrers_first, retire
from .signing import PublicKey, SecretKey, load_secret_key
from .storepath import STORE_DIR, hash_part, is_hash
from .tree import MAX_TREE_FILE, Tree

log = logging.getLogger(__name__)

KNOWN_DIRS = {"nar", ".narfs", "log", "realisations", "debuginfo"}  # the last three: Nix's
STATE_DIRS = {"trees", "hot", "quarantine"}  # in .narfs/; everything else there is a file
RECENT = 3600  # with a writer active, unreferenced files younger than this may be in flight

BROKEN = "broken"  # the entry cannot be restored as it is: taken out by --repair
CLOSURE = "closure"  # the entry references a path the cache lacks: taken out by --repair
BADSIG = "bad-signature"  # a signature by the key's name that the key rejects: taken out
FOREIGN = "foreign"  # signed only by keys you don't hold: reported, kept
UNSIGNED = "unsigned"  # reported, kept
TAKEN_OUT = (BROKEN, BADSIG, CLOSURE)  # what --repair un-publishes (damaged) or quarantines
STRAY = "stray"  # a file nothing refers to: removed by --repair
LISTING = "listing"  # a `.ls` that disagrees with its NAR: rewritten by --repair
CATALOG = "catalog"  # the catalog disagrees with the directory: rebuilt by --repair
CACHEINFO = "cache-info"  # nix-cache-info missing or wrong: rewritten by --repair
NOTE = "note"  # said, not counted
WARNING = "warning"  # intact, but this machine's Nix cannot restore it: said, not counted
SAID = (NOTE, WARNING)


@dataclass
class Problem:
    subject: str  # a store path or a file
    what: str
    kind: str
    hash: str | None = None

    def line(self) -> str:
        return f"{self.subject}: {self.what}"


@dataclass
class Checked:
    hash: str
    info: NarInfo | None = None
    listing: dict | None = None  # parsed from the NAR: set only when it matches NarHash
    deepest: int = 0  # nesting depth of the NAR's deepest node
    problems: list[Problem] = field(default_factory=list)
    damaged: bool = False  # proven: the narinfo or the NAR is unreadable, missing or wrong

    def add(self, kind: str, what: str) -> None:
        subject = self.info.store_path if self.info else f"{self.hash}.narinfo"
        self.problems.append(Problem(subject, what, kind, self.hash))


def _frames(f: BinaryIO, table: zstdseek.SeekTable) -> Iterator[bytes]:
    dctx = zstandard.ZstdDecompressor()
    for frame in table.frames:
        yield zstdseek.read_frame(f, frame, dctx)


def _file_hash(f: io.BufferedReader) -> str:
    sha = hashlib.sha256()
    buf = bytearray(nar.CHUNK)
    view = memoryview(buf)
    f.seek(0)
    while n := f.readinto(buf):
        sha.update(view[:n])
    return nix32.format_sha256(sha.digest())


def signature_problem(info: NarInfo, key: PublicKey, known: list[PublicKey]
                      ) -> tuple[str, str] | None:
    """(kind, what) when `key` does not sign `info`; `known`: keys recorded in the cache."""
    if info.signed_by(key):
        return None
    names = sorted({s.partition(":")[0] for s in info.sigs})
    if key.name in names:
        for other in known:
            if other.name == key.name and bytes(other.key) != bytes(key.key) \
                    and info.signed_by(other):
                return FOREIGN, (f"signed by a key you don't hold: {other.text()}, an earlier "
                                 f"key named {key.name} (recorded in .narfs/keys), not yours")
        return BADSIG, (f"signature by {key.name} does not verify with your key: the narinfo "
                        "was altered after signing, or a key you don't hold with the same "
                        "name signed it")
    if names:
        return FOREIGN, (f"signed by a key you don't hold: {', '.join(names)} (no signature "
                         f"by {key.name})")
    return UNSIGNED, f"unsigned (no signature by {key.name})"


def check_entry(cache: Cache, key: PublicKey | None, h: str,
                known: list[PublicKey] | None = None) -> Checked:
    """Everything one narinfo claims, checked against the files (runs in a worker thread)."""
    c = Checked(h)
    try:
        info = c.info = cache.read_narinfo(h)
    except (CorruptError, OSError) as e:
        c.add(BROKEN, f"data damaged: unreadable narinfo: {e}")
        c.damaged = True
        return c
    if key is not None:
        problem = signature_problem(info, key, known or [])
        if problem is not None:
            c.add(*problem)
    try:
        f = cache.open_nar(info)
    except FileNotFoundError:
        c.add(BROKEN, f"data damaged: NAR {info.url} is missing")
        c.damaged = True
        return c
    except (CorruptError, OSError) as e:
        c.add(BROKEN, f"data damaged: NAR {info.url} unreadable: {e}")
        c.damaged = True
        return c
    with f:
        size = os.fstat(f.fileno()).st_size
        if info.file_size is not None and size != info.file_size:
            c.add(BROKEN, f"NAR {info.url} is {size} bytes, FileSize says {info.file_size}")
        if info.file_hash is not None:
            got = _file_hash(f)
            if got != info.file_hash:
                c.add(BROKEN, f"NAR {info.url} hashes to {got}, FileHash says "
                      f"{info.file_hash}")
        f.seek(0)
        try:
            table = zstdseek.read_table(f, size) if info.compression == "zstd" else None
            if table is not None and table.size != info.nar_size:
                raise CorruptError(f"seek table covers {table.size} bytes, NarSize says "
                                   f"{info.nar_size}")
            if table is not None:
                chunks = _frames(f, table)
            else:
                f.seek(0)
                chunks = decompressed_chunks(f, info.compression)
            stream = NarStream(chunks, info.nar_size)
            builder = nar.ListingBuilder()
            nar.parse(stream, builder, info.nar_size)
            stream.drain()
        except CorruptError as e:
            c.add(BROKEN, f"data damaged: NAR {info.url} is damaged: {e}")
            c.damaged = True
            return c
        except NarfsError as e:  # a compression Python cannot read (br, lz4, lzip)
            c.add(NOTE, f"not checked: {e}")
            return c
    if stream.size != info.nar_size or stream.nar_hash() != info.nar_hash:
        c.add(BROKEN, f"data damaged: NAR {info.url} holds {stream.size} bytes hashing to "
              f"{stream.nar_hash()}, the narinfo says {info.nar_size} bytes, {info.nar_hash}")
        c.damaged = True
        return c
    c.listing = builder.root
    c.deepest = builder.deepest
    try:
        ls = cache.read_listing(h, info.nar_size)
    except (CorruptError, OSError) as e:
        c.add(LISTING, f"listing {h}.ls unreadable: {e}")
    else:
        if ls is not None and not listing.agrees(ls, builder.root):
            c.add(LISTING, f"listing {h}.ls disagrees with the NAR")
    return c


@dataclass
class Scan:
    hashes: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    strays: list[str] = field(default_factory=list)  # files --repair removes
    nars: dict[str, str] = field(default_factory=dict)  # URL → file
    listings: set[str] = field(default_factory=set)
    recent_skipped: int = 0
    writer_active: bool = False
    now: float = 0.0

    def stray(self, path: str, what: str) -> None:
        """Report a file nothing should hold; while a writer runs, young files are its own."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if self.writer_active and self.now - st.st_mtime < RECENT:
            self.recent_skipped += 1
            return
        if stat.S_ISDIR(st.st_mode):
            self.problems.append(Problem(path, f"{what} (a directory: remove it by hand)",
                                         STRAY))
            return
        self.strays.append(path)
        self.problems.append(Problem(path, what, STRAY))


def scan(cache: Cache, writer_active: bool, now: float) -> Scan:
    """Classify every name in the cache root and nar/."""
    s = Scan(writer_active=writer_active, now=now)
    stray = s.stray

    for name in sorted(os.listdir(cache.root)):
        path = os.path.join(cache.root, name)
        if name == CACHE_INFO:
            try:
                text = read_small(path, 4096).decode(errors="replace")
            except (OSError, CorruptError) as e:
                text = ""
                log.debug("%s: %s", path, e)
            if f"StoreDir: {STORE_DIR}" not in text.splitlines():
                s.problems.append(Problem(path, f"does not declare StoreDir: {STORE_DIR}",
                                          CACHEINFO))
        elif name.startswith(TMP_PREFIX):
            stray(path, "temporary file left by an interrupted writer")
        elif name.endswith(".narinfo") and is_hash(name[:-8]):
            s.hashes.append(name[:-8])
        elif name.endswith(".ls") and is_hash(name[:-3]):
            s.listings.add(name[:-3])
        elif name in KNOWN_DIRS and os.path.isdir(path) and not os.path.islink(path):
            pass
        elif name == pathindex.FILENAME and stat.S_ISREG(os.lstat(path).st_mode):
            pass  # the path index remote mounts read (rewritten by the next change)
        elif name.endswith(frameauth.SUFFIX) and is_hash(name[:-len(frameauth.SUFFIX)]):
            pass  # signed frame hashes for remote mounts (the next gc drops orphans)
        elif name in ("nar", ".narfs"):
            mode = os.lstat(path).st_mode
            s.problems.append(Problem(path, f"{kind_of(mode)}, not a directory: narfs reads and "
                                      "writes nothing through it; replace it with a directory",
                                      STRAY))
        else:
            stray(path, "unknown file in the cache root")
    if not os.path.exists(os.path.join(cache.root, CACHE_INFO)):
        s.problems.append(Problem(os.path.join(cache.root, CACHE_INFO),
                                  "missing: Nix will not take the directory as a cache",
                                  CACHEINFO))
    known = set(s.hashes)
    for h in sorted(s.listings - known):
        stray(cache.listing_path(h), "listing without a narinfo")
    try:
        names = sorted(os.listdir(cache.nar_dir)) if _is_real_dir(cache.nar_dir) else []
    except FileNotFoundError:
        names = []
    for name in names:
        path = os.path.join(cache.nar_dir, name)
        if name.startswith(TMP_PREFIX):
            stray(path, "temporary file left by an interrupted writer")
        else:
            s.nars[f"nar/{name}"] = path
    state = os.path.join(cache.root, ".narfs")
    for name in sorted(os.listdir(state)) if _is_real_dir(state) else []:
        path = os.path.join(state, name)
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(mode) if name in STATE_DIRS else stat.S_ISREG(mode):
            continue
        stray(path, f"{kind_of(mode)} in narfs's own state: nothing reads or writes through it "
              "(narfs recreates the file)")
    return s


def check_trees(cache: Cache, s: Scan, checked: list[Checked]) -> None:
    """The mount's tree files are derived data it trusts once their header names the NAR:
    each must be exactly the tree built from its NAR (else a forged one would serve other
    bytes under a path's name). Those that are not are strays: --repair removes them."""
    trees = os.path.join(cache.root, ".narfs", "trees")
    if not _is_real_dir(trees):
        return
    by_hash = {c.hash: c for c in checked}
    for name in sorted(os.listdir(trees)):
        path = os.path.join(trees, name)
        if name.startswith(TMP_PREFIX):  # the mount writes tree files through temporaries
            s.stray(path, "temporary file left by an interrupted writer")
            continue
        c = by_hash.get(name[:-5]) if name.endswith(".tree") else None
        if c is None or c.info is None:
            s.stray(path, "tree file of no archived path")
            continue
        if c.listing is None:
            continue  # the entry itself is named
        try:
            data = read_small(path, MAX_TREE_FILE)
            want = Tree.build(c.hash, 0, c.listing, c.info.nar_size).dumps(c.info.nar_hash)
        except (OSError, NarfsError) as e:
            s.stray(path, f"tree file unreadable: {e}")
            continue
        if data != want:
            s.stray(path, "tree file disagrees with its NAR (the mount would serve other bytes)")


def _is_real_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def catalog_problems(catalog: Catalog, cache: Cache, checked: list[Checked]) -> list[Problem]:
    """Where the (freshly synced) catalog disagrees with the narinfos and NARs."""
    problems = []
    good = {c.hash: c for c in checked if c.info is not None}
    for h, c in good.items():
        assert c.info is not None
        try:
            st = os.stat(cache.narinfo_path(h))
        except FileNotFoundError:
            continue
        got = catalog.paths.get(h)
        if got is None:
            problems.append(Problem(c.info.store_path, "missing from the catalog", CATALOG, h))
        elif got != asdict(Entry.of(c.info, st)):
            problems.append(Problem(c.info.store_path, "catalog entry disagrees with the "
                                    "narinfo", CATALOG, h))
        ls = catalog.listing(h)
        if ls is not None and c.listing is not None and ls != c.listing:
            problems.append(Problem(c.info.store_path, "catalog listing disagrees with the NAR",
                                    CATALOG, h))
    for h in list(catalog.paths.keys()):
        if h not in good:
            problems.append(Problem(f"{cache.root}/{h}.narinfo", "in the catalog but not a "
                                    "valid narinfo in the directory", CATALOG, h))
    return problems


def rebuild_catalog(catalog: Catalog) -> None:
    """Rebuild in place (a live mount keeps its connection), access times kept."""
    for name in ("paths", "listings", "tops"):
        table = getattr(catalog, name, None)
        if table is not None:
            table.clear()
            table.commit()
    catalog.sync()
    stale = [h for h in list(catalog.access.keys()) if h not in catalog.paths]
    for h in stale:
        del catalog.access[h]
    catalog.access.commit()


@dataclass
class Report:
    checked: list[Checked]
    problems: list[Problem]
    file_bytes: int
    seconds: float
    recent_skipped: int = 0
    strays: list[str] = field(default_factory=list)  # files --repair removes


async def run_checks(cache: Cache, key: PublicKey | None, hashes: list[str], threads: int
                     ) -> list[Checked]:
    known = cache.recorded_keys()
    limiter = trio.CapacityLimiter(max(1, threads))
    results: list[Checked] = []
    total = 0
    file_sizes: dict[str, int] = {}
    for h in hashes:  # progress in compressed bytes, read from the narinfos cheaply
        try:
            info = cache.read_narinfo(h)
            file_sizes[h] = info.file_size or info.nar_size
        except (CorruptError, OSError):
            file_sizes[h] = 0
        total += file_sizes[h]
    bar = Progress(total, "verifying")

    async def one(h: str) -> None:
        c = await trio.to_thread.run_sync(check_entry, cache, key, h, known, limiter=limiter)
        results.append(c)
        bar.advance(file_sizes[h], h)

    try:
        async with trio.open_nursery() as nursery:
            for h in hashes:
                nursery.start_soon(one, h)
    finally:
        bar.close()
    return results


async def verify(cache: Cache, key: PublicKey | None, threads: int, writer_active: bool,
                 catalog: Catalog | None) -> Report:
    start = time.monotonic()
    s = scan(cache, writer_active, time.time())
    checked = await run_checks(cache, key, s.hashes, threads)
    checked.sort(key=lambda c: c.hash)
    good = {c.hash for c in checked if c.info is not None}
    urls = {c.info.url for c in checked if c.info is not None}
    for url, path in sorted(s.nars.items()):
        if url not in urls:
            s.stray(path, "stray NAR: no narinfo refers to it")
    await trio.to_thread.run_sync(check_trees, cache, s, checked)
    problems = list(s.problems)
    for c in checked:
        problems += c.problems
    problems += await restorability(checked)
    for c in checked:
        if c.info is None:
            continue
        for ref in c.info.references:
            rh = hash_part(ref)
            if rh != c.hash and rh not in good:
                problems.append(Problem(c.info.store_path, f"references {STORE_DIR}/{ref}, "
                                        "which is not in the cache (incomplete closure)",
                                        CLOSURE, c.hash))
    if catalog is not None:
        catalog.sync()
        problems += catalog_problems(catalog, cache, checked)
    file_bytes = sum(os.path.getsize(p) for p in s.nars.values() if os.path.isfile(p))
    return Report(checked, problems, file_bytes, time.monotonic() - start, s.recent_skipped,
                  s.strays)


async def restorability(checked: list[Checked]) -> list[Problem]:
    """Intact entries this machine's Nix would refuse to restore (nixversions)."""
    try:
        nix = await nixversions.detect()
    except NarfsError as e:
        return [Problem("nix", f"{e}: whether Nix can restore each entry is not checked",
                        NOTE)]
    out = []
    for c in checked:
        refusal = nixversions.depth_refusal(nix, c.deepest)
        if refusal and c.info is not None and c.listing is not None:
            out.append(Problem(c.info.store_path, refusal, WARNING, c.hash))
    return out


def doomed_entries(report: Report) -> tuple[list[tuple[str, str | None]], dict[str, str]]:
    """What --repair un-publishes, referrers first, and why (hash → reason)."""
    infos = {c.hash: c.info for c in report.checked if c.info is not None}
    why: dict[str, str] = {}
    damaged = {c.hash for c in report.checked if c.damaged}
    # The reason shown is the gravest: damage first, then a signature, then the closure.
    for p in sorted(report.problems, key=lambda p: (not p.what.startswith("data damaged"),
                                                     TAKEN_OUT.index(p.kind)
                                                     if p.kind in TAKEN_OUT else 0)):
        if p.hash in damaged and not p.what.startswith("data damaged"):
            continue
        if p.kind in TAKEN_OUT and p.hash is not None and p.hash not in why:
            why[p.hash] = p.what
    referrers: dict[str, list[str]] = {}
    for h, info in infos.items():
        for ref in info.references:
            referrers.setdefault(hash_part(ref), []).append(h)
    todo = list(why)
    while todo:
        h = todo.pop()
        for r in referrers.get(h, []):
            if r not in why and r != h:
                name = infos[h].store_path if h in infos else f"{h}.narinfo"
                why[r] = f"its closure is broken: references {name}"
                todo.append(r)
    parsed = {h: [hash_part(r) for r in infos[h].references] for h in why if h in infos}
    order = referrers_first(parsed) + sorted(h for h in why if h not in infos)
    return [(h, infos[h].url if h in infos else None) for h in order], why


async def repair(cache: Cache, catalog: Catalog, report: Report) -> tuple[list[str], int]:
    """Apply the fixes; return the lines that say what was done, and problems left."""
    lines = []
    infos = {c.hash: c.info for c in report.checked if c.info is not None}
    damaged = {c.hash for c in report.checked if c.damaged}
    doomed, why = doomed_entries(report)
    path_of = {h: infos[h].store_path if h in infos else f"{h}.narinfo" for h, _ in doomed}
    held = [(h, url) for h, url in doomed if h not in damaged]
    for h, url in held:  # linked aside before anything is un-published
        quarantine.hold(cache, h, url, path_of[h], why[h])
    if doomed:
        freed = retire(cache, catalog, doomed)
        lost = [path_of[h] for h, _ in doomed if h in damaged]
        valid = set()
        names = [p for p in lost if p.startswith(STORE_DIR)]
        if names:
            invalid = set(await nixquery.invalid_paths(names))
            valid = {p for p in names if p not in invalid}
        for h, _ in doomed:
            path = path_of[h]
            if h in damaged:
                hint = (f"; it is still in the store: `narfs archive {path}` archives it again"
                        if path in valid else "")
                lines.append(f"lost {path}: {why[h]}{hint}")
            else:
                lines.append(f"quarantined {path}: {why[h]}")
        if lost:
            lines.append(f"un-published {len(lost)} damaged entries: these store paths are no "
                         "longer in the cache")
        if held:
            badsig = sorted({key_name(p.what) for p in report.problems
                             if p.kind == BADSIG and p.hash in dict(held)})
            lines.append(
                f"quarantined {len(held)} entries whose NAR still matches its NarHash in "
                f"{cache.root}/.narfs/{quarantine.DIRNAME} (nothing deleted): `narfs "
                f"quarantine` lists them, `{quarantine.RESTORE_HINT}` puts them back"
                + (f"; if {', '.join(badsig)} was your own key before, re-sign them after "
                   f"that with `narfs verify --adopt {badsig[0]}`" if badsig else ""))
        lines.append(f"took {freed.nar_files} NAR files ({human_size(freed.bytes)} with "
                     "narinfos and listings) out of the cache; the quarantined ones stay on disk")
    removed = 0
    for path in report.strays:
        try:
            os.unlink(path)
            removed += 1
            lines.append(f"removed {path}")
        except (FileNotFoundError, IsADirectoryError):
            pass
    if removed:
        cache.sync_nar_dir()
    gone = {h for h, _ in doomed}
    for c in report.checked:
        if c.hash in gone or c.listing is None:
            continue
        if any(p.kind == LISTING for p in c.problems):
            ls = listing.render(c.listing)
            if ls is None:  # too deep for a `.ls`: the mount reads the NAR instead
                os.unlink(cache.listing_path(c.hash))
                lines.append(f"removed {cache.listing_path(c.hash)}: its tree is too deep "
                             "for a listing")
                continue
            write_atomic(cache.listing_path(c.hash), ls)
            lines.append(f"rewrote {cache.listing_path(c.hash)} from its NAR")
    if any(p.kind == CACHEINFO for p in report.problems):
        write_atomic(os.path.join(cache.root, CACHE_INFO), cache_info_text().encode())
        lines.append(f"rewrote {os.path.join(cache.root, CACHE_INFO)}")
    rebuild_catalog(catalog)
    lines.append(f"rebuilt the catalog ({len(catalog.paths)} entries, access times kept)")
    left = [p for p in report.problems if (p.kind in (UNSIGNED, FOREIGN) and p.hash not in gone)
            or (p.kind == STRAY and p.subject not in report.strays)]
    unsigned = sum(1 for p in left if p.kind in (UNSIGNED, FOREIGN))
    if unsigned:
        lines.append(f"kept {unsigned} entries unsigned or signed by keys you don't hold: their "
                     "data is intact; trust their keys, `narfs verify --adopt KEYNAME` to sign "
                     "them with yours, or re-archive them from the store")
    return lines, len(left)


def key_name(what: str) -> str:
    """The key name a BADSIG problem line names."""
    return what.removeprefix("signature by ").split(" does not verify", 1)[0]


def adopt(cache: Cache, secret: SecretKey, report: Report, names: list[str]) -> list[str]:
    """Sign with `secret` every entry signed by one of `names` (and not yet by `secret`) whose
    NAR matches its NarHash and whose only problems are about signatures; the signatures it
    had stay. The entries adopted leave the report's problems."""
    lines = []
    adopted = set()
    for c in report.checked:
        info = c.info
        if info is None or c.listing is None or info.signed_by(secret.public):
            continue
        if not {s.partition(":")[0] for s in info.sigs} & set(names):
            continue
        if any(p.kind not in (BADSIG, FOREIGN, UNSIGNED, LISTING) for p in c.problems):
            what = next(p.what for p in c.problems
                        if p.kind not in (BADSIG, FOREIGN, UNSIGNED, LISTING))
            lines.append(f"not adopted {info.store_path}: {what}")
            continue
        info.sigs.append(secret.sign(info.fingerprint()))
        with cache.publish_lock(exclusive=False):
            if not cache.has(c.hash):  # retired meanwhile
                continue
            write_atomic(cache.narinfo_path(c.hash), info.render().encode())
        adopted.add(c.hash)
        lines.append(f"adopted {info.store_path}: signed by {secret.name}")
    if adopted:
        fsync_dir(cache.root)
    report.problems = [p for p in report.problems
                       if not (p.hash in adopted and p.kind in (BADSIG, FOREIGN, UNSIGNED))]
    lines.append(f"adopted {len(adopted)} entries signed by {', '.join(names)}: signed by "
                 f"{secret.name} too")
    return lines


def main(args: argparse.Namespace, settings: Settings) -> int:
    cache = Cache(settings.cache_dir)
    cache.check()
    key = trusted_key(settings)
    if key is None:
        print("narfs verify: no key configured (public_key or secret_key_file): signatures "
              "are not checked")
    adopt_names = args.adopt or []
    secret = None
    if adopt_names:
        if not settings.secret_key_file:
            raise NarfsError("verify --adopt: no secret_key_file configured to sign with; "
                             "run `narfs init` or pass --secret-key")
        secret = load_secret_key(settings.secret_key_file)
        if key is None or bytes(key.key) != bytes(secret.public.key):
            key = secret.public  # adopting means trusting your own key
    if args.repair or secret is not None:
        with cache.writer(exclusive=True), Catalog(cache) as catalog:
            report = trio.run(verify, cache, key, settings.threads, False, catalog)
            if secret is not None:
                for line in adopt(cache, secret, report, adopt_names):
                    print(f"adopt: {line}")
            _print(report, cache)
            problems = [p for p in report.problems if p.kind not in SAID]
            if not problems:
                return 0
            if not args.repair:
                return 1
            lines, left = trio.run(repair, cache, catalog, report)
            for line in lines:
                print(f"repair: {line}")
            return 1 if left else 0
    active = cache.writer_active()
    shared = open_catalog(cache)  # None: not writable by this user
    try:
        report = trio.run(verify, cache, key, settings.threads, active, shared)
    finally:
        if shared is not None:
            shared.close()
    if shared is None:
        print("narfs verify: the catalog is not writable by this user: not checked")
    _print(report, cache)
    return 1 if [p for p in report.problems if p.kind not in SAID] else 0


def _print(report: Report, cache: Cache) -> None:
    counted = [p for p in report.problems if p.kind not in SAID]
    for p in sorted(report.problems, key=lambda p: (p.subject, p.what)):
        print((f"{p.kind}: " if p.kind in SAID else "") + p.line())
    if report.recent_skipped:
        print(f"narfs verify: a writer is active: {report.recent_skipped} files younger than "
              f"{RECENT // 60} min that nothing refers to yet were not judged")
    n = len(report.checked)
    rate = report.file_bytes / report.seconds if report.seconds else 0
    summary = (f"{plural(n, 'entry', 'entries')}, {human_size(report.file_bytes)} of NAR files "
               f"in {cache.root}, "
               f"checked in {report.seconds:.1f} s ({human_size(rate)}/s)")
    badsig = [p for p in report.problems if p.kind == BADSIG]
    if badsig:
        intact = {c.hash for c in report.checked if c.listing is not None}
        names = sorted({key_name(p.what) for p in badsig})
        print(f"note: {len(badsig)} entries carry a signature by {', '.join(names)} that your "
              f"key does not verify, {sum(p.hash in intact for p in badsig)} of them with a NAR "
              f"that matches its NarHash: if {names[0]} was this machine's key before (a "
              f"reinstall), `narfs verify --adopt {names[0]}` signs them with yours; `narfs "
              "verify --repair` quarantines them (deletes nothing)")
    if counted:
        print(f"{plural(len(counted), 'problem')}; {summary}")
    else:
        print(f"healthy: {summary}")
    try:
        held = quarantine.held(cache)
    except NarfsError as e:
        print(f"note: {e}")
    else:
        if held:
            print(f"note: {len(held)} entries wait in the quarantine: `narfs quarantine` lists "
                  "them")
