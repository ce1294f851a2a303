"""Issue 5: `narfs gc` retires by last access, oldest first, and never breaks a kept closure."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from narfs.cache import Cache
from narfs.catalog import Catalog, Entry
from narfs.errors import NarfsError
from narfs.gc import effective_access, parse_age, parse_size, plan
from narfs.narinfo import parse as parse_narinfo
from narfs.storepath import hash_part
from nixtools import NIX, NixStore, run

if TYPE_CHECKING:
    from conftest import Narfs

DAY = 86400


def age(narfs: Narfs, paths: list[str], seconds: float) -> None:
    """Archive time is the narinfo's mtime: set it back (the catalog picks it up on sync)."""
    t = time.time() - seconds
    for p in paths:
        os.utime(narfs.cache / f"{hash_part(p)}.narinfo", (t, t))


def archived(narfs: Narfs) -> set[str]:
    return {f"/nix/store/{n[:-8]}" for n in os.listdir(narfs.cache) if n.endswith(".narinfo")}


def names(narfs: Narfs) -> set[str]:
    return {parse_narinfo(p.read_bytes()).store_path for p in narfs.cache.glob("*.narinfo")}


def assert_cache_whole(narfs: Narfs) -> None:
    """Every narinfo's URL exists and Nix reads every kept path's closure from the cache."""
    kept = sorted(names(narfs))
    for p in narfs.cache.glob("*.narinfo"):
        url = parse_narinfo(p.read_bytes()).url
        assert (narfs.cache / url).is_file(), f"{p.name} names a missing {url}"
    if kept:
        run([*NIX, "path-info", "--store", f"file://{narfs.cache}", "-r", *kept])


def touch_through_read(narfs: Narfs, paths: list[str]) -> None:
    """What a read through the mount records: an access on the path read, and nothing else."""
    with Catalog(Cache(str(narfs.cache))) as catalog:
        catalog.sync()
        catalog.touch(hash_part(p) for p in paths)


def test_old_paths_go_recent_closures_stay(narfs: Narfs, nixstore: NixStore) -> None:
    shared = nixstore.text("shared dependency", "narfs-gc-shared")
    old = nixstore.text("old project", "narfs-gc-old", refs=[shared])
    dep = nixstore.text("recent dependency", "narfs-gc-dep")
    recent = nixstore.text("recent project", "narfs-gc-recent", refs=[shared, dep])
    narfs("archive", old, recent)
    everything = [shared, old, dep, recent]
    age(narfs, everything, 400 * DAY)
    touch_through_read(narfs, [recent])  # only the top was read; its closure stays with it
    old_nar = parse_narinfo((narfs.cache / f"{hash_part(old)}.narinfo").read_bytes()).url

    out = narfs("gc", "--older-than", "365d")
    assert f"retired {old} " in out.stdout, out.stdout
    assert "retired 1 path " in out.stdout
    assert names(narfs) == {shared, dep, recent}
    assert not (narfs.cache / f"{hash_part(old)}.ls").exists()
    assert not (narfs.cache / old_nar).exists()
    assert_cache_whole(narfs)
    again = narfs("gc", "--older-than", "365d")
    assert "nothing to retire" in again.stdout
    with Catalog(Cache(str(narfs.cache))) as catalog:  # gc kept the catalog in step
        assert catalog.get(hash_part(old)) is None and catalog.get(hash_part(recent))

    # A restore is an access too: the whole closure it brought back is recent.
    age(narfs, [shared, dep, recent], 400 * DAY)
    with Catalog(Cache(str(narfs.cache))) as catalog:
        catalog.access.clear()
        catalog.access.commit()
    narfs("restore", recent)  # all valid already: nothing to fetch, but it was asked for
    assert "nothing to retire" in narfs("gc", "--older-than", "365d").stdout
    assert names(narfs) == {shared, dep, recent}


def test_shared_nar_goes_only_with_its_last_narinfo(narfs: Narfs, nixstore: NixStore) -> None:
    a = nixstore.text("identical contents\n", "narfs-gc-twin-a")
    b = nixstore.text("identical contents\n", "narfs-gc-twin-b")
    narfs("archive", a, b)
    url_a, url_b = (parse_narinfo((narfs.cache / f"{hash_part(p)}.narinfo").read_bytes()).url
                    for p in (a, b))
    assert url_a == url_b  # one NAR file, two narinfos
    age(narfs, [a], 30 * DAY)
    narfs("gc", "--older-than", "7d")
    assert names(narfs) == {b}
    assert (narfs.cache / url_b).is_file()
    assert_cache_whole(narfs)
    age(narfs, [b], 30 * DAY)
    out = narfs("gc", "--older-than", "2w", "--yes")  # all of the archive: --yes
    assert f"retired {b} " in out.stdout
    assert not (narfs.cache / url_b).exists()
    assert os.listdir(narfs.cache / "nar") == []


def _disk(narfs: Narfs) -> int:
    total = 0
    for p in narfs.cache.glob("*.narinfo"):
        total += p.stat().st_size
        ls = p.with_suffix(".ls")
        total += ls.stat().st_size if ls.exists() else 0
    return total + sum(p.stat().st_size for p in (narfs.cache / "nar").iterdir())


def test_max_size_retires_oldest_first(narfs: Narfs, nixstore: NixStore,
                                       tmp_path: Path) -> None:
    paths = []
    for i, kib in enumerate((300, 200, 100)):
        src = tmp_path / f"blob{i}"
        src.mkdir()
        (src / "data").write_bytes(os.urandom(kib << 10))  # incompressible: sizes are known
        paths.append(nixstore.tree(src, f"narfs-gc-size-{i}"))
    narfs("archive", *paths)
    for i, p in enumerate(paths):  # paths[0] is the oldest
        age(narfs, [p], (3 - i) * DAY)
    total = _disk(narfs)
    limit = total - (250 << 10)  # the oldest (300 KiB) alone is enough
    out = narfs("gc", "--max-size", str(limit))
    assert names(narfs) == set(paths[1:]), out.stdout
    assert _disk(narfs) <= limit
    out = narfs("gc", "--max-size", f"{(_disk(narfs) - 50_000) / 1024:.0f}K")
    assert names(narfs) == {paths[2]}, out.stdout
    assert_cache_whole(narfs)


def _files(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != ".narfs"]
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            out[os.path.join(dirpath, name)] = (st.st_size, st.st_mtime_ns)
    return out


def test_dry_run_changes_nothing(narfs: Narfs, nixstore: NixStore) -> None:
    chain = nixstore.closure(2, "narfs-gc-dry")
    narfs("archive", chain[-1])
    age(narfs, chain, 10 * DAY)
    (narfs.cache / "nar" / ".narfs-tmp-leftover").write_bytes(b"x")
    before = _files(narfs.cache)
    out = narfs("gc", "--older-than", "1d", "--dry-run")
    assert f"would retire {chain[0]}" in out.stdout and f"would retire {chain[1]}" in out.stdout
    assert "would retire 2 paths" in out.stdout
    assert _files(narfs.cache) == before


def test_ages_and_sizes() -> None:
    assert parse_age("365d") == 365 * DAY
    assert parse_age("12h") == 12 * 3600
    assert parse_age("30s") == 30
    assert parse_age("90min") == parse_age("1.5h") == 90 * 60
    assert parse_age("2w") == 14 * DAY
    assert parse_age("1y") == 365 * DAY
    assert parse_size("500G") == 500 << 30
    assert parse_size("10M") == parse_size("10MiB") == 10 << 20
    assert parse_size("1GB") == 10**9
    assert parse_size("12345") == 12345
    # A bare number (seconds once) and `m` (minutes once, months to many) are refused.
    for bad in ("", "30", "6M", "6m", "6mo", "6months", "12x", "d", "-1d", "1.2.3h", "1e3d",
                "9" * 300 + "d", "1001y"):
        with pytest.raises(NarfsError):
            parse_age(bad)
    for bad in ("", "12X", "G", "10MiBB", "1kib2", "9" * 300, "2000P", "-5G"):
        with pytest.raises(NarfsError):
            parse_size(bad)


def test_ambiguous_ages_and_mass_retirement_need_the_user_to_say_so(
        narfs: Narfs, nixstore: NixStore) -> None:
    paths = [nixstore.text(f"path {i}\n", f"narfs-gc-half-{i}") for i in range(3)]
    narfs("archive", *paths)
    age(narfs, paths[:2], 40 * DAY)
    for bad, words in (("30", "needs a unit"), ("6M", "minutes or months"),
                       ("9" * 300 + "d", "1000 years")):
        res = narfs("gc", "--older-than", bad, check=False)
        assert res.returncode != 0 and words in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert names(narfs) == set(paths)
    res = narfs("gc", "--max-size", "9" * 300, check=False)
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1, res.stderr

    # Two of three paths are older than 30d: more than half the archive.
    res = narfs("gc", "--older-than", "30d", check=False)
    assert res.returncode == 1
    assert "more than half" in res.stderr and "--yes" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert all(f"would retire {p} " in res.stdout for p in paths[:2]), res.stdout
    assert names(narfs) == set(paths)
    assert "would retire 2 paths" in narfs("gc", "--older-than", "30d", "--dry-run").stdout
    assert names(narfs) == set(paths)
    out = narfs("gc", "--older-than", "30d", "--yes").stdout
    assert "retired 2 paths" in out, out
    assert names(narfs) == {paths[2]}
    assert_cache_whole(narfs)


def _entry(h: str, refs: list[str], url: str | None = None) -> Entry:
    return Entry(hash=h, name=f"{h}-x", url=url or f"nar/{h}.nar.zst", compression="zstd",
                 file_size=100, nar_size=100, nar_hash="sha256:x",
                 references=[f"{r}-x" for r in refs], archived=0.0, mtime_ns=0)


def test_plan_is_a_closure_safe_prefix() -> None:
    h = {k: k * 32 for k in "abcdef"}
    # a ← b ← c (c references b references a); d alone; e ← f; f was used recently.
    entries = {h["a"]: _entry(h["a"], []), h["b"]: _entry(h["b"], [h["a"]]),
               h["c"]: _entry(h["c"], [h["b"], h["c"]]), h["d"]: _entry(h["d"], []),
               h["e"]: _entry(h["e"], []), h["f"]: _entry(h["f"], [h["e"]])}
    access = {h["a"]: 1.0, h["b"]: 5.0, h["c"]: 3.0, h["d"]: 2.0, h["e"]: 0.5, h["f"]: 9.0}
    order = [x for x, _ in effective_access(entries, access)]
    # c (3) must precede b (5 → its own), and a inherits b's 5; e inherits f's 9.
    assert order == [h["d"], h["c"], h["b"], h["a"], h["f"], h["e"]]
    disk = dict.fromkeys(entries, 10)
    nar_disk = {e.url: 100 for e in entries.values()}
    chosen, before, after = plan(entries, access, disk, nar_disk, older_than=4.0,
                                 max_size=None, now=10.0)
    assert [c.entry.hash for c in chosen] == [h["d"], h["c"], h["b"], h["a"]]
    assert before == 660 and after == 220
    chosen, _, after = plan(entries, access, disk, nar_disk, None, 500, 10.0)
    assert [c.entry.hash for c in chosen] == [h["d"], h["c"]] and after == 440


@pytest.mark.expect_log_errors("was retired from the cache meanwhile")  # the archive says so
def test_gc_racing_an_archive_never_leaves_a_broken_closure(narfs: Narfs,
                                                           nixstore: NixStore) -> None:
    """gc retires a reference while an archive that skipped it (the cache had it) is between
    writing its files and publishing: the referrer must not be published."""
    from concurrent.futures import ThreadPoolExecutor

    import trio

    from narfs import nixquery
    from narfs.archive import Archiver, Result
    from narfs.config import load
    from narfs.retire import retire
    from narfs.signing import load_secret_key

    dep = nixstore.text("dependency retired mid-archive", "narfs-gc-race-dep")
    top = nixstore.text("referrer", "narfs-gc-race-top", refs=[dep])
    narfs("archive", dep)
    cache = Cache(str(narfs.cache))
    settings = load({"cache_dir": str(narfs.cache), "secret_key_file": str(narfs.key)})
    infos = trio.run(nixquery.closure_infos, [top])
    with ThreadPoolExecutor(2) as ex:
        archiver = Archiver(cache, settings, load_secret_key(str(narfs.key)), ex)
        result = Result()
        written = archiver._write_batch([infos[top]], result)  # dep skipped: cached
        dep_info = cache.read_narinfo(hash_part(dep))
        with Catalog(cache) as catalog:
            catalog.sync()
            retire(cache, catalog, [(hash_part(dep), dep_info.url)])
        archiver._commit(written, result)
    assert top in result.failed and "retired" in result.failed[top], result.failed
    assert archived(narfs) == set(), "a narinfo was published whose reference gc removed"
    assert not list(narfs.cache.glob("nar/.narfs-tmp-*")), "temporaries left behind"
    narfs("archive", top)  # a second run brings both back
    assert names(narfs) == {dep, top}
    assert_cache_whole(narfs)


def test_a_forged_catalog_url_costs_no_kept_entry_its_nar(narfs: Narfs,
                                                          nixstore: NixStore) -> None:
    """Issue 11: the catalog is derived data; gc decides which NAR files go from the
    narinfos. Here the kept twin's catalog value names another file (same mtime, so a sync
    does not look again): the shared NAR must stay."""
    a = nixstore.text("identical twin contents\n", "narfs-gc-forged-a")
    b = nixstore.text("identical twin contents\n", "narfs-gc-forged-b")
    narfs("archive", a, b)
    url = parse_narinfo((narfs.cache / f"{hash_part(b)}.narinfo").read_bytes()).url
    with Catalog(Cache(str(narfs.cache))) as catalog:
        catalog.sync()
        entry = dict(catalog.paths[hash_part(b)])
        entry["url"] = "nar/" + "1" * 52 + ".nar.zst"
        catalog.paths[hash_part(b)] = entry
        catalog.paths.commit()
    age(narfs, [a], 30 * DAY)
    narfs("gc", "--older-than", "7d", "--yes")
    assert names(narfs) == {b}
    assert (narfs.cache / url).is_file(), "gc deleted a NAR that a kept narinfo names"
    assert_cache_whole(narfs)
