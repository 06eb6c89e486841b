"""Metrics and batched inference with the same task formats the bot uses.

sentiment: accuracy, macro-F1, per-class and macro recall, with predictions restricted to the labels
present in the data (so a 3-class adapter can be scored on binary SST-2). ner: entity-level micro F1
(seqeval, strict IOB2) after mapping predicted character offsets back to tokens. qa: SQuAD v1.1 EM/F1.
story/domain/chat: perplexity of the target tokens; story, with ``themes``: also theme adherence, the share of
50 hand-written themes (story_eval_themes.txt, none from the training data) whose key words all appear in the
greedy story the model writes for "/story <theme>".
"""

from __future__ import annotations

import collections
import math
import re
import string
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from bot.messages import Answer
from bot.skills import NERFormat, QAFormat, SentimentFormat, StoryFormat
from bot.span_constraint import SpanConstraint
from training.batching import Encoded, chunks, collate, encode, label_token_ids, prompt_ids, text_ids
from training.data import Example, NERExample, QAExample, SentimentExample
from training.model import LossModel

DEFAULT_MAX_NEW_TOKENS = {"ner": 96, "qa": 24}   # as the bot's config.toml
_PUNCTUATION = frozenset(string.punctuation)
PRIMARY = {"sentiment": "accuracy", "ner": "f1", "qa": "f1", "story": "perplexity", "domain": "perplexity",
           "chat": "perplexity"}


def higher_is_better(task: str) -> bool:
    return PRIMARY[task] != "perplexity"


# ---------------------------------------------------------------- metrics (pure functions)


def sentiment_metrics(gold: Sequence[str], pred: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class recall and macro recall over ``labels``, in percent."""
    recall, f1 = {}, []
    for label in labels:
        tp = sum(g == label and p == label for g, p in zip(gold, pred, strict=True))
        n_gold, n_pred = sum(g == label for g in gold), sum(p == label for p in pred)
        r = tp / n_gold if n_gold else 0.0
        p = tp / n_pred if n_pred else 0.0
        recall[label] = 100 * r
        f1.append(2 * p * r / (p + r) if p + r else 0.0)
    accuracy = sum(g == p for g, p in zip(gold, pred, strict=True)) / max(len(gold), 1)
    return {"accuracy": 100 * accuracy, "macro_f1": 100 * sum(f1) / len(labels),
            "macro_recall": sum(recall.values()) / len(labels), "recall": recall, "n": len(gold)}


def token_spans(tokens: Sequence[str]) -> list[tuple[int, int]]:
    """Character span of each token in ``" ".join(tokens)``."""
    spans, pos = [], 0
    for token in tokens:
        spans.append((pos, pos + len(token)))
        pos += len(token) + 1
    return spans


def entities_to_tags(tokens: Sequence[str], entities: Sequence[tuple[int, int, str]]) -> list[str]:
    """Predicted (start, end, type) character spans -> IOB2 tags; the first entity wins a token."""
    tags = ["O"] * len(tokens)
    for start, end, etype in sorted(entities):
        covered = [i for i, (s, e) in enumerate(token_spans(tokens)) if s < end and start < e]
        if not covered or any(tags[i] != "O" for i in covered):
            continue
        for n, i in enumerate(covered):
            tags[i] = ("B-" if n == 0 else "I-") + etype
    return tags


def ner_metrics(gold: list[list[str]], pred: list[list[str]]) -> dict[str, Any]:
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score
    from seqeval.scheme import IOB2

    kw: dict[str, Any] = {"mode": "strict", "scheme": IOB2, "zero_division": 0}
    report = classification_report(gold, pred, output_dict=True, **kw)
    per_type = {k: 100 * v["f1-score"] for k, v in report.items() if not k.endswith(" avg")}
    return {"f1": 100 * f1_score(gold, pred, **kw), "precision": 100 * precision_score(gold, pred, **kw),
            "recall": 100 * recall_score(gold, pred, **kw), "f1_by_type": per_type, "n": len(gold)}


def squad_normalize(text: str) -> str:
    """The official SQuAD v1.1 answer normalisation."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def squad_f1(prediction: str, gold: str) -> float:
    pred_tokens, gold_tokens = squad_normalize(prediction).split(), squad_normalize(gold).split()
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_scores(prediction: str, gold: Sequence[str]) -> tuple[float, float]:
    """One question's exact match and F1 (0..1), each the max over its gold answers."""
    return (max(float(squad_normalize(prediction) == squad_normalize(g)) for g in gold),
            max(squad_f1(prediction, g) for g in gold))


def qa_metrics(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, Any]:
    """SQuAD v1.1 exact match and F1 in percent, averaged over the questions."""
    scores = [squad_scores(p, gold) for p, gold in zip(predictions, answers, strict=True)]
    n = max(len(scores), 1)
    return {"exact_match": 100 * sum(em for em, _ in scores) / n, "f1": 100 * sum(f1 for _, f1 in scores) / n,
            "n": len(scores)}


# ---------------------------------------------------------------- inference


def _by_length(items: Sequence[list[int]], batch_size: int) -> list[list[int]]:
    """Index batches of similar length (longest first, so a memory problem shows up at once)."""
    order = sorted(range(len(items)), key=lambda i: -len(items[i]))
    return chunks(order, batch_size)


@torch.no_grad()
def generate(model: Any, tok: Any, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int = 16,
             stop: Sequence[str] = ("\n",), progress: Callable[[int], None] | None = None,
             spans: Sequence[str] | None = None) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches, stopping at EOS or a stop string);
    with ``spans``, each continuation is constrained to spans of its text, as the bot constrains it."""
    device = next(model.parameters()).device
    encoded = [prompt_ids(tok, p) for p in prompts]
    outputs = [""] * len(prompts)
    for idx in _by_length(encoded, batch_size):
        batch = collate([Encoded(ids=encoded[i]) for i in idx], tok.pad_token_id, left=True)
        batch.pop("labels", None)
        width = batch["input_ids"].shape[1]
        allowed = None
        if spans is not None:
            rules = [SpanConstraint.for_text(tok, spans[i], stop) for i in idx]

            def allowed(row: int, ids: torch.Tensor, rules: list[SpanConstraint] = rules,
                        width: int = width) -> list[int]:
                return rules[row].allowed(ids[width:].tolist())
        out = model.generate(
            prefix_allowed_tokens_fn=allowed,
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
            max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, repetition_penalty=1.0,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
            stop_strings=list(stop) or None, tokenizer=tok if stop else None,
        )
        for row, i in enumerate(idx):
            outputs[i] = tok.decode(out[row, width:], skip_special_tokens=True)
        if progress:
            progress(len(idx))
    return outputs


@torch.no_grad()
def label_probs(model: Any, tok: Any, texts: Sequence[str], labels: Sequence[str], *,
                batch_size: int = 16) -> list[list[float]]:
    """Softmax over the labels' first tokens at the last prompt position, as the bot classifies."""
    scorer = LossModel(model, label_token_ids(tok, labels))
    device = next(model.parameters()).device
    encoded = [Encoded(ids=prompt_ids(tok, SentimentFormat.prompt(t)), label=0) for t in texts]
    probs: list[list[float]] = [[] for _ in texts]
    for idx in _by_length([e.ids for e in encoded], batch_size):
        batch = {k: v.to(device) for k, v in collate([encoded[i] for i in idx], tok.pad_token_id).items()}
        _, logits = scorer(**batch)
        for row, i in enumerate(idx):
            probs[i] = logits[row].float().softmax(-1).tolist()
    return probs


@torch.no_grad()
def perplexity(model: Any, encoded: Sequence[Encoded], pad_id: int, *, batch_size: int = 8) -> dict[str, Any]:
    """exp(mean negative log-likelihood) of the target tokens."""
    scorer = LossModel(model)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for idx in _by_length([e.ids for e in encoded], batch_size):
        batch = {k: v.to(device) for k, v in collate([encoded[i] for i in idx], pad_id).items()}
        loss, _ = scorer(**batch)
        total += float(loss)
        count += int((batch["targets"] != -100).sum())
    nll = total / max(count, 1)
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": count, "n": len(encoded)}


# ---------------------------------------------------------------- one function per task


def evaluate(task: str, model: Any, tok: Any, examples: Sequence[Example], *, labels: Sequence[str] = (),
             batch_size: int = 16, max_new_tokens: int = 0, max_length: int = 1024,
             predictions: list[dict[str, Any]] | None = None, themes: bool = False,
             span_constrained: bool = True, order_check: bool = True,
             label_offsets: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Score ``model`` on ``examples`` (all of them; evaluation never drops long examples).

    Sentiment labels are decided as the bot decides them, with the adapter's ``label_offsets`` when given.

    QA answers are decoded as spans of the context, with the order check, as the bot decodes them
    (``span_constrained=False``: free text; ``order_check=False``: one reading; for comparison).

    ``predictions``, when given, receives one record per example (input, gold, the model's raw output,
    what the bot would make of it and its score) for error analysis; perplexity tasks add none.
    """
    was_training = model.training
    model.eval()
    try:
        if task == "sentiment":
            return eval_sentiment(model, tok, examples, labels, batch_size=batch_size,  # type: ignore[arg-type]
                                  predictions=predictions, offsets=label_offsets)
        if task == "ner":
            return eval_ner(model, tok, examples, labels, batch_size=batch_size,  # type: ignore[arg-type]
                            max_new_tokens=max_new_tokens or DEFAULT_MAX_NEW_TOKENS["ner"], predictions=predictions)
        if task == "qa":
            return eval_qa(model, tok, examples, batch_size=batch_size,  # type: ignore[arg-type]
                           max_new_tokens=max_new_tokens or DEFAULT_MAX_NEW_TOKENS["qa"], predictions=predictions,
                           span_constrained=span_constrained, order_check=order_check)
        # Perplexity of the text itself: without the EOS that training appends (the bare base model
        # has no reason to end a story there), stories cut at max_length rather than dropped.
        encoded, _ = encode(task, examples, tok, max_length=max_length, eos=False)
        scores = perplexity(model, encoded, tok.pad_token_id, batch_size=max(1, batch_size // 2))
        if themes and task == "story":
            scores |= theme_adherence(model, tok, batch_size=batch_size, predictions=predictions)
        return scores
    finally:
        model.train(was_training)


THEMES_FILE = Path(__file__).with_name("story_eval_themes.txt")
STORY_EVAL_TOKENS = 160


def eval_themes(path: Path = THEMES_FILE) -> list[tuple[str, tuple[str, ...]]]:
    """(theme, key words) from the themes file."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            theme, _, words = line.partition("|")
            out.append((theme.strip(), tuple(w.strip().lower() for w in words.split(",") if w.strip())))
    return out


def mentions(story: str, word: str) -> bool:
    """``word`` (or its plural, or its singular) is in ``story`` as a whole word, in any case."""
    stem = word.lower().removesuffix("s") if len(word) > 3 else word.lower()
    return re.search(rf"\b{re.escape(stem)}(?:s|es)?\b", story.lower()) is not None


def theme_adherence(model: Any, tok: Any, *, batch_size: int = 16,
                    predictions: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Share of the evaluation themes whose key words all appear in the story written for them (greedy)."""
    themes = eval_themes()
    stories = generate(model, tok, [StoryFormat.prompt(t) for t, _ in themes], max_new_tokens=STORY_EVAL_TOKENS,
                       batch_size=batch_size, stop=())
    hits = [all(mentions(s, w) for w in words) for s, (_, words) in zip(stories, themes, strict=True)]
    if predictions is not None:
        predictions.extend({"theme": t, "key_words": list(w), "story": s, "follows": h}
                           for (t, w), s, h in zip(themes, stories, hits, strict=True))
    return {"theme_adherence": 100 * sum(hits) / len(hits), "themes_n": len(hits)}


def sentiment_choices(examples: Sequence[SentimentExample], labels: Sequence[str]) -> list[str]:
    """Only the labels present in the data compete (in the adapter's order), so a 3-class adapter
    can be scored on a binary dataset."""
    present = {ex.label for ex in examples}
    return [label for label in labels if label in present] + sorted(present - set(labels))


def sentiment_predictions(probs: Sequence[Sequence[float]], choices: Sequence[str],
                          offsets: Mapping[str, float] | None = None) -> tuple[list[str], list[list[float]]]:
    """Each row's label and probabilities as the bot decides them (SentimentFormat.result, offsets applied)."""
    decided = [SentimentFormat.result(dict(zip(choices, p, strict=True)), offsets) for p in probs]
    return [d.label for d in decided], [[d.scores[c] for c in choices] for d in decided]


def eval_sentiment(model: Any, tok: Any, examples: Sequence[SentimentExample], labels: Sequence[str], *,
                   batch_size: int = 16, predictions: list[dict[str, Any]] | None = None,
                   offsets: Mapping[str, float] | None = None) -> dict[str, Any]:
    choices = sentiment_choices(examples, labels)
    raw = label_probs(model, tok, [ex.text for ex in examples], choices, batch_size=batch_size)
    pred, probs = sentiment_predictions(raw, choices, offsets)
    metrics = sentiment_metrics([ex.label for ex in examples], pred, choices)
    metrics["labels"] = choices
    if predictions is not None:
        predictions.extend(sentiment_records(examples, pred, probs, choices))
    return metrics


def sentiment_records(examples: Sequence[SentimentExample], pred: Sequence[str], probs: Sequence[Sequence[float]],
                      choices: Sequence[str]) -> list[dict[str, Any]]:
    """One predictions-file record per example, as the bot decided it."""
    return [{"text": ex.text, "gold": ex.label, "predicted": p, "correct": ex.label == p,
             "probs": dict(zip(choices, (round(x, 4) for x in ps), strict=True))}
            for ex, p, ps in zip(examples, pred, probs, strict=True)]


def eval_ner(model: Any, tok: Any, examples: Sequence[NERExample], labels: Sequence[str], *,
             batch_size: int = 16, max_new_tokens: int = 96,
             predictions: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    outputs = generate(model, tok, [NERFormat.prompt(ex.text) for ex in examples], max_new_tokens=max_new_tokens,
                       batch_size=batch_size, stop=NERFormat.stop)
    types = tuple(labels) or tuple(sorted({t for ex in examples for _, t in ex.entities()}))
    gold, pred = [], []
    for ex, out in zip(examples, outputs, strict=True):
        found = NERFormat.result(out, ex.text, types).entities
        gold.append(list(ex.tags))
        pred.append(entities_to_tags(ex.tokens, [(e.start, e.end, e.type) for e in found]))
        if predictions is not None:
            predictions.append({"sentence": ex.text, "gold": [[text, etype] for text, etype in ex.entities()],
                                "output": out.strip(), "predicted": [[e.text, e.type] for e in found],
                                "correct": gold[-1] == pred[-1]})
    metrics = ner_metrics(gold, pred)
    metrics["examples"] = [{"sentence": ex.text, "output": out.strip()} for ex, out in
                           zip(examples[:3], outputs[:3], strict=False)]
    return metrics


def eval_qa(model: Any, tok: Any, examples: Sequence[QAExample], *, batch_size: int = 16,
            max_new_tokens: int = 24, predictions: list[dict[str, Any]] | None = None,
            span_constrained: bool = True, order_check: bool = True) -> dict[str, Any]:
    """SQuAD F1 / EM of the answers the bot would give: spans of the context, and with ``order_check`` the
    bot's second reading with the sentences reversed and its choice between the two (bot/qa_answer.py)."""
    def read(pairs: Sequence[tuple[QAExample, str]]) -> tuple[list[str], list[Answer]]:
        """The raw output for each (example, context to read), and its answer located in the example's context."""
        spans = [QAFormat.span_source(c) for _, c in pairs] if span_constrained else None
        outs = generate(model, tok, [QAFormat.prompt(c, ex.question) for ex, c in pairs],
                        max_new_tokens=max_new_tokens, batch_size=batch_size, stop=QAFormat.stop, spans=spans)
        return outs, [QAFormat.result(out, ex.context) for (ex, _), out in zip(pairs, outs, strict=True)]

    outputs, first = read([(ex, ex.context) for ex in examples])
    chosen = list(first)
    second: dict[int, Answer] = {}
    if order_check and span_constrained:
        turned = {i: text for i, ex in enumerate(examples) if (text := QAFormat.reordered(ex.context))}
        second = dict(zip(turned, read([(examples[i], text) for i, text in turned.items()])[1], strict=True))
        differ = [i for i, a in second.items() if a.start is not None and not QAFormat.same(first[i], a)]
        pairs = [[QAFormat.target(first[i].answer), QAFormat.target(second[i].answer)] for i in differ]
        forward = choice_probs(model, tok, [QAFormat.prompt(examples[i].context, examples[i].question)
                                            for i in differ], pairs, batch_size=batch_size)
        backward = choice_probs(model, tok, [QAFormat.prompt(turned[i], examples[i].question) for i in differ],
                                pairs, batch_size=batch_size)
        for i, fw, bw in zip(differ, forward, backward, strict=True):
            if fw is not None and bw is not None:
                chosen[i] = QAFormat.pick(first[i], second[i], fw, bw)
    answers = [a.answer for a in chosen]
    metrics = qa_metrics(answers, [ex.answers for ex in examples])
    if order_check and span_constrained:
        metrics["order_check"] = {"read_twice": len(turned), "disagreed": len(differ),
                                  "changed": sum(a is not b for a, b in zip(chosen, first, strict=True))}
    if predictions is not None:
        for i, (ex, out, answer) in enumerate(zip(examples, outputs, answers, strict=True)):
            em, f1 = squad_scores(answer, ex.answers)
            predictions.append({"question": ex.question, "context": ex.context, "gold": list(ex.answers),
                                "output": out, "reversed_reading": second[i].answer if i in second else None,
                                "answer": answer, "exact_match": em, "f1": round(f1, 4)})
    metrics["examples"] = [{"question": ex.question, "answer": a, "gold": ex.answers[0]} for ex, a in
                           zip(examples[:3], answers[:3], strict=False)]
    return metrics


@torch.no_grad()
def choice_probs(model: Any, tok: Any, prompts: Sequence[str], choices: Sequence[Sequence[str]], *,
                 batch_size: int = 16) -> list[list[float] | None]:
    """For each prompt, the softmax over its choices' first tokens at the prompt's last position, as the
    bot's ``classify`` computes it; None where two choices start with the same token (the bot cannot
    tell them apart either)."""
    device = next(model.parameters()).device
    decoder, head = LossModel(model)._parts()
    firsts = [[text_ids(tok, c)[0] for c in row] for row in choices]
    encoded = [Encoded(ids=prompt_ids(tok, p)) for p in prompts]
    out: list[list[float] | None] = [None] * len(prompts)
    for idx in _by_length([e.ids for e in encoded], batch_size):
        batch = collate([encoded[i] for i in idx], tok.pad_token_id)   # right padding: positions as the bot's
        mask = batch["attention_mask"].to(device)
        hidden = decoder(input_ids=batch["input_ids"].to(device), attention_mask=mask,
                         use_cache=False).last_hidden_state
        logits = head(hidden[torch.arange(len(idx), device=device), mask.sum(dim=1) - 1]).float()
        for row, i in enumerate(idx):
            if len(set(firsts[i])) == len(firsts[i]):
                out[i] = logits[row, firsts[i]].softmax(-1).tolist()
    return out
