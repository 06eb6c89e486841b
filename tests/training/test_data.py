"""Every reader against good and bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bot.errors import ConfigError, DataError
from training import data as D
from training.dataspec import DataSpec


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(tmp_path: Path, name: str, rows: list[object]) -> Path:
    return write(tmp_path, name, "".join(json.dumps(r) + "\n" for r in rows))


def fails(path: Path, task: str, line: int | None, words: str, labels: tuple[str, ...] = ()) -> None:
    with pytest.raises(DataError) as info:
        D.read_examples(task, path, labels)
    assert info.value.path == str(path)
    assert info.value.line == line
    assert words in info.value.problem


# ---------------------------------------------------------------- sentiment


def test_sentiment_jsonl_and_csv(tmp_path: Path) -> None:
    a = jsonl(tmp_path, "a.jsonl", [{"text": "great", "label": "positive"}, {"text": "meh", "label": "Neutral"}])
    assert D.read_sentiment(a) == [D.SentimentExample("great", "positive"), D.SentimentExample("meh", "neutral")]
    b = write(tmp_path, "b.csv", 'text,label\n"good, really",positive\n\nbad,negative\n')
    assert [(e.text, e.label) for e in D.read_sentiment(b)] == [("good, really", "positive"), ("bad", "negative")]


@pytest.mark.parametrize(("name", "text", "line", "words"), [
    ("x.jsonl", '{"text": "ok", "label": "positive"}\n{"text": "oops"\n', 2, "malformed JSON"),
    ("x.jsonl", '{"text": "ok", "label": "happy"}\n', 1, "unknown label 'happy'"),
    ("x.jsonl", '{"label": "positive"}\n', 1, "field 'text'"),
    ("x.jsonl", '["text", "label"]\n', 1, "expected a JSON object"),
    ("x.jsonl", "\n\n", None, "empty file"),
    ("x.csv", "sentence,sentiment\nok,positive\n", 1, "wrong columns"),
    ("x.csv", "text,label\nok,positive,extra\n", 2, "wrong number of columns"),
    ("x.tsv", "text\tlabel\n", None, "unsupported file type"),
])
def test_sentiment_bad(tmp_path: Path, name: str, text: str, line: int | None, words: str) -> None:
    fails(write(tmp_path, name, text), "sentiment", line, words)


def test_missing_file(tmp_path: Path) -> None:
    fails(tmp_path / "nope.jsonl", "sentiment", None, "file not found")


def test_custom_labels(tmp_path: Path) -> None:
    path = jsonl(tmp_path, "a.jsonl", [{"text": "win", "label": "spam"}])
    assert D.read_sentiment(path, ("ham", "spam"))[0].label == "spam"
    fails(path, "sentiment", 1, "unknown label", labels=("ham", "eggs"))


# ---------------------------------------------------------------- NER


CONLL = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC
call NN I-NP O

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER
"""


def test_conll_and_entities(tmp_path: Path) -> None:
    examples = D.read_ner(write(tmp_path, "x.txt", CONLL))
    assert [e.tokens for e in examples] == [("EU", "rejects", "German", "call"), ("Peter", "Blackburn")]
    assert examples[0].entities() == [("EU", "ORG"), ("German", "MISC")]
    assert examples[1].entities() == [("Peter Blackburn", "PER")]
    assert examples[1].text == "Peter Blackburn"
    assert examples[0].doc == examples[1].doc == "document 1"


def test_ner_holdout_keeps_documents_whole(tmp_path: Path) -> None:
    # A news story repeats its names: a sentence-level split would score names the model trained on.
    docs = "".join(f"-DOCSTART- O\n\nStory{d} B-ORG\nwins O\n\nStory{d} B-ORG\nloses O\n\nsame O\n\n"
                   for d in range(200))
    examples = D.read_ner(write(tmp_path, "x.txt", docs))
    assert len(examples) == 600 and len({e.doc for e in examples}) == 200
    held = D.select(examples, DataSpec("p", holdout=0.25, part="holdout"), seed=1)
    train = D.select(examples, DataSpec("p", holdout=0.25, part="train"), seed=1)
    assert len(held) + len(train) == 600 and 90 < len(held) < 210 and len(held) % 3 == 0
    assert not {e.doc for e in held} & {e.doc for e in train}
    assert {e.text for e in held} & {e.text for e in train} == {"same"}   # the same sentence in two stories


def test_conll_iob1_becomes_iob2(tmp_path: Path) -> None:
    text = "New\tI-LOC\nYork\tI-LOC\nand\tO\nBoston\tI-LOC\nParis\tB-LOC\n"
    (ex,) = D.read_ner(write(tmp_path, "x.conll", text))
    assert ex.tags == ("B-LOC", "I-LOC", "O", "B-LOC", "B-LOC")
    assert ex.entities() == [("New York", "LOC"), ("Boston", "LOC"), ("Paris", "LOC")]


def test_ner_jsonl(tmp_path: Path) -> None:
    path = jsonl(tmp_path, "x.jsonl", [{"tokens": ["Bonn", "is", "nice"], "tags": ["B-LOC", "O", "O"]}])
    assert D.read_ner(path) == [D.NERExample(("Bonn", "is", "nice"), ("B-LOC", "O", "O"))]
    path = jsonl(tmp_path, "y.jsonl", [{"tokens": ["Bonn"], "tags": ["B-LOC"], "doc": 7}])
    assert D.read_ner(path)[0].group == "7"


@pytest.mark.parametrize(("name", "text", "line", "words"), [
    ("x.jsonl", '{"tokens": ["a", "b"], "tags": ["O"]}\n', 1, "2 tokens but 1 tags"),
    ("x.jsonl", '{"tokens": "a b", "tags": ["O"]}\n', 1, "field 'tokens'"),
    ("x.txt", "EU B-ORG\nrejects\n", 2, "wrong columns"),
    ("x.txt", "EU X-ORG\n", 1, "not O, B-TYPE or I-TYPE"),
    ("x.txt", "-DOCSTART- -X- O\n\n", None, "empty file"),
])
def test_ner_bad(tmp_path: Path, name: str, text: str, line: int | None, words: str) -> None:
    fails(write(tmp_path, name, text), "ner", line, words)


def test_ner_unknown_type(tmp_path: Path) -> None:
    path = write(tmp_path, "x.txt", "a O\n\nAcme B-COMPANY\n")
    fails(path, "ner", 3, "unknown entity type 'COMPANY'", labels=("PER", "ORG"))
    assert len(D.read_ner(path)) == 2  # no labels given: any type is accepted


# ---------------------------------------------------------------- QA


def qa_row(**kw: object) -> dict[str, object]:
    row: dict[str, object] = {"id": "q1", "title": "T", "context": "Paris is the capital of France.",
                              "question": "What is the capital?", "answers": [{"text": "Paris", "answer_start": 0}]}
    row.update(kw)
    return row


def test_qa_jsonl_and_squad(tmp_path: Path) -> None:
    (ex,) = D.read_qa(jsonl(tmp_path, "x.jsonl", [qa_row(answers=[{"text": "Paris"}, "Paris"])]))
    assert ex.answers == ("Paris", "Paris") and ex.id == "q1" and ex.title == "T"
    squad = {"version": "1.1", "data": [{"title": "France", "paragraphs": [
        {"context": "Paris is the capital of France.",
         "qas": [{"id": "a", "question": "Capital?", "answers": [{"text": "Paris", "answer_start": 0}]},
                 {"id": "b", "question": "Country?", "answers": [{"text": "France", "answer_start": 24}]}]}]}]}
    examples = D.read_qa(write(tmp_path, "x.json", json.dumps(squad, indent=1)))
    assert [(e.id, e.answers, e.title) for e in examples] == [("a", ("Paris",), "France"), ("b", ("France",), "France")]


def test_qa_bad(tmp_path: Path) -> None:
    fails(jsonl(tmp_path, "a.jsonl", [qa_row(), qa_row(answers=[{"text": "Lyon"}])]), "qa", 2,
          "answer 'Lyon' not found in the context")
    fails(jsonl(tmp_path, "b.jsonl", [qa_row(answers=[])]), "qa", 1, "non-empty list")
    fails(jsonl(tmp_path, "c.jsonl", [qa_row(question="")]), "qa", 1, "field 'question'")
    fails(write(tmp_path, "d.json", '{"data": [\n{"paragraphs": }]}'), "qa", 2, "malformed JSON")
    fails(write(tmp_path, "e.json", '{"version": "1.1"}'), "qa", None, "not SQuAD format")
    squad = {"data": [{"paragraphs": [{"context": "abc", "qas": [{"id": "z", "question": "q?",
                                                                 "answers": [{"text": "xyz"}]}]}]}]}
    fails(write(tmp_path, "f.json", json.dumps(squad)), "qa", None, "data[0].paragraphs[0].qas[0] (id z)")


# ---------------------------------------------------------------- story / domain / chat


def test_text_readers(tmp_path: Path) -> None:
    rows = [{"title": "The Fox", "text": "A fox.\nThe end."}, {"text": "  Once upon a time. "}]
    examples = D.read_text(jsonl(tmp_path, "x.jsonl", rows))
    assert examples == [D.TextExample("A fox.\nThe end.", "The Fox"), D.TextExample("Once upon a time.", None)]
    txt = write(tmp_path, "x.txt", "One story.\n\nStill one.\n<|endoftext|>\nTwo.\n<|endoftext|>\n")
    assert [e.text for e in D.read_text(txt)] == ["One story.\n\nStill one.", "Two."]
    assert [e.text for e in D.read_text(write(tmp_path, "y.txt", "Just text.\n"))] == ["Just text."]
    fails(write(tmp_path, "z.txt", "\n<|endoftext|>\n"), "story", None, "empty file")
    fails(jsonl(tmp_path, "w.jsonl", [{"story": "x"}]), "domain", 1, "field 'text'")


def test_chat_reader(tmp_path: Path) -> None:
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    (ex,) = D.read_chat(jsonl(tmp_path, "a.jsonl", [good]))
    assert ex.as_dicts() == good["messages"]
    fails(jsonl(tmp_path, "b.jsonl", [good, {"messages": [{"role": "user", "content": "hi"}]}]), "chat", 2,
          "no assistant message")
    fails(jsonl(tmp_path, "c.jsonl", [{"messages": [{"role": "bot", "content": "x"}]}]), "chat", 1, "messages[0]")
    fails(jsonl(tmp_path, "d.jsonl", [{"conversation": []}]), "chat", 1, "field 'messages'")


# ---------------------------------------------------------------- selection


def test_holdout_split_is_by_group_and_deterministic() -> None:
    examples = [D.QAExample(context=f"context {i // 3}", question=f"q{i}", answers=("x",)) for i in range(600)]
    train = D.select(examples, DataSpec("p", holdout=0.2, part="train"), seed=1)
    held = D.select(examples, DataSpec("p", holdout=0.2, part="holdout"), seed=2)
    assert len(train) + len(held) == 600 and 60 < len(held) < 180
    assert not {e.context for e in train} & {e.context for e in held}
    assert held == D.select(examples, DataSpec("p", holdout=0.2, part="holdout"), seed=3)


def test_limit_min_words_and_balance() -> None:
    examples = [D.SentimentExample(f"w {'x ' * (i % 8)}", ["negative", "positive", "neutral"][i % 3 if i < 30 else 1])
                for i in range(300)]
    picked = D.select(examples, DataSpec("p", limit=50), seed=1)
    assert len(picked) == 50 and picked == D.select(examples, DataSpec("p", limit=50), seed=1)
    assert picked != D.select(examples, DataSpec("p", limit=50), seed=2)
    assert all(len(e.text.split()) >= 5 for e in D.select(examples, DataSpec("p", min_words=5), seed=1))
    balanced = D.select(examples, DataSpec("p", limit=60, balance=True), seed=1)
    counts = {label: sum(e.label == label for e in balanced) for label in ("negative", "neutral", "positive")}
    # Equal shares where possible; the scarce labels' remainder goes to the others.
    assert counts == {"negative": 10, "neutral": 10, "positive": 40}


@pytest.mark.parametrize("balance", [False, True])
def test_skip_leaves_out_exactly_what_the_same_limit_took(balance: bool) -> None:
    examples = [D.SentimentExample(f"text {i}", ["negative", "positive", "neutral"][i % 3]) for i in range(300)]
    first = D.select(examples, DataSpec("p", limit=120, balance=balance), seed=7)
    rest = D.select(examples, DataSpec("p", skip=120, balance=balance), seed=7)
    assert len(rest) == 180 and not {e.text for e in first} & {e.text for e in rest}
    more = D.select(examples, DataSpec("p", skip=120, limit=50, balance=balance), seed=7)
    assert len(more) == 50 and {e.text for e in more} <= {e.text for e in rest}
    # Without skip the selection is unchanged by the option's existence (recipes keep their data).
    assert first == D.select(examples, DataSpec("p", limit=120, balance=balance, skip=0), seed=7)


def test_a_plain_mapping_is_a_spec_checked_as_a_recipe_table() -> None:
    examples = [D.SentimentExample(f"text {i}", "positive") for i in range(50)]
    assert D.select(examples, {"path": "p", "limit": 7}, seed=3) == D.select(examples, DataSpec("p", limit=7), seed=3)
    with pytest.raises(ConfigError, match=r"limit: expected int, got '7'"):
        D.select(examples, {"path": "p", "limit": "7"}, seed=3)


def test_shuffle_sentences_reorders_qa_contexts_after_the_split_and_keeps_every_answer() -> None:
    contexts = [f"Ann met Bob in Rome {i}. They ate at noon. Bob paid the bill, \"Sure\" he said. It rained."
                for i in range(40)]
    examples = [D.QAExample(context=c, question=f"Who paid {i}?", answers=("Bob paid the bill",))
                for i, c in enumerate(contexts)] + [
        D.QAExample(context="One sentence only, with Rome in it.", question="Where?", answers=("Rome",)),
        # The answer crosses a sentence boundary: reordering would break it, so the context stays.
        D.QAExample(context="It ended. Then it began.", question="What?", answers=("ended. Then",))]
    plain = D.select(examples, DataSpec("p", holdout=0.3, part="train"), seed=1)
    mixed = D.select(examples, DataSpec("p", holdout=0.3, part="train", shuffle_sentences=True), seed=1)
    assert [e.question for e in mixed] == [e.question for e in plain]     # the same questions, split as before
    changed = [new for old, new in zip(plain, mixed, strict=True) if new.context != old.context]
    assert len(changed) == len([e for e in plain if e.question.startswith("Who")])
    for old, new in zip(plain, mixed, strict=True):
        assert sorted(_sentences(new.context)) == sorted(_sentences(old.context))
        assert all(a in new.context for a in new.answers)
    assert mixed == D.select(examples, DataSpec("p", holdout=0.3, part="train", shuffle_sentences=True), seed=1)
    with pytest.raises(DataError, match="shuffle_sentences is for QA data"):
        D.select([D.SentimentExample("fine", "positive")], DataSpec("p", shuffle_sentences=True), seed=1)


def _sentences(text: str) -> list[str]:
    from bot.skills import sentences

    return sentences(text)
