"""A bounded GGUF header check, run before any file is handed to llama.cpp.

llama.cpp's own loader trusts the header; this check refuses files whose header is not GGUF,
has an unsupported version, absurd tensor/metadata counts, or an architecture the device does not
allow. It reads only the metadata needed to find ``general.architecture``, with hard caps on every
length, so a hostile header cannot make it allocate or loop without bound.
"""

from __future__ import annotations

import struct
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from shared.errors import ArtifactError

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_TENSORS = 100_000
MAX_KV = 10_000
MAX_STRING = 1 << 20
#: Architectures llama-cpp-python 0.3.x runs that fit a Raspberry Pi; configurable per device.
DEFAULT_ARCHITECTURES = frozenset({"llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "smollm3"})

# GGUF metadata value types -> fixed size in bytes (strings and arrays are variable).
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GgufHeader:
    version: int
    tensor_count: int
    kv_count: int
    architecture: str


def _reject(path: Path, problem: str) -> ArtifactError:
    return ArtifactError("bad-gguf", f"{path.name}: not an acceptable GGUF file: {problem}")


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
    path: Path, allowed_architectures: Collection[str] = DEFAULT_ARCHITECTURES
) -> GgufHeader:
    """Parse and check the header; raise ArtifactError ('bad-gguf') naming the problem."""
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
        for _ in range(kv_count):
            key, value_type = reader.string(), reader.u32()
            if key == "general.architecture":
                if value_type != _STRING:
                    raise _reject(path, "general.architecture is not a string")
                architecture = reader.string()
                if architecture not in allowed_architectures:
                    raise _reject(path, f"architecture {architecture!r} is not allowed on this device")
                return GgufHeader(version, tensors, kv_count, architecture)
            reader.skip_value(value_type)
    raise _reject(path, "general.architecture is missing")
