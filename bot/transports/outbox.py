"""Getting one reply onto a chat platform: streamed partial text, then the final text split into messages.

Platform-neutral; a transport subclasses ``Outbox`` with its own send/edit calls. Only *when* to send
lives here (throttling, pacing, ordering) — never *what* to say, which is the core's job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

log = logging.getLogger(__name__)


class MessageGone(Exception):
    """The message to edit no longer exists (a user deleted it, or its chat moved): post a new one."""


class ChatUnreachable(Exception):
    """The platform refuses to deliver to this chat (the user blocked the bot, it was removed from the
    group); retrying cannot help, so the reply stops and the transport marks the chat."""


class Outbox(ABC):
    """Shows a streamed answer by editing one message at most once per ``interval`` seconds, then delivers
    the final text (split to the platform limit) with a final edit plus further messages.

    ``stream`` is given to ``Core.handle`` as its callback. It never blocks on the network and never
    raises: an exception there would abort the model's generation. The edits happen on a background task
    that always shows the newest text, so a slow or rate-limited platform skips intermediate states
    instead of queueing them.
    """

    marks_last = False  # True where the last message's send/edit carries the feedback controls

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic):
        self.interval = interval
        self._clock = clock
        self._latest = ""
        self._shown: str | None = None
        self._handle: Any = None          # the platform message showing the partial text
        self._next_at = 0.0               # clock time before which no edit may be made
        self._changed = asyncio.Event()
        self._closing = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._unreachable: ChatUnreachable | None = None

    # ------------------------------------------------------------------ platform hooks
    @abstractmethod
    def split(self, text: str) -> list[str]:
        """``text`` as chunks that each fit one platform message."""

    @abstractmethod
    async def send(self, text: str, *, first: bool, last: bool, partial: bool = False) -> Any:
        """Post a new message (``first``: the start of the reply; ``last``: gets the feedback controls;
        ``partial``: streamed text that newer text will replace, so not worth retrying)."""

    @abstractmethod
    async def edit(self, handle: Any, text: str, *, last: bool, partial: bool = False) -> None:
        """Replace the text of a message this outbox posted; ``MessageGone`` when it no longer exists."""

    def backoff(self, exc: BaseException) -> float | None:
        """Seconds the platform asked us to wait if ``exc`` is a rate-limit answer, else None."""
        return None

    # ------------------------------------------------------------------ streaming
    async def stream(self, text: str) -> None:
        self._latest = text
        if self._task is None and not self._closing.is_set():
            self._task = asyncio.create_task(self._pump(), name="lorabot-stream")
        self._changed.set()

    async def _pump(self) -> None:
        while not self._closing.is_set():
            await self._changed.wait()
            self._changed.clear()
            wait = self._next_at - self._clock()
            if wait > 0 and await _set_within(self._closing, wait):
                return
            if self._closing.is_set():
                return
            chunks = self.split(self._latest)
            if not chunks:
                continue
            text = chunks[0]  # while streaming only the first message grows; the rest comes at the end
            if text == self._shown:
                continue
            self._next_at = self._clock() + self.interval
            try:
                if self._handle is None:
                    self._handle = await self.send(text, first=True, last=False, partial=True)
                else:
                    await self.edit(self._handle, text, last=False, partial=True)
                self._shown = text
            except MessageGone:  # deleted under us: the next text goes into a new message
                self._handle, self._shown = None, None
            except ChatUnreachable as exc:  # nothing more can be shown: stop trying
                self._unreachable = exc
                return
            except Exception as exc:  # a lost partial edit is harmless: the final text follows
                delay = self.backoff(exc)
                if delay is not None:
                    self._next_at = self._clock() + delay
                log.warning("could not show partial reply: %s", exc)

    # ------------------------------------------------------------------ final delivery
    async def finish(self, text: str) -> list[Any]:
        """Deliver the complete reply; returns the handles of its messages, in order.

        Raises ``ChatUnreachable`` (without trying again) when the chat refused the streamed text already.
        """
        self._closing.set()
        self._changed.set()  # wake the pump if it waits for text, so it sees it must stop
        if self._task is not None:
            await self._task  # let an edit in flight land, so it cannot overwrite the final text
        if self._unreachable is not None:
            raise self._unreachable
        chunks = self.split(text) or ["…"]
        handles: list[Any] = []
        last = len(chunks) == 1
        if self._handle is None:
            handles.append(await self.send(chunks[0], first=True, last=last))
        else:
            if chunks[0] != self._shown or (last and self.marks_last):
                wait = self._next_at - self._clock()
                if wait > 0:  # keep to the edit pace even for the final edit: platforms punish bursts
                    await asyncio.sleep(wait)
                try:
                    await self.edit(self._handle, chunks[0], last=last)
                except MessageGone:  # the partial message was deleted: the answer still arrives
                    self._handle = await self.send(chunks[0], first=True, last=last)
            handles.append(self._handle)
        for i, chunk in enumerate(chunks[1:], start=2):
            handles.append(await self.send(chunk, first=False, last=i == len(chunks)))
        return handles

    async def abandon(self) -> None:
        """Stop streaming without a final text (the core chose silence or the request failed)."""
        self._closing.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


async def _set_within(event: asyncio.Event, seconds: float) -> bool:
    """Wait up to ``seconds`` for ``event``; True if it was set."""
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except TimeoutError:
        return False
    return True


@contextlib.asynccontextmanager
async def typing_indicator(
    action: Callable[[], Awaitable[Any]], *, every: float = 4.5, delay: float = 0.25,
) -> AsyncIterator[None]:
    """Repeat ``action`` (a platform "typing…" call) while the body runs.

    It starts only after ``delay``: silent outcomes and instant command answers then never show a typing
    indicator, and the transport need not second-guess the core about which messages it will answer.
    Platforms show the indicator for about 5 s, hence ``every``.
    """

    async def loop() -> None:
        await asyncio.sleep(delay)
        while True:
            try:
                await action()
            except Exception as exc:  # cosmetic: never let it affect the reply
                log.debug("typing indicator failed: %s", exc)
            await asyncio.sleep(every)

    task = asyncio.create_task(loop(), name="lorabot-typing")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
