"""Hostile config files: any bytes give a Config or a ConfigError naming the file, never another exception."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.config import Config, ConfigError, load_config, parse_config

SETTINGS = settings(max_examples=300, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
SECTIONS = ["model", "adapters", "engine", "generation", "story", "qa", "ner", "bot", "store", "access",
            "telegram", "discord", "root", "nope"]
KEYS = ["base", "dtype", "device", "threads", "dir", "max_batch", "batch_wait_ms", "max_new_tokens", "temperature",
        "top_p", "repetition_penalty", "default_mode", "max_input_chars", "history_tokens", "system_prompt", "path",
        "retention_days", "allowed_users", "allowed_chats", "admins", "rate_limit_per_minute", "token_env",
        "base_url", "mode", "webhook_url", "webhook_port", "edit_interval_s", "wat"]
TOKENS = ["[", "]", "[[", "]]", "{", "}", "=", ",", ".", '"', "'", '"""', "\n", " ", "#", "\\", "\\u0000",
          "true", "false", "nan", "inf", "-inf", "1e999", "0x1F", "1979-05-27T07:32:00Z", "99999999999999999999",
          *SECTIONS, *KEYS, "\x00", "\ud800".encode("utf-8", "surrogatepass").decode("latin-1"), "é", "\ufeff"]

TOML_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20),
              st.datetimes(), st.dates(), st.times()),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


def _load(tmp_path: Path, data: bytes) -> Config | None:
    path = tmp_path / "config.toml"
    path.write_bytes(data)
    try:
        return load_config(path)
    except ConfigError as exc:
        assert str(path) in str(exc) and exc.problems  # the file is named and at least one problem listed
        return None


@SETTINGS
@given(data=st.binary(max_size=400))
def test_random_bytes(tmp_path: Path, data: bytes) -> None:
    _load(tmp_path, data)


@SETTINGS
@given(parts=st.lists(st.sampled_from(TOKENS), max_size=60))
def test_toml_ish_token_soup(tmp_path: Path, parts: list[str]) -> None:
    _load(tmp_path, "".join(parts).encode("utf-8", "surrogatepass"))


@settings(SETTINGS, max_examples=100)  # structured examples are slower to generate
@given(data=st.dictionaries(
    st.sampled_from(SECTIONS) | st.text(max_size=6),
    st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), TOML_VALUES, max_size=5) | TOML_VALUES,
    max_size=5,
))
def test_parsed_structures_with_wrong_types(data: dict) -> None:
    try:
        config = parse_config(data, "fuzz.toml")
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.toml:")
        return
    assert isinstance(config, Config)


@pytest.mark.parametrize("text", [
    '[model]\ndtype = "fp8"\n', "[model]\nthreads = -1\n", '[access]\nadmins = "123"\n', "[access]\nadmins = [1.5]\n",
    "[store]\nretention_days = true\n", "[generation]\ntop_p = 0\n", "[bot]\nmax_input_chars = 0\n",
    "[telegram]\nwebhook_port = 1979-05-27\n", "model = 3\n", "[root]\nx = 1\n", '[model]\nbase = { a = 1 }\n',
])
def test_each_bad_value_is_named(tmp_path: Path, text: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "Traceback" not in str(caught.value) and len(caught.value.problems) == 1


def test_unreadable_and_odd_paths_are_config_errors(tmp_path: Path) -> None:
    for path in (tmp_path / "missing.toml", tmp_path, tmp_path / ("x" * 300)):
        with pytest.raises(ConfigError, match="cannot read the file"):
            load_config(path)


def test_deeply_nested_toml_is_a_config_error(tmp_path: Path) -> None:
    _load(tmp_path, b"a = " + b"[" * 50_000)


@pytest.mark.parametrize("key", ["generation.temperature", "story.repetition_penalty", "telegram.edit_interval_s",
                                 "generation.repetition_penalty"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_numbers_are_refused(tmp_path: Path, key: str, value: str) -> None:
    section, name = key.split(".")
    config = _load(tmp_path, f"[{section}]\n{name} = {value}\n".encode())
    assert config is None, f"{key} = {value} accepted: {getattr(getattr(config, section), name)}"


def test_tokens_are_never_read_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[telegram]\ntoken = "123:SECRET"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"unknown key telegram\.token"):
        load_config(path)


def test_printable_garbage_never_escapes(tmp_path: Path) -> None:
    # A deterministic sweep as a backstop to hypothesis: every single printable character as a whole file.
    for ch in string.printable + "\x00\x7f\u2028\ufeff":
        _load(tmp_path, (ch * 3).encode("utf-8"))
