"""Discord state that must outlive a message or a process, through discord.py's real stack against the
loopback gateway and REST server: a deleted partial answer, votes across a restart and their retraction,
slash commands synced only when they changed, and their choices after /reload."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

from discord.utils import time_snowflake

from bot.adapters import AdapterProblem
from bot.store import AsyncStore
from tests.fakes import FakeEngine, fake_adapter
from tests.transports.dc_harness import running
from tests.transports.dc_server import (
    DM_CHANNEL_ID,
    FakeDiscord,
    interaction_payload,
    message_payload,
    reaction_payload,
)

# ---------------------------------------------------------------------- deleted partial message (item 12)

async def test_a_deleted_partial_message_still_gets_the_final_text(fake: FakeDiscord, store: AsyncStore, query) -> None:
    async with running(fake, store, FakeEngine(delay=0.05, story_words=20)):
        await fake.dispatch("MESSAGE_CREATE", message_payload("/story a fox", channel_id=DM_CHANNEL_ID, guild=False))
        await fake.wait_for("POST", f"/channels/{DM_CHANNEL_ID}/messages")
        partial_id = max(fake.messages)
        fake.delete_message(partial_id)                                 # the user deletes the partial answer
        await fake.wait_for("PUT", "/reactions/", count=2, timeout=6)
    final = query("SELECT text FROM messages WHERE direction = 'out'")[0][0]
    assert final.endswith("word19")
    shown = [m["content"] for i, m in fake.messages.items() if i != partial_id and m["author"]["bot"]]
    assert shown[-1] == final                                           # posted anew, in full


async def test_a_deleted_slash_response_still_gets_the_final_text(fake: FakeDiscord, store: AsyncStore, query) -> None:
    async with running(fake, store, FakeEngine(delay=0.05, story_words=20)):
        payload = interaction_payload("story", {"prompt": "a brave mouse"})
        await fake.dispatch("INTERACTION_CREATE", payload)
        await fake.wait_for("PATCH", "/messages/@original")
        fake.deleted_originals.add(payload["token"])
        await fake.wait_for("PUT", "/reactions/", count=2, timeout=6)
    final = query("SELECT text FROM messages WHERE direction = 'out'")[0][0]
    followups = [m for m in fake.messages.values() if m.get("webhook_id")]
    assert len(followups) == 1 and followups[0]["content"] == final   # one new message, showing it all


async def test_a_channel_that_refuses_the_bot_is_not_retried_until_someone_writes_again(
    fake: FakeDiscord, store: AsyncStore, query,
) -> None:
    def written_now(text: str, offset_s: float = 0.0) -> dict:
        moment = datetime.now(UTC) + timedelta(seconds=offset_s)  # Discord ids carry their time
        return message_payload(text, channel_id=DM_CHANNEL_ID, guild=False, message_id=time_snowflake(moment))

    fake.closed_channels.add(DM_CHANNEL_ID)
    posts = f"/channels/{DM_CHANNEL_ID}/messages"
    async with running(fake, store, FakeEngine(delay=0.03, story_words=30)):
        await fake.dispatch("MESSAGE_CREATE", written_now("/story a long one"))
        await fake.dispatch("MESSAGE_CREATE", written_now("hello?"))     # queued behind it
        await fake.wait_for("POST", posts)
        await fake.settle(quiet=1.0)
        attempts = len(fake.of("POST", posts))
        marked = query("SELECT unreachable_reason FROM chats")
        fake.closed_channels.clear()
        await fake.dispatch("MESSAGE_CREATE", written_now("/help", offset_s=1))
        await fake.wait_for("POST", posts, count=attempts + 1)
    assert attempts == 1
    assert marked == [("403 Forbidden (error code: 50007): Cannot send messages to this user",)]
    assert query("SELECT unreachable_at FROM chats") == [(None,)]


# ---------------------------------------------------------------------- feedback across a restart (item 13)

async def test_votes_survive_a_restart_and_removing_a_reaction_retracts_the_vote(
    fake: FakeDiscord, store: AsyncStore, query,
) -> None:
    async with running(fake, store):
        await fake.dispatch("INTERACTION_CREATE", interaction_payload("sentiment", {"text": "what a great day"}))
        reactions = await fake.wait_for("PUT", "/reactions/", count=2)
    message_id = int(reactions[0].path.split("/")[4])
    votes = "SELECT u.platform_user_id, f.value FROM feedback f JOIN users u ON u.id = f.user_id ORDER BY 1"
    async with running(fake, store):                                    # a new process: nothing in memory
        await fake.dispatch("MESSAGE_REACTION_ADD", reaction_payload(message_id, "👍", 11))
        await fake.dispatch("MESSAGE_REACTION_ADD", reaction_payload(message_id, "👎", 12))
        await fake.dispatch("MESSAGE_REACTION_ADD", reaction_payload(message_id, "👍", 12))  # replaces the 👎
        # A reaction makes no request to wait for: wait for the votes in the database instead.
        after_votes = await _until(lambda: query(votes), [("11", 1), ("12", 1)])
        await fake.dispatch("MESSAGE_REACTION_REMOVE", reaction_payload(message_id, "👍", 11))
        await fake.dispatch("MESSAGE_REACTION_REMOVE", reaction_payload(message_id, "👎", 12))  # not the vote
        await _until(lambda: query(votes), [("12", 1)])
        await asyncio.sleep(0.2)  # the 👎 removal, handled after the 👍 one, must not change anything
        final_votes = query(votes)
    assert after_votes == [("11", 1), ("12", 1)]
    assert final_votes == [("12", 1)]


async def _until(read, expected, timeout: float = 10.0):  # type: ignore[no-untyped-def]
    """``read()`` once it returns ``expected``, or its last value after ``timeout`` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    value = read()
    while value != expected and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)
        value = read()
    return value


# ---------------------------------------------------------------------- slash command sync (item 14)

class ReloadingEngine(FakeEngine):
    """An engine whose /reload finds one more adapter folder."""

    async def reload_adapters(self) -> list[AdapterProblem]:
        self.installed["reviews"] = fake_adapter("reviews", "sentiment", ("positive", "negative", "neutral"))
        return []


def _choices(sync_body: list[dict], command: str) -> set[str]:
    [option] = [o for o in {c["name"]: c for c in sync_body}[command]["options"] if o["name"] == "skill"]
    return {c["value"] for c in option["choices"]}


async def test_slash_commands_are_synced_only_when_they_changed(fake: FakeDiscord, store: AsyncStore) -> None:
    async with running(fake, store):
        pass
    async with running(fake, store):                                    # a restart with the same commands
        pass
    assert len(fake.of("PUT", "/commands")) == 1
    engine = ReloadingEngine()
    await engine.reload_adapters()                                      # a new adapter folder at the next start
    async with running(fake, store, engine):
        pass
    syncs = fake.of("PUT", "/commands")
    assert len(syncs) == 2 and "reviews" in _choices(syncs[1].body, "mode")


async def test_reload_refreshes_the_mode_and_compare_choices(fake: FakeDiscord, store: AsyncStore) -> None:
    admin = {"access": {"admins": ("discord:11",)}}
    async with running(fake, store, ReloadingEngine(), **admin):
        [first] = fake.of("PUT", "/commands")
        assert "reviews" not in _choices(first.body, "mode")
        await fake.dispatch("INTERACTION_CREATE", interaction_payload("reload"))
        syncs = await fake.wait_for("PUT", "/commands", count=2)
        await fake.settle()
    assert "reviews" in _choices(syncs[1].body, "mode") and "reviews" in _choices(syncs[1].body, "compare")
    assert len(fake.of("PUT", "/commands")) == 2
    assert json.dumps(syncs[0].body) != json.dumps(syncs[1].body)
