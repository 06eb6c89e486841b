"""Wiring: config -> store + engine -> core. Dependencies are built here and passed in, never global."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Protocol

from bot.config import Config
from bot.core import Core
from bot.engine import Engine
from bot.engine import load_engine as _load_engine

log = logging.getLogger(__name__)


@dataclass
class App:
    config: Config
    core: Core
    engine: Engine
    store: object


def load_engine(config: Config, *, progress: bool = True) -> Engine:
    """The in-process engine (blocking: run it off the event loop); tests replace this seam."""
    return _load_engine(config, progress=progress)


@asynccontextmanager
async def open_app(config: Config, *, engine: Engine | None = None, progress: bool = True) -> AsyncIterator[App]:
    """Open the store, load the engine (unless given), and close both on exit, in that order."""
    from bot.store import AsyncStore, Store

    store = AsyncStore(Store.open(config.path(config.store.path)))
    try:
        if config.store.retention_days:
            removed = await store.purge_older_than(config.store.retention_days)
            if removed:
                log.info("retention: removed %d messages older than %d days", removed, config.store.retention_days)
        if engine is None:
            engine = await asyncio.to_thread(load_engine, config, progress=progress)
        for problem in engine.problems:
            log.warning("%s", problem)
        try:
            yield App(config=config, core=Core(config, engine, store), engine=engine, store=store)
        finally:
            await engine.close()
    finally:
        await store.close()


class Transport(Protocol):
    """A platform connection ``run_transports`` can supervise (TelegramTransport, DiscordTransport)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


async def run_transports(transports: Sequence[Transport], stop: asyncio.Event) -> int:
    """Start every transport and serve until ``stop`` is set, or until one of them loses its connection
    for good; then stop them all. Returns the process exit status: 0 after ``stop``, 1 when a connection
    was lost, so a supervisor (systemd, Docker's restart policy) restarts lorabot instead of it staying
    up without a connection.

    A transport reports such a loss through an optional ``lost`` future (resolving with the reason);
    passing network trouble is the platform library's to retry, and it does so itself.
    """
    started: list[Transport] = []
    stopping = asyncio.ensure_future(stop.wait())
    try:
        for transport in transports:
            await transport.start()
            started.append(transport)
        names = ", ".join(_name(t) for t in started)
        print(f"lorabot is running on {names}. Press Ctrl+C to stop.", file=sys.stderr)
        losses = {lost: t for t in started if (lost := getattr(t, "lost", None)) is not None}
        await asyncio.wait({stopping, *losses}, return_when=asyncio.FIRST_COMPLETED)
        status = 0
        for lost, transport in losses.items():
            if lost.done():
                log.error("%s stopped serving: %s; lorabot exits with status 1", _name(transport), lost.result())
                status = 1
        return status
    finally:
        stopping.cancel()
        for transport in reversed(started):
            try:
                await transport.stop()
            except Exception:
                log.exception("stopping %s failed", _name(transport))


def _name(transport: object) -> str:
    return type(transport).__name__.replace("Transport", "")
