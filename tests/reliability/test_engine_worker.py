"""Faults inside the engine's scheduler (tiny random model): a fault fails only what it touched, a dead
worker fails everyone at once instead of hanging them, and a broken stream stops its generation."""

from __future__ import annotations

import asyncio

import pytest

from bot.engine import SamplingParams
from bot.errors import EngineError

GREEDY = SamplingParams(max_new_tokens=8)


@pytest.fixture
async def engine(tiny_base, tiny_adapters):  # type: ignore[no-untyped-def]
    from bot.engine.light_model import load_light
    from bot.engine.loading import BaseModelRef
    from bot.engine.scheduler import LocalEngine

    model, tok = load_light(tiny_base, dtype="float32", device="cpu")
    eng = LocalEngine(model, tok, BaseModelRef("tiny", tiny_base), tiny_adapters, max_batch=4)
    yield eng
    await asyncio.wait_for(eng.close(), 30)


@pytest.mark.parametrize("step", ["_advance", "_retire", "_run_classify"])
async def test_a_fault_at_a_scheduler_step_fails_those_requests_and_the_worker_serves_on(
    engine, monkeypatch: pytest.MonkeyPatch, step: str,
) -> None:
    real = getattr(engine, step)
    calls = {"n": 0}

    def faulty(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError(f"injected fault in {step}")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, step, faulty)
    request = (engine.classify("Hello", ["yes", "no"], None) if step == "_run_classify"
               else engine.generate("Hello there", GREEDY, None))
    with pytest.raises(EngineError, match="injected fault"):
        await asyncio.wait_for(request, 30)
    assert engine._thread.is_alive()
    again = await asyncio.wait_for(engine.generate("Hello there", GREEDY, None), 30)
    assert again.completion_tokens > 0


async def test_a_dead_worker_fails_pending_and_later_requests_at_once_and_close_returns(
    engine, monkeypatch: pytest.MonkeyPatch,
) -> None:
    real, steps = engine._decode_step, []

    def dies(*args, **kwargs):  # type: ignore[no-untyped-def]
        steps.append(1)
        if len(steps) >= 3:  # while the request is decoding, however fast the machine is
            raise SystemExit("injected: the worker thread is ending")  # not an Exception: escapes every guard
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "_decode_step", dies)
    running = asyncio.ensure_future(engine.generate("Hello there", SamplingParams(max_new_tokens=200), None))
    with pytest.raises(EngineError, match="stopped working"):
        await asyncio.wait_for(running, 30)
    await asyncio.wait_for(asyncio.to_thread(engine._thread.join, 10), 15)
    assert not engine._thread.is_alive()
    with pytest.raises(EngineError, match="stopped working"):
        await asyncio.wait_for(engine.generate("later", GREEDY, None), 5)
    await asyncio.wait_for(engine.close(), 5)


async def test_an_error_in_the_stream_callback_stops_the_generation_and_frees_the_row(engine) -> None:
    seen: list[str] = []

    async def broken_sink(delta: str) -> None:
        seen.append(delta)
        raise ConnectionError("injected: the chat is gone")

    with pytest.raises(ConnectionError):
        await asyncio.wait_for(engine.generate("Hello there", SamplingParams(max_new_tokens=1500), None,
                                               on_text=broken_sink), 30)
    steps = engine.decode_steps
    for _ in range(200):  # the row leaves the batch within a step or two, not after 1,500 tokens
        if engine.in_flight == 0:
            break
        await asyncio.sleep(0.005)
    assert engine.in_flight == 0
    assert engine.decode_steps - steps < 20
    assert len(seen) == 1
    probe = await asyncio.wait_for(engine.generate("Hi", SamplingParams(max_new_tokens=2), None), 30)
    assert probe.completion_tokens > 0
