"""Wiring of the device's control-plane parts from its config, shared by the daemon and the CLI."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from importlib import metadata

from edge.config import EdgeConfig, detect_cpu_arch, read_meminfo_mb
from edge.control.activation import Activator, StoreOnlyActivator
from edge.control.deployer import Deployer
from edge.control.reporting import Clock, Reporter, utc_now
from edge.control.trust import TrustStore
from edge.delivery.downloader import Downloader
from edge.delivery.store import ContentStore
from edge.delivery.verifier import DeviceProfile
from edge.state.db import StateDB
from edge.state.ledger import Ledger
from edge.state.nonces import NonceStore
from edge.state.outbox import Outbox
from shared.config import ConfigError
from shared.errors import ContractError
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
                "config-invalid", f"device.ram_mb is unset and cannot be detected: {exc}"
            ) from None
    return DeviceProfile(
        cpu_arch=device.cpu_arch or detect_cpu_arch(),
        ram_mb=ram_mb,
        groups=tuple(device.groups),
        allowed_architectures=frozenset(config.store.allowed_architectures),
    )


@dataclass
class EdgeNode:
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

    @classmethod
    def open(cls, config: EdgeConfig, activator: Activator | None = None, clock: Clock = utc_now) -> EdgeNode:
        """Open (creating if needed) the state directory and build every part."""
        state_dir = config.state_dir
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        try:
            trust = TrustStore(config.keyring_file, state_dir)
        except OSError as exc:
            raise ConfigError(
                "config-invalid", f"keyring_file: cannot read {config.keyring_file}: {exc}"
            ) from None
        except ContractError as exc:
            raise ConfigError("config-invalid", f"keyring_file: {exc}") from None
        db = StateDB(state_dir / "state.db")
        ledger, outbox = Ledger(db), Outbox(db)
        topics = Topics(config.device.fleet, root=config.mqtt.topic_root)
        reporter = Reporter(
            topics, config.device.id, tuple(config.device.groups), ledger, outbox, software_version(), clock
        )
        store = ContentStore(config.store_dir)
        deployer = Deployer(
            ledger,
            reporter,
            trust,
            store,
            Downloader(store, config.download.policy()),
            device_profile(config),
            activator or StoreOnlyActivator(),
            config.store.keep_models,
        )
        return cls(config, db, ledger, outbox, NonceStore(db), trust, topics, reporter, store, deployer)

    @property
    def clock_skew(self) -> timedelta:
        return timedelta(seconds=self.config.deploy.clock_skew_s)

    def close(self) -> None:
        self.db.close()
