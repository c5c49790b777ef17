"""Two real mosquittos joined by a bridge, as a site would run them: devices on the edge broker, the
operator and the trainer on the central one. MQTT v5 properties (response topic, correlation data,
message expiry) cross the bridge, and a rollout, an operator command and telemetry work across it."""

from __future__ import annotations

import json
import queue
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.factories import gguf_bytes
from tests.harness.artifact_server import ArtifactServer
from tests.harness.broker import Mosquitto
from tests.harness.edge import (
    DEVICE,
    TOPICS,
    FleetObserver,
    running_daemon,
    sign_command,
    sign_manifest,
    write_edge_config,
)


@dataclass
class Site:
    central: Mosquitto
    edge: Mosquitto


def _bridge_to(central: Mosquitto) -> str:
    """The edge broker's bridge section: everything under the topic root, both ways, MQTT v5."""
    return (
        "\nconnection to-central\n"
        f"address {central.host}:{central.port}\n"
        "bridge_protocol_version mqttv50\n"
        f"remote_clientid bridge-{secrets.token_hex(3)}\n"
        "cleansession false\n"
        f"topic {TOPICS.base}/# both 1\n"
    )


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    central = Mosquitto(tmp_path / "central")
    with central, Mosquitto(tmp_path / "edge", extra=_bridge_to(central)) as edge:
        yield Site(central, edge)


class _Client:
    """A bare MQTT v5 client that keeps what it receives, properties included."""

    def __init__(self, broker: Mosquitto, topic: str) -> None:
        self.received: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda c, *a: c.subscribe(topic, 1)
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = lambda c, u, m: self.received.put(m)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert subscribed.wait(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_v5_properties_cross_the_bridge_both_ways(site: Site) -> None:
    on_edge = _Client(site.edge, f"{TOPICS.base}/probe/down")
    on_central = _Client(site.central, f"{TOPICS.base}/probe/up")
    try:
        for sender, receiver, leg in ((on_central, on_edge, "down"), (on_edge, on_central, "up")):
            properties = Properties(PacketTypes.PUBLISH)
            properties.ResponseTopic = f"{TOPICS.base}/operator/op-1/response"
            properties.CorrelationData = secrets.token_bytes(8)
            properties.MessageExpiryInterval = 600
            topic = f"{TOPICS.base}/probe/{leg}"
            for _ in range(30):  # the bridge connects a moment after both brokers are up
                sender.client.publish(topic, leg.encode(), qos=1, properties=properties).wait_for_publish(5)
                try:
                    message = receiver.received.get(timeout=1)
                    break
                except queue.Empty:
                    continue
            else:
                pytest.fail(f"nothing crossed the bridge {leg}")
            got = message.properties
            assert message.payload == leg.encode()
            assert got.ResponseTopic == properties.ResponseTopic
            assert got.CorrelationData == properties.CorrelationData
            assert 0 < got.MessageExpiryInterval <= 600  # what is left of it
    finally:
        on_edge.close()
        on_central.close()


def test_rollout_command_and_telemetry_work_across_the_bridge(site: Site, tmp_path, fleet_keys) -> None:
    config = write_edge_config(
        tmp_path / "device",
        site.edge,
        fleet_keys.keyring(),
        extra="[telemetry]\ninterval_s = 1\nstatus_every_s = 2\n",
    )
    operator = FleetObserver(site.central)  # the operator side only knows the central broker
    telemetry = _Client(site.central, TOPICS.telemetry(DEVICE))
    try:
        with ArtifactServer(tmp_path / "artifacts") as server, running_daemon(config):
            operator.wait_for(lambda: any(s["online"] for s in operator.statuses), 60, "the device online")
            data = gguf_bytes()
            envelope = sign_manifest([fleet_keys.trainer], data, server.add("model.gguf", data), serial=3)
            operator.publish(TOPICS.desired_fleet(), envelope)
            assert operator.wait_terminal(1, timeout=60)[-1]["state"] == "committed"

            # A command request on the central broker, answered over the bridge to its response topic
            # with its correlation data.
            response = operator.command(sign_command([fleet_keys.operator], {"action": "status"}))
            assert response["ok"] is True and response["result"]["serial"] == 3

            samples = (json.loads(telemetry.received.get(timeout=30).payload) for _ in range(30))
            sample = next(s for s in samples if s.get("model_serial") == 3)  # one from after the deploy
            assert sample["device_id"] == DEVICE and sample["ts"] > 0
    finally:
        telemetry.close()
        operator.close()
