"""The typed records the trainer's stages exchange through the run directory (trainer.layout):
``finetune`` writes a RunRecord, ``export`` an ExportReport, ``eval`` an EvalReport, ``publish`` a
PublishedRecord. Each is read back through its model, so a stage never guesses a dict's keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, ValidationError

from shared.manifest import Quantization
from shared.reasons import Reason
from trainer.comparison import MetricComparison
from trainer.errors import TrainerError
from trainer.tokenizer_fidelity import FidelityReport

#: Each stage's record file (run.json, export.json, eval.json): the codes for it missing and malformed.
_STAGE_REASONS: dict[str, tuple[Reason, Reason]] = {
    "run": (Reason.MISSING_RUN, Reason.BAD_RUN),
    "export": (Reason.MISSING_EXPORT, Reason.BAD_EXPORT),
    "eval": (Reason.MISSING_EVAL, Reason.BAD_EVAL),
}


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def write(self, path: Path) -> None:
        path.write_text(self.model_dump_json(indent=2) + "\n")

    @classmethod
    def read(cls, path: Path, missing: str) -> Self:
        """The record in ``path``; TrainerError naming the file (``missing`` says which stage to run)."""
        absent, malformed = _STAGE_REASONS[path.stem]
        if not path.is_file():
            raise TrainerError(absent, f"{path}: not found ({missing})")
        try:
            return cls.model_validate_json(path.read_bytes())
        except ValidationError as exc:
            raise TrainerError(malformed, f"{path}: {exc.errors(include_url=False)}") from None


class RunRecord(_Record):
    """``run.json``: what ``finetune`` trained, on what, with which packages, and how it went."""

    finished_at: str
    config: dict[str, Any]
    seed: int
    data_sha256: str
    records: dict[str, int]
    device: str
    load_in_4bit: bool
    versions: dict[str, str]
    metrics: dict[str, float]
    resumed: bool
    #: Where the base came from (a GGUF: its conversion and parity check, trainer.base_model).
    base: dict[str, Any] = {}


class ExportedFile(_Record):
    """One GGUF ``export`` wrote and checked."""

    quant: Quantization
    file: str
    size: int
    sha256: str
    tensor_types: dict[str, int]
    #: The importance matrix the file was quantized with, and the plain k-quant kept for comparison.
    imatrix_sha256: str | None = None
    without_imatrix: str | None = None


class ExportedAdapter(_Record):
    """The LoRA as a GGUF adapter, bound to the base GGUF it was trained against."""

    file: str
    size: int
    sha256: str
    base_file: str
    #: Where the base GGUF is on this machine (eval applies the adapter to it).
    base_path: str
    base_size: int
    base_sha256: str
    #: The adapter's tensors, and whether llama-cpp-python applied it to the base and answered.
    tensors: int
    answered: bool
    #: The GGUF the LoRA was trained from, when the base above is a requantization of it.
    trained_on: str | None = None


class ExportReport(_Record):
    """``export.json``."""

    files: list[ExportedFile]
    tokenizer: FidelityReport
    adapter: ExportedAdapter | None = None


class QuantScores(_Record):
    """How one quantization did against the F16 baseline."""

    file: str
    perplexity: float
    perplexity_rise_vs_f16: float
    accepted: bool
    tasks: dict[str, float]
    #: The plain k-quant's perplexity, when this file was quantized with an importance matrix.
    perplexity_without_imatrix: float | None = None


class BaselineComparison(_Record):
    """Every evaluated file against a baseline GGUF on the same held-out incidents."""

    label: str
    file: str
    sha256: str
    #: None for the captured answers of a fleet's model: there is no file to measure perplexity on.
    perplexity: float | None
    tasks: dict[str, float]
    quants: dict[Quantization, dict[str, MetricComparison]]


class AdapterScores(_Record):
    """The LoRA adapter applied to its base GGUF in llama-cpp-python, as a device runs it, on the
    same held-out records, next to the merged F16."""

    file: str
    base_file: str
    perplexity: float
    perplexity_rise_vs_f16: float
    tasks: dict[str, float]
    #: Per metric, the adapter against the merged F16 on the same incidents (paired).
    vs_f16: dict[str, MetricComparison]


#: The context a model is published with is a multiple of this (llama.cpp allocates its KV cache so).
CONTEXT_STEP = 256


class RequestFit(_Record):
    """How big a client profile's requests are in the model's own tokens, and the context they need."""

    profile: str
    requests: int
    #: The longest prompt (chat template applied) and which request it is.
    longest_prompt_tokens: int
    longest_request: str
    #: Its size in the client's own estimate (Slips: characters / 4) and the real/estimate ratio.
    longest_estimated_tokens: int
    max_ratio_to_estimate: float
    max_tokens: int
    #: Longest prompt plus the client's max_tokens, rounded up to CONTEXT_STEP.
    context_needed: int

    @classmethod
    def of(cls, profile: str, max_tokens: int, sizes: list[tuple[str, int, int]]) -> RequestFit:
        """From (request id, real prompt tokens, estimated tokens) of every request rendered."""
        if not sizes:
            raise TrainerError(Reason.EMPTY_DATASET, f"profile {profile} rendered no request to measure")
        ident, real, estimated = max(sizes, key=lambda size: size[1])
        needed = real + max_tokens
        return cls(
            profile=profile,
            requests=len(sizes),
            longest_prompt_tokens=real,
            longest_request=ident,
            longest_estimated_tokens=estimated,
            max_ratio_to_estimate=round(max(r / e for _, r, e in sizes if e > 0), 3),
            max_tokens=max_tokens,
            context_needed=-(-needed // CONTEXT_STEP) * CONTEXT_STEP,
        )


class EvalReport(_Record):
    """``eval.json``: the publish gate."""

    baseline: Quantization
    max_ppl_rise: float
    records: dict[str, int]
    quants: dict[Quantization, QuantScores]
    comparison: BaselineComparison | None = None
    adapter: AdapterScores | None = None
    #: With a client profile: its requests measured in the model's tokens (prepare's figure over
    #: every incident when it is known, else the held-out requests), and the context eval ran at.
    requests: RequestFit | None = None


class PublishedRecord(_Record):
    """``published.json``: what ``publish`` sent, where."""

    name: str
    serial: int
    quantization: Quantization
    topic: str
    url: str
    size: int
    sha256: str
    signed_by: list[str]
    expires_at: str
