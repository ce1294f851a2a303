"""sd_notify(3) for `narfs watch` and `narfs mount --foreground`: READY, STATUS, STOPPING."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class Notifier:
    """sd_notify(3) without libsystemd: one datagram per message; nothing
    without a socket.

    A few lines of socket code instead of a dependency; abstract addresses (`@name`) included.
    """

    def __init__(self, address: str | None) -> None:
        self.address = address or ""
        self.sock: socket.socket | None = None
        if address:
            if address.startswith("@"):
                self.address = "\0" + address[1:]
            kind = socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
            self.sock = socket.socket(socket.AF_UNIX, kind)

    @classmethod
    def from_environment(cls) -> Notifier:
        # Popped so that the Nix commands narfs runs never notify on the service's behalf.
        return cls(os.environ.pop("NOTIFY_SOCKET", None))

    def send(self, *fields: str) -> None:
        if self.sock is None:
            return
        try:
            self.sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as e:  # systemd gone or its queue full: never worth stopping for
            log.debug("sd_notify to %s failed: %s", self.address, e)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
