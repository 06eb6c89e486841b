"""KV memory is bounded by config: one request's columns by ``engine.max_row_tokens``, all running rows'
by ``engine.kv_token_budget``. A long prompt among short ones no longer widens every row's cache: the
rows that do not fit wait, and every request still gets exactly the tokens it gets alone."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bot.config import load_config
from bot.engine import SamplingParams

GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0)


def _engine(tiny_base: Path, **limits: int):  # type: ignore[no-untyped-def]
    from bot.engine.light_model import load_light
    from bot.engine.loading import BaseModelRef
    from bot.engine.scheduler import LocalEngine

    model, tok = load_light(tiny_base, dtype="float32", device="cpu")
    engine = LocalEngine(model, tok, BaseModelRef("tiny", tiny_base), None, max_batch=8, max_context=512,
                         backend="fast", **limits)
    peaks: list[int] = []
    shapes: list[tuple[int, int]] = []
    engine.shapes = shapes  # type: ignore[attr-defined]
    backend = engine._backend
    real_prefill, real_decode = backend.prefill, backend.decode

    def record(batch) -> None:  # type: ignore[no-untyped-def]
        rows, cols = batch.slots.capacity
        peaks.append(rows * cols)
        shapes.append((rows, cols))

    def prefill(batch, prompts, adapters):  # type: ignore[no-untyped-def]
        out = real_prefill(batch, prompts, adapters)
        record(batch)
        return out

    def decode(batch, tokens, positions, adapters):  # type: ignore[no-untyped-def]
        out = real_decode(batch, tokens, positions, adapters)
        record(batch)
        return out

    backend.prefill, backend.decode = prefill, decode  # type: ignore[method-assign]
    return engine, peaks


def _prompts() -> list[str]:
    long = " ".join(f"word{i}" for i in range(300))   # a few hundred tokens: the "long QA prompt"
    return [long, *(f"short chat number {i}" for i in range(7))]


async def _alone(engine, prompts: list[str]) -> list[str]:  # type: ignore[no-untyped-def]
    return [(await engine.generate(p, GREEDY, None)).text for p in prompts]


async def _together(engine, prompts: list[str]) -> list[str]:  # type: ignore[no-untyped-def]
    return [g.text for g in await asyncio.gather(*(engine.generate(p, GREEDY, None) for p in prompts))]


async def test_a_long_prompt_does_not_widen_the_cache_past_the_budget(tiny_base: Path) -> None:
    budget = 1024
    engine, peaks = _engine(tiny_base, kv_token_budget=budget)
    try:
        prompts = _prompts()
        alone = await _alone(engine, prompts)
        peaks.clear()
        together = await _together(engine, prompts)
    finally:
        await asyncio.wait_for(engine.close(), 30)
    assert together == alone
    assert max(peaks) <= budget
    assert engine.kv_waits > 0          # the short ones waited for the long one, not the other way round


async def test_the_columns_a_finished_long_row_used_are_given_back(tiny_base: Path) -> None:
    engine, _ = _engine(tiny_base, kv_token_budget=1024)
    long, short = _prompts()[0], _prompts()[1]
    try:
        alone = (await engine.generate(short, SamplingParams(max_new_tokens=40), None)).text
        engine.shapes.clear()
        quick = engine.generate(long, SamplingParams(max_new_tokens=2), None)   # leaves after two tokens
        slow = engine.generate(short, SamplingParams(max_new_tokens=40), None)  # decodes on after it
        _, together = await asyncio.gather(quick, slow)
    finally:
        await asyncio.wait_for(engine.close(), 30)
    assert together.text == alone
    widest = max(range(len(engine.shapes)), key=lambda i: engine.shapes[i][1])
    # The short row runs on in a block of its own width, not the long row's.
    assert engine.shapes[widest][1] >= 384 and engine.shapes[-1][1] <= 128


async def test_without_a_budget_the_same_mix_takes_rows_times_the_widest(tiny_base: Path) -> None:
    # The contrast that shows what the budget bounds: all 8 rows at the long prompt's width.
    engine, peaks = _engine(tiny_base)
    try:
        await _together(engine, _prompts())
    finally:
        await asyncio.wait_for(engine.close(), 30)
    assert max(peaks) >= 8 * 300
    assert engine.kv_waits == 0


async def test_max_row_tokens_caps_one_request(tiny_base: Path) -> None:
    engine, _ = _engine(tiny_base, max_row_tokens=64)
    try:
        out = await engine.generate(_prompts()[0], SamplingParams(max_new_tokens=200), None)
    finally:
        await asyncio.wait_for(engine.close(), 30)
    assert engine.max_context == 64
    assert out.prompt_tokens + out.completion_tokens <= 64


async def test_a_budget_smaller_than_a_row_shrinks_the_row(tiny_base: Path) -> None:
    engine, _ = _engine(tiny_base, max_row_tokens=400, kv_token_budget=100)
    try:
        assert engine.max_context == 100
        out = await engine.generate(_prompts()[0], GREEDY, None)
        assert out.prompt_tokens + out.completion_tokens <= 100
    finally:
        await asyncio.wait_for(engine.close(), 30)


@pytest.mark.parametrize(("key", "value"), [("max_row_tokens", -1), ("kv_token_budget", -5),
                                             ("kv_token_budget", "lots")])
def test_bad_limits_are_refused_at_config_load(tmp_path: Path, key: str, value: object) -> None:
    from bot.errors import ConfigError

    path = tmp_path / "config.toml"
    path.write_text(f"[engine]\n{key} = {value!r}\n".replace("'", '"'), encoding="utf-8")
    with pytest.raises(ConfigError, match=f"engine.{key}"):
        load_config(path)
