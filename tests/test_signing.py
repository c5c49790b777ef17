"""DSSE signing and keyring verification, including every rejection the contract promises."""

from __future__ import annotations

import base64
import hashlib
import json
import stat

import pytest

from shared.errors import SchemaError, SignatureError
from shared.signing import (
    KEYRING_PAYLOAD_TYPE,
    Envelope,
    Role,
    apply_keyring_update,
    generate_key,
    load_private_key,
    pae,
    sign_envelope,
    verify_envelope,
    write_private_key,
)
from shared.signing.keys import KeyFileError, raw_public_bytes

PTYPE = "application/vnd.immune-edge.manifest+json"
PAYLOAD = b'{"hello":"fleet"}'


def test_pae_matches_the_dsse_specification_example() -> None:
    assert pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


def test_keyid_is_sha256_of_raw_public_key(fleet_keys) -> None:
    key = fleet_keys.trainer
    assert key.keyid == hashlib.sha256(raw_public_bytes(key.public_key)).hexdigest()


def test_round_trip(fleet_keys) -> None:
    envelope = sign_envelope(PAYLOAD, PTYPE, [fleet_keys.trainer])
    parsed = Envelope.from_json(envelope.to_json())
    verified = verify_envelope(parsed, fleet_keys.keyring(), Role.TRAINER, PTYPE)
    assert verified.payload == PAYLOAD
    assert verified.keyids == (fleet_keys.trainer.keyid,)


def test_one_flipped_payload_byte_is_rejected(fleet_keys) -> None:
    envelope = sign_envelope(PAYLOAD, PTYPE, [fleet_keys.trainer])
    tampered = bytearray(PAYLOAD)
    tampered[3] ^= 0x01
    forged = envelope.model_copy(update={"payload": base64.b64encode(bytes(tampered)).decode()})
    with pytest.raises(SignatureError, match="does not match the payload") as err:
        verify_envelope(forged, fleet_keys.keyring(), Role.TRAINER, PTYPE)
    assert err.value.reason == "bad-signature"


def test_changed_payload_type_is_rejected(fleet_keys) -> None:
    envelope = sign_envelope(PAYLOAD, PTYPE, [fleet_keys.trainer])
    with pytest.raises(SignatureError, match="payloadType") as err:
        verify_envelope(envelope, fleet_keys.keyring(), Role.TRAINER, "application/other")
    assert err.value.reason == "payload-type"


def test_signature_by_unknown_key_is_rejected(fleet_keys) -> None:
    envelope = sign_envelope(PAYLOAD, PTYPE, [fleet_keys.stranger])
    with pytest.raises(SignatureError, match=f"unknown key {fleet_keys.stranger.keyid[:12]}") as err:
        verify_envelope(envelope, fleet_keys.keyring(), Role.TRAINER, PTYPE)
    assert err.value.reason == "unknown-key"


def test_key_with_wrong_role_is_rejected(fleet_keys) -> None:
    envelope = sign_envelope(PAYLOAD, PTYPE, [fleet_keys.operator])
    with pytest.raises(SignatureError, match="has role operator, not trainer") as err:
        verify_envelope(envelope, fleet_keys.keyring(), Role.TRAINER, PTYPE)
    assert err.value.reason == "wrong-role"


def test_below_threshold_is_rejected_and_threshold_met_passes(fleet_keys) -> None:
    keyring = fleet_keys.keyring(trainer=2)
    one = sign_envelope(PAYLOAD, PTYPE, [fleet_keys.trainer])
    with pytest.raises(SignatureError, match="1 valid trainer signature.*2 required") as err:
        verify_envelope(one, keyring, Role.TRAINER, PTYPE)
    assert err.value.reason == "below-threshold"
    both = sign_envelope(PAYLOAD, PTYPE, [fleet_keys.trainer, fleet_keys.trainer2])
    assert len(verify_envelope(both, keyring, Role.TRAINER, PTYPE).keyids) == 2


def test_duplicate_signatures_by_one_key_count_once(fleet_keys) -> None:
    envelope = sign_envelope(PAYLOAD, PTYPE, [fleet_keys.trainer])
    doubled = envelope.model_copy(update={"signatures": envelope.signatures * 2})
    with pytest.raises(SignatureError, match="1 valid trainer signature"):
        verify_envelope(doubled, fleet_keys.keyring(trainer=2), Role.TRAINER, PTYPE)


@pytest.mark.parametrize("field", ["payload", "sig"])
def test_malformed_base64_is_rejected(fleet_keys, field: str) -> None:
    data = json.loads(sign_envelope(PAYLOAD, PTYPE, [fleet_keys.trainer]).to_json())
    if field == "payload":
        data["payload"] = "abc"  # wrong padding
    else:
        data["signatures"][0]["sig"] = "abcde"
    envelope = Envelope.from_json(json.dumps(data))
    with pytest.raises(SchemaError, match="malformed base64") as err:
        verify_envelope(envelope, fleet_keys.keyring(), Role.TRAINER, PTYPE)
    assert err.value.reason == "malformed-base64"


def test_envelope_with_unknown_field_or_non_base64_characters_is_rejected(fleet_keys) -> None:
    data = json.loads(sign_envelope(PAYLOAD, PTYPE, [fleet_keys.trainer]).to_json())
    with pytest.raises(SchemaError, match="envelope: extra: Extra inputs are not permitted"):
        Envelope.from_json(json.dumps({**data, "extra": 1}))
    with pytest.raises(SchemaError, match="envelope: payload: String should match pattern"):
        Envelope.from_json(json.dumps({**data, "payload": "%%%"}))


def test_keyring_update_round_trip(fleet_keys) -> None:
    current = fleet_keys.keyring(version=1)
    new = fleet_keys.keyring(version=2, trainer=2)
    envelope = sign_envelope(new.to_json(), KEYRING_PAYLOAD_TYPE, [fleet_keys.root])
    assert apply_keyring_update(current, envelope) == new


def test_keyring_update_must_increase_version(fleet_keys) -> None:
    current = fleet_keys.keyring(version=3)
    for version in (2, 3):
        stale = fleet_keys.keyring(version=version)
        envelope = sign_envelope(stale.to_json(), KEYRING_PAYLOAD_TYPE, [fleet_keys.root])
        with pytest.raises(
            SignatureError, match=f"version {version} is not greater than the current version 3"
        ):
            apply_keyring_update(current, envelope)


def test_keyring_update_not_signed_by_root_is_rejected(fleet_keys) -> None:
    current = fleet_keys.keyring(version=1)
    envelope = sign_envelope(
        fleet_keys.keyring(version=2).to_json(), KEYRING_PAYLOAD_TYPE, [fleet_keys.trainer]
    )
    with pytest.raises(
        SignatureError, match="keyring update: 0 valid root signature.*role trainer, not root"
    ):
        apply_keyring_update(current, envelope)


def test_root_rotation_needs_old_and_new_roots(fleet_keys) -> None:
    new_root = generate_key()
    current = fleet_keys.keyring(version=1)
    from shared.signing import TrustedKey

    rotated = current.model_copy(
        update={
            "version": 2,
            "keys": [k for k in current.keys if k.role is not Role.ROOT]
            + [
                TrustedKey(
                    keyid=new_root.keyid, role=Role.ROOT, public_key=new_root.public_b64, name="root-2027"
                )
            ],
        }
    )
    only_old = sign_envelope(rotated.to_json(), KEYRING_PAYLOAD_TYPE, [fleet_keys.root])
    with pytest.raises(SignatureError, match="new root keys"):
        apply_keyring_update(current, only_old)
    both = sign_envelope(rotated.to_json(), KEYRING_PAYLOAD_TYPE, [fleet_keys.root, new_root])
    assert apply_keyring_update(current, both).version == 2


def test_private_key_file_is_0600_and_never_overwritten(tmp_path) -> None:
    key = generate_key()
    path = tmp_path / "trainer.key"
    write_private_key(key, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_private_key(path).keyid == key.keyid
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        write_private_key(generate_key(), path)


def test_private_key_readable_by_others_is_refused(tmp_path) -> None:
    path = tmp_path / "loose.key"
    write_private_key(generate_key(), path)
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match=r"accessible by group/others \(mode 0644\)"):
        load_private_key(path)
