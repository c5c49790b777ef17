"""The device daemon's configuration (``/etc/immune-edge/edge.toml``), validated before anything starts."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from edge.delivery.downloader import DownloadPolicy
from edge.logs import LogFormat
from shared.capture import RedactionKind
from shared.config import CONFIG_DIR, STATE_DIR, ConfigError, ConfigModel, ConfigPath, MqttSettings
from shared.gguf import DEFAULT_ARCHITECTURES
from shared.reasons import Reason
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
    sysfs_root: ConfigPath = Path("/sys")


class StoreSettings(ConfigModel):
    """Where models live and how many stay cached."""

    state_dir: ConfigPath = STATE_DIR
    keep_models: Annotated[int, Field(ge=2, le=32)] = 3
    allowed_architectures: Annotated[list[str], Field(min_length=1)] = sorted(DEFAULT_ARCHITECTURES)
    #: Read-only directories of blobs named by their sha256 (models baked into the image, or one
    #: copy shared by many simulated devices), tried before downloading; hashed in full before use.
    seed_dirs: Annotated[list[ConfigPath], Field(max_length=8)] = []


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
    #: A new model whose activation or trial a restart (power cut, crash) interrupted is tried again
    #: this many times before its serial is marked bad (a boot counter, as RAUC and U-Boot keep).
    activation_retries: Annotated[int, Field(ge=0, le=10)] = 2


class ApiSettings(ConfigModel):
    """Where and how Slips reaches the model."""

    #: TCP address; loopback unless you mean to expose the model. An empty host disables TCP.
    host: str = "127.0.0.1"
    #: 11434 is where a stock Slips (Ollama provider) looks.
    port: Annotated[int, Field(ge=0, le=65535)] = 11434
    #: Unix socket (file permissions decide who may connect); None: TCP only.
    socket: ConfigPath | None = Path("/run/immune-edge/api.sock")
    socket_mode: Annotated[int, Field(ge=0, le=0o777)] = 0o660
    #: Group owning the socket, e.g. the one Slips runs as.
    socket_group: str | None = None
    #: Extra model names that reach whichever model is current (point Slips at one of these, so a swap
    #: to a model with another name needs no Slips change).
    aliases: Annotated[list[Annotated[str, Field(min_length=1, max_length=128)]], Field(max_length=16)] = []
    #: File holding a bearer token required on TCP (the Unix socket relies on file permissions).
    bearer_token_file: ConfigPath | None = None
    max_body_bytes: Annotated[int, Field(ge=1024, le=64 * 1024 * 1024)] = 1024 * 1024
    #: Requests that may wait behind the running one; more get 429.
    queue: Annotated[int, Field(ge=0, le=1024)] = 8
    request_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 300.0
    max_tokens_cap: Annotated[int, Field(ge=1, le=32768)] = 1024
    #: Model names (usually aliases, e.g. "slips-batch") whose requests may be deferred while the
    #: device is hot; a request can also say so itself with the header ``X-Immune-Priority: low``.
    low_priority_models: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=128)]], Field(max_length=16)
    ] = []

    def aliases_for(self, name: str) -> tuple[str, ...]:
        """The aliases that add a name to model ``name``."""
        return tuple(a for a in self.aliases if a != name)

    def bearer_token(self) -> str | None:
        """The token, read when the daemon starts; ConfigError if the file is unreadable or empty."""
        if self.bearer_token_file is None:
            return None
        try:
            token = self.bearer_token_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(Reason.CONFIG_INVALID, f"api.bearer_token_file: {exc}") from None
        if len(token) < 16:
            raise ConfigError(
                Reason.CONFIG_INVALID, "api.bearer_token_file: the token must be at least 16 characters"
            )
        return token


class RuntimeSettings(ConfigModel):
    """Inference workers, the health gate and the trial window."""

    #: False: store and verify models only (no inference, no API).
    enabled: bool = True
    #: Decode threads; None: measured when each model loads.
    n_threads: Annotated[int, Field(ge=1, le=256)] | None = None
    #: Prompt-processing threads; None: n_threads when that is set, else measured. Decoding is bound by
    #: memory bandwidth and peaks at fewer threads than prompts do (a Pi 5: about 2 against 4).
    n_threads_batch: Annotated[int, Field(ge=1, le=256)] | None = None
    n_batch: Annotated[int, Field(ge=1, le=8192)] = 512
    #: Reuse the KV state of the prefix a prompt shares with the previous one (off only to measure it).
    prefix_reuse: bool = True
    #: RAM for the states of older prompts (0: only the previous prompt's prefix is reused).
    prompt_cache_mb: Annotated[int, Field(ge=0, le=65536)] = 0
    load_timeout_s: Annotated[float, Field(gt=0)] = 300.0
    #: auto: keep the old model serving while the new one loads when MemAvailable allows two;
    #: sequential: always stop the old first (requests wait); parallel: always keep both.
    swap: Literal["auto", "sequential", "parallel"] = "auto"
    #: RAM to keep free beyond the new model's estimate when deciding on a parallel swap.
    swap_headroom_mb: Annotated[int, Field(ge=0)] = 256
    #: Golden prompts for manifests without a health section.
    golden_prompts: Annotated[
        list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=8)
    ] = ["Summarise in one sentence: Slips detected a horizontal port scan to port 22 from 10.0.0.5."]
    gate_max_tokens: Annotated[int, Field(ge=1, le=512)] = 24
    #: After the flip, watch the new model this long before committing it.
    trial_s: Annotated[float, Field(ge=0)] = 60.0
    trial_max_error_rate: Annotated[float, Field(ge=0, le=1)] = 0.2
    trial_min_requests: Annotated[int, Field(ge=1)] = 5
    #: Crashes within crash_window_s that make a crash loop (rollback during trial).
    crash_limit: Annotated[int, Field(ge=1)] = 3
    crash_window_s: Annotated[float, Field(gt=0)] = 300.0
    drain_timeout_s: Annotated[float, Field(gt=0)] = 600.0


class TelemetrySettings(ConfigModel):
    """Device telemetry: sampled every ``interval_s``, published QoS 0, summarised in the status."""

    enabled: bool = True
    interval_s: Annotated[float, Field(ge=1, le=3600)] = 10.0
    #: How often the retained status carries a fresh summary (it is also refreshed on thermal changes).
    status_every_s: Annotated[float, Field(ge=1, le=86400)] = 60.0
    #: Used for the throttling flags only when the firmware's sysfs node is missing.
    vcgencmd: str | None = "vcgencmd"
    #: Samples kept while the broker is unreachable (QoS 0, not stored): the newest, the oldest dropped.
    offline_backlog: Annotated[int, Field(ge=1, le=10_000)] = 16


class ThermalSettings(ConfigModel):
    """Backing off when hot: fewer inference threads, low-priority requests deferred."""

    enabled: bool = True
    #: How often the temperature and firmware flags are read (independent of telemetry, which may be off).
    interval_s: Annotated[float, Field(ge=0.2, le=600)] = 5.0
    #: A Pi 5 starts throttling at 80 C; backing off a little earlier keeps the firmware from doing it.
    soft_limit_c: Annotated[float, Field(ge=30, le=110)] = 78.0
    #: Back to normal at or below this (hysteresis, so the state does not flap around one value).
    restore_c: Annotated[float, Field(ge=20, le=105)] = 70.0
    #: Also back off while the firmware reports throttling or its soft temperature limit now.
    react_to_throttled: bool = True
    #: Threads per worker while hot.
    hot_threads: Annotated[int, Field(ge=1, le=256)] = 1
    defer_low_priority: bool = True
    #: Retry-After of a deferred request.
    defer_retry_after_s: Annotated[int, Field(ge=1, le=3600)] = 60

    @model_validator(mode="after")
    def _hysteresis(self) -> ThermalSettings:
        if self.restore_c >= self.soft_limit_c:
            raise ValueError("restore_c must be below soft_limit_c")
        return self


class CaptureSettings(ConfigModel):
    """Opt-in capture of the requests the API answers, for the operator to pull and train on
    (docs/operations.md): alert data from the customer's network, so off unless turned on."""

    enabled: bool = False
    #: Whose requests are captured (empty: every model's): a model's name catches every request it
    #: answers, an alias (``[api] aliases``) only the requests that ask for that alias.
    models: Annotated[list[Annotated[str, Field(min_length=1, max_length=128)]], Field(max_length=16)] = []
    #: The share of answered requests captured, drawn per request.
    sample_rate: Annotated[float, Field(gt=0, le=1)] = 1.0
    #: Stored bytes of captured exchanges at most; the oldest go first.
    max_mb: Annotated[float, Field(gt=0, le=65536)] = 64.0
    #: Exchanges older than this are deleted.
    retention_days: Annotated[float, Field(gt=0, le=3650)] = 30.0
    #: Addresses replaced before anything is stored, consistently within the capture store.
    redact: list[RedactionKind] = []
    #: After a write failed (a full disk), capture rests this long before trying again.
    pause_after_error_s: Annotated[float, Field(ge=1, le=86400)] = 300.0
    #: Where the captures are kept (None: capture.db in the state directory); a partition of their own
    #: keeps a full capture disk away from the model store.
    file: ConfigPath | None = None

    @property
    def max_bytes(self) -> int:
        return int(self.max_mb * 1024 * 1024)


class LoggingSettings(ConfigModel):
    """Where log lines go (``--log-format`` overrides ``format``) and how refusals are logged."""

    #: auto: journald when systemd connected stderr to the journal, else text on stderr.
    format: LogFormat = LogFormat.AUTO
    #: Refusals (bad signatures, refused commands, failed API auth...) are each logged once per
    #: this window per kind, reason and origin; the repeats are counted, not logged, so a flood
    #: of hostile messages cannot fill the disk.
    refusal_window_s: Annotated[float, Field(ge=1, le=86400)] = 60.0
    #: At most this many refusal lines per window in all, whatever their origins.
    refusal_burst: Annotated[int, Field(ge=1, le=10_000)] = 20


class EdgeConfig(ConfigModel):
    """Everything ``immune-edge run`` needs."""

    device: DeviceSettings
    mqtt: MqttSettings = MqttSettings()
    #: The trust anchor installed at provisioning; root-signed updates received later are kept in state_dir.
    keyring_file: ConfigPath = CONFIG_DIR / "keyring.json"
    store: StoreSettings = StoreSettings()
    download: DownloadSettings = DownloadSettings()
    deploy: DeploySettings = DeploySettings()
    api: ApiSettings = ApiSettings()
    runtime: RuntimeSettings = RuntimeSettings()
    telemetry: TelemetrySettings = TelemetrySettings()
    thermal: ThermalSettings = ThermalSettings()
    capture: CaptureSettings = CaptureSettings()
    logging: LoggingSettings = LoggingSettings()

    @property
    def state_dir(self) -> Path:
        return self.store.state_dir

    @property
    def store_dir(self) -> Path:
        """The content-addressed model store."""
        return self.store.state_dir / "store"

    @property
    def capture_file(self) -> Path:
        """The captured exchanges (a database of its own: its budget and purges never touch state.db)."""
        return self.capture.file or self.store.state_dir / "capture.db"


def detect_cpu_arch() -> str:
    """The machine's architecture in manifest terms (``arm64`` is reported by some kernels)."""
    machine = platform.machine().lower()
    return {"arm64": "aarch64", "amd64": "x86_64"}.get(machine, machine)


def read_meminfo_mb(procfs_root: Path, field: str) -> int:
    """One ``meminfo`` field (MemTotal, MemAvailable...) in MiB; OSError/ValueError when unreadable."""
    for line in (procfs_root / "meminfo").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) // 1024
    raise ValueError(f"{procfs_root / 'meminfo'}: no {field} line")
