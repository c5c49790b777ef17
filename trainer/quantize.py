"""Quantizing the F16 export into each asked type.

Plain quantization goes through llama-cpp-python's own C API (the runtime the Pi uses, no binary).
With an importance matrix, llama.cpp's ``llama-imatrix`` first measures on the training data which
weights the activations lean on, and ``llama-quantize --imatrix`` spends its bits on those (small
models lose the most to k-quants without one); both binaries are built once by the toolchain."""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shared.manifest import Quantization
from shared.reasons import Reason
from trainer.dataset.records import ChatRecord
from trainer.errors import TrainerError
from trainer.toolchain import Toolchain

log = logging.getLogger(__name__)

#: Tokens per llama-imatrix chunk, and how many chunks of calibration text to feed it.
CHUNK_TOKENS = 512
DEFAULT_CHUNKS = 64


def quantize(source: Path, target: Path, quant: Quantization, requantize: bool = False) -> Path:
    """``source`` (F16) quantized to ``quant`` through llama-cpp-python's ``llama_model_quantize``;
    with ``requantize``, ``source`` may itself be quantized (llama.cpp refuses that by default, since
    each round of quantization adds its error)."""
    import ctypes

    import llama_cpp

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant.value.upper()}", None)
    if ftype is None:
        raise TrainerError(Reason.BAD_QUANT, f"llama-cpp-python cannot quantize to {quant.value}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = os.cpu_count() or 2
    params.allow_requantize = requantize
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if status != 0 or not target.is_file():
        raise TrainerError(
            Reason.EXPORT_FAILED, f"quantizing {source.name} to {quant.value} failed ({status})"
        )
    return target


def takes_imatrix(quant: Quantization) -> bool:
    """K-quants (q4_k_m, q5_k_m ...) are the types an importance matrix improves."""
    return "_k" in quant.value


def calibration_text(records: Sequence[ChatRecord], tokenizer: Any, max_chars: int) -> str:
    """Training conversations rendered with the model's chat template, up to ``max_chars``."""
    parts: list[str] = []
    size = 0
    for record in records:
        text = tokenizer.apply_chat_template([m.model_dump() for m in record.messages], tokenize=False)
        parts.append(text)
        size += len(text)
        if size >= max_chars:
            break
    if not parts:
        raise TrainerError(Reason.EMPTY_DATASET, "no training records to compute an importance matrix from")
    return "\n".join(parts)[:max_chars]


def _run(command: list[str], what: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise TrainerError(Reason.IMATRIX_FAILED, f"{what} failed: {result.stderr.strip()[-400:]}")


def compute_imatrix(
    toolchain: Toolchain, model: Path, calibration: Path, output: Path, chunks: int = DEFAULT_CHUNKS
) -> Path:
    """Run ``llama-imatrix`` on ``model`` (the F16 export) over ``calibration``; returns ``output``."""
    toolchain.build_native()
    threads = str(os.cpu_count() or 2)
    _run(
        [
            str(toolchain.native("llama-imatrix")),
            "-m",
            str(model),
            "-f",
            str(calibration),
            "-o",
            str(output),
            "--chunks",
            str(chunks),
            "-c",
            str(CHUNK_TOKENS),
            "-t",
            threads,
        ],
        "llama-imatrix",
    )
    if not output.is_file():
        raise TrainerError(Reason.IMATRIX_FAILED, f"llama-imatrix wrote no {output.name}")
    log.info("importance matrix %s from %s", output.name, calibration.name)
    return output


def quantize_with_imatrix(
    toolchain: Toolchain, source: Path, imatrix: Path, target: Path, quant: Quantization
) -> Path:
    """``llama-quantize --imatrix`` ``source`` (F16) into ``target`` of type ``quant``."""
    toolchain.build_native()
    _run(
        [
            str(toolchain.native("llama-quantize")),
            "--imatrix",
            str(imatrix),
            str(source),
            str(target),
            quant.value.upper(),
            str(os.cpu_count() or 2),
        ],
        f"llama-quantize {quant.value} with an importance matrix",
    )
    return target
