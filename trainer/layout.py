"""Where each stage's output lives: one run directory (``finetune``'s ``output_dir``) holding the
adapter, ``run.json`` and the export folder, which holds the GGUFs, ``export.json``, ``eval.json``,
``published.json`` and the signed manifests. Every stage finds its inputs through here."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from shared.manifest import Quantization

#: A GGUF file name's type suffix (``.Q4_1``, ``.f16``, ``.IQ4_XS``), dropped when renaming a requantization.
_QUANT_SUFFIX = re.compile(r"\.(b?f16|f32|i?q\d\w*)$", re.IGNORECASE)


@dataclass(frozen=True)
class RunLayout:
    """The files of one training run."""

    root: Path

    @property
    def adapter_dir(self) -> Path:
        """The LoRA adapter and tokenizer ``finetune`` saves."""
        return self.root / "adapter"

    @property
    def checkpoints_dir(self) -> Path:
        """Trainer checkpoints, for ``finetune --resume``."""
        return self.root / "checkpoints"

    @property
    def run_file(self) -> Path:
        """``run.json``: the RunRecord."""
        return self.root / "run.json"

    @property
    def export(self) -> ExportLayout:
        return ExportLayout(self.root / "gguf")


@dataclass(frozen=True)
class ExportLayout:
    """The export folder ``export`` writes and ``eval`` and ``publish`` read."""

    root: Path

    def gguf(self, run_name: str, quant: Quantization) -> Path:
        return self.root / f"{run_name}.{quant.value}.gguf"

    def adapter(self, run_name: str) -> Path:
        """The LoRA as a GGUF adapter for the base GGUF it was trained against."""
        return self.root / f"{run_name}.adapter.gguf"

    def device_base(self, trained_on: Path, quant: Quantization) -> Path:
        """The training base requantized to ``quant`` (``Model.Q4_1.gguf`` -> ``Model.q4_k_m.gguf``):
        the base an adapter is bound to when the devices hold another type than it was trained from."""
        model = _QUANT_SUFFIX.sub("", trained_on.stem)
        return self.root / f"{model}.{quant.value}.gguf"

    def gguf_without_imatrix(self, run_name: str, quant: Quantization) -> Path:
        """The plain k-quant kept beside the importance-matrix one, for the comparison in eval."""
        return self.root / f"{run_name}.{quant.value}.no-imatrix.gguf"

    @property
    def export_file(self) -> Path:
        """``export.json``: the ExportReport."""
        return self.root / "export.json"

    @property
    def eval_file(self) -> Path:
        """``eval.json``: the EvalReport, the publish gate."""
        return self.root / "eval.json"

    @property
    def answers_file(self) -> Path:
        """``answers.jsonl``: every answer eval generated, per file, to read what the scores summarise."""
        return self.root / "answers.jsonl"

    @property
    def published_file(self) -> Path:
        """``published.json``: what ``publish`` sent."""
        return self.root / "published.json"

    def manifest_file(self, serial: int) -> Path:
        """The signed manifest envelope ``publish`` sent for ``serial``."""
        return self.root / f"manifest-{serial}.json"

    @property
    def merged_dir(self) -> Path:
        """The merged 16-bit model Unsloth writes on the way to GGUF."""
        return self.root / "merged_16bit"
