"""``immune-train eval``: judge every exported GGUF with llama-cpp-python, the runtime the Pi uses.

Perplexity over held-out conversations (rendered with the GGUF's own chat template) is compared with
the F16 export; a quant whose rise exceeds the bound is refused for publishing. Task checks
(trainer.task_checks) generate answers for held-out Slips incidents and score them against the
reference answer. Given a baseline GGUF (the base model or the published champion), every file is
compared with it on the same incidents (trainer.comparison)."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from shared.artifacts import sha256_file
from shared.errors import ArtifactError
from shared.gguf import read_gguf_header
from shared.manifest import Quantization
from shared.reasons import Reason
from trainer.comparison import compare_perplexity, compare_scores
from trainer.dataset.records import ChatRecord
from trainer.errors import TrainerError
from trainer.export_folder import find_gguf, read_export_report
from trainer.layout import ExportLayout
from trainer.nll import llama_nll
from trainer.records import (
    AdapterScores,
    BaselineComparison,
    EvalReport,
    QuantScores,
    RequestFit,
)
from trainer.task_checks import task_scores

log = logging.getLogger(__name__)


@dataclass
class EvalOptions:
    max_ppl_rise: float = 0.10
    ppl_records: int = 32
    ppl_ctx: int = 1024
    task_records: int = 8
    max_tokens: int = 220
    n_threads: int | None = None
    #: The context task answers are generated in (default: twice ppl_ctx); a profile's fit sets it.
    task_ctx: int | None = None


#: Per answer, the prompt's real size (taken out of the scores into _Measured.prompt_tokens).
PROMPT_TOKENS = "prompt_tokens"


def _open(
    path: Path, n_ctx: int, n_threads: int | None, logits_all: bool = False, adapter: Path | None = None
) -> Any:
    from llama_cpp import Llama

    lora = str(adapter) if adapter is not None else None
    return Llama(
        model_path=str(path),
        lora_path=lora,
        n_ctx=n_ctx,
        n_threads=n_threads,
        logits_all=logits_all,
        verbose=False,
    )


def _render(model: Any, messages: list[dict[str, str]]) -> str:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = model.metadata.get("tokenizer.chat_template")
    if not template:
        raise TrainerError(
            Reason.MISSING_CHAT_TEMPLATE, "the GGUF has no tokenizer.chat_template to render with"
        )
    eos = model.detokenize([model.token_eos()], special=True).decode("utf-8", "replace")
    bos = model.detokenize([model.token_bos()], special=True).decode("utf-8", "replace")
    formatter = Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos, add_generation_prompt=False)
    return formatter(messages=messages).prompt


def record_nlls(
    path: Path, records: Sequence[ChatRecord], options: EvalOptions, adapter: Path | None = None
) -> list[tuple[float, int]]:
    """(summed NLL, token count) of each record rendered with the GGUF's own chat template (with
    ``adapter`` applied to it, when given)."""
    model = _open(path, options.ppl_ctx, options.n_threads, logits_all=True, adapter=adapter)
    results: list[tuple[float, int]] = []
    try:
        for record in records:
            text = _render(model, [m.model_dump() for m in record.messages])
            tokens = model.tokenize(text.encode("utf-8"), add_bos=True, special=True)[: options.ppl_ctx]
            if len(tokens) < 2:
                continue
            results.append((float(llama_nll(model, tokens).sum()), len(tokens) - 1))
    finally:
        model.close()
    return results


def perplexity_of(nlls: Sequence[tuple[float, int]]) -> float:
    """exp(mean NLL per token) over all records."""
    total_tokens = sum(count for _, count in nlls)
    if total_tokens == 0:
        raise TrainerError(Reason.EMPTY_DATASET, "no evaluation tokens: the held-out set is empty")
    return math.exp(sum(nll for nll, _ in nlls) / total_tokens)


def perplexity(path: Path, records: Sequence[ChatRecord], options: EvalOptions) -> float:
    """exp(mean negative log-likelihood) of every token after the first, each record in one window."""
    return perplexity_of(record_nlls(path, records, options))


def run_tasks(
    path: Path,
    records: Sequence[ChatRecord],
    options: EvalOptions,
    adapter: Path | None = None,
    answers: list[dict[str, object]] | None = None,
) -> list[dict[str, float]]:
    """Task scores of each held-out record, answers generated greedily as the edge would (each
    appended to ``answers`` when given)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)

    def rouge(reference: str, prediction: str) -> float:
        return float(scorer.score(reference, prediction)["rougeL"].fmeasure)

    model = _open(path, options.task_ctx or options.ppl_ctx * 2, options.n_threads, adapter=adapter)
    rows: list[dict[str, float]] = []
    answers = answers if answers is not None else []
    try:
        for record in records:
            reply = model.create_chat_completion(
                messages=record.prompt,  # type: ignore[arg-type]
                max_tokens=int(record.meta.get("max_tokens", options.max_tokens)),  # the client's own limit
                temperature=0.0,
            )
            choice = reply["choices"][0]  # type: ignore[index]
            answer = choice["message"]["content"] or ""
            scores = task_scores(record, answer, choice["finish_reason"] == "stop", rouge)
            scores[PROMPT_TOKENS] = float(reply["usage"]["prompt_tokens"])  # type: ignore[index]
            rows.append(scores)
            answers.append(
                {
                    "record": record.id,
                    "request": record.meta.get("request"),
                    "finish": choice["finish_reason"],
                    "answer": answer,
                }
            )
    finally:
        model.close()
    return rows


def mean_scores(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """Each metric's mean over the rows that have it."""
    names = sorted({name for row in rows for name in row})
    return {n: sum(r[n] for r in rows if n in r) / sum(1 for r in rows if n in r) for n in names}


@dataclass
class _Measured:
    """One GGUF measured on the held-out sets."""

    path: Path
    nlls: list[tuple[float, int]]
    tasks: list[dict[str, float]]
    #: The real prompt size of each task record, in the same order.
    prompt_tokens: list[int]
    #: What it answered to each task record, in the same order.
    answers: list[dict[str, object]]


def _measure(
    path: Path,
    ppl_set: Sequence[ChatRecord],
    task_set: Sequence[ChatRecord],
    options: EvalOptions,
    adapter: Path | None = None,
) -> _Measured:
    nlls = record_nlls(path, ppl_set, options, adapter)
    answers: list[dict[str, object]] = []
    tasks = run_tasks(path, task_set, options, adapter, answers) if task_set else []
    prompt_tokens = [int(row.pop(PROMPT_TOKENS)) for row in tasks]
    return _Measured(path, nlls, tasks, prompt_tokens, answers)


#: The baseline label of the fleet model's own captured answers (``eval --baseline-captured``).
CAPTURED = "captured"


def captured_answers(task_set: Sequence[ChatRecord]) -> _Measured:
    """The answers the fleet's model gave to these very requests (``prepare --from-capture`` keeps them),
    scored like generated ones against the same references; no perplexity (there is no file)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    missing = [r.id for r in task_set if not r.meta.get("captured_answer")]
    if missing:
        raise TrainerError(
            Reason.BAD_BASELINE,
            f"{len(missing)} held-out record(s) (first: {missing[0]}) hold no captured answer: "
            "--baseline-captured needs records prepared with --from-capture",
        )
    rows, answers = [], []
    for record in task_set:
        answer, finish = record.meta["captured_answer"], record.meta.get("captured_finish", "")
        scores = task_scores(
            record, answer, finish == "stop", lambda a, b: float(scorer.score(a, b)["rougeL"].fmeasure)
        )
        rows.append(scores)
        answers.append(
            {"record": record.id, "request": record.meta.get("request"), "finish": finish, "answer": answer}
        )
    return _Measured(Path(CAPTURED), [], rows, [], answers)


def check_baseline(path: Path) -> Path:
    """A baseline must be a GGUF file llama-cpp-python can run (the base model or the champion)."""
    if not path.is_file():
        raise TrainerError(Reason.BAD_BASELINE, f"{path}: no such baseline file")
    try:
        read_gguf_header(path, allowed_architectures=None)
    except ArtifactError as exc:
        raise TrainerError(
            Reason.BAD_BASELINE, f"{path}: the baseline must be a GGUF model file ({exc})"
        ) from exc
    return path


def evaluate(
    export_dir: Path,
    quants: Sequence[Quantization],
    records: Sequence[ChatRecord],
    options: EvalOptions,
    baseline: Path | None = None,
    baseline_label: str = "base",
    request_fit: RequestFit | None = None,
    baseline_captured: bool = False,
) -> EvalReport:
    """Score F16 and each of ``quants`` (and ``baseline`` when given, on the same incidents); write
    ``eval.json`` in ``export_dir`` and return it. ``request_fit`` (prepare's measure of a client
    profile's requests) sets the context answers are generated in and is reported with the
    longest held-out request seen. ``baseline_captured``: the baseline is the fleet model's own answers
    kept in the records (``prepare --from-capture``), instead of a GGUF."""
    if baseline is not None and baseline_captured:
        raise TrainerError(Reason.BAD_BASELINE, "give a baseline GGUF or --baseline-captured, not both")
    if baseline is not None:
        check_baseline(baseline)
    if not records:
        raise TrainerError(Reason.EMPTY_DATASET, "the held-out set is empty: nothing to evaluate on")
    ppl_set = list(records[: options.ppl_records])
    task_set = task_records(records, options.task_records)
    if request_fit is None and any(r.meta.get("profile") for r in task_set):
        log.info(
            "no request fit from prepare: task answers run at n_ctx %d",
            options.task_ctx or options.ppl_ctx * 2,
        )
    if request_fit is not None:
        options = replace(options, task_ctx=max(request_fit.context_needed, options.task_ctx or 0))
    exported = _exported_files(export_dir)
    order = [Quantization.F16, *[q for q in quants if q is not Quantization.F16]]
    measured = {q: _measure(find_gguf(export_dir, q), ppl_set, task_set, options) for q in order}
    f16 = perplexity_of(measured[Quantization.F16].nlls)
    results: dict[Quantization, QuantScores] = {}
    for quant, found in measured.items():
        ppl = perplexity_of(found.nlls)
        rise = ppl / f16 - 1.0
        accepted = rise <= options.max_ppl_rise
        plain = exported.get(found.path.name)
        without = perplexity(export_dir / plain, ppl_set, options) if plain else None
        results[quant] = QuantScores(
            file=found.path.name,
            perplexity=ppl,
            perplexity_rise_vs_f16=rise,
            accepted=accepted,
            tasks=mean_scores(found.tasks),
            perplexity_without_imatrix=without,
        )
        log.info(
            "%s: perplexity %.3f (%+.2f%% vs F16)%s",
            quant.value,
            ppl,
            rise * 100,
            "" if accepted else " REFUSED",
        )
    comparison = None
    base: _Measured | None = None
    if baseline_captured:
        base = captured_answers(task_set)
        label, file = CAPTURED, "the fleet model's captured answers"
        sha256 = ",".join(sorted({r.meta.get("captured_model_sha256", "") for r in task_set}))
    elif baseline is not None:
        base = _measure(baseline, ppl_set, task_set, options)
        label, file, sha256 = baseline_label, str(baseline), sha256_file(baseline)[1]
    if base is not None:
        comparison = BaselineComparison(
            label=label,
            file=file,
            sha256=sha256,
            perplexity=perplexity_of(base.nlls) if base.nlls else None,
            tasks=mean_scores(base.tasks),
            quants={
                quant: {
                    **({"perplexity": compare_perplexity(found.nlls, base.nlls)} if base.nlls else {}),
                    **compare_scores(found.tasks, base.tasks),
                }
                for quant, found in measured.items()
            },
        )
    report = EvalReport(
        baseline=Quantization.F16,
        max_ppl_rise=options.max_ppl_rise,
        records={"perplexity": len(ppl_set), "tasks": len(task_set)},
        quants=results,
        comparison=comparison,
        adapter=_score_adapter(export_dir, measured[Quantization.F16], ppl_set, task_set, options),
        requests=_request_fit(request_fit, measured[Quantization.F16], task_set),
    )
    report.write(ExportLayout(export_dir).eval_file)
    answered = [(found.path.name, found) for found in measured.values()]
    if comparison is not None and base is not None:
        answered.append((comparison.label, base))
    _write_answers(ExportLayout(export_dir).answers_file, answered)
    return report


def _write_answers(path: Path, measured: Sequence[tuple[str, _Measured]]) -> None:
    """One JSON line per generated answer: which file, which record, how it ended, the text."""
    with path.open("w") as out:
        for file, found in measured:
            for answer in found.answers:
                out.write(json.dumps({"file": file, **answer}) + "\n")


def task_records(records: Sequence[ChatRecord], count: int) -> list[ChatRecord]:
    """The held-out records answers are generated for: ``count`` Slips records; of a client profile,
    ``count`` final requests (the client's own, not practice ones) and a third as many reductions."""
    slips = [r for r in records if r.task.startswith("slips-")]
    if not any(r.meta.get("profile") for r in slips):
        return slips[:count]
    finals = [
        r for r in slips if r.meta.get("request") == "final" and not r.meta["label"].startswith("practice-")
    ]
    reductions = [r for r in slips if r.meta.get("request") == "reduction"]
    return finals[:count] + reductions[: max(1, count // 3)]


def _request_fit(fit: RequestFit | None, f16: _Measured, task_set: Sequence[ChatRecord]) -> RequestFit | None:
    """prepare's fit over every incident, or else one measured on the held-out answers of F16."""
    if fit is not None:
        return fit
    sizes = [
        (record.id, tokens, int(record.meta.get("estimated_tokens", 0)) or 1)
        for record, tokens in zip(task_set, f16.prompt_tokens, strict=True)
        if record.meta.get("profile")
    ]
    if not sizes:
        return None
    profile = task_set[0].meta["profile"]
    return RequestFit.of(profile, max(int(r.meta.get("max_tokens", 0)) for r in task_set), sizes)


def _score_adapter(
    export_dir: Path,
    f16: _Measured,
    ppl_set: Sequence[ChatRecord],
    task_set: Sequence[ChatRecord],
    options: EvalOptions,
) -> AdapterScores | None:
    """The adapter export wrote (if any) applied to its base, measured like the merged files."""
    report = read_export_report(export_dir)
    exported = report.adapter if report is not None else None
    if exported is None:
        return None
    base = Path(exported.base_path)
    if not base.is_file() or sha256_file(base)[1] != exported.base_sha256:
        raise TrainerError(
            Reason.MISSING_BASE, f"{base}: the adapter's base GGUF is gone or changed since export"
        )
    found = _measure(base, ppl_set, task_set, options, adapter=export_dir / exported.file)
    ppl = perplexity_of(found.nlls)
    log.info("adapter %s on %s: perplexity %.3f", exported.file, base.name, ppl)
    return AdapterScores(
        file=exported.file,
        base_file=base.name,
        perplexity=ppl,
        perplexity_rise_vs_f16=ppl / perplexity_of(f16.nlls) - 1.0,
        tasks=mean_scores(found.tasks),
        vs_f16={
            "perplexity": compare_perplexity(found.nlls, f16.nlls),
            **compare_scores(found.tasks, f16.tasks),
        },
    )


def _exported_files(export_dir: Path) -> dict[str, str]:
    """File name -> its plain (no importance matrix) sibling, from export.json when there is one."""
    report = read_export_report(export_dir)
    if report is None:
        return {}
    return {item.file: item.without_imatrix for item in report.files if item.without_imatrix}


def load_eval(export_dir: Path) -> EvalReport:
    """The evaluation report of an export folder; publishing without one is refused."""
    path = ExportLayout(export_dir).eval_file
    if not path.is_file():
        raise TrainerError(
            Reason.NOT_EVALUATED, f"{path}: no evaluation report (run immune-train eval first)"
        )
    return EvalReport.read(path, "run immune-train eval first")
