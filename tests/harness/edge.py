"""Running the real edge daemon against the real broker and artifact server, and watching it from the
fleet side: signed manifests and commands go in, events, status and responses are collected."""

from __future__ import annotations

import hashlib
import json
import platform
import queue
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge.config import EdgeConfig
from edge.daemon import EdgeDaemon
from shared.config import load_config
from shared.manifest import MANIFEST_PAYLOAD_TYPE
from shared.messages import COMMAND_PAYLOAD_TYPE
from shared.schema import canonical_json
from shared.signing import Keyring, SigningKey, sign_envelope
from shared.topics import Topics
from tests.factories import manifest_dict
from tests.harness.broker import Mosquitto
from tests.harness.net import free_port
from tests.harness.pi5 import Pi5Tree
from tests.harness.pki import CertPair

FLEET = "lab"
DEVICE = "pi-1"
GROUPS = ("canary",)
HOST_ARCH = {"arm64": "aarch64", "amd64": "x86_64"}.get(platform.machine().lower(), platform.machine())
OTHER_ARCH = "x86_64" if HOST_ARCH == "aarch64" else "aarch64"
TOPICS = Topics(FLEET)


FAST_TIMINGS = """
[download]
attempts = 4
backoff_initial_s = 0.05
backoff_max_s = 0.5
stall_timeout_s = 2.0
free_space_margin_mb = 0

[deploy]
settle_s = 0.3
retry_failed_s = 1.0
"""


def write_edge_config(
    directory: Path,
    broker: Mosquitto,
    keyring: Keyring,
    extra: str = "",
    device: str = DEVICE,
    mqtt: str = "",
    serving: ServingOptions | None = None,
    groups: tuple[str, ...] = GROUPS,
    keepalive_s: int = 5,
    fast: bool = True,
    seed_dirs: tuple[Path, ...] = (),
) -> Path:
    """A daemon config for tests: fast retries and watchdogs, short settle time, RAM from a fixture
    (``fast=False``: the production download and deploy timings, for simulations at scale).
    Without ``serving`` the runtime is off (control-plane tests use fake GGUFs)."""
    directory.mkdir(parents=True, exist_ok=True)
    keyring_file = directory / "keyring.json"
    keyring_file.write_bytes(keyring.to_json())
    pi = Pi5Tree(directory).create(mem_available_mb=serving.mem_available_mb if serving else 6000)
    sections = serving.toml(directory) if serving else "[runtime]\nenabled = false\n"
    config = directory / "edge.toml"
    config.write_text(
        f"""
keyring_file = "{keyring_file}"

[device]
id = "{device}"
fleet = "{FLEET}"
groups = {json.dumps(list(groups))}
procfs_root = "{pi.procfs}"
sysfs_root = "{pi.sysfs}"

[mqtt]
host = "{broker.host}"
port = {broker.port}
keepalive_s = {keepalive_s}
{mqtt}

[store]
state_dir = "{directory / "state"}"
keep_models = 2
seed_dirs = {json.dumps([str(d) for d in seed_dirs])}

{FAST_TIMINGS if fast else ""}
{sections}
{extra}
"""
    )
    return config


@dataclass
class ServingOptions:
    """The data plane of a test daemon: loopback TCP on a free port plus a Unix socket, one thread
    (tests run side by side on 2 cores), a short trial window."""

    port: int = field(default_factory=free_port)
    trial_s: float = 1.0
    mem_available_mb: int = 6000
    swap: str = "auto"
    request_timeout_s: float = 120.0
    crash_limit: int = 3
    runtime: str = ""
    api: str = ""
    aliases: tuple[str, ...] = ("slips",)
    n_threads: int = 1
    #: None: the same as n_threads.
    n_threads_batch: int | None = None

    def toml(self, directory: Path) -> str:
        return f"""[api]
host = "127.0.0.1"
port = {self.port}
socket = "{directory / "api.sock"}"
aliases = {json.dumps(list(self.aliases))}
request_timeout_s = {self.request_timeout_s}
{self.api}

[runtime]
n_threads = {self.n_threads}
n_threads_batch = {self.n_threads_batch or self.n_threads}
trial_s = {self.trial_s}
swap = "{self.swap}"
crash_limit = {self.crash_limit}
{self.runtime}
"""

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextmanager
def running_daemon(config_file: Path) -> Iterator[EdgeDaemon]:
    """The daemon in a thread of this process, stopped cleanly at the end."""
    daemon = EdgeDaemon(load_config(config_file, EdgeConfig))
    thread = threading.Thread(target=daemon.run, name="edge-daemon", daemon=True)
    thread.start()
    try:
        if not daemon.agent.subscribed.wait(15):
            raise TimeoutError("the daemon did not subscribe")
        yield daemon
    finally:
        daemon.stop()
        thread.join(timeout=30)
        if thread.is_alive():  # a daemon that does not stop is a failure, not a leaked thread
            raise AssertionError("the daemon did not stop within 30 s")


def run_doctor(config: Path, *wrapper: str) -> tuple[int, dict[str, dict[str, str]]]:
    """``immune-edge doctor --json`` (inside ``wrapper``, a command prefix, if given): its exit
    status and its checks by name."""
    result = subprocess.run(
        [*wrapper, sys.executable, "-m", "edge.cli", "doctor", "--config", str(config), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.stdout, result.stderr
    report = json.loads(result.stdout)
    return result.returncode, {check["name"]: check for check in report["checks"]}


def sign_manifest(keys: list[SigningKey], data: bytes, url: str, **overrides: Any) -> bytes:
    """A signed manifest envelope for ``data`` served at ``url``, built for this machine's arch."""
    values = manifest_dict(data, **overrides)
    values["files"][0]["urls"] = [url]
    values.setdefault("compatibility", {"cpu_arch": [HOST_ARCH]})
    if "created_at" not in overrides:
        values["created_at"] = datetime.now(UTC).isoformat()
    values.setdefault("expires_at", (datetime.now(UTC) + timedelta(days=7)).isoformat())
    return sign_envelope(canonical_json(values), MANIFEST_PAYLOAD_TYPE, keys).to_json()


def sign_command(
    keys: list[SigningKey],
    action: dict[str, Any],
    device: str = DEVICE,
    lifetime: timedelta | None = None,
    nonce: str | None = None,
    issued_at: datetime | None = None,
) -> bytes:
    """A signed operator command envelope."""
    issued = issued_at or datetime.now(UTC)
    body = {
        "nonce": nonce or secrets.token_hex(16),
        "issued_at": issued.isoformat(),
        "expires_at": (issued + (lifetime or timedelta(minutes=5))).isoformat(),
        "fleet": FLEET,
        "device_id": device,
        "action": action,
    }
    return sign_envelope(canonical_json(body), COMMAND_PAYLOAD_TYPE, keys).to_json()


class FleetObserver:
    """An operator-side MQTT client: publishes desired state and commands, records what devices say."""

    def __init__(
        self,
        broker: Mosquitto,
        operator: str = "op-1",
        persistent: bool = False,
        cert: CertPair | None = None,
    ) -> None:
        """``persistent``: keep a broker session, so messages sent while this client reconnects wait."""
        self.events: list[dict[str, Any]] = []
        self.statuses: list[dict[str, Any]] = []
        self.responses: queue.Queue[tuple[dict[str, Any], bytes | None]] = queue.Queue()
        self.response_topic = TOPICS.response(operator)
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"observer-{secrets.token_hex(4)}",
            protocol=mqtt.MQTTv5,
        )
        if broker.tls is not None and cert is not None:
            client.tls_set(
                ca_certs=str(broker.tls.ca.ca_file), certfile=str(cert.cert), keyfile=str(cert.key)
            )
        client.on_message = self._on_message
        client.on_connect = self._on_connect
        client.on_subscribe = lambda *args: self._subscribed.set()
        client.reconnect_delay_set(0.2, 1)
        connect = Properties(PacketTypes.CONNECT)
        connect.SessionExpiryInterval = 3600 if persistent else 0
        client.connect_async(broker.host, broker.port, clean_start=not persistent, properties=connect)
        client.loop_start()
        self.client = client
        if not self._subscribed.wait(10):
            raise TimeoutError("observer could not subscribe")

    def _on_connect(self, client: mqtt.Client, *args: object) -> None:
        client.subscribe(
            [
                (f"{TOPICS.base}/device/+/events", 1),
                (f"{TOPICS.base}/device/+/status", 1),
                (self.response_topic, 1),
            ]
        )

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        body = json.loads(message.payload) if message.payload else {}
        with self._lock:
            if message.topic.endswith("/events"):
                self.events.append(body)
            elif message.topic.endswith("/status"):
                self.statuses.append(body)
            else:
                props = message.properties
                self.responses.put((body, getattr(props, "CorrelationData", None)))

    def unique_events(self, deployment_id: str | None = None) -> list[dict[str, Any]]:
        """Events de-duplicated by event_id (delivery is at least once), in arrival order."""
        seen: dict[str, dict[str, Any]] = {}
        with self._lock:
            for event in self.events:
                if deployment_id is None or event["deployment_id"] == deployment_id:
                    seen.setdefault(event["event_id"], event)
        return list(seen.values())

    def states(self, deployment_id: str | None = None) -> list[str]:
        return [event["state"] for event in self.unique_events(deployment_id)]

    def wait_for(self, condition: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = condition()
            if result:
                return result
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; events: {self.unique_events()}")

    def terminal_events(self) -> list[dict[str, Any]]:
        """Events that end a deployment, so far."""
        terminal = ("committed", "rejected", "failed", "rolled_back")
        return [e for e in self.unique_events() if e["state"] in terminal]

    def wait_terminal(self, count: int = 1, timeout: float = 60.0) -> list[dict[str, Any]]:
        """Wait until ``count`` deployments reached a terminal state; return those events."""

        def done() -> list[dict[str, Any]]:
            ends = self.terminal_events()
            return ends if len(ends) >= count else []

        return self.wait_for(done, timeout, f"{count} terminal event(s)")

    def publish(self, topic: str, payload: bytes, retain: bool = True) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def send_command(self, envelope: bytes, device: str = DEVICE) -> bytes:
        """Send a command as an MQTT v5 request; returns its correlation data."""
        correlation = secrets.token_bytes(8)
        properties = Properties(PacketTypes.PUBLISH)
        properties.ResponseTopic = self.response_topic
        properties.CorrelationData = correlation
        self.client.publish(TOPICS.command(device), envelope, qos=1, properties=properties).wait_for_publish(
            10
        )
        return correlation

    def command(self, envelope: bytes, device: str = DEVICE, timeout: float = 60.0) -> dict[str, Any]:
        """Send a command as an MQTT v5 request and return the response it gets."""
        correlation = self.send_command(envelope, device)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                body, received = self.responses.get(timeout=0.5)
            except queue.Empty:
                continue
            if received == correlation:
                return body
        raise AssertionError("no command response")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def retained_message(broker: Mosquitto, topic: str) -> bytes | None:
    """The retained message a new subscriber to ``topic`` gets at once (None when there is none)."""
    got: queue.Queue[bytes] = queue.Queue()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_connect = lambda c, *a: c.subscribe(topic, 1)
    client.on_message = lambda c, u, m: got.put(bytes(m.payload)) if m.retain else None
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        return got.get(timeout=5)
    except queue.Empty:
        return None
    finally:
        client.loop_stop()
        client.disconnect()
