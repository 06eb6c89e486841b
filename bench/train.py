"""Training throughput of ``lorabot train`` against a plain ``transformers.Trainer`` on the same job.

    .venv/bin/python -m bench.train [--examples 256] [--dev 200] [--threads -1]

Both fine-tune the real SmolLM2-135M for sentiment on the same SST-2 examples (../shared/data, the
first ``--examples`` sentences of >= 6 words), with the same LoRA (r 16, alpha 32, no dropout, all 7
linear layers), batch size 16, learning rate 3e-4, one epoch, fp32, in this process, one after the
other:
* lorabot: ``training.tasks.TRAIN["sentiment"]`` (the ``lorabot train`` code path; scores the label
  tokens at the last prompt position, computing only the logits it needs);
* baseline: ``transformers.Trainer`` on the same prompts followed by " <label>", causal-LM loss on the
  label tokens only (the usual supervised fine-tuning recipe; full-vocabulary logits at every position).
Both adapters are then scored by the same function (``training.evaluate.evaluate``, accuracy on the
first ``--dev`` SST-2 dev sentences, as the bot classifies). Training time excludes evaluation and
saving; the speed-up is the baseline's training time over lorabot's (same steps, same examples); tokens/s
count real (non-padding) tokens. Skips cleanly when ../shared/data is absent.
Results: bench/results/train.json and .png.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS, chart, choose_threads, set_threads, write_result

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "sentiment"
LABELS = ("negative", "neutral", "positive")
LORA = {"r": 16, "alpha": 32, "dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def lorabot_run(n_examples: int, n_dev: int, out: Path, threads: int) -> dict[str, Any]:
    from training.config import load_config, replace
    from training.tasks import TRAIN

    config = replace(
        load_config(None, []), task="sentiment", labels=list(LABELS), seed=1234,
        data={"train": [{"path": str(DATA / "sst2_train.jsonl"), "limit": n_examples, "min_words": 6}],
              "dev": [{"path": str(DATA / "sst2_dev.jsonl"), "limit": n_dev}]},
        lora=dict(LORA),
        train=dict(epochs=1, batch_size=16, lr=3e-4, max_length=128, eval_every=0, checkpoint_every=0,
                   threads=threads, log_every=5, run_dir=str(out / "run")),
        eval=dict(base=False, final_limit=0, batch_size=32),
    )
    TRAIN["sentiment"](config, out / "lorabot-sst2")
    metrics = json.loads((out / "lorabot-sst2" / "metrics.json").read_text())
    train = metrics["train"]
    return {"steps": train["steps"], "examples": train["examples"], "train_s": round(train["time_s"], 1),
            "tokens": train["tokens_seen"], "tokens_per_s": round(train["tokens_per_s"], 1),
            "dev_accuracy": round(metrics["dev"]["sst2_dev"]["accuracy"], 1), "final_loss": train["final_loss"]}


def trainer_run(n_examples: int, n_dev: int, out: Path, threads: int, steps: int) -> dict[str, Any]:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from bot.skills import SentimentFormat
    from training import data as D
    from training.config import LoraSettings
    from training.evaluate import evaluate
    from training.model import add_lora, load_base

    torch.set_num_threads(threads)
    train = D.load("sentiment", {"path": str(DATA / "sst2_train.jsonl"), "limit": n_examples, "min_words": 6},
                   LABELS, 1234)
    dev = D.load("sentiment", {"path": str(DATA / "sst2_dev.jsonl"), "limit": n_dev}, LABELS, 1234)
    model, tok, _ = load_base("bundled", dtype="float32", device="cpu")
    peft = add_lora(model, LoraSettings(**{**LORA, "target_modules": tuple(LORA["target_modules"])}))
    rows = []
    for ex in train:
        prompt = tok(SentimentFormat.prompt(ex.text), add_special_tokens=False).input_ids
        target = [*tok(SentimentFormat.continuation(ex.label), add_special_tokens=False).input_ids, tok.eos_token_id]
        rows.append({"input_ids": prompt + target, "labels": [-100] * len(prompt) + target})
    counted = {"tokens": 0}

    def collate(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in batch)
        ids = torch.full((len(batch), width), tok.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):
            n = len(r["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
        counted["tokens"] += int(mask.sum())
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    class Clock(TrainerCallback):  # training time only, as lorabot's figure (no evaluation, no saving)
        spent = 0.0
        started = 0.0

        def on_step_begin(self, *a: Any, **k: Any) -> None:
            self.started = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            Clock.spent += time.perf_counter() - self.started

    args = TrainingArguments(
        output_dir=str(out / "hf"), per_device_train_batch_size=16, max_steps=steps, learning_rate=3e-4,
        warmup_steps=round(0.03 * steps), lr_scheduler_type="cosine", weight_decay=0.0, max_grad_norm=1.0,
        logging_steps=5, save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0, seed=1234,
        disable_tqdm=True,
    )
    trainer = Trainer(model=peft, args=args, train_dataset=rows, data_collator=collate, callbacks=[Clock()])
    result = trainer.train()
    peft.eval()
    scores = evaluate("sentiment", peft, tok, dev, labels=LABELS, batch_size=32)
    return {"steps": result.global_step, "examples": len(rows), "train_s": round(Clock.spent, 1),
            "train_runtime_s": round(result.metrics["train_runtime"], 1), "tokens": counted["tokens"],
            "tokens_per_s": round(counted["tokens"] / Clock.spent, 1), "dev_accuracy": round(scores["accuracy"], 1),
            "final_loss": result.training_loss}


def draw(results: dict[str, Any]) -> Any:
    def figure(plt: Any) -> None:
        fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3.5))
        names = ["lorabot train", "transformers.Trainer"]
        runs = [results["lorabot"], results["trainer"]]
        a.bar(names, [r["train_s"] for r in runs], color=["tab:blue", "tab:gray"])
        a.set_ylabel(f"training time, {runs[0]['steps']} steps (s)")
        b.bar(names, [r["dev_accuracy"] for r in runs], color=["tab:blue", "tab:gray"])
        b.set_ylabel("SST-2 dev accuracy (%)")
        b.set_ylim(0, 100)
        fig.suptitle(f"sentiment, {runs[0]['examples']} SST-2 examples, batch 16, LoRA r16; "
                     f"{results['threads']} thread(s)", fontsize=9)

    return figure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--dev", type=int, default=200)
    parser.add_argument("--threads", type=int, default=-1, help="-1 auto (1 on a shared CPU), 0 all cores")
    args = parser.parse_args()
    if not (DATA / "sst2_train.jsonl").is_file():
        path = write_result("train", {"skipped": f"{DATA} is absent"})
        print(f"skipped: {DATA} is absent; wrote {path}")
        return
    threads, why = choose_threads(args.threads)
    set_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        ours = lorabot_run(args.examples, args.dev, Path(tmp), threads)
        print(f"lorabot train: {ours}", flush=True)
        theirs = trainer_run(args.examples, args.dev, Path(tmp), threads, ours["steps"])
        print(f"transformers.Trainer: {theirs}", flush=True)
    results = {"task": "sentiment (SST-2)", "threads": threads, "threads_choice": why, "lorabot": ours,
               "trainer": theirs, "train_speedup": round(theirs["train_s"] / ours["train_s"], 2),
               "tokens_per_s": ours["tokens_per_s"], "tokens_per_s_trainer": theirs["tokens_per_s"],
               "dev_accuracy": ours["dev_accuracy"], "dev_accuracy_trainer": theirs["dev_accuracy"]}
    path = write_result("train", results)
    chart(RESULTS / "train.png", draw(results))
    print(f"\n{'':22} {'lorabot':>10} {'Trainer':>10}")
    for key in ("steps", "train_s", "tokens", "tokens_per_s", "dev_accuracy"):
        print(f"{key:22} {ours[key]:>10} {theirs[key]:>10}")
    print(f"speed-up (same steps and examples): x{results['train_speedup']}; threads {threads} ({why}); "
          f"wrote {path}")


if __name__ == "__main__":
    main()
