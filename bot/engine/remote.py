"""The engine over an OpenAI-compatible server that serves the adapters by name (``[engine] backend = "openai"``).

Any server that takes ``model = <adapter name>`` works the same way: vLLM (``--enable-lora --lora-modules``),
LoRAX, or another machine's ``lorabot serve``. The bot's core, transports and store do not change:

* ``generate``: a streamed ``/v1/completions`` request with ``model`` = the adapter (or the base's id);
* ``classify``: a one-token completion with ``logprobs`` and a ``logit_bias`` of +100 on each choice's
  first token, so the choices are the top tokens; their probabilities relative to each other are those
  the local engine computes, since a bias added to all of them alike cancels out. A server that reports
  log-probabilities before the bias (vLLM's default ``raw_logprobs``) may leave a choice out of the top
  list; it is then asked for alone (the chosen token's log-probability is always returned);
* which adapters exist: the server's ``/v1/models`` (entries whose ``parent`` is the base), each matched
  with the local adapter folder of the same name, whose manifest gives the task, labels and prompt
  format. A served name without a valid folder, a folder the server does not serve, or a served copy
  that reports another task or format is reported like a bad folder.

Prompts and chat templates are rendered locally with the base model's tokenizer (``[model] base``: the
same model the server runs), and a prompt over the context keeps its end, as the local engine does.
Connection errors, 5xx answers and timeouts are retried with backoff; then the request fails with an
error that says what happened, and only that request fails.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from pathlib import Path
from typing import Any

import aiohttp

from bot.adapters import AdapterInfo, AdapterProblem, scan_adapters, shape_signature
from bot.config import Config
from bot.engine import Classification, Generation, SamplingParams, TextSink
from bot.errors import AdapterError, ChoicesError, EngineError

log = logging.getLogger(__name__)

BIAS = 100.0            # OpenAI's largest logit_bias: the choices become the top tokens
MAX_CHOICES = 20        # vLLM's default cap on top log-probabilities
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class _Retryable(Exception):
    """A failure worth another try (connection, timeout, 5xx); the message says which."""


class RemoteEngine:
    """``bot.engine.Engine`` over an OpenAI-compatible HTTP server."""

    def __init__(self, *, base_url: str, api_key: str | None, timeout_s: float, tokenizer: Any, base_model: str,
                 base_shape: str, adapters_dir: Path | None, max_context: int, retries: int = 3,
                 backoff_s: float = 0.5):
        self.base_url = base_url.rstrip("/")
        self.base_model = base_model       # the local name (adapter manifests record it)
        self.served_base = base_model      # the server's id for the base model (from /v1/models)
        self.base_shape = base_shape
        self.max_context = max_context
        self.retries, self.backoff_s = retries, backoff_s
        self.backend = "openai"
        self._tok = tokenizer
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout_s, sock_read=timeout_s)
        self._adapters_dir = adapters_dir
        self._adapters: dict[str, AdapterInfo] = {}
        self._problems: list[AdapterProblem] = []
        self._session: aiohttp.ClientSession | None = None
        self._session_loop: asyncio.AbstractEventLoop | None = None

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, config: Config, *, progress: bool = True) -> RemoteEngine:
        """Read the tokenizer and adapter folders locally and list what the server serves (blocking)."""
        from bot.engine.light_model import LightTokenizer, LightUnsupported, read_config
        from bot.engine.loading import load_tokenizer, resolve_base

        settings = config.engine
        api_key = None
        if settings.api_key_env:
            api_key = os.environ.get(settings.api_key_env, "").strip()
            if not api_key:
                raise EngineError(f"[engine] api_key_env = {settings.api_key_env!r}, but that environment "
                                  "variable is not set")
        base = resolve_base(config.model.base, progress=progress)
        try:
            tokenizer: Any = LightTokenizer(base.path)
        except LightUnsupported:
            tokenizer = load_tokenizer(base.path)
        model_config = read_config(base.path)
        engine = cls(
            base_url=settings.base_url, api_key=api_key, timeout_s=settings.timeout_s, tokenizer=tokenizer,
            base_model=base.name, base_shape=shape_signature(model_config),
            adapters_dir=config.path(config.adapters.dir),
            max_context=int(getattr(model_config, "max_position_embeddings", 2048)),
        )
        asyncio.run(engine._first_listing())
        return engine

    async def _first_listing(self) -> None:
        try:
            await self.reload_adapters()
        finally:
            await self.close()   # the session belongs to this short-lived loop; requests open their own

    # ----------------------------------------------------------------- adapters
    @property
    def adapters(self) -> dict[str, AdapterInfo]:
        return dict(self._adapters)

    @property
    def problems(self) -> list[AdapterProblem]:
        return list(self._problems)

    async def reload_adapters(self) -> list[AdapterProblem]:
        listing = await self._request("GET", "/v1/models")
        served = [m for m in listing.get("data", []) if isinstance(m, dict) and isinstance(m.get("id"), str)]
        self.served_base = self._pick_base(served)
        context = next((m.get("max_model_len") for m in served if m["id"] == self.served_base), None)
        if isinstance(context, int) and context > 0:
            self.max_context = context
        by_name = {m["id"]: m for m in served if m.get("parent") == self.served_base}
        found, problems = (scan_adapters(self._adapters_dir, base_model=self.base_model, base_shape=self.base_shape)
                           if self._adapters_dir else ({}, []))
        broken = {p.name for p in problems}
        adapters: dict[str, AdapterInfo] = {}
        for name, info in found.items():
            card = by_name.get(name)
            if card is None:
                problems.append(AdapterProblem(name, info.path, f"not served by {self.base_url} (start the server "
                                               f"with it, e.g. vLLM's --lora-modules {name}={info.path})"))
                continue
            mismatch = [f"{key} {card[key]!r} (the folder says {want!r})"
                        for key, want in (("task", info.task), ("format_version", info.format_version))
                        if key in card and card[key] != want]
            if mismatch:
                problems.append(AdapterProblem(name, info.path, f"the server's copy reports {', '.join(mismatch)}; "
                                               "serve the same folder the bot has"))
                continue
            adapters[name] = info
        folder = self._adapters_dir or Path("adapters")
        for name in sorted(set(by_name) - set(found) - broken):
            problems.append(AdapterProblem(name, folder / name, f"served by {self.base_url}, but there is no "
                                           "adapter folder of that name here to give its task, labels and format"))
        self._adapters, self._problems = adapters, problems
        return self.problems

    def _pick_base(self, served: list[dict[str, Any]]) -> str:
        bases = [m["id"] for m in served if not m.get("parent")]
        short = self.base_model.lower()
        same = [b for b in bases if b.lower() == short or b.lower().rsplit("/", 1)[-1] == short]
        if same:
            return same[0]
        if len(bases) == 1:
            log.warning("the model server's base model is %r, the local one %r: the tokenizer and the adapters' "
                        "manifests are this machine's, so they must be the same model", bases[0], self.base_model)
            return bases[0]
        raise EngineError(f"{self.base_url}/v1/models lists {len(bases)} base models ({', '.join(bases) or 'none'}) "
                          f"and none is {self.base_model!r}, the [model] base configured here")

    def _check_adapter(self, adapter: str | None) -> str:
        if adapter is None:
            return self.served_base
        if adapter not in self._adapters:
            raise AdapterError(f"adapter {adapter!r} is not loaded")
        return adapter

    # ----------------------------------------------------------------- requests
    def count_tokens(self, text: str) -> int:
        return len(self._tok(text, add_special_tokens=False).input_ids)

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        return self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _fit(self, prompt: str, reserve: int) -> str:
        """The prompt within the context, keeping its end (the question, the cue), as the local engine does."""
        ids = self._tok(prompt, add_special_tokens=False).input_ids
        budget = max(1, self.max_context - reserve)
        return self._tok.decode(ids[-budget:]) if len(ids) > budget else prompt

    async def classify(self, prompt: str, choices: Sequence[str], adapter: str | None) -> Classification:
        model = self._check_adapter(adapter)
        ids = [self._tok(c, add_special_tokens=False).input_ids[0] for c in choices]
        names = [self._tok.decode([i]) for i in ids]
        if len(set(ids)) != len(ids) or len(set(names)) != len(names):
            raise ChoicesError(f"choices {list(choices)} do not start with distinct tokens")
        if len(choices) > MAX_CHOICES:
            raise EngineError(f"{len(choices)} choices: a remote engine scores at most {MAX_CHOICES}")
        prompt = self._fit(prompt, 1)
        first = await self._one_token(model, prompt, ids, len(ids))
        top = first["top_logprobs"][0] if first.get("top_logprobs") else {}
        values = {c: float(top[n]) for c, n in zip(choices, names, strict=True) if n in top}
        for choice, token, name in zip(choices, ids, names, strict=True):
            if choice not in values:   # a server reporting log-probabilities before the bias: ask for it alone
                alone = await self._one_token(model, prompt, [token], 0)
                if alone.get("tokens", [None])[0] != name:
                    raise EngineError(f"the model server did not return the log-probability of {choice!r}")
                values[choice] = float(alone["token_logprobs"][0])
        peak = max(values.values())
        weights = {c: math.exp(v - peak) for c, v in values.items()}
        total = sum(weights.values())
        return Classification(scores={c: weights[c] / total for c in choices},
                              prompt_tokens=first.get("prompt_tokens") or self.count_tokens(prompt))

    async def _one_token(self, model: str, prompt: str, tokens: list[int], top: int) -> dict[str, Any]:
        answer = await self._request("POST", "/v1/completions", {
            "model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0, "logprobs": top,
            "logit_bias": {str(t): BIAS for t in tokens},
        })
        try:
            logprobs = answer["choices"][0]["logprobs"]
            return {**logprobs, "prompt_tokens": (answer.get("usage") or {}).get("prompt_tokens")}
        except (KeyError, IndexError, TypeError):
            raise EngineError("the model server's answer has no logprobs (does it support them?)") from None

    async def generate(
        self, prompt: str, params: SamplingParams, adapter: str | None, on_text: TextSink | None = None,
    ) -> Generation:
        model = self._check_adapter(adapter)
        prompt = self._fit(prompt, params.max_new_tokens)
        payload: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": params.max_new_tokens,
                                   "temperature": params.temperature, "top_p": params.top_p}
        if params.stop:
            payload["stop"] = list(params.stop)
        if params.seed is not None:
            payload["seed"] = params.seed
        if params.repetition_penalty != 1.0:   # not OpenAI's; vLLM and lorabot serve accept it
            payload["repetition_penalty"] = params.repetition_penalty
        if params.logit_bias:
            payload["logit_bias"] = {str(t): b for t, b in params.logit_bias}
        if params.span_of:   # lorabot serve decodes within it; other servers ignore the field (the answer is
            payload["span_of"] = params.span_of   # then located in the text afterwards)
        if params.logprobs is not None:
            raise EngineError("the remote engine does not return generated tokens' logprobs")
        parts: list[str] = []
        finish, usage = "stop", {}
        stream = self._events("/v1/completions", {**payload, "stream": True, "stream_options": {"include_usage": True}})
        async with aclosing(stream):   # a sink that raises, or a cancel, closes the connection: the server stops
            async for event in stream:
                usage = event.get("usage") or usage
                for choice in event.get("choices") or []:
                    text = choice.get("text") or ""
                    if text:
                        parts.append(text)
                        if on_text is not None:
                            await on_text(text)
                    finish = choice.get("finish_reason") or finish
        text = "".join(parts)
        return Generation(text=text, prompt_tokens=usage.get("prompt_tokens") or self.count_tokens(prompt),
                          completion_tokens=usage.get("completion_tokens") or self.count_tokens(text),
                          finish_reason="length" if finish == "length" else "stop")

    # ----------------------------------------------------------------- HTTP
    def _client(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._session_loop is not loop:
            # A session belongs to the loop it was made in (the start lists models in a loop of its own).
            self._session = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers)
            self._session_loop = loop
        return self._session

    async def _request(self, method: str, path: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        async def once() -> dict[str, Any]:
            async with self._client().request(method, self.base_url + path, json=payload) as response:
                await _check(response)
                return await response.json(content_type=None)

        return await self._with_retries(once)

    async def _with_retries(self, attempt: Any) -> Any:
        tries = self.retries + 1
        for n in range(tries):
            try:
                return await attempt()
            except (TimeoutError, _Retryable, aiohttp.ClientConnectionError) as exc:
                reason = str(exc) or type(exc).__name__
                if n + 1 == tries:
                    raise EngineError(f"the model server at {self.base_url} is not answering ({reason}); "
                                      f"tried {tries} times") from None
                wait = self.backoff_s * 2 ** n
                log.warning("model server: %s; retrying in %.1f s", reason, wait)
                await asyncio.sleep(wait)
        raise AssertionError("unreachable")

    async def _events(self, path: str, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The server-sent events of a streamed request; retried only until the first event arrives."""
        async def opened() -> aiohttp.ClientResponse:
            response = await self._client().post(self.base_url + path, json=payload)
            try:
                await _check(response)
            except BaseException:
                response.release()
                raise
            return response

        response = await self._with_retries(opened)
        finished = False
        try:
            data: list[str] = []
            async for raw in response.content:
                line = raw.decode("utf-8").rstrip("\r\n")
                if line.startswith("data:"):
                    data.append(line[5:].lstrip(" "))
                    continue
                if line or not data:
                    continue
                block, data = "\n".join(data), []
                if block == "[DONE]":
                    finished = True
                    return
                event = json.loads(block)
                if isinstance(event, dict) and event.get("error"):
                    raise EngineError(f"the model server failed: {_message(event)}")
                yield event
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            raise EngineError(f"the model server at {self.base_url} stopped in the middle of the answer "
                              f"({str(exc) or type(exc).__name__})") from None
        finally:
            response.release()
        if not finished:
            raise EngineError(f"the model server at {self.base_url} closed the answer before its end")

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None


async def _check(response: aiohttp.ClientResponse) -> None:
    if response.status < 400:
        return
    try:
        body = await response.json(content_type=None)
    except (ValueError, aiohttp.ClientError):
        body = {}
    message = _message(body) or response.reason or ""
    if response.status in RETRY_STATUSES:
        raise _Retryable(f"HTTP {response.status}: {message}")
    raise EngineError(f"the model server refused the request (HTTP {response.status}): {message}")


def _message(body: Any) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or "")
    return str(error or "")
