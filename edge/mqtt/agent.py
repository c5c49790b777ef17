"""The device's MQTT v5 connection: TLS or password auth, Last Will, resubscription after every
reconnect, and publication of the disk-backed outbox with acknowledgements.

paho runs its network loop in its own thread. Callbacks only hand work to queues, because paho
calls ``on_publish`` while holding its own locks, and a publisher waiting on ours would deadlock.
"""

from __future__ import annotations

import logging
import queue
import socket
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge.state.outbox import Outbox
from shared.config import MqttSettings
from shared.mqtt import mqtt_client

log = logging.getLogger(__name__)

#: Largest packet the broker may send us; bigger messages are dropped by the broker, not parsed here.
MAX_INBOUND_PACKET = 1024 * 1024
#: Outbox messages handed to paho and not yet acknowledged.
INFLIGHT_WINDOW = 64
#: Keep our session (subscriptions, queued QoS 1 commands) on the broker across short outages.
SESSION_EXPIRY_S = 24 * 3600
#: QoS 0 messages (telemetry) waiting for the connection; older ones are dropped, never persisted.
DIRECT_BACKLOG = 16


@dataclass(frozen=True)
class Inbound:
    """A received message with the MQTT v5 request/response properties we use."""

    topic: str
    payload: bytes
    response_topic: str | None
    correlation: bytes | None


@dataclass
class _PumpState:
    """What the outbox pump remembers between passes."""

    #: paho mid -> outbox row id, for QoS 1 rows handed to the client and not yet acknowledged.
    inflight: dict[int, int] = field(default_factory=dict)
    #: Acknowledgements that arrived before publish() returned the mid.
    early: set[int] = field(default_factory=set)
    #: QoS 0 sends also get an on_publish (when written); they must not land in ``early``, where a
    #: reused mid would acknowledge an unrelated QoS 1 row.
    fire_and_forget: set[int] = field(default_factory=set)


class MqttAgent:
    """One persistent MQTT session for the device."""

    def __init__(
        self,
        settings: MqttSettings,
        client_id: str,
        subscriptions: Sequence[tuple[str, int]],
        will: tuple[str, bytes],
        outbox: Outbox,
        on_message: Callable[[Inbound], None],
        on_connected: Callable[[], None],
        direct_backlog: int = DIRECT_BACKLOG,
    ) -> None:
        self.settings = settings
        self.subscriptions = list(subscriptions)
        self.outbox = outbox
        self._on_message = on_message
        self._on_connected = on_connected
        self._events: queue.Queue[tuple[str, int]] = queue.Queue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._connected = threading.Event()
        #: Set once the subscriptions of the current connection are acknowledged.
        self.subscribed = threading.Event()
        self._pump: threading.Thread | None = None
        self._direct: deque[tuple[str, bytes]] = deque(maxlen=direct_backlog)
        #: Connection attempts failed since the last success (the 1st, 2nd, 4th, 8th... are logged).
        self._failed_attempts = 0

        client = mqtt_client(settings, client_id)
        client.will_set(will[0], will[1], qos=1, retain=True)
        client.reconnect_delay_set(min_delay=1, max_delay=60)
        client.on_connect = self._handle_connect
        client.on_connect_fail = self._handle_connect_fail
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_publish = self._handle_publish
        client.on_subscribe = self._handle_subscribe
        self.client = client

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> None:
        """Connect in the background; paho keeps reconnecting with backoff."""
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = SESSION_EXPIRY_S
        properties.MaximumPacketSize = MAX_INBOUND_PACKET
        self.client.connect_async(
            self.settings.host,
            self.settings.port,
            keepalive=self.settings.keepalive_s,
            clean_start=False,
            properties=properties,
        )
        self.client.loop_start()
        self._pump = threading.Thread(target=self._pump_outbox, name="mqtt-outbox", daemon=True)
        self._pump.start()

    def wake(self) -> None:
        """New rows in the outbox: publish them now."""
        self._wake.set()

    def publish_direct(self, topic: str, payload: bytes) -> None:
        """Send at QoS 0 without the outbox: nothing is stored, and while offline only the newest
        few wait (telemetry is worth little once stale)."""
        self._direct.append((topic, payload))
        self._wake.set()

    def wait_drained(self, timeout_s: float) -> bool:
        """Wait until the outbox is empty (all acknowledged) or the timeout passes."""
        deadline = time.monotonic() + timeout_s
        while len(self.outbox) and time.monotonic() < deadline:
            self.wake()
            time.sleep(0.05)
        return len(self.outbox) == 0

    def stop(self) -> None:
        """Disconnect cleanly (no Last Will) and stop the threads."""
        self._stop.set()
        self._wake.set()
        if self._pump is not None:
            self._pump.join(timeout=5)
        self.client.disconnect()
        self.client.loop_stop()

    # -- paho callbacks (network thread) -----------------------------------------------------
    def _handle_connect_fail(self, client: mqtt.Client, userdata: object) -> None:
        """paho retries on its own and says nothing: say it, without a line per retry."""
        self._failed_attempts += 1
        attempts = self._failed_attempts
        if attempts & (attempts - 1):  # logged at 1, 2, 4, 8... failures
            return
        host, port = self.settings.host, self.settings.port
        try:
            socket.getaddrinfo(host, port)
            why = "no answer or refused"
        except OSError as exc:
            why = f"the name does not resolve: {exc}"
        log.warning(
            "cannot connect to the broker at %s:%d (%s; %d attempt(s)); retrying", host, port, why, attempts
        )

    def _handle_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            log.error(
                "broker %s:%d refused the connection: %s", self.settings.host, self.settings.port, reason_code
            )
            return
        self._failed_attempts = 0
        log.info(
            "connected to %s:%d (session present: %s)",
            self.settings.host,
            self.settings.port,
            flags.session_present,
        )
        # Subscribe every time: a restarted broker may have lost the session.
        client.subscribe(self.subscriptions)
        self._connected.set()
        self._events.put(("reset", 0))
        self._on_connected()
        self._wake.set()

    def _handle_subscribe(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        refused = [str(code) for code in reason_codes if code.is_failure]
        if refused:
            log.error("broker refused %d subscription(s): %s", len(refused), ", ".join(refused))
        log.info("subscribed to %d topic(s)", len(reason_codes) - len(refused))
        self.subscribed.set()

    def _handle_disconnect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._connected.clear()
        self.subscribed.clear()
        self._events.put(("reset", 0))
        if not self._stop.is_set():
            log.warning("disconnected from broker (%s); reconnecting", reason_code)

    def _handle_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        props = message.properties
        response_topic = getattr(props, "ResponseTopic", None) if props else None
        correlation = getattr(props, "CorrelationData", None) if props else None
        self._on_message(Inbound(message.topic, bytes(message.payload), response_topic, correlation))

    def _handle_publish(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            log.error("broker refused message %d: %s", mid, reason_code)
        self._events.put(("ack", mid))
        self._wake.set()

    # -- outbox pump (own thread) -----------------------------------------------------------
    def _pump_outbox(self) -> None:
        pump = _PumpState()
        failing = False
        while not self._stop.is_set():
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            try:
                self._pump_once(pump)
            except sqlite3.Error as exc:
                # The state database cannot be written now (a full SD card): the row whose ack failed
                # stays and is published again (at least once); the next pass, a second on, retries.
                if not failing:
                    log.warning("cannot update the outbox (%s); retrying every second", exc)
                failing = True
            else:
                if failing:
                    log.info("the outbox can be updated again")
                failing = False

    def _pump_once(self, pump: _PumpState) -> None:
        """Take the broker's acknowledgements, then hand queued rows to the client."""
        inflight, early, fire_and_forget = pump.inflight, pump.early, pump.fire_and_forget
        while True:
            try:
                kind, mid = self._events.get_nowait()
            except queue.Empty:
                break
            if kind == "reset":
                # Unacknowledged rows are published again after a reconnect (at least once).
                inflight.clear()
                early.clear()
                fire_and_forget.clear()
            elif mid in fire_and_forget:
                fire_and_forget.discard(mid)
            elif mid in inflight:
                self.outbox.ack(inflight.pop(mid))
            else:
                early.add(mid)
        if not self._connected.is_set():
            return
        while self._direct:
            topic, payload = self._direct.popleft()
            info = self.client.publish(topic, payload, qos=0)
            if info.rc == mqtt.MQTT_ERR_SUCCESS:
                fire_and_forget.add(info.mid)
        if len(inflight) >= INFLIGHT_WINDOW:
            return
        for row in self.outbox.pending(INFLIGHT_WINDOW - len(inflight), set(inflight.values())):
            properties = None
            if row.correlation is not None:
                properties = Properties(PacketTypes.PUBLISH)
                properties.CorrelationData = row.correlation
            info = self.client.publish(
                row.topic, row.payload, qos=row.qos, retain=row.retain, properties=properties
            )
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                break  # not connected after all; the row stays queued
            if row.qos == 0:
                fire_and_forget.add(info.mid)
                self.outbox.ack(row.id)
            elif info.mid in early:
                early.discard(info.mid)
                self.outbox.ack(row.id)
            else:
                inflight[info.mid] = row.id
