"""Skill results as platform-neutral reply text (the transports only split and send it)."""

from __future__ import annotations

from bot.messages import Answer, Entities, Sentiment, SkillResult, Text

_EMOJI = {"positive": "😊", "negative": "😞", "neutral": "😐"}


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
        if not result.answer:
            return "(no answer found in the text)"
        quoted = result.start is not None or not result.context_chars
        return result.answer if quoted else f"{result.answer}\n(not found word for word in the text)"
    if isinstance(result, Text):
        return result.text or "(the model produced no text)"
    return ""


def render_compare(base: SkillResult, tuned: SkillResult, adapter: str | None) -> str:
    tuned_title = f"Fine-tuned (adapter '{adapter}')" if adapter else "Fine-tuned (no adapter installed)"
    return f"Base model (pre-trained only):\n{render(base)}\n\n{tuned_title}:\n{render(tuned)}"
