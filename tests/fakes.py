"""A deterministic engine implementing bot.engine.Engine, for core and transport tests (like llm's MockModel).

It is installed exactly where the real engine goes (``Core(config, engine, store)``), records every
request, and answers from simple rules so tests can assert on exact replies.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bot.adapters import AdapterInfo, AdapterProblem
from bot.engine import Classification, Generation, SamplingParams, TextSink
from bot.errors import EngineError
from bot.skills import NERFormat, SentimentFormat


def fake_adapter(name: str, task: str, labels: tuple[str, ...] = ()) -> AdapterInfo:
    return AdapterInfo(
        name=name, path=Path(f"/fake/{name}"), task=task, format_version=1, labels=labels, base_model="fake",
        base_shape="fake", rank=4, target_modules=("q_proj",),
    )


DEFAULT_ADAPTERS = {
    "sentiment": fake_adapter("sentiment", "sentiment", SentimentFormat.default_labels),
    "ner": fake_adapter("ner", "ner", NERFormat.default_labels),
    "qa": fake_adapter("qa", "qa"),
    "story": fake_adapter("story", "story"),
}


@dataclass
class FakeEngine:
    base_model: str = "fake-base"
    installed: dict[str, AdapterInfo] = field(default_factory=lambda: dict(DEFAULT_ADAPTERS))
    calls: list[tuple[str, str, str | None]] = field(default_factory=list)  # (kind, prompt, adapter)
    fail_on: str | None = None        # a prompt containing this text raises EngineError
    story_words: int = 12
    delay: float = 0.0                # seconds per generated word (to test streaming/concurrency)
    closed: bool = False

    @property
    def adapters(self) -> dict[str, AdapterInfo]:
        return dict(self.installed)

    @property
    def problems(self) -> list[AdapterProblem]:
        return []

    def _check(self, prompt: str, adapter: str | None) -> None:
        if adapter is not None and adapter not in self.installed:
            raise EngineError(f"adapter {adapter!r} is not loaded")
        if self.fail_on and self.fail_on in prompt:
            raise EngineError("injected failure")

    async def classify(self, prompt: str, choices: Sequence[str], adapter: str | None) -> Classification:
        self.calls.append(("classify", prompt, adapter))
        self._check(prompt, adapter)
        text = prompt.lower()
        if adapter is None:  # the "bare base model" is unsure
            scores = [1.0 / len(choices)] * len(choices)
        else:
            want = "positive" if any(w in text for w in ("love", "great", "good")) else (
                "negative" if any(w in text for w in ("hate", "awful", "bad")) else "neutral")
            scores = [0.9 if c.strip() == want else 0.1 / (len(choices) - 1) for c in choices]
        return Classification(scores=dict(zip(choices, scores, strict=True)), prompt_tokens=len(prompt.split()))

    async def generate(
        self, prompt: str, params: SamplingParams, adapter: str | None, on_text: TextSink | None = None,
    ) -> Generation:
        self.calls.append(("generate", prompt, adapter))
        self._check(prompt, adapter)
        if prompt.startswith("Sentence:"):
            sentence = prompt.split("\n", 1)[0][len("Sentence: "):]
            words = [w.strip(".,!?") for w in sentence.split()]
            caps = [w for w in words[1:] if w[:1].isupper()]
            out = " " + ("; ".join(f"{w} (PER)" for w in caps) if caps and adapter else "none")
        elif "\nContext: " in prompt:
            context = prompt.split("\nContext: ", 1)[1].split("\n", 1)[0]
            out = " " + (context.split()[-1].strip(".") if adapter else "I do not know")
        elif "Story:" in prompt:
            out = " " + " ".join(f"word{i}" for i in range(min(self.story_words, params.max_new_tokens)))
        else:
            out = f" echo: {prompt.splitlines()[-2] if len(prompt.splitlines()) > 1 else prompt}"
        pieces = out.split(" ")
        text = ""
        for i, piece in enumerate(pieces):
            delta = piece if i == 0 else " " + piece
            text += delta
            if on_text and delta:
                await on_text(delta)
            if self.delay:
                await asyncio.sleep(self.delay)
        return Generation(
            text=text, prompt_tokens=len(prompt.split()), completion_tokens=len(pieces), finish_reason="stop",
        )

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    async def reload_adapters(self) -> list[AdapterProblem]:
        return []

    async def close(self) -> None:
        self.closed = True
