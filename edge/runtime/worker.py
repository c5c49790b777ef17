"""The inference worker process: loads one GGUF with llama-cpp-python and serves generation requests
from its pipe, one at a time, checking for cancellation between tokens."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any

from pydantic import ValidationError

from edge.runtime.protocol import Cancel, GenerateRequest, LoadSpec, WorkerEvent

log = logging.getLogger(__name__)


def _send(conn: Connection, event: WorkerEvent) -> None:
    conn.send_bytes(event.model_dump_json(exclude_defaults=True).encode())


def _load(spec: LoadSpec) -> Any:
    from llama_cpp import Llama, LlamaRAMCache
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    threads = spec.n_threads or max(1, (os.cpu_count() or 1))
    handler = None
    if spec.chat_template is not None:
        handler = Jinja2ChatFormatter(spec.chat_template, eos_token="", bos_token="").to_chat_handler()
    llm = Llama(
        model_path=spec.model_path,
        n_ctx=spec.n_ctx,
        n_batch=spec.n_batch,
        n_threads=threads,
        n_threads_batch=threads,
        chat_format=spec.chat_format,
        chat_handler=handler,
        verbose=False,
    )
    if spec.prompt_cache_mb:
        llm.set_cache(LlamaRAMCache(capacity_bytes=spec.prompt_cache_mb * 1024 * 1024))
    return llm


def _chunks(llm: Any, request: GenerateRequest, spec: LoadSpec) -> Iterator[dict[str, Any]]:
    sampling = {
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "top_k": request.top_k,
        "min_p": request.min_p,
        "repeat_penalty": request.repeat_penalty,
        "stop": [*spec.stop, *request.stop] or None,
        "seed": request.seed,
        "stream": True,
    }
    if request.messages is not None:
        messages = [m.model_dump() for m in request.messages]
        for chunk in llm.create_chat_completion(messages=messages, **sampling):
            choice = chunk["choices"][0]
            yield {"text": choice["delta"].get("content") or "", "finish_reason": choice.get("finish_reason")}
    else:
        for chunk in llm.create_completion(prompt=request.prompt or "", **sampling):
            choice = chunk["choices"][0]
            yield {"text": choice.get("text") or "", "finish_reason": choice.get("finish_reason")}


def _generate(conn: Connection, llm: Any, spec: LoadSpec, request: GenerateRequest) -> None:
    started = time.perf_counter()
    first: float | None = None
    produced = 0
    finish: str | None = None
    for chunk in _chunks(llm, request, spec):
        if first is None:
            first = time.perf_counter()
        if chunk["text"]:
            produced += 1
            _send(conn, WorkerEvent(type="delta", id=request.id, text=chunk["text"]))
        finish = chunk["finish_reason"] or finish
        if conn.poll():  # a cancel (or anything else) arrived: the client is gone
            message = conn.recv_bytes()
            if b'"cancel"' in message:
                finish = "cancelled"
                break
    ended = time.perf_counter()
    completion = produced
    _send(
        conn,
        WorkerEvent(
            type="done",
            id=request.id,
            finish_reason=finish or "stop",
            prompt_tokens=max(int(llm.n_tokens) - completion, 0),
            completion_tokens=completion,
            prompt_ms=((first or ended) - started) * 1000,
            total_ms=(ended - started) * 1000,
        ),
    )


def worker_main(conn: Connection, spec_json: str) -> None:
    """Entry point of the worker process."""
    spec = LoadSpec.model_validate_json(spec_json)
    try:
        llm = _load(spec)
    except Exception as exc:  # report any load failure to the parent instead of dying silently
        _send(conn, WorkerEvent(type="error", error=f"cannot load {spec.model_path}: {exc}"))
        return
    _send(conn, WorkerEvent(type="ready", n_threads=int(llm.n_threads)))
    while True:
        try:
            raw = conn.recv_bytes()
        except EOFError:
            return  # the parent closed the pipe: shut down
        try:
            if b'"cancel"' in raw:
                Cancel.model_validate_json(raw)  # late cancel of a finished request: nothing to do
                continue
            request = GenerateRequest.model_validate_json(raw)
        except ValidationError as exc:
            _send(conn, WorkerEvent(type="error", error=f"bad request: {exc.errors(include_url=False)}"))
            continue
        try:
            _generate(conn, llm, spec, request)
        except Exception as exc:  # a bad request must not kill a healthy model
            _send(conn, WorkerEvent(type="error", id=request.id, error=str(exc)))
