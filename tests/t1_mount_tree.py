"""Issue 3, below FUSE: the inode scheme and the compact trees the mount serves from."""

from __future__ import annotations

import pytest

from narfs import nix32
from narfs.errors import CorruptError
from narfs.tree import (
    BYNAME_LINK,
    DIR,
    INDEX_BITS,
    LNK,
    MAX_NODES,
    REG,
    Slots,
    Tree,
    hash_slot,
)

H = "0" * 8 + "a" * 24
NAR_HASH = "sha256:" + "1" * 52


def big_listing(dirs: int, files: int) -> dict:
    return {"type": "directory", "entries": {
        f"d{i:03}": {"type": "directory", "entries": {
            f"f{j:03}": {"type": "regular", "size": 10, "narOffset": 100 + j,
                         **({"executable": True} if j % 7 == 0 else {})}
            for j in range(files)} | {"link": {"type": "symlink", "target": f"../d{i:03}"}}}
        for i in range(dirs)}}


def test_slots_follow_the_hash_and_probe_on_collision() -> None:
    h1 = nix32.encode(bytes(range(20)))
    assert hash_slot(h1) == Slots().path(h1)  # the same on every mount
    slots = Slots()
    a, b = "abcdfghi" + "0" * 24, "abcdfghi" + "1" * 24  # same first 8 characters
    sa, sb = slots.path(a), slots.path(b)
    assert sa == hash_slot(a) and sb != sa
    assert slots.owner(sa) == ("p", a) and slots.owner(sb) == ("p", b)
    assert slots.path(H) != 0  # slot 0 is the mount's own (root, .by-name)
    # Order of nix-base32 is kept, so the root listing comes out sorted by hash.
    assert hash_slot("0" * 32) < hash_slot("z" * 32)
    n = slots.name("hello-2.12")
    assert slots.owner(n) == ("n", "hello-2.12") and slots.name("hello-2.12") == n


def test_tree_is_breadth_first_sorted_and_bounded() -> None:
    tree = Tree.build(H, 5, big_listing(3, 4), 10_000)
    assert len(tree) == 1 + 3 + 3 * 5
    assert tree.kinds[0] == DIR and tree.nlinks[0] == 5
    assert [tree.names[i] for i in range(1, 4)] == [b"d000", b"d001", b"d002"]
    d1 = tree.lookup(0, b"d001")
    assert d1 == 2 and tree.lookup(d1, b"f003") is not None
    f = tree.lookup(d1, b"f003")
    assert tree.kinds[f] == REG and tree.sizes[f] == 10 and tree.offsets[f] == 103
    link = tree.lookup(d1, b"link")
    assert tree.kinds[link] == LNK and tree.targets[link] == b"../d001"
    assert tree.inode(f) == 5 << INDEX_BITS | f and f < BYNAME_LINK < MAX_NODES + 2


@pytest.mark.parametrize("bad", [
    {"type": "directory", "entries": {"..": {"type": "regular", "size": 1, "narOffset": 0}}},
    {"type": "directory", "entries": {"a/b": {"type": "regular", "size": 1, "narOffset": 0}}},
    {"type": "regular", "size": 5, "narOffset": 9_999},  # past the NAR's end
    {"type": "regular", "size": 5},  # no narOffset: nothing to read from
    {"type": "symlink", "target": ""},
    {"type": "fifo"},
])
def test_tree_refuses_bad_listings(bad: dict) -> None:
    with pytest.raises(CorruptError):
        Tree.build(H, 1, bad, 10_000)


def test_compact_form_round_trips_and_detects_damage() -> None:
    tree = Tree.build(H, 7, big_listing(40, 30), 10_000)
    assert len(tree) > 1000
    data = tree.dumps(NAR_HASH)
    again = Tree.loads(H, 7, data, NAR_HASH)
    for field in ("names", "kinds", "sizes", "offsets", "first", "count", "nlinks", "targets"):
        assert getattr(again, field) == getattr(tree, field), field
    with pytest.raises(CorruptError):
        Tree.loads(H, 7, data, "sha256:" + "2" * 52)  # another NAR's tree
    for damaged in (data[:-3], data[: len(data) // 2], data.replace(b"f017", b"f/17", 1),
                    data.replace(b"d003", b"..\0\0", 1)):
        with pytest.raises(CorruptError):
            Tree.loads(H, 7, damaged, NAR_HASH)
