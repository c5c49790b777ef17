"""The capture recorder: the API offers each answered request; the recorder decides (enabled, model,
sample) on the request's thread and does the rest (building the record, redaction, the write) on its
own thread behind a small queue, so capture never slows or fails a request. A write that fails (a
full disk) pauses capture for a while; serving goes on either way."""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from edge.capture.redact import Redactor
from edge.capture.store import CaptureStore
from edge.config import CaptureSettings
from shared.capture import CapturedExchange

log = logging.getLogger(__name__)

#: Exchanges waiting for the writer; beyond this they are dropped (and counted), never waited for.
QUEUE_SIZE = 64
#: How often an idle recorder deletes what is past its retention.
EXPIRE_EVERY_S = 600.0


@dataclass
class CaptureCounts:
    """What became of the exchanges offered since the daemon started."""

    stored: int = 0
    dropped: int = 0
    too_large: int = 0
    failed: int = 0


class CaptureRecorder:
    """Decides what is captured and writes it in the background; ``start`` before use."""

    def __init__(
        self,
        settings: CaptureSettings,
        store: CaptureStore,
        clock: Callable[[], float] = time.monotonic,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self.settings = settings
        self.store = store
        self.redactor = Redactor(settings.redact, store)
        self.counts = CaptureCounts()
        self._models = frozenset(settings.models)
        self._clock = clock
        self._draw = draw
        self._paused_until = 0.0
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(QUEUE_SIZE)
        self._thread = threading.Thread(target=self._write_loop, name="capture", daemon=True)

    @property
    def paused(self) -> bool:
        return self._clock() < self._paused_until

    def wants(self, names: Iterable[str]) -> bool:
        """Whether a request known by ``names`` (the name it asked for, the answering model's name) is
        captured: enabled, one of them configured (or none configured), drawn, not paused."""
        if not self.settings.enabled or self.paused:
            return False
        if self._models and self._models.isdisjoint(names):
            return False
        return self.settings.sample_rate >= 1.0 or self._draw() < self.settings.sample_rate

    def offer(self, fields: dict[str, Any]) -> None:
        """Queue one answered request (the fields of a CapturedExchange); dropped when the writer is
        behind."""
        try:
            self._queue.put_nowait(fields)
        except queue.Full:
            self.counts.dropped += 1

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Write what is queued, then stop."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout_s)

    def drain(self, timeout_s: float = 10.0) -> bool:
        """Wait until everything offered so far is written (tests, and a pull that follows a request)."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._queue.unfinished_tasks

    def _write_loop(self) -> None:
        while True:
            try:
                fields = self._queue.get(timeout=EXPIRE_EVERY_S)
            except queue.Empty:
                self._expire()
                continue
            try:
                if fields is None:
                    return
                self._write(fields)
            finally:
                self._queue.task_done()

    def _expire(self) -> None:
        try:
            self.store.expire()
        except Exception as exc:  # as for a write: never the API's problem
            log.warning("capture: cannot delete expired exchanges from %s (%s)", self.store.path, exc)

    def _write(self, fields: dict[str, Any]) -> None:
        try:
            exchange = CapturedExchange.model_validate(fields, strict=False)
        except ValidationError as exc:
            # An answer larger than an exchange may be, mostly; nothing of it is logged (alert data).
            self.counts.too_large += 1
            log.debug("not captured: %d validation error(s)", exc.error_count())
            return
        try:
            seq = self.store.add(self.redactor.exchange(exchange))  # the redaction map is written too
        except Exception as exc:  # sqlite3.Error or OSError: whatever it is, serving must not see it
            self.counts.failed += 1
            self._paused_until = self._clock() + self.settings.pause_after_error_s
            log.warning(
                "capture paused for %.0f s: cannot write %s (%s)",
                self.settings.pause_after_error_s,
                self.store.path,
                exc,
            )
            return
        if seq is None:
            self.counts.too_large += 1
        else:
            self.counts.stored += 1
