"""End to end with the real bundled SmolLM2-135M: console transport -> core -> engine -> SQLite file."""

from __future__ import annotations

import io
import json
import sqlite3
from pathlib import Path

import pytest

from bot.app import open_app
from bot.config import Config, replace
from bot.transports.console import console_chat

pytestmark = pytest.mark.real_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def real_engine():
    from bot.app import load_engine

    config = replace(Config(root=REPO), model={"dtype": "float32"})
    engine = load_engine(config, progress=False)
    yield engine


def small_config(tmp_path: Path) -> Config:
    return replace(
        Config(root=REPO), store={"path": str(tmp_path / "chat.db")},
        story={"max_new_tokens": 24}, generation={"max_new_tokens": 24, "temperature": 0.0},
    )


async def test_scripted_console_session_is_logged(tmp_path, real_engine):
    config = small_config(tmp_path)
    script = "\n".join([
        "/skills",
        "/mode story",
        "a little fox who wanted to fly",
        "/compare sentiment I really enjoyed this wonderful film!",
        "/mode chat",
        "What is the capital of France?",
    ]) + "\n"
    out = io.StringIO()
    async with open_app(config, engine=_Borrowed(real_engine)) as app:
        handled = await console_chat(app.core, stdin=io.StringIO(script), stdout=out, user="tester")
    assert handled == 6
    text = out.getvalue()
    assert "• story" in text and "Mode set to story" in text and "Base model (pre-trained only)" in text

    db = sqlite3.connect(config.path(config.store.path))
    rows = db.execute("SELECT direction, skill, status, text, result_json FROM messages ORDER BY id").fetchall()
    assert len(rows) == 12  # every message and every reply
    assert [r[0] for r in rows] == ["in", "out"] * 6
    assert all(r[2] in ("answered", "sent") for r in rows)
    story_in, story_out = rows[4], rows[5]
    assert story_in[1] == "story" and len(story_out[3].split()) >= 5
    compare = json.loads(rows[7][4])
    assert set(compare["scores"]) == {"negative", "neutral", "positive"} and "base" in compare
    chat_out = rows[11]
    assert chat_out[1] == "chat" and "paris" in chat_out[3].lower()

    # /forget removes the user's rows everywhere.
    async with open_app(config, engine=_Borrowed(real_engine)) as app:
        await console_chat(app.core, stdin=io.StringIO("/forget\n"), stdout=io.StringIO(), user="tester")
    assert db.execute("SELECT count(*) FROM messages").fetchone()[0] == 0
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


class _Borrowed:
    """Lends the module's engine to open_app without letting it close it (it is shared by the tests)."""

    def __init__(self, engine):
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    async def close(self) -> None:
        pass
