"""Adapter manifests over MQTT on a real daemon: the SmolLM2 base, then LoRA adapters deployed on it,
each with its own pointers, gate and rollback, served from the base's one worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from shared.artifacts import sha256_file
from tests.harness.edge import (
    TOPICS,
    ServingOptions,
    running_daemon,
    sign_command,
    sign_manifest,
    write_edge_config,
)
from tests.harness.load import LoadClients
from tests.harness.lora_fixture import write_lora
from tests.harness.waiting import wait_until

SMOL_RUNTIME = {"chat_format": "chatml", "n_ctx": 1024, "stop": ["<|im_end|>"]}
GEMMA_RUNTIME = {"chat_format": "gemma", "n_ctx": 1024, "stop": ["<end_of_turn>"]}
QUESTION = "Summarise: host 10.0.0.5 scanned 200 ports in 3 seconds, then connected to 10.0.0.9:4444."


class Device:
    def __init__(self, observer, server, keys, base_url: str) -> None:
        self.observer, self.server, self.keys, self.base_url = observer, server, keys, base_url

    def deploy(self, path: Path, serial: int, **overrides: Any) -> dict[str, Any]:
        envelope = sign_manifest(
            [self.keys.trainer], path.read_bytes(), self.server.add_file(path), serial=serial, **overrides
        )
        ends = len(self.observer.terminal_events())
        self.observer.publish(TOPICS.desired_fleet(), envelope)
        return self.observer.wait_terminal(ends + 1, timeout=180)[-1]

    def answer(self, model: str) -> str:
        body = {"model": model, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 24}
        reply = httpx.post(
            f"{self.base_url}/v1/chat/completions", json=body | {"temperature": 0}, timeout=120
        )
        assert reply.status_code == 200, reply.text
        return reply.json()["choices"][0]["message"]["content"]


def _adapter(
    name: str, channel: str, base: dict[str, Any], runtime=SMOL_RUNTIME, **extra: Any
) -> dict[str, Any]:
    return {
        "name": name,
        "channel": channel,
        "base": base,
        "runtime": runtime,
        "quantization": "f16",
        **extra,
    }


def _wait_on_trial(observer: Any, name: str, serial: int) -> None:
    wait_until(
        lambda: any(
            (e.get("manifest_name"), e["serial"], e["state"]) == (name, serial, "trial")
            for e in observer.unique_events()
        ),
        120,
        f"{name} serial {serial} on trial",
    )


def _base_ref(model: Path, server: Any) -> dict[str, Any]:
    """The ``base`` of an adapter manifest for ``model``, served by ``server``."""
    size, digest = sha256_file(model)
    return {"name": "smollm2-base", "sha256": digest, "size": size, "urls": [server.add_file(model)]}


def test_adapters_deploy_serve_and_roll_back_on_one_base(
    tmp_path, mqtt_broker, fleet_keys, artifact_server, observer, smollm2_model, gemma3_model
) -> None:
    options = ServingOptions(trial_s=10.0, crash_limit=1)
    config = write_edge_config(tmp_path / "device", mqtt_broker, fleet_keys.keyring(), serving=options)
    base = _base_ref(smollm2_model, artifact_server)
    loras = {seed: write_lora(tmp_path / f"lora-{seed}.gguf", smollm2_model, seed) for seed in (1, 2, 3, 4)}
    with running_daemon(config) as daemon:
        device = Device(observer, artifact_server, fleet_keys, options.base_url)
        end = device.deploy(smollm2_model, 1, name="smollm2-base", runtime=SMOL_RUNTIME)
        assert end["state"] == "committed", end
        assert (
            device.deploy(loras[1], 1, **_adapter("slips-summary", "summary", base))["state"] == "committed"
        )
        assert device.deploy(loras[2], 1, **_adapter("slips-risk", "risk", base))["state"] == "committed"
        router, ledger = daemon.data.router, daemon.control.ledger
        assert [a.name for a in router.adapters] == ["slips-risk", "slips-summary"]
        assert all(a.worker is router.active.worker for a in router.adapters)
        assert ledger.current().name == "smollm2-base" and ledger.adapter_slots() == [
            "slips-risk",
            "slips-summary",
        ]
        wait_until(
            lambda: (
                [a["name"] for a in observer.statuses[-1].get("adapters", [])]
                == ["slips-risk", "slips-summary"]
            ),
            30,
            "both adapters in the retained status",
        )
        first = device.answer("slips-summary")
        assert len({device.answer("smollm2-base"), first, device.answer("slips-risk")}) == 3

        # A new version of one adapter, while clients use it: no request fails, the base stays loaded.
        worker = router.active.worker
        with LoadClients(options.base_url, clients=4, model="slips-summary") as load:
            load.wait_for_requests(4)
            assert (
                device.deploy(loras[3], 2, **_adapter("slips-summary", "summary", base))["state"]
                == "committed"
            )
            load.wait_for_requests(4)
        assert load.failures() == [] and router.active.worker is worker
        assert ledger.current("slips-summary").serial == 2 and ledger.previous("slips-summary").serial == 1
        second = device.answer("slips-summary")
        assert second != first

        # An adapter for another base is refused before any download.
        gemma_size, gemma_digest = sha256_file(gemma3_model)
        gemma = base | {"name": "gemma3", "sha256": gemma_digest, "size": gemma_size}
        end = device.deploy(loras[4], 1, **_adapter("slips-triage", "triage", gemma))
        assert (end["state"], end["reason"].split(":")[0]) == ("rejected", "base-mismatch"), end
        assert artifact_server.bytes_sent(loras[4].name) == 0

        # An adapter version that fails its gate is not served; the others keep serving.
        slow = {"golden_prompts": ["Say hello."], "min_tokens_per_second": 1e6}
        end = device.deploy(loras[4], 3, **_adapter("slips-summary", "summary", base, health=slow))
        assert (end["state"], end["reason"].split(":")[0]) == ("failed", "health-gate-slow"), end
        assert ledger.current("slips-summary").serial == 2 and device.answer("slips-summary") == second
        risk = device.answer("slips-risk")

        # The operator rolls one adapter back; the base and the other adapter are untouched.
        command = {"action": "rollback", "adapter": "slips-summary"}
        response = observer.command(sign_command([fleet_keys.operator], command))
        assert response["ok"] is True, response
        assert ledger.current("slips-summary").serial == 1 and device.answer("slips-summary") == first
        assert ledger.current().serial == 1 and device.answer("slips-risk") == risk
        assert router.active.worker is worker
        command = {"action": "rollback", "adapter": "slips-triage"}
        refused = observer.command(sign_command([fleet_keys.operator], command))
        assert (
            refused["ok"] is False
            and "for adapter slips-triage: no previous version" in refused["result"]["message"]
        )

        # A version whose trial window sees the process crash goes back to the one before, on its own.
        ends = len(observer.terminal_events())
        url = artifact_server.add_file(loras[2])
        envelope = sign_manifest(
            [fleet_keys.trainer], loras[2].read_bytes(), url, serial=2, **_adapter("slips-risk", "risk", base)
        )
        observer.publish(TOPICS.desired_fleet(), envelope)
        _wait_on_trial(observer, "slips-risk", 2)
        os.kill(router.active.worker.pid, signal.SIGKILL)
        end = observer.wait_terminal(ends + 1, timeout=120)[-1]
        assert (end["state"], end["reason"].split(":")[0], end["serial"]) == (
            "rolled_back",
            "crash-loop",
            2,
        ), end
        wait_until(lambda: router.active.worker.alive, 120, "the restarted worker")
        assert ledger.current("slips-risk").serial == 1 and device.answer("slips-risk") == risk

    shown = subprocess.run(
        [sys.executable, "-m", "edge.cli", "status", "--config", str(config)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "COLUMNS": "200"},
    ).stdout
    assert "adapter of smollm2-base" in shown and "current adapter" in shown and "previous adapter" in shown

    # After a restart the base and both adapters are served again, each at its current version.
    with running_daemon(config) as daemon:
        served = lambda: [a.name for a in daemon.data.router.adapters]  # noqa: E731
        wait_until(lambda: served() == ["slips-risk", "slips-summary"], 120, "both adapters served again")
        assert (device.answer("slips-summary"), device.answer("slips-risk")) == (
            first,
            risk,
        )  # as rolled back


def test_fleet_adapters_apply_on_a_base_set_for_the_device_alone(
    tmp_path, mqtt_broker, fleet_keys, artifact_server, observer, smollm2_model
) -> None:
    """Desired state is per level, and the device's own level wins; but the model and each adapter
    are separate wants. A base set on the device's topic must not hide the fleet's adapters, and two
    adapters published back to back on one topic (the second replaces the first as the retained
    message) are both deployed."""
    options = ServingOptions(trial_s=0.0)
    config = write_edge_config(tmp_path / "device", mqtt_broker, fleet_keys.keyring(), serving=options)
    size, digest = sha256_file(smollm2_model)
    url = artifact_server.add_file(smollm2_model)
    base = {"name": "smollm2-base", "sha256": digest, "size": size, "urls": [url]}
    loras = {seed: write_lora(tmp_path / f"lora-{seed}.gguf", smollm2_model, seed) for seed in (1, 2)}
    with running_daemon(config) as daemon:
        envelope = sign_manifest(
            [fleet_keys.trainer], smollm2_model.read_bytes(), url, serial=1, name="smollm2-base",
            runtime=SMOL_RUNTIME,
        )  # fmt: skip
        observer.publish(TOPICS.desired_device("pi-1"), envelope)
        assert observer.wait_terminal(1, timeout=180)[-1]["state"] == "committed"
        for seed, name in ((1, "slips-summary"), (2, "slips-risk")):
            adapter = _adapter(name, name.removeprefix("slips-"), base)
            lora = loras[seed]
            signed = sign_manifest(
                [fleet_keys.trainer], lora.read_bytes(), artifact_server.add_file(lora), serial=1, **adapter
            )
            observer.publish(TOPICS.desired_fleet(), signed)
        ends = observer.wait_terminal(3, timeout=180)
        assert sorted((e["manifest_name"], e["state"]) for e in ends[1:]) == [
            ("slips-risk", "committed"),
            ("slips-summary", "committed"),
        ], ends
        assert [a.name for a in daemon.data.router.adapters] == ["slips-risk", "slips-summary"]
        assert Device(observer, artifact_server, fleet_keys, options.base_url).answer("slips-risk")


def test_adapters_follow_their_base_through_a_new_version_and_its_rollback(
    tmp_path, mqtt_broker, fleet_keys, artifact_server, observer, smollm2_model
) -> None:
    """A new version of the base (same file, new serial and profile) runs in a new worker: the
    adapters made for that file are served on it during its trial; when its trial fails, the old
    worker comes back, and so do the adapters on it."""
    options = ServingOptions(trial_s=15.0, crash_limit=1)
    config = write_edge_config(tmp_path / "device", mqtt_broker, fleet_keys.keyring(), serving=options)
    base = _base_ref(smollm2_model, artifact_server)
    lora = write_lora(tmp_path / "lora-1.gguf", smollm2_model, 1)
    with running_daemon(config) as daemon:
        device = Device(observer, artifact_server, fleet_keys, options.base_url)
        assert (
            device.deploy(smollm2_model, 1, name="smollm2-base", runtime=SMOL_RUNTIME)["state"] == "committed"
        )
        assert device.deploy(lora, 1, **_adapter("slips-summary", "summary", base))["state"] == "committed"
        first = device.answer("slips-summary")
        router = daemon.data.router
        old_worker = router.active.worker

        ends = len(observer.terminal_events())
        envelope = sign_manifest(
            [fleet_keys.trainer], smollm2_model.read_bytes(), artifact_server.add_file(smollm2_model),
            serial=2, name="smollm2-base", runtime=SMOL_RUNTIME | {"n_ctx": 2048},
        )  # fmt: skip
        observer.publish(TOPICS.desired_fleet(), envelope)
        _wait_on_trial(observer, "smollm2-base", 2)
        assert router.active.worker is not old_worker
        assert [a.name for a in router.adapters] == ["slips-summary"], "the adapter left with the old base"
        assert device.answer("slips-summary") == first

        os.kill(router.active.worker.pid, signal.SIGKILL)
        end = observer.wait_terminal(ends + 1, timeout=120)[-1]
        assert (end["state"], end["serial"]) == ("rolled_back", 2), end
        wait_until(lambda: router.active.worker is old_worker, 60, "the old base back")
        assert [a.name for a in router.adapters] == ["slips-summary"], "the adapter did not come back"
        assert device.answer("slips-summary") == first


def test_an_adapter_published_before_its_base_deploys_once_that_base_is_served(
    tmp_path, mqtt_broker, fleet_keys, artifact_server, observer, smollm2_model, gemma3_model
) -> None:
    """An adapter for a base the device does not serve is refused (base-mismatch) but not forgotten:
    once the device serves that base (a new model, or an operator's rollback to it), the retained
    desired state is tried again and the adapter goes through its own checks and trial, with
    nothing published again."""
    options = ServingOptions(trial_s=0.0)
    config = write_edge_config(tmp_path / "device", mqtt_broker, fleet_keys.keyring(), serving=options)
    lora = write_lora(tmp_path / "lora-1.gguf", smollm2_model, 1)
    with running_daemon(config) as daemon:
        device = Device(observer, artifact_server, fleet_keys, options.base_url)
        gemma = sign_manifest(
            [fleet_keys.trainer], gemma3_model.read_bytes(), artifact_server.add_file(gemma3_model),
            serial=1, name="gemma-base", runtime=GEMMA_RUNTIME,
        )  # fmt: skip
        observer.publish(TOPICS.desired_device("pi-1"), gemma)
        assert observer.wait_terminal(1, timeout=180)[-1]["state"] == "committed"
        base = _base_ref(smollm2_model, artifact_server)
        end = device.deploy(lora, 1, **_adapter("slips-summary", "summary", base))
        assert (end["state"], end["reason"].split(":")[0]) == ("rejected", "base-mismatch"), end

        smol = sign_manifest(
            [fleet_keys.trainer], smollm2_model.read_bytes(), base["urls"][0], serial=2,
            name="smollm2-base", runtime=SMOL_RUNTIME,
        )  # fmt: skip
        observer.publish(TOPICS.desired_device("pi-1"), smol)
        ends = observer.wait_terminal(4, timeout=180)
        assert [(e["manifest_name"], e["state"]) for e in ends[2:]] == [
            ("smollm2-base", "committed"),
            ("slips-summary", "committed"),
        ], ends
        assert [a.name for a in daemon.data.router.adapters] == ["slips-summary"]
        assert device.answer("slips-summary")

        # An adapter for the Gemma base waits too, until the operator rolls the device back to it.
        gemma_lora = write_lora(tmp_path / "lora-gemma.gguf", gemma3_model, 2)
        gemma_base = _base_ref(gemma3_model, artifact_server) | {"name": "gemma-base"}
        adapter = _adapter("gemma-summary", "gemma-summary", gemma_base, runtime=GEMMA_RUNTIME)
        end = device.deploy(gemma_lora, 1, **adapter)
        assert (end["state"], end["reason"].split(":")[0]) == ("rejected", "base-mismatch"), end
        response = observer.command(sign_command([fleet_keys.operator], {"action": "rollback"}))
        assert response["ok"] is True, response
        wait_until(
            lambda: (
                ("gemma-summary", "committed")
                in {(e["manifest_name"], e["state"]) for e in observer.terminal_events()}
            ),
            180,
            "the Gemma adapter committed",
        )
        assert [a.name for a in daemon.data.router.adapters] == ["gemma-summary"]
        assert device.answer("gemma-summary")
