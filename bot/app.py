"""Wiring: config -> store + engine -> core. Dependencies are built here and passed in, never global."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

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
