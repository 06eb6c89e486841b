"""Next-token choice for a batch whose rows each have their own sampling settings.

Greedy rows are picked with one batched argmax. Sampled rows: repetition penalty (CTRL rule),
temperature, nucleus (top-p) filtering, then a draw with the row's generator (reproducible with a
seed). Top-p looks at the largest probabilities first (``topk``; the whole vocabulary only when the
cut-off is not among them) instead of sorting all of it, and the draw is made among the kept tokens
only, with their probabilities: the same distribution as a draw over the whole filtered vocabulary,
without one random number per vocabulary entry.
"""

from __future__ import annotations

from typing import Any

import torch

from bot.engine import SamplingParams

_FIRST_K = 256  # top-p candidates looked at first; the whole vocabulary if the cut-off is not among them


def choose_next_tokens(
    logits: torch.Tensor, params: list[SamplingParams], seen: list[list[int]], generators: list[Any],
) -> list[int]:
    """One token per row from ``logits`` [B, V]; ``seen`` holds each row's prompt+generated ids."""
    logits = logits.float()
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
            ids = torch.tensor(sorted(set(seen[i])), dtype=torch.long, device=row.device)
            picked = row[ids]
            # Same rule as transformers' RepetitionPenaltyLogitsProcessor (CTRL paper).
            row = row.clone()
            row[ids] = torch.where(picked < 0, picked * p.repetition_penalty, picked / p.repetition_penalty)
        if p.temperature <= 0:
            out[i] = int(row.argmax())
            continue
        probs = torch.softmax(row / p.temperature, dim=-1)
        if p.top_p < 1.0:
            ids, kept = top_p_candidates(probs, p.top_p)
            out[i] = int(ids[torch.multinomial(kept, 1, generator=generators[i])])
        else:
            out[i] = int(torch.multinomial(probs, 1, generator=generators[i]))
    return out


def top_p_candidates(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest set of largest probabilities whose mass reaches ``top_p`` (at least one): (ids, probs).

    Exactly the tokens and values a full descending sort keeps: they are a prefix of that order, and a
    prefix's cumulative sums do not depend on what follows it.
    """
    n = probs.numel()
    k = min(n, _FIRST_K)
    while True:
        values, order = torch.topk(probs, k)
        before = torch.cumsum(values, dim=-1) - values   # mass of the tokens ranked above each one
        if k == n or float(before[-1]) >= top_p:
            break
        k = n
    keep = before < top_p
    return order[keep], values[keep]


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """``probs`` with everything outside the top-p set zeroed (the classic formulation)."""
    ids, kept = top_p_candidates(probs, top_p)
    return torch.zeros_like(probs).scatter_(0, ids, kept)
