"""A bounded GGUF header reader, run before any file is handed to llama.cpp, and by the tools that
describe a GGUF in a manifest.

llama.cpp's own loader trusts the header; this check refuses files whose header is not GGUF,
has an unsupported version, absurd tensor/metadata counts, or an architecture the device does not
allow. Besides the architecture it keeps the few numbers a manifest needs (file type, layer and
head counts for the KV cache), with hard caps on every length, so a hostile header cannot make it
allocate or loop without bound.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from shared.errors import ArtifactError
from shared.reasons import Reason

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_TENSORS = 100_000
MAX_KV = 10_000
MAX_STRING = 1 << 20
#: Architectures llama-cpp-python 0.3.x runs that fit a Raspberry Pi; configurable per device.
DEFAULT_ARCHITECTURES = frozenset({"llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "smollm3"})

# GGUF metadata value types -> fixed size in bytes (strings and arrays are variable).
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_UNSIGNED = {0: "<B", 2: "<H", 4: "<I", 10: "<Q"}
_SIGNED = {1: "<b", 3: "<h", 5: "<i", 11: "<q"}
_STRING, _ARRAY = 8, 9

#: llama.cpp's ``general.file_type`` values (enum llama_ftype) for the quantisations a manifest names.
FILE_TYPES = {
    1: "f16",
    2: "q4_0",
    3: "q4_1",
    7: "q8_0",
    8: "q5_0",
    9: "q5_1",
    10: "q2_k",
    12: "q3_k_m",
    14: "q4_k_s",
    15: "q4_k_m",
    16: "q5_k_s",
    17: "q5_k_m",
    18: "q6_k",
    32: "bf16",
}
#: The GGUF key where ``immune-train export --adapter`` records the sha256 of the adapter's base.
BASE_SHA256_KEY = "immune_edge.base_sha256"
#: String keys kept besides the architecture.
_STRING_KEYS = ("general.type", "adapter.type", BASE_SHA256_KEY)
#: Per-architecture integers kept for the KV cache estimate (``{arch}.<suffix>``).
_SHAPE_KEYS = (
    "block_count",
    "embedding_length",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.key_length",
    "attention.value_length",
)


@dataclass(frozen=True)
class GgufHeader:
    version: int
    tensor_count: int
    kv_count: int
    architecture: str
    #: ``general.file_type`` (llama_ftype), None when the file does not say.
    file_type: int | None = None
    #: The integers of ``_SHAPE_KEYS`` the file declares, by suffix.
    shape: dict[str, int] = field(default_factory=dict)
    #: ``general.type``: "model", or "adapter" for a LoRA adapter (files that do not say are models).
    kind: str = "model"
    #: ``adapter.type`` of an adapter ("lora").
    adapter_type: str | None = None
    #: sha256 of the base GGUF an adapter was exported against (``immune_edge.base_sha256``).
    base_sha256: str | None = None

    @property
    def quantization(self) -> str | None:
        """The file type as a manifest names it (``q4_1``...), None when unknown or unnamed."""
        return FILE_TYPES.get(self.file_type) if self.file_type is not None else None

    def kv_cache_bytes(self, n_ctx: int) -> int | None:
        """An f16 K and V cache for ``n_ctx`` tokens (llama.cpp's default cache type), or None when
        the header lacks the layer or head counts."""
        layers, width = self.shape.get("block_count"), self.shape.get("embedding_length")
        heads = self.shape.get("attention.head_count")
        if not layers or not width or not heads:
            return None
        kv_heads = self.shape.get("attention.head_count_kv") or heads
        key = self.shape.get("attention.key_length") or width // heads
        value = self.shape.get("attention.value_length") or key
        return n_ctx * layers * kv_heads * (key + value) * 2


def _reject(path: Path, problem: str) -> ArtifactError:
    return ArtifactError(Reason.BAD_GGUF, f"{path.name}: not an acceptable GGUF file: {problem}")


class _Reader:
    def __init__(self, handle: BinaryIO, path: Path) -> None:
        self.handle = handle
        self.path = path

    def take(self, size: int) -> bytes:
        data = self.handle.read(size)
        if len(data) != size:
            raise _reject(self.path, "header is truncated")
        return data

    def u32(self) -> int:
        return int(struct.unpack("<I", self.take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack("<Q", self.take(8))[0])

    def integer(self, value_type: int) -> int:
        if value_type in _UNSIGNED:
            return int(struct.unpack(_UNSIGNED[value_type], self.take(_FIXED[value_type]))[0])
        return int(struct.unpack(_SIGNED[value_type], self.take(_FIXED[value_type]))[0])

    def string(self) -> str:
        length = self.u64()
        if length > MAX_STRING:
            raise _reject(self.path, f"metadata string of {length} bytes exceeds {MAX_STRING}")
        try:
            return self.take(length).decode("utf-8")
        except UnicodeDecodeError:
            raise _reject(self.path, "metadata string is not UTF-8") from None

    def skip_value(self, value_type: int) -> None:
        if value_type in _FIXED:
            self.take(_FIXED[value_type])
        elif value_type == _STRING:
            self.string()
        elif value_type == _ARRAY:
            item_type, count = self.u32(), self.u64()
            if item_type in _FIXED:
                self.handle.seek(_FIXED[item_type] * count, 1)
            elif item_type == _STRING:
                for _ in range(count):
                    self.string()
            else:
                raise _reject(self.path, f"unsupported array item type {item_type}")
        else:
            raise _reject(self.path, f"unknown metadata value type {value_type}")


def read_gguf_header(
    path: Path, allowed_architectures: Collection[str] | None = DEFAULT_ARCHITECTURES
) -> GgufHeader:
    """Parse and check the header; raise ArtifactError ('bad-gguf') naming the problem.
    ``allowed_architectures`` None accepts any (describing a file is not admitting it)."""
    with path.open("rb") as handle:
        reader = _Reader(handle, path)
        if reader.take(4) != MAGIC:
            raise _reject(path, "magic bytes are not 'GGUF'")
        version = reader.u32()
        if version not in SUPPORTED_VERSIONS:
            raise _reject(path, f"version {version} is not supported (expected one of {SUPPORTED_VERSIONS})")
        tensors, kv_count = reader.u64(), reader.u64()
        if not 0 < tensors <= MAX_TENSORS:
            raise _reject(path, f"tensor count {tensors} is outside 1..{MAX_TENSORS}")
        if not 0 < kv_count <= MAX_KV:
            raise _reject(path, f"metadata count {kv_count} is outside 1..{MAX_KV}")
        architecture: str | None = None
        integers: dict[str, int] = {}
        strings: dict[str, str] = {}
        for _ in range(kv_count):
            key, value_type = reader.string(), reader.u32()
            if key == "general.architecture":
                if value_type != _STRING:
                    raise _reject(path, "general.architecture is not a string")
                architecture = reader.string()
                if allowed_architectures is not None and architecture not in allowed_architectures:
                    raise _reject(path, f"architecture {architecture!r} is not allowed on this device")
            elif value_type in _UNSIGNED or value_type in _SIGNED:
                integers[key] = reader.integer(value_type)
            elif key in _STRING_KEYS and value_type == _STRING:
                strings[key] = reader.string()
            else:
                reader.skip_value(value_type)
    if architecture is None:
        raise _reject(path, "general.architecture is missing")
    prefix = f"{architecture}."
    shape = {k[len(prefix) :]: v for k, v in integers.items() if k[len(prefix) :] in _SHAPE_KEYS}
    return GgufHeader(
        version,
        tensors,
        kv_count,
        architecture,
        integers.get("general.file_type"),
        shape,
        kind=strings.get("general.type", "model"),
        adapter_type=strings.get("adapter.type"),
        base_sha256=strings.get(BASE_SHA256_KEY),
    )


#: Beyond the weights and the KV cache: compute buffers and the Python worker (measured ~60-120 MiB
#: for the bundled models).
RUNTIME_OVERHEAD_MB = 128


def minimum_ram_mb(file_size: int, header: GgufHeader, n_ctx: int) -> int:
    """RAM a device needs to run this file at ``n_ctx``: weights + KV cache + runtime overhead."""
    kv = header.kv_cache_bytes(n_ctx)
    if kv is None:  # unknown shape: assume the cache is as large as the weights
        kv = file_size
    return math.ceil((file_size + kv) / (1024 * 1024)) + RUNTIME_OVERHEAD_MB
