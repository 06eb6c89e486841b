"""The shipped adapters' measured scores as one Markdown table, made from their ``metrics.json`` files.

    python -m training.report                 # print the table
    python -m training.report --readme README.md   # rewrite the README's table in place

The README's "Adapter scores" table is this output (a test checks it), so it cannot drift from the cards.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from training.evaluate import PRIMARY

START, END = "<!-- scores:start -->", "<!-- scores:end -->"
SHOWN = {"sentiment": ("accuracy", "macro_recall"), "ner": ("f1", "precision", "recall"), "qa": ("f1", "exact_match"),
         "story": ("perplexity", "theme_adherence")}
NAMES = {"macro_recall": "macro-recall", "exact_match": "exact match", "f1": "F1",
         "theme_adherence": "theme adherence %"}


def _num(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else "—" if value is None else str(value)


def _continued(init: dict[str, Any] | None) -> str:
    """A continued run's cost is not the whole cost: name the stage before it and what that took."""
    if not init:
        return ""
    read = init.get("read", init.get("examples"))
    before = (f": {read:,} examples, {init['steps']:,} steps, {init['time_s'] / 60:.0f} min"
              if "time_s" in init else "")
    return f", continuing `{Path(init['path']).name}`{before}" + _continued(init.get("init_adapter"))


def table(adapters_dir: Path) -> str:
    lines = ["| adapter | dev data (examples) | metric | adapter | base model | training on this CPU |",
             "|---|---|---|---:|---:|---|"]
    for metrics_file in sorted(adapters_dir.glob("*/metrics.json")):
        m = json.loads(metrics_file.read_text(encoding="utf-8"))
        task, train = m["task"], m["train"]
        cost = (f"{train['read']:,} examples, {train['steps']:,} steps, {train['time_s'] / 60:.0f} min "
                f"({train['processes']}×{train['threads']} thread{'s' if train['threads'] > 1 else ''})"
                + _continued(train.get("init_adapter")))
        for data, scores in m["dev"].items():
            for key in SHOWN.get(task, (PRIMARY[task],)):
                if key not in scores:   # e.g. theme adherence: scored on the first dev file only
                    continue
                base = m.get("base", {}).get(data, {}).get(key)
                lines.append(f"| {metrics_file.parent.name} | {data} ({scores.get('n', '?')}) | {NAMES.get(key, key)} "
                             f"| {_num(scores.get(key))} | {_num(base)} | {cost} |")
                cost = ""
    return "\n".join(lines)


def update_readme(readme: Path, text: str) -> bool:
    """Replace what stands between the markers; True when the file changed."""
    content = readme.read_text(encoding="utf-8")
    head, sep, rest = content.partition(START)
    _, sep2, tail = rest.partition(END)
    if not sep or not sep2:
        raise SystemExit(f"{readme}: no {START} ... {END} markers")
    new = f"{head}{START}\n{text}\n{END}{tail}"
    if new != content:
        readme.write_text(new, encoding="utf-8")
    return new != content


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=Path, default=Path("adapters"))
    parser.add_argument("--readme", type=Path, help="rewrite this file's table between the score markers")
    args = parser.parse_args(argv)
    text = table(args.adapters)
    if args.readme:
        print(f"{args.readme}: {'updated' if update_readme(args.readme, text) else 'already up to date'}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
