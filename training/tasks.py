"""One function per task behind ``lorabot train``: read its data, settle its labels, train.

Each takes the resolved config (training.config.load_config) and the output folder, and returns the
adapter folder. ``evaluate_adapter`` is the ``lorabot eval`` counterpart.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bot.errors import DataError
from bot.skills import NERFormat, SentimentFormat
from training import data as D
from training.config import TrainConfig
from training.dataspec import DataSpec


def read_data(config: TrainConfig, labels: tuple[str, ...]) -> tuple[list[D.Example], dict[str, list[D.Example]],
                                                                 list[dict[str, Any]]]:
    """Training examples (all specs joined), dev sets by name, and a description of each file for the card."""
    task, seed = config.task, config.seed
    train_specs = config.data.train
    if not train_specs:
        raise DataError("data.train", None, "no training data: pass --data FILE or set data.train in the recipe")
    train, info = [], []
    for spec in train_specs:
        examples = D.load(task, spec, labels, seed)
        train += examples
        info.append({"path": spec.path, "part": _part(spec), "examples": len(examples), "split": "train"})
    dev: dict[str, list[D.Example]] = {}
    for spec in config.data.dev:
        examples = D.load(task, spec, labels, seed)
        dev[_set_name(spec, dev)] = examples
        info.append({"path": spec.path, "part": f"dev: {_part(spec)}", "examples": len(examples), "split": "dev"})
    return train, dev, info


def read_calibration(config: TrainConfig, labels: tuple[str, ...]) -> tuple[dict[str, list[D.Example]],
                                                                          list[dict[str, Any]]]:
    """The ``data.calibrate`` sets by name (sentiment's label offsets, training/calibrate.py) and their card rows."""
    if config.data.calibrate and config.task != "sentiment":
        raise DataError("data.calibrate", None, f"label offsets are for sentiment adapters, not {config.task}")
    sets: dict[str, list[D.Example]] = {}
    info = []
    for spec in config.data.calibrate:
        name = _set_name(spec, sets)
        sets[name] = D.load(config.task, spec, labels, config.seed)
        info.append({"path": spec.path, "part": f"calibration: {_part(spec)}", "examples": len(sets[name]),
                     "split": "calibrate"})
    return sets, info


def _set_name(spec: DataSpec, taken: Mapping[str, Any]) -> str:
    """A dev or calibration set's name: its file's stem (``-holdout`` for that side of a split), unique."""
    name = Path(spec.path).stem + ("-holdout" if spec.part == "holdout" else "")
    while name in taken:
        name += "+"
    return name


def _part(spec: DataSpec) -> str:
    bits = []
    if spec.holdout:
        bits.append(f"{spec.part} side of a {spec.holdout:.0%} group holdout")
    if spec.min_words:
        bits.append(f">= {spec.min_words} words")
    if spec.limit:
        bits.append(f"{'label-balanced ' if spec.balance else ''}sample of {spec.limit}")
    if spec.themes:
        bits.append("themes taken from the stories")
    return ", ".join(bits) or "all"


def _run(config: TrainConfig, out: Path, labels: tuple[str, ...], resume: bool) -> Path:
    from training.output import check_name
    from training.trainer import train

    check_name(out)  # before reading data or loading the model
    examples, dev, info = read_data(config, labels)
    calibration, calibration_info = read_calibration(config, labels)
    if config.task == "ner" and not labels:
        # Entity types as found in the training data, in the bot's usual order first.
        found = {t for ex in examples for _, t in ex.entities()}  # type: ignore[union-attr]
        labels = tuple(t for t in NERFormat.default_labels if t in found) + tuple(sorted(found -
                                                                                           set(NERFormat.default_labels)))
    return train(config, out, examples, dev, labels=labels, resume=resume, data_info=info + calibration_info,
                 calibration=calibration)


def sentiment(config: TrainConfig, out: Path, *, resume: bool = False) -> Path:
    """Classifier over ``labels`` (default negative/neutral/positive), trained on the label-token logits."""
    return _run(config, out, config.labels or SentimentFormat.default_labels, resume)


def ner(config: TrainConfig, out: Path, *, resume: bool = False) -> Path:
    """Generative NER (``entity (TYPE); ...``); entity types from ``labels`` or the training data."""
    return _run(config, out, config.labels, resume)


def qa(config: TrainConfig, out: Path, *, resume: bool = False) -> Path:
    """Short answers to questions about a context (SQuAD style)."""
    return _run(config, out, (), resume)


def story(config: TrainConfig, out: Path, *, resume: bool = False) -> Path:
    """Stories from a title/theme (or none); the whole story is the target."""
    return _run(config, out, (), resume)


def domain(config: TrainConfig, out: Path, *, resume: bool = False) -> Path:
    """Continued pre-training on raw text (causal-LM loss on every token)."""
    return _run(config, out, (), resume)


def chat(config: TrainConfig, out: Path, *, resume: bool = False) -> Path:
    """Conversations through the chat template; loss on the assistant turns only."""
    return _run(config, out, (), resume)


TRAIN = {"sentiment": sentiment, "ner": ner, "qa": qa, "story": story, "domain": domain, "chat": chat}


def evaluate_adapter(task: str, data: Path, *, adapter: Path | None, base: str = "bundled", limit: int = 0,
                     holdout: float = 0.0, batch_size: int = 16, max_new_tokens: int = 0,
                     max_length: int = 1024, threads: int = 0, progress: bool = True,
                     predictions: list[dict[str, Any]] | None = None, themes: bool = False,
                     span_constrained: bool = True, order_check: bool = True) -> dict[str, Any]:
    """Score an adapter (or, with ``adapter=None``, the bare base model) on a data file.

    ``predictions``, when given, receives one record per example (see ``training.evaluate.evaluate``)."""
    import time

    import torch

    from bot.adapters import shape_signature, validate_adapter
    from bot.engine.loading import resolve_base
    from bot.errors import AdapterError
    from training.evaluate import evaluate
    from training.model import load_adapter, load_base

    if threads:
        torch.set_num_threads(threads)
    labels: tuple[str, ...] = ()
    offsets: dict[str, float] = {}
    if adapter is not None:
        ref = resolve_base(base, progress=progress)
        from transformers import AutoConfig

        info = validate_adapter(adapter, base_model=ref.name, base_shape=shape_signature(
            AutoConfig.from_pretrained(ref.path, local_files_only=True)))
        if info.task != task:
            raise AdapterError(f"{adapter} is a {info.task} adapter, not {task}")
        labels, offsets = info.labels, info.label_offsets
    spec = DataSpec(str(data), holdout=holdout, part="holdout") if holdout else DataSpec(str(data))
    read_labels = labels or (SentimentFormat.default_labels if task == "sentiment" else ())
    examples = D.load(task, spec, read_labels, seed=0)
    examples = examples[:limit] if limit else examples
    if task == "sentiment" and not labels:
        labels = SentimentFormat.default_labels
    model, tok, ref = load_base(base, dtype="float32", device="cuda" if torch.cuda.is_available() else "cpu")
    if adapter is not None:
        model = load_adapter(model, adapter)
    started = time.perf_counter()
    metrics = evaluate(task, model, tok, examples, labels=labels, batch_size=batch_size,
                       max_new_tokens=max_new_tokens, max_length=max_length, predictions=predictions,
                       themes=themes, span_constrained=span_constrained, order_check=order_check,
                       label_offsets=offsets)
    return {"task": task, "adapter": str(adapter) if adapter else None, "base_model": ref.name, "data": str(data),
            "holdout": holdout or None, "n": len(examples), "metrics": metrics,
            "time_s": round(time.perf_counter() - started, 2)}
