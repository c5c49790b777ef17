"""The health gate a freshly loaded model passes before it gets traffic: it answers the golden
prompts with non-empty text, fast enough, within its memory budget."""

from __future__ import annotations

import logging
import statistics
import uuid
from dataclasses import dataclass

import psutil

from edge.runtime.handle import WorkerError, WorkerHandle
from edge.runtime.protocol import ChatMessage, GenerateRequest
from shared.errors import ContractError
from shared.reasons import Reason

log = logging.getLogger(__name__)


class GateError(ContractError):
    """The model loaded but failed a health check; ``reason`` names which."""


@dataclass(frozen=True)
class GateCriteria:
    """What the gate demands (from the signed manifest's health section, or config)."""

    golden_prompts: tuple[str, ...]
    min_tokens_per_second: float = 0.0
    max_rss_mb: int | None = None
    max_tokens: int = 24


@dataclass(frozen=True)
class GateReport:
    tokens_per_second: float
    rss_mb: float
    answers: tuple[str, ...]


def decode_rate(completion_tokens: int, total_ms: float, prompt_ms: float) -> float | None:
    """Generated tokens per second after the first token (None when too few tokens to tell)."""
    decode_s = (total_ms - prompt_ms) / 1000
    if completion_tokens < 2 or decode_s <= 0:
        return None
    return (completion_tokens - 1) / decode_s


def worker_rss_mb(worker: WorkerHandle) -> float:
    """Resident memory of the worker process in MiB (0 when it is gone)."""
    try:
        return psutil.Process(worker.pid).memory_info().rss / 1024 / 1024 if worker.pid else 0.0
    except psutil.Error:
        return 0.0


def _ask(
    worker: WorkerHandle, prompt: str, system_prompt: str | None, max_tokens: int, adapter: str | None
) -> tuple[str, float]:
    messages = [ChatMessage(role="user", content=prompt)]
    if system_prompt:
        messages.insert(0, ChatMessage(role="system", content=system_prompt))
    request = GenerateRequest(
        id=f"gate-{uuid.uuid4().hex[:8]}",
        messages=messages,
        max_tokens=max_tokens,
        temperature=0.0,
        adapter=adapter,
    )
    parts: list[str] = []
    for event in worker.generate(request):
        if event.type == "done":
            rate = decode_rate(event.completion_tokens, event.total_ms, event.prompt_ms)
            return "".join(parts), rate if rate is not None else 0.0
        parts.append(event.text)
    raise WorkerError("the worker ended a gate request without a result")


def run_health_gate(
    worker: WorkerHandle, criteria: GateCriteria, system_prompt: str | None, adapter: str | None = None
) -> GateReport:
    """Warm the model up, then check every golden prompt (through ``adapter`` when given); raise
    GateError naming the failed check."""
    try:
        _ask(worker, criteria.golden_prompts[0], system_prompt, 1, adapter)  # warm-up: pages in the weights
        answers, rates = [], []
        for prompt in criteria.golden_prompts:
            text, rate = _ask(worker, prompt, system_prompt, criteria.max_tokens, adapter)
            if not text.strip():
                raise GateError(Reason.HEALTH_GATE_EMPTY, f"golden prompt {prompt[:40]!r} produced no text")
            answers.append(text)
            rates.append(rate)
    except WorkerError as exc:
        raise GateError(
            Reason.HEALTH_GATE_WORKER, f"the worker failed during the health gate: {exc}"
        ) from None
    tokens_per_second = statistics.median(rates)
    if tokens_per_second < criteria.min_tokens_per_second:
        raise GateError(
            Reason.HEALTH_GATE_SLOW,
            f"{tokens_per_second:.1f} tokens/s is below the floor of {criteria.min_tokens_per_second:.1f}",
        )
    rss_mb = worker_rss_mb(worker)
    if criteria.max_rss_mb is not None and rss_mb > criteria.max_rss_mb:
        raise GateError(
            Reason.HEALTH_GATE_RSS,
            f"worker RSS {rss_mb:.0f} MiB exceeds the budget of {criteria.max_rss_mb} MiB",
        )
    log.info("health gate passed: %.1f tokens/s, %.0f MiB RSS", tokens_per_second, rss_mb)
    return GateReport(tokens_per_second, rss_mb, tuple(answers))
