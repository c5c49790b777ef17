"""Challenger vs baseline: the paired statistics, the verdicts, and the champion/challenger gate's rules
(pure functions; the trainer tests run them end to end on a real export)."""

from __future__ import annotations

import math

import pytest

from shared.manifest import Quantization
from trainer.comparison import compare_perplexity, compare_scores, paired_stderr
from trainer.dataset.records import ChatMessage, ChatRecord
from trainer.errors import TrainerError
from trainer.gate import GateSettings, apply_gate
from trainer.records import BaselineComparison, EvalReport, QuantScores
from trainer.task_checks import copied_share, no_prompt_echo, same_layout, task_scores


def test_a_consistent_gain_is_better_and_a_scattered_one_is_noise() -> None:
    baseline = [{"rouge_l": 0.20}, {"rouge_l": 0.30}, {"rouge_l": 0.25}, {"rouge_l": 0.22}]
    steady = [{"rouge_l": row["rouge_l"] + 0.05} for row in baseline]
    scattered = [{"rouge_l": v} for v in (0.60, 0.00, 0.55, 0.02)]
    gain = compare_scores(steady, baseline)["rouge_l"]
    assert gain.verdict == "better" and gain.diff == pytest.approx(0.05) and gain.stderr < 1e-9
    noise = compare_scores(scattered, baseline)["rouge_l"]
    assert noise.diff > 0 and noise.verdict == "within-noise" and noise.n == 4
    assert compare_scores(baseline, steady)["rouge_l"].verdict == "worse"


def test_paired_stderr_is_the_standard_error_of_the_differences() -> None:
    assert paired_stderr([1.0]) == 0.0
    assert paired_stderr([1.0, 3.0]) == pytest.approx(1.0)  # sd sqrt(2) over sqrt(2)


def test_lower_perplexity_is_better() -> None:
    # (summed NLL, tokens) per record: the challenger is 0.1 nat/token better on every record.
    baseline = [(200.0, 100), (330.0, 150), (90.0, 40)]
    challenger = [(nll - 0.1 * tokens, tokens) for nll, tokens in baseline]
    result = compare_perplexity(challenger, baseline)
    assert result.challenger < result.baseline and result.verdict == "better"
    assert result.challenger / result.baseline == pytest.approx(math.exp(-0.1))


def _report(challenger: float, baseline: float, metric: str = "rouge_l") -> EvalReport:
    scores = QuantScores(
        file="m.q4_k_m.gguf", perplexity=9.0, perplexity_rise_vs_f16=0.0, accepted=True, tasks={}
    )
    comparison = BaselineComparison(
        label="champion",
        file="/models/champion.gguf",
        sha256="a" * 64,
        perplexity=9.0,
        tasks={},
        quants={
            Quantization.Q4_K_M: compare_scores(
                [{metric: challenger}, {metric: challenger}], [{metric: baseline}, {metric: baseline}]
            )
        },
    )
    return EvalReport(
        baseline=Quantization.F16,
        max_ppl_rise=0.1,
        records={"perplexity": 2, "tasks": 2},
        quants={Quantization.Q4_K_M: scores},
        comparison=comparison,
    )


def test_the_gate_refuses_below_the_margin_and_records_the_comparison() -> None:
    gate = GateSettings(margins={"rouge_l": 0.02})
    with pytest.raises(
        TrainerError, match=r"q4_k_m scores below the champion .*rouge_l 0.25 vs champion 0.3"
    ) as e:
        apply_gate(_report(0.25, 0.30), Quantization.Q4_K_M, gate)
    assert e.value.reason == "champion-better"
    accepted = apply_gate(_report(0.29, 0.30), Quantization.Q4_K_M, gate)  # within the margin
    assert accepted is not None and accepted.baseline == "champion" and accepted.margins == {"rouge_l": 0.02}
    assert accepted.metrics["rouge_l"].diff == pytest.approx(-0.01)
    with pytest.raises(TrainerError, match="the gate names metrics eval did not compare: names_source_ip"):
        apply_gate(_report(0.3, 0.3), Quantization.Q4_K_M, GateSettings(margins={"names_source_ip": 0.0}))
    with pytest.raises(TrainerError, match="q8_0 was not compared"):
        apply_gate(_report(0.3, 0.3), Quantization.Q8_0, gate)


def test_the_gate_reads_perplexity_margins_as_relative() -> None:
    report = _report(10.4, 10.0, metric="perplexity")
    assert apply_gate(report, Quantization.Q4_K_M, GateSettings(margins={"perplexity": 0.05})) is not None
    with pytest.raises(TrainerError, match="perplexity 10.4 vs champion 10"):
        apply_gate(report, Quantization.Q4_K_M, GateSettings(margins={"perplexity": 0.02}))


def test_no_gate_and_no_comparison_publishes_without_one() -> None:
    report = _report(0.3, 0.3).model_copy(update={"comparison": None})
    assert apply_gate(report, Quantization.Q4_K_M, GateSettings()) is None
    with pytest.raises(TrainerError, match="no baseline comparison") as e:
        apply_gate(report, Quantization.Q4_K_M, GateSettings(margins={"rouge_l": 0.0}))
    assert e.value.reason == "no-baseline"


REFERENCE = (
    "**Source:** 10.0.0.5\n**Activity:** horizontal port scan\n\n**Detected Flows:**\n"
    "• 10.0.0.5 → 440 hosts on 443/TCP\n\n**Summary:** 10.0.0.5 is scanning the network."
)
INCIDENT = "Source IP: 10.0.0.5 | Timewindow: 3\n• 00:00 - 173 events to Horizontal port scan [HIGH]"


def _record() -> ChatRecord:
    return ChatRecord(
        id="slips-summary:x",
        group="x",
        task="slips-summary",
        source="fixture",
        meta={"source_ip": "10.0.0.5"},
        messages=[
            ChatMessage(role="user", content=INCIDENT),
            ChatMessage(role="assistant", content=REFERENCE),
        ],
    )


def test_task_checks_measure_against_the_reference_shape() -> None:
    assert same_layout(REFERENCE, REFERENCE)
    assert not same_layout(REFERENCE, "10.0.0.5 scans the network.")  # one line, no bullets
    assert not same_layout(REFERENCE, "")
    echo = INCIDENT + "\n" + INCIDENT
    assert copied_share(INCIDENT, echo) > 0.7 and not no_prompt_echo(_record(), echo)  # seams are new
    assert no_prompt_echo(_record(), REFERENCE)
    scores = task_scores(_record(), REFERENCE, True, lambda reference, answer: 1.0)
    assert scores == {
        "rouge_l": 1.0,
        "non_empty": 1.0,
        "within_budget": 1.0,
        "no_prompt_echo": 1.0,
        "same_layout": 1.0,
        "names_source_ip": 1.0,
        "gives_verdict": 0.0,  # the reference itself names no severity word
    }
    cut = task_scores(_record(), "The host", False, lambda reference, answer: 0.0)
    assert cut["within_budget"] == 0.0 and cut["names_source_ip"] == 0.0
