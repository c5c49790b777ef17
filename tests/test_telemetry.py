"""Telemetry and thermal back-off against a Raspberry Pi 5 fixture tree: flag decoding, every source,
the flat MQTT payload, /metrics, and a real daemon that lowers its inference threads when hot."""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from datetime import datetime
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest

from edge.config import ThermalSettings
from edge.telemetry.host import HostSensors, parse_throttled
from edge.telemetry.thermal import ThermalGovernor
from shared.errors import SchemaError
from shared.messages import Telemetry
from shared.throttle import decode_throttled
from tests.conftest import FleetKeys
from tests.harness.artifact_server import ArtifactServer
from tests.harness.broker import Mosquitto
from tests.harness.edge import (
    DEVICE,
    TOPICS,
    FleetObserver,
    ServingOptions,
    running_daemon,
    sign_command,
    sign_manifest,
    write_edge_config,
)
from tests.harness.pi5 import Pi5Tree
from tests.harness.waiting import wait_until


@pytest.mark.parametrize(
    ("bits", "expected"),
    [
        (0x0, set()),
        (0x50000, {"under_voltage_since_boot", "throttled_since_boot"}),
        (0x50005, {"under_voltage_now", "throttled_now", "under_voltage_since_boot", "throttled_since_boot"}),
        (0x80008, {"soft_temp_limit_now", "soft_temp_limit_since_boot"}),
        (0x2, {"freq_capped_now"}),
    ],
)
def test_throttled_bits_decode_to_named_flags(bits: int, expected: set[str]) -> None:
    flags = decode_throttled(bits)
    assert len(flags) == 8
    assert {name for name, on in flags.items() if on} == expected


def test_throttled_text_formats() -> None:
    assert parse_throttled("throttled=0x50005\n") == 0x50005  # vcgencmd
    assert parse_throttled("50005") == 0x50005  # firmware sysfs node (hex without prefix)
    with pytest.raises(ValueError):
        parse_throttled("garbage")


def test_pi5_tree_readings(tmp_path: Path) -> None:
    pi = Pi5Tree(tmp_path).create(temp_c=61.25, throttled=0x80008)
    readings = HostSensors(pi.sysfs, pi.procfs, vcgencmd=None).read()
    assert readings.zone_temps_c == {"cpu_thermal": 61.25}
    assert readings.soc_temp_c == 61.25
    assert readings.throttled_bits == 0x80008
    assert readings.cpu_freq_mhz == 2400.0
    assert readings.fan_rpm == 2843 and readings.fan_state == 2
    assert readings.cpu_load_1m == 0.52
    assert readings.mem_available_mb == 6000.0
    assert readings.swap_used_mb == 50.0


def test_missing_sources_read_as_none(tmp_path: Path) -> None:
    readings = HostSensors(tmp_path / "sys", tmp_path / "proc", vcgencmd=None).read()
    assert readings.soc_temp_c is None and readings.throttled_bits is None and readings.fan_rpm is None


def test_vcgencmd_used_when_the_firmware_node_is_missing(tmp_path: Path) -> None:
    # vcgencmd exists only on a Pi: a stand-in prints what the real one prints.
    tool = tmp_path / "vcgencmd"
    tool.write_text("#!/bin/sh\necho throttled=0x50005\n")
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    readings = HostSensors(tmp_path / "sys", tmp_path / "proc", vcgencmd=str(tool)).read()
    assert readings.throttled_bits == 0x50005


def test_telemetry_contract_is_flat_and_strict() -> None:
    sample = Telemetry.from_json(
        json.dumps({"device_id": "pi-1", "fleet": "lab", "ts": 1.0, "temp_cpu_thermal_c": 50.5}).encode()
    )
    assert sample.zone_temps() == {"cpu_thermal": 50.5}
    for bad in ({"evil": 1}, {"temp_cpu_c": "hot"}, {"temp_cpu_c": True}, {"throttled_now": "yes"}):
        with pytest.raises(SchemaError):
            Telemetry.from_json(json.dumps({"device_id": "pi-1", "fleet": "lab", "ts": 1.0, **bad}).encode())
    too_many = {f"temp_z{i}_c": 1.0 for i in range(17)}
    with pytest.raises(SchemaError, match="at most 16"):
        Telemetry.from_json(json.dumps({"device_id": "pi-1", "fleet": "lab", "ts": 1.0, **too_many}).encode())


def test_client_prompt_versions_and_context_refusals_are_checked() -> None:
    head = {"device_id": "pi-1", "fleet": "lab", "ts": 1.0}
    keys = {"context_refusals_total": 2, "prompt_version_alert_summary_v2_requests_total": 40}
    sample = Telemetry.from_json(json.dumps(head | keys).encode())
    assert sample.context_refusals_total == 2
    for bad in (
        {"context_refusals_total": -1},
        {"prompt_version_alert_summary_v2_requests_total": -3},
        {"prompt_version_alert_summary_v2_requests_total": "40"},
        {"prompt_version_Alert_requests_total": 1},  # not a slug
    ):
        with pytest.raises(SchemaError):
            Telemetry.from_json(json.dumps(head | bad).encode())
    too_many = {f"prompt_version_v{i}_requests_total": 1 for i in range(10)}  # 8 names and "other" at most
    with pytest.raises(SchemaError, match="at most 8 prompt versions"):
        Telemetry.from_json(json.dumps(head | too_many).encode())


def test_a_client_cannot_grow_the_prompt_version_set() -> None:
    from edge.metrics import Metrics
    from shared.messages import adapter_slug

    metrics = Metrics()
    for index in range(12):
        metrics.prompt_version("slips", f"alert-summary-v{index}")
    metrics.context_refused("slips")
    refused, versions = metrics.client_totals()
    assert refused == 1 and len(versions) == 9 and versions["other"] == 4
    keys = {f"prompt_version_{adapter_slug(v)}_requests_total": n for v, n in versions.items()}
    head = {"device_id": "pi-1", "fleet": "lab", "ts": 1.0, "context_refusals_total": refused}
    assert Telemetry.from_json(json.dumps(head | keys).encode()).context_refusals_total == 1


def test_adapter_figures_are_flat_keys_and_checked() -> None:
    head = {"device_id": "pi-1", "fleet": "lab", "ts": 1.0}
    keys = {"adapter_slips_risk_requests_total": 3, "adapter_slips_risk_tokens_per_second": 9.5}
    sample = Telemetry.from_json(json.dumps(head | keys).encode())
    assert sample.adapter_figures() == {"slips_risk": {"requests_total": 3.0, "tokens_per_second": 9.5}}
    for bad in (
        {"adapter_slips_risk_secret": 1},  # not a figure telemetry carries
        {"adapter_slips_risk_requests_total": -1},
        {"adapter_slips_risk_requests_total": "3"},
        {"adapter_Slips_requests_total": 1},
    ):
        with pytest.raises(SchemaError):
            Telemetry.from_json(json.dumps(head | bad).encode())
    too_many = {f"adapter_a{i}_errors_total": 0 for i in range(3 * 16 + 1)}
    with pytest.raises(SchemaError, match="at most 16 adapters"):
        Telemetry.from_json(json.dumps(head | too_many).encode())


class _Controls:
    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def limit_threads(self, cap: int | None) -> None:
        self.calls.append(("threads", cap))

    def defer_low_priority(self, on: bool) -> None:
        self.calls.append(("defer", on))


def test_governor_hysteresis_and_firmware_flags(tmp_path: Path) -> None:
    pi = Pi5Tree(tmp_path).create(temp_c=60)
    sensors = HostSensors(pi.sysfs, pi.procfs, vcgencmd=None)
    controls = _Controls()
    governor = ThermalGovernor(ThermalSettings(soft_limit_c=78, restore_c=70, hot_threads=1), controls)
    assert governor.observe(sensors.read()) is None
    pi.set_temperature(79.5)
    change = governor.observe(sensors.read())
    assert change is not None and "79.5 C" in change and governor.limited
    assert controls.calls == [("threads", 1), ("defer", True)]
    pi.set_temperature(74)  # below the soft limit but above restore: stays limited
    assert governor.observe(sensors.read()) is None and governor.limited
    pi.set_temperature(69)
    assert "thermal limit off" in (governor.observe(sensors.read()) or "")
    assert controls.calls[-2:] == [("threads", None), ("defer", False)]
    pi.set_throttled(0x80008)  # the firmware's soft limit, whatever the zone says
    assert "soft_temp_limit_now" in (governor.observe(sensors.read()) or "")


def _listener(broker: Mosquitto, leaf: str, qos: int) -> tuple[mqtt.Client, list[dict[str, object]]]:
    """A client receiving every device message on ``leaf`` (telemetry, status) from now on."""
    received: list[dict[str, object]] = []
    ready = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_connect = lambda c, *a: c.subscribe(f"{TOPICS.base}/device/+/{leaf}", qos)
    client.on_subscribe = lambda *a: ready.set()
    client.on_message = lambda c, u, m: m.payload and received.append(json.loads(m.payload))
    client.connect(broker.host, broker.port)
    client.loop_start()
    assert ready.wait(10)
    return client, received


def _telemetry_listener(broker: Mosquitto) -> tuple[mqtt.Client, list[dict[str, object]]]:
    return _listener(broker, "telemetry", 0)


def _epoch(iso: object) -> float:
    return datetime.fromisoformat(str(iso)).timestamp()


def _device_with_batch_alias(
    tmp_path: Path,
    broker: Mosquitto,
    keys: FleetKeys,
    n_threads: int,
    telemetry: str,
    thermal_interval_s: float = 1.0,
) -> tuple[Path, ServingOptions, Pi5Tree]:
    """A daemon config serving "slips" and the low-priority "slips-batch", hot above 78 C."""
    # Prompts on one thread, decoding on n_threads: the two counts are set and reported apart.
    serving = ServingOptions(
        n_threads=n_threads,
        n_threads_batch=1,
        api='low_priority_models = ["slips-batch"]',
        aliases=("slips", "slips-batch"),
    )
    thermal = (
        f"[thermal]\ninterval_s = {thermal_interval_s}\nsoft_limit_c = 78\nrestore_c = 70\nhot_threads = 1\n"
        "defer_retry_after_s = 30\n"
    )
    config = write_edge_config(
        tmp_path / "device", broker, keys.keyring(), serving=serving, extra=f"{telemetry}\n{thermal}"
    )
    return config, serving, Pi5Tree(tmp_path / "device")


def _metric(base_url: str, line_start: str) -> float | None:
    for line in httpx.get(f"{base_url}/metrics", timeout=10).text.splitlines():
        if line.startswith(line_start):
            return float(line.split()[-1])
    return None


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cores to show a thread cut")
def test_daemon_backs_off_when_hot_and_reports_telemetry(
    tmp_path: Path,
    mqtt_broker: Mosquitto,
    observer: FleetObserver,
    artifact_server: ArtifactServer,
    fleet_keys: FleetKeys,
    smollm2_model: Path,
) -> None:
    config, serving, pi = _device_with_batch_alias(
        tmp_path, mqtt_broker, fleet_keys, 2, "[telemetry]\ninterval_s = 1\nstatus_every_s = 2\n"
    )
    listener, samples = _telemetry_listener(mqtt_broker)
    url = artifact_server.add_file(smollm2_model)
    envelope = sign_manifest([fleet_keys.trainer], smollm2_model.read_bytes(), url)
    with running_daemon(config):
        observer.publish(TOPICS.desired_device(DEVICE), envelope)
        observer.wait_terminal(1, timeout=120)
        chat = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}
        assert httpx.post(f"{serving.base_url}/v1/chat/completions", json=chat, timeout=60).status_code == 200
        threads_line = "immune_edge_device_n_threads "
        wait_until(lambda: _metric(serving.base_url, threads_line) == 2.0, 30, "2 threads before")
        assert _metric(serving.base_url, "immune_edge_device_n_threads_batch ") == 1.0

        # A command signed by a stranger: refused, and counted in telemetry's refusals_total.
        observer.client.publish(
            TOPICS.command(DEVICE), sign_command([fleet_keys.stranger], {"action": "gc"}), qos=1
        )
        rated = ("tokens_per_second", "prompt_tokens_per_second", "ttft_ms")

        def rates() -> dict[str, object] | None:
            # A request's first token and its completion may fall in two samples: ask again until
            # one sample holds every rate.
            httpx.post(f"{serving.base_url}/v1/chat/completions", json=chat, timeout=60)
            return next((s for s in reversed(samples) if all(key in s for key in rated)), None)

        sample = wait_until(rates, 60, "a sample with every rate")
        assert float(sample["prompt_tokens_per_second"]) > 0 and float(sample["tokens_per_second"]) > 0
        wait_until(
            lambda: any(int(s.get("refusals_total") or 0) >= 1 for s in samples), 30, "the refusal counted"
        )
        Telemetry.model_validate(sample)
        assert sample["device_id"] == DEVICE and sample["model_name"] and sample["model_serial"] >= 1
        assert sample["temp_cpu_thermal_c"] == 52.3 and sample["soc_temp_c"] == 52.3
        assert sample["fan_rpm"] == 2843 and sample["cpu_freq_mhz"] == 2400.0
        for key in ("rss_mb", "worker_rss_mb", "mem_available_mb", "disk_free_mb", "ttft_ms", "uptime_s"):
            assert key in sample, key
        assert sample["requests_total"] >= 1 and sample["throttled_now"] is False

        # Throttled first: the limit fires on the temperature, and a sample taken between the two
        # writes would show 83 C without the flag (seen once in a loaded full run).
        pi.set_throttled(0x20002)
        pi.set_temperature(83.0)
        observer.wait_for(
            lambda: any("thermal limit on" in (s.get("last_result") or "") for s in observer.statuses),
            30,
            "thermal limit reported",
        )
        wait_until(lambda: _metric(serving.base_url, threads_line) == 1.0, 30, "threads cut to 1")
        freq_capped = 'immune_edge_throttle_flag{flag="freq_capped",when="now"}'
        wait_until(lambda: _metric(serving.base_url, freq_capped) == 1.0, 30, "the freq_capped flag")
        assert _metric(serving.base_url, 'immune_edge_thermal_zone_celsius{zone="cpu_thermal"}') == 83.0
        deferred = httpx.post(
            f"{serving.base_url}/v1/chat/completions", json={**chat, "model": "slips-batch"}, timeout=60
        )
        assert deferred.status_code == 503 and deferred.headers["retry-after"] == "30"
        assert deferred.json()["error"]["code"] == "deferred_thermal"
        low = httpx.post(
            f"{serving.base_url}/api/chat",
            json={**chat, "stream": False},
            headers={"X-Immune-Priority": "low"},
            timeout=60,
        )
        assert low.status_code == 503 and "hot" in low.json()["error"]
        assert httpx.post(f"{serving.base_url}/v1/chat/completions", json=chat, timeout=60).status_code == 200
        hot = wait_until(
            lambda: next((s for s in reversed(samples) if s.get("thermal_limited")), None), 30, "hot"
        )
        assert hot["n_threads"] == 1 and hot["freq_capped_now"] is True

        pi.set_temperature(65.0)
        pi.set_throttled(0x20000)
        observer.wait_for(
            lambda: any("thermal limit off" in (s.get("last_result") or "") for s in observer.statuses),
            30,
            "thermal limit lifted",
        )
        wait_until(lambda: _metric(serving.base_url, threads_line) == 2.0, 30, "threads restored")
        assert (
            httpx.post(
                f"{serving.base_url}/v1/chat/completions", json={**chat, "model": "slips-batch"}, timeout=60
            ).status_code
            == 200
        )
        summary = observer.statuses[-1]["summary"]
        assert summary["soc_temp_c"] == 65.0 and summary["n_threads"] == 2.0
        assert summary["n_threads_batch"] == 1.0
    listener.loop_stop()
    listener.disconnect()


def test_thermal_back_off_works_with_telemetry_switched_off(
    tmp_path: Path,
    mqtt_broker: Mosquitto,
    observer: FleetObserver,
    artifact_server: ArtifactServer,
    fleet_keys: FleetKeys,
    smollm2_model: Path,
) -> None:
    """Bug: the governor lived inside the telemetry loop, so `[telemetry] enabled = false` silently
    switched thermal protection off too."""
    config, serving, pi = _device_with_batch_alias(
        tmp_path, mqtt_broker, fleet_keys, 1, "[telemetry]\nenabled = false\n", thermal_interval_s=0.5
    )
    listener, samples = _telemetry_listener(mqtt_broker)
    url = artifact_server.add_file(smollm2_model)
    chat = {"model": "slips-batch", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}
    with running_daemon(config) as daemon:
        assert daemon.telemetry is None
        observer.publish(
            TOPICS.desired_device(DEVICE),
            sign_manifest([fleet_keys.trainer], smollm2_model.read_bytes(), url),
        )
        observer.wait_terminal(1, timeout=120)
        assert httpx.post(f"{serving.base_url}/v1/chat/completions", json=chat, timeout=60).status_code == 200
        pi.set_temperature(83.0)
        observer.wait_for(
            lambda: any("thermal limit on" in (s.get("last_result") or "") for s in observer.statuses),
            30,
            "thermal limit reported in the status",
        )
        deferred = httpx.post(f"{serving.base_url}/v1/chat/completions", json=chat, timeout=60)
        assert deferred.status_code == 503 and deferred.json()["error"]["code"] == "deferred_thermal"
        pi.set_temperature(65.0)
        observer.wait_for(
            lambda: any("thermal limit off" in (s.get("last_result") or "") for s in observer.statuses),
            30,
            "thermal limit lifted",
        )
        assert httpx.post(f"{serving.base_url}/v1/chat/completions", json=chat, timeout=60).status_code == 200
    listener.loop_stop()
    listener.disconnect()
    assert samples == []  # telemetry stayed off


def test_telemetry_while_the_broker_is_down_keeps_only_the_newest(
    tmp_path: Path, mqtt_broker: Mosquitto, fleet_keys: FleetKeys
) -> None:
    """QoS 0 telemetry is not stored: while offline only the newest `offline_backlog` samples wait,
    they arrive in order once the broker is back, and sending resumes after the reconnect."""
    backlog = 4
    telemetry = f"[telemetry]\ninterval_s = 1\noffline_backlog = {backlog}\n"
    config = write_edge_config(tmp_path / "device", mqtt_broker, fleet_keys.keyring(), extra=telemetry)
    with running_daemon(config):
        listener, before = _telemetry_listener(mqtt_broker)
        wait_until(lambda: len(before) >= 2, 30, "telemetry before the outage")
        listener.loop_stop()
        mqtt_broker.stop()
        outage_started = time.time()
        time.sleep(backlog + 4)  # more samples than the backlog holds
        mqtt_broker.start()
        listener, after = _telemetry_listener(mqtt_broker)  # subscribed before the daemon's reconnect
        status_client, statuses = _listener(mqtt_broker, "status", 1)
        # The daemon's own word for when it was back: its online status, stamped on reconnect.
        back = wait_until(
            lambda: next((s for s in statuses if s["online"] and _epoch(s["at"]) > outage_started), None),
            90,
            "the device online again",
        )
        reconnected_at = _epoch(back["at"])
        wait_until(lambda: [s for s in after if float(s["ts"]) > reconnected_at + 1], 60, "resumed")
        for client in (listener, status_client):
            client.loop_stop()
            client.disconnect()
    taken_offline = [float(s["ts"]) for s in after if outage_started < float(s["ts"]) < reconnected_at]
    # The newest `backlog` samples taken offline all arrive (one more may have been taken in the
    # moment between the reconnect and its status), in order.
    assert backlog <= len(taken_offline) <= backlog + 1, (taken_offline, reconnected_at)
    assert taken_offline == sorted(taken_offline)
    # The oldest were dropped: the first delivered was taken well after the outage began.
    assert taken_offline[0] > outage_started + 3
