"""The engine interface: what the core needs from "a base model with adapters attached".

The in-process implementation is ``bot.engine_local.LocalEngine`` (PEFT multi-adapter, micro-batched,
worker thread). The interface is deliberately small and text-in/text-out, so a remote
OpenAI-compatible server that serves the same adapters by name (vLLM ``--lora-modules``, LoRAX) can
replace it: ``classify`` maps to one completion token with logprobs, ``generate`` to a streamed
completion with ``model=<adapter name>``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from bot.adapters import AdapterInfo, AdapterProblem

TextSink = Callable[[str], Awaitable[None]]
"""Receives generated text deltas as they are produced (for streaming replies)."""


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0          # 0 = greedy (deterministic)
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()        # generation ends before the first of these strings
    seed: int | None = None


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str                # "stop" (EOS or stop string) | "length"


@dataclass(frozen=True)
class Classification:
    scores: dict[str, float]          # choice -> probability (softmax over the choices' first tokens)
    prompt_tokens: int


@runtime_checkable
class Engine(Protocol):
    base_model: str

    @property
    def adapters(self) -> dict[str, AdapterInfo]: ...

    @property
    def problems(self) -> list[AdapterProblem]: ...

    async def classify(self, prompt: str, choices: Sequence[str], adapter: str | None) -> Classification:
        """Probabilities of each choice's first token right after ``prompt`` (one forward pass)."""
        ...

    async def generate(
        self, prompt: str, params: SamplingParams, adapter: str | None, on_text: TextSink | None = None,
    ) -> Generation:
        """Generate a continuation of ``prompt``; ``on_text`` receives deltas while it runs."""
        ...

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """Render chat messages with the base model's chat template, ready for generation."""
        ...

    def count_tokens(self, text: str) -> int: ...

    async def reload_adapters(self) -> list[AdapterProblem]:
        """Re-scan the adapters folder, attach new/changed adapters, drop removed ones."""
        ...

    async def close(self) -> None: ...
