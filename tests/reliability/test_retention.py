"""Retention and the operator's `lorabot db` commands on a real database file.

Old rows are made by writing real exchanges and then moving their created_at back in time (the store
stamps rows with the current time; waiting days is not an option).
"""

from __future__ import annotations

import json
import logging
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bot.app import open_app
from bot.config import load_config, replace
from bot.messages import Incoming
from bot.store import Store
from tests.fakes import FakeEngine
from tests.reliability.conftest import cli, lorabot, query, write_config


def _age(db: Path, message_ids: list[int], days: float) -> None:
    """Move messages ``days`` into the past (the only way to get old rows without waiting)."""
    moment = (datetime.now(UTC) - timedelta(days=days)).isoformat(timespec="microseconds")
    with sqlite3.connect(db) as conn:  # commits on success
        conn.execute(f"UPDATE messages SET created_at = ? WHERE id IN ({','.join('?' * len(message_ids))})",
                     (moment, *message_ids))
    conn.close()


def _exchange(store: Store, chat: int, user: int, text: str, *, answer: bool = True) -> tuple[int, int | None]:
    question = store.log_incoming(chat_id=chat, user_id=user, text=text, skill="chat")
    if not answer:
        return question, None
    return question, store.log_reply(chat_id=chat, reply_to=question, text=f"re: {text}", skill="chat",
                                     latency_ms=12.5)


@pytest.fixture
def aged_db(tmp_path: Path) -> Path:
    """Old (40 days), borderline (20 days) and fresh exchanges, votes on some, one old question pending."""
    db = tmp_path / "log.db"
    with Store.open(db) as store:
        chat, user = store.ensure_chat("test", "c"), store.ensure_user("test", "u", "Ann")
        old_q, old_r = _exchange(store, chat, user, "old question")
        # Asked long ago, answered just now (e.g. after a restart): the reply goes with its question.
        late_q, late_r = _exchange(store, chat, user, "old question, late answer")
        pending_q, _ = _exchange(store, chat, user, "old and never answered", answer=False)
        mid_q, mid_r = _exchange(store, chat, user, "twenty days ago")
        _, new_r = _exchange(store, chat, user, "fresh question")
        for reply in (old_r, late_r, new_r):
            store.add_feedback(message_id=reply, platform="test", platform_user_id="u", value=1)
    _age(db, [old_q, old_r, late_q, pending_q], 40)
    _age(db, [mid_q, mid_r], 20)
    return db


def _texts(db: Path) -> list[str]:
    return [r[0] for r in query(db)("SELECT text FROM messages ORDER BY id")]


async def test_retention_purges_old_messages_when_the_bot_starts(aged_db: Path, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    config = load_config(write_config(tmp_path / "config.toml", store={"path": str(aged_db), "retention_days": 30}))
    with caplog.at_level(logging.INFO, logger="bot.app"):
        async with open_app(config, engine=FakeEngine()) as app:
            assert _texts(aged_db) == ["twenty days ago", "re: twenty days ago", "fresh question", "re: fresh question"]
            # Votes on purged replies went with them; the fresh one stays. The bot still works.
            assert query(aged_db)("SELECT count(*) FROM feedback") == [(1,)]
            reply = await app.core.handle(Incoming(platform="test", chat_id="c", user_id="u", text="/sentiment ok"))
            assert reply.kind == "answer"
    assert "retention: removed 5 messages older than 30 days" in caplog.text
    assert query(aged_db)("PRAGMA integrity_check") == [("ok",)]


async def test_retention_zero_keeps_everything(aged_db: Path) -> None:
    before = _texts(aged_db)
    config = replace(load_config(None), store={"path": str(aged_db), "retention_days": 0})
    async with open_app(config, engine=FakeEngine()):
        pass
    assert _texts(aged_db) == before and len(before) == 9


def test_db_commands_on_a_real_file(aged_db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    opt = ["--db", str(aged_db)]

    rc, out, err = cli(capsys, "db", "stats", *opt)
    assert rc == 0, err
    data = json.loads(out)
    assert data["messages"] == {"in": 5, "out": 4} and data["by_status"]["pending"] == 1
    assert data["feedback"] == {"up": 3, "down": 0} and data["median_latency_ms"] == 12.5

    assert cli(capsys, "db", "check", *opt)[:2] == (0, "ok\n")

    rc, out, _ = cli(capsys, "db", "unanswered", *opt)
    assert [json.loads(x)["text"] for x in out.splitlines()] == ["old and never answered"]

    export = tmp_path / "export.jsonl"
    rc, out, _ = cli(capsys, "db", "export", *opt, "--out", str(export))
    assert rc == 0 and "wrote 1 conversations" in out
    [conversation] = [json.loads(x) for x in export.read_text(encoding="utf-8").splitlines()]
    assert [m["content"] for m in conversation["messages"]][:2] == ["old question", "re: old question"]
    rc, out, _ = cli(capsys, "db", "export", *opt, "--only-positive-feedback")
    contents = [m["content"] for line in out.splitlines() for m in json.loads(line)["messages"]]
    assert "fresh question" in contents and "twenty days ago" not in contents  # unvoted turn dropped

    rc, out, _ = cli(capsys, "db", "purge", *opt, "--days", "30")
    assert rc == 0 and "removed 5 messages older than 30 days" in out
    assert cli(capsys, "db", "purge", *opt, "--days", "30")[1].startswith("removed 0 messages")

    rc, out, _ = cli(capsys, "db", "vacuum", *opt)
    assert rc == 0 and "vacuumed" in out
    assert b"old question" not in aged_db.read_bytes()  # purged text is gone from the file itself
    after = json.loads(cli(capsys, "db", "stats", *opt)[1])
    assert after["messages"] == {"in": 2, "out": 2} and "pending" not in after["by_status"]


def test_db_commands_explain_bad_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = cli(capsys, "db", "stats", "--db", str(tmp_path / "nope.db"))
    assert rc == 2 and "no database at" in err
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not sqlite" * 100)
    for action in ("stats", "check", "export", "unanswered", "vacuum", "purge"):
        rc, _, err = cli(capsys, "db", action, "--db", str(garbage))
        assert rc == 2 and err.startswith("lorabot: ") and "not a SQLite database" in err, action
    # And once as a real process: the same words, no traceback.
    result = lorabot("db", "check", "--db", str(garbage))
    assert result.returncode == 2 and "not a SQLite database" in result.stderr and "Traceback" not in result.stderr


def test_db_check_reports_a_corrupt_file(aged_db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = bytearray(aged_db.read_bytes())
    for page in range(1, len(raw) // 4096):  # scribble over every b-tree page header but the first
        raw[page * 4096: page * 4096 + 64] = b"\xff" * 64
    aged_db.write_bytes(bytes(raw))
    rc, out, err = cli(capsys, "db", "check", "--db", str(aged_db))
    assert rc != 0 and ("corrupt" in err or out.strip() != "ok")


def test_purge_with_negative_days_is_a_clear_error(aged_db: Path) -> None:
    result = lorabot("db", "purge", "--db", str(aged_db), "--days", "-1")
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_export_to_a_missing_folder_is_a_clear_error(aged_db: Path, tmp_path: Path) -> None:
    result = lorabot("db", "export", "--db", str(aged_db), "--out", str(tmp_path / "no" / "such" / "x.jsonl"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
