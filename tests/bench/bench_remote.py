#!/usr/bin/env python3
"""Benchmark `narfs mount http://…` (issue 15).

    python tests/bench/bench_remote.py [--out bench-out] [--quick] [--reps 5] [--rtt-ms 20]

Run as root on a machine with Nix, FUSE, nginx, iproute2 and ping (iputils-ping). The corpus
cache (common.py) is served by nginx with the repository's server block (tests/nginxserver.py),
on 127.0.0.1 and again inside a network namespace joined to this one by a link that delays
every packet by rtt/2 in each direction (delayedlink.py: `tc netem` on a veth pair where the
kernel has sch_netem; otherwise, as on this machine's kernel without modules, two TUN devices
and a forwarder process that holds each packet rtt/2; Ethernet MTU either way). Both ends are
the kernels' own TCP stacks, so handshakes, slow start, window growth and ACK clocking pay
the round trip as on a real link.

Before any row the link is proven and the run ends if it is faster than asked: ping's round
trip (its minimum must reach the RTT), a TCP connect and a small request through it, and the
time and rate of 100 MB on a new connection, next to the same on loopback (so throughput is
seen not to be what the 100 MB path's anchor waits for). On each link, alternating narfs with
its anchor:

  * cold read of one small file deep in /usr/include's path, and of the issue's own case (a
    50 KB file deep in a 100 MB path): a fresh remote mount (empty client state, page cache
    dropped) against `nix store cat --store http://…` (target 0.05);
  * `ls -lR` and `grep -r` over that path, cold (fresh client state and mount): the remote
    mount against a local mount of the same cache;

and each row says how many requests the narfs side sent (nginx's access log); the delayed
link's rows carry its measured figures in their notes.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
from bench_mount import OPS, regular_files
from common import NIX, Context, Mount, alternate, drop_caches, runs_row, standalone, timed
from delayedlink import Link, delayed_netns, ping_rtt

from narfs.signing import load_secret_key
from nginxserver import Nginx, serving, world_readable

PROBE_NAR = "nar/" + "0" * 52 + ".nar"  # a name the server block serves
PROBE_MB = 100


def fetch(host: str, port: int, path: str) -> tuple[float, float, float, int]:
    """GET http://host:port/path on a new connection: (connect, connect to first byte,
    connect to last byte) in seconds, and the bytes received (headers included)."""
    buf = bytearray(1 << 20)
    t0 = time.perf_counter()
    with socket.create_connection((host, port), timeout=30) as s:
        t1 = time.perf_counter()
        s.sendall(f"GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        got = n = s.recv_into(buf)
        t2 = time.perf_counter()
        status = bytes(buf[:n]).split(b"\r\n", 1)[0]
        while n:
            n = s.recv_into(buf)
            got += n
        t3 = time.perf_counter()
    if not status.startswith(b"HTTP/1.1 200 "):
        raise SystemExit(f"probe: {host}:{port}/{path} answered {status[:60]!r}")
    return t1 - t0, t2 - t1, t3 - t1, got


def probe_dir(ctx: Context) -> Path:
    """A directory nginx serves with the server block: a small /nix-cache-info and a
    PROBE_MB MB incompressible NAR-named file, to measure the links with."""
    d = ctx.work / "link-probe"
    (d / "nar").mkdir(parents=True, exist_ok=True)
    (d / "nix-cache-info").write_text("StoreDir: /nix/store\n")
    with open(d / PROBE_NAR, "wb") as f:
        for _ in range(PROBE_MB):
            f.write(os.urandom(1_000_000))
    world_readable(d)
    return d


def link_figures(server: Nginx, reps: int = 5) -> dict[str, float]:
    """Median TCP connect and small-request (connect to first byte of /nix-cache-info) ms,
    and the bulk rate of PROBE_MB MB on a new connection (MB/s, best of 3: the link's
    capacity, not the machine's load)."""
    small = [fetch(server.address, server.port, "nix-cache-info") for _ in range(reps)]
    bulk = [fetch(server.address, server.port, PROBE_NAR) for _ in range(3)]
    return {"connect_ms": statistics.median(t[0] for t in small) * 1000,
            "request_ms": statistics.median(t[1] for t in small) * 1000,
            "bulk_s": min(t[2] for t in bulk),
            "bulk_mb_s": max(t[3] / t[2] for t in bulk) / 1e6}


def prove_link(ctx: Context, link: Link) -> str:
    """Measure the delayed link against loopback and say so; refuse (end the run) when its
    round trip is shorter than asked. Returns the figures, for the latency rows' notes."""
    probe = probe_dir(ctx)
    with serving(probe) as server:
        lo = link_figures(server)
    rtt_min, rtt_avg = ping_rtt(link)
    with serving(probe, address=link.ns_ip, prefix=link.prefix) as server:
        far = link_figures(server)
    shutil.rmtree(probe)
    text = (f"{link.rtt_ms:g} ms RTT link ({link.kind}): ping {rtt_min:.2f} ms min, "
            f"{rtt_avg:.2f} avg; TCP connect {far['connect_ms']:.1f} ms, small request "
            f"{far['request_ms']:.1f} ms (loopback {lo['connect_ms']:.2f}, "
            f"{lo['request_ms']:.2f}); {PROBE_MB} MB on a new connection "
            f"{far['bulk_s'] * 1000:.0f} ms, {far['bulk_mb_s']:.0f} MB/s (loopback "
            f"{lo['bulk_s'] * 1000:.0f} ms, {lo['bulk_mb_s']:.0f} MB/s)")
    print(text, flush=True)
    if rtt_min < link.rtt_ms:
        raise SystemExit(f"the delayed link's round trip is {rtt_min:.2f} ms, below the "
                         f"{link.rtt_ms:g} ms asked: not running the latency rows")
    return text


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
              link_notes: str = "") -> list[dict]:
    """The rows of one link; `link_notes` (what the link measured) go into each row's notes."""
    url = server.url
    more = f"; {link_notes}" if link_notes else ""
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

    def local(argv: Callable[[Path], list[str]], top: str = name) -> float:
        with Mount(cache, ctx.work / "mnt-local", ctx.env) as m:
            drop_caches()
            return timed(argv(m.path / top), ok=(0, 1))

    def nix_cat(store_path: str, rel: str) -> float:
        drop_caches()
        return timed([*NIX, "store", "cat", "--store", url, f"{store_path}/{rel}"])

    out = []
    for label, store_path, rel in (
            (f"one file deep in {ctx.tree_label('include')}'s path", path, deep),
            (f"a 50 KB file deep in a {BIG_MIB} MB path (the issue's case)", big, DEEP)):
        top = os.path.basename(store_path)
        # The local mount of the server's own cache reads the same file with no network at
        # all: the floor under any remote mount, and so under what the target can ask of one.
        times = alternate(ctx.reps, {
            "narfs": lambda top=top, rel=rel: remote(
                "read", lambda d, rel=rel: ["cat", str(d / rel)], top),
            "local mount": lambda top=top, rel=rel: local(
                lambda d, rel=rel: ["cat", str(d / rel)], top),
            "nix store cat": lambda store_path=store_path, rel=rel: nix_cat(store_path, rel)},
            f"cold read of {rel} ({link})")
        n, sent = counts["read"]
        floor = statistics.median(times["local mount"]) / statistics.median(times["nix store cat"])
        out.append(runs_row(f"cold read of {label}, over HTTP ({link})", times, "narfs",
                            "nix store cat", target=0.05,
                            notes=f"{rel}; fresh client state and mount, page cache dropped; "
                                  f"narfs: {n} requests, {sent} bytes; nix store cat --store "
                                  f"http://… fetches the whole NAR; a local mount of the "
                                  f"server's cache (no network) reads it in "
                                  f"{statistics.median(times['local mount']) * 1000:.1f} ms, "
                                  f"{floor:.3f}× nix store cat{more}", requests=n,
                            bytes_sent=sent, local_floor=floor))
        out.append(runs_row(f"cold read of {label}: remote mount vs a local mount of the same "
                            f"cache ({link})", times, "narfs", "local mount",
                            notes=f"{rel}; the same runs as the row above"))
    for op, cmd in OPS.items():
        def argv(d: Path, cmd: list[str] = cmd) -> list[str]:
            return [*cmd, str(d)]

        times = alternate(ctx.reps, {"remote": lambda op=op, argv=argv: remote(op, argv),
                                     "local": lambda argv=argv: local(argv)}, f"{op} ({link})")
        n, sent = counts[op]
        out.append(runs_row(f"{op} over {ctx.tree_label('include')}, cold, over HTTP ({link})",
                            times, "remote", "local",
                            notes=f"remote mount (fresh client state) vs a local mount of the "
                                  f"same cache; {n} requests, {sent} bytes{more}", requests=n,
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
    rtt = float(ctx.profile.extra.get("rtt_ms", 20))
    with delayed_netns(rtt) as link:
        proof = prove_link(ctx, link)  # before the long rows: a bad link ends the run at once
        with serving(cache) as server:
            out += link_rows(ctx, server, "loopback", big)
        with serving(cache, address=link.ns_ip, prefix=link.prefix) as server:
            out += link_rows(ctx, server, f"{rtt:g} ms RTT", big, proof)
    print(f"link: {link.stats or link.kind}", flush=True)
    return out


if __name__ == "__main__":
    t0 = time.perf_counter()
    code = standalone(__doc__ or "", rows, {"--rtt-ms": ("extra.rtt_ms", float,
                                                          "round-trip time added (default 20)")})
    print(f"{time.perf_counter() - t0:.0f} s")
    sys.exit(code)
