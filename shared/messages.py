"""Payload schemas for every MQTT message, each with a size limit, and a topic-aware decoder."""

from __future__ import annotations

import re
from datetime import timedelta
from enum import StrEnum
from typing import Annotated, ClassVar, Literal

from pydantic import AwareDatetime, ConfigDict, Field, model_validator

from shared.capture import CaptureChunk, CapturePullAction, CapturePurgeAction
from shared.errors import SchemaError
from shared.manifest import ModelName
from shared.reasons import Reason
from shared.schema import Contract, Identifier, Sha256Hex
from shared.signing import Envelope
from shared.topics import TopicKind, TopicRef

COMMAND_PAYLOAD_TYPE = "application/vnd.immune-edge.command+json"
#: Longest validity an operator command may claim; bounds the device's nonce memory.
MAX_COMMAND_LIFETIME = timedelta(hours=24)

Nonce = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{16,64}$")]
Serial = Annotated[int, Field(ge=1, le=2**53)]
Text = Annotated[str, Field(max_length=2048)]


class DeploymentState(StrEnum):
    """States of one deployment on one device (modelled on AWS IoT Jobs)."""

    QUEUED = "queued"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    STAGED = "staged"
    ACTIVATING = "activating"
    TRIAL = "trial"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"
    REJECTED = "rejected"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = {
    DeploymentState.COMMITTED,
    DeploymentState.ROLLED_BACK,
    DeploymentState.REJECTED,
    DeploymentState.FAILED,
}


class ModelRef(Contract):
    """Which model a device runs."""

    name: ModelName
    serial: Serial
    sha256: Sha256Hex


class DeviceStatus(Contract):
    """Retained per-device status; the Last Will publishes the same shape with ``online`` false."""

    MAX_BYTES: ClassVar[int] = 16 * 1024
    WHAT: ClassVar[str] = "status"

    device_id: Identifier
    fleet: Identifier
    online: bool
    at: AwareDatetime
    software_version: Annotated[str, Field(max_length=64)] | None = None
    groups: Annotated[list[Identifier], Field(max_length=64)] = []
    model: ModelRef | None = None
    #: LoRA adapters served on ``model``, each at its current version.
    adapters: Annotated[list[ModelRef], Field(max_length=32)] = []
    deployment_state: DeploymentState | None = None
    pinned: bool = False
    last_result: Text | None = None
    summary: dict[Annotated[str, Field(max_length=64)], float] = {}


#: Per-zone temperatures travel as top-level keys, so the payload stays flat for collectors.
ZONE_TEMP_KEY = re.compile(r"temp_([a-z0-9_]{1,40})_c")
MAX_THERMAL_ZONES = 16
#: Per-adapter figures travel the same way: ``adapter_<slug>_<figure>``, slug from the adapter's name.
ADAPTER_FIGURES = ("requests_total", "errors_total", "tokens_per_second")
ADAPTER_KEY = re.compile(rf"adapter_([a-z0-9_]{{1,64}})_({'|'.join(ADAPTER_FIGURES)})")
MAX_ADAPTERS = 16  # keeps a sample under MAX_BYTES
#: Requests per client prompt version: ``prompt_version_<slug>_requests_total``.
PROMPT_VERSION_KEY = re.compile(r"prompt_version_([a-z0-9_]{1,64})_requests_total")
MAX_PROMPT_VERSIONS = 8


def adapter_slug(name: str) -> str:
    """The telemetry key part for an adapter's name (model names allow ``.`` and ``-``)."""
    return re.sub(r"[^a-z0-9_]", "_", name.lower())[:64]


Mb = Annotated[float, Field(ge=0)]
Count = Annotated[int, Field(ge=0)]


class Telemetry(Contract):
    """One flat telemetry sample: scalars only, so collectors (Telegraf, Prometheus) ingest it as is.

    Rates and TTFT cover the requests of the last interval (absent when there were none); counters
    are totals since the daemon started. Besides the fields below, ``temp_<zone>_c`` keys carry each
    thermal zone."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)
    MAX_BYTES: ClassVar[int] = 8 * 1024
    WHAT: ClassVar[str] = "telemetry"

    device_id: Identifier
    fleet: Identifier
    ts: Annotated[float, Field(gt=0, description="unix time, seconds")]
    interval_s: Annotated[float, Field(gt=0)] | None = None
    model_name: ModelName | None = None
    model_serial: Serial | None = None
    uptime_s: Annotated[float, Field(ge=0)] | None = None
    tokens_per_second: Annotated[float, Field(ge=0)] | None = None
    prompt_tokens_per_second: Annotated[float, Field(ge=0)] | None = None
    ttft_ms: Annotated[float, Field(ge=0)] | None = None
    requests_total: Count | None = None
    errors_total: Count | None = None
    #: Inputs the device refused since start (its audit trail: manifests, commands, keyring, API auth).
    refusals_total: Count | None = None
    #: Requests refused since start because their prompt did not fit the model's context (a model
    #: published with too small an n_ctx for its client).
    context_refusals_total: Count | None = None
    queue_depth: Count | None = None
    rss_mb: Mb | None = None
    worker_rss_mb: Mb | None = None
    standby_worker_rss_mb: Mb | None = None
    mem_available_mb: Mb | None = None
    swap_used_mb: Mb | None = None
    cpu_load_1m: Annotated[float, Field(ge=0)] | None = None
    cpu_freq_mhz: Annotated[float, Field(ge=0)] | None = None
    soc_temp_c: float | None = None
    throttled_bits: Count | None = None
    under_voltage_now: bool | None = None
    freq_capped_now: bool | None = None
    throttled_now: bool | None = None
    soft_temp_limit_now: bool | None = None
    under_voltage_since_boot: bool | None = None
    freq_capped_since_boot: bool | None = None
    throttled_since_boot: bool | None = None
    soft_temp_limit_since_boot: bool | None = None
    fan_rpm: Annotated[float, Field(ge=0)] | None = None
    fan_state: Count | None = None
    disk_free_mb: Mb | None = None
    n_threads: Annotated[int, Field(ge=1)] | None = None
    n_threads_batch: Annotated[int, Field(ge=1)] | None = None
    #: True while the thermal governor has cut threads / defers low-priority requests.
    thermal_limited: bool | None = None

    @model_validator(mode="after")
    def _flat_extras(self) -> Telemetry:
        extra = self.model_extra or {}
        zones = [key for key in extra if ZONE_TEMP_KEY.fullmatch(key)]
        adapters = [key for key in extra if ADAPTER_KEY.fullmatch(key)]
        versions = [key for key in extra if PROMPT_VERSION_KEY.fullmatch(key)]
        if len(zones) > MAX_THERMAL_ZONES:
            raise ValueError(f"at most {MAX_THERMAL_ZONES} thermal zones")
        if len(adapters) > MAX_ADAPTERS * len(ADAPTER_FIGURES):
            raise ValueError(f"figures of at most {MAX_ADAPTERS} adapters")
        if len(versions) > MAX_PROMPT_VERSIONS + 1:  # and "other"
            raise ValueError(f"at most {MAX_PROMPT_VERSIONS} prompt versions")
        for key, value in extra.items():
            if key not in zones and key not in adapters and key not in versions:
                raise ValueError(
                    f"unknown field {key!r} (only temp_<zone>_c, adapter_<name>_<figure> and "
                    "prompt_version_<version>_requests_total may be added)"
                )
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{key} must be a number")
            if key not in zones and value < 0:
                raise ValueError(f"{key} must not be negative")
        return self

    def zone_temps(self) -> dict[str, float]:
        """Temperature per thermal zone name."""
        extra = self.model_extra or {}
        return {match[1]: float(v) for k, v in extra.items() if (match := ZONE_TEMP_KEY.fullmatch(k))}

    def adapter_figures(self) -> dict[str, dict[str, float]]:
        """Figure name -> value, per adapter slug."""
        figures: dict[str, dict[str, float]] = {}
        for key, value in (self.model_extra or {}).items():
            if match := ADAPTER_KEY.fullmatch(key):
                figures.setdefault(match[1], {})[match[2]] = float(value)
        return figures


class DeploymentEvent(Contract):
    """One state transition of a deployment; receivers de-duplicate by ``event_id``."""

    MAX_BYTES: ClassVar[int] = 8 * 1024
    WHAT: ClassVar[str] = "event"

    event_id: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
    device_id: Identifier
    fleet: Identifier
    deployment_id: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
    #: None only when a payload was rejected before it could be authenticated (nothing in it is trusted).
    manifest_name: ModelName | None
    serial: Serial | None
    source: Annotated[str, Field(max_length=64)] = ""
    state: DeploymentState
    reason: Text | None = None
    at: AwareDatetime

    @model_validator(mode="after")
    def _terminal_has_reason(self) -> DeploymentEvent:
        if self.state.terminal and not self.reason:
            raise ValueError(f"terminal state {self.state.value!r} needs a reason")
        return self


class RolloutAction(Contract):
    """Install a trainer-signed manifest on the device (it must pass every check)."""

    action: Literal["rollout"]
    manifest: Envelope


class RollbackAction(Contract):
    """Go back to the previous model, or to a cached serial; the only way to a lower serial. With
    ``adapter``, the LoRA adapter of that name goes back instead (the base and other adapters stay)."""

    action: Literal["rollback"]
    serial: Serial | None = None
    adapter: ModelName | None = None


class PinAction(Contract):
    """Keep the current (or the given cached) model and ignore new desired state until unpinned.
    With ``adapter`` and ``serial``, that adapter is switched to the serial first; the pin itself
    holds the whole device."""

    action: Literal["pin"]
    serial: Serial | None = None
    adapter: ModelName | None = None


class SimpleAction(Contract):
    """Commands without arguments."""

    action: Literal["unpin", "status", "gc", "capture_status"]


CommandAction = Annotated[
    RolloutAction | RollbackAction | PinAction | SimpleAction | CapturePullAction | CapturePurgeAction,
    Field(discriminator="action"),
]


class Command(Contract):
    """An operator command; travels as the payload of an operator-signed DSSE envelope."""

    MAX_BYTES: ClassVar[int] = 480 * 1024
    WHAT: ClassVar[str] = "command"

    nonce: Nonce
    issued_at: AwareDatetime
    expires_at: AwareDatetime
    fleet: Identifier
    device_id: Identifier
    action: CommandAction

    @model_validator(mode="after")
    def _lifetime(self) -> Command:
        if self.expires_at <= self.issued_at:
            raise ValueError("expires_at must be later than issued_at")
        if self.expires_at - self.issued_at > MAX_COMMAND_LIFETIME:
            raise ValueError(f"a command may be valid for at most {MAX_COMMAND_LIFETIME}")
        return self


class CommandResponse(Contract):
    """A device's answer, sent to the command's MQTT v5 response topic with its correlation data."""

    #: Room for one chunk of captured exchanges (a capture_pull's answer).
    MAX_BYTES: ClassVar[int] = 512 * 1024
    WHAT: ClassVar[str] = "command response"

    #: None (absent) when the command was refused before its nonce could be trusted.
    nonce: Nonce | None = None
    device_id: Identifier
    ok: bool
    at: AwareDatetime
    result: dict[Annotated[str, Field(max_length=64)], str | int | float | bool | None] = {}
    error: Text | None = None
    #: The answer to a ``capture_pull``.
    capture: CaptureChunk | None = None

    @model_validator(mode="after")
    def _error_when_failed(self) -> CommandResponse:
        if not self.ok and not self.error:
            raise ValueError("a failed command response needs an error message")
        return self


#: The payload model of each topic kind. Envelopes are verified by the receiver against its keyring.
PAYLOAD_MODEL: dict[TopicKind, type[Contract]] = {
    TopicKind.DESIRED_FLEET: Envelope,
    TopicKind.DESIRED_GROUP: Envelope,
    TopicKind.DESIRED_DEVICE: Envelope,
    TopicKind.KEYRING: Envelope,
    TopicKind.COMMAND: Envelope,
    TopicKind.STATUS: DeviceStatus,
    TopicKind.TELEMETRY: Telemetry,
    TopicKind.EVENTS: DeploymentEvent,
    TopicKind.RESPONSE: CommandResponse,
}


def decode_payload(ref: TopicRef, payload: bytes) -> Contract | None:
    """Validate a message for its topic; ``None`` for an empty payload (a cleared retained topic).

    Identity fields inside device messages must match the topic, so a device cannot
    speak for another one even where the broker's ACL is loose.
    """
    if not payload:
        return None
    model = PAYLOAD_MODEL[ref.kind]
    message = model.from_json(payload, what=f"{ref.kind.value} payload")
    for field, expected in (("device_id", ref.device), ("fleet", ref.fleet)):
        claimed = getattr(message, field, None)
        if expected is not None and claimed is not None and claimed != expected:
            raise SchemaError(
                Reason.IDENTITY,
                f"{ref.kind.value} payload: {field} {claimed!r} does not match the topic ({expected!r})",
            )
    return message
