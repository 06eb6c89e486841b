"""The shipped recipes resolve, and their data files read cleanly where ../shared is present."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import shared_data
from training.config import load_config
from training.recipes import make_all

RECIPES = Path(make_all.__file__).parent


@pytest.mark.parametrize("name", [*make_all.SHIPPED, "qa_first", "qa_second", "qa_third", "qa_fourth", "qa_sixth",
                                  "ner_first", "ner_third",
                                  "sentiment_second"])
def test_recipe_resolves(name: str) -> None:
    config = load_config(RECIPES / f"{name}.toml")
    # An adapter is named after its task, except the domain one, named after its domain.
    assert config.task == {"medical": "domain"}.get(name, name.split("_")[0])
    specs = config.data.train + config.data.dev
    assert specs and all(s.path.startswith("../shared/data/") for s in specs)


def test_qa_recipe_holds_out_disjoint_paragraphs() -> None:
    from training.data import load

    config = load_config(RECIPES / "qa.toml")
    (train_spec, *_), (dev_spec,) = config.data.train, config.data.dev
    path = shared_data("qa/squad_v1.1_dev_shared.jsonl")
    whole_train = replace(train_spec, path=str(path), limit=0, skip=0)
    train = load("qa", whole_train, (), seed=config.seed)
    dev = load("qa", replace(dev_spec, path=str(path)), (), seed=config.seed)
    assert not {e.context for e in train} & {e.context for e in dev}
    assert 0.1 < len(dev) / (len(train) + len(dev)) < 0.2


def test_ner_recipe_holds_out_whole_documents_it_never_trains_on() -> None:
    from training.data import load

    config = load_config(RECIPES / "ner.toml")
    dev_in_train = [s for s in config.data.train if "conll2003_dev" in s.path]
    (dev_spec,) = config.data.dev
    path = shared_data("ner/conll2003_dev.txt")
    train = load("ner", replace(dev_in_train[0], path=str(path)), (), seed=config.seed)
    held = load("ner", replace(dev_spec, path=str(path)), (), seed=config.seed)
    assert not {e.doc for e in train} & {e.doc for e in held}
    assert len(train) + len(held) == 3250 and 900 < len(held) < 1100
    assert make_all.STAGES["ner"] == ("ner_first", "ner")
    assert config.train.init_adapter == "runs/adapters/ner_first" and not config.train.keep_best
    third = load_config(RECIPES / "ner_third.toml")        # measured, not shipped: the same data drawn afresh
    assert third.data == config.data and third.seed != config.seed
    assert third.train.init_adapter == "runs/adapters/ner_second" and third.lora == config.lora


def test_the_measured_sentiment_stage_two_trained_only_what_the_shipped_recipe_left_out() -> None:
    first, second = (load_config(RECIPES / f"{name}.toml") for name in ("sentiment", "sentiment_second"))
    assert second.train.init_adapter == "runs/adapters/sentiment_first" and first.seed == second.seed
    for before, after in zip(first.data.train, second.data.train, strict=True):
        assert (after.path, after.skip, after.balance, after.min_words, after.holdout) == (
            before.path, before.limit, before.balance, before.min_words, before.holdout)
    assert first.data.dev == second.data.dev and first.lora == second.lora


def test_make_all_dry_run(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(Path.cwd())  # make_all changes to the repository root; restored afterwards
    assert make_all.main(["--dry-run", "--force", "sentiment"]) == 0
    out = capsys.readouterr().out
    assert "-m training train sentiment --config" in out and "--resume" in out


def test_make_all_trains_qa_in_stages(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(Path.cwd())
    assert make_all.main(["--dry-run", "--force", "qa"]) == 0
    commands = [line for line in capsys.readouterr().out.splitlines() if line.startswith("$ ")]
    first, second, third, fourth, fifth = commands
    assert "train qa --config" in first and "qa_first.toml --out runs/adapters/qa_first" in first
    assert "qa_second.toml --out runs/adapters/qa_second" in second
    assert "qa_third.toml --out runs/adapters/qa_third" in third
    assert "qa_fourth.toml --out runs/adapters/qa_fourth" in fourth
    assert "qa.toml --out adapters/qa" in fifth
    # Each stage starts from the one before; stage 2 trains exactly the questions stage 1 left out.
    stages = [load_config(RECIPES / f"{name}.toml") for name in make_all.STAGES["qa"]]
    stage1, stage2, stage3, stage4, stage5 = stages
    assert stage2.train.init_adapter == "runs/adapters/qa_first"
    assert stage3.train.init_adapter == "runs/adapters/qa_second"
    assert stage4.train.init_adapter == "runs/adapters/qa_third"
    assert stage5.train.init_adapter == "runs/adapters/qa_fourth"
    assert stage2.data.train[0].skip == stage1.data.train[0].limit
    assert stage1.seed == stage2.seed
    # Later passes draw their questions afresh; every stage has the same LoRA shape and the same holdout.
    assert len({s.seed for s in stages[1:]}) == 4
    # The measured sixth stage (not shipped): two halves of different questions, the reordered ones those
    # the plain half left out.
    sixth = load_config(RECIPES / "qa_sixth.toml")
    plain, reordered = sixth.data.train
    assert reordered.skip == plain.limit and reordered.shuffle_sentences and not plain.shuffle_sentences
    assert sixth.train.init_adapter == "runs/adapters/qa_fifth" and sixth.lora == stage5.lora
    assert all(s.lora == stage1.lora and s.data.dev == stage1.data.dev for s in stages)
