"""Splitting a long reply into messages within a platform's limit, without breaking code fences,
grapheme clusters or the UTF-16 length Telegram counts."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable


def utf16_len(text: str) -> int:
    """Length in UTF-16 code units: how Telegram counts its message limit (an emoji can count 2)."""
    return len(text.encode("utf-16-le")) // 2


_FENCE = "```"
_CLOSE = "\n```"
_LANG = re.compile(r"[\w+#.-]{1,20}")
_ZWJ, _VS15, _VS16 = "\u200d", "\ufe0e", "\ufe0f"


def split_message(
    text: str, limit: int, *, size: Callable[[str], int] = len, fences: bool = True,
) -> list[str]:
    """Split ``text`` into non-blank chunks with ``size(chunk) <= limit``, at paragraph, line or word breaks.

    With ``fences`` (Markdown platforms), a code block (```lang) left open at a split is closed at the end of
    the chunk and reopened with the same language at the start of the next, so every chunk has balanced
    fences and the code keeps its formatting. Plain-text platforms pass ``fences=False``: added backticks
    would show up literally there. Only whitespace at split points is dropped; a blank text gives [].
    """
    if limit < 16:
        raise ValueError("limit too small")
    text = text.strip()
    chunks: list[str] = []
    lang: str | None = None  # language of a code block open where ``text`` (the rest) starts
    while text:
        head = "" if lang is None else f"{_FENCE}{lang}\n"
        whole = head + text
        if size(whole) <= limit and not (fences and _open_fence(whole) is not None):
            chunks.append(whole)
            break
        budget = limit - size(head)
        cut = _cut_point(text, budget, size)
        if fences and _open_fence(head + text[:cut].rstrip()) is not None:  # leave room to close the block
            cut = _cut_point(text, budget - size(_CLOSE), size)
        piece = text[:cut].rstrip()
        if not piece.strip():  # only whitespace fits: drop it (a split point) and go on
            text = text[cut:].lstrip()
            continue
        chunk = head + piece
        lang = _open_fence(chunk) if fences else None
        if lang is not None:
            chunk += _CLOSE
            # A long language tag must not eat the room for the code itself.
            if size(f"{_FENCE}{lang}\n") + size(_CLOSE) > limit // 2:
                lang = ""
        chunks.append(chunk)
        # Drop the break itself (newlines, or the space before the next word) but keep indentation.
        text = text[cut:].lstrip("\n") if text[cut:cut + 1] == "\n" else text[cut:].lstrip(" ")
    return chunks


def _open_fence(text: str) -> str | None:
    """The language of the code block still open at the end of ``text`` ("" for none), or None if closed."""
    lang: str | None = None
    start = 0
    while (i := text.find(_FENCE, start)) >= 0:
        end = i + len(_FENCE)
        while end < len(text) and text[end] == "`":  # a longer run of backticks is one marker
            end += 1
        if lang is None:
            line = text[end:].split("\n", 1)
            lang = line[0] if len(line) == 2 and _LANG.fullmatch(line[0]) else ""
        else:
            lang = None
        start = end
    return lang


def _fit(text: str, budget: int, size: Callable[[str], int]) -> int:
    """The longest prefix length of ``text`` with ``size(prefix) <= budget`` (at least 1)."""
    if size is len:
        return max(1, min(len(text), budget))
    lo, hi = 1, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if size(text[:mid]) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _cut_point(text: str, budget: int, size: Callable[[str], int]) -> int:
    """Where to end this chunk: the last paragraph, line or word break in the second half of the room,
    else a hard cut that does not split a backtick run or a character from its combining marks."""
    room = _fit(text, max(1, budget), size)
    if room >= len(text):
        return len(text)
    window = text[:room]
    for sep in ("\n\n", "\n", " "):
        i = window.rfind(sep)
        if i > room // 2:
            return i if sep != " " else i + 1
    cut = room
    while cut > 1 and _joined(text, cut):
        cut -= 1
    return cut if cut > 1 or not _joined(text, cut) else room


def _joined(text: str, cut: int) -> bool:
    """True if cutting between text[cut-1] and text[cut] would split a backtick run or a grapheme."""
    before, after = text[cut - 1], text[cut]
    if before == "`" and after == "`":
        return True
    if after in (_ZWJ, _VS15, _VS16) or before == _ZWJ or unicodedata.combining(after):
        return True
    if unicodedata.category(after) in ("Mn", "Me", "Mc") or 0x1F3FB <= ord(after) <= 0x1F3FF:
        return True
    if 0xE0020 <= ord(after) <= 0xE007F:  # emoji tag sequences (subdivision flags)
        return True
    if _regional(before) and _regional(after):  # flags are pairs of regional indicators
        run = 0
        while cut - 1 - run >= 0 and _regional(text[cut - 1 - run]):
            run += 1
        return run % 2 == 1
    return False


def _regional(ch: str) -> bool:
    return 0x1F1E6 <= ord(ch) <= 0x1F1FF
