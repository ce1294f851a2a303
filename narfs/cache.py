"""The cache directory: a plain Nix binary cache, its layout, and the locks writers share.

Layout (what Nix reads):  nix-cache-info, <hash>.narinfo, <hash>.ls, nar/<filehash>.nar.<ext>
narfs's own derived data: .narfs/ (catalog, tree files, hot tier).

Temporaries: every file narfs writes and then renames into place is made by `new_temporary` (or
`temporary`/`write_atomic` on top of it), as `.narfs-tmp-<final name>-<random>` in the directory
of the file it becomes: one naming scheme, so `Cache.remove_temporaries` finds whatever a crash
left, wherever narfs writes (the cache, nar/, .narfs/, .narfs/trees/; the hot tier clears its
own, see reader.py).

Commit order (DESIGN contract 3) is kept by archive.py, per batch: temporaries, syncfs, NARs and
`.ls` renamed and their directories fsynced, narinfos last, then an fsync of the directory. A
narinfo exists only once everything it points at is durable, so a crash leaves either no
narinfo or a complete entry, plus temporaries that `remove_temporaries` clears.
"""

from __future__ import annotations

import errno
import fcntl
import io
import logging
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO, Protocol

from . import listing, narinfo, signing
from .errors import CorruptError, NarfsError
from .narinfo import NarInfo
from .storepath import is_hash

log = logging.getLogger(__name__)

TMP_PREFIX = ".narfs-tmp-"
CACHE_INFO = "nix-cache-info"
KEYS_FILE = "keys"
_SIG_NAME = re.compile(rb"^Sig: ([^:\n]{1,255}):", re.M)
PRIORITY = 10  # below cache.nixos.org's 40 (lower wins): the archive is asked first


def cache_info_text(priority: int = PRIORITY) -> str:
    return f"StoreDir: /nix/store\nWantMassQuery: 1\nPriority: {priority}\n"


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def size_of(path: str) -> int:
    """The bytes a file holds on disk by its length (not following a symlink); 0 when absent."""
    try:
        return os.lstat(path).st_size
    except FileNotFoundError:
        return 0


def remove_file(path: str) -> int:
    """Unlink `path` (never what a symlink there points at); the bytes it held, 0 when it was
    already gone (another process removing it first is no error)."""
    try:
        size = os.lstat(path).st_size
        os.unlink(path)
    except FileNotFoundError:
        return 0
    return size


def new_temporary(directory: str, name: str) -> tuple[int, str]:
    """A new empty temporary in `directory` that is to become `name` there: a descriptor open
    for reading and writing (O_EXCL, never through a symlink) and its path. Mode 0644, like
    every file of a binary cache."""
    fd, path = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{name}-", dir=directory)
    try:
        os.fchmod(fd, 0o644)
    except BaseException:
        os.close(fd)
        remove_file(path)
        raise
    return fd, path


@contextmanager
def temporary(final: str, sync: bool = True) -> Iterator[BinaryIO]:
    """A temporary file beside `final`; on a clean exit it is fsynced (unless `sync` is False:
    derived data a crash may lose) and renamed over `final`; on an error it is removed."""
    fd, tmp = new_temporary(*os.path.split(final))
    f = os.fdopen(fd, "wb")
    try:
        yield f
        f.flush()
        if sync:
            os.fsync(f.fileno())
        f.close()
        os.rename(tmp, final)
    except BaseException:
        f.close()
        remove_file(tmp)
        raise


def write_atomic(final: str, data: bytes, sync: bool = True) -> None:
    """`final` holds `data` or what it held before, never a part (a temporary, then rename)."""
    with temporary(final, sync) as f:
        f.write(data)


# What opening a file the cache should hold as a regular file says when it is something else.
_NOT_A_FILE = {errno.ELOOP: "a symlink", errno.ENXIO: "a socket or an absent device",
               errno.ENODEV: "a device", errno.EISDIR: "a directory"}


def kind_of(mode: int) -> str:
    """What a file of this mode is, for messages."""
    for test, what in ((stat.S_ISLNK, "a symlink"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return what
    return "a regular file"


def _real_dir(path: str) -> None:
    """Refuse a directory of the cache layout that is a symlink or not a directory."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        raise NarfsError(f"{path}: {kind_of(st.st_mode)}, not a directory; narfs reads and writes "
                         "nothing through it: replace it with a directory")


def describe_os_error(e: OSError, path: str) -> str:
    """One line for a write that failed, with what to do about it."""
    if e.errno == errno.ENOSPC or e.errno == errno.EDQUOT:
        return f"{path}: no space left on the cache's filesystem; free space (e.g. narfs gc)"
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"{path}: cannot write ({e.strerror}); make the cache directory writable by narfs"
    return f"{path}: {e.strerror or e}"


def read_small(path: str, limit: int, dir_fd: int | None = None) -> bytes:
    """A small file of an untrusted directory, at most `limit` bytes: never through a symlink,
    never a FIFO, socket or device (O_NONBLOCK: opening a FIFO must not hang the command)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dir_fd)
    except OSError as e:
        if e.errno in _NOT_A_FILE:
            raise CorruptError(f"{path}: {_NOT_A_FILE[e.errno]}, not read") from None
        raise
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CorruptError(f"{path}: not a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise CorruptError(f"{path}: larger than {limit} bytes")
    return data


class NarRef(Protocol):
    """What opening a NAR needs of a narinfo or a catalog entry: the URL naming its file."""

    @property
    def url(self) -> str: ...


class Cache:
    """One cache directory. Reads treat its contents as untrusted (contract 5)."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.nar_dir = os.path.join(self.root, "nar")

    # --- layout -------------------------------------------------------------------------

    def narinfo_path(self, h: str) -> str:
        return os.path.join(self.root, f"{h}.narinfo")

    def listing_path(self, h: str) -> str:
        return os.path.join(self.root, f"{h}.ls")

    def nar_path(self, url: str) -> str:
        """The file a narinfo URL names; narinfo.parse already confined URL to nar/<name>."""
        return os.path.join(self.root, url)

    def check(self) -> None:
        """Refuse a directory that is not a binary cache, before anything is written to it."""
        if not os.path.isdir(self.root):
            raise NarfsError(f"{self.root}: cache directory does not exist; run "
                             f"`narfs init --cache {self.root}`")
        info = os.path.join(self.root, CACHE_INFO)
        if os.path.lexists(info) and not stat.S_ISREG(os.lstat(info).st_mode):
            raise NarfsError(f"{info}: {kind_of(os.lstat(info).st_mode)}, not a file; remove it "
                             f"and run `narfs init --cache {self.root}` to write it again")
        if not os.path.isfile(info):
            raise NarfsError(f"{self.root}: not a binary cache (no {CACHE_INFO}); run "
                             f"`narfs init --cache {self.root}` or point --cache at a cache")

    def check_writable(self) -> None:
        self.check()
        _real_dir(self.nar_dir)
        for d in (self.root, self.nar_dir):
            if os.path.isdir(d) and not os.access(d, os.W_OK):
                raise NarfsError(f"{d}: cache directory is not writable; run narfs as the "
                                 "cache's owner or fix its permissions")

    def newest(self, versions: list[tuple[float, str]]) -> tuple[float, str]:
        """Of (archive time, hash) pairs sorted oldest first, the newest: the latest archive
        time, and among paths published at the same instant (coarse timestamps, a copied
        cache) the later write, i.e. the narinfo whose inode changed last (its ctime: the
        rename that published it, which copying tools cannot set back); then the hash."""
        tied = [v for v in versions[-8:] if v[0] == versions[-1][0]]
        if len(tied) == 1:
            return versions[-1]

        def written(v: tuple[float, str]) -> tuple[int, str]:
            try:
                return os.lstat(self.narinfo_path(v[1])).st_ctime_ns, v[1]
            except OSError:
                return -1, v[1]

        return max(tied, key=written)

    def has(self, h: str) -> bool:
        return os.path.exists(self.narinfo_path(h))

    def hashes(self) -> Iterator[str]:
        """Hashes of every narinfo in the directory (names that are not hashes are skipped)."""
        with os.scandir(self.root) as it:
            for entry in it:
                name = entry.name
                if name.endswith(".narinfo") and is_hash(name[:-8]):
                    yield name[:-8]

    # --- reading (untrusted) --------------------------------------------------------------

    def read_narinfo(self, h: str) -> NarInfo:
        path = self.narinfo_path(h)
        try:
            return narinfo.parse(read_small(path, narinfo.MAX_SIZE), expect_hash=h)
        except CorruptError as e:
            raise CorruptError(f"{path}: {e}") from None

    def read_listing(self, h: str, nar_size: int | None = None) -> dict | None:
        """The `.ls` root node, or None when the cache has no listing for this path."""
        path = self.listing_path(h)
        try:
            data = read_small(path, listing.MAX_SIZE)
        except FileNotFoundError:
            return None
        try:
            return listing.parse(data, nar_size)
        except CorruptError as e:
            raise CorruptError(f"{path}: {e}") from None

    def signature_names(self) -> dict[str, int]:
        """Key name → how many narinfos carry a signature by that name (unreadable ones are
        skipped): the names a new key must not take."""
        names: dict[str, int] = {}
        for h in self.hashes():
            try:
                data = read_small(self.narinfo_path(h), narinfo.MAX_SIZE)
            except (CorruptError, OSError):
                continue
            for name in {m.decode(errors="replace") for m in _SIG_NAME.findall(data)}:
                names[name] = names.get(name, 0) + 1
        return names

    def recorded_keys(self) -> list[signing.PublicKey]:
        """The public keys narfs has signed this cache with (`.narfs/keys`). Untrusted like
        the rest: used only to tell "signed by a key you don't hold" from "does not verify",
        never to trust a signature."""
        try:
            data = read_small(os.path.join(self.root, ".narfs", KEYS_FILE), 1 << 20)
        except (CorruptError, OSError):
            return []
        keys = []
        for line in data.decode(errors="replace").splitlines():
            try:
                keys.append(signing.parse_public_key(line))
            except NarfsError:
                continue
        return keys

    def record_key(self, key: signing.PublicKey) -> None:
        """Remember a key that signs entries here, so that once it is lost, verify can still
        say which entries it signed. Best effort: a read-only cache just does not learn it."""
        if any(k.text() == key.text() for k in self.recorded_keys()):
            return
        try:
            fd = os.open(self.state_path(KEYS_FILE),
                         os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
                         | os.O_CLOEXEC, 0o644)
        except OSError as e:
            log.debug("cannot record key %s: %s", key.name, e)
            return
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                os.write(fd, f"{key.text()}\n".encode())
        finally:
            os.close(fd)

    def open_nar(self, info: NarRef) -> io.BufferedReader:
        """The NAR file a narinfo names, opened through `nar/` without following a symlink in
        either place (a symlinked `nar/` would lead reads outside the cache), and without
        blocking on a FIFO."""
        path = self.nar_path(info.url)
        try:
            dfd = os.open(self.nar_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                          | os.O_CLOEXEC)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise CorruptError(f"{self.nar_dir}: not a directory (a symlink?); no NAR is "
                                   "read through it") from None
            raise
        try:
            fd = os.open(os.path.basename(info.url), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                         | os.O_CLOEXEC, dir_fd=dfd)
        except OSError as e:
            if e.errno in _NOT_A_FILE:
                raise CorruptError(f"{path}: {_NOT_A_FILE[e.errno]}, not read") from None
            raise
        finally:
            os.close(dfd)
        f = os.fdopen(fd, "rb")
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            f.close()
            raise CorruptError(f"{path}: not a regular file")
        os.set_blocking(fd, True)
        return f

    # --- writing --------------------------------------------------------------------------

    def init(self, priority: int = PRIORITY) -> bool:
        """Create the directory and nix-cache-info; False when it already was a cache."""
        info = os.path.join(self.root, CACHE_INFO)
        if os.path.isfile(info):
            os.makedirs(self.nar_dir, exist_ok=True)
            return False
        if os.path.exists(self.root) and not os.path.isdir(self.root):
            raise NarfsError(f"{self.root}: exists and is not a directory; choose another --cache")
        try:
            os.makedirs(self.nar_dir, mode=0o755, exist_ok=True)
            write_atomic(info, cache_info_text(priority).encode())
        except OSError as e:
            raise NarfsError(describe_os_error(e, self.root)) from None
        return True

    def init_if_new(self) -> bool:
        """Create the cache in a missing or empty directory, as `nix copy --to file://DIR`
        does; a non-empty directory that is not a cache is left for check() to refuse."""
        try:
            new = not os.listdir(self.root)
        except FileNotFoundError:
            new = True
        except OSError:
            return False  # not a directory, unreadable: check() says which
        return self.init() if new else False

    def sync_nar_dir(self) -> None:
        fsync_dir(self.nar_dir)

    def unpublish(self, h: str) -> None:
        """Withdraw an entry from Nix's view first, so nothing ever points at a missing NAR."""
        try:
            os.unlink(self.narinfo_path(h))
        except FileNotFoundError:
            return
        fsync_dir(self.root)

    def state_dir(self) -> str:
        """`.narfs/`, created if missing, refused when it is a symlink or not a directory."""
        d = os.path.join(self.root, ".narfs")
        try:
            os.mkdir(d, 0o755)
        except FileExistsError:
            pass
        _real_dir(d)
        return d

    def state_path(self, name: str) -> str:
        """`.narfs/<name>`, once `.narfs` is a real directory and `<name>`, if it exists, a
        regular file or directory: nothing narfs writes there may follow a symlink out of the
        cache or block on a FIFO. (A swap after the check is left to the directory's
        permissions: only root writes `.narfs/` in the intended setup.)"""
        path = os.path.join(self.state_dir(), name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return path
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            raise NarfsError(f"{path}: {kind_of(st.st_mode)}, not narfs's own file; remove it "
                             "(narfs recreates it)")
        return path

    @contextmanager
    def writer(self, exclusive: bool = False) -> Iterator[None]:
        """Hold the cache as one of its writers; the first writer in clears leftovers.

        Invariant: temporaries are removed only under the exclusive lock, i.e. when no other
        process is writing, so no live writer ever loses a file it is still producing.
        `exclusive` (verify --repair) holds the cache alone for the whole block, or fails at
        once when another writer is in.
        """
        self.check_writable()
        fd = os.open(self.state_path("lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            if exclusive:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise NarfsError(f"{self.root}: another narfs process is writing to the "
                                     "cache (narfs watch or archive); stop it and try again"
                                     ) from None
                yield
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.remove_temporaries()
            except BlockingIOError:
                pass
            fcntl.flock(fd, fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    def writer_active(self) -> bool:
        """Whether some process holds the cache as a writer right now (a probe, no waiting)."""
        try:
            fd = os.open(os.path.join(self.root, ".narfs", "lock"),
                         os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:  # missing, or a symlink (verify names it): no writer holds it
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    @contextmanager
    def publish_lock(self, exclusive: bool) -> Iterator[None]:
        """Writers publish narinfos under the shared lock; gc retires entries under the
        exclusive one. Each holds it for milliseconds, and the writer checks, holding it, that
        the NAR and every reference of a narinfo are still there before renaming it into place.
        Invariant kept: no narinfo appears whose NAR or reference gc has just removed."""
        fd = os.open(self.state_path("publish.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                     0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    def remove_temporaries(self) -> list[str]:
        """Delete what an interrupted writer left behind; callers hold the exclusive lock."""
        removed = []
        # .narfs/ too (watch.json is written through a temporary) and the mount's tree files;
        # never through a symlink. A mount holds no writer lock: one writing a tree file now
        # loses that file (best effort, built again), never anything it serves.
        state = os.path.join(self.root, ".narfs")
        for d in (self.root, self.nar_dir, state, os.path.join(state, "trees")):
            try:
                if not stat.S_ISDIR(os.lstat(d).st_mode):
                    continue
                names = os.listdir(d)
            except FileNotFoundError:
                continue
            for name in names:
                if name.startswith(TMP_PREFIX):
                    path = os.path.join(d, name)
                    remove_file(path)  # nobody else removes them: we hold the lock
                    removed.append(path)
        for path in removed:
            log.info("removed leftover temporary %s", path)
        return removed
