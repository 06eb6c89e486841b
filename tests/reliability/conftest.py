"""Shared helpers for the reliability tests: real SQLite files, the lorabot command as a subprocess.

Model-loading subprocesses cost ~20 s each on a busy 2-core machine (importing transformers + PEFT), so
only the tests that need the real engine start one; the others run the real CLI with the engine swapped
for FakeEngine through ``tests/reliability/cli_shim.py`` (same argv, same code path, no torch import).
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from bot.store import AsyncStore, Store

REPO = Path(__file__).resolve().parents[2]
SHIM = Path(__file__).resolve().parent / "cli_shim.py"


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without real bot tokens (a developer's token must never reach a test)."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_BOT_TOKEN")}
    env.update(extra)
    return env


def without_privileges() -> list[str]:
    """A command prefix that drops every capability, so file permissions apply even when we are root.

    Root ignores a file's read-only mode (CAP_DAC_OVERRIDE); a read-only database can only be tested for
    real without that capability. Empty when not root (permissions already apply); skip when impossible.
    """
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: cannot make a file read-only for this process")
    return [setpriv, "--bounding-set=-all", "--inh-caps=-all"]


def lorabot(*args: str, stdin: str = "", env: dict[str, str] | None = None, timeout: float = 60,
            shim: bool = False, prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m bot ARGS`` (or the FakeEngine shim with the same argv) and wait for it."""
    entry = [str(SHIM)] if shim else ["-m", "bot"]
    return subprocess.run(
        [*(prefix or []), sys.executable, *entry, *args], input=stdin, capture_output=True, text=True,
        timeout=timeout, cwd=REPO, env=env or clean_env(),
    )


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``lorabot ARGS`` in this process: the same bot.cli.main as the command (argument parsing, logging
    set-up, error reporting), ~0.05 s instead of ~0.6 s for a subprocess. Root logging is restored after."""
    from bot.cli import main

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    capsys.readouterr()
    try:
        rc = main(list(args))
    except SystemExit as exc:  # argparse refusing the arguments
        rc = exc.code if isinstance(exc.code, int) else 2
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    out = capsys.readouterr()
    return rc, out.out, out.err


def write_config(path: Path, **sections: dict[str, object]) -> Path:
    """A config.toml from plain dicts (strings, numbers, booleans and lists of strings only)."""

    def value(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    lines = []
    for name, body in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {value(v)}" for k, v in body.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def tiny_config(tmp_path: Path, tiny_base: Path, tiny_adapters: Path) -> Path:
    """config.toml on the tiny random Llama with one random adapter per task; generation kept short."""
    return write_config(
        tmp_path / "config.toml",
        model={"base": str(tiny_base), "dtype": "float32", "threads": 1},
        adapters={"dir": str(tiny_adapters)},
        store={"path": str(tmp_path / "log.db")},
        generation={"max_new_tokens": 4}, ner={"max_new_tokens": 4}, qa={"max_new_tokens": 4},
        # Long on purpose: the kill -9 test needs a story still being written when it kills the bot.
        story={"max_new_tokens": 1500},
    )


@pytest.fixture
def fake_config(tmp_path: Path) -> Path:
    """config.toml for the FakeEngine shim: no model is read, only the store and access settings matter."""
    return write_config(tmp_path / "config.toml", store={"path": str(tmp_path / "log.db")},
                        adapters={"dir": str(tmp_path / "no-adapters")})


@pytest.fixture
async def mem_store() -> AsyncIterator[AsyncStore]:
    store = AsyncStore(Store.memory())
    try:
        yield store
    finally:
        await store.close()


def query(db: Path) -> Callable[..., list[tuple]]:
    """Read a database file the way an operator would: a separate connection, not the bot's."""

    def run(sql: str, params: tuple = ()) -> list[tuple]:
        conn = sqlite3.connect(db)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    return run


def rows(store: AsyncStore, sql: str, params: tuple = ()) -> list[tuple]:
    """Read an AsyncStore's in-memory database directly (tests only; the store is idle when called)."""
    return list(store._store.db.execute(sql, params).fetchall())
