"""The hand-written canonical examples (training/canonical_examples.jsonl) through the bot with the shipped
adapters. Every one must come out right (issue: skill quality, round two): all 21 since 2026-12-04, when the QA
order check (bot/qa_answer.py) stopped the qa adapter taking Sydney for Australia's capital."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.config import Config, replace
from training.canonical import load, run

pytestmark = pytest.mark.real_model

REPO = Path(__file__).resolve().parents[1]


def test_the_checks_tell_right_from_wrong() -> None:
    from training.canonical import check

    ner = {"skill": "ner", "expect": [["Paris", "LOC"]]}
    assert check(ner, {"entities": [{"text": "Paris", "type": "LOC"}]})
    assert not check(ner, {"entities": [{"text": "Paris", "type": "ORG"}]})
    assert not check(ner, {"entities": [{"text": "Paris", "type": "LOC"}, {"text": "France", "type": "LOC"}]})
    qa = {"skill": "qa", "expect": "Gustave Eiffel"}
    assert check(qa, {"answer": "Gustave Eiffel's company", "start": 3})
    assert not check(qa, {"answer": "Gustave Eiffel", "start": None})        # not quoted from the text
    assert check({"skill": "story", "expect": ["fox", "fly"]}, {"text": "The foxes could fly."})
    assert len(load()) == 21


async def test_the_shipped_adapters_get_the_canonical_examples_right(tmp_path: Path) -> None:
    config = replace(Config(root=REPO), story={"temperature": 0.0}, store={"path": str(tmp_path / "log.db")},
                     access={"rate_limit_per_minute": 0})
    results = await run(config)
    wrong = [(r["text"], r["result"]) for r in results if not r["ok"]]
    assert not wrong, f"wrong: {wrong}"
