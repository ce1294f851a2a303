"""Issue 16: the README's first command, exactly as written, on a fresh Debian 12 machine.

`.ci/fresh-machine` unpacks a pristine debootstrap of bookworm (made once, kept under
/var/lib/narfs-ci/), copies this tree in and runs the first ```sh block of README.md there as
root: once in a private mount namespace without systemd (the service then runs in the
background), once booted with systemd in systemd-nspawn (narfs's units run it). Whole-machine
tests: `-m 'not machine'` deselects them (the chroot matrix does)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def readme_first_command() -> str:
    text = (REPO / "README.md").read_text()
    m = re.search(r"^```sh\n(.*?)^```", text, re.M | re.S)
    assert m, "README.md has no ```sh block"
    return m.group(1).strip()


def test_readme_first_command_is_the_loop() -> None:
    """What the README promises a new user: the install script, then a look into the mount."""
    command = readme_first_command()
    assert command.startswith("tools/install-debian && ")
    assert re.search(r"(ls|grep)[^&|;]* /mnt/nar-archive\S*$", command), command


@pytest.mark.machine
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("systemd", [False, True], ids=["no-systemd", "systemd"])
def test_readme_first_command_on_a_fresh_debian(systemd: bool) -> None:
    if shutil.which("debootstrap") is None and shutil.which("apt-get") is None:
        pytest.skip("needs debootstrap (Debian)")
    cmd = [str(REPO / ".ci" / "fresh-machine"), *(["--systemd"] if systemd else []), "bookworm"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3500)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    # The command run is the README's, as written.
    kind = " (systemd)" if systemd else ""
    assert f"running in a fresh bookworm{kind}: {readme_first_command()}\n" in out
    # Archived by the service: narfs's systemd unit, or the same service in the background.
    if systemd:
        assert "narfs-watch and narfs-mount run as systemd services" in out
        assert re.search(r"^watch: +running \(pid \d+", out, re.M), out[-3000:]
    else:
        assert "No systemd here" in out
    # The loop: built through the hook, archived and unpinned by the service, deleted from
    # the store, read through the mount (the README command's own grep), restored, runs.
    hello = re.search(r"^built (/nix/store/[0-9a-z]{32}-narfs-hello-1\.0)$", out, re.M)
    assert hello, out[-6000:]
    path = hello.group(1)
    assert "running post-build-hook" in out
    assert f"gone from the store: {path}" in out
    assert f"restored {path}" in out
    assert out.count("Hello from a build narfs brought back.") == 2  # built, and restored
    assert re.search(r"^/mnt/nar-archive/\.by-name/narfs-hello-1\.0/latest/share/doc/"
                     r"narfs-hello/README:narfs-hello: archived by narfs, readable after "
                     r"the GC$", out, re.M), out[-3000:]
