"""Plain dataclasses that cross the boundary between transports and the core.

Transports convert platform updates into ``Incoming`` and render ``Reply`` back; nothing else about a
platform reaches the core.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Incoming:
    platform: str                   # "console" | "telegram" | "discord" | ...
    chat_id: str                    # platform chat/channel id (DM chats: the user's DM channel)
    user_id: str                    # platform user id
    text: str
    user_name: str | None = None
    message_id: str | None = None   # platform message id, for reply threading
    reply_to_text: str | None = None  # text of the message this one replies to (QA context)
    attachment_text: str | None = None  # text of an attached .txt file (QA context)
    is_group: bool = False          # group/guild channel rather than a private chat
    addressed: bool = True          # in groups: mentioned, replied to, or a command
    edited: bool = False            # an edit of an earlier message
    guild_id: str | None = None     # Discord guild (server), for guild allowlists
    roles: tuple[str, ...] = ()     # Discord role ids of the author, for role allowlists


@dataclass(frozen=True)
class Sentiment:
    label: str
    scores: dict[str, float]        # label -> probability, sums to 1

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "scores": dict(self.scores)}


@dataclass(frozen=True)
class Entity:
    text: str
    type: str
    start: int                      # character offsets into the user's text: text == source[start:end]
    end: int

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text, "type": self.type, "start": self.start, "end": self.end}


@dataclass(frozen=True)
class Entities:
    entities: tuple[Entity, ...]
    source: str

    def to_json(self) -> dict[str, Any]:
        return {"entities": [e.to_json() for e in self.entities]}


@dataclass(frozen=True)
class Answer:
    answer: str
    context_chars: int = 0
    # Where the answer is quoted in the context (context[start:end] == answer); None when the model's
    # answer is not in the text word for word, a sign it may not come from the text at all.
    start: int | None = None
    end: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"answer": self.answer} | ({"start": self.start, "end": self.end} if self.start is not None else {})


@dataclass(frozen=True)
class Text:
    text: str

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text}


SkillResult = Sentiment | Entities | Answer | Text


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: float = 0.0


@dataclass(frozen=True)
class Reply:
    """What the core answers. ``text`` is the rendered, platform-neutral reply."""

    text: str
    skill: str | None = None        # None for commands such as /help
    adapter: str | None = None      # adapter that produced the result; None = bare base model
    result: SkillResult | None = None
    base_result: SkillResult | None = None  # /compare: the bare base model's result
    usage: Usage = field(default_factory=Usage)
    message_id: int | None = None   # row id of the stored outgoing message (for feedback buttons)
    kind: str = "answer"            # "answer" | "command" | "refusal" | "error"
    feedback: bool = False          # transports offer 👍/👎 under model answers

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"skill": self.skill, "adapter": self.adapter, "text": self.text, "kind": self.kind}
        if self.result is not None:
            out.update(self.result.to_json())
        if self.base_result is not None:
            out["base"] = self.base_result.to_json()
        out["usage"] = {
            "prompt_tokens": self.usage.prompt_tokens,
            "completion_tokens": self.usage.completion_tokens,
            "latency_ms": round(self.usage.latency_ms, 1),
        }
        return out
