"""Next-token choice for a batch whose rows each have their own sampling settings (numpy only).

Greedy rows are picked with one batched argmax. Sampled rows: repetition penalty (CTRL rule),
temperature, nucleus (top-p) filtering, then a draw with the row's ``numpy.random.Generator``
(reproducible with a seed). Top-p looks at the largest probabilities first (a partition; the whole
vocabulary only when the cut-off is not among them) instead of sorting all of it, and the draw is made
among the kept tokens only, with their probabilities: the same distribution as a draw over the whole
filtered vocabulary.
"""

from __future__ import annotations

import numpy as np

from bot.engine import SamplingParams

_FIRST_K = 256  # top-p candidates looked at first; the whole vocabulary if the cut-off is not among them


def choose_next_tokens(
    logits: np.ndarray, params: list[SamplingParams], seen: list[list[int]],
    generators: list[np.random.Generator | None],
) -> list[int]:
    """One token per row from ``logits`` [B, V]; ``seen`` holds each row's prompt+generated ids.

    Raises ValueError when a sampled row's settings give no distribution to draw from (a NaN
    temperature, every token masked out): the caller retries row by row so that row fails alone.
    """
    out: list[int] = [0] * len(params)
    plain_greedy = [i for i, p in enumerate(params)
                    if p.temperature <= 0 and (p.repetition_penalty == 1.0 or not seen[i])]
    if plain_greedy:
        rows = logits if len(plain_greedy) == len(params) else logits[plain_greedy]
        for i, token in zip(plain_greedy, rows.argmax(-1).tolist(), strict=True):
            out[i] = int(token)
    done = set(plain_greedy)
    for i, p in enumerate(params):
        if i in done:
            continue
        row = logits[i]
        if p.repetition_penalty != 1.0 and seen[i]:
            ids = np.array(sorted(set(seen[i])), dtype=np.int64)
            picked = row[ids]
            # Same rule as transformers' RepetitionPenaltyLogitsProcessor (CTRL paper).
            row = row.copy()  # the logits may be the backend's own buffer
            row[ids] = np.where(picked < 0, picked * p.repetition_penalty, picked / p.repetition_penalty)
        if p.temperature <= 0:
            out[i] = int(row.argmax())
            continue
        probs = softmax(np.asarray(row, dtype=np.float64) / p.temperature)
        if not np.isfinite(probs).all():
            raise ValueError(f"cannot sample this row (temperature {p.temperature}): its probabilities are not finite")
        if p.top_p < 1.0:
            ids, kept = top_p_candidates(probs, p.top_p)
            out[i] = int(ids[generators[i].choice(ids.size, p=kept / kept.sum())])
        else:
            out[i] = int(generators[i].choice(probs.size, p=probs))
    return out


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis in float64, the maximum subtracted first so that exp cannot overflow."""
    x = np.asarray(x, dtype=np.float64)
    z = np.exp(x - x.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def largest(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest of 1-D ``values``, largest first, ties in id order (as a stable full
    descending sort orders them; which of several values tied at the k-th place are taken is arbitrary)."""
    if k >= values.size:
        return np.argsort(-values, kind="stable")
    top = np.argpartition(-values, k - 1)[:k]
    return top[np.lexsort((top, -values[top]))]


def top_p_candidates(probs: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """The smallest set of largest probabilities whose mass reaches ``top_p`` (at least one): (ids, probs).

    Exactly the tokens and values a full descending sort keeps: they are a prefix of that order, and a
    prefix's cumulative sums do not depend on what follows it.
    """
    n = probs.size
    k = min(n, _FIRST_K)
    while True:
        order = largest(probs, k)
        values = probs[order]
        before = np.cumsum(values) - values   # mass of the tokens ranked above each one
        if k == n or float(before[-1]) >= top_p:
            break
        k = n
    keep = before < top_p
    return order[keep], values[keep]


def top_p_filter(probs: np.ndarray, top_p: float) -> np.ndarray:
    """``probs`` with everything outside the top-p set zeroed (the classic formulation)."""
    ids, kept = top_p_candidates(probs, top_p)
    out = np.zeros_like(probs)
    out[ids] = kept
    return out
