"""OpenAI-compatible endpoints: /v1/chat/completions (with SSE streaming), /v1/completions, /v1/models."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from edge.api.body import documented_body, json_body
from edge.api.generation import PRIORITY_HEADER, Generation, Result, Sampling, Serving
from edge.api.structured import ResponseFormat, from_response_format
from edge.runtime.protocol import ChatMessage
from edge.runtime.router import ModelRouter

router = APIRouter(prefix="/v1")


class _Request(BaseModel):
    # Clients send fields we do not use (n, user, logprobs...): ignore those, type-check the rest.
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str = ""
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    seed: int | None = None
    stop: str | Annotated[list[str], Field(max_length=16)] | None = None
    stream: bool = False
    response_format: ResponseFormat | None = None

    def sampling(self) -> Sampling:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return Sampling(
            max_tokens=self.max_completion_tokens or self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=stop,
            json_output=from_response_format(self.response_format),
        )


class ChatCompletionRequest(_Request):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=256)]


class CompletionRequest(_Request):
    prompt: Annotated[str, Field(max_length=1_000_000)]


def _serving(request: Request) -> Serving:
    return request.app.state.serving


def _router(request: Request) -> ModelRouter:
    return _serving(request).router


def _final(
    ident: str, kind: str, created: int, content: dict[str, object], result: Result
) -> dict[str, object]:
    """A non-streamed response: one choice with ``content`` (message or text), and token usage."""
    done = result.done
    return {
        "id": ident,
        "object": kind,
        "created": created,
        "model": result.model.name,
        "choices": [{"index": 0, **content, "finish_reason": done.finish_reason}],
        "usage": {
            "prompt_tokens": done.prompt_tokens,
            "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens,
        },
    }


def _sse(chunks: AsyncIterator[dict[str, object]]) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        async for chunk in chunks:
            yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.post("/chat/completions", response_model=None, openapi_extra=documented_body(ChatCompletionRequest))
async def chat_completions(
    body: Annotated[ChatCompletionRequest, Depends(json_body(ChatCompletionRequest))], request: Request
) -> dict[str, object] | StreamingResponse:
    """Chat completion, optionally streamed as server-sent events."""
    generation = await Generation.open(
        _serving(request),
        "/v1/chat/completions",
        body.model,
        body.sampling(),
        messages=body.messages,
        priority=request.headers.get(PRIORITY_HEADER),
    )
    ident, created, name = f"chatcmpl-{generation.request.id}", int(time.time()), generation.model.name
    if body.stream:

        async def chunks() -> AsyncIterator[dict[str, object]]:
            head = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": name}
            yield {**head, "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}
            async for event in generation.stream():
                if event.type == "delta":
                    yield {
                        **head,
                        "choices": [{"index": 0, "delta": {"content": event.text}, "finish_reason": None}],
                    }
                else:
                    yield {
                        **head,
                        "choices": [{"index": 0, "delta": {}, "finish_reason": event.finish_reason}],
                    }

        return _sse(chunks())
    result = await generation.collect(request.is_disconnected)
    message = {"role": "assistant", "content": result.text}
    return _final(ident, "chat.completion", created, {"message": message}, result)


@router.post("/completions", response_model=None, openapi_extra=documented_body(CompletionRequest))
async def completions(
    body: Annotated[CompletionRequest, Depends(json_body(CompletionRequest))], request: Request
) -> dict[str, object] | StreamingResponse:
    """Raw text completion (no chat template), optionally streamed."""
    generation = await Generation.open(
        _serving(request),
        "/v1/completions",
        body.model,
        body.sampling(),
        prompt=body.prompt,
        priority=request.headers.get(PRIORITY_HEADER),
    )
    ident, created, name = f"cmpl-{generation.request.id}", int(time.time()), generation.model.name
    if body.stream:

        async def chunks() -> AsyncIterator[dict[str, object]]:
            head = {"id": ident, "object": "text_completion", "created": created, "model": name}
            async for event in generation.stream():
                finish = None if event.type == "delta" else event.finish_reason
                yield {**head, "choices": [{"index": 0, "text": event.text, "finish_reason": finish}]}

        return _sse(chunks())
    result = await generation.collect(request.is_disconnected)
    return _final(ident, "text_completion", created, {"text": result.text}, result)


@router.get("/models")
async def models(request: Request) -> dict[str, object]:
    """The served model and its aliases."""
    router = _router(request)
    served = [router.active, *router.adapters] if router.active else []
    data = [
        {"id": n, "object": "model", "created": m.created, "owned_by": "immune-edge"}
        for m in served
        for n in m.names()
    ]
    return {"object": "list", "data": data}
