"""Shared helpers for the benchmark scripts: timing statistics, machine description, JSON results."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary(values_ms: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(statistics.median(values_ms), 1),
        "p95_ms": round(percentile(values_ms, 0.95), 1),
        "runs": len(values_ms),
    }


def machine() -> dict[str, Any]:
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": time.strftime("%Y-%m-%d"), "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def write_result(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"machine": machine(), **data}, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------- shared set-up for the benchmarks

def cpu_busy_fraction(seconds: float = 1.0) -> float:
    """Fraction of all CPUs busy with other work while this process sleeps (0 = idle machine)."""
    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return 0.0
    return max(0.0, 1.0 - (idle1 - idle0) / max(1, total1 - total0))


def choose_threads(requested: int) -> tuple[int, str]:
    """torch threads for a benchmark: ``requested`` if > 0; -1 = auto; 0 = all cores.

    Auto: all cores on an idle machine; 1 thread when other processes already use the CPU, because
    OpenMP's 2-thread barriers then stall whenever the other thread is descheduled (measured here:
    2 threads were 3-20x slower than 1 on a CPU shared with a training run).
    """
    cores = os.cpu_count() or 1
    if requested > 0:
        return requested, "requested"
    if requested == 0:
        return cores, "all cores"
    busy = cpu_busy_fraction()
    if busy > 0.25 and cores > 1:
        return 1, f"auto: CPU shared ({busy:.0%} busy with other processes before the run)"
    return cores, f"auto: CPU idle ({busy:.0%} busy before the run)"


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (Linux), in MB; NaN elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def rss_mb() -> float:
    """Resident set size of this process (MB), file-backed pages (mapped weights) included."""
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """The kernel's high-water mark of ``rss_mb`` (VmHWM), since start or since ``reset_peak_rss``."""
    return _status_mb("VmHWM")


def reset_peak_rss() -> None:
    """Start the high-water mark afresh (Linux: clear_refs 5), so that loading does not count."""
    Path("/proc/self/clear_refs").write_text("5")


RANDOM_ADAPTERS = (("sentiment", "sentiment"), ("ner", "ner"), ("qa", "qa"), ("story", "story"))


def make_random_adapters(base_dir: Path, out: Path, *, rank: int = 16, base_name: str | None = None) -> Path:
    """One random LoRA per shipped skill, of the real shape (rank 16 on all linear layers, as the recipes)."""
    from bot.skills import NERFormat, SentimentFormat
    from tests.random_model import save_random_adapter

    labels = {"sentiment": SentimentFormat.default_labels, "ner": NERFormat.default_labels}
    for seed, (name, task) in enumerate(RANDOM_ADAPTERS, start=1):
        if not (out / name / "adapter_model.safetensors").is_file():
            # Small weights: the outputs stay fluent text, so generation lengths are realistic.
            save_random_adapter(base_dir, out / name, task=task, labels=labels.get(task, ()), rank=rank,
                                seed=seed, scale=0.02, base_name=base_name)
    return out


def adapters_for_bench(adapters_dir: Path, base_dir: Path, base_name: str, scratch: Path) -> tuple[Path, str]:
    """The trained adapters when adapters_dir holds valid ones, else random ones of the real shape."""
    from transformers import AutoConfig

    from bot.adapters import scan_adapters, shape_signature

    shape = shape_signature(AutoConfig.from_pretrained(base_dir, local_files_only=True))
    found, _ = scan_adapters(adapters_dir, base_model=base_name, base_shape=shape)
    if found:
        return adapters_dir, f"trained ({', '.join(sorted(found))} from {adapters_dir.name}/)"
    out = make_random_adapters(base_dir, scratch / "adapters", base_name=base_name)
    return out, "random LoRA of the real shape (r=16, alpha=32, all 7 linear layers), one per skill"


def chart(path: Path, draw: Any) -> Path:
    """Write a PNG with matplotlib (Agg): ``draw(plt)`` makes the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    RESULTS.mkdir(parents=True, exist_ok=True)
    draw(plt)
    plt.tight_layout()
    plt.savefig(path, dpi=110)
    plt.close("all")
    return path
