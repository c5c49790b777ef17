"""Manifest schema: complete, strict, and errors that name the field."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from shared.admission import verify_manifest
from shared.errors import SchemaError, SignatureError
from shared.manifest import MANIFEST_PAYLOAD_TYPE, Manifest
from shared.signing import sign_envelope
from tests.factories import NOW, manifest, manifest_dict


def parse(data: dict) -> Manifest:
    return Manifest.from_json(json.dumps(data))


def test_valid_manifest_round_trips() -> None:
    original = manifest()
    assert Manifest.from_json(original.to_json()) == original
    assert original.model_file.name == "model.gguf"


def test_unknown_field_is_named() -> None:
    with pytest.raises(SchemaError, match="manifest: runtime.n_gpu: Extra inputs are not permitted"):
        data = manifest_dict()
        data["runtime"]["n_gpu"] = 1
        parse(data)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("serial", "7", "manifest: serial: Input should be a valid integer"),
        ("serial", True, "manifest: serial: Input should be a valid integer"),
        ("serial", 0, "manifest: serial: Input should be greater than or equal to 1"),
        ("quantization", "q9_x", "manifest: quantization: Input should be"),
        ("task", "Slips Summary", "manifest: task: Value error, 'Slips Summary' is not a valid task profile"),
        ("created_at", "2026-11-24T12:00:00", "manifest: created_at: Input should have timezone info"),
    ],
)
def test_wrong_types_are_named(field: str, value: object, message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        parse(manifest_dict(**{field: value}))


@pytest.mark.parametrize("name", ["../model.gguf", "models/model.gguf", "..", "a\\b.gguf", "x..gguf"])
def test_artifact_name_with_path_separator_or_dotdot_is_rejected(name: str) -> None:
    data = manifest_dict()
    data["files"][0]["name"] = name
    with pytest.raises(SchemaError, match="manifest: files.0.name: .*must be a plain file name"):
        parse(data)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("sha256", "ABC", "files.0.sha256: .*64 lowercase hexadecimal"),
        ("size", 0, "files.0.size: Input should be greater than 0"),
        ("urls", ["file:///etc/passwd"], "files.0.urls.0: URL scheme should be 'http' or 'https'"),
        ("urls", ["http://user:pw@host/m.gguf"], "files.0.urls.0: .*must not carry credentials"),
        ("urls", [], "files.0.urls: List should have at least 1 item"),
    ],
)
def test_bad_file_entries_are_named(key: str, value: object, message: str) -> None:
    data = manifest_dict()
    data["files"][0][key] = value
    with pytest.raises(SchemaError, match=message):
        parse(data)


def test_exactly_one_model_file() -> None:
    data = manifest_dict()
    data["files"].append({**data["files"][0], "name": "second.gguf"})
    with pytest.raises(SchemaError, match="exactly one entry with role 'model', found 2"):
        parse(data)


def test_expiry_must_follow_creation() -> None:
    with pytest.raises(SchemaError, match="expires_at must be later than created_at"):
        parse(manifest_dict(expires_at=(NOW - timedelta(seconds=1)).isoformat()))


def test_chat_format_and_template_are_exclusive() -> None:
    data = manifest_dict()
    data["runtime"]["chat_template"] = "{{ messages }}"
    with pytest.raises(SchemaError, match="either chat_format or chat_template"):
        parse(data)


def test_oversized_manifest_is_refused_before_parsing() -> None:
    data = manifest_dict()
    data["runtime"]["system_prompt"] = "x" * (300 * 1024)
    with pytest.raises(SchemaError, match="exceeds the limit of 262144 bytes") as err:
        parse(data)
    assert err.value.reason == "too-large"


def test_signed_manifest_opens_and_expired_one_is_rejected(fleet_keys) -> None:
    envelope = sign_envelope(manifest().to_json(), MANIFEST_PAYLOAD_TYPE, [fleet_keys.trainer])
    keyring = fleet_keys.keyring()
    assert verify_manifest(envelope, keyring, now=NOW).serial == 7
    with pytest.raises(SchemaError, match="manifest slips-summary-smol serial 7: expired at") as err:
        verify_manifest(envelope, keyring, now=NOW + timedelta(days=31))
    assert err.value.reason == "expired"


def test_manifest_schema_errors_come_only_after_signature_checks(fleet_keys) -> None:
    # An unsigned (stranger-signed) garbage payload is refused for its signature, never parsed.
    envelope = sign_envelope(b"not json at all", MANIFEST_PAYLOAD_TYPE, [fleet_keys.stranger])
    with pytest.raises(SignatureError, match="unknown key"):
        verify_manifest(envelope, fleet_keys.keyring(), now=NOW)
