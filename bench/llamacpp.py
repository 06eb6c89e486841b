"""lorabot side by side with llama.cpp (llama-cpp-python) on the same CPU, the same GGUF and the same adapters.

    .venv/bin/python -m bench.llamacpp [--rounds 2] [--runs 2] [--new-tokens 128] [--threads -1]

The rows of issue 15, each measured for both engines in this run, with the same token ids, threads and
greedy decoding (end-of-sequence banned, so every generation is exactly ``--new-tokens`` long):

* ``single_tok_s`` / ``llamacpp_single_tok_s``: one chat ("Write a short story about a fox who wanted to
  fly." in the model's chat template), completion tokens / wall time, prefill included; lorabot through
  ``engine.generate``, llama.cpp through ``Llama.create_completion``;
* ``single_adapter_tok_s`` / ``llamacpp_adapter_tok_s``: the same with the shipped ``story`` adapter
  (for llama.cpp exported with ``bot.adapter_gguf.export_gguf``, as ``lorabot export-gguf`` does);
* ``aggregate_tok_s_16`` / ``llamacpp_b16_tok_s``: 16 chats at once, prefill included. lorabot: 16
  concurrent ``generate`` calls over the four shipped adapters (four rows each); llama.cpp: one context
  with 16 sequences, no adapter (its best case: it does not batch different adapters together), through
  its low-level batch API (``llama_batch`` + ``llama_decode``, greedy sampler in C);
* ``sentiment_p50_ms`` / ``llamacpp_classify_ms``: a sentiment prompt of about 25 tokens, the label
  probabilities from one forward pass, with the ``sentiment`` adapter on both sides (lorabot
  ``engine.classify``; llama.cpp one ``llama_decode`` and the label logits). The 1-token completion with
  ``logprobs`` through llama-cpp-python's high-level API (the way the issue first measured it) is
  ``llamacpp_completion_logprobs_ms``;
* ``cold_start_s`` / ``llamacpp_cold_start_s``: process spawn to the first sentiment answer (cached model);
* ``rss_mb`` / ``llamacpp_rss_mb``: resident memory after the single-chat runs, the base model and the
  same adapters loaded on both sides: every folder in adapters/, as ``lorabot run`` loads them (the
  JSON lists both sides' adapters).

Each engine runs in its own child process (clean memory and threads), the children alternate for
``--rounds`` rounds and each figure is the median over the rounds. lorabot is loaded as ``lorabot run``
loads it (``LocalEngine.from_config``); the JSON says which dtype, backend and kernel it ran with. When
the configured dtype is not float32 (``auto`` picks bfloat16 on CPUs with native bf16) lorabot is also
measured at float32 (the CPU kernel over the GGUF's Q4_1 weights, the same numbers llama.cpp reads),
under ``float32``; with ``--int8 yes`` (the default) once more with ``engine.int8_activations`` (opt-in,
approximate), under ``int8``; with ``--torch-engine yes`` (the default) once more on its torch engine
(``LORABOT_TORCH_ENGINE=1``: ``FastLlama``, what served before the torch-free ``NativeLlama``), under
``torch_engine``. A third child measures the machine's limits (memory bandwidth, float32 matmul peak).
When llama-cpp-python cannot be imported (the optional ``bench`` extra: ``pip install -e '.[bench]'``)
its rows are None and ``llamacpp_skipped`` says why. Ratios are lorabot / llama.cpp for every row.
Results: bench/results/llamacpp.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import choose_threads, percentile, rss_mb, write_result

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Write a short story about a fox who wanted to fly."
THEMES = ["a fox who wanted to fly", "a brave little mouse", "a dragon who loved tea", "the last lighthouse keeper",
          "a robot learning to paint", "a cat who ran a bakery", "a river that forgot its way",
          "an owl who feared the dark", "a snowman in summer", "a lost kite", "a turtle who raced the wind",
          "a clock that ran backwards", "a whale who sang opera", "a shy volcano", "a pirate who hated the sea",
          "a garden on the moon"]
SENTIMENT_TEXT = "The film was a delight from start to finish, and I would happily watch it again soon."
MIXED = ("story", "sentiment", "ner", "qa")   # the shipped adapters, one per four rows of the 16
LLAMACPP_CTX = 512                            # llama-cpp-python's default n_ctx: prompt + 128 tokens fit
SKIP_HINT = "install the optional bench extra (make bench tries: .venv/bin/pip install -e '.[bench]', a source build)"

# (row, lorabot key, llama.cpp key, higher is better, goal on lorabot / llama.cpp or None)
ROWS: list[tuple[str, str, str, bool, str | None]] = [
    ("one chat, no adapter (tok/s)", "single_tok_s", "llamacpp_single_tok_s", True, None),
    ("one chat, story adapter (tok/s)", "single_adapter_tok_s", "llamacpp_adapter_tok_s", True, ">= 1.2"),
    ("16 chats (tok/s; lorabot: 4 adapters)", "aggregate_tok_s_16", "llamacpp_b16_tok_s", True, ">= 1.2"),
    ("sentiment, 25 tokens (ms)", "sentiment_p50_ms", "llamacpp_classify_ms", False, "<= 0.5"),
    ("cold start to first reply (s)", "cold_start_s", "llamacpp_cold_start_s", False, None),
    ("RSS, base + every adapter (MB)", "rss_mb", "llamacpp_rss_mb", False, "<= 1.2"),
]


# ---------------------------------------------------------------- the work both engines get

def prepare(config_path: Path, scratch: Path, args: argparse.Namespace, threads: int) -> Path:
    """Render and tokenize the prompts once (the same ids for both engines), export the adapters as GGUF."""
    from bot.adapter_gguf import export_gguf
    from bot.config import load_config
    from bot.engine.light_model import LightTokenizer, read_config
    from bot.engine.loading import resolve_base
    from bot.skills import SentimentFormat

    config = load_config(config_path)
    base = resolve_base(config.model.base, progress=False)
    if base.gguf is None:
        raise SystemExit(f"{base.name} has no GGUF file: llama.cpp needs one")
    tok = LightTokenizer(base.path)

    def chat(text: str) -> str:
        return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)

    adapters_dir = config.path(config.adapters.dir)
    exported: dict[str, str] = {}
    export_problems: dict[str, str] = {}
    # Every adapter folder, as lorabot loads every one (so that memory is compared with the same adapters).
    folders = sorted(p.name for p in adapters_dir.iterdir() if (p / "adapter_model.safetensors").is_file())
    for name in folders:
        try:
            exported[name] = str(export_gguf(adapters_dir / name, scratch / f"{name}.gguf").path)
        except Exception as exc:  # the llama.cpp rows that need this adapter say why they are missing
            export_problems[name] = f"{type(exc).__name__}: {exc}"
    eos = {tok.eos_token_id, *_as_list(getattr(read_config(base.path), "eos_token_id", None))}
    b16 = [chat(f"Write a short story about {theme}.") for theme in THEMES]
    sentiment = SentimentFormat.prompt(SENTIMENT_TEXT)
    labels = [SentimentFormat.continuation(x) for x in SentimentFormat.default_labels]
    work = {
        "config": str(config_path), "adapters_dir": str(adapters_dir), "gguf": str(base.gguf),
        "model": base.name, "base_path": str(base.path), "threads": threads, "adapters_gguf": exported,
        "export_problems": export_problems,
        "eos_ids": sorted(i for i in eos if i is not None),
        "chat_prompt": chat(PROMPT), "chat_ids": tok(chat(PROMPT)).input_ids,
        "b16_prompts": b16, "b16_ids": [tok(p).input_ids for p in b16],
        "b16_adapters": [MIXED[i % len(MIXED)] for i in range(len(b16))],
        "sentiment_prompt": sentiment, "sentiment_ids": tok(sentiment).input_ids,
        "labels": labels, "label_ids": [tok(x).input_ids[0] for x in labels],
        "new_tokens": args.new_tokens, "b16_new_tokens": args.b16_new_tokens, "runs": args.runs,
        "classify_runs": args.classify_runs,
    }
    path = scratch / "work.json"
    path.write_text(json.dumps(work), encoding="utf-8")
    return path


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _median(values: list[float], digits: int = 1) -> float | None:
    return round(statistics.median(values), digits) if values else None


# ---------------------------------------------------------------- lorabot's child

async def lorabot_child(work: dict[str, Any], dtype: str, spawned_at: float, int8: bool = False) -> dict[str, Any]:
    from bot.config import load_config, replace
    from bot.engine import SamplingParams
    from bot.engine.scheduler import LocalEngine

    config = load_config(work["config"])
    model = {"threads": work["threads"]} | ({} if dtype == "config" else {"dtype": dtype})
    config = replace(config, model=model, engine={"int8_activations": True} if int8 else {})
    engine = await asyncio.to_thread(LocalEngine.from_config, config, progress=False)
    try:
        out: dict[str, Any] = {"engine": _engine_facts(engine), "adapters": sorted(engine.adapters)}
        missing = [a for a in MIXED if a not in engine.adapters]
        if missing:
            raise SystemExit(f"adapters {missing} are not loaded from {work['adapters_dir']}: {engine.problems}")
        first = await engine.classify(work["sentiment_prompt"], work["labels"], "sentiment")
        out["cold_start_s"] = round(time.time() - spawned_at, 2)
        out["prompt_tokens"] = {"chat": engine.count_tokens(work["chat_prompt"]), "sentiment": first.prompt_tokens}
        ban = tuple((i, -100.0) for i in work["eos_ids"])
        n = work["new_tokens"]

        async def chat(adapter: str | None, tokens: int) -> tuple[float, Any]:
            t = time.perf_counter()
            g = await engine.generate(work["chat_prompt"], SamplingParams(max_new_tokens=tokens, logit_bias=ban),
                                      adapter)
            return g.completion_tokens / (time.perf_counter() - t), g

        for adapter in (None, "story"):  # warm-up: first-call allocations, page faults
            await chat(adapter, 8)
        rates: dict[str | None, list[float]] = {None: [], "story": []}
        texts: dict[str | None, str] = {}
        for _ in range(work["runs"]):
            for adapter in (None, "story"):
                rate, g = await chat(adapter, n)
                rates[adapter].append(rate)
                texts[adapter] = g.text
        out["single_tok_s"], out["single_adapter_tok_s"] = _median(rates[None]), _median(rates["story"])
        out["single_text"], out["single_adapter_text"] = texts[None], texts["story"]
        out["rss_mb"] = round(rss_mb(), 1)

        times = []
        for i in range(work["classify_runs"] + 1):
            t = time.perf_counter()
            result = await engine.classify(work["sentiment_prompt"], work["labels"], "sentiment")
            if i:
                times.append((time.perf_counter() - t) * 1000)
        out["sentiment_p50_ms"] = _median(times)
        out["sentiment_p95_ms"] = round(percentile(times, 0.95), 1) if times else None
        out["sentiment_scores"] = {k.strip(): round(v, 4) for k, v in result.scores.items()}

        async def b16(adapters: list[str | None]) -> float:
            params = SamplingParams(max_new_tokens=work["b16_new_tokens"], logit_bias=ban)
            t = time.perf_counter()
            done = await asyncio.gather(*(engine.generate(p, params, a)
                                          for p, a in zip(work["b16_prompts"], adapters, strict=True)))
            return sum(g.completion_tokens for g in done) / (time.perf_counter() - t)

        out["aggregate_tok_s_16"] = _median([await b16(work["b16_adapters"])])
        out["aggregate_tok_s_16_base"] = _median([await b16([None] * len(work["b16_prompts"]))])
        out["rss_peak_mb"] = round(_peak_rss_mb(), 1)
        return out
    finally:
        await engine.close()


def _engine_facts(engine: Any) -> dict[str, Any]:
    """What the engine runs with: backend, dtype, CPU kernel, quantised weights (as ``lorabot doctor`` says).
    Imports torch only where the engine did (the torch-free engine's memory and start are measured)."""
    from bot.engine import kernels

    fast = getattr(engine._backend, "fast", None)
    torch_free = bool(getattr(engine._backend, "torch_free", False))
    facts: dict[str, Any] = {"backend": engine.backend, "torch_free": torch_free}
    if torch_free:
        facts |= {"threads": fast.threads, "dtype": "float32"}
    else:
        import torch

        facts |= {"threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}
        if fast is not None:
            facts["dtype"] = str(fast.dtype).removeprefix("torch.")
    if fast is not None:
        quant = any(isinstance(w, kernels.QuantWeight) for w in fast.layers[0].wqkv)
        facts |= {"kernel": fast.kernel is not None,
                  "weights": "GGUF Q4_1 blocks (CPU kernel)" if quant else f"{facts['dtype']} tensors"}
    return facts


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ---------------------------------------------------------------- llama.cpp's child

def llamacpp_child(work: dict[str, Any], spawned_at: float) -> dict[str, Any]:
    """llama.cpp's figures, or ``{"skipped": reason}`` when llama-cpp-python cannot be imported."""
    try:
        import llama_cpp
    except Exception as exc:  # not installed, or a build that does not load on this CPU
        return {"skipped": f"llama_cpp cannot be imported ({type(exc).__name__}: {exc}); {SKIP_HINT}",
                "skipped_short": f"{type(exc).__name__}: {exc}"}
    import ctypes

    threads = work["threads"]
    llm = llama_cpp.Llama(model_path=work["gguf"], n_ctx=LLAMACPP_CTX, n_threads=threads, n_threads_batch=threads,
                          verbose=False)
    loras = {}
    for name, path in work["adapters_gguf"].items():   # all of them, as lorabot loads every adapter folder
        adapter = llama_cpp.llama_adapter_lora_init(llm.model, path.encode())
        if adapter is None:
            raise RuntimeError(f"llama.cpp could not load the exported LoRA {path}")
        loras[name] = adapter

    def use(ctx: Any, name: str | None) -> None:
        chosen = [loras[name]] if name else []
        arr = (llama_cpp.llama_adapter_lora_p_ctypes * max(1, len(chosen)))(*chosen)
        scales = (ctypes.c_float * max(1, len(chosen)))(*([1.0] * len(chosen)))
        if llama_cpp.llama_set_adapters_lora(ctx, arr if chosen else None, len(chosen), scales if chosen else None):
            raise RuntimeError(f"llama.cpp could not apply the LoRA {name}")

    def classify() -> dict[str, float]:
        """One forward pass over the prompt, the label tokens' logits at its last position (softmax)."""
        import math

        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
        ids = work["sentiment_ids"]
        tokens = (llama_cpp.llama_token * len(ids))(*ids)
        if llama_cpp.llama_decode(llm.ctx, llama_cpp.llama_batch_get_one(tokens, len(ids))):
            raise RuntimeError("llama_decode failed")
        logits = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        values = [logits[i] for i in work["label_ids"]]
        top = max(values)
        exp = [math.exp(v - top) for v in values]
        return {label.strip(): e / sum(exp) for label, e in zip(work["labels"], exp, strict=True)}

    out: dict[str, Any] = {"version": llama_cpp.__version__, "n_ctx": LLAMACPP_CTX, "adapters": sorted(loras),
                           "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip()}
    have_sentiment = "sentiment" in loras
    use(llm.ctx, "sentiment" if have_sentiment else None)
    classify()
    out["llamacpp_cold_start_s"] = round(time.time() - spawned_at, 2)
    ban = {i: -100.0 for i in work["eos_ids"]}

    def chat(name: str | None, tokens: int) -> tuple[float, str]:
        use(llm.ctx, name)
        llm.reset()   # no reuse of the previous run's prompt cache: every run prefills
        t = time.perf_counter()
        done = llm.create_completion(work["chat_ids"], max_tokens=tokens, temperature=0.0, repeat_penalty=1.0,
                                     logit_bias=ban)
        return done["usage"]["completion_tokens"] / (time.perf_counter() - t), done["choices"][0]["text"]

    has_story = "story" in loras
    for name in (None, "story") if has_story else (None,):
        chat(name, 8)
    rates: dict[str | None, list[float]] = {None: [], "story": []}
    texts: dict[str | None, str] = {}
    for _ in range(work["runs"]):
        for name in (None, "story") if has_story else (None,):
            rate, texts[name] = chat(name, work["new_tokens"])
            rates[name].append(rate)
    out["llamacpp_single_tok_s"], out["llamacpp_adapter_tok_s"] = _median(rates[None]), _median(rates["story"])
    out["single_text"], out["single_adapter_text"] = texts.get(None), texts.get("story")
    out["llamacpp_rss_mb"] = round(rss_mb(), 1)

    if have_sentiment:
        use(llm.ctx, "sentiment")
        times = []
        for i in range(work["classify_runs"] + 1):
            t = time.perf_counter()
            scores = classify()
            if i:
                times.append((time.perf_counter() - t) * 1000)
        out["llamacpp_classify_ms"] = _median(times)
        out["llamacpp_classify_p95_ms"] = round(percentile(times, 0.95), 1) if times else None
        out["sentiment_scores"] = {k: round(v, 4) for k, v in scores.items()}
    use(llm.ctx, None)

    out |= llamacpp_batched(llama_cpp, llm, work, None)
    if has_story:
        with_story = llamacpp_batched(llama_cpp, llm, work, loras["story"])
        out["llamacpp_b16_adapter_tok_s"] = with_story["llamacpp_b16_tok_s"]
    one = llamacpp_batched(llama_cpp, llm, work, None, rows=1)
    out["llamacpp_single_native_tok_s"] = one["llamacpp_b16_tok_s"]
    if have_sentiment:
        out["llamacpp_completion_logprobs_ms"] = llamacpp_completion_logprobs(llama_cpp, work)
    out["llamacpp_rss_peak_mb"] = round(_peak_rss_mb(), 1)
    return out


def llamacpp_batched(llama_cpp: Any, llm: Any, work: dict[str, Any], lora: Any, rows: int = 16) -> dict[str, Any]:
    """``rows`` sequences in one context (prompts 0..rows-1 of the 16): one batch prefills them all, then
    every step decodes one token of each; greedy in C, end-of-sequence banned (every row runs to the end)."""
    import ctypes

    prompts = work["b16_ids"][:rows]
    steps = work["b16_new_tokens"]
    per_seq = -(-(max(len(p) for p in prompts) + steps + 1) // 256) * 256
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = per_seq * rows
    params.n_batch = max(sum(len(p) for p in prompts), rows)
    params.n_seq_max = rows
    params.n_threads = params.n_threads_batch = work["threads"]
    ctx = llama_cpp.llama_init_from_model(llm.model, params)
    if ctx is None:
        raise RuntimeError("llama_init_from_model failed for the batched context")
    batch = llama_cpp.llama_batch_init(params.n_batch, 0, 1)
    bias = (llama_cpp.llama_logit_bias * len(work["eos_ids"]))(
        *[llama_cpp.llama_logit_bias(token=i, bias=-float("inf")) for i in work["eos_ids"]])
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_logit_bias(
        llm.n_vocab(), len(work["eos_ids"]), bias))
    llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
    try:
        if lora is not None:
            arr = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(lora)
            if llama_cpp.llama_set_adapters_lora(ctx, arr, 1, (ctypes.c_float * 1)(1.0)):
                raise RuntimeError("llama.cpp could not apply the LoRA to the batched context")

        def fill(items: list[tuple[int, int, int, bool]]) -> None:
            for j, (token, pos, seq, logits) in enumerate(items):
                batch.token[j], batch.pos[j], batch.n_seq_id[j] = token, pos, 1
                batch.seq_id[j][0], batch.logits[j] = seq, int(logits)
            batch.n_tokens = len(items)

        def decode() -> None:
            if llama_cpp.llama_decode(ctx, batch):
                raise RuntimeError("llama_decode failed in the batched run")

        started = time.perf_counter()
        fill([(t, pos, s, pos == len(p) - 1) for s, p in enumerate(prompts) for pos, t in enumerate(p)])
        decode()
        last = [sum(len(p) for p in prompts[:s + 1]) - 1 for s in range(rows)]   # batch index of each row's logits
        prefilled = time.perf_counter()
        for step in range(steps):
            tokens = [llama_cpp.llama_sampler_sample(chain, ctx, i) for i in last]
            if step == steps - 1:
                break
            fill([(tok, len(p) + step, s, True) for s, (tok, p) in enumerate(zip(tokens, prompts, strict=True))])
            decode()
            last = list(range(rows))
        ended = time.perf_counter()
    finally:
        llama_cpp.llama_sampler_free(chain)
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
    generated = rows * steps
    return {"llamacpp_b16_tok_s": round(generated / (ended - started), 1),
            "llamacpp_b16_decode_tok_s": round(rows * (steps - 1) / (ended - prefilled), 1) if steps > 1 else None}


def llamacpp_completion_logprobs(llama_cpp: Any, work: dict[str, Any]) -> float | None:
    """The 1-token completion with logprobs through llama-cpp-python's high-level API (logits_all=True:
    the output layer runs at every prompt position), p50 ms."""
    threads = work["threads"]
    llm = llama_cpp.Llama(model_path=work["gguf"], n_ctx=LLAMACPP_CTX, n_threads=threads, n_threads_batch=threads,
                          logits_all=True, lora_path=work["adapters_gguf"]["sentiment"], verbose=False)
    times = []
    try:
        for i in range(work["classify_runs"] + 1):
            llm.reset()
            t = time.perf_counter()
            llm.create_completion(work["sentiment_ids"], max_tokens=1, temperature=0.0, logprobs=5)
            if i:
                times.append((time.perf_counter() - t) * 1000)
    finally:
        llm.close()
    return _median(times)


# ---------------------------------------------------------------- the machine's limits

def limits_child(work: dict[str, Any]) -> dict[str, Any]:
    """Memory bandwidth (a large float32 copy) and the float32 matmul peak, and what they allow per token."""
    import torch

    from bench.roofline import linear_params, matmul_peak_gflops
    from bot.engine.light_model import read_config

    threads = work["threads"]
    torch.set_num_threads(threads)
    src = torch.ones(64 * 2**20)            # 256 MB: far beyond every cache
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(6):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    bandwidth = 2 * src.numel() * 4 / best / 1e9     # read + write
    peak = matmul_peak_gflops(threads)
    config = read_config(Path(work["base_path"]))
    layers, head = linear_params(config)
    flop_token = 2.0 * (layers + head)
    gguf_bytes = Path(work["gguf"]).stat().st_size
    return {"bandwidth_gb_s": round(bandwidth, 1), "matmul_peak": peak, "gguf_mb": round(gguf_bytes / 2**20, 1),
            "gflop_per_token": round(flop_token / 1e9, 3),
            # One row reads every weight once per token: the GGUF's bytes at the copy bandwidth.
            "single_ceiling_tok_s_bandwidth": round(bandwidth * 1e9 / gguf_bytes, 1),
            "ceiling_tok_s_flops": round(peak["gflops"] * 1e9 / flop_token, 1)}


# ---------------------------------------------------------------- the parent

def spawn(side: str, work_path: Path, dtype: str = "config", int8: bool = False,
          torch_engine: bool = False) -> dict[str, Any]:
    """One child process; its last stdout line is its JSON. A failing child is reported, never raised.
    ``torch_engine``: lorabot on its torch engine (``LORABOT_TORCH_ENGINE``), the one it had before the
    torch-free engine, for a before/after in the same run."""
    started = time.time()
    cmd = [sys.executable, "-m", "bench.llamacpp", "--child", side, "--work", str(work_path), "--dtype", dtype,
           "--spawned-at", repr(started), *(["--int8-child"] if int8 else [])]
    env = {k: v for k, v in os.environ.items() if k != "LORABOT_TORCH_ENGINE"} | {"PYTHONWARNINGS": "ignore"}
    if torch_engine:
        env["LORABOT_TORCH_ENGINE"] = "1"
    try:
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return {"error": f"the {side} child ran past 900 s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"error": f"the {side} child failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}"}
    return json.loads(lines[-1])


def combine(children: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over the rounds of every number; the rest from the last good round."""
    good = [c for c in children if "error" not in c and "skipped" not in c]
    if not good:
        return children[-1] if children else {}
    out = dict(good[-1])
    for key, value in good[-1].items():
        values = [c[key] for c in good if isinstance(c.get(key), int | float) and not isinstance(c.get(key), bool)]
        if values and isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = round(statistics.median(values), 2)
    return out


def figures(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    """The issue's keys for one lorabot configuration against llama.cpp, ratios lorabot / llama.cpp."""
    out: dict[str, Any] = {}
    ratios: dict[str, float | None] = {}
    for _row, mine, peer, _higher, _goal in ROWS:
        out[mine], out[peer] = ours.get(mine), theirs.get(peer)
        ok = isinstance(out[mine], int | float) and isinstance(out[peer], int | float) and out[peer]
        ratios[mine] = round(out[mine] / out[peer], 2) if ok else None
    for key in ("aggregate_tok_s_16_base", "sentiment_p95_ms", "rss_peak_mb"):
        out[key] = ours.get(key)
    out["ratios"] = ratios
    return out


def table(title: str, fig: dict[str, Any]) -> list[str]:
    lines = [title, f"  {'work':40} {'lorabot':>9} {'llama.cpp':>10} {'ratio':>7}  goal (lorabot / llama.cpp)"]
    for row, mine, peer, _higher, goal in ROWS:
        ratio = fig["ratios"].get(mine)
        shown = [("-" if fig.get(k) is None else str(fig[k])) for k in (mine, peer)]
        lines.append(f"  {row:40} {shown[0]:>9} {shown[1]:>10} {'-' if ratio is None else f'{ratio}x':>7}  "
                     f"{goal or ''}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of the children (median)")
    parser.add_argument("--runs", type=int, default=2, help="single-chat runs per adapter setting in each child")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--b16-new-tokens", type=int, default=128)
    parser.add_argument("--classify-runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=-1, help="-1 auto (1 on a shared CPU), 0 all cores")
    parser.add_argument("--float32", choices=("auto", "yes", "no"), default="auto",
                        help="also measure lorabot at float32 (auto: when the configured dtype resolves to another)")
    parser.add_argument("--sides", nargs="+", choices=("lorabot", "llamacpp", "limits"),
                        default=["lorabot", "llamacpp", "limits"])
    parser.add_argument("--config", default=str(REPO / "config.toml"))
    parser.add_argument("--child", choices=("lorabot", "llamacpp", "limits"), help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="config", help=argparse.SUPPRESS)
    parser.add_argument("--spawned-at", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--int8-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--int8", choices=("yes", "no"), default="yes",
                        help="also measure lorabot with engine.int8_activations (opt-in, approximate)")
    parser.add_argument("--torch-engine", choices=("yes", "no"), default="yes",
                        help="also measure lorabot on its torch engine (LORABOT_TORCH_ENGINE=1)")
    args = parser.parse_args(argv)

    if args.child:
        work = json.loads(Path(args.work).read_text(encoding="utf-8"))
        if args.child == "lorabot":
            result = asyncio.run(lorabot_child(work, args.dtype, args.spawned_at, args.int8_child))
        elif args.child == "llamacpp":
            result = llamacpp_child(work, args.spawned_at)
        else:
            result = limits_child(work)
        print(json.dumps(result), flush=True)
        return 0

    threads, why = choose_threads(args.threads)
    print(f"threads: {threads} ({why})", flush=True)
    runs: dict[str, list[dict[str, Any]]] = {"lorabot": [], "lorabot_float32": [], "lorabot_int8": [],
                                             "lorabot_torch": [], "llamacpp": []}
    limits: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="lorabot-bench-") as tmp:
        work_path = prepare(Path(args.config), Path(tmp), args, threads)
        work = json.loads(work_path.read_text(encoding="utf-8"))
        want_f32 = args.float32 == "yes"
        for r in range(args.rounds):
            if "lorabot" in args.sides:
                runs["lorabot"].append(spawn("lorabot", work_path))
                if r == 0 and args.float32 == "auto":
                    want_f32 = runs["lorabot"][0].get("engine", {}).get("dtype") not in (None, "float32")
                if want_f32:
                    runs["lorabot_float32"].append(spawn("lorabot", work_path, "float32"))
                if args.int8 == "yes":
                    runs["lorabot_int8"].append(spawn("lorabot", work_path, int8=True))
                if args.torch_engine == "yes":
                    runs["lorabot_torch"].append(spawn("lorabot", work_path, torch_engine=True))
            missing = any("skipped" in c for c in runs["llamacpp"])   # known after one try
            if "llamacpp" in args.sides and not missing:
                runs["llamacpp"].append(spawn("llamacpp", work_path))
            print(f"round {r + 1}/{args.rounds} done", flush=True)
        if "limits" in args.sides:
            limits = spawn("limits", work_path)
    ours, ours32, theirs = combine(runs["lorabot"]), combine(runs["lorabot_float32"]), combine(runs["llamacpp"])
    ours8, ours_torch = combine(runs["lorabot_int8"]), combine(runs["lorabot_torch"])
    result: dict[str, Any] = {
        "threads": threads, "threads_choice": why, "rounds": args.rounds, "prompt": PROMPT,
        "settings": {k: work[k] for k in ("new_tokens", "b16_new_tokens", "runs", "classify_runs", "model")}
        | {"prompt_tokens": {"chat": len(work["chat_ids"]), "sentiment": len(work["sentiment_ids"]),
                             "b16": [len(p) for p in work["b16_ids"]]},
           "b16_adapters_lorabot": work["b16_adapters"], "llamacpp_n_ctx": LLAMACPP_CTX,
           "eos_banned": work["eos_ids"]},
        "lorabot": ours.get("engine", {}) | {"adapters": ours.get("adapters"), "error": ours.get("error")},
        "llamacpp": {k: theirs.get(k) for k in ("version", "n_ctx", "adapters", "system_info", "error")},
        "export_problems": work["export_problems"],
    }
    result |= figures(ours, theirs)
    for key in ("llamacpp_b16_decode_tok_s", "llamacpp_b16_adapter_tok_s", "llamacpp_single_native_tok_s",
                "llamacpp_completion_logprobs_ms", "llamacpp_classify_p95_ms", "llamacpp_rss_peak_mb"):
        result[key] = theirs.get(key)
    if "skipped" in theirs:
        result["llamacpp_skipped"] = theirs["skipped"]
    elif "llamacpp" not in args.sides:
        result["llamacpp_skipped"] = "not run (--sides)"
    if runs["lorabot_float32"]:
        result["float32"] = {"lorabot": ours32.get("engine", {}) | {"error": ours32.get("error")}}
        result["float32"] |= figures(ours32, theirs)
    if runs["lorabot_int8"]:
        result["int8"] = {"lorabot": ours8.get("engine", {}) | {"error": ours8.get("error")}}
        result["int8"] |= figures(ours8, theirs)
    if runs["lorabot_torch"]:
        result["torch_engine"] = {"lorabot": ours_torch.get("engine", {}) | {"error": ours_torch.get("error")}}
        result["torch_engine"] |= figures(ours_torch, theirs)
    # What each engine answered, so that a reader can see both did the same work.
    shown = ("single_text", "single_adapter_text", "sentiment_scores")
    result["outputs"] = {side: {k: found.get(k) for k in shown} for side, found in
                         (("lorabot", ours), ("lorabot_float32", ours32), ("lorabot_int8", ours8),
                          ("lorabot_torch", ours_torch), ("llamacpp", theirs)) if found}
    result["limits"] = limits
    if limits and "error" not in limits:
        # One row can go no faster than the weights stream from memory or the matmuls run at peak.
        result["single_ceiling_tok_s"] = min(limits["single_ceiling_tok_s_bandwidth"], limits["ceiling_tok_s_flops"])
    result["runs"] = runs
    engine = ours.get("engine", {})
    why_not = theirs.get("skipped_short") or ("its child failed" if "error" in theirs else "not run")
    peer = f"llama.cpp {theirs['version']}" if "version" in theirs else f"llama.cpp skipped ({why_not})"
    result["note"] = (f"lorabot {engine.get('backend', '?')} backend, {engine.get('dtype', '?')}, "
                      f"kernel {'on' if engine.get('kernel') else 'off'}; {peer}; {threads} thread(s)")
    path = write_result("llamacpp", result)

    lines = table(f"lorabot ({result['note']})", result)
    if "float32" in result:
        lines += table("lorabot at float32 (CPU kernel, GGUF Q4_1 weights)", result["float32"])
    if "int8" in result:
        lines += table("lorabot with engine.int8_activations (opt-in, approximate)", result["int8"])
    if "torch_engine" in result:
        lines += table("lorabot on its torch engine (LORABOT_TORCH_ENGINE=1)", result["torch_engine"])
    if limits and "error" not in limits:
        lines.append(f"machine: {limits['bandwidth_gb_s']} GB/s copy bandwidth -> at most "
                     f"{limits['single_ceiling_tok_s_bandwidth']} tok/s for one row over the {limits['gguf_mb']} MB "
                     f"GGUF; float32 matmul peak {limits['matmul_peak']['gflops']} GFLOP/s -> "
                     f"{limits['ceiling_tok_s_flops']} tok/s")
    for side, children in runs.items():
        for child in children:
            if "error" in child:
                lines.append(f"{side}: {child['error']}")
    if "llamacpp_skipped" in result:
        lines.append(f"llama.cpp rows skipped: {result['llamacpp_skipped']}")
    print("\n".join(lines))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
