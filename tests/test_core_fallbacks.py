"""A chat whose mode names a skill that is gone still gets answers; a flood is refused before any write."""

from __future__ import annotations

import pytest

from bot.config import Config, load_config, replace
from bot.core import Core
from bot.errors import ConfigError
from bot.messages import Incoming
from bot.store import AsyncStore, Store
from tests.fakes import FakeEngine


def _msg(text: str, user: str = "u1", chat: str = "c1") -> Incoming:
    return Incoming(platform="test", chat_id=chat, user_id=user, text=text)


@pytest.fixture
async def store():  # type: ignore[no-untyped-def]
    s = AsyncStore(Store.memory())
    yield s
    await s.close()


async def test_a_stored_mode_whose_adapter_is_gone_falls_back_to_chat_with_a_note(store: AsyncStore) -> None:
    core = Core(Config(), FakeEngine(), store)
    chat = await store.ensure_chat("test", "c1")
    await store.set_mode(chat, "medical")   # chosen when adapters/medical existed; removed since
    reply = await core.handle(_msg("hello there"))
    assert reply is not None and reply.kind == "answer", reply
    assert "'medical' is not available" in reply.text and reply.skill == "chat"


async def test_a_default_mode_naming_no_installed_skill_falls_back_to_chat(store: AsyncStore) -> None:
    core = Core(replace(Config(), bot={"default_mode": "medical"}), FakeEngine(), store)
    reply = await core.handle(_msg("hello there"))
    assert reply is not None and reply.kind == "answer" and "not available" in reply.text


def test_a_default_mode_that_cannot_name_a_skill_is_refused_at_load(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "config.toml"
    path.write_text('[bot]\ndefault_mode = "Chat Mode!"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bot\.default_mode"):
        load_config(str(path))


async def test_rate_limited_messages_are_refused_before_anything_is_written(store: AsyncStore) -> None:
    core = Core(replace(Config(), access={"rate_limit_per_minute": 2}), FakeEngine(), store)
    for _ in range(2):
        assert (await core.handle(_msg("hello"))).kind == "answer"  # type: ignore[union-attr]
    before = await store.stats()
    refused = await core.handle(_msg("hello again"))
    assert refused is not None and refused.kind == "refusal" and "too quickly" in refused.text
    assert await store.stats() == before
    other = await core.handle(_msg("/help", user="u2", chat="c2"))
    assert other is not None and other.kind == "command"
