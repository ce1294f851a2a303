"""HTTP for remote mounts: whole small files, conditional fetches and byte ranges from an
untrusted server, with connection reuse, timeouts and bounded retries.

Blocking (urllib3, one pool shared by the worker threads that call it): the read path calls it
from the reader's worker threads, so a slow server holds a worker, never the trio loop. Every
request ends within `attempts × (connect + read timeout)` plus the backoff between attempts:
a dead or hanging server gives an error (EIO for the read that needed it), never a hang.

The server is untrusted: a range answered with anything but exactly the bytes asked for (a 200
with the whole body, another range, a body shorter or longer than its Content-Length, a total
size other than the one expected) is an error, never bytes handed on. Whether the bytes are
the archived ones is for the caller to check (signatures, hashes: docs/SECURITY.md).
"""

from __future__ import annotations

import errno
import logging
import re
import ssl
import time
from dataclasses import dataclass

import urllib3
from urllib3.exceptions import HTTPError as Urllib3Error

from . import __version__
from .errors import CorruptError, Unavailable

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0
ATTEMPTS = 3
BACKOFF = 0.2  # seconds before the second attempt; doubled for each further one
# Range answers are read in pieces of this size: urllib3 reads 64-128 KiB pieces fastest here
# (2 MiB in one read(n) took 3 ms, in 128 KiB pieces 1 ms).
PIECE = 128 << 10
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class RemoteError(Unavailable):
    """The server could not be asked, or did not answer in time (EIO for the read).
    `retry`: whether asking again may help (a refused or reset connection, a short body);
    a server that let a timeout run out is not asked again within the same read."""

    def __init__(self, message: str, retry: bool = True) -> None:
        super().__init__(errno.EIO, message)
        self.retry = retry

    def __str__(self) -> str:
        return str(self.strerror)


@dataclass
class Fetched:
    data: bytes
    etag: str | None
    unchanged: bool = False  # 304: the file is still the one `etag` names (data is empty)


def is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


class Http:
    """One server (`base`: scheme, host, optional path prefix)."""

    def __init__(self, base: str, timeout: float = 10.0, attempts: int = ATTEMPTS,
                 login: tuple[str, str, str] | None = None) -> None:
        """`login`: (netrc file, user, password), sent as HTTP Basic authentication to this
        server only (redirects are not followed)."""
        self.base = base.rstrip("/")
        self.attempts = attempts
        # the longest one request may take, retries and backoff included
        self.longest = attempts * (min(CONNECT_TIMEOUT, timeout) + timeout) \
            + BACKOFF * (2 ** attempts)
        self.netrc = login[0] if login else None
        headers = {"User-Agent": f"narfs/{__version__}"}
        if login:
            headers.update(urllib3.make_headers(basic_auth=f"{login[1]}:{login[2]}"))
        # Redirects are not followed (retries=False): a cache answers where it is asked.
        # The system's CA store verifies https (urllib3's default through ssl).
        self.pool = urllib3.PoolManager(
            num_pools=2, maxsize=16, block=False, retries=False,
            timeout=urllib3.Timeout(connect=min(CONNECT_TIMEOUT, timeout), read=timeout),
            headers=headers)
        self.requests = 0  # counters for tests and `stats`
        self.bytes = 0

    def url(self, path: str) -> str:
        return f"{self.base}/{path}"

    def _once(self, path: str, headers: dict[str, str], limit: int
              ) -> tuple[int, dict[str, str], bytes]:
        url = self.url(path)
        r = self._request(url, headers)
        consumed = False
        try:
            if r.status not in (200, 206) or (r.status == 200 and "Range" in headers):
                # an error, or the whole file where a range was asked: never read its body
                return r.status, dict(r.headers), b""
            length = r.headers.get("Content-Length")
            if length is not None and (not length.isdigit() or int(length) > limit):
                raise CorruptError(f"{url}: answer of {length} bytes, more than the "
                                   f"{limit} asked for")
            try:
                data = r.read(limit + 1)
            except Urllib3Error as e:
                raise RemoteError(f"{url}: {_reason(e)}", retry=not _timed_out(e)) from None
            if len(data) > limit:
                raise CorruptError(f"{url}: answer larger than {limit} bytes")
            if length is not None and len(data) != int(length):
                raise RemoteError(f"{url}: answer of {len(data)} bytes, Content-Length "
                                  f"said {length}")
            consumed = True
            self.bytes += len(data)
            return r.status, dict(r.headers), data
        finally:
            _done(r, consumed)

    def _request(self, url: str, headers: dict[str, str]) -> urllib3.BaseHTTPResponse:
        """The answer's head; its body is read by the caller, who hands it back (_done)."""
        try:
            # a request's headers replace the pool's: the login and User-Agent go each time
            r = self.pool.request("GET", url, headers={**self.pool.headers, **headers},
                                  preload_content=False, decode_content=False)
        except Urllib3Error as e:  # neither a timeout nor a refused certificate is asked again
            raise RemoteError(f"{url}: {_reason(e)}",
                              retry=not _timed_out(e) and _untrusted(e) is None) from None
        self.requests += 1
        return r

    def _retrying(self, path: str, headers: dict[str, str], limit: int
                  ) -> tuple[int, dict[str, str], bytes]:
        """Transient failures (connection, timeout, short body, 5xx) are retried with backoff;
        a wrong answer (CorruptError) is not: asking again would get the same lie."""
        delay = BACKOFF
        for attempt in range(1, self.attempts + 1):
            try:
                status, h, data = self._once(path, headers, limit)
            except RemoteError as e:
                if attempt == self.attempts or not e.retry:
                    raise
                log.info("%s (attempt %d of %d; retrying)", e, attempt, self.attempts)
            else:
                if status < 500 or attempt == self.attempts:
                    return status, h, data
                log.info("%s: HTTP %d (attempt %d of %d; retrying)", self.url(path), status,
                         attempt, self.attempts)
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    def get(self, path: str, limit: int, etag: str | None = None) -> Fetched | None:
        """A whole file of at most `limit` bytes; None when the server has no such file (404,
        410). With `etag`, a file that has not changed comes back `unchanged` (304)."""
        headers = {"If-None-Match": etag} if etag else {}
        status, h, data = self._retrying(path, headers, limit)
        if status in (404, 410):
            return None
        if status == 304 and etag:
            return Fetched(b"", etag, unchanged=True)
        if status != 200:
            raise RemoteError(f"{self.url(path)}: {self._status(status)}")
        return Fetched(data, h.get("ETag"))

    def _status(self, status: int) -> str:
        if status == 401:
            where = self.netrc or "the netrc-file nix.conf names (default /etc/nix/netrc)"
            return (f"HTTP 401: the server wants credentials; "
                    f"{'they were refused' if self.netrc else 'add a machine line to'} "
                    f"{where}")
        return f"HTTP {status}"

    def get_range(self, path: str, offset: int, size: int, total: int) -> bytes:
        """Exactly bytes [offset, offset+size) of a file of `total` bytes. A transient failure
        part-way (a reset, a short body, a 5xx) asks for the rest of the range only, within the
        same attempts and backoff as a whole request; any lie about the range is a
        CorruptError."""
        url = self.url(path)
        pieces: list[bytes] = []
        done = 0
        delay = BACKOFF
        attempt = 1
        while done < size:
            start, end = offset + done, offset + size - 1
            try:
                r = self._request(url, {"Range": f"bytes={start}-{end}"})
                consumed = False
                try:
                    self._check_range(r, url, start, end, total)
                    while done < size:
                        try:
                            piece = r.read(min(PIECE, size - done))
                        except Urllib3Error as e:
                            raise RemoteError(f"{url}: {_reason(e)}",
                                              retry=not _timed_out(e)) from None
                        if not piece:
                            raise RemoteError(f"{url}: {done} bytes of the {size} asked for")
                        self.bytes += len(piece)
                        done += len(piece)
                        pieces.append(piece)
                    if r.read(1):
                        raise CorruptError(f"{url}: answer longer than the {end - start + 1} "
                                           "bytes asked for")
                    consumed = True
                finally:
                    _done(r, consumed)
            except RemoteError as e:
                if attempt == self.attempts or not e.retry:
                    raise
                log.info("%s (attempt %d of %d; retrying)", e, attempt, self.attempts)
                time.sleep(delay)
                delay *= 2
                attempt += 1
        return b"".join(pieces)

    def _check_range(self, r: urllib3.BaseHTTPResponse, url: str, start: int, end: int,
                     total: int) -> None:
        """The answer to `Range: bytes=start-end` is that range of that file, or an error."""
        if r.status == 200:
            raise CorruptError(f"{url}: the server ignores Range requests (answered the whole "
                               "file); narfs reads only what it needs, so it cannot mount it")
        if r.status == 416:
            raise CorruptError(f"{url}: shorter than its FileSize {total} (HTTP 416)")
        if r.status != 206:
            raise RemoteError(f"{url}: {self._status(r.status)}", retry=r.status >= 500)
        m = _CONTENT_RANGE.fullmatch(r.headers.get("Content-Range", "").strip())
        if m is None or (int(m[1]), int(m[2])) != (start, end) \
                or (m[3] != "*" and int(m[3]) != total):
            raise CorruptError(f"{url}: asked for bytes {start}-{end} of {total}, got "
                               f"{r.headers.get('Content-Range')!r}")
        length = r.headers.get("Content-Length")
        if length is not None and length != str(end - start + 1):
            raise CorruptError(f"{url}: answer of {length} bytes to a range of "
                               f"{end - start + 1}")

    def size(self, path: str) -> int:
        """A file's size, from the Content-Range of a one-byte range."""
        status, h, data = self._retrying(path, {"Range": "bytes=0-0"}, 1)
        m = _CONTENT_RANGE.fullmatch(h.get("Content-Range", "").strip())
        if status != 206 or m is None or m[3] == "*" or len(data) != 1:
            raise CorruptError(f"{self.url(path)}: no size given for a range (HTTP {status}); "
                               "narfs reads remote NARs by range only")
        return int(m[3])

    def close(self) -> None:
        self.pool.clear()


def _done(r: urllib3.BaseHTTPResponse, consumed: bool) -> None:
    """Give the connection back for reuse when its answer was read to the end (or is small
    enough to skip); close it otherwise, so no unread body is taken for the next answer."""
    length = r.headers.get("Content-Length", "")
    if not consumed and length.isdigit() and int(length) <= 65536:
        try:
            r.drain_conn()
            consumed = True
        except Urllib3Error:
            pass
    if not consumed:
        r.close()
    r.release_conn()


def _timed_out(e: BaseException | None) -> bool:
    while isinstance(e, BaseException):  # a `reason` may be a plain string
        if isinstance(e, urllib3.exceptions.TimeoutError | TimeoutError):
            return True
        e = getattr(e, "reason", None) or e.__context__
    return False


def _untrusted(e: BaseException | None) -> ssl.SSLCertVerificationError | None:
    """The certificate check that failed under urllib3's wrapping, if that is what failed."""
    while isinstance(e, BaseException):
        if isinstance(e, ssl.SSLCertVerificationError):
            return e
        e = getattr(e, "reason", None) or e.__context__
    return None


def _reason(e: Exception) -> str:
    """urllib3's errors name the pool and the retry machinery; the user needs the cause."""
    cert = _untrusted(e)
    if cert is not None:
        return (f"its TLS certificate is not trusted ({cert.verify_message}); add the CA that "
                "signed it to the system's CA store, or point SSL_CERT_FILE at a bundle "
                "holding it (Nix's fetches honour it too)")
    while isinstance(inner := getattr(e, "reason", None), Exception) and inner is not e:
        e = inner  # urllib3 wraps the cause (sometimes only as a string, where this stops)
    text = str(e)
    if "timed out" in text.lower():
        return "the server did not answer in time"
    if "refused" in text.lower():
        return "connection refused (is the server running?)"
    return text.split(": ", 1)[-1] if "object at 0x" in text else text
