"""Hand-written examples in the README's spirit (its own sentences, well-known people, places and
companies, a QA example per common question word, stories on a theme), run through the bot exactly as a
user would send them: ``python -m training.canonical``. Every one must come out right with the shipped
adapters; the per-example results say which do not.

sentiment: the label; ner: exactly the expected (text, type) entities; qa: the answer contains the
expected phrase and is quoted from the text; story: every expected word appears (as /story writes it,
greedy for the check).
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

EXAMPLES = Path(__file__).with_name("canonical_examples.jsonl")


def load(path: Path = EXAMPLES) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def check(example: dict[str, Any], result: dict[str, Any]) -> bool:
    from training.evaluate import mentions, squad_normalize

    expect = example["expect"]
    if example["skill"] == "sentiment":
        return result.get("label") == expect
    if example["skill"] == "ner":
        found = sorted((e["text"], e["type"]) for e in result.get("entities", []))
        return found == sorted(tuple(e) for e in expect)
    if example["skill"] == "qa":
        answer = result.get("answer", "")
        return result.get("start") is not None and squad_normalize(expect) in squad_normalize(answer)
    return all(mentions(result.get("text", ""), word) for word in expect)


async def run(config: Any) -> list[dict[str, Any]]:
    """Each example with the bot's structured result and whether it is right."""
    from bot.app import open_app
    from bot.ask import ask

    out = []
    async with open_app(config, progress=False) as app:
        for n, example in enumerate(load()):
            reply = await ask(app.core, example["skill"], example["text"], context=example.get("context"),
                              platform="canonical", chat_id=str(n), user_id="checker")
            result = reply.to_json() if reply else {}
            out.append({**example, "result": result, "ok": check(example, result)})
    return out


def main() -> int:
    import tempfile

    from bot.config import load_config, replace

    with tempfile.TemporaryDirectory() as tmp:
        # Greedy stories, so the check is repeatable; a throwaway log; no rate limit for 21 quick messages.
        config = replace(load_config(None), story={"temperature": 0.0}, store={"path": f"{tmp}/log.db"},
                         access={"rate_limit_per_minute": 0})
        results = asyncio.run(run(config))
    for r in results:
        print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['skill']:9} {r['text'][:60]!r} -> {json.dumps(r['result'])[:150]}")
    bad = sum(not r["ok"] for r in results)
    print(f"{len(results) - bad} of {len(results)} right")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
