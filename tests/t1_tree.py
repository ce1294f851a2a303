"""Inode numbering and compact trees (narfs/tree.py), in-process: no Nix, no FUSE.

tests/t1_mount_tree.py has the basics; these are the properties a mount relies on: numbers
that are the same on every mount whatever order things arrive in, collisions that never give one
inode two meanings, and limits that hold on untrusted listings.
"""

from __future__ import annotations

import hashlib
import random

import pytest

from narfs import listing, nix32, tree
from narfs.errors import CorruptError
from narfs.nar import MAX_DEPTH, MAX_NAME, MAX_TARGET
from narfs.tree import (
    BYNAME_DIR,
    BYNAME_LINK,
    DIR,
    EXE,
    INDEX_BITS,
    LNK,
    MAX_NODES,
    REG,
    SLOT_MASK,
    Slots,
    Tree,
    hash_slot,
    name_slot,
)

NAR_HASH = "sha256:" + "1" * 52


def h_of(i: int) -> str:
    return nix32.encode(hashlib.sha256(str(i).encode()).digest()[:20])


def reg(size: int = 1, offset: int = 0, executable: bool | None = None) -> dict:
    node: dict = {"type": "regular", "size": size, "narOffset": offset}
    if executable is not None:
        node["executable"] = executable
    return node


def d(**entries: dict) -> dict:
    return {"type": "directory", "entries": entries}


def shuffled(node: dict, rng: random.Random) -> dict:
    """The same listing with every directory's entries in another order (JSON has none)."""
    if node.get("type") != "directory":
        return node
    items = list(node["entries"].items())
    rng.shuffle(items)
    return {"type": "directory", "entries": {k: shuffled(v, rng) for k, v in items}}


LISTING = d(
    bin=d(tool=reg(5, 10, True), helper=reg(3, 20, False)),
    lib=d(**{"libz.so": {"type": "symlink", "target": "libz.so.1"}, "libz.so.1": reg(9, 30)}),
    share=d(doc=d(), **{"Z": reg(), "a": reg(), "é": reg(), "ä\udcff": reg()}),
    README=reg(2, 40),
)


def paths(t: Tree) -> dict[bytes, int]:
    """Every node's path → index, by walking lookups from the root."""
    out = {b"": 0}
    todo = [(b"", 0)]
    while todo:
        prefix, i = todo.pop()
        for j in range(t.first[i], t.first[i] + t.count[i]):
            name = t.names[j]
            assert t.lookup(i, name) == j
            out[prefix + b"/" + name] = j
            if t.kinds[j] == DIR:
                todo.append((prefix + b"/" + name, j))
    return out


def test_inode_numbers_do_not_depend_on_the_listings_order() -> None:
    h = h_of(1)
    first = Tree.build(h, hash_slot(h), LISTING, 100)
    want = paths(first)
    assert len(want) == len(first) == 14
    for seed in range(20):
        again = Tree.build(h, hash_slot(h), shuffled(LISTING, random.Random(seed)), 100)
        assert paths(again) == want
        assert [again.inode(i) for i in want.values()] == [first.inode(i) for i in want.values()]
    loaded = Tree.loads(h, first.slot, first.dumps(NAR_HASH), NAR_HASH)
    assert paths(loaded) == want and loaded.targets == first.targets


def test_children_are_sorted_bytewise_breadth_first() -> None:
    t = Tree.build(h_of(2), 9, LISTING, 100)
    top = [t.names[i] for i in range(t.first[0], t.first[0] + t.count[0])]
    assert top == [b"README", b"bin", b"lib", b"share"]  # bytewise: upper case first
    share = t.lookup(0, b"share")
    names = [t.names[i] for i in range(t.first[share], t.first[share] + t.count[share])]
    assert names == sorted(names) == [b"Z", b"a", b"doc", b"\xc3\xa4\xff", b"\xc3\xa9"]
    assert t.kinds[t.lookup(t.lookup(0, b"bin"), b"tool")] == EXE
    assert t.kinds[t.lookup(t.lookup(0, b"bin"), b"helper")] == REG
    assert t.nlinks[0] == 2 + 3 and t.nlinks[share] == 3  # "." and one ".." per subdirectory
    for i in range(1, len(t)):  # every child comes after its parent
        if t.kinds[i] == DIR and t.count[i]:
            assert t.first[i] > i


def test_a_name_that_is_not_utf8_round_trips() -> None:
    t = Tree.build(h_of(3), 1, LISTING, 100)
    share = t.lookup(0, b"share")
    i = t.lookup(share, "ä\udcff".encode("utf-8", "surrogateescape"))
    assert i is not None and t.names[i] == b"\xc3\xa4\xff"
    assert t.lookup(share, b"missing") is None and t.lookup(share, b"") is None


def test_top_describes_the_root_for_the_root_listing() -> None:
    assert Tree.build(h_of(4), 1, LISTING, 100).top() == [DIR, 0, 5]
    assert Tree.build(h_of(5), 1, reg(7, 3, True), 100).top() == [EXE, 7, 1]
    link = Tree.build(h_of(6), 1, {"type": "symlink", "target": "ü/x"}, 100)
    assert link.top() == [LNK, 0, "ü/x"] and link.sizes[0] == len("ü/x".encode())


# --- slots --------------------------------------------------------------------------------------


def test_hash_slots_keep_nix32_order_and_are_the_same_on_every_mount() -> None:
    rng = random.Random(1)
    hashes = sorted(nix32.encode(rng.randbytes(20)) for _ in range(500))
    slots = [hash_slot(h) for h in hashes]
    assert slots == sorted(slots) and all(0 <= s <= SLOT_MASK for s in slots)
    a, b = Slots(), Slots()
    for h in hashes:
        a.path(h)
    for h in reversed(hashes):
        b.path(h)
    assert [a.path(h) for h in hashes] == [b.path(h) for h in hashes] == slots
    assert name_slot("hello") == name_slot("hello") != name_slot("hello2")


def test_colliding_slots_probe_forward_and_never_share() -> None:
    s = Slots()
    base = "abcdfghi"
    hs = [base + c * 24 for c in "0123"]
    got = [s.path(h) for h in hs]
    assert got == [hash_slot(hs[0]) + i for i in range(4)], "probing takes the next free slot"
    # A name whose slot is taken by a hash goes past it, and keeps its slot once given.
    taken = got[1]
    key = ("n", "clash")
    assert s.assign(key, taken) == got[-1] + 1
    assert s.assign(key, 12345) == got[-1] + 1
    assert s.owner(got[-1] + 1) == key
    owners = [s.owner(x) for x in [*got, got[-1] + 1]]
    assert len(set(owners)) == len(owners)


def test_a_name_equal_to_a_hash_gets_its_own_slot() -> None:
    s = Slots()
    h = h_of(7)
    assert s.path(h) != s.name(h)
    assert s.owner(s.path(h)) == ("p", h) and s.owner(s.name(h)) == ("n", h)


def test_probing_wraps_past_the_last_slot_and_skips_slot_zero() -> None:
    s = Slots()
    assert s.assign(("p", "last"), SLOT_MASK) == SLOT_MASK
    assert s.assign(("p", "wraps"), SLOT_MASK) == 1, "slot 0 is the mount's own"
    assert s.assign(("p", "zero"), 0) == 2
    assert s.owner(0) == ("", "")


def test_inodes_of_a_slot_never_reach_the_by_name_indices() -> None:
    assert MAX_NODES <= BYNAME_LINK < BYNAME_DIR <= tree.INDEX_MASK
    t = Tree.build(h_of(8), SLOT_MASK, LISTING, 100)
    inodes = [t.inode(i) for i in range(len(t))]
    assert len(set(inodes)) == len(inodes)
    assert all(ino >> INDEX_BITS == SLOT_MASK for ino in inodes)
    assert max(inodes) < (SLOT_MASK << INDEX_BITS | BYNAME_LINK)
    assert max(inodes) < 1 << 64  # the kernel's ino_t


# --- limits on untrusted listings -----------------------------------------------------------


def test_the_node_limit_is_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    # MAX_NODES itself is 16 million nodes; the same check at a size a test can build.
    monkeypatch.setattr(tree, "MAX_NODES", 11)
    fits = d(**{f"f{i}": reg() for i in range(10)})  # the root and 10 files: 11 nodes
    assert len(Tree.build(h_of(9), 1, fits, 100)) == 11
    with pytest.raises(CorruptError, match="more than 11"):
        Tree.build(h_of(9), 1, d(**{f"f{i}": reg() for i in range(11)}), 100)
    nested = d(a=d(**{f"f{i}": reg() for i in range(5)}), b=d(**{f"g{i}": reg() for i in range(4)}))
    with pytest.raises(CorruptError):
        Tree.build(h_of(9), 1, nested, 100)  # 12 nodes over two directories


def test_depth_limit_without_recursion() -> None:
    def deep(n: int) -> dict:
        node = reg()
        for _ in range(n):
            node = d(x=node)
        return node

    assert len(Tree.build(h_of(10), 1, deep(MAX_DEPTH), 100)) == MAX_DEPTH + 1
    with pytest.raises(CorruptError, match="deeper"):
        Tree.build(h_of(10), 1, deep(MAX_DEPTH + 1), 100)


@pytest.mark.parametrize("bad", [
    d(**{"x" * (MAX_NAME + 1): reg()}),
    d(**{"é" * (MAX_NAME // 2 + 1): reg()}),  # the limit is in bytes, not characters
    {"type": "symlink", "target": "t" * (MAX_TARGET + 1)},
    {"type": "symlink", "target": "a\0b"},
    {"type": "symlink", "target": 7},
    {"type": "directory", "entries": ["a"]},
    {"type": "directory"},
    d(a="not a node"),
    d(**{".": reg()}),
    reg(executable="yes"),  # type: ignore[arg-type]
    {"type": "regular", "size": True, "narOffset": 0},
    {"type": "regular", "size": 1, "narOffset": -1},
    {"type": "regular", "size": 1 << 62, "narOffset": 0},
    {"type": "regular", "size": 60, "narOffset": 41},  # one byte past the NAR
    {"type": "regular", "size": 1.0, "narOffset": 0},
    {"type": None},
    [],
])
def test_bad_listings_are_corrupt(bad: object) -> None:
    with pytest.raises(CorruptError):
        Tree.build(h_of(11), 1, bad, 100)  # type: ignore[arg-type]


def test_limits_are_inclusive() -> None:
    ok = d(**{"x" * MAX_NAME: reg(60, 40)},
           link={"type": "symlink", "target": "t" * MAX_TARGET})
    t = Tree.build(h_of(12), 1, ok, 100)
    assert len(t) == 3 and t.sizes[t.lookup(0, b"link")] == MAX_TARGET


def test_every_damage_to_a_compact_tree_is_corrupt_or_harmless() -> None:
    t = Tree.build(h_of(13), 3, LISTING, 100)
    data = t.dumps(NAR_HASH)
    for cut in range(len(data)):
        with pytest.raises(CorruptError):
            Tree.loads(t.hash, 3, data[:cut], NAR_HASH)
    assert data.count(b"\0a\0") == 1
    with pytest.raises(CorruptError):
        Tree.loads(t.hash, 3, data.replace(b"\0a\0", b"\0.\0"), NAR_HASH)
    two = Tree.build(t.hash, 3, d(xy=reg()), 100).dumps(NAR_HASH)
    with pytest.raises(CorruptError):
        Tree.loads(t.hash, 3, two.replace(b"xy", b".."), NAR_HASH)
    rng = random.Random(3)
    for _ in range(2000):
        damaged = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        try:
            got = Tree.loads(t.hash, 3, bytes(damaged), NAR_HASH)
        except CorruptError:
            continue
        # What loads accepts must be safe to walk: names are names, children in range.
        for i in range(len(got)):
            if got.kinds[i] == DIR:
                assert got.first[i] + got.count[i] <= len(got)
                for name in got.names[got.first[i]:got.first[i] + got.count[i]]:
                    assert name and b"/" not in name and name not in (b".", b"..")
            if got.kinds[i] == LNK:
                assert got.targets[i]


@pytest.mark.parametrize("node", [
    {"type": "symlink", "target": "é" * (MAX_TARGET // 2 + 1)},  # bytes, not characters
    d(**{"é" * (MAX_NAME // 2 + 1): reg()}),
    {"type": "regular", "size": 1, "narOffset": 100},
    {"type": "regular", "size": False, "narOffset": 0},
])
def test_listing_parse_refuses_what_a_tree_refuses(node: dict) -> None:
    """A `.ls` file is read by listing.parse, then built into a Tree: the first refuses, with
    the same limits, what the second would."""
    with pytest.raises(CorruptError):
        Tree.build(h_of(14), 1, node, 100)
    with pytest.raises(CorruptError):
        listing.parse(listing.render(node), 100)


def test_listing_parse_accepts_what_a_tree_accepts() -> None:
    node = d(**{"é" * (MAX_NAME // 2): reg(60, 40)},
             link={"type": "symlink", "target": "é" * (MAX_TARGET // 2)})
    assert listing.parse(listing.render(node), 100) == node
    assert len(Tree.build(h_of(15), 1, node, 100)) == 3
