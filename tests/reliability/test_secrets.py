"""Bot tokens never reach a log line, a traceback or the database, even at -vv where HTTP libraries log
every request URL (Telegram's URLs contain the token: /bot<token>/getUpdates)."""

from __future__ import annotations

import asyncio
import io
import logging
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bot.cli import setup_logging
from bot.config import Config
from bot.transports.common import unregister_secret
from tests.reliability.conftest import REPO, SHIM, clean_env, write_config
from tests.transports.tg_server import TOKEN, FakeBotAPI, message

DISCORD_TOKEN = "MTIzNDU2Nzg5MDEyMzQ1Njc4.Gabcde.reliability-discord-token"
SECRET_PARTS = [TOKEN, TOKEN.split(":", 1)[1], DISCORD_TOKEN, DISCORD_TOKEN.rsplit(".", 1)[1]]


def _leaks(text: str | bytes) -> list[str]:
    blob = text if isinstance(text, bytes) else text.encode("utf-8", "replace")
    return [s for s in SECRET_PARTS if s.encode() in blob]


async def test_lorabot_vv_run_on_telegram_never_logs_or_stores_the_token(tmp_path: Path) -> None:
    """`lorabot -vv run` against a Bot API server on 127.0.0.1, with failures that get logged.

    Runs through cli_shim (FakeEngine): the CLI, logging set-up, transport, store and HTTP stack are
    the real ones; the model has nothing to do with tokens and would cost ~20 s to load.
    """
    api = await FakeBotAPI().start()
    api.fail("getUpdates", 502)  # the updater logs the failed poll (with the URL at -vv)
    api.fail("sendMessage", 500)  # our retry logs a warning carrying the error
    db = tmp_path / "log.db"
    config = write_config(tmp_path / "config.toml", store={"path": str(db)},
                          adapters={"dir": str(tmp_path / "none")},
                          telegram={"base_url": api.base_url, "edit_interval_s": 0.1})
    stderr_path = tmp_path / "stderr.txt"
    with stderr_path.open("wb") as stderr:  # a file, not a pipe: -vv output would fill a pipe and block
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(SHIM), "-vv", "--config", str(config), "run", cwd=REPO, stdout=stderr,
            stderr=stderr, env=clean_env(TELEGRAM_BOT_TOKEN=TOKEN),
        )
        try:
            await api.wait_for("getUpdates", count=2, timeout=60)  # polling survived the 502
            api.push({"message": message("/sentiment I love this")})
            api.push({"message": message("/chat hello there", chat_id=8, user_id=8)})
            await api.wait_for("sendMessage", count=3, timeout=30)  # one failed attempt + two replies
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 30) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await api.stop()
    log = stderr_path.read_text(encoding="utf-8", errors="replace")
    assert "lorabot is running on Telegram" in log
    assert "HTTP Request" in log and "<redacted>" in log  # the URLs were logged, with the token cut out
    assert "retry" in log  # the failure paths did log
    assert _leaks(log) == []
    assert _leaks(b"".join(p.read_bytes() for p in tmp_path.glob("log.db*"))) == []
    assert "positive" in " ".join(c["text"] for c in api.of("sendMessage"))


@pytest.fixture
def logging_as_the_cli(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """The CLI's logging set-up with both tokens in the environment, writing to a buffer; root logging
    restored afterwards."""
    monkeypatch.setenv("TELEGRAM_BOT_TOKEN", TOKEN)
    monkeypatch.setenv("DISCORD_BOT_TOKEN", DISCORD_TOKEN)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    setup_logging(Config(), 2)
    buffer = io.StringIO()
    root.handlers[0].setStream(buffer)  # type: ignore[attr-defined]  # its formatter, at a readable place
    try:
        yield buffer
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        unregister_secret(TOKEN)
        unregister_secret(DISCORD_TOKEN)


def test_tokens_in_messages_arguments_and_tracebacks_are_redacted(logging_as_the_cli: io.StringIO) -> None:
    log = logging.getLogger("lorabot.reliability")
    url = f"https://api.telegram.org/bot{TOKEN}/getMe"
    log.info("request %s", url)
    log.warning("headers: %r", {"Authorization": f"Bot {DISCORD_TOKEN}"})
    log.debug(f"f-string {TOKEN}")
    try:
        try:
            raise ConnectionError(f"POST {url} failed")
        except ConnectionError as inner:
            raise RuntimeError(f"wrapped {DISCORD_TOKEN}") from inner
    except RuntimeError:
        log.exception("a chained failure")
    logging.getLogger("httpx").debug("HTTP Request: POST %s", url)  # a library logger, child of root
    err = logging_as_the_cli.getvalue()
    assert err.count("<redacted>") >= 6 and "a chained failure" in err and "ConnectionError" in err
    assert _leaks(err) == []


def test_the_token_is_not_in_the_environment_of_the_config() -> None:
    # Only the *name* of the variable lives in config; the value is read at use and never stored on it.
    config = Config()
    assert config.telegram.token_env == "TELEGRAM_BOT_TOKEN"
    assert not _leaks(repr(config))
