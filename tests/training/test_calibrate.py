"""Label offsets (training/calibrate.py): the fit, how the bot's decision uses them, and the folder rewrite."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from bot.adapters import validate_adapter
from bot.errors import AdapterError, DataError
from bot.skills import SentimentFormat
from tests.training.test_train import config, sentiment_file, write_jsonl
from training import tasks
from training.calibrate import fit_offsets, macro_recall
from training.cli import main

LABELS = ("negative", "neutral", "positive")


def test_offsets_recover_an_under_predicted_label() -> None:
    # Neutral examples score neutral second: without a correction no neutral is ever recalled.
    probs = [[0.7, 0.2, 0.1]] * 30 + [[0.40, 0.35, 0.25]] * 30 + [[0.1, 0.2, 0.7]] * 30
    gold = ["negative"] * 30 + ["neutral"] * 30 + ["positive"] * 30
    rows = [[math.log(p) for p in row] for row in probs]
    index = [LABELS.index(g) for g in gold]
    assert macro_recall(rows, index, [0, 0, 0]) == pytest.approx(200 / 3)
    offsets = fit_offsets([(LABELS, probs, gold)], LABELS)
    assert offsets["negative"] == 0 and offsets["neutral"] > 0
    assert macro_recall(rows, index, [offsets[x] for x in LABELS]) == 100
    decided = [SentimentFormat.result(dict(zip(LABELS, p, strict=True)), offsets).label for p in probs]
    assert decided == gold


def test_offsets_stay_zero_when_nothing_needs_correcting() -> None:
    probs = [[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]] * 5
    gold = list(LABELS) * 5
    two = [[0.9, 0.1], [0.2, 0.8]] * 5
    assert fit_offsets([(LABELS, probs, gold), (("negative", "positive"), two, ["negative", "positive"] * 5)],
                       LABELS) == dict.fromkeys(LABELS, 0.0)


def test_result_renormalises_with_offsets() -> None:
    plain = SentimentFormat.result({"negative": 0.5, "neutral": 0.3, "positive": 0.2})
    assert plain.label == "negative" and plain.scores["negative"] == 0.5
    moved = SentimentFormat.result({"negative": 0.5, "neutral": 0.3, "positive": 0.2}, {"neutral": 1.0})
    assert moved.label == "neutral" and sum(moved.scores.values()) == pytest.approx(1)
    assert moved.scores["neutral"] == pytest.approx(0.3 * math.e / (0.5 + 0.3 * math.e + 0.2))


@pytest.mark.parametrize(("offsets", "reason"), [
    ({"joy": 1.0}, "does not have: joy"),
    ({"neutral": "high"}, "must be a number"),
    ({"neutral": True}, "must be a number"),
    ({"neutral": 1e9}, "must be a number between"),
    (["neutral", 1.0], "must be an object"),
])
def test_bad_label_offsets_are_refused_with_the_reason(tiny_adapters: Path, tmp_path: Path, offsets,
                                                       reason: str) -> None:
    folder = shutil.copytree(tiny_adapters / "sentiment", tmp_path / "sentiment")  # the fixture is shared
    manifest = json.loads((folder / "lorabot.json").read_text())
    (folder / "lorabot.json").write_text(json.dumps(manifest | {"label_offsets": offsets}))
    with pytest.raises(AdapterError, match=reason):
        validate_adapter(folder)


def test_calibration_data_fits_offsets_at_the_end_of_training_and_again_on_demand(
        tiny_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = sentiment_file(tmp_path / "train.jsonl", repeat=2)
    dev = write_jsonl(tmp_path / "sst.jsonl", [{"text": "good", "label": "positive"},
                                               {"text": "bad", "label": "negative"}])
    calib = sentiment_file(tmp_path / "calib.jsonl", repeat=3)
    cfg = config("sentiment", tiny_base, tmp_path, data, dev, "train.max_steps=2",
                 f'data.calibrate=["{calib}"]')
    out = tasks.sentiment(cfg, tmp_path / "adapters" / "mood")
    info = validate_adapter(out)
    metrics = json.loads((out / "metrics.json").read_text())
    report = metrics["calibration"]
    assert set(report["offsets"]) == set(LABELS) and report["fit"]["calib"]["n"] == 18
    assert info.label_offsets == report["offsets"]
    # The fit never makes its own data worse, and the card's scores are the ones with offsets.
    assert report["fit"]["calib"]["macro_recall_after"] >= report["fit"]["calib"]["macro_recall_before"]
    assert metrics["dev"]["sst"] == report["dev"]["sst"]
    # Dev is scored once, with the offsets: the run's predictions file is that pass, decided as the bot decides.
    (written,) = tmp_path.rglob("predictions-sst.jsonl")
    rows = [json.loads(line) for line in written.read_text().splitlines()]
    assert [r["gold"] for r in rows] == ["positive", "negative"]
    assert 100 * sum(r["correct"] for r in rows) / len(rows) == report["dev"]["sst"]["accuracy"]
    manifest = json.loads((out / "lorabot.json").read_text())
    assert manifest["dev_scores"]["sst"] == report["dev"]["sst"]["accuracy"]
    card = (out / "README.md").read_text()
    assert "## Label offsets" in card and "calib (fit)" in card and "calibration: all" in card

    # `lorabot calibrate` refits from the folder's own recipe.toml: the same data, the same offsets.
    (out / "lorabot.json").write_text(json.dumps(manifest | {"label_offsets": {}}))
    assert main(["calibrate", str(out), "--base", str(tiny_base)]) == 0
    assert "label offsets" in capsys.readouterr().out
    assert validate_adapter(out).label_offsets == report["offsets"]


def test_calibration_data_is_for_sentiment_only(tiny_base: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "qa.jsonl", [{"id": "1", "context": "Sky is blue.", "question": "Colour?",
                                                "answers": [{"text": "blue", "answer_start": 7}]}])
    cfg = config("qa", tiny_base, tmp_path, data, None, f'data.calibrate=["{data}"]')
    with pytest.raises(DataError, match="label offsets are for sentiment"):
        tasks.qa(cfg, tmp_path / "adapters" / "q")
