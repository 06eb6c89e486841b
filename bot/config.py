"""Typed, frozen configuration read from config.toml.

Every problem (unknown key, wrong type, bad value) is collected and reported at once, with the
dotted key name, so a user fixes the file in one pass. Secrets are never read from the file: only the
names of the environment variables that hold them.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot.errors import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    base: str = "bundled"
    dtype: str = "auto"
    device: str = "auto"
    threads: int = 0


@dataclass(frozen=True)
class AdaptersConfig:
    dir: str = "adapters"


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = 16
    batch_wait_ms: int = 5
    # "fast": lorabot's batched multi-adapter forward (bot/engine/fast_llama.py); "peft": PEFT's reference
    # implementation; "auto" picks fast whenever the model architecture supports it.
    backend: str = "auto"
    # A small-batch AVX2 matmul compiled on first use (CPU only; falls back to torch when unavailable).
    cpu_kernel: bool = True
    # With cpu_kernel and a GGUF base (the bundled model): keep its Q4_1 layer weights and Q8_0 embeddings
    # as they are in the file, expanded inside the kernel (the same values as the converted float32 copy;
    # measured RSS 483 MB instead of 817 MB).
    quantized: bool = True
    # Opt-in and approximate: decode steps multiply the quantised weights with activations rounded to int8
    # per block of 32, in integers, as llama.cpp does (faster; outputs can differ from the exact path's,
    # the README gives both paths' dev scores). Off: every product is float32, greedy outputs equal PEFT's.
    int8_activations: bool = False
    # KV memory bounds. One row (prompt + generated tokens) may use at most max_row_tokens cache columns
    # (0 = the model's context); all running rows together at most kv_token_budget (0 = max_batch x the
    # row limit). A request that does not fit waits for rows to finish instead of growing every row.
    # 8,192 tokens: 16 chats of up to 512 tokens (or 8 of 1,024) at once; 360 MB in float32 for the bundled model.
    max_row_tokens: int = 0
    kv_token_budget: int = 8192
    # backend = "openai": the model runs on an OpenAI-compatible server that serves the adapters by name
    # (vLLM, LoRAX, another machine's `lorabot serve`). base_url: its address (without /v1); api_key_env:
    # the environment variable holding its key (empty: none); timeout_s: the longest wait to connect or
    # for the next data. Failed requests are retried with backoff, then answered with a clear error.
    base_url: str = ""
    api_key_env: str = ""
    timeout_s: float = 60.0


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 200
    # A 135M model drifts off topic quickly when sampled hot; chat stays close to greedy.
    temperature: float = 0.2
    top_p: float = 0.9
    repetition_penalty: float = 1.1


@dataclass(frozen=True)
class StoryConfig:
    max_new_tokens: int = 300
    temperature: float = 0.8
    top_p: float = 0.95
    repetition_penalty: float = 1.1


@dataclass(frozen=True)
class QAConfig:
    max_new_tokens: int = 24
    # Answers decoded as spans of the given text (bot/span_constraint.py): quoted, never paraphrased.
    span_constrained: bool = True
    # With span_constrained: the text is read a second time with its sentences reversed and, when the two
    # answers differ, the one both readings score higher is kept (bot/qa_answer.py).
    order_check: bool = True


@dataclass(frozen=True)
class NERConfig:
    max_new_tokens: int = 96


@dataclass(frozen=True)
class BotConfig:
    default_mode: str = "chat"
    max_input_chars: int = 4000
    history_tokens: int = 768
    system_prompt: str = "You are lorabot, a helpful and concise assistant."


@dataclass(frozen=True)
class StoreConfig:
    path: str = "lorabot.db"
    retention_days: int = 0


@dataclass(frozen=True)
class AccessConfig:
    allowed_users: tuple[str, ...] = ()
    allowed_chats: tuple[str, ...] = ()
    admins: tuple[str, ...] = ()
    rate_limit_per_minute: int = 20


@dataclass(frozen=True)
class TelegramConfig:
    token_env: str = "TELEGRAM_BOT_TOKEN"
    base_url: str = ""
    mode: str = "polling"
    webhook_url: str = ""
    webhook_listen: str = "127.0.0.1"
    webhook_port: int = 8443
    edit_interval_s: float = 1.0


@dataclass(frozen=True)
class DiscordConfig:
    token_env: str = "DISCORD_BOT_TOKEN"
    edit_interval_s: float = 1.0


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    adapters: AdaptersConfig = field(default_factory=AdaptersConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    story: StoryConfig = field(default_factory=StoryConfig)
    qa: QAConfig = field(default_factory=QAConfig)
    ner: NERConfig = field(default_factory=NERConfig)
    bot: BotConfig = field(default_factory=BotConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    access: AccessConfig = field(default_factory=AccessConfig)
    telegram: TelegramConfig = field(default_factory=TelegramConfig)
    discord: DiscordConfig = field(default_factory=DiscordConfig)
    # Folder that relative paths (adapters.dir, store.path) are resolved against.
    root: Path = Path(".")

    def path(self, relative: str) -> Path:
        p = Path(relative).expanduser()
        return p if p.is_absolute() else self.root / p

    def token(self, platform: str) -> str | None:
        """The bot token for ``platform`` from the environment, or None when unset/empty."""
        env_name = getattr(self, platform).token_env
        value = os.environ.get(env_name, "").strip()
        return value or None


# A mode is a built-in skill or an adapter's folder name (bot.adapters.NAME_RE); which adapters exist is
# known only once the engine scanned them, so an unknown but well-formed name falls back to chat at run time.
_MODE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")

_CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("auto", "bfloat16", "float16", "float32"),
    "model.device": ("auto", "cpu", "cuda"),
    "telegram.mode": ("polling", "webhook"),
    "engine.backend": ("auto", "fast", "peft", "openai"),
}
_NON_NEGATIVE = {
    "model.threads", "engine.batch_wait_ms", "engine.max_row_tokens", "engine.kv_token_budget",
    "store.retention_days", "access.rate_limit_per_minute",
    "generation.temperature", "story.temperature",
}
_POSITIVE = {
    "engine.max_batch", "generation.max_new_tokens", "story.max_new_tokens", "qa.max_new_tokens",
    "ner.max_new_tokens", "bot.max_input_chars", "bot.history_tokens", "telegram.webhook_port",
    "generation.repetition_penalty", "story.repetition_penalty", "engine.timeout_s",
}
_UNIT_INTERVAL = {"generation.top_p", "story.top_p"}
_NON_NEGATIVE |= {"telegram.edit_interval_s", "discord.edit_interval_s"}


def _check_value(key: str, value: Any, annotation: Any, problems: list[str]) -> Any:
    """Return ``value`` converted to the field's type, or record a problem and return None."""
    origin = typing.get_origin(annotation)
    if origin is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str | int) for v in value):
            problems.append(f"{key}: expected a list of strings, got {value!r}")
            return None
        return tuple(str(v) for v in value)
    if annotation is bool:
        if not isinstance(value, bool):
            problems.append(f"{key}: expected true or false, got {value!r}")
            return None
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{key}: expected an integer, got {value!r}")
            return None
    elif annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            problems.append(f"{key}: expected a number, got {value!r}")
            return None
        value = float(value)
        if not math.isfinite(value):
            problems.append(f"{key}: must be a finite number; got {value!r}")
            return None
    elif annotation is str and not isinstance(value, str):
        problems.append(f"{key}: expected a string, got {value!r}")
        return None
    if key == "bot.default_mode" and isinstance(value, str) and not _MODE_NAME.fullmatch(value):
        problems.append(f"{key}: must name a skill (chat, sentiment, ner, qa, story) or an adapter folder "
                        f"(lowercase letters, digits, - and _); got {value!r}")
    if key == "engine.base_url" and value and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", value):
        problems.append(f"{key}: must be an http:// or https:// address; got {value!r}")
    if key == "engine.api_key_env" and value and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
        problems.append(f"{key}: must name an environment variable; got {value!r}")
    if key in _CHOICES and value not in _CHOICES[key]:
        problems.append(f"{key}: must be one of {', '.join(_CHOICES[key])}; got {value!r}")
    if key in _POSITIVE and value <= 0:
        problems.append(f"{key}: must be greater than 0; got {value!r}")
    if key in _NON_NEGATIVE and value < 0:
        problems.append(f"{key}: must be 0 or more; got {value!r}")
    if key in _UNIT_INTERVAL and not 0 < value <= 1:
        problems.append(f"{key}: must be in (0, 1]; got {value!r}")
    return value


def _section_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def parse_config(data: dict[str, Any], source: str = "config.toml", root: Path | None = None) -> Config:
    """Build a Config from a parsed TOML mapping; raise ConfigError listing every problem."""
    problems: list[str] = []
    sections: dict[str, Any] = {}
    top_types = _section_types(Config)
    for name, value in data.items():
        if name == "root" or name not in top_types:
            problems.append(f"unknown section [{name}] (known: {', '.join(k for k in top_types if k != 'root')})")
            continue
        if not isinstance(value, dict):
            problems.append(f"{name}: expected a [{name}] table, got {value!r}")
            continue
        section_cls = top_types[name]
        field_types = _section_types(section_cls)
        kwargs: dict[str, Any] = {}
        for key, raw in value.items():
            dotted = f"{name}.{key}"
            if key not in field_types:
                problems.append(f"unknown key {dotted} (known: {', '.join(field_types)})")
                continue
            checked = _check_value(dotted, raw, field_types[key], problems)
            if checked is not None:
                kwargs[key] = checked
        sections[name] = section_cls(**kwargs)
    engine = sections.get("engine")
    if engine is not None and engine.backend == "openai" and not engine.base_url:
        problems.append('engine.base_url: backend = "openai" needs the server\'s address, e.g. "http://gpu-box:8000"')
    if problems:
        raise ConfigError(source, problems)
    return Config(**sections, root=root or Path("."))


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read ``path`` (default: ./config.toml if present, else built-in defaults)."""
    if path is None:
        candidate = Path("config.toml")
        if not candidate.exists():
            return Config(root=Path.cwd())
        path = candidate
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(str(p), [f"cannot read the file: {exc.strerror or exc}"]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(str(p), [f"not valid UTF-8 (byte {exc.start})"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(p), [f"not valid TOML: {exc}"]) from None
    except RecursionError:
        raise ConfigError(str(p), ["not valid TOML: nested too deeply"]) from None
    return parse_config(data, str(p), root=p.resolve().parent)


def replace(config: Config, **sections: Any) -> Config:
    """A copy of ``config`` with whole sections or section fields replaced (for CLI flags and tests)."""
    changes: dict[str, Any] = {}
    for name, value in sections.items():
        if isinstance(value, dict):
            changes[name] = dataclasses.replace(getattr(config, name), **value)
        else:
            changes[name] = value
    return dataclasses.replace(config, **changes)


__all__ = ["Config", "ConfigError", "load_config", "parse_config", "replace"]
