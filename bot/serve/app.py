"""The aiohttp application of ``lorabot serve``: routes, middlewares, and running it until Ctrl+C / SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

from aiohttp import web

from bot.access import Access
from bot.config import AccessConfig, Config
from bot.core import Core
from bot.engine import Engine
from bot.serve import lora_admin, openai_api, skills_api
from bot.serve.base_view import BaseOnly
from bot.serve.errors import Handler, openai_errors
from bot.serve.guard import InFlight, guard
from bot.serve.metrics import CONTENT_TYPE, Metrics
from bot.serve.page import index
from bot.serve.settings import ServeSettings, check_settings
from bot.serve.state import STATE, ServeState, state


def build_app(config: Config, engine: Engine, store: object, settings: ServeSettings) -> web.Application:
    """The application over an open engine and store (both stay the caller's to close)."""
    metrics = Metrics(engine)
    # HTTP callers have no platform identity: the API key is the gate, and the in-flight bound the limit.
    access = Access(AccessConfig(rate_limit_per_minute=0))
    app = web.Application(client_max_size=settings.max_body_bytes,
                          middlewares=[_recorded(metrics), openai_errors, guard(settings, metrics)])
    app[STATE] = ServeState(
        config=config, engine=engine, core=Core(config, engine, store, access=access),
        base_core=Core(config, BaseOnly(engine), store, access=access), settings=settings, metrics=metrics,
        in_flight=InFlight(settings, metrics),
    )
    app.router.add_get("/", index)
    app.router.add_get("/favicon.ico", no_icon)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", prometheus)
    app.router.add_get("/v1/models", openai_api.list_models)
    app.router.add_get("/v1/models/{model}", openai_api.get_model)
    app.router.add_post("/v1/completions", openai_api.completions)
    app.router.add_post("/v1/chat/completions", openai_api.chat_completions)
    app.router.add_post("/v1/skills/{skill}", skills_api.skill)
    app.router.add_post("/v1/load_lora_adapter", lora_admin.load_adapter)
    app.router.add_post("/v1/unload_lora_adapter", lora_admin.unload_adapter)
    return app


def _recorded(metrics: Metrics) -> web.middleware:
    """Counts every answer by route and status, and times it (outermost: it sees the final status)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        endpoint = resource.canonical if resource is not None else "unmatched"
        started = time.perf_counter()
        status = "cancelled"
        try:
            response = await handler(request)
            status = str(response.status)
            return response
        finally:
            metrics.requests.labels(endpoint, status).inc()
            metrics.latency.labels(endpoint).observe(time.perf_counter() - started)

    return middleware


async def no_icon(request: web.Request) -> web.Response:
    return web.Response(status=204)   # browsers ask for one; without this each visit logs a 404


async def health(request: web.Request) -> web.Response:
    stats_of = getattr(state(request).engine, "stats", None)
    alive = stats_of().get("alive", True) if stats_of else True
    return web.json_response({"status": "ok" if alive else "engine stopped"}, status=200 if alive else 503)


async def prometheus(request: web.Request) -> web.Response:
    return web.Response(body=state(request).metrics.render(), headers={"Content-Type": CONTENT_TYPE})


@asynccontextmanager
async def running(app: web.Application, settings: ServeSettings) -> AsyncIterator[str]:
    """Listen on ``settings.host``/``port`` (0: a free port) and yield the base URL; stop on exit."""
    # Handler cancellation: a client that disconnects cancels its request, which frees its engine row.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.host, settings.port)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield f"http://{f'[{host}]' if ':' in host else host}:{port}"
    finally:
        await runner.cleanup()


async def serve(config: Config, settings: ServeSettings) -> int:
    """``lorabot serve``: open the store and the engine, answer HTTP until SIGINT/SIGTERM, close both."""
    from bot.app import open_app
    from bot.transports.common import register_secret

    check_settings(settings)
    register_secret(settings.api_key or "")
    async with open_app(config) as bot, running(build_app(config, bot.engine, bot.store, settings), settings) as url:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        key = "a key (Authorization: Bearer)" if settings.api_key else "no key (loopback only)"
        print(f"lorabot serve: {url}/ (the page), {url}/v1 (OpenAI API), {key}; "
              f"adapters: {', '.join(sorted(bot.engine.adapters)) or 'none'}. Press Ctrl+C to stop.",
              file=sys.stderr, flush=True)
        await stop.wait()
    return 0
