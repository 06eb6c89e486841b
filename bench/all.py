"""Every CPU benchmark in one go (``make bench``), in about 15 minutes, then the summary table.

    .venv/bin/python -m bench.all [--threads -1] [--quick]

Each benchmark runs in its own process (so one's memory and threads do not colour the next) and writes
its JSON (and PNG) into bench/results/: latency, concurrency, startup, train, gpu_check (a CPU smoke test
of the GPU script when there is no CUDA device), serve (lorabot serve against the in-process engine),
kv_memory (a long prompt among short chats, with the KV budget and without), llamacpp (lorabot beside
llama.cpp on the same GGUF and adapters). The
torch thread count is decided once, before anything runs (-1 = auto: all cores on an idle machine, 1 when
other processes already use the CPU) and passed to each. Afterwards the headline figures are gathered
into bench/results/summary.json with their baselines (measured in the same process as each figure) and
the issue's targets.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS, choose_threads, write_result

REPO = Path(__file__).resolve().parents[1]

# (module, arguments, time limit in seconds); --quick runs each with smaller settings (a smoke test).
PLAN: list[tuple[str, list[str], list[str], int]] = [
    ("latency", ["--runs", "20"], ["--runs", "3", "--gen-runs", "1"], 300),
    ("concurrency", ["--chats", "1", "4", "8", "16", "--requests", "16"], ["--chats", "1", "4", "--requests", "4"],
     330),
    ("startup", ["--loads", "3"], ["--loads", "1"], 90),
    ("train", ["--examples", "160", "--dev", "128"], ["--examples", "32", "--dev", "16"], 360),
    ("gpu_check", [], [], 60),
    ("serve", ["--runs", "20"], ["--requests", "4", "--chats", "4", "--rounds", "1", "--runs", "3"], 300),
    # RSS of one 2,000-token QA prompt among 15 short chats, with the KV budget and without.
    ("kv_memory", [], ["--short", "3", "--long-tokens", "400"], 300),
    # lorabot beside llama.cpp (its rows are skipped, with the reason, when llama-cpp-python is missing).
    ("llamacpp", ["--rounds", "2"], ["--rounds", "1", "--runs", "1", "--new-tokens", "16", "--b16-new-tokens", "8",
                                     "--classify-runs", "3", "--torch-engine", "no"], 900),
]

# (figure, results file, value key, baseline key, target, test(value, results), what the baseline is)
FIGURES: list[tuple[str, str, str, str | None, str, Any, str]] = [
    ("kv_mix_extra_mb", "kv_memory", "kv_mix_extra_mb", "kv_mix_extra_mb_unbounded", "below unbounded",
     lambda v, r: v < r["kv_mix_extra_mb_unbounded"], "no KV budget (kv_token_budget = 0)"),
    ("sentiment_p50_ms", "latency", "sentiment_p50_ms", "sentiment_classify_p50_ms_peft", "<= 40 ms",
     lambda v, r: v <= 40, "PEFT backend (classify alone, alternating)"),
    ("mixed_vs_naive_16", "concurrency", "mixed_vs_naive_16", None, ">= 4x", lambda v, r: v >= 4,
     "naive: one request at a time, set_adapter"),
    ("aggregate_tok_s_16", "concurrency", "aggregate_tok_s_16", "naive_tok_s_16", ">= 300 tok/s",
     lambda v, r: v >= 300, "naive"),
    ("hotload_ms", "startup", "hotload_ms", "hotload_ms_peft", "<= 30 ms", lambda v, r: v <= 30,
     "PEFT load_adapter"),
    ("cold_start_s", "startup", "cold_start_s", "cold_start_s_peft", "<= 3 s", lambda v, r: v <= 3,
     "PEFT backend"),
    ("rss_mb", "startup", "rss_mb", "rss_mb_peft", "<= 600 MB", lambda v, r: v <= 600, "PEFT backend"),
    ("train_speedup", "train", "train_speedup", None, ">= 1.5x, dev score >= baseline's",
     lambda v, r: v >= 1.5 and r["dev_accuracy"] >= r["dev_accuracy_trainer"], "transformers.Trainer"),
    ("gpu_tok_s_64", "gpu_check", "gpu_tok_s_64", None, ">= 10,000 tok/s", lambda v, r: v >= 10_000, ""),
    # lorabot serve: no target, the HTTP layer's cost is reported (test None: nothing to meet).
    ("http_vs_inprocess_16", "serve", "http_vs_inprocess_16", None, "reported", None,
     "in-process engine, same workload, same run"),
    ("skills_sentiment_p50_ms", "serve", "skills_sentiment_p50_ms", "core_sentiment_p50_ms", "reported", None,
     "the same message through the core, no HTTP"),
    # Against llama.cpp in the same run (bench.llamacpp, issue 15's goals); nothing to meet when it was skipped.
    ("vs_llama_single", "llamacpp", "single_tok_s", "llamacpp_single_tok_s", "reported", None,
     "llama.cpp, same GGUF, one chat"),
    ("vs_llama_adapter", "llamacpp", "single_adapter_tok_s", "llamacpp_adapter_tok_s", ">= 1.2x llama.cpp",
     lambda v, r: _vs(r, "llamacpp_adapter_tok_s", lambda b: v >= 1.2 * b), "llama.cpp, story LoRA as GGUF"),
    ("vs_llama_16", "llamacpp", "aggregate_tok_s_16", "llamacpp_b16_tok_s", ">= 1.2x llama.cpp",
     lambda v, r: _vs(r, "llamacpp_b16_tok_s", lambda b: v >= 1.2 * b), "llama.cpp, 16 sequences, no adapter"),
    ("vs_llama_sentiment", "llamacpp", "sentiment_p50_ms", "llamacpp_classify_ms", "<= 0.5x llama.cpp's ms",
     lambda v, r: _vs(r, "llamacpp_classify_ms", lambda b: v <= 0.5 * b), "llama.cpp, one decode, label logits"),
    ("vs_llama_cold_start", "llamacpp", "cold_start_s", "llamacpp_cold_start_s", "<= 1.5 s", lambda v, r: v <= 1.5,
     "llama.cpp"),
    ("vs_llama_rss", "llamacpp", "rss_mb", "llamacpp_rss_mb", "<= 1.2x llama.cpp's MB",
     lambda v, r: _vs(r, "llamacpp_rss_mb", lambda b: v <= 1.2 * b), "llama.cpp, the same adapters loaded"),
]


def _vs(results: dict[str, Any], key: str, test: Any) -> bool | None:
    """A goal relative to llama.cpp's figure; None (nothing to meet) when llama.cpp was not measured."""
    baseline = results.get(key)
    return bool(test(baseline)) if isinstance(baseline, int | float) and baseline else None

# What no float32 engine could beat on this machine (bench.roofline): the floor under a latency, the
# ceiling over a throughput, measured in the same process as the figure.
MACHINE_LIMITS = {"sentiment_p50_ms": "sentiment_floor_ms", "aggregate_tok_s_16": "aggregate_ceiling_tok_s_16",
                  "vs_llama_single": "single_ceiling_tok_s"}


def run(module: str, args: list[str], limit: int) -> dict[str, Any]:
    started = time.perf_counter()
    print(f"\n=== bench.{module} {' '.join(args)}", flush=True)
    try:
        done = subprocess.run([sys.executable, "-m", f"bench.{module}", *args], cwd=REPO, timeout=limit)
        status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
    except subprocess.TimeoutExpired:
        status = f"stopped after its {limit} s limit"
    return {"status": status, "seconds": round(time.perf_counter() - started, 1)}


def load(name: str) -> dict[str, Any]:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def summary_rows(ran: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for figure, file, key, base_key, target, test, base_name in FIGURES:
        data = load(file) if ran.get(file, {}).get("status") == "ok" else {}
        value = data.get(key)
        baseline = data.get(base_key) if base_key else None
        if figure in ("mixed_vs_naive_16", "train_speedup", "http_vs_inprocess_16") and value is not None:
            baseline = 1.0  # the figure is already a ratio to its baseline
        ratio = None
        if isinstance(value, int | float) and isinstance(baseline, int | float) and baseline:
            lower_is_better = figure in ("sentiment_p50_ms", "hotload_ms", "cold_start_s", "rss_mb",
                                         "skills_sentiment_p50_ms", "vs_llama_sentiment", "vs_llama_cold_start",
                                         "vs_llama_rss")
            ratio = round(baseline / value if lower_is_better else value / baseline, 2)
        verdict = test(value, data) if isinstance(value, int | float) and test is not None else None
        met = None if verdict is None else bool(verdict)
        note = data.get("note") or data.get("skipped") or ("" if data else ran.get(file, {}).get("status", ""))
        rows.append({"figure": figure, "value": value, "baseline": baseline, "baseline_is": base_name,
                     "ratio": ratio, "target": target, "met": met,
                     "machine_limit": data.get(MACHINE_LIMITS.get(figure, "")), "note": note})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=-1, help="-1 auto (1 on a shared CPU), 0 all cores")
    parser.add_argument("--quick", action="store_true", help="small settings: checks that everything runs")
    parser.add_argument("--only", nargs="+", help="run only these benchmarks (the summary reads the others' files)")
    args = parser.parse_args()
    threads, why = choose_threads(args.threads)
    print(f"torch threads for every benchmark: {threads} ({why})", flush=True)
    started = time.perf_counter()
    ran: dict[str, dict[str, Any]] = {}
    for module, full, quick, limit in PLAN:
        if args.only and module not in args.only:
            ran[module] = {"status": "ok" if (RESULTS / f"{module}.json").is_file() else "not run"}
            continue
        extra = quick if args.quick else full
        if module == "gpu_check":
            import torch

            extra = [] if torch.cuda.is_available() else ["--device", "cpu", "--max-batch", "4"]
        else:
            extra = [*extra, "--threads", str(threads)]
        ran[module] = run(module, extra, limit)
    rows = summary_rows(ran)
    total = round(time.perf_counter() - started, 1)
    path = write_result("summary", {"threads": threads, "threads_choice": why, "total_s": total, "runs": ran,
                                    "figures": rows})
    print(f"\n{'figure':20} {'value':>10} {'baseline':>10} {'ratio':>7}  {'target':32} met  machine limit")
    for r in rows:
        value = "-" if r["value"] is None else r["value"]
        base = "-" if r["baseline"] is None else r["baseline"]
        ratio = "-" if r["ratio"] is None else f"{r['ratio']}x"
        met = {True: "yes", False: "NO", None: "-"}[r["met"]]
        limit = "" if r["machine_limit"] is None else f"{r['machine_limit']}  "
        print(f"{r['figure']:20} {value!s:>10} {base!s:>10} {ratio:>7}  {r['target']:32} {met:3}  {limit}{r['note']}")
    done = ", ".join(f"{k} {v['status']} ({v.get('seconds', 0)} s)" for k, v in ran.items())
    print(f"\nbenchmarks: {done}")
    print(f"total {total} s; threads {threads} ({why}); wrote {path}")


if __name__ == "__main__":
    main()
