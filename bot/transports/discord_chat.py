"""Discord transport on discord.py 2: slash commands, mentions, DMs and reactions in; ``Reply`` out.

It runs inside the event loop lorabot owns (``client.login`` + ``client.connect`` as a task, never
``client.run``). Replies keep Discord markdown (code blocks from the model render as code), but nothing in
them can ping anyone (``AllowedMentions.none()``), masked links ``[text](url)`` are shown literally so a
link cannot hide its target, and link previews are suppressed.

The Message Content intent is privileged: enable it for the bot in the Discord developer portal, or
mentions and DMs arrive without their text.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import datetime
from typing import Any

import discord
from discord import app_commands

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

log = logging.getLogger(__name__)

PLATFORM = "discord"
MESSAGE_LIMIT = 2000
READY_TIMEOUT_S = 60.0
GUILD_READY_TIMEOUT_S = 2.0  # after READY, how long discord.py waits for more servers to arrive
VOTES = {"👍": 1, "👎": -1}
_SKIN_TONES = re.compile("[\U0001f3fb-\U0001f3ff\ufe0f]")
_MASKED_LINK = re.compile(r"\[([^\[\]\n]*)\]\(")
_DESCRIPTIONS = dict(COMMANDS)


# ---------------------------------------------------------------------- conversion (pure)

def message_incoming(message: discord.Message, bot_id: int, *, reply_to: discord.Message | None) -> Incoming:
    """A Discord message as the core's ``Incoming``; ``reply_to`` is the message it answers, if known."""
    guild = message.guild
    mentioned = any(user.id == bot_id for user in message.mentions)
    if guild is not None and guild.self_role is not None:  # "@lorabot" picked as the bot's managed role
        mentioned = mentioned or guild.self_role in message.role_mentions
    text = re.sub(rf"<@[!&]?{bot_id}>\s*", "", message.content)
    if guild is not None and guild.self_role is not None:
        text = text.replace(guild.self_role.mention, "")
    return Incoming(
        platform=PLATFORM,
        chat_id=str(message.channel.id),
        user_id=str(message.author.id),
        text=text.strip(),
        user_name=message.author.display_name,
        message_id=str(message.id),
        reply_to_text=(reply_to.content or None) if reply_to is not None else None,
        is_group=guild is not None,
        addressed=mentioned or (reply_to is not None and reply_to.author.id == bot_id),
        guild_id=str(guild.id) if guild else None,
        roles=_roles(message.author),
    )


def interaction_incoming(interaction: discord.Interaction, text: str, *, context: str | None = None) -> Incoming:
    """A slash command as the ``Incoming`` the core would get for the same typed command."""
    return Incoming(
        platform=PLATFORM,
        chat_id=str(interaction.channel_id),
        user_id=str(interaction.user.id),
        text=text,
        user_name=interaction.user.display_name,
        message_id=str(interaction.id),
        reply_to_text=context,
        is_group=interaction.guild_id is not None,
        addressed=True,
        guild_id=str(interaction.guild_id) if interaction.guild_id else None,
        roles=_roles(interaction.user),
    )


def _roles(author: discord.User | discord.Member) -> tuple[str, ...]:
    if not isinstance(author, discord.Member):
        return ()
    return tuple(str(role.id) for role in author.roles if not role.is_default())


def vote(emoji: str) -> int | None:
    """+1/-1 for 👍/👎 in any skin tone; None for other reactions."""
    return VOTES.get(_SKIN_TONES.sub("", emoji))


def neutralise_links(text: str) -> str:
    """Show masked links ``[label](url)`` literally outside code blocks, so a link cannot hide its target."""
    parts = text.split("```")
    for i in range(0, len(parts), 2):  # even parts are outside code blocks
        parts[i] = _MASKED_LINK.sub(r"\\[\1\\](", parts[i])
    return "```".join(parts)


def split_for_discord(text: str) -> list[str]:
    # UTF-16 length is never below Discord's own count, so chunks always fit.
    return split_message(neutralise_links(text), MESSAGE_LIMIT, size=utf16_len, fences=True)


def _is_text_file(attachment: discord.Attachment) -> bool:
    kind = (attachment.content_type or "").split(";")[0].strip()
    return kind == "text/plain" or attachment.filename.lower().endswith(".txt")


# ---------------------------------------------------------------------- outboxes

class ChannelOutbox(Outbox):
    """A reply to a message: threaded under it in servers, plain in DMs."""

    def __init__(self, message: discord.Message, interval: float) -> None:
        super().__init__(interval)
        self.message = message

    def split(self, text: str) -> list[str]:
        return split_for_discord(text)

    async def send(self, text: str, *, first: bool, last: bool, partial: bool = False) -> discord.Message:
        try:
            if first and self.message.guild is not None:
                return await self.message.reply(text, mention_author=False, suppress_embeds=True)
            return await self.message.channel.send(text, suppress_embeds=True)
        except discord.Forbidden as exc:  # no permission in the channel, or the user accepts no DMs
            raise ChatUnreachable(str(exc)) from exc

    async def edit(self, handle: discord.Message, text: str, *, last: bool, partial: bool = False) -> None:
        try:
            await handle.edit(content=text)
        except discord.NotFound as exc:
            raise MessageGone(str(exc)) from exc


class InteractionOutbox(Outbox):
    """A reply to a deferred slash command: the original response grows, further chunks are follow-ups.

    If the user deletes the original response, the answer continues in a follow-up message.
    """

    def __init__(self, interaction: discord.Interaction, interval: float) -> None:
        super().__init__(interval)
        self.interaction = interaction
        self._original_gone = False

    def split(self, text: str) -> list[str]:
        return split_for_discord(text)

    async def send(self, text: str, *, first: bool, last: bool, partial: bool = False) -> discord.Message:
        if first and not self._original_gone:
            try:
                return await self.interaction.edit_original_response(content=text)
            except discord.NotFound:
                self._original_gone = True
        return await self.interaction.followup.send(text, wait=True, suppress_embeds=True)

    async def edit(self, handle: discord.Message, text: str, *, last: bool, partial: bool = False) -> None:
        try:
            if self._original_gone:  # the handle is a follow-up
                await handle.edit(content=text)
            else:
                await self.interaction.edit_original_response(content=text)
        except discord.NotFound as exc:
            self._original_gone = True
            raise MessageGone(str(exc)) from exc


# ---------------------------------------------------------------------- the transport

class _Client(discord.Client):
    def __init__(self, transport: DiscordTransport, **options: Any) -> None:
        super().__init__(**options)
        self.transport = transport

    async def setup_hook(self) -> None:
        await self.transport.sync_commands()

    async def on_message(self, message: discord.Message) -> None:
        await self.transport.on_message(message)

    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        await self.transport.on_reaction(payload, added=True)

    async def on_raw_reaction_remove(self, payload: discord.RawReactionActionEvent) -> None:
        await self.transport.on_reaction(payload, added=False)


class DiscordTransport:
    """Connects the core to one Discord bot; ``start()``/``stop()`` inside a running event loop."""

    def __init__(self, core: Core, config: Config, token: str) -> None:
        if not token:
            raise LorabotError(f"no Discord bot token: set the {config.discord.token_env} environment variable")
        self.core, self.config, self._token = core, config, token
        # lorabot never joins voice channels: skip discord.py's warnings about voice libraries.
        discord.VoiceClient.warn_nacl = discord.VoiceClient.warn_dave = False
        intents = discord.Intents.default()
        intents.message_content = True
        self.client = _Client(
            self, intents=intents, allowed_mentions=discord.AllowedMentions.none(),
            guild_ready_timeout=GUILD_READY_TIMEOUT_S,
        )
        self.tree = app_commands.CommandTree(self.client)
        self.tree.on_error = self._on_command_error  # type: ignore[method-assign]
        self._register_commands()
        self._locks = ChatLocks()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._refresh: asyncio.Task[None] | None = None
        self._sync_lock = asyncio.Lock()
        self._serving = False
        # Resolves with the reason when the gateway connection ends on its own, for good: discord.py
        # reconnects (with backoff) after network trouble, so this means a fatal close or a crash.
        self.lost: asyncio.Future[str] | None = None
        core.reload_listeners.append(self._adapters_reloaded)

    @property
    def interval(self) -> float:
        return self.config.discord.edit_interval_s

    async def start(self) -> None:
        register_secret(self._token)
        try:
            await self.client.login(self._token)  # also syncs the slash commands (setup_hook)
        except discord.LoginFailure:
            await self.stop()
            raise LorabotError(f"Discord rejected the bot token (check {self.config.discord.token_env})") from None
        except (discord.HTTPException, OSError) as exc:
            await self.stop()
            raise LorabotError(f"cannot reach Discord: {redact(str(exc))}") from None
        self.lost = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self.client.connect(), name="lorabot-discord")
        self._task.add_done_callback(self._connection_ended)
        ready = asyncio.create_task(self.client.wait_until_ready())
        done, _ = await asyncio.wait({self._task, ready}, timeout=READY_TIMEOUT_S, return_when="FIRST_COMPLETED")
        if ready not in done:
            ready.cancel()
            error = self._task.exception() if self._task in done else None
            await self.stop()
            if isinstance(error, discord.PrivilegedIntentsRequired):
                raise LorabotError("Discord refused the Message Content intent: enable it for the bot in the "
                                   "Discord developer portal (Bot → Privileged Gateway Intents)")
            raise LorabotError(f"could not connect to the Discord gateway: {redact(str(error or 'timed out'))}")
        self._serving = True
        log.info("Discord bot %s is running", self.client.user)
        if self._task.done():  # it ended in the same moment it became ready
            self._connection_ended(self._task)

    async def stop(self) -> None:
        self._stopping = True
        with contextlib.suppress(ValueError):
            self.core.reload_listeners.remove(self._adapters_reloaded)
        try:
            if self._refresh is not None:
                self._refresh.cancel()
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await self._refresh
            await self.client.close()
            if self._task is not None:
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await self._task
                self._task = None
        finally:
            unregister_secret(self._token)

    def _connection_ended(self, task: asyncio.Task[None]) -> None:
        if self._stopping or not self._serving or self.lost is None or self.lost.done():
            return  # asked to stop, or start() reports the failure itself
        error = None if task.cancelled() else task.exception()
        if isinstance(error, discord.ConnectionClosed):
            reason = f"the Discord gateway closed the connection with code {error.code} ({redact(str(error))})"
        elif error is not None:
            reason = f"the Discord connection failed: {type(error).__name__}: {redact(str(error))}"
        else:
            reason = "the Discord connection ended"
        log.error("%s", reason, exc_info=error)
        self.lost.set_result(reason)

    # ------------------------------------------------------------------ slash commands
    def commands_payload(self) -> list[dict[str, Any]]:
        """What a sync sends to Discord: every command with its options and choices."""
        return [command.to_dict(self.tree) for command in self.tree.get_commands()]

    async def sync_commands(self) -> None:
        """Register the slash commands with Discord unless the very same definition was synced before.

        Discord limits how often commands may be re-registered, and a sync at every start would spend
        that on nothing. The hash of what was synced is kept in the database, per application.
        """
        async with self._sync_lock:
            payload = json.dumps(self.commands_payload(), sort_keys=True, ensure_ascii=False)
            digest = hashlib.sha256(payload.encode()).hexdigest()
            key = f"discord.commands_synced.{self.client.application_id}"
            if await self.core.store.get_setting(key) == digest:
                log.info("Discord slash commands unchanged since the last sync; not synced again")
                return
            try:
                await self.tree.sync()
            except discord.HTTPException as exc:  # mentions and DMs still work without them
                log.warning("could not register the slash commands: %s", exc)
                return
            await self.core.store.set_setting(key, digest)
            log.info("Discord slash commands synced")

    async def _adapters_reloaded(self) -> None:
        # The /mode and /compare choices list the adapters: rebuild them, and sync if they changed.
        # In the background, so the /reload answer does not wait for Discord.
        if self._stopping:
            return
        self.tree.clear_commands(guild=None)
        self._register_commands()
        previous = self._refresh

        async def refresh() -> None:
            if previous is not None:
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await previous
            try:
                await self.sync_commands()
            except Exception:
                log.exception("could not refresh the Discord slash commands after /reload")

        self._refresh = asyncio.create_task(refresh(), name="lorabot-discord-commands")

    def _register_commands(self) -> None:
        """One slash command per core command, with typed options; each becomes the same typed command."""
        modes = self.core.modes()
        tree, run = self.tree, self.slash
        mode_choices = [app_commands.Choice(name=m, value=m) for m in list(modes)[:25]]
        skill_choices = [app_commands.Choice(name=m, value=m) for m, task in modes.items() if task != "chat"][:25]

        def command(name: str) -> Any:
            return tree.command(name=name, description=_DESCRIPTIONS[name][:100])

        for name in ("help", "skills", "reset", "stats", "reload"):  # no options
            tree.add_command(app_commands.Command(
                name=name, description=_DESCRIPTIONS[name][:100], callback=_bind(run, f"/{name}"),
            ))

        @command("forget")
        async def forget(interaction: discord.Interaction) -> None:
            await run(interaction, "/forget", ephemeral=True)  # about the user alone: not for the channel

        @command("sentiment")
        @app_commands.describe(text="the text to classify")
        async def sentiment(interaction: discord.Interaction, text: str) -> None:
            await run(interaction, f"/sentiment {text}")

        @command("ner")
        @app_commands.describe(text="the text to search for names")
        async def ner(interaction: discord.Interaction, text: str) -> None:
            await run(interaction, f"/ner {text}")

        @command("ask")
        @app_commands.describe(question="your question", context="the text that holds the answer",
                               file="a .txt file that holds the answer")
        async def ask(interaction: discord.Interaction, question: str, context: str | None = None,
                      file: discord.Attachment | None = None) -> None:
            await run(interaction, f"/ask {question}", context=context, file=file)

        @command("story")
        @app_commands.describe(prompt="what the story is about, or its first words")
        async def story(interaction: discord.Interaction, prompt: str) -> None:
            await run(interaction, f"/story {prompt}")

        @command("chat")
        @app_commands.describe(message="what you want to say")
        async def chat(interaction: discord.Interaction, message: str) -> None:
            await run(interaction, f"/chat {message}")

        @command("compare")
        @app_commands.describe(skill="the skill to compare", text="the text to try it on")
        @app_commands.choices(skill=skill_choices)
        async def compare(interaction: discord.Interaction, skill: str, text: str) -> None:
            await run(interaction, f"/compare {skill} {text}")

        @command("mode")
        @app_commands.describe(skill="what plain messages (mentions, DMs) should do; empty: show the mode")
        @app_commands.choices(skill=mode_choices)
        async def mode(interaction: discord.Interaction, skill: str | None = None) -> None:
            await run(interaction, f"/mode {skill or ''}".strip())

    async def slash(
        self, interaction: discord.Interaction, text: str, *, context: str | None = None,
        file: discord.Attachment | None = None, ephemeral: bool = False,
    ) -> None:
        # Discord wants an answer within 3 s; the model may need longer, so show "thinking…" first.
        await interaction.response.defer(thinking=True, ephemeral=ephemeral)
        incoming = interaction_incoming(interaction, text, context=context)
        outbox = InteractionOutbox(interaction, self.interval)
        if file is not None:
            if not _is_text_file(file):
                await outbox.finish("Please attach a .txt file.")
                return
            if file.size > TEXT_FILE_LIMIT:
                await outbox.finish(file_too_large(file.size))
                return
            try:
                incoming = _with_attachment(incoming, decode_text_file(await file.read()))
            except discord.HTTPException as exc:
                log.warning("could not download an attachment: %s", exc)
                await outbox.finish("Sorry, I could not download that file; please try again.")
                return
        await self._answer(incoming, outbox)

    async def _on_command_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        log.error("slash command /%s failed: %s", interaction.command.name if interaction.command else "?", error,
                  exc_info=error)

    # ------------------------------------------------------------------ messages and reactions
    async def on_message(self, message: discord.Message) -> None:
        me = self.client.user
        if me is None or message.author.bot or message.is_system():
            return  # our own and other bots' messages, joins, pins…
        if message.guild is not None and not _may_concern_us(message, me.id):
            return  # most server chatter: decide without fetching anything
        reply_to = await self._referenced(message)
        incoming = message_incoming(message, me.id, reply_to=reply_to)
        outbox = ChannelOutbox(message, self.interval)
        wanted = incoming.text and (incoming.addressed or not incoming.is_group)
        text_file = _text_attachment(message, reply_to) if wanted else None
        if text_file is not None and self.core.access.allowed(incoming):
            if text_file.size > TEXT_FILE_LIMIT:
                await self._deliver(incoming, outbox, file_too_large(text_file.size))
                return
            incoming = _with_attachment(incoming, decode_text_file(await text_file.read()))
        await self._answer(incoming, outbox, typing=lambda: message.channel.typing(), written_at=message.created_at)

    async def _referenced(self, message: discord.Message) -> discord.Message | None:
        ref = message.reference
        if ref is None or ref.message_id is None:
            return None
        if isinstance(ref.resolved, discord.Message):
            return ref.resolved
        if isinstance(ref.resolved, discord.DeletedReferencedMessage):
            return None
        try:  # Discord omits the referenced message sometimes; fetch it for the QA context
            return await message.channel.fetch_message(ref.message_id)
        except discord.HTTPException as exc:
            log.info("could not fetch the replied-to message: %s", exc)
            return None

    async def on_reaction(self, payload: discord.RawReactionActionEvent, *, added: bool) -> None:
        """A 👍/👎 on one of our replies is a vote, removing it takes the vote back. The reply is found
        through the database, so votes on answers given before a restart count too."""
        me = self.client.user
        value = vote(str(payload.emoji))
        if me is None or payload.user_id == me.id or value is None:
            return
        reply_id = await self.core.store.sent_reply(PLATFORM, str(payload.channel_id), str(payload.message_id))
        if reply_id is None:
            return  # not one of our replies
        user = str(payload.user_id)
        if added:
            result = await self.core.feedback(PLATFORM, user, reply_id, value)
        else:
            result = "retracted" if await self.core.retract_feedback(PLATFORM, user, reply_id, value) else "no vote"
        log.debug("feedback on reply %s: %s", reply_id, result)

    # ------------------------------------------------------------------ answering
    async def _answer(
        self, incoming: Incoming, outbox: Outbox, typing: Callable[[], Awaitable[Any]] | None = None,
        written_at: datetime | None = None,
    ) -> None:
        async with self._locks.hold(incoming.chat_id):
            try:
                # Checked in turn: messages queued behind the reply that found the channel closed wait here.
                if written_at is not None and not await self.core.store.chat_reachable(
                        PLATFORM, incoming.chat_id, written_at):
                    log.info("Discord channel %s refuses the bot; not answering a message written before that",
                             incoming.chat_id)
                    return
                async with typing_indicator(typing) if typing else contextlib.nullcontext():
                    reply = await self.core.handle(incoming, stream=outbox.stream)
            except Exception:
                await outbox.abandon()
                log.exception("could not answer a Discord message")
                # Last resort for failures outside the core's own handling (e.g. the database is down).
                await self._deliver(incoming, outbox, "Sorry, something went wrong on my side; please try again later.")
                return
            if reply is None:
                await outbox.abandon()
                if isinstance(outbox, InteractionOutbox):
                    await outbox.interaction.delete_original_response()
                return
            handles = await self._deliver(incoming, outbox, reply.text)
        if reply.feedback and reply.message_id is not None and handles:
            await self.core.store.remember_sent(PLATFORM, incoming.chat_id, [str(h.id) for h in handles],
                                                reply.message_id)
            for emoji in VOTES:  # offered on the last message; a vote on any part counts
                try:
                    await handles[-1].add_reaction(emoji)
                except discord.HTTPException as exc:  # e.g. no Add Reactions permission: still answered
                    log.info("could not add the feedback reactions: %s", exc)
                    break

    async def _deliver(self, incoming: Incoming, outbox: Outbox, text: str) -> list[Any]:
        """The final text; a channel that refuses the bot is marked, so nothing more is attempted there
        until someone writes in it again."""
        try:
            return await outbox.finish(text)
        except ChatUnreachable as exc:
            log.info("Discord channel %s cannot be reached (%s); marked", incoming.chat_id, exc)
            await self.core.store.mark_unreachable(PLATFORM, incoming.chat_id, str(exc))
            return []


def _bind(run: Any, text: str) -> Any:
    async def callback(interaction: discord.Interaction) -> None:
        await run(interaction, text)

    return callback


def _may_concern_us(message: discord.Message, bot_id: int) -> bool:
    guild = message.guild
    role = guild.self_role if guild is not None else None
    return (
        any(user.id == bot_id for user in message.mentions)
        or (role is not None and role in message.role_mentions)
        or message.reference is not None
    )


def _text_attachment(message: discord.Message, reply_to: discord.Message | None) -> discord.Attachment | None:
    for candidate in (message, reply_to):
        for attachment in candidate.attachments if candidate is not None else ():
            if _is_text_file(attachment):
                return attachment
    return None


def _with_attachment(incoming: Incoming, text: str) -> Incoming:
    return replace(incoming, attachment_text=text)
