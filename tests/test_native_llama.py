"""The torch-free engine (bot/engine/native_llama.py) against FastLlama, and the bot serving without torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bot.engine import kernels
from bot.engine.fast_llama import Columns, FastLlama
from bot.engine.light_model import load_light
from bot.engine.native_llama import NativeLlama, NativeUnsupported, config_reason, load

pytestmark = pytest.mark.skipif(kernels.load() is None, reason="no AVX2 compiler/CPU: no native step")
ROOT = Path(__file__).resolve().parents[1]


def greedy(fast, adapters: dict[str, Path], prompts: list[list[int]], names: list[str | None], steps: int,
           finished_after: int = 0) -> list[tuple[np.ndarray, list[int]]]:
    """Greedy decoding of one batch (numpy logits whatever the engine); with ``finished_after`` the first
    row leaves the batch after that many steps (the slot cache moves the last row into its place)."""
    for name, path in adapters.items():
        fast.add_adapter(name, path)
    cache = fast.new_cache(len(prompts))
    res = cache.reserve(len(prompts), max(map(len, prompts)))
    logits = np.asarray(fast.prefill(prompts, names, res))
    cache.commit(res)
    out = [(logits, [])]
    for step in range(steps):
        if finished_after and step == finished_after:
            order = cache.retire(list(range(1, cache.n)))   # the old index of each row in its new order
            names, logits = [names[i] for i in order], logits[order]
        tokens = logits.argmax(-1).tolist()
        logits = np.asarray(fast.decode(cache, tokens, names))
        out.append((logits, tokens))
    return out


def assert_same(a: list, b: list, atol: float) -> None:
    for (la, ta), (lb, tb) in zip(a, b, strict=True):
        assert ta == tb
        assert la.shape == lb.shape and np.allclose(la, lb, atol=atol, rtol=1e-4), np.abs(la - lb).max()


@pytest.mark.parametrize("names", [[None], ["story"], [None, "qa", "story", "qa", "ner"]])
def test_it_decodes_as_the_torch_engine_on_a_random_model(tiny_base: Path, tiny_adapters: Path, names: list) -> None:
    model, tok = load_light(tiny_base, dtype="float32")
    adapters = {a: tiny_adapters / a for a in ("qa", "story", "ner")}
    texts = ["Hello there", "Once upon a time, in a forest far away", "Q", "Bonn is on the Rhine.", "Tell me"]
    prompts = [tok(t).input_ids for t in texts[:len(names)]]
    native = load(tiny_base, gguf=None, max_context=512)
    ours = greedy(native, adapters, prompts, names, steps=16, finished_after=8 if len(names) > 1 else 0)
    theirs = greedy(FastLlama(model.config, model.weights), adapters, prompts, names, steps=16,
                    finished_after=8 if len(names) > 1 else 0)
    assert_same(ours, theirs, atol=1e-3)   # RoPE tables: numpy cos/sin against torch's, to the last bit


def test_a_long_prompt_and_classification_agree_with_the_torch_engine(tiny_base: Path, tiny_adapters: Path) -> None:
    # Past FastLlama.NATIVE_PREFILL_MAX_ROWS tokens the torch engine prefills in its Python layers; this
    # engine keeps the native step: the same model either way.
    model, tok = load_light(tiny_base, dtype="float32")
    long = tok(" ".join(f"word{i}" for i in range(120))).input_ids
    assert len(long) > FastLlama.NATIVE_PREFILL_MAX_ROWS
    prompts, names = [long, tok("Bonn is on the Rhine.").input_ids], ["qa", None]
    adapters = {"qa": tiny_adapters / "qa"}
    native = load(tiny_base, gguf=None, max_context=512)
    fast = FastLlama(model.config, model.weights)
    # Summation orders differ (the kernel's tiles against torch's BLAS past 64 rows): 1e-3.
    assert_same(greedy(native, adapters, prompts, names, steps=6), greedy(fast, adapters, prompts, names, steps=6),
                atol=1e-3)
    ours = native.prefill(prompts, ["qa", "qa"], Columns([5, 17, 3]))
    theirs = fast.prefill(prompts, ["qa", "qa"], Columns([5, 17, 3])).numpy()
    assert ours.shape == (2, 3) and np.allclose(ours, theirs, atol=1e-3)


def test_adapters_come_and_go_as_in_the_torch_engine(tiny_base: Path, tiny_adapters: Path) -> None:
    native = load(tiny_base, gguf=None, max_context=256)
    for name in ("qa", "story", "ner"):
        native.add_adapter(name, tiny_adapters / name)
    stacked = {g: s.used for g, s in native._stacks.items()}
    native.remove_adapter("story")
    assert set(native.adapters) == {"qa", "ner"}
    assert all(native._stacks[g].used < stacked[g] for g in stacked if stacked[g])
    native.add_adapter("story", tiny_adapters / "story")
    assert {g: s.used for g, s in native._stacks.items()} == stacked
    assert native.adapter_bytes("story") > 0


def test_bfloat16_adapter_files_are_widened_exactly(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from bot.engine.weights import read_arrays

    t = torch.randn(7, 33).to(torch.bfloat16)
    save_file({"a": t, "b": torch.arange(6, dtype=torch.float32).view(2, 3)}, str(tmp_path / "w.safetensors"))
    got = read_arrays(tmp_path / "w.safetensors")
    assert np.array_equal(got["a"], t.float().numpy()) and got["a"].dtype == np.float32
    assert np.array_equal(got["b"], np.arange(6, dtype=np.float32).reshape(2, 3))


def test_what_needs_the_torch_engine_says_why(tiny_base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bot.config import EngineConfig, ModelConfig, load_config, replace

    config = load_config(ROOT / "config.toml")
    monkeypatch.delenv("LORABOT_TORCH_ENGINE", raising=False)
    monkeypatch.delenv("LORABOT_PYTHON_STEP", raising=False)
    assert config_reason(config) is None or "CUDA" in config_reason(config)
    assert "peft" in config_reason(replace(config, engine=EngineConfig(backend="peft")))
    assert "bfloat16" in config_reason(replace(config, model=ModelConfig(dtype="bfloat16")))
    monkeypatch.setenv("LORABOT_TORCH_ENGINE", "1")
    assert "LORABOT_TORCH_ENGINE" in config_reason(config)
    model, _ = load_light(tiny_base, dtype="float32")
    weights = dict(model.weights)
    del weights["model.norm.weight"]
    with pytest.raises(NativeUnsupported, match=r"model\.norm\.weight"):
        NativeLlama(model.config, {k: v.numpy() for k, v in weights.items()}, kernels.load())


CHILD = r"""
import asyncio, json, sys
from bot.config import load_config
from bot.engine import SamplingParams
from bot.engine.scheduler import LocalEngine

async def main():
    engine = LocalEngine.from_config(load_config(sys.argv[1]), progress=False)
    prompt = engine.chat_prompt([{"role": "user", "content": "Write a short story about a fox who wanted to fly."}])
    story = await engine.generate(prompt, SamplingParams(max_new_tokens=24), "story")
    qa = await engine.generate("Context: Bonn is on the Rhine.\nQuestion: Where is Bonn?\nAnswer:",
                               SamplingParams(max_new_tokens=8), "qa")
    mood = await engine.classify("Text: a fine, warm film\nSentiment:", ["positive", "negative", "neutral"],
                                 "sentiment")
    await engine.close()
    print(json.dumps({"torch": "torch" in sys.modules, "torch_free": engine._backend.torch_free,
                      "story": story.text, "qa": qa.text, "mood": mood.scores}))

asyncio.run(main())
"""


def run_child(torch_engine: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "LORABOT_TORCH_ENGINE"}
    if torch_engine:
        env["LORABOT_TORCH_ENGINE"] = "1"
    done = subprocess.run([sys.executable, "-c", CHILD, str(ROOT / "config.toml")], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_bot_serves_the_bundled_model_and_shipped_adapters_without_importing_torch(bundled_dir: Path) -> None:
    ours, theirs = run_child(torch_engine=False), run_child(torch_engine=True)
    assert ours["torch"] is False and ours["torch_free"] is True
    assert theirs["torch"] is True and theirs["torch_free"] is False
    assert ours["story"] == theirs["story"] and ours["qa"] == theirs["qa"]
    assert "Rhine" in ours["qa"]
    for label, p in ours["mood"].items():
        assert p == pytest.approx(theirs["mood"][label], abs=1e-5)


def bf16_copy(src: Path, dst: Path) -> Path:
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(src / "adapter_model.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, str(dst / "adapter_model.safetensors"))
    return dst


def test_bfloat16_stacks_compute_exactly_what_float32_stacks_do(tiny_base: Path, tiny_adapters: Path,
                                                                tmp_path: Path) -> None:
    # Rank 4: the q/k/v group stacks 12 rows (the scalar LoRA path), gate/up 8 (the kernel's).
    folders = {a: bf16_copy(tiny_adapters / a, tmp_path / a) for a in ("qa", "story", "ner")}
    tok_ids = [[1, 5, 9, 200, 31], [7, 7, 8], [300, 2, 4, 4, 4, 4, 4, 9], [11]]
    names = ["qa", None, "story", "ner"]
    narrow = load(tiny_base, gguf=None, max_context=256)
    wide = load(tiny_base, gguf=None, max_context=256)
    wide._bf16_stacks = False
    runs = [greedy(fast, folders, tok_ids, names, steps=8, finished_after=4) for fast in (narrow, wide)]
    assert narrow._stacks["qkv"].A.dtype == np.uint16 and wide._stacks["qkv"].A.dtype == np.float32
    assert narrow.adapter_bytes("qa") * 2 == wide.adapter_bytes("qa")
    for (a, ta), (b, tb) in zip(*runs, strict=True):
        assert ta == tb and np.array_equal(a, b)
    # A float32 adapter (not exactly bfloat16) turns every stack to float32, with the same results.
    for fast in (narrow, wide):
        fast.add_adapter("f32", tiny_adapters / "qa")
    assert narrow._stacks["qkv"].A.dtype == np.float32
    prompts, mixed = tok_ids[:2], ["f32", "story"]
    for (a, ta), (b, tb) in zip(*(greedy(fast, {}, prompts, mixed, steps=4) for fast in (narrow, wide)), strict=True):
        assert ta == tb and np.array_equal(a, b)


def test_without_the_kernel_the_torch_engine_serves(tiny_base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bot.config import load_config, replace
    from bot.engine.loading import BaseModelRef
    from bot.engine.scheduler import LocalEngine

    monkeypatch.setattr(kernels, "load", lambda: None)
    with pytest.raises(NativeUnsupported, match="no CPU kernel"):
        load(tiny_base, gguf=None, max_context=256)
    config = replace(load_config(ROOT / "config.toml"), model={"base": str(tiny_base)})
    monkeypatch.delenv("LORABOT_TORCH_ENGINE", raising=False)
    assert LocalEngine._native_backend(config, BaseModelRef("tiny", tiny_base)) is None   # from_config goes on
