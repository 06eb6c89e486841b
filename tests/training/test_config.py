from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from bot.errors import ConfigError
from training.config import default_config, fingerprint, load_config, parse_value, to_toml


def test_recipe_and_overrides(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text('task = "qa"\n[train]\nlr = 1e-4\nepochs = 2\n[data]\ntrain = ["a.jsonl", '
                      '{path = "b.jsonl", limit = 10}]\n', encoding="utf-8")
    config = load_config(recipe, ["train.lr=5e-5", "lora.r=8", "description=hello world", "train.trace=true"])
    assert config["task"] == "qa" and config["train"]["epochs"] == 2
    assert config["train"]["lr"] == 5e-5 and config["lora"]["r"] == 8 and config["train"]["trace"] is True
    assert config["description"] == "hello world"
    assert config["data"]["train"][1] == {"path": "b.jsonl", "limit": 10}
    assert config["train"]["batch_size"] == default_config()["train"]["batch_size"]


def test_every_problem_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.lr=fast", "train.bogus=1", "lora=3", "nokey", "task=poetry",
                           'data.train=[{path = "x", limit = "ten"}]'])
    text = str(info.value)
    for words in ("train.lr: expected float", "train.bogus: unknown key", "lora: expected a table",
                  "expected key=value", "task: 'poetry'", "data.train[0].limit"):
        assert words in text


def test_bad_recipe_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("task = \n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "missing.toml")


def test_toml_round_trip() -> None:
    config = load_config(None, ['data.train=["a.jsonl", {path = "b \\"q\\".jsonl", holdout = 0.15}]',
                                "train.lr=3e-4", 'description="é \\n x"'])
    assert tomllib.loads(to_toml(config)) == config
    assert parse_value("3e-4") == 3e-4 and parse_value("some words") == "some words"


def test_fingerprint_ignores_eval_settings() -> None:
    a = load_config(None, ["eval.limit=5", "train.checkpoint_every=3"])
    assert fingerprint(a) == fingerprint(default_config())
    assert fingerprint(load_config(None, ["train.lr=1e-3"])) != fingerprint(default_config())
