from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.cli import main
from training.data import read_chat


def make_db(path: Path) -> None:
    from bot.store import Store

    with Store.open(path) as store:
        chat, user = store.ensure_chat("console", "c"), store.ensure_user("console", "u")
        for question, vote in (("hi", 1), ("how are you?", -1), ("bye", 1)):
            incoming = store.log_incoming(chat_id=chat, user_id=user, text=question, skill="chat")
            reply = store.log_reply(chat_id=chat, reply_to=incoming, text=question.upper(), skill="chat")
            store.add_feedback(message_id=reply, platform="console", platform_user_id="u", value=vote)


def test_export_round_trips_into_the_chat_reader(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db, out = tmp_path / "bot.db", tmp_path / "data" / "chat.jsonl"
    make_db(db)
    assert main(["export", "--db", str(db), "--out", str(out)]) == 0
    assert "wrote 1 conversation(s)" in capsys.readouterr().out
    (ex,) = read_chat(out)
    assert [c for _, c in ex.messages] == ["hi", "HI", "how are you?", "HOW ARE YOU?", "bye", "BYE"]

    assert main(["export", "--db", str(db), "--out", str(out), "--only-positive-feedback"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [[m["content"] for m in r["messages"]] for r in rows] == [["hi", "HI"], ["bye", "BYE"]]
    assert sorted(p.name for p in out.parent.iterdir()) == ["chat.jsonl"]


def test_export_missing_db(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "--db", str(tmp_path / "none.db"), "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "none.db" in capsys.readouterr().err and not (tmp_path / "x.jsonl").exists()
