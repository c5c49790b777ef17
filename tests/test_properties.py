"""Property-based checks of the DSSE encoding, signing and the schemas."""

from __future__ import annotations

import base64
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.errors import ContractError, SchemaError
from shared.manifest import MANIFEST_PAYLOAD_TYPE, Manifest
from shared.schema import canonical_json
from shared.signing import Envelope, Role, pae, sign_envelope, verify_envelope
from shared.topics import Topics
from tests.factories import manifest_dict

payload_types = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=40)
fixture_ok = settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)


def parse_pae(encoded: bytes) -> tuple[str, bytes]:
    """Independent decoder: PAE must be unambiguous, so this recovers type and payload exactly."""
    assert encoded.startswith(b"DSSEv1 ")
    rest = encoded[len(b"DSSEv1 ") :]
    type_len, rest = rest.split(b" ", 1)
    payload_type, rest = rest[: int(type_len)], rest[int(type_len) :]
    assert rest[:1] == b" "
    body_len, payload = rest[1:].split(b" ", 1)
    assert len(payload) == int(body_len)
    return payload_type.decode(), payload


@given(payload_types, st.binary(max_size=512))
def test_pae_is_unambiguous(payload_type: str, payload: bytes) -> None:
    assert parse_pae(pae(payload_type, payload)) == (payload_type, payload)


@given(st.binary(max_size=256), st.binary(max_size=256))
def test_distinct_payloads_have_distinct_pae(a: bytes, b: bytes) -> None:
    assert (pae("t", a) == pae("t", b)) == (a == b)


@fixture_ok
@given(payload=st.binary(max_size=1024), payload_type=payload_types)
def test_any_payload_round_trips_through_an_envelope(fleet_keys, payload: bytes, payload_type: str) -> None:
    envelope = Envelope.from_json(sign_envelope(payload, payload_type, [fleet_keys.trainer]).to_json())
    assert verify_envelope(envelope, fleet_keys.keyring(), Role.TRAINER, payload_type).payload == payload


@fixture_ok
@given(payload=st.binary(min_size=1, max_size=256), data=st.data())
def test_any_single_bit_flip_is_detected(fleet_keys, payload: bytes, data: st.DataObject) -> None:
    envelope = sign_envelope(payload, "t", [fleet_keys.trainer])
    bit = data.draw(st.integers(0, len(payload) * 8 - 1))
    flipped = bytearray(payload)
    flipped[bit // 8] ^= 1 << (bit % 8)
    forged = envelope.model_copy(update={"payload": base64.b64encode(bytes(flipped)).decode()})
    try:
        verify_envelope(forged, fleet_keys.keyring(), Role.TRAINER, "t")
    except ContractError as exc:
        assert exc.reason == "bad-signature"
    else:
        raise AssertionError("a flipped bit was accepted")


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(),
        lambda c: st.lists(c) | st.dictionaries(st.text(), c),
    )
)
def test_canonical_json_is_stable_and_parses_back(value: object) -> None:
    encoded = canonical_json(value)
    assert canonical_json(json.loads(encoded)) == encoded


manifest_variants = st.fixed_dictionaries(
    {
        "name": st.from_regex(r"[a-z0-9][a-z0-9_:-]{0,30}", fullmatch=True),
        "serial": st.integers(1, 2**53),
        "version": st.text(min_size=1, max_size=20),
        "quantization": st.sampled_from(["q4_k_m", "q5_k_m", "q8_0", "f16"]),
        "task": st.from_regex(r"[a-z0-9][a-z0-9-]{0,20}", fullmatch=True),
    }
)


@fixture_ok
@given(variant=manifest_variants, data=st.binary(min_size=1, max_size=64))
def test_valid_manifests_survive_sign_and_verify(fleet_keys, variant: dict, data: bytes) -> None:
    manifest = Manifest.model_validate(manifest_dict(data=data, **variant), strict=False)
    assert Manifest.from_json(manifest.to_json()) == manifest
    envelope = sign_envelope(manifest.to_json(), MANIFEST_PAYLOAD_TYPE, [fleet_keys.trainer])
    verified = verify_envelope(envelope, fleet_keys.keyring(), Role.TRAINER, MANIFEST_PAYLOAD_TYPE)
    assert Manifest.from_json(verified.payload) == manifest


@given(
    key=st.text(min_size=1, max_size=12).filter(lambda k: k not in Manifest.model_fields), value=st.integers()
)
def test_any_unknown_top_level_field_is_named(key: str, value: int) -> None:
    try:
        Manifest.from_json(json.dumps({**manifest_dict(), key: value}))
    except SchemaError as exc:
        assert "Extra inputs are not permitted" in str(exc)
    else:
        raise AssertionError(f"unknown field {key!r} was accepted")


@given(st.text(max_size=70))
def test_topic_ids_never_contain_mqtt_specials(value: str) -> None:
    try:
        topic = Topics("lab").status(value)
    except ContractError:
        return
    assert not set("+#/\0 ") & set(value)
    assert Topics("lab").parse(topic).device == value
