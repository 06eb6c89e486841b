"""A small Telegram Bot API server on 127.0.0.1 speaking the HTTP protocol python-telegram-bot uses.

POST /bot<token>/<method> with form, multipart or JSON bodies; GET /file/bot<token>/<path> for downloads.
It records every request, long-polls getUpdates from a queue the test feeds, and can answer a method
with an error (429 with retry_after, 5xx) a given number of times. Like Telegram, it refuses every call
to a chat that blocked the bot (403) or was upgraded to a supergroup (400 with migrate_to_chat_id), and
edits of a deleted message (400 "message to edit not found").
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

TOKEN = "123456789:AAH-lorabot-test-token-0123456789abc"
BOT = {"id": 999, "is_bot": True, "first_name": "Lorabot", "username": "lorabot_test",
       "can_join_groups": True, "can_read_all_group_messages": False, "supports_inline_queries": False}
_JSON_FIELDS = {"reply_markup", "reply_parameters", "link_preview_options", "allowed_updates", "commands",
                "entities"}


@dataclass
class Call:
    method: str
    params: dict[str, Any]
    at: float = field(default_factory=time.monotonic)

    def __getitem__(self, key: str) -> Any:
        return self.params[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.params.get(key, default)


class FakeBotAPI:
    def __init__(self, token: str = TOKEN) -> None:
        self.token = token
        self.calls: list[Call] = []
        self.files: dict[str, bytes] = {}  # file_id -> content
        self.downloads: list[str] = []
        self._updates: list[dict[str, Any]] = []
        self._update_ids = itertools.count(1)
        self._message_ids = itertools.count(5000)
        self._failures: dict[str, list[tuple[int, dict[str, Any]]]] = {}
        self.blocked: set[int] = set()            # chats whose user blocked the bot
        self.migrated: dict[int, int] = {}        # group id -> the supergroup it became
        self.deleted: set[int] = set()            # message ids deleted by a user
        self._changed = asyncio.Condition()
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> FakeBotAPI:
        app = web.Application()
        app.router.add_route("*", "/bot{token}/{method}", self._api)
        app.router.add_get("/file/bot{token}/{path:.+}", self._file)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        self._closing.set()
        async with self._changed:
            self._changed.notify_all()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ test controls
    def push(self, update: dict[str, Any]) -> int:
        """Queue an update (``update_id`` is assigned); returns its id."""
        update = {"update_id": next(self._update_ids), **update}
        self._updates.append(update)
        asyncio.get_running_loop().create_task(self._notify())
        return update["update_id"]

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def fail(self, method: str, status: int, *, times: int = 1, retry_after: int | None = None) -> None:
        body: dict[str, Any] = {"ok": False, "error_code": status, "description": f"Error {status}"}
        if retry_after is not None:
            body["parameters"] = {"retry_after": retry_after}
            body["description"] = f"Too Many Requests: retry after {retry_after}"
        self._failures.setdefault(method, []).extend([(status, body)] * times)

    def _refusal(self, method: str, params: dict[str, Any]) -> tuple[int, dict[str, Any]] | None:
        """Telegram's answer for calls the state of a chat or message forbids."""
        try:
            chat_id = int(params.get("chat_id", 0))
        except ValueError:
            chat_id = 0
        if chat_id in self.blocked:
            return 403, {"ok": False, "error_code": 403, "description": "Forbidden: bot was blocked by the user"}
        if chat_id in self.migrated:
            return 400, {"ok": False, "error_code": 400,
                         "description": "Bad Request: group chat was upgraded to a supergroup chat",
                         "parameters": {"migrate_to_chat_id": self.migrated[chat_id]}}
        if method == "editMessageText" and int(params.get("message_id", 0)) in self.deleted:
            return 400, {"ok": False, "error_code": 400, "description": "Bad Request: message to edit not found"}
        return None

    def of(self, *methods: str) -> list[Call]:
        return [c for c in self.calls if c.method in methods]

    async def wait_for(self, method: str, count: int = 1, timeout: float = 5.0, **where: Any) -> list[Call]:
        """Wait until ``count`` calls of ``method`` (matching ``where`` params) were received."""
        deadline = time.monotonic() + timeout
        while True:
            found = [c for c in self.of(method) if all(str(c.get(k)) == str(v) for k, v in where.items())]
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                seen = [(c.method, c.params.get("text")) for c in self.calls if c.method != "getUpdates"]
                raise AssertionError(f"expected {count} {method} {where}; got {len(found)}. Calls: {seen}")
            await asyncio.sleep(0.02)

    async def settle(self, quiet: float = 0.3, timeout: float = 5.0) -> None:
        """Wait until no request other than getUpdates arrived for ``quiet`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            last = max((c.at for c in self.calls if c.method != "getUpdates"), default=0.0)
            if time.monotonic() - last >= quiet:
                return
            await asyncio.sleep(0.05)

    # ------------------------------------------------------------------ the protocol
    async def _params(self, request: web.Request) -> dict[str, Any]:
        if request.content_type == "application/json":
            return dict(await request.json())
        raw = await request.post()
        params: dict[str, Any] = {}
        for key, value in raw.items():
            if isinstance(value, str) and key in _JSON_FIELDS:
                value = json.loads(value)
            params[key] = value
        return params

    async def _api(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.token:
            return web.json_response({"ok": False, "error_code": 401, "description": "Unauthorized"}, status=401)
        method = request.match_info["method"]
        params = await self._params(request)
        self.calls.append(Call(method, params))
        failures = self._failures.get(method)
        refused = failures.pop(0) if failures else self._refusal(method, params)
        if refused is not None:
            status, body = refused
            return web.json_response(body, status=status)
        handler = getattr(self, f"_m_{method}", None)
        if handler is None:
            return web.json_response({"ok": False, "error_code": 404, "description": "Not Found"}, status=404)
        return web.json_response({"ok": True, "result": await handler(params)})

    async def _file(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.token:
            return web.Response(status=401)
        path = request.match_info["path"]
        self.downloads.append(path)
        file_id = path.rsplit("/", 1)[-1].removesuffix(".txt")
        if file_id not in self.files:
            return web.Response(status=404)
        return web.Response(body=self.files[file_id])

    async def _m_getMe(self, params: dict[str, Any]) -> Any:
        return BOT

    async def _m_getUpdates(self, params: dict[str, Any]) -> Any:
        offset = int(params.get("offset") or 0)
        timeout = float(params.get("timeout") or 0)
        self._updates = [u for u in self._updates if u["update_id"] >= offset]  # confirmed ones go
        deadline = time.monotonic() + timeout
        async with self._changed:
            while not self._updates and not self._closing.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    await asyncio.wait_for(self._changed.wait(), left)
                except TimeoutError:
                    break
        return list(self._updates)

    def _message(self, params: dict[str, Any], message_id: int) -> dict[str, Any]:
        chat_id = int(params["chat_id"])
        out: dict[str, Any] = {
            "message_id": message_id, "date": int(time.time()), "from": BOT, "text": params["text"],
            "chat": {"id": chat_id, "type": "private" if chat_id > 0 else "supergroup"},
        }
        if "reply_markup" in params:
            out["reply_markup"] = params["reply_markup"]
        return out

    async def _m_sendMessage(self, params: dict[str, Any]) -> Any:
        return self._message(params, next(self._message_ids))

    async def _m_editMessageText(self, params: dict[str, Any]) -> Any:
        return self._message(params, int(params["message_id"]))

    async def _m_getFile(self, params: dict[str, Any]) -> Any:
        file_id = params["file_id"]
        return {"file_id": file_id, "file_unique_id": f"u{file_id}", "file_size": len(self.files.get(file_id, b"")),
                "file_path": f"documents/{file_id}.txt"}

    async def _ok(self, params: dict[str, Any]) -> Any:
        return True

    _m_sendChatAction = _m_setMyCommands = _m_deleteWebhook = _m_setWebhook = _m_answerCallbackQuery = _ok


# ---------------------------------------------------------------------- update builders

_ids = itertools.count(100)


def user(user_id: int = 7, first_name: str = "Ann") -> dict[str, Any]:
    return {"id": user_id, "is_bot": False, "first_name": first_name}


def message(
    text: str | None = None, *, chat_id: int = 7, user_id: int = 7, group: bool = False, caption: str | None = None,
    reply_to: dict[str, Any] | None = None, document: dict[str, Any] | None = None, sticker: bool = False,
    photo: bool = False, entities: list[dict[str, Any]] | None = None, message_id: int | None = None,
    date: float | None = None, chat_type: str = "supergroup",
) -> dict[str, Any]:
    chat = {"id": chat_id, "type": chat_type, "title": "Group"} if group else {
        "id": chat_id, "type": "private", "first_name": "Ann"}
    out: dict[str, Any] = {
        "message_id": message_id or next(_ids), "date": int(date or time.time()), "chat": chat,
        "from": user(user_id),
    }
    if text is not None:
        out["text"] = text
    if caption is not None:
        out["caption"] = caption
    if entities:
        out["caption_entities" if caption is not None and text is None else "entities"] = entities
    if reply_to is not None:
        out["reply_to_message"] = reply_to
    if document is not None:
        out["document"] = document
    if sticker:
        out["sticker"] = {"file_id": "st1", "file_unique_id": "ust1", "type": "regular", "width": 512,
                          "height": 512, "is_animated": False, "is_video": False}
    if photo:
        out["photo"] = [{"file_id": "ph1", "file_unique_id": "uph1", "width": 90, "height": 90}]
    return out


def mention(text: str, name: str = "@" + BOT["username"]) -> list[dict[str, Any]]:
    """A mention entity for ``name`` in ``text``, with offsets in UTF-16 code units like Telegram's."""
    start = text.index(name)
    offset = len(text[:start].encode("utf-16-le")) // 2
    return [{"type": "mention", "offset": offset, "length": len(name.encode("utf-16-le")) // 2}]


def bot_message(text: str, chat_id: int, message_id: int) -> dict[str, Any]:
    """A message the bot sent earlier (for replies to it)."""
    return {"message_id": message_id, "date": int(time.time()), "text": text, "from": BOT,
            "chat": {"id": chat_id, "type": "supergroup" if chat_id < 0 else "private"}}


def text_document(file_id: str, size: int, name: str = "notes.txt") -> dict[str, Any]:
    return {"file_id": file_id, "file_unique_id": f"u{file_id}", "file_name": name, "mime_type": "text/plain",
            "file_size": size}
