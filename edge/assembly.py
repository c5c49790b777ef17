"""The one place the device is built from its config.

``immune-edge run`` uses all of it (``Device``); ``serve`` the same data plane without MQTT or a
store of signed models; ``install``, ``verify`` and ``status`` the control plane alone. Every part
is created here once: one content store, one deployer, one serving runtime.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from importlib import metadata
from pathlib import Path

from edge.api.app import create_app
from edge.api.generation import Serving
from edge.api.server import ApiServerThread, bind_sockets
from edge.audit import Audit
from edge.capture.commands import open_capture_store
from edge.capture.recorder import CaptureRecorder
from edge.capture.store import CaptureStore
from edge.config import (
    ApiSettings,
    EdgeConfig,
    RuntimeSettings,
    ThermalSettings,
    detect_cpu_arch,
    read_meminfo_mb,
)
from edge.control.activation import Activator, StoreOnlyActivator
from edge.control.deployer import Deployer
from edge.control.recovery import Recovery
from edge.control.reporting import Clock, Reporter, utc_now
from edge.control.trust import TrustStore
from edge.delivery.downloader import Downloader
from edge.delivery.store import ContentStore
from edge.metrics import Metrics
from edge.runtime.router import ModelRouter
from edge.runtime.serving import ServingRuntime
from edge.state.db import StateDB
from edge.state.ledger import Ledger
from edge.state.nonces import NonceStore
from edge.state.outbox import Outbox
from edge.telemetry.host import HostSensors
from edge.telemetry.thermal import ThermalGovernor, ThermalWatch
from shared.admission import DeviceProfile
from shared.config import ConfigError
from shared.errors import ContractError
from shared.reasons import Reason
from shared.topics import Topics

log = logging.getLogger(__name__)


def software_version() -> str | None:
    try:
        return metadata.version("immune-edge")
    except metadata.PackageNotFoundError:
        return None


def device_profile(config: EdgeConfig) -> DeviceProfile:
    """The hardware facts compatibility checks use: configured, or read from the machine."""
    device = config.device
    ram_mb = device.ram_mb
    if ram_mb is None:
        try:
            ram_mb = read_meminfo_mb(device.procfs_root, "MemTotal")
        except (OSError, ValueError) as exc:
            raise ConfigError(
                Reason.CONFIG_INVALID, f"device.ram_mb is unset and cannot be detected: {exc}"
            ) from None
    return DeviceProfile(
        cpu_arch=device.cpu_arch or detect_cpu_arch(),
        ram_mb=ram_mb,
        groups=tuple(device.groups),
        allowed_architectures=frozenset(config.store.allowed_architectures),
    )


@dataclass
class ControlPlane:
    """The device's state and the services acting on it."""

    config: EdgeConfig
    db: StateDB
    ledger: Ledger
    outbox: Outbox
    nonces: NonceStore
    trust: TrustStore
    topics: Topics
    reporter: Reporter
    store: ContentStore
    deployer: Deployer
    recovery: Recovery
    audit: Audit

    @classmethod
    def open(
        cls,
        config: EdgeConfig,
        store: ContentStore | None = None,
        activator: Activator | None = None,
        clock: Clock = utc_now,
        audit: Audit | None = None,
    ) -> ControlPlane:
        """Open (creating if needed) the state directory and build every part."""
        audit = audit or audit_from(config)
        state_dir = config.state_dir
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        try:
            trust = TrustStore(config.keyring_file, state_dir)
        except OSError as exc:
            raise ConfigError(
                Reason.CONFIG_INVALID, f"keyring_file: cannot read {config.keyring_file}: {exc}"
            ) from None
        except ContractError as exc:
            raise ConfigError(Reason.CONFIG_INVALID, f"keyring_file: {exc}") from None
        db = StateDB(state_dir / "state.db")
        ledger, outbox = Ledger(db), Outbox(db)
        topics = Topics(config.device.fleet, root=config.mqtt.topic_root)
        reporter = Reporter(
            topics, config.device.id, tuple(config.device.groups), ledger, outbox, software_version(), clock
        )
        store = store or ContentStore(config.store_dir, config.store.seed_dirs)
        deployer = Deployer(
            ledger,
            reporter,
            trust,
            store,
            Downloader(store, config.download.policy()),
            device_profile(config),
            activator or StoreOnlyActivator(),
            config.store.keep_models,
            audit,
        )
        recovery = Recovery(deployer, config.deploy.activation_retries)
        nonces = NonceStore(db)
        parts = (ledger, outbox, nonces, trust, topics, reporter, store, deployer, recovery, audit)
        return cls(config, db, *parts)

    @property
    def clock_skew(self) -> timedelta:
        return timedelta(seconds=self.config.deploy.clock_skew_s)

    def close(self) -> None:
        self.db.close()


def audit_from(config: EdgeConfig) -> Audit:
    """The one audit trail of a device, rate-limited as configured."""
    return Audit(config.logging.refusal_window_s, config.logging.refusal_burst)


@dataclass(frozen=True)
class HostPaths:
    """Where the host's sensors are read (a fixture tree in tests)."""

    procfs_root: Path = Path("/proc")
    sysfs_root: Path = Path("/sys")
    vcgencmd: str | None = "vcgencmd"


class DataPlane:
    """Models in worker processes, served to Slips over TCP and/or a Unix socket, with thermal
    back-off: everything that serves requests, and nothing that talks to the fleet."""

    def __init__(
        self,
        api: ApiSettings,
        runtime: RuntimeSettings,
        thermal: ThermalSettings,
        store: ContentStore | None,
        host: HostPaths,
        on_thermal_change: Callable[[str], None] = lambda change: None,
        audit: Audit | None = None,
        capture: CaptureRecorder | None = None,
    ) -> None:
        self.audit = audit or Audit()
        self.capture = capture
        self.metrics = Metrics()
        self.router = ModelRouter(max_waiting=api.queue)
        self.runtime = ServingRuntime(self.router, store, runtime, api, host.procfs_root, self.metrics)
        self.sensors = HostSensors(host.sysfs_root, host.procfs_root, host.vcgencmd)
        self.governor = ThermalGovernor(thermal, self.runtime)
        self.thermal = ThermalWatch(self.governor, self.sensors, on_thermal_change)
        serving = Serving(
            self.router,
            self.metrics,
            api.request_timeout_s,
            frozenset(api.low_priority_models),
            thermal.defer_retry_after_s,
            capture,
        )
        app = create_app(serving, self.audit, api.max_body_bytes, api.bearer_token())
        self._server = ApiServerThread(app, bind_sockets(api))

    @classmethod
    def from_config(
        cls,
        config: EdgeConfig,
        store: ContentStore,
        on_thermal_change: Callable[[str], None],
        audit: Audit,
        capture: CaptureRecorder | None = None,
    ) -> DataPlane:
        host = HostPaths(config.device.procfs_root, config.device.sysfs_root, config.telemetry.vcgencmd)
        return cls(config.api, config.runtime, config.thermal, store, host, on_thermal_change, audit, capture)

    def start(self) -> None:
        if self.capture is not None:
            self.capture.start()
        self.runtime.start()
        self._server.start()
        self.thermal.start()

    def close(self) -> None:
        self.thermal.stop()
        self._server.stop()
        self.runtime.close()
        if self.capture is not None:
            self.capture.stop()


@dataclass
class Device:
    """The whole device as ``immune-edge run`` runs it."""

    control: ControlPlane
    data: DataPlane | None

    #: The capture store (None: capture never enabled), read by the operator's capture commands.
    capture: CaptureStore | None = None

    @classmethod
    def build(cls, config: EdgeConfig, on_thermal_change: Callable[[str], None]) -> Device:
        store, audit = ContentStore(config.store_dir, config.store.seed_dirs), audit_from(config)
        capture = open_capture_store(config.capture, config.capture_file)
        recorder = (
            CaptureRecorder(config.capture, capture)
            if capture is not None and config.capture.enabled and config.runtime.enabled
            else None
        )
        data = (
            DataPlane.from_config(config, store, on_thermal_change, audit, recorder)
            if config.runtime.enabled
            else None
        )
        control = ControlPlane.open(config, store, data.runtime if data else None, audit=audit)
        return cls(control, data, capture)
