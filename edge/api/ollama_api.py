"""Ollama-compatible subset: /api/chat, /api/generate (NDJSON streaming by default), /api/tags,
/api/ps, /api/version."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from edge.api.generation import PRIORITY_HEADER, Generation, Sampling, Serving
from edge.runtime.protocol import ChatMessage, WorkerEvent
from edge.runtime.router import ModelRouter

router = APIRouter(prefix="/api")
OLLAMA_COMPATIBLE_VERSION = "0.6.0"


class Options(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    num_predict: Annotated[int, Field(ge=1)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    seed: int | None = None
    stop: Annotated[list[str], Field(max_length=16)] | None = None

    def sampling(self) -> Sampling:
        return Sampling(
            max_tokens=self.num_predict,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=tuple(self.stop or ()),
        )


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str = ""
    stream: bool = True  # Ollama streams unless told otherwise
    options: Options = Options()


class ChatRequest(_Request):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=256)]


class GenerateApiRequest(_Request):
    prompt: Annotated[str, Field(max_length=1_000_000)]
    system: str | None = None
    raw: bool = False


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


@router.post("/chat", response_model=None)
async def chat(body: ChatRequest, request: Request) -> dict[str, object] | StreamingResponse:
    """Chat; NDJSON stream by default, one object with token counts and durations with stream false."""
    generation = await Generation.open(
        _serving(request),
        "/api/chat",
        body.model,
        body.options.sampling(),
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


@router.post("/generate", response_model=None)
async def generate(body: GenerateApiRequest, request: Request) -> dict[str, object] | StreamingResponse:
    """Prompt completion: through the chat template (with ``system``) unless ``raw`` is true."""
    if body.raw:
        generation = await Generation.open(
            _serving(request),
            "/api/generate",
            body.model,
            body.options.sampling(),
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
            body.options.sampling(),
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


def _model_entries(request: Request) -> list[dict[str, object]]:
    active = _router(request).active
    if active is None:
        return []
    return [
        {"name": n, "model": n, "modified_at": _now(), "size": 0, "digest": "", "details": {"format": "gguf"}}
        for n in (active.name, *active.aliases)
    ]


@router.get("/tags")
async def tags(request: Request) -> dict[str, object]:
    return {"models": _model_entries(request)}


@router.get("/ps")
async def ps(request: Request) -> dict[str, object]:
    return {"models": _model_entries(request)}


@router.get("/version")
async def version() -> dict[str, str]:
    return {"version": OLLAMA_COMPATIBLE_VERSION}
