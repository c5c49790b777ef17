"""The FastAPI application: the three APIs, health endpoints, error shapes and a request body limit."""

from __future__ import annotations

import hmac
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edge.api import anthropic_api, ollama_api, openai_api
from edge.api.body import openapi_with_bodies
from edge.api.errors import ApiError, ClientGoneError
from edge.api.generation import Serving
from edge.api.request_id import RequestIdMiddleware, request_id
from edge.audit import Audit, RefusalKind
from edge.logs import fields
from shared.reasons import Reason

log = logging.getLogger(__name__)

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


class BearerAuth:
    """Require the token on TCP, as ``Authorization: Bearer <token>`` or as Anthropic clients send it,
    ``x-api-key: <token>``; the Unix socket is guarded by its file mode. ``/health`` stays open for
    liveness probes."""

    def __init__(self, app: ASGIApp, token: str, audit: Audit) -> None:
        self.app = app
        self.audit = audit
        self.bearer = f"Bearer {token}".encode()
        self.api_key = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        server = scope.get("server")
        over_tcp = server is not None and server[1] is not None
        if scope["type"] != "http" or not over_tcp or scope["path"] == "/health":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        bearer, api_key = headers.get(b"authorization"), headers.get(b"x-api-key")
        # Both compared, always: no shortcut that would time which header was right.
        good_bearer = hmac.compare_digest(bearer or b"", self.bearer)
        good_key = hmac.compare_digest(api_key or b"", self.api_key)
        if good_bearer or good_key:
            await self.app(scope, receive, send)
            return
        what = "missing" if bearer is None and api_key is None else "wrong"
        client = scope.get("client")
        self.audit.refused(
            RefusalKind.API_AUTH,
            Reason.MISSING_TOKEN if bearer is None and api_key is None else Reason.WRONG_TOKEN,
            client[0] if client else "unknown",
            f"{scope['method']} {scope['path']} with a {what} bearer token or x-api-key",
            request=request_id(),
        )
        response = _error(scope["path"], ApiError(401, f"{what} bearer token or x-api-key", "unauthorized"))
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, _nothing, send)


class _TooLargeError(Exception):
    pass


async def _nothing() -> Message:
    return {"type": "http.disconnect"}


def _error(path: str, error: ApiError) -> JSONResponse:
    """Anthropic-shaped errors under /v1/messages, OpenAI-shaped elsewhere under /v1, Ollama-shaped
    for the rest."""
    headers = {"Retry-After": str(error.retry_after_s)} if error.status in (429, 503) else None
    if path.startswith(anthropic_api.PREFIX):
        body = anthropic_api.error_body(error.status, error.message)
    elif path.startswith("/v1"):
        kind = "invalid_request_error" if error.status < 500 and error.status != 429 else "server_error"
        body: dict[str, object] = {
            "error": {"message": error.message, "type": kind, "param": error.param, "code": error.code}
        }
    else:
        body = {"error": error.message}
    return JSONResponse(body, status_code=error.status, headers=headers)


def _invalid_request(exc: RequestValidationError) -> ApiError:
    """A 400 that names every problem with the body, and the first one's field as ``param``."""
    problems = []
    for err in exc.errors():
        location = ".".join(str(p) for p in err["loc"] if p != "body") or "body"
        if err["type"] == "json_invalid":
            problems.append(f"invalid JSON: {err.get('ctx', {}).get('error', err['msg'])}")
        elif err["type"] in ("model_type", "model_attributes_type") and location == "body":
            problems.append("the request body must be a JSON object")
        elif err["type"] == "extra_forbidden":
            problems.append(f"{location}: not supported by this server")
        else:
            message = err["msg"].removeprefix("Value error, ")
            problems.append(message if location == "body" else f"{location}: {message}")
    first = exc.errors()[0] if exc.errors() else {"loc": (), "type": ""}
    param = None if first["type"] == "json_invalid" else ".".join(str(p) for p in first["loc"] if p != "body")
    return ApiError(400, "; ".join(problems), "invalid_request", param or None)


def create_app(
    serving: Serving,
    audit: Audit,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    bearer_token: str | None = None,
) -> FastAPI:
    """The API over ``serving``'s router; refused API credentials go to ``audit``."""
    app = FastAPI(title="immune-edge", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.openapi = lambda: openapi_with_bodies(app)  # type: ignore[method-assign]
    app.state.serving = serving
    router = serving.router
    serving.metrics.watch_queue(lambda: router.queue_depth)
    serving.metrics.watch_refusals(audit.counts)
    app.include_router(openai_api.router)
    app.include_router(ollama_api.router)
    app.include_router(anthropic_api.router)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(request.url.path, exc)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug: the client gets a stable message with the id to report, the log the traceback.
        ident = request_id()
        log.error("request %s failed", ident, exc_info=exc, extra=fields(request=ident, reason="internal"))
        response = _error(request.url.path, ApiError(500, f"internal error (request id {ident})", "internal"))
        response.headers["X-Request-Id"] = ident  # this handler runs outside the id middleware
        return response

    @app.exception_handler(ClientGoneError)
    async def client_gone(request: Request, exc: ClientGoneError) -> Response:
        # Nobody is listening; the status (nginx's "client closed request") is for the access log.
        return Response(status_code=499)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(request.url.path, _invalid_request(exc))

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

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(serving.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if bearer_token is not None:
        app.add_middleware(BearerAuth, token=bearer_token, audit=audit)
    app.add_middleware(RequestIdMiddleware)  # added last: runs first, so every answer has an id
    return app
