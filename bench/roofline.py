"""What this machine can do at best: its float32 matmul rate, and the time a forward pass needs at that rate.

A latency or throughput target can be out of reach of any implementation on a given CPU. To tell a slow
engine from a slow machine, the benchmarks divide the work a request needs (multiply-adds of the linear
layers, counted from the model's shape) by the fastest float32 matmul measured in the same process with
the same threads: the best of PyTorch's BLAS and lorabot's AVX2 kernel on a large, prefill-shaped product.
The result is a floor on latency (and a ceiling on tokens/s) for a float32 engine on this machine;
attention, norms and sampling come on top of it.
"""

from __future__ import annotations

import time
from typing import Any


def linear_params(config: Any) -> tuple[int, int]:
    """(multiply-adds per token in the transformer layers, in the output layer) of a Llama-shaped model."""
    d, ff, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    kv = config.num_key_value_heads * head_dim
    per_layer = d * q + 2 * d * kv + q * d + 3 * d * ff
    return layers * per_layer, d * config.vocab_size


def forward_flops(config: Any, prompt_tokens: int, logit_rows: int) -> float:
    """Floating-point operations of the linear layers for ``prompt_tokens`` positions, of which
    ``logit_rows`` go through the output layer (a classifier scores a few label tokens at one position:
    pass 0 and count them separately if they matter)."""
    layers, head = linear_params(config)
    return 2.0 * (layers * prompt_tokens + head * logit_rows)


def _best_seconds(fn: Any, repeats: int) -> float:
    fn()  # warm-up: thread pool, kernel build, page faults
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def matmul_peak_gflops(threads: int, m: int = 512, k: int = 576, n: int = 1536, repeats: int = 20) -> dict[str, Any]:
    """The fastest float32 ``x[m, k] @ w[n, k].T`` here, with ``threads`` threads: PyTorch (MKL/oneDNN)
    and lorabot's AVX2 kernel when it builds. The default shape is the bundled model's MLP up-projection
    over a 512-token prefill: large enough for both to run at their best."""
    import torch

    from bot.engine import kernels

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen)
    flops = 2.0 * m * k * n
    rates = {"torch": flops / _best_seconds(lambda: torch.nn.functional.linear(x, w), repeats) / 1e9}
    if kernels.load() is not None and kernels.usable(x, w):
        out = torch.empty(m, n)
        rates["kernel"] = flops / _best_seconds(lambda: kernels.linear(x, w, threads, out), repeats) / 1e9
    best = max(rates, key=lambda key: rates[key])
    return {"gflops": round(rates[best], 1), "by": best, "all": {key: round(v, 1) for key, v in rates.items()},
            "shape": [m, k, n], "threads": threads}


def least_seconds(base_dir: Any, positions: int, logit_rows: int, threads: int) -> dict[str, Any]:
    """The least time a float32 engine needs here for ``positions`` token positions of the model in
    ``base_dir`` (``logit_rows`` of them through the output layer), at this machine's best matmul rate."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_dir, local_files_only=True)
    flops = forward_flops(config, positions, logit_rows)
    peak = matmul_peak_gflops(threads)
    return {"seconds": flops / (peak["gflops"] * 1e9), "gflop": flops / 1e9, "matmul_peak": peak}
