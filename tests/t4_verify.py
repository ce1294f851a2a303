"""Issue 5: `narfs verify` names every damaged or stray file, `--repair` fixes and says what
was lost."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from narfs import frameauth
from narfs.cache import Cache
from narfs.catalog import Catalog
from narfs.narinfo import parse as parse_narinfo
from narfs.signing import parse_public_key
from narfs.storepath import hash_part
from nixtools import NIX, NixStore, run

if TYPE_CHECKING:
    from conftest import Narfs


def info_file(narfs: Narfs, path: str) -> Path:
    return narfs.cache / f"{hash_part(path)}.narinfo"


def nar_file(narfs: Narfs, path: str) -> Path:
    return narfs.cache / parse_narinfo(info_file(narfs, path).read_bytes()).url


def names(narfs: Narfs) -> set[str]:
    return {parse_narinfo(p.read_bytes()).store_path for p in narfs.cache.glob("*.narinfo")}


def lines_naming(output: str, subject: str) -> list[str]:
    return [ln for ln in output.splitlines() if ln.startswith(f"{subject}: ")]


def flip_sig(path: Path) -> None:
    text = path.read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("Sig: "))
    name, b64 = line[5:].split(":", 1)
    raw = bytearray(base64.b64decode(b64))
    raw[0] ^= 0x80
    path.write_text(text.replace(line, f"Sig: {name}:{base64.b64encode(bytes(raw)).decode()}"))


def test_verify_names_every_problem_and_repair_fixes_them(narfs: Narfs,
                                                          nixstore: NixStore) -> None:
    p = {k: nixstore.text(f"{k} {os.urandom(8).hex()}\n" * 2000, f"narfs-v-{k}")
         for k in ("flipped", "truncated", "nonar", "badsig", "healthy", "badls", "gone")}
    p["top-of-nonar"] = nixstore.text("refers", "narfs-v-top-of-nonar", refs=[p["nonar"]])
    p["top-of-gone"] = nixstore.text("refers", "narfs-v-top-of-gone", refs=[p["gone"]])
    narfs("archive", *p.values())
    assert narfs("verify").stdout.startswith("healthy: 9 entries")

    nar = nar_file(narfs, p["flipped"])
    data = bytearray(nar.read_bytes())
    data[len(data) // 3] ^= 0x04
    nar.write_bytes(bytes(data))
    nar = nar_file(narfs, p["truncated"])
    nar.write_bytes(nar.read_bytes()[: nar.stat().st_size // 2])
    nar_file(narfs, p["nonar"]).unlink()
    flip_sig(info_file(narfs, p["badsig"]))
    ls = narfs.cache / f"{hash_part(p['badls'])}.ls"
    doc = json.loads(ls.read_text())
    doc["root"]["entries"]["content"]["size"] += 1
    ls.write_text(json.dumps(doc))
    gone_nar = nar_file(narfs, p["gone"])
    info_file(narfs, p["gone"]).unlink()  # its NAR and .ls stay behind, strays now
    stray_nar = narfs.cache / "nar" / "0000000000000000000000000000000000000000000000000000.nar"
    stray_nar.write_bytes(b"not referenced")
    junk = narfs.cache / "junk.txt"
    junk.write_text("who put this here\n")
    tmp = narfs.cache / "nar" / ".narfs-tmp-interrupted.nar.zst"
    tmp.write_bytes(b"half a NAR")
    with Catalog(Cache(str(narfs.cache))) as catalog:
        catalog.sync()
        h = hash_part(p["healthy"])
        entry = dict(catalog.paths[h])
        entry["nar_size"] += 1  # same mtime: only a check of the contents can see it
        catalog.paths[h] = entry
        catalog.paths.commit()

    res = narfs("verify", check=False)
    out = res.stdout
    assert res.returncode == 1, out
    assert "Traceback" not in res.stderr
    expect = {
        p["flipped"]: "FileHash says",
        p["truncated"]: "FileSize says",
        p["nonar"]: "is missing",
        p["badsig"]: "does not verify",
        p["badls"]: "disagrees with the NAR",
        p["top-of-gone"]: "incomplete closure",
        p["healthy"]: "catalog entry disagrees",
        str(gone_nar): "no narinfo refers to",
        str(narfs.cache / f"{hash_part(p['gone'])}.ls"): "listing without a narinfo",
        str(stray_nar): "no narinfo refers to",
        str(junk): "unknown file",
        str(tmp): "temporary file",
    }
    for subject, what in expect.items():
        found = lines_naming(out, subject)
        assert found and any(what in ln for ln in found), (subject, what, out)
    assert not lines_naming(out, p["top-of-nonar"])  # intact itself; repair will say why it goes
    assert len(lines_naming(out, p["healthy"])) == 1

    res = narfs("verify", "--repair")
    out = res.stdout
    lost = {ln.split()[2].rstrip(":") for ln in out.splitlines() if ln.startswith("repair: lost ")}
    assert lost == {p[k] for k in ("flipped", "truncated", "nonar")}, out
    # Their NARs still match their NarHash: set aside, never deleted.
    held = {ln.split()[2].rstrip(":") for ln in out.splitlines()
            if ln.startswith("repair: quarantined /")}
    assert held == {p[k] for k in ("badsig", "top-of-nonar", "top-of-gone")}, out
    assert sorted(os.listdir(narfs.cache / ".narfs" / "quarantine")) == sorted(
        hash_part(p[k]) for k in ("badsig", "top-of-nonar", "top-of-gone"))
    assert f"references {p['nonar']}" in out
    for path in (gone_nar, stray_nar, junk, tmp):
        assert f"repair: removed {path}" in out, out
        assert not path.exists()
    assert "repair: rewrote" in out and "rebuilt the catalog" in out

    assert names(narfs) == {p["healthy"], p["badls"]}
    after = narfs("verify")
    assert after.stdout.startswith("healthy: 2 entries"), after.stdout
    run([*NIX, "path-info", "--store", f"file://{narfs.cache}", "-r", p["healthy"],
         p["badls"]])
    assert sorted(os.listdir(narfs.cache / "nar")) == sorted(
        parse_narinfo(f.read_bytes()).url[4:] for f in narfs.cache.glob("*.narinfo"))


def test_verify_passes_healthy_caches_of_narfs_and_of_nix(narfs: Narfs, nixstore: NixStore,
                                                          tmp_path: Path) -> None:
    src = tmp_path / "tree"
    (src / "bin").mkdir(parents=True)
    (src / "bin" / "x").write_text("#!/bin/sh\n")
    (src / "bin" / "x").chmod(0o755)
    (src / "big").write_bytes(os.urandom(1 << 20) * 3)  # several frames
    (src / "link").symlink_to("bin/x")
    dep = nixstore.text("dep")
    top = nixstore.tree(src, "narfs-v-rich", refs=[dep])
    narfs.config.write_text(narfs.config.read_text() + "frame_size = 1048576\n")
    narfs("archive", top)
    out = narfs("verify").stdout
    assert out.startswith("healthy: 2 entries"), out

    # A cache written by `nix copy` (xz, Nix's own .ls listings): healthy, though unsigned.
    other = tmp_path / "nixcache"
    run([*NIX, "copy", "--to", f"file://{other}?compression=xz&write-nar-listing=true", top])
    plain = tmp_path / "plain.toml"
    plain.write_text(f'cache_dir = "{other}"\n')
    res = narfs("verify", env={**narfs.env, "NARFS_CONFIG": str(plain)})
    assert "healthy: 2 entries" in res.stdout, res.stdout
    keyed = narfs("verify", "--cache", str(other), check=False)
    assert keyed.returncode == 1
    problems = [ln for ln in keyed.stdout.splitlines() if ln.startswith("/")]
    assert len(problems) == 2 and all("no signature by" in ln for ln in problems), keyed.stdout


def test_with_a_writer_active_repair_refuses_and_fresh_files_are_not_judged(
        narfs: Narfs) -> None:
    tmp = narfs.cache / "nar" / ".narfs-tmp-being-written.nar.zst"
    fresh = narfs.cache / "nar" / "1111111111111111111111111111111111111111111111111111.nar.zst"
    with Cache(str(narfs.cache)).writer():  # what `narfs watch` or `narfs archive` holds
        tmp.write_bytes(b"a NAR in the making")
        fresh.write_bytes(b"renamed, its narinfo not yet published")
        res = narfs("verify", "--repair", check=False)
        assert res.returncode == 1 and "another narfs process is writing" in res.stderr
        res = narfs("verify")
        assert "2 files younger than 60 min" in res.stdout, res.stdout
        assert tmp.exists() and fresh.exists()
    res = narfs("verify", check=False)  # no writer: both are leftovers now
    assert res.returncode == 1
    assert lines_naming(res.stdout, str(tmp)) and lines_naming(res.stdout, str(fresh))


def test_a_tree_temporary_left_by_a_killed_mount_is_named_as_one(narfs: Narfs) -> None:
    """The mount writes tree files through the cache's temporaries; one a crash left in
    .narfs/trees is called what it is (not "a tree file of no archived path") and repaired."""
    from narfs.cache import new_temporary

    trees = narfs.cache / ".narfs" / "trees"
    trees.mkdir(parents=True)
    fd, tmp = new_temporary(str(trees), f"{'0' * 32}.tree")
    os.close(fd)
    res = narfs("verify", check=False)
    assert res.returncode == 1
    assert [ln for ln in lines_naming(res.stdout, tmp)
            if "temporary file left by an interrupted writer" in ln], res.stdout
    assert f"repair: removed {tmp}" in narfs("verify", "--repair").stdout
    assert not os.path.exists(tmp)


def test_signed_frame_hashes_are_verified_repaired_and_quarantined_with_their_entry(
        narfs: Narfs, nixstore: NixStore) -> None:
    """Each `<hash>.auth` (what a remote mount checks frames and listings with) is checked:
    signed by the key, matching the NAR's frames and the `.ls`. A missing or wrong one is
    named; --repair signs it again and removes no data for it; an entry quarantined and put
    back brings its `.auth` with it."""
    p = {k: nixstore.text(f"{k} {os.urandom(8).hex()}\n" * 2000, f"narfs-va-{k}")
         for k in ("missing", "forged", "stale", "held")}
    narfs("archive", *p.values())
    auth = {k: narfs.cache / f"{hash_part(v)}.auth" for k, v in p.items()}
    assert all(a.exists() for a in auth.values())
    assert narfs("verify").stdout.startswith("healthy: 4 entries")
    kept = auth["forged"].read_bytes()
    auth["missing"].unlink()
    # Alone, a missing `.auth` (an entry archived before narfs wrote them) is said, not
    # counted: the data is intact and remote mounts fetch the path whole.
    alone = narfs("verify").stdout  # exit status 0
    assert "\nhealthy: 4 entries" in alone, alone
    assert f"note: {p['missing']}: signed frame hashes " in alone and "--repair" in alone, \
        alone
    doc = json.loads(kept)
    doc["frames"][0][2] = base64.b64encode(b"\0" * 32).decode()  # another frame, same sig
    auth["forged"].write_text(json.dumps(doc))
    # a listing signed by the key, then changed (as a server would serve it): stale hash
    ls = narfs.cache / f"{hash_part(p['stale'])}.ls"
    ls_doc = json.loads(ls.read_text())
    ls.write_text(json.dumps(ls_doc, indent=1))  # the same listing, other bytes
    res = narfs("verify", check=False)
    assert res.returncode == 1
    out = res.stdout
    assert f"note: {p['missing']}: signed frame hashes " in out, out
    assert any("not signed by a trusted key" in ln
               for ln in lines_naming(out, p["forged"])), out
    assert any("do not match" in ln for ln in lines_naming(out, p["stale"])), out
    assert not lines_naming(out, p["held"]), out
    nars = {k: nar_file(narfs, v).read_bytes() for k, v in p.items()}
    out = narfs("verify", "--repair").stdout
    for k in ("missing", "forged", "stale"):
        assert f"repair: rewrote {auth[k]} (signed frame hashes)" in out, out
    assert names(narfs) == set(p.values())  # no data removed for them
    assert {k: nar_file(narfs, v).read_bytes() for k, v in p.items()} == nars
    assert narfs("verify").stdout.startswith("healthy: 4 entries")

    # quarantined (a signature that no longer verifies) and put back: with its `.auth`
    held = auth["held"].read_bytes()
    flip_sig(info_file(narfs, p["held"]))
    out = narfs("verify", "--repair", check=False).stdout
    assert f"repair: quarantined {p['held']}" in out, out
    narfs("verify", "--repair")  # the `.auth` left without its narinfo is removed as a stray
    assert not auth["held"].exists()
    narfs("quarantine", "--restore", p["held"])
    assert auth["held"].read_bytes() == held
    # held without its `.auth` (quarantined by a narfs that did not keep them): signed again
    # (its narinfo came back as held, the signature still bad: quarantined again)
    out = narfs("verify", "--repair", check=False).stdout
    assert f"repair: quarantined {p['held']}" in out, out
    (narfs.cache / ".narfs" / "quarantine" / hash_part(p["held"]) / "auth").unlink()
    auth["held"].unlink(missing_ok=True)
    narfs("quarantine", "--restore", p["held"])
    info = parse_narinfo(info_file(narfs, p["held"]).read_bytes())
    key = parse_public_key(narfs.public_key, "the test's key")
    assert frameauth.problem(Cache(str(narfs.cache)), info, key) is None
