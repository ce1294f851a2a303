"""Issue 3: the mount's lifecycle (daemon, foreground, readiness, three ways to unmount) and
its life while mounted (paths appearing and retiring, a rebuilt catalog, parallel readers)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest
from mounting import is_mounted, mount_line, mounted, unmount, wait_for

from conftest import Narfs
from narfs.cache import Cache
from nixtools import NixStore

pytestmark = pytest.mark.usefixtures("fuse_mode")  # conftest: fast and stock


def daemon_pids(mountpoint: Path) -> list[int]:
    return [p.pid for p in psutil.process_iter(["cmdline"])
            if p.info["cmdline"] and "mount" in p.info["cmdline"]
            and str(mountpoint) in p.info["cmdline"] and p.pid != os.getpid()]


def test_daemon_returns_once_live_and_narfs_umount_ends_it(narfs: Narfs, nixstore: NixStore,
                                                           tmp_path: Path, fuse_mode: str
                                                           ) -> None:
    p = nixstore.text("daemonised\n", "narfs-daemon")
    narfs("archive", p)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        narfs("mount", "--fuse-mode", fuse_mode, str(mnt))
        # No waiting: the command returned, so the mount answers now.
        assert os.stat(mnt).st_ino == 1
        assert (mnt / os.path.basename(p) / "content").read_text() == "daemonised\n"
        status = narfs("status").stdout
        assert f"mounted at:   {mnt} ({fuse_mode} mode)" in status, status
        pids = daemon_pids(mnt)
        assert len(pids) == 1, pids
        again = narfs("mount", str(mnt), check=False)
        assert again.returncode == 1 and "already" in again.stderr
        narfs("umount", str(mnt))
        assert not is_mounted(mnt)
        wait_for(lambda: not psutil.pid_exists(pids[0]) or
                 psutil.Process(pids[0]).status() == psutil.STATUS_ZOMBIE, 10,
                 "the daemon to end")
        log = (narfs.cache / ".narfs" / "mount.log").read_text()
        assert "mounted" in log and f"{fuse_mode} mode: " in log
        assert not list((narfs.cache / ".narfs").glob("mount-*.json"))  # removed at unmount
        gone = narfs("umount", str(mnt), check=False)
        assert gone.returncode == 1 and "not a narfs mount" in gone.stderr
    finally:
        unmount(mnt)
        for pid in daemon_pids(mnt):
            os.kill(pid, signal.SIGKILL)


def test_fusermount_ends_the_foreground_process(narfs: Narfs, tmp_path: Path) -> None:
    with mounted(narfs, tmp_path / "mnt") as m:
        subprocess.run(["fusermount3", "-u", str(m.path)], check=True)
        assert m.proc.wait(timeout=10) == 0
        assert "unmounted" in m.log()


def test_sigterm_unmounts_and_ends_the_process(narfs: Narfs, tmp_path: Path) -> None:
    with mounted(narfs, tmp_path / "mnt") as m:
        m.proc.send_signal(signal.SIGTERM)
        assert m.proc.wait(timeout=10) == 0
        assert not is_mounted(m.path)


def test_ready_is_sent_to_notify_socket_once_live(narfs: Narfs, tmp_path: Path) -> None:
    addr = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(addr))
    sock.settimeout(30)
    try:
        with mounted(narfs, tmp_path / "mnt", extra_env={"NOTIFY_SOCKET": str(addr)},
                     wait=False) as m:
            message = sock.recv(4096).decode()
            assert "READY=1" in message.split("\n")
            assert is_mounted(m.path) and os.stat(m.path).st_ino == 1
            m.proc.send_signal(signal.SIGTERM)
            assert "STOPPING=1" in sock.recv(4096).decode()
            assert m.proc.wait(timeout=10) == 0
    finally:
        sock.close()


def test_mount_options(narfs: Narfs, tmp_path: Path) -> None:
    with mounted(narfs, tmp_path / "mnt") as m:
        assert "allow_other" not in mount_line(m.path)[3]
    with mounted(narfs, tmp_path / "mnt", "-o", "allow_other") as m:
        assert "allow_other" in mount_line(m.path)[3]
    bad = narfs("mount", "-o", "rw", str(tmp_path / "mnt"), check=False)
    assert bad.returncode == 1 and "unknown mount option 'rw'" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_paths_appear_and_retire_while_mounted(narfs: Narfs, nixstore: NixStore,
                                               tmp_path: Path) -> None:
    first = nixstore.text("first\n", "narfs-live")
    narfs("archive", first)
    second = nixstore.text("second\n", "narfs-live")
    with mounted(narfs, tmp_path / "mnt") as m:
        assert len(os.listdir(m / ".by-name" / "narfs-live")) == 2  # a version, latest
        latest = m / ".by-name" / "narfs-live" / "latest"
        assert os.readlink(latest) == f"../../{os.path.basename(first)}"  # cached (fast mode)
        name = os.path.basename(second)
        assert not (m / name).exists()
        narfs("archive", second)
        start = time.monotonic()
        wait_for(lambda: name in os.listdir(m.path), 10, "the new path in the mount")
        appeared = time.monotonic() - start
        assert (m / name / "content").read_text() == "second\n"
        assert os.readlink(m / ".by-name" / "narfs-live" / "latest") == f"../../{name}"
        assert len(os.listdir(m / ".by-name" / "narfs-live")) == 3
        # Retire the first path the way gc does; the kernel had it cached (stat above).
        old = os.path.basename(first)
        assert (m / old / "content").read_text() == "first\n"
        Cache(str(narfs.cache)).unpublish(old[:32])
        wait_for(lambda: not (m / old).exists(), 5, "the retired path to disappear")
        assert old not in os.listdir(m.path)
        assert len(os.listdir(m / ".by-name" / "narfs-live")) == 2
        assert m.alive()
    print(f"new path visible after {appeared:.2f} s")


def test_damaged_catalog_is_rebuilt(narfs: Narfs, nixstore: NixStore, tmp_path: Path) -> None:
    p = nixstore.text("catalog\n", "narfs-catalog")
    narfs("archive", p)
    with mounted(narfs, tmp_path / "mnt") as m:
        assert os.path.basename(p) in os.listdir(m.path)
    catalog = narfs.cache / ".narfs" / "catalog.sqlite"
    catalog.write_bytes(b"this is not sqlite" * 1000)
    with mounted(narfs, tmp_path / "mnt") as m:
        assert (m / os.path.basename(p) / "content").read_text() == "catalog\n"
        assert "rebuilding" in m.log()


def test_eight_greps_while_archiving(narfs: Narfs, nixstore: NixStore, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(200):
        (src / f"f{i:03}").write_text(("filler line\n" * 50) + f"needle {i}\n")
    before = [nixstore.tree(src, f"narfs-grep-{i}") for i in range(3)]
    narfs("archive", *before)
    later = [nixstore.text(f"needle later {i}\n", f"narfs-later-{i}") for i in range(3)]
    with mounted(narfs, tmp_path / "mnt") as m:
        archiving = threading.Thread(target=lambda: [narfs("archive", p) for p in later])
        archiving.start()
        greps = [subprocess.Popen(["grep", "-r", "-c", "needle", str(m.path)],
                                  stdout=subprocess.PIPE, text=True) for _ in range(8)]
        outputs = [g.communicate(timeout=120)[0] for g in greps]
        archiving.join()
        for g, out in zip(greps, outputs, strict=True):
            assert g.returncode == 0
            counts = dict(line.rsplit(":", 1) for line in out.splitlines())
            for p in before:
                for i in (0, 99, 199):
                    assert counts[f"{m.path}/{os.path.basename(p)}/f{i:03}"] == "1"
            assert all(c in ("0", "1") for c in counts.values())
        wait_for(lambda: all(os.path.basename(p) in os.listdir(m.path) for p in later), 5,
                 "the later paths")
        assert m.alive()
        rss = psutil.Process(m.proc.pid).memory_info().rss
        assert rss < 200 << 20, rss


@pytest.mark.parametrize("how", ["fusermount", "umount", "sigterm"])
def test_access_times_are_flushed_on_every_unmount(narfs: Narfs, nixstore: NixStore,
                                                   tmp_path: Path, how: str) -> None:
    from narfs.catalog import Catalog

    p = nixstore.text("touched\n", "narfs-touch")
    narfs("archive", p)
    with mounted(narfs, tmp_path / "mnt") as m:
        (m / os.path.basename(p) / "content").read_text()
        if how == "fusermount":
            subprocess.run(["fusermount3", "-u", str(m.path)], check=True)
        elif how == "umount":
            narfs("umount", str(m.path))
        else:
            m.proc.send_signal(signal.SIGTERM)
        assert m.proc.wait(timeout=10) == 0
    with Catalog(Cache(str(narfs.cache))) as catalog:
        assert catalog.access.get(os.path.basename(p)[:32], 0) > 0


def test_sigterm_right_after_mounting_ends_the_process(narfs: Narfs, tmp_path: Path) -> None:
    """A SIGTERM that ends the loop before the mount's own readiness stat is answered: that
    stat's thread must not keep the process (and the unmount) waiting forever."""
    for _ in range(5):
        with mounted(narfs, tmp_path / "mnt", wait=False) as m:
            deadline = time.monotonic() + 30
            while not is_mounted(m.path):
                assert m.proc.poll() is None and time.monotonic() < deadline, m.log()
                time.sleep(0.001)
            m.proc.send_signal(signal.SIGTERM)
            assert m.proc.wait(timeout=10) == 0, m.log()
            assert not is_mounted(m.path)


def test_gc_retires_paths_from_every_live_mount(narfs: Narfs, nixstore: NixStore,
                                                tmp_path: Path) -> None:
    """Issue 11: gc syncs the catalog itself right after un-publishing, so the mounts' own
    syncs find the rows already gone; each mount must still drop the paths, and two mounts
    deleting the same rows must not crash a refresh (KeyError)."""
    paths = [nixstore.text(f"retired {i}\n", f"narfs-gc-live-{i}") for i in range(6)]
    narfs("archive", *paths)
    with mounted(narfs, tmp_path / "a") as a, mounted(narfs, tmp_path / "b") as b:
        for i, p in enumerate(paths[:3]):
            name = os.path.basename(p)
            assert (a / name).exists() and (b / name).exists()  # the kernels know it
            t = time.time() - (60 + i) * 86400  # oldest of all: gc takes it, and only it
            os.utime(narfs.cache / f"{name[:32]}.narinfo", (t, t))
            out = narfs("gc", "--older-than", "50d").stdout
            assert f"retired {p} " in out and "retired 1 path " in out, out
            for m in (a, b):
                wait_for(lambda m=m, name=name: name not in os.listdir(m.path), 5,
                         f"{name} to leave {m.path}")
                assert not (m / name).exists()
        for m in (a, b):
            assert m.alive()
            assert "Traceback" not in m.log() and "failed" not in m.log(), m.log()
            shown = sorted(n for n in os.listdir(m.path) if not n.startswith("."))
            assert shown == sorted(os.path.basename(p) for p in paths[3:])
