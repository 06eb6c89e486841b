"""``lorabot train | eval | calibrate | export``: argparse subcommands (bot/cli.py calls ``add_commands``).

Only argparse and the standard library are imported here; torch and friends load inside the command
functions, so ``lorabot --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

TASKS = ("sentiment", "ner", "qa", "story", "domain", "chat")


def add_commands(subparsers: Any) -> None:
    """Add the train, eval, calibrate and export subcommands; each sets ``func(args) -> exit code``."""
    p = subparsers.add_parser("train", help="train a LoRA adapter for a task",
                              description="Train a LoRA adapter. Output goes to a hidden temporary folder and "
                                          "replaces --out only when training and evaluation succeed.")
    p.add_argument("task", choices=TASKS)
    p.add_argument("--data", action="extend", nargs="+", type=Path, metavar="FILE",
                   help="training data (repeatable; replaces the recipe's data.train)")
    p.add_argument("--dev", action="extend", nargs="+", type=Path, metavar="FILE",
                   help="dev data, scored during training and in the model card (replaces data.dev)")
    p.add_argument("--out", required=True, type=Path, metavar="adapters/NAME",
                   help="the adapter folder; its name is the adapter name")
    p.add_argument("--config", type=Path, metavar="recipe.toml", help="a recipe (see training/recipes/)")
    p.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. train.lr=1e-4 lora.r=8 (values are TOML literals)")
    p.add_argument("--base", help="base model: 'bundled', a model folder or a cached HF id (default: the recipe's)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the run folder's last checkpoint (starts fresh when there is none)")
    p.set_defaults(func=train_command)

    p = subparsers.add_parser("eval", help="score an adapter (or the bare base model) on a data file")
    p.add_argument("task", choices=TASKS)
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--adapter", type=Path, metavar="DIR", help="the adapter folder")
    who.add_argument("--base-only", action="store_true", help="score the bare base model, same evaluation")
    p.add_argument("--data", required=True, type=Path, metavar="FILE")
    p.add_argument("--limit", type=int, default=0, metavar="N", help="only the first N examples")
    p.add_argument("--holdout", type=float, default=0.0, metavar="FRACTION",
                   help="only the held-out part of FILE, as a recipe's {holdout = FRACTION} split selects it")
    p.add_argument("--base", default="bundled", help="base model (default: bundled)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=0, help="ner/qa generation limit (0 = task default)")
    p.add_argument("--themes", action="store_true",
                   help="story: also theme adherence on the 50 evaluation themes (writes 50 stories)")
    p.add_argument("--unconstrained", action="store_true",
                   help="qa: decode answers as free text instead of spans of the context (for comparison)")
    p.add_argument("--one-reading", action="store_true",
                   help="qa: without the order check (no second reading with the sentences reversed)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")
    p.add_argument("--predictions", type=Path, metavar="FILE.jsonl",
                   help="also write one JSON line per example (input, gold, output, score) for error analysis")
    p.set_defaults(func=eval_command)

    p = subparsers.add_parser(
        "calibrate", help="fit a sentiment adapter's label offsets on its recipe's data.calibrate",
        description="Fit the label offsets (corrections of the label priors) of a sentiment adapter on the "
                    "calibration data its recipe.toml names, score its dev data with and without them, and "
                    "rewrite its lorabot.json, metrics.json and README.md. Training does this itself when the "
                    "recipe has data.calibrate.")
    p.add_argument("adapter", type=Path, metavar="DIR", help="the adapter folder")
    p.add_argument("--base", help="base model (default: the recipe's)")
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(func=calibrate_command)

    p = subparsers.add_parser("export", help="export logged conversations as chat training data (JSONL)")
    p.add_argument("--db", required=True, type=Path, metavar="FILE", help="the bot's conversation database")
    p.add_argument("--out", required=True, type=Path, metavar="FILE.jsonl")
    p.add_argument("--only-positive-feedback", action="store_true",
                   help="only conversations whose answers got positive feedback")
    p.set_defaults(func=export_command)


def _guard(run: Any) -> int:
    from bot.errors import LorabotError

    try:
        return run()
    except LorabotError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nstopped; nothing was written to the output. Continue with the same command plus --resume.",
              file=sys.stderr)
        return 130


def train_command(args: argparse.Namespace) -> int:
    def run() -> int:
        from bot.errors import ConfigError
        from training.config import load_config, replace
        from training.tasks import TRAIN

        overrides = list(args.set)
        if args.base:
            overrides.append(f"base={json.dumps(args.base)}")
        config = load_config(args.config, overrides)
        if config.task and config.task != args.task:
            raise ConfigError(str(args.config), [f"task: the recipe is for {config.task!r}, not {args.task!r}"])
        data = {"train": [str(p) for p in args.data or ()], "dev": [str(p) for p in args.dev or ()]}
        config = replace(config, task=args.task, data={k: v for k, v in data.items() if v})
        TRAIN[args.task](config, args.out, resume=args.resume)
        return 0

    return _guard(run)


def eval_command(args: argparse.Namespace) -> int:
    def run() -> int:
        from bot.errors import ConfigError
        from training.evaluate import PRIMARY
        from training.tasks import evaluate_adapter

        records: list[dict] | None = None
        if args.predictions:
            # Refused before the (long) evaluation, not after it.
            if PRIMARY[args.task] == "perplexity" and not (args.themes and args.task == "story"):
                raise ConfigError("--predictions", [f"{args.task} is scored by perplexity: no per-example "
                                                    "predictions to write (sentiment, ner and qa have them)"])
            records = []
        result = evaluate_adapter(args.task, args.data, adapter=None if args.base_only else args.adapter,
                                  base=args.base, limit=args.limit, holdout=args.holdout,
                                  batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                  predictions=records, themes=args.themes,
                                  span_constrained=not args.unconstrained, order_check=not args.one_reading)
        if records is not None:
            from training.export import write_jsonl

            write_jsonl(args.predictions, records)
            print(f"wrote {len(records)} predictions to {args.predictions}")
        who = result["adapter"] or f"base model {result['base_model']}"
        print(f"{args.task} on {args.data} ({result['n']} examples), {who}, {result['time_s']:.1f} s:")
        for key, value in result["metrics"].items():
            if isinstance(value, float):
                print(f"  {key:<14} {value:8.2f}")
            elif isinstance(value, dict):
                print(f"  {key:<14} " + ", ".join(f"{k} {v:.2f}" for k, v in value.items()))
        if args.json:
            print(json.dumps(result, ensure_ascii=False))
        return 0

    return _guard(run)


def calibrate_command(args: argparse.Namespace) -> int:
    def run() -> int:
        from training.calibrate import calibrate_folder

        report = calibrate_folder(args.adapter, base=args.base, batch_size=args.batch_size)
        print(f"{args.adapter}: label offsets " + ", ".join(f"{k} {v:+.2f}" for k, v in report["offsets"].items()))
        for name, after in report["dev"].items():
            before = report["dev_before"][name]
            print(f"  {name:<24} accuracy {before['accuracy']:6.2f} -> {after['accuracy']:6.2f}   "
                  f"macro-recall {before['macro_recall']:6.2f} -> {after['macro_recall']:6.2f}")
        return 0

    return _guard(run)


def export_command(args: argparse.Namespace) -> int:
    def run() -> int:
        from training.export import export_chat

        count = export_chat(args.db, args.out, only_positive_feedback=args.only_positive_feedback)
        print(f"wrote {count} conversation(s) to {args.out}")
        return 0

    return _guard(run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training", description="Train, evaluate and export "
                                     "lorabot's LoRA adapters.")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))
