"""The FastAPI application: both APIs, health endpoints, error shapes and a request body limit."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edge.api import ollama_api, openai_api
from edge.api.generation import ApiError
from edge.runtime.router import ModelRouter

#: Slips' longest prompts are ~3,200 tokens (~13 kB); 1 MiB leaves room and stops abuse early.
DEFAULT_MAX_BODY_BYTES = 1024 * 1024


class BodyLimit:
    """Reject request bodies over the limit with 413, whether or not Content-Length is sent."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(scope, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _TooLargeError
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLargeError:
            await self._too_large(scope, send)

    async def _too_large(self, scope: Scope, send: Send) -> None:
        response = _error(
            scope["path"], ApiError(413, f"request body exceeds {self.max_bytes} bytes", "body_too_large")
        )
        await response(scope, _nothing, send)


class _TooLargeError(Exception):
    pass


async def _nothing() -> Message:
    return {"type": "http.disconnect"}


def _error(path: str, error: ApiError) -> JSONResponse:
    """OpenAI-shaped errors under /v1, Ollama-shaped elsewhere."""
    headers = {"Retry-After": "1"} if error.status in (429, 503) else None
    if path.startswith("/v1"):
        kind = "invalid_request_error" if error.status < 500 and error.status != 429 else "server_error"
        body: dict[str, object] = {
            "error": {"message": error.message, "type": kind, "param": error.param, "code": error.code}
        }
    else:
        body = {"error": error.message}
    return JSONResponse(body, status_code=error.status, headers=headers)


def create_app(router: ModelRouter, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The API over ``router``."""
    app = FastAPI(title="immune-edge", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.router = router
    app.include_router(openai_api.router)
    app.include_router(ollama_api.router)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(request.url.path, exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            location = ".".join(str(p) for p in err["loc"] if p != "body") or "body"
            if err["type"] == "json_invalid":
                problems.append(
                    f"invalid JSON at byte {err['loc'][-1]}: {err.get('ctx', {}).get('error', '')}"
                )
            elif err["type"] == "model_attributes_type" or location == "body":
                problems.append(
                    "the request body must be a JSON object (send Content-Type: application/json)"
                )
            else:
                problems.append(f"{location}: {err['msg']}")
        first = exc.errors()[0] if exc.errors() else {"loc": (), "type": ""}
        param = (
            None if first["type"] == "json_invalid" else ".".join(str(p) for p in first["loc"] if p != "body")
        )
        return _error(request.url.path, ApiError(400, "; ".join(problems), "invalid_request", param or None))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        active = router.active
        if active is None or not active.worker.alive:
            return JSONResponse({"status": "not ready"}, status_code=503)
        return JSONResponse({"status": "ready", "model": active.name})

    @app.get("/")
    async def root() -> dict[str, str]:
        return {"status": "immune-edge is running"}  # Ollama clients probe "/" for liveness

    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    return app
