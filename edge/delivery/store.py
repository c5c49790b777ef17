"""Content-addressed model store: ``sha256/<hex>`` holds only verified blobs, ``partial/`` holds
downloads in progress. A blob enters the store by fsync + atomic rename, never by copying."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Collection
from pathlib import Path

from shared.errors import ArtifactError

log = logging.getLogger(__name__)
_CHUNK = 1024 * 1024


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ContentStore:
    """Verified blobs addressed by sha256, plus partial downloads named by the digest they should have."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "sha256"
        self.partials = root / "partial"
        for directory in (self.blobs, self.partials):
            directory.mkdir(parents=True, exist_ok=True, mode=0o750)

    def blob_path(self, sha256: str) -> Path:
        return self.blobs / sha256

    def has(self, sha256: str) -> bool:
        return self.blob_path(sha256).is_file()

    def partial_path(self, sha256: str) -> Path:
        return self.partials / f"{sha256}.part"

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def admit(self, verified_file: Path, sha256: str) -> Path:
        """Move a file whose digest was verified into the store (same file system, atomic)."""
        with verified_file.open("rb") as handle:
            os.fsync(handle.fileno())
        verified_file.chmod(0o444)  # blobs are immutable once admitted
        target = self.blob_path(sha256)
        verified_file.replace(target)
        fsync_dir(self.blobs)
        fsync_dir(verified_file.parent)
        log.info("stored blob %s (%d bytes)", sha256, target.stat().st_size)
        return target

    def import_file(self, source: Path, sha256: str, size: int) -> Path:
        """Copy a local file (USB stick, scp) into the store if it has exactly ``size`` bytes and
        ``sha256``; reads at most ``size + 1`` bytes, so a wrong file cannot fill the disk."""
        if self.has(sha256):
            return self.blob_path(sha256)
        partial = self.partial_path(sha256)
        digest, copied = hashlib.sha256(), 0
        try:
            with source.open("rb") as src, partial.open("wb") as out:
                while copied <= size and (chunk := src.read(min(_CHUNK, size + 1 - copied))):
                    digest.update(chunk)
                    out.write(chunk)
                    copied += len(chunk)
            if copied != size:
                raise ArtifactError(
                    "size-mismatch",
                    f"{source}: size is {'more than ' if copied > size else ''}{copied} "
                    f"bytes, manifest says {size}",
                )
            if digest.hexdigest() != sha256:
                raise ArtifactError(
                    "hash-mismatch", f"{source}: sha256 is {digest.hexdigest()}, manifest says {sha256}"
                )
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        return self.admit(partial, sha256)

    def collect_garbage(self, keep: Collection[str], in_use: Collection[str] = ()) -> list[str]:
        """Delete blobs and partials whose digest is in neither ``keep`` nor ``in_use``; return what went."""
        protected = set(keep) | set(in_use)
        removed = []
        for path in [*self.blobs.iterdir(), *self.partials.iterdir()]:
            digest = path.name.removesuffix(".part")
            if digest not in protected:
                path.unlink(missing_ok=True)
                removed.append(path.name)
        if removed:
            fsync_dir(self.blobs)
            fsync_dir(self.partials)
            log.info("garbage-collected %s", ", ".join(sorted(removed)))
        return removed
