"""Running the real Discord transport against the loopback gateway and REST server (dc_server.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from bot.config import Config, replace
from bot.core import Core
from bot.store import AsyncStore
from bot.transports.discord_chat import DiscordTransport
from tests.fakes import FakeEngine
from tests.transports.dc_server import TOKEN, FakeDiscord


@contextlib.asynccontextmanager
async def running(
    fake: FakeDiscord, store: AsyncStore, engine: FakeEngine | None = None, **sections: Any,
) -> AsyncIterator[DiscordTransport]:
    sections["discord"] = {"edit_interval_s": 0.25, **sections.get("discord", {})}
    config = replace(Config(), **sections)
    transport = DiscordTransport(Core(config, engine or FakeEngine(), store), config, TOKEN)
    await asyncio.wait_for(transport.start(), 10)
    try:
        yield transport
    finally:
        await asyncio.wait_for(transport.stop(), 10)
