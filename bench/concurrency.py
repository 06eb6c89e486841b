"""Concurrent chats with mixed adapters through the real engine, against the naive baseline.

    .venv/bin/python -m bench.concurrency [--chats 1 4 8 16] [--requests 16] [--threads -1]

The same 16 requests (story, qa, chat, ner in turn: four adapters, chat on the bare base model, greedy)
are answered:
* naive: one request at a time, PEFT ``set_adapter`` (or ``disable_adapter`` for chat) between requests,
  a plain transformers greedy loop with a DynamicCache (the baseline);
* by the engine (fast backend, loaded as ``lorabot run`` loads it: bot.engine.light_model with the bundled
  GGUF's quantised weights) with N = 1, 4, 8, 16 simultaneous chats: chat i sends requests
  i, i+N, i+2N, ... one after the other, as a user waits for each answer;
* with ``--peft``, also by the engine's PEFT backend (``adapter_names`` per row), N = 16: the batched
  LoRA's ablation (slow: off by default).

Aggregate generated tokens/s = all completion tokens / wall time; per-chat latency = from sending a
request to its complete answer (p50/p95 over the 16). The naive baseline serves one request at a time,
so its throughput does not depend on N; it is measured in four parts (one request of each skill), one
before each engine run, so that both see the shared machine over the same period; its latency at N
chats is computed from its measured service times with first-come-first-served queueing. Every
answer is compared with the naive one (greedy, so they must be identical). The real base model is used,
with the trained adapters when adapters/ has them, else random ones of the real shape.
Results: bench/results/concurrency.json and .png.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    RESULTS,
    adapters_for_bench,
    chart,
    choose_threads,
    percentile,
    set_threads,
    write_result,
)

REPO = Path(__file__).resolve().parents[1]
THEMES = ["a brave little mouse", "a dragon who loved tea", "the last lighthouse keeper", "a robot learning to paint"]
QA = [
    ("Where is the Eiffel Tower?", "The Eiffel Tower is a wrought-iron lattice tower in Paris, France. It was "
     "designed by Gustave Eiffel's company and completed in 1889."),
    ("What did Marie Curie study?", "Marie Curie was a physicist and chemist who conducted pioneering research "
     "on radioactivity. She was the first woman to win a Nobel Prize."),
    ("When did Apollo 11 land?", "Apollo 11 was the American spaceflight that first landed humans on the Moon, "
     "on July 20, 1969."),
    ("What is the capital of Australia?", "Canberra is the capital city of Australia. Sydney is its largest city."),
]
CHATS = ["What is the capital of France?", "Give me a tip for sleeping better.", "What is a prime number?",
         "How do plants make food?"]
NER = ["Angela Merkel met Emmanuel Macron in Paris to discuss the European Union budget.",
       "Apple opened a new office in London, said Tim Cook.", "Lionel Messi joined Inter Miami in the United States.",
       "The United Nations held a meeting in Geneva with officials from Kenya."]
MAX_NEW = {"story": 40, "qa": 24, "chat": 32, "ner": 32}


@dataclass(frozen=True)
class Request:
    skill: str
    adapter: str | None
    prompt: str
    max_new_tokens: int
    stop: tuple[str, ...]


def requests(tok: Any, n: int, adapters: dict[str, str]) -> list[Request]:
    from bot.skills import NERFormat, QAFormat, StoryFormat

    out = []
    for i in range(n):
        k = i // 4 % 4
        skill = ("story", "qa", "chat", "ner")[i % 4]
        if skill == "story":
            prompt, stop = StoryFormat.prompt(THEMES[k]), ()
        elif skill == "qa":
            prompt, stop = QAFormat.prompt(QA[k][1], QA[k][0]), QAFormat.stop
        elif skill == "ner":
            prompt, stop = NERFormat.prompt(NER[k]), NERFormat.stop
        else:
            messages = [{"role": "system", "content": "You are lorabot, a helpful and concise assistant."},
                        {"role": "user", "content": CHATS[k]}]
            prompt, stop = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), ()
        out.append(Request(skill, adapters.get(skill), prompt, MAX_NEW[skill], stop))
    return out


# ---------------------------------------------------------------- the naive baseline


def naive_generate(model: Any, tok: Any, req: Request, eos: set[int]) -> tuple[str, int]:
    """One request alone: set_adapter, then a plain greedy loop (same stopping rules as the engine)."""
    import torch
    from transformers import DynamicCache

    if req.adapter is not None:
        model.set_adapter(req.adapter)
    ctx = model.disable_adapter() if req.adapter is None else nullcontext()
    ids = tok(req.prompt, add_special_tokens=False).input_ids
    generated: list[int] = []
    text = ""
    with ctx, torch.inference_mode():
        cache = DynamicCache(config=model.base_model.config)
        logits = model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True, logits_to_keep=1).logits
        while True:
            token = int(logits[0, -1].argmax())
            if token in eos:
                break
            generated.append(token)
            text = tok.decode(generated, skip_special_tokens=True)
            cut = min((i for i in (text.find(s) for s in req.stop) if i >= 0), default=-1)
            if cut >= 0:
                text = text[:cut]
                break
            if len(generated) >= req.max_new_tokens:
                break
            logits = model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True).logits
    return text, len(generated)


def naive_run(model: Any, tok: Any, reqs: list[Request], eos: set[int]) -> dict[str, Any]:
    service, texts, tokens = [], [], []
    started = time.perf_counter()
    for req in reqs:
        t = time.perf_counter()
        text, n = naive_generate(model, tok, req, eos)
        service.append(time.perf_counter() - t)
        texts.append(text)
        tokens.append(n)
    wall = time.perf_counter() - started
    return {"service_s": service, "texts": texts, "tokens": tokens, "wall_s": wall,
            "tok_s": sum(tokens) / wall}


def fifo_latencies(service: list[float], chats: int) -> list[float]:
    """Latency of each request when ``chats`` users each send their share one after the other to a
    server that answers one request at a time, first come first served."""
    queues = [list(range(c, len(service), chats)) for c in range(chats)]
    ready = [(0.0, c) for c in range(chats) if queues[c]]  # (time the chat sent its next request, chat)
    clock, out = 0.0, [0.0] * len(service)
    while ready:
        ready.sort()
        sent, c = ready.pop(0)
        i = queues[c].pop(0)
        clock = max(clock, sent) + service[i]
        out[i] = clock - sent
        if queues[c]:
            ready.append((clock, c))
    return out


# ---------------------------------------------------------------- the engine


async def engine_run(engine: Any, reqs: list[Request], chats: int) -> dict[str, Any]:
    from bot.engine import SamplingParams

    latencies = [0.0] * len(reqs)
    results: list[Any] = [None] * len(reqs)

    async def chat(c: int) -> None:
        for i in range(c, len(reqs), chats):
            r = reqs[i]
            t = time.perf_counter()
            results[i] = await engine.generate(
                r.prompt, SamplingParams(max_new_tokens=r.max_new_tokens, stop=r.stop), r.adapter)
            latencies[i] = time.perf_counter() - t

    started = time.perf_counter()
    await asyncio.gather(*(chat(c) for c in range(chats)))
    wall = time.perf_counter() - started
    tokens = [g.completion_tokens for g in results]
    return {"chats": chats, "wall_s": wall, "tokens": tokens, "tok_s": sum(tokens) / wall,
            "latency_s": latencies, "texts": [g.text for g in results]}


def stats(run: dict[str, Any], latencies: list[float]) -> dict[str, Any]:
    return {"tok_s": round(run["tok_s"], 1), "tokens": sum(run["tokens"]), "wall_s": round(run["wall_s"], 2),
            "p50_latency_s": round(percentile(latencies, 0.5), 2),
            "p95_latency_s": round(percentile(latencies, 0.95), 2)}


async def measure(args: argparse.Namespace, threads: int) -> dict[str, Any]:
    from peft import PeftModel

    from bot.adapters import scan_adapters
    from bot.config import Config, replace
    from bot.engine.loading import BUNDLED, load_model, resolve_base
    from bot.engine.scheduler import LocalEngine

    set_threads(threads)
    base = resolve_base(BUNDLED, progress=False)
    with tempfile.TemporaryDirectory() as scratch:
        adapters_dir, adapters_note = adapters_for_bench(REPO / "adapters", base.path, base.name, Path(scratch))
        found, _ = scan_adapters(adapters_dir)
        by_task = {info.task: name for name, info in sorted(found.items())}
        # The engine as `lorabot run` builds it (bot.engine.light_model; the bundled GGUF's quantised weights).
        config = replace(Config(), adapters={"dir": str(adapters_dir)}, engine={"max_batch": max(args.chats)},
                         model={"dtype": "float32", "threads": threads})
        engine = LocalEngine.from_config(config, progress=False)
        eos = engine._eos_ids
        # The naive baseline: its own copy of the model (transformers) with every adapter attached through PEFT.
        naive_model, tok = load_model(base.path, dtype="float32", device="cpu")
        reqs = requests(tok, args.requests, by_task)
        names = sorted(found)
        naive_model = PeftModel.from_pretrained(naive_model, str(adapters_dir / names[0]), adapter_name=names[0])
        for name in names[1:]:
            naive_model.load_adapter(str(adapters_dir / name), adapter_name=name)
        naive_model.eval()

        # Warm-up (first calls allocate and load code paths), not measured.
        naive_generate(naive_model, tok, Request("chat", None, reqs[2].prompt, 2, ()), eos)
        await engine_run(engine, reqs[:4], 4)

        out: dict[str, Any] = {"adapters": adapters_note, "threads": threads, "requests": len(reqs),
                               "mix": [f"{r.skill}:{r.adapter or 'base'}:{r.max_new_tokens}" for r in reqs]}
        # Interleaved: a quarter of the naive baseline (one request of each skill) before each engine run,
        # so that baseline and engine see the same (shared, drifting) machine over the same period.
        chats = sorted(args.chats, reverse=True)
        chunk = -(-len(reqs) // len(chats))
        parts, runs = [], {}
        for k, n in enumerate(chats):
            part = naive_run(naive_model, tok, reqs[k * chunk:(k + 1) * chunk], eos)
            parts.append(part)
            print(f"naive, requests {k * chunk}-{k * chunk + len(part['tokens']) - 1}: {part['tok_s']:.1f} tok/s",
                  flush=True)
            runs[n] = await engine_run(engine, reqs, n)
            print(f"engine, {n} chats: {runs[n]['tok_s']:.1f} tok/s", flush=True)
        naive = {key: [x for p in parts for x in p[key]] for key in ("service_s", "texts", "tokens")}
        naive["wall_s"] = sum(p["wall_s"] for p in parts)
        naive["tok_s"] = sum(naive["tokens"]) / naive["wall_s"]
        await engine.close()

        peft_run = None
        if args.peft:
            peft_model, _ = load_model(base.path, dtype="float32", device="cpu")
            peft_engine = LocalEngine(peft_model, tok, base, adapters_dir, max_batch=max(args.chats), backend="peft")
            await engine_run(peft_engine, reqs[:4], 4)
            n = max(args.chats)
            peft_run = await engine_run(peft_engine, reqs, n)
            print(f"engine (PEFT adapter_names backend), {n} chats: {peft_run['tok_s']:.1f} tok/s", flush=True)
            await peft_engine.close()


    out["naive"] = {"tok_s": round(naive["tok_s"], 1), "tokens": sum(naive["tokens"]),
                    "wall_s": round(naive["wall_s"], 2),
                    "per_chats": {n: stats(naive, fifo_latencies(naive["service_s"], n)) for n in args.chats},
                    "parts_tok_s": [round(p["tok_s"], 1) for p in parts],
                    "drift": round(parts[-1]["tok_s"] / parts[0]["tok_s"], 2)}
    out["engine"] = {n: stats(r, r["latency_s"]) | {
        "vs_naive": round(r["tok_s"] / naive["tok_s"], 2),
        "vs_naive_part_before": round(r["tok_s"] / parts[chats.index(n)]["tok_s"], 2)}
        for n, r in sorted(runs.items())}
    mismatches = [(n, i) for n, r in runs.items() for i, t in enumerate(r["texts"]) if t != naive["texts"][i]]
    out["identical_to_naive"] = not mismatches
    out["mismatches"] = [f"{n} chats, request {i} ({reqs[i].skill})" for n, i in mismatches]
    top = max(args.chats)
    if peft_run is not None:
        out["engine_peft_backend"] = stats(peft_run, peft_run["latency_s"]) | {
            "chats": top, "vs_naive": round(peft_run["tok_s"] / naive["tok_s"], 2),
            "identical_to_naive": peft_run["texts"] == naive["texts"]}
    out[f"aggregate_tok_s_{top}"] = round(runs[top]["tok_s"], 1)
    out[f"naive_tok_s_{top}"] = round(naive["tok_s"], 1)
    out[f"mixed_vs_naive_{top}"] = round(runs[top]["tok_s"] / naive["tok_s"], 2)
    out[f"p95_latency_s_{top}"] = out["engine"][top]["p95_latency_s"]
    out[f"naive_p95_latency_s_{top}"] = out["naive"]["per_chats"][top]["p95_latency_s"]
    out |= ceiling(base.path, tok, reqs, runs[top]["tokens"], threads, top)
    return out


def ceiling(base_dir: Path, tok: Any, reqs: list[Request], generated: list[int], threads: int, top: int) -> dict:
    """The most tokens/s any float32 engine could reach on this workload here: every prompt token and every
    generated token goes once through the linear layers (no padding, no recomputation), each generated
    token through the output layer too, at this machine's best measured matmul rate (bench.roofline)."""
    from bench.roofline import least_seconds

    prompt_tokens = sum(len(tok(r.prompt, add_special_tokens=False).input_ids) for r in reqs)
    floor = least_seconds(base_dir, prompt_tokens + sum(generated), sum(generated), threads)
    return {"matmul_peak": floor["matmul_peak"],
            "workload": {"prompt_tokens": prompt_tokens, "generated_tokens": sum(generated),
                         "gflop": round(floor["gflop"], 1)},
            f"aggregate_ceiling_tok_s_{top}": round(sum(generated) / floor["seconds"], 1)}


def draw(results: dict[str, Any]) -> Any:
    def figure(plt: Any) -> None:
        chats = sorted(int(n) for n in results["engine"])
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        a.plot(chats, [results["engine"][n]["tok_s"] for n in chats], "o-", label="engine (batched LoRA)")
        a.plot(chats, [results["naive"]["tok_s"]] * len(chats), "s--", label="naive (one at a time, set_adapter)")
        if "engine_peft_backend" in results:
            p = results["engine_peft_backend"]
            a.plot([p["chats"]], [p["tok_s"]], "^", label="engine, PEFT adapter_names")
        a.set_xlabel("simultaneous chats")
        a.set_ylabel("generated tokens/s (all chats)")
        a.set_xticks(chats)
        a.legend(fontsize=8)
        a.set_title("aggregate throughput")
        b.plot(chats, [results["engine"][n]["p95_latency_s"] for n in chats], "o-", label="engine")
        b.plot(chats, [results["naive"]["per_chats"][n]["p95_latency_s"] for n in chats], "s--", label="naive")
        b.set_xlabel("simultaneous chats")
        b.set_ylabel("p95 latency per request (s)")
        b.set_xticks(chats)
        b.legend(fontsize=8)
        b.set_title("per-chat p95 latency")
        fig.suptitle(f"mixed adapters (story, qa, chat, ner), {results['threads']} thread(s)", fontsize=9)

    return figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chats", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--threads", type=int, default=-1, help="-1 auto (1 on a shared CPU), 0 all cores")
    parser.add_argument("--peft", action="store_true", help="also run the engine's PEFT backend at the most chats")
    args = parser.parse_args()
    threads, why = choose_threads(args.threads)
    results = asyncio.run(measure(args, threads))
    results["threads_choice"] = why
    path = write_result("concurrency", results)
    chart(RESULTS / "concurrency.png", draw(results))
    print(f"\n{'chats':>5} {'engine tok/s':>13} {'naive tok/s':>12} {'ratio':>6} {'p95 s':>7} {'naive p95 s':>12}")
    for n, r in results["engine"].items():
        nv = results["naive"]["per_chats"][n]
        print(f"{n:>5} {r['tok_s']:>13.1f} {results['naive']['tok_s']:>12.1f} {r['vs_naive']:>6.2f} "
              f"{r['p95_latency_s']:>7.2f} {nv['p95_latency_s']:>12.2f}")
    if "engine_peft_backend" in results:
        p = results["engine_peft_backend"]
        print(f"PEFT adapter_names backend at {p['chats']} chats: {p['tok_s']} tok/s ({p['vs_naive']}x naive)")
    top = max(int(n) for n in results["engine"])
    w, peak = results["workload"], results["matmul_peak"]
    print(f"machine ceiling at {top} chats: {results[f'aggregate_ceiling_tok_s_{top}']} tok/s "
          f"({w['prompt_tokens']} prompt + {w['generated_tokens']} generated tokens = {w['gflop']} GFLOP of linear "
          f"layers at {peak['gflops']} GFLOP/s, the best float32 matmul here, {peak['by']})")
    print(f"identical to naive (greedy): {results['identical_to_naive']}; threads: {threads} ({why}); "
          f"naive baseline speed, last quarter / first quarter: x{results['naive']['drift']}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
