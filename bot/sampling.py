"""Next-token choice for a batch whose rows each have their own sampling settings."""

from __future__ import annotations

from typing import Any

import torch

from bot.engine import SamplingParams


def choose_next_tokens(
    logits: torch.Tensor, params: list[SamplingParams], seen: list[list[int]], generators: list[Any],
) -> list[int]:
    """One token per row from ``logits`` [B, V]; ``seen`` holds each row's prompt+generated ids."""
    logits = logits.float()
    out: list[int] = []
    for i, p in enumerate(params):
        row = logits[i]
        if p.repetition_penalty != 1.0 and seen[i]:
            ids = torch.tensor(sorted(set(seen[i])), dtype=torch.long, device=row.device)
            picked = row[ids]
            # Same rule as transformers' RepetitionPenaltyLogitsProcessor (CTRL paper).
            row = row.clone()
            row[ids] = torch.where(picked < 0, picked * p.repetition_penalty, picked / p.repetition_penalty)
        if p.temperature <= 0:
            out.append(int(row.argmax()))
            continue
        probs = torch.softmax(row / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            cumulative = torch.cumsum(sorted_probs, dim=-1)
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            cut = cumulative - sorted_probs >= p.top_p
            sorted_probs[cut] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        out.append(int(torch.multinomial(probs, 1, generator=generators[i])))
    return out
