"""Tokenise examples with the shared task formats, mask the loss to answer tokens, and batch them.

An encoded example holds ``ids`` and either ``targets`` (``targets[i]`` is the token to predict at
position ``i``, -100 where there is no loss: prompt and padding) or ``label`` (sentiment: the class
index, scored at the last prompt position). Batches are grouped by length to keep padding small.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bot.errors import DataError
from bot.skills import NERFormat, QAFormat, SentimentFormat, StoryFormat
from training.data import ChatExample, Example, NERExample, QAExample, SentimentExample, TextExample

IGNORE = -100


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    targets: list[int] | None = None   # next-token targets, IGNORE where there is no loss
    label: int = -1                     # class index (sentiment)

    @property
    def weight(self) -> int:
        """How many loss terms the example contributes (the loss is a mean over all of them)."""
        if self.targets is None:
            return 1
        return sum(t != IGNORE for t in self.targets)


def prompt_ids(tok: Any, prompt: str) -> list[int]:
    # Exactly as the bot's engine encodes a prompt (bot/engine/scheduler.py: no added special tokens).
    return list(tok(prompt, add_special_tokens=False).input_ids)


def text_ids(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False).input_ids)


def label_token_ids(tok: Any, labels: Sequence[str]) -> list[int]:
    """First token of each label's continuation: the bot scores a label by that token's probability."""
    ids = [text_ids(tok, SentimentFormat.continuation(label))[0] for label in labels]
    if len(set(ids)) != len(ids):
        raise DataError("labels", None, f"labels {list(labels)} do not start with distinct tokens; rename them")
    return ids


def pair(tok: Any, prompt: str, target: str, max_length: int, *, eos: bool = True,
         cut: bool = False) -> Encoded | None:
    """prompt + target (+ EOS so generation stops); too long: cut the target (``cut``) or skip (None)."""
    p = prompt_ids(tok, prompt)
    t = text_ids(tok, target) + ([tok.eos_token_id] if eos else [])
    if len(p) + len(t) > max_length:
        if not cut or len(p) >= max_length - 1:
            return None
        t = t[: max_length - len(p)]
    ids = p + t
    return Encoded(ids=ids, targets=[IGNORE] * (len(p) - 1) + t + [IGNORE])


def encode(task: str, examples: Sequence[Example], tok: Any, *, max_length: int, labels: Sequence[str] = (),
           eos: bool = True) -> tuple[list[Encoded], int]:
    """Encode examples for ``task``; returns (encoded, number skipped as longer than max_length)."""
    out: list[Encoded | None] = []
    if task == "sentiment":
        index = {label: i for i, label in enumerate(labels)}
        for ex in examples:
            assert isinstance(ex, SentimentExample)
            ids = prompt_ids(tok, SentimentFormat.prompt(ex.text))
            out.append(Encoded(ids=ids, label=index[ex.label]) if len(ids) <= max_length else None)
    elif task == "ner":
        for ex in examples:
            assert isinstance(ex, NERExample)
            out.append(pair(tok, NERFormat.prompt(ex.text), NERFormat.target(ex.entities()), max_length, eos=eos))
    elif task == "qa":
        for ex in examples:
            assert isinstance(ex, QAExample)
            prompt = QAFormat.prompt(ex.context, ex.question)
            out.append(pair(tok, prompt, QAFormat.target(ex.answers[0]), max_length, eos=eos))
    elif task == "story":
        for ex in examples:
            assert isinstance(ex, TextExample)
            prompt, target = StoryFormat.training_pair(ex.text, ex.title)
            # A story cut at max_length gets no EOS: the model must not learn to stop mid-story.
            full = pair(tok, prompt, target, max_length, eos=eos)
            out.append(full or pair(tok, prompt, target, max_length, eos=False, cut=True))
    elif task == "domain":
        return pack(examples, tok, max_length), 0
    elif task == "chat":
        out = [chat(tok, ex, max_length) for ex in examples]  # type: ignore[arg-type]
    else:
        raise ValueError(f"unknown task {task!r}")
    kept = [e for e in out if e is not None]
    return kept, len(out) - len(kept)


def pack(examples: Sequence[Example], tok: Any, block: int) -> list[Encoded]:
    """Continued pre-training: documents joined with EOS and cut into blocks; loss on every token."""
    stream: list[int] = []
    for ex in examples:
        assert isinstance(ex, TextExample)
        stream += [*text_ids(tok, ex.text), tok.eos_token_id]
    blocks = []
    for start in range(0, len(stream), block):
        ids = stream[start:start + block]
        if len(ids) > 1:
            blocks.append(Encoded(ids=ids, targets=[*ids[1:], IGNORE]))
    return blocks


def chat(tok: Any, ex: ChatExample, max_length: int) -> Encoded | None:
    """A conversation through the chat template; loss on the assistant turns (their end tokens included)."""
    messages = ex.as_dicts()
    text = tok.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        before = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        after = tok.apply_chat_template(messages[: i + 1], tokenize=False)
        if not text.startswith(after) or not after.startswith(before):
            raise DataError("chat template", None, "the chat template does not render turns as prefixes; "
                            "assistant tokens cannot be located")
        spans.append((len(before), len(after)))
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc.input_ids), enc.offset_mapping
    if len(ids) > max_length:
        return None
    wanted = [any(s <= start and end <= e for s, e in spans) and end > start for start, end in offsets]
    targets = [ids[i + 1] if wanted[i + 1] else IGNORE for i in range(len(ids) - 1)] + [IGNORE]
    return Encoded(ids=ids, targets=targets) if any(t != IGNORE for t in targets) else None


# ---------------------------------------------------------------- batching


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int,
                           *, group: int = 64) -> list[list[int]]:
    """Shuffled batches of similar length: shuffle, sort within windows of ``group`` batches, shuffle batches.

    A pure function of (seed, epoch), so every process and every resumed run computes the same order.
    """
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    window = batch_size * group
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def shard(batch: list[int], rank: int, world: int) -> list[int]:
    """This process's part of a global batch; interleaved so that all parts have similar lengths."""
    return batch[rank::world]


def chunks(items: list[int], size: int) -> list[list[int]]:
    size = size or len(items) or 1
    return [items[i:i + size] for i in range(0, len(items), size)]


def micro_batches(items: list[int], lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Split a shard so each forward pass holds at most ``max_tokens`` padded tokens (bounds memory)."""
    items = sorted(items, key=lambda i: -lengths[i])
    out: list[list[int]] = []
    for i in items:
        # Sorted longest first, so the first item of a micro-batch sets its padded width.
        if out and (not max_tokens or lengths[out[-1][0]] * (len(out[-1]) + 1) <= max_tokens):
            out[-1].append(i)
        else:
            out.append([i])
    return out


def collate(encoded: Sequence[Encoded], pad_id: int, *, left: bool = False) -> dict[str, Any]:
    """Pad to the longest; right padding for training/scoring, left padding for generation."""
    import torch

    width = max(len(e.ids) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    targets = torch.full((len(encoded), width), IGNORE, dtype=torch.long)
    for row, e in enumerate(encoded):
        n = len(e.ids)
        cols = slice(width - n, width) if left else slice(0, n)
        ids[row, cols] = torch.tensor(e.ids)
        mask[row, cols] = 1
        if e.targets is not None:
            targets[row, cols] = torch.tensor(e.targets)
    batch: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
    if encoded[0].targets is not None:
        batch["targets"] = targets
    else:
        batch["labels"] = torch.tensor([e.label for e in encoded])
    return batch
