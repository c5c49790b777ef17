"""The trusted keyring: public keys with roles, a threshold per role, and signed updates."""

from __future__ import annotations

from enum import StrEnum
from functools import cached_property
from typing import Annotated, ClassVar, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import Field, model_validator

from shared.schema import Contract
from shared.signing.keys import keyid_of, public_key_from_b64

KEYRING_PAYLOAD_TYPE = "application/vnd.immune-edge.keyring+json"


class Role(StrEnum):
    """What a key is trusted to sign."""

    ROOT = "root"  # keyring updates
    TRAINER = "trainer"  # model manifests
    OPERATOR = "operator"  # fleet commands


class TrustedKey(Contract):
    """A public key and the one role it holds."""

    keyid: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    role: Role
    public_key: Annotated[str, Field(description="base64 of the 32 raw ed25519 public key bytes")]
    name: Annotated[str, Field(max_length=64)] | None = None

    @model_validator(mode="after")
    def _keyid_matches(self) -> TrustedKey:
        try:
            public = public_key_from_b64(self.public_key)
        except ValueError as exc:
            raise ValueError(f"public_key is not a base64 ed25519 key: {exc}") from None
        if keyid_of(public) != self.keyid:
            raise ValueError("keyid is not the sha256 of public_key")
        return self

    @cached_property
    def public(self) -> Ed25519PublicKey:
        return public_key_from_b64(self.public_key)

    @property
    def label(self) -> str:
        """Short human label for messages: name and keyid prefix."""
        return f"{self.keyid[:12]}" + (f" ({self.name})" if self.name else "")


class Thresholds(Contract):
    """How many distinct keys of each role must sign."""

    root: Annotated[int, Field(ge=1, le=16)] = 1
    trainer: Annotated[int, Field(ge=1, le=16)] = 1
    operator: Annotated[int, Field(ge=1, le=16)] = 1

    def of(self, role: Role) -> int:
        return int(getattr(self, role.value))


class Keyring(Contract):
    """The set of keys a device or operator trusts; versioned so updates cannot be replayed."""

    MAX_BYTES: ClassVar[int] = 128 * 1024
    WHAT: ClassVar[str] = "keyring"

    schema_version: Literal[1] = 1
    version: Annotated[int, Field(ge=1)]
    keys: Annotated[list[TrustedKey], Field(min_length=1, max_length=256)]
    thresholds: Thresholds = Thresholds()

    @model_validator(mode="after")
    def _consistent(self) -> Keyring:
        keyids = [key.keyid for key in self.keys]
        if len(set(keyids)) != len(keyids):
            raise ValueError("a keyid may appear only once (one role per key)")
        roots = sum(1 for key in self.keys if key.role is Role.ROOT)
        if roots < self.thresholds.root:
            raise ValueError(f"{roots} root key(s) cannot meet the root threshold of {self.thresholds.root}")
        return self

    def find(self, keyid: str) -> TrustedKey | None:
        """The trusted key with this keyid, if any."""
        return next((key for key in self.keys if key.keyid == keyid), None)
