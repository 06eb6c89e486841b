"""``lorabot serve`` against the in-process engine: what the HTTP layer costs, on the real model.

    .venv/bin/python -m bench.serve [--requests 16] [--chats 16] [--rounds 2] [--runs 20] [--threads -1]

One engine (loaded as ``lorabot run`` loads it: the bundled model, its quantised weights, the trained
adapters when adapters/ has them, else random ones of the real shape) answers the same mixed-adapter
workload as bench.concurrency (story, qa, chat, ner in turn; greedy):
* in process: ``engine.generate`` from N concurrent chats (the baseline);
* over HTTP: N concurrent clients POSTing ``/v1/completions`` (``model`` = the adapter) to ``lorabot
  serve``'s application on a loopback port, in this process and over this same engine.
The two alternate for ``--rounds`` rounds, so both see the shared machine over the same period; the
figure is the ratio of generated tokens/s (HTTP / in process, median over the rounds), and every HTTP
answer is checked against the in-process one (greedy: identical). Then ``--runs`` sequential
``POST /v1/skills/sentiment`` requests give the skills endpoint's p50/p95 latency, beside the same
message through the core directly (no HTTP) as its baseline. Results: bench/results/serve.json.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import adapters_for_bench, choose_threads, percentile, set_threads, summary, write_result
from bench.concurrency import Request, engine_run, requests

REPO = Path(__file__).resolve().parents[1]
SENTIMENT = "The film was a delight from start to finish, I would happily watch it again."


async def http_run(url: str, base: str, reqs: list[Request], chats: int) -> dict[str, Any]:
    """The workload as ``chats`` HTTP clients, each sending its share one after the other."""
    import aiohttp

    latencies = [0.0] * len(reqs)
    texts: list[str] = [""] * len(reqs)
    tokens = [0] * len(reqs)

    async def client(http: aiohttp.ClientSession, c: int) -> None:
        for i in range(c, len(reqs), chats):
            r = reqs[i]
            body = {"model": r.adapter or base, "prompt": r.prompt, "max_tokens": r.max_new_tokens,
                    "temperature": 0, **({"stop": list(r.stop)} if r.stop else {})}
            t = time.perf_counter()
            async with http.post(f"{url}/v1/completions", json=body) as response:
                answer = await response.json()
            latencies[i] = time.perf_counter() - t
            assert response.status == 200, answer
            texts[i], tokens[i] = answer["choices"][0]["text"], answer["usage"]["completion_tokens"]

    connector = aiohttp.TCPConnector(limit=chats)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http, c) for c in range(chats)))
        wall = time.perf_counter() - started
    return {"wall_s": wall, "tokens": tokens, "tok_s": sum(tokens) / wall, "latency_s": latencies, "texts": texts}


async def sentiment_latency(url: str, core: Any, runs: int) -> dict[str, Any]:
    import aiohttp

    from bot.messages import Incoming

    http_ms, core_ms = [], []
    async with aiohttp.ClientSession() as http:
        for i in range(runs):
            t = time.perf_counter()
            async with http.post(f"{url}/v1/skills/sentiment", json={"text": SENTIMENT}) as response:
                reply = await response.json()
            http_ms.append((time.perf_counter() - t) * 1000)
            assert response.status == 200 and reply["kind"] == "answer", reply
            t = time.perf_counter()
            direct = await core.handle(Incoming(platform="bench", chat_id=f"c{i}", user_id="u", text=f"/sentiment "
                                                f"{SENTIMENT}"))
            core_ms.append((time.perf_counter() - t) * 1000)
            assert direct is not None and direct.kind == "answer"
    return {"http": summary(http_ms), "core": summary(core_ms), "adapter": reply["adapter"]}


async def measure(args: argparse.Namespace, threads: int) -> dict[str, Any]:
    from bot.app import open_app
    from bot.config import Config, replace
    from bot.engine import load_engine
    from bot.engine.loading import BUNDLED, resolve_base
    from bot.serve.app import build_app, running
    from bot.serve.settings import ServeSettings

    set_threads(threads)
    base = resolve_base(BUNDLED, progress=False)
    with tempfile.TemporaryDirectory() as scratch:
        adapters_dir, adapters_note = adapters_for_bench(REPO / "adapters", base.path, base.name, Path(scratch))
        config = replace(Config(), adapters={"dir": str(adapters_dir)}, store={"path": str(Path(scratch) / "b.db")},
                         engine={"max_batch": max(16, args.chats)}, model={"dtype": "float32", "threads": threads})
        engine = await asyncio.to_thread(load_engine, config, progress=False)
        by_task = {info.task: name for name, info in sorted(engine.adapters.items())}
        reqs = requests(engine._tok, args.requests, by_task)
        settings = ServeSettings(port=0, max_in_flight=max(64, args.chats))
        async with open_app(config, engine=engine) as bot, running(
                build_app(config, engine, bot.store, settings), settings) as url:
            await engine_run(engine, reqs[:4], 4)                       # warm-up, not measured
            await http_run(url, engine.base_model, reqs[:4], 4)
            rounds = []
            for k in range(args.rounds):
                inproc = await engine_run(engine, reqs, args.chats)
                http = await http_run(url, engine.base_model, reqs, args.chats)
                rounds.append((inproc, http))
                print(f"round {k + 1}: in process {inproc['tok_s']:.1f} tok/s, over HTTP {http['tok_s']:.1f} tok/s "
                      f"({http['tok_s'] / inproc['tok_s']:.2f}x)", flush=True)
            latency = await sentiment_latency(url, bot.core, args.runs)

    ratios = [h["tok_s"] / i["tok_s"] for i, h in rounds]
    mismatches = [i for inproc, http in rounds for i, (a, b) in enumerate(zip(inproc["texts"], http["texts"],
                                                                                strict=True)) if a != b]
    top = args.chats

    def figures(run: dict[str, Any]) -> dict[str, Any]:
        return {"tok_s": round(run["tok_s"], 1), "tokens": sum(run["tokens"]), "wall_s": round(run["wall_s"], 2),
                "p50_latency_s": round(percentile(run["latency_s"], 0.5), 2),
                "p95_latency_s": round(percentile(run["latency_s"], 0.95), 2)}

    return {
        "adapters": adapters_note, "threads": threads, "requests": len(reqs), "chats": top,
        "mix": [f"{r.skill}:{r.adapter or 'base'}:{r.max_new_tokens}" for r in reqs],
        "rounds": [{"in_process": figures(i), "http": figures(h)} for i, h in rounds],
        f"http_tok_s_{top}": round(statistics.median(h["tok_s"] for _, h in rounds), 1),
        f"inprocess_tok_s_{top}": round(statistics.median(i["tok_s"] for i, _ in rounds), 1),
        f"http_vs_inprocess_{top}": round(statistics.median(ratios), 3),
        "identical_to_in_process": not mismatches, "mismatched_requests": sorted(set(mismatches)),
        "skills_sentiment_p50_ms": latency["http"]["p50_ms"], "skills_sentiment_p95_ms": latency["http"]["p95_ms"],
        "core_sentiment_p50_ms": latency["core"]["p50_ms"], "sentiment": latency,
        "note": "server and clients in one process over one engine; HTTP on loopback",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--chats", type=int, default=16, help="concurrent clients (and in-process chats)")
    parser.add_argument("--rounds", type=int, default=2, help="in-process / HTTP alternations")
    parser.add_argument("--runs", type=int, default=20, help="sequential /v1/skills/sentiment requests")
    parser.add_argument("--threads", type=int, default=-1, help="-1 auto (1 on a shared CPU), 0 all cores")
    args = parser.parse_args()
    threads, why = choose_threads(args.threads)
    results = asyncio.run(measure(args, threads))
    results["threads_choice"] = why
    path = write_result("serve", results)
    top = args.chats
    print(f"\n{top} clients: HTTP {results[f'http_tok_s_{top}']} tok/s vs in process "
          f"{results[f'inprocess_tok_s_{top}']} tok/s ({results[f'http_vs_inprocess_{top}']}x); identical answers: "
          f"{results['identical_to_in_process']}")
    print(f"/v1/skills/sentiment p50 {results['skills_sentiment_p50_ms']} ms (p95 {results['skills_sentiment_p95_ms']})"
          f", through the core directly {results['core_sentiment_p50_ms']} ms")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
