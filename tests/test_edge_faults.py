"""The control plane under faults: killed daemon, restarted broker, failing server, full disk."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from edge.control.crash_points import KILL_AT_ENV
from edge.delivery.store import ContentStore
from edge.state.db import StateDB
from edge.state.ledger import Ledger
from edge.state.outbox import Outbox
from fleet.client import FleetClient
from fleet.settings import FleetSettings
from shared.signing import write_private_key
from tests.harness.artifact_server import Fault
from tests.harness.broker import Mosquitto
from tests.harness.edge import (
    DEVICE,
    FLEET,
    TOPICS,
    FleetObserver,
    ServingOptions,
    digest,
    running_daemon,
    sign_command,
    sign_manifest,
    write_edge_config,
)
from tests.harness.logwatch import watching
from tests.harness.tmpfs import fill, small_tmpfs
from tests.test_edge_daemon import FORWARD, Deployments, model_blob


def _daemon_process(config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "edge.cli", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _outbox_rows(state_db: Path) -> int:
    db = StateDB(state_db)
    try:
        return len(Outbox(db))
    finally:
        db.close()


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_sigkill_mid_download_resumes_with_little_extra(
    tmp_path, mqtt_broker, observer, artifact_server, fleet_keys
) -> None:
    data = model_blob("big", size=24 * 1024 * 1024)
    url = artifact_server.add("big.gguf", data)
    artifact_server.inject("big.gguf", Fault("slow", rate_bps=4 * 1024 * 1024))
    config = write_edge_config(tmp_path / "device", mqtt_broker, fleet_keys.keyring())
    observer.publish(TOPICS.desired_device(DEVICE), sign_manifest([fleet_keys.trainer], data, url, serial=1))
    partial = ContentStore(tmp_path / "device" / "state" / "store").partial_path(digest(data))

    first = _daemon_process(config)
    try:
        _wait(lambda: partial.exists() and partial.stat().st_size > len(data) // 3, 60, "a third downloaded")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    kept = partial.stat().st_size
    sent_before = artifact_server.bytes_sent("big.gguf")
    # The broker notices the dead connection (1.5 x keepalive) and publishes the Last Will.
    observer.wait_for(lambda: observer.statuses and observer.statuses[-1]["online"] is False, 30, "Last Will")

    second = _daemon_process(config)
    try:
        (end,) = observer.wait_terminal(timeout=90)
    finally:
        second.terminate()
        second.wait(timeout=30)
    assert end["state"] == "committed", end
    # Resumed, not restarted: one deployment, each state reported once, the rest fetched by Range.
    assert observer.states(end["deployment_id"]) == FORWARD
    gets = [r for r in artifact_server.requests if r.method == "GET"]
    assert gets[-1].range == f"bytes={kept}-"
    extra = sent_before + (len(data) - kept) - len(data)
    assert extra <= 0.05 * len(data), f"{extra} extra bytes"


def test_broker_restart_mid_deployment_loses_no_event(tmp_path, artifact_server, fleet_keys) -> None:
    with Mosquitto(tmp_path / "broker", persistent=True) as broker:
        observer = FleetObserver(broker, persistent=True)  # like a fleet collector: no gap on reconnect
        try:
            _restart_broker_mid_deployment(tmp_path, broker, observer, artifact_server, fleet_keys)
        finally:
            observer.close()


def _restart_broker_mid_deployment(tmp_path, mqtt_broker, observer, artifact_server, fleet_keys) -> None:
    data = model_blob("slow", size=6 * 1024 * 1024)
    url = artifact_server.add("slow.gguf", data)
    artifact_server.inject("slow.gguf", Fault("slow", rate_bps=2 * 1024 * 1024))
    config = write_edge_config(tmp_path / "device", mqtt_broker, fleet_keys.keyring())
    with running_daemon(config) as daemon:
        observer.publish(
            TOPICS.desired_device(DEVICE), sign_manifest([fleet_keys.trainer], data, url, serial=1)
        )
        observer.wait_for(lambda: "downloading" in observer.states(), what="downloading")
        mqtt_broker.stop()
        # The deployment finishes while the broker is down; its events wait in the outbox on disk.
        _wait(lambda: daemon.control.ledger.current() is not None, 60, "commit while offline")
        assert len(daemon.control.outbox) > 0
        mqtt_broker.start()
        (end,) = observer.wait_terminal(timeout=60)
    assert end["state"] == "committed"
    assert observer.states(end["deployment_id"]) == FORWARD  # 7 distinct events, none lost


def test_outbox_survives_a_daemon_restart_while_offline(
    tmp_path, mqtt_broker, artifact_server, fleet_keys
) -> None:
    data = model_blob("offline")
    url = artifact_server.add("offline.gguf", data)
    config = write_edge_config(tmp_path / "device", mqtt_broker, fleet_keys.keyring())
    envelope = sign_manifest([fleet_keys.trainer], data, url, serial=1)
    # `immune-edge install` while no broker is reachable: events go to the outbox only.
    mqtt_broker.stop()
    manifest_file = tmp_path / "m.dsse.json"
    manifest_file.write_bytes(envelope)
    result = subprocess.run(
        [sys.executable, "-m", "edge.cli", "install", str(manifest_file), "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    state_db = tmp_path / "device" / "state" / "state.db"
    queued = _outbox_rows(state_db)
    assert queued > 0
    # The daemon starts and is stopped again while the broker is still down.
    offline = _daemon_process(config)
    time.sleep(3.0)  # a few connection attempts
    offline.terminate()
    assert offline.wait(timeout=30) == 0
    assert _outbox_rows(state_db) >= queued  # nothing dropped (its own offline status may be added)
    mqtt_broker.start()
    watcher = FleetObserver(mqtt_broker)
    try:
        with running_daemon(config):
            (end,) = watcher.wait_terminal(timeout=30)
        assert end["state"] == "committed" and end["source"] == "local-install"
        assert watcher.states(end["deployment_id"]) == FORWARD
    finally:
        watcher.close()


def test_restart_after_commit_changes_nothing(
    tmp_path, mqtt_broker, observer, artifact_server, fleet_keys
) -> None:
    data = model_blob("stable")
    url = artifact_server.add("stable.gguf", data)
    config = write_edge_config(tmp_path / "device", mqtt_broker, fleet_keys.keyring())
    observer.publish(TOPICS.desired_fleet(), sign_manifest([fleet_keys.trainer], data, url, serial=1))
    with running_daemon(config):
        observer.wait_terminal()
    events = len(observer.unique_events())
    with watching("edge.control.reconcile") as logs, running_daemon(config) as daemon:
        logs.wait_for("desired state from fleet (model) was already acted on")  # the retained one, seen again
        assert daemon.control.ledger.current().serial == 1
    assert len(observer.unique_events()) == events
    assert len([r for r in artifact_server.requests if r.method == "GET"]) == 1


def test_server_errors_then_recovery(tmp_path, mqtt_broker, observer, artifact_server, fleet_keys) -> None:
    data = model_blob("flaky")
    url = artifact_server.add("flaky.gguf", data)
    artifact_server.inject("flaky.gguf", Fault("fail", times=2, status=500))
    config = write_edge_config(tmp_path / "device", mqtt_broker, fleet_keys.keyring())
    with running_daemon(config):
        observer.publish(
            TOPICS.desired_device(DEVICE), sign_manifest([fleet_keys.trainer], data, url, serial=1)
        )
        (end,) = observer.wait_terminal()
    assert end["state"] == "committed"
    assert [r.status for r in artifact_server.requests if r.method == "GET"] == [500, 500, 200]


def test_server_down_for_good_fails_cleanly_then_retries(
    tmp_path, mqtt_broker, observer, artifact_server, fleet_keys
) -> None:
    data = model_blob("down")
    url = artifact_server.add("down.gguf", data)
    artifact_server.inject("down.gguf", Fault("fail", times=4, status=503))  # every attempt of the first try
    config = write_edge_config(tmp_path / "device", mqtt_broker, fleet_keys.keyring())
    with running_daemon(config):
        observer.publish(
            TOPICS.desired_device(DEVICE), sign_manifest([fleet_keys.trainer], data, url, serial=1)
        )
        failed, committed = observer.wait_terminal(2)
    assert failed["state"] == "failed" and failed["reason"].startswith("download-failed")
    assert "HTTP 503" in failed["reason"]
    assert committed["state"] == "committed"  # retried after retry_failed_s, as a new deployment


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A 16 MiB tmpfs."""
    with small_tmpfs(tmp_path / "small-disk", "16m") as mount_point:
        yield mount_point


def test_disk_full_fails_cleanly(small_disk, mqtt_broker, observer, artifact_server, fleet_keys) -> None:
    config = write_edge_config(small_disk / "device", mqtt_broker, fleet_keys.keyring())
    huge = model_blob("huge", size=20 * 1024 * 1024)
    big = model_blob("big", size=8 * 1024 * 1024)
    artifact_server.inject("big.gguf", Fault("slow", rate_bps=2 * 1024 * 1024))
    store = small_disk / "device" / "state" / "store"
    with running_daemon(config) as daemon:
        # Too big for the disk: refused before a single byte is fetched.
        url = artifact_server.add("huge.gguf", huge)
        observer.publish(
            TOPICS.desired_device(DEVICE), sign_manifest([fleet_keys.trainer], huge, url, serial=1)
        )
        (end,) = observer.wait_terminal()
        assert end["state"] == "failed" and end["reason"].startswith("disk-space"), end
        assert not [r for r in artifact_server.requests if r.name == "huge.gguf" and r.method == "GET"]

        # Fits, but the disk fills up during the download (another writer): ENOSPC mid-stream.
        url = artifact_server.add("big.gguf", big)
        observer.publish(
            TOPICS.desired_device(DEVICE), sign_manifest([fleet_keys.trainer], big, url, serial=2)
        )
        partial = store / "partial" / f"{digest(big)}.part"
        _wait(lambda: partial.exists() and partial.stat().st_size > 1024 * 1024, 30, "download under way")
        filler = fill(small_disk)
        failed = observer.wait_terminal(2)[-1]
        assert failed["state"] == "failed" and failed["reason"].startswith("disk-full"), failed
        assert not partial.exists() and not (store / "sha256" / digest(big)).exists()
        assert daemon.control.ledger.current() is None
        # Space comes back: the retry (retry_failed_s) completes it.
        filler.unlink()
        assert observer.wait_terminal(3)[-1]["state"] == "committed"


def _kill_during_trial(config: Path, observer: FleetObserver, serial: int) -> None:
    """Start the daemon as a process, wait until ``serial`` is on trial, then SIGKILL it."""
    process = _daemon_process(config)
    try:
        observer.wait_for(
            lambda: any((e["serial"], e["state"]) == (serial, "trial") for e in observer.unique_events()),
            timeout=180,
            what=f"serial {serial} on trial",
        )
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    observer.wait_for(lambda: observer.statuses and observer.statuses[-1]["online"] is False, 30, "Last Will")


def _serial_2_killed_during_trial(
    tmp_path, mqtt_broker, observer, artifact_server, fleet_keys, smollm2_model, retries: int
) -> tuple[Path, ServingOptions]:
    """SmolLM2 serial 1 committed, then serial 2 desired and the daemon SIGKILLed during its trial
    (a power cut). The config allows ``retries`` activation retries."""
    serving = ServingOptions(trial_s=600.0)  # a trial that only the kill ends
    config = write_edge_config(tmp_path / "device", mqtt_broker, fleet_keys.keyring(), serving=serving)
    text = config.read_text().replace("[deploy]\n", f"[deploy]\nactivation_retries = {retries}\n")
    config.write_text(text)
    url = artifact_server.add_file(smollm2_model)
    runtime = {"chat_format": "chatml", "n_ctx": 1024, "stop": ["<|im_end|>"]}
    data = smollm2_model.read_bytes()
    with running_daemon(config):
        observer.publish(
            TOPICS.desired_fleet(), sign_manifest([fleet_keys.trainer], data, url, serial=1, runtime=runtime)
        )
        assert observer.wait_terminal(1, timeout=180)[-1]["state"] == "committed"
    envelope = sign_manifest([fleet_keys.trainer], data, url, serial=2, runtime=runtime)
    observer.publish(TOPICS.desired_fleet(), envelope)
    _kill_during_trial(config, observer, 2)
    return config, serving


@pytest.mark.slow
def test_power_cut_during_trial_retries_the_new_model_and_commits_it(
    tmp_path, mqtt_broker, observer, artifact_server, fleet_keys, smollm2_model
) -> None:
    """Bug: a kill -9 during a trial rolled the model back (restart-during-trial), then the same
    retained desired state was rejected as serial-not-newer: the device stayed on the old model."""
    config, serving = _serial_2_killed_during_trial(
        tmp_path, mqtt_broker, observer, artifact_server, fleet_keys, smollm2_model, retries=2
    )
    ends = len(observer.terminal_events())
    # The retry's trial must end for the test: after the restart, a short trial window.
    config.write_text(config.read_text().replace("trial_s = 600.0", "trial_s = 2.0"))
    with running_daemon(config) as daemon:
        end = observer.wait_terminal(ends + 1, timeout=180)[ends]
        assert (end["serial"], end["state"]) == (2, "committed"), end
        # The retained desired state for serial 2, seen again after the restart: already installed.
        observer.wait_for(
            lambda: any(
                (s.get("last_result") or "").startswith("already-installed") for s in observer.statuses
            ),
            60,
            "serial 2's desired state seen again",
        )
        assert daemon.control.ledger.current().serial == 2
        assert daemon.data.router.active.key == ("stable", 2)
        states = [(e["serial"], e["state"]) for e in observer.unique_events()]
        assert (2, "rolled_back") not in states and (2, "rejected") not in states, states
        reply = httpx.post(
            f"{serving.base_url}/v1/chat/completions",
            json={"model": "slips", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
            timeout=60,
        )
        assert reply.status_code == 200


@pytest.mark.slow
def test_a_serial_interrupted_too_often_is_marked_bad_and_reported_as_known_bad(
    tmp_path, mqtt_broker, observer, artifact_server, fleet_keys, smollm2_model
) -> None:
    config, _ = _serial_2_killed_during_trial(
        tmp_path, mqtt_broker, observer, artifact_server, fleet_keys, smollm2_model, retries=0
    )
    ends = len(observer.terminal_events())
    with running_daemon(config) as daemon:
        back = observer.wait_terminal(ends + 1, timeout=180)[ends]  # both may have arrived by now
        assert (back["serial"], back["state"]) == (2, "rolled_back"), back
        assert back["reason"].startswith("restart-during-trial"), back
        # The retained desired state still names serial 2: reported as known bad, with why.
        refused = observer.wait_terminal(ends + 2, timeout=60)[ends + 1]
        assert (refused["serial"], refused["state"]) == (2, "rejected"), refused
        assert refused["reason"].startswith("known-bad") and "restart-during-trial" in refused["reason"]
        assert daemon.control.ledger.current().serial == 1


def test_an_answer_sent_while_the_operator_is_away_reaches_it_after_a_broker_restart(
    tmp_path, artifact_server, fleet_keys
) -> None:
    """The operator's session outlives its connection: a device's answer that reached the broker
    while the operator was disconnected is delivered when it reconnects, across a broker restart
    (a rollout waited its whole wave timeout for such an answer, then failed a committed device)."""
    data = model_blob("slow", size=4 * 1024 * 1024)
    url = artifact_server.add("slow.gguf", data)
    artifact_server.inject("slow.gguf", Fault("slow", rate_bps=2 * 1024 * 1024))
    write_private_key(fleet_keys.operator, tmp_path / "op.key")
    with Mosquitto(tmp_path / "broker", persistent=True) as broker:
        operator = FleetSettings.model_validate(
            {
                "fleet": FLEET,
                "operator": "op-1",
                "operator_keys": [str(tmp_path / "op.key")],
                "data_dir": str(tmp_path / "operator"),
                "mqtt": {"host": broker.host, "port": broker.port},
            }
        )
        config = write_edge_config(tmp_path / "device", broker, fleet_keys.keyring())
        with running_daemon(config) as daemon, FleetClient(operator) as fleet:
            assert fleet.wait_for(lambda: fleet.is_online(DEVICE), 30)
            manifest = json.loads(sign_manifest([fleet_keys.trainer], data, url, serial=1))
            correlation = fleet.send_command(DEVICE, {"action": "rollout", "manifest": manifest})
            fleet.client.loop_stop()  # the operator's link goes quiet before the device can answer
            _wait(lambda: daemon.control.ledger.current() is not None, 60, "the device to commit")
            _wait(lambda: len(daemon.control.outbox) == 0, 30, "the answer to reach the broker")
            broker.restart()
            fleet.client.loop_start()  # reconnects to the restarted broker
            response = fleet.response(correlation, 30)
    assert response is not None, "the answer queued for the operator was lost"
    assert response.ok and response.result["result"] == "committed", response


@pytest.mark.parametrize(
    ("action", "killed_at"),
    [
        ("rollback", "queued"),
        ("rollback", "verifying"),
        ("rollback", "activating"),
        ("pin", "verifying"),
        ("pin", "activating"),
    ],
)
def test_an_operator_change_killed_mid_way_is_finished_after_the_restart(
    tmp_path, mqtt_broker, observer, artifact_server, fleet_keys, action, killed_at
) -> None:
    """Bug: recovery treated every interrupted row as a new model. A rollback (or pin) stopped while
    queued or verifying was redone as a deployment and refused as serial-not-newer; one stopped while
    activating got a trial and ended committed (and a failed trial would have marked the rollback
    target bad). The device must end on the target, reporting the operator change's own result."""
    config = write_edge_config(tmp_path / "device", mqtt_broker, fleet_keys.keyring())
    deployments = Deployments(observer, artifact_server, fleet_keys)
    with running_daemon(config):
        for tag, serial in (("one", 1), ("two", 2)):
            assert deployments.publish(deployments.envelope(tag, serial)[1])["state"] == "committed"
    environment = {**os.environ, KILL_AT_ENV: f"{action}:{killed_at}"}
    process = subprocess.Popen(
        [sys.executable, "-m", "edge.cli", "run", "--config", str(config)],
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        observer.wait_for(lambda: observer.statuses and observer.statuses[-1]["online"], 30, "online")
        observer.send_command(sign_command([fleet_keys.operator], {"action": action, "serial": 1}))
        assert process.wait(timeout=60) == -signal.SIGKILL
    finally:
        process.kill()
        process.wait()
    db = StateDB(config.parent / "state" / "state.db")
    try:
        row = Ledger(db).last_deployment()
    finally:
        db.close()
    assert row is not None and (row.kind, row.state, row.serial) == (action, killed_at, 1), row
    deployment = row.id
    final = "rolled_back" if action == "rollback" else "committed"
    with running_daemon(config) as daemon:
        end = observer.wait_for(
            lambda: next((e for e in observer.terminal_events() if e["deployment_id"] == deployment), None),
            timeout=60,
            what="the interrupted change's end",
        )
        assert (end["serial"], end["state"]) == (1, final), end
        ledger = daemon.control.ledger
        assert ledger.current().serial == 1 and ledger.previous().serial == 2
        assert ledger.last_serial("stable") == 2 and ledger.bad_serials() == {}
        assert ledger.pinned is (action == "pin")
        states = observer.states(deployment)
        assert "trial" not in states and "rejected" not in states, states
