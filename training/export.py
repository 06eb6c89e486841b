"""``lorabot export``: the bot's conversation log -> chat training data (JSONL of {"messages": [...]}).

Also the atomic JSONL writer that ``lorabot eval --predictions`` uses.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def export_chat(db: Path, out: Path, *, only_positive_feedback: bool = False) -> int:
    """Write the exported conversations to ``out`` (replaced atomically); returns how many were written."""
    from bot.store import Store  # the store owns the schema and the selection of turns

    # Read-only: exporting must never migrate or otherwise touch the bot's live database.
    with Store.open(db, read_only=True) as store:
        return write_jsonl(out, store.export_chat_examples(only_positive_feedback=only_positive_feedback))


def write_jsonl(out: Path, records: Iterable[dict[str, Any]]) -> int:
    """Write one JSON object per line to ``out``, replacing it only once all are written; returns the count."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    count = 0
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                count += 1
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return count
