"""logit_bias and generated-token logprobs in the engine: the fast and PEFT backends agree."""

from __future__ import annotations

import asyncio

import pytest

from bot.engine import SamplingParams
from bot.engine.loading import BaseModelRef, load_model
from bot.errors import UserInputError

PROMPT = "Write a short story about a dragon.\nStory:"


@pytest.fixture(scope="module")
def engines(tiny_base, tiny_adapters):
    from bot.engine.scheduler import LocalEngine

    model, tok = load_model(tiny_base, dtype="float32", device="cpu")
    made = {b: LocalEngine(model, tok, BaseModelRef("tiny", tiny_base), tiny_adapters, backend=b)
            for b in ("fast", "peft")}
    yield made
    for engine in made.values():
        asyncio.run(engine.close())


async def test_logprobs_agree_between_backends_and_match_the_greedy_choice(engines):
    got = {b: await e.generate(PROMPT, SamplingParams(max_new_tokens=6, logprobs=3), "story")
           for b, e in engines.items()}
    fast, peft = got["fast"], got["peft"]
    assert fast.text == peft.text and len(fast.logprobs) == 6
    for a, b in zip(fast.logprobs, peft.logprobs, strict=True):
        assert a.token == b.token and a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert [t for t, _ in a.top] == [t for t, _ in b.top]
        assert a.top[0] == (a.token, pytest.approx(a.logprob))   # greedy picks the likeliest
        assert a.top[0][1] >= a.top[1][1] >= a.top[2][1]
    assert "".join(t.token for t in fast.logprobs) == fast.text
    plain = await engines["fast"].generate(PROMPT, SamplingParams(max_new_tokens=6), "story")
    assert plain.logprobs is None and plain.text == fast.text


async def test_logit_bias_bans_and_forces_the_same_way_in_both_backends(engines):
    tok = engines["fast"]._tok
    first = (await engines["fast"].generate(PROMPT, SamplingParams(max_new_tokens=1), None)).text
    first_id = tok(first, add_special_tokens=False).input_ids[0]
    forced_id = tok(" castle", add_special_tokens=False).input_ids[0]
    for engine in engines.values():
        banned = await engine.generate(PROMPT, SamplingParams(max_new_tokens=3, logit_bias=((first_id, -100),)), None)
        assert not banned.text.startswith(first)
        forced = await engine.generate(PROMPT, SamplingParams(max_new_tokens=1, logprobs=0,
                                                               logit_bias=((forced_id, 100),)), None)
        assert forced.text == tok.decode([forced_id]) and forced.logprobs[0].logprob > -1e-3
    texts = [(await e.generate(PROMPT, SamplingParams(max_new_tokens=4, logit_bias=((first_id, -100),)), "qa")).text
             for e in engines.values()]
    assert texts[0] == texts[1]


async def test_settings_the_worker_cannot_apply_are_refused_before_queueing(engines):
    engine = engines["fast"]
    with pytest.raises(UserInputError, match="vocabulary"):
        await engine.generate(PROMPT, SamplingParams(logit_bias=((10**9, 1.0),)), None)
    with pytest.raises(UserInputError, match="between -100 and 100"):
        await engine.generate(PROMPT, SamplingParams(logit_bias=((5, 1e9),)), None)
    with pytest.raises(UserInputError, match="logprobs"):
        await engine.generate(PROMPT, SamplingParams(logprobs=500), None)
    # One row's bias does not leak into the rows batched with it.
    biased, plain = await asyncio.gather(
        engine.generate(PROMPT, SamplingParams(max_new_tokens=4, logit_bias=((5, 100),)), "story"),
        engine.generate(PROMPT, SamplingParams(max_new_tokens=4), "story"))
    alone = await engine.generate(PROMPT, SamplingParams(max_new_tokens=4), "story")
    assert plain.text == alone.text != biased.text
