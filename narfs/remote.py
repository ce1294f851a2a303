"""A remote cache (`narfs mount http(s)://host/path MOUNTPOINT`): the second Backend.

The client keeps a partial mirror of the server's cache in its own directory (`client_dir`:
/var/cache/narfs/remote/<host>/ for root, else $XDG_CACHE_HOME or ~/.cache/narfs/remote/<host>/),
so the catalog, the filesystem and the reader work on it exactly as on a local cache:

  nix-cache-info     written here, so the directory is a cache
  <hash>.narinfo     fetched for each path the server's index (pathindex.py) lists, kept only
                     when a trusted key signed it, its mtime set to the index's archive time
  <hash>.ls          fetched the first time a path is looked into (MirrorCache.read_listing)
  <hash>.auth        the path's signed frame hashes, fetched with its listing or NAR
  .narfs/            catalog, trees, hot tier, and ranges/: the NAR bytes fetched, bounded

NARs are read by range: SignedNar.pread fetches the frames covering what the reader asks for,
each checked against the path's signed frame hashes (`<hash>.auth`, frameauth.py), whose
signed seek table spares the request for the NAR's end; fetched frames stay in ranges/, so a
second look costs no request. A path without signed frame hashes (a cache written by `nix
copy`) is fetched whole once and checked against its NarHash before any of it is used
(WholeNar), as the hot tier does locally. The mirror follows the server by polling its index
with conditional requests every `remote_poll` seconds; a narinfo written or removed here
reaches the mount through the same inotify watch as a local cache's.

Threads: `update` runs in a worker thread (the poll) while reads run in the reader's; they
share the Http pool (thread-safe), the RangeCache and the verified `.auth` LRU (each under
its own lock), and `listed`/`tops`, which `update` replaces whole rather than changes.
SignedNar's read-ahead runs in daemon threads (at most AHEAD_FETCHES), so an unmount never
waits for them; a read that needs a frame being fetched ahead waits for it, bounded by the
longest a request may take. So does the `.ls` a first look at a path fetches while that
path's `.auth` is fetched (fetch_listing: one round trip instead of two).

Trust: the server is untrusted (docs/SECURITY.md, "Remote mounts"). A path is shown only once
its narinfo verifies against a trusted key (narfs's own: public_key or the secret key's half,
and nix.conf's trusted-public-keys); listings and frames only once they match hashes that key
signed, or the NarHash of the whole NAR. The index is a hint (which narinfos to fetch, archive
times, top nodes).
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import netrc
import os
import re
import threading
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import trio
import zstandard

from . import frameauth, listing, narinfo, pathindex
from .backend import LocalFile, NarView
from .cache import (
    Cache,
    cache_info_text,
    read_small,
    remove_file,
    write_atomic,
)
from .catalog import Catalog, Entry
from .config import Settings, trusted_key
from .disklru import DiskLRU
from .errors import CorruptError, NarfsError
from .http import Http, RemoteError, is_url
from .narinfo import NarInfo
from .narstream import NarStream, decompressed_chunks
from .nixquery import nix_settings, nix_version
from .signing import PublicKey, parse_public_key
from .storepath import STORE_DIR, base_name, hash_part, name_part

log = logging.getLogger(__name__)

AHEAD = 2  # frames fetched ahead once a NAR's reads go frame after frame
AHEAD_FETCHES = 4  # fetches ahead in flight at once, for all NARs together
AUTHS_KEPT = 4096  # verified `.auth` documents kept in memory (the mirror keeps them all)
WHOLE_STEP = 8 << 20  # a NAR fetched whole goes in ranges of this size
FETCHERS = 8  # narinfos fetched at once when the index lists new paths
RANGES_DIR = "ranges"
SETTLE = 10.0  # seconds an unmount waits for fetched frames to reach the ranges cache
T = TypeVar("T")
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

__all__ = ["MirrorCache", "NoIndex", "RemoteBackend", "client_dir", "is_url", "trusted_keys"]


class NoIndex(NarfsError):
    """The server has no path index: a cache `nix copy` wrote, or any plain binary cache."""


def client_dir(url: str) -> str:
    """Where a remote cache's mirror lives on this machine: one directory per URL."""
    parts = urllib.parse.urlsplit(url)
    # Letters, digits and ._- only: restore hands Nix a file:// URL below this directory, and
    # Nix 2.34 decodes percent-escapes in it (a quoted "host%3A5000" named another directory).
    # The readable part may collide ("a/b" and "a_b"); the hash of the URL keeps them apart.
    where = f"{parts.netloc}{parts.path.rstrip('/')}"
    readable = re.sub(r"[^A-Za-z0-9._-]", "_", where).lstrip(".")[:80]
    key = hashlib.sha256(f"{parts.scheme}://{where}".encode()).hexdigest()[:12]
    name = f"{'https-' if parts.scheme == 'https' else ''}{readable}-{key}"
    base = os.environ.get("XDG_CACHE_HOME")
    if base:
        base = os.path.join(base, "narfs")
    elif os.geteuid() == 0:
        base = "/var/cache/narfs"
    else:
        base = os.path.join(os.path.expanduser("~"), ".cache", "narfs")
    return os.path.join(base, "remote", name)


def nix_conf() -> dict[str, object]:
    """Nix's effective settings, as doctor reads them; {} on a machine without Nix."""
    v = nix_version()
    return {} if isinstance(v, str) else nix_settings(v) or {}


def trusted_keys(settings: Settings, conf: dict[str, object]) -> list[PublicKey]:
    """narfs's own key (public_key, else the secret key's public half) and nix.conf's
    trusted-public-keys: the keys a remote path's narinfo must be signed by to be shown."""
    keys = []
    own = trusted_key(settings)
    if own is not None:
        keys.append(own)
    for field in ("trusted-public-keys", "extra-trusted-public-keys"):
        value = conf.get(field)
        for word in value if isinstance(value, list) else str(value or "").split():
            try:
                keys.append(parse_public_key(str(word), f"nix.conf {field}"))
            except NarfsError:
                continue
    return keys


class RangeCache(DiskLRU):
    """Fetched NAR byte ranges on disk, least recently used out first, at most `limit` bytes.
    Files are named by a hash of (URL, offset, size): nothing from the server names a file."""

    def __init__(self, directory: str, limit: int) -> None:
        super().__init__(directory, limit, mode=0o700)
        self._pending: dict[str, bytes] = {}  # being written by put_soon
        self._writers: set[threading.Thread] = set()
        self._pending_lock = threading.Lock()

    @staticmethod
    def name(url: str, offset: int, size: int) -> str:
        return hashlib.sha256(f"{url}\0{offset}\0{size}".encode()).hexdigest()

    def get(self, name: str, size: int) -> bytes | None:
        with self._pending_lock:
            pending = self._pending.get(name)
        if pending is not None:
            return pending
        fd = self.open(name, size)
        if fd is None:
            return None
        try:
            data = os.pread(fd, size, 0)
        finally:
            os.close(fd)
        return data if len(data) == size else None

    def put(self, name: str, data: bytes) -> None:
        if len(data) > self.limit:
            return
        fd, tmp = self.temporary(name)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            self.adopt(name, tmp, len(data))
        except OSError as e:  # a full disk costs the next look a request, nothing more
            log.debug("%s: not kept (%s)", name, e)
            remove_file(tmp)

    def put_soon(self, name: str, data: bytes) -> None:
        """put() in a daemon thread, so a read's answer does not wait for the disk; get()
        finds the bytes meanwhile. `settle` waits for these writes at unmount (a temporary
        cut off by a crash is removed at the next start: DiskLRU)."""

        def write() -> None:
            try:
                self.put(name, data)
            finally:
                with self._pending_lock:
                    self._pending.pop(name, None)
                    self._writers.discard(writer)

        writer = threading.Thread(target=write, daemon=True)
        with self._pending_lock:
            self._pending[name] = data
            self._writers.add(writer)
        writer.start()

    def settle(self, timeout: float) -> None:
        """Wait, `timeout` seconds at most, for the writes put_soon started."""
        deadline = time.monotonic() + timeout
        with self._pending_lock:
            writers = list(self._writers)
        for w in writers:
            w.join(max(0.0, deadline - time.monotonic()))


class SignedNar:
    """A NarFile whose every byte is checked against the path's signed frame hashes
    (frameauth.py): frames are fetched whole and compared with their sha256; the seek table at
    the end comes from the signed document, without a request.

    Once reads go frame after frame (grep -r, a listing parsed from the NAR), the next AHEAD
    frames are fetched in the background into the ranges cache, so a link's latency is paid
    once per run of frames rather than once per frame; a lone read fetches nothing more."""

    verified = True  # each frame against its signed hash

    def __init__(self, backend: RemoteBackend, entry: Entry, auth: frameauth.Auth) -> None:
        self.backend = backend
        self.url = entry.url
        self.auth = auth
        self.size = auth.file_size
        self._starts = [f.comp_offset for f in auth.table.frames]
        self._lock = threading.Lock()
        self._last = -2  # the frame read last
        self._ahead: dict[int, threading.Event] = {}  # frames being fetched ahead

    def pread(self, offset: int, size: int) -> bytes:
        end = min(offset + size, self.size)
        data_end = self.auth.table.comp_size
        parts = []
        pos = offset
        if pos < data_end:
            i = bisect.bisect_right(self._starts, pos) - 1
            while pos < min(end, data_end):
                frame = self.auth.table.frames[i]
                data = self._frame(i)
                lo = pos - frame.comp_offset
                hi = min(end - frame.comp_offset, frame.comp_size)
                parts.append(data[lo:hi])
                pos = frame.comp_offset + hi
                i += 1
        if end > data_end and pos < end:
            parts.append(self.auth.tail[pos - data_end:end - data_end])
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _frame(self, i: int) -> bytes:
        """Frame `i`'s compressed bytes, from the ranges cache or fetched, once they matched
        their signed hash (CorruptError otherwise). Fetched whole before anything else is done
        with them: hashing and decompressing each piece as it arrived left data waiting in the
        socket, and the shrinking TCP window then stalled the transfer until a delayed ACK
        (40 ms on loopback) in half the cold reads."""
        frame = self.auth.table.frames[i]
        with self._lock:
            pending = self._ahead.get(i)
            sequential = i == self._last + 1
            self._last = i
        if pending is not None:  # fetched ahead right now: wait for it rather than ask twice
            pending.wait(self.backend.http.longest)
        if sequential:
            self._read_ahead(i)
        where = self.backend.http.url(self.url)
        ranges = self.backend.ranges
        name = RangeCache.name(self.url, frame.comp_offset, frame.comp_size)
        data = ranges.get(name, frame.comp_size)
        if data is not None:
            try:
                self.auth.check_frame(i, data, where)
            except CorruptError:
                ranges.drop(name)
                raise
            return data
        data = self.backend.http.get_range(self.url, frame.comp_offset, frame.comp_size,
                                           self.size)
        self.auth.check_frame(i, data, where)
        ranges.put_soon(name, data)
        return data

    def _read_ahead(self, i: int) -> None:
        frames = self.auth.table.frames
        ranges = self.backend.ranges
        for j in range(i + 1, min(i + 1 + AHEAD, len(frames))):
            fr = frames[j]
            if ranges.limit < (AHEAD + 1) * fr.comp_size:
                return  # the ranges cache could not keep them until they are read
            with self._lock:
                if j in self._ahead or ranges.has(RangeCache.name(self.url, fr.comp_offset,
                                                                  fr.comp_size)):
                    continue
                if not self.backend.ahead.acquire(blocking=False):
                    return  # enough fetches ahead already, for every NAR together
                done = self._ahead[j] = threading.Event()
            # a daemon thread: an unmount never waits for a fetch nobody asked for yet
            threading.Thread(target=self._fetch_ahead, args=(j, done), daemon=True).start()

    def _fetch_ahead(self, j: int, done: threading.Event) -> None:
        fr = self.auth.table.frames[j]
        try:
            self.backend.fetch_range(self.url, fr.comp_offset, fr.comp_size, self.size)
        except (OSError, NarfsError) as e:  # the read that needs it asks again, and says so
            log.debug("fetching ahead: %s", e)
        finally:
            self.backend.ahead.release()
            with self._lock:
                self._ahead.pop(j, None)
            done.set()

    def close(self) -> None:
        pass


class WholeNar:
    """A NarFile for a path without signed frame hashes: nothing of it is handed out before
    the whole file was fetched (in WHOLE_STEP ranges, into the ranges cache) and found to
    decompress to the NarSize and NarHash its signed narinfo names. Reads are then local."""

    verified = True  # the whole file against its signed NarHash, before any byte is read

    def __init__(self, backend: RemoteBackend, entry: Entry, size: int) -> None:
        self.backend = backend
        self.entry = entry
        self.size = size
        self._fd = -1
        self._lock = threading.Lock()

    def pread(self, offset: int, size: int) -> bytes:
        with self._lock:
            if self._fd < 0:
                self._fd = self.backend.whole(self.entry, self.size)
            fd = self._fd
        return os.pread(fd, max(0, min(size, self.size - offset)), offset)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


class MirrorCache(Cache):
    """The mirror directory as a Cache whose missing `.ls` files are fetched from the server
    (and kept); everything else reads the mirror as the local cache it is."""

    def __init__(self, root: str, backend: RemoteBackend) -> None:
        super().__init__(root)
        self.backend = backend

    def read_listing(self, h: str, nar_size: int | None = None) -> dict | None:
        if os.path.lexists(self.listing_path(h)):
            try:
                root = super().read_listing(h, nar_size)
                if root is not None:
                    return root
            except CorruptError as e:
                log.warning("%s; fetching it again", e)
        return self.backend.fetch_listing(h, nar_size)


class RemoteBackend:
    """The Backend of a remote mount (backend.py's protocol), and the mirror it keeps."""

    def __init__(self, url: str, settings: Settings, keys: list[PublicKey],
                 directory: str | None = None,
                 login: tuple[str, str, str] | None = None) -> None:
        self.where = url.rstrip("/")
        self.http = Http(self.where, timeout=settings.remote_timeout, login=login)
        self.keys = keys
        self.mirror = MirrorCache(directory or client_dir(url), self)
        os.makedirs(self.mirror.nar_dir, mode=0o755, exist_ok=True)
        info = os.path.join(self.mirror.root, "nix-cache-info")
        if not os.path.isfile(info):
            write_atomic(info, cache_info_text().encode())
        self.state_dir = self.mirror.state_dir()
        self.ranges = RangeCache(self.mirror.state_path(RANGES_DIR),
                                 settings.remote_cache_mb << 20)
        # verified frame hashes of the paths opened lately (a few KB each), LRU-bounded
        self._auths: OrderedDict[str, frameauth.Auth | None] = OrderedDict()
        self.absent: set[str] = set()  # hashes whose listing the server does not have
        self._auth_lock = threading.Lock()
        self.ahead = threading.Semaphore(AHEAD_FETCHES)
        self.poll = settings.remote_poll
        self.etag: str | None = None
        self.named: list[str] = []  # base names: the path set of a cache without an index
        self.listed: dict[str, tuple[str, float]] = {}  # the index's rows: hash → name, time
        self.rejected: dict[str, float] = {}  # hash → archive time whose narinfo was refused
        self.tops: dict[str, list] = {}  # from the last index read: for a new catalog

    # --- Backend ----------------------------------------------------------------------------

    def open_nar(self, entry: Entry) -> SignedNar | WholeNar:
        auth = self.auth(entry.hash)
        if auth is not None:
            return SignedNar(self, entry, auth)
        size = entry.file_size
        if size is None:  # FileSize is optional in narinfos: ask the server for one byte
            size = self._total(entry.url)
        return WholeNar(self, entry, size)

    def whole(self, entry: Entry, size: int) -> int:
        """A descriptor of the path's whole NAR file, checked against its signed NarHash."""
        name = RangeCache.name(f"{entry.url}\0{entry.nar_hash}", 0, size)
        fd = self.ranges.open(name, size)
        if fd is not None:
            return fd
        fd, tmp = self.ranges.temporary(name)
        try:
            for offset in range(0, size, WHOLE_STEP):
                data = self.http.get_range(entry.url, offset, min(WHOLE_STEP, size - offset),
                                           size)
                view = memoryview(data)
                while view:
                    view = view[os.pwrite(fd, view, offset + len(data) - len(view)):]
            stream = NarStream(decompressed_chunks(NarView(LocalFile(fd)), entry.compression),
                               entry.nar_size)
            stream.drain()
            stream.check(entry.nar_size, entry.nar_hash)
            self.ranges.adopt(name, tmp, size)
        except BaseException:
            os.close(fd)
            remove_file(tmp)
            raise
        return fd

    def read_listing(self, h: str, nar_size: int | None = None) -> dict | None:
        return self.mirror.read_listing(h, nar_size)

    def newest(self, versions: list[tuple[float, str]]) -> tuple[float, str]:
        return self.mirror.newest(versions)

    def state_path(self, name: str) -> str:
        return self.mirror.state_path(name)

    # --- fetching ---------------------------------------------------------------------------

    def fetch_range(self, url: str, offset: int, size: int, total: int) -> bytes:
        name = RangeCache.name(url, offset, size)
        data = self.ranges.get(name, size)
        if data is not None:
            return data
        data = self.http.get_range(url, offset, size, total)
        self.ranges.put(name, data)
        return data

    def _total(self, url: str) -> int:
        """The size of a NAR whose narinfo has no FileSize: what the server says it is."""
        return self.http.size(url)

    def fetch_listing(self, h: str, nar_size: int | None) -> dict | None:
        """The server's `.ls` of a path, checked against its signed hash; None when the server
        has none, or no signed frame hashes to check it with (the mount then builds the
        listing from the whole NAR, checked against NarHash)."""
        if h in self.absent:
            return None
        ls = None
        with self._auth_lock:
            known = h in self._auths
        if not known and not self.named:
            # a narfs cache (it has the path index) has an `.auth` beside each `.ls`: ask for
            # both at once, so a cold look costs one round trip rather than two
            ls = _background(self.http.get, f"{h}.ls", listing.MAX_SIZE)
        auth = self.auth(h)
        if auth is None:
            return None
        got = ls.result(self.http.longest) if ls is not None \
            else self.http.get(f"{h}.ls", listing.MAX_SIZE)
        if got is None:
            self.absent.add(h)
            return None
        data = got.data
        if data.startswith(ZSTD_MAGIC):  # cache.nixos.org: compressed, without saying so
            try:
                data = zstandard.ZstdDecompressor().decompress(
                    data, max_output_size=listing.MAX_SIZE)
            except zstandard.ZstdError as e:
                raise CorruptError(f"{self.http.url(f'{h}.ls')}: damaged ({e})") from None
        auth.check_listing(got.data, self.http.url(f"{h}.ls"))
        try:
            root = listing.parse(data, nar_size)
        except CorruptError as e:
            raise CorruptError(f"{self.http.url(f'{h}.ls')}: {e}") from None
        if self.mirror.has(h):  # kept while the path is; dropped with its narinfo
            write_atomic(self.mirror.listing_path(h), data, sync=False)
        return root

    def auth(self, h: str) -> frameauth.Auth | None:
        """The path's verified signed frame hashes (kept in the mirror once checked); None
        when the server has none for it (a cache written by `nix copy` or before narfs wrote
        them, or a server that deleted them): its NAR is then fetched whole and checked against
        NarHash before anything of it is shown, and its `.ls` is not used (one warning)."""
        with self._auth_lock:
            if h in self._auths:
                self._auths.move_to_end(h)
                return self._auths[h]
        info = self._mirrored_narinfo(h)
        local = frameauth.path(self.mirror, h)
        where = self.http.url(f"{h}{frameauth.SUFFIX}")
        auth = None
        try:
            auth = frameauth.verify(read_small(local, frameauth.MAX_SIZE), info, self.keys,
                                    local)
        except FileNotFoundError:
            pass
        except CorruptError as e:  # cut by a crash (the mirror is not fsynced), or stale
            log.warning("%s; fetching it again", e)
        if auth is None:
            got = self.http.get(f"{h}{frameauth.SUFFIX}", frameauth.MAX_SIZE)
            if got is not None:
                auth = frameauth.verify(got.data, info, self.keys, where)
                write_atomic(local, got.data, sync=False)
        if auth is None:
            log.warning("%s: no signed frame hashes; %s is read from its whole NAR, checked "
                        "against its NarHash", where, info.store_path)
        with self._auth_lock:
            self._auths[h] = auth
            while len(self._auths) > AUTHS_KEPT:
                self._auths.popitem(last=False)
        return auth

    def _mirrored_narinfo(self, h: str) -> NarInfo:
        """The mirror's narinfo of `h` (verified when the mirror took it). The mirror is
        written without fsync, so one a crash cut is fetched and verified again."""
        try:
            return self.mirror.read_narinfo(h)
        except CorruptError as e:
            if h not in self.listed:
                raise
            log.warning("%s; fetching it again", e)
        name, archived = self.listed[h]
        info = self._narinfo(h, name)
        if isinstance(info, str):
            raise CorruptError(info)
        path = self.mirror.narinfo_path(h)
        write_atomic(path, info.render().encode(), sync=False)
        os.utime(path, (archived, archived))
        return info

    def fetch_narinfo(self, h: str, base: str | None = None) -> NarInfo | None:
        """The server's narinfo of `h`, None when it has none; held to its hash and, when
        given, to its `<hash>-<name>` base name, not to any key (each caller checks the keys it
        trusts). RemoteError or CorruptError naming the URL otherwise."""
        url = self.http.url(f"{h}.narinfo")
        got = self.http.get(f"{h}.narinfo", narinfo.MAX_SIZE)
        if got is None:
            return None
        try:
            info = narinfo.parse(got.data, expect_hash=h)
        except CorruptError as e:
            raise CorruptError(f"{url}: {e}") from None
        if base is not None and info.name != base:
            raise CorruptError(f"{url}: names {info.store_path}, not {STORE_DIR}/{base}")
        return info

    def _narinfo(self, h: str, name: str) -> NarInfo | str:
        """The server's narinfo of the path the index lists as `h`, `name`, or why it is not
        shown."""
        url = self.http.url(f"{h}.narinfo")
        try:
            info = self.fetch_narinfo(h, f"{h}-{name}")
        except (RemoteError, CorruptError) as e:
            return str(e)
        if info is None:
            return f"{url}: listed in the index, but not on the server"
        if not any(info.signed_by(k) for k in self.keys):
            trusted = ", ".join(k.name for k in self.keys)
            return (f"{url}: not signed by a trusted key ({trusted}); not shown. Trust the "
                    "server's key with public_key in narfs.toml or nix.conf's "
                    "trusted-public-keys")
        return info

    # --- following the server ---------------------------------------------------------------

    def update(self) -> tuple[list[str], list[str]] | None:
        """Poll the server's index; bring the mirror's narinfos in step with it. Returns the
        hashes added and removed, or None when the index has not changed since the last poll.
        Raises RemoteError when the server cannot be asked, CorruptError for a bad index.
        With store paths named (`named`), those are the path set and no index is read."""
        here = {}
        for h in self.mirror.hashes():
            try:
                here[h] = os.stat(self.mirror.narinfo_path(h)).st_mtime
            except FileNotFoundError:
                continue
        etag = None
        if self.named:
            if self.listed:
                return None  # the named paths do not change
            # A cache without narfs's index (`nix copy`, cache.nixos.org): the paths named,
            # shown as archived when this client first saw them.
            rows: list[pathindex.Row] = [
                (hash_part(b), name_part(b), here.get(hash_part(b), time.time()), None)
                for b in self.named]
        else:
            got = self.http.get(pathindex.FILENAME, pathindex.MAX_COMPRESSED, etag=self.etag)
            if got is None:
                raise NoIndex(f"{self.http.url(pathindex.FILENAME)}: not found; the server "
                                 "is not a narfs cache, or its narfs predates the path index "
                                 "(run `narfs archive` or `narfs gc` there once to write it); "
                                 "or name the store paths to show with --path")
            if got.unchanged:
                return None
            try:
                rows = pathindex.decode(got.data)
            except CorruptError as e:
                raise CorruptError(f"{self.http.url(pathindex.FILENAME)}: {e}") from None
            etag = got.etag
        self.tops = {h: top for h, _, _, top in rows if top is not None}
        listed = self.listed = {h: (name, archived) for h, name, archived, _ in rows}
        removed = [h for h in here if h not in listed]
        for h in removed:
            self.mirror.unpublish(h)
            remove_file(self.mirror.listing_path(h))
            remove_file(frameauth.path(self.mirror, h))
            with self._auth_lock:
                self._auths.pop(h, None)
        wanted = [h for h, (_, archived) in listed.items()
                  if here.get(h) != archived and self.rejected.get(h) != archived]
        added = []
        with ThreadPoolExecutor(FETCHERS) as pool:
            for h, result in zip(wanted, pool.map(
                    lambda h: self._narinfo(h, listed[h][0]), wanted), strict=True):
                archived = listed[h][1]
                if isinstance(result, str):
                    log.error("%s", result)
                    self.rejected[h] = archived
                    if h in here:  # the server replaced a good narinfo with a bad one
                        self.mirror.unpublish(h)
                        removed.append(h)
                    continue
                path = self.mirror.narinfo_path(h)
                if h in here:  # republished: what was kept of the old one may not fit it
                    remove_file(self.mirror.listing_path(h))
                    remove_file(frameauth.path(self.mirror, h))
                    with self._auth_lock:
                        self._auths.pop(h, None)
                    self.absent.discard(h)
                write_atomic(path, result.render().encode(), sync=False)
                os.utime(path, (archived, archived))
                self.rejected.pop(h, None)
                added.append(h)
        self.etag = etag  # once the mirror has what this index lists
        if added or removed:
            log.info("%s: %d paths added, %d retired", self.where, len(added), len(removed))
        return added, removed

    def start(self, catalog: Catalog) -> None:
        """The first update, before the mount shows anything: the catalog is brought in step
        and given the index's top nodes, so the root listing needs no `.ls` per path. A server
        that cannot be reached leaves the mirror as the last mount left it (one warning);
        with nothing mirrored yet, the mount fails with the reason."""
        try:
            self.update()
        except (NarfsError, OSError) as e:
            if not any(True for _ in self.mirror.hashes()):
                raise NarfsError(f"{self.where}: cannot mount: {e}") from None
            log.warning("%s; showing the paths mirrored at the last mount (%s) until the "
                        "server answers", e, self.mirror.root)
        catalog.sync()
        catalog.put_listings((h, None, top) for h, top in self.tops.items())

    async def follow(self) -> None:
        """Poll the server's index every `poll` seconds, for the mount's lifetime. A failed
        poll is logged and retried at the next one; the request is abandoned on unmount."""
        while True:
            await trio.sleep(self.poll)
            try:
                await trio.to_thread.run_sync(self.update, abandon_on_cancel=True)
            except (NarfsError, OSError) as e:
                log.warning("%s: polling the path index failed: %s", self.where, e)

    def close(self) -> None:
        self.ranges.settle(SETTLE)
        self.http.close()


def _background(fn: Callable[..., T], *args: object) -> Future[T]:
    """fn(*args) in a daemon thread, as the read-ahead's: an unmount never waits for it."""
    future: Future[T] = Future()

    def run() -> None:
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # handed to whoever asks for the result
                future.set_exception(e)

    threading.Thread(target=run, daemon=True).start()
    return future


def netrc_login(url: str, conf: dict[str, object]) -> tuple[str, str, str] | None:
    """(netrc file, login, password) for the URL's host from the `netrc-file` Nix uses
    (default /etc/nix/netrc), as Nix itself sends them to substituters."""
    path = str(conf.get("netrc-file") or "/etc/nix/netrc")
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        found = netrc.netrc(path).authenticators(host)
    except FileNotFoundError:
        return None
    except (netrc.NetrcParseError, OSError) as e:
        raise NarfsError(f"{path}: cannot read it ({e}); fix the netrc-file nix.conf "
                         "names") from None
    if found is None:
        return None
    login, _, password = found
    return path, login, password or ""


def open_remote(url: str, settings: Settings, named: list[str] | None = None) -> RemoteBackend:
    """The backend of `narfs mount URL [STOREPATH...]`, or a one-line error naming the fix.
    `named`: store paths to show from a cache that has no path index."""
    bases = []
    for path in named or []:
        try:
            bases.append(base_name(path.rstrip("/")))
        except CorruptError:
            raise NarfsError(f"{path}: not a store path; name paths as "
                             "/nix/store/<hash>-<name>") from None
    conf = nix_conf()
    keys = trusted_keys(settings, conf)
    if not keys:
        raise NarfsError(f"{url}: no trusted key to check the server's narinfos with; set "
                         "public_key in narfs.toml to the server's key (what its narfs init "
                         "printed), or add it to nix.conf's trusted-public-keys")
    try:
        backend = RemoteBackend(url, settings, keys, login=netrc_login(url, conf))
        backend.named = bases
        return backend
    except OSError as e:
        raise NarfsError(f"{client_dir(url)}: cannot create the remote mount's state "
                         f"directory ({e.strerror})") from None
