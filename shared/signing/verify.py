"""Threshold verification of DSSE envelopes against a keyring."""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature

from shared.errors import SignatureError
from shared.reasons import Reason
from shared.signing.dsse import Envelope, b64decode_strict, pae
from shared.signing.keyring import KEYRING_PAYLOAD_TYPE, Keyring, Role


@dataclass(frozen=True)
class VerifiedPayload:
    """Payload bytes whose signatures met the role's threshold."""

    payload: bytes
    payload_type: str
    role: Role
    keyids: tuple[str, ...]


def verify_envelope(
    envelope: Envelope | bytes,
    keyring: Keyring,
    role: Role,
    payload_type: str,
    what: str = "envelope",
) -> VerifiedPayload:
    """Check that enough distinct ``role`` keys signed the exact payload.

    Raises SignatureError whose ``reason`` is one of payload-type, bad-signature,
    unknown-key, wrong-role or below-threshold, and whose message lists each
    signature that did not count and why.
    """
    if isinstance(envelope, bytes):
        envelope = Envelope.from_json(envelope, what=what)
    if envelope.payloadType != payload_type:
        raise SignatureError(
            Reason.PAYLOAD_TYPE, f"{what}: payloadType is {envelope.payloadType!r}, expected {payload_type!r}"
        )
    payload = envelope.payload_bytes()
    message = pae(envelope.payloadType, payload)

    valid: list[str] = []
    problems: dict[Reason, list[str]] = {
        Reason.BAD_SIGNATURE: [],
        Reason.UNKNOWN_KEY: [],
        Reason.WRONG_ROLE: [],
    }
    for signature in envelope.signatures:
        key = keyring.find(signature.keyid)
        if key is None:
            problems[Reason.UNKNOWN_KEY].append(f"signature by unknown key {signature.keyid[:12]}")
            continue
        if key.role is not role:
            problems[Reason.WRONG_ROLE].append(f"key {key.label} has role {key.role.value}, not {role.value}")
            continue
        raw = b64decode_strict(signature.sig, f"{what}: signature by key {key.label}")
        try:
            key.public.verify(raw, message)
        except InvalidSignature:
            problems[Reason.BAD_SIGNATURE].append(f"signature by key {key.label} does not match the payload")
            continue
        if signature.keyid not in valid:
            valid.append(signature.keyid)

    threshold = keyring.thresholds.of(role)
    if len(valid) < threshold:
        # The most alarming problem names the failure: tampering before unknown keys before roles.
        reason = next((code for code, found in problems.items() if found), Reason.BELOW_THRESHOLD)
        details = [item for found in problems.values() for item in found]
        summary = f"{what}: {len(valid)} valid {role.value} signature(s), {threshold} required"
        raise SignatureError(reason, "; ".join([summary, *details]))
    return VerifiedPayload(payload, payload_type, role, tuple(valid))


def apply_keyring_update(current: Keyring, envelope: Envelope) -> Keyring:
    """Verify a keyring update and return the new keyring.

    The update must be signed by a threshold of the *current* root keys, and also by a
    threshold of the *new* root keys (proving the new roots are held by someone), and its
    version must be greater than the current one.
    """
    verified = verify_envelope(envelope, current, Role.ROOT, KEYRING_PAYLOAD_TYPE, what="keyring update")
    new = Keyring.from_json(verified.payload, what="keyring update payload")
    if new.version <= current.version:
        raise SignatureError(
            Reason.KEYRING_VERSION,
            f"keyring update: version {new.version} is not greater than the current version "
            f"{current.version}",
        )
    verify_envelope(envelope, new, Role.ROOT, KEYRING_PAYLOAD_TYPE, what="keyring update (new root keys)")
    return new
