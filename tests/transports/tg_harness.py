"""Running the real Telegram transport against the loopback Bot API server (tg_server.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from bot.config import Config, replace
from bot.core import Core
from bot.store import AsyncStore
from bot.transports.telegram_chat import TelegramTransport
from bot.transports.telegram_pacing import Rate, TelegramLimits
from tests.fakes import FakeEngine
from tests.transports.tg_server import TOKEN, FakeBotAPI

# Telegram's own pace (1 message/s per chat) would make every multi-message test take seconds; the tests
# that check pacing pass their own limits.
QUICK = TelegramLimits(per_chat=Rate(100, 1.0), per_group=Rate(100, 1.0), overall=Rate(1000, 1.0))


@contextlib.asynccontextmanager
async def running(
    api: FakeBotAPI, store: AsyncStore, engine: FakeEngine | None = None, *, limits: TelegramLimits = QUICK,
    **sections: Any,
) -> AsyncIterator[TelegramTransport]:
    sections.setdefault("telegram", {})
    sections["telegram"] = {"base_url": api.base_url, "edit_interval_s": 0.25, **sections["telegram"]}
    config = replace(Config(), **sections)
    transport = TelegramTransport(Core(config, engine or FakeEngine(), store), config, TOKEN, limits=limits)
    await asyncio.wait_for(transport.start(), 10)
    try:
        yield transport
    finally:
        await asyncio.wait_for(transport.stop(), 10)
