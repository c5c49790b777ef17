"""A watch on every HTTP error body the tests receive through httpx: none may carry internal text
(a traceback, a pydantic dump, an exception's class name). Installed for the whole test session by
conftest, so every error path any test exercises is checked, not only the ones a test names."""

from __future__ import annotations

import re

import httpx

#: What internal details look like when they leak into a response.
INTERNAL_TEXT = re.compile(
    r"Traceback \(most recent call last\)|validation errors? for |errors\.pydantic\.dev|input_value="
    r"|File \"/|site-packages|\b[A-Z]\w*(?:Error|Exception)\b"
)

#: (url, status, the offending text) of each leaking response since the last check.
leaks: list[tuple[str, int, str]] = []


def _check(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        text = response.text
    except (httpx.ResponseNotRead, UnicodeDecodeError):
        return
    if match := INTERNAL_TEXT.search(text):
        excerpt = text[max(match.start() - 80, 0) :][:300]
        leaks.append((str(response.request.url), response.status_code, excerpt))


def install() -> None:
    """Wrap ``httpx.Response.read``/``aread`` (what non-streaming calls go through) once."""
    if getattr(httpx.Response.read, "_watched", False):
        return
    read, aread = httpx.Response.read, httpx.Response.aread

    def watched_read(self: httpx.Response) -> bytes:
        content = read(self)
        _check(self)
        return content

    async def watched_aread(self: httpx.Response) -> bytes:
        content = await aread(self)
        _check(self)
        return content

    watched_read._watched = True  # type: ignore[attr-defined]
    httpx.Response.read = watched_read  # type: ignore[method-assign]
    httpx.Response.aread = watched_aread  # type: ignore[method-assign]


def take() -> list[tuple[str, int, str]]:
    """The leaks seen since the last call."""
    found = list(leaks)
    leaks.clear()
    return found
