"""The engine: "a base model with adapters attached", as the rest of the bot sees it.

This module is the whole interface: ``Engine`` (the protocol the core calls), its value types, and the
functions that build one or describe what one would use. Nothing else in ``bot`` imports the engine's
insides, and importing this module does not import torch.

Inside the package, one job per module:

* ``scheduler``: ``LocalEngine``, the in-process engine: request queue, one worker thread, continuous
  batching with a different adapter per row, sampling, stop strings, streaming, fault isolation;
* ``backend``: what a backend must provide to the scheduler (prefill, decode, retire, attach/detach);
* ``backend_fast`` over ``fast_llama`` (batched multi-adapter LoRA, slot KV cache) and ``kernels``
  (``kernels.c``: the AVX2 small-batch and Q4_1/Q8_0 matmuls, built on first use);
* ``backend_peft``: transformers + PEFT, the reference the fast backend is checked against;
* ``sampling``: temperature, top-p and repetition penalty over a batch of logits; ``token_scores``:
  ``logit_bias`` and generated tokens' log-probabilities, the same for every backend;
* ``remote``: ``RemoteEngine``, this interface over an OpenAI-compatible server serving the adapters by
  name (``[engine] backend = "openai"``: vLLM, another machine's ``lorabot serve``);
* ``loading`` (which base model, where, converted once from the bundled GGUF; transformers loading)
  and ``light_model`` (loading without transformers);
* ``weights`` (memory-mapped safetensors) and ``gguf`` (the GGUF's quantised blocks): the readers.

The interface is deliberately small and text-in/text-out, so a remote
OpenAI-compatible server that serves the same adapters by name (vLLM ``--lora-modules``, ``lorabot
serve``) replaces it (``remote``): ``classify`` maps to one completion token with logprobs, ``generate``
to a streamed completion with ``model=<adapter name>``. An engine may also offer ``stats()`` (queue
depth, running rows, decode steps by batch size), which ``lorabot serve``'s ``/metrics`` reads.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from bot.adapters import AdapterInfo, AdapterProblem

if TYPE_CHECKING:
    from bot.config import Config

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
    # (token id, bias) pairs added to the logits before every choice (OpenAI's logit_bias; -100 bans a token).
    logit_bias: tuple[tuple[int, float], ...] = ()
    # None: no log-probabilities; k >= 0: each generated token's log-probability and its k likeliest
    # alternatives, computed after logit_bias and before temperature, top-p and repetition penalty.
    logprobs: int | None = None
    # Non-empty: the reply must be a span of this text, token for token (extractive QA; bot.span_constraint).
    span_of: str = ""


@dataclass(frozen=True)
class TokenLogprob:
    token: str                        # the token's text as the tokenizer decodes it alone
    logprob: float
    top: tuple[tuple[str, float], ...] = ()   # the likeliest tokens at this position, most likely first


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str                # "stop" (EOS or stop string) | "length"
    logprobs: tuple[TokenLogprob, ...] | None = None   # one per generated token when params.logprobs is set


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


def load_engine(config: Config, *, progress: bool = True) -> Engine:
    """The engine for ``config`` (blocking: run it off the event loop): in-process, loading the model, or
    with ``[engine] backend = "openai"`` a remote OpenAI-compatible server (``bot.engine.remote``)."""
    if config.engine.backend == "openai":
        from bot.engine.remote import RemoteEngine

        return RemoteEngine.from_config(config, progress=progress)
    from bot.engine.scheduler import LocalEngine

    return LocalEngine.from_config(config, progress=progress)


def base_signature(config: Config) -> tuple[str, str]:
    """(name, shape signature) of the configured base model: what adapters are checked against."""
    from transformers import AutoConfig

    from bot.adapters import shape_signature
    from bot.engine.loading import resolve_base

    base = resolve_base(config.model.base)
    return base.name, shape_signature(AutoConfig.from_pretrained(base.path, local_files_only=True))


def describe(config: Config) -> dict[str, object]:
    """What the engine would use here (backend and why, kernel, weights, model, adapters), without loading it."""
    from bot.engine.report import describe as engine_report

    return engine_report(config)
