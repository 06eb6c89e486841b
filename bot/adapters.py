"""Adapter folders: discover, validate and describe them (no torch needed).

An adapter folder is self-describing:
    adapter_config.json         PEFT's LoRA config (plain LoRA on linear layers, no modules_to_save)
    adapter_model.safetensors   the LoRA weights (never pickles)
    lorabot.json                the manifest: task, prompt-format version, labels, base model (sentiment: label_offsets)
    README.md                   the model card (data, hyperparameters, measured scores)
    metrics.json, curves.png    optional: training/eval figures
A bad folder is reported with a clear reason and skipped; the others still load.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot.errors import AdapterError
from bot.skills import FORMATS, LABELLED_TASKS

MANIFEST = "lorabot.json"
MANIFEST_SCHEMA = 1
WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")  # use with fullmatch: `$` also matches before "\n"
RESERVED_NAMES = frozenset({"base", "__base__", "none", "chat"})


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    path: Path
    task: str
    format_version: int
    labels: tuple[str, ...]
    base_model: str
    base_shape: str
    rank: int
    target_modules: tuple[str, ...]
    description: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    # Sentiment: per-label log-prior corrections fitted after training (training/calibrate.py); {} = none.
    label_offsets: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class AdapterProblem:
    name: str
    path: Path
    reason: str

    def __str__(self) -> str:
        return f"adapter {self.name!r} ({self.path}): {self.reason}"


def manifest_dict(
    *, name: str, task: str, labels: list[str] | tuple[str, ...], base_model: str, base_shape: str,
    description: str = "", extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest written by training; the single place its layout is defined."""
    if task not in FORMATS:
        raise AdapterError(f"unknown task {task!r}; known: {', '.join(FORMATS)}")
    data: dict[str, Any] = {
        "lorabot_manifest": MANIFEST_SCHEMA,
        "name": name,
        "task": task,
        "format_version": FORMATS[task].version,
        "labels": list(labels),
        "base_model": base_model,
        "base_shape": base_shape,
        "description": description,
    }
    if extra:
        data.update(extra)
    return data


def safetensors_header(path: Path) -> dict[str, Any]:
    """Parse a safetensors header without loading tensors (and without torch)."""
    try:
        with path.open("rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise AdapterError(f"{path.name} is truncated (no safetensors header)")
            (n,) = struct.unpack("<Q", raw_len)
            if n > 100_000_000:
                raise AdapterError(f"{path.name} is not a safetensors file (header length {n})")
            header = json.loads(f.read(n))
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: absurdly nested JSON
        raise AdapterError(f"{path.name} is not a readable safetensors file: {exc}") from None
    if not isinstance(header, dict):
        raise AdapterError(f"{path.name} is not a safetensors file")
    return header


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterError(f"{path.name} is missing") from None
    except (OSError, ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError are ValueErrors
        raise AdapterError(f"{path.name} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise AdapterError(f"{path.name} must hold a JSON object")
    return data


def validate_adapter(path: Path, *, base_model: str | None = None, base_shape: str | None = None) -> AdapterInfo:
    """Check one adapter folder; raise AdapterError with the reason when it cannot be used."""
    name = path.name
    if not NAME_RE.fullmatch(name) or name in RESERVED_NAMES:
        raise AdapterError(
            f"folder name {name!r} is not a valid adapter name (lower-case letters, digits, '-' and '_'; "
            f"not one of {', '.join(sorted(RESERVED_NAMES))})"
        )
    if not path.is_dir():
        raise AdapterError("not a folder")
    pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise AdapterError(f"contains pickled weights ({', '.join(pickles)}); lorabot loads safetensors only")
    manifest = _read_json(path / MANIFEST)
    peft_config = _read_json(path / PEFT_CONFIG)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise AdapterError(f"{WEIGHTS} is missing")

    if manifest.get("lorabot_manifest") != MANIFEST_SCHEMA:
        raise AdapterError(f"{MANIFEST}: unsupported manifest schema {manifest.get('lorabot_manifest')!r}")
    task = manifest.get("task")
    if task not in FORMATS:
        raise AdapterError(f"{MANIFEST}: unknown task {task!r} (known: {', '.join(FORMATS)})")
    version = manifest.get("format_version")
    if version != FORMATS[task].version:
        raise AdapterError(
            f"trained for {task} prompt format v{version}, but this lorabot uses v{FORMATS[task].version}; "
            "retrain it with this version (`lorabot train`)"
        )
    labels = manifest.get("labels") or []
    if not isinstance(labels, list) or not all(isinstance(x, str) and x.strip() for x in labels):
        raise AdapterError(f"{MANIFEST}: labels must be a list of non-empty strings")
    if task in LABELLED_TASKS and len(labels) < (2 if task == "sentiment" else 1):
        raise AdapterError(f"{MANIFEST}: a {task} adapter must list its labels")
    if len(set(labels)) != len(labels):
        raise AdapterError(f"{MANIFEST}: duplicate labels")
    offsets = _label_offsets(manifest.get("label_offsets", {}), labels)
    shape = str(manifest.get("base_shape", ""))
    if base_shape is not None and shape != base_shape:
        raise AdapterError(
            f"made for base model {manifest.get('base_model')!r} (shape {shape or 'unknown'}), which does not "
            f"match the loaded base model {base_model!r} (shape {base_shape})"
        )

    if str(peft_config.get("peft_type", "")).upper() != "LORA":
        raise AdapterError(f"{PEFT_CONFIG}: peft_type must be LORA, got {peft_config.get('peft_type')!r}")
    if peft_config.get("modules_to_save"):
        raise AdapterError(
            f"{PEFT_CONFIG}: modules_to_save is set; lorabot adapters must be plain LoRA on linear layers "
            "(so they load in PEFT, vLLM and LoRAX)"
        )
    rank = peft_config.get("r")
    if not isinstance(rank, int) or rank <= 0:
        raise AdapterError(f"{PEFT_CONFIG}: r must be a positive integer")
    targets = peft_config.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]

    header = safetensors_header(weights)
    tensor_names = [k for k in header if k != "__metadata__"]
    if not tensor_names:
        raise AdapterError(f"{WEIGHTS} holds no tensors")
    stray = [k for k in tensor_names if "lora_" not in k]
    if stray:
        raise AdapterError(f"{WEIGHTS} holds non-LoRA tensors (e.g. {stray[0]}); only plain LoRA is supported")

    metrics: dict[str, Any] = {}
    if (path / "metrics.json").is_file():
        try:
            metrics = _read_json(path / "metrics.json")
        except AdapterError:
            metrics = {}
    return AdapterInfo(
        name=name, path=path, task=task, format_version=version, labels=tuple(labels),
        base_model=str(manifest.get("base_model", "")), base_shape=shape, rank=rank,
        target_modules=tuple(targets), description=str(manifest.get("description", "")), metrics=metrics,
        label_offsets=offsets,
    )


MAX_OFFSET = 20.0  # a probability scaled by e^20 or more is no correction any more: a broken file


def _label_offsets(raw: Any, labels: list[str]) -> dict[str, float]:
    if not isinstance(raw, dict):
        raise AdapterError(f"{MANIFEST}: label_offsets must be an object of label -> number")
    unknown = sorted(set(raw) - set(labels))
    if unknown:
        raise AdapterError(f"{MANIFEST}: label_offsets names labels the adapter does not have: {', '.join(unknown)}")
    for label, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
                or abs(value) > MAX_OFFSET:
            raise AdapterError(f"{MANIFEST}: label_offsets[{label!r}] must be a number between "
                               f"-{MAX_OFFSET:g} and {MAX_OFFSET:g}, got {value!r}")
    return {label: float(raw[label]) for label in labels if label in raw}


def scan_adapters(
    folder: Path, *, base_model: str | None = None, base_shape: str | None = None,
) -> tuple[dict[str, AdapterInfo], list[AdapterProblem]]:
    """All valid adapters under ``folder`` by name, and a problem for each folder that is not one."""
    found: dict[str, AdapterInfo] = {}
    problems: list[AdapterProblem] = []
    if not folder.is_dir():
        return found, problems
    root = folder.resolve()
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_dir():
            continue
        if not path.resolve().is_relative_to(root):
            problems.append(AdapterProblem(path.name, path, "links outside the adapters folder; refused"))
            continue
        try:
            found[path.name] = validate_adapter(path, base_model=base_model, base_shape=base_shape)
        except AdapterError as exc:
            problems.append(AdapterProblem(path.name, path, str(exc)))
    return found, problems


def shape_signature(config: Any) -> str:
    """What must match between an adapter and a base model for the LoRA weights to fit."""
    fields = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "intermediate_size", "vocab_size")
    return ":".join(str(getattr(config, f, None)) for f in fields)
