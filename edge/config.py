"""The device daemon's configuration (``/etc/immune-edge/edge.toml``), validated before anything starts."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from edge.delivery.downloader import DownloadPolicy
from edge.delivery.gguf_header import DEFAULT_ARCHITECTURES
from shared.config import CONFIG_DIR, STATE_DIR, ConfigModel, ConfigPath, MqttSettings
from shared.schema import Identifier

DEFAULT_CONFIG_FILE = CONFIG_DIR / "edge.toml"


class DeviceSettings(ConfigModel):
    """Who this device is; ``id`` is also its MQTT client id and certificate CN."""

    id: Identifier
    fleet: Identifier
    groups: Annotated[list[Identifier], Field(max_length=64)] = []
    #: Detected from the running machine when unset.
    cpu_arch: Literal["aarch64", "x86_64"] | None = None
    #: Detected from ``{procfs_root}/meminfo`` when unset.
    ram_mb: Annotated[int, Field(ge=1)] | None = None
    #: Pointed at a fixture tree in tests; a Pi's real values live under /proc and /sys.
    procfs_root: ConfigPath = Path("/proc")


class StoreSettings(ConfigModel):
    """Where models live and how many stay cached."""

    state_dir: ConfigPath = STATE_DIR
    keep_models: Annotated[int, Field(ge=2, le=32)] = 3
    allowed_architectures: Annotated[list[str], Field(min_length=1)] = sorted(DEFAULT_ARCHITECTURES)


class DownloadSettings(ConfigModel):
    """Retry, timeout and watchdog limits for artifact downloads."""

    attempts: Annotated[int, Field(ge=1, le=100)] = 8
    backoff_initial_s: Annotated[float, Field(gt=0)] = 1.0
    backoff_max_s: Annotated[float, Field(gt=0)] = 60.0
    connect_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    stall_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    min_rate_bps: Annotated[int, Field(ge=0)] = 2048
    rate_window_s: Annotated[float, Field(gt=0)] = 60.0
    free_space_margin_mb: Annotated[int, Field(ge=0)] = 64

    def policy(self) -> DownloadPolicy:
        values = self.model_dump()
        values["free_space_margin_bytes"] = values.pop("free_space_margin_mb") * 1024 * 1024
        return DownloadPolicy(**values)


class DeploySettings(ConfigModel):
    """Timing of desired-state reconciliation."""

    #: Retained desired state for fleet, groups and device arrives in any order after a (re)connect;
    #: wait this long for all of it before choosing, so a fleet-wide model is not installed first.
    settle_s: Annotated[float, Field(ge=0, le=60)] = 2.0
    #: A deployment that failed for a transient reason (network, disk) is retried after this long.
    retry_failed_s: Annotated[float, Field(ge=1)] = 300.0
    #: Accepted clock difference between operator and device when checking a command's issued_at.
    clock_skew_s: Annotated[float, Field(ge=0, le=3600)] = 120.0


class EdgeConfig(ConfigModel):
    """Everything ``immune-edge run`` needs."""

    device: DeviceSettings
    mqtt: MqttSettings = MqttSettings()
    #: The trust anchor installed at provisioning; root-signed updates received later are kept in state_dir.
    keyring_file: ConfigPath = CONFIG_DIR / "keyring.json"
    store: StoreSettings = StoreSettings()
    download: DownloadSettings = DownloadSettings()
    deploy: DeploySettings = DeploySettings()

    @property
    def state_dir(self) -> Path:
        return self.store.state_dir


def detect_cpu_arch() -> str:
    """The machine's architecture in manifest terms (``arm64`` is reported by some kernels)."""
    machine = platform.machine().lower()
    return {"arm64": "aarch64", "amd64": "x86_64"}.get(machine, machine)


def read_mem_total_mb(procfs_root: Path) -> int:
    """MemTotal from ``meminfo`` in MiB; raises OSError/ValueError when it cannot be read."""
    for line in (procfs_root / "meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise ValueError(f"{procfs_root / 'meminfo'}: no MemTotal line")
