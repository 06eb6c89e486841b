"""Cleaning text at the edges: what users send in (``clean_input``) and what a terminal prints (``terminal_safe``)."""

from __future__ import annotations

import re
import unicodedata

# Bidi overrides/isolates can disguise text (e.g. reversed file names); they are never needed here.
_BIDI = {chr(c) for c in (0x202A, 0x202B, 0x202C, 0x202D, 0x202E, 0x2066, 0x2067, 0x2068, 0x2069)}
# Chat-template markers (<|im_start|>, <|im_end|>, <|endoftext|>, <|eot_id|>…) typed by a user would be
# tokenized as the real special tokens; a zero-width space keeps the text and breaks the marker.
_SPECIAL = re.compile(r"<\|([^|<>\s]{1,40})\|>")


def clean_input(text: str) -> str:
    """Valid UTF-8 text without control or bidi-override characters (newlines and tabs kept)."""
    text = text.encode("utf-8", "replace").decode("utf-8", "replace")
    text = "".join(
        ch for ch in text
        if ch in "\n\t" or (ch not in _BIDI and unicodedata.category(ch) not in ("Cc", "Cs"))
    ).strip()
    return _SPECIAL.sub(lambda m: f"<\u200b|{m[1]}|>", text)


def terminal_safe(text: str) -> str:
    """Text a terminal shows as text: no escape sequences or other control characters (a model can
    generate ESC and friends, which would move the cursor or recolour the console), no bidi overrides.
    Unlike ``clean_input`` it keeps surrounding whitespace, so streamed pieces join up unchanged."""
    return "".join(ch for ch in text if ch in "\n\t" or (ch not in _BIDI and unicodedata.category(ch) != "Cc"))
