"""One skill on one text: what ``lorabot ask`` runs and ``lorabot serve``'s ``/v1/skills/<skill>`` answers.

Both go through the core exactly as a chat message does (same prompt formats, parsing, logging), so the
structured result (``Reply.to_json()``) is the same wherever it is asked for.
"""

from __future__ import annotations

from bot.core import Core, StreamSink
from bot.errors import LorabotError
from bot.messages import Incoming, Reply

# skill name -> the core command that runs it ("ask" and "qa" are the same skill)
ASK_COMMANDS = {"chat": "chat", "sentiment": "sentiment", "ner": "ner", "qa": "ask", "ask": "ask", "story": "story"}


async def ask(
    core: Core, skill: str, text: str, *, context: str | None = None, compare: bool = False,
    platform: str, chat_id: str, user_id: str, stream: StreamSink | None = None,
) -> Reply | None:
    """Run ``skill`` (a built-in skill or an adapter by name) on ``text``; ``context``: QA's text.

    ``compare``: the bare base model's result too (``Reply.base_result``), as ``/compare`` does. The
    caller supplies ``context`` as text: reading it from a file is the command line's business."""
    skill = skill.lower()
    if skill not in core.modes() and skill not in ASK_COMMANDS:
        raise LorabotError(f"unknown skill {skill!r}; choose one of: {', '.join(core.modes())}")
    if compare:
        message = f"/compare {'qa' if skill == 'ask' else skill} {text}"
    elif skill in ASK_COMMANDS:
        message = f"/{ASK_COMMANDS[skill]} {text}"
    else:  # an extra adapter by name: use it as the chat's mode for this one message
        message = text
        chat = await core.store.ensure_chat(platform, chat_id)
        await core.store.set_mode(chat, skill)
    return await core.handle(
        Incoming(platform=platform, chat_id=chat_id, user_id=user_id, text=message, attachment_text=context),
        stream,
    )
