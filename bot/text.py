"""Platform-neutral rendering of results, input cleaning and message splitting."""

from __future__ import annotations

import unicodedata

from bot.messages import Answer, Entities, Sentiment, SkillResult, Text

_EMOJI = {"positive": "😊", "negative": "😞", "neutral": "😐"}
# Bidi overrides/isolates can disguise text (e.g. reversed file names); they are never needed here.
_BIDI = {chr(c) for c in (0x202A, 0x202B, 0x202C, 0x202D, 0x202E, 0x2066, 0x2067, 0x2068, 0x2069)}


def clean_input(text: str) -> str:
    """Valid UTF-8 text without control or bidi-override characters (newlines and tabs kept)."""
    text = text.encode("utf-8", "replace").decode("utf-8", "replace")
    return "".join(
        ch for ch in text
        if ch in "\n\t" or (ch not in _BIDI and unicodedata.category(ch) not in ("Cc", "Cs"))
    ).strip()


def render(result: SkillResult | None) -> str:
    if isinstance(result, Sentiment):
        emoji = _EMOJI.get(result.label, "•")
        ranked = sorted(result.scores.items(), key=lambda kv: -kv[1])
        detail = " · ".join(f"{label} {p:.0%}" for label, p in ranked)
        return f"{emoji} {result.label} ({result.scores[result.label]:.0%})\n{detail}"
    if isinstance(result, Entities):
        if not result.entities:
            return "No named entities found."
        return "\n".join(f"• {e.text} — {e.type} [{e.start}:{e.end}]" for e in result.entities)
    if isinstance(result, Answer):
        return result.answer or "(no answer found in the text)"
    if isinstance(result, Text):
        return result.text or "(the model produced no text)"
    return ""


def render_compare(base: SkillResult, tuned: SkillResult, adapter: str | None) -> str:
    tuned_title = f"Fine-tuned (adapter '{adapter}')" if adapter else "Fine-tuned (no adapter installed)"
    return f"Base model (pre-trained only):\n{render(base)}\n\n{tuned_title}:\n{render(tuned)}"


def split_message(text: str, limit: int) -> list[str]:
    """Split ``text`` into chunks of at most ``limit`` characters at paragraph, line or word breaks.

    Code fences (```) left open at a split are closed at the end of the chunk and reopened at the
    start of the next one, so formatting never breaks across messages.
    """
    if limit < 16:
        raise ValueError("limit too small")
    chunks: list[str] = []
    rest = text
    fence_open = False
    while rest:
        prefix = "```\n" if fence_open else ""
        room = limit - len(prefix)
        # Reserve room for a closing fence in case this chunk ends inside a code block.
        if len(rest) <= room and not _ends_open(prefix + rest):
            chunks.append(prefix + rest)
            break
        room -= 4
        cut = _break_at(rest, room)
        piece, rest = rest[:cut], rest[cut:].lstrip("\n") if rest[cut:cut + 1] == "\n" else rest[cut:]
        chunk = prefix + piece
        fence_open = _ends_open(chunk)
        if fence_open:
            chunk = chunk.rstrip("\n") + "\n```"
        chunks.append(chunk)
        if not rest:
            break
    return [c for c in chunks if c.strip()] or [text[:limit]]


def _ends_open(text: str) -> bool:
    return text.count("```") % 2 == 1


def _break_at(text: str, room: int) -> int:
    if len(text) <= room:
        return len(text)
    window = text[:room]
    for sep in ("\n\n", "\n", " "):
        i = window.rfind(sep)
        if i > room // 2:
            return i + (len(sep) if sep == " " else 0)
    return room
