"""Fixtures shared by every test: real broker, real artifact server, real models, signing keys."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import settings

from shared.signing import Keyring, Role, SigningKey, TrustedKey, generate_key
from shared.signing.keyring import Thresholds
from tests.harness import error_bodies
from tests.harness.artifact_server import ArtifactServer
from tests.harness.broker import Mosquitto, TlsMaterial
from tests.harness.edge import FleetObserver
from tests.harness.models import gemma3_gguf, smollm2_gguf
from tests.harness.pki import TestCA

# CI machines are small and shared: per-example deadlines would make property tests flaky.
settings.register_profile("ci", deadline=None)
settings.load_profile("ci")
error_bodies.install()


#: Fixtures that load a real model; a test using any of them (directly or through another fixture) is
#: slow. Whole modules that train, converge Ansible, run a bench or the demo are slow too.
_MODEL_FIXTURES = frozenset({"smollm2_model", "gemma3_model"})
_SLOW_MODULES = frozenset(
    {
        "test_trainer_pipeline",
        "test_trainer_real_model",
        "test_distill",
        "test_ansible",
        "test_bench_smoke",
        "test_demo",
    }
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the slow tests, so ``make test-quick`` (``-m "not slow"``) runs the rest in minutes."""
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        if _MODEL_FIXTURES & set(getattr(item, "fixturenames", ())) or module in _SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _no_internal_text_in_error_bodies() -> Iterator[None]:
    """Every test: no HTTP error body it received carries internal details (see error_bodies)."""
    error_bodies.take()
    yield
    leaked = error_bodies.take()
    assert not leaked, f"internal text in API error bodies: {leaked}"


@pytest.fixture
def mqtt_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A plain mosquitto on a free loopback port (anonymous access)."""
    with Mosquitto(tmp_path / "mosquitto") as broker:
        yield broker


@pytest.fixture
def tls_broker_factory(tmp_path: Path) -> Iterator[Callable[[str | None], Mosquitto]]:
    """Start a TLS mosquitto requiring client certificates (CN = username), with an optional ACL."""
    started: list[Mosquitto] = []

    def start(acl: str | None = None) -> Mosquitto:
        workdir = tmp_path / f"mosquitto-tls-{len(started)}"
        ca = TestCA(workdir / "pki")
        broker = Mosquitto(workdir, tls=TlsMaterial(ca, ca.issue("broker", server=True)), acl=acl)
        started.append(broker)
        return broker.start()

    yield start
    for broker in started:
        broker.stop()


@pytest.fixture
def observer(mqtt_broker: Mosquitto) -> Iterator[FleetObserver]:
    """The fleet's side of the plain broker: publishes desired state, collects events and status."""
    watcher = FleetObserver(mqtt_broker)
    yield watcher
    watcher.close()


@pytest.fixture
def artifact_server(tmp_path: Path) -> Iterator[ArtifactServer]:
    """A loopback HTTP server for artifacts, with Range support and fault injection."""
    with ArtifactServer(tmp_path / "artifacts") as server:
        yield server


@pytest.fixture(scope="session")
def smollm2_model() -> Path:
    return smollm2_gguf()


@pytest.fixture(scope="session")
def gemma3_model() -> Path:
    return gemma3_gguf()


@dataclass
class FleetKeys:
    """A root, two trainer and two operator keys, and a keyring trusting all but ``stranger``."""

    root: SigningKey
    trainer: SigningKey
    trainer2: SigningKey
    operator: SigningKey
    operator2: SigningKey
    stranger: SigningKey

    def keyring(self, version: int = 1, **thresholds: int) -> Keyring:
        entries = [
            (self.root, Role.ROOT, "root"),
            (self.trainer, Role.TRAINER, "trainer"),
            (self.trainer2, Role.TRAINER, "trainer2"),
            (self.operator, Role.OPERATOR, "operator"),
            (self.operator2, Role.OPERATOR, "operator2"),
        ]
        return Keyring(
            version=version,
            keys=[TrustedKey(keyid=k.keyid, role=r, public_key=k.public_b64, name=n) for k, r, n in entries],
            thresholds=Thresholds(**thresholds),
        )


@pytest.fixture(scope="session")
def fleet_keys() -> FleetKeys:
    return FleetKeys(*(generate_key() for _ in range(6)))
