"""The conversation store against real SQLite: in-memory and files under tmp_path."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bot import store as store_module
from bot.errors import StoreError
from bot.messages import Sentiment
from bot.store import MIGRATIONS, AsyncStore, Store


@pytest.fixture
def store() -> Iterator[Store]:
    s = Store.memory()
    yield s
    s.close()


def exchange(s: Store, chat: int, user: int | None, question: str, answer: str, *, skill: str = "chat",
             incoming_status: str = "answered") -> tuple[int, int]:
    incoming = s.log_incoming(chat_id=chat, user_id=user, text=question, skill=skill)
    reply = s.log_reply(chat_id=chat, reply_to=incoming, text=answer, skill=skill,
                        incoming_status=incoming_status)
    return incoming, reply


def count(s: Store, table: str, where: str = "1", params: tuple = ()) -> int:
    return s.db.execute(f"SELECT count(*) FROM {table} WHERE {where}", params).fetchone()[0]


def backdate(s: Store, message_id: int, days: float) -> None:
    when = (datetime.now(UTC) - timedelta(days=days)).isoformat(timespec="microseconds")
    s.db.execute("UPDATE messages SET created_at = ? WHERE id = ?", [when, message_id])


# --- opening and migrations ---------------------------------------------------------------------------

def test_migrations_run_once_and_reopen_keeps_data(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "bot.db"
    with Store.open(path) as s:
        chat = s.ensure_chat("console", "c1")
        user = s.ensure_user("console", "u1", "Ann")
        exchange(s, chat, user, "hi", "hello")
        first = list(s.db.query("SELECT id, name, applied_at FROM _migrations ORDER BY id"))
    assert [(r["id"], r["name"]) for r in first] == [(i, n) for i, (n, _) in enumerate(MIGRATIONS, 1)]

    with Store.open(path) as s:
        assert list(s.db.query("SELECT id, name, applied_at FROM _migrations ORDER BY id")) == first
        assert s.ensure_chat("console", "c1") == chat
        assert s.history(chat) == [("user", "hi"), ("assistant", "hello")]


def test_new_migration_is_applied_once_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "bot.db"
    Store.open(path).close()
    calls: list[str] = []

    def add_column(db) -> None:
        calls.append("v2")
        db.execute("ALTER TABLE chats ADD COLUMN language TEXT")

    monkeypatch.setattr(store_module, "MIGRATIONS", [*MIGRATIONS, ("v9_chat_language", add_column)])
    for _ in range(2):
        with Store.open(path) as s:
            assert "language" in s.db["chats"].columns_dict
            names = [r["name"] for r in s.db.query("SELECT name FROM _migrations ORDER BY id")]
            assert names == [*(name for name, _ in MIGRATIONS), "v9_chat_language"]
    assert calls == ["v2"]


def test_failing_migration_rolls_back_and_names_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "bot.db"
    Store.open(path).close()

    def broken(db) -> None:
        db.execute("CREATE TABLE half_done (x)")
        db.execute("INSERT INTO no_such_table VALUES (1)")

    monkeypatch.setattr(store_module, "MIGRATIONS", [*MIGRATIONS, ("v2_broken", broken)])
    with pytest.raises(StoreError, match="v2_broken") as info:
        Store.open(path)
    assert str(path) in str(info.value)
    monkeypatch.setattr(store_module, "MIGRATIONS", MIGRATIONS)
    with Store.open(path) as s:
        assert "half_done" not in s.db.table_names()
        assert count(s, "_migrations") == len(MIGRATIONS)


def test_database_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bot.db"
    with Store.open(path) as s:
        s.db.execute("INSERT INTO _migrations (id, name, applied_at) VALUES (99, 'v99_future', 'x')")
    with pytest.raises(StoreError, match=r"newer lorabot.*v99_future"):
        Store.open(path)


def test_file_database_uses_wal_and_pragmas(tmp_path: Path) -> None:
    with Store.open(tmp_path / "bot.db") as s:
        assert s.db.journal_mode == "wal"
        assert s.db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
        assert s.db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert s.db.execute("PRAGMA busy_timeout").fetchone()[0] > 0
        assert s.integrity_check() == "ok"
    assert (tmp_path / "bot.db").is_file()


def test_timestamps_are_utc_iso_with_microseconds(store: Store) -> None:
    chat = store.ensure_chat("console", "c")
    ids = [store.log_incoming(chat_id=chat, user_id=None, text=str(i)) for i in range(20)]
    stamps = [store.db["messages"].get(i)["created_at"] for i in ids]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
    parsed = datetime.fromisoformat(stamps[0])
    assert parsed.utcoffset() == timedelta(0)
    assert "." in stamps[0] and len(stamps[0].split(".")[1]) == len("123456+00:00")


# --- users, chats, modes ------------------------------------------------------------------------------

def test_ensure_user_and_chat_are_idempotent_and_update_names(store: Store) -> None:
    u = store.ensure_user("telegram", "42", "Ann")
    assert store.ensure_user("telegram", "42") == u
    assert store.db["users"].get(u)["name"] == "Ann"
    assert store.ensure_user("telegram", "42", "Annie") == u
    assert store.db["users"].get(u)["name"] == "Annie"
    assert store.ensure_user("discord", "42") != u
    c = store.ensure_chat("telegram", "-100")
    assert store.ensure_chat("telegram", "-100") == c
    assert store.ensure_chat("discord", "-100") != c


def test_mode_round_trip(store: Store) -> None:
    chat = store.ensure_chat("console", "c")
    assert store.get_mode(chat) is None
    store.set_mode(chat, "story")
    assert store.get_mode(chat) == "story"
    store.set_mode(chat, None)
    assert store.get_mode(chat) is None
    with pytest.raises(ValueError):
        store.set_mode(999, "chat")


# --- messages -----------------------------------------------------------------------------------------

def test_incoming_is_pending_until_reply_settles_it(store: Store) -> None:
    chat, user = store.ensure_chat("console", "c"), store.ensure_user("console", "u")
    incoming = store.log_incoming(chat_id=chat, user_id=user, text="great film", skill="sentiment",
                                  platform_message_id=7)
    row = store.db["messages"].get(incoming)
    assert (row["direction"], row["status"], row["platform_message_id"]) == ("in", "pending", "7")
    assert [m["id"] for m in store.unanswered()] == [incoming]

    reply = store.log_reply(chat_id=chat, reply_to=incoming, text="positive", skill="sentiment",
                            adapter="sentiment", latency_ms=12.5, prompt_tokens=30, completion_tokens=2,
                            result=Sentiment("positive", {"positive": 0.9, "negative": 0.1}))
    out = store.db["messages"].get(reply)
    assert (out["direction"], out["status"], out["reply_to"], out["adapter"]) == ("out", "sent", incoming,
                                                                                  "sentiment")
    assert out["result_json"] == '{"label": "positive", "scores": {"positive": 0.9, "negative": 0.1}}'
    assert (out["latency_ms"], out["prompt_tokens"], out["completion_tokens"]) == (12.5, 30, 2)
    assert store.db["messages"].get(incoming)["status"] == "answered"
    assert store.unanswered() == []

    refused = store.log_incoming(chat_id=chat, user_id=user, text="x" * 10)
    store.log_reply(chat_id=chat, reply_to=refused, text="too long", result={"k": "ü"},
                    incoming_status="refused")
    assert store.db["messages"].get(refused)["status"] == "refused"


def test_log_reply_is_one_transaction(store: Store) -> None:
    chat = store.ensure_chat("console", "c")
    incoming = store.log_incoming(chat_id=chat, user_id=None, text="q")
    # Make the second half (the status update) fail inside SQLite itself.
    store.db.execute("""CREATE TRIGGER no_settle BEFORE UPDATE OF status ON messages
                        BEGIN SELECT RAISE(ABORT, 'settle refused'); END""")
    with pytest.raises(StoreError):
        store.log_reply(chat_id=chat, reply_to=incoming, text="a")
    assert count(store, "messages", "direction = 'out'") == 0
    assert store.db["messages"].get(incoming)["status"] == "pending"
    assert not store.db.conn.in_transaction

    store.db.execute("DROP TRIGGER no_settle")
    store.log_reply(chat_id=chat, reply_to=incoming, text="a")
    assert count(store, "messages", "direction = 'out'") == 1


def test_log_reply_rejects_a_target_that_is_not_incoming_in_that_chat(store: Store) -> None:
    chat, other = store.ensure_chat("console", "c"), store.ensure_chat("console", "d")
    incoming, reply = exchange(store, chat, None, "q", "a")
    with pytest.raises(ValueError):
        store.log_reply(chat_id=chat, reply_to=reply, text="reply to a reply")
    with pytest.raises(ValueError):
        store.log_reply(chat_id=other, reply_to=incoming, text="wrong chat")
    with pytest.raises(ValueError):
        store.log_reply(chat_id=chat, reply_to=incoming, text="a", incoming_status="pending")
    assert count(store, "messages") == 2


def test_mark_incoming_and_unanswered_after_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "bot.db"
    with Store.open(path) as s:
        chat = s.ensure_chat("telegram", "-5")
        done, _ = exchange(s, chat, None, "q1", "a1")
        failed = s.log_incoming(chat_id=chat, user_id=None, text="q2")
        s.mark_incoming(failed, "failed", error="EngineError: out of memory")
        lost = s.log_incoming(chat_id=chat, user_id=None, text="q3", skill="chat", platform_message_id="m3")
    with Store.open(path) as s:  # "after the crash"
        [row] = s.unanswered()
        assert row["id"] == lost and row["text"] == "q3" and row["platform_message_id"] == "m3"
        assert (row["platform"], row["platform_chat_id"]) == ("telegram", "-5")
        assert s.db["messages"].get(failed)["error"] == "EngineError: out of memory"
        with pytest.raises(ValueError):
            s.mark_incoming(lost, "sent")
        with pytest.raises(ValueError):
            s.mark_incoming(12345, "failed")
        assert s.db["messages"].get(done)["status"] == "answered"


def test_history_respects_skill_status_reset_and_limit(store: Store) -> None:
    chat, other = store.ensure_chat("console", "c"), store.ensure_chat("console", "d")
    user = store.ensure_user("console", "u")
    exchange(store, chat, user, "old q", "old a")
    store.reset(chat)
    exchange(store, chat, user, "q1", "a1")
    exchange(store, chat, user, "review", "positive", skill="sentiment")
    exchange(store, chat, user, "rude", "no", incoming_status="refused")
    store.log_incoming(chat_id=chat, user_id=user, text="still pending", skill="chat")
    exchange(store, other, user, "elsewhere", "there")
    exchange(store, chat, user, "q2", "a2")

    assert store.history(chat) == [("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2")]
    assert store.history(chat, skill="sentiment") == [("user", "review"), ("assistant", "positive")]
    assert store.history(chat, limit=3) == [("user", "q2"), ("assistant", "a2")]
    assert store.history(chat, limit=1) == []
    store.reset(chat)
    assert store.history(chat) == []
    exchange(store, chat, user, "q3", "a3")
    assert store.history(chat) == [("user", "q3"), ("assistant", "a3")]


# --- feedback -----------------------------------------------------------------------------------------

def test_feedback_upserts_and_rejects_bad_targets(store: Store) -> None:
    chat = store.ensure_chat("telegram", "c")
    incoming, reply = exchange(store, chat, store.ensure_user("telegram", "u"), "q", "a")
    assert store.add_feedback(message_id=reply, platform="telegram", platform_user_id="u", value=1)
    assert store.add_feedback(message_id=reply, platform="telegram", platform_user_id="u", value=-1)
    assert store.add_feedback(message_id=reply, platform="telegram", platform_user_id="v", value=1)
    votes = {r["user_id"]: r["value"] for r in store.db.query("SELECT user_id, value FROM feedback")}
    assert sorted(votes.values()) == [-1, 1] and len(votes) == 2

    assert not store.add_feedback(message_id=incoming, platform="telegram", platform_user_id="u", value=1)
    assert not store.add_feedback(message_id=9999, platform="telegram", platform_user_id="w", value=1)
    assert count(store, "users", "platform_user_id = 'w'") == 0
    for bad in (0, 2, True, -2):
        with pytest.raises(ValueError):
            store.add_feedback(message_id=reply, platform="telegram", platform_user_id="u", value=bad)
    assert count(store, "feedback") == 2


def test_retracting_a_vote_removes_it_only_while_it_is_still_that_vote(store: Store) -> None:
    chat = store.ensure_chat("discord", "c")
    _, reply = exchange(store, chat, store.ensure_user("discord", "u"), "q", "a")
    store.add_feedback(message_id=reply, platform="discord", platform_user_id="u", value=1)
    store.add_feedback(message_id=reply, platform="discord", platform_user_id="u", value=-1)  # replaces the 👍
    assert not store.retract_feedback(message_id=reply, platform="discord", platform_user_id="u", value=1)
    assert count(store, "feedback") == 1
    assert store.retract_feedback(message_id=reply, platform="discord", platform_user_id="u", value=-1)
    assert count(store, "feedback") == 0
    assert not store.retract_feedback(message_id=reply, platform="discord", platform_user_id="nobody", value=1)


# --- platform bookkeeping -----------------------------------------------------------------------------

def test_a_migrated_chat_keeps_its_mode_history_and_deliveries_under_the_new_id(store: Store) -> None:
    chat = store.ensure_chat("telegram", "-100")
    user = store.ensure_user("telegram", "u")
    _, reply = exchange(store, chat, user, "hi", "hello")
    store.set_mode(chat, "sentiment")
    assert store.remember_sent("telegram", "-100", ["55"], reply)

    assert store.migrate_chat("telegram", "-100", "-1001234") == chat
    assert store.ensure_chat("telegram", "-1001234") == chat                 # the same row, renamed
    assert count(store, "chats") == 1 and store.get_mode(chat) == "sentiment"
    assert store.history(chat) == [("user", "hi"), ("assistant", "hello")]
    assert store.sent_reply("telegram", "-1001234", "55") == reply
    assert store.sent_reply("telegram", "-100", "55") is None
    assert store.migrate_chat("telegram", "-100", "-1001234") is None         # a second notice: nothing to do


def test_a_migrated_chat_merges_into_a_chat_that_already_exists_under_the_new_id(store: Store) -> None:
    old, new = store.ensure_chat("telegram", "-100"), store.ensure_chat("telegram", "-1001234")
    user = store.ensure_user("telegram", "u")
    store.set_mode(old, "qa")
    _, old_reply = exchange(store, old, user, "before", "answer before")
    store.remember_sent("telegram", "-100", ["10", "11"], old_reply)
    store.reset(old)
    _, new_reply = exchange(store, new, user, "after", "answer after")
    store.remember_sent("telegram", "-1001234", ["11"], new_reply)            # ids are per chat: 11 again

    assert store.migrate_chat("telegram", "-100", "-1001234") == new
    assert [r["platform_chat_id"] for r in store.db.query("SELECT platform_chat_id FROM chats")] == ["-1001234"]
    assert store.get_mode(new) == "qa"                                        # the new chat chose none
    assert count(store, "messages", "chat_id = ?", (new,)) == 4
    assert store.history(new) == [("user", "after"), ("assistant", "answer after")]  # the old reset holds
    assert store.sent_reply("telegram", "-1001234", "10") == old_reply
    assert store.sent_reply("telegram", "-1001234", "11") == new_reply
    assert store.db.execute("PRAGMA foreign_key_check").fetchall() == []


def test_an_unreachable_chat_gets_no_replies_to_older_messages_until_it_writes_again(store: Store) -> None:
    store.ensure_chat("telegram", "7")
    before = datetime.now(UTC)
    assert store.chat_reachable("telegram", "7", before)
    store.mark_unreachable("telegram", "7", "Forbidden: bot was blocked by the user")
    assert store.db["chats"].get(1)["unreachable_reason"] == "Forbidden: bot was blocked by the user"
    assert not store.chat_reachable("telegram", "7", before)                 # queued before the block
    assert not store.chat_reachable("telegram", "7", before)
    later = datetime.now(UTC) + timedelta(seconds=1)
    assert store.chat_reachable("telegram", "7", later)                      # the user wrote again
    assert store.chat_reachable("telegram", "7", before)                     # the mark is gone
    assert store.db["chats"].get(1)["unreachable_at"] is None
    assert store.chat_reachable("telegram", "unknown", before)


def test_delivery_records_go_with_forget_and_retention(store: Store) -> None:
    chat = store.ensure_chat("discord", "c")
    ann, bob = store.ensure_user("discord", "ann"), store.ensure_user("discord", "bob")
    ann_in, ann_reply = exchange(store, chat, ann, "ann", "to ann")
    old_in, old_reply = exchange(store, chat, bob, "bob old", "to bob old")
    _, bob_reply = exchange(store, chat, bob, "bob", "to bob")
    for pid, reply in (("1", ann_reply), ("2", ann_reply), ("3", old_reply), ("4", bob_reply)):
        store.remember_sent("discord", "c", [pid], reply)
    assert not store.remember_sent("discord", "c", ["5"], ann_in)            # not a reply
    assert not store.remember_sent("discord", "other", ["5"], bob_reply)     # not that chat's

    store.forget_user("discord", "ann")
    assert [r[0] for r in store.db.execute("SELECT platform_message_id FROM sent_messages ORDER BY 1")] == [
        "3", "4"]
    backdate(store, old_in, 40)
    store.purge_older_than(30)
    assert [r[0] for r in store.db.execute("SELECT platform_message_id FROM sent_messages")] == ["4"]
    assert store.sent_reply("discord", "c", "3") is None and store.sent_reply("discord", "c", "4") == bob_reply
    assert not store.remember_sent("discord", "c", ["6"], ann_reply)          # forgotten meanwhile
    assert store.db.execute("PRAGMA foreign_key_check").fetchall() == []


def test_settings_round_trip_and_survive_a_reopen(tmp_path: Path) -> None:
    with Store.open(tmp_path / "bot.db") as s:
        assert s.get_setting("discord.commands") is None
        s.set_setting("discord.commands", "abc")
        s.set_setting("discord.commands", "def")
    with Store.open(tmp_path / "bot.db") as s:
        assert s.get_setting("discord.commands") == "def"


# --- privacy and housekeeping -------------------------------------------------------------------------

def test_forget_user_removes_every_trace_and_nothing_else(store: Store) -> None:
    dm_ann, dm_bob = store.ensure_chat("telegram", "dm-ann"), store.ensure_chat("telegram", "dm-bob")
    group = store.ensure_chat("telegram", "group")
    ann, bob = store.ensure_user("telegram", "ann", "Ann"), store.ensure_user("telegram", "bob", "Bob")
    _, ann_dm_reply = exchange(store, dm_ann, ann, "ann private", "to ann")
    store.log_incoming(chat_id=dm_ann, user_id=ann, text="ann pending")
    _, ann_group_reply = exchange(store, group, ann, "ann in group", "to ann in group")
    _, bob_group_reply = exchange(store, group, bob, "bob in group", "to bob in group")
    _, bob_dm_reply = exchange(store, dm_bob, bob, "bob private", "to bob")
    store.add_feedback(message_id=ann_dm_reply, platform="telegram", platform_user_id="ann", value=1)
    store.add_feedback(message_id=ann_group_reply, platform="telegram", platform_user_id="bob", value=-1)
    store.add_feedback(message_id=bob_group_reply, platform="telegram", platform_user_id="ann", value=1)
    store.add_feedback(message_id=bob_group_reply, platform="telegram", platform_user_id="bob", value=1)
    store.set_mode(group, "qa")

    counts = store.forget_user("telegram", "ann")
    assert counts == {"users": 1, "chats": 1, "messages": 5, "feedback": 3}

    texts = {r["text"] for r in store.db.query("SELECT text FROM messages")}
    assert texts == {"bob in group", "to bob in group", "bob private", "to bob"}
    assert count(store, "users") == 1 and store.db["users"].get(bob)["name"] == "Bob"
    assert {r["platform_chat_id"] for r in store.db.query("SELECT platform_chat_id FROM chats")} == {
        "dm-bob", "group"}
    assert store.get_mode(group) == "qa"
    assert [(r["message_id"], r["user_id"]) for r in store.db.query("SELECT * FROM feedback")] == [
        (bob_group_reply, bob)]
    assert "ann" not in str(list(store.db.query("SELECT * FROM messages"))).lower()
    assert store.integrity_check() == "ok"
    assert store.db.execute("PRAGMA foreign_key_check").fetchall() == []
    assert store.forget_user("telegram", "ann") == {"users": 0, "chats": 0, "messages": 0, "feedback": 0}
    assert store.history(dm_bob) == [("user", "bob private"), ("assistant", "to bob")]
    assert bob_dm_reply


def test_purge_deletes_old_messages_with_their_replies_and_votes(store: Store) -> None:
    chat = store.ensure_chat("console", "c")
    user = store.ensure_user("console", "u")
    old_in, old_reply = exchange(store, chat, user, "old", "old answer")
    new_in, new_reply = exchange(store, chat, user, "new", "new answer")
    store.add_feedback(message_id=old_reply, platform="console", platform_user_id="u", value=1)
    store.add_feedback(message_id=new_reply, platform="console", platform_user_id="u", value=1)
    backdate(store, old_in, 40)  # its reply stays "recent": it must still go with its question
    backdate(store, new_in, 5)

    assert store.purge_older_than(0) == 0
    assert store.purge_older_than(30) == 2
    assert {r["text"] for r in store.db.query("SELECT text FROM messages")} == {"new", "new answer"}
    assert count(store, "feedback") == 1
    assert store.purge_older_than(30) == 0
    assert store.purge_older_than(1) == 2
    assert count(store, "messages") == 0 and count(store, "feedback") == 0
    with pytest.raises(ValueError):
        store.purge_older_than(-1)


def test_purge_also_removes_users_and_chats_with_nothing_left(store: Store) -> None:
    shared, gone = store.ensure_chat("console", "shared"), store.ensure_chat("console", "gone")
    ann, bob, _voter = (store.ensure_user("console", n, n.title()) for n in ("ann", "bob", "voter"))
    exchange(store, gone, ann, "old", "old answer")
    exchange(store, shared, ann, "old too", "answer")
    new_in, new_reply = exchange(store, shared, bob, "new", "new answer")
    store.add_feedback(message_id=new_reply, platform="console", platform_user_id="voter", value=1)
    long_ago = (datetime.now(UTC) - timedelta(days=40)).isoformat(timespec="microseconds")
    for table in ("users", "chats"):
        store.db.execute(f"UPDATE {table} SET created_at = ?", [long_ago])
    store.db.execute("UPDATE messages SET created_at = ? WHERE id NOT IN (?, ?)", [long_ago, new_in, new_reply])

    assert store.purge_older_than(30) == 4
    # ann wrote only old messages: her name goes; bob wrote recently, voter voted on a kept reply.
    assert {r["platform_user_id"] for r in store.db.query("SELECT * FROM users")} == {"bob", "voter"}
    assert {r["platform_chat_id"] for r in store.db.query("SELECT * FROM chats")} == {"shared"}
    # New users and chats are never purged for having no messages yet.
    store.ensure_user("console", "newcomer")
    store.ensure_chat("console", "fresh")
    assert store.purge_older_than(30) == 0
    assert count(store, "users") == 3 and count(store, "chats") == 2


def test_stats_whole_database_and_per_chat(store: Store) -> None:
    chat, other = store.ensure_chat("console", "c"), store.ensure_chat("console", "d")
    ann, bob = store.ensure_user("console", "ann"), store.ensure_user("console", "bob")
    latencies = iter([10.0, 30.0, 20.0, 100.0])
    for c, u, skill in [(chat, ann, "chat"), (chat, bob, "sentiment"), (chat, ann, "chat"), (other, bob, "qa")]:
        i = store.log_incoming(chat_id=c, user_id=u, text="q", skill=skill)
        r = store.log_reply(chat_id=c, reply_to=i, text="a", skill=skill, latency_ms=next(latencies))
    store.log_incoming(chat_id=chat, user_id=ann, text="/help")
    store.add_feedback(message_id=r, platform="console", platform_user_id="ann", value=-1)
    first_reply = store.db.execute("SELECT min(id) FROM messages WHERE direction = 'out'").fetchone()[0]
    store.add_feedback(message_id=first_reply, platform="console", platform_user_id="bob", value=1)

    everything = store.stats()
    assert everything == {
        "users": 2, "chats": 2,
        "messages": {"in": 5, "out": 4},
        "by_skill": {"chat": 2, "sentiment": 1, "qa": 1, "none": 1},
        "by_status": {"answered": 4, "sent": 4, "pending": 1},
        "feedback": {"up": 1, "down": 1},
        "median_latency_ms": 25.0,
    }
    one = store.stats(chat_id=chat)
    assert one["users"] == 2 and one["chats"] == 1
    assert one["messages"] == {"in": 4, "out": 3}
    assert one["by_skill"] == {"chat": 2, "sentiment": 1, "none": 1}
    assert one["feedback"] == {"up": 1, "down": 0}
    assert one["median_latency_ms"] == 20.0
    assert Store.memory().stats()["median_latency_ms"] is None


def test_export_chat_examples(store: Store) -> None:
    chat, other = store.ensure_chat("console", "c"), store.ensure_chat("console", "d")
    user = store.ensure_user("console", "u")

    def turn(c: int, q: str, vote: int | None = None, **kw) -> None:
        _, reply = exchange(store, c, user, q, q.upper(), **kw)
        if vote is not None:
            store.add_feedback(message_id=reply, platform="console", platform_user_id="u", value=vote)

    turn(chat, "a", 1)
    turn(chat, "b", -1)
    turn(chat, "review", 1, skill="sentiment")
    turn(chat, "c", 1)
    turn(chat, "d", 1)
    turn(chat, "refused", 1, incoming_status="refused")
    store.reset(chat)
    turn(chat, "e", 1)
    turn(other, "x")

    def flat(examples) -> list[list[str]]:
        return [[m["content"] for m in e["messages"]] for e in examples]

    examples = list(store.export_chat_examples())
    assert all([m["role"] for m in e["messages"]][:2] == ["user", "assistant"] for e in examples)
    assert flat(examples) == [["a", "A", "b", "B", "c", "C", "d", "D"], ["e", "E"], ["x", "X"]]
    assert flat(store.export_chat_examples(only_positive_feedback=True)) == [
        ["a", "A"], ["c", "C", "d", "D"], ["e", "E"]]


# --- failures -----------------------------------------------------------------------------------------

def test_read_only_database_raises_store_error_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "bot.db"
    with Store.open(path) as s:
        chat = s.ensure_chat("console", "c")
    # Root ignores file modes, so use SQLite's own read-only open, which fails for everyone.
    with Store.open(path, read_only=True) as ro:
        assert ro.get_mode(chat) is None and ro.stats()["chats"] == 1
        with pytest.raises(StoreError, match="read-only") as info:
            ro.log_incoming(chat_id=chat, user_id=None, text="hi")
        assert str(path) in str(info.value)
        assert ro.stats()["messages"] == {"in": 0, "out": 0}


def test_read_only_open_of_an_unmigrated_or_missing_file(tmp_path: Path) -> None:
    blank = tmp_path / "blank.db"
    sqlite3.connect(blank).close()
    with pytest.raises(StoreError, match=r"read-only.*migration"):
        Store.open(blank, read_only=True)
    with pytest.raises(StoreError, match="cannot open") as info:
        Store.open(tmp_path / "missing.db", read_only=True)
    assert "missing.db" in str(info.value)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores file modes")
def test_read_only_file_permissions(tmp_path: Path) -> None:
    path = tmp_path / "bot.db"
    with Store.open(path) as s:
        chat = s.ensure_chat("console", "c")
    path.chmod(0o444)
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(StoreError, match=r"read-only|cannot open") as info, Store.open(path) as s:
            s.log_incoming(chat_id=chat, user_id=None, text="hi")
        assert str(path) in str(info.value)
    finally:
        tmp_path.chmod(0o755)
        path.chmod(0o644)


def test_disk_full_raises_store_error_and_keeps_the_database_usable(tmp_path: Path) -> None:
    path = tmp_path / "bot.db"
    with Store.open(path) as s:
        chat = s.ensure_chat("console", "c")
        kept, _ = exchange(s, chat, None, "q", "a")
        pages = s.db.execute("PRAGMA page_count").fetchone()[0]
        s.db.execute(f"PRAGMA max_page_count = {pages}")
        with pytest.raises(StoreError, match="disk is full") as info:
            s.log_incoming(chat_id=chat, user_id=None, text="x" * 200_000)
        assert str(path) in str(info.value) and "xxxx" not in str(info.value)
        assert not s.db.conn.in_transaction
        assert s.history(chat) == [("user", "q"), ("assistant", "a")]
    with Store.open(path) as s:
        assert s.integrity_check() == "ok"
        assert count(s, "messages") == 2 and s.db["messages"].get(kept)["status"] == "answered"


def test_not_a_database_and_unusable_locations(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"definitely not sqlite " * 100)
    with pytest.raises(StoreError, match="not a SQLite database") as info:
        Store.open(junk)
    assert str(junk) in str(info.value)

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreError, match="cannot create its folder") as info:
        Store.open(blocker / "bot.db")
    assert str(blocker) in str(info.value)


def test_closed_store_raises_store_error() -> None:
    s = Store.memory()
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.stats()
    s.close()


def test_vacuum_and_integrity_check(tmp_path: Path) -> None:
    with Store.open(tmp_path / "bot.db") as s:
        chat = s.ensure_chat("console", "c")
        for i in range(50):
            exchange(s, chat, None, f"q{i}" * 100, "a")
        s.db.execute("DELETE FROM messages WHERE direction = 'out'")
        s.vacuum()
        assert s.integrity_check() == "ok"


# --- AsyncStore ---------------------------------------------------------------------------------------

async def test_async_store_concurrent_writes_all_land_on_one_thread(tmp_path: Path) -> None:
    sync = Store.open(tmp_path / "bot.db")
    threads: set[int] = set()
    sync.db.conn.create_function("note_thread", 0, lambda: threads.add(threading.get_ident()))
    sync.db.execute("CREATE TEMP TRIGGER seen AFTER INSERT ON messages BEGIN SELECT note_thread(); END")
    store = AsyncStore(sync)
    chat = await store.ensure_chat("discord", "channel")

    async def conversation(n: int) -> None:
        user = await store.ensure_user("discord", f"user{n % 7}", f"User {n % 7}")
        incoming = await store.log_incoming(chat_id=chat, user_id=user, text=f"q{n}", skill="chat")
        await asyncio.sleep(0)
        await store.log_reply(chat_id=chat, reply_to=incoming, text=f"a{n}", skill="chat", latency_ms=n)

    await asyncio.gather(*(conversation(n) for n in range(60)))
    stats = await store.stats()
    assert stats["messages"] == {"in": 60, "out": 60} and stats["users"] == 7
    assert stats["by_status"] == {"answered": 60, "sent": 60}
    assert len(await store.history(chat, limit=1000)) == 120
    assert await store.unanswered() == []
    assert len(threads) == 1 and threading.get_ident() not in threads
    await store.close()


async def test_async_close_waits_for_queued_writes(tmp_path: Path) -> None:
    path = tmp_path / "bot.db"
    store = await AsyncStore.open(path)
    assert store.path == str(path)
    chat = await store.ensure_chat("console", "c")
    tasks = [asyncio.ensure_future(store.log_incoming(chat_id=chat, user_id=None, text=f"m{i}"))
             for i in range(40)]
    await asyncio.sleep(0)  # let every task queue its write, then close behind them
    await store.close()
    await asyncio.gather(*tasks)
    await store.close()
    with pytest.raises(StoreError, match="closed"):
        await store.stats()
    with Store.open(path) as s:
        assert count(s, "messages") == 40 and len(s.unanswered()) == 40


async def test_async_store_errors_and_export(tmp_path: Path) -> None:
    (tmp_path / "junk.db").write_bytes(b"x" * 4096)
    with pytest.raises(StoreError, match="not a SQLite database"):
        await AsyncStore.open(tmp_path / "junk.db")
    store = AsyncStore(Store.memory())
    chat = await store.ensure_chat("console", "c")
    incoming = await store.log_incoming(chat_id=chat, user_id=None, text="hi", skill="chat")
    reply = await store.log_reply(chat_id=chat, reply_to=incoming, text="hello", skill="chat")
    assert await store.add_feedback(message_id=reply, platform="console", platform_user_id="u", value=1)
    with pytest.raises(ValueError):
        await store.add_feedback(message_id=reply, platform="console", platform_user_id="u", value=5)
    examples = await store.export_chat_examples(only_positive_feedback=True)
    assert examples == [{"messages": [{"role": "user", "content": "hi"},
                                      {"role": "assistant", "content": "hello"}]}]
    await store.set_mode(chat, "story")
    assert await store.get_mode(chat) == "story"
    await store.reset(chat)
    assert await store.history(chat) == []
    assert await store.integrity_check() == "ok"
    assert (await store.forget_user("console", "u"))["users"] == 1
    await store.close()
