"""`narfs restore`: archived closures back into /nix/store through Nix, or one tree into a
directory without Nix (`--to`).

Through Nix: the closure is read from the cache's narinfos (the truth, and what carries the
signatures), only the paths the store lacks are fetched, and every one of them must carry a
valid signature by the configured key *before* Nix is asked for anything, so a forged or
unsigned entry leaves the store exactly as it was. Nix itself then checks the signatures again
(`require-sigs`, only our key trusted) and the NarHash of every NAR it unpacks. The missing paths
go in batches to several `nix copy --no-recursive` processes at once, a batch starting when
every reference it lacks is valid: unpacking is bound by file creation in the kernel, which one
Nix process does one file at a time.

From a remote cache (`--cache https://host/cache`, or a URL as cache_dir): the closure is read
from the narinfos the remote mount's mirror keeps (remote.py: fetched for the server's path
index, each kept only when a trusted key signed it), and the NARs of the missing paths are
fetched once, by range, into a staging cache beside the mirror; from there everything is as
for a local cache (narfs's NAR check, then `nix copy` with the signatures required), so a NAR
crosses the network once and never reaches Nix unchecked. The staging cache is removed
afterwards. A server without narfs's path index (a cache `nix copy` wrote, any plain binary
cache) lists nothing: the store paths named on the command line are looked up by hash, and
their closure followed through the narinfos' References as far as the store lacks it, into a
temporary cache beside the mirror (not the mirror, whose path set a mount's --path named).

Without Nix (`--to DIR`): the NAR is parsed (as untrusted input) into a temporary directory
beside DIR, through directory descriptors only (O_NOFOLLOW everywhere, O_EXCL for files), so
nothing is ever written through a symlink the NAR made; the NarHash is checked on the way and
the tree is renamed to DIR only when the whole NAR proved good. On any failure nothing is left.
"""

from __future__ import annotations

import argparse
import ctypes
import difflib
import errno
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import trio

from . import nar, nixquery, nixversions, pathindex
from .cache import CACHE_INFO, TMP_PREFIX, Cache, cache_info_text, new_temporary, write_atomic
from .catalog import entries_with_access, open_catalog
from .config import Settings, trusted_key
from .errors import CorruptError, NarfsError
from .mounttable import mount_containing
from .narinfo import NarInfo
from .narstream import decompressed_chunks, parse_checked
from .progress import Progress, human_size, plural, when
from .remote import FETCHERS, WHOLE_STEP, NoIndex, RemoteBackend, is_url, open_remote
from .signing import PublicKey
from .storepath import STORE_DIR, hash_part, is_base_name, is_hash, name_part, user_store_path

log = logging.getLogger(__name__)

PATH_COST = 256 << 10  # what one path costs Nix beyond its bytes (registration, locks), in bytes
MAX_BATCH = 2000  # paths per `nix copy` command line
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
BY_NAME = ".by-name"  # the mount's by-name view (fs.py)
NIX_DB = "/nix/var/nix/db"
DAEMON_SOCKET = "/nix/var/nix/daemon-socket/socket"


# --- targets --------------------------------------------------------------------------------

@dataclass
class Target:
    arg: str
    cache: Cache
    hash: str
    out_link: str | None = None  # `./result`: made a GC root again once restored
    base: str | None = None  # the `<hash>-<name>` the user named, when they named one


def close_names(name: str, names: set[str]) -> list[str]:
    """What a user who typed `name` may have meant: names that add a version to it
    (`hello` → hello-2.12.1, newest-looking first), then near misses (typos)."""
    versioned = sorted((n for n in names if n.startswith(name + "-")
                        and n[len(name) + 1:][:1].isdigit()), reverse=True)
    close = difflib.get_close_matches(name, sorted(names), n=5, cutoff=0.7)
    return list(dict.fromkeys([*versioned, *close]))[:5]


def _by_name(name: str, cache: Cache) -> str:
    entries = [e for e, _ in entries_with_access(cache)]
    rows = [(e.archived, e.name, e.hash) for e in entries if name_part(e.name) == name]
    if not rows:
        maybe = close_names(name, {name_part(e.name) for e in entries})
        if maybe:
            raise NarfsError(f"{name}: no archived path has this name in {cache.root}; did you "
                             f"mean {' or '.join(maybe)}?")
        raise NarfsError(f"{name}: no archived path has this name, hash or store path in "
                         f"{cache.root}; list them with `narfs ls`")
    rows.sort()
    archived, h = cache.newest([(a, h) for a, _, h in rows])  # as the mount's `latest`
    base = next(b for _, b, rh in rows if rh == h)
    if len(rows) > 1:
        rest = [r for r in rows if r[2] != h]
        others = ", ".join(f"{STORE_DIR}/{b} ({when(a)})" for a, b, _ in reversed(rest[-3:]))
        more = f" and {len(rows) - 4} more" if len(rows) > 4 else ""
        print(f"narfs: {name}: {len(rows)} archived paths have this name; restoring the newest, "
              f"{STORE_DIR}/{base} (archived {when(archived)}); others: {others}{more} "
              "(name one by store path or hash to pick it)", file=sys.stderr)
    return h


def resolve(arg: str, cache: Cache) -> Target:
    """A store path, `<hash>-<name>`, a bare hash, a name, or a path inside a narfs mount."""
    target = in_mount(arg) or named(arg, cache) or Target(arg, cache, _by_name(arg, cache))
    target.cache.check()
    if not target.cache.has(target.hash):
        raise NarfsError(f"{arg}: not archived in {target.cache.root}; list what is with "
                         "`narfs ls`")
    return target


def in_mount(arg: str) -> Target | None:
    """The store path a file inside a live narfs mount belongs to, from that mount's cache."""
    found = mount_containing(arg) if "/" in arg or os.path.lexists(arg) else None
    if found is None:
        return None
    mount, rel = found
    top = rel.split("/", 1)[0]
    if not top:
        raise NarfsError(f"{arg}: the root of the narfs mount {mount.mountpoint}; name "
                         "a store path inside it")
    if top == BY_NAME:
        top = _by_name_link(arg, mount.mountpoint, rel)
    if not is_base_name(top):
        raise NarfsError(f"{arg}: {top!r} in the narfs mount {mount.mountpoint} is not "
                         "a store path")
    return Target(arg, Cache(mount.cache_dir), hash_part(top), base=top)


def named(arg: str, cache: Cache) -> Target | None:
    """The store path an argument names by itself (a store path or a file in one, an out-link,
    `<hash>-<name>`, a bare hash); None for a name, which only the cache's entries resolve."""
    if arg.startswith(STORE_DIR + "/") or os.path.islink(arg):
        top = user_store_path(arg)
        target = Target(arg, cache, hash_part(top), base=os.path.basename(top))
        if not arg.startswith(STORE_DIR + "/"):
            target.out_link = os.path.abspath(arg)
        return target
    if "/" in arg:
        raise NarfsError(f"{arg}: neither a store path ({STORE_DIR}/<hash>-<name>) nor a "
                         "file inside a narfs mount")
    if is_hash(arg):
        return Target(arg, cache, arg)
    if is_base_name(arg):
        return Target(arg, cache, hash_part(arg), base=arg)
    return None


def _by_name_link(arg: str, mountpoint: str, rel: str) -> str:
    """The store path a `.by-name/<name>/<latest|version>/...` path stands for, as the mount
    itself answers it (its link), so restore agrees with what `ls` showed."""
    parts = rel.split("/")
    if len(parts) < 2 or not parts[1]:
        raise NarfsError(f"{arg}: name a path inside {BY_NAME}/<name>/ of the narfs mount "
                         f"{mountpoint}")
    link = os.path.join(mountpoint, BY_NAME, parts[1], parts[2] if len(parts) > 2 else "latest")
    try:
        top = os.path.basename(os.readlink(link))
    except OSError as e:
        raise NarfsError(f"{link}: {e.strerror}; see `ls {os.path.dirname(link)}`") from None
    if not is_base_name(top):
        raise NarfsError(f"{link}: does not point at a store path in the mount")
    return top


def read_info(cache: Cache, h: str) -> NarInfo:
    try:
        return cache.read_narinfo(h)
    except CorruptError as e:
        raise NarfsError(f"{e}; run `narfs verify`") from None


# --- the closure ----------------------------------------------------------------------------

@dataclass
class Plan:
    tops: list[str]  # store paths asked for
    closure: dict[str, NarInfo] = field(default_factory=dict)  # store path → narinfo
    fetch: dict[str, NarInfo] = field(default_factory=dict)  # the part the store lacks
    held: int = 0  # references outside the cache the store holds (their closures not walked)

    @property
    def present(self) -> int:
        return len(self.closure) - len(self.fetch) + self.held


async def invalid_paths(paths: list[str]) -> set[str]:
    """Those of `paths` the store lacks, asked in command lines of a bounded length."""
    invalid: set[str] = set()
    for i in range(0, len(paths), 5000):
        invalid.update(await nixquery.invalid_paths(paths[i:i + 5000]))
    return invalid


async def plan(cache: Cache, hashes: list[str], where: str) -> Plan:
    """The closure of `hashes` as the cache records it, and the part the store lacks.
    `where`: the cache as the user knows it (its directory or URL)."""

    def walk() -> tuple[dict[str, NarInfo], dict[str, str]]:
        infos: dict[str, NarInfo] = {}
        absent: dict[str, str] = {}  # reference not in the cache → a path referring to it
        todo = list(dict.fromkeys(hashes))
        seen = set(todo)
        while todo:
            info = read_info(cache, todo.pop())
            infos[info.store_path] = info
            for ref in info.references:
                rh = hash_part(ref)
                if rh in seen:
                    continue
                seen.add(rh)
                if cache.has(rh):
                    todo.append(rh)
                else:
                    absent[f"{STORE_DIR}/{ref}"] = info.store_path
        return infos, absent

    infos, absent = await trio.to_thread.run_sync(walk)
    p = Plan([read_info(cache, h).store_path for h in hashes], infos)
    invalid = await invalid_paths([*infos, *absent])
    for ref, referrer in absent.items():
        if ref in invalid:
            raise NarfsError(f"{ref}: referenced by {referrer} but neither in {where} nor in "
                             f"the store, so the closure cannot come back; "
                             + ("run `narfs verify`" if where == cache.root else
                                f"copy it to {where}, or into this store first"))
    p.fetch = {path: info for path, info in infos.items() if path in invalid}
    p.held = len([ref for ref in absent if ref not in invalid])
    return p


def signing_key(args: argparse.Namespace, settings: Settings) -> PublicKey | None:
    """The key every narinfo restored must be signed by; None with --no-check-sigs."""
    if args.no_check_sigs:
        return None
    key = trusted_key(settings)
    if key is None:
        raise NarfsError("no key to check signatures against: set public_key or "
                         "secret_key_file in the config, or pass --no-check-sigs if you "
                         "trust the cache")
    return key


def check_signatures(infos: dict[str, NarInfo], key: PublicKey, where: str) -> None:
    bad = sorted(path for path, info in infos.items() if not info.signed_by(key))
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise NarfsError(
            f"{bad[0]}: no valid signature by {key.name} in {where}{more}: forged, damaged "
            "or unsigned narinfo; refusing to restore, the store is unchanged. Check the cache "
            "with `narfs verify`, or pass --no-check-sigs if you trust it")


# --- copying through Nix --------------------------------------------------------------------

def check_nar(cache: Cache, info: NarInfo, nix: nixversions.NixVersion | None) -> None:
    """Parse one NAR with narfs's own validating parser before Nix imports it.

    Nix (2.8) restores a NAR whose directory entries are unsorted or duplicated and registers
    the path as valid, though its tree no longer dumps to the NarHash that was checked; so a
    hostile cache could plant a path `nix-store --verify-path` calls modified. Checked here,
    it never reaches the store. A NAR this Nix would refuse for its depth is refused here, before
    Nix starts, with the way out.
    """
    validator = nar.Validator()
    try:
        with cache.open_nar(info) as f:
            parse_checked(decompressed_chunks(f, info.compression), validator,
                          info.nar_size, info.nar_hash)
    except (CorruptError, OSError) as e:
        raise NarfsError(f"{info.store_path}: refusing its NAR in {cache.root}: {e}; nothing "
                         "was restored, the store is unchanged; run `narfs verify`") from None
    refusal = nixversions.depth_refusal(nix, validator.deepest)
    if refusal:
        raise NarfsError(f"{info.store_path}: {refusal}; nothing was restored, the store is "
                         "unchanged")


async def check_nars(cache: Cache, infos: dict[str, NarInfo], threads: int,
                     total: int) -> None:
    """check_nar over every path to fetch, `threads` at a time, with progress."""
    limiter = trio.CapacityLimiter(threads)
    nix = await nixversions.detect()
    bar = Progress(total, "checking")
    try:
        async with trio.open_nursery() as nursery:
            for info in infos.values():
                async def one(info: NarInfo = info) -> None:
                    await trio.to_thread.run_sync(check_nar, cache, info, nix, limiter=limiter)
                    bar.advance(info.nar_size)
                nursery.start_soon(one)
    finally:
        bar.close()


class Copier:
    """Runs `nix copy --no-recursive` over batches of the missing paths, `jobs` at a time.

    Invariant: a batch starts only when every reference of its paths is valid in the store or
    inside the same batch (Nix sorts a batch itself), since Nix registers a path only after its
    references. A chain of paths each enabling exactly one more goes in one batch, so a linear
    closure costs one Nix process, a wide one keeps every job busy.
    """

    def __init__(self, url: str, infos: dict[str, NarInfo], key: PublicKey | None,
                 jobs: int, bar: Progress) -> None:
        self.url = url  # the cache, as Nix is given it (nix_url)
        self.infos = infos
        self.key = key
        self.jobs = max(1, jobs)
        self.bar = bar
        self.pending: dict[str, set[str]] = {
            p: {r for r in (f"{STORE_DIR}/{b}" for b in i.references) if r in infos and r != p}
            for p, i in infos.items()}
        self.rdeps: dict[str, list[str]] = {p: [] for p in infos}
        for p, refs in self.pending.items():
            for r in refs:
                self.rdeps[r].append(p)
        self.ready = [p for p, refs in self.pending.items() if not refs]
        self.done: list[str] = []
        self.errors: list[str] = []
        self.batches = 0

    def cost(self, path: str) -> int:
        return self.infos[path].nar_size + PATH_COST

    def command(self, batch: list[str]) -> list[str]:
        cmd = [*nixquery.NIX, "copy", "--from", self.url, "--no-recursive",
               "--log-format", "internal-json"]
        if self.key is None:
            cmd.append("--no-check-sigs")
        else:
            cmd += ["--option", "trusted-public-keys", self.key.text(),
                    "--option", "require-sigs", "true"]
        return cmd + batch

    def take(self, idle: int) -> list[str]:
        """Ready paths, largest first, that fit an equal share of the ready work (first fit),
        then any chain they alone enable."""
        self.ready.sort(key=self.cost, reverse=True)
        budget = sum(self.cost(p) for p in self.ready) / max(1, idle)
        batch: list[str] = []
        rest: list[str] = []
        total = 0
        for p in self.ready:
            if len(batch) < MAX_BATCH and (not batch or total + self.cost(p) <= budget):
                batch.append(p)
                total += self.cost(p)
            else:
                rest.append(p)
        self.ready = rest
        members = set(batch)
        frontier: set[str] = set()

        def enable(p: str) -> None:
            for q in self.rdeps[p]:
                if q not in members and self.pending[q] <= members:
                    frontier.add(q)

        for p in batch:
            enable(p)
        while len(frontier) == 1 and len(batch) < MAX_BATCH:
            q = frontier.pop()
            batch.append(q)
            members.add(q)
            enable(q)
        return batch

    async def run(self) -> list[str]:
        send, recv = trio.open_memory_channel[tuple[list[str], str | None]](1 << 30)
        running = 0
        async with trio.open_nursery() as nursery:

            def launch() -> None:
                nonlocal running
                while self.ready and running < self.jobs and not self.errors:
                    batch = self.take(self.jobs - running)
                    running += 1
                    self.batches += 1
                    nursery.start_soon(self._copy, batch, send)

            launch()
            while running:
                batch, error = await recv.receive()
                running -= 1
                if error is not None:
                    self.errors.append(error)
                    continue
                members = set(batch)
                for p in batch:
                    self.done.append(p)
                    for q in self.rdeps[p]:
                        self.pending[q].discard(p)
                        if not self.pending[q] and q not in members:
                            self.ready.append(q)
                launch()
        if self.errors:  # part of a failed batch may have gone in: ask the store
            invalid = set(await nixquery.invalid_paths(list(self.infos)))
            restored = len(self.infos) - len(invalid)
            kept = (f"{restored} of {plural(len(self.infos), 'path')} restored before it: "
                    "they are valid store paths") if restored else "nothing was restored"
            raise NarfsError(f"{self.errors[0]} ({kept})")
        return self.done

    async def _copy(self, batch: list[str], send: trio.MemorySendChannel) -> None:
        started: dict[int, str] = {}
        messages: list[str] = []
        raw: list[str] = []

        def line(text: bytes) -> None:
            if not text.startswith(b"@nix "):
                if text.strip():
                    raw.append(text.decode(errors="replace"))
                return
            try:
                doc = json.loads(text[5:])
            except ValueError:
                return
            action = doc.get("action")
            if action == "start" and doc.get("type") == 100 and doc.get("fields"):
                started[doc.get("id")] = str(doc["fields"][0])
            elif action == "stop" and doc.get("id") in started:
                path = started.pop(doc["id"])
                if path in self.infos:
                    self.bar.advance(self.infos[path].nar_size, name_part(path))
            elif action == "msg" and doc.get("level", 9) <= 0:
                messages.append(_ANSI.sub("", str(doc.get("msg", ""))))

        error = None
        try:
            proc = await trio.lowlevel.open_process(
                self.command(batch), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE)
        except FileNotFoundError:
            await send.send((batch, "nix: not found; install Nix or put it on PATH"))
            return
        try:
            buf = b""
            assert proc.stderr is not None
            async for chunk in proc.stderr:
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for text in lines:
                    line(text)
            line(buf)
            rc = await proc.wait()
        except BaseException:
            proc.kill()
            with trio.CancelScope(shield=True):
                await proc.wait()
            raise
        if rc != 0:
            # Nix's last error is often only "build of … failed": its causes come before it.
            said = [m.strip().removeprefix("error: ") for m in messages or raw[-3:]
                    if m.strip()] or [f"exit status {rc}"]
            causes = "; ".join(dict.fromkeys(" ".join(m.split()) for m in said))
            error = f"nix copy: {causes}; {self.way_out(causes)}"
            if not any(p in causes for p in batch):  # Nix named none of them: say which
                more = f" (and {len(batch) - 1} more)" if len(batch) > 1 else ""
                error = f"{batch[0]}{more}: {error}"
        await send.send((batch, error))

    def way_out(self, causes: str) -> str:
        if self.key is not None and nixversions.UNTRUSTED_SIGNATURE.search(causes):
            return (f"this Nix does not trust {self.key.name} (nix-daemon ignores the keys a "
                    "user not in nix.conf's trusted-users passes): add "
                    f"{self.key.text()} to trusted-public-keys in nix.conf and restart "
                    "nix-daemon, or restore as a trusted user")
        return "fix what Nix reports and run the restore again"


@contextmanager
def nix_url(root: str) -> Iterator[str]:
    """The `file://` URL Nix is given for the cache `root`. Versions of Nix read a path with
    `%`, a space and the like differently (nixversions.file_store_url), so such a cache is
    handed over as a plain-named link to it in a temporary directory, removed afterwards."""
    url = nixversions.file_store_url(root)
    if url is not None:
        yield url
        return
    tmp = tempfile.mkdtemp(prefix="narfs-cache-")
    try:
        os.chmod(tmp, 0o755)  # read by Nix, which may be a daemon running as another user
        link = os.path.join(tmp, "cache")
        os.symlink(root, link)
        url = nixversions.file_store_url(link)
        if url is None:
            raise NarfsError(f"{root}: Nix reads a cache path with characters other than "
                             f"letters, digits and /._- differently from version to version, "
                             f"and the link to it in {tmp} has some too; set TMPDIR to a plain "
                             "directory such as /tmp")
        yield url
    finally:
        remove_tree(tmp)


# --- unpacking without Nix ------------------------------------------------------------------

class Unpacker:
    """A NarVisitor writing the tree under `container_fd` as the entry `name`.

    Invariant: every file system call names a single validated component relative to a
    directory descriptor this object opened with O_NOFOLLOW|O_DIRECTORY on a directory it made
    itself; files are created with O_EXCL|O_NOFOLLOW. So no write can land outside the
    container or through a symlink, whatever the NAR holds.
    """

    def __init__(self, container_fd: int, name: bytes) -> None:
        self.fds = [container_fd]  # fds[d]: the directory holding nodes at depth d
        self.name = name
        self.files = 0
        self.bytes = 0

    def _parent(self, path: nar.Path) -> tuple[int, bytes]:
        depth = len(path)
        while len(self.fds) > depth + 1:
            os.close(self.fds.pop())
        if len(self.fds) != depth + 1:  # the parser guarantees parents come first
            raise CorruptError(f"NAR entry {path!r} has no parent directory")
        return self.fds[depth], path[-1] if path else self.name

    def directory(self, path: nar.Path) -> None:
        parent, name = self._parent(path)
        os.mkdir(name, 0o777, dir_fd=parent)
        self.fds.append(os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                                | os.O_CLOEXEC, dir_fd=parent))

    def symlink(self, path: nar.Path, target: bytes) -> None:
        parent, name = self._parent(path)
        os.symlink(target, name, dir_fd=parent)
        self.files += 1

    def regular(self, path: nar.Path, executable: bool, size: int, offset: int,
                chunks: Iterator[bytes]) -> None:
        parent, name = self._parent(path)
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o666, dir_fd=parent)
        try:
            for data in chunks:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            if executable:  # as Nix's restorePath: the umask's mode plus every x bit
                os.fchmod(fd, os.fstat(fd).st_mode | 0o111)
        finally:
            os.close(fd)
        self.files += 1
        self.bytes += size

    def close(self) -> None:
        while len(self.fds) > 1:
            os.close(self.fds.pop())


def _rename_noreplace(src: str, dst: str) -> None:
    """rename(2) that fails rather than replace something that appeared at `dst` meanwhile."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        os.rename(src, dst)
        return
    at_fdcwd, rename_noreplace = -100, 1
    if renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst),
                 rename_noreplace) != 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSYS, errno.EINVAL):
            os.rename(src, dst)
            return
        raise OSError(err, os.strerror(err), dst)


def remove_tree(path: str) -> None:
    """Remove what a failed unpack left. GNU rm walks any depth without recursion and never
    follows a symlink (shutil.rmtree recurses once per level: a NAR 1024 directories deep
    ends in RecursionError)."""
    if os.path.lexists(path):
        subprocess.run(["rm", "-rf", "--one-file-system", "--", path], check=False)
    if os.path.lexists(path):
        log.error("%s: could not remove this leftover of an unpack; remove it by hand", path)


def unpack(cache: Cache, info: NarInfo, dest: str) -> Unpacker:
    """Unpack one path's NAR as `dest` (which must not exist), all or nothing."""
    dest = os.path.abspath(dest)
    parent = os.path.dirname(dest)
    if os.path.lexists(dest):
        raise NarfsError(f"{dest}: already exists; --to creates the directory itself, give a "
                         "new name")
    if not os.path.isdir(parent):
        raise NarfsError(f"{parent}: no such directory to unpack into")
    tmp = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}unpack-", dir=parent)
    visitor = None
    try:
        container = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            visitor = Unpacker(container, b"tree")
            with cache.open_nar(info) as f:
                try:
                    parse_checked(decompressed_chunks(f, info.compression), visitor,
                                  info.nar_size, info.nar_hash)
                finally:
                    visitor.close()
        finally:
            os.close(container)
        _rename_noreplace(os.path.join(tmp, "tree"), dest)
    except CorruptError as e:
        raise NarfsError(f"{info.store_path}: refusing its NAR in {cache.root}: {e}; nothing "
                         f"was written to {dest}") from None
    except OSError as e:
        raise NarfsError(f"{e.filename or dest}: cannot unpack ({e.strerror}); nothing was "
                         "left behind") from None
    finally:
        remove_tree(tmp)
    assert visitor is not None
    return visitor


# --- from a remote cache --------------------------------------------------------------------

@contextmanager
def staged(remote: RemoteBackend, infos: dict[str, NarInfo], total: int) -> Iterator[Cache]:
    """A local binary cache holding `infos` and their NARs, fetched from the server by range
    (each NAR once); removed when the block ends. Nothing fetched is trusted here: check_nar
    holds every NAR to its signed NarHash before Nix sees it, and Nix checks it again."""
    root = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}restore-", dir=remote.mirror.root)
    try:
        try:
            staging = _fetch(remote, infos, total, root)
        except (OSError, CorruptError) as e:
            raise NarfsError(f"{remote.where}: {e}; nothing was restored, the store is "
                             "unchanged") from None
        yield staging
    finally:
        remove_tree(root)


def _fetch(remote: RemoteBackend, infos: dict[str, NarInfo], total: int, root: str) -> Cache:
    os.chmod(root, 0o755)  # read by Nix, which may be a daemon running as another user
    os.mkdir(os.path.join(root, "nar"), 0o755)
    staging = Cache(root)
    write_atomic(os.path.join(root, "nix-cache-info"), cache_info_text().encode(), sync=False)
    bar = Progress(total, "fetching")
    try:
        for info in infos.values():
            size = info.file_size if info.file_size is not None else remote.http.size(info.url)
            fd, tmp = new_temporary(os.path.join(root, "nar"), "nar")
            try:
                for offset in range(0, size, WHOLE_STEP):
                    data = remote.http.get_range(info.url, offset,
                                                 min(WHOLE_STEP, size - offset), size)
                    view = memoryview(data)
                    while view:
                        view = view[os.pwrite(fd, view, offset + len(data) - len(view)):]
                    bar.advance(len(data), name_part(info.store_path))
            finally:
                os.close(fd)
            os.rename(tmp, staging.nar_path(info.url))
            write_atomic(staging.narinfo_path(info.hash), info.render().encode(), sync=False)
    finally:
        bar.close()
    return staging


def open_remote_cache(url: str, settings: Settings) -> tuple[RemoteBackend, bool]:
    """The server's path index brought into the mirror (remote.py), whose narinfos restore
    then reads like a local cache's; and whether the server has that index."""
    remote = open_remote(url, settings)
    try:
        remote.update()
    except NoIndex:
        return remote, False
    except (NarfsError, OSError) as e:
        remote.close()
        raise NarfsError(f"{url}: cannot restore from it: {e}") from None
    return remote, True


# --- from a server without a path index -----------------------------------------------------
# A cache `nix copy` wrote, or any plain binary cache: nothing lists its paths, so restore takes
# the store paths named on the command line and follows their narinfos' References.

@contextmanager
def unindexed(remote: RemoteBackend) -> Iterator[Cache]:
    """A temporary cache for the narinfos fetched from a server without a path index, removed
    when the block ends. Not the mirror: there the path set is what a mount's --path named,
    which a restore must not change under that mount."""
    root = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}narinfos-", dir=remote.mirror.root)
    try:
        write_atomic(os.path.join(root, CACHE_INFO), cache_info_text().encode(), sync=False)
        yield Cache(root)
    finally:
        remove_tree(root)


def fetch_narinfos(remote: RemoteBackend, cache: Cache, wanted: dict[str, str | None],
                   key: PublicKey | None) -> set[str]:
    """The server's narinfos of `wanted` (hash → the `<hash>-<name>` expected, if known) into
    `cache`, FETCHERS at once, each held to its hash, name and (unless --no-check-sigs) the
    key before it is kept, so an unsigned narinfo cannot lead the walk on. Returns the hashes
    the server has no narinfo for."""
    try:
        with ThreadPoolExecutor(FETCHERS) as pool:
            found = dict(zip(wanted, pool.map(remote.fetch_narinfo, wanted, wanted.values()),
                             strict=True))
    except OSError as e:
        raise NarfsError(f"{remote.where}: cannot restore from it: {e}") from None
    infos = {info.store_path: info for info in found.values() if info is not None}
    if key is not None:
        check_signatures(infos, key, remote.where)
    for info in infos.values():
        write_atomic(cache.narinfo_path(info.hash), info.render().encode(), sync=False)
    return {h for h, info in found.items() if info is None}


def fetch_named(remote: RemoteBackend, cache: Cache, args: list[str],
                key: PublicKey | None) -> None:
    """The narinfos of the store paths named on the command line (a name alone cannot be
    looked up without the index)."""
    wanted: dict[str, str | None] = {}
    asked: dict[str, str] = {}
    for arg in args:
        if in_mount(arg) is not None:
            continue  # restored from that mount's cache, as with any --cache
        target = named(arg, cache)
        if target is None:
            raise NarfsError(f"{arg}: {remote.where} has no path index ({pathindex.FILENAME}: "
                             "a cache `nix copy` wrote?), so its paths cannot be found by "
                             f"name; name the store path, {STORE_DIR}/<hash>-<name>")
        wanted[target.hash] = target.base
        asked.setdefault(target.hash, arg)
    missing = fetch_narinfos(remote, cache, wanted, key)
    if missing:
        try:
            is_cache = remote.http.get(CACHE_INFO, 1 << 16) is not None
        except OSError as e:
            raise NarfsError(f"{remote.where}: cannot restore from it: {e}") from None
        if not is_cache:
            raise NarfsError(f"{remote.where}: no binary cache there (no {CACHE_INFO}); check "
                             "the URL")
        h = next(h for h in wanted if h in missing)
        raise NarfsError(f"{asked[h]}: not in {remote.where} (it has no {h}.narinfo); check "
                         "the store path, or restore it from the cache that holds it")


async def fetch_closure(remote: RemoteBackend, cache: Cache, hashes: list[str],
                        key: PublicKey | None) -> None:
    """The narinfos of the closure of `hashes` (in `cache` already), as far as the store lacks
    it, a level of references at a time: a path the store holds has its closure there, so it
    costs no request. A reference the server lacks is left for plan() to report, unless the
    store holds it."""
    seen = set(hashes)
    level = list(seen)
    while level:
        refs: dict[str, str] = {}  # store path → base name
        for h in level:
            for ref in read_info(cache, h).references:
                if hash_part(ref) not in seen:
                    seen.add(hash_part(ref))
                    refs[f"{STORE_DIR}/{ref}"] = ref
        lacking = await invalid_paths(list(refs))
        wanted: dict[str, str | None] = {hash_part(p): b for p, b in refs.items()
                                         if p in lacking}
        missing = await trio.to_thread.run_sync(fetch_narinfos, remote, cache, wanted, key)
        level = [h for h in wanted if h not in missing]


# --- the command ----------------------------------------------------------------------------

async def _restore(args: argparse.Namespace, settings: Settings, targets: list[Target],
                   remote: RemoteBackend | None = None, unindexed: bool = False) -> int:
    cache = targets[0].cache
    where = remote.where if remote else cache.root
    start = time.monotonic()
    key = signing_key(args, settings)
    if remote is not None and unindexed:
        await fetch_closure(remote, cache, [t.hash for t in targets], key)
    p = await plan(cache, [t.hash for t in targets], where)
    if key is not None:
        check_signatures(p.fetch, key, where)
    nar_bytes = sum(i.nar_size for i in p.fetch.values())
    file_bytes = sum(i.file_size or 0 for i in p.fetch.values())
    if args.dry_run:
        for path in sorted(p.fetch, key=name_part):
            print(f"would restore {path} ({human_size(p.fetch[path].nar_size)})")
        print(f"would restore {plural(len(p.fetch), 'path')}: {human_size(nar_bytes)} unpacked, "
              f"{human_size(file_bytes)} read from {where}; {p.present} of the closure "
              "already in the store")
        return 0
    restored: list[str] = []
    if p.fetch:
        with staged(remote, p.fetch, file_bytes) if remote \
                else nullcontext(cache) as source:
            await check_nars(source, p.fetch, settings.threads, nar_bytes)
            bar = Progress(nar_bytes, "restoring")
            try:
                with nix_url(source.root) as url:
                    restored = await Copier(url, p.fetch, key, settings.threads, bar).run()
            finally:
                bar.close()
        for path in restored:
            print(f"restored {path}")
        print(f"restored {plural(len(restored), 'path')} ({human_size(nar_bytes)}) from "
              f"{where} in "
              f"{time.monotonic() - start:.1f} s; {p.present} already in the store")
    else:
        print(f"nothing to restore: {', '.join(p.tops)} and "
              f"{plural(len(p.closure) - len(p.tops), 'path')} of its closure are already in "
              "the store")
    if args.add_root:
        out = await nixquery.run(["nix-store", "--add-root", os.path.abspath(args.add_root),
                               "--realise", *p.tops])
        for root, top in zip(out.decode().split(), p.tops, strict=False):
            print(f"GC root {root} → {top}")
    # An out-link restored through (`narfs restore ./result`) is a root again, as nix-build
    # left it: the next GC must not take back what was just restored.
    for t in targets:
        if t.out_link is not None:
            path = read_info(cache, t.hash).store_path
            await nixquery.run(["nix-store", "--add-root", t.out_link, "--realise", path])
            print(f"GC root {t.out_link} → {path}")
    catalog = None if unindexed else open_catalog(cache, sync=False)
    if catalog is not None:
        with catalog:
            catalog.touch(hash_part(path) for path in p.closure)
    return 0


def store_problem() -> str | None:
    """Why this user cannot put paths into the Nix store, or None: not root, the store's
    database is root's (a single-user Nix) and no nix-daemon listens for others."""
    if os.geteuid() == 0 or os.access(NIX_DB, os.W_OK):
        return None
    remote = os.environ.get("NIX_REMOTE", "")
    if remote.startswith(("daemon", "unix://")):
        return None
    if remote in ("", "auto") and os.path.exists(DAEMON_SOCKET):
        return None
    return (f"restoring writes to {STORE_DIR}, which only root can here: the store is "
            f"root's and no nix-daemon runs ({DAEMON_SOCKET} is missing); run it as root "
            "(sudo narfs restore ...), start nix-daemon, or unpack without Nix with --to DIR")


def main(args: argparse.Namespace, settings: Settings) -> int:
    if not args.to and not args.dry_run:
        problem = store_problem()
        if problem:
            raise NarfsError(problem)
    if not is_url(settings.cache_dir):
        return _main(args, settings, Cache(settings.cache_dir))
    remote, indexed = open_remote_cache(settings.cache_dir, settings)
    try:
        if indexed:
            return _main(args, settings, remote.mirror, remote)
        with unindexed(remote) as cache:
            fetch_named(remote, cache, args.targets, signing_key(args, settings))
            return _main(args, settings, cache, remote, unindexed=True)
    finally:
        remote.close()


def _main(args: argparse.Namespace, settings: Settings, cache: Cache,
          remote: RemoteBackend | None = None, unindexed: bool = False) -> int:
    targets = [resolve(arg, cache) for arg in args.targets]
    roots = {t.cache.root for t in targets}
    if len(roots) > 1:
        raise NarfsError(f"targets come from different caches ({', '.join(sorted(roots))}); "
                         "restore them one cache at a time")
    if targets[0].cache.root != cache.root:  # all inside a local mount: its cache, not --cache
        remote, unindexed = None, False
    where = remote.where if remote else targets[0].cache.root
    if args.to:
        if len(targets) != 1:
            raise NarfsError("--to unpacks exactly one store path; give one TARGET")
        if args.add_root:
            raise NarfsError("--add-root registers a store path; it does not go with --to")
        t = targets[0]
        info = read_info(t.cache, t.hash)
        key = signing_key(args, settings)
        if key is not None:
            check_signatures({info.store_path: info}, key, where)
        if args.dry_run:
            print(f"would unpack {info.store_path} ({human_size(info.nar_size)}) into "
                  f"{os.path.abspath(args.to)}")
            return 0
        with staged(remote, {info.store_path: info}, info.file_size or 0) if remote \
                else nullcontext(t.cache) as source:
            u = unpack(source, info, args.to)
        print(f"unpacked {info.store_path} into {os.path.abspath(args.to)}: "
              f"{plural(u.files, 'file')}, "
              f"{human_size(u.bytes)}")
        catalog = None if unindexed else open_catalog(t.cache, sync=False)
        if catalog is not None:
            with catalog:
                catalog.touch([t.hash])
        return 0
    return trio.run(_restore, args, settings, targets, remote, unindexed)

