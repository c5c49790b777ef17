"""Builders for valid contract objects that tests then break on purpose."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

from shared.manifest import Manifest

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


def manifest_dict(data: bytes = b"GGUF-test-bytes", **overrides: Any) -> dict[str, Any]:
    """A valid manifest as plain JSON-able data."""
    base: dict[str, Any] = {
        "name": "slips-summary-smol",
        "channel": "stable",
        "serial": 7,
        "version": "2026.11.24",
        "created_at": NOW.isoformat(),
        "expires_at": (NOW + timedelta(days=30)).isoformat(),
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "task": "slips-summary",
        "quantization": "q4_k_m",
        "files": [
            {
                "name": "model.gguf",
                "role": "model",
                "media_type": "application/x-gguf",
                "size": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "urls": ["http://127.0.0.1:8080/model.gguf"],
            }
        ],
        "runtime": {"chat_format": "chatml", "n_ctx": 4096, "stop": ["<|im_end|>"]},
        "provenance": {"eval": {"q4_k_m": {"perplexity": 12.5}}},
    }
    base.update(overrides)
    return base


def manifest(**overrides: Any) -> Manifest:
    return Manifest.model_validate(manifest_dict(**overrides), strict=False)
