"""Device identity on the TLS broker with the generated ACL: a device cannot speak as another one, and
a device refuses commands that are unsigned or not signed by an operator key."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt

from fleet.client import FleetClient
from fleet.settings import FleetSettings
from shared.schema import canonical_json
from shared.signing import write_private_key
from shared.topics import render_mosquitto_acl
from tests.conftest import FleetKeys
from tests.harness.broker import Mosquitto
from tests.harness.edge import FLEET, TOPICS, FleetObserver, running_daemon, sign_command, write_edge_config
from tests.harness.waiting import wait_until


def _client(broker: Mosquitto, cn: str) -> mqtt.Client:
    assert broker.tls is not None
    cert = broker.tls.client(cn)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{cn}-forger", protocol=mqtt.MQTTv5)
    client.tls_set(ca_certs=str(broker.tls.ca.ca_file), certfile=str(cert.cert), keyfile=str(cert.key))
    connected = threading.Event()
    client.on_connect = lambda *args: connected.set()
    client.connect(broker.host, broker.port)
    client.loop_start()
    assert connected.wait(10)
    return client


def test_devices_cannot_impersonate_each_other_and_refuse_unsigned_commands(
    tmp_path: Path, tls_broker_factory: Callable[[str | None], Mosquitto], fleet_keys: FleetKeys
) -> None:
    acl = render_mosquitto_acl(TOPICS, {"pi-a": ["g"], "pi-b": ["g"]}, operators=["op-1"])
    broker = tls_broker_factory(acl)
    assert broker.tls is not None
    device_cert, operator_cert = broker.tls.client("pi-b"), broker.tls.client("op-1")
    tls = f'[mqtt.tls]\nca_file = "{broker.tls.ca.ca_file}"\n'
    config = write_edge_config(
        tmp_path / "pi-b",
        broker,
        fleet_keys.keyring(),
        device="pi-b",
        groups=("g",),
        mqtt=tls + f'cert_file = "{device_cert.cert}"\nkey_file = "{device_cert.key}"\n',
        extra="[telemetry]\ninterval_s = 1\n",
    )
    write_private_key(fleet_keys.operator, tmp_path / "op.key")
    operator = FleetSettings.model_validate(
        {
            "fleet": FLEET,
            "operator": "op-1",
            "operator_keys": [str(tmp_path / "op.key")],
            "data_dir": str(tmp_path / "operator"),
            "mqtt": {
                "host": broker.host,
                "port": broker.port,
                "tls": {
                    "ca_file": str(broker.tls.ca.ca_file),
                    "cert_file": str(operator_cert.cert),
                    "key_file": str(operator_cert.key),
                },
            },
        }
    )
    received: list[tuple[str, object]] = []
    with (
        running_daemon(config),
        FleetClient(operator, listener=lambda kind, m: received.append((kind, m))) as fleet,
    ):
        genuine = wait_until(lambda: [m for k, m in received if k == "telemetry" and m.device_id == "pi-b"])
        assert genuine, "pi-b's own telemetry never arrived"

        forger = _client(broker, "pi-a")
        forged_telemetry = {"device_id": "pi-b", "fleet": FLEET, "ts": time.time(), "soc_temp_c": 99.9}
        forged_event = {
            "event_id": "f" * 32, "device_id": "pi-b", "fleet": FLEET, "deployment_id": "e" * 32,
            "manifest_name": "evil", "serial": 99, "state": "committed", "reason": "forged",
            "at": "2026-11-24T00:00:00+00:00",
        }  # fmt: skip
        results = [
            forger.publish(TOPICS.telemetry("pi-b"), json.dumps(forged_telemetry), qos=1),
            forger.publish(TOPICS.events("pi-b"), json.dumps(forged_event), qos=1),
            forger.publish(TOPICS.status("pi-b"), json.dumps({"device_id": "pi-b", "online": False}), qos=1),
            # Its own topic with the other's name inside: the ACL allows the topic, the contract does not.
            forger.publish(TOPICS.telemetry("pi-a"), json.dumps(forged_telemetry), qos=1),
            forger.publish(
                TOPICS.telemetry("pi-a"), json.dumps({**forged_telemetry, "device_id": "pi-a"}), qos=1
            ),
            # A genuine operator-signed command, smuggled in with a device's certificate: the ACL
            # gives devices no write on command topics, so pi-b never sees it (it would obey it).
            forger.publish(
                TOPICS.command("pi-b"),
                sign_command([fleet_keys.operator], {"action": "pin"}, device="pi-b"),
                qos=1,
            ),
        ]
        for result in results:
            result.wait_for_publish(10)
        # The legitimate last message is the signal: the broker delivers one client's messages in
        # order, so a forged message let through would have arrived (and been decoded) before it.
        assert wait_until(lambda: any(k == "telemetry" and m.device_id == "pi-a" for k, m in received))
        assert not any(getattr(m, "soc_temp_c", None) == 99.9 and m.device_id == "pi-b" for _, m in received)
        assert not any(getattr(m, "manifest_name", None) == "evil" for _, m in received)
        assert fleet.devices["pi-b"].status is not None and fleet.devices["pi-b"].status.online
        assert fleet.command("pi-b", {"action": "status"}, timeout_s=30).result["pinned"] is False
        forger.loop_stop()
        forger.disconnect()
        # Refused commands are answered too, and the operator's client accepts those answers.
        refusals_seen = len([m for k, m in received if k == "response"])

        # Through an operator's certificate a command reaches pi-b, but needs an operator signature.
        watcher = FleetObserver(broker, cert=operator_cert)
        try:
            unsigned = canonical_json({"action": {"action": "status"}, "device_id": "pi-b"})
            answer = watcher.command(unsigned, device="pi-b", timeout=30)
            assert not answer["ok"] and answer["result"]["reason"] in ("schema", "bad-signature")
            trainer_signed = sign_command([fleet_keys.trainer], {"action": "rollback"}, device="pi-b")
            answer = watcher.command(trainer_signed, device="pi-b", timeout=30)
            assert not answer["ok"] and answer["result"]["reason"] == "wrong-role"
            assert "not operator" in answer["error"]
            good = fleet.command("pi-b", {"action": "status"}, timeout_s=30)
            assert good.ok and good.result["action"] == "status"
            assert len([m for k, m in received if k == "response"]) >= refusals_seen + 3
        finally:
            watcher.close()
