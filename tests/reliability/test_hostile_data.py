"""Every training-data reader against random, garbage and truncated files: the result is examples or a
DataError naming the file (and a line within the file where it gives one), never another exception."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.errors import DataError
from bot.store import Store
from training import data as D

SETTINGS = settings(max_examples=80, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

SQUAD = {"data": [{"title": "t", "paragraphs": [{"context": "Alice lives in Paris.", "qas": [
    {"id": "1", "question": "Where?", "answers": [{"text": "Paris", "answer_start": 15}]}]}]}]}
# (task, file name, a valid file): the fuzzers cut, corrupt and replace these.
VALID: list[tuple[str, str, str]] = [
    ("sentiment", "s.jsonl", '{"text": "great film", "label": "positive"}\n{"text": "dull", "label": "negative"}\n'),
    ("sentiment", "s.csv", 'text,label\n"good, really",positive\nbad,negative\n'),
    ("ner", "n.jsonl", '{"tokens": ["Alice", "met", "Bob"], "tags": ["B-PER", "O", "B-PER"]}\n'),
    ("ner", "n.conll", "-DOCSTART- O\n\nAlice NNP B-PER\nmet VBD O\n\nParis NNP I-LOC\n"),
    ("qa", "q.jsonl", '{"context": "Alice lives in Paris.", "question": "Where?", "answers": ["Paris"]}\n'),
    ("qa", "q.json", json.dumps(SQUAD, indent=1)),
    ("story", "t.jsonl", '{"text": "Once upon a time.", "title": "fox"}\n'),
    ("story", "t.txt", "Once upon a time.\n<|endoftext|>\nThe end came.\n"),
    ("domain", "d.txt", "Plain domain text.\n"),
    ("chat", "c.jsonl", '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}]}\n'),
]
IDS = [f"{task}-{name}" for task, name, _ in VALID]
GARBAGE_LINES = ["{", "}", "[]", "null", "1e999", '{"text": 1}', '{"messages": "x"}', '{"tokens": [1]}', "\x00",
                 "\ufeff{}", '"\\ud800"', "a,b,c,d", "\"unterminated,positive", "B-PER", "x I-", "-DOCSTART-",
                 '{"answers": [{"text": null}]}', '{"context": "c", "question": "q", "answers": [{"text": "zz"}]}']


def _check(task: str, path: Path) -> None:
    """Read ``path``; allow only examples or a DataError that names it (and a line that exists)."""
    try:
        examples = D.read_examples(task, path)
    except DataError as exc:
        assert exc.path == str(path), exc
        if exc.line is not None:
            text = path.read_bytes().decode("utf-8", "replace")
            assert 1 <= exc.line <= max(1, len(text.splitlines()) + 1), exc
        return
    assert examples, "an empty list must be a DataError"


def test_valid_samples_are_valid(tmp_path: Path) -> None:
    for task, name, text in VALID:
        (tmp_path / name).write_text(text, encoding="utf-8")
        assert D.read_examples(task, tmp_path / name), name


@pytest.mark.parametrize(("task", "name", "text"), VALID, ids=IDS)
@SETTINGS
@given(data=st.binary(max_size=400))
def test_random_bytes(tmp_path: Path, task: str, name: str, text: str, data: bytes) -> None:
    (tmp_path / name).write_bytes(data)
    _check(task, tmp_path / name)


@pytest.mark.parametrize(("task", "name", "text"), VALID, ids=IDS)
def test_every_truncation(tmp_path: Path, task: str, name: str, text: str) -> None:
    raw = text.encode("utf-8") + "é😀".encode()  # multi-byte characters at the end: cuts land mid-character
    path = tmp_path / name
    for cut in range(len(raw) + 1):
        path.write_bytes(raw[:cut])
        _check(task, path)


@pytest.mark.parametrize(("task", "name", "text"), VALID, ids=IDS)
@SETTINGS
@given(data=st.data())
def test_one_corrupted_line(tmp_path: Path, task: str, name: str, text: str, data: st.DataObject) -> None:
    lines = text.splitlines()
    where = data.draw(st.integers(0, len(lines)))
    bad = data.draw(st.sampled_from(GARBAGE_LINES) | st.text(max_size=40))
    path = tmp_path / name
    path.write_text("\n".join([*lines[:where], bad, *lines[where:]]) + "\n", encoding="utf-8", errors="surrogatepass")
    _check(task, path)


def test_missing_file_directory_and_wrong_suffix(tmp_path: Path) -> None:
    for task, name, _ in VALID:
        (tmp_path / f"dir-{name}").mkdir()
        for path in (tmp_path / f"missing-{name}", tmp_path / f"dir-{name}"):
            with pytest.raises(DataError, match="file not found") as caught:
                D.read_examples(task, path)
            assert caught.value.path == str(path)
    with pytest.raises(DataError, match="unsupported file type"):
        D.read_examples("chat", tmp_path / "c.csv")


def test_load_with_an_empty_selection_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_text(VALID[0][2], encoding="utf-8")
    with pytest.raises(DataError, match="no examples left") as caught:
        D.load("sentiment", {"path": str(path), "min_words": 50}, ("negative", "neutral", "positive"), 0)
    assert caught.value.path == str(path)


# --------------------------------------------------------------------------- bugs found


@pytest.mark.parametrize(("task", "name"), [("chat", "c.jsonl"), ("qa", "q.json"), ("sentiment", "s.jsonl")])
def test_deeply_nested_json_is_a_data_error(tmp_path: Path, task: str, name: str) -> None:
    (tmp_path / name).write_text("[" * 100_000, encoding="utf-8")
    _check(task, tmp_path / name)


def test_a_huge_number_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / "s.jsonl").write_text('{"text": "x", "label": ' + "9" * 5000 + "}\n", encoding="utf-8")
    _check("sentiment", tmp_path / "s.jsonl")


def test_an_oversized_csv_field_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / "s.csv").write_text('text,label\n"' + "x" * 200_000 + '",positive\n', encoding="utf-8")
    _check("sentiment", tmp_path / "s.csv")


def test_an_unreadable_file_is_a_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "s.jsonl"
    path.write_text(VALID[0][2], encoding="utf-8")

    def denied(self: Path, *args: object, **kwargs: object) -> str:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", denied)  # as root, chmod 000 would not stop this process
    _check("sentiment", path)


def test_exported_conversations_read_back(tmp_path: Path) -> None:
    with Store.open(tmp_path / "log.db") as store:
        chat, user = store.ensure_chat("test", "c"), store.ensure_user("test", "u")
        question = store.log_incoming(chat_id=chat, user_id=user, text="first line\u2028second line", skill="chat")
        store.log_reply(chat_id=chat, reply_to=question, text="answer\u0085with NEL", skill="chat")
        exported = list(store.export_chat_examples())
    path = tmp_path / "chat.jsonl"  # written exactly as `lorabot db export --out` writes it
    path.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in exported), encoding="utf-8")
    [example] = D.read_chat(path)
    assert example.messages == (("user", "first line\u2028second line"), ("assistant", "answer\u0085with NEL"))


def test_a_quoted_multi_line_csv_field_keeps_its_line_break(tmp_path: Path) -> None:
    (tmp_path / "s.csv").write_text('text,label\n"multi\nline",positive\n', encoding="utf-8")
    assert [e.text for e in D.read_sentiment(tmp_path / "s.csv")] == ["multi\nline"]
