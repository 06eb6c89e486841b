"""Fixtures for the training tests (the tiny random model and the real tokenizer come from tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def tok(bundled_dir: Path) -> Any:
    from bot.engine.loading import load_tokenizer

    return load_tokenizer(bundled_dir)
