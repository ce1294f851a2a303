"""Ed25519 keys in Nix's text format and narinfo signatures over Nix's fingerprint."""

from __future__ import annotations

import base64
import binascii
import os
import stat
from dataclasses import dataclass

import nacl.exceptions
import nacl.signing

from .errors import NarfsError


def fingerprint(store_path: str, nar_hash: str, nar_size: int, references: list[str]) -> bytes:
    """What a narinfo Sig signs; `references` are full store paths."""
    refs = ",".join(sorted(references))
    return f"1;{store_path};{nar_hash};{nar_size};{refs}".encode()


@dataclass(frozen=True)
class SecretKey:
    name: str
    key: nacl.signing.SigningKey

    def sign(self, message: bytes) -> str:
        sig = self.key.sign(message).signature
        return f"{self.name}:{base64.b64encode(sig).decode()}"

    @property
    def public(self) -> PublicKey:
        return PublicKey(self.name, self.key.verify_key)


@dataclass(frozen=True)
class PublicKey:
    name: str
    key: nacl.signing.VerifyKey

    def text(self) -> str:
        return f"{self.name}:{base64.b64encode(bytes(self.key)).decode()}"

    def verifies(self, message: bytes, sig: str) -> bool:
        name, _, b64 = sig.partition(":")
        if name != self.name:
            return False
        try:
            self.key.verify(message, base64.b64decode(b64, validate=True))
        except (nacl.exceptions.BadSignatureError, binascii.Error, ValueError):
            return False
        return True


def _split(text: str, size: int, what: str, where: str) -> tuple[str, bytes]:
    name, sep, b64 = text.strip().partition(":")
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if not sep or not name or len(raw) != size:
        raise NarfsError(f"{where}: not a Nix {what} (expected name:base64 of {size} bytes); "
                         "make one with `narfs init` or nix-store --generate-binary-cache-key")
    return name, raw


def parse_secret_key(text: str, where: str = "secret key") -> SecretKey:
    name, raw = _split(text, 64, "secret key", where)
    return SecretKey(name, nacl.signing.SigningKey(raw[:32]))


def parse_public_key(text: str, where: str = "public key") -> PublicKey:
    name, raw = _split(text, 32, "public key", where)
    return PublicKey(name, nacl.signing.VerifyKey(raw))


def load_secret_key(path: str) -> SecretKey:
    """Read a key file, refusing one that anybody but its owner can read (DESIGN: security)."""
    try:
        # O_NONBLOCK: a FIFO in the key's place must not hang the command.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise NarfsError(f"{path}: secret key file not found; run `narfs init` or set "
                         "secret_key_file") from None
    except PermissionError:
        raise NarfsError(f"{path}: secret key file not readable; run narfs as its owner "
                         "(root under systemd)") from None
    except OSError as e:
        raise NarfsError(f"{path}: cannot open the secret key file ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NarfsError(f"{path}: secret key file is not a regular file; point "
                             "secret_key_file at the key `narfs init` made")
        if stat.S_IMODE(st.st_mode) & 0o077:
            raise NarfsError(f"{path}: secret key file is readable by others; "
                             f"run `chmod 600 {path}`")
        try:
            text = os.read(fd, 4096).decode()
        except UnicodeDecodeError:
            text = ""
        except OSError as e:
            raise NarfsError(f"{path}: cannot read the secret key file ({e.strerror})") from None
    finally:
        os.close(fd)
    return parse_secret_key(text, path)


def generate_secret_key(name: str) -> str:
    """A new key in the `name:base64(seed + public)` form nix-store writes."""
    key = nacl.signing.SigningKey.generate()
    raw = bytes(key) + bytes(key.verify_key)
    return f"{name}:{base64.b64encode(raw).decode()}"
