"""Fixtures for transport tests: a real SQLite store (a temporary file, read back with sqlite3)."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from bot.store import AsyncStore


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
