"""bot.transports.split.split_message: limits, balanced code fences, nothing lost but whitespace at split points."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.transports.split import split_message, utf16_len

_FENCE_TOKEN = re.compile(r"```(?:py)?")


def _fences(chunk: str) -> int:
    return len(re.findall(r"`{3,}", chunk))


def _squash(text: str) -> str:
    """The text with every fence marker and all whitespace removed: what must survive a split."""
    return "".join(_FENCE_TOKEN.sub("", text).split())


words = st.text(alphabet="abcxyzé😀", min_size=1, max_size=8)
tokens = st.one_of(
    words, words, words, st.just(" "), st.just("\n"), st.just("\n\n"), st.just("\n```\n"), st.just("\n```py\n"),
    st.just("    "),
)
documents = st.lists(tokens, max_size=400).map(" ".join)


@settings(max_examples=300, deadline=None)
@given(text=documents, limit=st.integers(min_value=40, max_value=300))
def test_chunks_fit_have_balanced_fences_and_keep_everything(text: str, limit: int) -> None:
    chunks = split_message(text, limit)
    assert all(len(c) <= limit for c in chunks)
    assert all(c.strip() for c in chunks)
    assert all(_fences(c) % 2 == 0 for c in chunks)
    assert _squash("".join(chunks)) == _squash(text)
    if text.strip() and len(text.strip()) <= limit and _fences(text) % 2 == 0:
        assert chunks == [text.strip()]


@settings(max_examples=200, deadline=None)
@given(text=documents, limit=st.integers(min_value=40, max_value=300))
def test_plain_text_mode_adds_nothing(text: str, limit: int) -> None:
    chunks = split_message(text, limit, fences=False)
    assert all(len(c) <= limit for c in chunks)
    assert "".join("".join(chunks).split()) == "".join(text.split())


@settings(max_examples=200, deadline=None)
@given(text=st.text(min_size=1, max_size=3000), limit=st.integers(min_value=16, max_value=500))
def test_any_unicode_text_fits_the_utf16_limit(text: str, limit: int) -> None:
    chunks = split_message(text, limit, size=utf16_len, fences=False)
    assert all(utf16_len(c) <= limit for c in chunks)
    assert "".join("".join(chunks).split()) == "".join(text.split())


def test_prefers_paragraph_then_line_then_word_breaks() -> None:
    text = "first paragraph here\n\nsecond one is a bit longer\nand has two lines"
    assert split_message(text, 30) == ["first paragraph here", "second one is a bit longer", "and has two lines"]


def test_long_word_is_cut_hard_without_losing_characters() -> None:
    text = "x" * 95
    chunks = split_message(text, 40, fences=False)
    assert [len(c) for c in chunks] == [40, 40, 15]
    assert "".join(chunks) == text


def test_code_block_is_closed_and_reopened_with_its_language() -> None:
    code = "\n".join(f"    line_{i} = {i}" for i in range(30))
    text = f"Here is code:\n```python\n{code}\n```\nDone."
    chunks = split_message(text, 200)
    assert len(chunks) > 2
    for chunk in chunks:
        assert len(chunk) <= 200 and _fences(chunk) % 2 == 0
    for chunk in chunks[1:-1]:
        assert chunk.startswith("```python\n") and chunk.endswith("\n```")
    # indentation inside the block survives the splits
    assert all(line.startswith("    line_") for c in chunks for line in c.splitlines() if "line_" in line)


def test_unclosed_fence_in_the_input_is_closed() -> None:
    chunks = split_message("look: ```\ncode without an end", 100)
    assert chunks == ["look: ```\ncode without an end\n```"]


def test_emoji_sequences_are_not_split() -> None:
    family = "👨\u200d👩\u200d👧"
    text = family * 20
    chunks = split_message(text, 16, size=utf16_len, fences=False)
    assert "".join(chunks) == text
    assert all(not c.startswith("\u200d") and not c.endswith("\u200d") for c in chunks)


def test_blank_text_gives_no_chunks_and_tiny_limits_are_refused() -> None:
    assert split_message(" \n\t ", 100) == []
    with pytest.raises(ValueError):
        split_message("abc", 5)
