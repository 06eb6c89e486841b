"""Task formats: how each skill turns input into a prompt and model output into a result.

Defined once and used by both the bot and ``training/``, so an adapter and the bot cannot disagree.
Any change to a prompt or target layout must bump that task's ``version``: adapters record the
version they were trained with and the bot refuses a mismatch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

from bot.messages import Answer, Entities, Entity, Sentiment, Text

_WS = re.compile(r"\s+")


def one_line(text: str) -> str:
    """Collapse all whitespace (newlines included) so the prompt layout cannot be broken by input."""
    return _WS.sub(" ", text).strip()


@dataclass(frozen=True)
class SentimentFormat:
    """Classification by the label tokens' probabilities at the last prompt position (one forward pass)."""

    task: ClassVar[str] = "sentiment"
    # v2: the prompt no longer lists the labels (an adapter knows its own; 7 fewer tokens per message,
    # and this one forward pass over the prompt is the whole cost of a reply).
    version: ClassVar[int] = 2
    default_labels: ClassVar[tuple[str, ...]] = ("negative", "neutral", "positive")

    @staticmethod
    def prompt(text: str) -> str:
        return f"Text: {one_line(text)}\nSentiment:"

    @staticmethod
    def continuation(label: str) -> str:
        """The text whose first token stands for ``label`` right after the prompt."""
        return " " + label

    @staticmethod
    def result(scores: dict[str, float], offsets: Mapping[str, float] | None = None) -> Sentiment:
        """The most probable label. ``offsets`` (an adapter's ``label_offsets``, training/calibrate.py) are
        added to the labels' log-probabilities before renormalising: a correction of the label priors the
        adapter learned from its training mix, fitted on held-out data."""
        if offsets:
            scaled = {k: p * math.exp(offsets.get(k, 0.0)) for k, p in scores.items()}
            total = sum(scaled.values())
            scores = {k: p / total for k, p in scaled.items()} if total > 0 else scores
        label = max(scores, key=scores.__getitem__)
        return Sentiment(label=label, scores=dict(scores))


@dataclass(frozen=True)
class NERFormat:
    """Generative NER: the model lists ``entity (TYPE)`` pairs; offsets are found in the user's text."""

    task: ClassVar[str] = "ner"
    version: ClassVar[int] = 1
    default_labels: ClassVar[tuple[str, ...]] = ("PER", "ORG", "LOC", "MISC")
    none: ClassVar[str] = "none"
    stop: ClassVar[tuple[str, ...]] = ("\n",)
    _item: ClassVar[re.Pattern[str]] = re.compile(r"^(?P<text>.+?)\s*\((?P<type>[A-Za-z][A-Za-z0-9_-]*)\)\s*$")

    @staticmethod
    def prompt(text: str) -> str:
        return f"Sentence: {one_line(text)}\nEntities:"

    @classmethod
    def target(cls, entities: list[tuple[str, str]]) -> str:
        """Training target for ``[(entity text, type), ...]`` in order of appearance."""
        if not entities:
            return " " + cls.none
        return " " + "; ".join(f"{one_line(text)} ({etype})" for text, etype in entities)

    @classmethod
    def parse_pairs(cls, output: str) -> list[tuple[str, str]]:
        line = output.strip().split("\n", 1)[0].strip()
        if not line or line.lower() == cls.none:
            return []
        pairs = []
        for chunk in line.split(";"):
            m = cls._item.match(chunk.strip())
            if m:
                pairs.append((m.group("text").strip(), m.group("type")))
        return pairs

    @classmethod
    def result(cls, output: str, source: str, labels: tuple[str, ...]) -> Entities:
        """Entities whose text occurs in ``source``, with exact offsets; invented ones are dropped."""
        found: list[Entity] = []
        taken: set[tuple[int, int]] = set()
        cursor = 0
        for text, etype in cls.parse_pairs(output):
            if etype not in labels:
                continue
            pattern = _spaced(text)
            span = None
            for start_at in (cursor, 0):
                for m in pattern.finditer(source, start_at):
                    if (m.start(), m.end()) not in taken and _word_bounded(source, m.start(), m.end()):
                        span = (m.start(), m.end())
                        break
                if span:
                    break
            if span is None:
                continue
            taken.add(span)
            cursor = span[1]
            found.append(Entity(text=source[span[0]:span[1]], type=etype, start=span[0], end=span[1]))
        found.sort(key=lambda e: e.start)
        return Entities(entities=tuple(found), source=source)


def _spaced(text: str, flags: int = 0) -> re.Pattern[str]:
    """``text`` as a pattern that matches it with any run of whitespace between its words."""
    return re.compile(r"\s+".join(re.escape(word) for word in text.split()), flags)


def _word_bounded(source: str, start: int, end: int) -> bool:
    before = source[start - 1] if start > 0 else " "
    after = source[end] if end < len(source) else " "
    return not (before.isalnum() and source[start].isalnum()) and not (after.isalnum() and source[end - 1].isalnum())


@dataclass(frozen=True)
class QAFormat:
    """Extractive-style QA: a short answer generated after the context and question.

    v2 asks the question before the context as well as after it: a causal model reads the context
    already knowing what to look for ("query-aware contextualisation", Liu et al. 2023, Lost in the
    Middle), and the question just before "Answer:" keeps it close to where the answer starts.
    """

    task: ClassVar[str] = "qa"
    version: ClassVar[int] = 2
    stop: ClassVar[tuple[str, ...]] = ("\n",)

    @staticmethod
    def prompt(context: str, question: str) -> str:
        q = one_line(question)
        return f"Question: {q}\nContext: {one_line(context)}\nQuestion: {q}\nAnswer:"

    @staticmethod
    def target(answer: str) -> str:
        return " " + one_line(answer)

    @staticmethod
    def span_source(context: str) -> str:
        """The text an answer is copied from, as the prompt holds it (decoding is constrained to its spans)."""
        return " " + one_line(context)

    @staticmethod
    def reordered(context: str) -> str:
        """The context's sentences in reverse order, for the order check; "" when it has only one.

        A small model reads a text with a strong pull towards its last sentences: asked for Australia's capital
        after "Canberra is the capital city of Australia. Sydney is its largest city." it says Sydney, and with
        the two sentences swapped, Canberra. The order check reads the text both ways round and, when the
        two answers differ, keeps the one both readings like better (``pick``).
        """
        parts = sentences(one_line(context))
        return " ".join(reversed(parts)) if len(parts) > 1 else ""

    @staticmethod
    def same(first: Answer, second: Answer) -> bool:
        """Whether two answers say the same (case, punctuation and articles aside)."""
        def key(answer: Answer) -> str:
            return " ".join(_ARTICLES.sub(" ", re.sub(r"[^\w\s]", " ", answer.answer.lower())).split())

        return key(first) == key(second)

    @staticmethod
    def pick(first: Answer, second: Answer, forward: Sequence[float], backward: Sequence[float]) -> Answer:
        """The order check's choice between the answer read in the text's order (``first``) and the one read
        with its sentences reversed (``second``): ``forward`` and ``backward`` are each reading's probabilities
        of the two answers' first tokens (as ``classify`` gives them), and the answer with the larger product
        wins; a tie, or a second answer not quoted from the text, keeps the first."""
        if second.start is None:
            return first
        return second if forward[1] * backward[1] > forward[0] * backward[0] else first

    @staticmethod
    def result(output: str, context: str = "") -> Answer:
        """The first line of the output, located in the context (quoted as the context writes it)."""
        answer = output.strip().split("\n", 1)[0].strip()
        span = locate(answer, context)
        if span is None:
            return Answer(answer=answer, context_chars=len(context))
        return Answer(answer=context[span[0]:span[1]], context_chars=len(context), start=span[0], end=span[1])


# A sentence ends at . ! or ? followed by space and a capital, digit or opening quote/bracket ("U.S. Army"
# splits wrongly now and then, which only moves a fragment).
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\[])")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


def locate(quote: str, source: str) -> tuple[int, int] | None:
    """Where ``quote`` occurs in ``source`` ignoring case and spacing, preferring a whole-word occurrence."""
    if not quote.strip() or not source:
        return None
    spans = [m.span() for m in _spaced(quote, re.IGNORECASE).finditer(source)]
    return next((s for s in spans if _word_bounded(source, *s)), spans[0] if spans else None)


@dataclass(frozen=True)
class StoryFormat:
    """Stories from a theme ("a brave mouse") or from a first sentence the model continues."""

    task: ClassVar[str] = "story"
    version: ClassVar[int] = 1

    @staticmethod
    def is_opening(text: str) -> bool:
        """A first sentence to continue (it ends like a sentence) rather than a theme to write about."""
        return text.strip().endswith((".", "!", "?", '"', "”", "…"))

    @classmethod
    def prompt(cls, request: str = "") -> str:
        """Prompt ending where the model starts writing; an opening sentence is already part of it."""
        request = one_line(request)
        if not request:
            return "Write a short story.\nStory:"
        if cls.is_opening(request):
            return f"Write a short story.\nStory: {request}"
        return f"Write a short story about {request.rstrip('.')}.\nStory:"

    @classmethod
    def training_pair(cls, text: str, title: str | None = None) -> tuple[str, str]:
        """(prompt, target) for a story text: the whole story, or, when the title is the story's own
        opening sentence, the rest of it (the prompt already holds the opening, as in the bot)."""
        text = text.strip()
        request = one_line(title or "")
        if request and cls.is_opening(request) and text.startswith(request):
            return cls.prompt(request), " " + text[len(request):].strip()
        return cls.prompt(request), " " + text.strip()

    @staticmethod
    def result(request: str, output: str) -> Text:
        """The story as shown: an opening sentence the model continued is part of it."""
        request = one_line(request)
        if request and StoryFormat.is_opening(request):
            return Text(text=f"{request} {output.strip()}".strip())
        return Text(text=output.strip())


@dataclass(frozen=True)
class ChatFormat:
    """Plain chat through the base model's own chat template (rendered by the engine's tokenizer)."""

    task: ClassVar[str] = "chat"
    version: ClassVar[int] = 1

    @staticmethod
    def messages(system: str, history: list[tuple[str, str]], user: str) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": system}] if system else []
        msgs += [{"role": role, "content": content} for role, content in history]
        msgs.append({"role": "user", "content": user})
        return msgs


@dataclass(frozen=True)
class DomainFormat:
    """Continued pre-training: plain text in, continuation out (no instruction)."""

    task: ClassVar[str] = "domain"
    version: ClassVar[int] = 1

    @staticmethod
    def prompt(text: str) -> str:
        return text


FORMATS = {
    f.task: f for f in (SentimentFormat, NERFormat, QAFormat, StoryFormat, ChatFormat, DomainFormat)
}
CLASSIFIER_TASKS = frozenset({"sentiment"})
LABELLED_TASKS = frozenset({"sentiment", "ner"})


@dataclass(frozen=True)
class SkillInfo:
    name: str
    task: str
    summary: str
    usage: str


SKILLS: dict[str, SkillInfo] = {
    s.name: s
    for s in (
        SkillInfo("chat", "chat", "talk with the base model (no adapter)", "/chat <message>"),
        SkillInfo("sentiment", "sentiment", "positive / negative / neutral, with confidence", "/sentiment <text>"),
        SkillInfo("ner", "ner", "people, organisations, places, other names, with positions", "/ner <text>"),
        SkillInfo(
            "qa", "qa", "answer a question about a text",
            "/ask <question> | <text>   (or reply to a message / attach a .txt with /ask <question>)",
        ),
        SkillInfo("story", "story", "a short story from a theme or first sentence", "/story <theme or opening>"),
    )
}
