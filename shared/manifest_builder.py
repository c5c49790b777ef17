"""The one place a manifest is built from a GGUF file (``immune-train publish`` and
``immune-fleet manifest create`` both use it): size and sha256 from the bytes, the quantization
from the file's own header, and a minimum RAM derived from the file and the profile's context."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from shared.admission import check_recorded_base
from shared.artifacts import describe_artifact
from shared.errors import ArtifactError
from shared.gguf import GgufHeader, minimum_ram_mb, read_gguf_header
from shared.manifest import BaseModelRef, HealthGate, Manifest, Quantization, RuntimeProfile
from shared.reasons import Reason

#: The manifest defaults every publisher shares (``immune-train publish``, ``immune-fleet manifest create``).
DEFAULT_CHANNEL = "stable"
DEFAULT_TASK = "slips-summary"
DEFAULT_N_CTX = 4096
DEFAULT_CPU_ARCH: tuple[str, ...] = ("aarch64",)  # the Raspberry Pi 5
DEFAULT_LIFETIME_DAYS = 90


@dataclass
class ManifestSpec:
    """What the publisher decides; everything else is read from the file."""

    name: str
    serial: int
    urls: Sequence[str]
    runtime: RuntimeProfile
    channel: str = DEFAULT_CHANNEL
    version: str | None = None
    base_model: str = "unknown"
    task: str = DEFAULT_TASK
    #: None: taken from the file's header; given: must agree with it.
    quantization: Quantization | None = None
    cpu_arch: Sequence[str] = DEFAULT_CPU_ARCH
    #: None: weights + KV cache at ``runtime.n_ctx`` + runtime overhead.
    min_ram_mb: int | None = None
    device_groups: Sequence[str] = ()
    expires_in_days: int = DEFAULT_LIFETIME_DAYS
    provenance: dict[str, Any] = field(default_factory=dict)
    #: For a LoRA adapter GGUF: the base it was exported against (it must be the one recorded in it).
    base: BaseModelRef | None = None
    #: The gate a device runs the file through before it gets traffic (None: the device's own).
    health: HealthGate | None = None


def _check_adapter(gguf: Path, header: GgufHeader, base: BaseModelRef | None) -> None:
    if base is None:
        raise ArtifactError(
            Reason.MISSING_BASE, f"{gguf.name} is a LoRA adapter: say which base GGUF it runs on"
        )
    check_recorded_base(gguf.name, header, base.name, base.sha256)


def file_quantization(gguf: Path, header: GgufHeader, claimed: Quantization | None) -> Quantization:
    """The quantization the file's header declares; refuses a claim that contradicts it, and a file
    whose type has no manifest name unless the caller names one."""
    actual = header.quantization
    if actual is None:
        if claimed is None:
            raise ArtifactError(
                Reason.UNKNOWN_QUANTIZATION,
                f"{gguf.name}: the header's general.file_type ({header.file_type}) is not one a manifest "
                "can name; give the quantization explicitly",
            )
        return claimed
    if claimed is not None and claimed.value != actual:
        raise ArtifactError(
            Reason.QUANTIZATION_MISMATCH,
            f"{gguf.name}: the file is {actual} (general.file_type {header.file_type}), not {claimed.value}",
        )
    return Quantization(actual)


def build_manifest(
    gguf: Path, spec: ManifestSpec, on_progress: Callable[[int], None] | None = None
) -> Manifest:
    """An unsigned manifest for ``gguf``; ArtifactError when the file contradicts ``spec``."""
    header = read_gguf_header(gguf, None)
    if header.kind == "adapter":
        _check_adapter(gguf, header, spec.base)
        quantization = spec.quantization or Quantization.F16  # an adapter's header names no file type
    elif spec.base is not None:
        raise ArtifactError(
            Reason.NOT_AN_ADAPTER, f"{gguf.name} is a GGUF {header.kind!r}, but a base was given"
        )
    else:
        quantization = file_quantization(gguf, header, spec.quantization)
    entry = describe_artifact(gguf, list(spec.urls), on_progress=on_progress)
    min_ram = spec.min_ram_mb
    if min_ram is None:
        min_ram = minimum_ram_mb(entry.size, header, spec.runtime.n_ctx)
    now = datetime.now(UTC).replace(microsecond=0)
    return Manifest.model_validate(
        {
            "name": spec.name,
            "channel": spec.channel,
            "serial": spec.serial,
            "version": spec.version or str(spec.serial),
            "created_at": now,
            "expires_at": now + timedelta(days=spec.expires_in_days),
            "base_model": spec.base_model,
            "task": spec.task,
            "quantization": quantization,
            "files": [entry],
            "runtime": spec.runtime,
            "compatibility": {
                "cpu_arch": list(spec.cpu_arch),
                "min_ram_mb": min_ram,
                "device_groups": list(spec.device_groups),
            },
            **({"provenance": spec.provenance} if spec.provenance else {}),
            **({"base": spec.base} if spec.base else {}),
            **({"health": spec.health} if spec.health else {}),
        },
        strict=False,
    )
