"""Model output cannot drive the console's terminal, and the rate limiter's memory stays bounded."""

from __future__ import annotations

import io
import sqlite3
from dataclasses import dataclass

from bot.access import Access
from bot.app import open_app
from bot.config import AccessConfig, Config, replace
from bot.engine import Generation, SamplingParams, TextSink
from bot.messages import Incoming
from bot.transports.console import console_chat
from tests.fakes import FakeEngine

HOSTILE = " \x1b[2J\x1b[31mred\x1b[0m\x07 bell \u202eevil\r\n"


@dataclass
class EscapingEngine(FakeEngine):
    async def generate(self, prompt: str, params: SamplingParams, adapter: str | None,
                       on_text: TextSink | None = None) -> Generation:
        for piece in (HOSTILE[:5], HOSTILE[5:]):
            if on_text:
                await on_text(piece)
        return Generation(text=HOSTILE, prompt_tokens=3, completion_tokens=9, finish_reason="stop")


async def test_console_never_prints_control_sequences_but_logs_the_reply(tmp_path):
    config = replace(Config(root=tmp_path), store={"path": str(tmp_path / "chat.db")})
    out = io.StringIO()
    async with open_app(config, engine=EscapingEngine()) as app:
        await console_chat(app.core, stdin=io.StringIO("/mode story\na story please\n"), stdout=out, user="t")
    shown = out.getvalue()
    assert "red" in shown and "bell" in shown and "evil" in shown
    assert not any(ch in shown for ch in "\x1b\x07\r\u202e")
    logged = sqlite3.connect(tmp_path / "chat.db").execute(
        "SELECT text FROM messages WHERE direction = 'out' ORDER BY id DESC LIMIT 1").fetchone()[0]
    assert "red" in logged


def test_rate_limiter_forgets_idle_users():
    now = [0.0]
    access = Access(AccessConfig(rate_limit_per_minute=5), clock=lambda: now[0])
    for i in range(20_000):
        now[0] += 0.01  # 20,000 different users over 200 s, one message each
        assert access.retry_after(Incoming(platform="t", chat_id=str(i), user_id=str(i), text="hi")) == 0.0
    assert access.tracked_users() < 2 * 6_000 + 1024  # at most ~a minute's worth of users, not all of them
    # A user still inside their window keeps their count.
    user = Incoming(platform="t", chat_id="x", user_id="x", text="hi")
    for _ in range(5):
        assert access.retry_after(user) == 0.0
    for i in range(3_000):
        now[0] += 0.001
        access.retry_after(Incoming(platform="t", chat_id=f"y{i}", user_id=f"y{i}", text="hi"))
    assert access.retry_after(user) > 0
