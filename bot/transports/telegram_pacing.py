"""Pacing Bot API calls ahead of Telegram's flood limits, so a reply waits a moment instead of drawing 429s.

Telegram allows about one message per second in a chat (short bursts pass), 20 per minute in a group and
about 30 per second for the whole bot; over them it answers 429 with a wait, and repeated 429s make the
waits longer. PTB hands every call to a ``BaseRateLimiter``; this one keeps a leaky bucket (aiolimiter,
PTB's ``rate-limiter`` extra) per chat, per group and for the bot. Unlike PTB's ``AIORateLimiter`` it
paces private chats too, and it leaves "typing…" actions out: they are cosmetic and must not use up a
reply's slot. Flood-control answers that still come are handled by the caller (``retrying``), which
waits as long as Telegram says.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from aiolimiter import AsyncLimiter
from telegram.ext import BaseRateLimiter

UNPACED = frozenset({"sendChatAction"})
MAX_IDLE_BUCKETS = 1024  # beyond this many chats, buckets that are full again are dropped


@dataclass(frozen=True)
class Rate:
    """At most ``count`` calls per ``period_s`` seconds, in bursts of up to ``count``."""

    count: float
    period_s: float


@dataclass(frozen=True)
class TelegramLimits:
    """Telegram's published limits (core.telegram.org/bots/faq: "My bot is hitting limits")."""

    per_chat: Rate = Rate(1, 1.0)
    per_group: Rate = Rate(20, 60.0)
    overall: Rate = Rate(30, 1.0)


class _Buckets:
    """One limiter per key, made on first use; idle ones are dropped once there are many."""

    def __init__(self, rate: Rate) -> None:
        self.rate = rate
        self._buckets: dict[str, AsyncLimiter] = {}

    def __getitem__(self, key: str) -> AsyncLimiter:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= MAX_IDLE_BUCKETS:
                # A bucket with its full capacity back remembers nothing: dropping it changes no wait.
                self._buckets = {k: b for k, b in self._buckets.items() if not b.has_capacity(b.max_rate)}
            bucket = self._buckets[key] = AsyncLimiter(self.rate.count, self.rate.period_s)
        return bucket

    def __len__(self) -> int:
        return len(self._buckets)


class TelegramPacer(BaseRateLimiter[None]):
    """Waits, before each call addressed to a chat, until the chat, its group and the bot may send again."""

    def __init__(self, limits: TelegramLimits | None = None) -> None:
        self.limits = limits or TelegramLimits()
        self.chats = _Buckets(self.limits.per_chat)
        self.groups = _Buckets(self.limits.per_group)
        self.overall = AsyncLimiter(self.limits.overall.count, self.limits.overall.period_s)

    async def initialize(self) -> None:
        pass

    async def shutdown(self) -> None:
        pass

    async def process_request(
        self,
        callback: Callable[..., Coroutine[Any, Any, bool | dict[str, Any] | list[dict[str, Any]]]],
        args: Any,
        kwargs: dict[str, Any],
        endpoint: str,
        data: dict[str, Any],
        rate_limit_args: None,
    ) -> bool | dict[str, Any] | list[dict[str, Any]]:
        chat = data.get("chat_id")
        if chat is None or endpoint in UNPACED:  # getMe, answerCallbackQuery, getFile…: not messages
            return await callback(*args, **kwargs)
        key = str(chat)
        # The narrowest limit first, so a call waiting for its chat holds no slot of the bot's total.
        await self.chats[key].acquire()
        if key.startswith(("-", "@")):  # groups, supergroups and channels
            await self.groups[key].acquire()
        await self.overall.acquire()
        return await callback(*args, **kwargs)
