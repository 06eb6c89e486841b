"""`lorabot export-gguf`: an adapter folder as a GGUF LoRA in llama.cpp's layout. Checked against the
layout itself (keys, names, shapes, q/k rows in the order llama.cpp's converter gave the bundled GGUF's
own q/k weights, which the engine reads back with the inverse permutation), and, where llama-cpp-python
is installed, by llama.cpp's greedy output with the exported LoRA against lorabot's engine."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bot.adapter_gguf import export_gguf
from bot.cli import main
from bot.errors import AdapterError

ADAPTERS = Path(__file__).resolve().parents[1] / "adapters"


def _read(path: Path):  # type: ignore[no-untyped-def]
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    return fields, {t.name: t for t in reader.tensors}


def test_the_shipped_story_adapter_exports_in_llama_cpps_layout(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    from bot.engine.gguf import _unpermute_rows

    out = export_gguf(ADAPTERS / "story", tmp_path / "story.gguf")
    fields, tensors = _read(out.path)
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama"
    assert fields["adapter.lora.alpha"] == pytest.approx(16.0)
    assert out.tensors == len(tensors) == 30 * 7 * 2
    peft = load_file(ADAPTERS / "story" / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.0."
    for gguf_name, module, heads in (("attn_q", "self_attn.q_proj", 9), ("attn_k", "self_attn.k_proj", 3),
                                     ("attn_v", "self_attn.v_proj", None), ("ffn_down", "mlp.down_proj", None)):
        a = torch.from_numpy(tensors[f"blk.0.{gguf_name}.weight.lora_a"].data.copy())
        b = torch.from_numpy(tensors[f"blk.0.{gguf_name}.weight.lora_b"].data.copy())
        want_a = peft[f"{prefix}{module}.lora_A.weight"].float()
        want_b = peft[f"{prefix}{module}.lora_B.weight"].float()
        assert a.shape == want_a.shape and torch.equal(a, want_a)      # [r, in]: GGUF ne = (in, r)
        if heads:  # the inverse of what the engine undoes on the bundled GGUF's q/k weights
            b = b[_unpermute_rows(b.shape[0], heads)]
        assert b.shape == want_b.shape and torch.equal(b, want_b)      # [out, r]


def test_the_command_writes_the_file_and_refuses_what_it_cannot_export(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    assert main(["export-gguf", "sentiment", "--out", str(tmp_path / "s.gguf")]) == 0
    assert "llama.cpp: --lora" in capsys.readouterr().out and (tmp_path / "s.gguf").stat().st_size > 1e6
    assert main(["export-gguf", "no-such", "--out", str(tmp_path / "x.gguf")]) == 2
    assert "no adapter folder 'no-such'" in capsys.readouterr().err

    dora = tmp_path / "dora"
    shutil.copytree(ADAPTERS / "sentiment", dora)
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(AdapterError, match="use_dora"):
        export_gguf(dora, tmp_path / "d.gguf")
    assert not list(tmp_path.glob("*d.gguf*"))                        # nothing half-written


def test_llama_cpp_with_the_exported_lora_says_what_lorabot_says(tmp_path: Path) -> None:
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (the bench extra)")
    import asyncio

    from bot.config import Config, replace
    from bot.engine import SamplingParams
    from bot.engine.loading import BUNDLED, resolve_base
    from bot.engine.scheduler import LocalEngine
    from bot.skills import StoryFormat

    base = resolve_base(BUNDLED, progress=False)
    lora = export_gguf(ADAPTERS / "story", tmp_path / "story.gguf").path
    prompt = StoryFormat.prompt("a fox who wanted to fly")
    llm = llama_cpp.Llama(model_path=str(base.gguf), lora_path=str(lora), n_ctx=512, n_threads=2, verbose=False,
                          seed=0)
    theirs = llm.create_completion(prompt, max_tokens=24, temperature=0.0, top_k=1)["choices"][0]["text"]

    config = replace(Config(), model={"dtype": "float32"})

    async def ours() -> str:
        engine = LocalEngine.from_config(config, progress=False)
        try:
            return (await engine.generate(prompt, SamplingParams(max_new_tokens=24), "story")).text
        finally:
            await engine.close()

    mine = asyncio.run(ours())
    # Same weights, same greedy decoding; the first words must agree (float rounding may differ later).
    assert theirs.split()[:8] == mine.split()[:8], (theirs, mine)
