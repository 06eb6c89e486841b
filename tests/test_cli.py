"""The lorabot command, run as a user runs it (a subprocess), on the tiny model with random adapters."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def config_file(tmp_path, tiny_base, tiny_adapters) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        f'[model]\nbase = "{tiny_base}"\ndtype = "float32"\n'
        f'[adapters]\ndir = "{tiny_adapters}"\n'
        f'[store]\npath = "{tmp_path / "log.db"}"\n'
        "[story]\nmax_new_tokens = 8\n[generation]\nmax_new_tokens = 8\n"
    )
    return path


def lorabot(*args: str, stdin: str = "", env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.endswith("_BOT_TOKEN")}
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "bot", *args], input=stdin, capture_output=True, text=True, timeout=300,
        cwd=REPO, env=environment,
    )


def test_help_is_fast_and_lists_commands():
    result = lorabot("--help")
    assert result.returncode == 0
    for command in ("chat", "run", "ask", "adapters", "db"):
        assert command in result.stdout


def test_importing_bot_does_not_import_torch():
    code = "import sys, bot.cli, bot.core, bot.store, bot.config; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_ask_json_per_skill(config_file, tmp_path):
    sentiment = lorabot("--config", str(config_file), "ask", "sentiment", "I love it", "--json")
    assert sentiment.returncode == 0, sentiment.stderr
    data = json.loads(sentiment.stdout.strip().splitlines()[-1])
    assert data["skill"] == "sentiment" and data["adapter"] == "sentiment"
    assert set(data["scores"]) == {"negative", "neutral", "positive"} and data["label"] in data["scores"]

    ner = json.loads(lorabot("--config", str(config_file), "ask", "ner", "Alice met Bob", "--json")
                     .stdout.strip().splitlines()[-1])
    assert isinstance(ner["entities"], list)
    for e in ner["entities"]:
        assert "Alice met Bob"[e["start"]:e["end"]] == e["text"]

    context = tmp_path / "context.txt"
    context.write_text("The cat sat on the mat.")
    qa = lorabot("--config", str(config_file), "ask", "qa", "Where did the cat sit?", "--context", str(context),
                 "--compare", "--json")
    data = json.loads(qa.stdout.strip().splitlines()[-1])
    assert "answer" in data and "answer" in data["base"] and data["adapter"] == "qa"

    rows = sqlite3.connect(tmp_path / "log.db").execute("SELECT count(*) FROM messages").fetchone()[0]
    assert rows == 6


def test_run_without_token_falls_back_to_console(config_file):
    result = lorabot("--config", str(config_file), "run", stdin="/mode sentiment\nwhat a day\n")
    assert result.returncode == 0, result.stderr
    assert "No bot token is set" in result.stderr and "TELEGRAM_BOT_TOKEN" in result.stderr
    assert "Mode set to sentiment" in result.stdout and "%" in result.stdout


def test_broken_config_lists_every_problem(tmp_path):
    bad = tmp_path / "config.toml"
    bad.write_text('[model]\ndtype = "fp8"\nwat = 1\n[nope]\n')
    result = lorabot("--config", str(bad), "chat")
    assert result.returncode == 2
    assert "model.dtype" in result.stderr and "model.wat" in result.stderr and "[nope]" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_model_folder_is_a_clear_error(tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[model]\nbase = "{tmp_path / "no-such-model"}"\n[store]\npath = "{tmp_path / "x.db"}"\n')
    result = lorabot("--config", str(cfg), "ask", "chat", "hi")
    assert result.returncode == 2 and "no such folder" in result.stderr and "Traceback" not in result.stderr


def test_unknown_skill_is_refused(config_file):
    result = lorabot("--config", str(config_file), "ask", "poetry", "roses")
    assert result.returncode == 2 and "unknown skill" in result.stderr
