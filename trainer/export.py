"""``immune-train export``: merge the LoRA adapter into an F16 GGUF through Unsloth's exporter,
offline; give it the base's own tokenizer as llama.cpp reads it (trainer.gguf_metadata); refuse it
unless it tokenizes exactly like the base; quantize it into each asked type (k-quants optionally
with an importance matrix, trainer.quantize); check each file's tensor types and that
llama-cpp-python runs it."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from shared.artifacts import sha256_file
from shared.manifest import Quantization
from shared.reasons import Reason
from trainer.adapter_export import export_adapter
from trainer.base_model import is_gguf, load_tokenizer
from trainer.dataset.records import ChatRecord, read_records
from trainer.errors import TrainerError
from trainer.gguf_check import check_tensor_types, smoke_generate
from trainer.gguf_metadata import transplant_tokenizer
from trainer.layout import RunLayout
from trainer.quantize import (
    CHUNK_TOKENS,
    DEFAULT_CHUNKS,
    calibration_text,
    compute_imatrix,
    quantize,
    quantize_with_imatrix,
    takes_imatrix,
)
from trainer.records import ExportedFile, ExportReport, RunRecord
from trainer.tokenizer_fidelity import Reference, check_fidelity, gguf_reference, hf_reference
from trainer.toolchain import Toolchain

log = logging.getLogger(__name__)

#: How many real training conversations the tokenizer-fidelity check compares (besides its probes).
FIDELITY_SAMPLES = 32


def parse_quants(spec: str) -> list[Quantization]:
    """``q4_k_m,q5_k_m,q8_0`` -> quantizations, F16 first (the evaluation baseline)."""
    quants: list[Quantization] = [Quantization.F16]
    for name in filter(None, (part.strip().lower() for part in spec.split(","))):
        quant = parse_quant(name)
        if quant not in quants:
            quants.append(quant)
    return quants


def parse_quant(name: str) -> Quantization:
    """One quantization by name, or an error that lists the known ones."""
    try:
        return Quantization(name.strip().lower())
    except ValueError:
        known = ", ".join(q.value for q in Quantization)
        raise TrainerError(Reason.BAD_QUANT, f"unknown quantization {name!r} (known: {known})") from None


def export(
    run_dir: Path,
    quants: list[Quantization],
    toolchain: Toolchain,
    keep_merged: bool = False,
    imatrix: bool = False,
    imatrix_chunks: int = DEFAULT_CHUNKS,
    adapter_gguf: bool = False,
    adapter_base: Quantization | None = None,
) -> ExportReport:
    """Write ``<run>/gguf/<run-name>.<quant>.gguf`` for each of ``quants`` and ``export.json`` beside
    them. Every file must tokenize like the base model. With ``imatrix``, k-quants are made with an
    importance matrix from the training data; the plain k-quant is kept beside for comparison. With
    ``adapter_gguf``, the LoRA is also written alone for its base GGUF, or for that base requantized
    to ``adapter_base`` (trainer.adapter_export)."""
    if adapter_base is not None and not adapter_gguf:
        raise TrainerError(Reason.BAD_OPTION, "--adapter-base chooses the base of the adapter: add --adapter")
    layout = RunLayout(run_dir)
    adapter = layout.adapter_dir
    if not (adapter / "adapter_config.json").is_file():
        raise TrainerError(
            Reason.MISSING_ADAPTER, f"{adapter}: no LoRA adapter (run immune-train finetune first)"
        )
    run = RunRecord.read(layout.run_file, "run immune-train finetune first")
    toolchain.check()
    toolchain.activate()
    target = layout.export.root
    f16, tokenizer = _merged_f16(layout, target)
    spec = str(run.config["base_model"])
    transplant_tokenizer(base_vocabulary(spec, toolchain, target), f16)

    records = training_records(run)
    samples = [
        tokenizer.apply_chat_template([m.model_dump() for m in r.messages], tokenize=False)
        for r in records[:FIDELITY_SAMPLES]
    ]
    reference = base_tokenizer_reference(spec)
    try:
        fidelity = check_fidelity(f16, reference, samples)
    finally:
        reference.close()

    matrix: Path | None = None
    if imatrix and any(takes_imatrix(q) for q in quants):
        calibration = target / "calibration.txt"
        calibration.write_text(calibration_text(records, tokenizer, imatrix_chunks * CHUNK_TOKENS * 4))
        matrix = compute_imatrix(toolchain, f16, calibration, target / "imatrix.gguf", imatrix_chunks)
    exported = [_export_one(layout, quant, f16, toolchain, matrix) for quant in quants]
    if not keep_merged:
        shutil.rmtree(layout.export.merged_dir, ignore_errors=True)
    lora = export_adapter(run_dir, toolchain, adapter_base) if adapter_gguf else None
    report = ExportReport(files=exported, tokenizer=fidelity, adapter=lora)
    report.write(layout.export.export_file)
    return report


def _merged_f16(layout: RunLayout, target: Path) -> tuple[Path, Any]:
    """The adapter merged into its base and written as the run's F16 GGUF in ``target`` (emptied
    first), and the run's tokenizer."""
    from unsloth import FastLanguageModel

    adapter = layout.adapter_dir
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=str(adapter), load_in_4bit=False, dtype=None, local_files_only=True
    )
    if not getattr(tokenizer, "chat_template", None):
        raise TrainerError(Reason.MISSING_CHAT_TEMPLATE, f"{adapter}: the tokenizer has no chat template")
    if target.exists():
        shutil.rmtree(target)
    # Unsloth merges and converts to F16; every other type is quantized from that F16 here, after
    # its tokenizer is settled, so all files share it.
    model.save_pretrained_gguf(str(target), tokenizer, quantization_method=[Quantization.F16.value])
    written = sorted(target.glob("*.F16.gguf"))
    if not written:
        raise TrainerError(Reason.EXPORT_FAILED, f"Unsloth wrote no F16 GGUF into {target}")
    return written[0].rename(layout.export.gguf(layout.root.name, Quantization.F16)), tokenizer


def _export_one(
    layout: RunLayout, quant: Quantization, f16: Path, toolchain: Toolchain, matrix: Path | None
) -> ExportedFile:
    """``quant`` made from the F16 and checked (with ``matrix``, weighted by it, the plain k-quant
    kept beside and checked too)."""
    name = layout.root.name
    path, plain = f16, None
    if quant is not Quantization.F16:
        path = quantize(f16, layout.export.gguf(name, quant), quant)
        if matrix is not None and takes_imatrix(quant):
            plain_path = path.rename(layout.export.gguf_without_imatrix(name, quant))
            quantize_with_imatrix(toolchain, f16, matrix, path, quant)
            _check_file(plain_path, quant, f16)
            plain = plain_path.name
    types = _check_file(path, quant, f16)
    size, digest = sha256_file(path)
    log.info("exported %s (%d bytes, tensors %s)", path.name, size, types)
    return ExportedFile(
        quant=quant,
        file=path.name,
        size=size,
        sha256=digest,
        tensor_types=types,
        imatrix_sha256=sha256_file(matrix)[1] if matrix is not None and plain else None,
        without_imatrix=plain,
    )


def _check_file(path: Path, quant: Quantization, reference: Path) -> dict[str, int]:
    """Tensor types as asked, llama-cpp-python runs it, and the same tokenizer as ``reference``."""
    types = check_tensor_types(path, quant)
    smoke_generate(path)
    if reference != path:
        same = gguf_reference(reference)
        try:
            check_fidelity(path, same, [])
        finally:
            same.close()
    return types


def training_records(run: RunRecord) -> list[ChatRecord]:
    """The run's training records (the real prompts the fidelity check and the imatrix use)."""
    train_file = Path(str(run.config["train_file"]))
    return list(read_records(train_file))


def base_vocabulary(spec: str, toolchain: Toolchain, directory: Path) -> Path:
    """A GGUF holding the base's tokenizer as llama.cpp reads it: the base GGUF itself, or the base
    folder converted with ``--vocab-only`` (from its own tokenizer files, which the merged model
    Unsloth writes may lack: without ``tokenizer.model`` a SentencePiece vocabulary comes back with
    placeholder scores and merges differently)."""
    if is_gguf(spec):
        return Path(spec)
    folder = Path(spec)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(repo_id=spec, local_files_only=True))
    target = directory / "base-vocab.gguf"
    result = toolchain.run_script(
        "convert_hf_to_gguf.py", str(folder), "--vocab-only", "--outfile", str(target)
    )
    if result.returncode != 0 or not target.is_file():
        raise TrainerError(
            Reason.EXPORT_FAILED, f"cannot read the base tokenizer of {spec}: {result.stderr.strip()[-300:]}"
        )
    return target


def base_tokenizer_reference(spec: str) -> Reference:
    """The tokenizer an export must match: the base GGUF's, or the base folder's own."""
    if is_gguf(spec):
        return gguf_reference(Path(spec))
    return hf_reference(load_tokenizer(spec), spec)
