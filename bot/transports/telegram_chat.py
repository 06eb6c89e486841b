"""Telegram transport on python-telegram-bot 22: updates in, ``Incoming`` to the core, ``Reply`` back out.

It runs inside the event loop lorabot owns (``Application.initialize/start`` and ``updater.start_polling``,
never ``run_polling``, which would take over the loop and signal handling). Replies are sent as plain text
with no ``parse_mode``: whatever a user or the model writes (``<b>``, ``*bold*``, ``[link](x)``) is shown
literally and can never break a message's formatting, so nothing needs escaping.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import timedelta
from typing import Any, TypeVar

from aiohttp import web
from telegram import (
    BotCommand,
    CallbackQuery,
    Document,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    LinkPreviewOptions,
    Message,
    MessageEntity,
    ReplyParameters,
    Update,
)
from telegram.constants import ChatAction, ChatType, MessageLimit
from telegram.error import BadRequest, ChatMigrated, Forbidden, InvalidToken, NetworkError, RetryAfter, TelegramError
from telegram.ext import Application, ContextTypes, TypeHandler, filters
from telegram.warnings import PTBDeprecationWarning

from bot.config import Config
from bot.core import COMMANDS, Core
from bot.errors import LorabotError
from bot.messages import Incoming
from bot.transports.common import (
    TEXT_FILE_LIMIT,
    ChatLocks,
    decode_text_file,
    file_too_large,
    redact,
    register_secret,
    unregister_secret,
)
from bot.transports.outbox import ChatUnreachable, MessageGone, Outbox, typing_indicator
from bot.transports.split import split_message, utf16_len
from bot.transports.telegram_pacing import TelegramLimits, TelegramPacer

log = logging.getLogger(__name__)
T = TypeVar("T")

PLATFORM = "telegram"
ALLOWED_UPDATES = ["message", "edited_message", "callback_query"]
POLL_TIMEOUT_S = 30          # long-poll duration; stop() cancels a poll in flight
POLLING_TASK = "Updater:start_polling:polling_task"  # the name PTB 22 gives its polling loop's task
SEND_ATTEMPTS = 5
NO_PREVIEW = LinkPreviewOptions(is_disabled=True)  # links in model output must not unfurl into cards
_FEEDBACK = re.compile(r"fb:(\d{1,18}):(1|-1)")
# BadRequest texts for an edit whose message is gone (deleted, or too old to edit): post anew instead.
_EDIT_GONE = ("message to edit not found", "message can't be edited")


# ---------------------------------------------------------------------- conversion (pure)

def to_incoming(message: Message, *, bot_id: int, bot_username: str, edited: bool = False) -> Incoming:
    """A Telegram message as the core's ``Incoming`` (text or caption; stickers/photos give "")."""
    chat = message.chat
    user = message.from_user
    is_group = chat.type in (ChatType.GROUP, ChatType.SUPERGROUP)
    text = message.text or message.caption or ""
    replied = message.reply_to_message
    addressed = (
        _is_our_command(text, bot_username)
        or _mentions(message, bot_id, bot_username)
        or (replied is not None and replied.from_user is not None and replied.from_user.id == bot_id)
    )
    if bot_username:  # "@lorabot what is…" reaches the core as "what is…"
        text = re.sub(rf"(?i)(?<!\w)@{re.escape(bot_username)}\b[,:]?\s*", "", text).strip()
    reply_to_text = None
    if message.quote is not None and message.quote.text:  # the user quoted part of a message: use that
        reply_to_text = message.quote.text
    elif replied is not None:
        reply_to_text = replied.text or replied.caption or None
    return Incoming(
        platform=PLATFORM,
        chat_id=str(chat.id),
        user_id=str(user.id) if user else "",
        text=text,
        user_name=user.full_name if user else None,
        message_id=str(message.message_id),
        reply_to_text=reply_to_text,
        is_group=is_group,
        addressed=addressed,
        edited=edited,
    )


def _is_our_command(text: str, bot_username: str) -> bool:
    """A /command; in groups "/cmd@otherbot" is meant for another bot."""
    if not text.startswith("/"):
        return False
    head = text.split(maxsplit=1)[0]
    _, at, target = head.partition("@")
    return not at or target.lower() == bot_username.lower()


def _mentions(message: Message, bot_id: int, bot_username: str) -> bool:
    types = [MessageEntity.MENTION, MessageEntity.TEXT_MENTION]
    found = message.parse_entities(types) if message.text else message.parse_caption_entities(types)
    for entity, text in found.items():
        if entity.type == MessageEntity.MENTION and text[1:].lower() == bot_username.lower():
            return True
        if entity.type == MessageEntity.TEXT_MENTION and entity.user is not None and entity.user.id == bot_id:
            return True
    return False


def feedback_markup(reply_id: int) -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup([[
        InlineKeyboardButton("👍", callback_data=f"fb:{reply_id}:1"),
        InlineKeyboardButton("👎", callback_data=f"fb:{reply_id}:-1"),
    ]])


def parse_feedback(data: str | None) -> tuple[int, int] | None:
    """(stored reply id, ±1) from button data; None for anything else (clients can send any data)."""
    match = _FEEDBACK.fullmatch(data or "")
    return (int(match[1]), int(match[2])) if match else None


def _text_document(message: Message) -> Document | None:
    """A .txt document on the message itself or on the message it replies to (QA context)."""
    for candidate in (message, message.reply_to_message):
        doc = candidate.document if candidate is not None else None
        if doc is not None and (doc.mime_type == "text/plain" or (doc.file_name or "").lower().endswith(".txt")):
            return doc
    return None


# ---------------------------------------------------------------------- sending

def retry_after_seconds(exc: RetryAfter) -> float:
    """The wait Telegram named, through the public attribute (an int or a timedelta, by PTB's setting)."""
    with warnings.catch_warnings():
        # PTB 22 warns that the attribute becomes a timedelta; both forms are handled here.
        warnings.simplefilter("ignore", PTBDeprecationWarning)
        value = exc.retry_after
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    return seconds if seconds > 0 else 1.0


async def retrying(call: Callable[[], Awaitable[T]], what: str, attempts: int = SEND_ATTEMPTS) -> T:
    """Run a Bot API call, retrying flood-control answers (after the time Telegram names), timeouts,
    network errors and 5xx (with backoff), so a reply is not lost to a transient failure.

    Client errors (400/403) are final. A timed-out send may in rare cases have been delivered already;
    Telegram offers no idempotency key, and a rare duplicate beats a lost reply.
    """
    backoff = 0.5
    for attempt in range(1, attempts + 1):
        try:
            return await call()
        except RetryAfter as exc:
            error: TelegramError = exc
            wait = retry_after_seconds(exc) + 0.1
        except (BadRequest, Forbidden, InvalidToken, ChatMigrated):
            raise
        except NetworkError as exc:  # includes TimedOut and 5xx answers
            error, wait = exc, backoff
            backoff *= 2
        if attempt == attempts:
            raise error
        log.warning("Telegram %s failed (%s); retry %d in %.1f s", what, error, attempt, wait)
        await asyncio.sleep(wait)
    raise AssertionError("unreachable")


ChatMoved = Callable[[int, int], Awaitable[None]]
"""Told (old chat id, new chat id) when Telegram says a group became a supergroup."""


class TelegramOutbox(Outbox):
    """One reply in one chat: threaded under the user's message in groups, feedback buttons on the last.

    A group upgraded to a supergroup is followed to its new id (Telegram refuses the old one from then
    on); a chat that refuses the bot (blocked, removed) ends the reply with ``ChatUnreachable``.
    """

    marks_last = True

    def __init__(self, app: Application, chat_id: int, *, reply_to: int | None, thread_id: int | None,
                 interval: float, moved: ChatMoved | None = None):
        super().__init__(interval)
        self.app, self.chat_id, self.reply_to, self.thread_id = app, chat_id, reply_to, thread_id
        self.markup: InlineKeyboardMarkup | None = None
        self._moved = moved

    def split(self, text: str) -> list[str]:
        return split_message(text, MessageLimit.MAX_TEXT_LENGTH, size=utf16_len, fences=False)

    def backoff(self, exc: BaseException) -> float | None:
        return retry_after_seconds(exc) if isinstance(exc, RetryAfter) else None

    async def _follow(self, exc: ChatMigrated) -> None:
        old, self.chat_id = self.chat_id, exc.new_chat_id
        self.reply_to = None  # message ids are per chat: the old one means nothing in the new chat
        log.info("Telegram chat %s became supergroup %s; following it", old, self.chat_id)
        if self._moved is not None:
            await self._moved(old, self.chat_id)

    async def send(self, text: str, *, first: bool, last: bool, partial: bool = False) -> Message:
        def call() -> Awaitable[Message]:
            reply = ReplyParameters(self.reply_to, allow_sending_without_reply=True) if (
                first and self.reply_to) else None
            return self.app.bot.send_message(
                self.chat_id, text, reply_parameters=reply, message_thread_id=self.thread_id,
                reply_markup=self.markup if last else None, link_preview_options=NO_PREVIEW,
            )

        for _ in range(2):  # a chat moves once: the second try goes to the supergroup
            try:
                # A partial text is not worth retrying: the pump shows newer text after the backoff instead.
                return await (call() if partial else retrying(call, "sendMessage"))
            except ChatMigrated as exc:
                await self._follow(exc)
            except Forbidden as exc:
                raise ChatUnreachable(str(exc)) from exc
        raise ChatUnreachable(f"chat {self.chat_id} keeps moving")

    async def edit(self, handle: Message, text: str, *, last: bool, partial: bool = False) -> None:
        def call() -> Awaitable[Any]:
            return self.app.bot.edit_message_text(
                text, chat_id=self.chat_id, message_id=handle.message_id,
                reply_markup=self.markup if last else None, link_preview_options=NO_PREVIEW,
            )

        try:
            await (call() if partial else retrying(call, "editMessageText"))
        except ChatMigrated as exc:  # the message stays behind in the old group
            await self._follow(exc)
            raise MessageGone(str(exc)) from exc
        except Forbidden as exc:
            raise ChatUnreachable(str(exc)) from exc
        except BadRequest as exc:
            reason = str(exc).lower()
            if any(gone in reason for gone in _EDIT_GONE):
                raise MessageGone(str(exc)) from exc
            if "not modified" not in reason:
                raise


# ---------------------------------------------------------------------- the transport

class TelegramTransport:
    """Connects the core to one Telegram bot; ``start()``/``stop()`` inside a running event loop."""

    def __init__(self, core: Core, config: Config, token: str, *, limits: TelegramLimits | None = None) -> None:
        if not token:
            raise LorabotError(f"no Telegram bot token: set the {config.telegram.token_env} environment variable")
        self.core, self.config, self._token = core, config, token
        self.limits = limits or TelegramLimits()
        # Resolves with the reason when updates stop arriving for good (see _watch_polling).
        self.lost: asyncio.Future[str] | None = None
        self.app: Application | None = None
        self._locks = ChatLocks()
        self._webhook: web.AppRunner | None = None
        self.bot_id = 0
        self.bot_username = ""

    def _build(self) -> Application:
        builder = Application.builder().token(self._token).concurrent_updates(True)
        builder = builder.rate_limiter(TelegramPacer(self.limits))
        root = self.config.telegram.base_url.rstrip("/")
        if root:  # a self-hosted Bot API server (or a test server): "http://host:port"
            root = root.removesuffix("/bot")
            builder = builder.base_url(f"{root}/bot{{token}}").base_file_url(f"{root}/file/bot{{token}}")
        if self.config.telegram.mode == "webhook":
            builder = builder.updater(None)  # updates arrive on our own web server instead
        return builder.build()

    async def start(self) -> None:
        register_secret(self._token)
        tg = self.config.telegram
        if tg.mode == "webhook" and not tg.webhook_url:
            raise LorabotError("telegram.mode is 'webhook' but telegram.webhook_url is empty")
        self.lost = asyncio.get_running_loop().create_future()
        app = self.app = self._build()
        app.add_handler(TypeHandler(Update, self._on_update))
        app.add_error_handler(self._on_error)
        try:
            await app.initialize()  # getMe: checks the token
        except InvalidToken:
            raise LorabotError(f"Telegram rejected the bot token (check {tg.token_env})") from None
        except TelegramError as exc:
            raise LorabotError(f"cannot reach the Telegram Bot API: {redact(str(exc))}") from None
        self.bot_id, self.bot_username = app.bot.id, app.bot.username or ""
        try:
            await retrying(lambda: app.bot.set_my_commands([BotCommand(n, d) for n, d in COMMANDS]), "setMyCommands")
        except TelegramError as exc:  # the menu is a convenience; the bot works without it
            log.warning("could not register the command menu: %s", exc)
        await app.start()
        if tg.mode == "webhook":
            await self._start_webhook()
        else:
            assert app.updater is not None
            before = asyncio.all_tasks()
            await app.updater.start_polling(
                timeout=POLL_TIMEOUT_S, allowed_updates=ALLOWED_UPDATES, bootstrap_retries=3,
            )
            self._watch_polling(asyncio.all_tasks() - before)
        log.info("Telegram bot @%s is running (%s)", self.bot_username, tg.mode)

    def _watch_polling(self, new_tasks: set[asyncio.Task[Any]]) -> None:
        """Resolve ``lost`` when PTB's polling loop ends on its own. PTB retries network errors and 5xx
        forever, but gives up on a token Telegram no longer accepts (revoked in @BotFather), and then the
        bot would stay up without receiving anything."""
        polling = [t for t in new_tasks if t.get_name() == POLLING_TASK]
        lost = self.lost
        if not polling or lost is None:
            log.debug("PTB's polling task was not found; a lost connection will not end the process")
            return

        def ended(task: asyncio.Task[Any]) -> None:
            if self.app is None or lost.done():
                return  # stop() was called: an ordinary end
            error = None if task.cancelled() else task.exception()
            detail = f"{type(error).__name__}: {redact(str(error))}" if error is not None else "it stopped"
            reason = f"Telegram polling ended ({detail})"
            log.error("%s", reason)
            lost.set_result(reason)

        polling[0].add_done_callback(ended)

    async def stop(self) -> None:
        app, self.app = self.app, None
        try:
            if self._webhook is not None:
                await self._webhook.cleanup()
                self._webhook = None
            if app is not None:
                if app.updater is not None and app.updater.running:
                    try:
                        await app.updater.stop()
                    except TelegramError as exc:  # the polling loop's own end (e.g. a revoked token)
                        log.info("Telegram polling had ended: %s", redact(str(exc)))
                if app.running:
                    await app.stop()  # waits for replies being written
                await app.shutdown()
        finally:
            unregister_secret(self._token)

    # ------------------------------------------------------------------ webhook mode
    @property
    def webhook_secret(self) -> str:
        # Stable across restarts (updates Telegram is retrying stay valid) and reveals nothing of the token.
        return hashlib.sha256(b"lorabot-webhook:" + self._token.encode()).hexdigest()

    async def _start_webhook(self) -> None:
        from yarl import URL

        tg, app = self.config.telegram, self.app
        assert app is not None
        path = URL(tg.webhook_url).path or "/"

        async def receive(request: web.Request) -> web.Response:
            given = request.headers.get("X-Telegram-Bot-Api-Secret-Token", "")
            if not hmac.compare_digest(given.encode(), self.webhook_secret.encode()):  # constant time
                return web.Response(status=403)
            try:
                update = Update.de_json(await request.json(), app.bot)
            except Exception:
                return web.Response(status=400)
            await app.update_queue.put(update)
            return web.Response()

        web_app = web.Application()
        web_app.router.add_post(path, receive)
        runner = web.AppRunner(web_app, shutdown_timeout=2.0)
        await runner.setup()
        await web.TCPSite(runner, tg.webhook_listen, tg.webhook_port).start()
        self._webhook = runner
        await retrying(lambda: app.bot.set_webhook(
            tg.webhook_url, secret_token=self.webhook_secret, allowed_updates=ALLOWED_UPDATES,
        ), "setWebhook")

    # ------------------------------------------------------------------ updates
    async def _on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        log.error("error while handling a Telegram update: %s", context.error, exc_info=context.error)

    async def _on_update(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        if update.callback_query is not None:
            await self._on_callback(update.callback_query)
            return
        message = update.message or update.edited_message
        if message is not None and (message.migrate_to_chat_id or message.migrate_from_chat_id):
            # Telegram's notice that a group became a supergroup (in both chats): the chat moves with it.
            if message.migrate_to_chat_id:
                await self._chat_moved(message.chat_id, message.migrate_to_chat_id)
            else:
                await self._chat_moved(message.migrate_from_chat_id, message.chat_id)
            return
        if message is None or message.from_user is None or message.from_user.is_bot:
            return  # channel posts, anonymous admins' and other bots' messages are not conversations
        if filters.StatusUpdate.ALL.check_update(update):
            return  # "X joined", pinned messages and other service messages
        await self._on_message(message, edited=update.edited_message is not None)

    async def _on_message(self, message: Message, *, edited: bool) -> None:
        app = self.app
        assert app is not None
        incoming = to_incoming(message, bot_id=self.bot_id, bot_username=self.bot_username, edited=edited)
        in_group = incoming.is_group
        outbox = TelegramOutbox(
            app, message.chat_id, reply_to=message.message_id if in_group else None,
            thread_id=message.message_thread_id if message.is_topic_message else None,
            interval=self.config.telegram.edit_interval_s, moved=self._chat_moved,
        )
        async with self._locks.hold(incoming.chat_id):
            try:
                # Checked in turn: messages queued behind the reply that found the bot blocked wait here.
                written = message.edit_date or message.date
                if not await self.core.store.chat_reachable(PLATFORM, incoming.chat_id, written):
                    log.info("Telegram chat %s refuses the bot; not answering a message written before that",
                             incoming.chat_id)
                    return
                incoming, refusal = await self._attach_file(message, incoming)
                if refusal:
                    await self._deliver(outbox, refusal)
                    return
                async with typing_indicator(lambda: app.bot.send_chat_action(
                    outbox.chat_id, ChatAction.TYPING, message_thread_id=outbox.thread_id,
                )):
                    reply = await self.core.handle(incoming, stream=outbox.stream)
            except Exception:
                await outbox.abandon()
                log.exception("could not answer a Telegram message")
                # The core turns its own failures into replies; this is the last resort for the rest
                # (e.g. the database is unavailable), so the user is not left waiting in silence.
                if not (in_group and not incoming.addressed) and not edited:
                    await self._deliver(outbox, "Sorry, something went wrong on my side; please try again later.")
                return
            if reply is None:
                await outbox.abandon()
                return
            if reply.feedback and reply.message_id is not None:
                outbox.markup = feedback_markup(reply.message_id)
            await self._deliver(outbox, reply.text)

    async def _deliver(self, outbox: TelegramOutbox, text: str) -> None:
        """The final text; a chat that refuses the bot is marked, so nothing more is attempted there
        until it writes again."""
        try:
            await outbox.finish(text)
        except ChatUnreachable as exc:
            log.info("Telegram chat %s cannot be reached (%s); marked", outbox.chat_id, exc)
            await self.core.store.mark_unreachable(PLATFORM, str(outbox.chat_id), str(exc))

    async def _chat_moved(self, old: int, new: int) -> None:
        moved = await self.core.store.migrate_chat(PLATFORM, str(old), str(new))
        if moved is not None:
            log.info("Telegram group %s is now supergroup %s: its mode and history moved with it", old, new)

    async def _attach_file(self, message: Message, incoming: Incoming) -> tuple[Incoming, str | None]:
        """Download a .txt document (sent with, or replied to by, a text message) as QA context."""
        doc = _text_document(message)
        wanted = incoming.text.strip() and not incoming.edited and (incoming.addressed or not incoming.is_group)
        if doc is None or not wanted:
            return incoming, None
        if not self.core.access.allowed(incoming):
            return incoming, None  # the core refuses; do not touch the file
        if doc.file_size and doc.file_size > TEXT_FILE_LIMIT:
            return incoming, file_too_large(doc.file_size)
        app = self.app
        assert app is not None
        file = await retrying(lambda: app.bot.get_file(doc.file_id), "getFile")
        data = await retrying(file.download_as_bytearray, "file download")
        if len(data) > TEXT_FILE_LIMIT:
            return incoming, file_too_large(len(data))
        return replace(incoming, attachment_text=decode_text_file(bytes(data))), None

    async def _on_callback(self, query: CallbackQuery) -> None:
        parsed = parse_feedback(query.data)
        if parsed is None:
            text = "That button is no longer valid."
        else:
            text = await self.core.feedback(PLATFORM, str(query.from_user.id), *parsed)
        await retrying(lambda: query.answer(text), "answerCallbackQuery")
