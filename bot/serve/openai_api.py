"""``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions`` over the engine, in OpenAI's shapes.

``model`` picks the adapter (or the base model by its name); every request goes to the one engine, so
requests from all clients share its batches whatever adapter each uses. A client that disconnects
stops its generation: a streamed one when the next text cannot be written, any one when aiohttp
cancels its handler (the app runs with handler cancellation).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from aiohttp import web

from bot.adapters import AdapterInfo
from bot.engine import Generation, TokenLogprob
from bot.serve.errors import ApiError, from_exception
from bot.serve.schema import EngineRequest, parse, read_json
from bot.serve.sse import EventStream
from bot.serve.state import ServeState, state


# ---------------------------------------------------------------- models
def model_cards(s: ServeState) -> list[dict[str, Any]]:
    engine = s.engine
    context = getattr(engine, "max_context", None)
    base = {"id": engine.base_model, "object": "model", "created": s.started, "owned_by": "lorabot",
            "root": engine.base_model, "parent": None, "max_model_len": context}
    return [base, *(_adapter_card(info, s, context) for info in engine.adapters.values())]


def _adapter_card(info: AdapterInfo, s: ServeState, context: int | None) -> dict[str, Any]:
    return {"id": info.name, "object": "model", "created": s.started, "owned_by": "lorabot", "root": info.name,
            "parent": s.engine.base_model, "max_model_len": context,
            "task": info.task, "labels": list(info.labels), "format_version": info.format_version}


async def list_models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": model_cards(state(request))})


async def get_model(request: web.Request) -> web.Response:
    wanted = request.match_info["model"]
    for card in model_cards(state(request)):
        if card["id"] == wanted:
            return web.json_response(card)
    raise ApiError(404, f"The model `{wanted}` does not exist.", param="model", code="model_not_found")


# ---------------------------------------------------------------- completions
async def completions(request: web.Request) -> web.StreamResponse:
    return await _answer(request, chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _answer(request, chat=True)


async def _answer(request: web.Request, *, chat: bool) -> web.StreamResponse:
    s = state(request)
    req = parse(await read_json(request), s.engine, s.settings, chat=chat)
    endpoint = "chat" if chat else "completions"
    with s.in_flight.slot():
        if req.stream:
            return await _stream(request, s, req, endpoint)
        try:
            gen = await s.engine.generate(req.prompt, req.params, req.adapter)
        except asyncio.CancelledError:
            s.metrics.cancelled.labels(endpoint).inc()
            raise
    s.metrics.count_tokens(req.model, gen.prompt_tokens, gen.completion_tokens)
    rid, created = _new_id(chat), int(time.time())
    choice: dict[str, Any] = {"index": 0, "finish_reason": gen.finish_reason,
                              "logprobs": _logprobs(gen, chat) if gen.logprobs is not None else None}
    if chat:
        choice["message"] = {"role": "assistant", "content": gen.text}
    else:
        choice["text"] = gen.text
    return web.json_response({"id": rid, "object": "chat.completion" if chat else "text_completion",
                              "created": created, "model": req.model, "choices": [choice], "usage": _usage(gen)})


async def _stream(request: web.Request, s: ServeState, req: EngineRequest, endpoint: str) -> web.StreamResponse:
    events = EventStream(request)
    rid, created = _new_id(req.chat), int(time.time())
    started = time.perf_counter()

    def chunk(text: str | None, finish: str | None = None, usage: dict[str, int] | None = None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if req.chat:
            choice["delta"] = {} if text is None else {"content": text}
        else:
            choice["text"] = text or ""
        out = {"id": rid, "object": "chat.completion.chunk" if req.chat else "text_completion",
               "created": created, "model": req.model, "choices": [choice]}
        return out | ({"usage": usage} if usage is not None else {})

    async def opening() -> None:
        if not events.opened:
            s.metrics.first_token.labels(endpoint).observe(time.perf_counter() - started)
            if req.chat:  # OpenAI's first chunk names the role
                first = chunk("")
                first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
                await events.send(first)

    async def on_text(delta: str) -> None:
        await opening()
        await events.send(chunk(delta))

    try:
        gen = await s.engine.generate(req.prompt, req.params, req.adapter, on_text)
    except ConnectionResetError:   # the client left: the engine stopped and freed the row
        s.metrics.cancelled.labels(endpoint).inc()
        return events.response
    except asyncio.CancelledError:
        s.metrics.cancelled.labels(endpoint).inc()
        raise
    except Exception as exc:
        error = from_exception(exc)
        if not events.opened:
            raise error from None   # nothing was sent yet: an ordinary error response
        await events.send(error.body())
        return await events.done()
    s.metrics.count_tokens(req.model, gen.prompt_tokens, gen.completion_tokens)
    await opening()
    await events.send(chunk(None, gen.finish_reason, _usage(gen)))
    if req.include_usage:   # OpenAI's shape: one more chunk with no choices and the usage
        await events.send({"id": rid, "object": "chat.completion.chunk" if req.chat else "text_completion",
                           "created": created, "model": req.model, "choices": [], "usage": _usage(gen)})
    return await events.done()


def _new_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"


def _usage(gen: Generation) -> dict[str, int]:
    return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens,
            "total_tokens": gen.prompt_tokens + gen.completion_tokens}


def _logprobs(gen: Generation, chat: bool) -> dict[str, Any]:
    scored: tuple[TokenLogprob, ...] = gen.logprobs or ()
    if chat:
        def entry(token: str, logprob: float) -> dict[str, Any]:
            return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

        return {"content": [entry(t.token, t.logprob) | {"top_logprobs": [entry(a, b) for a, b in t.top]}
                            for t in scored], "refusal": None}
    offsets, at = [], 0
    for t in scored:
        offsets.append(at)
        at += len(t.token)
    return {"tokens": [t.token for t in scored], "token_logprobs": [t.logprob for t in scored],
            "top_logprobs": [dict(t.top) for t in scored], "text_offset": offsets}
