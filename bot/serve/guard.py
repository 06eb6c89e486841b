"""Who may call the API, and how much at once.

* API key: with ``--api-key-env`` every route but ``/`` and ``/health`` needs ``Authorization: Bearer
  <key>``, compared in constant time.
* Host check: a server on a loopback address answers only requests addressed to a loopback name, so a
  web page elsewhere cannot reach it through a DNS name rebound to 127.0.0.1.
* POST bodies must be JSON (``Content-Type: application/json``): a browser cannot send that to another
  origin without a CORS preflight, which this server never grants, so other sites cannot drive it.
* A bounded number of model requests in flight: past it, 429 with ``Retry-After`` instead of a queue
  that grows without end.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from contextlib import contextmanager

from aiohttp import web

from bot.serve.errors import ApiError, Handler
from bot.serve.metrics import Metrics
from bot.serve.settings import LOOPBACK_NAMES, ServeSettings, is_loopback

OPEN_PATHS = frozenset({"/", "/favicon.ico", "/health"})


def guard(settings: ServeSettings, metrics: Metrics) -> web.middleware:
    loopback_only = is_loopback(settings.host)
    key = settings.api_key.encode() if settings.api_key else None

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if loopback_only and not _loopback_host(request.url.host or ""):
            metrics.rejected.labels("host").inc()
            raise ApiError(403, "This server answers only requests addressed to localhost.", code="host_not_allowed")
        if key is not None and request.path not in OPEN_PATHS:
            given = request.headers.get("Authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key):
                metrics.rejected.labels("auth").inc()
                message = ("Incorrect API key provided." if given else
                           "You didn't provide an API key: send `Authorization: Bearer <key>`.")
                raise ApiError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if request.method == "POST" and request.content_type != "application/json":
            raise ApiError(415, f"POST bodies must be JSON (Content-Type: application/json), not "
                           f"{request.content_type!r}.", code="unsupported_media_type")
        return await handler(request)

    return middleware


def _loopback_host(name: str) -> bool:
    name = name.strip("[]").lower()
    return name in LOOPBACK_NAMES or is_loopback(name)


class InFlight:
    """Counts model requests being answered; refuses one over the limit (no lock: one event loop)."""

    def __init__(self, settings: ServeSettings, metrics: Metrics):
        self.limit, self.retry_after, self.metrics = settings.max_in_flight, settings.retry_after_s, metrics
        self.active = 0

    @contextmanager
    def slot(self) -> Iterator[None]:
        if self.active >= self.limit:
            self.metrics.rejected.labels("queue_full").inc()
            raise ApiError(429, f"The server is answering {self.active} requests, its limit; retry after "
                           f"{self.retry_after} s.", code="rate_limit_exceeded",
                           headers={"Retry-After": str(self.retry_after)})
        self.active += 1
        self.metrics.in_flight.set(self.active)
        try:
            yield
        finally:
            self.active -= 1
            self.metrics.in_flight.set(self.active)
