"""``immune-edge install``, ``verify`` and ``status``: the offline path through the same checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from shared.gguf import BASE_SHA256_KEY
from tests.factories import gguf_bytes
from tests.harness.broker import Mosquitto
from tests.harness.edge import OTHER_ARCH, digest, sign_manifest, write_edge_config
from tests.test_adapter_contract import _string
from tests.test_edge_daemon import _tampered, model_blob


def immune_edge(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )


@pytest.fixture
def setup(tmp_path, fleet_keys, artifact_server):
    # The daemon is not running: install and verify need no broker (the config still names one).
    config = write_edge_config(tmp_path / "device", Mosquitto(tmp_path / "unused"), fleet_keys.keyring())
    data = model_blob("usb")
    model = tmp_path / "model.gguf"
    model.write_bytes(data)
    manifest = tmp_path / "manifest.dsse.json"
    manifest.write_bytes(
        sign_manifest([fleet_keys.trainer], data, artifact_server.add("usb.gguf", data), serial=3)
    )
    return config, model, manifest, data


def test_install_from_a_local_file_then_already_installed(setup, artifact_server) -> None:
    config, model, manifest, data = setup
    first = immune_edge("install", manifest, "--artifact", model, "--config", config)
    assert first.returncode == 0, first.stderr
    assert "committed" in first.stdout
    assert not [r for r in artifact_server.requests if r.method == "GET"]  # nothing downloaded
    again = immune_edge("install", manifest, "--artifact", model, "--config", config)
    assert again.returncode == 0 and "already-installed" in again.stdout
    status = immune_edge("status", "--config", config)
    assert status.returncode == 0 and "current" in status.stdout and digest(data)[:16] in status.stdout


def test_the_same_serial_signed_again_with_other_contents_is_refused(setup, fleet_keys, tmp_path) -> None:
    """Found by the MQTT fuzz test: a trainer-signed manifest reusing the installed serial with
    other contents (another runtime profile) was taken for the installed one and silently ignored."""
    config, model, manifest, data = setup
    assert immune_edge("install", manifest, "--artifact", model, "--config", config).returncode == 0
    changed = tmp_path / "changed.dsse.json"
    url = "http://127.0.0.1:9/usb.gguf"
    runtime = {"chat_format": "llama-3", "n_ctx": 2048}
    changed.write_bytes(sign_manifest([fleet_keys.trainer], data, url, serial=3, runtime=runtime))
    again = immune_edge("install", changed, "--artifact", model, "--config", config)
    assert again.returncode == 2, again.stdout + again.stderr
    assert "serial-reused" in again.stdout and "serial 3" in again.stdout


def test_install_downloads_when_no_artifact_is_given(setup, artifact_server) -> None:
    config, _, manifest, data = setup
    result = immune_edge("install", manifest, "--config", config)
    assert result.returncode == 0, result.stderr
    assert "committed" in result.stdout
    assert [(r.name, r.status) for r in artifact_server.requests if r.method == "GET"] == [("usb.gguf", 200)]
    assert artifact_server.bytes_sent("usb.gguf") == len(data)


def test_install_refuses_a_file_that_does_not_match(setup, tmp_path) -> None:
    config, _, manifest, data = setup
    wrong = tmp_path / "wrong.gguf"
    wrong.write_bytes(data[:-1] + b"?")
    result = immune_edge("install", manifest, "--artifact", wrong, "--config", config)
    assert result.returncode == 2  # refused: the same input will never install
    assert "rejected" in result.stdout and "hash-mismatch" in result.stdout
    assert not list((tmp_path / "device" / "state" / "store" / "sha256").iterdir())


def test_install_exit_status_tells_refused_from_retry_later(
    setup, tmp_path, fleet_keys, artifact_server
) -> None:
    """0 installed, 2 refused (do not retry), 75 could not finish now (retry), 1 bad invocation."""
    config, model, manifest, data = setup

    def install(envelope: bytes, *extra: str | Path) -> subprocess.CompletedProcess[str]:
        path = tmp_path / "case.dsse.json"
        path.write_bytes(envelope)
        return immune_edge("install", path, "--config", config, *extra)

    url = artifact_server.add("u.gguf", data)
    refused = {
        "bad-signature": _tampered(sign_manifest([fleet_keys.trainer], data, url, serial=8)),
        "unknown-key": sign_manifest([fleet_keys.stranger], data, url, serial=8),
        "incompatible-arch": sign_manifest(
            [fleet_keys.trainer], data, url, serial=8, compatibility={"cpu_arch": [OTHER_ARCH]}
        ),
        "bad-gguf": sign_manifest(
            [fleet_keys.trainer], b"PK" + data[2:], artifact_server.add("z.gguf", b"PK" + data[2:]), serial=8
        ),
    }
    for reason, envelope in refused.items():
        result = install(envelope)
        assert result.returncode == 2, (reason, result.stdout + result.stderr)
        assert reason in result.stdout, (reason, result.stdout)
    dead_link = sign_manifest([fleet_keys.trainer], data, "http://127.0.0.1:9/gone.gguf", serial=8)
    result = install(dead_link)
    assert result.returncode == 75, result.stdout + result.stderr
    assert "failed" in result.stdout and "download-failed" in result.stdout
    assert immune_edge("install", manifest, "--artifact", model, "--config", config).returncode == 0
    older = sign_manifest([fleet_keys.trainer], data, url, serial=2)
    result = install(older)
    assert result.returncode == 2 and "serial-not-newer" in result.stdout
    assert immune_edge("install", tmp_path / "absent.json", "--config", config).returncode == 1


def test_verify_explains_each_check(setup, tmp_path, fleet_keys, artifact_server) -> None:
    config, model, manifest, data = setup
    ok = immune_edge("verify", manifest, model, "--config", config)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    for check in ("signature, schema, expiry", "serial", "compatibility", "size and sha256", "GGUF header"):
        assert check in ok.stdout
    assert "FAIL" not in ok.stdout

    short = tmp_path / "short.gguf"
    short.write_bytes(data[:100])
    result = immune_edge("verify", manifest, short, "--keyring", tmp_path / "device" / "keyring.json")
    assert result.returncode == 1
    assert "size-mismatch" in result.stdout and "skipped" in result.stdout

    arm_only = tmp_path / "other-arch.dsse.json"
    arm_only.write_bytes(
        sign_manifest(
            [fleet_keys.trainer],
            data,
            artifact_server.add("a.gguf", data),
            serial=4,
            compatibility={"cpu_arch": [OTHER_ARCH]},
        )
    )
    result = immune_edge("verify", arm_only, model, "--config", config)
    assert result.returncode == 1 and "incompatible-arch" in result.stdout

    forged = tmp_path / "forged.dsse.json"
    forged.write_bytes(sign_manifest([fleet_keys.stranger], data, "http://127.0.0.1:9/x.gguf", serial=5))
    result = immune_edge("verify", forged, model, "--config", config)
    assert result.returncode == 1 and "unknown-key" in result.stdout


def test_bad_config_is_named(tmp_path) -> None:
    config = tmp_path / "edge.toml"
    config.write_text('[device]\nid = "pi-1"\nfleet = "lab"\ncolour = "blue"\n')
    result = immune_edge("status", "--config", config)
    assert result.returncode == 1
    assert "device.colour" in result.stderr


def test_verify_applies_the_base_binding_the_device_applies(setup, tmp_path, fleet_keys) -> None:
    """Bug: ``verify --config`` passed an adapter whose base this device does not serve (the
    deployer refuses it as base-mismatch): the check order was written twice and verify's copy
    lacked the step."""
    config, model, manifest, data = setup
    assert immune_edge("install", manifest, "--artifact", model, "--config", config).returncode == 0
    other_base = "b" * 64
    kvs = [
        ("general.architecture", 8, _string("llama")),
        ("general.type", 8, _string("adapter")),
        ("adapter.type", 8, _string("lora")),
        (BASE_SHA256_KEY, 8, _string(other_base)),
    ]
    adapter_bytes = gguf_bytes(kvs=kvs, padding=64)
    adapter = tmp_path / "adapter.gguf"
    adapter.write_bytes(adapter_bytes)
    base = {"name": "another-base", "sha256": other_base, "size": 1000, "urls": ["http://127.0.0.1:9/b.gguf"]}
    signed = tmp_path / "adapter.dsse.json"

    def sign(data: bytes, base: dict[str, object]) -> None:
        url = "http://127.0.0.1:9/a.gguf"
        signed.write_bytes(
            sign_manifest([fleet_keys.trainer], data, url, serial=4, base=base, name="summary-lora")
        )

    sign(adapter_bytes, base)
    result = immune_edge("verify", signed, adapter, "--config", config)
    assert result.returncode == 1, result.stdout
    assert "base-mismatch" in result.stdout and digest(data) in result.stdout
    installed = immune_edge("install", signed, "--artifact", adapter, "--config", config)
    assert installed.returncode == 2 and "base-mismatch" in installed.stdout

    # The same adapter made for the base this device serves passes verify.
    kvs[-1] = (BASE_SHA256_KEY, 8, _string(digest(data)))
    adapter.write_bytes(fitting := gguf_bytes(kvs=kvs, padding=64))
    base = {**base, "name": "usb", "sha256": digest(data), "size": len(data)}
    sign(fitting, base)
    result = immune_edge("verify", signed, adapter, "--config", config)
    assert result.returncode == 0, result.stdout
