"""ed25519 key files: private keys are PKCS#8 PEM, mode 0600, and refused when readable by others."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.errors import ContractError
from shared.reasons import Reason


class KeyFileError(ContractError):
    """A key file is missing, unsafe or malformed."""


def raw_public_bytes(public_key: Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of an ed25519 public key."""
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def keyid_of(public_key: Ed25519PublicKey) -> str:
    """keyid = hex sha256 of the raw public key."""
    return hashlib.sha256(raw_public_bytes(public_key)).hexdigest()


def public_key_from_b64(value: str) -> Ed25519PublicKey:
    """Decode a base64 raw ed25519 public key, raising ValueError when malformed."""
    raw = base64.b64decode(value, validate=True)
    if len(raw) != 32:
        raise ValueError(f"an ed25519 public key is 32 bytes, got {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


@dataclass(frozen=True)
class SigningKey:
    """A private key in memory, with its keyid."""

    private_key: Ed25519PrivateKey

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    @property
    def keyid(self) -> str:
        return keyid_of(self.public_key)

    @property
    def public_b64(self) -> str:
        return base64.b64encode(raw_public_bytes(self.public_key)).decode()

    def sign(self, message: bytes) -> bytes:
        return self.private_key.sign(message)


def generate_key() -> SigningKey:
    """A new random ed25519 key."""
    return SigningKey(Ed25519PrivateKey.generate())


def write_private_key(key: SigningKey, path: Path) -> None:
    """Write a private key as PEM, created with mode 0600; never overwrites an existing file."""
    pem = key.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyFileError(Reason.KEY_EXISTS, f"{path}: refusing to overwrite an existing key file") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
        handle.flush()
        os.fsync(handle.fileno())


def load_private_key(path: Path) -> SigningKey:
    """Load a private key, refusing files that group or others can read or write."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise KeyFileError(Reason.KEY_MISSING, f"{path}: private key file not found") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            Reason.KEY_PERMISSIONS,
            f"{path}: private key is accessible by group/others (mode {stat.S_IMODE(mode):04o}); "
            "run chmod 600 on it",
        )
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(Reason.KEY_MALFORMED, f"{path}: not a PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(Reason.KEY_MALFORMED, f"{path}: not an ed25519 key")
    return SigningKey(key)
