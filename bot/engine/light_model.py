"""Load a Llama-shaped model folder for the fast engine without importing transformers.

Importing transformers (and PEFT) costs about two thirds of the bot's cold start and ~150 MB of memory,
yet the fast backend (``bot.engine.fast_llama``) only needs the config, the tensors and a tokenizer. This module
reads ``config.json``, the safetensors weights (memory-mapped, not copied when the dtype already
matches) and ``tokenizer.json`` with the ``tokenizers`` library, and renders the chat template with
jinja2 the way transformers does. Anything it does not handle exactly (another architecture, a
tokenizer that needs transformers' post-processing, a template it cannot compile) is reported by
``unsupported_folder`` and the caller loads the folder with transformers instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bot.errors import ModelError


class LightUnsupported(Exception):
    """This folder needs the transformers loader (the message says why)."""


@dataclass
class Encoded:
    input_ids: list[int]


@dataclass
class LightModel:
    """What the fast engine needs of a model: its config, tensors by name, device and dtype."""

    config: Any
    weights: dict[str, Any]
    device: Any
    dtype: Any


class LightTokenizer:
    """The part of a transformers fast tokenizer the engine uses, on the ``tokenizers`` library alone."""

    def __init__(self, folder: Path):
        from tokenizers import Tokenizer

        settings = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
        if settings.get("clean_up_tokenization_spaces"):
            raise LightUnsupported("the tokenizer asks for transformers' clean-up of decoded text")
        self._tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.eos_token = _token_text(settings.get("eos_token"))
        self.eos_token_id = self._id(self.eos_token)
        pad = _token_text(settings.get("pad_token"))
        self.pad_token_id = self._id(pad) if pad else self.eos_token_id
        self._special = {k: _token_text(settings.get(k)) for k in
                         ("bos_token", "eos_token", "unk_token", "pad_token") if settings.get(k)}
        template = settings.get("chat_template")
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        if not isinstance(template, str):
            raise LightUnsupported("no single chat template (none, or several named ones)")
        self._template = _compile(template)

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def __call__(self, text: str, add_special_tokens: bool = False) -> Encoded:
        return Encoded(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], *, tokenize: bool = False,
                            add_generation_prompt: bool = False) -> str:
        if tokenize:
            raise ValueError("LightTokenizer renders text only; encode the result with __call__")
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     **self._special)


def _compile(template: str) -> Any:
    """A jinja2 template compiled with transformers' environment (sandboxed, trim/lstrip blocks,
    loop controls, ``raise_exception``, ``tojson`` without ASCII escaping, ``strftime_now``)."""
    from datetime import datetime

    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as exc:  # e.g. {% generation %} blocks
        raise LightUnsupported(f"the chat template needs transformers ({exc})") from None


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # a serialised AddedToken
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"Cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} is not a JSON object")
    return data


def read_config(folder: Path) -> SimpleNamespace:
    """``config.json`` as attributes (the names transformers' LlamaConfig uses)."""
    return SimpleNamespace(**_read_json(folder / "config.json"))


def unsupported_config(cfg: Any) -> str | None:
    """Why a Llama config (transformers' or ``bot.engine.light_model``'s) cannot run on this path."""
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        return "the model has projection biases"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r} is not silu"
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        return f"RoPE type {kind!r} is not supported"
    if getattr(cfg, "pretraining_tp", 1) != 1:
        return "pretraining_tp != 1"
    return None


def unsupported_folder(folder: Path) -> str | None:
    """Why ``folder`` must be loaded with transformers (None when this module loads it exactly)."""
    if not (folder / "config.json").is_file() or not (folder / "tokenizer.json").is_file():
        return "no config.json or tokenizer.json"
    cfg = read_config(folder)
    if getattr(cfg, "architectures", None) != ["LlamaForCausalLM"] or getattr(cfg, "model_type", None) != "llama":
        return f"architecture {getattr(cfg, 'architectures', None)} is not LlamaForCausalLM"
    if getattr(cfg, "quantization_config", None):
        return "the weights are quantised"
    if not weight_files(folder):
        return "no model.safetensors"
    return unsupported_config(cfg)


def weight_files(folder: Path) -> list[Path]:
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        files = [folder / s for s in shards]
        if files and all(f.is_file() and f.parent == folder for f in files):
            return files
    return []


def load_light(folder: Path, *, dtype: str = "auto", device: str = "auto", threads: int = 0,
               gguf: Path | None = None) -> tuple[LightModel, LightTokenizer]:
    """(model, tokenizer) for the fast engine; raises LightUnsupported when transformers is needed.

    ``gguf``: the GGUF the folder was converted from; on a CPU with the compiled kernel its quantised
    matrices are used as they are in the file (the same values; see bot.engine.gguf)."""
    import torch

    from bot.engine.loading import resolve_device, resolve_dtype
    from bot.engine.weights import read_safetensors

    reason = unsupported_folder(folder)
    if reason:
        raise LightUnsupported(reason)
    tokenizer = LightTokenizer(folder)  # before the weights: a tokenizer we cannot serve costs nothing
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(resolve_device(device))
    want = resolve_dtype(dtype, dev.type)
    weights: dict[str, Any] = {}
    for path in weight_files(folder):
        try:
            tensors = read_safetensors(path)
        except (OSError, ValueError, json.JSONDecodeError) as exc:
            raise ModelError(f"Cannot load the base model from {folder}: {exc}") from None
        for name, tensor in tensors.items():
            # Floating tensors take the requested dtype (a copy only when it differs), as transformers does.
            keep = tensor.to(want) if tensor.is_floating_point() and tensor.dtype != want else tensor
            weights[name] = keep.to(dev) if dev.type != "cpu" else keep
    config = read_config(folder)
    if gguf is not None and dev.type == "cpu" and want == torch.float32:
        weights.update(_quantized(gguf, config, weights))
    return LightModel(config=config, weights=weights, device=dev, dtype=want), tokenizer


def _quantized(gguf: Path, config: Any, weights: dict[str, Any]) -> dict[str, Any]:
    """The GGUF's quantised matrices that match the folder's tensors, or nothing (kernel missing, a file
    that cannot be read): the float weights always work, so this never fails the load."""
    import logging

    from bot.engine import kernels
    from bot.engine.gguf import GGUFError, quantized_weights

    if kernels.load() is None:
        return {}
    try:
        found = quantized_weights(gguf, config)
    except (OSError, GGUFError) as exc:
        logging.getLogger(__name__).info("engine: float weights (%s: %s)", gguf, exc)
        return {}
    return {k: w for k, w in found.items() if k in weights and tuple(weights[k].shape) == w.shape}
