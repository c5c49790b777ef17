"""`immune-fleet` end to end, as an operator runs it: real processes, real files."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "shared.fleet.cli"]


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
    (tmp_path / "model.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(range(256)) * 64)
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
    for key in (fleet / "keys").glob("*.key"):
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
    assert "REJECTED (not-gguf)" in one_line_rejection(result)
