"""An archive made in-process, without Nix or FUSE: a real cache directory (signed narinfos,
seekable NARs and `.ls` listings written by tests/hostile.py), its catalog, a reader
(tests/t1_reader.py) and the mount's view of it (narfs/view.py). t2_view.py drives the view,
t3_fs.py the pyfuse3 operations over it; neither needs a kernel, and each test takes
milliseconds."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import trio

from hostile import nar, node_dir, node_file, node_link, write_entry
from narfs.cache import Cache
from narfs.catalog import Catalog
from narfs.signing import generate_secret_key, parse_secret_key
from narfs.storepath import HASH_LEN
from narfs.tree import INDEX_BITS, hash_slot
from narfs.view import ArchiveView, Node
from t1_reader import make_reader

T = TypeVar("T")


def run(fn: Callable[[], Awaitable[T]]) -> T:
    return trio.run(fn)


def files(n: int, size: int = 40) -> bytes:
    """A NAR: a directory `d` of n files f000…, each `size` bytes of its own, and a symlink."""
    entries = [(f"f{i:03}".encode(), node_file(bytes([65 + i % 26]) * size)) for i in range(n)]
    return nar(node_dir([(b"d", node_dir(entries)), (b"link", node_link(b"d/f000")),
                         (b"top", node_file(b"top file\n"))]))


class Archive:
    """A cache directory and the view a mount of it would have."""

    def __init__(self, root: Path, prefetch: bool = False, frame_cache: int = 1 << 20) -> None:
        root.mkdir(exist_ok=True)
        self.root = root
        self.cache = Cache(str(root))
        self.key = parse_secret_key(generate_secret_key("t3"))
        self.catalog = Catalog(self.cache)
        self.reader = make_reader(root, frame_cache=frame_cache)
        self.view = ArchiveView(self.reader.backend, self.catalog, self.reader,
                                trio.CapacityLimiter(1), self.cache.state_path("trees"),
                                prefetch)

    def add(self, data: bytes, name: str = "pkg") -> str:
        """Archive NAR `data` as a path named `name` (not yet shown: `refresh`); its hash."""
        return write_entry(self.root, self.key, data, name)[11:11 + HASH_LEN]

    def retire(self, h: str) -> None:
        (self.root / f"{h}.narinfo").unlink()

    def base(self, h: str) -> bytes:
        return self.view.paths[h].base.encode()

    def close(self) -> None:
        self.reader.close()
        self.catalog.close()


def path_inode(h: str) -> int:
    """The inode of a path's top node, when no other path shares its slot (tree.py)."""
    return hash_slot(h) << INDEX_BITS


def collect(limit: int | None = None) -> tuple[list[tuple[bytes, Node, int]],
                                               Callable[[bytes, Node, int], bool]]:
    """A `reply` for ArchiveView.listdir that takes `limit` entries, then refuses."""
    got: list[tuple[bytes, Node, int]] = []

    def reply(name: bytes, node: Node, next_id: int) -> bool:
        if limit is not None and len(got) >= limit:
            return False
        got.append((name, node, next_id))
        return True

    return got, reply
