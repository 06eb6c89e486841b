"""The QA order check (bot/qa_answer.py): a second reading with the sentences reversed, and the choice
between the two answers. A scripted engine with the bias the check exists for: it answers with the last
city the text it reads names, and scores a name higher the later it comes."""

from __future__ import annotations

import re
from collections.abc import Sequence

import pytest

from bot.engine import Classification, Generation, SamplingParams
from bot.errors import ChoicesError, EngineError
from bot.messages import Answer
from bot.qa_answer import answer
from bot.skills import QAFormat


class RecencyEngine:
    """Answers a QA prompt with the last city its context names; ``liked`` cities it scores 5x higher."""

    def __init__(self, liked: Sequence[str] = (), same_first_token: bool = False):
        self.liked = set(liked)
        self.same_first_token = same_first_token
        self.calls: list[tuple[str, str]] = []

    @staticmethod
    def _context(prompt: str) -> str:
        return prompt.split("\nContext: ", 1)[1].split("\nQuestion: ", 1)[0]

    async def generate(self, prompt: str, params: SamplingParams, adapter: str | None, on_text=None) -> Generation:
        self.calls.append(("generate", self._context(prompt)))
        assert params.span_of == " " + self._context(prompt)        # each reading is decoded as a span of itself
        names = re.findall(r"\b(?:Canberra|Sydney|Rome)\b", self._context(prompt))
        return Generation(text=" " + names[-1], prompt_tokens=10, completion_tokens=2, finish_reason="stop")

    async def classify(self, prompt: str, choices: Sequence[str], adapter: str | None) -> Classification:
        self.calls.append(("classify", self._context(prompt)))
        if self.same_first_token:
            raise ChoicesError(f"choices {list(choices)} do not start with distinct tokens")
        context = self._context(prompt)
        weights = [(1 + context.rfind(c.strip())) * (5 if c.strip() in self.liked else 1) for c in choices]
        return Classification(scores={c: w / sum(weights) for c, w in zip(choices, weights, strict=True)},
                              prompt_tokens=10)


TEXT = "Canberra is the capital city of Australia. Sydney is its largest city."
PARAMS = SamplingParams(max_new_tokens=8, temperature=0.0, stop=("\n",))


async def test_two_readings_that_disagree_are_settled_by_both_readings_scores() -> None:
    engine = RecencyEngine(liked=["Canberra"])
    got = await answer(engine, "Which city is the capital of Australia?", TEXT, PARAMS, "qa")
    assert got.answer == Answer(answer="Canberra", context_chars=len(TEXT), start=0, end=8)
    assert [kind for kind, _ in engine.calls] == ["generate", "generate", "classify", "classify"]
    assert engine.calls[1][1] == "Sydney is its largest city. Canberra is the capital city of Australia."
    assert got.prompt_tokens == 40 and got.completion_tokens == 4
    # Without a preference, each reading likes its own answer as much as the other's: the first reading stays.
    assert (await answer(RecencyEngine(), "Capital?", TEXT, PARAMS, "qa")).answer.answer == "Sydney"


@pytest.mark.parametrize("text", ["Only Rome here.", "Rome and then Rome, said Rome."])
async def test_one_sentence_or_one_answer_needs_no_choice(text: str) -> None:
    engine = RecencyEngine(liked=["Canberra"])
    got = await answer(engine, "Where?", text, PARAMS, "qa")
    assert got.answer.answer == "Rome" and got.answer.start is not None
    assert all(kind == "generate" for kind, _ in engine.calls)


async def test_the_first_reading_stands_when_the_answers_cannot_be_told_apart_or_the_check_is_off() -> None:
    engine = RecencyEngine(liked=["Canberra"], same_first_token=True)
    assert (await answer(engine, "Capital?", TEXT, PARAMS, "qa")).answer.answer == "Sydney"
    for off in ({"order_check": False}, {"span_constrained": False}):
        engine = RecencyEngine(liked=["Canberra"])
        if "span_constrained" in off:
            engine.generate = _free(engine)          # free decoding: no span to check against
        got = await answer(engine, "Capital?", TEXT, PARAMS, "qa", **off)
        assert got.answer.answer == "Sydney" and [k for k, _ in engine.calls] == ["generate"]


async def test_a_failing_engine_is_not_taken_for_answers_that_cannot_be_told_apart() -> None:
    engine = RecencyEngine(liked=["Canberra"])

    async def down(prompt: str, choices: Sequence[str], adapter: str | None) -> Classification:
        raise EngineError("the model server is not answering")

    engine.classify = down
    with pytest.raises(EngineError, match="not answering"):
        await answer(engine, "Capital?", TEXT, PARAMS, "qa")


def _free(engine: RecencyEngine):
    async def generate(prompt: str, params: SamplingParams, adapter: str | None, on_text=None) -> Generation:
        assert not params.span_of
        engine.calls.append(("generate", engine._context(prompt)))
        return Generation(text=" Sydney", prompt_tokens=10, completion_tokens=2, finish_reason="stop")
    return generate


def test_the_shared_rule() -> None:
    assert QAFormat.reordered("One. Two! Three?") == "Three? Two! One."
    assert QAFormat.reordered("Just one sentence, e.g. this.") == ""
    assert QAFormat.same(Answer("The Eiffel Tower."), Answer("eiffel tower"))
    assert not QAFormat.same(Answer("Paris"), Answer("Lyon"))
    first, second = Answer("Sydney", start=44, end=50), Answer("Canberra", start=0, end=8)
    assert QAFormat.pick(first, second, [0.6, 0.4], [0.2, 0.8]) is second      # 0.12 < 0.32
    assert QAFormat.pick(first, second, [0.9, 0.1], [0.4, 0.6]) is first       # 0.36 > 0.06
    assert QAFormat.pick(first, Answer("Canberra"), [0.1, 0.9], [0.1, 0.9]) is first   # not quoted: not taken
