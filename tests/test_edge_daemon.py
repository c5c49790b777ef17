"""The edge control plane end to end: real mosquitto, real HTTP artifact server, the real daemon."""

from __future__ import annotations

import base64
import json
import secrets
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from shared.manifest import MANIFEST_PAYLOAD_TYPE
from shared.signing import sign_envelope
from shared.topics import render_mosquitto_acl
from tests.factories import gguf_bytes
from tests.harness.artifact_server import Fault
from tests.harness.edge import (
    DEVICE,
    GROUPS,
    OTHER_ARCH,
    TOPICS,
    FleetObserver,
    digest,
    running_daemon,
    sign_command,
    sign_manifest,
    write_edge_config,
)
from tests.harness.logwatch import watching
from tests.harness.net import free_port

FORWARD = ["queued", "downloading", "verifying", "staged", "activating", "trial", "committed"]


@pytest.fixture
def config_file(tmp_path, mqtt_broker, fleet_keys) -> Path:
    return write_edge_config(tmp_path / "device", mqtt_broker, fleet_keys.keyring())


def model_blob(tag: str, size: int = 256 * 1024) -> bytes:
    """A small valid GGUF header plus distinct padding: passes every check llama.cpp is not needed for."""
    return gguf_bytes(architecture="llama", padding=size) + tag.encode()


class Deployments:
    """Publishes desired state and waits for the deployment it causes to end."""

    def __init__(self, observer: FleetObserver, server, keys) -> None:
        self.observer = observer
        self.server = server
        self.keys = keys

    def envelope(self, tag: str, serial: int, signer=None, **overrides: Any) -> tuple[bytes, bytes]:
        data = model_blob(tag)
        url = self.server.add(f"{tag}.gguf", data)
        return data, sign_manifest([signer or self.keys.trainer], data, url, serial=serial, **overrides)

    def publish(self, envelope: bytes, topic: str | None = None) -> dict[str, Any]:
        ends = len(self.observer.terminal_events())
        self.observer.publish(topic or TOPICS.desired_device(DEVICE), envelope)
        return self.observer.wait_terminal(ends + 1)[-1]


@pytest.fixture
def deployments(observer, artifact_server, fleet_keys) -> Deployments:
    return Deployments(observer, artifact_server, fleet_keys)


def test_happy_path_real_gguf_stored_with_events_in_order(
    config_file, observer, artifact_server, fleet_keys, smollm2_model
) -> None:
    """The control plane on a real GGUF file with the runtime off (the store-only activator, whose
    activating and trial states cannot fail). Loading and serving it: tests/test_edge_serving.py."""
    data = smollm2_model.read_bytes()
    url = artifact_server.add_file(smollm2_model)
    envelope = sign_manifest([fleet_keys.trainer], data, url, serial=1)
    with running_daemon(config_file) as daemon:
        observer.publish(TOPICS.desired_fleet(), envelope)
        (end,) = observer.wait_terminal()
        assert observer.states(end["deployment_id"]) == FORWARD
        assert end["serial"] == 1 and end["source"] == "desired:fleet"
        current = daemon.control.ledger.current()
        assert current is not None and current.model_sha256 == digest(data)
        assert daemon.control.store.blob_path(digest(data)).read_bytes() == data
        assert list(daemon.control.store.partials.iterdir()) == []
        observer.wait_for(
            lambda: any((s.get("model") or {}).get("serial") == 1 for s in observer.statuses),
            what="retained status naming serial 1",
        )
        # The same manifest again, from another level: nothing happens but a note.
        observer.publish(TOPICS.desired_device(DEVICE), envelope)
        observer.wait_for(
            lambda: any("already-installed" in (s.get("last_result") or "") for s in observer.statuses),
            what="already-installed in status",
        )
        assert len(observer.unique_events()) == len(FORWARD)
        assert len([r for r in artifact_server.requests if r.method == "GET"]) == 1


def test_more_specific_desired_state_wins(config_file, deployments, observer) -> None:
    _, fleet_env = deployments.envelope("fleet", serial=3)
    device_data, device_env = deployments.envelope("device", serial=4)
    # Both are retained before the daemon starts: it must wait for both and pick the device one.
    observer.publish(TOPICS.desired_fleet(), fleet_env)
    observer.publish(TOPICS.desired_device(DEVICE), device_env)
    with running_daemon(config_file) as daemon:
        (end,) = observer.wait_terminal()
        assert end["state"] == "committed" and end["serial"] == 4
        assert end["source"] == "desired:device"
        assert daemon.control.ledger.current().model_sha256 == digest(device_data)


def test_a_group_sits_between_the_fleet_and_the_device(config_file, deployments, observer) -> None:
    """Desired state for one of the device's groups beats the fleet's; the device's own beats both;
    a group the device is not in is never seen."""
    _, fleet_env = deployments.envelope("fleet", serial=3)
    _, group_env = deployments.envelope("group", serial=4)
    _, elsewhere = deployments.envelope("elsewhere", serial=9)
    observer.publish(TOPICS.desired_fleet(), fleet_env)
    observer.publish(TOPICS.desired_group(GROUPS[0]), group_env)
    observer.publish(TOPICS.desired_group("not-this-device"), elsewhere)
    with running_daemon(config_file) as daemon:
        (end,) = observer.wait_terminal()
        assert (end["state"], end["serial"], end["source"]) == ("committed", 4, f"desired:group:{GROUPS[0]}")
        _, device_env = deployments.envelope("device", serial=5)
        end = deployments.publish(device_env)
        assert (end["state"], end["serial"], end["source"]) == ("committed", 5, "desired:device")
        assert daemon.control.ledger.current().serial == 5
    assert 9 not in {e["serial"] for e in observer.unique_events()}
    assert 3 not in {e["serial"] for e in observer.unique_events()}  # hidden by the group all along


def _tampered(envelope: bytes) -> bytes:
    body = json.loads(envelope)
    payload = json.loads(base64.b64decode(body["payload"]))
    payload["files"][0]["urls"] = ["http://127.0.0.1:9/evil.gguf"]
    body["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    return json.dumps(body).encode()


def test_hostile_manifests_are_rejected_and_change_nothing(
    config_file, deployments, observer, artifact_server, fleet_keys
) -> None:
    keys = fleet_keys
    good, good_env = deployments.envelope("good", serial=10)

    def signed_by(signer, tag: str, serial: int) -> bytes:
        data = model_blob(tag)
        return sign_manifest([signer], data, artifact_server.add(f"{tag}.gguf", data), serial=serial)

    def served_as(tag: str, declared: bytes, served: bytes, serial: int, fault: Fault | None = None) -> bytes:
        url = artifact_server.add(f"{tag}.gguf", served)
        if fault is not None:
            artifact_server.inject(f"{tag}.gguf", fault)
        return sign_manifest([keys.trainer], declared, url, serial=serial)

    blob = model_blob("x")
    other = bytearray(blob)
    other[-1] ^= 0xFF
    cases: list[tuple[str, Callable[[], bytes], str]] = [
        ("bad signature", lambda: _tampered(signed_by(keys.trainer, "t", 11)), "bad-signature"),
        ("unknown key", lambda: signed_by(keys.stranger, "u", 12), "unknown-key"),
        ("wrong role", lambda: signed_by(keys.operator, "w", 13), "wrong-role"),
        (
            "unsigned",
            lambda: json.dumps(
                {"payloadType": MANIFEST_PAYLOAD_TYPE, "payload": "e30=", "signatures": []}
            ).encode(),
            "schema",
        ),
        (
            "expired",
            lambda: deployments.envelope(
                "e",
                14,
                created_at=(datetime.now(UTC) - timedelta(days=2)).isoformat(),
                expires_at=(datetime.now(UTC) - timedelta(minutes=1)).isoformat(),
            )[1],
            "expired",
        ),
        ("older serial", lambda: deployments.envelope("old", 9)[1], "serial-not-newer"),
        ("same serial, other file", lambda: deployments.envelope("same", 10)[1], "serial-not-newer"),
        (
            "wrong arch",
            lambda: deployments.envelope("arch", 15, compatibility={"cpu_arch": [OTHER_ARCH]})[1],
            "incompatible-arch",
        ),
        (
            "too little RAM",
            lambda: deployments.envelope(
                "ram", 16, compatibility={"cpu_arch": ["aarch64", "x86_64"], "min_ram_mb": 10**6}
            )[1],
            "insufficient-ram",
        ),
        (
            "other group",
            lambda: deployments.envelope(
                "grp", 17, compatibility={"cpu_arch": ["aarch64", "x86_64"], "device_groups": ["prod"]}
            )[1],
            "wrong-group",
        ),
        ("hash mismatch", lambda: served_as("hash", blob, bytes(other), 18), "hash-mismatch"),
        (
            "more bytes than declared",
            lambda: served_as("long", blob, blob, 19, Fault("overflow", times=99)),
            "too-long",
        ),
        ("truncated file", lambda: served_as("short", blob, blob[:-1000], 20), "size-mismatch"),
        (
            "non-GGUF bytes, right length",
            lambda: served_as("zip", b"PK\x03\x04" + blob[4:], b"PK\x03\x04" + blob[4:], 21),
            "bad-gguf",
        ),
        ("malformed JSON", lambda: b"{not json", "schema"),
        ("oversized payload", lambda: b"{" + b" " * (600 * 1024) + b"}", "too-large"),
    ]
    with running_daemon(config_file) as daemon:
        assert deployments.publish(good_env)["state"] == "committed"
        blobs_before = sorted(p.name for p in daemon.control.store.blobs.iterdir())
        for label, make, reason in cases:
            end = deployments.publish(make())
            assert end["state"] == "rejected", label
            assert end["reason"].startswith(reason), f"{label}: {end['reason']}"
            current = daemon.control.ledger.current()
            assert current is not None and current.model_sha256 == digest(good), label
            assert sorted(p.name for p in daemon.control.store.blobs.iterdir()) == blobs_before, label
            assert list(daemon.control.store.partials.iterdir()) == [], label
        # Rejections before the signature verified carry no name or serial: nothing from them is trusted.
        unauthenticated = ("bad-signature", "unknown-key", "wrong-role", "schema", "too-large")
        early = [
            e
            for e in observer.unique_events()
            if e["state"] == "rejected" and e["reason"].split(":")[0] in unauthenticated
        ]
        assert len(early) == 6  # bad signature, unknown key, wrong role, unsigned, malformed, oversized
        for rejection in early:
            assert "manifest_name" not in rejection and "serial" not in rejection, rejection
        # Still healthy: a good newer manifest goes through.
        _, newer = deployments.envelope("newer", serial=30)
        assert deployments.publish(newer)["state"] == "committed"


def test_garbage_on_every_subscribed_topic_is_survived(config_file, deployments, observer) -> None:
    garbage = [
        b"\xff\xfe not json",
        b"[]",
        b"{}",
        b"{" + b" " * (700 * 1024) + b"}",
        b"x" * (2 * 1024 * 1024),
    ]
    topics = [
        TOPICS.desired_fleet(),
        TOPICS.desired_group(GROUPS[0]),
        TOPICS.desired_device(DEVICE),
        TOPICS.keyring(),
        TOPICS.command(DEVICE),
    ]
    with running_daemon(config_file) as daemon:
        for topic in topics:
            for payload in garbage:
                observer.publish(topic, payload, retain=False)
        # Desired state settles per level: the effective garbage (the device level's last) is acted on.
        (refused,) = observer.wait_terminal(1)
        assert refused["state"] == "rejected" and refused["reason"].startswith("too-large"), refused
        _, envelope = deployments.envelope("after-garbage", serial=2)
        response = observer.command(sign_command([deployments.keys.operator], {"action": "status"}))
        assert response["ok"] is True
        end = deployments.publish(envelope)
        assert end["state"] == "committed" and end["serial"] == 2
        # Each garbage message the device received was refused and counted by reason. The 2 MiB one
        # is never delivered: the device's CONNECT sets a maximum packet size the broker honours.
        counts = daemon.control.audit.counts()
        for kind in ("command", "keyring"):
            by_reason = {reason: n for (k, reason), n in counts.items() if k == kind}
            assert by_reason == {"schema": 3, "too-large": 1}, (kind, counts)
        assert counts[("manifest", "too-large")] == 1


def test_a_command_delivered_twice_is_answered_once(config_file, observer, fleet_keys) -> None:
    """Found by bench/fleet_scale.py at 1,000 devices: MQTT delivers at least once, and the second copy
    of a rollout command was answered `replayed`, which the operator took for the device's answer;
    devices that had committed were counted as failed."""
    with running_daemon(config_file) as daemon:

        def send(envelope: bytes, correlation: bytes) -> None:
            properties = Properties(PacketTypes.PUBLISH)
            properties.ResponseTopic, properties.CorrelationData = observer.response_topic, correlation
            observer.client.publish(TOPICS.command(DEVICE), envelope, qos=1, properties=properties)

        twice, marker = secrets.token_bytes(8), secrets.token_bytes(8)
        envelope = sign_command([fleet_keys.operator], {"action": "status"})
        send(envelope, twice)
        send(envelope, twice)  # what a redelivery after a lost PUBACK looks like to the device
        # Answers leave the device in order: once the next command's answer is here, any second
        # answer to the first would be too.
        send(sign_command([fleet_keys.operator], {"action": "status"}), marker)
        answers: list[dict[str, Any]] = []
        while True:
            body, received = observer.responses.get(timeout=30)
            if received == marker:
                break
            answers += [body] if received == twice else []
        assert [a["ok"] for a in answers] == [True]
        assert daemon.control.audit.counts()[("command", "replayed")] == 1  # audited, not answered


def test_answers_go_only_to_an_operator_response_topic_of_the_devices_own_fleet(
    config_file, mqtt_broker, observer, fleet_keys
) -> None:
    """A command cannot make the device publish elsewhere: a response topic of another fleet, another
    kind of topic or a topic outside the tree gets no answer (the command still runs)."""
    elsewhere = [
        "immune-edge/v1/other-fleet/operator/op-1/response",
        f"{TOPICS.base}/device/{DEVICE}/status",
        "somewhere/else",
    ]
    spy = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="spy", protocol=mqtt.MQTTv5)
    seen: list[str] = []
    subscribed = threading.Event()
    spy.on_message = lambda _c, _u, message: seen.append(message.topic)
    spy.on_subscribe = lambda *args: subscribed.set()
    spy.connect(mqtt_broker.host, mqtt_broker.port)
    spy.loop_start()
    spy.subscribe([(topic, 1) for topic in elsewhere[::2]])
    assert subscribed.wait(10)
    try:
        with running_daemon(config_file):
            for topic in elsewhere:
                properties = Properties(PacketTypes.PUBLISH)
                properties.ResponseTopic, properties.CorrelationData = topic, secrets.token_bytes(8)
                envelope = sign_command([fleet_keys.operator], {"action": "status"})
                observer.client.publish(TOPICS.command(DEVICE), envelope, qos=1, properties=properties)
            # Answers leave the device in order: once a later command is answered, the earlier would be too.
            marker = observer.command(sign_command([fleet_keys.operator], {"action": "status"}))
            assert marker["ok"] is True
    finally:
        spy.loop_stop()
        spy.disconnect()
    assert seen == []
    assert not [status for status in observer.statuses if "ok" in status]  # no answer on the status topic


def test_commands_are_authenticated(config_file, observer, fleet_keys) -> None:
    keys = fleet_keys
    status = {"action": "status"}
    with running_daemon(config_file):
        cases = [
            (b"not json", "schema"),
            (json.dumps({"payloadType": "x", "payload": "", "signatures": []}).encode(), "schema"),
            (sign_envelope(b"{}", MANIFEST_PAYLOAD_TYPE, [keys.operator]).to_json(), "payload-type"),
            (sign_command([keys.trainer], status), "wrong-role"),
            (sign_command([keys.stranger], status), "unknown-key"),
            (
                sign_command(
                    [keys.operator],
                    status,
                    issued_at=datetime.now(UTC) - timedelta(hours=2),
                    lifetime=timedelta(hours=1),
                ),
                "expired",
            ),
            (
                sign_command([keys.operator], status, issued_at=datetime.now(UTC) + timedelta(hours=1)),
                "not-yet-valid",
            ),
            (sign_command([keys.operator], status, device="pi-2"), "wrong-device"),
            (sign_command([keys.operator], {"action": "reboot"}), "schema"),
        ]
        for envelope, reason in cases:
            response = observer.command(envelope)
            assert response["ok"] is False, reason
            assert response["result"]["reason"] == reason, response
            assert response["error"].startswith(reason)


def test_operator_rollback_pin_unpin_rollout_and_gc(config_file, deployments, observer, fleet_keys) -> None:
    op = [fleet_keys.operator]

    def command(action: dict[str, Any]) -> dict[str, Any]:
        return observer.command(sign_command(op, action))

    with running_daemon(config_file) as daemon:
        ledger = daemon.control.ledger
        data1, env1 = deployments.envelope("one", serial=1)
        _, env2 = deployments.envelope("two", serial=2)
        assert deployments.publish(env1, TOPICS.desired_fleet())["state"] == "committed"
        assert deployments.publish(env2, TOPICS.desired_fleet())["state"] == "committed"
        assert (ledger.current().serial, ledger.previous().serial) == (2, 1)

        response = command({"action": "rollback"})
        assert response["ok"] and response["result"]["serial"] == 1, response
        assert observer.unique_events()[-1]["state"] == "rolled_back"
        assert ledger.current().serial == 1 and ledger.last_serial("stable") == 2
        # The retained desired state (serial 2) is not re-installed by itself after a rollback.
        assert command({"action": "status"})["result"]["serial"] == 1

        # A trainer-signed manifest sent by an operator still passes every check.
        _, replay = deployments.envelope("replay", serial=2)
        response = command({"action": "rollout", "manifest": json.loads(replay)})
        assert not response["ok"] and response["result"]["reason"] == "serial-not-newer"
        assert command({"action": "rollout", "manifest": json.loads(env1)})["result"]["result"] == (
            "already-installed"
        )
        response = command({"action": "rollback", "serial": 2})
        assert response["ok"] and ledger.current().serial == 2
        response = command({"action": "rollback", "serial": 99})
        assert not response["ok"] and response["result"]["reason"] == "not-cached"

        assert command({"action": "pin", "serial": 1})["ok"]
        assert ledger.current().serial == 1 and ledger.pinned
        data3, env3 = deployments.envelope("three", serial=3)
        ends = len(observer.terminal_events())
        with watching("edge.control.reconcile") as logs:
            observer.publish(TOPICS.desired_fleet(), env3)
            logs.wait_for("pinned: not acting on new desired state from fleet")
        response = command({"action": "rollout", "manifest": json.loads(env3)})
        assert not response["ok"] and response["result"]["reason"] == "pinned"
        assert len(observer.terminal_events()) == ends  # pinned: nothing deployed
        assert ledger.current().serial == 1
        assert command({"action": "unpin"})["ok"]
        end = observer.wait_terminal(ends + 1)[-1]
        assert end["state"] == "committed" and end["serial"] == 3

        # keep_models = 2: serial 1's blob goes (it is neither current nor previous any more).
        _, env4 = deployments.envelope("four", serial=4)
        assert command({"action": "rollout", "manifest": json.loads(env4)})["result"]["result"] == "committed"
        response = command({"action": "gc"})
        assert response["ok"]
        store = daemon.control.store
        assert not store.has(digest(data1)) and store.has(digest(data3))
        assert sorted(m.serial for m in ledger.models()) == [3, 4]
        assert command({"action": "rollout", "manifest": json.loads(env4)})["result"]["result"] == (
            "already-installed"
        )


def test_keyring_update_over_mqtt(config_file, deployments, observer, fleet_keys) -> None:
    from shared.signing import KEYRING_PAYLOAD_TYPE

    keys = fleet_keys
    with running_daemon(config_file) as daemon:
        newer = keys.keyring(version=2, trainer=2)
        update = sign_envelope(newer.to_json(), KEYRING_PAYLOAD_TYPE, [keys.root]).to_json()
        observer.publish(TOPICS.keyring(), update)
        observer.wait_for(lambda: daemon.control.trust.keyring.version == 2, what="keyring v2")
        _, one_signature = deployments.envelope("one-sig", serial=5)
        assert deployments.publish(one_signature)["reason"].startswith("below-threshold")
        forged = sign_envelope(keys.keyring(version=3).to_json(), KEYRING_PAYLOAD_TYPE, [keys.stranger])
        observer.publish(TOPICS.keyring(), forged.to_json())
        note = observer.wait_for(
            lambda: next(
                (
                    s["last_result"]
                    for s in observer.statuses
                    if "keyring update rejected" in (s.get("last_result") or "")
                ),
                None,
            ),
            what="rejected keyring noted in status",
        )
        assert "(unknown-key)" in note, note  # the forger's key is in neither keyring
        assert daemon.control.trust.keyring.version == 2


def test_root_rotation_over_mqtt_retires_the_old_trainer_and_survives_a_restart(
    config_file, deployments, observer, fleet_keys
) -> None:
    from shared.signing import KEYRING_PAYLOAD_TYPE, Keyring, Role, TrustedKey, generate_key

    keys = fleet_keys
    new_root, new_trainer = generate_key(), generate_key()
    entries = [(new_root, Role.ROOT), (new_trainer, Role.TRAINER), (keys.operator, Role.OPERATOR)]
    rotated = Keyring(
        version=2, keys=[TrustedKey(keyid=k.keyid, role=r, public_key=k.public_b64) for k, r in entries]
    )
    # Signed by the current root (authority) and the new one (proof it is held).
    update = sign_envelope(rotated.to_json(), KEYRING_PAYLOAD_TYPE, [keys.root, new_root]).to_json()
    with running_daemon(config_file) as daemon:
        observer.publish(TOPICS.keyring(), update)
        observer.wait_for(lambda: daemon.control.trust.keyring.version == 2, what="keyring v2")
        assert (
            deployments.publish(deployments.envelope("new", 2, signer=new_trainer)[1])["state"] == "committed"
        )
        retired = deployments.publish(deployments.envelope("old", 3)[1])
        assert retired["state"] == "rejected" and retired["reason"].startswith("unknown-key"), retired
    observer.publish(TOPICS.keyring(), b"")  # no retained copy to adopt again: the device must remember
    with running_daemon(config_file) as daemon:
        assert daemon.control.trust.keyring.version == 2
        retired = deployments.publish(deployments.envelope("old-again", 4)[1])
        assert retired["state"] == "rejected" and retired["reason"].startswith("unknown-key"), retired
        assert (
            deployments.publish(deployments.envelope("newer", 5, signer=new_trainer)[1])["state"]
            == "committed"
        )


def test_daemon_over_tls_with_client_certificate_and_acl(
    tmp_path, tls_broker_factory, artifact_server, fleet_keys
) -> None:
    acl = render_mosquitto_acl(TOPICS, {DEVICE: list(GROUPS)}, operators=["op-1"])
    broker = tls_broker_factory(acl)
    device_cert = broker.tls.client(DEVICE)
    tls = (
        f'[mqtt.tls]\nca_file = "{broker.tls.ca.ca_file}"\n'
        f'cert_file = "{device_cert.cert}"\nkey_file = "{device_cert.key}"\n'
    )
    config = write_edge_config(tmp_path / "device", broker, fleet_keys.keyring(), mqtt=tls)
    watcher = FleetObserver(broker, cert=broker.tls.client("op-1"))
    try:
        data = model_blob("tls")
        envelope = sign_manifest([fleet_keys.trainer], data, artifact_server.add("tls.gguf", data), serial=1)
        with running_daemon(config):
            watcher.publish(TOPICS.desired_group(GROUPS[0]), envelope)
            (end,) = watcher.wait_terminal()
            assert end["state"] == "committed" and end["source"] == f"desired:group:{GROUPS[0]}"
            response = watcher.command(sign_command([fleet_keys.operator], {"action": "status"}))
            assert response["ok"] and response["result"]["serial"] == 1
        # A clean stop publishes the retained offline status itself (the Last Will is for crashes).
        watcher.wait_for(lambda: watcher.statuses and watcher.statuses[-1]["online"] is False, what="offline")
    finally:
        watcher.close()


def _rot(blob: Path) -> None:
    """Flip one byte in a stored blob's padding, keeping its size (bit rot on an SD card)."""
    data = bytearray(blob.read_bytes())
    data[-100] ^= 0xFF
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))


def test_stored_bytes_are_checked_against_the_manifest_before_they_go_live(
    config_file, deployments, observer, fleet_keys
) -> None:
    """Bug: phase 3 compared the manifest's sha256 with itself (the blob's digest was taken from the
    manifest, not read), so a blob whose bytes changed in the store went live on a rollback, and was
    reused as is by a new manifest naming the same file."""
    with running_daemon(config_file) as daemon:
        ledger, store = daemon.control.ledger, daemon.control.store
        data1, env1 = deployments.envelope("one", serial=1)
        _, env2 = deployments.envelope("two", serial=2)
        assert deployments.publish(env1)["state"] == "committed"
        assert deployments.publish(env2)["state"] == "committed"
        _rot(store.blob_path(digest(data1)))

        response = observer.command(sign_command([fleet_keys.operator], {"action": "rollback"}))
        assert not response["ok"] and response["result"]["reason"] == "store-corrupt", response
        assert digest(data1) in response["result"]["message"]
        assert ledger.current().serial == 2
        assert not store.has(digest(data1))  # a blob that changed can never be used: dropped

        # Serial 3 names the same file: fetched again (the changed blob is gone) and committed.
        url = deployments.server.add("one-again.gguf", data1)
        env3 = sign_manifest([fleet_keys.trainer], data1, url, serial=3)
        assert deployments.publish(env3)["state"] == "committed"
        assert store.blob_path(digest(data1)).read_bytes() == data1

        # Serial 4 names it too while the stored copy has changed: not reused as is. The attempt
        # fails (the device's fault, not the manifest's), drops the blob; the retry fetches it again.
        _rot(store.blob_path(digest(data1)))
        ends = len(observer.terminal_events())
        observer.publish(
            TOPICS.desired_device(DEVICE), sign_manifest([fleet_keys.trainer], data1, url, serial=4)
        )
        failed, committed = observer.wait_terminal(ends + 2)[ends:]
        assert (failed["serial"], failed["state"]) == (4, "failed"), failed
        assert failed["reason"].startswith("store-corrupt"), failed
        assert (committed["serial"], committed["state"]) == (4, "committed"), committed
        assert store.blob_path(digest(data1)).read_bytes() == data1


def test_a_broker_it_cannot_reach_is_logged_not_kept_quiet(tmp_path, fleet_keys) -> None:
    """Bug (the emulated arm64 check: a root without /etc/hosts, so "localhost" did not resolve): the
    daemon retried its broker connection for minutes and logged nothing about it."""
    from edge.config import EdgeConfig
    from edge.daemon import EdgeDaemon
    from shared.config import load_config

    dead = type("Dead", (), {"host": "127.0.0.1", "port": free_port()})()
    config = write_edge_config(tmp_path / "device", dead, fleet_keys.keyring())  # type: ignore[arg-type]
    daemon = EdgeDaemon(load_config(config, EdgeConfig))
    thread = threading.Thread(target=daemon.run, daemon=True)
    with watching("edge.mqtt.agent") as log:
        thread.start()
        try:
            log.wait_for(f"cannot connect to the broker at 127.0.0.1:{dead.port}", timeout=30)
        finally:
            daemon.stop()
            thread.join(30)
    assert not thread.is_alive()
