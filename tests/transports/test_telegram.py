"""The Telegram transport through python-telegram-bot's real stack, against a Bot API server on 127.0.0.1."""

from __future__ import annotations

import itertools
import logging

import pytest

from bot.config import Config, replace
from bot.core import COMMANDS, Core
from bot.errors import LorabotError
from bot.store import AsyncStore
from bot.transports.split import utf16_len
from bot.transports.telegram_chat import TelegramTransport
from tests.fakes import FakeEngine
from tests.transports.tg_harness import running
from tests.transports.tg_server import (
    TOKEN,
    FakeBotAPI,
    bot_message,
    mention,
    message,
    text_document,
    user,
)


async def test_start_registers_commands_and_answers_a_message(api: FakeBotAPI, store: AsyncStore, query) -> None:
    async with running(api, store):
        assert api.of("getMe") and api.of("deleteWebhook")
        commands = api.of("setMyCommands")[0]["commands"]
        assert [c["command"] for c in commands] == [name for name, _ in COMMANDS]
        api.push({"message": message("/sentiment I love this")})
        [sent] = await api.wait_for("sendMessage")
    assert sent["chat_id"] == "7"
    assert sent["text"].startswith("😊 positive")
    assert "parse_mode" not in sent.params
    assert sent["link_preview_options"] == {"is_disabled": True}
    buttons = sent["reply_markup"]["inline_keyboard"][0]
    stored = query("SELECT id, text FROM messages WHERE direction = 'out'")
    assert [b["callback_data"] for b in buttons] == [f"fb:{stored[0][0]}:1", f"fb:{stored[0][0]}:-1"]
    assert stored[0][1] == sent["text"]


# PTB itself warns while building a RetryAfter (its int -> timedelta migration); nothing for us to change.
_PTB_RETRY_AFTER_WARNING = pytest.mark.filterwarnings("ignore:.*retry_after.*:DeprecationWarning")


def _gaps(calls: list) -> list[float]:
    return [b.at - a.at for a, b in itertools.pairwise(calls)]


async def test_streamed_story_is_edited_at_a_throttled_pace_and_ends_complete(
    api: FakeBotAPI, store: AsyncStore, query,
) -> None:
    engine = FakeEngine(delay=0.05, story_words=20)  # about 1 s of streaming
    async with running(api, store, engine):
        api.push({"message": message("/story a dragon learns to fly")})
        await api.wait_for("editMessageText", reply_markup=None, timeout=1.5)  # streaming has begun
        await api.settle()
    [first] = api.of("sendMessage")
    edits = api.of("editMessageText")
    final = query("SELECT text FROM messages WHERE direction = 'out'")[0][0]
    assert final.endswith("word19")
    assert len(first["text"]) < len(final)                      # the first message showed partial text
    assert edits[-1]["text"] == final and "reply_markup" in edits[-1].params
    assert all("reply_markup" not in e.params for e in edits[:-1])
    assert 2 <= len(edits) <= 10                                # coalesced: not one edit per word (20)
    # At most one edit per interval: the times are the fake server's receipts, so one gap can shrink by a
    # loaded machine's delivery jitter (0.217 s seen); their mean cannot, and no gap comes near zero.
    gaps = _gaps([first, *edits])
    assert sum(gaps) / len(gaps) >= 0.25 * 0.9 and min(gaps) >= 0.25 * 0.5
    assert {c["message_id"] for c in edits} == {"5000"}        # always the same message
    typing = api.of("sendChatAction")
    assert typing and typing[0]["action"] == "typing"


async def test_long_reply_is_split_at_4096_utf16_units_with_buttons_on_the_last(
    api: FakeBotAPI, store: AsyncStore, query,
) -> None:
    engine = FakeEngine(story_words=1500)
    async with running(api, store, engine, story={"max_new_tokens": 2000}):
        api.push({"message": message("/story 😀 emoji everywhere")})
        await api.wait_for("sendMessage", count=3)
        await api.settle()
    final = query("SELECT text FROM messages WHERE direction = 'out'")[0][0]
    sent = api.of("sendMessage")
    edits = api.of("editMessageText")
    texts = [edits[-1]["text"] if edits else sent[0]["text"]] + [c["text"] for c in sent[1:]]
    assert len(texts) == -(-utf16_len(final) // 4096) or len(texts) == -(-utf16_len(final) // 4096) + 1
    assert all(utf16_len(t) <= 4096 for t in texts)
    assert " ".join(texts) == final                            # split at spaces: nothing else lost
    assert "reply_markup" in sent[-1].params
    assert all("reply_markup" not in c.params for c in [*sent[:-1], *edits])


@_PTB_RETRY_AFTER_WARNING
async def test_flood_control_answer_is_honoured_and_the_reply_still_arrives(api: FakeBotAPI, store: AsyncStore) -> None:
    api.fail("sendMessage", 429, retry_after=1)
    async with running(api, store):
        api.push({"message": message("/help")})
        sends = await api.wait_for("sendMessage", count=2, timeout=6)
    assert sends[0]["text"] == sends[1]["text"] and sends[0]["text"].startswith("Hi! I am lorabot")
    assert sends[1].at - sends[0].at >= 1.0


async def test_server_errors_are_retried_with_backoff(api: FakeBotAPI, store: AsyncStore) -> None:
    api.fail("sendMessage", 502, times=2)
    async with running(api, store):
        api.push({"message": message("/skills")})
        sends = await api.wait_for("sendMessage", count=3, timeout=6)
    assert len({c["text"] for c in sends}) == 1
    assert all(gap >= 0.4 for gap in _gaps(sends))


@_PTB_RETRY_AFTER_WARNING
async def test_rate_limited_stream_edit_is_skipped_and_the_final_text_delivered(
    api: FakeBotAPI, store: AsyncStore, query,
) -> None:
    api.fail("editMessageText", 429, retry_after=1)
    async with running(api, store, FakeEngine(delay=0.03, story_words=20)):
        api.push({"message": message("/story rain")})
        await api.wait_for("editMessageText", count=2, timeout=6)
        await api.settle(quiet=0.5)
    final = query("SELECT text FROM messages WHERE direction = 'out'")[0][0]
    edits = api.of("editMessageText")
    assert edits[-1]["text"] == final
    assert edits[1].at - edits[0].at >= 1.0                    # waited as told before editing again


GROUP = -1001


async def test_group_messages_are_answered_only_when_addressed(api: FakeBotAPI, store: AsyncStore, query) -> None:
    text = "hello @lorabot_test how are you"
    earlier = bot_message("an earlier answer", GROUP, 4000)
    cases = [
        (message("just chatting among humans", chat_id=GROUP, group=True), False),
        (message("/help@other_bot", chat_id=GROUP, group=True), False),
        (message(chat_id=GROUP, group=True, sticker=True), False),
        (message(text, chat_id=GROUP, group=True, entities=mention(text)), True),
        (message("and you?", chat_id=GROUP, group=True, reply_to=earlier), True),
        (message("/help", chat_id=GROUP, group=True), True),
        (message("/help@lorabot_test", chat_id=GROUP, group=True), True),
        (message(chat_id=GROUP, group=True, sticker=True, reply_to=earlier), True),
    ]
    async with running(api, store):
        for msg, _ in cases:
            api.push({"message": msg})
        await api.wait_for("sendMessage", count=sum(answered for _, answered in cases))
        await api.settle()
    sends = api.of("sendMessage")
    replied_to = [c["reply_parameters"]["message_id"] for c in sends]
    assert replied_to == [m["message_id"] for m, answered in cases if answered]
    by_id = {c["reply_parameters"]["message_id"]: c["text"] for c in sends}
    assert by_id[cases[3][0]["message_id"]] == "echo: user: hello how are you"  # the mention is removed
    assert by_id[cases[7][0]["message_id"]].startswith("I can only read text")
    assert query("SELECT count(*) FROM messages WHERE direction = 'in'") == [(5,)]  # silence leaves no rows


async def test_allowlist_refuses_other_users(api: FakeBotAPI, store: AsyncStore) -> None:
    async with running(api, store, access={"allowed_users": ("42",)}):
        api.push({"message": message("/help", user_id=7, chat_id=7)})
        api.push({"message": message("/help", user_id=42, chat_id=42)})
        await api.wait_for("sendMessage", count=2)
    texts = {c["chat_id"]: c["text"] for c in api.of("sendMessage")}
    assert texts["7"].startswith("Sorry, this bot is private")
    assert texts["42"].startswith("Hi! I am lorabot")


async def test_feedback_buttons_store_votes(api: FakeBotAPI, store: AsyncStore, query) -> None:
    async with running(api, store):
        api.push({"message": message("/sentiment what a great day")})
        [sent] = await api.wait_for("sendMessage")
        up, down = sent["reply_markup"]["inline_keyboard"][0]
        shown = {"message_id": 5000, "date": 0, "chat": {"id": 7, "type": "private"}, "text": sent["text"]}
        for n, data in enumerate([up["callback_data"], down["callback_data"], "fb:999999:1", "fb:1:2; DROP"]):
            api.push({"callback_query": {"id": f"q{n}", "from": user(7), "chat_instance": "c", "data": data,
                                         "message": shown}})
        answers = await api.wait_for("answerCallbackQuery", count=4)
    texts = {c["callback_query_id"]: c["text"] for c in answers}
    assert texts == {"q0": "Thanks for the feedback!", "q1": "Thanks for the feedback!",
                     "q2": "That message is no longer stored.", "q3": "That button is no longer valid."}
    reply_id = int(up["callback_data"].split(":")[1])
    assert query("SELECT message_id, value FROM feedback") == [(reply_id, -1)]  # the later vote replaced it


async def test_ask_as_a_reply_uses_the_replied_to_text_as_context(api: FakeBotAPI, store: AsyncStore, query) -> None:
    context = message("Mia moved to the city of Lisbon", user_id=8)
    async with running(api, store):
        api.push({"message": message("/ask where did Mia move?", reply_to=context)})
        [sent] = await api.wait_for("sendMessage")
    assert sent["text"] == "Lisbon"
    assert query("SELECT text, skill FROM messages WHERE direction = 'in'") == [("/ask where did Mia move?", "qa")]


async def test_ask_with_a_txt_document_downloads_it_as_context(api: FakeBotAPI, store: AsyncStore) -> None:
    api.files["doc1"] = b"\xef\xbb\xbfThe treaty was signed in Utrecht.\r\n"  # BOM, CRLF
    api.files["doc2"] = b"Notes: the meeting is in Oslo."
    with_caption = message(caption="/ask where was it signed?", document=text_document("doc1", 36))
    replied_doc = message(document=text_document("doc2", 30), user_id=8)
    async with running(api, store):
        api.push({"message": with_caption})
        await api.wait_for("sendMessage")
        api.push({"message": message("/ask where is the meeting?", reply_to=replied_doc)})
        await api.wait_for("sendMessage", count=2)
        api.push({"message": message(caption="/ask what?", document=text_document("big", 10**6))})
        await api.wait_for("sendMessage", count=3)
    texts = [c["text"] for c in api.of("sendMessage")]
    assert texts[:2] == ["Utrecht", "Oslo"]
    assert texts[2].startswith("That file is too large for me")
    assert api.downloads == ["documents/doc1.txt", "documents/doc2.txt"]  # the big one was never fetched


async def test_bad_input_gets_clear_replies_or_silence(api: FakeBotAPI, store: AsyncStore) -> None:
    injection = "<b>bold</b> *bold* [link](http://x.example) `code` _it_ &amp;"
    service = message(chat_id=7)
    service["new_chat_members"] = [user(8)]
    async with running(api, store):
        updates = [
            {"message": message(sticker=True)},
            {"message": message(photo=True)},
            {"message": message("x" * 100_000)},
            {"message": message(injection)},
            {"message": message("/frobnicate now")},
            {"edited_message": message("edited text")},
            {"message": service},
            {"message": message("   ")},
        ]
        for update in updates:
            api.push(update)
        await api.wait_for("sendMessage", count=6)
        await api.settle()
    texts = [c["text"] for c in api.of("sendMessage")]
    assert len(texts) == 6  # the edit and the service message get no answer
    assert texts[0].startswith("I can only read text") and texts[1].startswith("I can only read text")
    assert texts[2].startswith("That is too long for me (100,000 characters")
    assert texts[3] == f"echo: user: {injection}"  # shown literally: plain text, no parse mode
    assert texts[4] == "Unknown command /frobnicate. Send /help to see what I can do."
    assert texts[5].startswith("I can only read text")
    assert all("parse_mode" not in c.params for c in api.calls)


async def test_the_token_never_reaches_logs_or_errors(api: FakeBotAPI, store: AsyncStore, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    async with running(api, store):
        api.push({"message": message("/help")})
        await api.wait_for("sendMessage")
    assert any("api.telegram" in r.getMessage() or "/bot<redacted>" in r.getMessage() for r in caplog.records)
    assert TOKEN not in caplog.text

    other = "987654:another-secret-token"
    config = replace(Config(), telegram={"base_url": api.base_url})
    transport = TelegramTransport(Core(config, FakeEngine(), store), config, other)
    with pytest.raises(LorabotError) as info:
        await transport.start()
    await transport.stop()
    assert "rejected the bot token" in str(info.value) and other not in str(info.value)
    assert other not in caplog.text


async def test_webhook_mode_receives_updates_on_its_own_server(api: FakeBotAPI, store: AsyncStore) -> None:
    import socket

    import aiohttp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/telegram-hook"
    hook = {"mode": "webhook", "webhook_url": url, "webhook_listen": "127.0.0.1", "webhook_port": port}
    async with running(api, store, telegram=hook) as transport:
        [registered] = api.of("setWebhook")
        assert registered["url"] == url and registered["secret_token"] == transport.webhook_secret
        assert not api.of("getUpdates")
        update = {"update_id": 1, "message": message("/help")}
        async with aiohttp.ClientSession() as http:
            async with http.post(url, json=update, headers={"X-Telegram-Bot-Api-Secret-Token": "wrong"}) as r:
                assert r.status == 403
            secret = {"X-Telegram-Bot-Api-Secret-Token": registered["secret_token"]}
            async with http.post(url, json=update, headers=secret) as r:
                assert r.status == 200
        [sent] = await api.wait_for("sendMessage")
    assert sent["text"].startswith("Hi! I am lorabot")


async def test_messages_in_one_chat_are_answered_in_order(api: FakeBotAPI, store: AsyncStore) -> None:
    engine = FakeEngine(delay=0.1, story_words=5)
    async with running(api, store, engine, telegram={"edit_interval_s": 0.0}):
        api.push({"message": message("/story first")})
        api.push({"message": message("/help")})
        api.push({"message": message("/help", chat_id=8, user_id=8)})  # another chat is not held up
        await api.wait_for("sendMessage", count=3)
        await api.settle()
    sends = api.of("sendMessage")
    in_chat_7 = [c["text"] for c in sends if c["chat_id"] == "7"]
    assert not in_chat_7[0].startswith("Hi!") and in_chat_7[-1].startswith("Hi!")
    [other_chat] = [c for c in sends if c["chat_id"] == "8"]
    story_done = api.of("editMessageText")[-1]
    assert other_chat.at < story_done.at                        # answered while the story was still streaming
