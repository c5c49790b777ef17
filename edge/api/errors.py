"""What the API answers when a request cannot be served: the error every API renders in its own
shape, and the fixed messages for failures of the server rather than of the request."""

from __future__ import annotations

import logging

from edge.api.request_id import request_id
from edge.logs import fields

log = logging.getLogger(__name__)


class ClientGoneError(Exception):
    """The client hung up before its answer was ready; the generation was cancelled."""


#: What a client is told when the server, not its request, failed; the cause is logged under the
#: request's id (``X-Request-Id``), never sent: it can hold internal messages and settings.
FAILURE_MESSAGES = {
    "worker_failed": "the model worker failed while answering; retry the request",
}


class ApiError(Exception):
    """An error with its HTTP status; each API renders it in its own shape."""

    def __init__(
        self, status: int, message: str, code: str, param: str | None = None, retry_after_s: int = 1
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.retry_after_s = retry_after_s


def server_failure(code: str, cause: object) -> ApiError:
    """A 503 with the fixed message of ``code``; ``cause`` goes to the log only."""
    ident = request_id()
    log.warning("request %s failed (%s): %s", ident, code, cause, extra=fields(request=ident, reason=code))
    return ApiError(503, FAILURE_MESSAGES[code], code)
