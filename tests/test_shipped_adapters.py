"""The adapters shipped in adapters/: valid folders for the bundled model, small, and good at their task.

Scores are taken on a small fixed sample of the shared dev data with the real SmolLM2-135M, through the
same ``lorabot eval`` code path the model cards were made with; the floors sit well below the cards'
scores (a broken prompt format, a wrong base model or an untrained adapter falls far under them).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import shared_data
from training.recipes.make_all import SHIPPED

pytestmark = pytest.mark.real_model

REPO = Path(__file__).resolve().parents[1]
ADAPTERS = REPO / "adapters"


def _evaluate(task: str, data: Path, adapter: Path | None, *, limit: int, holdout: float = 0.0) -> dict:
    from training.tasks import evaluate_adapter

    return evaluate_adapter(task, data, adapter=adapter, limit=limit, holdout=holdout, progress=False)["metrics"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_adapter_is_a_valid_small_folder_for_the_bundled_model(name: str, bundled_dir: Path) -> None:
    from transformers import AutoConfig

    from bot.adapters import shape_signature, validate_adapter
    from bot.engine.loading import BUNDLED, resolve_base

    folder = ADAPTERS / name
    ref = resolve_base(BUNDLED, progress=False)
    info = validate_adapter(folder, base_model=ref.name, base_shape=shape_signature(
        AutoConfig.from_pretrained(bundled_dir, local_files_only=True)))
    assert info.task == {"medical": "domain"}.get(name, name)   # the domain adapter is named after its domain
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    assert not config.get("modules_to_save"), "plain LoRA only, so vLLM and LoRAX load it too"
    assert (folder / "adapter_model.safetensors").stat().st_size < 12_000_000
    card = (folder / "README.md").read_text(encoding="utf-8")
    assert "base model" in card.lower()
    metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["dev"] and metrics["base"], "the card reports the adapter and the bare base model"


def test_shipped_adapters_stay_light() -> None:
    weights = sum((ADAPTERS / name / "adapter_model.safetensors").stat().st_size for name in SHIPPED)
    total = sum(f.stat().st_size for name in SHIPPED for f in (ADAPTERS / name).rglob("*") if f.is_file())
    assert weights < 40_000_000 and total < 42_000_000


def test_sentiment_adapter_beats_the_base_model_on_sst2_and_tweets() -> None:
    sst2 = shared_data("sentiment/sst2_dev.jsonl")
    tweets = shared_data("sentiment/tweeteval_dev.jsonl")
    tuned = _evaluate("sentiment", sst2, ADAPTERS / "sentiment", limit=32)
    base = _evaluate("sentiment", sst2, None, limit=32)
    # The bare model already separates positive from negative reviews fairly well (81% on all of SST-2
    # dev); what it cannot do is three classes with neutral tweets, where the adapter must win clearly.
    assert tuned["accuracy"] >= 80 and tuned["accuracy"] >= base["accuracy"]
    tuned = _evaluate("sentiment", tweets, ADAPTERS / "sentiment", limit=64)
    base = _evaluate("sentiment", tweets, None, limit=64)
    assert tuned["macro_recall"] >= 55 and tuned["macro_recall"] >= base["macro_recall"] + 10


def test_ner_adapter_finds_conll_entities() -> None:
    assert _evaluate("ner", shared_data("ner/conll2003_dev.txt"), ADAPTERS / "ner", limit=48)["f1"] >= 45


def test_qa_adapter_answers_held_out_paragraphs() -> None:
    data = shared_data("qa/squad_v1.1_dev_shared.jsonl")
    assert _evaluate("qa", data, ADAPTERS / "qa", limit=12, holdout=0.15)["f1"] >= 45


def test_story_adapter_lowers_tinystories_perplexity() -> None:
    data = shared_data("story/tinystories_dev.jsonl")
    tuned = _evaluate("story", data, ADAPTERS / "story", limit=4)["perplexity"]
    base = _evaluate("story", data, None, limit=4)["perplexity"]
    assert tuned <= 0.85 * base


def test_medical_adapter_lowers_pubmed_perplexity() -> None:
    data = shared_data("domain/pubmed_dev.jsonl")
    tuned = _evaluate("domain", data, ADAPTERS / "medical", limit=4)["perplexity"]
    base = _evaluate("domain", data, None, limit=4)["perplexity"]
    assert tuned <= 0.9 * base


async def test_compare_medical_shows_both_continuations_in_the_bot(tmp_path: Path) -> None:
    from bot.app import open_app
    from bot.config import Config, replace
    from bot.messages import Incoming

    config = replace(Config(root=REPO), store={"path": str(tmp_path / "log.db")}, generation={"max_new_tokens": 12})
    async with open_app(config, progress=False) as app:
        reply = await app.core.handle(Incoming(platform="test", chat_id="c", user_id="u",
                                               text="/compare medical The patient was treated with"))
        mode = await app.core.handle(Incoming(platform="test", chat_id="c", user_id="u", text="/mode medical"))
        written = await app.core.handle(Incoming(platform="test", chat_id="c", user_id="u",
                                                 text="Patients with type 2 diabetes"))
    assert reply.kind == "answer" and mode.kind == "command"
    base, _, tuned = reply.text.partition("Fine-tuned (adapter 'medical'):")
    assert base.startswith("Base model (pre-trained only):\nThe patient was treated with")
    assert tuned.strip().startswith("The patient was treated with") and len(tuned.split()) > 6
    assert written.kind == "answer" and written.text.startswith("Patients with type 2 diabetes")


async def test_the_bot_classifies_as_the_evaluation_does(bundled_dir: Path) -> None:
    """The engine the bot serves with and the training evaluation agree on the sentiment adapter."""
    from bot.app import load_engine
    from bot.config import Config, replace
    from bot.skills import SentimentFormat
    from training.data import read_examples
    from training.evaluate import label_probs
    from training.model import load_adapter, load_base

    examples = read_examples("sentiment", shared_data("sentiment/tweeteval_dev.jsonl"), ())[:6]
    labels = list(SentimentFormat.default_labels)
    model, tok, _ = load_base("bundled")
    expected = label_probs(load_adapter(model, ADAPTERS / "sentiment"), tok, [e.text for e in examples], labels)
    engine = load_engine(replace(Config(root=REPO), model={"dtype": "float32"}), progress=False)
    try:
        for ex, probs in zip(examples, expected, strict=True):
            choices = [SentimentFormat.continuation(label) for label in labels]
            got = await engine.classify(SentimentFormat.prompt(ex.text), choices, "sentiment")
            assert [got.scores[c] for c in choices] == pytest.approx(probs, abs=2e-3)
    finally:
        await engine.close()
