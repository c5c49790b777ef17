"""Device targets: the Pi 5 cost model on the tensor types files really hold, and ``publish --target``'s
choice: the fastest evaluated candidate that passes the quality checks, with the faster ones refused and why.
The files are the real SmolLM2-135M requantized by llama.cpp (its width of 576 sends K-quants' rows to
Q5_0/Q5_1, which the Pi does not repack)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.manifest import Quantization, TargetChoice
from trainer.errors import TrainerError
from trainer.gate import GateSettings
from trainer.layout import ExportLayout
from trainer.publish import choose_for_target
from trainer.quantize import quantize
from trainer.records import EvalReport, QuantScores
from trainer.targets import PI5, get_target, rank_for_target, target_cost, tensor_elements

QUANTS = (Quantization.Q4_0, Quantization.Q4_K_M, Quantization.Q8_0)


def test_the_cost_model_prefers_repacked_weights_then_fewer_bytes() -> None:
    all_q4_0 = target_cost({"Q4_0": 900, "F32": 100}, PI5)
    mostly_q5_0 = target_cost({"Q4_K": 300, "Q5_0": 600, "F32": 100}, PI5)
    all_q8_0 = target_cost({"Q8_0": 900, "F32": 100}, PI5)
    assert all_q4_0.repacked == 0.9 and mostly_q5_0.repacked == 0.3
    assert all_q4_0.prompt == all_q8_0.prompt < mostly_q5_0.prompt
    assert all_q4_0.decode < all_q8_0.decode
    costs = {Quantization.Q8_0: all_q8_0, Quantization.Q4_K_M: mostly_q5_0, Quantization.Q4_0: all_q4_0}
    assert rank_for_target(costs) == [Quantization.Q4_0, Quantization.Q8_0, Quantization.Q4_K_M]
    with pytest.raises(TrainerError, match="unknown device target 'pi4'"):
        get_target("pi4")


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_model: Path) -> Path:
    folder = tmp_path_factory.mktemp("export")
    for quant in QUANTS:
        quantize(smollm2_model, folder / f"smollm2.{quant.value}.gguf", quant, requantize=True)
    return folder


def _eval(folder: Path, refused: set[Quantization]) -> EvalReport:
    scores = {
        quant: QuantScores(
            file=f"smollm2.{quant.value}.gguf",
            perplexity=12.0 + (quant in refused),
            perplexity_rise_vs_f16=0.30 if quant in refused else 0.02,
            accepted=quant not in refused,
            tasks={},
        )
        for quant in QUANTS
    }
    report = EvalReport(baseline=Quantization.F16, max_ppl_rise=0.1, records={"ppl": 4}, quants=scores)
    report.write(ExportLayout(folder).eval_file)
    return report


def test_the_real_files_hold_what_the_target_cares_about(export_dir: Path) -> None:
    k_quant = tensor_elements(export_dir / "smollm2.q4_k_m.gguf")
    assert "Q5_0" in k_quant or "Q5_1" in k_quant, k_quant  # rows of 576 cannot take Q4_K
    q4_0 = target_cost(tensor_elements(export_dir / "smollm2.q4_0.gguf"), PI5)
    assert q4_0.prompt < target_cost(k_quant, PI5).prompt


def test_publish_target_picks_the_fastest_candidate_that_passes(export_dir: Path) -> None:
    quant, choice = choose_for_target(_eval(export_dir, set()), export_dir, PI5, GateSettings())
    assert quant is Quantization.Q4_0 and choice.ranked[0] is Quantization.Q4_0 and choice.refused == []
    # The record travels in the signed manifest: it must be a valid contract.
    assert TargetChoice.model_validate_json(choice.model_dump_json()) == choice

    quant, choice = choose_for_target(_eval(export_dir, {Quantization.Q4_0}), export_dir, PI5, GateSettings())
    assert quant is choice.chosen is choice.ranked[1]
    assert len(choice.refused) == 1 and choice.refused[0].startswith("q4_0: ")
    assert "perplexity rise +30.0% vs F16 exceeds the bound 10.0%" in choice.refused[0]

    with pytest.raises(TrainerError, match="no pi5 candidate may be published"):
        choose_for_target(_eval(export_dir, set(QUANTS)), export_dir, PI5, GateSettings())


def test_publish_target_with_no_candidate_evaluated_says_how_to_get_one(tmp_path: Path) -> None:
    report = EvalReport(baseline=Quantization.F16, max_ppl_rise=0.1, records={}, quants={})
    with pytest.raises(TrainerError, match="export --target pi5, then eval --target pi5"):
        choose_for_target(report, tmp_path, PI5, GateSettings())
