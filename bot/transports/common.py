"""Small pieces every transport needs: per-chat ordering, text attachments, keeping tokens out of logs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import traceback
from collections.abc import AsyncIterator

TEXT_FILE_LIMIT = 256 * 1024  # bytes: .txt context files above this are refused without downloading


class ChatLocks:
    """One lock per chat, so a chat's messages are answered in order (history stays consistent) while
    different chats are answered concurrently. Locks nobody holds or waits for are dropped."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)


def file_too_large(size: int) -> str:
    # The core never sees files this big (see TEXT_FILE_LIMIT), so the transport says so itself.
    return (
        f"That file is too large for me ({size / 1024:,.0f} KB); send a .txt file of at most "
        f"{TEXT_FILE_LIMIT // 1024} KB."
    )


def decode_text_file(data: bytes) -> str:
    """A .txt attachment as text; undecodable bytes become U+FFFD rather than failing the request."""
    text = data.decode("utf-8-sig", errors="replace")
    return text.replace("\r\n", "\n").strip()


# ---------------------------------------------------------------------- secrets out of logs

_secrets: dict[str, int] = {}  # secret -> number of transports that registered it
_installed = False
REDACTED = "<redacted>"


def redact(text: str) -> str:
    for secret in _secrets:
        text = text.replace(secret, REDACTED)
    return text


def register_secret(secret: str) -> None:
    """Make every log record created from now on carry ``secret`` only as <redacted>.

    Platform libraries put the bot token in URLs they log (python-telegram-bot and httpx at DEBUG/INFO:
    https://api.telegram.org/bot<token>/getUpdates) and in some exception texts. A record factory catches
    all of them, whatever logger or handler the application configures later — a handler filter would
    miss handlers added afterwards and logger filters do not apply to child loggers.
    """
    global _installed
    if not secret:
        return
    _secrets[secret] = _secrets.get(secret, 0) + 1
    if not _installed:
        previous = logging.getLogRecordFactory()

        def factory(*args: object, **kwargs: object) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            if _secrets:
                _scrub(record)
            return record

        logging.setLogRecordFactory(factory)
        _installed = True


def unregister_secret(secret: str) -> None:
    count = _secrets.get(secret, 0)
    if count <= 1:
        _secrets.pop(secret, None)
    else:
        _secrets[secret] = count - 1


def _scrub(record: logging.LogRecord) -> None:
    try:
        message = record.getMessage()
    except Exception:  # a malformed record: leave it for the handler to report
        return
    clean = redact(message)
    if clean != message:
        record.msg, record.args = clean, None
    if record.exc_info and record.exc_info[1] is not None:
        text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        clean = redact(text)
        if clean != text:
            # Formatters use exc_text when set; keep exc_info for handlers that inspect the type.
            record.exc_text = clean
