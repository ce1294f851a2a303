"""Issue 11: a lost or regenerated signing key never costs intact data.

`init` never names a new key after one that already signs entries in the cache; `verify`
tells "signed by a key you don't hold", "signature does not verify" and "data damaged" apart;
`--repair` deletes only damaged data and quarantines the rest it takes out, which
`narfs quarantine --restore` puts back and `verify --adopt` re-signs.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from narfs.narinfo import parse as parse_narinfo
from narfs.signing import generate_secret_key, load_secret_key
from narfs.storepath import hash_part
from nixtools import NIX, NixStore, run

if TYPE_CHECKING:
    from conftest import Narfs

HOST = socket.gethostname()


def info_file(narfs: Narfs, path: str) -> Path:
    return narfs.cache / f"{hash_part(path)}.narinfo"


def sig_names(narfs: Narfs, path: str) -> list[str]:
    return [s.split(":")[0] for s in parse_narinfo(info_file(narfs, path).read_bytes()).sigs]


def names(narfs: Narfs) -> set[str]:
    return {parse_narinfo(p.read_bytes()).store_path for p in narfs.cache.glob("*.narinfo")}


def lines_naming(output: str, subject: str) -> list[str]:
    return [ln for ln in output.splitlines() if ln.startswith(f"{subject}: ")]


def new_key(path: Path, name: str) -> None:
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(generate_secret_key(name))


def nix_verifies(narfs: Narfs, paths: list[str]) -> bool:
    """Nix itself checks the signatures in the cache against the configured public key."""
    proc = run([*NIX, "store", "verify", "--store", f"file://{narfs.cache}", "--no-contents",
                "--option", "trusted-public-keys", narfs.public_key, *paths], check=False)
    return proc.returncode == 0


def test_init_after_a_lost_key_takes_the_next_serial_and_adopt_resigns(
        narfs: Narfs, nixstore: NixStore) -> None:
    a = nixstore.text("signed by the first key\n", "narfs-key-a")
    narfs("archive", a)
    assert sig_names(narfs, a) == [f"{HOST}-narfs-1"]
    narfs.key.unlink()  # a reinstall: the cache survived, the key did not

    out = narfs("init", "--cache", str(narfs.cache), "--secret-key", str(narfs.key)).stdout
    assert f"named {HOST}-narfs-2" in out, out
    assert f"{HOST}-narfs-1 already sign" in out, out
    assert load_secret_key(str(narfs.key)).name == f"{HOST}-narfs-2"
    assert f"extra-trusted-public-keys = {HOST}-narfs-2:" in out

    res = narfs("verify", check=False)
    assert res.returncode == 1
    [line] = lines_naming(res.stdout, a)
    assert "signed by a key you don't hold" in line and f"{HOST}-narfs-1" in line, line
    assert "does not verify" not in res.stdout and "damaged" not in res.stdout
    repaired = narfs("verify", "--repair", check=False)
    assert names(narfs) == {a}, repaired.stdout  # kept in place: nothing lost, nothing moved

    assert not nix_verifies(narfs, [a])
    out = narfs("verify", "--adopt", f"{HOST}-narfs-1").stdout
    assert f"adopt: adopted {a}: signed by {HOST}-narfs-2" in out, out
    assert sig_names(narfs, a) == [f"{HOST}-narfs-1", f"{HOST}-narfs-2"]  # the old one stays
    assert narfs("verify").stdout.startswith("healthy: 1 entry,")
    assert nix_verifies(narfs, [a])


def test_same_name_key_three_verdicts_and_repair_quarantines(narfs: Narfs, nixstore: NixStore,
                                                            tmp_path: Path) -> None:
    dep = nixstore.text("dependency\n" * 500, "narfs-key-dep")
    top = nixstore.text("top\n", "narfs-key-top", refs=[dep])
    damaged = nixstore.text(os.urandom(4000).hex(), "narfs-key-damaged")
    narfs("archive", top, damaged)
    other_key = tmp_path / "other.key"
    new_key(other_key, "elsewhere-1")
    foreign = nixstore.text("signed elsewhere\n", "narfs-key-foreign")
    narfs("archive", "--secret-key", str(other_key), foreign)
    nar = narfs.cache / parse_narinfo(info_file(narfs, damaged).read_bytes()).url
    data = bytearray(nar.read_bytes())
    data[len(data) // 2] ^= 0x10
    nar.write_bytes(bytes(data))

    # A key made by hand under the old key's name (what `narfs init` used to do).
    name = load_secret_key(str(narfs.key)).name
    new_key(narfs.key, name)
    res = narfs("verify", check=False)
    assert res.returncode == 1
    # narfs recorded the first key in .narfs/keys: the entries are told as signed by it.
    for p in (dep, top):
        [line] = lines_naming(res.stdout, p)
        assert "signed by a key you don't hold" in line and "an earlier key named" in line, line
    (narfs.cache / ".narfs" / "keys").unlink()  # a cache from before narfs recorded keys
    res = narfs("verify", check=False)
    out = res.stdout
    for p in (dep, top):
        [line] = lines_naming(out, p)
        assert f"signature by {name} does not verify" in line, line
    assert any("data damaged" in ln for ln in lines_naming(out, damaged)), out
    [line] = lines_naming(out, foreign)
    assert "signed by a key you don't hold: elsewhere-1" in line, line
    assert f"`narfs verify --adopt {name}`" in out

    res = narfs("verify", "--repair", check=False)
    out = res.stdout
    assert "Traceback" not in res.stderr
    assert f"repair: quarantined {dep}: signature by {name}" in out, out
    assert f"repair: quarantined {top}: " in out, out
    assert f"repair: lost {damaged}: data damaged" in out, out
    assert names(narfs) == {foreign}  # signed by a key we don't hold: kept in place
    held = narfs.cache / ".narfs" / "quarantine"
    assert sorted(os.listdir(held)) == sorted(hash_part(p) for p in (dep, top))
    assert "narfs quarantine --restore all" in out
    listed = narfs("quarantine").stdout
    assert lines_naming(listed, dep) and lines_naming(listed, top), listed
    assert "2 entries in" in listed
    assert "entries wait in the quarantine" in narfs("verify", check=False).stdout

    # Put back: references first, whatever order they are named in.
    out = narfs("quarantine", "--restore", top, hash_part(dep)).stdout
    assert out.index(f"restored {dep}") < out.index(f"restored {top}"), out
    assert names(narfs) == {foreign, dep, top}
    assert os.listdir(held) == []
    out = narfs("verify", "--adopt", name, "--adopt", "elsewhere-1").stdout
    assert "adopted 3 entries" in out, out
    assert narfs("verify").stdout.startswith("healthy: 3 entries")
    run([*NIX, "path-info", "--store", f"file://{narfs.cache}", "-r", top])


def test_restore_from_quarantine_waits_for_missing_references(narfs: Narfs,
                                                              nixstore: NixStore) -> None:
    dep = nixstore.text("dependency\n", "narfs-key-qdep")
    top = nixstore.text("top\n", "narfs-key-qtop", refs=[dep])
    narfs("archive", top)
    info_file(narfs, dep).unlink()  # a lost narinfo: top's closure is incomplete
    out = narfs("verify", "--repair", check=False).stdout
    assert f"repair: quarantined {top}: " in out and "incomplete closure" in out, out
    res = narfs("quarantine", "--restore", "all", check=False)
    assert res.returncode == 1
    assert f"kept {top}: it references {dep}" in res.stdout, res.stdout
    bad = narfs("quarantine", "--restore", "no-such-thing", check=False)
    assert bad.returncode == 1 and "not in the quarantine" in bad.stderr
    narfs("archive", dep)
    assert f"restored {top}" in narfs("quarantine", "--restore", "all").stdout
    assert narfs("verify").stdout.startswith("healthy: 2 entries")
