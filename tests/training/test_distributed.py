"""``accelerate launch`` with two CPU processes (gloo) against one process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from bot.adapters import validate_adapter
from training.cli import main

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(tmp: Path, data: Path, base: Path) -> list[str]:
    return ["-m", "training", "train", "sentiment", "--data", str(data), "--out", str(tmp / "adapters" / "sent"),
            "--base", str(base), "--set", f'train.run_dir="{tmp / "run"}"', "train.batch_size=6", "train.max_steps=3",
            "train.trace=true", "lora.dropout=0.0", "eval.base=false", "train.checkpoint_every=0",
            "train.micro_batch_tokens=40"]


def run(cmd: list[str]) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def trace(folder: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (folder / "run" / f"trace-rank{rank}.jsonl").read_text().splitlines()]


def test_two_processes_match_one(tiny_base: Path, tmp_path: Path) -> None:
    texts = ["a fine film", "dull and long", "it is a film", "great fun , really", "awful", "the cast is big"]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": f"{t} {i}", "label": ["positive", "negative", "neutral"][i % 3]})
                            + "\n" for i, t in enumerate(texts * 3)), encoding="utf-8")
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(train_args(one, data, tiny_base)[2:]) == 0  # the single-process reference, in this process
    run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(free_port()), *train_args(two, data, tiny_base)])

    single, rank0, rank1 = trace(one, 0), trace(two, 0), trace(two, 1)
    for s, a, b in zip(single, rank0, rank1, strict=True):
        assert not set(a["examples"]) & set(b["examples"])                      # disjoint shards
        assert sorted(a["examples"] + b["examples"]) == sorted(s["examples"])  # of the same global batch
        assert a["loss"] == pytest.approx(s["loss"], rel=1e-4, abs=1e-5)        # averaged gradients
        assert b["loss"] == a["loss"]                                           # every process logs the global loss

    # Only the main process wrote the adapter: one valid folder, nothing else beside it.
    assert [p.name for p in (two / "adapters").iterdir()] == ["sent"]
    validate_adapter(two / "adapters" / "sent")
    assert json.loads((two / "adapters" / "sent" / "metrics.json").read_text())["train"]["processes"] == 2
    w1, w2 = load_file(str(one / "adapters" / "sent" / "adapter_model.safetensors")), load_file(
        str(two / "adapters" / "sent" / "adapter_model.safetensors"))
    assert all((w1[k].float() - w2[k].float()).abs().max() <= 0.02 * w1[k].float().abs().max() + 1e-3 for k in w1)
