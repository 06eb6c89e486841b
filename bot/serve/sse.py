"""Server-sent events as OpenAI's clients read them: ``data: <json>`` blocks, ending with ``data: [DONE]``.

A write to a client that went away raises (aiohttp's ``ClientConnectionResetError``, a
``ConnectionResetError``); raised from the engine's text callback it stops the generation and frees
its row, which is how a disconnect cancels a streamed request.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web


class EventStream:
    def __init__(self, request: web.Request):
        self._request = request
        self.response = web.StreamResponse(status=200, headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",     # a reverse proxy (nginx) must not hold the events back
        })
        self.opened = False

    async def open(self) -> None:
        if not self.opened:
            await self.response.prepare(self._request)
            self.opened = True

    async def send(self, data: dict[str, Any]) -> None:
        await self.open()
        await self.response.write(f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode())

    async def done(self) -> web.StreamResponse:
        await self.open()
        await self.response.write(b"data: [DONE]\n\n")
        await self.response.write_eof()
        return self.response
