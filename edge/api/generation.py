"""Turning an API request into a worker generation: queue slot, model checkout, caps, deadline,
streaming, and the bookkeeping (metrics, trial statistics) every request feeds."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime

import anyio
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from edge.api.errors import ApiError, ClientGoneError, server_failure
from edge.api.prompt_version import client_prompt_version
from edge.api.request_id import request_id
from edge.capture.recorder import CaptureRecorder
from edge.logs import fields
from edge.metrics import Metrics
from edge.runtime.handle import RequestRejectedError, RequestTimeoutError, WorkerError
from edge.runtime.health import decode_rate
from edge.runtime.protocol import ChatMessage, GenerateRequest, JsonOutput, WorkerEvent
from edge.runtime.router import (
    DeferredError,
    ModelRouter,
    NoModelError,
    QueueFullError,
    ServedModel,
    UnknownModelError,
)

log = logging.getLogger(__name__)

#: How long a request waits for a crashed worker to be restarted before failing.
RESTART_WAIT_S = 30.0
#: A client marks a request it can wait for (batch summaries) with ``X-Immune-Priority: low``.
PRIORITY_HEADER = "x-immune-priority"
#: How often a non-streaming request checks whether its client is still connected.
DISCONNECT_POLL_S = 0.25


@dataclass(frozen=True)
class Sampling:
    """What every API may ask of a generation (None: the model's signed default)."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repeat_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    #: Constrain the answer to JSON (a schema, or any object).
    json_output: JsonOutput | None = None
    #: The context the client needs (Ollama's num_ctx): refused when over the model's.
    context_tokens: int | None = None


@dataclass(frozen=True)
class Asked:
    """What the client sent, as it sent it (before the model's system prompt was added)."""

    model_name: str | None = None
    messages: list[ChatMessage] | None = None
    prompt_version: str | None = None


@dataclass
class Result:
    """A finished generation."""

    model: ServedModel
    text: str
    done: WorkerEvent


@dataclass(frozen=True)
class Serving:
    """What every request needs from the app: the router, its limits and the metrics."""

    router: ModelRouter
    metrics: Metrics
    request_timeout_s: float = 300.0
    #: Model names (aliases) whose requests are low priority: deferred while the device is hot.
    low_priority_models: frozenset[str] = frozenset()
    #: What a deferred request is told to wait before retrying.
    defer_retry_after_s: int = 60
    #: Records answered requests when ``[capture]`` is on.
    capture: CaptureRecorder | None = None

    def low_priority(self, model_name: str | None, priority_header: str | None) -> bool:
        """Whether a request may be deferred: by its header, else by the model name it asks for."""
        if priority_header is not None:
            return priority_header.strip().lower() == "low"
        return model_name is not None and model_name in self.low_priority_models


def with_system_prompt(model: ServedModel, messages: list[ChatMessage]) -> list[ChatMessage]:
    """The model's signed system prompt goes first unless the client sent its own."""
    if model.system_prompt and not any(m.role == "system" for m in messages):
        return [ChatMessage(role="system", content=model.system_prompt), *messages]
    return messages


def _request(
    model: ServedModel, sampling: Sampling, messages: list[ChatMessage] | None, prompt: str | None
) -> GenerateRequest:
    """The worker request: the client's values where given, else the model's signed defaults."""
    defaults = model.defaults
    if sampling.max_tokens is None:  # the model's default, within the device's cap
        max_tokens = min(int(defaults.get("max_tokens", 256)), model.max_tokens_cap)
    else:
        max_tokens = sampling.max_tokens
    if max_tokens > model.max_tokens_cap:
        raise ApiError(
            400,
            f"max_tokens {max_tokens} exceeds this model's cap of {model.max_tokens_cap}",
            "max_tokens_too_large",
            "max_tokens",
        )
    if sampling.context_tokens is not None and sampling.context_tokens > model.n_ctx:
        raise ApiError(
            400,
            f"num_ctx {sampling.context_tokens} exceeds this model's context of {model.n_ctx} tokens",
            "context_too_large",
            "options.num_ctx",
        )
    if messages is not None:
        messages = with_system_prompt(model, messages)

    def pick(value: float | int | None, key: str, fallback: float | int) -> float | int:
        return value if value is not None else defaults.get(key, fallback)

    return GenerateRequest(
        id=uuid.uuid4().hex,
        messages=messages,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=float(pick(sampling.temperature, "temperature", 0.2)),
        top_p=float(pick(sampling.top_p, "top_p", 0.95)),
        top_k=int(pick(sampling.top_k, "top_k", 40)),
        min_p=float(defaults.get("min_p", 0.05)),
        repeat_penalty=float(pick(sampling.repeat_penalty, "repeat_penalty", 1.1)),
        stop=list(sampling.stop),
        seed=sampling.seed,
        json_output=sampling.json_output,
        adapter=model.adapter,
    )


def _rejected(exc: RequestRejectedError, model: ServedModel, metrics: Metrics) -> ApiError:
    if exc.code == "context_length_exceeded":
        log.info("request %s: %s", request_id(), exc, extra=fields(request=request_id(), reason=exc.code))
        metrics.context_refused(model.name)
        size = f"{exc.prompt_tokens} tokens" if exc.prompt_tokens else "longer than the context"
        message = (
            f"the prompt is {size}, more than fits this model's context of {model.n_ctx} tokens "
            "(shorten the request or publish the model with a larger n_ctx)"
        )
        return ApiError(400, message, exc.code, "messages")
    return ApiError(400, str(exc), exc.code)  # the worker's own messages about the request


async def count_tokens(serving: Serving, model_name: str | None, messages: list[ChatMessage]) -> int:
    """Tokens ``messages`` (with the model's system prompt) take in the served model's template."""
    router = serving.router
    try:
        model = await run_in_threadpool(router.checkout, model_name, serving.request_timeout_s)
    except UnknownModelError as exc:
        raise ApiError(404, str(exc), "model_not_found", "model") from None
    except NoModelError as exc:
        raise ApiError(503, str(exc), "no_model") from None
    deadline = time.monotonic() + serving.request_timeout_s
    try:
        return await run_in_threadpool(
            model.worker.count_tokens, with_system_prompt(model, messages), deadline
        )
    except RequestRejectedError as exc:
        raise _rejected(exc, model, serving.metrics) from None
    except RequestTimeoutError as exc:
        raise ApiError(504, str(exc), "timeout") from None
    except WorkerError as exc:
        raise server_failure("worker_failed", exc) from None
    finally:
        router.checkin(model)


class Generation:
    """One admitted request: holds its queue slot and its model until its events are consumed or
    abandoned. Create with ``await Generation.open(...)``."""

    def __init__(
        self,
        serving: Serving,
        endpoint: str,
        model: ServedModel,
        request: GenerateRequest,
        asked: Asked | None = None,
    ) -> None:
        self._serving = serving
        self._endpoint = endpoint
        self.model = model
        self.request = request
        self._asked = asked or Asked()
        self._started = time.monotonic()
        self._deadline = self._started + serving.request_timeout_s
        self._closed = False
        #: Set when the client hung up: the generation stops at the worker's next token.
        self._client_gone = threading.Event()

    @classmethod
    async def open(
        cls,
        serving: Serving,
        endpoint: str,
        model_name: str | None,
        sampling: Sampling,
        messages: list[ChatMessage] | None = None,
        prompt: str | None = None,
        priority: str | None = None,
    ) -> Generation:
        """Admit the request and check out its model (waiting out a swap in progress). ``priority``
        is the request's priority header, if any."""
        router = serving.router
        try:
            router.admit(serving.low_priority(model_name, priority))
        except QueueFullError as exc:
            serving.metrics.requests.labels(endpoint=endpoint, status="429").inc()
            raise ApiError(429, f"server busy: {exc}; retry shortly", "queue_full") from None
        except DeferredError as exc:
            serving.metrics.requests.labels(endpoint=endpoint, status="503").inc()
            raise ApiError(
                503, f"{exc}; retry later", "deferred_thermal", retry_after_s=serving.defer_retry_after_s
            ) from None
        try:
            model = await run_in_threadpool(router.checkout, model_name, serving.request_timeout_s)
        except (UnknownModelError, NoModelError) as exc:
            router.release()
            status = 404 if isinstance(exc, UnknownModelError) else 503
            serving.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()
            code = "model_not_found" if status == 404 else "no_model"
            raise ApiError(status, str(exc), code, "model" if status == 404 else None) from None
        if version := client_prompt_version(messages, prompt):
            serving.metrics.prompt_version(model.name, version)
        try:
            request = _request(model, sampling, messages, prompt)
        except ApiError as exc:
            router.checkin(model)
            router.release()
            serving.metrics.requests.labels(endpoint=endpoint, status=str(exc.status)).inc()
            raise
        return cls(serving, endpoint, model, request, Asked(model_name, messages, version))

    def _close(self, status: int, done: WorkerEvent | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        router, metrics = self._serving.router, self._serving.metrics
        router.checkin(self.model)
        router.release()
        metrics.finished(self._endpoint, status, time.monotonic() - self._started, done, self.model.name)
        if status == 200 or status >= 500:  # client errors and hang-ups say nothing about the model
            rate = decode_rate(done.completion_tokens, done.total_ms, done.prompt_ms) if done else None
            self.model.stats.record(status == 200, rate)

    def _worker_events(self) -> Iterator[WorkerEvent]:
        """The worker's events; a request that produced nothing yet survives one worker restart."""
        for attempt in range(2):
            worker = self.model.worker
            produced = False
            try:
                for event in worker.generate(self.request, self._deadline):
                    if not produced:
                        self._serving.metrics.first_token(time.monotonic() - self._started)
                    produced = True
                    yield event
                return
            except RequestTimeoutError:
                raise
            except WorkerError:
                if produced or attempt or worker.alive or not self._await_restart(worker):
                    raise

    def _await_restart(self, dead: object) -> bool:
        deadline = min(self._deadline, time.monotonic() + RESTART_WAIT_S)
        while time.monotonic() < deadline:
            if self.model.worker is not dead and self.model.worker.alive:
                return True
            time.sleep(0.1)
        return False

    def _events(self) -> Iterator[WorkerEvent]:
        done: WorkerEvent | None = None
        status = 499  # until proven otherwise: the consumer stopped early
        capture = self._serving.capture
        # The model's own name catches all its requests; an alias only those that asked for it.
        captured = capture is not None and capture.wants(
            [*filter(None, [self._asked.model_name]), self.model.name]
        )
        parts: list[str] = []
        try:
            for event in self._worker_events():
                if event.type == "done":
                    done, status = event, 200
                    if captured and capture is not None:
                        capture.offer(self._captured(parts, event))
                elif captured:
                    parts.append(event.text)
                yield event
        except RequestTimeoutError as exc:
            status = 504
            raise ApiError(
                504, f"{exc} (request_timeout_s is {self._serving.request_timeout_s:.0f})", "timeout"
            ) from None
        except RequestRejectedError as exc:
            status = 400
            raise _rejected(exc, self.model, self._serving.metrics) from None
        except WorkerError as exc:
            status = 503
            raise server_failure("worker_failed", exc) from None
        finally:
            self._close(status, done)

    def _captured(self, parts: list[str], done: WorkerEvent) -> dict[str, object]:
        """The fields of the CapturedExchange this request makes (validated on the recorder's thread)."""
        model, request, asked = self.model, self.request, self._asked
        return {
            "at": datetime.now(UTC),
            "endpoint": self._endpoint,
            "requested_model": asked.model_name,
            "model_name": model.name,
            "model_serial": model.key[1] if model.key else None,
            "model_sha256": model.sha256 or None,
            "adapter": model.adapter,
            "messages": [m.model_dump() for m in asked.messages or []],
            "prompt": request.prompt,
            "answer": "".join(parts) + done.text,
            "finish_reason": done.finish_reason or "stop",
            "prompt_tokens": done.prompt_tokens,
            "completion_tokens": done.completion_tokens,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "prompt_version": asked.prompt_version,
        }

    async def collect(self, is_disconnected: Callable[[], Awaitable[bool]]) -> Result:
        """Run to completion (non-streaming). ``is_disconnected`` (Starlette's request method) is
        polled meanwhile: a client that hangs up cancels its generation instead of leaving the worker
        busy until ``max_tokens``; ClientGoneError then."""

        def run() -> Result:
            parts: list[str] = []
            done: WorkerEvent | None = None
            with closing(self._events()) as events:  # closing cancels the generation in the worker
                for event in events:  # "done" is the last event: the loop ends with the generation
                    if self._client_gone.is_set():
                        raise ClientGoneError
                    if event.type == "done":
                        done = event
                    parts.append(event.text)
            if done is None:
                raise server_failure("worker_failed", "the worker ended without a result")
            return Result(self.model, "".join(parts), done)

        failure: Exception | None = None
        async with anyio.create_task_group() as watchers:
            watchers.start_soon(self._watch_client, is_disconnected)
            try:
                result = await run_in_threadpool(run)
            except Exception as exc:  # raised after the group: inside, it would become an ExceptionGroup
                failure = exc
            watchers.cancel_scope.cancel()
        if failure is not None:
            raise failure
        return result

    async def _watch_client(self, is_disconnected: Callable[[], Awaitable[bool]]) -> None:
        while not await is_disconnected():
            await anyio.sleep(DISCONNECT_POLL_S)
        self._client_gone.set()

    async def stream(self) -> AsyncIterator[WorkerEvent]:
        """Events as they come; abandoning the iterator (client gone) cancels the generation."""
        events = self._events()
        try:
            async for event in iterate_in_threadpool(events):
                yield event
        finally:
            # Runs when the response task is cancelled (the client went away): shielded, or the
            # await would be cancelled before the generator is closed and the worker kept generating.
            with anyio.CancelScope(shield=True):
                await run_in_threadpool(events.close)
            self._close(499)
