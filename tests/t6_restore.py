"""Issue 5: `narfs restore` brings closures back through Nix, signatures checked, and `--to`
unpacks one tree without Nix, never writing outside its directory."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import stat
import subprocess
import time
from pathlib import Path

import pytest
import zstandard

from hostile import nar, node_dir, node_file, node_link
from narfs import nix32
from narfs.cache import Cache, write_atomic
from narfs.catalog import Catalog
from narfs.narinfo import NarInfo
from narfs.signing import load_secret_key
from narfs.storepath import hash_part
from nixtools import (
    NIX,
    Narfs,
    NixStore,
    delete_paths,
    nix_daemon,
    on_a_terminal,
    one_line_error,
    rich_tree,
    run,
)


def narinfo(narfs: Narfs, path: str) -> Path:
    return narfs.cache / f"{hash_part(path)}.narinfo"


def valid(paths: list[str]) -> list[str]:
    return [p for p in paths if os.path.exists(p)]


def age(narfs: Narfs, paths: list[str], seconds: float) -> None:
    t = time.time() - seconds
    for p in paths:
        os.utime(narinfo(narfs, p), (t, t))


def test_restore_by_store_path_hash_and_name(narfs: Narfs, nixstore: NixStore) -> None:
    chain = nixstore.closure(3, "narfs-rs")  # rs-0 ← rs-1 ← rs-2
    top = chain[-1]
    narfs("archive", top)
    age(narfs, chain, 3600)
    nixstore.unroot()

    # By store path (a file inside it), with --add-root.
    delete_paths(chain)
    link = nixstore.workdir / "project-root"
    out = narfs("restore", "--add-root", str(link), f"{top}/content")
    run(["nix-store", "--verify-path", *chain])
    for p in chain:
        assert f"restored {p}" in out.stdout
    assert "restored 3 paths" in out.stdout
    assert os.readlink(link) == top
    roots = run(["nix-store", "--query", "--roots", top]).stdout
    assert str(link) in roots, roots
    link.unlink()
    with Catalog(Cache(str(narfs.cache))) as catalog:  # restores count as accesses
        catalog.sync()
        for p in chain:
            entry = catalog.get(hash_part(p))
            assert entry is not None and catalog.last_access(entry) > time.time() - 600

    # By bare hash; only what the store lacks comes back.
    delete_paths(chain[1:])
    out = narfs("restore", hash_part(top))
    run(["nix-store", "--verify-path", *chain])
    assert "restored 2 paths" in out.stdout and "1 already in the store" in out.stdout
    assert f"restored {chain[0]}" not in out.stdout

    # By name: the newest archived path of that name wins, and the others are mentioned.
    older = nixstore.text("first version", "narfs-named")
    newer = nixstore.text("second version", "narfs-named")
    narfs("archive", older)
    narfs("archive", newer)
    age(narfs, [older], 7200)
    nixstore.unroot()
    delete_paths([older, newer])
    out = narfs("restore", "narfs-named")
    assert valid([older, newer]) == [newer]
    assert f"restoring the newest, {newer}" in out.stderr and older in out.stderr, out.stderr
    run(["nix-store", "--verify-path", newer])

    # --dry-run says what would come back and changes nothing.
    delete_paths([chain[2]])
    out = narfs("restore", "--dry-run", top)
    assert f"would restore {top}" in out.stdout and "would restore 1 path:" in out.stdout
    assert valid([top]) == []

    bad = narfs("restore", "no-such-name-anywhere", check=False)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1
    assert "no archived path has this name" in bad.stderr
    narfs("restore", top, hash_part(older))  # back, so the fixture deletes them with their .drv


def _flip_sig(path: Path) -> None:
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("Sig: "):
            name, b64 = line[5:].split(":", 1)
            raw = bytearray(base64.b64decode(b64))
            raw[10] ^= 0x01
            lines[i] = f"Sig: {name}:{base64.b64encode(bytes(raw)).decode()}"
    path.write_text("\n".join(lines) + "\n")


def test_forged_or_missing_signature_is_refused(narfs: Narfs, nixstore: NixStore) -> None:
    dep = nixstore.text("dependency", "narfs-sig-dep")
    top = nixstore.text("top", "narfs-sig-top", refs=[dep])
    narfs("archive", top)
    nixstore.unroot()
    delete_paths([top, dep])
    info = narinfo(narfs, top)
    original = info.read_text()

    _flip_sig(info)
    forged = narfs("restore", top, check=False)
    assert forged.returncode == 1
    assert forged.stderr.count("\n") == 1 and "Traceback" not in forged.stderr
    assert top in forged.stderr and "no valid signature" in forged.stderr
    assert valid([top, dep]) == []  # not even the (correctly signed) dependency came back

    info.write_text("".join(ln + "\n" for ln in original.splitlines()
                            if not ln.startswith("Sig: ")))
    unsigned = narfs("restore", top, check=False)
    assert unsigned.returncode == 1 and "no valid signature" in unsigned.stderr
    assert valid([top, dep]) == []

    # Explicitly skipping the check is possible, and Nix then accepts the unsigned path.
    narfs("restore", "--no-check-sigs", top)
    run(["nix-store", "--verify-path", top, dep])


def test_a_copy_nix_refuses_is_one_line_with_the_path_and_the_fix(narfs: Narfs,
                                                                  nixstore: NixStore,
                                                                  tmp_path: Path) -> None:
    """Multi-user Nix: for a user nix.conf does not list in trusted-users, nix-daemon ignores
    the trusted-public-keys restore passes, so it refuses every path `nix copy` hands it though
    narfs found them signed. Nix's own cause reaches the user in one line, with the path and
    the way out; the store is unchanged."""
    dep = nixstore.text("dependency", "narfs-untrusted-dep")
    top = nixstore.text("top", "narfs-untrusted-top", refs=[dep])
    narfs("archive", top)
    nixstore.unroot()
    delete_paths([top, dep])
    with nix_daemon(tmp_path, "trusted-users =\n") as client:
        err = one_line_error(narfs("restore", top, env={**narfs.env, **client}, check=False))
    assert re.search(rf"cannot add path '({re.escape(dep)}|{re.escape(top)})' because it "
                     "lacks a (valid )?signature", err), err
    assert f"add {narfs.public_key} to trusted-public-keys" in err, err
    assert valid([top, dep]) == []
    narfs("restore", top)  # back, so the fixture deletes them with their .drv


def test_restore_from_a_cache_whose_path_has_percent_and_space(nixstore: NixStore,
                                                              tmp_path: Path) -> None:
    """Nix versions read a `file://` URL's path differently: 2.8 verbatim but refusing a space
    and cutting at `#`, 2.18 on decoding `%41` to `A` (narfs/nixversions.py). Restore reaches
    a cache named with all three on each version, through a plain-named link it removes
    afterwards."""
    n = Narfs(tmp_path / "narfs 50%41 #1")
    n.root.mkdir()
    n("init", "--cache", str(n.cache), "--secret-key", str(n.key))
    top = nixstore.text("from an oddly named cache", "narfs-odd-dir")
    n("archive", top)
    nixstore.unroot()
    delete_paths([top])
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = n("restore", top, env={**n.env, "TMPDIR": str(tmp)})
    assert f"restored {top}" in out.stdout, out.stdout + out.stderr
    run(["nix-store", "--verify-path", top])
    assert os.listdir(tmp) == []  # the link is gone
    assert sorted(os.listdir(tmp_path)) == ["narfs 50%41 #1", "nix", "tmp"]  # nothing made


@pytest.mark.skipif(not Path("/dev/fuse").exists(), reason="no FUSE on this machine")
def test_restore_a_file_inside_a_live_mount(narfs: Narfs, nixstore: NixStore,
                                            tmp_path: Path) -> None:
    pytest.importorskip("narfs.mount")
    from mounting import mounted

    dep = nixstore.text("dep through the mount", "narfs-mnt-dep")
    top = nixstore.text("read through the mount\n", "narfs-mnt-top", refs=[dep])
    narfs("archive", top)
    nixstore.unroot()
    delete_paths([top, dep])
    base = os.path.basename(top)
    with mounted(narfs, tmp_path / "mnt") as m:
        inside = m / base / "content"
        assert inside.read_text() == "read through the mount\n"
        out = narfs("restore", str(inside))
        assert f"restored {top}" in out.stdout and f"restored {dep}" in out.stdout
        run(["nix-store", "--verify-path", top, dep])
        # A directory inside the mount names its store path too; the mount root does not.
        again = narfs("restore", "--dry-run", str(m / base))
        assert "would restore 0 paths" in again.stdout
        here = narfs("restore", "--dry-run", ".", cwd=str(m / base))
        assert "would restore 0 paths" in here.stdout, here.stderr
        root = narfs("restore", str(m.path), check=False)
        assert root.returncode == 1 and "root of the narfs mount" in root.stderr


def snapshot(root: Path) -> dict[str, tuple]:
    """Type, permission bits, size and link target of everything under root."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = p.lstat()
            target = os.readlink(p) if stat.S_ISLNK(st.st_mode) else None
            out[str(p.relative_to(root))] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode),
                                             st.st_size if stat.S_ISREG(st.st_mode) else 0,
                                             target)
    return out


def same_tree(a: Path, b: Path) -> None:
    diff = subprocess.run(["diff", "-r", "--no-dereference", str(a), str(b)],
                          capture_output=True, text=True)
    assert diff.returncode == 0, diff.stdout + diff.stderr
    assert snapshot(a) == snapshot(b)
    assert stat.S_IMODE(a.lstat().st_mode) == stat.S_IMODE(b.lstat().st_mode)


def test_to_equals_nix_store_restore(narfs: Narfs, nixstore: NixStore, tmp_path: Path) -> None:
    src = tmp_path / "src"
    rich_tree(src, 3 << 20)
    path = nixstore.tree(src, "narfs-to")
    narfs.config.write_text(narfs.config.read_text() + "frame_size = 1048576\n")
    narfs("archive", path)
    reference = tmp_path / "reference"
    dump = subprocess.run(["nix-store", "--dump", path], capture_output=True, check=True).stdout
    subprocess.run(["nix-store", "--restore", str(reference)], input=dump, check=True)

    out_dir = tmp_path / "out" / "tree"
    out_dir.parent.mkdir()
    res = narfs("restore", "--to", str(out_dir), path)
    assert f"unpacked {path}" in res.stdout
    same_tree(reference, out_dir)
    assert sorted(os.listdir(out_dir.parent)) == ["tree"]  # no temporary left beside it

    exists = narfs("restore", "--to", str(out_dir), path, check=False)
    assert exists.returncode == 1 and "already exists" in exists.stderr

    # Caches written by Nix itself, in each compression Python can read, unpack the same.
    for compression in ("xz", "bzip2", "none", "zstd"):
        other = tmp_path / f"nixcache-{compression}"
        run([*NIX, "copy", "--to", f"file://{other}?compression={compression}", path])
        dest = tmp_path / f"out-{compression}"
        narfs("restore", "--cache", str(other), "--no-check-sigs", "--to", str(dest), path)
        same_tree(reference, dest)


def _hostile_entry(narfs: Narfs, data: bytes, compression: str = "zstd") -> str:
    """Publish a NAR as a correctly signed entry (NarHash and NarSize true), so only its
    contents can be why it is refused."""
    cache = Cache(str(narfs.cache))
    h = nix32.encode(os.urandom(20))
    body = zstandard.ZstdCompressor().compress(data) if compression == "zstd" else data
    file_hash = nix32.encode(hashlib.sha256(body).digest())
    url = f"nar/{file_hash}.nar{'.zst' if compression == 'zstd' else ''}"
    write_atomic(cache.nar_path(url), body)
    info = NarInfo(store_path=f"/nix/store/{h}-hostile", url=url, compression=compression,
                   file_hash=f"sha256:{file_hash}", file_size=len(body),
                   nar_hash=nix32.format_sha256(hashlib.sha256(data).digest()),
                   nar_size=len(data))
    info.sign(load_secret_key(str(narfs.key)))
    write_atomic(cache.narinfo_path(hash_part(info.store_path)), info.render().encode())
    return info.store_path


def test_to_refuses_hostile_nars_and_writes_nothing_outside(narfs: Narfs,
                                                            tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    cases = {
        "dotdot": nar(node_dir([(b"..", node_file(b"escape"))])),
        "slash": nar(node_dir([(b"a/b", node_file(b"escape"))])),
        "symlink-then-dir": nar(node_dir([
            (b"a", node_link(str(outside).encode())),
            (b"a", node_dir([(b"pwned", node_file(b"written through a symlink"))]))])),
        "dir-then-symlink": nar(node_dir([
            (b"a", node_dir([])), (b"a", node_link(str(outside).encode()))])),
        "truncated": nar(node_dir([(b"f", node_file(b"x" * 100))]))[:-30],
    }
    parent = tmp_path / "parent"
    parent.mkdir()
    (parent / "already-here").write_text("keep me\n")
    for case, data in cases.items():
        path = _hostile_entry(narfs, data, "none" if case == "dotdot" else "zstd")
        before = sorted(os.listdir(parent))
        res = narfs("restore", "--to", str(parent / "out"), path, check=False)
        assert res.returncode == 1, (case, res.stdout)
        assert "refusing its NAR" in res.stderr and res.stderr.count("\n") == 1, res.stderr
        assert sorted(os.listdir(parent)) == before, case
        assert os.listdir(outside) == [], case
        assert sorted(os.listdir(tmp_path)) == ["narfs", "outside", "parent"], case

    # A good NAR whose narinfo lies about its NarHash (re-signed, so only the hash is wrong).
    good = nar(node_dir([(b"f", node_file(b"fine\n"))]))
    path = _hostile_entry(narfs, good)
    cache = Cache(str(narfs.cache))
    info = cache.read_narinfo(hash_part(path))
    info.nar_hash = nix32.format_sha256(b"\1" * 32)
    info.sign(load_secret_key(str(narfs.key)))
    write_atomic(cache.narinfo_path(hash_part(info.store_path)), info.render().encode())
    res = narfs("restore", "--to", str(parent / "out"), path, check=False)
    assert res.returncode == 1 and "the narinfo says" in res.stderr, res.stderr
    assert sorted(os.listdir(parent)) == ["already-here"]


class _FakeCopier:
    """Runs Copier's scheduling with `nix copy` replaced by a virtual-time sleep, checking the
    invariant each batch relies on: every reference is valid already or in the same batch."""

    @staticmethod
    def run(infos: dict[str, NarInfo], jobs: int) -> tuple[list[list[str]], int]:
        import trio
        import trio.testing

        from narfs.progress import Progress
        from narfs.restore import Copier

        batches: list[list[str]] = []
        valid: set[str] = set()
        live = peak = 0

        class Fake(Copier):
            async def _copy(self, batch: list[str], send: trio.MemorySendChannel) -> None:
                nonlocal live, peak
                members = set(batch)
                for p in batch:
                    for ref in self.infos[p].references:
                        full = f"/nix/store/{ref}"
                        assert full == p or full in valid or full in members, (p, full)
                batches.append(batch)
                live += 1
                peak = max(peak, live)
                await trio.sleep(sum(self.infos[p].nar_size for p in batch) / 1e6)
                live -= 1
                valid.update(batch)
                await send.send((batch, None))

        async def main() -> list[str]:
            return await Fake("file:///nonexistent", infos, None, jobs, Progress(0, "")).run()

        done = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
        assert sorted(done) == sorted(infos) and valid == set(infos)
        return batches, peak


def _infos(graph: dict[str, tuple[list[str], int]]) -> dict[str, NarInfo]:
    names = {k: f"{nix32.encode(hashlib.sha256(k.encode()).digest()[:20])}-{k}" for k in graph}
    return {f"/nix/store/{names[k]}": NarInfo(
        store_path=f"/nix/store/{names[k]}", url="nar/x.nar", compression="none",
        file_hash=None, file_size=None, nar_hash="sha256:" + "0" * 52, nar_size=size,
        references=sorted(names[r] for r in refs)) for k, (refs, size) in graph.items()}


def test_copier_runs_wide_closures_side_by_side_and_chains_in_one_batch() -> None:
    chain = _infos({"a": ([], 10**6), "b": (["a"], 10**6), "c": (["b", "c"], 10**6),
                    "d": (["c"], 10**6)})
    batches, peak = _FakeCopier.run(chain, jobs=2)
    assert len(batches) == 1 and peak == 1  # one `nix copy` for a linear closure

    wide = _infos({"base": ([], 10**6), "x": (["base"], 8 * 10**6), "y": (["base"], 5 * 10**6),
                   "z": (["base"], 3 * 10**6), "w": (["base"], 10**5),
                   "top": (["x", "y", "z", "w"], 10**4)})
    batches, peak = _FakeCopier.run(wide, jobs=2)
    assert peak == 2, batches
    tail = [sorted(b) for b in batches[1:-1]]
    assert len(tail) == 2 and all(b for b in tail), batches  # x | y, z, w: about half each
    assert batches[-1][0].endswith("-top") and batches[0][0].endswith("-base")


def test_restore_and_verify_show_progress_on_a_terminal(narfs: Narfs, nixstore: NixStore,
                                                        tmp_path: Path) -> None:
    src = tmp_path / "big"
    src.mkdir()
    (src / "data").write_bytes(os.urandom(16 << 20))
    top = nixstore.tree(src, "narfs-restore-progress")
    narfs("archive", top)
    assert re.search(r"verifying: +\d+%\|", on_a_terminal(narfs, "verify")), "no verify bar"
    nixstore.unroot()
    delete_paths([top])
    out = on_a_terminal(narfs, "restore", top)
    assert re.search(r"(checking|restoring): +\d+%\|", out), f"no restore bar:\n{out!r}"
    assert f"restored {top}" in out
    run(["nix-store", "--verify-path", top])


def test_an_out_link_names_its_path_even_once_collected(narfs: Narfs, nixstore: NixStore,
                                                        tmp_path: Path) -> None:
    """`narfs archive ./result` and, after the GC took the path, `narfs restore ./result`:
    Nix users hold on to out-links, and a dangling one still names its store path."""
    top = nixstore.text("behind an out-link", "narfs-out-link")
    work = tmp_path / "work"  # not tmp_path itself: its narfs/ dir would shadow the package
    work.mkdir()
    link = work / "result"
    link.symlink_to(top)
    out = narfs("archive", "result", cwd=str(work))
    assert "archived 1 path:" in out.stdout, out.stdout + out.stderr
    nixstore.unroot()
    delete_paths([top])
    assert link.is_symlink() and not link.exists()
    back = narfs("restore", "result", cwd=str(work))
    assert f"restored {top}" in back.stdout, back.stdout + back.stderr
    run(["nix-store", "--verify-path", top])

