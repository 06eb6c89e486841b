"""Completions of the same prompts by the bare base model and by a domain adapter, written into the
adapter's model card (between markers, so running it again replaces them):

    python -m training.domain_samples adapters/medical

Greedy, through the bot's own engine (what ``/compare medical <text>`` shows), so the card shows what
a user of the bot sees.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

PROMPTS = (
    "The patient was treated with",
    "Patients with type 2 diabetes",
    "In this randomized controlled trial, we",
)
START, END = "<!-- samples:start -->", "<!-- samples:end -->"


async def completions(adapter: str, max_new_tokens: int) -> list[tuple[str, str, str]]:
    from bot.config import load_config
    from bot.engine import SamplingParams
    from bot.engine.scheduler import LocalEngine

    engine = LocalEngine.from_config(load_config(None), progress=False)
    try:
        params = SamplingParams(max_new_tokens=max_new_tokens, repetition_penalty=1.1)
        out = []
        for prompt in PROMPTS:
            base = await engine.generate(prompt, params, None)
            tuned = await engine.generate(prompt, params, adapter)
            out.append((prompt, base.text, tuned.text))
        return out
    finally:
        await engine.close()


def section(rows: list[tuple[str, str, str]], max_new_tokens: int) -> str:
    lines = [START, "## The same prompts, base model and adapter", "",
             f"Greedy (repetition penalty 1.1), {max_new_tokens} new tokens, through the bot's engine "
             "(`/compare medical <text>` in the bot).", ""]
    for prompt, base, tuned in rows:
        one = lambda s: " ".join(s.split())  # noqa: E731
        lines += [f"**{prompt}** …", "", f"- base model: …{one(base)}", f"- adapter: …{one(tuned)}", ""]
    return "\n".join([*lines, END])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", type=Path, help="the adapter folder (in the bot's adapters directory)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    rows = asyncio.run(completions(args.adapter.name, args.max_new_tokens))
    card = args.adapter / "README.md"
    text = card.read_text(encoding="utf-8")
    block = section(rows, args.max_new_tokens)
    if START in text and END in text:
        text = text[: text.index(START)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    card.write_text(text, encoding="utf-8")
    print(block)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
