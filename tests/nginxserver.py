"""A real nginx on 127.0.0.1 serving a cache dir with the repository's server block
(systemd/nginx-narfs.conf), for the tests that need a web server: started on a free port by the
test that asks for it, always stopped. Its access log records each request's line, status and
bytes sent, so a test can count what a client fetched."""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import signal
import socket
import socketserver
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SERVER_BLOCK = REPO / "systemd" / "nginx-narfs.conf"
LOG_FORMAT = "narfs_bytes"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def tcp_server(handler: type[socketserver.BaseRequestHandler]) -> Iterator[str]:
    """A threaded TCP server on 127.0.0.1 running `handler` per connection (the hostile
    proxies in front of nginx); yields its base URL, and is shut down after."""

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True

    server = Server(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def worker_user() -> str:
    for name in ("www-data", "nginx", "nobody"):
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            continue
        return f"{name} {grp.getgrgid(pw.pw_gid).gr_name}"
    return "root root"


def nginx_conf(base: Path, cache: Path, port: int, access_log: Path | None = None,
               server_extra: str = "", address: str = "127.0.0.1") -> Path:
    """nginx.conf for the example's server block on `address`:`port` serving `cache`;
    `server_extra` goes into the server block (e.g. `max_ranges 0;`)."""
    server = SERVER_BLOCK.read_text()
    server, n1 = re.subn(r"^(\s*)listen 5000;$", rf"\1listen {address}:{port};", server,
                         flags=re.M)
    server, n2 = re.subn(r"^\s*listen \[::\]:5000;\n", "", server, flags=re.M)
    server, n3 = re.subn(r"^(\s*)root /var/lib/narfs/cache;$",
                         rf"\1root {cache};\n\1{server_extra}", server, flags=re.M)
    assert (n1, n2, n3) == (1, 1, 1), "the example's listen/root lines changed shape"
    log = (f"log_format {LOG_FORMAT} '$request_method $uri $status $bytes_sent "
           f"$body_bytes_sent $http_range';\n    access_log {access_log} {LOG_FORMAT};"
           if access_log else "access_log off;")
    conf = base / "nginx.conf"
    conf.write_text(f"""
user {worker_user()};
worker_processes 1;
daemon off;
pid {base}/nginx.pid;
error_log {base}/error.log;
events {{ worker_connections 64; }}
http {{
    {log}
    client_body_temp_path {base}/client_body;
    proxy_temp_path {base}/proxy;
{server}
}}
""")
    return conf


@dataclass
class Request:
    method: str
    uri: str
    status: int
    bytes_sent: int  # headers and body
    body_bytes: int
    range: str  # the Range header asked for, "-" for none


class Nginx:
    """One nginx process serving `cache` (see `serving`)."""

    def __init__(self, binary: str, base: Path, cache: Path, server_extra: str,
                 address: str = "127.0.0.1", prefix: tuple[str, ...] = ()) -> None:
        self.binary = binary
        self.base = base
        self.cache = cache
        self.address = address
        self.prefix = prefix  # e.g. `ip netns exec NS`: nginx in another network namespace
        self.port = free_port()
        self.access_log = base / "access.log"
        self.conf = nginx_conf(base, cache, self.port, self.access_log, server_extra, address)
        self.url = f"http://{address}:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def _args(self) -> list[str]:
        return [*self.prefix, self.binary, "-c", str(self.conf), "-p", str(self.base), "-e",
                str(self.base / "error.log")]

    def start(self) -> None:
        test = subprocess.run([*self._args(), "-t"], capture_output=True, text=True)
        assert test.returncode == 0, test.stderr
        self.proc = subprocess.Popen(self._args(), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            assert self.proc.poll() is None, (self.base / "error.log").read_text()
            try:
                socket.create_connection((self.address, self.port), timeout=0.5).close()
                return
            except OSError:
                assert time.monotonic() < deadline, "nginx did not start listening"
                time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def pause(self) -> None:
        """Stop answering without closing the socket: a server that hangs."""
        assert self.proc is not None
        for pid in [*_children(self.proc.pid), self.proc.pid]:
            os.kill(pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        for pid in [self.proc.pid, *_children(self.proc.pid)]:
            os.kill(pid, signal.SIGCONT)

    def requests(self) -> list[Request]:
        """What the access log holds so far (nginx writes each line at the request's end)."""
        try:
            text = self.access_log.read_text()
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            method, uri, status, sent, body, asked = line.split(" ")
            out.append(Request(method, uri, int(status), int(sent), int(body), asked))
        return out

    def clear_log(self) -> None:
        """Forget the requests so far (nginx keeps appending to the same file)."""
        if self.access_log.exists():
            os.truncate(self.access_log, 0)


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def world_readable(cache: Path) -> None:
    """nginx's workers run as another user: give them the cache (as narfs's umask 022 does)."""
    for root, dirs, names in os.walk(cache):
        os.chmod(root, 0o755)
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o755)
        for f in names:
            p = os.path.join(root, f)
            if not os.path.islink(p):
                os.chmod(p, 0o644)


@contextmanager
def serving(cache: Path, server_extra: str = "", address: str = "127.0.0.1",
            prefix: tuple[str, ...] = ()) -> Iterator[Nginx]:
    """nginx serving `cache` until the block ends (skips the test when nginx is missing).
    The cache's parents must be reachable by nginx's worker user."""
    binary = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    if binary is None:
        pytest.skip("nginx not installed")
    base = Path(tempfile.mkdtemp(prefix="narfs-nginx-"))
    base.chmod(0o755)
    server = Nginx(binary, base, cache, server_extra, address, prefix)
    try:
        server.start()
        yield server
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.resume()
        server.stop()
        shutil.rmtree(base, ignore_errors=True)
