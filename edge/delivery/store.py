"""Content-addressed model store: ``sha256/<hex>`` holds only verified blobs, ``partial/`` holds
downloads in progress. A blob enters the store by fsync + atomic rename, never by copying.

Seed directories (read-only, e.g. the models baked into a device image, or one copy shared by many
simulated devices) hold blobs named by their sha256; a wanted blob found there is hard-linked into
the store when it is on the same file system and read-only, copied otherwise, and hashed in full
either way before it counts as stored."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import BinaryIO

from shared.errors import ArtifactError
from shared.reasons import Reason

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

    def __init__(self, root: Path, seed_dirs: Sequence[Path] = ()) -> None:
        self.root = root
        self.seed_dirs = tuple(seed_dirs)
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
        try:
            with source.open("rb") as src, partial.open("wb") as out:
                _check_bytes(src, str(source), sha256, size, out.write)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        return self.admit(partial, sha256)

    def from_seed(self, sha256: str, size: int) -> Path | None:
        """The blob ``sha256`` taken from a seed directory, or None when no seed has it (or the one
        found is not what its name says, which is logged: the caller downloads instead)."""
        for directory in self.seed_dirs:
            source = directory / sha256
            if not source.is_file():
                continue
            try:
                return self._link(source, sha256, size) or self.import_file(source, sha256, size)
            except (ArtifactError, OSError) as exc:
                log.warning("seed %s not used: %s", source, exc)
        return None

    def _link(self, source: Path, sha256: str, size: int) -> Path | None:
        """Hard-link a read-only seed into the store (no copy); None when it cannot be linked. The
        link is hashed, not the source path, so what is checked is what is kept."""
        if self.has(sha256):
            return self.blob_path(sha256)
        if source.stat().st_mode & 0o222:
            return None  # a writable seed could change under the store: copy it instead
        partial = self.partial_path(sha256)
        partial.unlink(missing_ok=True)
        try:
            os.link(source, partial)
        except OSError:
            return None  # another file system, or links not allowed
        try:
            with partial.open("rb") as linked:
                _check_bytes(linked, str(source), sha256, size, None)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        target = self.blob_path(sha256)
        partial.replace(target)
        fsync_dir(self.blobs)
        log.info("linked blob %s from seed %s", sha256, source.parent)
        return target

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


def _check_bytes(
    src: BinaryIO, what: str, sha256: str, size: int, sink: Callable[[bytes], object] | None
) -> None:
    """Read at most ``size + 1`` bytes of ``src`` (passing them to ``sink``); ArtifactError unless
    they are exactly ``size`` bytes with digest ``sha256``."""
    digest, read = hashlib.sha256(), 0
    while read <= size and (chunk := src.read(min(_CHUNK, size + 1 - read))):
        digest.update(chunk)
        if sink is not None:
            sink(chunk)
        read += len(chunk)
    if read != size:
        raise ArtifactError(
            Reason.SIZE_MISMATCH,
            f"{what}: size is {'more than ' if read > size else ''}{read} bytes, manifest says {size}",
        )
    if digest.hexdigest() != sha256:
        raise ArtifactError(
            Reason.HASH_MISMATCH, f"{what}: sha256 is {digest.hexdigest()}, manifest says {sha256}"
        )
