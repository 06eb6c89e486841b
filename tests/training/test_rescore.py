"""``python -m training.rescore``: a trained adapter's dev sets scored again with the current decoding, and
its metrics, manifest and card rewritten (the QA order check, with the tiny random model)."""

from __future__ import annotations

import json
from pathlib import Path

from bot.adapters import validate_adapter
from tests.training.test_train import QA, config, write_jsonl
from training import tasks
from training.evaluate import evaluate
from training.model import load_adapter, load_base
from training.rescore import main


def test_rescore_rewrites_the_scores_with_the_order_check(tiny_base: Path, tmp_path: Path,
                                                          capsys) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", QA)
    cfg = config("qa", tiny_base, tmp_path, data, data, "train.max_steps=2", "eval.max_new_tokens=4")
    out = tasks.qa(cfg, tmp_path / "adapters" / "qa")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["dev"]["d"]["order_check"]["read_twice"] == 4      # training's final evaluation reads twice
    # Pretend the card came from one reading: rescore puts back what the bot does.
    metrics["dev"]["d"] = {"f1": -1.0, "exact_match": -1.0, "n": 4}
    (out / "metrics.json").write_text(json.dumps(metrics))
    card = out / "README.md"
    card.write_text(card.read_text().rstrip("\n") + "\n\n## Levers measured\n\n- by hand\n")
    assert main([str(out)]) == 0
    assert "order_check" in capsys.readouterr().out
    again = json.loads((out / "metrics.json").read_text())
    model, tok, _ = load_base(str(tiny_base))
    expected = evaluate("qa", load_adapter(model, out), tok, tasks.read_data(cfg, ())[1]["d"], max_new_tokens=4)
    assert again["dev"]["d"]["f1"] == expected["f1"] and again["base"] == metrics["base"]
    assert json.loads((out / "lorabot.json").read_text())["dev_scores"]["d"] == expected["f1"]
    text = card.read_text()
    assert "with the order check" in text and text.endswith("\n\n## Levers measured\n\n- by hand\n")
    assert text.startswith("# qa\n")            # the adapter's own name, from its manifest
    validate_adapter(out)
    assert main([str(tmp_path / "nowhere")]) == 2
