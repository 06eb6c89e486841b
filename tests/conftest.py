"""Shared fixtures: a tiny random Llama and random adapters built locally, real SQLite, the real model."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.skills import NERFormat, SentimentFormat

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_data(relative: str) -> Path:
    """A file under ../shared/data, or skip the test cleanly when it is absent."""
    path = SHARED_DATA / relative
    if not path.is_file():
        pytest.skip(f"shared data not available: {path}")
    return path


@pytest.fixture(scope="session")
def bundled_dir() -> Path:
    """The real SmolLM2-135M-Instruct, converted once into the user cache (needed for its tokenizer too)."""
    from bot.engine.loading import BUNDLED, resolve_base

    return resolve_base(BUNDLED, progress=False).path


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory, bundled_dir: Path) -> Path:
    from tests.random_model import save_random_llama

    return save_random_llama(tmp_path_factory.mktemp("models") / "tiny-llama", bundled_dir, shape="tiny")


@pytest.fixture(scope="session")
def tiny_adapters(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> Path:
    """An adapters folder with one random adapter per task, made for the tiny base."""
    from tests.random_model import save_random_adapter

    folder = tmp_path_factory.mktemp("adapters")
    labels = SentimentFormat.default_labels
    save_random_adapter(tiny_base, folder / "sentiment", task="sentiment", labels=labels, seed=1)
    save_random_adapter(tiny_base, folder / "ner", task="ner", labels=NERFormat.default_labels, seed=2)
    save_random_adapter(tiny_base, folder / "qa", task="qa", seed=3)
    save_random_adapter(tiny_base, folder / "story", task="story", seed=4)
    return folder
