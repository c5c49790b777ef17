"""``immune-edge run``: the device daemon.

Threads: paho's network loop and the outbox pump (edge.mqtt.agent); this control loop, which
validates every inbound message and answers quick commands; one worker that runs deployments
and other state changes in order, so a long download never blocks status queries; telemetry and
thermal back-off (edge.telemetry); and the data plane (edge.dataplane): the HTTP API thread and
the worker supervisor, with inference in child processes.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from edge.control.commands import CommandHandler
from edge.control.deployer import TRANSIENT_REASONS, envelope_digest
from edge.dataplane import DataPlane
from edge.mqtt.agent import Inbound, MqttAgent
from edge.node import EdgeConfig, EdgeNode
from edge.service_manager import ServiceManager
from edge.telemetry.host import HostSensors
from edge.telemetry.loop import TelemetryLoop
from edge.telemetry.sampler import TelemetrySampler
from edge.telemetry.thermal import ThermalGovernor
from shared.errors import ContractError
from shared.messages import DeviceStatus, Telemetry
from shared.signing import Envelope
from shared.topics import TopicError, TopicKind, TopicRef

log = logging.getLogger(__name__)

#: Inbound messages waiting for the control loop; beyond this a flood is dropped, not buffered.
INBOX_LIMIT = 1000
#: How often the served model is compared with the store's current pointer, which
#: `immune-edge install` may move while the daemon runs.
SERVED_CHECK_S = 5.0


@dataclass
class _Desired:
    """Retained desired-state envelopes by level, most specific first when choosing."""

    by_level: dict[str, bytes] = field(default_factory=dict)
    settle_until: float | None = None
    retry_at: float | None = None

    def effective(self, groups: tuple[str, ...]) -> tuple[str, bytes] | None:
        for level in ("device", *(f"group:{g}" for g in groups), "fleet"):
            if level in self.by_level:
                return level, self.by_level[level]
        return None


def _level(ref: TopicRef) -> str:
    if ref.kind is TopicKind.DESIRED_DEVICE:
        return "device"
    if ref.kind is TopicKind.DESIRED_GROUP:
        return f"group:{ref.group}"
    return "fleet"


_DESIRED_KINDS = {TopicKind.DESIRED_FLEET, TopicKind.DESIRED_GROUP, TopicKind.DESIRED_DEVICE}


class EdgeDaemon:
    """Receives desired state and commands over MQTT and drives the deployer."""

    def __init__(self, config: EdgeConfig) -> None:
        self.config = config
        self.dataplane = DataPlane(config) if config.runtime.enabled else None
        self.node = EdgeNode.open(config, self.dataplane.runtime if self.dataplane else None)
        self.device_id = config.device.id
        self.service = ServiceManager()
        self.groups = tuple(config.device.groups)
        self._inbox: queue.Queue[Inbound] = queue.Queue(maxsize=INBOX_LIMIT)
        self._jobs: queue.Queue[Callable[[], object] | None] = queue.Queue()
        self._desired = _Desired()
        self._desired_lock = threading.Lock()
        self._reconcile_queued = threading.Event()
        self._next_served_check = 0.0
        self._served_request: tuple[str, int] | None = None
        self._stop = threading.Event()
        self.commands = CommandHandler(
            self.node.topics,
            self.device_id,
            self.node.trust,
            self.node.nonces,
            self.node.deployer,
            self.node.reporter,
            self.node.clock_skew,
            self._wanted_envelopes,
            self._desired_changed,
        )
        topics = self.node.topics
        offline = DeviceStatus(
            device_id=self.device_id,
            fleet=topics.fleet,
            online=False,
            at=self.node.reporter.clock(),
            groups=list(self.groups),
            last_result="offline (connection lost)",
        )
        self.agent = MqttAgent(
            config.mqtt,
            client_id=self.device_id,
            subscriptions=topics.device_subscriptions(self.device_id, self.groups),
            will=(topics.status(self.device_id), offline.to_json()),
            outbox=self.node.outbox,
            on_message=self._receive,
            on_connected=self._connected,
        )
        self._worker = threading.Thread(target=self._work, name="deployer", daemon=True)
        self.telemetry = self._telemetry_loop() if config.telemetry.enabled else None

    def _telemetry_loop(self) -> TelemetryLoop:
        config, dataplane = self.config, self.dataplane
        sensors = HostSensors(config.device.sysfs_root, config.device.procfs_root, config.telemetry.vcgencmd)
        sampler = TelemetrySampler(
            self.device_id,
            self.node.topics.fleet,
            sensors,
            self.node.ledger,
            config.store_dir,
            dataplane.runtime if dataplane else None,
            dataplane.metrics if dataplane else None,
        )
        if dataplane is not None:
            dataplane.metrics.watch_telemetry(lambda: sampler.latest)
        governor = ThermalGovernor(config.thermal, dataplane.runtime if dataplane else None)
        return TelemetryLoop(
            config.telemetry, sampler, governor, self._publish_telemetry, self._report_telemetry
        )

    def _publish_telemetry(self, sample: Telemetry) -> None:
        self.agent.publish_direct(self.node.topics.telemetry(self.device_id), sample.to_json())

    def _report_telemetry(self, summary: dict[str, float], change: str | None) -> None:
        self.node.reporter.summary = summary
        self.node.reporter.status(note=change)
        self.agent.wake()

    # -- lifecycle -----------------------------------------------------------------------------
    def run(self) -> None:
        """Serve until ``stop()`` (SIGTERM in the CLI)."""
        if self.dataplane is not None:
            self.dataplane.start()
        self._worker.start()
        self._jobs.put(self._resume)
        self.agent.start()
        if self.telemetry is not None:
            self.telemetry.start()
        self.service.ready(f"device {self.device_id}: connecting to the broker")
        try:
            while not self._stop.is_set():
                self.service.tick()
                try:
                    message = self._inbox.get(timeout=0.2)
                except queue.Empty:
                    message = None
                if message is not None:
                    self._handle(message)
                self._schedule_reconcile()
                self._check_served()
        finally:
            self._shutdown()

    def stop(self) -> None:
        self._stop.set()
        if self.dataplane is not None:
            self.dataplane.runtime.interrupt()  # a trial window in progress ends now

    def _shutdown(self) -> None:
        self.service.stopping()
        if self.telemetry is not None:
            self.telemetry.stop()
        self._jobs.put(None)
        self._worker.join(timeout=30)
        status = self.node.reporter.status_message(online=False)
        self.node.outbox.put(
            self.node.topics.status(self.device_id),
            status.to_json(),
            qos=1,
            retain=True,
            coalesce_key="status",
        )
        self.agent.wait_drained(timeout_s=3.0)
        self.agent.stop()
        if self.dataplane is not None:
            self.dataplane.close()
        self.node.close()
        log.info("stopped")

    # -- worker ---------------------------------------------------------------------------------
    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except Exception:  # a bug in one job must not stop the device from taking the next
                log.exception("job failed")
            self.agent.wake()

    def _resume(self) -> None:
        self.node.deployer.resume_unfinished()
        self.node.deployer.serve_current()
        self.node.reporter.status()

    # -- inbound ------------------------------------------------------------------------------
    def _receive(self, message: Inbound) -> None:
        try:
            self._inbox.put_nowait(message)
        except queue.Full:
            log.warning("inbox full: dropping a message on %s", message.topic)

    def _connected(self) -> None:
        self.node.reporter.status()

    def _handle(self, message: Inbound) -> None:
        try:
            ref = self.node.topics.parse(message.topic)
        except TopicError as exc:
            log.warning("ignoring message: %s", exc)
            return
        if ref.kind in _DESIRED_KINDS:
            self._desired_message(ref, message.payload)
        elif ref.kind is TopicKind.KEYRING:
            self._keyring_message(message.payload)
        elif ref.kind is TopicKind.COMMAND and ref.device == self.device_id:
            self._command_message(message)
        else:
            log.warning("ignoring message on %s: not a topic this device acts on", message.topic)

    def _desired_message(self, ref: TopicRef, payload: bytes) -> None:
        level = _level(ref)
        with self._desired_lock:
            if payload:
                self._desired.by_level[level] = payload
            else:
                self._desired.by_level.pop(level, None)  # retained desired state cleared
            self._desired.settle_until = time.monotonic() + self.config.deploy.settle_s

    def _keyring_message(self, payload: bytes) -> None:
        if not payload:
            return
        try:
            before = self.node.trust.keyring
            keyring = self.node.trust.update(Envelope.from_json(payload, what="keyring envelope"))
            if keyring is before:
                return  # the retained copy of the keyring already in use
        except ContractError as exc:
            log.warning("keyring update rejected (%s): %s", exc.reason, exc)
            self.node.reporter.status(note=f"keyring update rejected ({exc.reason}): {exc}")
        else:
            self.node.reporter.status(note=f"keyring version {keyring.version} adopted")
            self._desired_changed()  # manifests refused under the old keyring may now verify
        self.agent.wake()

    def _command_message(self, message: Inbound) -> None:
        reply = self.commands.reply_to(message.response_topic, message.correlation)
        try:
            command = self.commands.authenticate(message.payload)
        except ContractError as exc:
            self.commands.refuse(reply, exc)
            self.agent.wake()
            return
        if command.action.action == "status":
            self.commands.execute(command, reply)  # read-only: answer at once, even mid-download
            self.agent.wake()
        else:
            self._jobs.put(lambda: self.commands.execute(command, reply))

    def _check_served(self) -> None:
        """Serve the current model if something else (a local install) changed the pointer."""
        if self.dataplane is None or time.monotonic() < self._next_served_check:
            return
        self._next_served_check = time.monotonic() + SERVED_CHECK_S
        current, active = self.node.ledger.current(), self.dataplane.router.active
        key = (current.channel, current.serial) if current else None
        if key is not None and key != (active.key if active else None) and key != self._served_request:
            self._served_request = key  # once per pointer change: a model that cannot load is not retried
            self._jobs.put(self.node.deployer.serve_current)  # runs after any deployment in progress

    # -- desired state ---------------------------------------------------------------------------
    def _desired_changed(self) -> None:
        with self._desired_lock:
            self._desired.settle_until = time.monotonic()
            self._desired.retry_at = None

    def _wanted_envelopes(self) -> list[bytes]:
        with self._desired_lock:
            return list(self._desired.by_level.values())

    def _schedule_reconcile(self) -> None:
        now = time.monotonic()
        with self._desired_lock:
            due = [t for t in (self._desired.settle_until, self._desired.retry_at) if t is not None]
            if not due or min(due) > now or self._reconcile_queued.is_set():
                return
            self._desired.settle_until = self._desired.retry_at = None
        self._reconcile_queued.set()
        self._jobs.put(self._reconcile)

    def _reconcile(self) -> None:
        """Deploy the most specific desired state unless it was already acted on or the device is pinned."""
        self._reconcile_queued.clear()
        with self._desired_lock:
            chosen = self._desired.effective(self.groups)
        if chosen is None:
            return
        level, envelope = chosen
        ledger = self.node.ledger
        digest = envelope_digest(envelope)
        if ledger.handled(level) == digest:
            return
        if ledger.pinned:
            log.info("pinned: not acting on new desired state from %s", level)
            return
        outcome = self.node.deployer.deploy(envelope, source=f"desired:{level}")
        if outcome.reason in TRANSIENT_REASONS:
            with self._desired_lock:
                self._desired.retry_at = time.monotonic() + self.config.deploy.retry_failed_s
            log.info(
                "will retry the desired state from %s in %.0f s", level, self.config.deploy.retry_failed_s
            )
        else:
            ledger.mark_handled(level, digest)
