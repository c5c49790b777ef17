"""DSSE (Dead Simple Signing Envelope) encoding and signing.

The signature covers the pre-authentication encoding (PAE) of the payload type and the
exact payload bytes, so a verifier never has to re-serialise anything before checking it.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from typing import Annotated, ClassVar

from pydantic import Field

from shared.errors import SchemaError
from shared.reasons import Reason
from shared.schema import Contract
from shared.signing.keys import SigningKey

_B64 = r"^[A-Za-z0-9+/]*={0,2}$"


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSEv1 pre-authentication encoding: 'DSSEv1 <len> <type> <len> <payload>'."""
    type_bytes = payload_type.encode()
    return b"DSSEv1 %d %b %d %b" % (len(type_bytes), type_bytes, len(payload), payload)


def b64decode_strict(value: str, what: str) -> bytes:
    """Decode standard base64, raising SchemaError that names ``what`` when malformed."""
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SchemaError(Reason.MALFORMED_BASE64, f"{what}: malformed base64 ({exc})") from None


class Signature(Contract):
    """One signature over the PAE of an envelope."""

    keyid: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    sig: Annotated[str, Field(min_length=1, max_length=256, pattern=_B64)]


class Envelope(Contract):
    """A DSSE envelope; field names follow the DSSE specification."""

    MAX_BYTES: ClassVar[int] = 512 * 1024
    WHAT: ClassVar[str] = "envelope"

    payloadType: Annotated[str, Field(min_length=1, max_length=128)]  # noqa: N815 (DSSE's spelling)
    payload: Annotated[str, Field(max_length=400 * 1024, pattern=_B64)]
    signatures: Annotated[list[Signature], Field(min_length=1, max_length=16)]

    def payload_bytes(self) -> bytes:
        """The exact signed payload bytes."""
        return b64decode_strict(self.payload, "envelope.payload")


def sign_envelope(payload: bytes, payload_type: str, keys: Sequence[SigningKey]) -> Envelope:
    """Sign ``payload`` with every key in ``keys`` (one signature each, duplicates removed)."""
    if not keys:
        raise ValueError("at least one signing key is required")
    message = pae(payload_type, payload)
    unique = {key.keyid: key for key in keys}
    signatures = [
        Signature(keyid=keyid, sig=base64.b64encode(key.sign(message)).decode())
        for keyid, key in sorted(unique.items())
    ]
    return Envelope(
        payloadType=payload_type, payload=base64.b64encode(payload).decode(), signatures=signatures
    )
