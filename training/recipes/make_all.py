"""Retrain the shipped adapters (sentiment, ner, qa, story) from ../shared/data: ``make adapters``.

Each recipe runs as ``python -m training train TASK --config recipes/NAME.toml --out adapters/NAME
--resume`` from the repository root, so an interrupted run continues from its last checkpoint. An
adapter whose recorded recipe equals the current one is skipped (``--force`` retrains it). A shipped
adapter made in stages (STAGES: qa continues qa_third's weights, which continued qa_second's, ...) trains its
earlier stages first, into runs/adapters/.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
SHIPPED = ("sentiment", "ner", "qa", "story", "medical")
# Recipes trained before a shipped one, because it continues from their weights (train.init_adapter).
# Their adapters go to runs/adapters/NAME: they are a means, not shipped.
STAGES = {"qa": ("qa_first", "qa_second", "qa_third", "qa_fourth", "qa"), "ner": ("ner_first", "ner")}


def out_dir(recipe: str) -> Path:
    return Path("adapters") / recipe if recipe in SHIPPED else Path("runs") / "adapters" / recipe


def up_to_date(name: str) -> bool:
    """The adapter exists, is valid, and was trained with this recipe's data, model and hyperparameters
    (run-local settings such as threads or the checkpoint folder do not count)."""
    from bot.adapters import validate_adapter
    from bot.errors import LorabotError
    from training.config import fingerprint, load_config

    out = REPO / out_dir(name)
    try:
        validate_adapter(out)
        used = tomllib.loads((out / "recipe.toml").read_text(encoding="utf-8"))
        return fingerprint(used) == fingerprint(load_config(HERE / f"{name}.toml"))
    except (LorabotError, OSError, KeyError, tomllib.TOMLDecodeError):
        return False


def command(name: str, extra: list[str]) -> list[str]:
    task = tomllib.loads((HERE / f"{name}.toml").read_text(encoding="utf-8"))["task"]
    return [sys.executable, "-m", "training", "train", task, "--config", str(HERE / f"{name}.toml"),
            "--out", str(out_dir(name)), "--resume", *(["--set", *extra] if extra else [])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", default=[], metavar="NAME",
                        help=f"which adapters (default: all of {', '.join(SHIPPED)})")
    parser.add_argument("--force", action="store_true", help="retrain even when the adapter is up to date")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="passed on to every run")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(SHIPPED))
    if unknown:
        parser.error(f"unknown adapter(s) {', '.join(unknown)}; choose from {', '.join(SHIPPED)}")
    os.chdir(REPO)  # the recipes' data paths are relative to the repository root
    failed = []
    for shipped in args.names or SHIPPED:
        retrained = False  # a retrained stage makes the stages after it stale, whatever their recipes say
        for name in STAGES.get(shipped, (shipped,)):
            cmd = command(name, args.set)
            if not args.force and not args.set and not retrained and up_to_date(name):
                print(f"{out_dir(name)}: up to date with training/recipes/{name}.toml, skipped", flush=True)
                continue
            print("$ " + " ".join(cmd), flush=True)
            retrained = True
            if args.dry_run:
                continue
            started = time.perf_counter()
            code = subprocess.call(cmd)
            print(f"{name}: exit {code} after {(time.perf_counter() - started) / 60:.1f} min", flush=True)
            if code:
                failed.append(name)
                break  # the next stage needs this one's adapter
    if failed:
        print(f"failed: {', '.join(failed)} (rerun `make adapters` to resume them)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
