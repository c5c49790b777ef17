"""Adapter manifests: a LoRA adapter is admitted only with the base it was exported against, and a
model manifest cannot smuggle an adapter in (or the other way round)."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import pytest
from pydantic import ValidationError

from shared.admission import AdmissionInput, FileFacts, admit_files
from shared.errors import ArtifactError
from shared.gguf import BASE_SHA256_KEY, DEFAULT_ARCHITECTURES, read_gguf_header
from tests.factories import gguf_bytes, manifest

BASE_SHA = hashlib.sha256(b"the base GGUF").hexdigest()
OTHER_SHA = hashlib.sha256(b"another base").hexdigest()
BASE = {"name": "smollm2-135m", "sha256": BASE_SHA, "size": 1000, "urls": ["http://127.0.0.1:8080/base.gguf"]}


def _string(value: str) -> bytes:
    return struct.pack("<Q", len(value)) + value.encode()


def _gguf(tmp_path: Path, kind: str, base_sha256: str | None = None, adapter_type: str = "lora") -> Path:
    kvs = [("general.architecture", 8, _string("llama")), ("general.type", 8, _string(kind))]
    if kind == "adapter":
        kvs.append(("adapter.type", 8, _string(adapter_type)))
    if base_sha256 is not None:
        kvs.append((BASE_SHA256_KEY, 8, _string(base_sha256)))
    path = tmp_path / f"{kind}.gguf"
    path.write_bytes(gguf_bytes(kvs=kvs, padding=64))
    return path


def _admit(path: Path, **overrides: object) -> None:
    data = path.read_bytes()
    described = manifest(data=data, **overrides)
    facts = FileFacts(
        len(data), hashlib.sha256(data).hexdigest(), read_gguf_header(path, DEFAULT_ARCHITECTURES)
    )
    given = AdmissionInput(files={"model.gguf": facts}, allowed_architectures=DEFAULT_ARCHITECTURES)
    admit_files(described, given)


def test_an_adapter_bound_to_its_base_is_admitted(tmp_path: Path) -> None:
    path = _gguf(tmp_path, "adapter", BASE_SHA)
    header = read_gguf_header(path)
    assert (header.kind, header.adapter_type, header.base_sha256) == ("adapter", "lora", BASE_SHA)
    _admit(path, base=BASE)
    assert manifest(base=BASE).is_adapter and not manifest().is_adapter


@pytest.mark.parametrize(
    ("kind", "bound_to", "base", "reason", "needle"),
    [
        ("adapter", OTHER_SHA, BASE, "base-mismatch", f"exported against base sha256 {OTHER_SHA}"),
        ("adapter", None, BASE, "base-mismatch", "(not recorded)"),
        ("model", None, BASE, "not-an-adapter", "is a GGUF 'model'"),
        ("adapter", BASE_SHA, None, "not-a-model", "an adapter needs a manifest naming its base"),
    ],
)
def test_a_file_that_does_not_match_its_manifest_is_refused(
    tmp_path: Path, kind: str, bound_to: str | None, base: dict | None, reason: str, needle: str
) -> None:
    path = _gguf(tmp_path, kind, bound_to)
    with pytest.raises(ArtifactError) as refused:
        _admit(path, **({"base": base} if base else {}))
    assert refused.value.reason == reason and needle in str(refused.value)


def test_a_non_lora_adapter_is_refused(tmp_path: Path) -> None:
    path = _gguf(tmp_path, "adapter", BASE_SHA, adapter_type="control-vector")
    with pytest.raises(ArtifactError, match=r"\(control-vector\)") as refused:
        _admit(path, base=BASE)
    assert refused.value.reason == "not-an-adapter"


def test_an_adapter_cannot_name_itself_as_base() -> None:
    own = hashlib.sha256(b"GGUF-test-bytes").hexdigest()
    with pytest.raises(ValidationError, match="an adapter cannot be its own base"):
        manifest(base=BASE | {"sha256": own})
    with pytest.raises(ValidationError, match="urls"):
        manifest(base=BASE | {"urls": []})
