"""``python -m training.rescore adapters/NAME``: score a shipped adapter's dev sets again with the current
decoding (its recipe's dev data and final_limit, as its training run's final evaluation) and rewrite its
metrics.json, manifest scores and model card. For a change in how the bot decodes (QA's order check), so a
card always shows what the bot does; the bare model's scores are kept unless ``--base`` scores it again.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def rescore(folder: Path, *, base: bool = False, batch_size: int = 16) -> dict[str, Any]:
    import torch

    from bot.adapters import MANIFEST, validate_adapter
    from training.calibrate import _write
    from training.card import CARD_END, write_card
    from training.config import load_config
    from training.evaluate import PRIMARY, evaluate
    from training.model import load_adapter, load_base
    from training.tasks import read_data

    info = validate_adapter(folder)
    config = load_config(folder / "recipe.toml")
    _, dev, data_info = read_data(config, info.labels)
    model, tok, ref = load_base(config.base, dtype="float32", device="cuda" if torch.cuda.is_available() else "cpu")
    model = load_adapter(model, folder)
    limit = config.eval.final_limit

    def score() -> dict[str, Any]:
        return {name: evaluate(config.task, model, tok, examples[:limit] if limit else examples,
                               labels=info.labels, batch_size=batch_size, max_new_tokens=config.eval.max_new_tokens,
                               max_length=config.train.max_length, themes=config.task == "story" and i == 0)
                for i, (name, examples) in enumerate(dev.items())}

    metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    metrics["dev"] = score()
    if base:
        with model.disable_adapter():
            metrics["base"] = score()
    manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    # What was added to the card by hand after the generated part (levers measured, say) stays.
    card = (folder / "README.md").read_text(encoding="utf-8") if (folder / "README.md").exists() else ""
    added = card.split(CARD_END, 1)[1] if CARD_END in card else ""
    manifest["dev_scores"] = {k: v[PRIMARY[config.task]] for k, v in metrics["dev"].items()}
    _write(folder / "metrics.json", json.dumps(metrics, indent=1) + "\n")
    _write(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    write_card(folder / "README.md", name=manifest.get("name", info.name), config=config, base_name=ref.name,
               labels=list(info.labels), data=data_info, train=metrics["train"], scores=metrics["dev"],
               base_scores=metrics.get("base", {}), calibration=metrics.get("calibration"))
    if added:
        _write(folder / "README.md", (folder / "README.md").read_text(encoding="utf-8").rstrip("\n") + added)
    validate_adapter(folder)   # what was written must load
    return metrics


def main(argv: list[str] | None = None) -> int:
    from bot.errors import LorabotError

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", type=Path, help="an adapter folder made by lorabot train")
    parser.add_argument("--base", action="store_true", help="score the bare base model again too")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    try:
        metrics = rescore(args.adapter, base=args.base, batch_size=args.batch_size)
    except LorabotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, scores in metrics["dev"].items():
        print(name, {k: round(v, 2) if isinstance(v, float) else v for k, v in scores.items() if k != "examples"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
