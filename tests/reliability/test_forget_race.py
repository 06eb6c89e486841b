"""/forget racing a message of the same user in another chat: no foreign-key error reaches the user, and
nothing about them is written after the forget completed."""

from __future__ import annotations

import asyncio

from bot.config import Config
from bot.core import Core
from bot.messages import Incoming
from bot.store import AsyncStore, Store
from tests.fakes import FakeEngine


def _msg(text: str, chat: str) -> Incoming:
    return Incoming(platform="test", chat_id=chat, user_id="u1", text=text)


def _rows_about_u1(store: Store) -> int:
    users = store.db.execute("SELECT id FROM users WHERE platform_user_id = 'u1'").fetchall()
    messages = store.db.execute("SELECT count(*) FROM messages m JOIN users u ON u.id = m.user_id "
                                "WHERE u.platform_user_id = 'u1'").fetchone()[0]
    return len(users) + messages


async def test_forget_between_seeing_the_user_and_logging_the_message() -> None:
    sync = Store.memory()
    store = AsyncStore(sync)
    core = Core(Config(), FakeEngine(), store)
    await core.handle(_msg("hello", "c2"))  # the user exists, with a message
    real_ensure_chat = store.ensure_chat
    forgot: list[str] = []

    async def ensure_chat_then_forget(platform: str, chat: str) -> int:
        if chat == "c1" and not forgot:  # the message in c1 has seen its user; /forget lands now
            forgot.append((await core.handle(_msg("/forget", "c2"))).text)  # type: ignore[union-attr]
        return await real_ensure_chat(platform, chat)

    store.ensure_chat = ensure_chat_then_forget  # type: ignore[method-assign]
    try:
        reply = await core.handle(_msg("are you there?", "c1"))
        assert forgot and forgot[0].startswith("Done")
        assert reply is not None and reply.kind == "answer", reply
        assert "went wrong" not in reply.text
        assert await asyncio.to_thread(_rows_about_u1, sync) == 0
    finally:
        await store.close()


async def test_forget_while_a_message_of_another_chat_is_being_answered() -> None:
    sync = Store.memory()
    store = AsyncStore(sync)
    core = Core(Config(), FakeEngine(delay=0.05), store)
    try:
        slow = asyncio.ensure_future(core.handle(_msg("tell me a long story please", "c1")))
        await asyncio.sleep(0.05)
        done = await core.handle(_msg("/forget", "c2"))
        assert done is not None and done.text.startswith("Done")
        reply = await slow
        assert reply is not None and reply.kind == "answer" and not reply.feedback
        assert await asyncio.to_thread(_rows_about_u1, sync) == 0
    finally:
        await store.close()
