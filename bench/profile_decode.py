"""Where a decode step's time goes, per token, on the real bundled model: one row and 16, with and without adapters.

    .venv/bin/python -m bench.profile_decode [--steps 24] [--threads -1] [--float32 auto|yes|no]

The engine is loaded as ``lorabot run`` loads it (``LocalEngine.from_config``; the fast backend). For each
case (1 row without an adapter, 1 row with ``story``, 16 rows without, 16 rows over the four shipped
adapters) it measures:

* the engine's own decode steps while it serves the requests (``generate``, greedy, end-of-sequence
  banned): the whole scheduler step, and the backend's ``decode`` inside it; the difference is the
  scheduler's share (sampling, detokenising, stop strings, streaming);
* the backend's decode step alone (``FastLlama.decode`` on a slot cache prefilled with the same
  prompts): its wall time without instrumentation, and as many steps (alternating with those) under an
  op timer that counts and times every PyTorch operation the step's Python code calls (a
  ``TorchDispatchMode``; views included, an op's own sub-operations inside it) and every call into
  lorabot's compiled kernels (``bot.engine.kernels``), each filed under the line of
  ``bot/engine/fast_llama.py`` that made it: base-weight matmuls, LoRA, attention, norms, RoPE and the
  q/k/v split, SiLU, residual adds, embedding, output layer, step set-up. What the step's wall time has
  beyond the operations' compute is Python and dispatch overhead. These are the Python layers' steps; the
  engine decodes in one native call where the CPU kernel is built (``bot.engine.decode_native``), whose
  step time stands beside them as ``native_step_ms``.

An op's compute is its timed call less the timer's floor (what the same call records for a view of a
small tensor, which does no arithmetic), so the floor and Python's own work both count as overhead; as a
cross-check, a bare view from Python costs ``noop_op_us`` uninstrumented. The op timer slows the steps it
watches, so the step's time is always that of the plain steps; medians throughout. Compute includes what
happens inside an op (OpenMP's fork-join of a parallel op too). At the configured dtype, and at float32 as
well when that is another (``auto`` picks bfloat16 on CPUs with native bf16; float32 runs the CPU kernel
over the GGUF's Q4_1 weights). Results: bench/results/profile_decode.json and a table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import linecache
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import choose_threads, write_result
from bench.llamacpp import MIXED, PROMPT, THEMES

REPO = Path(__file__).resolve().parents[1]
CASES: list[tuple[str, list[str | None]]] = [
    ("B=1, no adapter", [None]),
    ("B=1, story adapter", ["story"]),
    ("B=16, no adapter", [None] * 16),
    ("B=16, 4 adapters", [MIXED[i % len(MIXED)] for i in range(16)]),
]
# Operations that only make a new view of existing memory (no arithmetic, but a dispatch each).
VIEWS = {"view", "_unsafe_view", "slice", "select", "t", "transpose", "permute", "unsqueeze", "squeeze", "expand",
         "as_strided", "alias", "reshape", "split", "unbind", "detach", "_reshape_alias", "lift_fresh"}
MATMULS = {"mm", "addmm", "addmm_", "bmm", "matmul", "linear", "baddbmm"}


def category(func: str, line: str, via_mm: bool) -> str:
    """The part of the forward pass that fast_llama's ``func`` at source ``line`` belongs to."""
    if func == "attend":
        return "attention (KV write, SDPA)"
    if func == "_proj":
        # The base weights are the ``ws`` tuple; everything else in _proj is the stacked LoRA.
        return "linear, base weights" if "ws" in line else "LoRA (stacked A/B, row mask)"
    if func == "_logits":
        return "output layer (lm head)" if via_mm or "_mm" in line else "norms"
    if func == "_rows":
        return "embedding lookup"
    if func == "_run_layers":
        if "rms_norm" in line:
            return "norms"
        if "silu" in line:
            return "SiLU x up"
        if "x = x +" in line:
            return "residual adds"
        return "RoPE, q/k/v split"
    if func in ("_selection", "_build_selection", "rows", "per_token"):
        return "LoRA row selection"
    if func in ("decode", "_ensure"):
        return "step set-up (positions, mask, token ids)"
    return f"other ({func or 'outside fast_llama'})"


def timer_floor_ns() -> float:
    """What the op timer records for a view of a small tensor (no arithmetic): the cost of the timed call
    itself, subtracted from every op so that the categories hold compute only (the best of 50 chunks)."""
    import torch

    x = torch.zeros(8)
    best = float("inf")
    for _ in range(50):
        timer = OpTimer()
        with timer:
            for _ in range(100):
                x.view(-1)
        best = min(best, sum(timer.ns.values()) / max(1, sum(timer.ops.values())))
    return best


def noop_op_us() -> float:
    """Microseconds one view of a small tensor takes from Python, uninstrumented (the best of 50 chunks)."""
    import torch

    x = torch.zeros(8)
    best = float("inf")
    for _ in range(50):
        t = time.perf_counter()
        for _ in range(100):
            x.view(-1)
        best = min(best, (time.perf_counter() - t) / 100)
    return best * 1e6


def thread_scaling(fast: Any, cache: Any, tokens: list[int], adapters: list[str | None],
                   steps: int) -> dict[str, float]:
    """Median plain step (ms) at 1 torch thread and at the run's thread count."""
    import torch

    threads = torch.get_num_threads()
    out: dict[str, float] = {}
    try:
        for n in sorted({1, threads}):
            torch.set_num_threads(n)
            walls = []
            for _ in range(steps):
                t = time.perf_counter()
                logits = fast.decode(cache, tokens, adapters)
                walls.append(time.perf_counter() - t)
                tokens = logits.argmax(-1).tolist()
            out[str(n)] = round(statistics.median(walls) * 1000, 2)
    finally:
        torch.set_num_threads(threads)
    return out


class OpTimer:
    """Counts and times every aten operation and compiled-kernel call, by the fast_llama line that made it."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        from bot.engine import fast_llama

        self.source = fast_llama.__file__
        self.ops: Counter[tuple[str, str]] = Counter()     # (category, op) -> calls
        self.ns: Counter[tuple[str, str]] = Counter()      # (category, op) -> nanoseconds
        self._native = 0
        self._where: dict[tuple[int, int, bool], str] = {}
        timer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                if timer._native:  # inside a kernel call: its time is the kernel's
                    return func(*args, **(kwargs or {}))
                where = timer.where()
                t = time.perf_counter_ns()
                out = func(*args, **(kwargs or {}))
                timer.record(where, func.overloadpacket.__name__, time.perf_counter_ns() - t)
                return out

        self.mode = Mode()
        self._patched: list[tuple[Any, str, Any]] = []

    def where(self) -> str:
        frame = sys._getframe(2)
        via_mm = False
        while frame is not None:
            if frame.f_code.co_filename == self.source:
                name = frame.f_code.co_name
                if name == "_mm":
                    via_mm = True
                elif name not in ("<listcomp>", "<genexpr>", "<lambda>"):
                    key = (id(frame.f_code), frame.f_lineno, via_mm)
                    if key not in self._where:
                        line = linecache.getline(self.source, frame.f_lineno).strip()
                        self._where[key] = category(name, line, via_mm)
                    return self._where[key]
            frame = frame.f_back
        return category("", "", via_mm)

    def record(self, where: str, op: str, ns: int) -> None:
        self.ops[where, op] += 1
        self.ns[where, op] += ns

    @contextlib.contextmanager
    def ignored(self) -> Iterator[None]:
        self._native += 1
        try:
            yield
        finally:
            self._native -= 1

    def _wrap(self, owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name)
        timer = self

        def timed(*args: Any, **kwargs: Any) -> Any:
            where = timer.where()
            timer._native += 1
            t = time.perf_counter_ns()
            try:
                return original(*args, **kwargs)
            finally:
                timer._native -= 1
                timer.record(where, label, time.perf_counter_ns() - t)

        setattr(owner, name, timed)
        self._patched.append((owner, name, original))

    def __enter__(self) -> OpTimer:
        from bot.engine import kernels

        self._wrap(kernels, "linear", "kernel:linear")
        self._wrap(kernels, "linear_quant", "kernel:linear_quant")
        self._wrap(kernels.QuantWeight, "dequantize", "kernel:dequantize")
        self.mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.mode.__exit__(*exc)
        for owner, name, original in reversed(self._patched):
            setattr(owner, name, original)
        self._patched.clear()


def prefilled(fast: Any, prompts: list[list[int]], adapters: list[str | None]) -> tuple[Any, list[int]]:
    """A slot cache holding the prompts, and each row's first generated token (greedy)."""
    cache = fast.new_cache(len(prompts))
    res = cache.reserve(len(prompts), max(len(p) for p in prompts))
    logits = fast.prefill(prompts, adapters, res)
    cache.commit(res)
    return cache, logits.argmax(-1).tolist()


def backend_profile(fast: Any, prompts: list[list[int]], adapters: list[str | None], steps: int) -> dict[str, Any]:
    """``steps`` uninstrumented decode steps (wall time), alternating with ``steps`` under the op timer, of
    the Python layers; and, where the engine decodes in one native call (bot.engine.decode_native), that
    step's wall time beside them (the op timer cannot see inside it)."""
    native = fast.native
    fast.native = None
    try:
        out = _python_layers_profile(fast, prompts, adapters, steps)
    finally:
        fast.native = native
    if native is not None:
        cache, tokens = prefilled(fast, prompts, adapters)
        walls = []
        for i in range(steps + 3):
            t = time.perf_counter()
            tokens = fast.decode(cache, tokens, adapters).argmax(-1).tolist()
            if i >= 3:   # after the warm-up steps
                walls.append(time.perf_counter() - t)
        out["native_step_ms"] = round(statistics.median(walls) * 1000, 2)
    return out


def _python_layers_profile(fast: Any, prompts: list[list[int]], adapters: list[str | None],
                           steps: int) -> dict[str, Any]:
    cache, tokens = prefilled(fast, prompts, adapters)
    for _ in range(3):  # warm-up: the cache's first growth, first-call allocations
        tokens = fast.decode(cache, tokens, adapters).argmax(-1).tolist()
    # Plain and instrumented steps alternate, so that both see the machine in the same state.
    walls: list[float] = []
    timed: list[Counter[tuple[str, str]]] = []
    timer = OpTimer()
    for _ in range(steps):
        t = time.perf_counter()
        logits = fast.decode(cache, tokens, adapters)
        walls.append(time.perf_counter() - t)
        tokens = logits.argmax(-1).tolist()
        before = Counter(timer.ns)
        with timer:
            logits = fast.decode(cache, tokens, adapters)
        timed.append(timer.ns - before)
        tokens = logits.argmax(-1).tolist()
    rows = len(prompts)
    step_ms = statistics.median(walls) * 1000
    floor_ns = timer_floor_ns()
    per_step = {k: v / steps for k, v in timer.ops.items()}
    # An op's compute: its timed call less what the cheapest op (a view) costs through the same call; the
    # median step of each, as the wall time is.
    ms_step = {k: max(0.0, statistics.median(c[k] for c in timed) - floor_ns * per_step[k]) / 1e6 for k in per_step}
    cats: dict[str, dict[str, float]] = {}
    for (cat, op), n in per_step.items():
        entry = cats.setdefault(cat, {"ops": 0.0, "ms": 0.0})
        entry["ops"] += n
        entry["ms"] += ms_step[cat, op]
    op_ms = sum(ms_step.values())
    total_ops = sum(per_step.values())
    views = sum(n for (_c, op), n in per_step.items() if op in VIEWS)
    native = sum(n for (_c, op), n in per_step.items() if op.startswith("kernel:"))
    lora = "LoRA (stacked A/B, row mask)"
    matmuls = sum(n for (_c, op), n in per_step.items() if op in MATMULS or op.startswith("kernel:linear"))
    lora_matmuls = sum(n for (c, op), n in per_step.items() if c == lora and (op in MATMULS or op.startswith(
        "kernel:linear")))
    by_op: Counter[str] = Counter()
    by_op_ms: Counter[str] = Counter()
    for (cat, op), n in per_step.items():
        by_op[op] += n
        by_op_ms[op] += ms_step[cat, op]
    overhead = step_ms - op_ms
    noop_us = noop_op_us()
    by_threads = thread_scaling(fast, cache, tokens, adapters, steps)
    return {
        "rows": rows, "adapters": sorted({a or "none" for a in adapters}), "steps": steps,
        "step_ms": round(step_ms, 2), "ms_per_token": round(step_ms / rows, 2),
        "backend_tok_s": round(rows / (step_ms / 1000), 1),
        "ops_per_step": round(total_ops), "ops_per_token": round(total_ops / rows, 1),
        "view_ops_per_step": round(views), "compute_ops_per_step": round(total_ops - views - native),
        "kernel_calls_per_step": round(native),
        "matmuls_per_step": round(matmuls),
        "lora_matmuls_per_step": round(lora_matmuls),
        "compute_ms_per_step": round(op_ms, 2), "python_and_dispatch_ms_per_step": round(overhead, 2),
        "python_and_dispatch_share": round(overhead / step_ms, 3) if step_ms else None,
        "overhead_us_per_op": round(overhead * 1000 / total_ops, 1) if total_ops else None,
        # Cross-check: the cheapest op (a view) called from Python costs this much with nothing around it.
        "noop_op_us": round(noop_us, 2), "noop_floor_ms_per_step": round(noop_us * total_ops / 1000, 2),
        "timer_floor_us": round(floor_ns / 1000, 2),
        # Plain steps at 1 thread and at the run's count: what a second thread buys (or costs: every
        # parallel op is an OpenMP fork-join).
        "step_ms_by_threads": by_threads,
        "categories": {c: {"ops": round(v["ops"], 1), "ms": round(v["ms"], 3),
                           "share_of_step": round(v["ms"] / step_ms, 3) if step_ms else None}
                       for c, v in sorted(cats.items(), key=lambda kv: -kv[1]["ms"])},
        "top_ops": [{"op": op, "calls": round(by_op[op], 1), "ms": round(by_op_ms[op], 3)}
                    for op, _ in by_op_ms.most_common(12)],
    }


async def engine_profile(engine: Any, prompts: list[str], adapters: list[str | None], steps: int,
                         ban: tuple[tuple[int, float], ...]) -> dict[str, Any]:
    """The scheduler's decode steps while it serves ``prompts`` at once: whole step vs backend decode."""
    from bot.engine import SamplingParams

    rows = len(prompts)
    step_times: list[tuple[int, float]] = []
    decode_times: list[tuple[int, float]] = []
    backend = engine._backend
    original_step, original_decode = engine._decode_step, backend.decode

    def step(rows_: list[Any], batch: Any) -> Any:
        t = time.perf_counter()
        try:
            return original_step(rows_, batch)
        finally:
            step_times.append((len(rows_), time.perf_counter() - t))

    def decode(batch: Any, tokens: Any, positions: Any, names: Any) -> Any:
        t = time.perf_counter()
        try:
            return original_decode(batch, tokens, positions, names)
        finally:
            decode_times.append((len(tokens), time.perf_counter() - t))

    engine._decode_step, backend.decode = step, decode
    try:
        params = SamplingParams(max_new_tokens=steps + 4, logit_bias=ban)
        started = time.perf_counter()
        done = await asyncio.gather(*(engine.generate(p, params, a) for p, a in zip(prompts, adapters, strict=True)))
        wall = time.perf_counter() - started
    finally:
        del engine._decode_step, backend.decode   # back to the class's methods
    # Each scheduler step made exactly one backend decode call: pair them; steps with every row running,
    # warm-up dropped.
    pairs = [(s, d) for (n, s), (_m, d) in zip(step_times, decode_times, strict=False) if n == rows][3:]
    if not pairs:
        return {"note": "no decode step ran with every row at once"}
    step_ms = statistics.median(s for s, _d in pairs) * 1000
    decode_ms = statistics.median(d for _s, d in pairs) * 1000
    rest_ms = statistics.median(s - d for s, d in pairs) * 1000
    return {"steps": len(pairs), "step_ms": round(step_ms, 2), "backend_decode_ms": round(decode_ms, 2),
            "scheduler_ms": round(rest_ms, 2), "scheduler_share": round(rest_ms / step_ms, 3),
            "tok_s_incl_prefill": round(sum(g.completion_tokens for g in done) / wall, 1)}


async def profile_dtype(config: Any, steps: int) -> dict[str, Any]:
    from bench.llamacpp import _engine_facts
    from bot.engine.scheduler import LocalEngine

    # The profile counts PyTorch operations: the torch engine (FastLlama), not the torch-free one.
    os.environ["LORABOT_TORCH_ENGINE"] = "1"
    engine = await asyncio.to_thread(LocalEngine.from_config, config, progress=False)
    try:
        fast = getattr(engine._backend, "fast", None)
        if fast is None:
            raise SystemExit(f"the engine runs the {engine.backend} backend; this profile is of the fast backend")
        missing = [a for a in MIXED if a not in engine.adapters]
        if missing:
            raise SystemExit(f"adapters {missing} did not load: {engine.problems}")
        tok = engine._tok
        chats = [engine.chat_prompt([{"role": "user", "content": f"Write a short story about {t}."}]) for t in THEMES]
        chats[0] = engine.chat_prompt([{"role": "user", "content": PROMPT}])
        ban = tuple((i, -100.0) for i in sorted(engine._eos_ids))
        out: dict[str, Any] = {"engine": _engine_facts(engine), "cases": {}}
        for name, adapters in CASES:
            prompts = chats[:len(adapters)]
            ids = [tok(p).input_ids for p in prompts]
            keys = [None if a is None else engine._live[a] for a in adapters]
            case = await asyncio.to_thread(backend_profile, fast, ids, keys, steps)
            case["engine_step"] = await engine_profile(engine, prompts, adapters, steps, ban)
            out["cases"][name] = case
        return out
    finally:
        await engine.close()


def render(dtype: str, result: dict[str, Any]) -> list[str]:
    facts = result["engine"]
    lines = [f"\n== {dtype}: {facts.get('backend')} backend, kernel {'on' if facts.get('kernel') else 'off'}, "
             f"{facts.get('weights')}, {facts.get('threads')} thread(s)"]
    for name, c in result["cases"].items():
        e = c["engine_step"]
        lines.append(f"{name}: backend step {c['step_ms']} ms ({c['ms_per_token']} ms/token), {c['ops_per_step']} ops "
                     f"per step ({c['ops_per_token']} per token: {c['compute_ops_per_step']} compute, "
                     f"{c['view_ops_per_step']} views, {c['kernel_calls_per_step']} kernel calls; "
                     f"{c['matmuls_per_step']} matmuls, {c['lora_matmuls_per_step']} of them LoRA)")
        if "step_ms" in e:
            lines.append(f"  engine step {e['step_ms']} ms = backend decode {e['backend_decode_ms']} ms + scheduler "
                         f"{e['scheduler_ms']} ms (sampling, detokenising, streaming); {e['tok_s_incl_prefill']} "
                         "tok/s incl. prefill")
        lines.append(f"  plain step by torch threads: {c['step_ms_by_threads']} ms")
        if "native_step_ms" in c:
            lines.append(f"  the same step in one native call (the engine's default): {c['native_step_ms']} ms; "
                         "the parts below are the Python layers'")
        lines.append(f"  {'part':42} {'ops/step':>9} {'compute':>9} {'of step':>8}  (ms per step)")
        for cat, v in c["categories"].items():
            lines.append(f"  {cat:42} {v['ops']:9.0f} {v['ms']:9.2f} {v['share_of_step']:8.1%}")
        lines.append(f"  {'Python + dispatch (step - compute)':42} {'':9} {c['python_and_dispatch_ms_per_step']:9.2f} "
                     f"{c['python_and_dispatch_share']:8.1%}   ({c['overhead_us_per_op']} us per op; a bare view "
                     f"costs {c['noop_op_us']} us from Python: {c['noop_floor_ms_per_step']} ms for this many)")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=24, help="decode steps timed per case (and as many profiled)")
    parser.add_argument("--threads", type=int, default=-1, help="-1 auto (1 on a shared CPU), 0 all cores")
    parser.add_argument("--float32", choices=("auto", "yes", "no"), default="auto",
                        help="also profile at float32 (auto: when the configured dtype resolves to another)")
    parser.add_argument("--config", default=str(REPO / "config.toml"))
    args = parser.parse_args(argv)
    from bot.config import load_config, replace

    threads, why = choose_threads(args.threads)
    config = load_config(args.config)
    results: dict[str, Any] = {"threads": threads, "threads_choice": why, "steps": args.steps, "dtypes": {}}
    first = asyncio.run(profile_dtype(replace(config, model={"threads": threads}), args.steps))
    dtype = first["engine"].get("dtype", "?")
    results["dtypes"][dtype] = first
    if args.float32 == "yes" or (args.float32 == "auto" and dtype != "float32"):
        config32 = replace(config, model={"threads": threads, "dtype": "float32"})
        results["dtypes"]["float32"] = asyncio.run(profile_dtype(config32, args.steps))
    path = write_result("profile_decode", results)
    lines = [f"threads: {threads} ({why}); {args.steps} steps per case"]
    for name, result in results["dtypes"].items():
        lines += render(name, result)
    print("\n".join(lines))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
