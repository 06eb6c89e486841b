"""The conversation logic, independent of any platform.

A transport turns a platform update into an ``Incoming`` and calls ``Core.handle``; it gets back a
``Reply`` (or None: stay silent) and renders it. Streaming replies report their text so far through
an optional callback. Access rules, rate limits, commands, modes, history and logging all live here,
so every transport behaves the same and all of it is testable without a network.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from bot.access import Access
from bot.adapters import AdapterInfo
from bot.config import Config
from bot.engine import Engine, SamplingParams
from bot.errors import LorabotError, UserInputError
from bot.messages import Incoming, Reply, SkillResult, Text, Usage
from bot.qa_answer import answer
from bot.render import render, render_compare
from bot.sanitize import clean_input
from bot.skills import (
    SKILLS,
    ChatFormat,
    NERFormat,
    QAFormat,
    SentimentFormat,
    StoryFormat,
)

log = logging.getLogger(__name__)

StreamSink = Callable[[str], Awaitable[None]]
"""Receives the reply text so far while a streamed answer is being generated."""

SKILL_COMMANDS = {"chat": "chat", "sentiment": "sentiment", "ner": "ner", "ask": "qa", "qa": "qa", "story": "story"}
COMMANDS: list[tuple[str, str]] = [
    ("help", "what I can do"),
    ("skills", "the skills and their adapters"),
    ("mode", "set what plain messages do: /mode <skill>"),
    ("chat", "talk with the base model"),
    ("sentiment", "positive / negative / neutral"),
    ("ner", "find names of people, places, organisations"),
    ("ask", "answer a question about a text"),
    ("story", "write a short story"),
    ("compare", "base model vs fine-tuned: /compare <skill> <text>"),
    ("reset", "start the conversation afresh"),
    ("forget", "delete everything stored about you"),
    ("stats", "usage statistics"),
    ("reload", "reload adapters (admins)"),
]


@dataclass(frozen=True)
class _Outcome:
    result: SkillResult
    text: str
    adapter: str | None
    usage: Usage


class Core:
    def __init__(self, config: Config, engine: Engine, store: object, *, access: Access | None = None):
        self.config = config
        self.engine = engine
        self.store = store  # bot.store.AsyncStore (duck-typed so tests can pass any real store)
        self.access = access or Access(config.access)
        # Called after every /reload (from any platform), e.g. to refresh a platform's command choices.
        self.reload_listeners: list[Callable[[], Awaitable[None]]] = []

    # ----------------------------------------------------------------- skills and adapters
    def modes(self) -> dict[str, str]:
        """Every mode a chat can be in: built-in skills plus extra adapters by name -> task."""
        modes = {name: info.task for name, info in SKILLS.items()}
        for name, info in self.engine.adapters.items():
            modes.setdefault(name, info.task)
        return modes

    def adapter_for(self, mode: str) -> AdapterInfo | None:
        """The adapter serving ``mode``: one of that name, else the first of the mode's task; chat: none."""
        task = self.modes().get(mode)
        adapters = self.engine.adapters
        if mode in adapters and adapters[mode].task == task and mode != "chat":
            return adapters[mode]
        if task == "chat" and mode == "chat":
            return None
        return next((a for a in adapters.values() if a.task == task), None)

    # ----------------------------------------------------------------- entry points
    async def handle(self, msg: Incoming, stream: StreamSink | None = None) -> Reply | None:
        """Answer one incoming message; None means the bot stays silent (e.g. not addressed in a group)."""
        if msg.edited or (msg.is_group and not msg.addressed):
            return None
        if not self.access.allowed(msg):
            return Reply(text="Sorry, this bot is private: you are not on its list of allowed users.", kind="refusal")
        text = clean_input(msg.text or "")
        # Context and names come from users too: the same cleaning as the text before anything uses them.
        msg = replace(
            msg, reply_to_text=clean_input(msg.reply_to_text) if msg.reply_to_text else None,
            attachment_text=clean_input(msg.attachment_text) if msg.attachment_text else None,
        )
        name = clean_input(msg.user_name) or None if msg.user_name else None
        command, args = _parse_command(text)
        counted = self._asks_the_model(command, args, text, msg)
        if counted:
            # Counted and refused before anything is written: a flood must not grow the log. A request that
            # turns out malformed is refunded below, so it does not use up the user's allowance.
            wait = self.access.retry_after(msg)
            if wait:
                return Reply(text=f"You are sending messages too quickly; please wait {wait:.0f} s and try again.",
                             kind="refusal")
        user_id = await self.store.ensure_user(msg.platform, msg.user_id, name)
        chat_id = await self.store.ensure_chat(msg.platform, msg.chat_id)
        if command == "forget":  # nothing about the user may be written after this
            counts = await self.store.forget_user(msg.platform, msg.user_id)
            n = counts.get("messages", 0) if isinstance(counts, dict) else counts
            return Reply(text=f"Done: I deleted everything stored about you ({n} messages).", kind="command")
        mode = await self.store.get_mode(chat_id) or self.config.bot.default_mode
        fallback = ""
        if mode not in self.modes():
            # An adapter that was removed (or a default naming none): chat still works, and says why.
            fallback = f"(The skill {mode!r} is not available any more, so the base model answers as chat.)"
            log.warning("chat %s: mode %r is not available; falling back to chat", chat_id, mode)
            mode = "chat"
        skill = SKILL_COMMANDS.get(command or "") if command else mode
        in_id = await self.store.log_incoming(
            chat_id=chat_id, user_id=user_id, text=text, skill=skill, platform_message_id=msg.message_id,
        )
        started = time.perf_counter()
        try:
            reply = await self._dispatch(msg, text, command, args, chat_id, mode, stream)
        except UserInputError as exc:
            if counted:
                self.access.refund(msg)
            reply = Reply(text=str(exc), kind="refusal")
        except LorabotError as exc:
            log.warning("request failed: %s", exc)
            reply = Reply(text=f"Sorry, that failed: {exc}", kind="error")
        except Exception:
            log.exception("unexpected error while answering a message")
            reply = Reply(text="Sorry, something went wrong on my side; the error has been logged.", kind="error")
        if fallback and command is None:
            reply = replace(reply, text=f"{fallback}\n\n{reply.text}")
        status = {"answer": "answered", "command": "answered", "refusal": "refused", "error": "failed"}[reply.kind]
        latency = (time.perf_counter() - started) * 1000
        if in_id is None:  # the user sent /forget from another chat meanwhile: nothing about them is kept
            return replace(reply, feedback=False)
        out_id = await self.store.log_reply(
            chat_id=chat_id, reply_to=in_id, text=reply.text, skill=reply.skill, adapter=reply.adapter,
            latency_ms=latency, prompt_tokens=reply.usage.prompt_tokens or None,
            completion_tokens=reply.usage.completion_tokens or None,
            result=reply.to_json() if reply.result is not None else None, incoming_status=status,
        )
        if out_id is None:  # the user sent /forget while this was being answered: nothing is kept
            return replace(reply, feedback=False)
        return replace(reply, message_id=out_id)

    async def feedback(self, platform: str, user_id: str, message_id: int, value: int) -> str:
        if not self.access.allowed(Incoming(platform=platform, chat_id="", user_id=user_id, text="")):
            return "Sorry, this bot is private: you are not on its list of allowed users."
        ok = await self.store.add_feedback(
            message_id=message_id, platform=platform, platform_user_id=user_id, value=value,
        )
        return "Thanks for the feedback!" if ok else "That message is no longer stored."

    async def retract_feedback(self, platform: str, user_id: str, message_id: int, value: int) -> bool:
        """Take back a vote (a removed reaction) if it is still ``value``; True when one went."""
        return bool(await self.store.retract_feedback(
            message_id=message_id, platform=platform, platform_user_id=user_id, value=value,
        ))

    # ----------------------------------------------------------------- dispatch
    async def _dispatch(
        self, msg: Incoming, text: str, command: str | None, args: str, chat_id: int, mode: str,
        stream: StreamSink | None,
    ) -> Reply:
        if command is None:
            self._check_text(text, msg, context=self.modes().get(mode) == "qa")
            return await self._run(mode, text, msg, stream)
        if command in ("start", "help"):
            return Reply(text=self.help_text(), kind="command")
        if command == "skills":
            return Reply(text=self.skills_text(), kind="command")
        if command == "mode":
            return await self._mode(args, chat_id, mode)
        if command == "reset":
            await self.store.reset(chat_id)
            return Reply(text="Conversation reset: I no longer see earlier messages in this chat.", kind="command")
        if command == "stats":
            return Reply(text=_stats_text(await self.store.stats(chat_id=chat_id)), kind="command")
        if command == "reload":
            if not self.access.is_admin(msg):
                return Reply(text="Only admins can reload adapters.", kind="refusal")
            problems = await self.engine.reload_adapters()
            for listener in list(self.reload_listeners):
                try:
                    await listener()
                except Exception:  # a platform's refresh must not fail the reload itself
                    log.exception("a reload listener failed")
            lines = [f"Adapters: {', '.join(sorted(self.engine.adapters)) or 'none'}"]
            lines += [f"Not loaded: {p}" for p in problems]
            return Reply(text="\n".join(lines), kind="command")
        if command == "compare":
            target, _, rest = args.partition(" ")
            if target not in self.modes() or self.modes()[target] == "chat" or not rest.strip():
                raise UserInputError(
                    "Usage: /compare <skill> <text>, skill one of: "
                    + ", ".join(m for m, t in self.modes().items() if t != "chat")
                )
            self._check_text(rest, msg, context=self.modes()[target] == "qa")
            return await self._compare(target, rest.strip(), msg)
        if command in SKILL_COMMANDS:
            target = SKILL_COMMANDS[command]
            if not args and not (target == "qa" and (msg.reply_to_text or msg.attachment_text)):
                raise UserInputError(f"Usage: {SKILLS[target].usage}")
            self._check_text(args, msg, context=target == "qa")
            return await self._run(target, args, msg, stream)
        raise UserInputError(f"Unknown command /{command}. Send /help to see what I can do.")

    def _asks_the_model(self, command: str | None, args: str, text: str, msg: Incoming) -> bool:
        """Whether this message is a model request the rate limit counts (malformed ones are refused free)."""
        if command is None:
            return bool(text.strip()) or bool(msg.attachment_text)
        if command == "compare":
            target, _, rest = args.partition(" ")
            return self.modes().get(target, "chat") != "chat" and bool(rest.strip())
        if command in SKILL_COMMANDS:
            return bool(args) or (SKILL_COMMANDS[command] == "qa" and bool(msg.reply_to_text or msg.attachment_text))
        return False

    def _check_text(self, text: str, msg: Incoming, *, context: bool = False) -> None:
        if not text.strip() and not (context and msg.attachment_text):
            raise UserInputError("I can only read text: send me a message with some words in it.")
        limit = self.config.bot.max_input_chars
        # Only QA reads the replied-to message or the attachment; a chat reply to a long message is fine.
        total = len(text) + (len(msg.attachment_text or msg.reply_to_text or "") if context else 0)
        if total > limit:
            raise UserInputError(
                f"That is too long for me ({total:,} characters; the limit is {limit:,}). Send a shorter text."
            )

    async def _mode(self, args: str, chat_id: int, current: str) -> Reply:
        wanted = args.strip().lower()
        modes = self.modes()
        if not wanted:
            return Reply(text=f"Current mode: {current}. Choose one of: {', '.join(modes)}", kind="command")
        if wanted not in modes:
            raise UserInputError(f"Unknown skill {wanted!r}. Choose one of: {', '.join(modes)}")
        await self.store.set_mode(chat_id, wanted)
        note = ""
        if modes[wanted] != "chat" and self.adapter_for(wanted) is None:
            note = " (no adapter for it is installed, so the bare base model answers)"
        return Reply(text=f"Mode set to {wanted}{note}. Plain messages now go to it.", kind="command")

    async def _run(self, mode: str, text: str, msg: Incoming, stream: StreamSink | None) -> Reply:
        adapter = self.adapter_for(mode)
        outcome = await self._skill(mode, text, msg, adapter, stream)
        return Reply(
            text=outcome.text, skill=mode, adapter=outcome.adapter, result=outcome.result, usage=outcome.usage,
            feedback=True,
        )

    async def _compare(self, mode: str, text: str, msg: Incoming) -> Reply:
        adapter = self.adapter_for(mode)
        base = await self._skill(mode, text, msg, None, None, bare=True)
        tuned = await self._skill(mode, text, msg, adapter, None) if adapter else base
        usage = Usage(
            prompt_tokens=base.usage.prompt_tokens + tuned.usage.prompt_tokens,
            completion_tokens=base.usage.completion_tokens + tuned.usage.completion_tokens,
        )
        return Reply(
            text=render_compare(base.result, tuned.result, adapter.name if adapter else None), skill=mode,
            adapter=adapter.name if adapter else None, result=tuned.result, base_result=base.result, usage=usage,
            feedback=True,
        )

    # ----------------------------------------------------------------- one skill call
    async def _skill(
        self, mode: str, text: str, msg: Incoming, adapter: AdapterInfo | None, stream: StreamSink | None,
        *, bare: bool = False,
    ) -> _Outcome:
        task = self.modes()[mode]
        name = None if bare or adapter is None else adapter.name
        started = time.perf_counter()
        if task == "sentiment":
            labels = adapter.labels if adapter else SentimentFormat.default_labels
            c = await self.engine.classify(
                SentimentFormat.prompt(text), [SentimentFormat.continuation(x) for x in labels], name,
            )
            result = SentimentFormat.result(dict(zip(labels, c.scores.values(), strict=True)),
                                            adapter.label_offsets if name and adapter else None)
            usage = Usage(prompt_tokens=c.prompt_tokens, latency_ms=_ms(started))
            return _Outcome(result, render(result), name, usage)
        if task == "ner":
            labels = adapter.labels if adapter else NERFormat.default_labels
            g = await self.engine.generate(NERFormat.prompt(text), self._params("ner", NERFormat.stop), name)
            result = NERFormat.result(g.text, text, labels)
        elif task == "qa":
            question, context = self._qa_parts(text, msg)
            qa = await answer(self.engine, question, context, self._params("qa", QAFormat.stop), name,
                              span_constrained=self.config.qa.span_constrained,
                              order_check=self.config.qa.order_check)
            usage = Usage(prompt_tokens=qa.prompt_tokens, completion_tokens=qa.completion_tokens,
                          latency_ms=_ms(started))
            return _Outcome(qa.answer, render(qa.answer), name, usage)
        elif task == "story":
            sink = _accumulate(stream, lambda so_far: StoryFormat.result(text, so_far).text)
            g = await self.engine.generate(StoryFormat.prompt(text), self._params("story"), name, sink)
            result = StoryFormat.result(text, g.text)
        elif task == "domain":
            sink = _accumulate(stream, lambda so_far: text + so_far)
            g = await self.engine.generate(text, self._params("generation"), name, sink)
            result = Text(text=text + g.text)
        else:  # chat
            params = self._params("generation")
            prompt, kept = self._fit_chat(await self._history(msg), text, params.max_new_tokens)
            g = await self.engine.generate(prompt, params, name, _accumulate(stream, str.strip))
            result = Text(text=g.text.strip())
            if kept is not None:
                note = (f"(Your message was too long for the model's context: I read only its last {kept:,} "
                        "characters.)")
                result = Text(text=f"{note}\n\n{result.text}")
        usage = Usage(prompt_tokens=g.prompt_tokens, completion_tokens=g.completion_tokens, latency_ms=_ms(started))
        return _Outcome(result, render(result), name, usage)

    def _fit_chat(self, history: list[tuple[str, str]], text: str, reserve: int) -> tuple[str, int | None]:
        """The chat prompt within the model's context: the oldest history goes first, then the start of the
        user's text; the template's head and the system prompt always stay. Returns (prompt, characters of
        the user's text kept, or None when none of it was cut)."""
        system = self.config.bot.system_prompt
        limit = getattr(self.engine, "max_context", 0) - reserve

        def render_prompt(turns: list[tuple[str, str]], said: str) -> str:
            return self.engine.chat_prompt(ChatFormat.messages(system, turns, said))

        prompt = render_prompt(history, text)
        if limit <= 0 or self.engine.count_tokens(prompt) <= limit:
            return prompt, None
        turns = list(history)
        while turns:
            turns.pop(0)
            prompt = render_prompt(turns, text)
            if self.engine.count_tokens(prompt) <= limit:
                return prompt, None
        lo, hi = 0, len(text)  # the longest tail of the text that fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.engine.count_tokens(render_prompt([], text[-mid:])) <= limit:
                lo = mid
            else:
                hi = mid - 1
        return render_prompt([], text[-lo:] if lo else ""), lo

    def _params(self, section: str, stop: tuple[str, ...] = ()) -> SamplingParams:
        s = getattr(self.config, section)
        if section in ("ner", "qa"):  # extraction: deterministic
            return SamplingParams(max_new_tokens=s.max_new_tokens, temperature=0.0, stop=stop)
        return SamplingParams(
            max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
            repetition_penalty=s.repetition_penalty, stop=stop,
        )

    @staticmethod
    def _qa_parts(text: str, msg: Incoming) -> tuple[str, str]:
        context = msg.attachment_text or msg.reply_to_text
        if context:
            return text.strip(), context
        question, sep, context = text.partition("|")
        if not sep or not question.strip() or not context.strip():
            raise UserInputError(
                "Give me a question and a text: /ask <question> | <text>, or reply to a message "
                "(or a .txt file) with /ask <question>."
            )
        return question.strip(), context.strip()

    async def _history(self, msg: Incoming) -> list[tuple[str, str]]:
        """Recent chat turns, newest kept first, within the token budget."""
        chat_id = await self.store.ensure_chat(msg.platform, msg.chat_id)
        turns = await self.store.history(chat_id, skill="chat")
        budget = self.config.bot.history_tokens
        kept: list[tuple[str, str]] = []
        for role, content in reversed(turns):
            if role == "user":  # the log keeps the message as sent; the model sees what was said
                command, args = _parse_command(content)
                content = args if command else content
            cost = self.engine.count_tokens(content) + 4
            if cost > budget:
                break
            budget -= cost
            kept.append((role, content))
        kept.reverse()
        # The current message was logged before the model ran: it is the user's turn, not history.
        if kept and kept[-1][0] == "user":
            kept.pop()
        while kept and kept[0][0] != "user":
            kept.pop(0)
        return kept

    # ----------------------------------------------------------------- texts
    def help_text(self) -> str:
        lines = [
            "Hi! I am lorabot: one small pre-trained language model, fine-tuned for several skills with "
            "LoRA adapters. Plain messages go to the current mode (see /mode).",
            "",
        ]
        lines += [f"/{name} — {desc}" for name, desc in COMMANDS]
        lines += ["", "Try /compare sentiment I loved this film! to see what fine-tuning changed."]
        return "\n".join(lines)

    def skills_text(self) -> str:
        lines = []
        for mode, task in self.modes().items():
            adapter = self.adapter_for(mode)
            summary = SKILLS[mode].summary if mode in SKILLS else (adapter.description if adapter else task)
            if adapter:
                where = f"adapter '{adapter.name}'"
            else:
                where = "base model" if task == "chat" else "no adapter: base model"

            lines.append(f"• {mode} — {summary} ({where})")
        for problem in self.engine.problems:
            lines.append(f"⚠ {problem.name}: {problem.reason}")
        return "\n".join(lines)


def _parse_command(text: str) -> tuple[str | None, str]:
    if not text.startswith("/") or len(text) < 2 or not (text[1].isalpha()):
        return None, text
    first_line_end = text.find("\n")
    split_at = min(i for i in (text.find(" "), first_line_end, len(text)) if i >= 0)
    head, args = text[1:split_at], text[split_at:]
    command = head.split("@", 1)[0].lower()  # Telegram adds @botname in groups
    return command, args.strip()


def _accumulate(stream: StreamSink | None, shown: Callable[[str], str]) -> Callable[[str], Awaitable[None]] | None:
    """Turn engine deltas into "reply text so far", rendered exactly as the final reply will be."""
    if stream is None:
        return None
    parts: list[str] = []

    async def sink(delta: str) -> None:
        parts.append(delta)
        await stream(shown("".join(parts)))

    return sink


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000


def _stats_text(stats: dict) -> str:
    lines = ["Statistics"]
    for key, value in stats.items():
        if isinstance(value, dict):
            inner = ", ".join(f"{k}: {v}" for k, v in value.items()) or "none"
            lines.append(f"• {key}: {inner}")
        else:
            lines.append(f"• {key}: {value}")
    return "\n".join(lines)
