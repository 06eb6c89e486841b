"""A prompt for each untitled training story, taken from the story itself, so the story adapter learns to
write about what it is asked (``/story a fox who wanted to fly``) instead of ignoring the request.

TinyStories mostly open with "Once upon a time, (in PLACE,) there was CHARACTER (who ...)". Such a story
gets that character and place as its theme ("a rhinoceros named Roxy who loved to climb, in a big
forest"); any other story that opens with a full sentence gets that sentence as the opening to continue;
a fragment (a story cut mid-way) gets no prompt. Both kinds of request are what users send, and
``StoryFormat.prompt`` tells them apart the way the bot does.
"""

from __future__ import annotations

import re

_FIRST_SENTENCE = re.compile(r"^(.+?[.!?])(?=\s|$)", re.S)
_CHARACTER = re.compile(
    r"^(?:once upon a time,?\s*)?(?:(?P<place1>(?:in|on|at|near) (?:an?|the) [^,]+?),\s*)?"
    r"there (?:was|lived|were) (?P<who>(?:an?|the|two|three|some) [^.!?]+?)"
    r"(?:,? (?P<place2>(?:in|on|at|near) (?:an?|the) [^,.!?]+))?[.!?]$",
    re.I,
)
# The second sentence often says what the character wanted or loved: part of the theme when the first has none.
_WISH = re.compile(r"^(?:he|she|it|they|[A-Z][a-z]+) (?P<wish>(?:loved|liked|wanted|wished) to [^,.!?]+)[.!?]")
MAX_THEME_WORDS = 16


def prompt_for(text: str) -> str | None:
    """A theme, an opening sentence, or None, for one story (deterministic)."""
    text = text.strip()
    first = _FIRST_SENTENCE.match(text)
    if not first or not first.group(1)[0].isupper():
        return None
    sentence = first.group(1)
    found = _CHARACTER.match(sentence)
    if found:
        who = found["who"].strip().rstrip(",")
        if len(who.split()) >= 2 and " who " not in f" {who} ":
            wish = _WISH.match(text[first.end():].strip())
            if wish:
                who = f"{who} who {wish['wish']}"
        place = found["place1"] or found["place2"]
        theme = f"{who}, {place}" if place and place not in who else who
        if 2 <= len(theme.split()) <= MAX_THEME_WORDS:
            return theme
    return sentence if len(sentence.split()) >= 5 else None

