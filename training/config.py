"""Training configuration: typed, frozen settings from defaults, a recipe TOML file and ``--set key=value``.

As in bot/config.py, every setting is a typed field with a default; unknown keys and wrong types are
refused, and every problem is reported at once (one ConfigError naming the file and each dotted key).
``TrainConfig.to_dict()`` is the plain form that reaches the disk: the resolved recipe.toml (run and
adapter folders, the model card) and the ``--resume`` fingerprint are computed from it, so they are the
same bytes as when the configuration was a nested dict. Data entries (training/dataspec.py) remember how
the recipe wrote them for the same reason.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot.errors import ConfigError
from training.dataspec import DataSpec, data_specs

TASKS = ("sentiment", "ner", "qa", "story", "domain", "chat")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPES = ("auto", "float32", "bfloat16")


class _Section:
    """The plain form of a settings table (lists for tuples, data entries as the recipe wrote them)."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]


def _plain(value: Any) -> Any:
    if isinstance(value, _Section):
        return value.to_dict()
    if isinstance(value, DataSpec):
        return value.written()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class DataSettings(_Section):
    train: tuple[DataSpec, ...] = ()   # data specs: "file" or {path, limit, skip, min_words, balance, holdout, part}
    dev: tuple[DataSpec, ...] = ()     # each dev spec is scored separately (one score per file)
    # Sentiment: examples disjoint from train and dev that fit the adapter's label offsets after training
    # (training/calibrate.py); empty = none.
    calibrate: tuple[DataSpec, ...] = ()


@dataclass(frozen=True)
class LoraSettings(_Section):
    r: int = 16
    alpha: int = 32
    # No LoRA dropout by default: on CPU its random masks cost ~40% of a training step (measured).
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ALL_LINEAR


@dataclass(frozen=True)
class TrainSettings(_Section):
    epochs: int = 1
    max_steps: int = 0             # 0 = epochs decide
    batch_size: int = 16           # examples per optimizer step, over all processes
    micro_batch_tokens: int = 2048  # padded tokens per forward pass (bounds memory); 0 = the whole shard
    lr: float = 3e-4
    warmup: float = 0.03           # fraction of the steps
    min_lr_ratio: float = 0.1      # cosine decay ends at lr * min_lr_ratio
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 256          # tokens (prompt + target); longer examples are dropped (story: cut)
    dtype: str = "auto"            # auto = float32 on CPU (fastest here), bfloat16 mixed precision on CUDA
    threads: int = 0               # torch CPU threads per process; 0 = cores / processes
    log_every: int = 10
    eval_every: int = 200          # steps between dev evaluations; 0 = only at the end
    checkpoint_every: int = 50     # steps between checkpoints; 0 = none
    # Continue fine-tuning from an adapter folder (its weights, not a fresh LoRA), as LLaMA-Factory's
    # adapter_name_or_path: same task, format version, base model and LoRA shape. "" = a fresh LoRA.
    init_adapter: str = ""
    keep_best: bool = False        # publish the weights of the best periodic dev evaluation, not the last step's
    best_of: str = ""              # keep_best judges by this dev set (its name, e.g. "sst2_dev"); "" = the mean of all
    run_dir: str = ""              # default runs/NAME
    trace: bool = False            # write runs/NAME/trace-rankN.jsonl (the examples each process saw)


@dataclass(frozen=True)
class EvalSettings(_Section):
    batch_size: int = 16
    limit: int = 200               # dev examples per file for the periodic evaluation (0 = all)
    final_limit: int = 0           # dev examples per file for the final scores in the card (0 = all)
    max_new_tokens: int = 0        # 0 = the task's default
    base: bool = True              # also score the bare base model for the model card


@dataclass(frozen=True)
class TrainConfig(_Section):
    """One training run's settings; the field order is the order of the written recipe.toml."""

    task: str = ""
    base: str = "bundled"          # "bundled", a model folder, or a cached Hugging Face id
    seed: int = 1234
    description: str = ""
    labels: tuple[str, ...] = ()   # sentiment: the classes (default negative/neutral/positive); ner: entity types
    data: DataSettings = field(default_factory=DataSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)


def default_config() -> TrainConfig:
    return TrainConfig()


def parse_value(text: str) -> Any:
    """A ``--set`` value as a TOML literal (``3e-4``, ``true``, ``["a"]``), else the raw string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load_config(recipe: Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Defaults, then the recipe file, then each ``key=value`` override; validated."""
    values = TrainConfig().to_dict()
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
        _merge(values, TrainConfig, loaded, "", problems)
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
        _merge(values, TrainConfig, nested, "", problems)
    config = _resolve(values, problems)
    if problems:
        raise ConfigError(source if not overrides else f"{source} + --set", problems)
    return config


def replace(config: TrainConfig, **changes: Any) -> TrainConfig:
    """A copy with settings changed as a recipe would write them (``task="qa"``, ``train={"lr": 1e-4}``,
    ``data={"train": ["a.jsonl"]}``), validated as ``load_config`` validates a recipe."""
    values, problems = config.to_dict(), []
    _merge(values, TrainConfig, changes, "", problems)
    result = _resolve(values, problems)
    if problems:
        raise ConfigError("changed settings", problems)
    return result


@functools.cache
def _fields(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


_WRONG = object()


def _merge(into: dict[str, Any], cls: type, new: Mapping[str, Any], prefix: str, problems: list[str]) -> None:
    """Type-check ``new`` against ``cls``'s fields and write it into ``into`` (its plain form)."""
    kinds = _fields(cls)
    for key, value in new.items():
        dotted = f"{prefix}{key}"
        kind = kinds.get(key)
        if kind is None:
            problems.append(f"{dotted}: unknown key (known: {', '.join(kinds)})")
        elif dataclasses.is_dataclass(kind):
            if isinstance(value, dict):
                _merge(into[key], kind, value, dotted + ".", problems)  # type: ignore[arg-type]
            else:
                problems.append(f"{dotted}: expected a table")
        elif (checked := _checked(kind, value)) is _WRONG:
            name = "list" if typing.get_origin(kind) is tuple else kind.__name__
            problems.append(f"{dotted}: expected {name}, got {value!r}")
        else:
            into[key] = checked


def _checked(kind: Any, value: Any) -> Any:
    """``value`` as a ``kind`` field holds it, or _WRONG. Lists are checked item by item in ``_resolve``."""
    if kind is bool or isinstance(value, bool):  # TOML's true is no number, and 1 is no boolean
        return value if kind is bool and isinstance(value, bool) else _WRONG
    if kind is float:
        return float(value) if isinstance(value, int | float) else _WRONG
    if typing.get_origin(kind) is tuple:
        return value if isinstance(value, list) else _WRONG
    return value if isinstance(value, kind) else _WRONG


def _build(cls: type, values: dict[str, Any], prefix: str, problems: list[str]) -> Any:
    kwargs: dict[str, Any] = {}
    for name, kind in _fields(cls).items():
        value = values[name]
        if dataclasses.is_dataclass(kind):
            kwargs[name] = _build(kind, value, f"{prefix}{name}.", problems)  # type: ignore[arg-type]
        elif typing.get_args(kind)[:1] == (DataSpec,):
            kwargs[name] = data_specs(value, f"{prefix}{name}", problems)
        elif typing.get_origin(kind) is tuple:
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def _resolve(values: dict[str, Any], problems: list[str]) -> TrainConfig:
    """The merged plain form as a TrainConfig; value problems are added to ``problems``."""
    spec_problems: list[str] = []
    config: TrainConfig = _build(TrainConfig, values, "", spec_problems)
    problems += _check(config, spec_problems)
    return config


def _check(config: TrainConfig, spec_problems: list[str]) -> list[str]:
    problems = []
    if config.task and config.task not in TASKS:
        problems.append(f"task: {config.task!r} is not one of {', '.join(TASKS)}")
    problems += spec_problems
    train, lora = config.train, config.lora
    for key in ("batch_size", "epochs", "max_length"):
        if getattr(train, key) < 1:
            problems.append(f"train.{key}: must be at least 1")
    for key in ("micro_batch_tokens", "max_steps", "eval_every", "checkpoint_every", "threads", "log_every"):
        if getattr(train, key) < 0:
            problems.append(f"train.{key}: must not be negative")
    if train.lr <= 0:
        problems.append("train.lr: must be positive")
    if train.best_of and not train.keep_best:
        problems.append("train.best_of: only used with train.keep_best = true")
    if train.keep_best and not train.eval_every:
        problems.append("train.keep_best: needs periodic evaluations (train.eval_every > 0)")
    if train.dtype not in DTYPES:
        problems.append("train.dtype: auto, float32 or bfloat16")
    if lora.r < 1:
        problems.append("lora.r: must be at least 1")
    if not lora.target_modules or not all(isinstance(m, str) for m in lora.target_modules):
        problems.append("lora.target_modules: a non-empty list of linear module names")
    if not all(isinstance(x, str) and x.strip() for x in config.labels):
        problems.append("labels: a list of non-empty strings")
    return problems


def fingerprint(config: TrainConfig | Mapping[str, Any]) -> str:
    """What must not change between a run and its ``--resume`` (data order and weights depend on it).

    Also takes a recipe.toml read back from an adapter folder as a plain mapping (make_all compares one)."""
    plain = config.to_dict() if isinstance(config, TrainConfig) else config
    keep = {k: plain[k] for k in ("task", "base", "seed", "labels", "data", "lora")}
    if not keep["data"].get("calibrate"):  # older recipes lack the key: their fingerprints stay the same
        keep["data"] = {k: v for k, v in keep["data"].items() if k != "calibrate"}
    keep["train"] = {k: plain["train"][k] for k in ("batch_size", "epochs", "max_steps", "max_length", "lr")}
    if plain["train"].get("keep_best"):  # older recipes lack the key: their fingerprints stay the same
        keep["train"]["keep_best"] = True
        if plain["train"].get("best_of"):
            keep["train"]["best_of"] = plain["train"]["best_of"]
    if plain["train"].get("init_adapter"):
        keep["train"]["init_adapter"] = plain["train"]["init_adapter"]
    return json.dumps(keep, sort_keys=True)


def to_toml(config: TrainConfig) -> str:
    """The resolved config as TOML (tomllib reads but cannot write; our values are simple)."""
    plain = config.to_dict()
    lines: list[str] = []
    tables = [(k, v) for k, v in plain.items() if isinstance(v, dict)]
    for key, value in plain.items():
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


__all__ = ["ConfigError", "DataSettings", "DataSpec", "EvalSettings", "LoraSettings", "TrainConfig", "TrainSettings",
           "data_specs", "default_config", "fingerprint", "load_config", "replace", "to_toml"]
