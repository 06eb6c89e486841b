"""``lorabot export``: the bot's conversation log -> chat training data (JSONL of {"messages": [...]})."""

from __future__ import annotations

import json
import os
from pathlib import Path


def export_chat(db: Path, out: Path, *, only_positive_feedback: bool = False) -> int:
    """Write the exported conversations to ``out`` (replaced atomically); returns how many were written."""
    from bot.store import Store  # the store owns the schema and the selection of turns

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    count = 0
    try:
        # Read-only: exporting must never migrate or otherwise touch the bot's live database.
        with Store.open(db, read_only=True) as store, tmp.open("w", encoding="utf-8") as f:
            for example in store.export_chat_examples(only_positive_feedback=only_positive_feedback):
                f.write(json.dumps(example, ensure_ascii=False) + "\n")
                count += 1
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return count
