"""The files in systemd/ under a real systemd: a Debian container booted with systemd-nspawn.

`.ci/nspawn build` makes the container once (/var/lib/narfs-ci/nspawn-bookworm: Debian's
systemd, nix-bin, fuse3 and nginx, narfs installed editable from /src). Each run boots an
overlay of it with the checkout bound at /src, so the tree stays pristine and a run starts
from scratch; the overlay is deleted afterwards. Inside, the README's Debian setup is done by
hand: `narfs init`, the nix.conf lines it prints, the units from systemd/, nginx-narfs.conf
beside Debian's default site. Then a build is archived by narfs-watch.service, the mount unit
mounts and stops cleanly, narfs-gc runs, `nix copy --from http://...` substitutes through
nginx, the NixOS module's narfs-init (the one unit without a file here) does its job, a
narfs-mount-remote@ instance mounts that nginx's cache over HTTP, and all of it is back after
the container reboots.

Facts found while writing these (host: Debian 12, its PID 1 not systemd, cgroup v1 hybrid):
- `systemd-nspawn -b --register=no --keep-unit` boots a container without a host systemd;
  when the container reboots, nspawn exits (status 133) and is started again on the same tree.
- `nsenter -t <the container's PID 1> -m -u -i -n -p -C -r -w` runs commands inside; the
  container has its own network namespace (--private-network), so its nginx ports never clash
  with the host's.
- IPAddressDeny= is not enforced in this container (systemd logs that "the local system does
  not support BPF/cgroup firewalling", with the hybrid hierarchy and with a unified one alike),
  so which units may use IP is read as systemd reads it (systemctl show, systemd-analyze
  security), and a unit that needs IP shows it by reaching nginx.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from nixeval import evaluate

REPO = Path(__file__).resolve().parent.parent
BASE = Path(os.environ.get("NARFS_CI_CHROOTS", "/var/lib/narfs-ci"))
SUITE = os.environ.get("NARFS_NSPAWN_SUITE", "bookworm")
# the port systemd/nginx-narfs.conf listens on
PORT = int(re.search(r"^\s*listen (\d+);$", (REPO / "systemd" / "nginx-narfs.conf").read_text(),
                     re.M).group(1))
UNITS = ("narfs-watch.service", "narfs-mount.service", "narfs-gc.service", "narfs-gc.timer")
CACHE = "/var/lib/narfs/cache"
ROOTS = "/nix/var/nix/gcroots/narfs"
MOUNTPOINT = "/mnt/nar-archive"
# The remote mount's mountpoint: its '-' is escaped in the instance name (\x2d), as systemd does.
REMOTE_MOUNTPOINT = "/mnt/remote-archive"
# remote_poll in narfs.toml here (30 s by default): how often the client reads the server's index
REMOTE_POLL = 2
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

pytestmark = [
    pytest.mark.machine,
    # The first run builds the container (about 4 minutes here); later runs reuse it.
    pytest.mark.timeout(1500),
    pytest.mark.skipif(os.geteuid() != 0, reason="booting a container needs root"),
]


class Container:
    """One boot at a time of an overlay over the built tree; `sh` runs bash inside."""

    def __init__(self, tree: Path, run_dir: Path) -> None:
        self.tree = tree
        self.run_dir = run_dir
        self.root = run_dir / "merged"
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid1 = 0
        self.boots = 0

    def mount(self) -> None:
        for d in ("upper", "work", "merged"):
            (self.run_dir / d).mkdir(parents=True)
        subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={self.tree},upperdir={self.run_dir / 'upper'},"
             f"workdir={self.run_dir / 'work'}", str(self.root)],
            check=True, capture_output=True, text=True)

    def boot(self, timeout: float = 120) -> None:
        self.boots += 1
        log = open(self.run_dir / f"console-{self.boots}.log", "wb")
        self.proc = subprocess.Popen(
            ["systemd-nspawn", "-q", "-D", str(self.root), "-b", "--register=no",
             "--keep-unit", "--console=pipe", "--private-network", "--bind=/dev/fuse",
             f"--bind-ro={REPO}:/src", "--hostname=narfs-ci"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        self.pid1 = 0
        while not self.pid1:
            self._check_alive()
            assert time.monotonic() < deadline, "no systemd came up in the container"
            self.pid1 = self._find_pid1()
            if not self.pid1:
                time.sleep(0.1)
        # Up when systemd says so: "running", or "degraded" with some unit failed (Debian's
        # own units may not all fit a container; ours are checked one by one).
        while True:
            self._check_alive()
            state = self.sh("systemctl is-system-running --wait", check=False,
                            timeout=max(1.0, deadline - time.monotonic())).stdout.strip()
            if state in ("running", "degraded"):
                return
            assert time.monotonic() < deadline, f"container did not boot: {state}"
            time.sleep(0.2)

    def _check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"systemd-nspawn exited ({self.proc.returncode}):\n"
                                 + self.console())

    def console(self) -> str:
        return (self.run_dir / f"console-{self.boots}.log").read_text(errors="replace")[-4000:]

    def _find_pid1(self) -> int:
        """The container's init: a descendant of nspawn that is PID 1 in its own namespace."""
        assert self.proc is not None
        parents: dict[int, int] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                except OSError:
                    continue
                parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
        family = {self.proc.pid}
        for _ in range(4):
            family |= {p for p, pp in parents.items() if pp in family}
        for pid in family - {self.proc.pid}:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            nspid = re.search(r"^NSpid:\s+(.*)$", status, re.M)
            if nspid and nspid.group(1).split()[-1] == "1" and len(nspid.group(1).split()) > 1:
                return pid
        return 0

    def sh(self, script: str, check: bool = True, timeout: float = 120
           ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            ["nsenter", "-t", str(self.pid1), "-m", "-u", "-i", "-n", "-p", "-C", "-r", "-w",
             "/usr/bin/env", "-i", f"PATH={PATH}", "HOME=/root", "LANG=C.UTF-8",
             "/bin/bash", "-euo", "pipefail", "-c", script],
            capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"in the container, {script!r} failed ({proc.returncode}):\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc

    def wait_for(self, condition: str, what: str, timeout: float = 60) -> None:
        """Polls a shell condition inside, with a deadline; on timeout says what it waited for."""
        proc = self.sh(f"end=$((SECONDS + {timeout}))\n"
                       f"until {condition}; do\n"
                       f"    [ $SECONDS -lt $end ] || exit 124\n"
                       f"    sleep 0.1\n"
                       f"done", check=False, timeout=timeout + 30)
        assert proc.returncode == 0, f"timed out waiting for {what}\n{self.diagnose()}"

    def diagnose(self) -> str:
        """What a failure message needs: our units' state and their journal."""
        units = ("narfs-watch", "narfs-mount", "narfs-gc", "'narfs-mount-remote@*'",
                 "'narfs-remote-*'", "nginx")
        return self.sh(f"systemctl status --no-pager -l {' '.join(units)} 2>&1 | cut -c1-300; "
                       "journalctl -q --no-pager -n 60 " + " ".join(f"-u {u}" for u in units),
                       check=False).stdout

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.sh(f"systemctl show {shlex.quote(unit)} -p {','.join(props)}").stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def shutdown(self, verb: str, timeout: float = 90) -> int:
        """`systemctl reboot|poweroff` inside; nspawn exits once the container is down."""
        assert self.proc is not None
        self.sh(f"systemctl {verb}", check=False, timeout=30)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the container did not {verb} in {timeout} s:\n"
                                 + self.console()) from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def remove(self) -> None:
        self.kill()
        if os.path.ismount(self.root):
            subprocess.run(["umount", "--lazy", str(self.root)], check=False)
        shutil.rmtree(self.run_dir, ignore_errors=True)


SETUP = f"""
# What an installed Debian has and debootstrap leaves out: localhost has a name.
[ -e /etc/hosts ] || printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n' >/etc/hosts
# The checkout's hook (pip copied the one of the day the container was built).
install -m 0755 /src/systemd/narfs-hook /opt/narfs/bin/narfs-hook
narfs init >/root/init.out
# The nix.conf lines narfs init printed, as the README says.
sed -n '/^# Add to \\/etc\\/nix\\/nix.conf/,/^$/p' /root/init.out | grep -v '^#' >>/etc/nix/nix.conf
cp {" ".join(f"/src/systemd/{u}" for u in UNITS)} /etc/systemd/system/
cp /src/systemd/nginx-narfs.conf /etc/nginx/conf.d/narfs.conf
systemctl daemon-reload
systemctl enable --now narfs-watch.service narfs-mount.service narfs-gc.timer
systemctl reload-or-restart nginx.service
"""


@pytest.fixture(scope="module")
def box() -> Iterator[Container]:
    build = subprocess.run([str(REPO / ".ci" / "nspawn"), "build"], capture_output=True,
                           text=True, timeout=1400)
    assert build.returncode == 0, build.stdout + build.stderr
    tree = BASE / f"nspawn-{SUITE}"
    # Overlays a killed run left behind (a run takes well under a minute)
    for stale in BASE.glob("nspawn-run-*"):
        if time.time() - stale.stat().st_mtime > 3600:
            Container(tree, stale).remove()
    box = Container(tree, BASE / f"nspawn-run-{uuid.uuid4().hex[:12]}")
    try:
        box.mount()
        box.boot()
        setup = box.sh(SETUP, check=False)
        assert setup.returncode == 0, setup.stderr + box.diagnose()
        yield box
        if box.proc is not None and box.proc.poll() is None:
            box.shutdown("poweroff")
    finally:
        box.remove()


def build(box: Container) -> str:
    """A salted one-file store path built inside, with the hook; its out path."""
    salt = uuid.uuid4().hex
    expr = (f'derivation {{ name = "narfs-nspawn-{salt[:8]}"; system = builtins.currentSystem; '
            f'builder = "/bin/sh"; args = [ "-c" "echo {salt} >$out" ]; }}')
    out = box.sh(f"nix-build --no-out-link -E '{expr}'").stdout.strip()
    assert out.startswith("/nix/store/"), out
    return out


def wait_archived(box: Container, path: str) -> None:
    base = os.path.basename(path)
    box.wait_for(f"[ -e {CACHE}/{base[:32]}.narinfo ] && [ ! -L {ROOTS}/{base} ]",
                 f"narfs-watch to archive and unpin {base}")


@pytest.fixture(scope="module")
def archived(box: Container) -> str:
    path = build(box)
    wait_archived(box, path)
    return path


def test_watch_service_archives_a_build(box: Container, archived: str) -> None:
    info = box.sh(f"cat {CACHE}/{os.path.basename(archived)[:32]}.narinfo").stdout
    assert f"StorePath: {archived}\n" in info and "\nSig: narfs-ci-narfs-1:" in info
    # Type=notify: "active" only after READY=1; the status line is narfs's own STATUS=.
    props = box.show("narfs-watch.service", "ActiveState", "SubState", "StatusText",
                     "NRestarts", "Result")
    assert props["ActiveState"] == "active" and props["SubState"] == "running", props
    assert props["NRestarts"] == "0" and props["Result"] == "success", props
    box.wait_for("systemctl show narfs-watch.service -p StatusText | "
                 "grep -q 'StatusText=0 pins waiting (0 archiving, 0 retrying), [1-9]'",
                 "narfs-watch's STATUS= to count the archived path")


def test_mount_service_mounts_and_stops_cleanly(box: Container, archived: str) -> None:
    base = os.path.basename(archived)
    props = box.show("narfs-mount.service", "ActiveState", "StatusText")
    assert props == {"ActiveState": "active", "StatusText": f"serving {MOUNTPOINT}"}
    assert box.sh(f"findmnt -n -o FSTYPE {MOUNTPOINT}").stdout.strip().startswith("fuse")
    box.wait_for(f"[ -e {MOUNTPOINT}/{base} ]", "the archived path to appear in the mount")
    assert box.sh(f"cat {MOUNTPOINT}/{base}").stdout == box.sh(f"cat {archived}").stdout

    since = box.sh("date +%s.%N").stdout.strip()
    box.sh("systemctl stop narfs-mount.service")
    assert box.sh(f"findmnt {MOUNTPOINT}", check=False).returncode != 0, "still mounted"
    props = box.show("narfs-mount.service", "ActiveState", "Result", "ExecMainStatus")
    assert props == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}
    # A clean stop says nothing about unmounting: ExecStopPost only clears a crashed mount.
    journal = box.sh(f"journalctl -q -o cat -u narfs-mount.service --since @{since}").stdout
    # ("Failed to kill control group" lines are this container's cgroup v1, not narfs)
    assert "Deactivated successfully" in journal, journal
    assert not re.search(r"not mounted|umount|ExecStopPost|status=", journal, re.I), journal
    box.sh("systemctl start narfs-mount.service")
    box.wait_for(f"[ -e {MOUNTPOINT}/{base} ]", "the mount to come back")


def test_gc_timer_is_scheduled_and_gc_runs_under_its_sandbox(
        box: Container, archived: str) -> None:
    timer = box.show("narfs-gc.timer", "ActiveState", "NextElapseUSecRealtime", "Unit")
    assert timer["ActiveState"] == "active" and timer["Unit"] == "narfs-gc.service", timer
    assert timer["NextElapseUSecRealtime"] not in ("", "0", "n/a"), timer
    box.sh("systemctl start narfs-gc.service")  # oneshot: returns when gc has finished
    gc = box.show("narfs-gc.service", "Result", "ExecMainStatus")
    assert gc == {"Result": "success", "ExecMainStatus": "0"}, gc
    # nothing is a year old: everything stays
    box.sh(f"test -e {CACHE}/{os.path.basename(archived)[:32]}.narinfo")


def test_nginx_serves_the_cache_beside_debians_default_site(
        box: Container, archived: str) -> None:
    box.sh("test -L /etc/nginx/sites-enabled/default")
    # Asked by IP (no matching server_name), on its own port: the narfs server answers.
    status = box.sh(f"curl -s -o /dev/null -w '%{{http_code}}' http://127.0.0.1:{PORT}/"
                    "nix-cache-info").stdout
    assert status == "200"
    assert box.sh("curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1/").stdout == "200"
    # Nix substitutes through it, signatures required and the key trusted by nix.conf.
    content = box.sh(f"cat {archived}").stdout
    box.sh(f"nix-store --delete {archived}")
    box.sh(f"nix --extra-experimental-features nix-command copy --from "
           f"http://127.0.0.1:{PORT} {archived}")
    assert box.sh(f"cat {archived}").stdout == content
    box.sh(f"nix-store --verify-path {archived}")


def nixos_unit_file(service: dict) -> str:
    """The unit NixOS writes for a systemd.services entry (as tests/nix/eval.nix shows it),
    but for PATH: the container's is Debian's, where nix is."""
    lines = ["[Unit]", f"Description={service['description']}"]
    for key in ("after", "before", "wants", "requires"):
        if service[key]:
            lines.append(f"{key.capitalize()}={' '.join(service[key])}")
    lines.append("[Service]")
    lines += [f'Environment="{k}={v}"' for k, v in service["environment"].items()]
    for key, value in service["serviceConfig"].items():
        for v in value if isinstance(value, list) else [value]:
            lines.append(f"{key}={('true' if v else 'false') if isinstance(v, bool) else v}")
    return "\n".join(lines) + "\n"


def install_nixos_unit(box: Container, config: dict, name: str) -> None:
    """narfs.nix's service `name` for this configuration, its package the container's
    /opt/narfs, coreutils and util-linux Debian's, and narfs-init's trust script the
    checkout's."""
    service = evaluate(config, package_dir=Path("/opt/narfs"),
                       bin_dirs={"coreutils": "/usr", "util-linux": "/usr"})["services"][name]
    unit = re.sub(r"/nix/store/\w{32}-narfs-trust-key ", "/bin/sh /src/systemd/narfs-trust-key.sh ",
                  nixos_unit_file(service))
    assert not re.search(r"/nix/store/\w{32}-", unit), unit
    box.sh(f"cat >{shlex.quote(f'/etc/systemd/system/{name}.service')} <<'EOF'\n{unit}EOF\n"
           "systemctl daemon-reload")


def test_nixos_init_unit_under_systemd(box: Container) -> None:
    """The one unit only the NixOS module has, with its hardening, under a real systemd: it
    makes Nix trust the key in a file nix.conf includes, and restarts nix-daemon (here a
    stand-in) only when that key is new; with services.narfs.publicKey it checks the key."""
    public = re.search(r"^extra-trusted-public-keys = (.*)$",
                       box.sh("cat /root/init.out").stdout, re.M).group(1)
    box.sh("cat >/etc/systemd/system/nix-daemon.service <<'EOF'\n[Service]\n"
           "ExecStart=/bin/sleep infinity\nEOF\n"
           "systemctl daemon-reload && systemctl start nix-daemon.service")
    daemon = box.show("nix-daemon.service", "InvocationID")["InvocationID"]
    install_nixos_unit(box, {"services": {"narfs": {"enable": True}}}, "narfs-init")
    box.sh("systemctl start narfs-init.service")
    init = box.show("narfs-init.service", "ActiveState", "Result")
    assert init == {"ActiveState": "active", "Result": "success"}, box.diagnose()
    assert box.sh("cat /var/lib/narfs/nix.conf").stdout == (
        f"extra-trusted-public-keys = {public}\n")
    box.wait_for(f"! systemctl show nix-daemon.service -p InvocationID | grep -q {daemon}",
                 "narfs-init to restart nix-daemon")
    daemon = box.show("nix-daemon.service", "InvocationID")["InvocationID"]
    box.sh("systemctl restart narfs-init.service")  # the same key: nix-daemon left alone
    box.wait_for("[ -z \"$(systemctl list-jobs --no-legend)\" ]", "systemd's jobs to finish")
    assert box.show("nix-daemon.service", "InvocationID")["InvocationID"] == daemon

    other = "other-1:" + public.split(":", 1)[1]
    install_nixos_unit(box, {"services": {"narfs": {"enable": True, "publicKey": other}}},
                       "narfs-init")
    since = box.sh("date +%s.%N").stdout.strip()
    assert box.sh("systemctl restart narfs-init.service", check=False).returncode != 0
    journal = box.sh(f"journalctl -q -o cat -u narfs-init.service --since @{since}").stdout
    assert f"is the key of {public}, not of services.narfs.publicKey ({other})" in journal
    box.sh("systemctl stop nix-daemon.service; systemctl reset-failed narfs-init.service; "
           "rm /etc/systemd/system/narfs-init.service /etc/systemd/system/nix-daemon.service; "
           "systemctl daemon-reload")


# narfs-mount.service's hardening, which narfs-mount-remote@ shares but for the network
HARDENING = ("NoNewPrivileges", "LockPersonality", "RestrictRealtime", "RestrictSUIDSGID",
             "SystemCallArchitectures", "RestrictNamespaces", "SystemCallFilter",
             "SystemCallErrorNumber", "CapabilityBoundingSet", "PrivateNetwork", "PrivateMounts")
NETWORK = ("RestrictAddressFamilies", "IPAddressDeny", "IPAddressAllow")


@pytest.fixture(scope="module")
def remote(box: Container) -> str:
    """narfs-mount-remote@ installed as its comment says, for REMOTE_MOUNTPOINT, the server
    this container's nginx (serving its own narfs cache); the instance's name."""
    unit = box.sh("systemd-escape --path --template=narfs-mount-remote@.service "
                  f"{REMOTE_MOUNTPOINT}").stdout.strip()
    assert "\\x2d" in unit, unit
    box.sh(f"""
        cp /src/systemd/narfs-mount-remote@.service /etc/systemd/system/
        echo 'remote_poll = {REMOTE_POLL}' >>/etc/narfs/narfs.toml
        mkdir -p {os.path.dirname(f"/etc/narfs/remote{REMOTE_MOUNTPOINT}")}
        echo NARFS_URL=http://127.0.0.1:{PORT} >/etc/narfs/remote{REMOTE_MOUNTPOINT}.env
        systemctl daemon-reload
    """)
    return unit


def test_remote_mount_unit_is_active_once_the_mount_is_live(
        box: Container, archived: str, remote: str) -> None:
    """`systemctl enable --now` returns at READY=1 (Type=notify), and by then the mount
    serves the server's paths: nothing is waited for after it."""
    base = os.path.basename(archived)
    since = box.sh("date +%s.%N").stdout.strip()
    box.sh(f"systemctl enable --now {shlex.quote(remote)}")
    mount = box.sh(f"findmnt -n -o FSTYPE,SOURCE {REMOTE_MOUNTPOINT}",
                   check=False).stdout.split()
    assert mount == ["fuse.narfs", f"narfs:http://127.0.0.1:{PORT}"], (mount, box.diagnose())
    assert base in box.sh(f"ls {REMOTE_MOUNTPOINT}").stdout.split()
    props = box.show(remote, "ActiveState", "SubState", "StatusText", "NRestarts")
    assert props == {"ActiveState": "active", "SubState": "running", "NRestarts": "0",
                     "StatusText": f"serving {REMOTE_MOUNTPOINT}"}, props
    box.sh(f"cmp {REMOTE_MOUNTPOINT}/{base} {archived}")
    # What it shows came over HTTP from nginx: the unit's hardening let it reach its server.
    log = box.sh("cat /var/log/nginx/access.log").stdout
    assert re.search(rf'"GET /{base[:32]}\.narinfo HTTP/1\.1" 200 .*"narfs/', log), log
    journal = box.sh(f"journalctl -q -o cat -u {shlex.quote(remote)} --since @{since}").stdout
    assert f"mounted http://127.0.0.1:{PORT} on {REMOTE_MOUNTPOINT}" in journal, journal


def test_remote_mount_unit_is_hardened_like_the_local_one_but_for_ip(
        box: Container, remote: str) -> None:
    """The same seccomp and capability filtering as narfs-mount.service (no mount namespace
    either), but it may open IP sockets to any address: no IPAddressDeny=any."""
    local = box.show("narfs-mount.service", *HARDENING, *NETWORK)
    props = box.show(remote, *HARDENING, *NETWORK)
    assert {k: props[k] for k in HARDENING} == {k: local[k] for k in HARDENING}
    assert props["NoNewPrivileges"] == "yes" and props["PrivateNetwork"] == "no", props
    assert local["IPAddressDeny"] and set(local["RestrictAddressFamilies"].split()) == {"AF_UNIX"}
    assert props["IPAddressDeny"] == "" and props["IPAddressAllow"] == "", props
    assert set(props["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    # systemd's own reading of the two units: they differ in the network checks only
    verdicts = {u: {c["name"]: c["set"] for c in json.loads(box.sh(
        f"systemd-analyze security --no-pager --json=short {shlex.quote(u)}").stdout)}
        for u in ("narfs-mount.service", remote)}
    differ = {name for name, ok in verdicts[remote].items()
              if ok != verdicts["narfs-mount.service"][name]}
    assert differ == {"IPAddressDeny=", "RestrictAddressFamilies=~AF_(INET|INET6)"}, differ
    assert not verdicts[remote]["IPAddressDeny="], verdicts[remote]


def test_remote_mount_follows_the_server(box: Container, remote: str) -> None:
    """A path archived on the server shows on the client mount within remote_poll (less than
    its default of 30 s), with the store path's bytes."""
    path = build(box)
    wait_archived(box, path)
    base = os.path.basename(path)
    box.wait_for(f"[ -e {REMOTE_MOUNTPOINT}/{base} ]",
                 f"{base} on the remote mount within remote_poll", timeout=REMOTE_POLL + 10)
    box.sh(f"cmp {REMOTE_MOUNTPOINT}/{base} {path}")


def test_nixos_remote_mount_unit_under_systemd(box: Container, archived: str) -> None:
    """services.narfs.remoteMounts' unit (the template's twin: tests/t4_systemd.py) mounts
    this nginx's cache, live when started, and unmounts when stopped."""
    mountpoint, base = "/mnt/nixos-remote", os.path.basename(archived)
    name = "narfs-remote-" + box.sh(f"systemd-escape --path {mountpoint}").stdout.strip()
    # Another URL than narfs-mount-remote@'s, so another mirror: a fresh one, which only the
    # server can fill (a mirror from before would be shown while the server cannot be reached);
    # and a host name, resolved under the unit's hardening (no AF_NETLINK).
    config = {"services": {"narfs": {"remoteMounts": {mountpoint: f"http://localhost:{PORT}"}}}}
    install_nixos_unit(box, config, name)
    unit = shlex.quote(f"{name}.service")
    try:
        assert box.sh(f"systemctl start {unit}", check=False).returncode == 0, box.diagnose()
        assert base in box.sh(f"ls {mountpoint}").stdout.split(), box.diagnose()
        box.sh(f"cmp {mountpoint}/{base} {archived}")
        assert box.show(f"{name}.service", "StatusText")["StatusText"] == f"serving {mountpoint}"
        box.sh(f"systemctl stop {unit}")
        assert box.sh(f"findmnt {mountpoint}", check=False).returncode != 0
        props = box.show(f"{name}.service", "ActiveState", "Result", "ExecMainStatus")
        assert props == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}
    finally:
        box.sh(f"systemctl stop {unit}; rm {shlex.quote(f'/etc/systemd/system/{name}.service')}; "
               "systemctl daemon-reload")


def test_remote_mount_unit_stops_promptly_with_the_server_down(
        box: Container, remote: str) -> None:
    """With nginx stopped (its polls failing), `systemctl stop` unmounts in a few seconds:
    narfs ends on SIGTERM and unmounts itself, no stop timeout, no ExecStopPost cleanup."""
    box.sh("systemctl stop nginx.service")
    try:
        since = box.sh("date +%s.%N").stdout.strip()
        box.wait_for(f"journalctl -q -o cat -u {shlex.quote(remote)} --since @{since} | "
                     "grep -q 'polling the path index failed'",
                     "a failed poll of the stopped server", timeout=2 * REMOTE_POLL + 10)
        assert box.show(remote, "ActiveState")["ActiveState"] == "active"
        since = box.sh("date +%s.%N").stdout.strip()
        # bounded well below TimeoutStopSec=30, after which systemd would kill it
        stop = box.sh(f"timeout 10 systemctl stop {shlex.quote(remote)}", check=False)
        assert stop.returncode == 0, (stop, box.diagnose())
        assert box.sh(f"findmnt {REMOTE_MOUNTPOINT}", check=False).returncode != 0
        props = box.show(remote, "ActiveState", "Result", "ExecMainStatus")
        assert props == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}
        journal = box.sh(f"journalctl -q -o cat -u {shlex.quote(remote)} "
                         f"--since @{since}").stdout
        assert f"unmounted {REMOTE_MOUNTPOINT}" in journal and "Deactivated successfully" in (
            journal), journal
        assert not re.search(r"not mounted|umount|ExecStopPost|status=", journal, re.I), journal
    finally:
        box.sh("systemctl start nginx.service")


def test_everything_comes_back_after_a_reboot(box: Container, archived: str,
                                              remote: str) -> None:
    status = box.shutdown("reboot")
    assert status == 133, (status, box.console())  # nspawn's "the container rebooted"
    box.boot()
    # the remote mount too: enabled, stopped before the reboot
    for unit in ("narfs-watch.service", "narfs-mount.service", "narfs-gc.timer",
                 "nginx.service", remote):
        assert box.show(unit, "ActiveState")["ActiveState"] == "active", unit
    for mountpoint in (MOUNTPOINT, REMOTE_MOUNTPOINT):
        box.wait_for(f"[ -e {mountpoint}/{os.path.basename(archived)} ]",
                     f"the archived path in {mountpoint} after the reboot")
    assert box.sh(f"curl -s -o /dev/null -w '%{{http_code}}' http://127.0.0.1:{PORT}/"
                  f"{os.path.basename(archived)[:32]}.narinfo").stdout == "200"
    wait_archived(box, build(box))  # the hook and the watch work after a boot too
