"""Decoding constrained to a span of a text (extractive QA): the answer is copied, never paraphrased.

Each generated token must continue a run of the source text's own tokens (any start for the first one),
and an end token (end of sequence or a stop string's token) may follow once there is at least one. The
bot's engine masks the logits with it; the evaluation passes the same rule to transformers' ``generate``
(``prefix_allowed_tokens_fn``), so the scores measure what the bot does.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


class SpanConstraint:
    def __init__(self, source_ids: Sequence[int], end_ids: Iterable[int]):
        self.source = list(source_ids)
        self.end = sorted(set(end_ids))
        self._starts = sorted(set(self.source))

    @classmethod
    def for_text(cls, tokenizer: Any, source: str, stops: Sequence[str] = ()) -> SpanConstraint:
        """``source`` tokenized as it stands in the prompt; ends: the tokenizer's EOS and every stop string
        that is a single token."""
        def ids(text: str) -> list[int]:   # the call both transformers' and the light tokenizer answer
            return list(tokenizer(text, add_special_tokens=False).input_ids)

        ends = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        ends.update(found[0] for found in map(ids, stops) if len(found) == 1)
        return cls(ids(source), ends)

    def allowed(self, generated: Sequence[int]) -> list[int]:
        """The token ids that may come next after ``generated``."""
        k = len(generated)
        if not k:
            return self._starts
        gen = list(generated)
        src = self.source
        follow = {src[i + k] for i in range(len(src) - k) if src[i:i + k] == gen}
        return sorted(follow) + self.end
