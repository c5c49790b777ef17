"""The model manifest: everything a device needs to fetch, verify and run one model."""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, AwareDatetime, Field, HttpUrl, model_validator

from shared.schema import Contract, FileName, Identifier, Sha256Hex

MANIFEST_PAYLOAD_TYPE = "application/vnd.immune-edge.manifest+json"

_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}")
_TASK = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")


def _model_name(value: str) -> str:
    # Ollama-style names such as "stratosphere/qwen2.5-1.5b-slips-immune-risk:q5_k_m" are valid.
    if not _MODEL_NAME.fullmatch(value) or ".." in value or "//" in value:
        raise ValueError(f"{value!r} is not a valid model name (1-128 of A-Z a-z 0-9 _ . : / -)")
    return value


def _task(value: str) -> str:
    if not _TASK.fullmatch(value):
        raise ValueError(f"{value!r} is not a valid task profile (lowercase letters, digits and '-')")
    return value


def _download_url(value: HttpUrl) -> HttpUrl:
    # HttpUrl already limits the scheme to http/https; credentials belong in device config, not here.
    if value.username or value.password:
        raise ValueError("URLs must not carry credentials (configure them on the device instead)")
    return value


ModelName = Annotated[str, AfterValidator(_model_name)]
TaskProfile = Annotated[str, AfterValidator(_task)]
DownloadUrl = Annotated[HttpUrl, AfterValidator(_download_url)]


class Quantization(StrEnum):
    """llama.cpp file types a manifest may ship."""

    F16 = "f16"
    BF16 = "bf16"
    Q8_0 = "q8_0"
    Q6_K = "q6_k"
    Q5_K_M = "q5_k_m"
    Q5_K_S = "q5_k_s"
    Q5_0 = "q5_0"
    Q5_1 = "q5_1"
    Q4_K_M = "q4_k_m"
    Q4_K_S = "q4_k_s"
    Q4_0 = "q4_0"
    Q4_1 = "q4_1"
    Q3_K_M = "q3_k_m"
    Q2_K = "q2_k"


class FileRole(StrEnum):
    """What an artifact file is for on the device."""

    MODEL = "model"  # the GGUF handed to llama.cpp
    CHAT_TEMPLATE = "chat-template"  # a Jinja template file that overrides the runtime profile's
    IMATRIX = "imatrix"
    EXTRA = "extra"


class ArtifactFile(Contract):
    """One downloadable file with its exact size and digest; any mirror must serve identical bytes."""

    name: FileName
    role: FileRole
    media_type: Annotated[str, Field(pattern=r"^[a-z]+/[A-Za-z0-9.+_-]+$", max_length=127)]
    size: Annotated[int, Field(gt=0, le=64 * 1024**3)]
    sha256: Sha256Hex
    urls: Annotated[list[DownloadUrl], Field(min_length=1, max_length=8)]


class BaseModelRef(Contract):
    """The base GGUF an adapter applies to. The adapter was trained against exactly this file, so a
    device runs it only on a base with this sha256; the URLs let a device that lacks the base fetch it
    (its size and sha256 are checked like any artifact's)."""

    name: ModelName
    sha256: Sha256Hex
    size: Annotated[int, Field(gt=0, le=64 * 1024**3)]
    urls: Annotated[list[DownloadUrl], Field(min_length=1, max_length=8)]


class Sampling(Contract):
    """Default sampling parameters; a request may override them within the device's caps."""

    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 0.2
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 0.95
    top_k: Annotated[int, Field(ge=0, le=1000)] = 40
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] = 0.05
    repeat_penalty: Annotated[float, Field(ge=0.5, le=2.0)] = 1.1
    max_tokens: Annotated[int, Field(ge=1, le=32768)] = 256


class RuntimeProfile(Contract):
    """How llama.cpp must run the model. A GGUF's own template is not trusted to exist."""

    chat_format: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")] | None = None
    chat_template: Annotated[str, Field(min_length=1, max_length=32 * 1024)] | None = None
    n_ctx: Annotated[int, Field(ge=128, le=131072)] = 4096
    stop: Annotated[list[Annotated[str, Field(min_length=1, max_length=64)]], Field(max_length=16)] = []
    system_prompt: Annotated[str, Field(max_length=16 * 1024)] | None = None
    sampling: Sampling = Sampling()

    @model_validator(mode="after")
    def _one_template_source(self) -> RuntimeProfile:
        if self.chat_format is not None and self.chat_template is not None:
            raise ValueError("give either chat_format or chat_template, not both")
        return self


class Compatibility(Contract):
    """Which devices may install the model."""

    cpu_arch: Annotated[list[Literal["aarch64", "x86_64"]], Field(min_length=1)] = ["aarch64"]
    min_ram_mb: Annotated[int, Field(ge=0, le=1024 * 1024)] = 0
    device_groups: Annotated[list[Identifier], Field(max_length=64)] = []  # empty: any group


class HealthGate(Contract):
    """Checks a device runs on a new model before routing traffic to it."""

    golden_prompts: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=8192)]], Field(min_length=1, max_length=8)
    ]
    min_tokens_per_second: Annotated[float, Field(ge=0.0)] = 0.0
    max_rss_mb: Annotated[int, Field(ge=1)] | None = None


class EvalScores(Contract):
    """Evaluation results of one quantisation."""

    perplexity: Annotated[float, Field(gt=0.0)] | None = None
    perplexity_rise_vs_f16: float | None = None
    metrics: dict[Annotated[str, Field(max_length=64)], float] = {}


class MetricDelta(Contract):
    """One metric of the published model against its baseline on the same held-out incidents."""

    challenger: float
    baseline: float
    diff: float
    stderr: Annotated[float, Field(ge=0.0)]
    verdict: Literal["better", "worse", "within-noise"]


class BaselineComparison(Contract):
    """Why the model was published: how it compared with the baseline (base model or champion)
    on the trainer's gate, with the margins the gate allowed."""

    baseline: Annotated[str, Field(min_length=1, max_length=64)]
    baseline_sha256: Sha256Hex
    metrics: Annotated[dict[Annotated[str, Field(max_length=64)], MetricDelta], Field(max_length=32)]
    margins: Annotated[dict[Annotated[str, Field(max_length=64)], float], Field(max_length=32)] = {}


class TargetCost(Contract):
    """A file's estimated cost on a device target, relative to every weight processed unrepacked."""

    prompt: Annotated[float, Field(ge=0.0)]
    decode: Annotated[float, Field(ge=0.0)]
    #: Share of the weights the target's fast (repacked) kernels take.
    repacked: Annotated[float, Field(ge=0.0, le=1.0)]


class TargetChoice(Contract):
    """Why this quantization was published for a device target (``publish --target``)."""

    name: Identifier
    chosen: Quantization
    #: Every evaluated candidate, fastest first.
    ranked: Annotated[list[Quantization], Field(max_length=16)]
    cost: dict[Quantization, TargetCost]
    #: Faster candidates that may not be published, each with its reason.
    refused: Annotated[list[Annotated[str, Field(max_length=1024)]], Field(max_length=16)] = []


class Provenance(Contract):
    """Where the model came from: enough to reproduce and audit it."""

    dataset_sha256: Sha256Hex | None = None
    hyperparameters: dict[Annotated[str, Field(max_length=64)], str | int | float | bool] = {}
    eval: dict[Quantization, EvalScores] = {}
    trainer_version: Annotated[str, Field(max_length=64)] | None = None
    source: Annotated[str, Field(max_length=256)] | None = None
    comparison: BaselineComparison | None = None
    #: The GGUF tensor types the file really holds, and how many tensors of each (a K-quant of a small
    #: model holds Q5_0/Q5_1 where rows are not a multiple of 256; devices' speed depends on it).
    tensor_types: dict[Annotated[str, Field(max_length=16)], Annotated[int, Field(ge=0)]] = {}
    target: TargetChoice | None = None


class Manifest(Contract):
    """A deployable model, as signed by the trainer and published as desired state."""

    MAX_BYTES: ClassVar[int] = 256 * 1024
    WHAT: ClassVar[str] = "manifest"

    schema_version: Literal[1] = 1
    name: ModelName
    channel: Identifier
    serial: Annotated[int, Field(ge=1, le=2**53)]
    version: Annotated[str, Field(min_length=1, max_length=64)]
    created_at: AwareDatetime
    expires_at: AwareDatetime
    base_model: Annotated[str, Field(min_length=1, max_length=256)]
    task: TaskProfile
    quantization: Quantization
    files: Annotated[list[ArtifactFile], Field(min_length=1, max_length=16)]
    runtime: RuntimeProfile
    compatibility: Compatibility = Compatibility()
    health: HealthGate | None = None
    provenance: Provenance = Provenance()
    #: Set for a LoRA adapter: the file with role "model" is then the adapter GGUF, served on this base.
    base: BaseModelRef | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if self.expires_at <= self.created_at:
            raise ValueError("expires_at must be later than created_at")
        models = [f for f in self.files if f.role is FileRole.MODEL]
        if len(models) != 1:
            raise ValueError(f"files must hold exactly one entry with role 'model', found {len(models)}")
        names = [f.name for f in self.files]
        if len(set(names)) != len(names):
            raise ValueError("file names must be unique")
        if self.base is not None and self.base.sha256 == models[0].sha256:
            raise ValueError("an adapter cannot be its own base (base.sha256 is the model file's)")
        return self

    @property
    def is_adapter(self) -> bool:
        """Whether the model file is a LoRA adapter for ``base``."""
        return self.base is not None

    @property
    def model_file(self) -> ArtifactFile:
        """The GGUF entry."""
        return next(f for f in self.files if f.role is FileRole.MODEL)

    def is_expired(self, now: datetime) -> bool:
        """Whether the manifest is past its expiry at ``now`` (timezone-aware)."""
        return now >= self.expires_at
