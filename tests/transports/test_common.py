"""The transport helpers: per-chat locks, token redaction, the streaming outbox."""

from __future__ import annotations

import asyncio
import logging

import pytest

from bot.transports.common import ChatLocks, redact, register_secret, unregister_secret
from bot.transports.outbox import Outbox


async def test_chat_locks_order_one_chat_and_are_dropped_when_unused() -> None:
    locks, order = ChatLocks(), []

    async def work(chat: str, n: int, pause: float) -> None:
        async with locks.hold(chat):
            await asyncio.sleep(pause)
            order.append((chat, n))

    await asyncio.gather(work("a", 1, 0.05), work("a", 2, 0), work("b", 1, 0))
    assert order == [("b", 1), ("a", 1), ("a", 2)]
    assert len(locks) == 0


def test_secrets_are_redacted_in_messages_arguments_and_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    secret = "555:very-secret"
    register_secret(secret)
    try:
        log = logging.getLogger("some.library")
        with caplog.at_level(logging.DEBUG):
            log.debug("POST https://api.example/bot%s/getMe", secret)
            try:
                raise RuntimeError(f"token {secret} rejected")
            except RuntimeError:
                log.exception("failed")
        assert secret not in caplog.text and "bot<redacted>/getMe" in caplog.text
        assert redact(f"x{secret}y") == "x<redacted>y"
    finally:
        unregister_secret(secret)
    assert redact(secret) == secret


class Recorder(Outbox):
    def __init__(self, interval: float, fail_first: bool = False) -> None:
        super().__init__(interval)
        self.log: list[tuple[str, str, bool]] = []
        self.fail_first = fail_first

    def split(self, text: str) -> list[str]:
        return [text[i:i + 10] for i in range(0, len(text), 10)] if text.strip() else []

    async def send(self, text: str, *, first: bool, last: bool, partial: bool = False) -> str:
        if self.fail_first:
            self.fail_first = False
            raise ConnectionError("flaky")
        self.log.append(("send", text, last))
        await asyncio.sleep(0.01)
        return f"m{len(self.log)}"

    async def edit(self, handle: str, text: str, *, last: bool, partial: bool = False) -> None:
        self.log.append(("edit", text, last))
        await asyncio.sleep(0.01)


async def test_outbox_coalesces_updates_and_delivers_the_final_text_split() -> None:
    box = Recorder(interval=0.1)
    for i in range(30):
        await box.stream("x" * (i % 9 + 1))
        await asyncio.sleep(0.01)
    handles = await box.finish("final text that is long")
    kinds = [k for k, _, _ in box.log]
    assert kinds[0] == "send" and kinds.count("send") == 3  # first partial, then two more chunks
    assert 2 <= kinds.count("edit") <= 6
    assert box.log[-3:] == [("edit", "final text", False), ("send", " that is l", False), ("send", "ong", True)]
    assert handles == ["m1", f"m{len(box.log) - 1}", f"m{len(box.log)}"]


async def test_outbox_survives_a_failed_partial_send_and_abandon_stops_it() -> None:
    box = Recorder(interval=0.0, fail_first=True)
    await box.stream("partial")
    await asyncio.sleep(0.02)
    assert await box.finish("done") == ["m1"]
    assert box.log == [("send", "done", True)]

    quiet = Recorder(interval=0.0)
    await quiet.stream("something")
    await quiet.abandon()
    await quiet.stream("more")  # late updates after abandoning are ignored
    await asyncio.sleep(0.02)
    assert len(quiet.log) <= 1
