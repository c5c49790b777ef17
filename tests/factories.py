"""Builders for valid contract objects that tests then break on purpose."""

from __future__ import annotations

import hashlib
import struct
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


def gguf_bytes(
    version: int = 3,
    tensors: int = 1,
    kvs: list[tuple[str, int, bytes]] | None = None,
    architecture: str = "llama",
    padding: int = 0,
) -> bytes:
    """A GGUF header (by default a valid one naming ``architecture``) followed by ``padding`` bytes."""

    def string(value: str) -> bytes:
        return struct.pack("<Q", len(value)) + value.encode()

    items = kvs if kvs is not None else [("general.architecture", 8, string(architecture))]
    body = b"".join(string(key) + struct.pack("<I", kind) + value for key, kind, value in items)
    return b"GGUF" + struct.pack("<IQQ", version, tensors, len(items)) + body + b"\0" * padding
