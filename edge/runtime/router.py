"""Which worker serves which model name, and how many requests may wait for it."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from edge.runtime.handle import WorkerHandle


class UnknownModelError(LookupError):
    """No model (or alias) of that name is served here."""


class QueueFullError(RuntimeError):
    """Too many requests already running or waiting."""


@dataclass
class ServedModel:
    """The worker behind a public model name, and the limits of its runtime profile."""

    name: str
    worker: WorkerHandle
    n_ctx: int
    max_tokens_cap: int
    created: int
    aliases: tuple[str, ...] = ()
    defaults: dict[str, float | int] = field(default_factory=dict)


class ModelRouter:
    """Routes requests by model name and bounds the queue (one running + ``max_waiting`` waiting)."""

    def __init__(self, max_waiting: int = 8) -> None:
        self.max_waiting = max_waiting
        self._active: ServedModel | None = None
        self._lock = threading.Lock()
        self._admitted = 0

    def serve(self, model: ServedModel) -> ServedModel | None:
        """Route to ``model`` from now on; return the one it replaces."""
        with self._lock:
            old, self._active = self._active, model
        return old

    @property
    def active(self) -> ServedModel | None:
        return self._active

    def resolve(self, name: str | None) -> ServedModel:
        """The model for a request's ``model`` field (empty means the active one)."""
        model = self._active
        if model is None:
            raise UnknownModelError("no model is loaded yet")
        if not name or name == model.name or name in model.aliases:
            return model
        known = ", ".join([model.name, *model.aliases])
        raise UnknownModelError(f"model {name!r} is not served here (available: {known})")

    def admit(self) -> None:
        """Take a queue slot for one request (give it back with ``release``); QueueFullError if none."""
        with self._lock:
            if self._admitted >= self.max_waiting + 1:
                raise QueueFullError(f"{self._admitted} requests are running or queued")
            self._admitted += 1

    def release(self) -> None:
        with self._lock:
            self._admitted -= 1

    @property
    def queue_depth(self) -> int:
        return self._admitted
