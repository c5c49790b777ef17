"""Every API request gets an id, returned in ``X-Request-Id``: clients see short, stable error
messages, and the details of a failure are logged under this id, so one can be found from the other."""

from __future__ import annotations

import re
import secrets
from contextvars import ContextVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = "x-request-id"
#: A client's own id is kept when it looks like one (so a Slips log line can be matched); otherwise
#: a fresh one: the header must not carry arbitrary text into our logs.
_CLIENT_ID = re.compile(r"[A-Za-z0-9._-]{8,64}")
_current: ContextVar[str] = ContextVar("request_id", default="-")


def request_id() -> str:
    """The id of the request being handled (``-`` outside one). Threads started with Starlette's
    ``run_in_threadpool`` see it too: anyio copies the context into them."""
    return _current.get()


class RequestIdMiddleware:
    """Sets the id for the request's context and adds it to the response headers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = dict(scope.get("headers", [])).get(HEADER.encode(), b"").decode("latin-1")
        ident = sent if _CLIENT_ID.fullmatch(sent) else secrets.token_hex(8)
        # Not reset afterwards: each request is its own task (and context), and the handler of
        # unexpected errors, outside this middleware, still needs the id.
        _current.set(ident)

        async def with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (HEADER.encode(), ident.encode())]
            await send(message)

        await self.app(scope, receive, with_header)
