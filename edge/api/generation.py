"""Turning an API request into a worker generation: model lookup, caps, queue slot, streaming."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from edge.runtime.handle import WorkerError
from edge.runtime.protocol import ChatMessage, GenerateRequest, WorkerEvent
from edge.runtime.router import ModelRouter, QueueFullError, ServedModel, UnknownModelError


class ApiError(Exception):
    """An error with its HTTP status; each API renders it in its own shape."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param


@dataclass(frozen=True)
class Sampling:
    """Sampling options common to both APIs (None: the model's default)."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class Result:
    """A finished generation."""

    model: ServedModel
    text: str
    done: WorkerEvent


class Generation:
    """One admitted request: holds its queue slot until its events are consumed or abandoned."""

    def __init__(
        self,
        router: ModelRouter,
        model_name: str | None,
        sampling: Sampling,
        messages: list[ChatMessage] | None = None,
        prompt: str | None = None,
    ) -> None:
        try:
            self.model = router.resolve(model_name)
        except UnknownModelError as exc:
            raise ApiError(404, str(exc), "model_not_found", "model") from None
        cap = self.model.max_tokens_cap
        max_tokens = (
            sampling.max_tokens
            if sampling.max_tokens is not None
            else int(self.model.defaults.get("max_tokens", 256))
        )
        if max_tokens > cap:
            raise ApiError(
                400,
                f"max_tokens {max_tokens} exceeds this model's cap of {cap}",
                "max_tokens_too_large",
                "max_tokens",
            )
        defaults = self.model.defaults

        def pick(value: float | int | None, key: str, fallback: float | int) -> float | int:
            return value if value is not None else defaults.get(key, fallback)

        self.request = GenerateRequest(
            id=uuid.uuid4().hex,
            messages=messages,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=float(pick(sampling.temperature, "temperature", 0.2)),
            top_p=float(pick(sampling.top_p, "top_p", 0.95)),
            top_k=int(pick(sampling.top_k, "top_k", 40)),
            min_p=float(defaults.get("min_p", 0.05)),
            repeat_penalty=float(defaults.get("repeat_penalty", 1.1)),
            stop=list(sampling.stop),
            seed=sampling.seed,
        )
        self._router = router
        try:
            router.admit()
        except QueueFullError as exc:
            raise ApiError(429, f"server busy: {exc}; retry shortly", "queue_full") from None
        self._released = False

    def _release(self) -> None:
        if not self._released:
            self._released = True
            self._router.release()

    def _events(self) -> Iterator[WorkerEvent]:
        try:
            yield from self.model.worker.generate(self.request)
        except WorkerError as exc:
            message = str(exc)
            if "exceed context window" in message:
                raise ApiError(
                    400,
                    f"prompt is longer than the context window ({self.model.n_ctx} tokens): {message}",
                    "context_length_exceeded",
                    "messages",
                ) from None
            raise ApiError(503, f"model worker failed: {message}", "worker_failed") from None
        finally:
            self._release()

    async def collect(self) -> Result:
        """Run to completion (non-streaming)."""

        def run() -> Result:
            parts: list[str] = []
            for event in self._events():
                if event.type == "done":
                    return Result(self.model, "".join(parts), event)
                parts.append(event.text)
            raise ApiError(503, "model worker ended without a result", "worker_failed")

        return await run_in_threadpool(run)

    async def stream(self) -> AsyncIterator[WorkerEvent]:
        """Events as they come; abandoning the iterator (client gone) cancels the generation."""
        events = self._events()
        try:
            async for event in iterate_in_threadpool(events):
                yield event
        finally:
            await run_in_threadpool(events.close)
            self._release()
