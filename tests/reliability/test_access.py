"""Access rules under attack: edits, group vs DM, Discord roles, forged ids, admin-only /reload, bursts
against the rate limit, and /forget removing a user everywhere (including from exports)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from bot.access import Access
from bot.adapters import AdapterProblem
from bot.config import Config, replace
from bot.core import Core
from bot.messages import Incoming
from bot.store import AsyncStore
from tests.fakes import FakeEngine
from tests.reliability.conftest import lorabot, rows


class CountingEngine(FakeEngine):
    reloads: int = 0

    async def reload_adapters(self) -> list[AdapterProblem]:
        self.reloads += 1
        return []


def core_with(store: AsyncStore, engine: FakeEngine | None = None, **access: object) -> Core:
    return Core(replace(Config(), access=access), engine or CountingEngine(), store)


def incoming(text: str = "/sentiment good", *, platform: str = "telegram", user: str = "1", chat: str | None = None,
             **kw: object) -> Incoming:
    return Incoming(platform=platform, chat_id=chat or user, user_id=user, text=text, **kw)  # type: ignore[arg-type]


def stored_users(store: AsyncStore) -> list[str]:
    return [r[0] for r in rows(store, "SELECT platform || ':' || platform_user_id FROM users ORDER BY id")]


# --------------------------------------------------------------------------- allowlists


async def test_edits_are_never_answered_or_stored(mem_store: AsyncStore) -> None:
    core = core_with(mem_store, allowed_users=["telegram:1"], admins=["telegram:1"])
    for user in ("1", "2"):
        for text in ("/reload", "/forget", "/sentiment good", "hello"):
            assert await core.handle(incoming(text, user=user, edited=True)) is None
    assert rows(mem_store, "SELECT count(*) FROM messages") == [(0,)] and stored_users(mem_store) == []
    assert core.engine.reloads == 0


async def test_strangers_are_refused_in_dms_and_groups_and_leave_no_trace(mem_store: AsyncStore) -> None:
    core = core_with(mem_store, allowed_users=["telegram:1"])
    assert (await core.handle(incoming(user="1"))).kind == "answer"
    dm = await core.handle(incoming(user="2"))
    group = await core.handle(incoming(user="2", chat="-100", is_group=True, addressed=True))
    assert dm.kind == group.kind == "refusal" and "private" in dm.text
    assert await core.handle(incoming("hi", user="2", chat="-100", is_group=True, addressed=False)) is None
    assert stored_users(mem_store) == ["telegram:1"]  # a refused stranger is not recorded at all
    assert "private" in await core.feedback("telegram", "2", 2, 1)  # nor may they vote
    assert rows(mem_store, "SELECT count(*) FROM feedback") == [(0,)]


async def test_an_allowed_user_in_a_chat_that_is_not_allowed(mem_store: AsyncStore) -> None:
    core = core_with(mem_store, allowed_users=["telegram:1"], allowed_chats=["telegram:-100"])
    assert (await core.handle(incoming(user="1", chat="-100", is_group=True))).kind == "answer"
    assert (await core.handle(incoming(user="1", chat="-200", is_group=True))).kind == "refusal"
    assert (await core.handle(incoming(user="1"))).kind == "answer"  # DMs follow the user list
    assert (await core.handle(incoming(user="2", chat="-100", is_group=True))).kind == "refusal"


async def test_a_chat_allowlist_alone_does_not_open_dms_to_everyone(mem_store: AsyncStore) -> None:
    core = core_with(mem_store, allowed_chats=["telegram:-100"])
    assert (await core.handle(incoming(user="2", chat="-100", is_group=True))).kind == "answer"
    assert (await core.handle(incoming(user="2"))).kind == "refusal"


async def test_discord_roles_allow_and_make_admins_only_when_held(mem_store: AsyncStore) -> None:
    core = core_with(mem_store, allowed_users=["role:555", "discord-role:556"], admins=["role:42"])

    def member(roles: tuple[str, ...], text: str = "/sentiment good") -> Incoming:
        return incoming(text, platform="discord", user="77", chat="701", is_group=True, guild_id="700", roles=roles)

    assert (await core.handle(member(("555",)))).kind == "answer"
    assert (await core.handle(member(("556", "1")))).kind == "answer"
    assert (await core.handle(member(()))).kind == "refusal"  # same person, role removed
    assert (await core.handle(member(("5555",)))).kind == "refusal"  # no prefix/substring matching
    assert (await core.handle(member(("555",), "/reload"))).text == "Only admins can reload adapters."
    assert (await core.handle(member(("555", "42"), "/reload"))).kind == "command"
    # A platform-qualified role entry does not apply on another platform.
    assert (await core.handle(incoming(platform="telegram", user="77", roles=("556",)))).kind == "refusal"


async def test_platform_prefixes_are_not_interchangeable(mem_store: AsyncStore) -> None:
    core = core_with(mem_store, allowed_users=["telegram:123"], admins=["telegram:123"])
    assert (await core.handle(incoming(platform="telegram", user="123"))).kind == "answer"
    assert (await core.handle(incoming(platform="discord", user="123"))).kind == "refusal"
    assert (await core.handle(incoming(platform="console", user="123"))).kind == "refusal"
    # A bare id is documented to match on every platform.
    bare = core_with(mem_store, allowed_users=["123"])
    assert (await bare.handle(incoming(platform="discord", user="123"))).kind == "answer"


@pytest.mark.parametrize(("entry", "msg"), [
    ("telegram:123", Incoming(platform="discord", chat_id="d", user_id="telegram:123", text="x")),
    ("role:555", Incoming(platform="discord", chat_id="d", user_id="role:555", text="x")),
    ("discord-role:555", Incoming(platform="telegram", chat_id="t", user_id="discord-role:555", text="x")),
    ("telegram:1", Incoming(platform="telegram", chat_id="t", user_id="telegram:1", text="x")),
], ids=["platform-prefix", "role", "platform-role", "same-platform-prefix"])
def test_forged_ids_match_nothing(entry: str, msg: Incoming) -> None:
    # Platform ids are numeric today, but console/CLI ids come from $USER and future transports may differ.
    access = Access(replace(Config(), access={"allowed_users": [entry], "admins": [entry]}).access)
    assert not access.allowed(msg) and not access.is_admin(msg)


async def test_reload_is_admin_only_everywhere(mem_store: AsyncStore) -> None:
    engine = CountingEngine()
    core = core_with(mem_store, engine, admins=["telegram:1"])
    for msg in (incoming("/reload", user="2"), incoming("/reload@lorabot", user="2", chat="-1", is_group=True),
                incoming("/RELOAD", platform="discord", user="1")):
        assert (await core.handle(msg)).text == "Only admins can reload adapters.", msg
    assert engine.reloads == 0
    assert (await core.handle(incoming("/reload", user="1"))).kind == "command"
    assert engine.reloads == 1


# --------------------------------------------------------------------------- rate limits


async def test_a_burst_of_100_gets_exactly_the_limit_and_others_are_unaffected(mem_store: AsyncStore) -> None:
    limit = 20
    core = core_with(mem_store, FakeEngine(delay=0.001), rate_limit_per_minute=limit)
    burst = [incoming(f"/sentiment good {i}", user="1") for i in range(100)]
    others = [incoming(f"/sentiment fine {i}", user=f"o{i % 5}") for i in range(10)]
    replies = await asyncio.wait_for(asyncio.gather(*(core.handle(m) for m in burst + others)), 60)
    mine, theirs = replies[:100], replies[100:]
    assert sum(r.kind == "answer" for r in mine) == limit
    refused = [r for r in mine if r.kind != "answer"]
    assert len(refused) == 100 - limit
    assert all(r.kind == "refusal" and "too quickly" in r.text and "wait" in r.text for r in refused)
    assert all(r.kind == "answer" for r in theirs)
    # Every message is logged with its outcome; nothing is left pending.
    statuses = dict(rows(mem_store, "SELECT status, count(*) FROM messages WHERE direction='in' GROUP BY status"))
    assert statuses == {"answered": limit + 10}  # the refused ones were turned away before any write


async def test_the_rate_window_reopens_after_a_minute(mem_store: AsyncStore) -> None:
    now = [1000.0]
    config = replace(Config(), access={"rate_limit_per_minute": 3})
    core = Core(config, FakeEngine(), mem_store, access=Access(config.access, clock=lambda: now[0]))
    kinds = [(await core.handle(incoming(user="1"))).kind for _ in range(5)]
    assert kinds == ["answer"] * 3 + ["refusal"] * 2
    now[0] += 30
    assert (await core.handle(incoming(user="1"))).kind == "refusal"
    now[0] += 31
    assert (await core.handle(incoming(user="1"))).kind == "answer"


async def test_the_same_id_on_two_platforms_has_two_budgets(mem_store: AsyncStore) -> None:
    core = core_with(mem_store, rate_limit_per_minute=1)
    assert (await core.handle(incoming(platform="telegram", user="9"))).kind == "answer"
    assert (await core.handle(incoming(platform="discord", user="9"))).kind == "answer"
    assert (await core.handle(incoming(platform="discord", user="9"))).kind == "refusal"


# --------------------------------------------------------------------------- /forget


async def _conversation(core: Core) -> dict[str, int]:
    """Ann (1) and Bob (2) in a group and in their DMs, with votes both ways; returns reply ids."""
    ids = {}
    for user, text in (("1", "ann secret one"), ("2", "bob public one"), ("1", "ann secret two")):
        group = await core.handle(incoming(f"/chat {text}", user=user, chat="-100", is_group=True))
        dm = await core.handle(incoming(f"/chat {text} dm", user=user))
        ids[f"{user}:{text}"] = group.message_id
        ids[f"{user}:{text}:dm"] = dm.message_id
    await core.feedback("telegram", "1", ids["2:bob public one"], 1)    # Ann votes on Bob's reply
    await core.feedback("telegram", "2", ids["1:ann secret one"], -1)   # Bob votes on Ann's reply
    await core.feedback("telegram", "1", ids["1:ann secret two:dm"], 1)
    return ids


async def test_forget_removes_the_user_everywhere(tmp_path: Path) -> None:
    db = tmp_path / "log.db"
    store = await AsyncStore.open(db)
    try:
        core = core_with(store)
        await _conversation(core)
        reply = await core.handle(incoming("/forget", user="1", chat="-100", is_group=True))
        assert reply.kind == "command" and "deleted" in reply.text
        texts = [r[0] for r in rows(store, "SELECT text FROM messages")]
        assert texts and not any("ann" in t for t in texts), texts  # replies echo Ann's words: gone too
        assert stored_users(store) == ["telegram:2"]
        assert rows(store, "SELECT count(*) FROM feedback f JOIN users u ON u.id = f.user_id "
                           "WHERE u.platform_user_id = '1'") == [(0,)]
        # Bob's vote was on Ann's reply, which is gone; Ann's vote on Bob's reply is gone too.
        assert rows(store, "SELECT count(*) FROM feedback") == [(0,)]
        assert not any("ann" in json.dumps(e) for e in await store.export_chat_examples())
        assert any("bob" in json.dumps(e) for e in await store.export_chat_examples())
        # Ann's DM chat, in which nobody else wrote, is gone as well (its mode/reset state with it).
        assert rows(store, "SELECT platform_chat_id FROM chats ORDER BY id") == [("-100",), ("2",)]
        assert await store.integrity_check() == "ok"
    finally:
        await store.close()
    export = lorabot("db", "export", "--db", str(db))  # the operator's export: same result
    assert export.returncode == 0, export.stderr
    assert "bob public one" in export.stdout and "ann" not in export.stdout
    # Deleted rows may linger in free pages (depends on SQLite's secure_delete build default) until a
    # VACUUM; after `lorabot db vacuum` the words must be gone from every file of the database.
    assert _vacuum_clears(db)


def _vacuum_clears(db: Path) -> bool:
    result = lorabot("db", "vacuum", "--db", str(db))
    assert result.returncode == 0, result.stderr
    return b"ann secret" not in b"".join(p.read_bytes() for p in db.parent.glob("log.db*"))


async def test_forget_while_a_reply_is_in_flight(mem_store: AsyncStore) -> None:
    core = core_with(mem_store, FakeEngine(delay=0.02))
    story = asyncio.ensure_future(core.handle(incoming("/story a long tale", user="1")))
    await asyncio.sleep(0.05)  # the question is stored; the story is being written
    forget = await core.handle(incoming("/forget", user="1"))
    assert forget.kind == "command"
    reply = await story  # raises StoreError today
    assert reply.kind == "answer"
    assert stored_users(mem_store) == [] and rows(mem_store, "SELECT count(*) FROM messages") == [(0,)]


async def test_forget_for_an_unknown_user_and_twice(mem_store: AsyncStore) -> None:
    core = core_with(mem_store)
    assert "(0 messages)" in (await core.handle(incoming("/forget", user="404"))).text
    await core.handle(incoming(user="1"))
    assert "(2 messages)" in (await core.handle(incoming("/forget", user="1"))).text  # question + reply
    assert "(0 messages)" in (await core.handle(incoming("/forget", user="1"))).text
