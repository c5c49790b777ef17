"""The inference worker process: loads one GGUF with llama-cpp-python and serves generation requests
from its pipe, one at a time, checking for cancellation between tokens."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Iterator
from functools import lru_cache
from multiprocessing.connection import Connection
from typing import Any

from pydantic import ValidationError

from edge.runtime.protocol import (
    WORKER_COMMAND,
    Cancel,
    ChatMessage,
    CountTokens,
    DropAdapter,
    GenerateRequest,
    JsonOutput,
    LoadAdapter,
    LoadSpec,
    SetThreads,
    WorkerEvent,
)
from edge.runtime.stops import StopScanner

log = logging.getLogger(__name__)
#: llama-cpp-python's refusal of a prompt longer than the context: "Requested tokens (N) exceed ...".
_OVER_CONTEXT = re.compile(r"Requested tokens \((\d+)\) exceed context window")


def _send(conn: Connection, event: WorkerEvent) -> None:
    conn.send_bytes(event.model_dump_json(exclude_defaults=True).encode())


def _thread_candidates() -> list[int]:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return sorted({n for n in (1, 2, 4, cpus) if n <= cpus})


def _timed_eval(llm: Any, batches: list[list[int]]) -> float:
    llm.reset()
    started = time.perf_counter()
    for batch in batches:
        llm.eval(batch)
    return time.perf_counter() - started


def _tune_threads(llm: Any, spec: LoadSpec) -> tuple[int, int]:
    """Pick thread counts by measuring, since the best count depends on the machine and its load
    (on a shared 2-core VM one thread can beat two): single-token decodes for generation, one
    prompt batch for prompt processing. Takes well under a second on small models."""
    candidates = _thread_candidates()
    sample = llm.tokenize(b"Slips detected a horizontal port scan from 10.0.0.5 to 120 hosts. " * 8)
    prompt, decode = sample[: min(64, spec.n_batch)], [[t] for t in sample[:8]]
    best_decode, best_batch = {}, {}
    _timed_eval(llm, decode)  # warm caches and pages before measuring
    for n in candidates:
        _set_threads(llm, n, n)
        best_decode[n] = _timed_eval(llm, decode)
        best_batch[n] = _timed_eval(llm, [prompt])
    llm.reset()
    chosen = min(best_decode, key=best_decode.__getitem__), min(best_batch, key=best_batch.__getitem__)
    _set_threads(llm, *chosen)
    return chosen


def _set_threads(llm: Any, n_threads: int, n_threads_batch: int) -> None:
    # llama-cpp-python has no public setter for the thread counts of a live context.
    llm._ctx.set_n_threads(n_threads, n_threads_batch)
    llm.n_threads, llm.n_threads_batch = n_threads, n_threads_batch


class Adapters:
    """The LoRA adapters loaded on one base, and which one the context applies now. Switching
    changes the computation, so the KV state (and any RAM prompt cache) of the previous prompt is
    dropped: it was computed with other weights."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self.loaded: dict[str, Any] = {}
        self.active: str | None = None

    def load(self, name: str, path: str) -> None:
        import llama_cpp

        if name in self.loaded:
            self.drop(name)
        adapter = llama_cpp.llama_adapter_lora_init(self.llm.model, path.encode())
        if not adapter:
            raise RequestFaultError("adapter-load-failed", f"llama.cpp could not load the adapter {path}")
        self.loaded[name] = adapter

    def drop(self, name: str) -> None:
        import llama_cpp

        adapter = self.loaded.pop(name, None)
        if adapter is None:
            return
        if self.active == name:
            self.apply(None)
        llama_cpp.llama_adapter_lora_free(adapter)

    def apply(self, name: str | None) -> None:
        """Make ``name`` (None: the base alone) the context's adapter."""
        import ctypes

        import llama_cpp

        if name == self.active:
            return
        if name is not None and name not in self.loaded:
            raise RequestFaultError("unknown-adapter", f"adapter {name!r} is not loaded")
        if name is None:
            failed = llama_cpp.llama_set_adapters_lora(self.llm._ctx.ctx, None, 0, None)
        else:
            one = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self.loaded[name])
            failed = llama_cpp.llama_set_adapters_lora(self.llm._ctx.ctx, one, 1, (ctypes.c_float * 1)(1.0))
        if failed:
            raise RuntimeError(f"llama.cpp could not switch to adapter {name!r}")
        self.active = name
        self.llm.reset()
        if (cache := getattr(self.llm, "cache", None)) is not None:
            self.llm.set_cache(type(cache)(capacity_bytes=cache.capacity_bytes))


def _ready(llm: Any, adapters: Adapters | None = None) -> WorkerEvent:
    cache = getattr(llm, "cache", None)
    return WorkerEvent(
        type="ready",
        n_threads=int(llm.n_threads),
        n_threads_batch=int(llm.n_threads_batch),
        prompt_cache_bytes=int(getattr(cache, "capacity_bytes", 0)) if cache is not None else 0,
        architecture=str(llm.metadata.get("general.architecture", "")),
        parameters=int(llm._model.n_params()),  # no public accessor on Llama
        adapters=sorted(adapters.loaded) if adapters else [],
    )


def _load(spec: LoadSpec) -> Any:
    from llama_cpp import Llama, LlamaRAMCache
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    threads = spec.n_threads or 1
    llm = Llama(
        model_path=spec.model_path,
        n_ctx=spec.n_ctx,
        n_batch=spec.n_batch,
        n_threads=threads,
        n_threads_batch=spec.n_threads_batch or threads,
        chat_format=spec.chat_format,
        verbose=False,
    )
    if spec.chat_template is not None:
        # The template may use the model's own BOS/EOS text; an empty EOS would become an empty
        # stop string, which ends every answer before its first character.
        eos, bos = llm.token_eos(), llm.token_bos()
        llm.chat_handler = Jinja2ChatFormatter(
            spec.chat_template,
            eos_token=llm.detokenize([eos], special=True).decode("utf-8", "replace"),
            bos_token=llm.detokenize([bos], special=True).decode("utf-8", "replace"),
            stop_token_ids=[eos],
        ).to_chat_handler()
    if spec.n_threads is None:
        _tune_threads(llm, spec)
        if spec.n_threads_batch is not None:
            _set_threads(llm, int(llm.n_threads), spec.n_threads_batch)
    if spec.prefix_reuse and spec.prompt_cache_mb:
        llm.set_cache(LlamaRAMCache(capacity_bytes=spec.prompt_cache_mb * 1024 * 1024))
    return llm


class RequestFaultError(Exception):
    """The request cannot be served as asked (the API answers 400); ``code`` says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


#: The converter's JSON string character admits raw control characters (a newline inside a string),
#: which JSON forbids and json.loads refuses; they are excluded, as llama.cpp's own converter does.
_LOOSE_CHAR = r'[^"\\]'
_JSON_CHAR = r'[^"\\\x7F\x00-\x1F]'


@lru_cache(maxsize=16)
def _grammar_text(schema_json: str) -> str:
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    lines = json_schema_to_gbnf(schema_json).splitlines()
    return "\n".join(
        line.replace(_LOOSE_CHAR, _JSON_CHAR, 1) if line.startswith("char ::=") else line for line in lines
    )


#: Grammars llama.cpp's parser has accepted in this process (one model, so one vocabulary).
_PARSED_GRAMMARS: set[str] = set()


def _grammar(llm: Any, output: JsonOutput) -> Any:
    """The llama.cpp grammar for ``output``, parsed once here first: llama-cpp-python hands a grammar
    the parser refuses to the sampler as a null pointer, which kills the process."""
    import llama_cpp
    from llama_cpp import LlamaGrammar

    schema = output.json_schema if output.json_schema is not None else {"type": "object"}
    try:
        text = _grammar_text(json.dumps(schema))  # key order kept: it is the order the model writes
    except Exception as exc:  # the converter asserts on schemas it does not know
        raise RequestFaultError(
            "json_schema_unusable", f"the JSON schema cannot become a grammar: {exc}"
        ) from None
    if text not in _PARSED_GRAMMARS:  # repeated schemas (every Slips request) are parsed once
        sampler = llama_cpp.llama_sampler_init_grammar(llm._model.vocab, text.encode(), b"root")
        if not sampler:
            raise RequestFaultError(
                "json_schema_unusable", "llama.cpp refused the grammar made from the JSON schema"
            )
        llama_cpp.llama_sampler_free(sampler)
        _PARSED_GRAMMARS.add(text)
    return LlamaGrammar.from_string(text, verbose=False)


def _chunks(llm: Any, request: GenerateRequest, spec: LoadSpec) -> Iterator[dict[str, Any]]:
    sampling = {
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "top_k": request.top_k,
        "min_p": request.min_p,
        "repeat_penalty": request.repeat_penalty,
        "stop": spec.stop or None,
        "seed": request.seed,
        "grammar": _grammar(llm, request.json_output) if request.json_output else None,
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


def _generate(
    conn: Connection, llm: Any, spec: LoadSpec, request: GenerateRequest, adapters: Adapters
) -> None:
    adapters.apply(request.adapter)
    if not spec.prefix_reuse:
        llm.reset()  # forget the previous prompt's KV state so every prompt is evaluated in full
    started = time.perf_counter()
    first: float | None = None
    prompt_tokens = 0  # read when the first token arrives: then exactly the prompt is evaluated
    produced = 0
    announced = False  # the first delta sent carries the prompt's token count
    finish: str | None = None
    scanner = StopScanner(tuple(request.stop))
    chunks = _chunks(llm, request, spec)
    try:
        for chunk in chunks:
            if first is None:
                first, prompt_tokens = time.perf_counter(), int(llm.n_tokens)
            if chunk["text"]:
                produced += 1
                if text := scanner.feed(chunk["text"]):
                    count = 0 if announced else prompt_tokens
                    announced = True
                    _send(conn, WorkerEvent(type="delta", id=request.id, text=text, prompt_tokens=count))
            finish = chunk["finish_reason"] or finish
            if scanner.matched is not None:
                finish = "stop"
                break
            if conn.poll() and _is_cancel(conn.recv_bytes(), request.id):
                finish = "cancelled"
                break
    finally:
        chunks.close()  # stops llama-cpp-python's generator when a stop sequence or cancel ended early
    if scanner.matched is None and (rest := scanner.flush()):
        _send(conn, WorkerEvent(type="delta", id=request.id, text=rest))
    ended = time.perf_counter()
    _send(
        conn,
        WorkerEvent(
            type="done",
            id=request.id,
            finish_reason=finish or "stop",
            stop_sequence=scanner.matched,
            prompt_tokens=prompt_tokens if first is not None else int(llm.n_tokens),
            completion_tokens=produced,
            prompt_ms=((first or ended) - started) * 1000,
            total_ms=(ended - started) * 1000,
        ),
    )


class _PromptCaptured(Exception):  # noqa: N818 (a signal, not an error)
    def __init__(self, prompt: Any) -> None:
        self.prompt = prompt


class _CapturePrompt:
    """Stands in for the Llama object in its own chat path: the chat handler applies the template
    and tokenizes, then hands the prompt to ``create_completion``, where it is caught before any
    evaluation. The count is then exactly what a generation would evaluate."""

    def __init__(self, llm: Any) -> None:
        self._llm = llm

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llm, name)

    def create_completion(self, prompt: Any, **_: Any) -> Any:
        raise _PromptCaptured(prompt)


def _count_tokens(llm: Any, messages: list[ChatMessage]) -> int:
    from llama_cpp import Llama

    try:
        Llama.create_chat_completion(_CapturePrompt(llm), messages=[m.model_dump() for m in messages])
    except _PromptCaptured as captured:
        prompt = captured.prompt
        if isinstance(prompt, str):
            return len(llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True))
        return len(prompt)
    raise RuntimeError("the chat handler did not reach the completion step")


def _is_cancel(raw: bytes, request_id: str) -> bool:
    """Whether a message that arrived mid-generation cancels it. The parent sends nothing else while
    a request runs, so anything unreadable is logged and ignored rather than guessed at."""
    try:
        message = WORKER_COMMAND.validate_json(raw)
    except ValidationError as exc:
        log.warning("ignoring an unreadable message during a generation: %s", exc.error_count())
        return False
    return isinstance(message, Cancel) and message.id == request_id


def worker_main(conn: Connection, spec_json: str) -> None:
    """Entry point of the worker process."""
    spec = LoadSpec.model_validate_json(spec_json)
    try:
        llm = _load(spec)
        adapters = Adapters(llm)
        for name, path in spec.adapters.items():
            adapters.load(name, path)
    except Exception as exc:  # report any load failure to the parent instead of dying silently
        _send(conn, WorkerEvent(type="error", error=f"cannot load {spec.model_path}: {exc}"))
        return
    _send(conn, _ready(llm, adapters))
    while True:
        try:
            raw = conn.recv_bytes()
        except EOFError:
            return  # the parent closed the pipe: shut down
        try:
            message = WORKER_COMMAND.validate_json(raw)
        except ValidationError as exc:
            _send(conn, WorkerEvent(type="error", error=f"bad request: {exc.errors(include_url=False)}"))
            continue
        if isinstance(message, Cancel):
            continue  # late cancel of a request that already finished: nothing to do
        if isinstance(message, SetThreads):
            _set_threads(llm, message.n_threads, message.n_threads_batch)
            _send(conn, _ready(llm, adapters))
            continue
        ident = getattr(message, "id", "")
        try:
            if isinstance(message, LoadAdapter):
                adapters.load(message.name, message.path)
                _send(conn, _ready(llm, adapters))
            elif isinstance(message, DropAdapter):
                adapters.drop(message.name)
                _send(conn, _ready(llm, adapters))
            elif isinstance(message, CountTokens):
                count = _count_tokens(llm, message.messages)
                _send(conn, WorkerEvent(type="count", id=message.id, prompt_tokens=count))
            else:
                _generate(conn, llm, spec, message, adapters)
        except RequestFaultError as exc:
            _send(conn, WorkerEvent(type="error", id=ident, error=str(exc), error_code=exc.code))
        except Exception as exc:  # a bad request must not kill a healthy model
            over = _OVER_CONTEXT.search(str(exc))
            code = "context_length_exceeded" if over else None
            tokens = int(over[1]) if over else 0
            _send(
                conn,
                WorkerEvent(type="error", id=ident, error=str(exc), error_code=code, prompt_tokens=tokens),
            )
