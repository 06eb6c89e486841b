"""Training configuration: defaults, recipe TOML files and ``--set key=value`` overrides.

The resolved configuration is a plain dict (so it can be written back as TOML and compared on
``--resume``); every problem is reported at once with its dotted key, as bot/config.py does.
"""

from __future__ import annotations

import copy
import json
import tomllib
from pathlib import Path
from typing import Any

from bot.errors import ConfigError

TASKS = ("sentiment", "ner", "qa", "story", "domain", "chat")
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

DEFAULTS: dict[str, Any] = {
    "task": "",
    "base": "bundled",             # "bundled", a model folder, or a cached Hugging Face id
    "seed": 1234,
    "description": "",
    "labels": [],                  # sentiment: the classes (default negative/neutral/positive); ner: entity types
    "data": {
        "train": [],               # data specs: "file" or {path, limit, skip, min_words, balance, holdout, part}
        "dev": [],                 # each dev spec is scored separately (one score per file)
    },
    # No LoRA dropout by default: on CPU its random masks cost ~40% of a training step (measured).
    "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": list(ALL_LINEAR)},
    "train": {
        "epochs": 1,
        "max_steps": 0,            # 0 = epochs decide
        "batch_size": 16,          # examples per optimizer step, over all processes
        "micro_batch_tokens": 2048,  # padded tokens per forward pass (bounds memory); 0 = the whole shard
        "lr": 3e-4,
        "warmup": 0.03,            # fraction of the steps
        "min_lr_ratio": 0.1,       # cosine decay ends at lr * min_lr_ratio
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "max_length": 256,         # tokens (prompt + target); longer examples are dropped (story: cut)
        "dtype": "auto",           # auto = float32 on CPU (fastest here), bfloat16 mixed precision on CUDA
        "threads": 0,              # torch CPU threads per process; 0 = cores / processes
        "log_every": 10,
        "eval_every": 200,         # steps between dev evaluations; 0 = only at the end
        "checkpoint_every": 50,    # steps between checkpoints; 0 = none
        # Continue fine-tuning from an adapter folder (its weights, not a fresh LoRA), as LLaMA-Factory's
        # adapter_name_or_path: same task, format version, base model and LoRA shape. "" = a fresh LoRA.
        "init_adapter": "",
        "keep_best": False,        # publish the weights of the best periodic dev evaluation, not the last step's
        "best_of": "",             # keep_best judges by this dev set (its name, e.g. "sst2_dev"); "" = the mean of all
        "run_dir": "",             # default runs/NAME
        "trace": False,            # write runs/NAME/trace-rankN.jsonl (the examples each process saw)
    },
    "eval": {
        "batch_size": 16,
        "limit": 200,              # dev examples per file for the periodic evaluation (0 = all)
        "final_limit": 0,          # dev examples per file for the final scores in the card (0 = all)
        "max_new_tokens": 0,       # 0 = the task's default
        "base": True,              # also score the bare base model for the model card
    },
}

SPEC_KEYS = {"path": str, "limit": int, "skip": int, "min_words": int, "balance": bool, "holdout": float, "part": str}


def default_config() -> dict[str, Any]:
    return copy.deepcopy(DEFAULTS)


def parse_value(text: str) -> Any:
    """A ``--set`` value as a TOML literal (``3e-4``, ``true``, ``["a"]``), else the raw string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load_config(recipe: Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Defaults, then the recipe file, then each ``key=value`` override; validated."""
    config = default_config()
    source = "defaults"
    problems: list[str] = []
    if recipe is not None:
        source = str(recipe)
        try:
            loaded = tomllib.loads(Path(recipe).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(source, ["file not found"]) from None
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(source, [f"not valid TOML: {exc}"]) from None
        _merge(config, loaded, "", problems)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"--set {item!r}: expected key=value")
            continue
        nested: dict[str, Any] = {}
        cursor = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            cursor = cursor.setdefault(part, {})
        cursor[parts[-1]] = parse_value(value.strip())
        _merge(config, nested, "", problems)
    problems += _check(config)
    if problems:
        raise ConfigError(source if not overrides else f"{source} + --set", problems)
    return config


def _merge(into: dict[str, Any], new: dict[str, Any], prefix: str, problems: list[str]) -> None:
    for key, value in new.items():
        dotted = f"{prefix}{key}"
        if key not in into:
            problems.append(f"{dotted}: unknown key")
            continue
        default = into[key]
        if isinstance(default, dict):
            if not isinstance(value, dict):
                problems.append(f"{dotted}: expected a table")
            else:
                _merge(default, value, dotted + ".", problems)
            continue
        if isinstance(default, bool) or isinstance(value, bool):
            ok = isinstance(default, bool) and isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, int | float)
            value = float(value) if ok else value
        else:
            ok = isinstance(value, type(default))
        if not ok:
            problems.append(f"{dotted}: expected {type(default).__name__}, got {value!r}")
            continue
        into[key] = value


def data_specs(raw: list[Any], where: str, problems: list[str] | None = None) -> list[dict[str, Any]]:
    """Normalise data entries: a path string or a table with ``path`` and options."""
    specs = []
    sink = problems if problems is not None else []
    for i, item in enumerate(raw):
        spec = {"path": item} if isinstance(item, str) else item
        if not isinstance(spec, dict) or not isinstance(spec.get("path"), str):
            sink.append(f"{where}[{i}]: expected a path or a table with a path")
            continue
        for key, value in spec.items():
            kind = SPEC_KEYS.get(key)
            if kind is None:
                sink.append(f"{where}[{i}].{key}: unknown key (known: {', '.join(SPEC_KEYS)})")
            elif not isinstance(value, kind) and not (kind is float and isinstance(value, int)):
                sink.append(f"{where}[{i}].{key}: expected {kind.__name__}, got {value!r}")
        if spec.get("part", "train") not in ("train", "holdout"):
            sink.append(f"{where}[{i}].part: 'train' or 'holdout'")
        for key in ("limit", "skip", "min_words"):
            if isinstance(spec.get(key), int) and spec[key] < 0:
                sink.append(f"{where}[{i}].{key}: must not be negative")
        if not 0 <= float(spec.get("holdout", 0)) < 1:
            sink.append(f"{where}[{i}].holdout: a fraction in [0, 1)")
        specs.append(dict(spec))
    if problems is None and sink:
        raise ConfigError(where, sink)
    return specs


def _check(config: dict[str, Any]) -> list[str]:
    problems = []
    if config["task"] and config["task"] not in TASKS:
        problems.append(f"task: {config['task']!r} is not one of {', '.join(TASKS)}")
    data_specs(config["data"]["train"], "data.train", problems)
    data_specs(config["data"]["dev"], "data.dev", problems)
    train, lora = config["train"], config["lora"]
    for key in ("batch_size", "epochs", "max_length"):
        if train[key] < 1:
            problems.append(f"train.{key}: must be at least 1")
    for key in ("micro_batch_tokens", "max_steps", "eval_every", "checkpoint_every", "threads", "log_every"):
        if train[key] < 0:
            problems.append(f"train.{key}: must not be negative")
    if train["lr"] <= 0:
        problems.append("train.lr: must be positive")
    if train["best_of"] and not train["keep_best"]:
        problems.append("train.best_of: only used with train.keep_best = true")
    if train["keep_best"] and not train["eval_every"]:
        problems.append("train.keep_best: needs periodic evaluations (train.eval_every > 0)")
    if train["dtype"] not in ("auto", "float32", "bfloat16"):
        problems.append("train.dtype: auto, float32 or bfloat16")
    if lora["r"] < 1:
        problems.append("lora.r: must be at least 1")
    if not lora["target_modules"] or not all(isinstance(m, str) for m in lora["target_modules"]):
        problems.append("lora.target_modules: a non-empty list of linear module names")
    if not all(isinstance(x, str) and x.strip() for x in config["labels"]):
        problems.append("labels: a list of non-empty strings")
    return problems


def fingerprint(config: dict[str, Any]) -> str:
    """What must not change between a run and its ``--resume`` (data order and weights depend on it)."""
    keep = {k: config[k] for k in ("task", "base", "seed", "labels", "data", "lora")}
    keep["train"] = {k: config["train"][k] for k in ("batch_size", "epochs", "max_steps", "max_length", "lr")}
    if config["train"].get("keep_best"):  # older recipes lack the key: their fingerprints stay the same
        keep["train"]["keep_best"] = True
        if config["train"].get("best_of"):
            keep["train"]["best_of"] = config["train"]["best_of"]
    if config["train"].get("init_adapter"):
        keep["train"]["init_adapter"] = config["train"]["init_adapter"]
    return json.dumps(keep, sort_keys=True)


def to_toml(config: dict[str, Any]) -> str:
    """The resolved config as TOML (tomllib reads but cannot write; our values are simple)."""
    lines: list[str] = []
    tables = [(k, v) for k, v in config.items() if isinstance(v, dict)]
    for key, value in config.items():
        if not isinstance(value, dict):
            lines.append(f"{key} = {_toml_value(value)}")
    for name, table in tables:
        lines += ["", f"[{name}]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")
