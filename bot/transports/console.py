"""The console transport: chat with the core in a terminal, or script it through a pipe.

Interactive use shows a prompt and streams replies; piped input is read one message per line.
"""

from __future__ import annotations

import asyncio
import getpass
import sys
from typing import TextIO

from bot.core import Core
from bot.messages import Incoming
from bot.sanitize import terminal_safe

QUIT = {"/quit", "/exit", ":q"}


async def console_chat(
    core: Core, *, stdin: TextIO | None = None, stdout: TextIO | None = None, user: str | None = None,
) -> int:
    """Run the REPL until end of input or /quit; returns the number of messages handled."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    interactive = stdin.isatty() and stdout.isatty()
    user = user or getpass.getuser()
    if interactive:
        stdout.write("lorabot console — type a message, /help for commands, /quit to leave.\n")
    handled = 0
    while True:
        if interactive:
            stdout.write("you> ")
            stdout.flush()
        line = await asyncio.to_thread(stdin.readline)
        if not line:
            break
        text = line.rstrip("\n")
        if text.strip() in QUIT:
            break
        if not text.strip() and not interactive:
            continue  # blank lines in a script are separators, not messages
        await _one(core, text, user, stdout)
        handled += 1
    return handled


async def _one(core: Core, text: str, user: str, out: TextIO) -> None:
    printed = ""
    out.write("bot> ")
    out.flush()

    async def stream(so_far: str) -> None:
        nonlocal printed
        if so_far.startswith(printed):  # text already on screen cannot be taken back
            out.write(terminal_safe(so_far[len(printed):]))
            out.flush()
            printed = so_far

    reply = await core.handle(
        Incoming(platform="console", chat_id=f"console:{user}", user_id=user, user_name=user, text=text), stream,
    )
    final = reply.text if reply else ""
    if final.startswith(printed):
        out.write(terminal_safe(final[len(printed):]) + "\n")
    else:
        out.write("\n" + terminal_safe(final) + "\n")
    out.flush()
