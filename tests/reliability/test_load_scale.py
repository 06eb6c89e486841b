"""Load at scale into the real engine: thousands of messages from hundreds of users, through the real client
stacks (python-telegram-bot against tests/transports/tg_server.py, discord.py against
tests/transports/dc_server.py) at the same time, into one Core, one SQLite file and the real LocalEngine on the
tiny random Llama with its random adapters: the way ``lorabot run`` wires both platforms.

Each user sends 10 messages in one chat (their DM, or one of a few busy groups): 7 model requests over every
skill (/sentiment, /ner, /ask q | ctx, /story, a plain message in chat mode, /chat), 2 commands and 1 malformed
command. The rate limit is 6 model requests a minute and the access clock is frozen (every message lands in
the same minute, however long the run takes), so exactly one request per user is refused for speed, whatever
the order. The whole run is under one hard time bound.

Asserted: every message gets exactly one visible reply (per chat; per message where replies are threaded);
every message but the rate-limited ones (refused before anything is written) is in SQLite exactly as sent,
answered or refused (none pending or failed), with exactly one logged reply, and what each chat shows is
what the log says; refusals carry their reason; and the process's
resident memory, sampled after a warm-up wave and at the end, stays flat.

2,000 messages take about 60 s on a busy 2-core machine (about 35 messages a second), so the test is in the
default suite; should it grow past that, mark it ``slow`` (``make test-all`` runs slow tests).
"""

from __future__ import annotations

import asyncio
import gc
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import discord
import pytest
import yarl

from bot.access import Access
from bot.config import Config, replace
from bot.core import Core
from bot.engine.loading import BaseModelRef, load_model
from bot.store import AsyncStore
from bot.transports import discord_chat
from bot.transports.discord_chat import DiscordTransport
from bot.transports.telegram_chat import TelegramTransport
from tests.transports import dc_server, tg_server
from tests.transports.tg_harness import QUICK

USERS = 200  # 100 on each platform
PER_USER = 10
LIMIT = 6  # model requests per user per minute: each user's 7th is refused
MODEL = ["/sentiment I love this {i}", "/ner Alice met Bob in Paris {i}",
         "/ask where is the cat? | The cat sat in Rome {i}", "/story a brave mouse {i}",
         "hello there, number {i}", "/chat what is {i}?", "/sentiment what a day {i}"]
COMMANDS = ["/help", "/skills", "/stats", "/mode", "/reset"]
MALFORMED = ["/ask", "/frobnicate now", "/sentiment", "/story"]  # refused with a reason, before the rate limit
RSS_GROWTH_MB = 60
TG_GROUPS = [-1001, -1002, -1003]
DC_CHANNELS = [dc_server.CHANNEL_ID, 702, 703]  # server channels (702 and 703 made with CHANNEL_CREATE)


@dataclass(frozen=True)
class Sent:
    platform: str
    user: str
    chat: str
    text: str  # as the core stores it (the bot's mention removed)
    group: bool
    message_id: int


def _script(user: int) -> list[str]:
    """User ``user``'s messages; rotated so that every skill is in flight at once across users."""
    texts = [t.format(i=user) for t in MODEL]
    texts += [COMMANDS[user % len(COMMANDS)], COMMANDS[(user + 1) % len(COMMANDS)], MALFORMED[user % len(MALFORMED)]]
    assert len(texts) == PER_USER
    return texts[user % PER_USER:] + texts[:user % PER_USER]


def _group(user: int) -> int | None:
    """A quarter of the users talk in one of three groups, the rest in their DMs."""
    return (user // 4) % 3 if user % 4 == 0 else None


def _rss_mb() -> float:
    gc.collect()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


class Harness:
    """Both fakes, both transports, one core; pushes each user's k-th message and waits for the replies."""

    def __init__(self, users_per_platform: int, core: Core, config: Config) -> None:
        self.n = users_per_platform
        self.core, self.config = core, config
        self.api = tg_server.FakeBotAPI()
        self.fake = dc_server.FakeDiscord()
        self.sent: list[Sent] = []
        self.telegram: TelegramTransport | None = None
        self.discord: DiscordTransport | None = None

    async def start(self, monkeypatch: pytest.MonkeyPatch) -> None:
        await self.api.start()
        await self.fake.start()
        monkeypatch.setattr(discord.http.Route, "BASE", self.fake.api_base)
        monkeypatch.setattr(discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(self.fake.gateway_url))
        monkeypatch.setattr(discord_chat, "GUILD_READY_TIMEOUT_S", 0.05)
        config = replace(self.config, telegram={"base_url": self.api.base_url, "edit_interval_s": 0.2})
        self.telegram = TelegramTransport(self.core, config, tg_server.TOKEN, limits=QUICK)  # over Telegram's pace
        self.discord = DiscordTransport(self.core, config, dc_server.TOKEN)
        await asyncio.wait_for(self.telegram.start(), 20)
        await asyncio.wait_for(self.discord.start(), 20)
        for channel in DC_CHANNELS[1:]:
            await self.fake.dispatch("CHANNEL_CREATE", {
                "id": str(channel), "type": 0, "guild_id": str(dc_server.GUILD_ID), "name": f"room{channel}",
                "position": channel, "permission_overwrites": [], "nsfw": False, "parent_id": None})

    async def stop(self) -> None:
        for transport in (self.telegram, self.discord):
            if transport is not None:
                await asyncio.wait_for(transport.stop(), 20)
        await self.api.stop()
        await self.fake.stop()

    async def push(self, k: int) -> None:
        """Every user's k-th message, on both platforms, as fast as the fakes take them."""
        mention = f"<@{dc_server.BOT_ID}> "
        for user in range(self.n):
            text, group = _script(user)[k], _group(user)
            uid = 10_000 + user
            if group is None:
                update = tg_server.message(text, user_id=uid, chat_id=uid)
            elif text.startswith("/"):  # commands reach the bot in groups
                update = tg_server.message(text, user_id=uid, chat_id=TG_GROUPS[group], group=True)
            else:  # plain messages only when they mention it
                said = f"@{tg_server.BOT['username']} {text}"
                update = tg_server.message(said, user_id=uid, chat_id=TG_GROUPS[group], group=True,
                                           entities=tg_server.mention(said))
            self.api.push({"message": update})
            self.sent.append(Sent("telegram", str(uid), str(update["chat"]["id"]), text, group is not None,
                                  update["message_id"]))

            uid = 20_000 + user
            author = dc_server.discord_user(uid, f"user{user}")
            if group is None:
                payload = dc_server.message_payload(text, author=author, guild=False, channel_id=30_000 + user)
            else:  # in a server, only messages that mention the bot are for it
                payload = dc_server.message_payload(mention + text, author=author, channel_id=DC_CHANNELS[group],
                                                    mentions=[dc_server.bot_mention()])
            await self.fake.dispatch("MESSAGE_CREATE", payload)
            self.sent.append(Sent("discord", str(uid), payload["channel_id"], text, group is not None,
                                  int(payload["id"])))

    async def replies(self, count: int) -> None:
        """Wait until both platforms have ``count`` reply messages each, then for trailing stream edits."""
        await asyncio.gather(self.api.wait_for("sendMessage", count=count, timeout=3600),
                             self.fake.wait_for("POST", "/messages", count=count, timeout=3600))
        await asyncio.gather(self.api.settle(quiet=0.5, timeout=60), self.fake.settle(quiet=0.5, timeout=60))

    # ------------------------------------------------------------------ what the users saw
    def shown(self) -> Counter[tuple[str, str, str]]:
        """(platform, chat, final text) of every reply message, after its last edit."""
        sends = self.api.of("sendMessage")
        final = {5000 + n: (str(c["chat_id"]), c["text"]) for n, c in enumerate(sends)}  # the fake's id sequence
        for edit in self.api.of("editMessageText"):
            final[int(edit["message_id"])] = (str(edit["chat_id"]), edit["text"])
        shown = Counter(("telegram", chat, text) for chat, text in final.values())
        bot = str(dc_server.BOT_ID)
        shown.update(("discord", m["channel_id"], m["content"]) for m in self.fake.messages.values()
                     if m["author"]["id"] == bot)
        return shown

    def check_replies(self) -> None:
        """Exactly one reply message per message: per chat, and per message in groups (replies are threaded)."""
        sends = self.api.of("sendMessage")
        posts = [r for r in self.fake.requests if r.method == "POST" and r.path.endswith("/messages")]
        expected = Counter((s.platform, s.chat) for s in self.sent)
        got = Counter(("telegram", str(c["chat_id"])) for c in sends)
        got.update(("discord", r.path.split("/")[2]) for r in posts)
        assert got == expected
        threaded = Counter(("telegram", int(c["reply_parameters"]["message_id"])) for c in sends
                           if "reply_parameters" in c.params)
        threaded.update(("discord", int(r.body["message_reference"]["message_id"])) for r in posts
                        if isinstance(r.body, dict) and r.body.get("message_reference"))
        assert threaded == Counter((s.platform, s.message_id) for s in self.sent if s.group)


def _check_log(db: Path, sent: list[Sent], shown: Counter[tuple[str, str, str]], users: int) -> None:
    conn = sqlite3.connect(db)
    try:
        incoming = conn.execute(
            "SELECT c.platform, c.platform_chat_id, m.text FROM messages m JOIN chats c ON c.id = m.chat_id "
            "WHERE m.direction = 'in'").fetchall()
        statuses = conn.execute(
            "SELECT u.platform, u.platform_user_id, m.status, count(*) FROM messages m JOIN users u "
            "ON u.id = m.user_id WHERE m.direction = 'in' GROUP BY 1, 2, 3").fetchall()
        replies_per_message = Counter(n for (n,) in conn.execute(
            "SELECT (SELECT count(*) FROM messages o WHERE o.reply_to = i.id) FROM messages i "
            "WHERE i.direction = 'in'"))
        replies = conn.execute(
            "SELECT c.platform, c.platform_chat_id, o.text, o.adapter FROM messages o JOIN chats c "
            "ON c.id = o.chat_id WHERE o.direction = 'out'").fetchall()
    finally:
        conn.close()
    # One message per user is refused for speed before anything is written; every other one is stored, as
    # sent, in its chat: none lost, none twice.
    total = len(sent) - users
    assert len(incoming) == total
    assert not Counter(incoming) - Counter((s.platform, s.chat, s.text) for s in sent)
    # Each user: 6 answers + 2 commands answered; 1 malformed refused; nothing pending or failed.
    per_user = {}
    for platform, user, status, n in statuses:
        per_user.setdefault((platform, user), {})[status] = n
    assert len(per_user) == users
    assert all(s == {"answered": PER_USER - 2, "refused": 1} for s in per_user.values()), per_user
    # Exactly one logged reply per stored message, and what each chat shows is what the log says it was sent.
    assert replies_per_message == {1: total}
    assert len(replies) == total
    too_quick = Counter({k: n for k, n in shown.items() if "too quickly" in k[2]})
    assert Counter((p, c, t) for p, c, t, _ in replies) == shown - too_quick
    assert {a for *_, a in replies if a} == {"sentiment", "ner", "qa", "story"}  # the real adapters served them
    texts = [t for _, _, t in shown.elements()]
    assert not any("went wrong" in t or "that failed" in t for t in texts)
    assert sum("too quickly" in t for t in texts) == users
    assert sum(t.startswith(("Usage", "Unknown command", "Give me a question")) for t in texts) == users


@pytest.fixture
async def engine(tiny_base: Path, tiny_adapters: Path) -> AsyncIterator[object]:
    from bot.engine.scheduler import LocalEngine

    model, tok = load_model(tiny_base, dtype="float32", device="cpu")
    eng = LocalEngine(model, tok, BaseModelRef("tiny", tiny_base), tiny_adapters, max_batch=16)
    try:
        yield eng
    finally:
        await eng.close()


async def test_2000_messages_from_200_users_into_the_real_engine(
    tmp_path: Path, engine: object, monkeypatch: pytest.MonkeyPatch,
) -> None:
    users, per_platform = USERS, USERS // 2
    config = replace(
        Config(), access={"rate_limit_per_minute": LIMIT}, generation={"max_new_tokens": 8},
        story={"max_new_tokens": 8}, ner={"max_new_tokens": 8}, qa={"max_new_tokens": 8},
        discord={"edit_interval_s": 0.2},
    )
    store = await AsyncStore.open(tmp_path / "log.db")
    # Frozen clock: every message counts in the same minute, so the refusals do not depend on the run's speed.
    core = Core(config, engine, store, access=Access(config.access, clock=lambda: 0.0))  # type: ignore[arg-type]
    harness = Harness(per_platform, core, config)
    bound = 240  # seconds for the whole load (about 4x a run on a busy machine): a hang fails, never holds the suite

    async def run() -> tuple[float, float, float]:
        await harness.push(0)  # warm-up wave: one message per user, every skill, batches filled
        await harness.replies(per_platform)
        rss_warm = _rss_mb()
        started = time.perf_counter()
        for k in range(1, PER_USER):
            await harness.push(k)
        await harness.replies(per_platform * PER_USER)
        return rss_warm, _rss_mb(), time.perf_counter() - started

    try:
        await asyncio.wait_for(harness.start(monkeypatch), 60)
        whole = time.perf_counter()
        rss_warm, rss_end, elapsed = await asyncio.wait_for(run(), bound)
        whole = time.perf_counter() - whole
    finally:
        await harness.stop()
        await store.close()
    total = users * PER_USER
    rest = total - users
    print(f"\nload: {total} messages from {users} users in {whole:.1f} s ({total / whole:.1f} msg/s); "
          f"after warm-up {rest} in {elapsed:.1f} s ({rest / elapsed:.1f} msg/s); "
          f"RSS {rss_warm:.0f} -> {rss_end:.0f} MB ({rss_end - rss_warm:+.1f} MB)")
    assert len(harness.sent) == total
    harness.check_replies()
    _check_log(tmp_path / "log.db", harness.sent, harness.shown(), users)
    assert rss_end - rss_warm < RSS_GROWTH_MB, f"memory grew {rss_end - rss_warm:.1f} MB under load"
