"""Adapter hot-load time and memory, cold start to the first reply, and RSS with every adapter loaded.

    .venv/bin/python -m bench.startup [--loads 5] [--threads -1]

* hot-load: a running engine (no request in flight) is given one more adapter folder and
  ``reload_adapters()`` is awaited: scan + validation + reading the safetensors + attaching it. Median
  over ``--loads`` cycles per adapter (the folder is removed again in between), for the fast backend
  and for the PEFT backend (``PeftModel.load_adapter``, the baseline). The files are in the page cache
  (as after any earlier start); memory per adapter is what its stacked LoRA weights take.
* cold start: a fresh Python process (cached converted model) imports lorabot, loads the base model and
  every adapter as ``lorabot run`` does (``LocalEngine.from_config``: the fast backend reads the folder
  without importing transformers, the PEFT backend through transformers), opens the app and answers one
  ``/sentiment`` message through the core; measured from spawning the process to the reply. Its RSS
  then (file-backed model pages included) is ``rss_mb``. Both for the fast backend and for the PEFT
  backend (baseline).
Uses the trained adapters when adapters/ holds them, else random ones of the real shape.
Results: bench/results/startup.json and .png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS, adapters_for_bench, chart, choose_threads, rss_mb, set_threads, write_result

REPO = Path(__file__).resolve().parents[1]


async def hotload(backend: str, adapters_dir: Path, scratch: Path, loads: int) -> dict[str, Any]:
    from bot.engine.loading import BUNDLED, load_model, resolve_base
    from bot.engine.scheduler import LocalEngine

    base = resolve_base(BUNDLED, progress=False)
    model, tok = load_model(base.path, dtype="float32", device="cpu")
    live = scratch / f"live-{backend}"
    live.mkdir()
    engine = LocalEngine(model, tok, base, live, backend=backend)
    # One request first, so that the timings below are of a warm, running engine.
    await engine.classify("Text: hi\nSentiment:", [" negative", " positive"], None)
    per_adapter: dict[str, list[float]] = {}
    memory: dict[str, float] = {}
    names = sorted(p.name for p in adapters_dir.iterdir() if (p / "adapter_model.safetensors").is_file())
    for _ in range(loads):
        for name in names:
            shutil.copytree(adapters_dir / name, live / name)
            before = rss_mb()
            t = time.perf_counter()
            await engine.reload_adapters()
            per_adapter.setdefault(name, []).append((time.perf_counter() - t) * 1000)
            assert name in engine.adapters, engine.problems
            if engine._backend.adapter_bytes(engine._live[name]):
                memory[name] = engine._backend.adapter_bytes(engine._live[name]) / 2**20
            else:
                memory.setdefault(name, rss_mb() - before)
            shutil.rmtree(live / name)
            await engine.reload_adapters()
    # All of them attached at once (what a start does), to check the memory they take together.
    for name in names:
        shutil.copytree(adapters_dir / name, live / name)
    before = rss_mb()
    t = time.perf_counter()
    await engine.reload_adapters()
    all_ms = (time.perf_counter() - t) * 1000
    together = rss_mb() - before
    await engine.close()
    medians = {n: round(statistics.median(v), 1) for n, v in per_adapter.items()}
    return {"backend": backend, "per_adapter_ms": medians, "hotload_ms": round(statistics.median(
        [x for v in per_adapter.values() for x in v]), 1), "all_at_once_ms": round(all_ms, 1),
        "adapter_mb": {n: round(v, 1) for n, v in memory.items()}, "rss_delta_all_mb": round(together, 1)}


def cold_start(backend: str, adapters_dir: Path, threads: int) -> dict[str, Any]:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    started = time.time()
    out = subprocess.run(
        [sys.executable, "-m", "bench.startup", "--child", backend, "--adapters", str(adapters_dir),
         "--threads", str(threads)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    if out.returncode != 0:
        raise RuntimeError(f"cold-start child failed:\n{out.stderr[-3000:]}")
    child = json.loads(out.stdout.strip().splitlines()[-1])
    child["cold_start_s"] = round(child.pop("replied_at") - started, 2)
    return child


async def child(backend: str, adapters_dir: Path, threads: int) -> None:
    """The cold-start process: everything a `lorabot run` does before its first reply."""
    marks = {"spawned_to_main": time.time()}
    from bot.app import open_app
    from bot.config import Config, replace
    from bot.engine.scheduler import LocalEngine
    from bot.messages import Incoming

    torch_threads = threads
    marks["imports"] = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        config = replace(Config(), store={"path": str(Path(tmp) / "bot.db")}, adapters={"dir": str(adapters_dir)},
                         model={"threads": torch_threads}, access={"rate_limit_per_minute": 0},
                         engine={"backend": backend})
        # As `lorabot run` does: the fast backend loads the folder without transformers (bot/engine/light_model.py),
        # and without torch where the torch-free engine can run it (bot/engine/native_llama.py).
        engine = LocalEngine.from_config(config, progress=False)
        marks["engine_loaded"] = time.time()
        async with open_app(config, engine=engine) as app:
            reply = await app.core.handle(Incoming(platform="bench", chat_id="c", user_id="u",
                                                   text="/sentiment What a wonderful film, I loved every minute."))
            assert reply is not None and reply.kind == "answer", reply
            replied = time.time()
            rss = rss_mb()
            adapters = sorted(engine.adapters)
    print(json.dumps({"backend": backend, "replied_at": replied, "rss_mb": round(rss, 1), "adapters": adapters,
                      "threads": torch_threads, "transformers_imported": "transformers" in sys.modules,
                      "torch_imported": "torch" in sys.modules,
                      "phases_s": {
                          "imports": round(marks["imports"] - marks["spawned_to_main"], 2),
                          "engine_load": round(marks["engine_loaded"] - marks["imports"], 2),
                          "first_reply": round(replied - marks["engine_loaded"], 2)}}))


def draw(results: dict[str, Any]) -> Any:
    def figure(plt: Any) -> None:
        fig, (a, b, c) = plt.subplots(1, 3, figsize=(11, 3.6))
        backends = ["fast", "peft"]
        a.bar(backends, [results["hotload"][x]["hotload_ms"] for x in backends], color=["tab:blue", "tab:gray"])
        a.axhline(30, ls="--", c="r", lw=1)
        a.set_title("adapter hot-load (ms, median)")
        b.bar(backends, [results["cold"][x]["cold_start_s"] for x in backends], color=["tab:blue", "tab:gray"])
        b.axhline(3, ls="--", c="r", lw=1)
        b.set_title("cold start to first reply (s)")
        c.bar(backends, [results["cold"][x]["rss_mb"] for x in backends], color=["tab:blue", "tab:gray"])
        c.axhline(600, ls="--", c="r", lw=1)
        c.set_title("RSS, base + all adapters (MB)")
        fig.suptitle(f"{results['adapters']}; red: the issue's targets", fontsize=8)

    return figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loads", type=int, default=5)
    parser.add_argument("--threads", type=int, default=-1, help="-1 auto (1 on a shared CPU), 0 all cores")
    parser.add_argument("--child", choices=["fast", "peft"], help=argparse.SUPPRESS)
    parser.add_argument("--adapters", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        asyncio.run(child(args.child, args.adapters, args.threads))
        return
    threads, why = choose_threads(args.threads)
    set_threads(threads)
    from bot.engine.loading import BUNDLED, resolve_base

    base = resolve_base(BUNDLED, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        adapters_dir, note = adapters_for_bench(REPO / "adapters", base.path, base.name, Path(tmp))
        results: dict[str, Any] = {"adapters": note, "threads": threads, "threads_choice": why,
                                   "hotload": {}, "cold": {}}
        for backend in ("fast", "peft"):
            results["hotload"][backend] = asyncio.run(hotload(backend, adapters_dir, Path(tmp), args.loads))
        for backend in ("fast", "peft"):  # each in a fresh process; interleave a second round if time allows
            results["cold"][backend] = cold_start(backend, adapters_dir, threads)
    fast, peft = results["hotload"]["fast"], results["hotload"]["peft"]
    results["hotload_ms"] = fast["hotload_ms"]
    results["hotload_ms_peft"] = peft["hotload_ms"]
    results["adapter_mb"] = round(statistics.median(fast["adapter_mb"].values()), 1)
    results["cold_start_s"] = results["cold"]["fast"]["cold_start_s"]
    results["cold_start_s_peft"] = results["cold"]["peft"]["cold_start_s"]
    results["rss_mb"] = results["cold"]["fast"]["rss_mb"]
    results["rss_mb_peft"] = results["cold"]["peft"]["rss_mb"]
    path = write_result("startup", results)
    chart(RESULTS / "startup.png", draw(results))
    print(f"{'':22} {'fast':>10} {'peft':>10}")
    print(f"{'hot-load ms (median)':22} {fast['hotload_ms']:>10} {peft['hotload_ms']:>10}")
    print(f"{'cold start s':22} {results['cold_start_s']:>10} {results['cold_start_s_peft']:>10}")
    print(f"{'RSS MB':22} {results['rss_mb']:>10} {results['rss_mb_peft']:>10}")
    print(f"memory per adapter: {results['adapter_mb']} MB (fp32 LoRA weights); cold-start phases (fast): "
          f"{results['cold']['fast']['phases_s']}")
    print(f"threads: {threads} ({why}); wrote {path}")


if __name__ == "__main__":
    main()
