"""A network namespace joined to this one by a link that delays every packet by rtt/2 in each
direction, so the TCP stacks at both ends see a real round-trip time (slow start, window
growth and ACK clocking included), for the remote-mount benchmark (bench_remote.py).

Where the kernel has sch_netem, the link is a veth pair with `tc netem delay` on both ends.
Elsewhere (this machine's kernel has no modules and no netem) it is two TUN devices, one here
and one moved into the namespace, and a forwarder process (this file run as a program) that
reads each IP packet from one and writes it to the other rtt/2 after it arrived: packets keep
their order, the forwarder drops none (a full queue stops its reading, and what the kernel
then drops from the devices' queues is reported), and bandwidth is not limited beyond what
copying costs (segmentation offload keeps the packet count, and so the work per byte, low:
see MTU).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import queue
import re
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

HOST_IP, NS_IP = "10.213.0.1", "10.213.0.2"
NS_PREFIX = "narfs-bench-"  # + the bench's pid
# An Ethernet MTU, so TCP's segments, initial window and slow start are the Internet's. The
# devices offload segmentation (virtio-net headers, as a VM's NIC): a sender hands over up to
# 64 KB in one packet of 1448-byte segments, which the receiving kernel takes whole as a NIC's
# GRO would give it, so the forwarder moves few packets. (Without offload, 1500-byte packets
# cap the forwarder near 115 MB/s; and a 65000 MTU instead makes segments so large that a new
# connection's receive window is 2 segments wide, and some of Nix's downloads stalled at
# ~2 MB/s.)
MTU = 1500
BUFFER = 65536 + 4096  # the largest offloaded packet and its virtio-net header
QUEUE_PACKETS = 4096  # per direction (≤ 270 MB), far above 10 ms of any rate seen here

TUNSETIFF, TUNSETOFFLOAD = 0x400454CA, 0x400454D0
IFF_TUN, IFF_NO_PI, IFF_VNET_HDR = 0x0001, 0x1000, 0x4000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6 = 0x01, 0x02, 0x04
PR_SET_PDEATHSIG = 1


@dataclass
class Link:
    """A delayed link to a network namespace: `prefix` runs a command inside it, where
    `ns_ip` is reachable from here (and `host_ip` from there)."""
    kind: str  # "tc netem" or "TUN forwarder"
    rtt_ms: float
    prefix: tuple[str, ...]
    host_ip: str = HOST_IP
    ns_ip: str = NS_IP
    stats: str = ""  # after the block: what the forwarder moved and dropped


def netem_available() -> bool:
    """Whether the kernel has sch_netem (this machine's does not: no modules at all)."""
    probe = subprocess.run(["tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "0ms"],
                           capture_output=True, text=True)
    if probe.returncode == 0:  # it was added to the host's loopback: remove it at once
        subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], capture_output=True)
        return True
    return False


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")


@contextlib.contextmanager
def delayed_netns(rtt_ms: float) -> Iterator[Link]:
    """A fresh network namespace behind a link delaying rtt/2 each way (netem where the kernel
    has it, else the TUN forwarder); removed, with its devices, when the block ends."""
    _remove_stale()
    ns = f"{NS_PREFIX}{os.getpid()}"
    tag = f"nb{os.getpid() % 100000}"
    host, peer = f"{tag}h", f"{tag}n"
    _run(["ip", "netns", "add", ns])
    try:
        if netem_available():
            with _netem(ns, host, peer, rtt_ms) as link:
                yield link
        else:
            with _tun_pair(ns, host, peer, rtt_ms) as link:
                yield link
    finally:
        subprocess.run(["ip", "link", "del", host], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _remove_stale() -> None:
    """The namespaces of benches that were killed outright (their process is gone): with
    netem their veth pair, whose host end has this link's address, stays with them."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for name in re.findall(rf"^{NS_PREFIX}(\d+)\b", out, flags=re.M):
        if not os.path.exists(f"/proc/{name}"):
            subprocess.run(["ip", "netns", "del", f"{NS_PREFIX}{name}"], capture_output=True)


def _addresses(ns: str, host: str, peer: str) -> list[list[str]]:
    """Point-to-point addresses on both ends, the MTU, a long queue, links up."""
    inside = ["ip", "netns", "exec", ns]
    return [["ip", "addr", "add", HOST_IP, "peer", NS_IP, "dev", host],
            ["ip", "link", "set", host, "mtu", str(MTU), "txqueuelen", "10000", "up"],
            [*inside, "ip", "addr", "add", NS_IP, "peer", HOST_IP, "dev", peer],
            [*inside, "ip", "link", "set", peer, "mtu", str(MTU), "txqueuelen", "10000", "up"],
            [*inside, "ip", "link", "set", "lo", "up"]]


@contextlib.contextmanager
def _netem(ns: str, host: str, peer: str, rtt_ms: float) -> Iterator[Link]:
    inside = ("ip", "netns", "exec", ns)
    delay = f"{rtt_ms / 2}ms"
    _run(["ip", "link", "add", host, "type", "veth", "peer", "name", peer])
    _run(["ip", "link", "set", peer, "netns", ns])
    for cmd in _addresses(ns, host, peer):
        _run(cmd)
    _run(["tc", "qdisc", "add", "dev", host, "root", "netem", "delay", delay, "limit", "100000"])
    _run([*inside, "tc", "qdisc", "add", "dev", peer, "root", "netem", "delay", delay,
          "limit", "100000"])
    yield Link("tc netem", rtt_ms, inside)


def _open_tun(name: str) -> int:
    """A new TUN device `name` whose packets are IP packets behind a virtio-net header, with
    checksum and TCP segmentation offloaded (the header says how to finish them, and the other
    device takes it as is); it lives while its fd is open."""
    fd = os.open("/dev/net/tun", os.O_RDWR)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(),
                                               IFF_TUN | IFF_NO_PI | IFF_VNET_HDR))
        fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
    except OSError:
        os.close(fd)
        raise
    return fd


def _dropped(prefix: list[str], dev: str) -> int:
    """Packets the kernel dropped on `dev` (a full TUN queue: the forwarder fell behind)."""
    out = subprocess.run([*prefix, "ip", "-s", "-j", "link", "show", "dev", dev],
                         capture_output=True, text=True)
    if out.returncode != 0:
        return -1
    s = json.loads(out.stdout)[0]["stats64"]
    return int(s["tx"]["dropped"]) + int(s["rx"]["dropped"])


@contextlib.contextmanager
def _tun_pair(ns: str, host: str, peer: str, rtt_ms: float) -> Iterator[Link]:
    inside = ["ip", "netns", "exec", ns]
    fds = [_open_tun(host), _open_tun(peer)]
    try:
        _run(["ip", "link", "set", peer, "netns", ns])  # its fd stays attached to it
        for cmd in _addresses(ns, host, peer):
            _run(cmd)
        forwarder = subprocess.Popen(
            [sys.executable, __file__, str(rtt_ms / 2000), str(fds[0]), str(fds[1]),
             str(os.getpid())],
            pass_fds=fds, stdout=subprocess.PIPE, text=True)
        ready = forwarder.stdout.readline() if forwarder.stdout else ""
        if ready != "ready\n":
            forwarder.kill()
            raise SystemExit(f"the TUN forwarder did not start: {ready!r}")
    finally:
        for fd in fds:  # the forwarder holds them now: the devices go when it exits
            os.close(fd)
    link = Link("TUN forwarder", rtt_ms, tuple(inside))
    try:
        yield link
    finally:
        dropped = _dropped([], host) + _dropped(inside, peer)
        forwarder.send_signal(signal.SIGTERM)
        try:
            out, _ = forwarder.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            forwarder.kill()
            out, _ = forwarder.communicate()
        link.stats = f"{out.strip()}; dropped by the kernel on the TUN devices: {dropped}"


def ping_rtt(link: Link, count: int = 10) -> tuple[float, float]:
    """(min, avg) round-trip ms of `count` pings from here to the namespace."""
    out = subprocess.run(["ping", "-n", "-q", "-c", str(count), "-i", "0.05", link.ns_ip],
                         capture_output=True, text=True)
    m = re.search(r"= ([\d.]+)/([\d.]+)/", out.stdout)
    if out.returncode != 0 or not m:
        raise SystemExit(f"ping {link.ns_ip} failed ({out.returncode}): "
                         f"{(out.stdout + out.stderr).strip()[-300:]}")
    return float(m[1]), float(m[2])


# --- the forwarder (this file run as a program) -------------------------------------------

def forward(half: float, src: int, dst: int, counts: list[int]) -> None:
    """Move packets from `src` to `dst`, each written `half` seconds after it was read: a
    reader stamps and queues, a writer sleeps until the oldest is due (the delay is the same
    for all, so the queue's head is always the next one due and order is kept)."""
    q: queue.Queue[tuple[float, bytes]] = queue.Queue(QUEUE_PACKETS)

    def write() -> None:
        while True:
            due, packet = q.get()
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            os.write(dst, packet)
            counts[0] += 1
            counts[1] += len(packet)

    threading.Thread(target=write, daemon=True).start()
    while True:
        packet = os.read(src, BUFFER)
        q.put((time.monotonic() + half, packet))  # blocks when full: the kernel queues


def main() -> None:
    half, a, b, parent = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    # A bench killed outright must not leave its devices held: go with it (SIGTERM, below).
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        return
    sys.setswitchinterval(0.0002)  # a writer due now must not wait out another thread's slice
    counts = {"out": [0, 0], "back": [0, 0]}
    for (src, dst), c in (((a, b), counts["out"]), ((b, a), counts["back"])):
        threading.Thread(target=forward, args=(half, src, dst, c), daemon=True).start()
    print("ready", flush=True)
    signal.sigwait({signal.SIGTERM})
    o, k = counts["out"], counts["back"]
    with contextlib.suppress(BrokenPipeError):  # the bench died: no one to tell
        print(f"forwarded {o[0]} packets ({o[1] / 1e6:.1f} MB) to the namespace and {k[0]} "
              f"({k[1] / 1e6:.1f} MB) back", flush=True)


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads inherit: sigwait gets it
    main()
