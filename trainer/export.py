"""``immune-train export``: merge the LoRA adapter and write GGUF files through Unsloth's exporter,
offline, then check each file's tensor types and that llama-cpp-python runs it."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from shared.artifacts import sha256_file
from shared.manifest import Quantization
from trainer.errors import TrainerError
from trainer.gguf_check import check_tensor_types, smoke_generate
from trainer.layout import RunLayout
from trainer.records import ExportedFile, ExportReport
from trainer.toolchain import Toolchain

log = logging.getLogger(__name__)


def parse_quants(spec: str) -> list[Quantization]:
    """``q4_k_m,q5_k_m,q8_0`` -> quantizations, F16 first (the evaluation baseline)."""
    quants: list[Quantization] = [Quantization.F16]
    for name in filter(None, (part.strip().lower() for part in spec.split(","))):
        try:
            quant = Quantization(name)
        except ValueError:
            known = ", ".join(q.value for q in Quantization)
            raise TrainerError("bad-quant", f"unknown quantization {name!r} (known: {known})") from None
        if quant not in quants:
            quants.append(quant)
    return quants


def export(
    run_dir: Path, quants: list[Quantization], toolchain: Toolchain, keep_merged: bool = False
) -> list[ExportedFile]:
    """Write ``<run>/gguf/<run-name>.<quant>.gguf`` for each of ``quants`` and ``export.json`` beside them."""
    layout = RunLayout(run_dir)
    adapter = layout.adapter_dir
    if not (adapter / "adapter_config.json").is_file():
        raise TrainerError("missing-adapter", f"{adapter}: no LoRA adapter (run immune-train finetune first)")
    toolchain.check()
    toolchain.activate()
    from unsloth import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=str(adapter), load_in_4bit=False, dtype=None, local_files_only=True
    )
    if not getattr(tokenizer, "chat_template", None):
        raise TrainerError("missing-chat-template", f"{adapter}: the tokenizer has no chat template")
    target = layout.export.root
    if target.exists():
        shutil.rmtree(target)
    model.save_pretrained_gguf(str(target), tokenizer, quantization_method=[q.value for q in quants])

    exported: list[ExportedFile] = []
    for quant in quants:
        produced = sorted(target.glob(f"*.{quant.value.upper()}.gguf"))
        if not produced:
            raise TrainerError("export-failed", f"Unsloth wrote no {quant.value} GGUF into {target}")
        path = produced[0].rename(layout.export.gguf(run_dir.name, quant))
        types = check_tensor_types(path, quant)
        smoke_generate(path)
        size, digest = sha256_file(path)
        exported.append(
            ExportedFile(quant=quant, file=path.name, size=size, sha256=digest, tensor_types=types)
        )
        log.info("exported %s (%d bytes, tensors %s)", path.name, size, types)
    if not keep_merged:
        shutil.rmtree(layout.export.merged_dir, ignore_errors=True)
    ExportReport(files=exported).write(layout.export.export_file)
    return exported


def find_gguf(export_dir: Path, quant: Quantization) -> Path:
    """The GGUF of ``quant`` in an export folder, or a clear error naming what is there."""
    if not export_dir.is_dir():
        raise TrainerError("missing-export", f"{export_dir}: no such export folder")
    candidates = sorted(export_dir.glob(f"*.{quant.value}.gguf"))
    if not candidates:
        present = sorted(p.name for p in export_dir.glob("*.gguf")) or ["no GGUF at all"]
        raise TrainerError(
            "missing-gguf",
            f"{export_dir}: no {quant.value} GGUF (found: {', '.join(present)}); run immune-train export",
        )
    return candidates[0]
