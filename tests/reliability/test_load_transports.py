"""Load through the real transports (python-telegram-bot, discord.py) against the loopback fakes in
tests/transports: many users at once, mixed skills, DMs and groups, a rate limit that bites. Every message
gets exactly one visible reply, every message and reply is in SQLite, nothing is left pending, and what
each chat shows is what the log says it was sent. FakeEngine keeps the model out of it."""

from __future__ import annotations

import asyncio
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import discord
import pytest
import yarl

from bot.config import Config, replace
from bot.core import Core
from bot.store import AsyncStore
from bot.transports import discord_chat
from bot.transports.discord_chat import DiscordTransport
from bot.transports.telegram_chat import TelegramTransport
from tests.fakes import FakeEngine
from tests.transports import dc_server, tg_server
from tests.transports.tg_harness import QUICK

USERS = 20
PER_USER = 5
LIMIT = 4  # per minute: each user's 5th model request is refused
SKILLS = ["/sentiment I love this {i}", "/ner Alice met Bob in Paris {i}", "/ask where? | The cat sat in Rome {i}",
          "/story a brave mouse {i}", "/chat hello number {i}"]


def _texts(user: int) -> list[str]:
    # Rotate so every skill is in flight at the same time across users.
    return [SKILLS[(user + k) % len(SKILLS)].format(i=f"{user}-{k}") for k in range(PER_USER)]


def _config(**sections: dict) -> Config:
    return replace(Config(), access={"rate_limit_per_minute": LIMIT}, **sections)


def _check_log(db: Path, shown: Counter[tuple[str, str]]) -> None:
    conn = sqlite3.connect(db)
    try:
        statuses = dict(conn.execute("SELECT status, count(*) FROM messages WHERE direction='in' GROUP BY status"))
        replies = conn.execute(
            "SELECT c.platform_chat_id, o.text FROM messages o JOIN chats c ON c.id = o.chat_id "
            "WHERE o.direction = 'out'").fetchall()
        unanswered = conn.execute(
            "SELECT count(*) FROM messages i WHERE i.direction = 'in' AND NOT EXISTS "
            "(SELECT 1 FROM messages o WHERE o.reply_to = i.id)").fetchone()[0]
    finally:
        conn.close()
    # Messages over the rate limit are refused before anything is written; every other one is logged.
    assert statuses == {"answered": USERS * LIMIT}  # none pending
    assert unanswered == 0 and len(replies) == USERS * LIMIT
    too_quick = Counter({k: n for k, n in shown.items() if "too quickly" in k[1]})
    assert sum(too_quick.values()) == USERS * (PER_USER - LIMIT)
    assert Counter((chat, text) for chat, text in replies) == shown - too_quick  # what users saw was logged


@pytest.fixture
async def file_store(tmp_path: Path) -> AsyncIterator[AsyncStore]:
    store = await AsyncStore.open(tmp_path / "log.db")
    try:
        yield store
    finally:
        await store.close()


async def test_telegram_under_load(tmp_path: Path, file_store: AsyncStore) -> None:
    api = await tg_server.FakeBotAPI().start()
    config = _config(telegram={"base_url": api.base_url, "edit_interval_s": 0.2})
    transport = TelegramTransport(Core(config, FakeEngine(story_words=30, delay=0.001), file_store), config,
                                  tg_server.TOKEN, limits=QUICK)  # faster than Telegram's pace, on purpose
    try:
        await asyncio.wait_for(transport.start(), 20)
        for k in range(PER_USER):
            for user in range(USERS):
                uid = 1000 + user
                group = user % 2 == 0  # half the users talk in one busy group, half in DMs
                api.push({"message": tg_server.message(
                    _texts(user)[k], user_id=uid, chat_id=-100 if group else uid, group=group)})
        await api.wait_for("sendMessage", count=USERS * PER_USER, timeout=90)
        await api.settle(quiet=0.5, timeout=30)  # trailing edits of streamed stories
    finally:
        await asyncio.wait_for(transport.stop(), 20)
        await api.stop()
    sends = api.of("sendMessage")
    assert len(sends) == USERS * PER_USER  # exactly one reply message each (all fit in one message)
    final = {5000 + n: (str(c["chat_id"]), c["text"]) for n, c in enumerate(sends)}  # the fake's id sequence
    for edit in api.of("editMessageText"):
        final[int(edit["message_id"])] = (str(edit["chat_id"]), edit["text"])
    shown = Counter(final.values())
    assert not any("went wrong" in text for _, text in shown)
    assert sum(n for (_, text), n in shown.items() if "too quickly" in text) == USERS * (PER_USER - LIMIT)
    _check_log(tmp_path / "log.db", shown)


async def test_discord_under_load(tmp_path: Path, file_store: AsyncStore, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = await dc_server.FakeDiscord().start()
    monkeypatch.setattr(discord.http.Route, "BASE", fake.api_base)
    monkeypatch.setattr(discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(fake.gateway_url))
    monkeypatch.setattr(discord_chat, "GUILD_READY_TIMEOUT_S", 0.05)
    config = _config(discord={"edit_interval_s": 0.2})
    transport = DiscordTransport(Core(config, FakeEngine(story_words=30, delay=0.001), file_store), config,
                                 dc_server.TOKEN)
    mention = f"<@{dc_server.BOT_ID}> "
    try:
        await asyncio.wait_for(transport.start(), 20)
        for k in range(PER_USER):
            for user in range(USERS):
                author = dc_server.discord_user(2000 + user, f"user{user}")
                if user % 2 == 0:  # the shared server channel, addressed by mention
                    payload = dc_server.message_payload(mention + _texts(user)[k], author=author,
                                                        mentions=[dc_server.bot_mention()])
                else:
                    payload = dc_server.message_payload(_texts(user)[k], author=author, guild=False,
                                                        channel_id=3000 + user)
                await fake.dispatch("MESSAGE_CREATE", payload)
        await fake.wait_for("POST", "/messages", count=USERS * PER_USER, timeout=90)
        await fake.settle(quiet=0.5, timeout=30)
    finally:
        await asyncio.wait_for(transport.stop(), 20)
        await fake.stop()
    posts = [r for r in fake.requests if r.method == "POST" and r.path.endswith("/messages")]
    assert len(posts) == USERS * PER_USER
    # The final text of each reply: its last edit, else what was posted.
    by_id = {int(m["id"]): m for m in fake.messages.values() if m["author"]["id"] == str(dc_server.BOT_ID)}
    shown = Counter((m["channel_id"], m["content"]) for m in by_id.values())
    assert not any("went wrong" in text for _, text in shown)
    _check_log(tmp_path / "log.db", shown)
