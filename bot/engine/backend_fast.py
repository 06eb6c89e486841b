"""The fast backend: ``FastLlama`` (batched multi-adapter LoRA, slot KV cache, CPU kernels) or its
torch-free twin ``NativeLlama`` (the same native step on numpy arrays), which share this interface.

The default for Llama-shaped models; greedy outputs equal the PEFT backend's token for token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bot.adapters import AdapterInfo
from bot.engine.backend import Backend, BatchState
from bot.engine.lora_stacks import Columns
from bot.engine.native_llama import NativeLlama
from bot.engine.slot_cache import SlotCache


@dataclass
class FastBatch(BatchState):
    slots: SlotCache      # every row keeps its keys/values from column 0 of its own slot


class FastBackend(Backend):
    name = "fast"

    def __init__(self, fast: Any):
        """``fast``: a ``FastLlama`` or a ``NativeLlama``."""
        self.fast = fast
        self.config = fast.config
        self.torch_free = isinstance(fast, NativeLlama)

    @classmethod
    def from_weights(cls, config: Any, weights: dict[str, Any], *, max_context: int,
                     cpu_kernel: bool, int8_activations: bool = False) -> FastBackend:
        from bot.engine.fast_llama import FastLlama

        return cls(FastLlama(config, weights, max_context=max_context, cpu_kernel=cpu_kernel,
                             int8_activations=int8_activations))

    @classmethod
    def from_model(cls, model: Any, *, max_context: int, cpu_kernel: bool,
                   int8_activations: bool = False) -> FastBackend:
        from bot.engine.fast_llama import FastLlama

        return cls(FastLlama.from_model(model, max_context=max_context, cpu_kernel=cpu_kernel,
                                        int8_activations=int8_activations))

    def attach(self, info: AdapterInfo) -> None:
        self.fast.add_adapter(info.name, info.path)

    def detach(self, name: str) -> None:
        self.fast.remove_adapter(name)

    def adapter_bytes(self, name: str) -> int:
        return self.fast.adapter_bytes(name)

    def score(self, prompts: Sequence[list[int]], adapters: Sequence[str | None],
              token_ids: Sequence[int]) -> Any:
        # Only these vocabulary columns are computed, not the whole head.
        return self.fast.prefill(list(prompts), list(adapters), Columns(list(token_ids)))

    def new_batch(self, max_rows: int, max_tokens: int = 0) -> FastBatch:
        return FastBatch(self.fast.new_cache(max_rows, max_tokens))

    def prefill(self, batch: BatchState, prompts: Sequence[list[int]],
                adapters: Sequence[str | None]) -> Any:
        assert isinstance(batch, FastBatch)
        # The new rows' keys/values go straight into free slots; they join the batch only on success.
        reservation = batch.slots.reserve(len(prompts), max(len(p) for p in prompts))
        logits = self.fast.prefill(list(prompts), list(adapters), reservation)
        batch.slots.commit(reservation)
        return logits

    def decode(self, batch: BatchState, tokens: Sequence[int], positions: Sequence[int],
               adapters: Sequence[str | None]) -> Any:
        assert isinstance(batch, FastBatch)
        return self.fast.decode(batch.slots, list(tokens), list(adapters))

    def retire(self, batch: BatchState, keep: list[int]) -> list[int]:
        assert isinstance(batch, FastBatch)
        # The last rows move into the freed slots; the rows follow the cache's new order.
        return batch.slots.retire(keep)
