"""Training, resume, atomic output and evaluation on the tiny random model (seconds each)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from bot.adapters import validate_adapter
from bot.errors import AdapterError
from training import tasks
from training import trainer as T
from training.cli import main
from training.config import TrainConfig, load_config, replace

SENTIMENT = [("a fine film", "positive"), ("dull and long", "negative"), ("it is a film", "neutral"),
             ("great fun", "positive"), ("awful acting", "negative"), ("the cast is big", "neutral")]
NER = [{"tokens": ["Peter", "lives", "in", "Bonn", "."], "tags": ["B-PER", "O", "O", "B-LOC", "O"]},
       {"tokens": ["EU", "rejects", "German", "call"], "tags": ["B-ORG", "O", "B-MISC", "O"]},
       {"tokens": ["Nothing", "here"], "tags": ["O", "O"]}]
QA = [{"id": str(i), "context": f"Room {i} is painted {c}. The door is {d}.", "question": f"What colour is room {i}?",
       "answers": [{"text": c, "answer_start": 0}]} for i, (c, d) in enumerate(
           [("red", "open"), ("blue", "shut"), ("green", "ajar"), ("white", "open")])]
STORY = [{"title": "A brave mouse", "text": "Once a mouse met a cat.\nIt ran away."},
         {"text": "Tom had a red ball. He played all day. Then he slept."}]
CHAT = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
        {"messages": [{"role": "system", "content": "Be short."}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "4"}]}]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def sentiment_file(path: Path, repeat: int = 4) -> Path:
    return write_jsonl(path, [{"text": t, "label": y} for t, y in SENTIMENT * repeat])


def config(task: str, base: Path, tmp_path: Path, train: Path, dev: Path | None = None, *sets: str) -> TrainConfig:
    cfg = load_config(None, [f'base="{base}"', f'train.run_dir="{tmp_path / "runs"}"', "train.batch_size=4",
                             "train.eval_every=0", "train.log_every=1", *sets])
    return replace(cfg, task=task, data={"train": [str(train)], "dev": [str(dev)] if dev else []})


def lora_weights(folder: Path) -> dict[str, Any]:
    return load_file(str(folder / "adapter_model.safetensors"))


def test_resume_continues_exactly(tiny_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = sentiment_file(tmp_path / "train.jsonl")
    sets = ("train.epochs=2", "train.checkpoint_every=2", "lora.dropout=0.2", "eval.base=false")
    straight = tasks.sentiment(config("sentiment", tiny_base, tmp_path / "a", data, None, *sets),
                               tmp_path / "a" / "sent")

    # Stop the second run right after its third checkpoint (step 6 of 12): nothing may be published.
    real_save, saves = T.save_checkpoint, []

    def save_then_stop(run: T.Run) -> None:
        real_save(run)
        saves.append(run.state.step)
        if len(saves) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(T, "save_checkpoint", save_then_stop)
    cfg = config("sentiment", tiny_base, tmp_path / "b", data, None, *sets)
    out = tmp_path / "b" / "sent"
    with pytest.raises(KeyboardInterrupt):
        tasks.sentiment(cfg, out)
    assert saves == [2, 4, 6] and not out.exists()
    assert json.loads((tmp_path / "b" / "runs" / "checkpoint" / "state.json").read_text())["step"] == 6
    assert not list((tmp_path / "b").glob(".*"))  # no staging folder either
    monkeypatch.setattr(T, "save_checkpoint", real_save)

    with pytest.raises(Exception, match="--resume"):
        tasks.sentiment(cfg, out)  # an existing checkpoint is never silently discarded
    tasks.sentiment(cfg, out, resume=True)
    a, b = lora_weights(straight), lora_weights(out)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    metrics = json.loads((out / "metrics.json").read_text())
    assert [s for s, _ in metrics["history"]["loss"]] == list(range(1, 13))
    assert not (tmp_path / "b" / "runs" / "checkpoint").exists()  # a finished run drops its checkpoint


def test_init_adapter_continues_from_its_weights(tiny_base: Path, tmp_path: Path) -> None:
    data = sentiment_file(tmp_path / "train.jsonl", repeat=2)
    first = tasks.sentiment(config("sentiment", tiny_base, tmp_path / "a", data, None, "train.max_steps=3",
                                   "eval.base=false"), tmp_path / "first")
    # A vanishing learning rate: the continued run must publish (almost exactly) the weights it started from,
    # where a fresh LoRA would publish zero lora_B matrices.
    sets = ("train.max_steps=1", "train.lr=1e-12", "eval.base=false", f'train.init_adapter="{first}"')
    out = tasks.sentiment(config("sentiment", tiny_base, tmp_path / "b", data, None, *sets), tmp_path / "second")
    a, b = lora_weights(first), lora_weights(out)
    assert a.keys() == b.keys() and any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)
    assert all(a[k].equal(b[k]) for k in a)
    metrics = json.loads((out / "metrics.json").read_text())
    init = metrics["train"]["init_adapter"]
    assert (init["path"], init["examples"], init["steps"]) == (str(first), 12, 3) and init["time_s"] > 0
    assert "started from the weights of" in (out / "README.md").read_text()
    # A third stage records the whole chain, so its card and the README table show every stage's cost.
    sets = ("train.max_steps=1", "eval.base=false", f'train.init_adapter="{out}"')
    third = tasks.sentiment(config("sentiment", tiny_base, tmp_path / "c", data, None, *sets), tmp_path / "third")
    chain = json.loads((third / "metrics.json").read_text())["train"]["init_adapter"]
    assert (chain["path"], chain["steps"], chain["init_adapter"]["path"]) == (str(out), 1, str(first))
    assert "init_adapter" not in chain["init_adapter"]
    assert "itself started from the weights of" not in (third / "README.md").read_text()
    assert f"itself started from `{first}` (12 examples, 3 steps" in (third / "README.md").read_text()


def test_init_adapter_must_match_the_run(tiny_base: Path, tmp_path: Path) -> None:
    data = sentiment_file(tmp_path / "train.jsonl", repeat=1)
    first = tasks.sentiment(config("sentiment", tiny_base, tmp_path / "a", data, None, "train.max_steps=1",
                                   "eval.base=false", "lora.r=4"), tmp_path / "first")
    cfg = config("sentiment", tiny_base, tmp_path / "b", data, None, "train.max_steps=1", "lora.r=8",
                 f'train.init_adapter="{first}"')
    with pytest.raises(AdapterError, match=r"init_adapter .*lora\.r 4 \(this run: 8\)"):
        tasks.sentiment(cfg, tmp_path / "second")
    assert not (tmp_path / "second").exists()
    cfg = config("sentiment", tiny_base, tmp_path / "c", data, None, f'train.init_adapter="{tmp_path / "gone"}"')
    with pytest.raises(AdapterError, match=r"init_adapter .*gone"):
        tasks.sentiment(cfg, tmp_path / "third")


def test_adapter_folder_contents(tiny_base: Path, tmp_path: Path) -> None:
    data = sentiment_file(tmp_path / "train.jsonl", repeat=2)
    dev = write_jsonl(tmp_path / "sst.jsonl", [{"text": "good", "label": "positive"},
                                               {"text": "bad", "label": "negative"}])
    out = tasks.sentiment(config("sentiment", tiny_base, tmp_path, data, dev, "train.max_steps=2"),
                          tmp_path / "adapters" / "mood")
    info = validate_adapter(out)
    assert info.task == "sentiment" and info.labels == ("negative", "neutral", "positive")
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "curves.png", "lorabot.json",
        "metrics.json", "recipe.toml"]
    peft_config = json.loads((out / "adapter_config.json").read_text())
    assert peft_config["modules_to_save"] is None and peft_config["peft_type"] == "LORA"
    assert {str(t.dtype) for t in lora_weights(out).values()} == {"torch.bfloat16"}
    metrics = json.loads((out / "metrics.json").read_text())
    # A 3-class adapter on binary dev data: only the two present labels compete.
    assert metrics["dev"]["sst"]["labels"] == ["negative", "positive"]
    assert set(metrics["base"]["sst"]) >= {"accuracy", "macro_f1", "macro_recall", "recall"}
    card = (out / "README.md").read_text()
    assert "base model" in card and "tokens/s" in card and "sst" in card
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    # The final evaluation's per-example predictions stay in the run folder, out of the adapter.
    for who in ("", "base-"):
        records = [json.loads(line) for line in (tmp_path / "runs" / f"predictions-{who}sst.jsonl").open()]
        assert [r["text"] for r in records] == ["good", "bad"]
        scores = metrics["base" if who else "dev"]["sst"]
        assert 50 * sum(r["correct"] for r in records) == pytest.approx(scores["accuracy"])


def test_keep_best_publishes_the_best_evaluations_weights(tiny_base: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """train.keep_best: the dev score peaks at step 4 of 12, so step 4's weights are published."""
    data = sentiment_file(tmp_path / "train.jsonl")
    dev = write_jsonl(tmp_path / "sst.jsonl", [{"text": "good", "label": "positive"}])
    peak = {2: 50.0, 4: 90.0, 6: 60.0, 8: 70.0, 10: 80.0, 12: 85.0}
    snapshots: dict[int, dict[str, Any]] = {}
    real_eval = T.evaluate_dev

    def scripted_eval(run: T.Run, limit: int, *, base: bool = False, final: bool = False) -> dict[str, dict[str, Any]]:
        scores = real_eval(run, limit, base=base, final=final)
        if not base and run.state.step not in snapshots:
            snapshots[run.state.step] = {k: v.clone() for k, v in T.trainable_state(
                run.accelerator.unwrap_model(run.model)).items()}
            scores["sst"]["accuracy"] = peak[run.state.step]
        return scores

    monkeypatch.setattr(T, "evaluate_dev", scripted_eval)
    cfg = config("sentiment", tiny_base, tmp_path, data, dev, "train.epochs=2", "train.eval_every=2",
                 "train.keep_best=true", "eval.base=false")
    out = tasks.sentiment(cfg, tmp_path / "adapters" / "mood")
    assert sorted(snapshots) == [2, 4, 6, 8, 10, 12]  # the last step is scored like the others

    def peft_name(name: str) -> str:  # LossModel parameter -> saved PEFT key
        return name.removeprefix("model.").replace(".default.", ".")

    published = lora_weights(out)
    for step, same in ((4, True), (12, False)):
        expected = {peft_name(k): v.to(published[peft_name(k)].dtype) for k, v in snapshots[step].items()}
        assert set(expected) == set(published)
        assert all(expected[k].equal(published[k]) for k in expected) is same
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["kept_step"] == 4
    assert "step 4 of 12" in (out / "README.md").read_text()
    assert not (tmp_path / "runs" / "best.safetensors").exists()  # cleaned up with the checkpoint


def test_keep_best_needs_periodic_evaluations() -> None:
    with pytest.raises(Exception, match="eval_every"):
        load_config(None, ["train.keep_best=true", "train.eval_every=0"])
    with pytest.raises(Exception, match="best_of: only used with"):
        load_config(None, ['train.best_of="sst"'])


def test_best_of_judges_by_one_dev_set(tiny_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The mean of both dev sets peaks at step 2, the "reviews" set alone at step 4: best_of picks step 4."""
    data = sentiment_file(tmp_path / "train.jsonl")  # 24 examples: 6 steps of 4
    dev = [write_jsonl(tmp_path / f"{n}.jsonl", [{"text": "good", "label": "positive"}]) for n in ("reviews", "tweets")]
    script = {2: (80.0, 90.0), 4: (85.0, 60.0), 6: (70.0, 70.0)}
    real_eval = T.evaluate_dev

    def scripted_eval(run: T.Run, limit: int, *, base: bool = False, final: bool = False) -> dict[str, dict[str, Any]]:
        scores = real_eval(run, limit, base=base, final=final)
        if not base and limit == run.config.eval.limit:
            scores["reviews"]["accuracy"], scores["tweets"]["accuracy"] = script[run.state.step]
        return scores

    monkeypatch.setattr(T, "evaluate_dev", scripted_eval)
    sets = ("train.eval_every=2", "train.keep_best=true", 'train.best_of="reviews"', "eval.base=false",
            "eval.limit=1", "eval.final_limit=0")
    cfg = config("sentiment", tiny_base, tmp_path, data, None, *sets)
    cfg = replace(cfg, data={"dev": [str(d) for d in dev]})
    out = tasks.sentiment(cfg, tmp_path / "adapters" / "mood")
    assert json.loads((out / "metrics.json").read_text())["train"]["kept_step"] == 4
    cfg = replace(cfg, train={"best_of": "sst"})
    with pytest.raises(Exception, match=r"no dev set named 'sst'.*reviews, tweets"):
        tasks.sentiment(cfg, tmp_path / "adapters" / "other")


def test_failed_run_leaves_previous_adapter(tiny_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "adapters" / "sent"
    out.mkdir(parents=True)
    (out / "marker").write_text("old", encoding="utf-8")

    def broken_card(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(T, "write_card", broken_card)
    cfg = config("sentiment", tiny_base, tmp_path, sentiment_file(tmp_path / "t.jsonl", 1), None, "train.max_steps=1",
                 "eval.base=false")
    with pytest.raises(RuntimeError, match="disk full"):
        tasks.sentiment(cfg, out, resume=True)
    assert [p.name for p in (tmp_path / "adapters").iterdir()] == ["sent"]
    assert [p.name for p in out.iterdir()] == ["marker"]


def test_bad_data_fails_before_anything_is_written(tiny_base: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok", "label": "positive"}, {"text": "x", "label": "meh"}])
    code = main(["train", "sentiment", "--data", str(bad), "--out", str(tmp_path / "adapters" / "s"),
                 "--base", str(tiny_base), "--set", f'train.run_dir="{tmp_path / "runs"}"'])
    assert code == 2
    assert f"{bad}:2: unknown label 'meh'" in capsys.readouterr().err
    assert not (tmp_path / "adapters").exists() and not (tmp_path / "runs").exists()
    assert main(["train", "sentiment", "--data", str(bad), "--out", str(tmp_path / "Bad Name")]) == 2
    assert "not a valid adapter name" in capsys.readouterr().err


@pytest.mark.parametrize(("task", "rows"), [("ner", NER), ("qa", QA), ("story", STORY), ("domain", STORY),
                                            ("chat", CHAT)])
def test_every_task_trains(tiny_base: Path, tmp_path: Path, task: str, rows: list[Any]) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = config(task, tiny_base, tmp_path, data, data, "train.max_steps=2", "eval.max_new_tokens=4")
    out = tasks.TRAIN[task](cfg, tmp_path / "adapters" / task.replace("chat", "talk"))
    metrics = json.loads((out / "metrics.json").read_text())
    primary = metrics["primary"]
    assert metrics["dev"]["d"][primary] >= 0 and metrics["base"]["d"][primary] >= 0
    info = validate_adapter(out)
    if task == "ner":
        assert info.labels == ("PER", "ORG", "LOC", "MISC")


def test_eval_cli(tiny_base: Path, tiny_adapters: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    binary = write_jsonl(tmp_path / "sst.jsonl", [{"text": "good", "label": "positive"},
                                                  {"text": "bad", "label": "negative"}] * 3)
    args = ["eval", "sentiment", "--data", str(binary), "--base", str(tiny_base), "--json"]
    assert main([*args, "--adapter", str(tiny_adapters / "sentiment")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == 6 and result["metrics"]["labels"] == ["negative", "positive"]
    assert main([*args, "--base-only", "--limit", "2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["adapter"] is None and result["n"] == 2

    # --predictions: one record per example, agreeing with the aggregate score.
    out = tmp_path / "analysis" / "sst-predictions.jsonl"
    assert main([*args, "--adapter", str(tiny_adapters / "sentiment"), "--predictions", str(out)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["text"] for r in records] == ["good", "bad"] * 3 and set(records[0]["probs"]) == {"negative", "positive"}
    assert 100 * sum(r["correct"] for r in records) / 6 == pytest.approx(result["metrics"]["accuracy"])
    story = write_jsonl(tmp_path / "story.jsonl", [{"text": "Once upon a time."}])
    assert main(["eval", "story", "--base-only", "--data", str(story), "--base", str(tiny_base),
                 "--predictions", str(tmp_path / "story-predictions.jsonl")]) == 2
    assert "scored by perplexity" in capsys.readouterr().err and not (tmp_path / "story-predictions.jsonl").exists()

    ner = write_jsonl(tmp_path / "ner.jsonl", NER)
    assert main(["eval", "ner", "--adapter", str(tiny_adapters / "ner"), "--data", str(ner), "--base", str(tiny_base),
                 "--max-new-tokens", "8", "--json"]) == 0
    assert 0 <= json.loads(capsys.readouterr().out.splitlines()[-1])["metrics"]["f1"] <= 100
    assert main(["eval", "qa", "--adapter", str(tiny_adapters / "ner"), "--data", str(ner), "--base",
                 str(tiny_base)]) == 2
    assert "is a ner adapter, not qa" in capsys.readouterr().err


def test_qa_holdout_eval_matches_training_split(tiny_base: Path, tiny_adapters: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    rows = [dict(r, id=f"{n}-{r['id']}", context=f"{r['context']} ({n})") for n in range(20) for r in QA]
    data = write_jsonl(tmp_path / "squad.jsonl", rows)
    assert main(["eval", "qa", "--adapter", str(tiny_adapters / "qa"), "--data", str(data), "--base", str(tiny_base),
                 "--holdout", "0.25", "--max-new-tokens", "2", "--json",
                 "--predictions", str(tmp_path / "p.jsonl")]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    n = result["n"]
    records = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(records) == n
    assert {"question", "context", "gold", "output", "answer", "exact_match", "f1"} <= set(records[0])
    assert 100 * sum(r["f1"] for r in records) / n == pytest.approx(result["metrics"]["f1"], abs=1e-3)
    # Every context has several sentences, so the order check read each one twice, as the bot would.
    assert result["metrics"]["order_check"]["read_twice"] == n and all(r["reversed_reading"] is not None
                                                                     for r in records)
    assert main(["eval", "qa", "--adapter", str(tiny_adapters / "qa"), "--data", str(data), "--base", str(tiny_base),
                 "--holdout", "0.25", "--max-new-tokens", "2", "--json", "--one-reading"]) == 0
    assert "order_check" not in json.loads(capsys.readouterr().out.splitlines()[-1])["metrics"]
    from training.data import load

    held = load("qa", {"path": str(data), "holdout": 0.25, "part": "holdout"}, (), seed=0)
    kept = load("qa", {"path": str(data), "holdout": 0.25, "part": "train"}, (), seed=0)
    assert n == len(held) and len(held) + len(kept) == len(rows) and 0 < n < len(rows)
