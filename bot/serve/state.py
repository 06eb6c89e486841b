"""What every handler of one server shares, kept on the aiohttp application under ``STATE``."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from aiohttp import web

from bot.config import Config
from bot.core import Core
from bot.engine import Engine
from bot.serve.guard import InFlight
from bot.serve.metrics import Metrics
from bot.serve.settings import ServeSettings


@dataclass
class ServeState:
    config: Config
    engine: Engine
    core: Core            # skills, as `lorabot ask` runs them
    base_core: Core       # the same skills on the bare base model (bot.serve.base_view)
    settings: ServeSettings
    metrics: Metrics
    in_flight: InFlight
    started: int = field(default_factory=lambda: int(time.time()))
    adapters_lock: asyncio.Lock = field(default_factory=asyncio.Lock)   # one adapter load/unload at a time


STATE: web.AppKey[ServeState] = web.AppKey("lorabot_serve", ServeState)


def state(request: web.Request) -> ServeState:
    return request.app[STATE]
