"""LoRA adapter GGUFs for a base GGUF, made directly with the gguf package: random low-rank updates
of every layer's ffn_down weight, large enough to change greedy answers. llama.cpp loads them exactly
as it loads adapters from `convert_lora_to_gguf.py`; the serving tests use them where training an
adapter would cost minutes (the trainer's own export is tested in the trainer tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFReader, GGUFWriter

from shared.artifacts import sha256_file
from shared.gguf import BASE_SHA256_KEY


def write_lora(path: Path, base: Path, seed: int, rank: int = 8, scale: float = 0.05) -> Path:
    """An adapter for ``base`` at ``path``, bound to it by sha256 like an exported one."""
    reader = GGUFReader(base)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    layers = int(reader.fields[f"{arch}.block_count"].parts[-1][0])
    width = int(reader.fields[f"{arch}.embedding_length"].parts[-1][0])
    hidden = int(reader.fields[f"{arch}.feed_forward_length"].parts[-1][0])
    writer = GGUFWriter(str(path), arch)
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(rank))
    writer.add_string(BASE_SHA256_KEY, sha256_file(base)[1])
    rng = np.random.default_rng(seed)
    for layer in range(layers):
        name = f"blk.{layer}.ffn_down.weight"
        writer.add_tensor(f"{name}.lora_a", rng.normal(0, scale, (rank, hidden)).astype(np.float32))
        writer.add_tensor(f"{name}.lora_b", rng.normal(0, scale, (width, rank)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
