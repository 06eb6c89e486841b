"""Answers decoded as spans of their context: the rule, the engine (every backend) and the evaluation."""

from __future__ import annotations

import pytest

from bot.engine import SamplingParams
from bot.skills import QAFormat
from bot.span_constraint import SpanConstraint
from tests.test_engine_local import _engine

CONTEXT = "Canberra is the capital of Australia, while Sydney is its largest city and Melbourne is second."


def test_each_token_continues_a_run_of_the_source_and_ends_need_one_token_first() -> None:
    rule = SpanConstraint([5, 6, 7, 5, 8], end_ids=[0])
    assert rule.allowed([]) == [5, 6, 7, 8]          # any token of the source may start, no end yet
    assert rule.allowed([5]) == [6, 8, 0]             # 5 is followed by 6 and by 8
    assert rule.allowed([5, 6]) == [7, 0]
    assert rule.allowed([7, 5, 8]) == [0]             # the source's end: only an end token is left
    assert rule.allowed([9]) == [0]                   # never generated under the rule; still ends


@pytest.mark.parametrize("backend", ["fast", "peft", "light"])
async def test_the_engine_answers_with_a_span_of_the_context_even_from_a_random_model(
        backend, tiny_base, tiny_adapters) -> None:
    engine = _engine(tiny_base, tiny_adapters, backend)
    try:
        prompt = QAFormat.prompt(CONTEXT, "What is the capital of Australia?")
        free = SamplingParams(max_new_tokens=12, stop=QAFormat.stop)
        span = SamplingParams(max_new_tokens=12, stop=QAFormat.stop, span_of=QAFormat.span_source(CONTEXT))
        unconstrained = await engine.generate(prompt, free, "qa")
        constrained, again = await asyncio_gather(engine.generate(prompt, span, "qa"),
                                                  engine.generate(prompt, span, None))
    finally:
        await engine.close()
    assert unconstrained.text.strip() and unconstrained.text.strip() not in CONTEXT   # random weights babble
    for g in (constrained, again):
        assert g.text.strip() and g.text.strip() in CONTEXT, g.text
        assert QAFormat.result(g.text, CONTEXT).start is not None


def test_the_evaluation_decodes_spans_exactly_as_the_bot(tiny_base) -> None:
    from training.evaluate import generate
    from training.model import load_base

    model, tok, _ = load_base(str(tiny_base), dtype="float32", device="cpu")
    contexts = [CONTEXT, "The Rhine flows through Bonn, Cologne and Düsseldorf before it reaches the sea."]
    prompts = [QAFormat.prompt(c, "Which city?") for c in contexts]
    free = generate(model, tok, prompts, max_new_tokens=10, stop=QAFormat.stop)
    spans = generate(model, tok, prompts, max_new_tokens=10, stop=QAFormat.stop,
                     spans=[QAFormat.span_source(c) for c in contexts])
    assert any(f.strip() not in c for f, c in zip(free, contexts, strict=True))
    for out, context in zip(spans, contexts, strict=True):
        assert out.strip() and out.strip() in context, out


async def asyncio_gather(*aws):
    import asyncio

    return await asyncio.gather(*aws)
