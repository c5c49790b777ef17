"""The MQTT contract: topic layout, parser, ACL rendering, payload schemas and limits."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta

import pytest

from shared.errors import SchemaError
from shared.messages import (
    Command,
    CommandResponse,
    DeploymentEvent,
    DeploymentState,
    DeviceStatus,
    Telemetry,
    decode_payload,
)
from shared.signing import Envelope
from shared.topics import TopicError, TopicKind, Topics, render_mosquitto_acl
from tests.factories import NOW

topics = Topics("lab")


def test_every_topic_parses_back_to_its_kind() -> None:
    cases = {
        topics.desired_fleet(): TopicRef(TopicKind.DESIRED_FLEET),
        topics.desired_group("dmz"): TopicRef(TopicKind.DESIRED_GROUP, group="dmz"),
        topics.desired_device("pi-01"): TopicRef(TopicKind.DESIRED_DEVICE, device="pi-01"),
        topics.keyring(): TopicRef(TopicKind.KEYRING),
        topics.command("pi-01"): TopicRef(TopicKind.COMMAND, device="pi-01"),
        topics.status("pi-01"): TopicRef(TopicKind.STATUS, device="pi-01"),
        topics.telemetry("pi-01"): TopicRef(TopicKind.TELEMETRY, device="pi-01"),
        topics.events("pi-01"): TopicRef(TopicKind.EVENTS, device="pi-01"),
        topics.response("alice"): TopicRef(TopicKind.RESPONSE, operator="alice"),
    }
    for topic, expected in cases.items():
        ref = topics.parse(topic)
        assert (ref.kind, ref.group, ref.device, ref.operator) == expected


def TopicRef(kind, group=None, device=None, operator=None):  # noqa: N802 (reads like the dataclass)
    return (kind, group, device, operator)


def test_delivery_guarantees() -> None:
    assert topics.parse(topics.telemetry("pi")).qos == 0
    assert topics.parse(topics.status("pi")).retained
    assert topics.parse(topics.desired_group("g")).retained
    assert not topics.parse(topics.events("pi")).retained


@pytest.mark.parametrize("device", ["+", "#", "a/b", "", "..", "pi 01", "x" * 65])
def test_ids_that_would_break_the_topic_tree_are_refused(device: str) -> None:
    with pytest.raises(TopicError, match="device id"):
        topics.status(device)


@pytest.mark.parametrize(
    "topic",
    [
        "immune-edge/v1/other/desired",
        "immune-edge/v1/lab/device/pi-01/secrets",
        "immune-edge/v1/lab/device/pi-01/status/extra",
        "immune-edge/v1/lab/device/+/status",
        "immune-edge/v1/lab/group//desired",
    ],
)
def test_parser_rejects_topics_outside_the_contract(topic: str) -> None:
    with pytest.raises(TopicError, match="topic"):
        topics.parse(topic)


def test_device_subscriptions_cover_fleet_groups_device_keyring_and_commands() -> None:
    subscribed = [t for t, _ in topics.device_subscriptions("pi-01", ["dmz", "lab-a"])]
    assert subscribed == [
        "immune-edge/v1/lab/desired",
        "immune-edge/v1/lab/group/dmz/desired",
        "immune-edge/v1/lab/group/lab-a/desired",
        "immune-edge/v1/lab/device/pi-01/desired",
        "immune-edge/v1/lab/keyring",
        "immune-edge/v1/lab/device/pi-01/command",
    ]


def test_acl_gives_devices_only_their_own_write_topics() -> None:
    acl = render_mosquitto_acl(topics, {"pi-01": ["dmz"], "pi-02": []}, operators=["alice"], trainers=["ci"])
    block = acl.split("user pi-01\n")[1].split("\n\n")[0]
    assert "topic write immune-edge/v1/lab/device/pi-01/status" in block
    assert "pi-02" not in block
    assert "topic read immune-edge/v1/lab/group/dmz/desired" in block
    assert "user alice\ntopic read immune-edge/v1/lab/#" in acl


def status(**overrides) -> dict:
    return {"device_id": "pi-01", "fleet": "lab", "online": True, "at": NOW.isoformat(), **overrides}


def test_status_payload_must_match_its_topic() -> None:
    ref = topics.parse(topics.status("pi-01"))
    assert isinstance(decode_payload(ref, json.dumps(status()).encode()), DeviceStatus)
    with pytest.raises(SchemaError, match="device_id 'pi-02' does not match the topic"):
        decode_payload(ref, json.dumps(status(device_id="pi-02")).encode())
    with pytest.raises(SchemaError, match="fleet 'other' does not match the topic"):
        decode_payload(ref, json.dumps(status(fleet="other")).encode())


def test_empty_payload_means_cleared_retained_topic() -> None:
    assert decode_payload(topics.parse(topics.desired_fleet()), b"") is None


def test_size_limits_are_enforced_before_parsing() -> None:
    ref = topics.parse(topics.telemetry("pi-01"))
    huge = json.dumps({"device_id": "pi-01", "padding": "x" * Telemetry.MAX_BYTES}).encode()
    with pytest.raises(SchemaError, match="telemetry payload: .* exceeds the limit of 8192 bytes"):
        decode_payload(ref, huge)
    with pytest.raises(SchemaError, match="desired-fleet payload: .* exceeds the limit"):
        decode_payload(topics.parse(topics.desired_fleet()), b"{" + b" " * Envelope.MAX_BYTES + b"}")


def test_telemetry_is_flat_and_strict() -> None:
    sample = Telemetry(device_id="pi-01", fleet="lab", ts=1.7e9, tokens_per_second=9.9, soc_temp_c=61.5)
    assert all(not isinstance(v, dict | list) for v in json.loads(sample.to_json()).values())
    with pytest.raises(SchemaError, match="unknown field 'gpu_temp'"):
        Telemetry.from_json(json.dumps({"device_id": "pi-01", "fleet": "lab", "ts": 1.0, "gpu_temp": 3}))


def event(**overrides) -> dict:
    return {
        "event_id": uuid.uuid4().hex,
        "device_id": "pi-01",
        "fleet": "lab",
        "deployment_id": uuid.uuid4().hex,
        "manifest_name": "smol",
        "serial": 3,
        "state": "downloading",
        "at": NOW.isoformat(),
        **overrides,
    }


def test_terminal_deployment_events_need_a_reason() -> None:
    assert DeploymentEvent.from_json(json.dumps(event())).state is DeploymentState.DOWNLOADING
    with pytest.raises(SchemaError, match="terminal state 'rejected' needs a reason"):
        DeploymentEvent.from_json(json.dumps(event(state="rejected")))
    assert DeploymentEvent.from_json(json.dumps(event(state="rejected", reason="bad-signature"))).reason


def command(action: dict, lifetime: timedelta = timedelta(minutes=5)) -> dict:
    return {
        "nonce": uuid.uuid4().hex,
        "issued_at": NOW.isoformat(),
        "expires_at": (NOW + lifetime).isoformat(),
        "fleet": "lab",
        "device_id": "pi-01",
        "action": action,
    }


def test_commands_are_a_closed_set_with_bounded_lifetime() -> None:
    assert Command.from_json(json.dumps(command({"action": "rollback", "serial": 4}))).action.serial == 4
    assert Command.from_json(json.dumps(command({"action": "gc"}))).action.action == "gc"
    with pytest.raises(SchemaError, match="command: action: Input tag 'format_disk' found using 'action'"):
        Command.from_json(json.dumps(command({"action": "format_disk"})))
    with pytest.raises(SchemaError, match="at most 1 day"):
        Command.from_json(json.dumps(command({"action": "status"}, lifetime=timedelta(days=2))))
    with pytest.raises(SchemaError, match="command: nonce: String should match pattern"):
        Command.from_json(json.dumps({**command({"action": "status"}), "nonce": "short"}))


def test_failed_response_needs_an_error() -> None:
    base = {"nonce": uuid.uuid4().hex, "device_id": "pi-01", "at": NOW.isoformat()}
    assert CommandResponse.from_json(json.dumps({**base, "ok": True, "result": {"serial": 3}})).ok
    with pytest.raises(SchemaError, match="needs an error message"):
        CommandResponse.from_json(json.dumps({**base, "ok": False}))


def test_one_success_rule_for_every_result() -> None:
    """A deployment that ended rolled back is a failure; an operator action carried out is not."""
    from shared.outcome import Outcome, ResultCode, result_succeeded

    assert {code for code in ResultCode if code.success} == {
        ResultCode.COMMITTED,
        ResultCode.ALREADY_INSTALLED,
        ResultCode.DONE,
    }
    assert not Outcome(result=ResultCode.ROLLED_BACK, message="crash-loop: ...", reason="crash-loop").ok
    assert Outcome(result=ResultCode.DONE, message="rollback: serial 2 -> 1").ok
    assert not result_succeeded("rolled_back") and not result_succeeded("ok") and result_succeeded("done")
