from __future__ import annotations

import pytest

from training.evaluate import (
    entities_to_tags,
    ner_metrics,
    qa_metrics,
    sentiment_metrics,
    squad_f1,
    squad_normalize,
)


def test_squad_normalisation() -> None:
    assert squad_normalize("The  Eiffel-Tower!") == "eiffeltower"
    assert squad_normalize("an apple, a pear and the plum.") == "apple pear and plum"
    assert squad_normalize("Theory") == "theory"  # 'the' only as a whole word
    assert squad_f1("the Denver Broncos", "Denver Broncos") == 1.0
    assert squad_f1("Broncos", "Denver Broncos") == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert squad_f1("", "x") == 0.0


def test_qa_metrics_take_the_best_gold() -> None:
    m = qa_metrics(["Denver Broncos", "in 1990", "nothing"], [["Broncos", "Denver Broncos"], ["1990"], ["x"]])
    assert m["exact_match"] == pytest.approx(100 / 3)
    assert m["f1"] == pytest.approx(100 * (1 + 2 / 3 + 0) / 3)


def test_sentiment_metrics() -> None:
    gold = ["positive", "positive", "negative", "negative"]
    pred = ["positive", "negative", "negative", "negative"]
    m = sentiment_metrics(gold, pred, ["negative", "positive"])
    assert m["accuracy"] == 75.0
    assert m["recall"] == {"negative": 100.0, "positive": 50.0} and m["macro_recall"] == 75.0
    assert m["macro_f1"] == pytest.approx(100 * (0.8 + 2 / 3) / 2)


def test_entities_to_tags_maps_offsets_back_to_tokens() -> None:
    tokens = ["Peter", "Blackburn", "of", "the", "EU", "."]
    # " ".join(tokens) = "Peter Blackburn of the EU ."
    tags = entities_to_tags(tokens, [(0, 15, "PER"), (23, 25, "ORG")])
    assert tags == ["B-PER", "I-PER", "O", "O", "B-ORG", "O"]
    # A span covering part of a token tags the whole token; of overlapping spans the earlier one wins.
    assert entities_to_tags(tokens, [(1, 4, "PER"), (16, 18, "MISC")]) == ["B-PER", "O", "B-MISC", "O", "O", "O"]
    assert entities_to_tags(tokens, [(6, 18, "ORG"), (0, 10, "PER")]) == ["B-PER", "I-PER", "O", "O", "O", "O"]


def test_ner_metrics_strict_iob2() -> None:
    gold = [["B-PER", "I-PER", "O", "B-LOC"]]
    assert ner_metrics(gold, gold)["f1"] == 100.0
    half = ner_metrics(gold, [["B-PER", "I-PER", "O", "O"]])
    assert half["precision"] == 100.0 and half["recall"] == 50.0
    # A wrong boundary is a miss under strict matching.
    assert ner_metrics(gold, [["B-PER", "O", "O", "B-LOC"]])["f1"] == 50.0
