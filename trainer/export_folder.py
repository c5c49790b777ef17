"""Reading an export folder: its ``export.json`` (read here and nowhere else) and the GGUF of a
quantization in it."""

from __future__ import annotations

from pathlib import Path

from shared.manifest import Quantization
from shared.reasons import Reason
from trainer.errors import TrainerError
from trainer.layout import ExportLayout
from trainer.records import ExportReport


def read_export_report(export_dir: Path) -> ExportReport | None:
    """The folder's ``export.json``, or None when it has none (GGUFs made elsewhere)."""
    path = ExportLayout(export_dir).export_file
    return ExportReport.read(path, "run immune-train export") if path.is_file() else None


def find_gguf(export_dir: Path, quant: Quantization) -> Path:
    """The GGUF of ``quant`` in an export folder, or a clear error naming what is there. The file
    export.json records when there is one: other GGUFs of that type may lie beside it (the base
    ``--adapter-base`` requantized), so a file name pattern alone cannot tell."""
    if not export_dir.is_dir():
        raise TrainerError(Reason.MISSING_EXPORT, f"{export_dir}: no such export folder")
    report = read_export_report(export_dir)
    if report is not None:
        recorded = next((item.file for item in report.files if item.quant is quant), None)
        if recorded is None:
            present = ", ".join(item.quant.value for item in report.files)
            raise TrainerError(
                Reason.MISSING_GGUF,
                f"{ExportLayout(export_dir).export_file}: export.json records no {quant.value} GGUF "
                f"(it has {present})",
            )
        return export_dir / recorded
    candidates = sorted(export_dir.glob(f"*.{quant.value}.gguf"))
    if not candidates:
        present = sorted(p.name for p in export_dir.glob("*.gguf")) or ["no GGUF at all"]
        raise TrainerError(
            Reason.MISSING_GGUF,
            f"{export_dir}: no {quant.value} GGUF (found: {', '.join(present)}); run immune-train export",
        )
    return candidates[0]
