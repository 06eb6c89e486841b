"""The native decode step (bot/engine/decode_step.c) against the Python layers it replaces."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bot.engine import kernels
from bot.engine.fast_llama import FastLlama
from bot.engine.light_model import load_light

pytestmark = pytest.mark.skipif(kernels.load() is None, reason="no AVX2 compiler/CPU: no native step")
SHIPPED = Path(__file__).resolve().parents[1] / "adapters"


def decode_both(model, adapters: dict[str, Path], prompts: list[list[int]], names: list[str | None],
                steps: int) -> list[list[tuple[torch.Tensor, list[int]]]]:
    """Greedy decoding of the same batch with the native step and with the Python layers (prefill and decode)."""
    runs = []
    for native in (True, False):
        fast = FastLlama(model.config, model.weights, native_step=native)
        assert (fast.native is not None) is native
        for name, path in adapters.items():
            fast.add_adapter(name, path)
        cache = fast.new_cache(len(prompts))
        res = cache.reserve(len(prompts), max(map(len, prompts)))
        logits = fast.prefill(prompts, names, res)
        cache.commit(res)
        out = []
        for _ in range(steps):
            tokens = logits.argmax(-1).tolist()
            logits = fast.decode(cache, tokens, names)
            out.append((logits, tokens))
        runs.append(out)
    return runs


def assert_same(runs: list, atol: float) -> None:
    for (a, ta), (b, tb) in zip(*runs, strict=True):
        assert ta == tb
        assert torch.allclose(a, b, atol=atol, rtol=1e-4), (a - b).abs().max()


@pytest.mark.parametrize("names", [[None], ["story"], [None, "qa", "story", "qa", "ner"]])
def test_the_native_step_decodes_as_the_python_layers_on_a_random_model(tiny_base: Path, tiny_adapters: Path,
                                                                        names: list) -> None:
    # Rank 4 on every projection: the q/k/v group stacks 12 LoRA rows (the scalar path), gate/up 8 (the kernel).
    model, tok = load_light(tiny_base, dtype="float32")
    adapters = {a: tiny_adapters / a for a in ("qa", "story", "ner")}
    texts = ["Hello there", "Once upon a time, in a forest far away", "Q", "Bonn is on the Rhine.", "Tell me"]
    prompts = [tok(t).input_ids for t in texts[:len(names)]]
    assert_same(decode_both(model, adapters, prompts, names, steps=20), atol=1e-3)


def test_the_native_prefill_writes_the_cache_and_scores_as_the_python_layers(tiny_base: Path,
                                                                             tiny_adapters: Path) -> None:
    from bot.engine.fast_llama import Columns

    model, tok = load_light(tiny_base, dtype="float32")
    first = [tok(t).input_ids for t in ("Hello there", "Once upon a time, in a forest far away")]
    later = [tok(t).input_ids for t in ("Q", "Bonn is on the Rhine.")]
    out = []
    for native in (True, False):
        fast = FastLlama(model.config, model.weights, native_step=native)
        for name in ("qa", "story"):
            fast.add_adapter(name, tiny_adapters / name)
        cache = fast.new_cache(4)
        logits = []
        for prompts, names in ((first, ["qa", None]), (later, ["story", "qa"])):   # the second pair at slots 2, 3
            res = cache.reserve(len(prompts), max(map(len, prompts)))
            logits.append(fast.prefill(prompts, names, res))
            cache.commit(res)
        scores = fast.prefill(first + later, ["story", None, "qa", "qa"], Columns([5, 17, 3]))
        out.append((cache, logits, scores))
    (cache_n, logits_n, scores_n), (cache_p, logits_p, scores_p) = out
    assert cache_n.lens == cache_p.lens == [len(p) for p in first + later]
    for slot, n in enumerate(cache_n.lens):   # columns past a row's length are masked, whatever they hold
        assert torch.allclose(cache_n.kv[:, slot, ..., :n, :], cache_p.kv[:, slot, ..., :n, :], atol=1e-4)
    for a, b in zip([*logits_n, scores_n], [*logits_p, scores_p], strict=True):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()
    assert scores_n.shape == (4, 3)


def test_the_native_step_decodes_as_the_python_layers_on_the_bundled_quantised_model(bundled_dir: Path) -> None:
    from bot.engine.loading import BUNDLED, resolve_base

    ref = resolve_base(BUNDLED, progress=False)
    model, tok = load_light(ref.path, dtype="float32", gguf=ref.gguf)
    assert isinstance(model.weights["model.layers.0.mlp.down_proj.weight"], kernels.QuantWeight)
    adapters = {a: SHIPPED / a for a in ("qa", "story")}
    prompts = [tok(t).input_ids for t in ("Context: Bonn is on the Rhine.\nQuestion: Where is Bonn?\nAnswer:",
                                          "Once upon a time", "Hello, how are you")]
    assert_same(decode_both(model, adapters, prompts[:1], [None], steps=12), atol=1e-3)
    assert_same(decode_both(model, adapters, prompts, ["qa", "story", None], steps=12), atol=1e-3)


def test_a_model_the_native_step_cannot_run_falls_back_to_the_python_layers(tiny_base: Path) -> None:
    model, _ = load_light(tiny_base, dtype="bfloat16")
    fast = FastLlama(model.config, model.weights)
    assert fast.native is None   # bfloat16: no kernel at all, so no native step either
    model, _ = load_light(tiny_base, dtype="float32")
    weights = dict(model.weights)
    name = "model.layers.1.mlp.up_proj.weight"
    weights[name] = weights[name].t().contiguous().t()   # column-major: not a layout the kernel streams
    from bot.engine.decode_native import NativeDecode

    fast = FastLlama(model.config, weights, native_step=False)
    assert "layer 1 up_proj" in NativeDecode(fast, kernels.load()).why_not


def test_int8_activations_stay_close_to_the_exact_path_and_are_off_by_default(bundled_dir: Path) -> None:
    from bot.config import EngineConfig
    from bot.engine.loading import BUNDLED, resolve_base

    assert EngineConfig().int8_activations is False
    ref = resolve_base(BUNDLED, progress=False)
    model, tok = load_light(ref.path, dtype="float32", gguf=ref.gguf)
    story = tok.apply_chat_template([{"role": "user", "content": "Write a short story about a fox who wanted to fly."}],
                                    tokenize=False, add_generation_prompt=True)
    cases = [("qa", "Context: Bonn is on the Rhine.\nQuestion: Where is Bonn?\nAnswer:", 2),   # " Rhine", end
             ("story", story, 16)]
    gaps = []
    for adapter, text, steps in cases:
        prompt = tok(text).input_ids
        runs = []
        for int8 in (False, True):
            fast = FastLlama(model.config, model.weights, int8_activations=int8)
            fast.add_adapter(adapter, SHIPPED / adapter)
            cache = fast.new_cache(1)
            res = cache.reserve(1, len(prompt))
            logits = fast.prefill([prompt], [adapter], res)   # prefill is exact either way
            cache.commit(res)
            tokens, out = [], []
            for _ in range(steps):
                tokens.append(logits.argmax(-1).tolist())
                logits = fast.decode(cache, tokens[-1], [adapter])
                out.append(logits)
            runs.append((tokens, out))
        (exact_tokens, exact), (int8_tokens, approx) = runs
        assert int8_tokens == exact_tokens          # the same answer on these prompts
        # Approximate, not the exact path (Q4_1's offset term cancels much of d * sum(x * q), so the rounding
        # of x shows more than its 1/254), but the next-token distributions stay close.
        assert any(not torch.equal(a, b) for a, b in zip(exact, approx, strict=True))
        gaps += [(a.softmax(-1) - b.softmax(-1)).abs().max().item() for a, b in zip(exact, approx, strict=True)]
    # Where the next token is a near tie the rounding moves a few hundredths of probability between the
    # two (measured up to 0.05 on the story); on average it moves far less.
    assert max(gaps) < 0.15 and sum(gaps) / len(gaps) < 0.03, gaps
