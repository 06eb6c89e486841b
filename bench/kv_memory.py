"""Memory for a mix of one long prompt among short chats: the KV budget against an unbounded cache.

    .venv/bin/python -m bench.kv_memory [--short 15] [--long-tokens 2000] [--threads -1]

One QA request with a ~2,000-token text and 15 short chats arrive together at the engine (real bundled
model, loaded as ``lorabot run`` loads it, the config.toml settings, greedy). Each setting runs in a
fresh process: ``kv_token_budget`` from config.toml, then 0 (unbounded: every row as wide as the widest,
the behaviour before the budget existed). Reported per setting: RSS after loading and one warm-up
request, the peak RSS during the mix (the kernel's high-water mark, reset after the warm-up), the
difference, the mix's wall time and how many scheduler steps a request waited for memory.
Results: bench/results/kv_memory.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import choose_threads, peak_rss_mb, reset_peak_rss, rss_mb, set_threads, write_result

REPO = Path(__file__).resolve().parents[1]
PARAGRAPH = ("The Normans were the people who in the 10th and 11th centuries gave their name to Normandy, a "
             "region in France. They were descended from Norse raiders and pirates from Denmark, Iceland and "
             "Norway who, under their leader Rollo, agreed to swear fealty to King Charles III of West Francia. ")
SHORT = ["What is the capital of France?", "Give me a tip for sleeping better.", "What is a prime number?",
         "How do plants make food?", "Name three colours.", "Why is the sky blue?"]


async def mix(budget: int | None, short: int, long_tokens: int) -> dict[str, Any]:
    from bot.config import load_config, replace
    from bot.engine import SamplingParams
    from bot.engine.scheduler import LocalEngine
    from bot.skills import QAFormat

    config = load_config(REPO / "config.toml")
    if budget is not None:  # None: config.toml as it is (also on a checkout from before the budget)
        config = replace(config, engine={"kv_token_budget": budget})
    engine = LocalEngine.from_config(config, progress=False)
    try:
        await engine.generate(engine.chat_prompt([{"role": "user", "content": "Hello"}]),
                              SamplingParams(max_new_tokens=8), None)
        reset_peak_rss()
        settled_mb = rss_mb()
        text = PARAGRAPH
        while engine.count_tokens(text) < long_tokens:
            text += PARAGRAPH
        qa = QAFormat.prompt(text, "Who was the leader of the Normans?")
        prompts = [(qa, "qa" if "qa" in engine.adapters else None, 24)]
        prompts += [(engine.chat_prompt([{"role": "user", "content": SHORT[i % len(SHORT)]}]), None, 48)
                    for i in range(short)]
        started = time.perf_counter()
        results = await asyncio.gather(*(
            engine.generate(p, SamplingParams(max_new_tokens=n), adapter) for p, adapter, n in prompts))
        wall = time.perf_counter() - started
        return {
            "kv_token_budget": getattr(engine, "kv_budget", None), "long_prompt_tokens": results[0].prompt_tokens,
            "rss_settled_mb": round(settled_mb, 1), "peak_rss_mb": round(peak_rss_mb(), 1),
            "extra_peak_mb": round(peak_rss_mb() - settled_mb, 1), "wall_s": round(wall, 2),
            "completion_tokens": sum(r.completion_tokens for r in results), "kv_waits": getattr(engine, "kv_waits", 0),
            "backend": engine.backend,
        }
    finally:
        await engine.close()


def child(args: argparse.Namespace) -> None:
    set_threads(args.threads)
    budget = None if args.child == "config" else int(args.child)
    print(json.dumps(asyncio.run(mix(budget, args.short, args.long_tokens))))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", type=int, default=15)
    parser.add_argument("--long-tokens", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=-1)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return
    threads, why = choose_threads(args.threads)
    runs = {}
    for name, setting in (("budget", "config"), ("unbounded", "0")):
        out = subprocess.run(
            [sys.executable, "-m", "bench.kv_memory", "--child", setting, "--short", str(args.short),
             "--long-tokens", str(args.long_tokens), "--threads", str(threads)],
            cwd=REPO, check=True, capture_output=True, text=True,
        )
        runs[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(name, runs[name], flush=True)
    data = {
        "threads": threads, "threads_why": why, "short_chats": args.short, "runs": runs,
        "kv_mix_extra_mb": runs["budget"]["extra_peak_mb"],
        "kv_mix_extra_mb_unbounded": runs["unbounded"]["extra_peak_mb"],
        "kv_mix_peak_rss_mb": runs["budget"]["peak_rss_mb"],
        "kv_mix_peak_rss_mb_unbounded": runs["unbounded"]["peak_rss_mb"],
    }
    print(f"written to {write_result('kv_memory', data)}")


if __name__ == "__main__":
    main()
