"""DSSE envelopes signed with ed25519, verified against a role-based keyring."""

from shared.signing.dsse import Envelope, Signature, pae, sign_envelope
from shared.signing.keyring import KEYRING_PAYLOAD_TYPE, Keyring, Role, TrustedKey
from shared.signing.keys import SigningKey, generate_key, keyid_of, load_private_key, write_private_key
from shared.signing.verify import VerifiedPayload, apply_keyring_update, verify_envelope

__all__ = [
    "KEYRING_PAYLOAD_TYPE",
    "Envelope",
    "Keyring",
    "Role",
    "Signature",
    "SigningKey",
    "TrustedKey",
    "VerifiedPayload",
    "apply_keyring_update",
    "generate_key",
    "keyid_of",
    "load_private_key",
    "pae",
    "sign_envelope",
    "verify_envelope",
    "write_private_key",
]
