"""The reference backend: transformers + PEFT, one adapter per row through PEFT's ``adapter_names``.

Slower than the fast backend (PEFT runs one small forward per adapter present in the batch, in every
layer), but it runs any causal LM transformers can load, and the fast backend is checked against it
token for token. The running batch is left-padded: a transformers ``DynamicCache`` and its mask.
Everything that touches the model or its cache runs under ``torch.inference_mode``: the scheduler
knows nothing of torch, so no one else turns autograd off.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from bot.adapters import AdapterInfo
from bot.engine.backend import Backend, BatchState

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch


@dataclass
class PeftBatch(BatchState):
    cache: Any = None                    # transformers.DynamicCache of every running row
    mask: torch.Tensor | None = None     # [rows, columns] 1 where a column holds a real token


class PeftBackend(Backend):
    name = "peft"

    def __init__(self, model: Any, pad_token_id: int | None):
        self._model = model              # the plain transformers model, or a PeftModel around it
        self.config = model.config
        self._pad = pad_token_id if pad_token_id is not None else 0
        self._attached: set[str] = set()
        self.device = next(model.parameters()).device

    # ----------------------------------------------------------------- adapters
    def attach(self, info: AdapterInfo) -> None:
        from peft import PeftModel

        with warnings.catch_warnings():
            # PEFT still calls a transformers helper deprecated in v5; the warning says nothing to users.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            if isinstance(self._model, PeftModel):
                self._model.load_adapter(str(info.path), adapter_name=info.name, is_trainable=False)
            else:
                self._model = PeftModel.from_pretrained(
                    self._model, str(info.path), adapter_name=info.name, is_trainable=False,
                )
        self._model.eval()
        self._attached.add(info.name)

    def detach(self, name: str) -> None:
        self._model.delete_adapter(name)
        self._attached.discard(name)

    def _adapter_kwargs(self, adapters: Sequence[str | None]) -> dict[str, Any]:
        if not self._attached:
            return {}
        return {"adapter_names": [a if a is not None else BASE for a in adapters]}

    # ----------------------------------------------------------------- computing
    def _left_pad(self, seqs: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self._pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return ids.to(self.device), mask.to(self.device), positions.to(self.device)

    def _forward_last(self, prompts: Sequence[list[int]], adapters: Sequence[str | None],
                      cache: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask, positions = self._left_pad(prompts)
        out = self._model(
            input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
            use_cache=cache is not None, logits_to_keep=1, **self._adapter_kwargs(adapters),
        )
        return out.logits[:, -1, :], mask

    @torch.inference_mode()
    def score(self, prompts: Sequence[list[int]], adapters: Sequence[str | None],
              token_ids: Sequence[int]) -> torch.Tensor:
        logits, _ = self._forward_last(prompts, adapters)
        return logits[:, list(token_ids)]

    def new_batch(self, max_rows: int, max_tokens: int = 0) -> PeftBatch:
        # transformers' cache is sized by the rows it holds (rows x widest): the scheduler's admission
        # keeps that within max_tokens.
        return PeftBatch()

    @torch.inference_mode()
    def prefill(self, batch: BatchState, prompts: Sequence[list[int]],
                adapters: Sequence[str | None]) -> torch.Tensor:
        assert isinstance(batch, PeftBatch)
        from transformers import DynamicCache

        base = getattr(self._model, "base_model", self._model)
        cache = DynamicCache(config=base.config)
        logits, mask = self._forward_last(prompts, adapters, cache)
        self._merge(batch, cache, mask)   # only once the forward pass worked: a failure leaves the batch as it was
        return logits

    @staticmethod
    def _merge(batch: PeftBatch, cache: Any, mask: torch.Tensor) -> None:
        """Append a freshly prefilled cache (and its mask) to the running batch, left-padding the shorter."""
        if batch.cache is None or batch.mask is None:
            batch.cache, batch.mask = cache, mask
            return
        width = max(batch.mask.shape[1], mask.shape[1])

        def pad(t: torch.Tensor, extra: int, dim: int) -> torch.Tensor:
            if extra == 0:
                return t
            shape = list(t.shape)
            shape[dim] = extra
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        for old_layer, new_layer in zip(batch.cache.layers, cache.layers, strict=True):
            for attr in ("keys", "values"):
                a, b = getattr(old_layer, attr), getattr(new_layer, attr)
                setattr(old_layer, attr, torch.cat(
                    [pad(a, width - a.shape[-2], -2), pad(b, width - b.shape[-2], -2)], dim=0,
                ))
        batch.mask = torch.cat(
            [pad(batch.mask, width - batch.mask.shape[1], 1), pad(mask, width - mask.shape[1], 1)], dim=0,
        )

    @torch.inference_mode()
    def decode(self, batch: BatchState, tokens: Sequence[int], positions: Sequence[int],
               adapters: Sequence[str | None]) -> torch.Tensor:
        assert isinstance(batch, PeftBatch) and batch.mask is not None
        n = len(tokens)
        ids = torch.tensor([[t] for t in tokens], device=self.device)
        pos = torch.tensor([[p] for p in positions], device=self.device)
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((n, 1))], dim=1)
        return self._model(
            input_ids=ids, attention_mask=batch.mask, position_ids=pos, cache=batch.cache,
            use_cache=True, **self._adapter_kwargs(adapters),
        ).logits[:, -1, :]

    @torch.inference_mode()
    def retire(self, batch: BatchState, keep: list[int]) -> list[int]:
        assert isinstance(batch, PeftBatch) and batch.mask is not None
        index = torch.tensor(keep, device=self.device)
        batch.cache.batch_select_indices(index)
        batch.mask = batch.mask[index]
        # Columns that are padding in every remaining row are dead weight for attention.
        first = int(batch.mask.any(0).long().argmax())
        if first > 0:
            batch.mask = batch.mask[:, first:]
            for layer in batch.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
        return keep
