"""One QA answer through the engine, with the order check (``[qa] order_check``).

The answer is decoded as a span of the text (``[qa] span_constrained``). With the order check the text is
also read with its sentences reversed (``QAFormat.reordered``), both readings in one batch; when the two
answers differ, each reading scores both answers' first tokens and ``QAFormat.pick`` keeps the answer both
like better. The training package's evaluation applies the same rule (``training/evaluate.py``), so the
card's scores are the bot's.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace

from bot.engine import Engine, SamplingParams
from bot.errors import ChoicesError
from bot.messages import Answer
from bot.skills import QAFormat

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QAOutcome:
    answer: Answer
    prompt_tokens: int
    completion_tokens: int


async def answer(engine: Engine, question: str, context: str, params: SamplingParams, adapter: str | None,
                 *, span_constrained: bool = True, order_check: bool = True) -> QAOutcome:
    reordered = QAFormat.reordered(context) if order_check and span_constrained else ""
    readings = [context, reordered] if reordered else [context]

    async def read(text: str) -> tuple[Answer, int, int]:
        p = replace(params, span_of=QAFormat.span_source(text)) if span_constrained else params
        g = await engine.generate(QAFormat.prompt(text, question), p, adapter)
        # Both readings quote the user's text as given: a span of the reversed text is looked up there.
        return QAFormat.result(g.text, context), g.prompt_tokens, g.completion_tokens

    done = await asyncio.gather(*(read(text) for text in readings))
    prompt_tokens = sum(d[1] for d in done)
    completion_tokens = sum(d[2] for d in done)
    first = done[0][0]
    if len(done) == 1 or QAFormat.same(first, done[1][0]) or done[1][0].start is None:
        return QAOutcome(first, prompt_tokens, completion_tokens)
    second = done[1][0]
    choices = [QAFormat.target(first.answer), QAFormat.target(second.answer)]
    try:
        scores = await asyncio.gather(*(engine.classify(QAFormat.prompt(text, question), choices, adapter)
                                        for text in readings))
    except ChoicesError as e:   # the two answers start with the same token: nothing to tell them apart by
        log.debug("order check kept the first reading: %s", e)
        return QAOutcome(first, prompt_tokens, completion_tokens)
    forward, backward = (list(s.scores.values()) for s in scores)
    chosen = QAFormat.pick(first, second, forward, backward)
    return QAOutcome(chosen, prompt_tokens + sum(s.prompt_tokens for s in scores), completion_tokens)
