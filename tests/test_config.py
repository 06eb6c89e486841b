"""config.toml: typed, frozen, unknown keys refused, every problem reported at once."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.config import Config, load_config, parse_config
from bot.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_shipped_config_loads_and_matches_defaults():
    config = load_config(REPO / "config.toml")
    assert config.model.base == "bundled" and config.telegram.token_env == "TELEGRAM_BOT_TOKEN"
    assert dataclasses.replace(config, root=Path(".")) == Config()


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().model.base = "x"  # type: ignore[misc]


def test_all_problems_reported_at_once_with_key_names(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(
        '[model]\ndtype = "float8"\nthreads = "two"\ncolour = 1\n'
        '[engine]\nmax_batch = 0\nbackend = "vllm"\ncpu_kernel = "yes"\n[generation]\ntop_p = 1.5\n[bogus]\nx = 1\n'
        '[access]\nadmins = "me"\n'
    )
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    for needle in ("model.dtype", "model.threads", "unknown key model.colour", "engine.max_batch", "engine.backend",
                   "engine.cpu_kernel", "generation.top_p", "unknown section [bogus]", "access.admins"):
        assert needle in message
    assert len(err.value.problems) == 9


def test_broken_toml_and_bad_encoding_are_clear(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nbase = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="UTF-8"):
        load_config(binary)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")


def test_tokens_come_only_from_the_environment(monkeypatch):
    config = parse_config({"telegram": {"token_env": "MY_TG"}})
    monkeypatch.delenv("MY_TG", raising=False)
    assert config.token("telegram") is None
    monkeypatch.setenv("MY_TG", " 123:abc ")
    assert config.token("telegram") == "123:abc"
    with pytest.raises(ConfigError):
        parse_config({"telegram": {"token": "123:abc"}})


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=8), st.one_of(
    st.integers(), st.text(max_size=8), st.booleans(), st.floats(allow_nan=True),
    st.dictionaries(st.text(max_size=8), st.one_of(st.integers(), st.text(max_size=5), st.lists(st.integers()))),
)))
def test_arbitrary_mappings_either_parse_or_raise_config_error(data):
    try:
        parse_config(data)
    except ConfigError as exc:
        assert exc.problems
