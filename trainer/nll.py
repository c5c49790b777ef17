"""Negative log-likelihood maths, shared by eval's perplexity and the base model's conversion check."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def token_nll(logits: Any, targets: Sequence[int]) -> Any:
    """Negative log-likelihood of each target token under its row of ``logits`` (numpy, float64)."""
    import numpy as np

    rows = np.asarray(logits, dtype=np.float64)
    peak = rows.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(rows - peak).sum(axis=1)) + peak[:, 0]
    picked = np.asarray(targets)
    return log_norm - rows[np.arange(len(picked)), picked]


def llama_nll(model: Any, tokens: Sequence[int]) -> Any:
    """Per-token NLL of ``tokens[1:]`` under a llama-cpp-python model opened with ``logits_all``."""
    model.reset()
    model.eval(tokens)
    return token_nll(model.scores[: len(tokens) - 1], tokens[1:])
