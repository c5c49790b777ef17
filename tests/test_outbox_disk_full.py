"""The device's event channel survives a full disk: the outbox (SQLite, on a real tmpfs that really
fills up) cannot delete an acknowledged row for a while, and publishing goes on once there is space."""

from __future__ import annotations

import threading
from pathlib import Path

import paho.mqtt.client as mqtt

from edge.mqtt.agent import MqttAgent
from edge.state.db import StateDB
from edge.state.outbox import Outbox
from shared.config import MqttSettings
from tests.harness.broker import Mosquitto
from tests.harness.logwatch import watching
from tests.harness.tmpfs import fill, small_tmpfs
from tests.harness.waiting import wait_until


def test_an_ack_that_cannot_be_stored_does_not_stop_the_outbox(
    tmp_path: Path, mqtt_broker: Mosquitto
) -> None:
    """Bug (test_disk_full_fails_cleanly, failing on two xdist workers): the broker acknowledged an event
    while the disk was full, deleting its row raised `database or disk is full`, and the exception ended
    the outbox thread. The device never published another event, even once space was free again. Now the
    failure is logged, the row stays (published again: at least once) and the pump goes on."""
    received: list[tuple[str, bytes]] = []
    seen = threading.Condition()
    watcher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="watcher", protocol=mqtt.MQTTv5)

    def on_message(_client: mqtt.Client, _userdata: object, message: mqtt.MQTTMessage) -> None:
        with seen:
            received.append((message.topic, message.payload))
            seen.notify_all()

    watcher.on_message = on_message
    watcher.connect(mqtt_broker.host, mqtt_broker.port)
    watcher.subscribe("dev/#", qos=1)
    watcher.loop_start()
    with small_tmpfs(tmp_path / "disk", "1m") as disk:
        outbox = Outbox(StateDB(disk / "state.db"))
        outbox.put("dev/events", b"A")
        filler = fill(disk)
        agent = MqttAgent(
            MqttSettings(host=mqtt_broker.host, port=mqtt_broker.port),
            "device-1",
            [("dev/commands", 1)],
            ("dev/status", b"offline"),
            outbox,
            on_message=lambda _message: None,
            on_connected=lambda: None,
        )
        try:
            with watching("edge.mqtt.agent") as log:
                agent.start()
                wait_until(lambda: ("dev/events", b"A") in received, 30, "A published")
                log.wait_for("cannot update the outbox", timeout=30)  # the ack hit the full disk
            filler.unlink()
            outbox.put("dev/events", b"B")
            agent.wake()
            wait_until(lambda: ("dev/events", b"B") in received, 30, "B published after space came back")
            wait_until(lambda: len(outbox) == 0, 30, "both rows acknowledged and deleted")
        finally:
            agent.stop()
            watcher.loop_stop()
            watcher.disconnect()
