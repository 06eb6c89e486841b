"""``POST /v1/skills/<skill>``: lorabot's structured results, exactly as ``lorabot ask --json`` prints them.

Body: ``{"text": ..., "context": ... (qa), "compare": true (the bare base model beside the adapter),
"base": true (the bare base model alone), "stream": true, "session": id (chat history across requests),
"user": name}``. The answer is ``Reply.to_json()`` from the same code as ``lorabot ask``
(``bot.ask``); with ``stream``, server-sent events ``{"object": "skill.partial", "text": so far}`` while a
story or chat answer is written, then ``{"object": "skill.result", ...}`` and ``[DONE]``. Without a
session each request is a conversation of its own; every request is logged like a chat message.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from aiohttp import web

from bot.ask import ASK_COMMANDS, ask
from bot.messages import Reply
from bot.serve.errors import ApiError, from_exception, invalid
from bot.serve.schema import read_json
from bot.serve.sse import EventStream
from bot.serve.state import state

KEYS = {"text", "context", "compare", "base", "stream", "session", "user"}
_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")


async def skill(request: web.Request) -> web.StreamResponse:
    s = state(request)
    name = request.match_info["skill"].lower()
    body = await read_json(request)
    if not isinstance(body, dict):
        raise invalid("The request body must be a JSON object.")
    for key in body:
        if key not in KEYS:
            raise invalid(f"Unrecognized request argument supplied: {key} (known: {', '.join(sorted(KEYS))})",
                          key, "unknown_parameter")
    text, context = _text(body, "text", required=True), _text(body, "context", required=False)
    compare, base, stream = (_flag(body, k) for k in ("compare", "base", "stream"))
    if compare and base:
        raise invalid("Give compare or base, not both (compare already includes the base model).", "base")
    core = s.base_core if base else s.core
    if name not in core.modes() and name not in ASK_COMMANDS:
        raise ApiError(404, f"No skill {name!r}; choose one of: {', '.join(core.modes())}.", param="skill",
                       code="skill_not_found")
    session, user = _id(body, "session"), _id(body, "user") or "api"
    chat_id = session or f"request-{uuid.uuid4().hex}"

    def run(sink: Any = None) -> Any:
        return ask(core, name, text, context=context, compare=compare, platform="http", chat_id=chat_id,
                   user_id=user, stream=sink)

    with s.in_flight.slot():
        if not stream:
            return web.json_response(_result(s, await run()))
        events = EventStream(request)

        async def partial(so_far: str) -> None:
            await events.send({"object": "skill.partial", "text": so_far})

        try:
            result = _result(s, await run(partial))
        except ConnectionResetError:  # the client left; the core already logged what it could
            s.metrics.cancelled.labels("skills").inc()
            return events.response
        except Exception as exc:
            error = from_exception(exc)
            if not events.opened:
                raise error from None
            await events.send(error.body())
            return await events.done()
        await events.send({"object": "skill.result", **result})
        return await events.done()


def _result(s: Any, reply: Reply | None) -> dict[str, Any]:
    if reply is None:  # the core stays silent only for group messages that were not addressed to it
        raise ApiError(500, "The bot gave no answer.", code="no_answer")
    s.metrics.count_tokens(reply.adapter or s.engine.base_model, reply.usage.prompt_tokens,
                           reply.usage.completion_tokens)
    if reply.kind == "refusal":
        raise invalid(reply.text, code="skill_refused")
    if reply.kind == "error":
        raise ApiError(500, reply.text, code="engine_error")
    return reply.to_json()


def _text(body: dict[str, Any], key: str, *, required: bool) -> str | None:
    value = body.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise invalid(f"{key} must be a string.", key)
    return value


def _flag(body: dict[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise invalid(f"{key} must be true or false; got {value!r}.", key)
    return value


def _id(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise invalid(f"{key} must be 1-64 letters, digits, '.', '_' or '-'.", key)
    return value
