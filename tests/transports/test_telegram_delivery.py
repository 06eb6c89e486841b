"""Telegram's platform limits through python-telegram-bot's real stack, against the loopback Bot API server:
sends are paced ahead of flood control, a group upgraded to a supergroup is followed, a chat that blocked
the bot is not retried, and a deleted partial message does not swallow the final text."""

from __future__ import annotations

import itertools
import time

from bot.store import AsyncStore
from bot.transports.telegram_pacing import Rate, TelegramLimits, TelegramPacer
from tests.fakes import FakeEngine
from tests.transports.tg_harness import running
from tests.transports.tg_server import FakeBotAPI, mention, message

GROUP, SUPERGROUP = -1001, -1009876


def _gaps(calls: list) -> list[float]:
    return [b.at - a.at for a, b in itertools.pairwise(calls)]


# ---------------------------------------------------------------------- pacing (item 10)

async def test_a_burst_to_one_chat_is_spread_out_at_the_per_chat_rate(api: FakeBotAPI, store: AsyncStore) -> None:
    limits = TelegramLimits(per_chat=Rate(1, 0.3), per_group=Rate(100, 1.0), overall=Rate(100, 1.0))
    async with running(api, store, limits=limits):
        for _ in range(4):
            api.push({"message": message("/help")})
        api.push({"message": message("/skills", chat_id=8, user_id=8)})
        sends = await api.wait_for("sendMessage", count=5, timeout=10)
    in_chat = [c for c in sends if c["chat_id"] == "7"]
    assert len(in_chat) == 4
    assert min(_gaps(in_chat)) >= 0.3 * 0.7                     # one per 0.3 s, measured at the server
    [other] = [c for c in sends if c["chat_id"] == "8"]
    assert other.at < in_chat[-1].at                             # another chat is not held up by it


async def test_a_group_is_paced_at_the_group_rate_and_the_bot_at_the_overall_rate(
    api: FakeBotAPI, store: AsyncStore,
) -> None:
    limits = TelegramLimits(per_chat=Rate(100, 1.0), per_group=Rate(2, 1.0), overall=Rate(3, 1.0))
    async with running(api, store, limits=limits):
        for _ in range(4):
            api.push({"message": message("/help", chat_id=GROUP, group=True)})
        in_group = await api.wait_for("sendMessage", count=4, timeout=10)
        started = time.monotonic()
        for chat in range(20, 26):  # six private chats: only the overall limit applies
            api.push({"message": message("/help", chat_id=chat, user_id=chat)})
        sends = await api.wait_for("sendMessage", count=10, timeout=10)
    # A bucket of 2 that refills at 2/s: two at once, then one per 0.5 s.
    assert in_group[3].at - in_group[0].at >= 1.0 * 0.7
    private = [c for c in sends[4:] if c.at >= started]
    assert len(private) == 6 and private[-1].at - private[0].at >= 1.0 * 0.7  # 3 per second overall


async def test_idle_chat_buckets_are_dropped_so_memory_stays_bounded(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from bot.transports import telegram_pacing

    monkeypatch.setattr(telegram_pacing, "MAX_IDLE_BUCKETS", 8)
    pacer = TelegramPacer(TelegramLimits(per_chat=Rate(1, 60.0)))

    async def call() -> bool:
        return True

    for chat in range(8):  # eight chats that just sent: their buckets are not full again for a minute
        assert await pacer.process_request(call, (), {}, "sendMessage", {"chat_id": chat}, None)
    pacer.chats["idle"]  # a bucket never used is full
    assert len(pacer.chats) == 9
    for chat in range(100, 140):
        pacer.chats[str(chat)]
    assert len(pacer.chats) <= 8 + 2  # the busy ones stay (their waits still matter), idle ones go


# ---------------------------------------------------------------------- chat migration and blocking (item 11)

async def test_a_group_upgraded_to_a_supergroup_is_followed_with_its_mode_and_history(
    api: FakeBotAPI, store: AsyncStore, query,
) -> None:
    async with running(api, store):
        api.push({"message": message("/mode sentiment", chat_id=GROUP, group=True)})
        await api.wait_for("sendMessage", chat_id=GROUP)
        api.migrated[GROUP] = SUPERGROUP  # from now on Telegram refuses the old id
        api.push({"message": message("/help", chat_id=GROUP, group=True)})  # sent just before the upgrade
        [moved] = await api.wait_for("sendMessage", chat_id=SUPERGROUP)
        text = "@lorabot_test I love this"
        api.push({"message": message(text, chat_id=SUPERGROUP, group=True, entities=mention(text))})
        later = await api.wait_for("sendMessage", count=2, chat_id=SUPERGROUP)
    assert moved["text"].startswith("Hi! I am lorabot")
    assert later[1]["text"].startswith("😊 positive")                      # the mode moved with the chat
    assert query("SELECT platform_chat_id, mode FROM chats") == [(str(SUPERGROUP), "sentiment")]
    assert query("SELECT count(*) FROM messages m JOIN chats c ON c.id = m.chat_id") == [(6,)]


async def test_the_upgrade_notice_moves_the_chat_before_anything_is_sent(
    api: FakeBotAPI, store: AsyncStore, query,
) -> None:
    async with running(api, store):
        api.push({"message": message("/mode ner", chat_id=GROUP, group=True)})
        await api.wait_for("sendMessage", chat_id=GROUP)
        notice = message(chat_id=GROUP, group=True, chat_type="group")
        notice["migrate_to_chat_id"] = SUPERGROUP
        api.push({"message": notice})
        await api.settle()
    assert query("SELECT platform_chat_id, mode FROM chats") == [(str(SUPERGROUP), "ner")]


async def test_a_chat_that_blocked_the_bot_is_not_retried_until_it_writes_again(
    api: FakeBotAPI, store: AsyncStore, query,
) -> None:
    api.blocked.add(7)
    async with running(api, store, FakeEngine(delay=0.03, story_words=30)):
        api.push({"message": message("/story a long one")})           # streams: partial sends, then final
        api.push({"message": message("/help")})                       # written before the block was seen
        await api.wait_for("sendMessage", chat_id=7)
        await api.settle(quiet=1.0)
        attempts = len(api.of("sendMessage"))
        marked = query("SELECT unreachable_reason FROM chats")
        api.blocked.clear()                                           # the user unblocks and writes again
        api.push({"message": message("/skills", date=time.time() + 2)})
        await api.wait_for("sendMessage", count=attempts + 1)
    assert attempts == 1                                              # no retries, no queued reply attempted
    assert marked == [("Forbidden: bot was blocked by the user",)]
    assert api.of("sendMessage")[-1]["text"].startswith("• chat")
    assert query("SELECT unreachable_at FROM chats") == [(None,)]


# ---------------------------------------------------------------------- deleted partial message (item 12)

async def test_the_final_text_arrives_even_if_the_partial_message_was_deleted(
    api: FakeBotAPI, store: AsyncStore, query,
) -> None:
    async with running(api, store, FakeEngine(delay=0.05, story_words=20)):
        api.push({"message": message("/story a dragon")})
        await api.wait_for("sendMessage")
        api.deleted.add(5000)                                         # the user deletes the partial message
        await api.wait_for("sendMessage", count=2, timeout=6)
        await api.settle(quiet=0.6)
    final = query("SELECT text FROM messages WHERE direction = 'out'")[0][0]
    assert final.endswith("word19")
    last = [c for c in api.calls if c.method in ("sendMessage", "editMessageText")][-1]
    assert last["text"] == final and "reply_markup" in last.params
    assert last.method == "sendMessage" or int(last["message_id"]) != 5000
