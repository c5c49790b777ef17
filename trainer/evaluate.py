"""``immune-train eval``: judge every exported GGUF with llama-cpp-python, the runtime the Pi uses.

Each file is measured by trainer.measure. Perplexity over held-out conversations (rendered with the
GGUF's own chat template) is compared with the F16 export; a quant whose rise exceeds the bound is
refused for publishing. Task checks (trainer.task_checks) generate answers for held-out Slips incidents
and score them against the reference answer. Given a baseline GGUF (the base model or the published
champion), every file is compared with it on the same incidents (trainer.comparison)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

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
from trainer.measure import (
    CAPTURED,
    EvalOptions,
    Measured,
    captured_answers,
    mean_scores,
    measure,
    perplexity,
    perplexity_of,
)
from trainer.records import (
    AdapterScores,
    BaselineComparison,
    EvalReport,
    QuantScores,
    RequestFit,
)

log = logging.getLogger(__name__)


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
    order = [Quantization.F16, *[q for q in quants if q is not Quantization.F16]]
    measured = {q: measure(find_gguf(export_dir, q), ppl_set, task_set, options) for q in order}
    results = _quant_scores(export_dir, measured, ppl_set, options)
    base = _baseline(baseline, baseline_captured, ppl_set, task_set, options)
    comparison = _compare(base, baseline_label, baseline, measured, task_set)
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


def _quant_scores(
    export_dir: Path, measured: dict[Quantization, Measured], ppl_set: list[ChatRecord], options: EvalOptions
) -> dict[Quantization, QuantScores]:
    """Each file's scores, accepted when its perplexity rose no more than allowed over the F16's (and,
    for an imatrix file, the plain k-quant's perplexity beside it)."""
    exported = _exported_files(export_dir)
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
    return results


def _baseline(
    baseline: Path | None,
    captured: bool,
    ppl_set: list[ChatRecord],
    task_set: list[ChatRecord],
    options: EvalOptions,
) -> Measured | None:
    """The baseline measured on the same records: the fleet's captured answers, a GGUF, or none."""
    if captured:
        return captured_answers(task_set)
    if baseline is not None:
        return measure(baseline, ppl_set, task_set, options)
    return None


def _compare(
    base: Measured | None,
    label: str,
    baseline: Path | None,
    measured: dict[Quantization, Measured],
    task_set: list[ChatRecord],
) -> BaselineComparison | None:
    """Each file against the baseline, record by record (None without a baseline)."""
    if base is None:
        return None
    if baseline is None:  # the captured answers
        label, file = CAPTURED, "the fleet model's captured answers"
        sha256 = ",".join(sorted({r.meta.get("captured_model_sha256", "") for r in task_set}))
    else:
        file, sha256 = str(baseline), sha256_file(baseline)[1]
    return BaselineComparison(
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


def _write_answers(path: Path, measured: Sequence[tuple[str, Measured]]) -> None:
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


def _request_fit(fit: RequestFit | None, f16: Measured, task_set: Sequence[ChatRecord]) -> RequestFit | None:
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
    f16: Measured,
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
    found = measure(base, ppl_set, task_set, options, adapter=export_dir / exported.file)
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
