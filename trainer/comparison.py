"""Challenger against baseline over the same held-out incidents: per metric the two scores, their
difference and the spread of the per-incident differences, so a gap within noise is called so."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict

#: A difference within this many standard errors of the paired differences is noise (about 95 %).
NOISE_Z = 2.0
#: Metrics where a lower score is the better one.
LOWER_IS_BETTER = frozenset({"perplexity"})

Verdict = Literal["better", "worse", "within-noise"]


class MetricComparison(BaseModel):
    """One metric, challenger vs baseline."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    challenger: float
    baseline: float
    #: challenger - baseline.
    diff: float
    #: Standard error of ``diff`` from the paired per-incident differences.
    stderr: float
    n: int
    verdict: Verdict


def _verdict(diff: float, stderr: float, lower_is_better: bool) -> Verdict:
    if abs(diff) <= NOISE_Z * stderr or diff == 0:
        return "within-noise"
    improved = diff < 0 if lower_is_better else diff > 0
    return "better" if improved else "worse"


def paired_stderr(differences: Sequence[float]) -> float:
    """Standard error of the mean of paired differences (0 for fewer than two)."""
    n = len(differences)
    if n < 2:
        return 0.0
    mean = sum(differences) / n
    variance = sum((d - mean) ** 2 for d in differences) / (n - 1)
    return math.sqrt(variance / n)


def compare_scores(
    challenger: Sequence[Mapping[str, float]], baseline: Sequence[Mapping[str, float]]
) -> dict[str, MetricComparison]:
    """Per-incident task scores (same incidents, same order) compared metric by metric."""
    if len(challenger) != len(baseline):
        raise ValueError("challenger and baseline were scored on different incidents")
    names = sorted({name for row in challenger for name in row} & {name for row in baseline for name in row})
    result: dict[str, MetricComparison] = {}
    for name in names:
        pairs = [
            (c[name], b[name]) for c, b in zip(challenger, baseline, strict=True) if name in c and name in b
        ]
        mean_c = sum(c for c, _ in pairs) / len(pairs)
        mean_b = sum(b for _, b in pairs) / len(pairs)
        stderr = paired_stderr([c - b for c, b in pairs])
        result[name] = MetricComparison(
            challenger=mean_c,
            baseline=mean_b,
            diff=mean_c - mean_b,
            stderr=stderr,
            n=len(pairs),
            verdict=_verdict(mean_c - mean_b, stderr, name in LOWER_IS_BETTER),
        )
    return result


def compare_perplexity(
    challenger: Sequence[tuple[float, int]], baseline: Sequence[tuple[float, int]]
) -> MetricComparison:
    """Token-weighted perplexities of the same records; the spread comes from the per-record
    differences of mean NLL per token (a relative change), scaled to the baseline's perplexity."""
    if len(challenger) != len(baseline) or not challenger:
        raise ValueError("challenger and baseline perplexity were measured on different records")

    def ppl(rows: Sequence[tuple[float, int]]) -> float:
        return math.exp(sum(n for n, _ in rows) / sum(t for _, t in rows))

    ppl_c, ppl_b = ppl(challenger), ppl(baseline)
    deltas = [c / tc - b / tb for (c, tc), (b, tb) in zip(challenger, baseline, strict=True)]
    stderr = ppl_b * paired_stderr(deltas)
    return MetricComparison(
        challenger=ppl_c,
        baseline=ppl_b,
        diff=ppl_c - ppl_b,
        stderr=stderr,
        n=len(deltas),
        verdict=_verdict(ppl_c - ppl_b, stderr, lower_is_better=True),
    )
