"""``immune-edge run``: the device daemon.

Threads: paho's network loop and the outbox pump (edge.mqtt.agent); this control loop, which
validates every inbound message and answers quick commands; one worker that runs deployments
and other state changes in order, so a long download never blocks status queries; telemetry; and
the data plane (edge.assembly.DataPlane): the HTTP API thread, the worker supervisor and thermal
back-off, with inference in child processes. The parts are built in edge.assembly.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable

from edge.assembly import Device
from edge.audit import RefusalKind
from edge.capture.commands import CaptureCommands
from edge.config import EdgeConfig
from edge.control.commands import CommandHandler
from edge.control.reconcile import DESIRED_KINDS, Reconciler
from edge.mqtt.agent import Inbound, MqttAgent
from edge.service_manager import ServiceManager
from edge.telemetry.host import HostSensors
from edge.telemetry.loop import TelemetryLoop
from edge.telemetry.sampler import TelemetrySampler
from shared.errors import ContractError
from shared.messages import DeviceStatus, Telemetry
from shared.reasons import Reason
from shared.signing import Envelope
from shared.topics import TopicError, TopicKind

log = logging.getLogger(__name__)

#: Inbound messages waiting for the control loop; beyond this a flood is dropped, not buffered.
INBOX_LIMIT = 1000
#: Commands answered on the control loop at once, even while a deployment runs: they read or delete
#: local data and never wait on the deployer.
QUICK_ACTIONS = frozenset({"status", "capture_status", "capture_pull", "capture_purge"})
#: How often the served model is compared with the store's current pointer, which
#: `immune-edge install` may move while the daemon runs.
SERVED_CHECK_S = 5.0


class EdgeDaemon:
    """Receives desired state and commands over MQTT and drives the deployer."""

    def __init__(self, config: EdgeConfig) -> None:
        self.config = config
        device = Device.build(config, on_thermal_change=self._thermal_changed)
        self.control, self.data, self.capture = device.control, device.data, device.capture
        self.device_id = config.device.id
        self.service = ServiceManager()
        self.groups = tuple(config.device.groups)
        self._inbox: queue.Queue[Inbound] = queue.Queue(maxsize=INBOX_LIMIT)
        self._jobs: queue.Queue[Callable[[], object] | None] = queue.Queue()
        self._next_served_check = 0.0
        self._served_request: tuple[str, int] | None = None
        self._stop = threading.Event()
        control = self.control
        self.reconciler = Reconciler(
            control.deployer, self.groups, config.deploy.settle_s, config.deploy.retry_failed_s
        )
        self.commands = CommandHandler(
            control.topics,
            self.device_id,
            control.trust,
            control.nonces,
            control.deployer,
            self.reconciler,
            control.reporter,
            control.clock_skew,
            CaptureCommands(config.capture, self.capture, self.data.capture if self.data else None),
        )
        offline = DeviceStatus(
            device_id=self.device_id,
            fleet=control.topics.fleet,
            online=False,
            at=control.reporter.clock(),
            groups=list(self.groups),
            last_result="offline (connection lost)",
        )
        self.agent = MqttAgent(
            config.mqtt,
            client_id=self.device_id,
            subscriptions=control.topics.device_subscriptions(self.device_id, self.groups),
            will=(control.topics.status(self.device_id), offline.to_json()),
            outbox=control.outbox,
            on_message=self._receive,
            on_connected=self._connected,
            direct_backlog=config.telemetry.offline_backlog,
        )
        self._worker = threading.Thread(target=self._work, name="deployer", daemon=True)
        self.telemetry = self._telemetry_loop() if config.telemetry.enabled else None

    def _telemetry_loop(self) -> TelemetryLoop:
        config, data = self.config, self.data
        sensors = (
            data.sensors
            if data is not None
            else HostSensors(config.device.sysfs_root, config.device.procfs_root, config.telemetry.vcgencmd)
        )
        sampler = TelemetrySampler(
            self.device_id,
            self.control.topics.fleet,
            sensors,
            self.control.ledger,
            config.store_dir,
            data.runtime if data else None,
            data.metrics if data else None,
            refusals=self.control.audit.total,
        )
        if data is not None:
            data.metrics.watch_telemetry(lambda: sampler.latest)
        governor = data.governor if data is not None else None
        return TelemetryLoop(
            config.telemetry, sampler, governor, self._publish_telemetry, self._report_telemetry
        )

    def _publish_telemetry(self, sample: Telemetry) -> None:
        self.agent.publish_direct(self.control.topics.telemetry(self.device_id), sample.to_json())

    def _report_telemetry(self, summary: dict[str, float]) -> None:
        self.control.reporter.summary = summary
        self.control.reporter.status()
        self.agent.wake()

    def _thermal_changed(self, change: str) -> None:
        """The data plane backed off or recovered: say so in the retained status at once, with a fresh
        telemetry summary when telemetry is on."""
        if self.telemetry is not None:
            self.telemetry.tick(report_now=True)
        self.control.reporter.status(note=change)
        self.agent.wake()

    # -- lifecycle -----------------------------------------------------------------------------
    def run(self) -> None:
        """Serve until ``stop()`` (SIGTERM in the CLI)."""
        if self.data is not None:
            self.data.start()
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
                if self.reconciler.take_due():
                    self._jobs.put(self.reconciler.reconcile)
                self._check_served()
        finally:
            self._shutdown()

    def stop(self) -> None:
        self._stop.set()
        if self.data is not None:
            self.data.runtime.interrupt()  # a trial window in progress ends now

    def _shutdown(self) -> None:
        self.service.stopping()
        if self.telemetry is not None:
            self.telemetry.stop()
        self._jobs.put(None)
        self._worker.join(timeout=30)
        control = self.control
        status = control.reporter.status_message(online=False)
        try:
            topic = control.topics.status(self.device_id)
            control.outbox.put(topic, status.to_json(), qos=1, retain=True, coalesce_key="status")
        except sqlite3.Error as exc:  # a full disk must not keep the workers and the session running
            log.warning("cannot queue the offline status (%s); the broker's will says it instead", exc)
        self.agent.wait_drained(timeout_s=3.0)
        self.agent.stop()
        if self.data is not None:
            self.data.close()
        if self.capture is not None:
            self.capture.close()
        control.close()
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
        self.control.recovery.resume_unfinished()
        self.control.deployer.serve_current()
        self.control.reporter.status()

    # -- inbound ------------------------------------------------------------------------------
    def _receive(self, message: Inbound) -> None:
        try:
            self._inbox.put_nowait(message)
        except queue.Full:
            self.control.audit.refused(
                RefusalKind.MESSAGE,
                Reason.INBOX_FULL,
                message.topic,
                f"more than {INBOX_LIMIT} messages waiting",
            )

    def _connected(self) -> None:
        self.control.reporter.status()

    def _handle(self, message: Inbound) -> None:
        try:
            ref = self.control.topics.parse(message.topic)
        except TopicError as exc:
            self.control.audit.refused(RefusalKind.MESSAGE, exc.reason, message.topic, str(exc))
            return
        if ref.kind in DESIRED_KINDS:
            self.reconciler.received(ref, message.payload)
        elif ref.kind is TopicKind.KEYRING:
            self._keyring_message(message.topic, message.payload)
        elif ref.kind is TopicKind.COMMAND and ref.device == self.device_id:
            self._command_message(message)
        else:
            self.control.audit.refused(
                RefusalKind.MESSAGE, Reason.WRONG_TOPIC, message.topic, "not a topic this device acts on"
            )

    def _keyring_message(self, topic: str, payload: bytes) -> None:
        if not payload:
            return
        control = self.control
        try:
            before = control.trust.keyring
            keyring = control.trust.update(Envelope.from_json(payload, what="keyring envelope"))
            if keyring is before:
                return  # the retained copy of the keyring already in use
        except ContractError as exc:
            control.audit.refused(RefusalKind.KEYRING, exc.reason, topic, str(exc))
            control.reporter.status(note=f"keyring update rejected ({exc.reason}): {exc}")
        else:
            control.reporter.status(note=f"keyring version {keyring.version} adopted")
            self.reconciler.changed()  # manifests refused under the old keyring may now verify
        self.agent.wake()

    def _command_message(self, message: Inbound) -> None:
        reply = self.commands.reply_to(message.response_topic, message.correlation)
        try:
            command = self.commands.authenticate(message.payload)
        except ContractError as exc:
            self.commands.refuse(reply, exc, origin=message.topic)
            self.agent.wake()
            return
        if command.action.action in QUICK_ACTIONS:
            self.commands.execute(command, reply)
            self.agent.wake()
        else:
            self._jobs.put(lambda: self.commands.execute(command, reply))

    def _check_served(self) -> None:
        """Serve the current model if something else (a local install) changed the pointer."""
        if self.data is None or time.monotonic() < self._next_served_check:
            return
        self._next_served_check = time.monotonic() + SERVED_CHECK_S
        current, active = self.control.ledger.current(), self.data.router.active
        key = current.key if current else None
        if key is not None and key != (active.key if active else None) and key != self._served_request:
            self._served_request = key  # once per pointer change: a model that cannot load is not retried
            self._jobs.put(self.control.deployer.serve_current)  # runs after any deployment in progress
