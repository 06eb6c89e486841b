"""The bundled GGUF's Q4_1 weights used as they are: the same values, the same sums, the same answers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bot.engine import kernels
from bot.engine.gguf import GGUFError, quantized_weights, read_tensor_table
from bot.engine.kernels import Q41Weight, Q80Weight, QuantWeight
from bot.engine.light_model import load_light
from bot.engine.loading import BUNDLED, resolve_base

pytestmark = pytest.mark.skipif(kernels.load() is None, reason="no AVX2 compiler/CPU: float weights only")


def random_blocks(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (n, k // 32, 20), dtype=torch.uint8, generator=g)
    scales = (torch.rand((n, k // 32, 2), generator=g) * 0.2 - 0.1).to(torch.float16)
    blocks[:, :, :4] = scales.view(torch.uint8).view(n, k // 32, 4)
    return blocks.view(n, k // 32 * 20)


def reference_dequant(blocks: torch.Tensor, k: int) -> torch.Tensor:
    """GGUF's Q4_1 definition: fp16 d and m, then 16 bytes of nibbles (low: weights 0-15, high: 16-31)."""
    b = blocks.view(blocks.shape[0], k // 32, 20)
    d = b[:, :, 0:2].contiguous().view(torch.float16).float()
    m = b[:, :, 2:4].contiguous().view(torch.float16).float()
    qs = b[:, :, 4:].int()
    q = torch.cat([qs & 0x0F, qs >> 4], dim=2).float()
    return (d * q + m).reshape(blocks.shape[0], k)


def random_q80(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (n, k // 32, 34), dtype=torch.uint8, generator=g)
    blocks[:, :, :2] = (torch.rand((n, k // 32, 1), generator=g) * 0.02).to(torch.float16).view(torch.uint8)
    return blocks.view(n, k // 32 * 34)


def reference_q80(blocks: torch.Tensor, k: int) -> torch.Tensor:
    b = blocks.view(blocks.shape[0], k // 32, 34)
    d = b[:, :, 0:2].contiguous().view(torch.float16).float()
    return (d * b[:, :, 2:].contiguous().view(torch.int8).float()).reshape(blocks.shape[0], k)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 7, 16, 65])
@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
def test_quantised_matmul_equals_the_float_kernel_on_the_same_values(m: int, kind: str) -> None:
    n, k = 37, 96  # a ragged last group of output rows
    if kind == "q4_1":
        w: QuantWeight = Q41Weight(random_blocks(n, k), k)
        reference = reference_dequant(w.blocks, k)
    else:
        w = Q80Weight(random_q80(n, k), k)
        reference = reference_q80(w.blocks, k)
    dense = w.dequantize()
    assert torch.equal(dense, reference)
    rows = torch.tensor([5, 0, 36, 5])
    assert torch.equal(w.dequantize(rows), reference[rows])
    x = torch.randn(m, k)
    assert torch.equal(kernels.linear_quant(x, w, 2), kernels.linear(x, dense, 2))
    into_q = torch.randn(m, n)
    into_f = into_q.clone()
    kernels.linear_quant(x, w, 1, out=into_q)
    kernels.linear(x, dense, 1, out=into_f)
    assert torch.equal(into_q, into_f)
    assert torch.allclose(kernels.linear_quant(x, w, 1), x @ dense.T, atol=1e-4)


def test_a_file_that_is_not_gguf_is_refused_and_the_loader_keeps_float_weights(tiny_base: Path,
                                                                              tmp_path: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGML" + b"\0" * 64)
    with pytest.raises(GGUFError, match="not a GGUF"):
        read_tensor_table(bad)
    bad.write_bytes(b"GGUF\x03\0\0\0" + b"\x01")
    with pytest.raises(GGUFError, match="truncated"):
        read_tensor_table(bad)
    model, _ = load_light(tiny_base, dtype="float32", gguf=bad)
    assert not any(isinstance(w, QuantWeight) for w in model.weights.values())


@pytest.fixture(scope="module")
def bundled() -> tuple:
    ref = resolve_base(BUNDLED, progress=False)
    assert ref.gguf is not None
    return ref, load_light(ref.path, dtype="float32"), load_light(ref.path, dtype="float32", gguf=ref.gguf)


def test_every_bundled_linear_weight_is_the_converted_copy_bit_for_bit(bundled: tuple) -> None:
    ref, (dense, _), _ = bundled
    found = quantized_weights(ref.gguf, dense.config)
    assert len(found) == 7 * dense.config.num_hidden_layers + 1  # + the Q8_0 embeddings (tied output layer)
    assert isinstance(found["model.embed_tokens.weight"], Q80Weight)
    for name, weight in found.items():
        assert torch.equal(torch.from_numpy(weight.dequantize()), dense.weights[name]), name


def test_the_quantised_engine_answers_exactly_like_the_float_one(bundled: tuple) -> None:
    from bot.engine.fast_llama import Columns, FastLlama

    _, (dense, tok), (quant, _) = bundled
    assert sum(isinstance(w, QuantWeight) for w in quant.weights.values()) == 7 * quant.config.num_hidden_layers + 1
    engines = [FastLlama(m.config, m.weights) for m in (dense, quant)]
    adapters = Path(__file__).resolve().parents[1] / "adapters"
    for fast in engines:
        fast.add_adapter("qa", adapters / "qa")
    prompts = [tok("Text: a fine, warm film\nSentiment:").input_ids,
               tok("Context: Bonn is on the Rhine.\nQuestion: Where is Bonn?\nAnswer:").input_ids]
    names = [None, "qa"]
    runs = []
    for fast in engines:
        cache = fast.new_cache(2)
        res = cache.reserve(2, max(map(len, prompts)))
        logits = fast.prefill(prompts, names, res)
        cache.commit(res)
        steps = [logits]
        for _ in range(12):
            steps.append(fast.decode(cache, steps[-1].argmax(-1).tolist(), names))
        runs.append(steps)
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)
    # Classification reads a few rows of the (quantised) output layer: the same rows, the same scores.
    labels = Columns([tok(" negative").input_ids[0], tok(" positive").input_ids[0]])
    a, b = (fast.prefill(prompts[:1], [None], labels) for fast in engines)
    assert torch.equal(a, b)
