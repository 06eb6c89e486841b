"""Readers: training/evaluation files -> typed examples, with a DataError naming file and line.

Formats (chosen by file suffix):
    sentiment  .jsonl {"text", "label"}  |  .csv with a header row text,label
    ner        .jsonl {"tokens", "tags"}  |  CoNLL columns (any other suffix): token first, tag last,
               blank line between sentences, -DOCSTART- skipped; IOB1 is converted to IOB2
    qa         .jsonl {"context", "question", "answers": [{"text", "answer_start"}]}  |  .json SQuAD v1.1
    story      .jsonl {"text", "title"?}  |  .txt (one document, or several separated by <|endoftext|> lines)
    domain     as story
    chat       .jsonl {"messages": [{"role", "content"}, ...]}
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import random
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot.errors import DataError
from bot.skills import SentimentFormat
from training.dataspec import DataSpec, as_spec

TEXT_SEPARATOR = "<|endoftext|>"
_TAG = re.compile(r"^(?P<prefix>[BI])-(?P<type>\S+)$")


@dataclass(frozen=True)
class SentimentExample:
    text: str
    label: str

    @property
    def key(self) -> str:
        return self.text


@dataclass(frozen=True)
class NERExample:
    tokens: tuple[str, ...]
    tags: tuple[str, ...]   # IOB2
    doc: str = ""           # the document it came from (CoNLL -DOCSTART-), so a holdout split keeps documents whole

    @property
    def text(self) -> str:
        """The sentence as the model sees it (and as evaluation maps offsets back to tokens)."""
        return " ".join(self.tokens)

    @property
    def key(self) -> str:
        return self.text

    @property
    def group(self) -> str:
        """What a holdout split keeps together: a news story repeats its names, so a sentence-level split
        would score names the model trained on."""
        return self.doc or self.text

    def entities(self) -> list[tuple[str, str]]:
        """``[(entity text, type), ...]`` in order of appearance."""
        return [(" ".join(self.tokens[s:e]), t) for s, e, t in tag_spans(self.tags)]


@dataclass(frozen=True)
class QAExample:
    context: str
    question: str
    answers: tuple[str, ...]   # every gold answer text (the first is the training target)
    id: str = ""
    title: str = ""

    @property
    def key(self) -> str:
        return self.context


@dataclass(frozen=True)
class TextExample:
    text: str
    title: str | None = None

    @property
    def key(self) -> str:
        return self.text


@dataclass(frozen=True)
class ChatExample:
    messages: tuple[tuple[str, str], ...]   # (role, content)

    @property
    def key(self) -> str:
        return json.dumps(self.messages)

    def as_dicts(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages]


Example = SentimentExample | NERExample | QAExample | TextExample | ChatExample


def tag_spans(tags: tuple[str, ...] | list[str]) -> list[tuple[int, int, str]]:
    """IOB2 tags -> ``[(start token, end token, type)]``."""
    spans: list[tuple[int, int, str]] = []
    for i, tag in enumerate(tags):
        m = _TAG.match(tag)
        if m is None:
            continue
        if m["prefix"] == "B" or not spans or spans[-1][1] != i or spans[-1][2] != m["type"]:
            spans.append((i, i + 1, m["type"]))
        else:
            spans[-1] = (spans[-1][0], i + 1, m["type"])
    return spans


# ---------------------------------------------------------------- low-level helpers


def _text_of(path: Path) -> str:
    if not path.is_file():
        raise DataError(str(path), None, "file not found")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(str(path), None, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise DataError(str(path), None, f"cannot read the file: {exc.strerror or exc}") from None


def _jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    # Lines end at "\n" only: str.splitlines() also splits at U+2028/U+2029/U+0085, which JSON strings
    # may contain raw (json.dumps(..., ensure_ascii=False) writes them so).
    for number, line in enumerate(_text_of(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(str(path), number, f"malformed JSON: {exc.msg} (column {exc.colno})") from None
        except (ValueError, RecursionError) as exc:  # a 5000-digit number; absurd nesting
            raise DataError(str(path), number, f"malformed JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise DataError(str(path), number, f"expected a JSON object, got {type(obj).__name__}")
        yield number, obj


def _str_field(obj: dict[str, Any], key: str, path: Path, line: int | None, *, optional: bool = False) -> str:
    value = obj.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str) or not value.strip():
        have = ", ".join(sorted(obj)) or "none"
        raise DataError(str(path), line, f"field {key!r} must be a non-empty string (fields: {have})")
    return value


def _non_empty(examples: list[Any], path: Path) -> list[Any]:
    if not examples:
        raise DataError(str(path), None, "no examples (empty file)")
    return examples


def _suffix(path: Path, allowed: dict[str, str], task: str) -> str:
    kind = allowed.get(path.suffix.lower(), allowed.get("*", ""))
    if not kind:
        raise DataError(str(path), None, f"unsupported file type for {task}; use {', '.join(allowed)}")
    return kind


# ---------------------------------------------------------------- readers


def read_sentiment(path: Path, labels: tuple[str, ...] = SentimentFormat.default_labels) -> list[SentimentExample]:
    """Sentiment examples; a label outside ``labels`` is an error (case-insensitive match)."""
    kind = _suffix(path, {".jsonl": "jsonl", ".csv": "csv"}, "sentiment")
    by_lower = {label.lower(): label for label in labels}
    rows: Iterator[tuple[int, dict[str, Any]]] = _jsonl(path) if kind == "jsonl" else _csv_rows(path)
    examples = []
    for line, obj in rows:
        text = _str_field(obj, "text", path, line)
        raw = obj.get("label")
        label = by_lower.get(str(raw).strip().lower()) if isinstance(raw, str | int) else None
        if label is None:
            raise DataError(str(path), line, f"unknown label {raw!r} (expected one of: {', '.join(labels)})")
        examples.append(SentimentExample(text=text, label=label))
    return _non_empty(examples, path)


def _csv_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    # A file object, not a list of lines: quoted fields may span lines and keep their line breaks.
    reader = csv.reader(io.StringIO(_text_of(path), newline=""))
    try:
        header = next(reader, None)
        columns = [c.strip().lower() for c in header or []]
        if "text" not in columns or "label" not in columns:
            raise DataError(str(path), 1, f"wrong columns: expected a header row with text,label; got {header!r}")
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(columns):
                raise DataError(str(path), reader.line_num, f"wrong number of columns: {len(row)}, header has "
                                f"{len(columns)} (quote texts that contain commas)")
            yield reader.line_num, dict(zip(columns, row, strict=True))
    except csv.Error as exc:  # e.g. a field over csv.field_size_limit()
        raise DataError(str(path), reader.line_num, f"malformed CSV: {exc}") from None


def read_ner(path: Path, labels: tuple[str, ...] = ()) -> list[NERExample]:
    """NER sentences with IOB2 tags; with ``labels``, an entity type outside them is an error."""
    kind = _suffix(path, {".jsonl": "jsonl", "*": "conll"}, "ner")
    sentences = _ner_jsonl(path) if kind == "jsonl" else _ner_conll(path)
    examples = []
    for line, doc, tokens, tags in sentences:
        if len(tokens) != len(tags):
            raise DataError(str(path), line, f"{len(tokens)} tokens but {len(tags)} tags")
        if not tokens:
            raise DataError(str(path), line, "empty sentence")
        fixed = _to_iob2(tags, path, line)
        if labels:
            unknown = sorted({t for _, _, t in tag_spans(fixed)} - set(labels))
            if unknown:
                raise DataError(str(path), line, f"unknown entity type {unknown[0]!r} "
                                f"(expected one of: {', '.join(labels)})")
        examples.append(NERExample(tokens=tuple(tokens), tags=fixed, doc=doc))
    return _non_empty(examples, path)


def _ner_jsonl(path: Path) -> Iterator[tuple[int, str, list[str], list[str]]]:
    for line, obj in _jsonl(path):
        tokens, tags, doc = obj.get("tokens"), obj.get("tags"), obj.get("doc", "")
        for key, value in (("tokens", tokens), ("tags", tags)):
            if not isinstance(value, list) or not all(isinstance(x, str) and x.strip() for x in value):
                raise DataError(str(path), line, f"field {key!r} must be a list of non-empty strings")
        if not isinstance(doc, (str, int)):
            raise DataError(str(path), line, "field 'doc' must be a string or a number")
        yield line, str(doc), tokens, tags  # type: ignore[misc]


def _ner_conll(path: Path) -> Iterator[tuple[int, str, list[str], list[str]]]:
    tokens: list[str] = []
    tags: list[str] = []
    start = 0
    doc = ""   # sentences before any -DOCSTART- are each their own group
    documents = 0
    for number, raw in enumerate([*_text_of(path).splitlines(), ""], start=1):
        cols = raw.split()
        if cols and cols[0] == "-DOCSTART-":
            documents += 1
            doc = f"document {documents}"
            continue
        if not cols:
            if tokens:
                yield start, doc, tokens, tags
            tokens, tags = [], []
            continue
        if len(cols) < 2:
            raise DataError(str(path), number, f"wrong columns: expected 'token ... tag', got {raw.strip()!r}")
        if not tokens:
            start = number
        tokens.append(cols[0])
        tags.append(cols[-1])


def _to_iob2(tags: list[str], path: Path, line: int) -> tuple[str, ...]:
    """Validate IOB/IOB2 tags and convert to IOB2 (an I- that starts an entity becomes B-)."""
    out = []
    previous = "O"
    for i, tag in enumerate(tags):
        if tag != "O":
            m = _TAG.match(tag)
            if m is None:
                raise DataError(str(path), line, f"token {i + 1}: tag {tag!r} is not O, B-TYPE or I-TYPE")
            if m["prefix"] == "I" and previous[2:] != m["type"]:
                tag = f"B-{m['type']}"
        out.append(tag)
        previous = tag
    return tuple(out)


def read_qa(path: Path) -> list[QAExample]:
    """QA examples; every answer must occur in its context."""
    kind = _suffix(path, {".jsonl": "jsonl", ".json": "squad"}, "qa")
    examples = []
    items = _qa_jsonl(path) if kind == "jsonl" else _qa_squad(path)
    for line, where, obj, context, title in items:
        question = _str_field(obj, "question", path, line)
        raw = obj.get("answers")
        if obj.get("is_impossible"):
            raise DataError(str(path), line, f"{where}unanswerable questions (SQuAD v2) are not supported")
        if not isinstance(raw, list) or not raw:
            raise DataError(str(path), line, f"{where}'answers' must be a non-empty list")
        answers = []
        for answer in raw:
            text = answer.get("text") if isinstance(answer, dict) else answer
            if not isinstance(text, str) or not text.strip():
                raise DataError(str(path), line, f"{where}each answer needs a non-empty 'text'")
            if text not in context:
                raise DataError(str(path), line, f"{where}answer {text!r} not found in the context")
            answers.append(text)
        examples.append(QAExample(context=context, question=question, answers=tuple(answers),
                                  id=str(obj.get("id", "")), title=title))
    return _non_empty(examples, path)


def _qa_jsonl(path: Path) -> Iterator[tuple[int | None, str, dict[str, Any], str, str]]:
    for line, obj in _jsonl(path):
        context = _str_field(obj, "context", path, line)
        yield line, "", obj, context, str(obj.get("title", ""))


def _qa_squad(path: Path) -> Iterator[tuple[int | None, str, dict[str, Any], str, str]]:
    try:
        doc = json.loads(_text_of(path))
    except json.JSONDecodeError as exc:
        raise DataError(str(path), exc.lineno, f"malformed JSON: {exc.msg}") from None
    except (ValueError, RecursionError) as exc:
        raise DataError(str(path), None, f"malformed JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise DataError(str(path), None, 'not SQuAD format: expected {"data": [{"paragraphs": [...]}]}')
    # The nested file has no useful line numbers, so problems name the JSON position instead.
    for a, article in enumerate(doc["data"]):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            raise DataError(str(path), None, f"data[{a}]: expected a 'paragraphs' list")
        for p, para in enumerate(paragraphs):
            if not isinstance(para, dict) or not isinstance(para.get("qas"), list):
                raise DataError(str(path), None, f"data[{a}].paragraphs[{p}]: expected 'context' and 'qas'")
            context = _str_field(para, "context", path, None)
            for q, qa in enumerate(para["qas"]):
                if not isinstance(qa, dict):
                    raise DataError(str(path), None, f"data[{a}].paragraphs[{p}].qas[{q}]: expected an object")
                where = f"data[{a}].paragraphs[{p}].qas[{q}] (id {qa.get('id', '?')}): "
                yield None, where, qa, context, str(article.get("title", ""))


def read_text(path: Path) -> list[TextExample]:
    """Documents for story / domain training."""
    kind = _suffix(path, {".jsonl": "jsonl", ".txt": "txt"}, "story/domain")
    if kind == "txt":
        docs = [d.strip() for d in re.split(rf"^\s*{re.escape(TEXT_SEPARATOR)}\s*$", _text_of(path), flags=re.M)]
        return _non_empty([TextExample(text=d) for d in docs if d], path)
    examples = []
    for line, obj in _jsonl(path):
        text = _str_field(obj, "text", path, line)
        title = obj.get("title")
        if title is not None and not isinstance(title, str):
            raise DataError(str(path), line, "field 'title' must be a string")
        examples.append(TextExample(text=text.strip(), title=title.strip() if title else None))
    return _non_empty(examples, path)


def read_chat(path: Path) -> list[ChatExample]:
    """Conversations; each needs at least one non-empty assistant message."""
    _suffix(path, {".jsonl": "jsonl"}, "chat")
    examples = []
    for line, obj in _jsonl(path):
        messages = obj.get("messages")
        if not isinstance(messages, list) or not messages:
            raise DataError(str(path), line, "field 'messages' must be a non-empty list")
        pairs = []
        for i, msg in enumerate(messages):
            role = msg.get("role") if isinstance(msg, dict) else None
            content = msg.get("content") if isinstance(msg, dict) else None
            if role not in ("system", "user", "assistant") or not isinstance(content, str):
                raise DataError(str(path), line, f"messages[{i}]: expected {{'role': system|user|assistant, "
                                "'content': str}")
            pairs.append((role, content))
        if not any(r == "assistant" and c.strip() for r, c in pairs):
            raise DataError(str(path), line, "no assistant message to learn from")
        examples.append(ChatExample(messages=tuple(pairs)))
    return _non_empty(examples, path)


def read_examples(task: str, path: Path, labels: tuple[str, ...] = ()) -> list[Example]:
    """The reader for ``task``."""
    path = Path(path)
    if task == "sentiment":
        return read_sentiment(path, labels or SentimentFormat.default_labels)
    if task == "ner":
        return read_ner(path, labels)
    if task == "qa":
        return read_qa(path)
    if task in ("story", "domain"):
        return read_text(path)
    if task == "chat":
        return read_chat(path)
    raise ValueError(f"unknown task {task!r}")


# ---------------------------------------------------------------- selection (subsample, holdout split)


def in_holdout(key: str, fraction: float) -> bool:
    """Deterministic group split: the same key (e.g. a QA context) always lands on the same side."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def select(examples: list[Example], spec: DataSpec | Mapping[str, Any], seed: int) -> list[Example]:
    """Apply a data spec's options: holdout part, min_words, skip, a seeded (optionally balanced) subsample, then
    QA's sentence shuffling.

    ``skip = N`` leaves out exactly the examples that ``limit = N`` (same file, seed and options) selects, so
    a run can continue an earlier one (``train.init_adapter``) on examples the earlier one never saw.
    A plain mapping is checked as a recipe's table is.
    """
    spec = as_spec(spec)
    if spec.themes:
        from training.story_themes import prompt_for

        examples = [ex if not isinstance(ex, TextExample) or ex.title else
                    dataclasses.replace(ex, title=prompt_for(ex.text)) for ex in examples]
    if spec.holdout:
        want = spec.part == "holdout"
        examples = [ex for ex in examples if in_holdout(getattr(ex, "group", ex.key), float(spec.holdout)) == want]
    if spec.min_words:
        examples = [ex for ex in examples if len(ex.key.split()) >= spec.min_words]
    rng = random.Random(f"{seed}:{spec.path}")
    if spec.skip:
        seen = set(_sample(examples, spec.skip, spec.balance, rng))
        examples = [ex for i, ex in enumerate(examples) if i not in seen]
        rng = random.Random(f"{seed}:{spec.path}:skip{spec.skip}")
    chosen = [examples[i] for i in sorted(_sample(examples, spec.limit, spec.balance, rng))]
    if spec.shuffle_sentences:
        from training.qa_shuffle import shuffle_sentences

        if not all(isinstance(ex, QAExample) for ex in chosen):
            raise DataError(spec.path, None, "shuffle_sentences is for QA data (a context with questions)")

        chosen = shuffle_sentences(chosen, seed)
    return chosen


def _sample(examples: list[Example], limit: int, balance: bool, rng: random.Random) -> list[int]:
    """Indices of a seeded subsample of ``limit`` examples (all when limit is 0 or too large)."""
    if not limit or limit >= len(examples):
        return list(range(len(examples)))
    if balance and all(isinstance(ex, SentimentExample) for ex in examples):
        by_label: dict[str, list[int]] = {}
        for i, ex in enumerate(examples):
            by_label.setdefault(ex.label, []).append(i)  # type: ignore[union-attr]
        chosen: list[int] = []
        # Equal shares per label; a label with too few examples gives its remainder to the others.
        remaining, groups = limit, sorted(by_label.values(), key=len)
        for n, group in enumerate(groups):
            take = min(len(group), remaining // (len(groups) - n))
            chosen += rng.sample(group, take)
            remaining -= take
        return chosen
    return rng.sample(range(len(examples)), limit)


def load(task: str, spec: DataSpec | Mapping[str, Any], labels: tuple[str, ...], seed: int) -> list[Example]:
    """Read and select one data spec (a DataSpec, or a mapping as a recipe's table); nothing selected is an error."""
    spec = as_spec(spec)
    path = Path(spec.path)
    examples = select(read_examples(task, path, labels), spec, seed)
    if not examples:
        raise DataError(str(path), None, f"no examples left after selecting {spec.as_table()}")
    return examples
