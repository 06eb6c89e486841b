"""Randomly initialised models and adapters, built locally (no download).

Used by the tests (a tiny Llama), the GPU check (the SmolLM2-135M shape, whose real weights cannot
travel) and benchmarks. The tokenizer is the real one, copied from the bundled model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from bot.adapters import MANIFEST, manifest_dict, shape_signature

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64),
}


def copy_tokenizer(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def save_random_llama(out: Path, tokenizer_dir: Path, *, shape: str = "tiny", seed: int = 0) -> Path:
    """Write a randomly initialised Llama of ``shape`` with the tokenizer from ``tokenizer_dir``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tok), max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        **SHAPES[shape],
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Larger-than-default init so that a tiny random model's next-token distribution is peaked
    # (greedy outputs are then stable across batch layouts, which the tests compare).
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0, 1.0)
    config._name_or_path = f"random-{shape}"
    model.save_pretrained(out, safe_serialization=True)
    copy_tokenizer(tokenizer_dir, out)
    return out


def save_random_adapter(
    base_dir: Path, out: Path, *, task: str, labels: tuple[str, ...] = (), rank: int = 4, seed: int = 1,
    base_name: str | None = None, scale: float = 0.5, target_modules: tuple[str, ...] = (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
) -> Path:
    """A PEFT LoRA adapter with random (non-zero) weights and a lorabot manifest."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, use_safetensors=True)
    peft_model = get_peft_model(
        base, LoraConfig(r=rank, lora_alpha=rank * 2, target_modules=list(target_modules), lora_dropout=0.0),
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out, safe_serialization=True)
    config = AutoConfig.from_pretrained(base_dir)
    manifest = manifest_dict(
        name=out.name, task=task, labels=labels, base_model=base_name or base_dir.name,
        base_shape=shape_signature(config), description=f"random {task} adapter for tests",
    )
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    (out / "README.md").write_text(f"# {out.name}\n\nRandom weights, for tests only.\n", encoding="utf-8")
    return out
