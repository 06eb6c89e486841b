"""Who may talk to the bot, who is an admin, and how often: one set of rules for every transport."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from bot.config import AccessConfig
from bot.messages import Incoming


def _ids(msg: Incoming) -> set[str]:
    # A raw id that itself contains ":" ("telegram:1", "role:5") must not match qualified entries.
    ids = {f"{msg.platform}:{msg.user_id}"} | ({msg.user_id} if ":" not in msg.user_id else set())
    ids |= {f"role:{r}" for r in msg.roles} | {f"{msg.platform}-role:{r}" for r in msg.roles}
    return ids


def _chat_ids(msg: Incoming) -> set[str]:
    ids = {f"{msg.platform}:{msg.chat_id}"} | ({msg.chat_id} if ":" not in msg.chat_id else set())
    if msg.guild_id:
        ids |= {f"{msg.platform}:{msg.guild_id}"} | ({msg.guild_id} if ":" not in msg.guild_id else set())
    return ids


class Access:
    def __init__(self, config: AccessConfig, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self._clock = clock
        self._recent: dict[str, deque[float]] = {}
        self._sweep_at = 1024  # entries; above it, users idle for a minute are forgotten (amortised O(1))

    def allowed(self, msg: Incoming) -> bool:
        """User allowlist everywhere; chat/guild allowlist in group chats (DMs follow the user list)."""
        if self.config.allowed_users and not (_ids(msg) & set(self.config.allowed_users)):
            return False
        chats = set(self.config.allowed_chats)
        if not chats:
            return True
        if msg.is_group:
            return bool(_chat_ids(msg) & chats)
        # A DM is a chat too: open when a user list admitted this user, or when the DM itself is listed.
        return bool(self.config.allowed_users) or bool(_chat_ids(msg) & chats)

    def tracked_users(self) -> int:
        """How many users the rate limiter currently remembers (bounded: idle ones are swept)."""
        return len(self._recent)

    def is_admin(self, msg: Incoming) -> bool:
        return bool(_ids(msg) & set(self.config.admins))

    def refund(self, msg: Incoming) -> None:
        """Take back the last request ``retry_after`` counted for this user (it was refused as malformed)."""
        window = self._recent.get(f"{msg.platform}:{msg.user_id}")
        if window:
            window.pop()

    def retry_after(self, msg: Incoming) -> float:
        """0 if the user may send now (and count it), else seconds until they may."""
        limit = self.config.rate_limit_per_minute
        if limit <= 0:
            return 0.0
        now = self._clock()
        if len(self._recent) >= self._sweep_at:
            self._recent = {k: w for k, w in self._recent.items() if w and now - w[-1] < 60.0}
            self._sweep_at = max(1024, 2 * len(self._recent))
        window = self._recent.setdefault(f"{msg.platform}:{msg.user_id}", deque())
        while window and now - window[0] >= 60.0:
            window.popleft()
        if len(window) >= limit:
            return max(0.1, 60.0 - (now - window[0]))
        window.append(now)
        return 0.0
