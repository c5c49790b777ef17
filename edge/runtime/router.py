"""Which worker serves which model name, how many requests may wait, and who is still using a model
that is being swapped out."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from edge.runtime.handle import WorkerHandle

log = logging.getLogger(__name__)


class UnknownModelError(LookupError):
    """No model (or alias) of that name is served here."""


class NoModelError(RuntimeError):
    """Nothing is being served (none installed yet, or a swap took longer than the request could wait)."""


class QueueFullError(RuntimeError):
    """Too many requests already running or waiting."""


class DeferredError(RuntimeError):
    """A low-priority request refused for now (the device is hot); the client should retry later."""


@dataclass
class ServingStats:
    """Outcomes of the requests one model served, for its trial window and metrics."""

    ok: int = 0
    failed: int = 0
    crashes: deque[float] = field(default_factory=lambda: deque(maxlen=64))
    decode_rates: deque[float] = field(default_factory=lambda: deque(maxlen=256))

    def record(self, ok: bool, tokens_per_second: float | None = None) -> None:
        if ok:
            self.ok += 1
            if tokens_per_second is not None:
                self.decode_rates.append(tokens_per_second)
        else:
            self.failed += 1

    def crashes_since(self, since: float) -> int:
        return sum(1 for at in self.crashes if at >= since)


@dataclass(eq=False)
class ServedModel:
    """The worker behind a public model name, and the limits of its runtime profile.

    ``worker`` is replaced in place when the supervisor restarts a crashed process, so requests
    holding this object reach the new process."""

    name: str
    worker: WorkerHandle
    n_ctx: int
    max_tokens_cap: int
    created: int
    aliases: tuple[str, ...] = ()
    defaults: dict[str, float | int] = field(default_factory=dict)
    system_prompt: str | None = None
    #: (channel, serial) of the installed model; None for `immune-edge serve`.
    key: tuple[str, int] | None = None
    #: What model listings report: the GGUF's size and sha256 (empty for `serve`), its
    #: quantization, and the chat format or "template" for a custom one.
    size_bytes: int = 0
    sha256: str = ""
    quantization: str = ""
    chat_format: str = ""
    #: The LoRA adapter requests under these names run with (None: the base alone). An adapter's
    #: ServedModel shares the base's worker and has its own statistics, for its own trial window.
    adapter: str | None = None
    stats: ServingStats = field(default_factory=ServingStats)
    inflight: int = 0

    def names(self) -> list[str]:
        return [self.name, *self.aliases]


class ModelRouter:
    """Routes requests by model name and bounds the queue (one running + ``max_waiting`` waiting).

    During a swap without RAM for two workers the router is *held*: new requests wait for the next
    model instead of failing."""

    def __init__(self, max_waiting: int = 8) -> None:
        self.max_waiting = max_waiting
        self._active: ServedModel | None = None
        #: Adapters served on the active model's worker, by adapter name.
        self._adapters: dict[str, ServedModel] = {}
        self._held = False
        self._admitted = 0
        self._changed = threading.Condition()
        #: Set by the thermal governor while the device is hot.
        self.defer_low_priority = threading.Event()

    # -- what is served --------------------------------------------------------------------------
    def serve(self, model: ServedModel | None) -> ServedModel | None:
        """Route to ``model`` from now on (and stop holding); return the one it replaces."""
        with self._changed:
            old, self._active = self._active, model
            if self._adapters and (model is None or old is None or model.worker is not old.worker):
                # Adapters run in the old base's process and were trained for that base.
                log.warning("the base changed: no longer serving adapters %s", ", ".join(self._adapters))
                self._adapters = {}
            self._held = False
            self._changed.notify_all()
        return old

    def hold(self) -> ServedModel | None:
        """Stop routing: new requests wait until ``serve``. Returns the model taken out of service."""
        with self._changed:
            old, self._active = self._active, None
            self._held = True
        return old

    @property
    def active(self) -> ServedModel | None:
        return self._active

    @property
    def adapters(self) -> list[ServedModel]:
        """The adapters served on the active model, by public name."""
        return [self._adapters[name] for name in sorted(self._adapters)]

    def serve_adapter(self, served: ServedModel) -> ServedModel | None:
        """Route ``served.names()`` to an adapter from now on; return the one it replaces."""
        if served.adapter is None:
            raise ValueError("serve_adapter needs a ServedModel with an adapter")
        with self._changed:
            taken = {n for a in self._adapters.values() if a.name != served.name for n in a.names()}
            base_names = set(self._active.names()) if self._active else set()
            if clash := sorted((taken | base_names) & set(served.names())):
                raise ValueError(f"names already served: {', '.join(clash)}")
            old, self._adapters[served.name] = self._adapters.get(served.name), served
            self._changed.notify_all()
        return old

    def remove_adapter(self, name: str) -> ServedModel | None:
        """Stop routing to the adapter served as ``name``; return it (requests already on it finish)."""
        with self._changed:
            old = self._adapters.pop(name, None)
            self._changed.notify_all()
        return old

    def all_names(self) -> list[str]:
        """Every model name served now: the active model's, then each adapter's."""
        base = self._active.names() if self._active else []
        return base + [n for a in self.adapters for n in a.names()]

    @property
    def held(self) -> bool:
        return self._held

    # -- per request -------------------------------------------------------------------------------
    def checkout(self, name: str | None, timeout_s: float) -> ServedModel:
        """The model for a request's ``model`` field (empty: the active one), counted as in use until
        ``checkin``; waits up to ``timeout_s`` while a swap holds the router."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while self._active is None:
                remaining = deadline - time.monotonic()
                if not self._held:
                    raise NoModelError("no model is loaded yet")
                if remaining <= 0:
                    raise NoModelError(f"a model swap is still in progress after {timeout_s:.0f} s")
                self._changed.wait(remaining)
            model = self._active
            if name and name not in model.names():
                adapter = next((a for a in self._adapters.values() if name in a.names()), None)
                if adapter is None:
                    known = ", ".join(self.all_names())
                    raise UnknownModelError(f"model {name!r} is not served here (available: {known})")
                model = adapter
            model.inflight += 1
            return model

    def checkin(self, model: ServedModel) -> None:
        with self._changed:
            model.inflight -= 1
            self._changed.notify_all()

    def drain(self, model: ServedModel, timeout_s: float) -> bool:
        """Wait until no request uses ``model`` (already out of service); False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while model.inflight > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(remaining)
        return True

    def admit(self, low_priority: bool = False) -> None:
        """Take a queue slot for one request (give it back with ``release``); QueueFullError if none,
        DeferredError for a low-priority request while the device is hot."""
        if low_priority and self.defer_low_priority.is_set():
            raise DeferredError("the device is running hot: low-priority requests are deferred")
        with self._changed:
            if self._admitted >= self.max_waiting + 1:
                raise QueueFullError(f"{self._admitted} requests are running or queued")
            self._admitted += 1

    def release(self) -> None:
        with self._changed:
            self._admitted -= 1

    @property
    def queue_depth(self) -> int:
        return self._admitted
