"""The load test through the real client stacks: python-telegram-bot and discord.py against the loopback
Telegram Bot API and Discord gateway/REST servers of the tests, on the real bundled model.

    .venv/bin/python -m bench.load --via transports [--messages 2000] [--users 200] [--in-flight 48]

Users alternate between the platforms (even user numbers on Telegram, odd on Discord); a third talk in
busy group chats (addressing the bot), the rest in DMs. At most ``--in-flight`` messages are unanswered
at any time (a message counts as answered once the log settles it). During the run, an admin swaps one
adapter folder for a new copy and sends /reload (a third of the way in), then /reload again (two thirds
in), and a second process writes to the same SQLite file the whole time. Afterwards: every message was
logged and answered or refused with a reason, what each chat shows is what the log says it was sent,
the second writer's rows are all there, nothing is pending, and RSS at the end is close to RSS a
quarter of the way in. Rate limiting (per user) is off unless ``--rate-limit`` is given: the run measures the bot.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bot.config import Config, replace

REPO = Path(__file__).resolve().parents[1]
TG_USER0, DC_USER0 = 10_000, 20_000
ADMIN = TG_USER0 - 1
CORE_ERROR = "Sorry, something went wrong on my side"   # what the core answers when a skill crashed
WRITER = """
import sys, time
from pathlib import Path
from bot.store import Store
store, stop, n = Store.open(sys.argv[1]), Path(sys.argv[2]), 0
chat = store.ensure_chat("writer", "w")
user = store.ensure_user("writer", "w")
while not stop.exists():
    m = store.log_incoming(chat_id=chat, user_id=user, text=f"second writer {n}")
    store.log_reply(chat_id=chat, reply_to=m, text=f"reply {n}")
    n += 1
    time.sleep(0.02)
print(n)
"""


def _settled(conn: sqlite3.Connection) -> int:
    return conn.execute(
        "SELECT count(*) FROM messages m JOIN chats c ON c.id = m.chat_id WHERE m.direction = 'in' "
        "AND c.platform IN ('telegram', 'discord') AND m.status != 'pending'").fetchone()[0]


async def _start_platforms(core: Any, config: Config) -> tuple[Any, Any, Any, Any]:
    import discord
    import yarl

    from bot.transports import discord_chat
    from bot.transports.discord_chat import DiscordTransport
    from bot.transports.telegram_chat import TelegramTransport
    from tests.transports import dc_server, tg_server
    from tests.transports.tg_harness import QUICK

    api = await tg_server.FakeBotAPI().start()
    fake = await dc_server.FakeDiscord().start()
    # discord.py reads its endpoints from module globals; they are put back by _restore_discord.
    discord.http.Route.BASE = fake.api_base
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(fake.gateway_url)
    discord_chat.GUILD_READY_TIMEOUT_S = 0.05
    tg_config = replace(config, telegram={"base_url": api.base_url})
    # The loopback server is not Telegram: its send limits (20 a minute per group) would measure the pacer,
    # not the bot. The pacer still runs, at the tests' quick rates.
    telegram = TelegramTransport(core, tg_config, tg_server.TOKEN, limits=QUICK)
    dc = DiscordTransport(core, config, dc_server.TOKEN)
    await asyncio.wait_for(telegram.start(), 30)
    await asyncio.wait_for(dc.start(), 30)
    return api, fake, telegram, dc


def _discord_globals() -> tuple[Any, Any, Any]:
    import discord

    from bot.transports import discord_chat

    return (discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY,
            discord_chat.GUILD_READY_TIMEOUT_S)


def _restore_discord(saved: tuple[Any, Any, Any]) -> None:
    import discord

    from bot.transports import discord_chat

    (discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY,
     discord_chat.GUILD_READY_TIMEOUT_S) = saved


def _push(api: Any, fake: Any, user: int, text: str, group: int | None) -> asyncio.Future[Any] | None:
    from tests.transports import dc_server, tg_server

    if user % 2 == 0:
        uid = TG_USER0 + user
        entities = None
        if group is not None and not text.startswith("/"):
            text = f"@{tg_server.BOT['username']} {text}"
            entities = tg_server.mention(text)
        chat = -1000 - group if group is not None else uid
        api.push({"message": tg_server.message(text, user_id=uid, chat_id=chat, group=group is not None,
                                               entities=entities)})
        return None
    author = dc_server.discord_user(DC_USER0 + user, f"user{user}")
    if group is not None:
        payload = dc_server.message_payload(f"<@{dc_server.BOT_ID}> {text}", author=author,
                                            channel_id=4000 + group, mentions=[dc_server.bot_mention()])
    else:
        payload = dc_server.message_payload(text, author=author, guild=False, channel_id=3000 + user)
    return asyncio.ensure_future(fake.dispatch("MESSAGE_CREATE", payload))


def _shown(api: Any, fake: Any) -> Counter[tuple[str, str, str]]:
    """What each chat shows now: (platform, chat id, text) of every bot message, after its last edit."""
    from tests.transports import dc_server

    final: dict[int, tuple[str, str]] = {}
    for n, call in enumerate(api.of("sendMessage")):
        final[5000 + n] = (str(call["chat_id"]), call["text"])
    for edit in api.of("editMessageText"):
        final[int(edit["message_id"])] = (str(edit["chat_id"]), edit["text"])
    shown = Counter(("telegram", chat, text) for chat, text in final.values())
    shown.update(("discord", m["channel_id"], m["content"]) for m in fake.messages.values()
                 if m["author"]["id"] == str(dc_server.BOT_ID))
    return shown


def _swap_adapter(adapters: Path, scratch: Path, name: str) -> None:
    """Replace adapters/NAME by a fresh copy of itself (a new version as far as /reload can tell)."""
    fresh = scratch / f"{name}-v2"
    shutil.copytree(adapters / name, fresh)
    os.utime(fresh / "adapter_model.safetensors")
    shutil.move(adapters / name, scratch / f"{name}-v1")
    shutil.move(fresh, adapters / name)


async def measure_transports(config: Config, args: Any, planned: list[Any], rss: Any) -> dict[str, Any]:
    from bot.app import load_engine

    scratch = Path(tempfile.mkdtemp(prefix="lorabot-load-"))
    adapters = scratch / "adapters"
    shutil.copytree(config.path(config.adapters.dir), adapters)
    db = config.path(config.store.path)
    config = replace(config, adapters={"dir": str(adapters)}, access={"admins": (f"telegram:{ADMIN}",)},
                     telegram={"edit_interval_s": 1.0}, discord={"edit_interval_s": 1.0})
    started = time.perf_counter()
    engine = await asyncio.to_thread(load_engine, config, progress=False)
    load_s = time.perf_counter() - started
    stop_file = scratch / "stop-writer"
    saved = _discord_globals()
    try:
        return await _run(config, args, planned, rss, engine, load_s, scratch, adapters, db, stop_file)
    finally:
        _restore_discord(saved)
        shutil.rmtree(scratch, ignore_errors=True)


async def _run(config: Config, args: Any, planned: list[Any], rss: Any, engine: Any, load_s: float,
               scratch: Path, adapters: Path, db: Path, stop_file: Path) -> dict[str, Any]:
    from bot.app import open_app
    from bot.messages import Incoming

    async with open_app(config, engine=engine) as app:
        for text in ("/sentiment warm up", "/ner Warm Up", "/chat hi", "/story a cat"):
            await app.core.handle(Incoming(platform="bench-warmup", chat_id="w", user_id="w", text=text))
        api, fake, telegram, dc = await _start_platforms(app.core, config)
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(db), str(stop_file)], cwd=REPO,
                                  stdout=subprocess.PIPE, text=True)
        conn = sqlite3.connect(db, timeout=30)
        rss_warm, samples, admin_sent, dispatches = rss(), [], 0, []
        rss_quarter = rss_warm
        curve: list[tuple[int, float, float]] = []   # (messages sent, seconds, RSS MB) every 50 messages
        t0 = time.perf_counter()
        deadline = time.monotonic() + args.time_limit
        sent = 0
        try:
            for i, p in enumerate(planned):
                for mark in (len(planned) // 3, 2 * len(planned) // 3):
                    if i == mark:
                        if mark == len(planned) // 3:
                            await asyncio.to_thread(_swap_adapter, adapters, scratch, "sentiment")
                        api.push({"message": _admin_message("/reload")})
                        admin_sent += 1
                while sent - _settled(conn) >= args.in_flight and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                user = int(p.msg.user_id.removeprefix("u"))
                group = int(p.msg.chat_id.removeprefix("group")) if p.msg.is_group else None
                d = _push(api, fake, user, p.msg.text, group)
                if d is not None:
                    dispatches.append(d)
                sent += 1
                if i % 50 == 0:
                    samples.append(rss())
                    curve.append((i, round(time.perf_counter() - t0, 1), round(samples[-1], 1)))
                if i == len(planned) // 4:  # caches, batch shapes and allocator pools have grown by now
                    rss_quarter = rss()
            total = sent + admin_sent
            while _settled(conn) < total and time.monotonic() < deadline:
                samples.append(rss())
                await asyncio.sleep(0.5)
            await asyncio.gather(*dispatches)
            await api.settle(quiet=2.0, timeout=120)
            await fake.settle(quiet=2.0, timeout=120)
            wall = time.perf_counter() - t0
        finally:
            stop_file.touch()
            written = int((writer.communicate(timeout=60)[0] or "0").strip() or 0)
            await asyncio.wait_for(telegram.stop(), 30)
            await asyncio.wait_for(dc.stop(), 30)
            await api.stop()
            await fake.stop()
        rss_after = rss()
        checks = _verify(conn, _shown(api, fake), total, written)
        conn.close()
        reloads = [c["text"] for c in api.of("sendMessage") if str(c["chat_id"]) == str(ADMIN)]
    growth = rss_after - rss_quarter
    return {
        "via": "transports (python-telegram-bot + discord.py, loopback servers)",
        "settings": {"messages": len(planned), "users": args.users, "groups": args.groups,
                     "in_flight": args.in_flight, "max_new_tokens": args.max_new_tokens,
                     "rate_limit_per_minute": config.access.rate_limit_per_minute,
                     "adapters": sorted(engine.adapters), "seed": args.seed},
        "engine_load_s": round(load_s, 1), "wall_s": round(wall, 1),
        "throughput_msg_s": round(total / wall, 2) if wall else None,
        "admin_replies": reloads, "second_writer_rows": written,
        # Flat: from a quarter of the way in to the end, less than 10% more (at least 64 MB of slack).
        "rss_mb": {"after_warmup": round(rss_warm, 1), "at_quarter": round(rss_quarter, 1),
                   "after": round(rss_after, 1), "growth_after_quarter": round(growth, 1),
                   "peak": round(max(samples, default=rss_after), 1),
                   "curve": [{"sent": n, "s": s, "mb": mb} for n, s, mb in curve]},
        "memory_flat": growth < max(64.0, 0.10 * rss_quarter),
        "checks": checks,
        "ok": checks["problem_count"] == 0,
    }


def _admin_message(text: str) -> dict[str, Any]:
    from tests.transports import tg_server

    return tg_server.message(text, user_id=ADMIN, chat_id=ADMIN)


def _verify(conn: sqlite3.Connection, shown: Counter[tuple[str, str, str]], total: int,
            written: int) -> dict[str, Any]:
    statuses = dict(conn.execute(
        "SELECT m.status, count(*) FROM messages m JOIN chats c ON c.id = m.chat_id WHERE m.direction = 'in' "
        "AND c.platform IN ('telegram', 'discord') GROUP BY m.status"))
    replies = Counter(conn.execute(
        "SELECT c.platform, c.platform_chat_id, o.text FROM messages o JOIN chats c ON c.id = o.chat_id "
        "WHERE o.direction = 'out' AND c.platform IN ('telegram', 'discord')").fetchall())
    unanswered = conn.execute(
        "SELECT count(*) FROM messages i JOIN chats c ON c.id = i.chat_id WHERE i.direction = 'in' "
        "AND c.platform IN ('telegram', 'discord') AND NOT EXISTS "
        "(SELECT 1 FROM messages o WHERE o.reply_to = i.id)").fetchone()[0]
    second = conn.execute(
        "SELECT count(*) FROM messages m JOIN chats c ON c.id = m.chat_id WHERE c.platform = 'writer' "
        "AND m.direction = 'in'").fetchone()[0]
    integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
    problems = []
    logged = sum(statuses.values())
    too_quick = Counter({k: n for k, n in shown.items() if "too quickly" in k[2]})
    if logged + sum(too_quick.values()) != total:
        problems.append(f"{total} messages sent, {logged} logged + {sum(too_quick.values())} rate-limited")
    if statuses.get("pending") or statuses.get("failed"):
        problems.append(f"statuses {statuses}")
    if unanswered:
        problems.append(f"{unanswered} logged message(s) without a logged reply")
    wrong = [text for (_, _, text) in shown if text.startswith(CORE_ERROR)]
    if wrong:
        problems.append(f"{len(wrong)} replies were the core's error message")
    if shown - too_quick != replies:
        missing, extra = replies - (shown - too_quick), (shown - too_quick) - replies
        problems.append(f"shown vs logged differ: {sum(missing.values())} logged but not shown, "
                        f"{sum(extra.values())} shown but not logged, e.g. {list(missing or extra)[:2]}")
    if second != written:
        problems.append(f"second writer wrote {written} messages, {second} are in the log")
    if integrity != "ok":
        problems.append(f"integrity_check: {integrity}")
    return {"sent": total, "statuses": statuses, "replies_logged": sum(replies.values()),
            "rate_limited": sum(too_quick.values()), "second_writer_logged": second, "integrity": integrity,
            "problems": problems, "problem_count": len(problems), "lost": max(0, total - logged - sum(
                too_quick.values()))}

