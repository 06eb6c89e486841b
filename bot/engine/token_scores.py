"""OpenAI's per-request logit controls over a batch of logits: ``logit_bias`` and generated-token logprobs.

Applied by the scheduler to the logits any backend returns, so the fast and PEFT backends behave the same.
Log-probabilities are taken after the bias and before temperature, top-p and repetition penalty: a
client that biases a few tokens (as the remote engine's classification does) reads their relative
probabilities unchanged, since a bias added to all of them alike cancels out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from bot.engine import SamplingParams, TokenLogprob
from bot.engine.sampling import largest
from bot.errors import UserInputError

MAX_TOP_LOGPROBS = 20   # as vLLM's default max_logprobs


def as_array(logits: Any) -> np.ndarray:
    """A backend's logits as a float32 numpy array. Anything but a numpy array is taken for a torch
    tensor and converted through its own methods, so that this module never imports torch."""
    if isinstance(logits, np.ndarray):
        return logits.astype(np.float32, copy=False)
    return logits.detach().float().cpu().numpy()


def check_sampling(params: SamplingParams, vocab_size: int) -> None:
    """Refuse settings the worker could not apply (before the request is queued, so it fails alone)."""
    for token, bias in params.logit_bias:
        if not 0 <= token < vocab_size:
            raise UserInputError(f"logit_bias names token {token}, outside the vocabulary (0..{vocab_size - 1})")
        if not -100 <= bias <= 100:
            raise UserInputError(f"logit_bias for token {token} must be between -100 and 100; got {bias}")
    if params.logprobs is not None and not 0 <= params.logprobs <= MAX_TOP_LOGPROBS:
        raise UserInputError(f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}; got {params.logprobs}")


def biased(logits: np.ndarray, params: Sequence[SamplingParams]) -> np.ndarray:
    """``logits`` [B, V] with each row's ``logit_bias`` added (the same array when no row has one)."""
    if not any(p.logit_bias for p in params):
        return logits
    out = logits.astype(np.float32)  # a copy: the logits may be the backend's own buffer
    for i, p in enumerate(params):
        if p.logit_bias:
            ids = [t for t, _ in p.logit_bias]
            out[i, ids] += np.array([b for _, b in p.logit_bias], dtype=out.dtype)
    return out


def token_scores(logits: np.ndarray, chosen: Sequence[int], params: Sequence[SamplingParams],
                 tokenizer: Any) -> list[TokenLogprob | None]:
    """For each row that asked for logprobs, the chosen token's log-probability and the top alternatives."""
    out: list[TokenLogprob | None] = [None] * len(chosen)
    wanted = [i for i, p in enumerate(params) if p.logprobs is not None and chosen[i] >= 0]
    if not wanted:
        return out
    shifted = logits[wanted].astype(np.float64)
    shifted -= shifted.max(axis=-1, keepdims=True)
    logprobs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    for row, i in enumerate(wanted):
        k = params[i].logprobs or 0
        top: tuple[tuple[str, float], ...] = ()
        if k:
            ids = largest(logprobs[row], k)
            top = tuple((tokenizer.decode([int(t)]), float(logprobs[row, t])) for t in ids)
        token = chosen[i]
        out[i] = TokenLogprob(tokenizer.decode([token]), float(logprobs[row, token]), top)
    return out
