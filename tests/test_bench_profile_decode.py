"""bench/profile_decode.py's op timer on the tiny random Llama: every operation of a decode step is counted
and filed under a part of the forward pass (none left unclassified), and the matmuls come out as the model's
shape says they must: 7 per layer plus the output layer, and 2 per projection group and layer for LoRA.
No timing is asserted."""

from __future__ import annotations

from pathlib import Path

from bench.profile_decode import backend_profile


def test_the_op_timer_counts_a_decode_steps_matmuls_and_files_every_op(tiny_base: Path, tiny_adapters: Path) -> None:
    from bot.engine.fast_llama import GROUPS, FastLlama
    from bot.engine.loading import load_model

    model, tok = load_model(tiny_base, dtype="float32", device="cpu")
    fast = FastLlama.from_model(model)
    for name in ("story", "ner"):
        fast.add_adapter(name, tiny_adapters / name)
    layers = fast.n_layers
    prompts = [tok(text, add_special_tokens=False).input_ids for text in ("Once upon a time", "Paris is", "Hi")]

    plain = backend_profile(fast, prompts, [None, None, None], steps=2)
    assert plain["rows"] == 3 and plain["step_ms"] > 0 and plain["ops_per_step"] > 0
    assert plain["matmuls_per_step"] == 7 * layers + 1 and plain["lora_matmuls_per_step"] == 0
    assert fast.native is None or plain["native_step_ms"] > 0   # the engine's one-call step, timed beside
    assert not [c for c in plain["categories"] if c.startswith("other") or c.startswith("LoRA")], plain["categories"]

    mixed = backend_profile(fast, prompts, [None, "story", "ner"], steps=2)
    assert mixed["lora_matmuls_per_step"] == 2 * len(GROUPS) * layers
    assert mixed["matmuls_per_step"] == 7 * layers + 1 + 2 * len(GROUPS) * layers
    assert not [c for c in mixed["categories"] if c.startswith("other")], mixed["categories"]
    assert mixed["ops_per_step"] > plain["ops_per_step"]
    assert {"linear, base weights", "attention (KV write, SDPA)", "norms", "LoRA (stacked A/B, row mask)",
            "output layer (lm head)"} <= set(mixed["categories"])
