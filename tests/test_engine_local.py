"""The in-process engine on a tiny random Llama with random adapters (built locally, no download)."""

from __future__ import annotations

import asyncio
import shutil

import pytest

from bot.engine import SamplingParams
from bot.errors import AdapterError
from bot.models import BaseModelRef, load_model

GREEDY = SamplingParams(max_new_tokens=10)
PROMPTS = [
    ("Hello there, how are you?", None),
    ("Write a short story.\nStory:", "story"),
    ("Context: The sky is blue.\nQuestion: What colour is the sky?\nAnswer:", "qa"),
    ("Sentence: Angela Merkel visited Paris on Monday with officials from the European Union.\nEntities:", "ner"),
    ("Write a short story about a dragon.\nStory:", "story"),
]


@pytest.fixture
async def engine(tiny_base, tiny_adapters):
    from bot.engine_local import LocalEngine

    model, tok = load_model(tiny_base, dtype="float32", device="cpu")
    eng = LocalEngine(model, tok, BaseModelRef("tiny", tiny_base), tiny_adapters, max_batch=8)
    yield eng
    await eng.close()


async def test_all_adapters_attached(engine):
    assert sorted(engine.adapters) == ["ner", "qa", "sentiment", "story"]
    assert engine.problems == []


async def test_mixed_adapter_batch_equals_one_at_a_time(engine):
    alone = [(await engine.generate(p, GREEDY, a)).text for p, a in PROMPTS]
    together = await asyncio.gather(*(engine.generate(p, GREEDY, a) for p, a in PROMPTS))
    assert [g.text for g in together] == alone
    # The adapters really change the output (otherwise the comparison above proves little).
    bare = await engine.generate(PROMPTS[1][0], GREEDY, None)
    assert bare.text != alone[1]


async def test_rows_joining_a_running_batch_get_the_same_answer(engine):
    long = SamplingParams(max_new_tokens=30)
    first = asyncio.ensure_future(engine.generate(PROMPTS[1][0], long, "story"))
    await asyncio.sleep(0.05)  # let the first request start decoding before the others arrive
    later = await asyncio.gather(*(engine.generate(p, GREEDY, a) for p, a in PROMPTS[2:]))
    alone = [(await engine.generate(p, GREEDY, a)).text for p, a in PROMPTS[2:]]
    assert [g.text for g in later] == alone
    assert (await first).text == (await engine.generate(PROMPTS[1][0], long, "story")).text


async def test_classify_batches_and_sums_to_one(engine):
    prompt = "Text: I loved it\nSentiment (negative, neutral or positive):"
    choices = [" negative", " neutral", " positive"]
    alone = [await engine.classify(prompt, choices, a) for a in ("sentiment", None)]
    together = await asyncio.gather(*(engine.classify(prompt, choices, a) for a in ("sentiment", None)))
    for x, y in zip(alone, together, strict=True):
        assert abs(sum(x.scores.values()) - 1) < 1e-5
        for c in choices:
            assert x.scores[c] == pytest.approx(y.scores[c], abs=1e-4)
    assert alone[0].scores != alone[1].scores


async def test_streaming_deltas_add_up_to_the_text(engine):
    deltas: list[str] = []

    async def sink(d: str) -> None:
        deltas.append(d)

    g = await engine.generate(PROMPTS[1][0], SamplingParams(max_new_tokens=16), "story", sink)
    assert len(deltas) >= 2 and "".join(deltas) == g.text
    assert g.completion_tokens <= 16 and g.finish_reason in ("stop", "length")


async def test_stop_strings_end_generation(engine):
    free = await engine.generate(PROMPTS[0][0], SamplingParams(max_new_tokens=20), None)
    assert len(free.text) > 4
    stop = free.text[2:4]
    cut = await engine.generate(PROMPTS[0][0], SamplingParams(max_new_tokens=20, stop=(stop,)), None)
    assert stop not in cut.text and free.text.startswith(cut.text) and cut.finish_reason == "stop"


async def test_sampling_is_reproducible_with_a_seed(engine):
    p = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, repetition_penalty=1.2, seed=7)
    a = await engine.generate(PROMPTS[1][0], p, "story")
    b = await engine.generate(PROMPTS[1][0], p, "story")
    assert a.text == b.text


async def test_unknown_adapter_is_refused(engine):
    with pytest.raises(AdapterError):
        await engine.generate("hi", GREEDY, "nope")


async def test_a_failing_request_does_not_break_the_others(engine, monkeypatch):
    original = engine._forward_last

    def flaky(jobs, cache=None):
        if any(j.prompt_ids == engine._tok("POISON", add_special_tokens=False).input_ids for j in jobs):
            raise RuntimeError("boom")
        return original(jobs, cache)

    monkeypatch.setattr(engine, "_forward_last", flaky)
    results = await asyncio.gather(
        engine.generate("POISON", GREEDY, None), engine.generate(PROMPTS[0][0], GREEDY, None),
        return_exceptions=True,
    )
    assert isinstance(results[0], Exception) and "boom" in str(results[0])
    assert not isinstance(results[1], Exception) and results[1].text


async def test_reload_adds_and_removes_adapters(engine, tiny_adapters, tmp_path):
    extra = tiny_adapters / "story2"
    shutil.copytree(tiny_adapters / "story", extra)
    try:
        problems = await engine.reload_adapters()
        assert "story2" in engine.adapters and problems == []
        assert (await engine.generate(PROMPTS[1][0], GREEDY, "story2")).text
    finally:
        shutil.rmtree(extra)
    await engine.reload_adapters()
    assert "story2" not in engine.adapters


async def test_cancelled_request_does_not_disturb_the_batch(engine):
    long = SamplingParams(max_new_tokens=40)
    victim = asyncio.ensure_future(engine.generate(PROMPTS[1][0], long, "story"))
    keeper = asyncio.ensure_future(engine.generate(PROMPTS[4][0], GREEDY, "story"))
    await asyncio.sleep(0.02)
    victim.cancel()
    assert (await keeper).text == (await engine.generate(PROMPTS[4][0], GREEDY, "story")).text
