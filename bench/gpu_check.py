"""The engine on a GPU: aggregate generated tokens/s for 1..64 simultaneous streams over 4 adapters.

    .venv/bin/python -m bench.gpu_check                          # CUDA, batch sizes 1, 2, 4, ..., 64
    .venv/bin/python -m bench.gpu_check --device cpu --max-batch 4   # smoke test on a CPU

The real SmolLM2-135M weights cannot travel to the GPU machine, so the base model is a randomly
initialised Llama of the same shape (``tests.random_model.save_random_llama(shape="smollm2-135m")``) with
the real tokenizer, read from bench/tokenizer/ (copied from the bundled model; refreshed from it when it
is installed). Four random LoRA adapters of the real shape (r 16, all linear layers) are attached; the
streams cycle through them and the bare base model. Greedy decoding, ``--new-tokens`` per stream
(generation stops early only at EOS). Throughput counts every generated token of every stream over the
wall time of the batch (prefill included). Everything runs through ``LocalEngine`` (fast backend, bf16
on CUDA). Runs in well under 5 minutes on one GPU. Results: bench/results/gpu_check.json.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import write_result

HERE = Path(__file__).resolve().parent
TOKENIZER = HERE / "tokenizer"
THEMES = ["a fox", "the sea", "a small robot", "winter", "an old key", "a lost dog", "the moon", "a garden"]


def tokenizer_dir() -> Path:
    """bench/tokenizer/, refreshed from the bundled model when it is installed here."""
    from tests.random_model import copy_tokenizer

    try:
        from bot.engine.loading import BUNDLED, resolve_base

        copy_tokenizer(resolve_base(BUNDLED, progress=False).path, TOKENIZER)
    except Exception:  # no bundled model on this machine (the GPU box): use the committed copy
        pass
    if not (TOKENIZER / "tokenizer.json").is_file():
        raise SystemExit(f"{TOKENIZER} has no tokenizer.json; run this once where lorabot's bundled model is installed")
    return TOKENIZER


def build(scratch: Path) -> tuple[Path, Path]:
    from tests.random_model import save_random_adapter, save_random_llama

    base = save_random_llama(scratch / "random-smollm2-135m", tokenizer_dir(), shape="smollm2-135m", seed=0)
    adapters = scratch / "adapters"
    for seed, (name, task) in enumerate([("story", "story"), ("qa", "qa"), ("chat2", "domain"), ("ner", "ner")], 1):
        labels = ("PER", "ORG", "LOC", "MISC") if task == "ner" else ()
        save_random_adapter(base, adapters / name, task=task, labels=labels, rank=16, seed=seed, scale=0.02,
                            base_name=base.name)
    return base, adapters


async def run_batch(engine: Any, size: int, new_tokens: int) -> dict[str, Any]:
    from bot.engine import SamplingParams

    names = [*sorted(engine.adapters), None]
    params = SamplingParams(max_new_tokens=new_tokens)
    prompts = [f"Write a short story about {THEMES[i % len(THEMES)]} number {i}.\nStory:" for i in range(size)]
    started = time.perf_counter()
    done = await asyncio.gather(*(engine.generate(p, params, names[i % len(names)]) for i, p in enumerate(prompts)))
    wall = time.perf_counter() - started
    tokens = sum(g.completion_tokens for g in done)
    return {"streams": size, "tokens": tokens, "wall_s": round(wall, 3), "tok_s": round(tokens / wall, 1)}


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from bot.engine.loading import BaseModelRef, load_model
    from bot.engine.scheduler import LocalEngine

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; for a CPU smoke test: --device cpu --max-batch 4")
    sizes = [b for b in (1, 2, 4, 8, 16, 32, 64) if b <= args.max_batch]
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        base, adapters = build(Path(tmp))
        built = time.perf_counter() - t
        model, tok = load_model(base, dtype="auto", device=args.device)
        engine = LocalEngine(model, tok, BaseModelRef(base.name, base), adapters, max_batch=max(sizes),
                             batch_wait_ms=20)
        assert len(engine.adapters) == 4, engine.problems
        await run_batch(engine, min(4, max(sizes)), 4)  # warm-up: kernels, allocator
        runs = []
        for size in sizes:
            r = await run_batch(engine, size, args.new_tokens)
            runs.append(r)
            print(f"{size:>3} streams: {r['tok_s']:>9.1f} tok/s ({r['tokens']} tokens in {r['wall_s']} s)", flush=True)
        info = {"backend": engine.backend, "dtype": str(next(model.parameters()).dtype)}
        await engine.close()
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu (smoke test)"
    return {"device": device, "setup_s": round(built, 1), "new_tokens": args.new_tokens, "runs": runs, **info}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=0, help="per stream (default: 128 on CUDA, 8 on CPU)")
    args = parser.parse_args()
    args.new_tokens = args.new_tokens or (128 if args.device == "cuda" else 8)
    started = time.perf_counter()
    results = asyncio.run(measure(args))
    results["total_s"] = round(time.perf_counter() - started, 1)
    top = max(results["runs"], key=lambda r: r["streams"])
    if args.device == "cuda":
        results[f"gpu_tok_s_{top['streams']}"] = top["tok_s"]
    else:
        results["gpu_tok_s_64"] = None
        results["note"] = "no GPU figure this session: CPU smoke test of the script only"
    path = write_result("gpu_check", results)
    print(f"{results['device']}: {top['streams']} streams -> {top['tok_s']} tok/s; total {results['total_s']} s; "
          f"wrote {path}")


if __name__ == "__main__":
    main()
