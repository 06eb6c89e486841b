"""What this installation's engine will actually use, found without loading the model (``lorabot doctor``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bot.config import Config


def _cpu_flags() -> list[str]:
    from bot.engine.kernels import cpu_flags

    have = cpu_flags() or set()
    return [f for f in ("avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "amx_tile") if f in have]


def _backend(config: Config, folder: Path) -> tuple[str, str]:
    """(backend, why) as ``LocalEngine.from_config`` would choose it."""
    from bot.engine.light_model import read_config, unsupported_config, unsupported_folder

    wanted = config.engine.backend
    if wanted == "peft":
        return "peft", "engine.backend = \"peft\" in the config"
    if wanted == "openai":
        key = config.engine.api_key_env
        where = f"key from ${key} ({'set' if os.environ.get(key) else 'NOT set'})" if key else "no key"
        return "openai", f"the model runs on {config.engine.base_url or '(engine.base_url is empty)'}, {where}"
    light = unsupported_folder(folder)
    if light is None:
        from bot.engine import kernels
        from bot.engine.native_llama import config_reason

        torch_free = config_reason(config) or (None if kernels.load() is not None else "no CPU kernel")
        how = ("without torch (numpy and the native step)" if torch_free is None
               else f"with torch ({torch_free})")
        return "fast", f"a Llama-shaped model: loaded without transformers, run {how}, batched multi-adapter LoRA"
    reason = unsupported_config(read_config(folder)) if (folder / "config.json").is_file() else light
    if reason is None:
        return "fast", f"loaded with transformers ({light})"
    if wanted == "fast":
        return "none", f"engine.backend = \"fast\" but the model is not supported: {reason}"
    return "peft", f"the fast backend cannot run this model: {reason}"


def _kv_cache(config: Config, folder: Path, dtype: Any) -> str:
    """The KV memory bound in words: the budget in tokens and what it takes for this model and dtype."""
    from bot.engine.light_model import read_config

    limits = config.engine
    row = f"{limits.max_row_tokens} tokens a request" if limits.max_row_tokens else "the model's context a request"
    budget = limits.kv_token_budget
    if not budget:
        return f"{row}; no total budget (engine.kv_token_budget = 0: max_batch full rows)"
    try:
        cfg = read_config(folder)
        heads = cfg.num_attention_heads
        per_token = cfg.num_hidden_layers * 2 * getattr(cfg, "num_key_value_heads", heads) * (
            getattr(cfg, "head_dim", None) or cfg.hidden_size // heads) * dtype.itemsize
        size = f" = {budget * per_token / 2**20:.0f} MB in {str(dtype).removeprefix('torch.')}"
    except Exception:  # a model folder without a readable config.json: the tokens alone still say it
        size = ""
    return f"{row}; {budget} tokens for all running requests together{size}"


def describe(config: Config) -> dict[str, Any]:
    """The engine's part of the doctor report (loads torch and builds the CPU kernel; not the model)."""
    import torch

    from bot import adapters as adapter_folders
    from bot.engine import kernels
    from bot.engine.loading import cache_dir, resolve_base, resolve_device, resolve_dtype

    out: dict[str, Any] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads() if not config.model.threads else config.model.threads,
        "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_flags": _cpu_flags(),
        "device": resolve_device(config.model.device),
        "cache_dir": str(cache_dir()),
    }
    dtype = resolve_dtype(config.model.dtype, out["device"])
    # The kernel multiplies float32 on the CPU only; with bfloat16 (CPUs with native bf16) torch does it all.
    wanted = config.engine.cpu_kernel and out["device"] == "cpu" and dtype == torch.float32
    status = kernels.status() if wanted else None
    out["kernel"] = {
        "used": bool(status and status.built),
        "reason": ("built" if status.built else status.reason) if status else
        ("engine.cpu_kernel = false" if not config.engine.cpu_kernel else f"not needed for {dtype} on {out['device']}"),
        "path": status.path if status else "", "compiler": status.compiler if status else "",
    }
    try:
        base = resolve_base(config.model.base, progress=False)
    except Exception as exc:
        out["model"] = {"spec": config.model.base, "problem": str(exc)}
        return out
    backend, why = _backend(config, base.path)
    quantized = bool(config.engine.quantized and base.gguf and status and status.built and backend == "fast")
    if quantized:
        weights = "quantised: Q4_1 layers and Q8_0 embeddings from the GGUF, expanded in the kernel"
    elif base.gguf is None:
        weights = "float: the model folder has no GGUF"
    elif status is None:
        name = str(dtype).removeprefix("torch.")
        weights = f"{name} copy of the converted model (the quantised weights need the float32 kernel)"
    elif not status.built:
        weights = f"float32 copy: the quantised weights need the CPU kernel ({kernels.COST})"
    else:
        weights = "float32 copy: engine.quantized is off"
    out["model"] = {"spec": config.model.base, "name": base.name, "path": str(base.path),
                    "gguf": str(base.gguf) if base.gguf else None}
    out["engine"] = {"backend": backend, "why": why, "dtype": str(dtype).removeprefix("torch."),
                     "weights": weights, "max_batch": config.engine.max_batch,
                     "decode_step": ("native: all layers in one call (LORABOT_PYTHON_STEP=1: the Python layers)"
                                     if status and status.built and backend == "fast" and
                                     not os.environ.get("LORABOT_PYTHON_STEP") else "the Python layers"),
                     "kv_cache": _kv_cache(config, base.path, dtype)}
    from bot.engine import base_signature

    try:
        name, shape = base_signature(config)
        found, problems = adapter_folders.scan_adapters(config.path(config.adapters.dir), base_model=name,
                                                        base_shape=shape)
        out["adapters"] = {
            "dir": str(config.path(config.adapters.dir)),
            "valid": {n: {"task": i.task, "format": i.format_version, "rank": i.rank} for n, i in found.items()},
            "problems": [str(p) for p in problems],
        }
    except Exception as exc:
        out["adapters"] = {"dir": str(config.path(config.adapters.dir)), "problems": [f"cannot scan: {exc}"]}
    return out
