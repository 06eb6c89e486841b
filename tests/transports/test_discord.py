"""The Discord transport through discord.py's real client: REST and gateway served on 127.0.0.1."""

from __future__ import annotations

import itertools
import logging

import discord
import pytest

from bot.config import Config
from bot.core import COMMANDS, Core
from bot.errors import LorabotError
from bot.store import AsyncStore
from bot.transports.discord_chat import DiscordTransport
from tests.fakes import FakeEngine
from tests.transports.dc_harness import running
from tests.transports.dc_server import (
    BOT_ID,
    BOT_USER,
    CHANNEL_ID,
    DM_CHANNEL_ID,
    TOKEN,
    FakeDiscord,
    bot_mention,
    discord_user,
    interaction_payload,
    message_payload,
    reaction_payload,
)


def contents(fake: FakeDiscord) -> list[str]:
    return [r.body["content"] for r in fake.sent]


async def test_start_syncs_slash_commands_and_identifies_with_message_content(
    fake: FakeDiscord, store: AsyncStore,
) -> None:
    async with running(fake, store):
        [sync] = fake.of("PUT", "/commands")
    assert fake.identify is not None
    assert discord.Intents._from_value(fake.identify["intents"]).message_content
    commands = {c["name"]: c for c in sync.body}
    assert set(commands) == {name for name, _ in COMMANDS}
    ask = {o["name"]: o for o in commands["ask"]["options"]}
    assert ask["question"]["type"] == 3 and ask["question"]["required"]
    assert ask["file"]["type"] == 11 and not ask.get("context", {}).get("required")
    compare = {o["name"]: o for o in commands["compare"]["options"]}
    assert {c["value"] for c in compare["skill"]["choices"]} == {"sentiment", "ner", "qa", "story"}
    assert [o["name"] for o in commands["sentiment"]["options"]] == ["text"]


async def test_slash_command_defers_then_answers(fake: FakeDiscord, store: AsyncStore) -> None:
    async with running(fake, store):
        await fake.dispatch("INTERACTION_CREATE", interaction_payload("sentiment", {"text": "I love it"}))
        await fake.wait_for("PATCH", "/messages/@original")
        await fake.settle()
    [callback] = fake.of("POST", "/callback")
    assert callback.body["type"] == 5  # deferred: "thinking…"
    assert contents(fake)[-1].startswith("😊 positive")


MIA = "Mia moved to the city of Lisbon"


async def test_slash_reply_gets_reactions_and_votes_become_feedback_rows(
    fake: FakeDiscord, store: AsyncStore, query,
) -> None:
    async with running(fake, store):
        await fake.dispatch("INTERACTION_CREATE", interaction_payload("sentiment", {"text": "what a great day"}))
        reactions = await fake.wait_for("PUT", "/reactions/", count=2)
        message_id = int(reactions[0].path.split("/")[4])
        for emoji, user_id in [("👍", BOT_ID), ("👍🏽", 11), ("👎", 12), ("🎉", 13), ("👍", 14)]:
            await fake.dispatch("MESSAGE_REACTION_ADD", reaction_payload(message_id, emoji, user_id))
        await fake.dispatch("MESSAGE_REACTION_ADD", reaction_payload(123, "👍", 15))  # not one of our replies
        await fake.settle()
    assert [r.path.split("/")[-2] for r in reactions] == ["👍", "👎"]
    [(reply_id,)] = query("SELECT id FROM messages WHERE direction = 'out'")
    votes = query("SELECT u.platform_user_id, f.value, f.message_id FROM feedback f JOIN users u ON u.id = f.user_id "
                  "ORDER BY u.platform_user_id")
    assert votes == [("11", 1, reply_id), ("12", -1, reply_id), ("14", 1, reply_id)]  # not the bot's own


async def test_streamed_slash_story_edits_the_original_response_at_a_throttled_pace(
    fake: FakeDiscord, store: AsyncStore, query,
) -> None:
    async with running(fake, store, FakeEngine(delay=0.05, story_words=20)):
        await fake.dispatch("INTERACTION_CREATE", interaction_payload("story", {"prompt": "a brave mouse"}))
        await fake.wait_for("PUT", "/reactions/", count=2, timeout=6)
    edits = fake.of("PATCH", "/messages/@original")
    final = query("SELECT text FROM messages WHERE direction = 'out'")[0][0]
    assert edits[-1].body["content"] == final and final.endswith("word19")
    assert 3 <= len(edits) <= 10                                 # coalesced: not one edit per word (20)
    assert min(b.at - a.at for a, b in itertools.pairwise(edits)) >= 0.25 * 0.9


async def test_slash_ask_takes_context_from_an_option_or_a_txt_attachment(fake: FakeDiscord, store: AsyncStore) -> None:
    fake.files["notes.txt"] = b"The meeting is in Oslo."
    attachment = {"id": "77", "filename": "notes.txt", "size": 23, "content_type": "text/plain; charset=utf-8",
                  "url": f"http://127.0.0.1:{fake.port}/attachments/notes.txt",
                  "proxy_url": f"http://127.0.0.1:{fake.port}/attachments/notes.txt"}
    big = {**attachment, "id": "78", "filename": "big.txt", "size": 10**6}
    async with running(fake, store):
        await fake.dispatch("INTERACTION_CREATE", interaction_payload(
            "ask", {"question": "where did Mia move?", "context": MIA}))
        await fake.wait_for("PATCH", "/messages/@original")
        for item in (attachment, big):
            await fake.dispatch("INTERACTION_CREATE", interaction_payload(
                "ask", {"question": "where is the meeting?", "file": item["id"]}, option_types={"file": 11},
                resolved={"attachments": {item["id"]: item}}))
        await fake.wait_for("PATCH", "/messages/@original", count=3)
        await fake.settle()
    assert sorted(contents(fake)) == ["Lisbon", "Oslo", "That file is too large for me (977 KB); send a .txt file "
                                      "of at most 256 KB."]
    assert fake.of("GET", "/attachments/") and not fake.of("GET", "/attachments/big.txt")


async def test_slash_compare_mode_and_forget(fake: FakeDiscord, store: AsyncStore) -> None:
    async with running(fake, store):
        await fake.dispatch("INTERACTION_CREATE", interaction_payload(
            "compare", {"skill": "sentiment", "text": "I love it"}))
        await fake.dispatch("INTERACTION_CREATE", interaction_payload("mode", {"skill": "sentiment"}))
        await fake.dispatch("INTERACTION_CREATE", interaction_payload("forget"))
        await fake.wait_for("PATCH", "/messages/@original", count=3)
    callbacks = fake.of("POST", "/callback")
    assert [c.body.get("data", {}).get("flags", 0) & 64 for c in callbacks] == [0, 0, 64]  # /forget answers privately
    texts = contents(fake)
    assert texts[0].startswith("Base model (pre-trained only):")
    assert texts[1].startswith("Mode set to sentiment")
    assert texts[2].startswith("Done: I deleted everything stored about you")


async def test_mentions_and_replies_in_a_server_are_answered_other_chatter_is_not(
    fake: FakeDiscord, store: AsyncStore, query,
) -> None:
    earlier_bot = message_payload("an earlier answer", author=BOT_USER)
    context = message_payload(MIA, author=discord_user(12, "bob"))
    cases = [
        (message_payload("people talking among themselves"), None),
        (message_payload("/help"), None),                                    # a typed command, not for us
        (message_payload("", stickers=True), None),
        (message_payload(f"<@{BOT_ID}> hello there", mentions=[bot_mention()]), "echo: user: hello there"),
        (message_payload("and you?", referenced=earlier_bot), "echo: user: and you?"),
        (message_payload(f"<@!{BOT_ID}> /ask where did Mia move?", mentions=[bot_mention()], referenced=context),
         "Lisbon"),
        (message_payload("", stickers=True, referenced=earlier_bot), "I can only read text"),
    ]
    async with running(fake, store):
        for payload, _ in cases:
            await fake.dispatch("MESSAGE_CREATE", payload)
        await fake.wait_for("POST", f"/channels/{CHANNEL_ID}/messages", count=4)
        await fake.settle()
    posts = fake.of("POST", f"/channels/{CHANNEL_ID}/messages")
    expected = [(p["id"], text) for p, text in cases if text]
    assert [(str(r.body["message_reference"]["message_id"]), r.body["content"][:len(text)]) for r, (_, text)
            in zip(posts, expected, strict=True)] == expected
    assert all(r.body["allowed_mentions"]["parse"] == [] and r.body["flags"] & 4 for r in posts)  # no pings/embeds
    assert query("SELECT count(*) FROM messages WHERE direction = 'in'") == [(4,)]


async def test_dms_are_answered_and_reply_chains_are_fetched_for_context(fake: FakeDiscord, store: AsyncStore) -> None:
    context = message_payload(MIA, channel_id=DM_CHANNEL_ID, guild=False)
    fake.messages[int(context["id"])] = context  # known to the server, absent from the gateway event
    async with running(fake, store):
        await fake.dispatch("MESSAGE_CREATE", message_payload("hi", channel_id=DM_CHANNEL_ID, guild=False))
        await fake.wait_for("POST", f"/channels/{DM_CHANNEL_ID}/messages")
        await fake.dispatch("MESSAGE_CREATE", message_payload(
            "/ask where did Mia move?", channel_id=DM_CHANNEL_ID, guild=False, reference_id=int(context["id"])))
        await fake.wait_for("POST", f"/channels/{DM_CHANNEL_ID}/messages", count=2)
    posts = fake.of("POST", f"/channels/{DM_CHANNEL_ID}/messages")
    assert [p.body["content"] for p in posts] == ["echo: user: hi", "Lisbon"]
    assert "message_reference" not in posts[0].body  # DMs need no threading
    assert fake.of("GET", f"/channels/{DM_CHANNEL_ID}/messages/{context['id']}")


class CodeEngine(FakeEngine):
    """Answers chat with a long fenced code block, streamed word by word like a real model."""

    async def generate(self, prompt, params, adapter, on_text=None):  # type: ignore[no-untyped-def]
        code = "\n".join(f"    value_{i} = compute({i})  # step {i}" for i in range(150))
        text = f" Here you go:\n```python\n{code}\n```\nThat is all."
        for piece in text.split(" "):
            if on_text:
                await on_text(piece + " ")
        from bot.engine import Generation

        return Generation(text=text, prompt_tokens=1, completion_tokens=1, finish_reason="stop")


async def test_long_replies_split_at_2000_with_code_fences_intact(fake: FakeDiscord, store: AsyncStore, query) -> None:
    async with running(fake, store, CodeEngine()):
        await fake.dispatch("MESSAGE_CREATE", message_payload("code please", channel_id=DM_CHANNEL_ID, guild=False))
        await fake.wait_for("POST", f"/channels/{DM_CHANNEL_ID}/messages", count=3)
        await fake.settle()
    posts = fake.of("POST", f"/channels/{DM_CHANNEL_ID}/messages")
    edits = fake.of("PATCH", f"/channels/{DM_CHANNEL_ID}/messages/")
    chunks = [edits[-1].body["content"] if edits else posts[0].body["content"]] + [p.body["content"] for p in posts[1:]]
    assert all(len(c) <= 2000 for c in chunks)
    assert all(c.count("```") % 2 == 0 for c in chunks)
    assert all(c.startswith("```python\n") for c in chunks[1:-1])
    final = query("SELECT text FROM messages WHERE direction = 'out'")[0][0]
    assert "".join("".join(chunks).replace("```python", "").replace("```", "").split()) == "".join(
        final.replace("```python", "").replace("```", "").split())
    [last_id] = [i for i, m in fake.messages.items() if m["content"] == chunks[-1]]
    assert [r.path.split("/")[4] for r in fake.of("PUT", "/reactions/")] == [str(last_id)] * 2


async def test_rate_limited_send_is_retried_by_discord_py(fake: FakeDiscord, store: AsyncStore) -> None:
    fake.fail("POST", f"/channels/{DM_CHANNEL_ID}/messages", retry_after=0.5)
    async with running(fake, store):
        await fake.dispatch("MESSAGE_CREATE", message_payload("hello", channel_id=DM_CHANNEL_ID, guild=False))
        posts = await fake.wait_for("POST", f"/channels/{DM_CHANNEL_ID}/messages", count=2, timeout=6)
    assert posts[0].body == posts[1].body and posts[1].at - posts[0].at >= 0.5


async def test_bad_input_gets_clear_replies_or_silence(fake: FakeDiscord, store: AsyncStore) -> None:
    injection = "<b>bold</b> *bold* [link](http://x.example) @everyone <@123>"
    dm = {"channel_id": DM_CHANNEL_ID, "guild": False}
    async with running(fake, store):
        for payload in [
            message_payload("", stickers=True, **dm),
            message_payload("x" * 100_000, **dm),
            message_payload(injection, **dm),
            message_payload("/frobnicate now", **dm),
            message_payload("from another bot", author={**discord_user(50, "otherbot"), "bot": True}, **dm),
            message_payload("", message_type=7),                               # "X joined the server"
        ]:
            await fake.dispatch("MESSAGE_CREATE", payload)
        await fake.dispatch("MESSAGE_UPDATE", message_payload("edited", **dm))
        await fake.wait_for("POST", f"/channels/{DM_CHANNEL_ID}/messages", count=4)
        await fake.settle()
    texts = contents(fake)
    assert len(texts) == 4
    assert texts[0].startswith("I can only read text")
    assert texts[1].startswith("That is too long for me (100,000 characters")
    assert texts[2] == "echo: user: <b>bold</b> *bold* \\[link\\](http://x.example) @everyone <@123>"
    assert texts[3] == "Unknown command /frobnicate. Send /help to see what I can do."
    assert all(r.body["allowed_mentions"]["parse"] == [] for r in fake.sent)  # @everyone pings nobody


async def test_the_token_never_reaches_logs_or_errors(fake: FakeDiscord, store: AsyncStore, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    async with running(fake, store):
        await fake.dispatch("MESSAGE_CREATE", message_payload("hi", channel_id=DM_CHANNEL_ID, guild=False))
        await fake.wait_for("POST", f"/channels/{DM_CHANNEL_ID}/messages")
    assert TOKEN not in caplog.text

    wrong = "NzEyMzQ1Njc4OTAxMjM0NTY3.Gxyz.wrong-token-value"
    config = Config()
    transport = DiscordTransport(Core(config, FakeEngine(), store), config, wrong)
    with pytest.raises(LorabotError) as info:
        await transport.start()
    assert "rejected the bot token" in str(info.value) and wrong not in str(info.value)
    assert wrong not in caplog.text
