"""`lorabot run` must not keep "running" without a connection: when the Discord gateway task dies (a fatal
close code, an exception inside discord.py) or Telegram polling gives up, the process ends with a non-zero
status and says why. Driven through the real command (bot.cli._run) and the real client stacks against the
loopback servers."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

import bot.app
from bot.app import run_transports
from bot.cli import _run
from bot.config import Config, replace
from bot.core import Core
from bot.transports.telegram_chat import TelegramTransport
from tests.fakes import FakeEngine
from tests.transports import tg_server
from tests.transports.dc_server import DM_CHANNEL_ID, TOKEN, FakeDiscord, message_payload


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Config:
    monkeypatch.setattr(bot.app, "load_engine", lambda config, progress=True: FakeEngine())
    config = replace(Config(), store={"path": str(tmp_path / "lorabot.db")})
    monkeypatch.setenv(config.discord.token_env, TOKEN)
    monkeypatch.delenv(config.telegram.token_env, raising=False)
    return config


async def _started(caplog: pytest.LogCaptureFixture) -> None:
    """Until the transport said it is running (the connection is up and READY was handled)."""
    for _ in range(200):
        if any("Discord bot" in r.getMessage() and "is running" in r.getMessage() for r in caplog.records):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the Discord transport never started")


async def _serve_until(fake: FakeDiscord, config: Config, caplog: pytest.LogCaptureFixture, fault) -> int:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.INFO)
    run = asyncio.create_task(_run(config))
    try:
        await _started(caplog)
        await fake.dispatch("MESSAGE_CREATE", message_payload("hi", channel_id=DM_CHANNEL_ID, guild=False))
        await fake.wait_for("POST", f"/channels/{DM_CHANNEL_ID}/messages")  # it was serving
        await fault()
        return await asyncio.wait_for(asyncio.shield(run), 10)
    finally:
        if not run.done():  # the old behaviour: still "running" with no connection
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)


async def test_a_fatal_gateway_close_ends_the_run_with_a_reason(
    fake: FakeDiscord, config: Config, caplog: pytest.LogCaptureFixture,
) -> None:
    status = await _serve_until(fake, config, caplog, lambda: fake.close_gateway(4004, "Authentication failed."))
    assert status != 0
    assert "Discord" in caplog.text and "4004" in caplog.text
    assert TOKEN not in caplog.text


async def test_an_exception_in_the_client_task_ends_the_run_with_a_reason(
    fake: FakeDiscord, config: Config, caplog: pytest.LogCaptureFixture,
) -> None:
    status = await _serve_until(fake, config, caplog, lambda: fake.send_raw("this is not JSON {"))
    assert status != 0
    assert "Discord" in caplog.text and "JSONDecodeError" in caplog.text


async def test_a_resumable_close_is_reconnected_and_keeps_serving(
    fake: FakeDiscord, config: Config, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    run = asyncio.create_task(_run(config))
    try:
        await _started(caplog)
        await fake.close_gateway(4000, "Unknown error")  # Discord: "try reconnecting"
        for _ in range(200):
            if fake.connections >= 2 and fake._ws is not None and not fake._ws.closed:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        assert fake.connections >= 2 and not run.done()
        await fake.dispatch("MESSAGE_CREATE", message_payload("still there?", channel_id=DM_CHANNEL_ID, guild=False))
        await fake.wait_for("POST", f"/channels/{DM_CHANNEL_ID}/messages", timeout=10)
    finally:
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)


async def test_telegram_polling_that_gives_up_ends_the_run_with_a_reason(
    api, store, caplog: pytest.LogCaptureFixture,  # type: ignore[no-untyped-def]
) -> None:
    config = replace(Config(), telegram={"base_url": api.base_url})
    transport = TelegramTransport(Core(config, FakeEngine(), store), config, tg_server.TOKEN)
    run = asyncio.create_task(run_transports([transport], asyncio.Event()))
    try:
        await api.wait_for("getUpdates")
        api.token = "revoked"  # the token was revoked in @BotFather: every call now answers 401
        api.push({"message": tg_server.message(chat_id=7, sticker=True)})  # ends the long poll in flight
        status = await asyncio.wait_for(asyncio.shield(run), 10)
    finally:
        if not run.done():
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
    assert status == 1
    assert "Telegram polling ended (InvalidToken" in caplog.text and tg_server.TOKEN not in caplog.text
