#!/usr/bin/env python3
"""Benchmark `narfs mount http://…` (issue 15).

    python tests/bench/bench_remote.py [--out bench-out] [--quick] [--reps 5] [--rtt-ms 20]

Run as root on a machine with Nix, FUSE, nginx and iproute2. The corpus cache (common.py) is
served by nginx with the repository's server block (tests/nginxserver.py), on 127.0.0.1 and
again inside a network namespace reached through a veth pair whose both ends delay packets
with `tc netem` (half the RTT each way). On each link, alternating narfs with its anchor:

  * cold read of one small file deep in /usr/include's path, and of the issue's own case (a
    50 KB file deep in a 100 MB path): a fresh remote mount (empty client state, page cache
    dropped) against `nix store cat --store http://…` (target 0.05);
  * `ls -lR` and `grep -r` over that path, cold (fresh client state and mount): the remote
    mount against a local mount of the same cache;

and each row says how many requests the narfs side sent (nginx's access log). Where the kernel
has no sch_netem (this machine's has no modules), a TCP proxy that holds each chunk rtt/2 in
each direction stands in for the delayed link.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
from bench_mount import OPS, regular_files
from common import NIX, Context, Mount, alternate, drop_caches, run, runs_row, standalone, timed

from narfs.signing import load_secret_key
from nginxserver import Nginx, serving, tcp_server, world_readable

NS = f"narfs-bench-{os.getpid()}"
HOST_IP, NS_IP = "10.213.0.1", "10.213.0.2"


@contextlib.contextmanager
def netns(rtt_ms: int) -> Iterator[tuple[str, ...]]:
    """A network namespace behind a veth pair delaying rtt/2 each way; yields the command
    prefix that runs a program inside it."""
    host, peer = f"nb{os.getpid() % 100000}h", f"nb{os.getpid() % 100000}n"
    delay = f"{rtt_ms / 2}ms"
    cmds = [["ip", "netns", "add", NS],
            ["ip", "link", "add", host, "type", "veth", "peer", "name", peer],
            ["ip", "link", "set", peer, "netns", NS],
            ["ip", "addr", "add", f"{HOST_IP}/30", "dev", host],
            ["ip", "link", "set", host, "up"],
            ["ip", "netns", "exec", NS, "ip", "addr", "add", f"{NS_IP}/30", "dev", peer],
            ["ip", "netns", "exec", NS, "ip", "link", "set", peer, "up"],
            ["ip", "netns", "exec", NS, "ip", "link", "set", "lo", "up"],
            ["tc", "qdisc", "add", "dev", host, "root", "netem", "delay", delay],
            ["ip", "netns", "exec", NS, "tc", "qdisc", "add", "dev", peer, "root", "netem",
             "delay", delay]]
    try:
        for cmd in cmds:
            run(cmd)
        yield ("ip", "netns", "exec", NS)
    finally:
        subprocess.run(["ip", "link", "del", host], capture_output=True)
        subprocess.run(["ip", "netns", "del", NS], capture_output=True)


def netem_available() -> bool:
    """Whether the kernel has sch_netem (this machine's does not: no modules at all)."""
    probe = subprocess.run(["tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "0ms"],
                           capture_output=True, text=True)
    if probe.returncode == 0:  # it was added to the host's loopback: remove it at once
        subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], capture_output=True)
        return True
    return False


@contextlib.contextmanager
def delaying_proxy(upstream: int, rtt_ms: int) -> Iterator[str]:
    """Where the kernel lacks netem: a TCP proxy on 127.0.0.1 that delays every chunk by
    rtt/2 in each direction, so each request/answer exchange costs the RTT (bandwidth
    unlimited).
    Yields its base URL."""
    half = rtt_ms / 2000

    def pump(src: socket.socket, dst: socket.socket) -> None:
        """Forward each chunk `half` after it arrived: latency without a bandwidth limit
        (a sender thread keeps the chunks' order and their arrival times)."""
        chunks: queue.Queue[tuple[float, bytes]] = queue.Queue()

        def send() -> None:
            try:
                while True:
                    due, data = chunks.get()
                    if not data:
                        break
                    time.sleep(max(0.0, due - time.monotonic()))
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        try:
            while data := src.recv(1 << 16):
                chunks.put((time.monotonic() + half, data))
        except OSError:
            pass
        chunks.put((0.0, b""))
        sender.join()

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            up = socket.create_connection(("127.0.0.1", upstream))
            t = threading.Thread(target=pump, args=(up, self.request), daemon=True)
            t.start()
            pump(self.request, up)
            t.join()
            up.close()

    with tcp_server(Handler) as url:
        yield url


class Client:
    """Another machine's narfs: its config trusts the cache's key; `fresh()` empties what
    it has fetched, so the next mount is cold."""

    def __init__(self, ctx: Context, name: str) -> None:
        self.dir = ctx.work / name
        self.dir.mkdir(exist_ok=True)
        key = load_secret_key(str(ctx.key)).public.text()
        config = self.dir / "narfs.toml"
        config.write_text(f'public_key = "{key}"\nremote_poll = 3600\n')
        self.env = {**ctx.env, "NARFS_CONFIG": str(config),
                    "XDG_CACHE_HOME": str(self.dir / "xdg")}

    def fresh(self) -> None:
        shutil.rmtree(self.dir / "xdg", ignore_errors=True)


BIG_MIB = 100  # the issue's own case: a 50 KB file deep in a 100 MB path
DEEP = "a/b/c/d/e/f/g/h/fifty.bin"


def big_path(ctx: Context) -> str:
    """A 50 KB file deep in a 100 MB path, in the middle of its NAR (a quarter incompressible
    and a quarter compressible bytes before it and after it, as tests/test_remote.py's), added
    to the store and archived into the corpus cache."""
    src = ctx.work / "big-narfs-bench"
    (src / DEEP).parent.mkdir(parents=True)
    quarter = (BIG_MIB << 20) // 4
    (src / "a" / "0-before.bin").write_bytes(os.urandom(quarter) + b"x" * quarter)
    (src / DEEP).write_bytes(os.urandom(50_000))
    (src / "z-after.bin").write_bytes(os.urandom(quarter) + b"y" * quarter)
    path = ctx.corpus.add_tree(str(src), "big")
    shutil.rmtree(src)
    ctx.narfs("archive", "--cache", str(ctx.cache()), "--secret-key", str(ctx.key), path)
    print(f"corpus: {BIG_MIB} MB path with a 50 KB file deep inside → {path}", flush=True)
    return path


def link_rows(ctx: Context, server: Nginx, link: str, big: str,
              url: str | None = None) -> list[dict]:
    """The rows of one link; `url` reaches `server` another way (a delaying proxy)."""
    url = url or server.url
    cache, path = ctx.cache(), ctx.tree("include")
    name = os.path.basename(path)
    root = json.loads((cache / f"{name[:32]}.ls").read_bytes())["root"]
    files = [f for f in regular_files(root) if 0 < f[1] < 50_000]
    deep = max(files, key=lambda f: (f[0].count("/"), f[0]))[0]
    client = Client(ctx, f"client-{link.split()[0]}")
    counts: dict[str, tuple[int, int]] = {}

    def remote(op: str, argv: Callable[[Path], list[str]], top: str = name) -> float:
        client.fresh()
        with Mount(url, ctx.work / "mnt-remote", client.env) as m:  # type: ignore[arg-type]
            drop_caches()
            server.clear_log()
            seconds = timed(argv(m.path / top), ok=(0, 1))
            reqs = server.requests()
            counts[op] = (len(reqs), sum(r.bytes_sent for r in reqs))
            return seconds

    def local(argv: Callable[[Path], list[str]]) -> float:
        with Mount(cache, ctx.work / "mnt-local", ctx.env) as m:
            drop_caches()
            return timed(argv(m.path / name), ok=(0, 1))

    def nix_cat(store_path: str, rel: str) -> float:
        drop_caches()
        return timed([*NIX, "store", "cat", "--store", url, f"{store_path}/{rel}"])

    out = []
    for label, store_path, rel in (
            (f"one file deep in {ctx.tree_label('include')}'s path", path, deep),
            (f"a 50 KB file deep in a {BIG_MIB} MB path (the issue's case)", big, DEEP)):
        top = os.path.basename(store_path)
        times = alternate(ctx.reps, {
            "narfs": lambda top=top, rel=rel: remote(
                "read", lambda d, rel=rel: ["cat", str(d / rel)], top),
            "nix store cat": lambda store_path=store_path, rel=rel: nix_cat(store_path, rel)},
            f"cold read of {rel} ({link})")
        n, sent = counts["read"]
        out.append(runs_row(f"cold read of {label}, over HTTP ({link})", times, "narfs",
                            "nix store cat", target=0.05,
                            notes=f"{rel}; fresh client state and mount, page cache dropped; "
                                  f"narfs: {n} requests, {sent} bytes; nix store cat --store "
                                  "http://… fetches the whole NAR", requests=n,
                            bytes_sent=sent))
    for op, cmd in OPS.items():
        def argv(d: Path, cmd: list[str] = cmd) -> list[str]:
            return [*cmd, str(d)]

        times = alternate(ctx.reps, {"remote": lambda op=op, argv=argv: remote(op, argv),
                                     "local": lambda argv=argv: local(argv)}, f"{op} ({link})")
        n, sent = counts[op]
        out.append(runs_row(f"{op} over {ctx.tree_label('include')}, cold, over HTTP ({link})",
                            times, "remote", "local",
                            notes=f"remote mount (fresh client state) vs a local mount of the "
                                  f"same cache; {n} requests, {sent} bytes", requests=n,
                            bytes_sent=sent))
    return out


def rows(ctx: Context, quick: bool) -> list[dict]:
    del quick
    cache = ctx.cache()
    for d in (ctx.work, *ctx.work.parents):
        if d == Path("/"):
            break
        d.chmod(d.stat().st_mode | 0o005)
    big = big_path(ctx)
    world_readable(cache)
    out = []
    with serving(cache) as server:
        out += link_rows(ctx, server, "loopback", big)
    rtt = int(ctx.profile.extra.get("rtt_ms", 20))
    if netem_available():
        with netns(rtt) as prefix, serving(cache, address=NS_IP, prefix=prefix) as server:
            out += link_rows(ctx, server, f"{rtt} ms RTT, tc netem", big)
    else:
        print(f"no sch_netem in this kernel: {rtt} ms RTT through a delaying proxy", flush=True)
        with serving(cache) as server, delaying_proxy(server.port, rtt) as url:
            out += link_rows(ctx, server, f"{rtt} ms RTT, delaying proxy", big, url)
    return out


if __name__ == "__main__":
    t0 = time.perf_counter()
    code = standalone(__doc__ or "", rows, {"--rtt-ms": ("extra.rtt_ms", int,
                                                          "round-trip time added (default 20)")})
    print(f"{time.perf_counter() - t0:.0f} s")
    sys.exit(code)
