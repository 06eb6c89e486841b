from __future__ import annotations

import dataclasses
import hashlib
import tomllib
from pathlib import Path

import pytest

from bot.errors import ConfigError
from training.config import (
    DataSpec,
    LoraSettings,
    TrainConfig,
    default_config,
    fingerprint,
    load_config,
    parse_value,
    replace,
    to_toml,
)

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "training" / "recipes"

# sha256 of each shipped recipe's fingerprint, computed with the dict-based configuration before it became
# dataclasses: a checkpoint or adapter made then must still match. A recipe edit that changes what is trained
# (data, LoRA, batch, length, lr...) changes its fingerprint by design: update its digest with it.
FINGERPRINTS = {
    "ner": "d7da2369d0d2ac1ff7361985dc2b19ceed11c70e2d9972f6a4bbd4726b853cb8",   # stage 2 (2026-12-02)
    "ner_first": "1e5d4c74f595ffcb5145b2e8c5735d1c5725197bd231add96818f352047b84fd",
    "ner_third": "4c5c51e62d27975b6f80fbd9d62031e5466741a665d0ef13d020ab9760d56c2e",   # measured, not shipped
    "qa": "928cd58d4481ae1e5c7fdb43d61e59837b014e654d279aaf0408776c8003d711",   # stage 5 (2026-12-03)
    "qa_first": "df7901d63e48175d41adc6a9ceb28535c5e2eaabf12d069c27af14ac53e80f10",
    "qa_second": "207dc221ec13858b42105d5986988306e2ef13cb4221a120ba4f146a10f9224d",
    "qa_third": "89ab0cab84353f82eef05d7cd139e8d79b03a8fb6ffd1d144668809f2b292114",
    "qa_fourth": "acf034b409de71deb48fffeec361702e030aec8705d83c25d8d3ed411c726430",
    "qa_sixth": "3c0773458c185c850a9739732e61d93ab5c3a2e2650c15dcbd6b4748d51b2cb4",   # measured, not shipped
    "sentiment": "2e812fb2e495fc6395e7d54e3e5772cc44a80c89cec79bf19201fc6d51cde985",
    "sentiment_second": "0184f89b888e8af2392f2840ac31788800cfed6ce906b0176f018a803be78121",   # measured, not shipped
    "story": "dcd3b112cc59aaca2c47d8ca76dd233d548dde886531583b09af633dcac194c9",   # themes = true (2026-12-02)
}
DEFAULT_FINGERPRINT = (
    '{"base": "bundled", "data": {"dev": [], "train": []}, "labels": [], "lora": {"alpha": 32, "dropout": 0.0, '
    '"r": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}, '
    '"seed": 1234, "task": "", "train": {"batch_size": 16, "epochs": 1, "lr": 0.0003, "max_length": 256, '
    '"max_steps": 0}}'
)


def problems(*sets: str, recipe: Path | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(recipe, list(sets))
    return info.value.problems


def test_recipe_and_overrides(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text('task = "qa"\n[train]\nlr = 1e-4\nepochs = 2\n[data]\ntrain = ["a.jsonl", '
                      '{path = "b.jsonl", limit = 10}]\n', encoding="utf-8")
    config = load_config(recipe, ["train.lr=5e-5", "lora.r=8", "description=hello world", "train.trace=true"])
    assert isinstance(config, TrainConfig) and isinstance(config.lora, LoraSettings)
    assert config.task == "qa" and config.train.epochs == 2
    assert config.train.lr == 5e-5 and config.lora.r == 8 and config.train.trace is True
    assert config.description == "hello world"
    assert config.data.train == (DataSpec("a.jsonl"), DataSpec("b.jsonl", limit=10, keys=("path", "limit")))
    assert config.train.batch_size == default_config().train.batch_size
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.train.lr = 1.0  # type: ignore[misc]


def test_every_problem_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train.lr=fast", "train.bogus=1", "lora=3", "nokey", "task=poetry",
                           'data.train=[{path = "x", limit = "ten"}]'])
    text = str(info.value)
    assert text.startswith("defaults + --set: 6 problem(s):")
    for words in ("train.lr: expected float", "train.bogus: unknown key", "lora: expected a table",
                  "expected key=value", "task: 'poetry'", "data.train[0].limit"):
        assert words in text


def test_unknown_keys_are_refused_with_file_and_dotted_key(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('bogus = 1\n[train]\nlearning_rate = 1e-4\n[data]\ntrain = [{ path = "a", limt = 5 }]\n'
                      "[extra]\nx = 1\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(recipe)
    assert info.value.path == str(recipe)
    found = info.value.problems
    assert found[0].startswith("bogus: unknown key (known: task, base, seed,")
    assert found[1].startswith("train.learning_rate: unknown key (known: epochs, max_steps,")
    assert found[2].startswith("extra: unknown key")
    assert found[3].startswith("data.train[0].limt: unknown key (known: path, limit, skip,")
    assert len(found) == 4
    assert problems("eval.lr=1", recipe=None)[0].startswith("eval.lr: unknown key")
    with pytest.raises(ConfigError) as info:
        load_config(RECIPES / "qa.toml", ["lora.rank=4"])
    assert info.value.path == f"{RECIPES / 'qa.toml'} + --set"


def test_several_problems_at_once() -> None:
    found = problems("train.batch_size=0", "train.threads=-1", 'train.dtype="f16"', "lora.r=0",
                     "lora.target_modules=[]", "labels=['', 3]", 'data.dev=[3, {path="a", part="x", holdout=1}]')
    assert found == [
        "data.dev[0]: expected a path or a table with a path",
        "data.dev[1].part: 'train' or 'holdout'",
        "data.dev[1].holdout: a fraction in [0, 1)",
        "train.batch_size: must be at least 1",
        "train.threads: must not be negative",
        "train.dtype: auto, float32 or bfloat16",
        "lora.r: must be at least 1",
        "lora.target_modules: a non-empty list of linear module names",
        "labels: a list of non-empty strings",
    ]


def test_wrong_types_are_refused() -> None:
    found = problems("train.lr=true", "train.epochs=1.5", "train.trace=1", 'eval.base="yes"', "seed=1.0",
                     "labels=3", "data=[]", "train.lr.x=1", "lora.alpha=16.5",
                     'data.train=[{path="a", limit=true, holdout="x", balance=1}]')
    assert found == [
        "train.lr: expected float, got True",
        "train.epochs: expected int, got 1.5",
        "train.trace: expected bool, got 1",
        "eval.base: expected bool, got 'yes'",
        "seed: expected int, got 1.0",
        "labels: expected list, got 3",
        "data: expected a table",
        "train.lr: expected float, got {'x': 1}",
        "lora.alpha: expected int, got 16.5",
        "data.train[0].limit: expected int, got True",
        "data.train[0].holdout: expected float, got 'x'",
        "data.train[0].balance: expected bool, got 1",
    ]
    # An integer where a float is expected is a number all the same (and is held as a float).
    assert load_config(None, ["train.lr=1", "lora.dropout=0"]).train.lr == 1.0


def test_bad_recipe_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("task = \n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "missing.toml")


def test_toml_round_trip(tmp_path: Path) -> None:
    config = load_config(None, ['data.train=["a.jsonl", {path = "b \\"q\\".jsonl", holdout = 0.15}]',
                                'data.dev=[{limit = 3, path = "d", holdout = 0}]', "train.lr=3e-4",
                                'description="é \\n x"', "labels=['x', 'y']"])
    text = to_toml(config)
    assert tomllib.loads(text) == config.to_dict()
    # Each data entry is written back as the recipe wrote it: bare path or table, its keys in order.
    assert 'train = ["a.jsonl", { path = "b \\"q\\".jsonl", holdout = 0.15 }]' in text
    assert 'dev = [{ limit = 3, path = "d", holdout = 0 }]' in text
    (tmp_path / "again.toml").write_text(text, encoding="utf-8")
    assert load_config(tmp_path / "again.toml") == config
    assert parse_value("3e-4") == 3e-4 and parse_value("some words") == "some words"


@pytest.mark.parametrize("name", sorted(FINGERPRINTS))
def test_shipped_recipes_round_trip_and_keep_their_fingerprints(name: str, tmp_path: Path) -> None:
    config = load_config(RECIPES / f"{name}.toml")
    assert hashlib.sha256(fingerprint(config).encode()).hexdigest() == FINGERPRINTS[name]
    (tmp_path / "recipe.toml").write_text(to_toml(config), encoding="utf-8")
    again = load_config(tmp_path / "recipe.toml")
    assert again == config and to_toml(again) == to_toml(config)
    assert fingerprint(tomllib.loads(to_toml(config))) == fingerprint(config)


def test_fingerprint_of_defaults_and_older_recipes() -> None:
    assert fingerprint(default_config()) == DEFAULT_FINGERPRINT
    # A recipe.toml written before train.keep_best / best_of / init_adapter existed, read back as a mapping
    # (make_all does): the same fingerprint as the configuration it resolves to.
    older = default_config().to_dict()
    for key in ("keep_best", "best_of", "init_adapter"):
        del older["train"][key]
    assert fingerprint(older) == DEFAULT_FINGERPRINT
    changed = load_config(None, ["train.keep_best=true", 'train.best_of="d"', 'train.init_adapter="a"'])
    expected = DEFAULT_FINGERPRINT.replace('"epochs"', '"best_of": "d", "epochs"')
    assert fingerprint(changed) == expected.replace('"lr"', '"init_adapter": "a", "keep_best": true, "lr"')


@pytest.mark.parametrize("name", ["sentiment", "ner", "qa", "story"])
def test_shipped_adapters_recipes_still_match(name: str) -> None:
    """The recipe.toml inside each shipped adapter (older: some keys missing) fingerprints as before."""
    path = REPO / "adapters" / name / "recipe.toml"
    if not path.is_file():
        pytest.skip(f"no {path}")
    plain = tomllib.loads(path.read_text(encoding="utf-8"))
    assert fingerprint(load_config(path)) == fingerprint(plain) == fingerprint(load_config(RECIPES / f"{name}.toml"))


def test_fingerprint_ignores_eval_settings() -> None:
    a = load_config(None, ["eval.limit=5", "train.checkpoint_every=3"])
    assert fingerprint(a) == fingerprint(default_config())
    assert fingerprint(load_config(None, ["train.lr=1e-3"])) != fingerprint(default_config())


def test_replace_validates_like_a_recipe() -> None:
    config = replace(default_config(), task="qa", data={"train": ["a.jsonl"]}, train={"lr": 1})
    assert config.task == "qa" and config.data.train == (DataSpec("a.jsonl"),) and config.train.lr == 1.0
    assert config.data.dev == () and config.train.epochs == 1
    with pytest.raises(ConfigError) as info:
        replace(config, train={"lr": "fast", "nope": 1})
    assert info.value.problems[0] == "train.lr: expected float, got 'fast'"
    assert info.value.problems[1].startswith("train.nope: unknown key")


def test_data_spec_written_form() -> None:
    assert DataSpec("a").written() == "a"
    assert DataSpec("a", keys=("path",)).written() == {"path": "a"}
    # Options set in code are written even when the recipe's table did not name them.
    assert DataSpec("a", limit=5).written() == {"path": "a", "limit": 5}
    assert dataclasses.replace(DataSpec("a", skip=2, keys=("skip", "path")), holdout=0.1).written() == {
        "skip": 2, "path": "a", "holdout": 0.1}


def test_train_command_applies_flags_over_the_recipe(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from training import tasks
    from training.cli import main

    seen: list[TrainConfig] = []
    monkeypatch.setitem(tasks.TRAIN, "qa", lambda config, out, resume=False: seen.append(config))
    out = str(tmp_path / "adapters" / "x")
    assert main(["train", "qa", "--config", str(RECIPES / "qa.toml"), "--data", "x.jsonl", "--out", out,
                 "--base", "some/model", "--set", "train.lr=1e-5"]) == 0
    (config,) = seen
    recipe = load_config(RECIPES / "qa.toml")
    assert config.data.train == (DataSpec("x.jsonl"),) and config.data.dev == recipe.data.dev
    assert config.base == "some/model" and config.train.lr == 1e-5 and config.task == "qa"
    assert main(["train", "ner", "--config", str(RECIPES / "qa.toml"), "--out", out]) == 2
    assert "the recipe is for 'qa', not 'ner'" in capsys.readouterr().err
