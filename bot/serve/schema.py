"""OpenAI completion and chat requests, validated into one engine request (or an OpenAI-shaped error).

Every parameter is either honoured or refused with its name: a client that asks for something the
engine does not do (n > 1, tools, echo, penalties) gets a 400 naming it, never an answer that quietly
ignored it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from bot.engine import Engine, SamplingParams
from bot.serve.errors import ApiError, invalid
from bot.serve.settings import ServeSettings

MAX_TOP_LOGPROBS = 20   # as vLLM's default --max-logprobs
MAX_STOP = 4
MAX_LOGIT_BIAS = 300

_COMMON = {"model", "max_tokens", "temperature", "top_p", "stop", "seed", "n", "stream", "stream_options",
           "logit_bias", "user", "presence_penalty", "frequency_penalty", "repetition_penalty", "span_of"}
COMPLETION_KEYS = _COMMON | {"prompt", "logprobs", "echo", "best_of", "suffix"}
CHAT_KEYS = _COMMON | {"messages", "logprobs", "top_logprobs", "max_completion_tokens"}
# Known OpenAI parameters the engine does not implement: refused with this reason.
_UNSUPPORTED = {
    "tools": "tool calls", "tool_choice": "tool calls", "functions": "function calls",
    "function_call": "function calls", "parallel_tool_calls": "tool calls", "response_format": "response formats",
    "audio": "audio", "modalities": "other modalities", "prediction": "predicted outputs",
    "reasoning_effort": "reasoning settings", "web_search_options": "web search", "store": "stored completions",
    "metadata": "stored completions", "service_tier": "service tiers",
}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass(frozen=True)
class EngineRequest:
    chat: bool                # /v1/chat/completions (else /v1/completions)
    model: str                # as the client named it
    adapter: str | None       # None: the bare base model
    prompt: str               # for chat: the messages rendered with the chat template
    prompt_tokens: int
    params: SamplingParams
    stream: bool
    include_usage: bool       # stream_options.include_usage: a last chunk with the usage only


def parse(body: Any, engine: Engine, settings: ServeSettings, *, chat: bool) -> EngineRequest:
    if not isinstance(body, dict):
        raise invalid("The request body must be a JSON object.")
    allowed = CHAT_KEYS if chat else COMPLETION_KEYS
    for key in body:
        if key in _UNSUPPORTED:
            raise invalid(f"{key}: {_UNSUPPORTED[key]} are not supported by lorabot serve.", key,
                          "unsupported_parameter")
        if key not in allowed:
            raise invalid(f"Unrecognized request argument supplied: {key}", key, "unknown_parameter")
    model = _model(body, engine)
    adapter = None if model == engine.base_model else model
    _must_be_default(body, "n", 1, "only n=1 is supported (send several requests; they are batched together)")
    _must_be_default(body, "presence_penalty", 0, "presence_penalty is not supported (use repetition_penalty)")
    _must_be_default(body, "frequency_penalty", 0, "frequency_penalty is not supported (use repetition_penalty)")
    if not chat:
        _must_be_default(body, "echo", False, "echo is not supported")
        _must_be_default(body, "best_of", 1, "only best_of=1 is supported")
        _must_be_default(body, "suffix", None, "suffix (insertion) is not supported")
    stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise invalid("stream_options is only allowed with stream=true.", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise invalid("stream_options may hold only include_usage.", "stream_options")
        include_usage = _bool(options, "include_usage", False, param="stream_options.include_usage")
    prompt = _chat_prompt(body, engine, settings) if chat else _prompt(body, settings)
    logprobs = _logprobs(body, chat)
    if logprobs is not None and stream:
        raise invalid("logprobs with stream=true is not supported; ask without streaming.", "logprobs",
                      "unsupported_parameter")
    prompt_tokens = engine.count_tokens(prompt)
    context = int(getattr(engine, "max_context", 2048))
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int(body, key, None, low=1)
    if chat and key == "max_completion_tokens" and body.get("max_tokens") is not None:
        raise invalid("Give max_tokens or max_completion_tokens, not both.", "max_tokens")
    if max_tokens is None:
        max_tokens = max(context - prompt_tokens, 1) if chat else 16   # OpenAI's: the rest of the context / 16
    if prompt_tokens + max_tokens > context:
        raise invalid(
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} for the "
            "completion). Please reduce the prompt or the completion length.",
            "messages" if chat else "prompt", "context_length_exceeded",
        )
    params = SamplingParams(
        max_new_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, low=0.0, high=2.0),
        top_p=_number(body, "top_p", 1.0, low=0.0, high=1.0, open_low=True),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, low=0.0, high=10.0, open_low=True),
        stop=_stop(body), seed=_int(body, "seed", None, low=-(2**63), high=2**63 - 1),
        logit_bias=_logit_bias(body), logprobs=logprobs, span_of=_span_of(body),
    )
    return EngineRequest(chat=chat, model=model, adapter=adapter, prompt=prompt, prompt_tokens=prompt_tokens,
                         params=params, stream=stream, include_usage=include_usage)


# ---------------------------------------------------------------- fields
def _span_of(body: dict[str, Any]) -> str:
    """lorabot's extension: the completion must be a span of this text (extractive QA)."""
    value = body.get("span_of", "")
    if not isinstance(value, str):
        raise invalid("span_of must be a string: the text whose spans the completion may copy.", "span_of")
    return value


def _model(body: dict[str, Any], engine: Engine) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model is required: the base model's name or an adapter's (see GET /v1/models).", "model")
    if model != engine.base_model and model not in engine.adapters:
        raise ApiError(404, f"The model `{model}` does not exist. GET /v1/models lists the base model and "
                       "every adapter.", param="model", code="model_not_found")
    return model


def _must_be_default(body: dict[str, Any], key: str, default: Any, why: str) -> None:
    value = body.get(key)
    if value is not None and (value != default or isinstance(value, bool) != isinstance(default, bool)):
        raise invalid(f"{key}={value!r}: {why}.", key, "unsupported_parameter")


def _bool(body: dict[str, Any], key: str, default: bool, param: str | None = None) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(f"{key} must be true or false; got {value!r}.", param or key)
    return value


def _int(body: dict[str, Any], key: str, default: int | None, *, low: int, high: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"{key} must be an integer; got {value!r}.", key)
    if value < low or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"between {low} and {high}"
        raise invalid(f"{key} must be {bounds}; got {value}.", key)
    return value


def _number(body: dict[str, Any], key: str, default: float, *, low: float, high: float,
            open_low: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise invalid(f"{key} must be a number; got {value!r}.", key)
    if value > high or value < low or (open_low and value == low):
        lower = f"greater than {low}" if open_low else f"at least {low}"
        raise invalid(f"{key} must be {lower} and at most {high}; got {value}.", key)
    return float(value)


def _check_length(chars: int, settings: ServeSettings, param: str) -> None:
    if chars > settings.max_prompt_chars:
        raise invalid(f"The {param} is {chars:,} characters; this server's limit is "
                      f"{settings.max_prompt_chars:,}.", param, "prompt_too_long")


def _prompt(body: dict[str, Any], settings: ServeSettings) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list):
        if prompt and all(isinstance(x, int) and not isinstance(x, bool) for x in prompt):
            raise invalid("Prompts as token ids are not supported; send the text.", "prompt", "unsupported_parameter")
        raise invalid("Only one prompt per request is supported (send several requests; they are batched "
                      "together).", "prompt", "unsupported_parameter")
    if not isinstance(prompt, str) or not prompt:
        raise invalid("prompt is required: a non-empty string.", "prompt")
    _check_length(len(prompt), settings, "prompt")
    return prompt


def _chat_prompt(body: dict[str, Any], engine: Engine, settings: ServeSettings) -> str:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages is required: a non-empty list of {role, content}.", "messages")
    rendered: list[dict[str, str]] = []
    total = 0
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(f"{where} must be an object with role and content.", where)
        extra = set(message) - {"role", "content", "name"}
        if extra:
            raise invalid(f"{where}: {', '.join(sorted(extra))} not supported (text messages only).",
                          f"{where}.{sorted(extra)[0]}", "unsupported_parameter")
        role = message.get("role")
        if role not in ROLES:
            raise invalid(f"{where}.role must be one of system, developer, user, assistant; got {role!r}.",
                          f"{where}.role")
        content = message.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise invalid(f"{where}.content: only text parts are supported.", f"{where}.content",
                              "unsupported_parameter")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise invalid(f"{where}.content must be a string.", f"{where}.content")
        total += len(content)
        rendered.append({"role": ROLES[role], "content": content})
    _check_length(total, settings, "messages")
    try:
        return engine.chat_prompt(rendered)
    except Exception as exc:  # the template refuses an order of roles, for instance
        raise invalid(f"The chat template cannot render these messages: {exc}", "messages") from None


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP:
        raise invalid(f"stop must be a non-empty string or a list of up to {MAX_STOP} of them.", "stop")
    return tuple(stops)


def _logit_bias(body: dict[str, Any]) -> tuple[tuple[int, float], ...]:
    bias = body.get("logit_bias")
    if bias is None:
        return ()
    if not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS:
        raise invalid(f"logit_bias must map token ids to numbers (at most {MAX_LOGIT_BIAS}).", "logit_bias")
    out = []
    for key, value in bias.items():
        if not (isinstance(key, str) and key.isdigit()):
            raise invalid(f"logit_bias keys must be token ids; got {key!r}.", "logit_bias")
        if isinstance(value, bool) or not isinstance(value, int | float) or not -100 <= value <= 100:
            raise invalid(f"logit_bias[{key}] must be a number between -100 and 100; got {value!r}.", "logit_bias")
        out.append((int(key), float(value)))
    return tuple(out)


def _logprobs(body: dict[str, Any], chat: bool) -> int | None:
    if not chat:
        return _int(body, "logprobs", None, low=0, high=MAX_TOP_LOGPROBS)
    wanted = _bool(body, "logprobs", False)
    top = _int(body, "top_logprobs", None, low=0, high=MAX_TOP_LOGPROBS)
    if top is not None and not wanted:
        raise invalid("top_logprobs needs logprobs=true.", "top_logprobs")
    return (top or 0) if wanted else None


async def read_json(request: web.Request) -> Any:
    """The request body as JSON (aiohttp refuses one over the app's ``client_max_size`` with 413)."""
    raw = await request.read()
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise invalid(f"The body is not valid JSON: {exc}") from None
