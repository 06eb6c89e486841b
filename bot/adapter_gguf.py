"""An adapter folder as a GGUF LoRA file, for llama.cpp and Ollama users (``lorabot export-gguf``).

The file is what llama.cpp's own ``convert_lora_to_gguf.py`` writes for a PEFT LoRA: ``general.type =
adapter``, ``adapter.type = lora``, ``adapter.lora.alpha``, and per adapted weight a ``.lora_a`` [r, in] and a
``.lora_b`` [out, r] tensor under the base tensor's GGUF name (``blk.3.attn_q.weight.lora_a``). llama.cpp
stores Llama's query and key rows interleaved for its RoPE (the same permutation its converter applies to
the base weights), so ``lora_b`` of q_proj and k_proj is permuted the same way; A is unchanged. Only
plain LoRA on a Llama-shaped base is exported (scale alpha / r, as in PEFT); anything else is refused.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from bot.adapters import PEFT_CONFIG, WEIGHTS, validate_adapter
from bot.errors import AdapterError

GGUF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_PEFT_NAME = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(\w+\.\w+)\.lora_([AB])\.weight$")


@dataclass(frozen=True)
class Exported:
    path: Path
    tensors: int
    rank: int
    alpha: float
    bytes: int


def _permute_rows(weight, n_heads: int):  # type: ignore[no-untyped-def]
    """llama.cpp's row order for Llama q/k projections (convert_hf_to_gguf's LlamaModel.permute)."""
    return (weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def export_gguf(folder: Path, out: Path) -> Exported:
    """Write ``folder``'s LoRA as a GGUF adapter at ``out`` (atomically); raises AdapterError when it cannot."""
    import gguf
    import torch
    from safetensors.torch import load_file

    info = validate_adapter(folder)
    config = json.loads((folder / PEFT_CONFIG).read_text(encoding="utf-8"))
    for key in ("use_dora", "use_rslora"):
        if config.get(key):
            raise AdapterError(f"{PEFT_CONFIG}: {key} is set; llama.cpp's GGUF LoRA is plain LoRA only")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise AdapterError(f"{PEFT_CONFIG}: per-module ranks or alphas cannot be written as one GGUF alpha")
    shape = info.base_shape.split(":")
    if len(shape) != 7 or shape[0] != "llama":
        raise AdapterError(f"made for a {shape[0] or 'unknown'} base model; only Llama-shaped bases are exported")
    n_heads, n_kv = int(shape[3]), int(shape[4])
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in load_file(folder / WEIGHTS).items():
        found = _PEFT_NAME.match(name)
        if not found or found[2] not in GGUF_NAMES:
            raise AdapterError(f"{WEIGHTS}: {name} is not a LoRA weight of a Llama linear layer")
        pairs.setdefault((int(found[1]), found[2]), {})[found[3]] = tensor.float()
    alpha = float(config.get("lora_alpha", info.rank))
    tmp = out.with_name(f".{out.name}.part")
    writer = gguf.GGUFWriter(tmp, "llama")
    try:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(f"{info.base_model} {info.name} LoRA")
        count = 0
        for (layer, module), ab in sorted(pairs.items()):
            if set(ab) != {"A", "B"}:
                raise AdapterError(f"{WEIGHTS}: layer {layer} {module} has lora_{''.join(ab)} without its pair")
            a, b = ab["A"], ab["B"]
            if module == "self_attn.q_proj":
                b = _permute_rows(b, n_heads)
            elif module == "self_attn.k_proj":
                b = _permute_rows(b, n_kv)
            base = f"blk.{layer}.{GGUF_NAMES[module]}.weight"
            writer.add_tensor(f"{base}.lora_a", a.contiguous().numpy())
            writer.add_tensor(f"{base}.lora_b", b.contiguous().numpy())
            count += 2
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return Exported(path=out, tensors=count, rank=info.rank, alpha=alpha, bytes=out.stat().st_size)
