"""Resumable, hashing artifact downloader.

One pass: bytes are hashed as they arrive and written to ``partial/<sha256>.part``; after an
interruption (network or process restart) the hash state is rebuilt from the partial file and the
download continues with an HTTP Range request. A server may never send more than the manifest
declares, and only a file with the exact size and digest enters the store.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from edge.delivery.store import ContentStore
from shared.errors import ArtifactError, TransientError
from shared.manifest import ArtifactFile
from shared.reasons import Reason

log = logging.getLogger(__name__)

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")
_CHUNK = 1024 * 1024

ProgressCallback = Callable[[int, int], None]


class DownloadError(ArtifactError):
    """Every mirror served something other than the declared artifact (permanent for this manifest)."""


class DownloadInterruptedError(TransientError):
    """The artifact could not be fetched now (network down, disk full or short of space): retried."""


class _TransientError(Exception):
    """Worth retrying (timeouts, 5xx, dropped connections): the partial file is kept."""


class _MirrorRefusedError(Exception):
    """This mirror misbehaved (overflow, wrong size, corrupt data): do not use it again for this file."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class DownloadPolicy:
    """Retries, timeouts and watchdogs."""

    attempts: int = 8
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    connect_timeout_s: float = 10.0
    stall_timeout_s: float = 30.0  # no byte for this long: drop the connection and resume
    min_rate_bps: int = 2048  # slower than this over a whole window: drop and resume
    rate_window_s: float = 60.0
    free_space_margin_bytes: int = 64 * 1024 * 1024


class _Partial:
    """The partial file and the running hash of its bytes."""

    def __init__(self, path: Path, size_limit: int) -> None:
        self.path = path
        self.hasher = hashlib.sha256()
        self.offset = 0
        if path.exists():
            if path.stat().st_size > size_limit:
                path.unlink()
            else:
                with path.open("rb") as handle:  # rebuild the hash state instead of re-downloading
                    while chunk := handle.read(_CHUNK):
                        self.hasher.update(chunk)
                        self.offset += len(chunk)

    def checkpoint(self) -> tuple[int, hashlib._Hash]:
        return self.offset, self.hasher.copy()

    def rewind(self, offset: int, hasher: hashlib._Hash) -> None:
        with self.path.open("r+b") as handle:
            handle.truncate(offset)
        self.offset, self.hasher = offset, hasher

    def reset(self) -> None:
        self.path.unlink(missing_ok=True)
        self.offset, self.hasher = 0, hashlib.sha256()


class Downloader:
    """Fetches manifest files into a ContentStore."""

    def __init__(
        self,
        store: ContentStore,
        policy: DownloadPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.store = store
        self.policy = policy or DownloadPolicy()
        self._sleep = sleep

    def fetch(self, entry: ArtifactFile, on_progress: ProgressCallback | None = None) -> Path:
        """Return the stored blob for ``entry``, downloading it if needed; raise DownloadError."""
        if self.store.has(entry.sha256):
            return self.store.blob_path(entry.sha256)
        partial = _Partial(self.store.partial_path(entry.sha256), entry.size)
        needed = entry.size - partial.offset + self.policy.free_space_margin_bytes
        free = self.store.free_bytes()
        if free < needed:
            raise DownloadInterruptedError(
                Reason.DISK_SPACE,
                f"artifact {entry.name}: needs {needed} bytes free in {self.store.root}, {free} available",
            )
        refused: dict[str, _MirrorRefusedError] = {}
        last_problem = "no attempt made"
        timeout = httpx.Timeout(
            connect=self.policy.connect_timeout_s, read=self.policy.stall_timeout_s, write=10.0, pool=10.0
        )
        with httpx.Client(timeout=timeout, headers={"Accept-Encoding": "identity"}) as client:
            for attempt in range(self.policy.attempts):
                mirrors = [str(url) for url in entry.urls if str(url) not in refused]
                if not mirrors:
                    break
                url = mirrors[attempt % len(mirrors)]
                try:
                    self._attempt(client, url, entry, partial, on_progress)
                    return self._finish(entry, partial)
                except _MirrorRefusedError as exc:
                    refused[url] = exc
                    last_problem = str(exc)
                    log.warning("mirror refused for %s: %s", entry.name, exc)
                except (_TransientError, httpx.HTTPError) as exc:
                    last_problem = f"{url}: {exc}"
                    delay = min(self.policy.backoff_initial_s * 2**attempt, self.policy.backoff_max_s)
                    log.info("download of %s interrupted (%s); retrying in %.1f s", entry.name, exc, delay)
                    self._sleep(delay * random.uniform(0.5, 1.0))  # noqa: S311 (jitter, not crypto)
                except OSError as exc:
                    partial.reset()
                    reason = Reason.DISK_FULL if exc.errno == errno.ENOSPC else Reason.IO_ERROR
                    raise DownloadInterruptedError(
                        reason, f"artifact {entry.name}: cannot write {partial.path}: {exc}"
                    ) from None
        if refused and len(refused) == len(entry.urls):
            partial.reset()  # every mirror misbehaved: nothing here is worth resuming
            reasons = {exc.reason for exc in refused.values()}
            reason = reasons.pop() if len(reasons) == 1 else Reason.MIRRORS_REFUSED
            raise DownloadError(reason, f"artifact {entry.name}: {'; '.join(map(str, refused.values()))}")
        raise DownloadInterruptedError(
            Reason.DOWNLOAD_FAILED,
            f"artifact {entry.name}: gave up after {self.policy.attempts} attempts; last: {last_problem}",
        )

    def _attempt(
        self,
        client: httpx.Client,
        url: str,
        entry: ArtifactFile,
        partial: _Partial,
        on_progress: ProgressCallback | None,
    ) -> None:
        if partial.offset == entry.size:
            return
        headers = {"Range": f"bytes={partial.offset}-"} if partial.offset else {}
        with client.stream("GET", url, headers=headers) as response:
            self._check_response(url, entry, partial, response)
            start_offset, start_hasher = partial.checkpoint()
            window_start, window_bytes = time.monotonic(), 0
            with partial.path.open("ab") as out:
                for chunk in response.iter_raw():  # as received: a buffered chunk would be lost on a drop
                    if partial.offset + len(chunk) > entry.size:
                        out.close()
                        partial.rewind(start_offset, start_hasher)
                        raise _MirrorRefusedError(
                            Reason.TOO_LONG, f"{url}: server sent more than the declared {entry.size} bytes"
                        )
                    out.write(chunk)
                    partial.hasher.update(chunk)
                    partial.offset += len(chunk)
                    window_bytes += len(chunk)
                    if on_progress is not None:
                        on_progress(partial.offset, entry.size)
                    elapsed = time.monotonic() - window_start
                    if elapsed >= self.policy.rate_window_s:
                        if window_bytes / elapsed < self.policy.min_rate_bps:
                            raise _TransientError(f"slow link: {window_bytes / elapsed:.0f} B/s")
                        window_start, window_bytes = time.monotonic(), 0
        if partial.offset < entry.size:
            raise _TransientError(f"connection ended after {partial.offset} of {entry.size} bytes")

    @staticmethod
    def _check_response(url: str, entry: ArtifactFile, partial: _Partial, response: httpx.Response) -> None:
        status = response.status_code
        if status == 206:
            match = _CONTENT_RANGE.fullmatch(response.headers.get("content-range", ""))
            if not match or int(match.group(1)) != partial.offset or int(match.group(3)) != entry.size:
                raise _MirrorRefusedError(
                    Reason.SIZE_MISMATCH,
                    f"{url}: Content-Range {response.headers.get('content-range')!r} does not continue "
                    f"byte {partial.offset} of {entry.size}",
                )
        elif status == 200:
            if partial.offset:
                log.info("%s ignored the Range request; starting %s again", url, entry.name)
                partial.reset()
        elif status in (408, 425, 429) or status >= 500:
            raise _TransientError(f"HTTP {status}")
        else:
            raise _MirrorRefusedError(Reason.HTTP_STATUS, f"{url}: HTTP {status}")
        declared = response.headers.get("content-length")
        if declared is not None and partial.offset + int(declared) != entry.size:
            raise _MirrorRefusedError(
                Reason.SIZE_MISMATCH,
                f"{url}: server declares {partial.offset + int(declared)} bytes, manifest says {entry.size}",
            )

    def _finish(self, entry: ArtifactFile, partial: _Partial) -> Path:
        digest = partial.hasher.hexdigest()
        if digest != entry.sha256:
            partial.reset()
            raise _MirrorRefusedError(
                Reason.HASH_MISMATCH,
                f"artifact {entry.name}: sha256 is {digest}, manifest says {entry.sha256}",
            )
        return self.store.admit(partial.path, entry.sha256)
