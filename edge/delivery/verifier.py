"""The device's admission checks, in the order the issue requires: signature and expiry first (nothing
unsigned is parsed as a manifest), then anti-rollback serial, then compatibility; file sizes and
hashes are checked while downloading, and the GGUF header before llama.cpp ever sees the file."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from edge.delivery.gguf_header import GgufHeader, read_gguf_header
from shared.errors import ContractError
from shared.manifest import FileRole, Manifest
from shared.signing import Envelope, Keyring
from shared.verification import open_signed_manifest


class AdmissionError(ContractError):
    """A signed manifest this device must not install (older serial, wrong hardware...)."""


@dataclass(frozen=True)
class DeviceProfile:
    """What the compatibility check compares a manifest against."""

    cpu_arch: str
    ram_mb: int
    groups: tuple[str, ...]
    allowed_architectures: frozenset[str]


def open_manifest(envelope: bytes, keyring: Keyring, now: datetime) -> Manifest:
    """Signature by a threshold of trainer keys, then schema, then expiry."""
    return open_signed_manifest(envelope, keyring, now)


def peek_manifest(envelope: bytes) -> Manifest | None:
    """The manifest inside an envelope WITHOUT verifying it, or None if unreadable. Only for
    bookkeeping that cannot hurt if lied to (which files to keep, which serial floor to show)."""
    try:
        return Manifest.from_json(Envelope.from_json(envelope).payload_bytes())
    except ContractError:
        return None


def check_serial(manifest: Manifest, last_serial: int) -> None:
    """Anti-rollback: only a strictly newer serial on the channel is accepted."""
    if manifest.serial <= last_serial:
        raise AdmissionError(
            "serial-not-newer",
            f"manifest {manifest.name} serial {manifest.serial} is not newer than serial {last_serial} "
            f"already accepted on channel {manifest.channel!r} (only an operator rollback goes back)",
        )


def check_compatibility(manifest: Manifest, device: DeviceProfile) -> None:
    """Architecture, RAM and device groups."""
    compat = manifest.compatibility
    if device.cpu_arch not in compat.cpu_arch:
        raise AdmissionError(
            "incompatible-arch",
            f"manifest {manifest.name} is built for {', '.join(compat.cpu_arch)}; this device is "
            f"{device.cpu_arch}",
        )
    if compat.min_ram_mb > device.ram_mb:
        raise AdmissionError(
            "insufficient-ram",
            f"manifest {manifest.name} needs {compat.min_ram_mb} MiB RAM; this device has {device.ram_mb}",
        )
    if compat.device_groups and not set(compat.device_groups) & set(device.groups):
        raise AdmissionError(
            "wrong-group",
            f"manifest {manifest.name} is for groups {', '.join(compat.device_groups)}; this device is in "
            f"{', '.join(device.groups) or 'no group'}",
        )


def check_model_files(
    manifest: Manifest, paths: Mapping[str, Path], allowed_architectures: Collection[str]
) -> GgufHeader:
    """GGUF header check of the model file (``paths`` maps file name to its verified stored blob)."""
    header: GgufHeader | None = None
    for entry in manifest.files:
        if entry.role is FileRole.MODEL:
            header = read_gguf_header(paths[entry.name], allowed_architectures)
    if header is None:  # the manifest schema already requires exactly one model file
        raise AdmissionError("no-model-file", f"manifest {manifest.name} lists no model file")
    return header
