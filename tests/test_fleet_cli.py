"""`immune-fleet` end to end, as an operator runs it: real processes, real files."""

from __future__ import annotations

import json
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from shared.artifacts import sha256_file
from shared.manifest import Manifest
from tests.factories import gguf_bytes
from tests.harness.lora_fixture import write_lora

CLI = [sys.executable, "-m", "fleet.cli"]


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=60)


@pytest.fixture
def fleet(tmp_path: Path) -> Path:
    for role, name in (("root", "root1"), ("trainer", "trainer1"), ("operator", "op1")):
        assert (
            run("keys", "generate", "--role", role, "--name", name, "--dir", "keys", cwd=tmp_path).returncode
            == 0
        )
    pubs = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "keys").glob("*.pub.json"))
    assert run("keyring", "create", *pubs, "-o", "keyring.json", cwd=tmp_path).returncode == 0
    # A GGUF header declaring Q4_K_M (general.file_type 15), then filler.
    kvs = [
        ("general.architecture", 8, struct.pack("<Q", 5) + b"llama"),
        ("general.file_type", 4, struct.pack("<I", 15)),
    ]
    (tmp_path / "model.gguf").write_bytes(gguf_bytes(kvs=kvs) + bytes(range(256)) * 64)
    created = run(
        "manifest",
        "create",
        "model.gguf",
        "--name",
        "slips/smol:q4_k_m",
        "--serial",
        "5",
        "--url",
        "http://127.0.0.1:9/model.gguf",
        "--chat-format",
        "chatml",
        "--stop",
        "<|im_end|>",
        "-o",
        "manifest.json",
        cwd=tmp_path,
    )
    assert created.returncode == 0, created.stderr
    return tmp_path


def test_generated_private_keys_are_0600(fleet: Path) -> None:
    keys = sorted((fleet / "keys").glob("*.key"))
    assert [key.name for key in keys] == ["op1.key", "root1.key", "trainer1.key"]
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    shown = run("keys", "show", "keyring.json", cwd=fleet)
    assert shown.returncode == 0 and "trainer1" in shown.stdout


def test_manifest_create_records_exact_size_and_hash(fleet: Path) -> None:
    manifest = json.loads((fleet / "manifest.json").read_text())
    import hashlib

    data = (fleet / "model.gguf").read_bytes()
    assert manifest["files"][0]["size"] == len(data)
    assert manifest["files"][0]["sha256"] == hashlib.sha256(data).hexdigest()
    assert manifest["runtime"]["stop"] == ["<|im_end|>"]


def _create(cwd: Path, model: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return run(
        "manifest", "create", model, "--name", "smol", "--serial", "1", "--url", "http://127.0.0.1:9/m.gguf",
        "--chat-format", "chatml", "-o", "m.json", "--force", *extra, cwd=cwd,
    )  # fmt: skip


def test_manifest_create_reads_the_quantization_and_derives_min_ram(tmp_path: Path, smollm2_model) -> None:
    """Bug: --quantization defaulted to q4_k_m whatever the file was, and min_ram_mb to 0."""
    created = _create(tmp_path, smollm2_model, "--n-ctx", "4096")
    assert created.returncode == 0, created.stderr
    manifest = json.loads((tmp_path / "m.json").read_text())
    assert manifest["quantization"] == "q4_1"  # SmolLM2-135M-Instruct.Q4_1.gguf
    size_mib = smollm2_model.stat().st_size / 2**20
    # 30 layers x 3 KV heads x (64 + 64) x 2 bytes x 4096 tokens = 90 MiB of KV cache beyond the weights.
    assert size_mib + 90 < manifest["compatibility"]["min_ram_mb"] < size_mib + 90 + 256
    smaller = _create(tmp_path, smollm2_model, "--n-ctx", "1024")
    assert smaller.returncode == 0
    assert (
        json.loads((tmp_path / "m.json").read_text())["compatibility"]["min_ram_mb"]
        < manifest["compatibility"]["min_ram_mb"]
    )


def test_manifest_create_refuses_a_quantization_the_file_contradicts(tmp_path: Path, smollm2_model) -> None:
    refused = _create(tmp_path, smollm2_model, "--quantization", "q4_k_m")
    line = one_line_rejection(refused)
    assert line.startswith("REJECTED (quantization-mismatch)") and "is q4_1" in line, line
    assert not (tmp_path / "m.json").exists()
    given = _create(tmp_path, smollm2_model, "--quantization", "q4_1", "--min-ram-mb", "512")
    assert given.returncode == 0
    assert json.loads((tmp_path / "m.json").read_text())["compatibility"]["min_ram_mb"] == 512


def test_manifest_create_binds_an_adapter_to_its_base(tmp_path: Path, smollm2_model) -> None:
    adapter = write_lora(tmp_path / "risk.gguf", smollm2_model, seed=1)
    base = ("--base-file", str(smollm2_model), "--base-url", "http://mirror.lan/base.gguf")
    created = _create(tmp_path, adapter, *base)
    assert created.returncode == 0, created.stderr
    manifest = Manifest.model_validate_json((tmp_path / "m.json").read_text())
    assert manifest.is_adapter and manifest.base.sha256 == sha256_file(smollm2_model)[1]
    assert manifest.base.size == smollm2_model.stat().st_size and manifest.quantization.value == "f16"
    missing = one_line_rejection(_create(tmp_path, adapter))
    assert missing.startswith("REJECTED (missing-base)"), missing
    other = tmp_path / "other-base.gguf"
    other.write_bytes(smollm2_model.read_bytes()[:4096])
    wrong = one_line_rejection(
        _create(tmp_path, adapter, "--base-file", str(other), "--base-url", "http://x/b")
    )
    assert wrong.startswith("REJECTED (base-mismatch)"), wrong
    not_adapter = one_line_rejection(_create(tmp_path, smollm2_model, *base))
    assert not_adapter.startswith("REJECTED (not-an-adapter)"), not_adapter
    alone = one_line_rejection(_create(tmp_path, adapter, "--base-file", str(smollm2_model)))
    assert alone.startswith("REJECTED (bad-option)"), alone


def test_sign_then_verify_with_artifact(fleet: Path) -> None:
    assert (
        run("sign", "manifest.json", "--key", "keys/trainer1.key", "-o", "m.dsse", cwd=fleet).returncode == 0
    )
    ok = run("verify", "m.dsse", "--keyring", "keyring.json", "--artifact", "model.gguf", cwd=fleet)
    assert ok.returncode == 0, ok.stderr
    assert "OK: manifest slips/smol:q4_k_m serial 5" in ok.stdout


def one_line_rejection(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_verify_rejects_tampered_artifact_and_wrong_signer(fleet: Path) -> None:
    run("sign", "manifest.json", "--key", "keys/trainer1.key", "-o", "m.dsse", cwd=fleet)
    with (fleet / "model.gguf").open("r+b") as handle:
        handle.seek(100)
        handle.write(b"\xff")
    line = one_line_rejection(
        run("verify", "m.dsse", "--keyring", "keyring.json", "--artifact", "model.gguf", cwd=fleet)
    )
    assert line.startswith("REJECTED (hash-mismatch): artifact model.gguf: sha256 is")

    run("sign", "manifest.json", "--key", "keys/op1.key", "-o", "op.dsse", cwd=fleet)
    line = one_line_rejection(run("verify", "op.dsse", "--keyring", "keyring.json", cwd=fleet))
    assert "REJECTED (wrong-role)" in line and "has role operator, not trainer" in line


def test_sign_refuses_invalid_payloads_and_loose_keys(fleet: Path) -> None:
    (fleet / "bad.json").write_text('{"name": "x"}')
    line = one_line_rejection(
        run("sign", "bad.json", "--key", "keys/trainer1.key", "-o", "x.dsse", cwd=fleet)
    )
    assert "REJECTED (schema): bad.json: channel: Field required" in line
    (fleet / "keys" / "trainer1.key").chmod(0o640)
    line = one_line_rejection(
        run("sign", "manifest.json", "--key", "keys/trainer1.key", "-o", "y.dsse", cwd=fleet)
    )
    assert "REJECTED (key-permissions)" in line


def test_keyring_update_is_signed_and_verified(fleet: Path) -> None:
    pubs = sorted(str(p.relative_to(fleet)) for p in (fleet / "keys").glob("*.pub.json"))
    assert (
        run("keyring", "create", *pubs, "--version", "2", "-o", "keyring-v2.json", cwd=fleet).returncode == 0
    )
    signed = run(
        "sign", "keyring-v2.json", "--type", "keyring", "--key", "keys/root1.key", "-o", "k2.dsse", cwd=fleet
    )
    assert signed.returncode == 0, signed.stderr
    ok = run("verify", "k2.dsse", "--type", "keyring", "--keyring", "keyring.json", cwd=fleet)
    assert ok.returncode == 0 and "keyring update to version 2" in ok.stdout
    # Replaying the same update against the new keyring is refused.
    replay = run("verify", "k2.dsse", "--type", "keyring", "--keyring", "keyring-v2.json", cwd=fleet)
    assert "version 2 is not greater than the current version 2" in one_line_rejection(replay)


def test_manifest_create_refuses_a_non_gguf_file(fleet: Path) -> None:
    (fleet / "notes.txt").write_text("hello")
    result = run(
        "manifest",
        "create",
        "notes.txt",
        "--name",
        "x",
        "--serial",
        "1",
        "--url",
        "http://h/x",
        "-o",
        "x.json",
        cwd=fleet,
    )
    assert "REJECTED (bad-gguf): notes.txt: not an acceptable GGUF file: magic bytes" in one_line_rejection(
        result
    )
