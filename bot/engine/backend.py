"""What a backend must provide to the scheduler (``bot.engine.scheduler.LocalEngine``).

The scheduler owns the requests: the queue, continuous batching, sampling, stop strings, streaming,
cancellation and fault isolation. A backend owns the model: it turns token ids into logits for a batch
whose rows may each use a different adapter, and keeps the running batch's key/value state in a type of
its own. Everything is called from the scheduler's one worker thread, so a backend needs no locks.

Logits come back as an array [n, V]: a numpy array, or a torch tensor (on any device, any float dtype)
that the scheduler converts to numpy (``bot.engine.token_scores.as_array``); the scheduler never
imports torch. A backend that runs torch turns autograd off itself (``torch.inference_mode``).

Contract for failure: when ``prefill`` raises, the batch it was given is unchanged (the scheduler then
retries the requests one by one, so one bad request fails alone).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from bot.adapters import AdapterInfo


class BatchState:
    """The running batch's model state (its KV cache); each backend subclasses it."""


class Backend(ABC):
    """A base model with LoRA adapters attached, computing logits for mixed-adapter batches."""

    name: str = ""
    config: Any = None      # the base model's config (shape, context length, end-of-sequence ids)

    # ----------------------------------------------------------------- adapters
    @abstractmethod
    def attach(self, info: AdapterInfo) -> None:
        """Load an adapter folder under ``info.name`` (raises on a broken folder; nothing half-attached)."""

    @abstractmethod
    def detach(self, name: str) -> None:
        """Drop an attached adapter."""

    def adapter_bytes(self, name: str) -> int:
        """Memory the adapter's weights take in this backend (0 when the backend cannot tell)."""
        return 0

    # ----------------------------------------------------------------- computing
    @abstractmethod
    def score(self, prompts: Sequence[list[int]], adapters: Sequence[str | None],
              token_ids: Sequence[int]) -> Any:
        """Logits of ``token_ids`` right after each prompt: an array [len(prompts), len(token_ids)]."""

    @abstractmethod
    def new_batch(self, max_rows: int, max_tokens: int = 0) -> BatchState:
        """An empty running batch for up to ``max_rows`` rows whose cache holds at most ``max_tokens``
        positions in all (rows x columns; 0 = no bound). The scheduler admits rows so that it fits."""

    @abstractmethod
    def prefill(self, batch: BatchState, prompts: Sequence[list[int]], adapters: Sequence[str | None]) -> Any:
        """Append the prompts as new rows at the end of ``batch``; logits at each one's last position: an
        array [n, V]."""

    @abstractmethod
    def decode(self, batch: BatchState, tokens: Sequence[int], positions: Sequence[int],
               adapters: Sequence[str | None]) -> Any:
        """One step: token i (at position id ``positions[i]``) goes to row i; logits: an array [rows, V]."""

    @abstractmethod
    def retire(self, batch: BatchState, keep: list[int]) -> list[int]:
        """Keep only rows ``keep`` (at least one); returns the old index of each row in its new order."""
