"""Checks on an exported GGUF: which tensor types it really holds, and that the Pi's runtime
(llama-cpp-python) loads it and generates."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from shared.manifest import Quantization
from shared.reasons import Reason
from trainer.errors import TrainerError

# The tensor type most weights must have for each file type (K-quants mix in a few higher ones).
MAIN_TENSOR_TYPE: dict[Quantization, str] = {
    Quantization.F16: "F16",
    Quantization.BF16: "BF16",
    Quantization.Q8_0: "Q8_0",
    Quantization.Q6_K: "Q6_K",
    Quantization.Q5_K_M: "Q5_K",
    Quantization.Q5_K_S: "Q5_K",
    Quantization.Q5_0: "Q5_0",
    Quantization.Q5_1: "Q5_1",
    Quantization.Q4_K_M: "Q4_K",
    Quantization.Q4_K_S: "Q4_K",
    Quantization.Q4_0: "Q4_0",
    Quantization.Q4_1: "Q4_1",
    Quantization.Q3_K_M: "Q3_K",
}


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each type ``path`` holds (read with the ``gguf`` package)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return dict(Counter(tensor.tensor_type.name for tensor in reader.tensors))


def _quantizable_types(path: Path, block: int) -> dict[str, int]:
    """Types of the weight tensors whose rows a ``block``-wide quant can take (row length divisible)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return dict(
        Counter(
            tensor.tensor_type.name
            for tensor in reader.tensors
            if tensor.tensor_type.name != "F32" and int(tensor.shape[0]) % block == 0
        )
    )


def chat_template_of(path: Path) -> str | None:
    """The ``tokenizer.chat_template`` stored in a GGUF, if any."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get("tokenizer.chat_template")
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def check_tensor_types(path: Path, quant: Quantization) -> dict[str, int]:
    """Refuse a file whose weights are not mostly of ``quant``'s type. llama.cpp quantizes a tensor
    whose rows a K-quant cannot take (row length not a multiple of 256) to another type; that is
    expected for such shapes (SmolLM2's width of 576), so only tensors that could take the type are
    judged: if most of those are of another type, the quantization silently went wrong."""
    types = tensor_types(path)
    expected = MAIN_TENSOR_TYPE.get(quant)
    if not expected:
        return types
    block = 256 if expected.endswith("_K") else 32
    weights = _quantizable_types(path, block)
    if not weights or max(weights, key=weights.__getitem__) != expected:
        raise TrainerError(
            Reason.WRONG_QUANT, f"{path.name}: expected mostly {expected} tensors, found {types}"
        )
    return types


def smoke_generate(path: Path, prompt: str = "Source IP", max_tokens: int = 8) -> str:
    """Load ``path`` with llama-cpp-python and generate a few tokens; raise when it cannot."""
    from llama_cpp import Llama

    try:
        model = Llama(model_path=str(path), n_ctx=256, n_threads=1, verbose=False)
        result = model.create_completion(prompt, max_tokens=max_tokens, temperature=0.0)
    except (ValueError, RuntimeError) as exc:
        raise TrainerError(
            Reason.LOAD_FAILED, f"{path.name}: llama-cpp-python cannot run it ({exc})"
        ) from exc
    finally:
        if "model" in locals():
            model.close()
    return str(result["choices"][0]["text"])
