"""Prompt + history over the model's context: the oldest history goes, then the start of the user's text;
the chat template's head and the system prompt always stay, and the reply says when the user's text was cut."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bot.config import Config, replace
from bot.core import Core
from bot.messages import Incoming
from bot.store import AsyncStore, Store

SYSTEM = "You are lorabot, a helpful and concise assistant."


@pytest.fixture
async def small_context(tiny_base: Path):  # type: ignore[no-untyped-def]
    from bot.engine.light_model import load_light
    from bot.engine.loading import BaseModelRef
    from bot.engine.scheduler import LocalEngine

    model, tok = load_light(tiny_base, dtype="float32", device="cpu")
    engine = LocalEngine(model, tok, BaseModelRef("tiny", tiny_base), None, max_context=160)
    prompts: list[str] = []
    real = engine.generate

    async def recording(prompt, params, adapter, on_text=None):  # type: ignore[no-untyped-def]
        prompts.append(prompt)
        return await real(prompt, params, adapter, on_text)

    engine.generate = recording  # type: ignore[method-assign]
    store = AsyncStore(Store.memory())
    config = replace(Config(), generation={"max_new_tokens": 8}, bot={"history_tokens": 4000},
                     access={"rate_limit_per_minute": 0})
    yield Core(config, engine, store), engine, prompts
    await store.close()
    await asyncio.wait_for(engine.close(), 30)


def _msg(text: str) -> Incoming:
    return Incoming(platform="test", chat_id="c", user_id="u", text=text)


async def test_old_history_goes_first_and_the_head_stays(small_context) -> None:
    core, engine, prompts = small_context
    for i in range(6):
        assert (await core.handle(_msg(f"message number {i} about foxes and geese"))).kind == "answer"
    last = prompts[-1]
    assert last.startswith("<|im_start|>system") and SYSTEM in last
    assert "message number 5" in last and "message number 0" not in last   # oldest dropped, newest kept
    assert engine.count_tokens(last) <= engine.max_context - 8


async def test_a_text_longer_than_the_context_is_cut_from_its_start_and_the_reply_says_so(small_context) -> None:
    core, engine, prompts = small_context
    text = " ".join(f"word{i}" for i in range(400)) + " FINAL QUESTION?"
    reply = await core.handle(_msg(text))
    assert reply is not None and reply.kind == "answer"
    assert "too long for the model's context" in reply.text
    assert prompts[-1].startswith("<|im_start|>system") and SYSTEM in prompts[-1]
    assert "FINAL QUESTION?" in prompts[-1] and "word0 " not in prompts[-1]
    assert engine.count_tokens(prompts[-1]) <= engine.max_context - 8
