"""A hostile web server for remote-mount tests: it forwards each request to a real nginx
(tests/nginxserver.py) and lies in its answers to NAR range requests in one chosen way. What
nginx alone cannot be made to do (it never lies about lengths) is done here, on real sockets."""

from __future__ import annotations

import socket
import socketserver
from collections.abc import Iterator
from contextlib import contextmanager

from nginxserver import tcp_server

MODES = ("truncated", "long-content-length", "short-content-length", "other-range")


def _read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data, b""
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def _forward(upstream: int, request: bytes) -> tuple[bytes, bytes]:
    """The whole answer of nginx to one request (sent with Connection: close)."""
    with socket.create_connection(("127.0.0.1", upstream), timeout=10) as up:
        up.sendall(request)
        head, body = _read_head(up)
        while True:
            chunk = up.recv(1 << 20)
            if not chunk:
                break
            body += chunk
    return head, body


def _lie(mode: str, head: bytes, body: bytes) -> tuple[bytes, bytes]:
    lines = head.split(b"\r\n")
    if not lines[0].startswith(b"HTTP/1.1 206"):
        return head, body
    out = []
    for line in lines:
        name, _, value = line.partition(b": ")
        if name.lower() == b"content-length" and mode == "long-content-length":
            line = b"Content-Length: " + str(len(body) + 100).encode()
        elif name.lower() == b"content-length" and mode == "short-content-length":
            line = b"Content-Length: " + str(len(body) // 2).encode()
        elif name.lower() == b"content-range" and mode == "other-range":
            first, _, rest = value.partition(b"-")
            start = int(first.split(b" ")[1])
            line = b"Content-Range: bytes " + str(start + 1).encode() + b"-" + rest
        out.append(line)
    if mode == "truncated":
        body = body[:len(body) // 2]
    return b"\r\n".join(out), body


@contextmanager
def lying(upstream_port: int, mode: str, times: int | None = None,
          seen: list[str] | None = None) -> Iterator[str]:
    """A server on 127.0.0.1 that answers as nginx on `upstream_port` does, but lies in
    every 206 answer (the first `times` only, when given) as `mode` says; yields its base URL.
    One request per connection. `seen` gets each request's Range header ("" for none)."""
    assert mode in MODES
    lies = [times]

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            sock: socket.socket = self.request
            sock.settimeout(10)
            head, rest = _read_head(sock)
            if not head:
                return
            lines = [ln for ln in head.split(b"\r\n")
                     if not ln.lower().startswith(b"connection:")]
            request = b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n" + rest
            if seen is not None:
                seen.append(next((ln.split(b":", 1)[1].strip().decode() for ln in lines
                                  if ln.lower().startswith(b"range:")), ""))
            rhead, body = _forward(upstream_port, request)
            if lies[0] is None or (lies[0] > 0 and rhead.startswith(b"HTTP/1.1 206")):
                if lies[0] is not None:
                    lies[0] -= 1
                rhead, body = _lie(mode, rhead, body)
            rhead = b"\r\n".join(ln for ln in rhead.split(b"\r\n")
                                 if not ln.lower().startswith(b"connection:"))
            try:
                sock.sendall(rhead + b"\r\nConnection: close\r\n\r\n" + body)
            except OSError:
                pass

    with tcp_server(Handler) as url:
        yield url
