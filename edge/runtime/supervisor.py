"""Restarts the serving worker when its process dies, with exponential back-off; the crashes it
sees are what a trial window counts."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from edge.config import RuntimeSettings
from edge.metrics import Metrics
from edge.runtime.handle import WorkerError, WorkerHandle
from edge.runtime.router import ModelRouter, ServedModel

log = logging.getLogger(__name__)

#: The longest wait before a restart, however many crashes came before.
MAX_BACKOFF_S = 30.0


class Supervisor:
    """A thread that watches the router's active worker.

    ``lock`` is the serving runtime's, so a restart never races a swap; ``restarted`` is told of
    each new worker (the runtime applies its thread cap)."""

    def __init__(
        self,
        router: ModelRouter,
        settings: RuntimeSettings,
        metrics: Metrics,
        lock: threading.RLock,
        closing: threading.Event,
        restarted: Callable[[WorkerHandle], None],
    ) -> None:
        self.router = router
        self.settings = settings
        self.metrics = metrics
        self._lock = lock
        self._closing = closing
        self._restarted = restarted
        self._restart_at: dict[int, float] = {}
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)

    def start(self) -> None:
        """Watch until the runtime closes."""
        self._thread.start()

    def _run(self) -> None:
        while not self._closing.wait(0.25):
            with self._lock:
                served = self.router.active
                if served is None or served.worker.alive or self._closing.is_set():
                    continue
                now = time.monotonic()
                if id(served.worker) not in self._restart_at:
                    served.stats.crashes.append(now)
                    recent = served.stats.crashes_since(now - self.settings.crash_window_s)
                    self._restart_at[id(served.worker)] = now + min(2.0 ** (recent - 1) - 1, MAX_BACKOFF_S)
                    log.error("worker for %s died (%d crashes recently)", served.name, recent)
                if now < self._restart_at[id(served.worker)]:
                    continue
                self._restart(served)

    def _restart(self, served: ServedModel) -> None:
        dead = served.worker
        self._restart_at.pop(id(dead), None)
        try:
            served.worker = WorkerHandle(dead.restart_spec(), dead.name).start(self.settings.load_timeout_s)
        except WorkerError as exc:
            log.error("restart of %s failed: %s", served.name, exc)
            return  # counted as another crash on the next pass, with a longer backoff
        dead.stop()
        for adapter in self.router.adapters:  # they share the base's process
            adapter.worker = served.worker
        self._restarted(served.worker)
        self.metrics.worker_restarts.inc()
