"""Errors as OpenAI's API writes them: ``{"error": {"message", "type", "param", "code"}}`` with a status.

OpenAI's clients turn the status into an exception class (400 BadRequestError, 401 AuthenticationError,
404 NotFoundError, 429 RateLimitError, ...) and keep this body, so every failure the server can answer
goes through here, including aiohttp's own (unknown route, wrong method, body too large).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from bot.errors import LorabotError, UserInputError

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error",
          404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
          415: "invalid_request_error", 429: "rate_limit_error"}


class ApiError(Exception):
    """A request the server answers with an OpenAI-shaped error."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status, headers=self.headers)


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def from_exception(exc: BaseException) -> ApiError:
    """The error a failed model request is answered with (its message is written for the reader)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, UserInputError):
        return invalid(str(exc))
    if isinstance(exc, LorabotError):
        return ApiError(500, str(exc), code="engine_error")
    log.error("unexpected error while answering a request", exc_info=exc)
    return ApiError(500, "The server failed on this request; the error has been logged.", code="internal_error")


@web.middleware
async def openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = {404: f"No route {request.method} {request.path}; see GET /v1/models and the README.",
                   405: f"{request.method} is not allowed on {request.path}.",
                   413: f"The request body is over the server's limit ({exc.text or 'too large'})."}
        headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
        return ApiError(exc.status, message.get(exc.status, exc.reason), code=_code(exc.status),
                        headers=headers).response()
    except LorabotError as exc:
        return from_exception(exc).response()


def _code(status: int) -> str | None:
    return {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(status)
