"""Opening signed manifests and checking artifact files against them."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from shared.errors import ArtifactError, SchemaError
from shared.manifest import MANIFEST_PAYLOAD_TYPE, ArtifactFile, FileRole, Manifest
from shared.signing import Envelope, Keyring, Role, verify_envelope

_CHUNK = 1024 * 1024
GGUF_MAGIC = b"GGUF"
GGUF_MEDIA_TYPE = "application/x-gguf"


def open_signed_manifest(
    envelope: Envelope | bytes, keyring: Keyring, now: datetime | None = None
) -> Manifest:
    """Verify a trainer-signed manifest envelope and return the manifest if it is not expired.

    The schema is only parsed after the signatures check out, so unsigned bytes never
    reach the manifest parser.
    """
    verified = verify_envelope(
        envelope, keyring, Role.TRAINER, MANIFEST_PAYLOAD_TYPE, what="manifest envelope"
    )
    manifest = Manifest.from_json(verified.payload)
    moment = now or datetime.now(UTC)
    if manifest.is_expired(moment):
        raise SchemaError(
            "expired",
            f"manifest {manifest.name} serial {manifest.serial}: "
            f"expired at {manifest.expires_at.isoformat()}",
        )
    return manifest


def sha256_file(path: Path, on_progress: Callable[[int], None] | None = None) -> tuple[int, str]:
    """(size, hex sha256) of a file, read in chunks; ``on_progress`` gets each chunk's length."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
            if on_progress is not None:
                on_progress(len(chunk))
    return size, digest.hexdigest()


def describe_artifact(
    path: Path,
    urls: Sequence[str],
    role: FileRole = FileRole.MODEL,
    media_type: str = GGUF_MEDIA_TYPE,
    on_progress: Callable[[int], None] | None = None,
) -> ArtifactFile:
    """A manifest entry for a local file: its name, exact size and sha256, and where to fetch it."""
    if role is FileRole.MODEL:
        with path.open("rb") as handle:
            if handle.read(4) != GGUF_MAGIC:
                raise ArtifactError("not-gguf", f"{path}: not a GGUF file (magic bytes are not 'GGUF')")
    size, digest = sha256_file(path, on_progress)
    return ArtifactFile.model_validate(
        {
            "name": path.name,
            "role": role,
            "media_type": media_type,
            "size": size,
            "sha256": digest,
            "urls": urls,
        },
        strict=False,
    )


def verify_artifact_file(path: Path, entry: ArtifactFile) -> None:
    """Raise ArtifactError unless ``path`` has exactly the declared size and sha256."""
    actual_size = path.stat().st_size
    if actual_size != entry.size:
        raise ArtifactError(
            "size-mismatch", f"artifact {entry.name}: size is {actual_size} bytes, manifest says {entry.size}"
        )
    _, digest = sha256_file(path)
    if digest != entry.sha256:
        raise ArtifactError(
            "hash-mismatch", f"artifact {entry.name}: sha256 is {digest}, manifest says {entry.sha256}"
        )
