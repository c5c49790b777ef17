"""The champion/challenger gate ``publish`` applies: the new model must not score below the baseline
``eval`` compared it with (the base model or the champion now on the channel) on the configured
metrics, each within its margin. Its comparison travels in the signed manifest's provenance."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from shared.config import ConfigModel
from shared.manifest import BaselineComparison as ManifestComparison
from shared.manifest import MetricDelta, Quantization
from shared.reasons import Reason
from trainer.comparison import LOWER_IS_BETTER, MetricComparison
from trainer.errors import TrainerError
from trainer.records import EvalReport


class GateSettings(ConfigModel):
    """``[gate]`` in publish.toml. ``margins``: metric -> how far below the baseline the challenger
    may score (absolute for task scores; relative for perplexity, e.g. 0.05 = 5 % higher allowed).
    Empty: no gate (the comparison is still recorded when eval made one)."""

    margins: dict[Annotated[str, Field(max_length=64)], Annotated[float, Field(ge=0.0)]] = {}


def falls_short(name: str, metric: MetricComparison, margin: float) -> bool:
    """True when the challenger is worse than the baseline by more than ``margin``."""
    if name in LOWER_IS_BETTER:
        return metric.challenger > metric.baseline * (1.0 + margin)
    return metric.challenger < metric.baseline - margin


def apply_gate(report: EvalReport, quant: Quantization, gate: GateSettings) -> ManifestComparison | None:
    """Refuse (TrainerError 'champion-better') a challenger that falls short on a gated metric; return
    the comparison for the manifest (None when eval compared with no baseline and no gate is set)."""
    comparison = report.comparison
    if comparison is None:
        if gate.margins:
            raise TrainerError(
                Reason.NO_BASELINE,
                "publish.toml sets a champion/challenger gate but eval.json holds no baseline comparison "
                "(run immune-train eval --baseline CHAMPION.gguf)",
            )
        return None
    metrics = comparison.quants.get(quant)
    if metrics is None:
        raise TrainerError(
            Reason.NO_BASELINE, f"{quant.value} was not compared with the baseline in eval.json"
        )
    missing = sorted(set(gate.margins) - set(metrics))
    if missing:
        raise TrainerError(
            Reason.NO_BASELINE, f"the gate names metrics eval did not compare: {', '.join(missing)}"
        )
    short = [
        f"{name} {metrics[name].challenger:.4g} vs {comparison.label} {metrics[name].baseline:.4g} "
        f"(margin {margin:g}, spread ±{metrics[name].stderr:.2g})"
        for name, margin in sorted(gate.margins.items())
        if falls_short(name, metrics[name], margin)
    ]
    if short:
        raise TrainerError(
            Reason.CHAMPION_BETTER,
            f"{quant.value} scores below the {comparison.label} ({comparison.file}): " + "; ".join(short),
        )
    return ManifestComparison(
        baseline=comparison.label,
        baseline_sha256=comparison.sha256,
        metrics={
            name: MetricDelta(
                challenger=m.challenger, baseline=m.baseline, diff=m.diff, stderr=m.stderr, verdict=m.verdict
            )
            for name, m in metrics.items()
        },
        margins=dict(gate.margins),
    )
