"""Everything the device tells the fleet goes through here: deployment events, retained status and
command responses, all written to the disk-backed outbox in the same transaction as the state they
describe."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from edge.state.ledger import InstalledModel, Ledger
from edge.state.outbox import Outbox
from shared.messages import CommandResponse, DeploymentEvent, DeploymentState, DeviceStatus, ModelRef
from shared.topics import Topics

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


class Reporter:
    """Builds and queues this device's outgoing messages."""

    def __init__(
        self,
        topics: Topics,
        device_id: str,
        groups: tuple[str, ...],
        ledger: Ledger,
        outbox: Outbox,
        software_version: str | None = None,
        clock: Clock = utc_now,
    ) -> None:
        self.topics = topics
        self.device_id = device_id
        self.groups = groups
        self.ledger = ledger
        self.outbox = outbox
        self.software_version = software_version
        self.clock = clock
        self.last_result: str | None = None
        #: Latest telemetry figures, carried in the retained status.
        self.summary: dict[str, float] = {}

    def transition(
        self,
        deployment_id: str,
        state: DeploymentState,
        reason: str | None,
        name: str | None,
        serial: int | None,
        source: str,
    ) -> DeploymentEvent:
        """Persist a deployment's new state and queue its event, atomically."""
        event = DeploymentEvent(
            event_id=uuid.uuid4().hex,
            device_id=self.device_id,
            fleet=self.topics.fleet,
            deployment_id=deployment_id,
            manifest_name=name,
            serial=serial,
            source=source,
            state=state,
            reason=reason[:2048] if reason else None,
            at=self.clock(),
        )
        with self.ledger.db.transaction():
            self.ledger.set_state(deployment_id, state, event.reason)
            self.outbox.put(self.topics.events(self.device_id), event.to_json(), qos=1)
        if state.terminal:
            self.last_result = f"{state.value}: {event.reason}"
        return event

    def status_message(self, online: bool) -> DeviceStatus:
        """The device's status as it stands now."""
        current = self.ledger.current()
        last = self.ledger.last_deployment()
        return DeviceStatus(
            device_id=self.device_id,
            fleet=self.topics.fleet,
            online=online,
            at=self.clock(),
            software_version=self.software_version,
            groups=list(self.groups),
            model=_ref(current) if current else None,
            adapters=[_ref(a) for slot in self.ledger.adapter_slots() if (a := self.ledger.current(slot))],
            deployment_state=last.state if last else None,
            pinned=self.ledger.pinned,
            last_result=self.last_result[:2048] if self.last_result else None,
            summary=self.summary,
        )

    def status(self, note: str | None = None) -> None:
        """Queue the retained online status (replacing an unsent older one)."""
        if note is not None:
            self.last_result = note
        self.outbox.put(
            self.topics.status(self.device_id),
            self.status_message(online=True).to_json(),
            qos=1,
            retain=True,
            coalesce_key="status",
        )

    def respond(self, response_topic: str, correlation: bytes | None, response: CommandResponse) -> None:
        """Queue a command response for the operator's MQTT v5 response topic."""
        self.outbox.put(response_topic, response.to_json(), qos=1, correlation=correlation)


def _ref(model: InstalledModel) -> ModelRef:
    return ModelRef(name=model.name, serial=model.serial, sha256=model.model_sha256)
