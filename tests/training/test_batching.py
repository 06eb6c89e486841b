from __future__ import annotations

from typing import Any

import pytest

from bot.errors import DataError
from bot.skills import NERFormat, QAFormat, SentimentFormat, StoryFormat
from training.batching import (
    IGNORE,
    Encoded,
    collate,
    encode,
    label_token_ids,
    length_grouped_batches,
    micro_batches,
    shard,
)
from training.data import ChatExample, NERExample, QAExample, SentimentExample, TextExample


def answer(e: Encoded) -> list[int]:
    """The tokens the loss is computed on (targets are already shifted)."""
    assert e.targets is not None and len(e.targets) == len(e.ids)
    return [t for t in e.targets if t != IGNORE]


def test_ner_and_qa_loss_only_on_answer_plus_eos(tok: Any) -> None:
    ex = NERExample(("EU", "rejects", "German", "call"), ("B-ORG", "O", "B-MISC", "O"))
    (enc,), skipped = encode("ner", [ex], tok, max_length=128)
    prompt = tok(NERFormat.prompt("EU rejects German call"), add_special_tokens=False).input_ids
    target = tok(" EU (ORG); German (MISC)", add_special_tokens=False).input_ids
    assert skipped == 0 and enc.ids == prompt + target + [tok.eos_token_id]
    assert answer(enc) == [*target, tok.eos_token_id] and enc.weight == len(target) + 1
    # targets[i] predicts ids[i + 1]
    assert all(t == enc.ids[i + 1] for i, t in enumerate(enc.targets or []) if t != IGNORE)

    qa = QAExample(context="Paris is in France.", question="Where is Paris?", answers=("France", "in France"))
    (enc,), _ = encode("qa", [qa], tok, max_length=128)
    assert tok.decode(answer(enc)) == QAFormat.target("France") + tok.eos_token
    assert encode("qa", [qa], tok, max_length=10) == ([], 1)  # too long: skipped, never cut


def test_story_cut_without_eos(tok: Any) -> None:
    short, long = TextExample("The end.", "a fox"), TextExample("word " * 300, None)
    (a, b), skipped = encode("story", [short, long], tok, max_length=64)
    prompt, _ = StoryFormat.training_pair(short.text, short.title)
    assert skipped == 0 and tok.decode(a.ids).startswith(prompt)
    assert answer(a)[-1] == tok.eos_token_id
    assert len(b.ids) == 64 and tok.eos_token_id not in answer(b)


def test_sentiment_label_tokens(tok: Any) -> None:
    labels = SentimentFormat.default_labels
    ids = label_token_ids(tok, labels)
    assert ids == [tok(SentimentFormat.continuation(x), add_special_tokens=False).input_ids[0] for x in labels]
    (enc,), _ = encode("sentiment", [SentimentExample("fine", "neutral")], tok, max_length=64, labels=labels)
    assert enc.label == 1 and enc.targets is None and enc.weight == 1
    assert enc.ids == tok(SentimentFormat.prompt("fine"), add_special_tokens=False).input_ids
    with pytest.raises(DataError, match="distinct tokens"):
        label_token_ids(tok, ["very good", "very bad"])


def test_chat_loss_on_assistant_turns_only(tok: Any) -> None:
    ex = ChatExample((("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye"),
                      ("assistant", "Goodbye.")))
    (enc,), _ = encode("chat", [ex], tok, max_length=256)
    learned = tok.decode(answer(enc))
    assert "Hello!" in learned and "Goodbye." in learned
    assert "Hi" not in learned and "Bye" not in learned and "Be brief" not in learned
    assert learned.count("<|im_end|>") == 2  # the model learns to end its turns


def test_domain_packing(tok: Any) -> None:
    docs = [TextExample("one two three " * 20), TextExample("four five " * 20)]
    blocks, _ = encode("domain", docs, tok, max_length=32)
    stream = [t for b in blocks for t in b.ids]
    assert all(len(b.ids) <= 32 for b in blocks) and stream.count(tok.eos_token_id) == 2
    assert blocks[0].targets == [*blocks[0].ids[1:], IGNORE]


def test_length_grouped_batches_are_deterministic_and_complete() -> None:
    lengths = [(i * 37) % 101 for i in range(500)]
    a = length_grouped_batches(lengths, 16, seed=1, epoch=0, group=4)
    assert a == length_grouped_batches(lengths, 16, seed=1, epoch=0, group=4)
    assert a != length_grouped_batches(lengths, 16, seed=1, epoch=1, group=4)
    assert sorted(i for b in a for i in b) == list(range(500))

    def padding(batches: list[list[int]]) -> int:
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)

    unsorted = [list(range(i, min(i + 16, 500))) for i in range(0, 500, 16)]
    assert padding(a) < 0.5 * padding(unsorted)


def test_shards_are_disjoint_and_cover_the_batch() -> None:
    batch = list(range(10, 25))
    parts = [shard(batch, r, 3) for r in range(3)]
    assert sorted(i for p in parts for i in p) == batch and all(len(p) == 5 for p in parts)


def test_micro_batches_bound_tokens() -> None:
    lengths = [100, 10, 50, 60, 20, 200]
    micro = micro_batches(list(range(6)), lengths, 200)
    assert sorted(i for m in micro for i in m) == list(range(6))
    assert all(len(m) * max(lengths[i] for i in m) <= 200 for m in micro)
    assert micro_batches([0, 1, 2], lengths, 0) == [[0, 2, 1]]


def test_collate_padding_sides() -> None:
    a, b = Encoded(ids=[5, 6, 7], targets=[6, 7, IGNORE]), Encoded(ids=[8], targets=[IGNORE])
    right = collate([a, b], pad_id=0)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["targets"].tolist() == [[6, 7, IGNORE], [IGNORE] * 3]
    left = collate([Encoded(ids=[5, 6], label=1), Encoded(ids=[8], label=0)], pad_id=0, left=True)
    assert left["input_ids"].tolist() == [[5, 6], [0, 8]] and left["labels"].tolist() == [1, 0]
