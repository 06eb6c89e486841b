"""One-message latency per skill on the real bundled model, through the real core, engine and store.

    .venv/bin/python -m bench.latency [--runs 20]

Reports median and p95 per skill (sentiment, NER, QA with a short answer, story first token and
tokens/s, chat), the cold start (cached model) to first reply, and writes bench/results/latency.json.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from bench.common import summary, write_result
from bot.config import Config, load_config, replace
from bot.messages import Incoming

REPO = Path(__file__).resolve().parents[1]
INPUTS = {
    "sentiment": "/sentiment The film was a delight from start to finish, I would happily watch it again.",
    "ner": "/ner Angela Merkel met Emmanuel Macron in Paris to discuss the European Union budget.",
    "qa": "/ask Where is the Eiffel Tower? | The Eiffel Tower is a wrought-iron lattice tower in Paris, France. "
          "It was designed by Gustave Eiffel's company and completed in 1889.",
    "chat": "/chat What is the capital of France?",
}


async def measure(config: Config, runs: int) -> dict:
    from bot.app import load_engine, open_app

    started = time.perf_counter()
    engine = await asyncio.to_thread(load_engine, config, progress=False)
    loaded = time.perf_counter() - started
    results: dict = {"engine_load_s": round(loaded, 2), "adapters": sorted(engine.adapters)}
    async with open_app(config, engine=engine) as app:
        first = time.perf_counter()
        await app.core.handle(Incoming(platform="bench", chat_id="c0", user_id="u0", text=INPUTS["sentiment"]))
        results["cold_start_s"] = round(loaded + time.perf_counter() - first, 2)
        for skill, text in INPUTS.items():
            times = []
            for i in range(runs):
                msg = Incoming(platform="bench", chat_id=f"{skill}{i}", user_id=f"u{i}", text=text)
                t = time.perf_counter()
                reply = await app.core.handle(msg)
                times.append((time.perf_counter() - t) * 1000)
                assert reply is not None and reply.kind == "answer", reply
            results[skill] = summary(times) | {"adapter": reply.adapter}
        first_token, rates = [], []
        for i in range(max(3, runs // 4)):
            marks: list[float] = []

            async def sink(_text: str, marks: list[float] = marks) -> None:
                marks.append(time.perf_counter())

            t = time.perf_counter()
            reply = await app.core.handle(
                Incoming(platform="bench", chat_id=f"story{i}", user_id=f"u{i}", text="/story a brave little mouse"),
                sink,
            )
            first_token.append((marks[0] - t) * 1000)
            tokens = reply.usage.completion_tokens
            if len(marks) > 1 and tokens > 1:
                rates.append((tokens - 1) / (marks[-1] - marks[0]))
        results["story"] = summary(first_token) | {
            "metric": "first token", "tokens_per_s": round(sorted(rates)[len(rates) // 2], 1) if rates else None,
            "adapter": reply.adapter,
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--config", default=str(REPO / "config.toml"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = replace(load_config(args.config), store={"path": str(Path(tmp) / "bench.db")},
                         access={"rate_limit_per_minute": 0}, story={"max_new_tokens": 64})
        results = asyncio.run(measure(config, args.runs))
    results["sentiment_p50_ms"] = results["sentiment"]["p50_ms"]
    path = write_result("latency", results)
    print(f"{'skill':10} {'p50 ms':>8} {'p95 ms':>8}  adapter")
    for skill in ("sentiment", "ner", "qa", "chat", "story"):
        r = results[skill]
        extra = f"  first token; {r['tokens_per_s']} tok/s" if skill == "story" else ""
        print(f"{skill:10} {r['p50_ms']:8.1f} {r['p95_ms']:8.1f}  {r['adapter'] or 'base'}{extra}")
    print(f"engine load {results['engine_load_s']} s; cold start to first reply {results['cold_start_s']} s")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
