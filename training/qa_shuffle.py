"""QA contexts with their sentences in a new order (data option ``shuffle_sentences = true``).

A pass over questions the adapter has already trained on teaches little when every context reads as
before; with the sentences reordered the same question asks the model to find its answer somewhere new,
so it has to match the question against the text rather than recall where the answer was (SQuAD's
answers sit early in their paragraphs more often than late: Ko et al. 2020, "Look at the First Sentence").
The answer's sentence stays whole; a context whose gold answers do not all survive the reordering (an
answer across a sentence boundary) is kept as it was.
"""

from __future__ import annotations

import dataclasses
import random

from bot.skills import sentences
from training.data import QAExample


def shuffled_context(context: str, answers: tuple[str, ...], rng: random.Random) -> str:
    """``context`` with its sentences in a seeded new order, or as it was when that would break an answer."""
    parts = sentences(context)
    if len(parts) < 2:
        return context
    order = list(range(len(parts)))
    rng.shuffle(order)
    if order == sorted(order):
        order.reverse()
    new = " ".join(parts[i] for i in order)
    return new if all(answer in new for answer in answers if answer in context) else context


def shuffle_sentences(examples: list[QAExample], seed: int) -> list[QAExample]:
    """Each QA example with its context reordered (seeded per example, so a resumed run sees the same text)."""
    return [dataclasses.replace(ex, context=shuffled_context(
        ex.context, ex.answers, random.Random(f"{seed}:{ex.question}:{ex.context[:64]}"))) for ex in examples]
