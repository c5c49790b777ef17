"""``immune-train eval``: judge every exported GGUF with llama-cpp-python, the runtime the Pi uses.

Perplexity over held-out conversations (rendered with the GGUF's own chat template) is compared with
the F16 export; a quant whose rise exceeds the bound is refused for publishing. Task checks generate
answers for held-out Slips incidents and score them against the reference answer."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.manifest import Quantization
from trainer.dataset.records import ChatRecord
from trainer.errors import TrainerError
from trainer.export import find_gguf
from trainer.layout import ExportLayout
from trainer.records import EvalReport, QuantScores

log = logging.getLogger(__name__)

_VERDICT = {
    "slips-risk": re.compile(r"risk\s*level\W{0,6}\s*(low|medium|high|critical)", re.IGNORECASE),
    "slips-summary": re.compile(
        r"\b(critical|high|medium|low|info|malicious|benign|normal|suspicious)\b", re.IGNORECASE
    ),
}


@dataclass
class EvalOptions:
    max_ppl_rise: float = 0.10
    ppl_records: int = 32
    ppl_ctx: int = 1024
    task_records: int = 8
    max_tokens: int = 220
    n_threads: int | None = None


def _open(path: Path, n_ctx: int, n_threads: int | None, logits_all: bool = False) -> Any:
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=n_ctx, n_threads=n_threads, logits_all=logits_all, verbose=False)


def _render(model: Any, messages: list[dict[str, str]]) -> str:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = model.metadata.get("tokenizer.chat_template")
    if not template:
        raise TrainerError("missing-chat-template", "the GGUF has no tokenizer.chat_template to render with")
    eos = model.detokenize([model.token_eos()], special=True).decode("utf-8", "replace")
    bos = model.detokenize([model.token_bos()], special=True).decode("utf-8", "replace")
    formatter = Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos, add_generation_prompt=False)
    return formatter(messages=messages).prompt


def perplexity(path: Path, records: Sequence[ChatRecord], options: EvalOptions) -> float:
    """exp(mean negative log-likelihood) of every token after the first, each record in one window."""
    import numpy as np

    model = _open(path, options.ppl_ctx, options.n_threads, logits_all=True)
    total_nll, total_tokens = 0.0, 0
    try:
        for record in records:
            text = _render(model, [m.model_dump() for m in record.messages])
            tokens = model.tokenize(text.encode("utf-8"), add_bos=True, special=True)[: options.ppl_ctx]
            if len(tokens) < 2:
                continue
            model.reset()
            model.eval(tokens)
            logits = np.asarray(model.scores[: len(tokens) - 1], dtype=np.float64)
            peak = logits.max(axis=1, keepdims=True)
            log_norm = np.log(np.exp(logits - peak).sum(axis=1)) + peak[:, 0]
            targets = np.asarray(tokens[1:])
            total_nll += float((log_norm - logits[np.arange(len(targets)), targets]).sum())
            total_tokens += len(targets)
    finally:
        model.close()
    if total_tokens == 0:
        raise TrainerError("empty-dataset", "no evaluation tokens: the held-out set is empty")
    return math.exp(total_nll / total_tokens)


def task_scores(record: ChatRecord, answer: str, rouge: Callable[[str, str], float]) -> dict[str, float]:
    """Checks of one generated answer: 1.0 pass / 0.0 fail, and ROUGE-L F1 against the reference."""
    scores = {"rouge_l": rouge(record.answer, answer), "non_empty": float(bool(answer.strip()))}
    source_ip = record.meta.get("source_ip")
    if source_ip:
        scores["names_source_ip"] = float(source_ip in answer)
    if record.task in _VERDICT:
        scores["gives_verdict"] = float(bool(_VERDICT[record.task].search(answer)))
    if record.task == "slips-summary":
        scores["one_paragraph"] = float(bool(answer.strip()) and not re.search(r"\n\s*\n", answer.strip()))
    return scores


def run_tasks(path: Path, records: Sequence[ChatRecord], options: EvalOptions) -> dict[str, float]:
    """Mean task scores over held-out records, answers generated greedily as the edge would."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)

    def rouge(reference: str, prediction: str) -> float:
        return float(scorer.score(reference, prediction)["rougeL"].fmeasure)

    model = _open(path, options.ppl_ctx * 2, options.n_threads)
    totals: dict[str, list[float]] = {}
    try:
        for record in records:
            reply = model.create_chat_completion(
                messages=record.prompt,
                max_tokens=options.max_tokens,
                temperature=0.0,  # type: ignore[arg-type]
            )
            answer = reply["choices"][0]["message"]["content"] or ""  # type: ignore[index]
            for name, value in task_scores(record, answer, rouge).items():
                totals.setdefault(name, []).append(value)
    finally:
        model.close()
    return {name: sum(values) / len(values) for name, values in totals.items()}


def evaluate(
    export_dir: Path, quants: Sequence[Quantization], records: Sequence[ChatRecord], options: EvalOptions
) -> dict[str, Any]:
    """Score F16 and each of ``quants``; write ``eval.json`` in ``export_dir`` and return it."""
    if not records:
        raise TrainerError("empty-dataset", "the held-out set is empty: nothing to evaluate on")
    ppl_set = list(records[: options.ppl_records])
    task_set = [r for r in records if r.task.startswith("slips-")][: options.task_records]
    baseline = perplexity(find_gguf(export_dir, Quantization.F16), ppl_set, options)
    results: dict[Quantization, QuantScores] = {}
    for quant in [Quantization.F16, *[q for q in quants if q is not Quantization.F16]]:
        path = find_gguf(export_dir, quant)
        ppl = baseline if quant is Quantization.F16 else perplexity(path, ppl_set, options)
        rise = ppl / baseline - 1.0
        accepted = rise <= options.max_ppl_rise
        results[quant] = QuantScores(
            file=path.name,
            perplexity=ppl,
            perplexity_rise_vs_f16=rise,
            accepted=accepted,
            tasks=run_tasks(path, task_set, options) if task_set else {},
        )
        log.info(
            "%s: perplexity %.3f (%+.2f%% vs F16)%s",
            quant.value,
            ppl,
            rise * 100,
            "" if accepted else " REFUSED",
        )
    report = EvalReport(
        baseline=Quantization.F16,
        max_ppl_rise=options.max_ppl_rise,
        records={"perplexity": len(ppl_set), "tasks": len(task_set)},
        quants=results,
    )
    report.write(ExportLayout(export_dir).eval_file)
    return report


def load_eval(export_dir: Path) -> EvalReport:
    """The evaluation report of an export folder; publishing without one is refused."""
    path = ExportLayout(export_dir).eval_file
    if not path.is_file():
        raise TrainerError("not-evaluated", f"{path}: no evaluation report (run immune-train eval first)")
    return EvalReport.read(path, "run immune-train eval first")
