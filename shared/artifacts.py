"""Reading artifact files: their sha256 in one pass, their manifest entry, and the facts admission
checks (shared.admission holds the checks themselves, without I/O)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

from shared.admission import FileFacts, check_file
from shared.errors import ArtifactError, ContractError
from shared.gguf import DEFAULT_ARCHITECTURES, read_gguf_header
from shared.manifest import ArtifactFile, FileRole
from shared.reasons import Reason

_CHUNK = 1024 * 1024
GGUF_MAGIC = b"GGUF"
GGUF_MEDIA_TYPE = "application/x-gguf"


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
                raise ArtifactError(Reason.NOT_GGUF, f"{path}: not a GGUF file (magic bytes are not 'GGUF')")
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
    check_file(entry, read_file_facts(path, FileRole.EXTRA))


def read_file_facts(
    path: Path, role: FileRole, allowed_architectures: Collection[str] = DEFAULT_ARCHITECTURES
) -> FileFacts:
    """Size, sha256 (every byte read) and, for a model, the GGUF header of a file, for admission."""
    size, sha256 = sha256_file(path)
    header = None
    if role is FileRole.MODEL:
        try:
            header = read_gguf_header(path, allowed_architectures)
        except ContractError as exc:
            header = exc
    return FileFacts(size, sha256, header)
