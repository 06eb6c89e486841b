"""Fixtures for transport tests: a real SQLite store (a temporary file, read back with sqlite3)."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import discord
import pytest
import yarl

from bot.store import AsyncStore
from bot.transports import discord_chat
from tests.transports.dc_server import FakeDiscord
from tests.transports.tg_server import FakeBotAPI


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "lorabot.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[AsyncStore]:
    s = await AsyncStore.open(db_path)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
def query(db_path: Path) -> Callable[..., list[tuple]]:
    """Read the database the way an operator would, independent of the store's connection."""

    def run(sql: str, params: tuple = ()) -> list[tuple]:
        conn = sqlite3.connect(db_path)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    return run


@pytest.fixture
async def api() -> AsyncIterator[FakeBotAPI]:
    """The loopback Telegram Bot API server."""
    server = await FakeBotAPI().start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def fake(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeDiscord]:
    """The loopback Discord gateway and REST API, with discord.py pointed at it."""
    server = await FakeDiscord().start()
    monkeypatch.setattr(discord.http.Route, "BASE", server.api_base)
    monkeypatch.setattr(discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(server.gateway_url))
    monkeypatch.setattr(discord_chat, "GUILD_READY_TIMEOUT_S", 0.05)  # the fake sends every guild at once
    try:
        yield server
    finally:
        await server.stop()
