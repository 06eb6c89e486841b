"""One-message latency per skill on the real bundled model, through the real core, engine and store.

    .venv/bin/python -m bench.latency [--runs 20] [--gen-runs N] [--threads -1]

Reports median and p95 per skill (sentiment, NER, QA with a short answer, story first token and
tokens/s, chat; story and chat capped at 64 new tokens), the cold start (cached model: engine load in
this process) to first reply, and writes bench/results/latency.json and latency.png. Uses the adapters
of config.toml's folder when it holds valid ones, else random LoRA adapters of the real shape (one per
skill), so adapter cost is included. ``--gen-runs`` (default: ``--runs``) sets the runs of the
generating skills (ner, qa, chat, story).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from bench.common import RESULTS, adapters_for_bench, chart, choose_threads, summary, write_result
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


async def measure(config: Config, runs: int, gen_runs: int | None = None) -> dict:
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
            for i in range(runs if skill == "sentiment" or gen_runs is None else gen_runs):
                msg = Incoming(platform="bench", chat_id=f"{skill}{i}", user_id=f"u{i}", text=text)
                t = time.perf_counter()
                reply = await app.core.handle(msg)
                times.append((time.perf_counter() - t) * 1000)
                assert reply is not None and reply.kind == "answer", reply
            results[skill] = summary(times) | {"adapter": reply.adapter}
            if skill == "sentiment":
                results[skill]["prompt_tokens"] = reply.usage.prompt_tokens
        results["qa_one_reading"] = await one_reading(app, config, runs if gen_runs is None else gen_runs)
        first_token, rates = [], []
        for i in range(max(3, runs if gen_runs is None else gen_runs)):
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
        results["sentiment_engine"] = await sentiment_vs_peft(engine, config, runs)
    return results


async def one_reading(app: object, config: Config, runs: int) -> dict:
    """The QA message without the order check (one reading), alternating with it, on the same engine: what
    the second reading costs."""
    from bot.core import Core

    single = Core(replace(config, qa={"order_check": False}), app.engine, app.store)  # type: ignore[attr-defined]
    times: dict[str, list[float]] = {"one_reading": [], "order_check": []}
    for i in range(runs):
        for name, core in (("one_reading", single), ("order_check", app.core)):  # type: ignore[attr-defined]
            msg = Incoming(platform="bench", chat_id=f"qa-{name}{i}", user_id=f"v{i}", text=INPUTS["qa"])
            t = time.perf_counter()
            reply = await core.handle(msg)
            times[name].append((time.perf_counter() - t) * 1000)
            assert reply is not None and reply.kind == "answer", reply
    out = {name: summary(values) for name, values in times.items()}
    out["ratio_p50"] = round(out["order_check"]["p50_ms"] / out["one_reading"]["p50_ms"], 2)
    return out


async def sentiment_vs_peft(engine: object, config: Config, runs: int) -> dict:
    """The sentiment call alone (engine.classify), this engine against the PEFT backend (the baseline),
    alternating between the two so that both see the same machine load."""
    from bot.engine.loading import load_model, resolve_base
    from bot.engine.scheduler import LocalEngine
    from bot.skills import SentimentFormat

    base = resolve_base(config.model.base, progress=False)
    model, tok = load_model(base.path, dtype=config.model.dtype, device=config.model.device)
    peft = LocalEngine(model, tok, base, config.path(config.adapters.dir), backend="peft")
    name = next((n for n, a in sorted(engine.adapters.items()) if a.task == "sentiment"), None)  # type: ignore[attr-defined]
    prompt = SentimentFormat.prompt(INPUTS["sentiment"].split(" ", 1)[1])
    choices = [SentimentFormat.continuation(x) for x in SentimentFormat.default_labels]
    times: dict[str, list[float]] = {"engine": [], "peft": []}
    try:
        for i in range(runs + 1):
            for key, eng in (("engine", engine), ("peft", peft)):
                t = time.perf_counter()
                await eng.classify(prompt, choices, name)  # type: ignore[attr-defined]
                if i:  # the first round warms both up
                    times[key].append((time.perf_counter() - t) * 1000)
    finally:
        await peft.close()
    return {"backend": getattr(engine, "backend", "?"), "engine": summary(times["engine"]),
            "peft": summary(times["peft"])}


def sentiment_floor(base_dir: Path, prompt_tokens: int, threads: int) -> dict:
    """The least time any float32 engine needs for the sentiment prompt here: its tokens through the linear
    layers at this machine's best measured matmul rate (bench.roofline); the label logits are negligible."""
    from bench.roofline import least_seconds

    floor = least_seconds(base_dir, prompt_tokens, 0, threads)
    return {"matmul_peak": floor["matmul_peak"], "sentiment_gflop": round(floor["gflop"], 2),
            "sentiment_floor_ms": round(floor["seconds"] * 1000, 1)}


def draw(results: dict) -> object:
    def figure(plt: object) -> None:
        skills = ["sentiment", "ner", "qa", "chat", "story"]
        p50 = [results[s]["p50_ms"] for s in skills]
        p95 = [results[s]["p95_ms"] for s in skills]
        _fig, ax = plt.subplots(figsize=(7, 3.8))  # type: ignore[attr-defined]
        ax.bar(skills, p50, color="tab:blue", label="p50")
        ax.errorbar(skills, p50, yerr=[[0] * len(skills), [b - a for a, b in zip(p50, p95, strict=True)]],
                    fmt="none", ecolor="k", capsize=4, label="p95")
        ax.axhline(40, ls="--", c="r", lw=1, label="sentiment target (40 ms)")
        ax.set_yscale("log")
        ax.set_ylabel("ms per message (story: first token)")
        ax.legend(fontsize=8)
        ax.set_title(f"latency per skill, real SmolLM2-135M; {results['threads']} thread(s)", fontsize=9)

    return figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--gen-runs", type=int, default=None, help="runs of ner/qa/chat/story (default --runs)")
    parser.add_argument("--threads", type=int, default=-1, help="-1 auto (1 on a shared CPU), 0 all cores")
    parser.add_argument("--config", default=str(REPO / "config.toml"))
    args = parser.parse_args()
    threads, why = choose_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(args.config)
        from bot.engine.loading import resolve_base

        base = resolve_base(config.model.base, progress=False)
        adapters_dir, note = adapters_for_bench(config.path(config.adapters.dir), base.path, base.name, Path(tmp))
        config = replace(config, store={"path": str(Path(tmp) / "bench.db")}, adapters={"dir": str(adapters_dir)},
                         model={"threads": threads}, access={"rate_limit_per_minute": 0}, story={"max_new_tokens": 64},
                         generation={"max_new_tokens": 64})
        results = asyncio.run(measure(config, args.runs, args.gen_runs))
    results["adapters_used"] = note
    results["threads"], results["threads_choice"] = threads, why
    results["sentiment_p50_ms"] = results["sentiment"]["p50_ms"]
    results["sentiment_classify_p50_ms"] = results["sentiment_engine"]["engine"]["p50_ms"]
    results["sentiment_classify_p50_ms_peft"] = results["sentiment_engine"]["peft"]["p50_ms"]
    results |= sentiment_floor(base.path, results["sentiment"]["prompt_tokens"], threads)
    path = write_result("latency", results)
    chart(RESULTS / "latency.png", draw(results))
    print(f"{'skill':10} {'p50 ms':>8} {'p95 ms':>8}  adapter")
    for skill in ("sentiment", "ner", "qa", "chat", "story"):
        r = results[skill]
        extra = f"  first token; {r['tokens_per_s']} tok/s" if skill == "story" else ""
        print(f"{skill:10} {r['p50_ms']:8.1f} {r['p95_ms']:8.1f}  {r['adapter'] or 'base'}{extra}")
    qa = results["qa_one_reading"]
    print(f"qa, one reading vs the order check (alternating): p50 {qa['one_reading']['p50_ms']} vs "
          f"{qa['order_check']['p50_ms']} ms ({qa['ratio_p50']}x)")
    se = results["sentiment_engine"]
    print(f"sentiment classify alone: {se['backend']} backend p50 {se['engine']['p50_ms']} ms, "
          f"PEFT backend p50 {se['peft']['p50_ms']} ms (alternating)")
    print(f"sentiment floor here: {results['sentiment_floor_ms']} ms ({results['sentiment']['prompt_tokens']} "
          f"prompt tokens = {results['sentiment_gflop']} GFLOP of linear layers at {results['matmul_peak']['gflops']} "
          f"GFLOP/s, the best float32 matmul here, {results['matmul_peak']['by']})")
    print(f"engine load {results['engine_load_s']} s; cold start to first reply {results['cold_start_s']} s; "
          f"adapters: {results['adapters_used']}; threads {results['threads']} ({results['threads_choice']})")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
