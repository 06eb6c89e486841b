"""The README's adapter score table is made from the adapters' metrics.json files and stays equal to them."""

from __future__ import annotations

import json
from pathlib import Path

from training.report import END, START, table, update_readme

REPO = Path(__file__).resolve().parents[2]


def test_the_readme_table_is_the_adapters_measured_scores() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split(START, 1)[1].split(END, 1)[0].strip()
    assert section == table(REPO / "adapters"), "run: python -m training.report --readme README.md"


def test_table_rows_and_readme_rewrite(tmp_path: Path) -> None:
    folder = tmp_path / "adapters" / "mood"
    folder.mkdir(parents=True)
    metrics = {"task": "sentiment", "dev": {"sst2_dev": {"accuracy": 91.25, "macro_recall": 90.5, "n": 436}},
               "base": {"sst2_dev": {"accuracy": 55.0, "macro_recall": 54.0, "n": 436}},
               "train": {"read": 15000, "steps": 938, "time_s": 3000.0, "processes": 1, "threads": 1}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    text = table(tmp_path / "adapters")
    cost = "15,000 examples, 938 steps, 50 min (1×1 thread)"
    assert f"| mood | sst2_dev (436) | accuracy | 91.25 | 55.00 | {cost} |" in text
    assert "| mood | sst2_dev (436) | macro-recall | 90.50 | 54.00 |  |" in text
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{START}\nold\n{END}\nafter\n")
    assert update_readme(readme, text) and not update_readme(readme, text)
    assert readme.read_text() == f"# x\n{START}\n{text}\n{END}\nafter\n"


def test_a_continued_adapter_shows_the_stages_before(tmp_path: Path) -> None:
    folder = tmp_path / "adapters" / "qa"
    folder.mkdir(parents=True)
    first = {"path": "runs/adapters/qa_first", "read": 4000, "examples": 3971, "steps": 497, "time_s": 5220.0}
    init = {"path": "runs/adapters/qa_second", "read": 3205, "examples": 3190, "steps": 397, "time_s": 4560.0,
            "init_adapter": first}
    metrics = {"task": "qa", "dev": {"holdout": {"f1": 71.5, "exact_match": 60.25, "n": 400}}, "base": {},
               "train": {"read": 3205, "steps": 397, "time_s": 4200.0, "processes": 1, "threads": 2,
                         "init_adapter": init}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    assert ("| qa | holdout (400) | F1 | 71.50 | — | 3,205 examples, 397 steps, 70 min (1×2 threads), "
            "continuing `qa_second`: 3,205 examples, 397 steps, 76 min, continuing `qa_first`: 4,000 examples, "
            "497 steps, 87 min |") in table(tmp_path / "adapters")
