"""Label offsets for a sentiment adapter: corrections of its label priors, fitted on data it never trained on.

Why: the sentiment recipe trains on label-balanced tweets beside two-class SST-2 sentences, so the
priors the adapter learns are its training mix's, not a real feed's (on TweetEval dev the third run
recalled 89.4% of negative tweets and 54.5% of neutral ones). Adding one offset per label to the
log-probabilities is Bayes' rule for a change of label priors; the offsets are chosen to maximise
macro-recall (the mean over the calibration files) on the recipe's ``data.calibrate`` examples, which
are disjoint from its training and dev data. The manifest records them (``label_offsets``), and the bot
and ``lorabot eval`` apply them through ``SentimentFormat.result``, so the dev scores measure what the
bot does. ``lorabot calibrate ADAPTER`` fits them for an existing folder; training fits them at its end.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# Offsets tried for each label (natural log: -3..3 in steps of 0.05); the first label stays at 0.
GRID = tuple(i / 20 for i in range(-60, 61))
SWEEPS = 3


def macro_recall(rows: Sequence[Sequence[float]], gold: Sequence[int], offsets: Sequence[float]) -> float:
    """Macro-recall (percent) of argmax(log-probability + offset) over the labels present in ``gold``."""
    hits, counts = [0] * len(offsets), [0] * len(offsets)
    for row, g in zip(rows, gold, strict=True):
        best = max(range(len(row)), key=lambda j: row[j] + offsets[j])
        counts[g] += 1
        hits[g] += best == g
    present = [h / c for h, c in zip(hits, counts, strict=True) if c]
    return 100 * sum(present) / len(present)


def fit_offsets(sets: Sequence[tuple[Sequence[str], Sequence[Sequence[float]], Sequence[str]]],
                labels: Sequence[str]) -> dict[str, float]:
    """Offsets maximising the mean macro-recall over ``sets``: (choices, probabilities per example, gold
    labels) each. Coordinate ascent over GRID; an offset moves only for a strictly better score, so data
    that needs no correction keeps 0."""
    prepared = [([labels.index(c) for c in choices],
                 [[math.log(max(p, 1e-12)) for p in row] for row in probs],
                 [list(choices).index(g) for g in gold]) for choices, probs, gold in sets]

    def score(offsets: list[float]) -> float:
        return sum(macro_recall(rows, gold, [offsets[i] for i in index])
                   for index, rows, gold in prepared) / len(prepared)

    offsets = [0.0] * len(labels)
    best = score(offsets)
    for _ in range(SWEEPS):
        moved = False
        for i in range(1, len(labels)):
            for value in GRID:
                trial = [*offsets[:i], value, *offsets[i + 1:]]
                if (s := score(trial)) > best + 1e-9:
                    offsets, best, moved = trial, s, True
        if not moved:
            break
    return {label: round(v, 2) for label, v in zip(labels, offsets, strict=True)}


def calibrate(model: Any, tok: Any, labels: Sequence[str], calibration: Mapping[str, Sequence[Any]],
              dev: Mapping[str, Sequence[Any]], *, batch_size: int = 32,
              predictions: dict[str, list[dict[str, Any]]] | None = None) -> dict[str, Any]:
    """Fit the offsets on ``calibration`` and score ``dev`` with and without them (one forward pass each).

    ``predictions``, when given, receives each dev set's records as ``evaluate`` writes them (offsets
    applied), so a trainer needs no second pass over dev for its final scores.
    """
    from training.evaluate import (
        label_probs,
        sentiment_choices,
        sentiment_metrics,
        sentiment_predictions,
        sentiment_records,
    )

    was_training = model.training
    model.eval()
    try:
        def probabilities(examples: Sequence[Any]) -> tuple[list[str], list[list[float]]]:
            choices = sentiment_choices(examples, labels)
            return choices, label_probs(model, tok, [ex.text for ex in examples], choices, batch_size=batch_size)

        fit_sets = {name: (*probabilities(examples), [ex.label for ex in examples])
                    for name, examples in calibration.items()}
        offsets = fit_offsets(list(fit_sets.values()), labels)
        dev_probs = {name: probabilities(examples) for name, examples in dev.items()}
    finally:
        model.train(was_training)

    def scores(choices: list[str], probs: list[list[float]], gold: list[str], with_offsets: bool) -> dict[str, Any]:
        pred, _ = sentiment_predictions(probs, choices, offsets if with_offsets else None)
        return sentiment_metrics(gold, pred, choices) | {"labels": choices}

    fitted = {name: {"n": len(gold), "macro_recall_before": scores(c, p, gold, False)["macro_recall"],
                     "macro_recall_after": scores(c, p, gold, True)["macro_recall"]}
              for name, (c, p, gold) in fit_sets.items()}
    golds = {name: [ex.label for ex in examples] for name, examples in dev.items()}
    if predictions is not None:
        for name, (choices, probs) in dev_probs.items():
            predictions[name] = sentiment_records(dev[name], *sentiment_predictions(probs, choices, offsets), choices)
    return {"offsets": offsets, "fit": fitted,
            "dev_before": {n: scores(c, p, golds[n], False) for n, (c, p) in dev_probs.items()},
            "dev": {n: scores(c, p, golds[n], True) for n, (c, p) in dev_probs.items()}}


def card_section(report: Mapping[str, Any]) -> list[str]:
    """The model card's account of the offsets: what they are, what they were fitted on, what they changed."""
    offsets = ", ".join(f"{label} {value:+.2f}" for label, value in report["offsets"].items())
    lines = [
        "## Label offsets", "",
        f"Added to the labels' log-probabilities before the bot picks one (`label_offsets` in lorabot.json): "
        f"{offsets}. Fitted after training to maximise macro-recall on examples that neither trained nor "
        "scored the adapter (training/calibrate.py); the dev scores above include them.", "",
        "| data | n | macro-recall without | with |", "|---|---:|---:|---:|",
        *[f"| {name} (fit) | {r['n']} | {r['macro_recall_before']:.2f} | {r['macro_recall_after']:.2f} |"
          for name, r in report["fit"].items()],
    ]
    for name, after in report["dev"].items():
        before = report["dev_before"][name]
        lines.append(f"| {name} (dev) | {after['n']} | {before['macro_recall']:.2f} | {after['macro_recall']:.2f} |")
    lines += ["", "Accuracy on the dev data without the offsets: "
              + ", ".join(f"{name} {s['accuracy']:.2f}" for name, s in report["dev_before"].items()) + "."]
    return lines


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)  # a failure midway leaves the old file whole


def calibrate_folder(folder: Path, *, base: str | None = None, batch_size: int = 32) -> dict[str, Any]:
    """``lorabot calibrate``: fit the offsets of an existing sentiment adapter with its recipe's
    ``data.calibrate``, then rewrite its manifest, metrics.json and model card."""
    import torch

    from bot.adapters import MANIFEST, validate_adapter
    from bot.errors import AdapterError, ConfigError
    from training.card import write_card
    from training.config import load_config
    from training.evaluate import PRIMARY
    from training.model import load_adapter, load_base
    from training.tasks import read_calibration, read_data

    info = validate_adapter(folder)
    if info.task != "sentiment":
        raise AdapterError(f"{folder} is a {info.task} adapter; label offsets are for sentiment adapters")
    config = load_config(folder / "recipe.toml")
    if not config.data.calibrate:
        raise ConfigError(str(folder / "recipe.toml"), ["data.calibrate: no calibration data in the recipe"])
    _, dev, data_info = read_data(config, info.labels)
    calibration, calibration_info = read_calibration(config, info.labels)
    model, tok, ref = load_base(base or config.base, dtype="float32",
                                device="cuda" if torch.cuda.is_available() else "cpu")
    model = load_adapter(model, folder)
    limit = config.eval.final_limit
    report = calibrate(model, tok, info.labels, calibration,
                       {k: v[:limit] if limit else v for k, v in dev.items()}, batch_size=batch_size)

    metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    metrics["dev"], metrics["calibration"] = report["dev"], report
    manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    manifest["label_offsets"] = report["offsets"]
    manifest["dev_scores"] = {k: v[PRIMARY["sentiment"]] for k, v in report["dev"].items()}
    _write(folder / "metrics.json", json.dumps(metrics, indent=1) + "\n")
    _write(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    write_card(folder / "README.md", name=info.name, config=config, base_name=ref.name, labels=list(info.labels),
               data=data_info + calibration_info, train=metrics["train"], scores=report["dev"],
               base_scores=metrics.get("base", {}), calibration=report)
    validate_adapter(folder)  # what was written must load
    return report
