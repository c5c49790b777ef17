"""Every MQTT topic the device acts on, fuzzed with hypothesis: envelopes that look valid (signed by a
trusted key even) with one field mutated, envelopes with a broken signature or payload type, and
garbage. Each message must be refused with a reason, nothing may be applied, and the daemon keeps
serving its model. The number of examples per topic is fixed (``EXAMPLES``), so this runs in seconds
to a minute, not hours."""

from __future__ import annotations

import base64
import copy
import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from edge.daemon import EdgeDaemon
from shared.manifest import MANIFEST_PAYLOAD_TYPE
from shared.messages import COMMAND_PAYLOAD_TYPE, Command
from shared.schema import canonical_json
from shared.signing import KEYRING_PAYLOAD_TYPE, sign_envelope
from tests.conftest import FleetKeys
from tests.harness.artifact_server import ArtifactServer
from tests.harness.broker import Mosquitto
from tests.harness.edge import (
    DEVICE,
    FLEET,
    HOST_ARCH,
    OTHER_ARCH,
    TOPICS,
    FleetObserver,
    ServingOptions,
    running_daemon,
    sign_manifest,
    write_edge_config,
)
from tests.harness.waiting import wait_until

#: Examples per topic (recorded in docs/benchmarks.md with the time they take).
EXAMPLES = {"manifest": 40, "command": 80, "keyring": 60}
#: Examples that reached the device (duplicates and valid mutations are skipped), per topic.
RAN = dict.fromkeys(EXAMPLES, 0)
SMOL_RUNTIME = {"chat_format": "chatml", "n_ctx": 512}
FUZZ = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,  # the same examples on every run: a failure in CI reproduces here
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=8,
)


@dataclass
class Device:
    daemon: EdgeDaemon
    observer: FleetObserver
    keys: FleetKeys
    manifest: dict[str, Any]
    base_url: str
    seen: set[bytes]

    def still_serves_the_committed_model(self) -> None:
        current = self.daemon.control.ledger.current()
        assert current is not None and current.serial == self.manifest["serial"]
        assert current.channel == self.manifest["channel"]
        assert httpx.get(f"{self.base_url}/ready", timeout=10).status_code == 200

    def stored_nothing_new(self) -> None:
        """Only the committed model's blob and row, whatever was sent."""
        blobs = self.daemon.control.store.blobs
        assert [p.name for p in blobs.iterdir()] == [self.manifest["files"][0]["sha256"]]
        assert [m.serial for m in self.daemon.control.ledger.models()] == [self.manifest["serial"]]

    def refusals(self, kind: str) -> int:
        return sum(n for (k, _), n in self.daemon.control.audit.counts().items() if k == kind)

    def fresh(self, payload: bytes) -> bytes:
        """Each payload once: the device rightly ignores a desired state it already handled."""
        assume(payload not in self.seen)
        self.seen.add(payload)
        return payload


@pytest.fixture(scope="module")
def device(tmp_path_factory, smollm2_model, fleet_keys) -> Iterator[Device]:
    root = tmp_path_factory.mktemp("fuzz")
    serving = ServingOptions()
    with Mosquitto(root / "broker") as broker, ArtifactServer(root / "artifacts") as server:
        config = write_edge_config(root / "device", broker, fleet_keys.keyring(), serving=serving)
        observer = FleetObserver(broker)
        url = server.add_file(smollm2_model)
        data = smollm2_model.read_bytes()
        envelope = sign_manifest([fleet_keys.trainer], data, url, runtime=SMOL_RUNTIME)
        manifest = json.loads(base64.b64decode(json.loads(envelope)["payload"]))
        try:
            with running_daemon(config) as daemon:
                observer.publish(TOPICS.desired_fleet(), envelope)
                assert observer.wait_terminal(1, timeout=240)[-1]["state"] == "committed"
                yield Device(daemon, observer, fleet_keys, manifest, serving.base_url, set())
        finally:
            observer.close()


def _signed(payload: bytes, payload_type: str, key: Any) -> bytes:
    return sign_envelope(payload, payload_type, [key]).to_json()


@st.composite
def mutated_manifests(draw: st.DrawFn, base: dict[str, Any]) -> dict[str, Any]:
    """The committed manifest with one change that keeps it looking plausible. Never a higher serial
    or another channel: those could be a valid new deployment, not an attack."""
    value = copy.deepcopy(base)
    how = draw(st.sampled_from(["replace", "delete", "extra", "file", "serial", "runtime"]))
    if how == "replace":
        key = draw(st.sampled_from(sorted(set(value) - {"serial", "channel"})))
        value[key] = draw(json_values)
    elif how == "delete":
        del value[draw(st.sampled_from(sorted(value)))]
    elif how == "extra":
        value[draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in value))] = draw(json_values)
    elif how == "file":
        key = draw(st.sampled_from(sorted(value["files"][0])))
        hex_digest = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)
        value["files"][0][key] = draw(json_values | hex_digest)
    elif how == "serial":
        value["serial"] = draw(st.integers(min_value=-(2**40), max_value=base["serial"]) | json_values)
    else:
        keys = st.sampled_from(["n_ctx", "chat_format", "stop", "x"])
        value["runtime"] = draw(st.dictionaries(keys, json_values))
    assume(value != base)
    return value


def _hostile_envelopes(
    device: Device, payload_type: str, body: st.SearchStrategy[bytes], signer: Any
) -> st.SearchStrategy[bytes]:
    """Signed by ``signer`` (trusted), by a stranger, with a flipped payload type, or not an envelope."""
    return st.one_of(
        body.map(lambda payload: _signed(payload, payload_type, signer)),
        body.map(lambda payload: _signed(payload, payload_type, device.keys.stranger)),
        body.map(lambda payload: _signed(payload, "application/vnd.immune-edge.other+json", signer)),
        st.binary(min_size=1, max_size=300),
        json_values.map(lambda v: json.dumps(v).encode()).filter(bool),
    )


def test_desired_state_fuzz_is_refused_and_nothing_is_applied(device: Device) -> None:
    manifests = mutated_manifests(device.manifest).map(canonical_json)
    payloads = _hostile_envelopes(device, MANIFEST_PAYLOAD_TYPE, manifests, device.keys.trainer)
    levels = [TOPICS.desired_fleet(), TOPICS.desired_device(DEVICE), TOPICS.desired_group("canary")]
    topics = st.sampled_from(levels)

    @settings(FUZZ, max_examples=EXAMPLES["manifest"])
    @given(payload=payloads, topic=topics)
    def publish(payload: bytes, topic: str) -> None:
        ends = len(device.observer.terminal_events())
        device.observer.publish(topic, device.fresh(payload), retain=False)
        end = device.observer.wait_terminal(ends + 1, timeout=60)[-1]
        assert end["state"] == "rejected" and end.get("reason"), end
        # Clear the level again: a more specific level, even a refused one, hides the others.
        device.observer.publish(topic, b"", retain=False)
        RAN["manifest"] += 1

    publish()
    assert RAN["manifest"] > EXAMPLES["manifest"] // 2
    device.still_serves_the_committed_model()
    device.stored_nothing_new()
    print(f"fuzz examples sent: {RAN}")  # noqa: T201 (shown with -s; in docs/benchmarks.md)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"compatibility": {"cpu_arch": [OTHER_ARCH]}}, "incompatible-arch"),
        ({"compatibility": {"cpu_arch": [HOST_ARCH], "device_groups": ["elsewhere"]}}, "wrong-group"),
        ({"compatibility": {"cpu_arch": [HOST_ARCH], "min_ram_mb": 1024 * 1024}}, "insufficient-ram"),
        ({"expires_at": "2026-01-01T00:00:00+00:00", "created_at": "2025-12-01T00:00:00+00:00"}, "expired"),
    ],
)
def test_a_schema_valid_manifest_wrong_for_this_device_is_refused(
    device: Device, change: dict[str, Any], reason: str
) -> None:
    """Trainer-signed, well formed and newer than the installed serial, but not for this device: the
    refusal must name the wrong field, and nothing may be fetched."""
    value = {**copy.deepcopy(device.manifest), **change, "serial": device.manifest["serial"] + 1}
    ends = len(device.observer.terminal_events())
    device.observer.publish(
        TOPICS.desired_device(DEVICE),
        _signed(canonical_json(value), MANIFEST_PAYLOAD_TYPE, device.keys.trainer),
    )
    end = device.observer.wait_terminal(ends + 1, timeout=60)[-1]
    assert (end["state"], end["reason"].split(":")[0]) == ("rejected", reason), end
    device.observer.publish(TOPICS.desired_device(DEVICE), b"")  # clear the level again
    device.still_serves_the_committed_model()
    device.stored_nothing_new()


def test_command_fuzz_is_refused_with_a_reason(device: Device) -> None:
    now = datetime.now(UTC)
    body = {
        "nonce": "0" * 32,
        "issued_at": now.isoformat(),
        "expires_at": (now + timedelta(minutes=5)).isoformat(),
        "fleet": FLEET,
        "device_id": DEVICE,
        "action": {"action": "status"},
    }

    # Each action carries a key no action has, so every mutation is invalid by construction: the
    # validator under test never decides what counts as fuzz.
    actions = st.fixed_dictionaries(
        {
            "action": st.sampled_from(
                [
                    "rollout",
                    "pin",
                    "gc",
                    "rollback",
                    "unpin",
                    "status",
                    "capture_status",
                    "capture_pull",
                    "capture_purge",
                ]
            ),
            "x": json_values,
        },
        optional={
            "serial": json_values,
            "manifest": json_values,
            "adapter": json_values,
            "after_seq": json_values,
            "store_id": json_values,
            "up_to_seq": json_values,
        },
    )

    @st.composite
    def mutated_commands(draw: st.DrawFn) -> bytes:
        value = copy.deepcopy(body)
        value["nonce"] = draw(st.text(alphabet="0123456789abcdef", min_size=32, max_size=32))
        key = draw(st.sampled_from(["issued_at", "expires_at", "fleet", "device_id", "action"]))
        value[key] = draw(json_values | actions if key == "action" else json_values)
        assume(value[key] != body[key])
        return canonical_json(value)

    payloads = _hostile_envelopes(device, COMMAND_PAYLOAD_TYPE, mutated_commands(), device.keys.operator)
    refused_before = device.refusals("command")
    sent = 0

    @settings(FUZZ, max_examples=EXAMPLES["command"])
    @given(payload=payloads)
    def command(payload: bytes) -> None:
        nonlocal sent
        response = device.observer.command(payload, timeout=30)
        sent += 1
        RAN["command"] += 1
        assert response["ok"] is False and response["result"]["reason"], response

    command()
    assert device.refusals("command") == refused_before + sent
    device.still_serves_the_committed_model()
    device.stored_nothing_new()


def _command(**overrides: Any) -> dict[str, Any]:
    now = datetime.now(UTC)
    body = {
        "nonce": secrets.token_hex(16),
        "issued_at": now.isoformat(),
        "expires_at": (now + timedelta(minutes=5)).isoformat(),
        "fleet": FLEET,
        "device_id": DEVICE,
        "action": {"action": "gc"},
    }
    return {**body, **overrides}


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"device_id": "pi-2"}, "wrong-device"),
        ({"fleet": "other-fleet"}, "wrong-device"),
        (
            {
                "issued_at": (datetime.now(UTC) - timedelta(minutes=10)).isoformat(),
                "expires_at": (datetime.now(UTC) - timedelta(minutes=5)).isoformat(),
            },
            "expired",
        ),
        (
            {
                "issued_at": (datetime.now(UTC) + timedelta(hours=1)).isoformat(),
                "expires_at": (datetime.now(UTC) + timedelta(hours=1, minutes=5)).isoformat(),
            },
            "not-yet-valid",
        ),
    ],
)
def test_a_schema_valid_command_for_another_device_or_time_is_refused(
    device: Device, overrides: dict[str, Any], reason: str
) -> None:
    """Operator-signed and well formed, but not for this device, or outside its validity window."""
    body = _command(**overrides)
    Command.from_json(canonical_json(body))  # valid to the schema: only the device's own checks can refuse it
    refused = device.refusals("command")
    response = device.observer.command(
        _signed(canonical_json(body), COMMAND_PAYLOAD_TYPE, device.keys.operator)
    )
    assert response["ok"] is False and response["result"]["reason"] == reason, response
    assert device.refusals("command") == refused + 1
    device.stored_nothing_new()


def test_a_replayed_command_is_executed_once(device: Device) -> None:
    envelope = _signed(
        canonical_json(_command(action={"action": "status"})), COMMAND_PAYLOAD_TYPE, device.keys.operator
    )
    assert device.observer.command(envelope)["ok"] is True
    refused = device.refusals("command")
    device.observer.send_command(envelope)  # the same signed command again: refused, not answered
    wait_until(lambda: device.refusals("command") == refused + 1, 30, "the replay refused")


def test_keyring_fuzz_is_refused_and_the_keyring_kept(device: Device) -> None:
    keyring = json.loads(device.keys.keyring().to_json())

    @st.composite
    def mutated_keyrings(draw: st.DrawFn) -> bytes:
        """A newer keyring with one part broken by construction (no key list, a schema version that
        does not exist, thresholds that are not an object, an unknown key), so the validator under
        test never decides what counts as fuzz."""
        value = copy.deepcopy(keyring)
        value["version"] = draw(st.integers(min_value=2, max_value=2**31) | json_values)
        key = draw(st.sampled_from(["keys", "schema_version", "thresholds", "unknown"]))
        broken = json_values.filter(lambda v: not isinstance(v, dict)) if key == "thresholds" else json_values
        value[key] = draw(broken)
        assume(value[key] != keyring.get(key))
        return canonical_json(value)

    payloads = _hostile_envelopes(device, KEYRING_PAYLOAD_TYPE, mutated_keyrings(), device.keys.root)
    before, sent = device.daemon.control.trust.keyring, 0

    @settings(FUZZ, max_examples=EXAMPLES["keyring"])
    @given(payload=payloads)
    def publish(payload: bytes) -> None:
        nonlocal sent
        counted = device.refusals("keyring")
        device.observer.publish(TOPICS.keyring(), payload, retain=False)
        sent += 1
        RAN["keyring"] += 1
        wait_until(lambda: device.refusals("keyring") == counted + 1, 30, "the keyring update refused")

    publish()
    assert device.daemon.control.trust.keyring == before and sent > EXAMPLES["keyring"] // 2
    device.still_serves_the_committed_model()
    device.stored_nothing_new()
    print(f"fuzz examples sent: {RAN}")  # noqa: T201 (shown with -s; in docs/benchmarks.md)
