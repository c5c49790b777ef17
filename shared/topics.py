"""The MQTT topic layout: one function per topic, a strict parser, and the broker ACL it implies.

Layout (``root`` defaults to ``immune-edge/v1``)::

    {root}/{fleet}/desired                      retained  signed manifest for the whole fleet
    {root}/{fleet}/group/{group}/desired        retained  signed manifest for a device group
    {root}/{fleet}/device/{device}/desired      retained  signed manifest for one device
    {root}/{fleet}/keyring                      retained  root-signed keyring update
    {root}/{fleet}/device/{device}/command      QoS 1     operator-signed command (MQTT v5 request)
    {root}/{fleet}/device/{device}/status       retained  online/offline status (Last Will: offline)
    {root}/{fleet}/device/{device}/telemetry    QoS 0     flat JSON metrics
    {root}/{fleet}/device/{device}/events       QoS 1     deployment state transitions
    {root}/{fleet}/operator/{operator}/response QoS 1     command responses (MQTT v5 response topic)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from pydantic import TypeAdapter, ValidationError

from shared.errors import ContractError
from shared.reasons import Reason
from shared.schema import Identifier

DEFAULT_ROOT = "immune-edge/v1"

_identifier = TypeAdapter(Identifier)


class TopicKind(StrEnum):
    """Every kind of topic in the contract."""

    DESIRED_FLEET = "desired-fleet"
    DESIRED_GROUP = "desired-group"
    DESIRED_DEVICE = "desired-device"
    KEYRING = "keyring"
    COMMAND = "command"
    STATUS = "status"
    TELEMETRY = "telemetry"
    EVENTS = "events"
    RESPONSE = "response"


#: Delivery guarantees per kind: (QoS, retained).
DELIVERY: Mapping[TopicKind, tuple[int, bool]] = {
    TopicKind.DESIRED_FLEET: (1, True),
    TopicKind.DESIRED_GROUP: (1, True),
    TopicKind.DESIRED_DEVICE: (1, True),
    TopicKind.KEYRING: (1, True),
    TopicKind.COMMAND: (1, False),
    TopicKind.STATUS: (1, True),
    TopicKind.TELEMETRY: (0, False),
    TopicKind.EVENTS: (1, False),
    TopicKind.RESPONSE: (1, False),
}

_DEVICE_LEAVES = {
    "desired": TopicKind.DESIRED_DEVICE,
    "command": TopicKind.COMMAND,
    "status": TopicKind.STATUS,
    "telemetry": TopicKind.TELEMETRY,
    "events": TopicKind.EVENTS,
}


class TopicError(ContractError):
    """A topic outside the contract."""


def check_identifier(value: str, what: str) -> str:
    """Validate one topic level (fleet, group, device or operator id)."""
    try:
        return _identifier.validate_python(value)
    except ValidationError as exc:
        raise TopicError(Reason.TOPIC, f"{what}: {exc.errors(include_url=False)[0]['msg']}") from None


@dataclass(frozen=True)
class TopicRef:
    """A parsed topic."""

    kind: TopicKind
    fleet: str
    group: str | None = None
    device: str | None = None
    operator: str | None = None

    @property
    def qos(self) -> int:
        return DELIVERY[self.kind][0]

    @property
    def retained(self) -> bool:
        return DELIVERY[self.kind][1]


@dataclass(frozen=True)
class Topics:
    """Topic names of one fleet. Every id is validated so no wildcard or '/' can sneak in."""

    fleet: str
    root: str = DEFAULT_ROOT

    def __post_init__(self) -> None:
        check_identifier(self.fleet, "fleet id")

    @property
    def base(self) -> str:
        return f"{self.root}/{self.fleet}"

    def desired_fleet(self) -> str:
        return f"{self.base}/desired"

    def desired_group(self, group: str) -> str:
        return f"{self.base}/group/{check_identifier(group, 'group id')}/desired"

    def desired_device(self, device: str) -> str:
        return self._device(device, "desired")

    def keyring(self) -> str:
        return f"{self.base}/keyring"

    def command(self, device: str) -> str:
        return self._device(device, "command")

    def status(self, device: str) -> str:
        return self._device(device, "status")

    def telemetry(self, device: str) -> str:
        return self._device(device, "telemetry")

    def events(self, device: str) -> str:
        return self._device(device, "events")

    def response(self, operator: str) -> str:
        return f"{self.base}/operator/{check_identifier(operator, 'operator id')}/response"

    def _device(self, device: str, leaf: str) -> str:
        return f"{self.base}/device/{check_identifier(device, 'device id')}/{leaf}"

    def device_subscriptions(self, device: str, groups: Sequence[str]) -> list[tuple[str, int]]:
        """What a device subscribes to: desired state at every level it belongs to, keyring, commands."""
        topics = [self.desired_fleet(), *(self.desired_group(g) for g in groups), self.desired_device(device)]
        topics += [self.keyring(), self.command(device)]
        return [(topic, 1) for topic in topics]

    def operator_subscriptions(self, operator: str) -> list[tuple[str, int]]:
        """What an operator subscribes to: every device's status, telemetry and events, and its own
        response topic, each with its kind's QoS."""
        watched = (TopicKind.STATUS, TopicKind.TELEMETRY, TopicKind.EVENTS)
        topics = [
            (f"{self.base}/device/+/{leaf}", DELIVERY[kind][0])
            for leaf, kind in _DEVICE_LEAVES.items()
            if kind in watched
        ]
        return [*topics, (self.response(operator), DELIVERY[TopicKind.RESPONSE][0])]

    def parse(self, topic: str) -> TopicRef:
        """Parse a topic of this fleet, or raise TopicError naming what is wrong."""
        prefix = self.base + "/"
        if not topic.startswith(prefix):
            raise TopicError(Reason.TOPIC, f"topic {topic!r} is not under {prefix!r}")
        parts = topic[len(prefix) :].split("/")
        for part in parts:
            check_identifier(part, f"topic {topic!r}")
        match parts:
            case ["desired"]:
                return TopicRef(TopicKind.DESIRED_FLEET, self.fleet)
            case ["keyring"]:
                return TopicRef(TopicKind.KEYRING, self.fleet)
            case ["group", group, "desired"]:
                return TopicRef(TopicKind.DESIRED_GROUP, self.fleet, group=group)
            case ["device", device, leaf] if leaf in _DEVICE_LEAVES:
                return TopicRef(_DEVICE_LEAVES[leaf], self.fleet, device=device)
            case ["operator", operator, "response"]:
                return TopicRef(TopicKind.RESPONSE, self.fleet, operator=operator)
        raise TopicError(Reason.TOPIC, f"topic {topic!r} is not part of the immune-edge protocol")


def render_mosquitto_acl(
    topics: Topics,
    devices: Mapping[str, Sequence[str]],
    operators: Sequence[str] = (),
    trainers: Sequence[str] = (),
) -> str:
    """A mosquitto ``acl_file`` for one fleet, keyed by username (the client certificate CN).

    Devices read only their fleet's, groups' and own desired state, the keyring and their
    commands, and write only their own status, telemetry and events plus command responses.
    Operators read the whole fleet and write commands and desired state; trainers write
    desired state only.
    """
    lines = ["# Generated by immune-edge (shared.topics.render_mosquitto_acl); do not edit."]
    for device, groups in sorted(devices.items()):
        lines += ["", f"user {check_identifier(device, 'device id')}"]
        reads = [topics.desired_fleet(), *(topics.desired_group(g) for g in groups)]
        reads += [topics.desired_device(device), topics.keyring(), topics.command(device)]
        lines += [f"topic read {t}" for t in reads]
        writes = [topics.status(device), topics.telemetry(device), topics.events(device)]
        writes.append(f"{topics.base}/operator/+/response")
        lines += [f"topic write {t}" for t in writes]
    for operator in sorted(operators):
        lines += ["", f"user {check_identifier(operator, 'operator id')}", f"topic read {topics.base}/#"]
        lines += [
            f"topic write {t}"
            for t in (
                topics.desired_fleet(),
                f"{topics.base}/group/+/desired",
                f"{topics.base}/device/+/desired",
                f"{topics.base}/device/+/command",
                topics.keyring(),
            )
        ]
    for trainer in sorted(trainers):
        lines += ["", f"user {check_identifier(trainer, 'trainer id')}"]
        lines += [
            f"topic readwrite {t}"
            for t in (
                topics.desired_fleet(),
                f"{topics.base}/group/+/desired",
                f"{topics.base}/device/+/desired",
            )
        ]
    return "\n".join(lines) + "\n"
