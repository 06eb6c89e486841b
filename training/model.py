"""The base model with LoRA attached, the loss computed only where it is needed, and adapter I/O."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bot.adapters import AdapterInfo
from bot.engine.loading import BaseModelRef, load_model, resolve_base
from bot.errors import AdapterError
from training.batching import IGNORE
from training.config import LoraSettings


def load_base(spec: str, *, dtype: str = "float32", device: str = "cpu") -> tuple[Any, Any, BaseModelRef]:
    """(model, tokenizer, ref) for a base-model spec ("bundled", a folder or a cached HF id)."""
    ref = resolve_base(spec)
    model, tok = load_model(ref.path, dtype=dtype, device=device)
    return model, tok, ref


def add_lora(model: Any, lora: LoraSettings) -> Any:
    """Plain LoRA on the named linear layers (no modules_to_save: loadable by PEFT, vLLM and LoRAX)."""
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    missing = sorted(set(lora.target_modules) - present)
    if missing:
        raise AdapterError(f"lora.target_modules {missing} are not linear layers of this model "
                           f"(it has: {', '.join(sorted(present))})")
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def init_from_adapter(peft_model: Any, folder: Path, *, task: str, lora: LoraSettings,
                      base_shape: str) -> AdapterInfo:
    """Start from an existing adapter's LoRA weights (continued fine-tuning) instead of a fresh LoRA.

    The adapter must be one this run could have written: same task and prompt format, same base model
    shape and the same LoRA rank, alpha and target modules (the optimizer state starts fresh). Returns
    what ``validate_adapter`` read of it (its metrics.json included).
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from bot.adapters import PEFT_CONFIG, WEIGHTS, validate_adapter

    where = f"train.init_adapter {str(folder)!r}"
    try:
        info = validate_adapter(folder, base_model="this run's base model", base_shape=base_shape)
    except AdapterError as exc:
        raise AdapterError(f"{where}: {exc}") from None
    peft_config = json.loads((folder / PEFT_CONFIG).read_text(encoding="utf-8"))
    mismatched = [f"{name} {theirs!r} (this run: {ours!r})" for name, theirs, ours in (
        ("task", info.task, task), ("lora.r", info.rank, lora.r),
        ("lora.alpha", peft_config.get("lora_alpha"), lora.alpha),
        ("lora.target_modules", sorted(info.target_modules), sorted(lora.target_modules)),
    ) if theirs != ours]
    if mismatched:
        raise AdapterError(f"{where} does not match this run: {'; '.join(mismatched)}")
    state = load_file(str(folder / WEIGHTS))
    dtype = next(p.dtype for p in peft_model.parameters() if p.requires_grad)
    result = set_peft_model_state_dict(peft_model, {k: v.to(dtype) for k, v in state.items()})
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise AdapterError(f"{where}: its weights do not fit this model (missing {missing[:2]}, "
                           f"unexpected {list(result.unexpected_keys)[:2]})")
    return info


def load_adapter(model: Any, folder: Path) -> Any:
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(folder), is_trainable=False)


def save_adapter(peft_model: Any, folder: Path, *, base_name: str) -> None:
    """adapter_config.json + adapter_model.safetensors with bfloat16 weights (half the size of fp32)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(peft_model)
    save_file({k: v.detach().to(torch.bfloat16).contiguous().cpu() for k, v in state.items()},
              str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = peft_model.peft_config["default"]
    config.base_model_name_or_path = base_name
    config.save_pretrained(str(folder))
    # PEFT writes target_modules as a set (random order); sort it so the file is reproducible.
    path = folder / "adapter_config.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data.get("target_modules"), list):
        data["target_modules"] = sorted(data["target_modules"])
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


class LossModel(nn.Module):
    """Wraps the (PEFT) causal LM and returns a summed loss, computing vocabulary logits only where needed.

    The 49k-token head is the most expensive matmul per position, so hidden states are gathered first:
    answer positions only (generation tasks), or the last prompt position against the labels' first
    tokens only (sentiment: the same softmax the bot computes). Data-parallel wrappers wrap this module,
    so its forward must be the one called in training.
    """

    def __init__(self, model: Any, label_ids: Sequence[int] = ()):
        super().__init__()
        self.model = model
        self.register_buffer("label_ids", torch.tensor(list(label_ids), dtype=torch.long), persistent=False)

    def _parts(self) -> tuple[Any, Any]:
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return base.get_decoder(), base.get_output_embeddings()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, targets: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed loss, logits): logits are [batch, labels] (sentiment) or [answer tokens, vocab]."""
        decoder, head = self._parts()
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        if labels is not None:
            last = attention_mask.sum(dim=1) - 1   # right padding: the last real token
            h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
            logits = F.linear(h, head.weight[self.label_ids.to(head.weight.device)])
            return F.cross_entropy(logits.float(), labels, reduction="sum"), logits
        assert targets is not None
        keep = targets != IGNORE
        logits = head(hidden[keep])
        return F.cross_entropy(logits.float(), targets[keep], reduction="sum"), logits


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        raise AdapterError("the checkpoint's LoRA weights do not match this configuration (rank or target "
                           "modules changed?); start a fresh run")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])
