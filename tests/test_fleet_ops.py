"""`immune-fleet` against three real `immune-edge run` processes (own ids and state dirs) on a real
mosquitto: staged rollouts wave by wave, a canary that fails its health gate halts the rollout,
fleet rollback, telemetry from every device, history, and the HTML report in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.artifacts import sha256_file
from shared.signing import generate_key, write_private_key
from tests.conftest import FleetKeys
from tests.harness.artifact_server import ArtifactServer
from tests.harness.broker import Mosquitto
from tests.harness.edge import (
    FLEET,
    TOPICS,
    FleetObserver,
    ServingOptions,
    retained_message,
    sign_manifest,
    write_edge_config,
)
from tests.harness.lora_fixture import write_lora
from tests.harness.models import smollm2_gguf
from tests.harness.waiting import wait_until

DEVICES = ("pi-a", "pi-b", "pi-c")
GROUP = "lab-group"
FLEET_CLI = [sys.executable, "-m", "fleet.cli"]
EDGE_CLI = [sys.executable, "-m", "edge.cli"]


@dataclass
class Fleet:
    root: Path
    broker: Mosquitto
    server: ArtifactServer
    keys: FleetKeys
    observer: FleetObserver
    operator_config: Path
    model: Path
    apis: dict[str, str]

    def envelope(self, serial: int, file: Path | None = None, **overrides: Any) -> Path:
        """A signed manifest for ``file`` (the fleet's model unless given)."""
        file = file or self.model
        path = self.root / f"manifest-{file.stem}-{serial}.dsse.json"
        url = self.server.add_file(file)
        path.write_bytes(
            sign_manifest([self.keys.trainer], file.read_bytes(), url, serial=serial, **overrides)
        )
        return path

    def cli(self, *args: str | Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*FLEET_CLI, *map(str, args), "--config", str(self.operator_config)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def status(self) -> dict[str, dict[str, Any]]:
        result = self.cli("status", "--json", "--wait", "2")
        assert result.returncode == 0, result.stderr
        return {row["device"]: row for row in json.loads(result.stdout)}

    def committed(self, device: str, serial: int) -> dict[str, Any] | None:
        return next(
            (
                e
                for e in self.observer.unique_events()
                if e["device_id"] == device and e["serial"] == serial and e["state"] == "committed"
            ),
            None,
        )


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("fleet")
    keys = FleetKeys(*(generate_key() for _ in range(6)))
    write_private_key(keys.operator, root / "operator.key")
    with Mosquitto(root / "broker") as broker, ArtifactServer(root / "artifacts") as server:
        observer = FleetObserver(broker)
        operator_config = root / "fleet.toml"
        operator_config.write_text(
            f'fleet = "{FLEET}"\noperator = "op-1"\noperator_keys = ["{root / "operator.key"}"]\n'
            f'data_dir = "{root / "operator"}"\n\n[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\n'
        )
        daemons, apis = [], {}
        for device in DEVICES:
            serving = ServingOptions(trial_s=1.0)
            apis[device] = serving.base_url
            config = write_edge_config(
                root / device,
                broker,
                keys.keyring(),
                device=device,
                groups=(GROUP,),
                serving=serving,
                extra="[telemetry]\ninterval_s = 1\nstatus_every_s = 2\n",
            )
            log = (root / f"{device}.log").open("w")
            daemons.append(subprocess.Popen([*EDGE_CLI, "run", "--config", str(config)], stderr=log))
        fleet = Fleet(root, broker, server, keys, observer, operator_config, smollm2_gguf(), apis)
        try:
            observer.wait_for(
                lambda: {s["device_id"] for s in observer.statuses if s["online"]} >= set(DEVICES),
                60,
                "3 online",
            )
            observer.publish(TOPICS.desired_group(GROUP), fleet.envelope(1).read_bytes())
            observer.wait_for(lambda: all(fleet.committed(d, 1) for d in DEVICES), 300, "serial 1 everywhere")
            yield fleet
        finally:
            for daemon in daemons:
                daemon.terminate()
            for daemon in daemons:
                daemon.wait(timeout=60)
            observer.close()


def _at(event: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(event["at"])


def test_staged_rollout_advances_wave_by_wave_then_fleet_rollback(fleet: Fleet) -> None:
    envelope = fleet.envelope(2)
    result = fleet.cli(
        "rollout", envelope, "--group", GROUP, "--canary", "1", "--waves", "50%,100%",
        "--max-failures", "0", "--wave-timeout", "300", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    state = json.loads(result.stdout)
    assert state["status"] == "done" and state["waves"] == [["pi-a"], ["pi-b"], ["pi-c"]]
    assert {d: p["state"] for d, p in state["devices"].items()} == dict.fromkeys(DEVICES, "committed")
    # Each wave started only after the previous one committed.
    first_event = {
        d: min(_at(e) for e in fleet.observer.unique_events() if e["device_id"] == d and e["serial"] == 2)
        for d in DEVICES
    }
    commits = {d: _at(fleet.committed(d, 2) or {}) for d in DEVICES}
    assert commits["pi-a"] <= first_event["pi-b"] and commits["pi-b"] <= first_event["pi-c"]
    # Done: the manifest is the group's retained desired state, for devices that join later.
    assert retained_message(fleet.broker, TOPICS.desired_group(GROUP)) == envelope.read_bytes()

    status = fleet.status()
    assert set(status) == set(DEVICES)
    for row in status.values():
        assert row["online"] and row["serial"] == 2 and row["deployment"] == "committed", row
        assert row["soc_temp_c"] == 52.3 and row["mem_available_mb"] == 6000.0 and row["worker_rss_mb"] > 0
        assert row["throttled"] == []

    rolled = fleet.cli("rollback", "--group", GROUP, "--json", "--timeout", "300")
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    answers = json.loads(rolled.stdout)
    assert {d: (a["ok"], a["result"]["serial"]) for d, a in answers.items()} == dict.fromkeys(
        DEVICES, (True, 1)
    )
    assert all(row["serial"] == 1 for row in fleet.status().values())

    history = fleet.cli("history", "--json")
    assert history.returncode == 0, history.stderr
    recorded = {(e["device_id"], e["serial"], e["state"]) for e in json.loads(history.stdout)}
    assert {(d, 2, "committed") for d in DEVICES} <= recorded
    # One device's history, and the status of one group (or of a group no device is in).
    one = fleet.cli("history", "--device", "pi-a", "--json")
    assert one.returncode == 0, one.stderr
    events = json.loads(one.stdout)
    assert events and {e["device_id"] for e in events} == {"pi-a"}
    assert ("pi-a", 2, "committed") in {(e["device_id"], e["serial"], e["state"]) for e in events}
    for group, expected in ((GROUP, set(DEVICES)), ("nobody-here", set())):
        grouped = fleet.cli("status", "--group", group, "--json", "--wait", "2")
        assert grouped.returncode == 0, grouped.stderr
        assert {row["device"] for row in json.loads(grouped.stdout)} == expected


def test_canary_failing_its_health_gate_halts_the_rollout(fleet: Fleet) -> None:
    before = fleet.status()
    slow = fleet.envelope(3, health={"golden_prompts": ["Say hello."], "min_tokens_per_second": 1e6})
    result = fleet.cli(
        "rollout",
        slow,
        "--group",
        GROUP,
        "--canary",
        "1",
        "--max-failures",
        "0",
        "--wave-timeout",
        "300",
        "--json",
    )
    assert result.returncode == 2, result.stdout + result.stderr
    state = json.loads(result.stdout)
    assert state["status"] == "halted" and "canary" in state["halted_reason"]
    assert state["devices"]["pi-a"]["state"] == "failed"
    assert "health-gate-slow" in state["devices"]["pi-a"]["reason"]
    assert set(state["devices"]) == {"pi-a"}  # the other waves were never sent
    after = fleet.status()
    for device in DEVICES:
        assert after[device]["serial"] == before[device]["serial"] == 1
    assert "health-gate-slow" in (after["pi-a"]["last_result"] or "")
    # A second run does not silently retry a halted rollout.
    again = fleet.cli("rollout", slow, "--group", GROUP, "--json")
    assert again.returncode == 1 and "halted" in again.stderr


def test_watch_shows_every_device_and_stops_after_its_count(fleet: Fleet) -> None:
    watched = fleet.cli("watch", "--group", GROUP, "--interval", "0.2", "--count", "3", timeout=120)
    assert watched.returncode == 0, watched.stderr
    assert "(live)" in watched.stdout and all(device in watched.stdout for device in DEVICES), watched.stdout


def test_pin_blocks_a_rollout_and_unpin_releases(fleet: Fleet) -> None:
    pinned = fleet.cli("pin", "--device", "pi-c", "--json")
    assert pinned.returncode == 0, pinned.stderr
    assert json.loads(pinned.stdout)["pi-c"]["result"]["pinned"] is True
    assert fleet.status()["pi-c"]["pinned"]
    before = {device: row["serial"] for device, row in fleet.status().items()}
    # Canary pi-a, then one wave of pi-b and pi-c. The pinned pi-c refuses the rollout and stays where
    # it is; that halts the rollout, and pi-b, which committed in the halted wave, is rolled back.
    args = ("--group", GROUP, "--canary", "1", "--waves", "100%", "--no-publish-desired", "--json")
    result = fleet.cli("rollout", fleet.envelope(4), *args)
    assert result.returncode == 2, result.stdout + result.stderr
    state = json.loads(result.stdout)
    assert state["status"] == "halted"
    assert state["devices"]["pi-c"]["state"] == "failed" and state["devices"]["pi-c"]["reason"] == "pinned"
    assert state["devices"]["pi-b"]["state"] == "rolled_back", state["devices"]["pi-b"]
    assert state["devices"]["pi-a"]["state"] == "committed"
    after = {device: row["serial"] for device, row in fleet.status().items()}
    assert after == {"pi-a": 4, "pi-b": before["pi-b"], "pi-c": before["pi-c"]}
    unpinned = fleet.cli("unpin", "--device", "pi-c", "--json")
    assert unpinned.returncode == 0 and json.loads(unpinned.stdout)["pi-c"]["result"]["pinned"] is False


def test_a_rollout_killed_mid_wave_resumes_where_it_stopped(fleet: Fleet) -> None:
    manifest, state_file = fleet.envelope(5), fleet.root / "killed-rollout.json"
    args = ["rollout", manifest, "--group", GROUP, "--canary", "1", "--waves", "100%", "--no-publish-desired"]
    args += ["--state", state_file]

    def second_wave_sent() -> bool:
        if not state_file.exists():
            return False
        devices = json.loads(state_file.read_text())["devices"]
        return all(devices.get(d, {}).get("state") == "sent" for d in ("pi-b", "pi-c"))

    process = subprocess.Popen(
        [*FLEET_CLI, *map(str, args), "--config", str(fleet.operator_config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(second_wave_sent, 300, "the second wave sent")
    finally:
        process.kill()
        process.wait()
    killed = json.loads(state_file.read_text())
    assert killed["status"] == "running" and killed["next_wave"] == 1
    assert killed["devices"]["pi-a"]["state"] == "committed"
    wait_until(lambda: fleet.committed("pi-b", 5) and fleet.committed("pi-c", 5), 300, "the sent wave done")

    again = fleet.cli(*args, "--json")
    assert again.returncode == 0, again.stdout + again.stderr
    final = json.loads(again.stdout)
    assert final["status"] == "done"
    assert {d: p["state"] for d, p in final["devices"].items()} == dict.fromkeys(DEVICES, "committed")
    status = fleet.status()
    # "sent" devices were sent again (and answered that the model is already there); the committed
    # canary was skipped.
    for device in ("pi-b", "pi-c"):
        assert "already-installed" in (status[device]["last_result"] or ""), status[device]
    assert "already-installed" not in (status["pi-a"]["last_result"] or ""), status["pi-a"]
    assert all(row["serial"] == 5 for row in status.values())
    # The state file of this rollout cannot be reused for another manifest.
    other = fleet.cli("rollout", fleet.envelope(6), "--group", GROUP, "--state", state_file, "--json")
    assert other.returncode == 1 and "belongs to another manifest" in other.stderr


def test_an_adapter_rolls_out_in_waves_and_a_failing_version_halts_at_the_canary(fleet: Fleet) -> None:
    size, digest = sha256_file(fleet.model)
    base = {"name": "smollm2", "sha256": digest, "size": size, "urls": [fleet.server.add_file(fleet.model)]}
    adapter = {"name": "slips-risk", "channel": "risk", "base": base, "quantization": "f16"}
    lora = write_lora(fleet.root / "risk-1.gguf", fleet.model, seed=1)
    args = ("--group", GROUP, "--canary", "1", "--waves", "100%", "--max-failures", "0", "--json")
    result = fleet.cli("rollout", fleet.envelope(1, lora, **adapter), *args)
    assert result.returncode == 0, result.stdout + result.stderr
    state = json.loads(result.stdout)
    assert state["status"] == "done" and state["waves"] == [["pi-a"], ["pi-b", "pi-c"]]
    assert {d: p["state"] for d, p in state["devices"].items()} == dict.fromkeys(DEVICES, "committed")
    status = fleet.status()
    for device, row in status.items():
        assert row["adapters"] == ["slips-risk #1"], row
        chat = {"model": "slips-risk", "messages": [{"role": "user", "content": "Risk?"}], "max_tokens": 4}
        assert (
            httpx.post(f"{fleet.apis[device]}/v1/chat/completions", json=chat, timeout=60).status_code == 200
        )
    base_serials = {device: row["serial"] for device, row in status.items()}

    # Version 2 fails its health gate on the canary: the rollout halts there, every device keeps
    # adapter #1 and its base.
    failing = fleet.envelope(
        2,
        write_lora(fleet.root / "risk-2.gguf", fleet.model, seed=2),
        **adapter,
        health={"golden_prompts": ["Say hello."], "min_tokens_per_second": 1e6},
    )
    halted = fleet.cli("rollout", failing, *args)
    assert halted.returncode == 2, halted.stdout + halted.stderr
    state = json.loads(halted.stdout)
    assert state["status"] == "halted" and set(state["devices"]) == {"pi-a"}
    assert "health-gate-slow" in state["devices"]["pi-a"]["reason"]
    after = fleet.status()
    assert {d: row["adapters"] for d, row in after.items()} == {d: ["slips-risk #1"] for d in DEVICES}
    assert {d: row["serial"] for d, row in after.items()} == base_serials

    # Version 3 passes. From the CLI, the operator sends the adapter back to its previous version on
    # the group (`rollback --adapter`), then pins one device to version 3 (`pin --adapter --serial`).
    good = fleet.envelope(3, write_lora(fleet.root / "risk-3.gguf", fleet.model, seed=3), **adapter)
    rolled_out = fleet.cli("rollout", good, *args)
    assert rolled_out.returncode == 0, rolled_out.stdout + rolled_out.stderr
    assert {d: row["adapters"] for d, row in fleet.status().items()} == {
        d: ["slips-risk #3"] for d in DEVICES
    }
    back = fleet.cli("rollback", "--adapter", "slips-risk", "--group", GROUP, "--json", "--timeout", "120")
    assert back.returncode == 0, back.stdout + back.stderr
    answered = json.loads(back.stdout)
    assert set(answered) == set(DEVICES) and all(a["ok"] for a in answered.values()), answered
    # (The answer's `serial` is the base model's, from the status it carries; the message names the
    # adapter's versions.)
    assert all(a["result"]["message"].endswith("-> slips-risk serial 1") for a in answered.values()), answered
    status = fleet.status()
    assert {d: row["adapters"] for d, row in status.items()} == {d: ["slips-risk #1"] for d in DEVICES}
    assert {d: row["serial"] for d, row in status.items()} == base_serials  # the base stayed
    pinned = fleet.cli(
        "pin", "--adapter", "slips-risk", "--serial", "3", "--device", "pi-a", "--json", "--timeout", "120"
    )
    assert pinned.returncode == 0, pinned.stdout + pinned.stderr
    assert json.loads(pinned.stdout)["pi-a"]["ok"], pinned.stdout
    assert fleet.status()["pi-a"]["adapters"] == ["slips-risk #3"]
    assert fleet.cli("unpin", "--device", "pi-a", "--json").returncode == 0


def test_collect_and_html_report_in_headless_chromium(fleet: Fleet) -> None:
    collector = subprocess.Popen(
        [*FLEET_CLI, "collect", "--duration", "8", "--config", str(fleet.operator_config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    chat = {
        "messages": [{"role": "user", "content": "Summarise: port scan from 10.0.0.5."}],
        "max_tokens": 24,
    }
    for _ in range(3):  # traffic, so the generation-speed charts have points
        for api in fleet.apis.values():
            assert httpx.post(f"{api}/v1/chat/completions", json=chat, timeout=60).status_code == 200
    _, errors = collector.communicate(timeout=60)
    assert collector.returncode == 0, errors
    page = fleet.root / "report.html"
    assert fleet.cli("report", "--html", page).returncode == 0
    text = page.read_text()
    assert "<script" not in text and "http" not in text.split("<body>")[1]  # self-contained
    for device in DEVICES:
        assert f"<h2>{device}</h2>" in text
    assert text.count("<polyline") >= 3 * len(DEVICES) - 3  # temperature and memory at least, per device
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Debian chromium is not installed (make test installs it)")
    shot = fleet.root / "report.png"
    run = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--screenshot={shot}", "--window-size=1400,1800", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert shot.exists() and shot.stat().st_size > 20_000, run.stderr[-2000:]
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "pi-a" in dom.stdout and "<svg" in dom.stdout


def test_collect_stops_cleanly_on_sigterm_even_when_started_in_the_background(fleet: Fleet) -> None:
    """A service manager stops the collector with SIGTERM, and a shell that starts it in the
    background makes it ignore SIGINT: either way it must close its database and say what it kept.
    (Before, SIGTERM killed it, and a backgrounded one could not be stopped but by a kill.)"""
    data_dir = fleet.root / "collector-sigterm"
    config = fleet.root / "collector-sigterm.toml"
    config.write_text(
        re.sub(r'(?m)^data_dir = ".*"$', f'data_dir = "{data_dir}"', fleet.operator_config.read_text())
    )
    collector = subprocess.Popen(
        [*FLEET_CLI, "collect", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # as `collect &` in a script
    )

    def statuses() -> int:
        try:
            with sqlite3.connect(data_dir / "fleet.db") as db:
                return db.execute("SELECT COUNT(*) FROM statuses").fetchone()[0]
        except sqlite3.Error:
            return 0

    wait_until(lambda: statuses() > 0, 60, "the collector storing statuses")
    collector.send_signal(signal.SIGINT)  # ignored, as in the background
    collector.send_signal(signal.SIGTERM)
    out, errors = collector.communicate(timeout=30)
    assert collector.returncode == 0, errors
    assert "collected" in out and " status" in out, out
