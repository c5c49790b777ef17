"""Anthropic Messages API: POST /v1/messages (with its SSE event sequence) and
/v1/messages/count_tokens, the third provider of Slips' LLM module.

Text only: a content block of any other type (image, document, tool_use...) and any request field
this server does not implement (tools, thinking...) is refused with a 400 naming it, so no part of
a request is ever dropped without the client knowing."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from edge.api.body import documented_body, json_body
from edge.api.errors import ApiError
from edge.api.generation import PRIORITY_HEADER, Generation, Sampling, Serving, count_tokens
from edge.runtime.protocol import ChatMessage, WorkerEvent

PREFIX = "/v1/messages"
router = APIRouter(prefix=PREFIX)

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
}


def error_body(status: int, message: str) -> dict[str, object]:
    """An error in the Messages API's shape."""
    return {"type": "error", "error": {"type": _ERROR_TYPES.get(status, "api_error"), "message": message}}


def _text_blocks(value: Any) -> Any:
    """A string is one text block; a list may hold text blocks only."""
    if isinstance(value, str):
        return [{"type": "text", "text": value}]
    if isinstance(value, list):
        for i, block in enumerate(value):
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            if kind != "text":
                raise ValueError(f"content block {i} is of type {kind!r}: this server takes text blocks only")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextBlock(_Strict):
    type: Literal["text"]
    text: str
    #: A prompt-caching hint; prefix reuse happens anyway.
    cache_control: dict[str, Any] | None = None


TextBlocks = Annotated[list[TextBlock], BeforeValidator(_text_blocks)]


def _joined(blocks: list[TextBlock]) -> str:
    return "\n".join(block.text for block in blocks)


class Message(_Strict):
    role: Literal["user", "assistant"]
    content: TextBlocks


class _Conversation(_Strict):
    model: Annotated[str, Field(min_length=1)]
    messages: Annotated[list[Message], Field(min_length=1, max_length=256)]
    system: TextBlocks | None = None

    @model_validator(mode="after")
    def _ends_with_the_user(self) -> _Conversation:
        if self.messages[-1].role != "user":
            raise ValueError("the last message must come from the user (assistant prefill is not supported)")
        return self

    def chat(self) -> list[ChatMessage]:
        head = [ChatMessage(role="system", content=_joined(self.system))] if self.system else []
        return head + [ChatMessage(role=m.role, content=_joined(m.content)) for m in self.messages]


class MessagesRequest(_Conversation):
    max_tokens: Annotated[int, Field(ge=1)]
    temperature: Annotated[float, Field(ge=0, le=1)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    stop_sequences: Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=16)] = []
    stream: bool = False
    metadata: dict[str, Any] | None = None

    def sampling(self) -> Sampling:
        return Sampling(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            stop=tuple(self.stop_sequences),
        )


class CountTokensRequest(_Conversation):
    pass


def _stop_reason(done: WorkerEvent) -> str:
    if done.finish_reason == "length":
        return "max_tokens"
    return "stop_sequence" if done.stop_sequence else "end_turn"


def _sse(event: str, data: dict[str, object]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def _serving(request: Request) -> Serving:
    return request.app.state.serving


@router.post("", response_model=None, openapi_extra=documented_body(MessagesRequest))
async def messages(
    body: Annotated[MessagesRequest, Depends(json_body(MessagesRequest))], request: Request
) -> dict[str, object] | StreamingResponse:
    """A message from the model; with ``stream`` the Messages API's server-sent events."""
    generation = await Generation.open(
        _serving(request),
        PREFIX,
        body.model,
        body.sampling(),
        messages=body.chat(),
        priority=request.headers.get(PRIORITY_HEADER),
    )
    ident, name = f"msg_{generation.request.id}", generation.model.name
    if body.stream:
        return StreamingResponse(
            _events(generation, ident, name),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    result = await generation.collect(request.is_disconnected)
    done = result.done
    return {
        "id": ident,
        "type": "message",
        "role": "assistant",
        "model": name,
        "content": [{"type": "text", "text": result.text}],
        "stop_reason": _stop_reason(done),
        "stop_sequence": done.stop_sequence,
        "usage": {"input_tokens": done.prompt_tokens, "output_tokens": done.completion_tokens},
    }


async def _events(generation: Generation, ident: str, name: str) -> AsyncIterator[bytes]:
    """message_start once the prompt is read (it carries the prompt's token count), the text as
    deltas of one content block, then message_delta with the stop reason and message_stop. A failure
    after the stream began becomes an ``error`` event, as the Messages API does."""
    started = False
    try:
        async for event in generation.stream():
            if not started:
                started = True
                message = {
                    "id": ident,
                    "type": "message",
                    "role": "assistant",
                    "model": name,
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": {"input_tokens": event.prompt_tokens, "output_tokens": 0},
                }
                yield _sse("message_start", {"type": "message_start", "message": message})
                block = {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                }
                yield _sse("content_block_start", block)
                yield _sse("ping", {"type": "ping"})
            if event.type == "delta":
                delta = {"type": "text_delta", "text": event.text}
                yield _sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})
                continue
            yield _sse("content_block_stop", {"type": "content_block_stop", "index": 0})
            finish = {"stop_reason": _stop_reason(event), "stop_sequence": event.stop_sequence}
            usage = {"input_tokens": event.prompt_tokens, "output_tokens": event.completion_tokens}
            yield _sse("message_delta", {"type": "message_delta", "delta": finish, "usage": usage})
            yield _sse("message_stop", {"type": "message_stop"})
    except ApiError as exc:
        yield _sse("error", error_body(exc.status, exc.message))


@router.post("/count_tokens", openapi_extra=documented_body(CountTokensRequest))
async def count(
    body: Annotated[CountTokensRequest, Depends(json_body(CountTokensRequest))], request: Request
) -> dict[str, int]:
    """How many input tokens the messages take in the served model's chat template."""
    return {"input_tokens": await count_tokens(_serving(request), body.model, body.chat())}
