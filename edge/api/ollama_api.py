"""Ollama-compatible endpoints: /api/chat, /api/generate (NDJSON streaming by default), /api/tags,
/api/ps, /api/show, /api/version. Bodies are JSON whatever the Content-Type, as with Ollama.

Of Ollama's ``options``, these are honoured: temperature, num_predict, top_p, top_k, seed, stop,
repeat_penalty, and num_ctx (accepted up to the model's context, which is fixed at load; 400 above).
Every other option, and ``keep_alive`` (the served model is always loaded), is accepted and ignored."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from edge.api.body import documented_body, json_body
from edge.api.errors import ApiError
from edge.api.generation import PRIORITY_HEADER, Generation, Sampling, Serving
from edge.api.structured import from_ollama_format
from edge.runtime.protocol import ChatMessage, WorkerEvent
from edge.runtime.router import ModelRouter, ServedModel

router = APIRouter(prefix="/api")
OLLAMA_COMPATIBLE_VERSION = "0.6.0"


class Options(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    num_predict: Annotated[int, Field(ge=1)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    repeat_penalty: Annotated[float, Field(gt=0, le=10)] | None = None
    seed: int | None = None
    stop: Annotated[list[str], Field(max_length=16)] | None = None
    num_ctx: Annotated[int, Field(ge=1)] | None = None


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str = ""
    stream: bool = True  # Ollama streams unless told otherwise
    options: Options = Options()
    format: str | dict[str, Any] | None = None
    #: How long Ollama would keep the model loaded; the served model is always loaded.
    keep_alive: str | int | float | None = None

    def sampling(self) -> Sampling:
        o = self.options
        return Sampling(
            max_tokens=o.num_predict,
            temperature=o.temperature,
            top_p=o.top_p,
            top_k=o.top_k,
            repeat_penalty=o.repeat_penalty,
            seed=o.seed,
            stop=tuple(o.stop or ()),
            json_output=from_ollama_format(self.format),
            context_tokens=o.num_ctx,
        )


class ChatRequest(_Request):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=256)]


class GenerateApiRequest(_Request):
    prompt: Annotated[str, Field(max_length=1_000_000)]
    system: str | None = None
    raw: bool = False


class ShowRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str = ""
    name: str = ""  # what older clients send


def _serving(request: Request) -> Serving:
    return request.app.state.serving


def _router(request: Request) -> ModelRouter:
    return _serving(request).router


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _stats(done: WorkerEvent) -> dict[str, object]:
    total_ns = int(done.total_ms * 1e6)
    prompt_ns = int(done.prompt_ms * 1e6)
    return {
        "done": True,
        "done_reason": "length" if done.finish_reason == "length" else "stop",
        "total_duration": total_ns,
        "load_duration": 0,
        "prompt_eval_count": done.prompt_tokens,
        "prompt_eval_duration": prompt_ns,
        "eval_count": done.completion_tokens,
        "eval_duration": max(total_ns - prompt_ns, 0),
    }


def _ndjson(lines: AsyncIterator[dict[str, object]]) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        async for line in lines:
            yield json.dumps(line).encode() + b"\n"

    return StreamingResponse(body(), media_type="application/x-ndjson")


@router.post("/chat", response_model=None, openapi_extra=documented_body(ChatRequest))
async def chat(
    body: Annotated[ChatRequest, Depends(json_body(ChatRequest))], request: Request
) -> dict[str, object] | StreamingResponse:
    """Chat; NDJSON stream by default, one object with token counts and durations with stream false."""
    generation = await Generation.open(
        _serving(request),
        "/api/chat",
        body.model,
        body.sampling(),
        messages=body.messages,
        priority=request.headers.get(PRIORITY_HEADER),
    )
    name = generation.model.name
    if body.stream:

        async def lines() -> AsyncIterator[dict[str, object]]:
            async for event in generation.stream():
                if event.type == "delta":
                    yield {
                        "model": name,
                        "created_at": _now(),
                        "message": {"role": "assistant", "content": event.text},
                        "done": False,
                    }
                else:
                    yield {
                        "model": name,
                        "created_at": _now(),
                        "message": {"role": "assistant", "content": ""},
                        **_stats(event),
                    }

        return _ndjson(lines())
    result = await generation.collect(request.is_disconnected)
    return {
        "model": name,
        "created_at": _now(),
        "message": {"role": "assistant", "content": result.text},
        **_stats(result.done),
    }


@router.post("/generate", response_model=None, openapi_extra=documented_body(GenerateApiRequest))
async def generate(
    body: Annotated[GenerateApiRequest, Depends(json_body(GenerateApiRequest))], request: Request
) -> dict[str, object] | StreamingResponse:
    """Prompt completion: through the chat template (with ``system``) unless ``raw`` is true."""
    if body.raw:
        generation = await Generation.open(
            _serving(request),
            "/api/generate",
            body.model,
            body.sampling(),
            prompt=body.prompt,
            priority=request.headers.get(PRIORITY_HEADER),
        )
    else:
        messages = [ChatMessage(role="system", content=body.system)] if body.system else []
        messages.append(ChatMessage(role="user", content=body.prompt))
        generation = await Generation.open(
            _serving(request),
            "/api/generate",
            body.model,
            body.sampling(),
            messages=messages,
            priority=request.headers.get(PRIORITY_HEADER),
        )
    name = generation.model.name
    if body.stream:

        async def lines() -> AsyncIterator[dict[str, object]]:
            async for event in generation.stream():
                if event.type == "delta":
                    yield {"model": name, "created_at": _now(), "response": event.text, "done": False}
                else:
                    yield {"model": name, "created_at": _now(), "response": "", **_stats(event)}

        return _ndjson(lines())
    result = await generation.collect(request.is_disconnected)
    return {"model": name, "created_at": _now(), "response": result.text, **_stats(result.done)}


def _details(model: ServedModel) -> dict[str, object]:
    worker = model.worker
    return {
        "parent_model": "",
        "format": "gguf",
        "family": worker.architecture,
        "families": [worker.architecture] if worker.architecture else None,
        "parameter_size": _size_label(worker.parameters),
        "quantization_level": model.quantization.upper(),
    }


def _size_label(parameters: int) -> str:
    if parameters >= 10**9:
        return f"{parameters / 10**9:.1f}B"
    return f"{parameters / 10**6:.0f}M" if parameters else ""


def _served(request: Request) -> list[ServedModel]:
    """The active model, then the adapters served on it."""
    router = _router(request)
    return [router.active, *router.adapters] if router.active else []


def _modified(model: ServedModel) -> str:
    return datetime.fromtimestamp(model.created, UTC).isoformat().replace("+00:00", "Z")


def _model_entries(request: Request) -> list[dict[str, object]]:
    return [
        {
            "name": n,
            "model": n,
            "modified_at": _modified(served),
            "size": served.size_bytes,
            "digest": served.sha256,
            "details": _details(served),
        }
        for served in _served(request)
        for n in served.names()
    ]


@router.get("/tags")
async def tags(request: Request) -> dict[str, object]:
    return {"models": _model_entries(request)}


@router.get("/ps")
async def ps(request: Request) -> dict[str, object]:
    return {"models": _model_entries(request)}


@router.post("/show", openapi_extra=documented_body(ShowRequest))
async def show(
    body: Annotated[ShowRequest, Depends(json_body(ShowRequest))], request: Request
) -> dict[str, object]:
    """What Ollama clients read to learn about a model: details, context length, parameters."""
    wanted = body.model or body.name
    served = next((m for m in _served(request) if wanted in m.names()), None)
    if served is None:
        known = ", ".join(_router(request).all_names()) or "none"
        raise ApiError(404, f"model {wanted!r} is not served here (available: {known})", "model_not_found")
    architecture = served.worker.architecture or "unknown"
    parameters = "\n".join(f"{k} {v}" for k, v in sorted(served.defaults.items()) if v is not None)
    return {
        "license": "",
        "modelfile": f"# served by immune-edge\nFROM {served.name}\n",
        "parameters": parameters,
        "template": served.chat_format,
        "system": served.system_prompt or "",
        "details": _details(served),
        "model_info": {
            "general.architecture": architecture,
            "general.parameter_count": served.worker.parameters,
            f"{architecture}.context_length": served.n_ctx,
        },
        "capabilities": ["completion"],
        "modified_at": _modified(served),
    }


@router.get("/version")
async def version() -> dict[str, str]:
    return {"version": OLLAMA_COMPATIBLE_VERSION}
