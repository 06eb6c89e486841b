"""A loopback fake of Discord: the REST API (aiohttp, /api/v10/...) and the gateway (a websocket at /).

discord.py is pointed at it by overriding ``discord.http.Route.BASE`` and
``discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY`` (tests do this with monkeypatch). The gateway speaks
HELLO, IDENTIFY -> READY, heartbeat ACKs, and dispatches whatever events the test sends; it can close the
connection with a close code or send a frame that is not JSON. Every REST request is recorded; any route can
be made to answer 429 (with Discord's headers) a number of times; a message (or an interaction's original
response) the test deletes answers 404 Unknown Message, as Discord does.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

TOKEN = "MTIzNDU2Nzg5MDEyMzQ1Njc4.Gabcde.lorabot-discord-test-token-xyz"
APP_ID = 4242
BOT_ID = 4242
GUILD_ID = 700
CHANNEL_ID = 701
DM_CHANNEL_ID = 801
MEMBER = {"roles": [], "joined_at": "2024-01-01T00:00:00+00:00", "deaf": False, "mute": False, "flags": 0}
BOT_USER = {"id": str(BOT_ID), "username": "lorabot", "discriminator": "0", "global_name": "Lorabot",
            "avatar": None, "bot": True}


def discord_user(user_id: int = 11, name: str = "ann") -> dict[str, Any]:
    return {"id": str(user_id), "username": name, "discriminator": "0", "global_name": name.title(),
            "avatar": None}


@dataclass
class Request:
    method: str
    path: str
    body: Any
    query: dict[str, str]
    at: float = field(default_factory=time.monotonic)


class FakeDiscord:
    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.identify: dict[str, Any] | None = None
        self.files: dict[str, bytes] = {}
        self.messages: dict[int, dict[str, Any]] = {}  # every message the fake knows, by id
        self.originals: dict[str, dict[str, Any]] = {}  # interaction token -> its original response
        self.deleted_originals: set[str] = set()          # interaction tokens whose response a user deleted
        self.connections = 0                              # gateway connections made
        self.closed_channels: set[int] = set()            # channels the bot may not post in (e.g. blocked DMs)
        self._ids = itertools.count(900_000)
        self._seq = itertools.count(1)
        self._failures: dict[tuple[str, str], list[float]] = {}
        self._ws: web.WebSocketResponse | None = None
        self._ready = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> FakeDiscord:
        app = web.Application()
        app.router.add_get("/", self._gateway)
        app.router.add_get("/attachments/{name}", self._attachment)
        app.router.add_route("*", "/api/v10/{path:.*}", self._api)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._ws is not None and not self._ws.closed:
            await self._ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v10"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    # ------------------------------------------------------------------ test controls
    def next_id(self) -> int:
        return next(self._ids)

    def fail(self, method: str, path_prefix: str, *, times: int = 1, retry_after: float = 0.5) -> None:
        """Answer requests whose path starts with ``path_prefix`` with 429 ``times`` times."""
        self._failures.setdefault((method, path_prefix), []).extend([retry_after] * times)

    async def dispatch(self, event: str, data: dict[str, Any]) -> None:
        await asyncio.wait_for(self._ready.wait(), 5)
        assert self._ws is not None
        await self._ws.send_json({"op": 0, "t": event, "s": next(self._seq), "d": data})

    async def close_gateway(self, code: int, reason: str = "") -> None:
        """Close the gateway connection the way Discord does, e.g. 4004 "Authentication failed"."""
        await asyncio.wait_for(self._ready.wait(), 5)
        assert self._ws is not None
        await self._ws.close(code=code, message=reason.encode())

    async def send_raw(self, text: str) -> None:
        """Send a frame as it is (e.g. one that is not JSON)."""
        await asyncio.wait_for(self._ready.wait(), 5)
        assert self._ws is not None
        await self._ws.send_str(text)

    def delete_message(self, message_id: int) -> None:
        self.messages.pop(message_id, None)

    def of(self, method: str, path_part: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and path_part in r.path]

    @property
    def sent(self) -> list[Request]:
        """Every message the bot created: channel messages and interaction follow-ups/edits."""
        return [r for r in self.requests if r.method in ("POST", "PATCH") and (
            r.path.endswith("/messages") or "/webhooks/" in r.path)]

    async def wait_for(self, method: str, path_part: str, count: int = 1, timeout: float = 5.0) -> list[Request]:
        deadline = time.monotonic() + timeout
        while True:
            found = self.of(method, path_part)
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                seen = [(r.method, r.path) for r in self.requests]
                raise AssertionError(f"expected {count} {method} {path_part}; got {len(found)}: {seen}")
            await asyncio.sleep(0.02)

    async def settle(self, quiet: float = 0.3, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            last = max((r.at for r in self.requests), default=0.0)
            if time.monotonic() - last >= quiet:
                return
            await asyncio.sleep(0.05)

    # ------------------------------------------------------------------ gateway
    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self._ws = ws
        self.connections += 1
        await ws.send_json({"op": 10, "d": {"heartbeat_interval": 45_000}, "s": None, "t": None})
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            payload = json.loads(msg.data)
            if payload["op"] == 2:  # IDENTIFY
                self.identify = payload["d"]
                await ws.send_json({"op": 0, "t": "READY", "s": next(self._seq), "d": {
                    "v": 10, "user": BOT_USER, "guilds": [{"id": str(GUILD_ID), "unavailable": True}],
                    "session_id": "session-1", "resume_gateway_url": self.gateway_url,
                    "application": {"id": str(APP_ID), "flags": 0},
                }})
                # Like Discord: each guild in READY follows as a GUILD_CREATE.
                await ws.send_json({"op": 0, "t": "GUILD_CREATE", "s": next(self._seq), "d": guild_create()})
                self._ready.set()
            elif payload["op"] == 1:  # heartbeat
                await ws.send_json({"op": 11})
        return ws

    # ------------------------------------------------------------------ REST
    async def _attachment(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self.requests.append(Request("GET", f"/attachments/{name}", None, {}))
        return web.Response(body=self.files[name]) if name in self.files else web.Response(status=404)

    async def _api(self, request: web.Request) -> web.StreamResponse:
        path = "/" + request.match_info["path"]
        body: Any = None
        if request.can_read_body:
            body = await request.json() if request.content_type == "application/json" else await request.text()
        self.requests.append(Request(request.method, path, body, dict(request.query)))
        for (method, prefix), waits in self._failures.items():
            if waits and method == request.method and path.startswith(prefix):
                wait = waits.pop(0)
                return _json(
                    {"message": "You are being rate limited.", "retry_after": wait, "global": False}, status=429,
                    headers={"Via": "1.1 google", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset-After": str(wait),
                             "X-RateLimit-Limit": "5", "X-RateLimit-Bucket": "b1"},
                )
        auth = request.headers.get("Authorization")
        if "/webhooks/" not in path and "/interactions/" not in path and auth != f"Bot {TOKEN}":
            return _json({"message": "401: Unauthorized", "code": 0}, status=401)
        return await self._route(request.method, path, body)

    async def _route(self, method: str, path: str, body: Any) -> web.StreamResponse:
        parts = path.strip("/").split("/")
        if path == "/users/@me":
            return _json(BOT_USER)
        if path == "/oauth2/applications/@me":
            return _json({
                "id": str(APP_ID), "name": "lorabot", "description": "", "icon": None, "bot_public": True,
                "bot_require_code_grant": False, "owner": discord_user(1, "owner"), "verify_key": "k", "flags": 0,
            })
        if method == "PUT" and path == f"/applications/{APP_ID}/commands":
            return _json([
                {**c, "id": str(5000 + i), "application_id": str(APP_ID), "version": "1",
                 "default_member_permissions": None, "type": c.get("type", 1)} for i, c in enumerate(body)])
        if parts[0] == "channels" and parts[-1] == "typing":
            return web.Response(status=204)
        if parts[0] == "channels" and "reactions" in parts:
            return web.Response(status=204)
        if parts[0] == "channels" and parts[2:] == ["messages"] and method == "POST" and (
                int(parts[1]) in self.closed_channels):
            return _json({"message": "Cannot send messages to this user", "code": 50007}, status=403)
        if parts[0] == "channels" and parts[2:] == ["messages"] and method == "POST":
            return _json(self._bot_message(int(parts[1]), body))
        if parts[0] == "channels" and len(parts) == 4 and parts[2] == "messages":
            message = self.messages.get(int(parts[3]))
            if message is None:
                return _json({"message": "Unknown Message", "code": 10008}, status=404)
            if method == "PATCH":
                message.update({k: v for k, v in body.items() if k in ("content", "flags")})
            return _json(message)
        if parts[0] == "interactions" and parts[-1] == "callback":
            return _json({"interaction": {"id": parts[1], "type": 2, "response_message_loading": True}})
        if parts[0] == "webhooks":
            if method == "POST" and len(parts) == 3:  # follow-up
                return _json(self._bot_message(CHANNEL_ID, body, webhook=True))
            if parts[-1] == "@original" and parts[2] in self.deleted_originals:
                return _json({"message": "Unknown Message", "code": 10008}, status=404)
            if parts[-1] == "@original" and method == "PATCH":
                original = self.originals.get(parts[2])
                if original is None:
                    original = self.originals[parts[2]] = self._bot_message(CHANNEL_ID, body)
                original.update({k: v for k, v in body.items() if k == "content"})
                return _json(original)
            if parts[-1] == "@original" and method == "DELETE":
                return web.Response(status=204)
            if len(parts) == 5 and parts[3] == "messages" and method == "PATCH":  # editing a follow-up
                message = self.messages.get(int(parts[4]))
                if message is None:
                    return _json({"message": "Unknown Message", "code": 10008}, status=404)
                message.update({k: v for k, v in body.items() if k == "content"})
                return _json(message)
        return _json({"message": "404: Not Found", "code": 0}, status=404)

    def _bot_message(self, channel_id: int, body: dict[str, Any], *, webhook: bool = False) -> dict[str, Any]:
        message = message_payload(body.get("content", ""), author=BOT_USER, channel_id=channel_id,
                                  message_id=self.next_id(), guild=False)
        message["flags"] = body.get("flags", 0)
        if webhook:
            message["webhook_id"] = str(APP_ID)
        self.messages[int(message["id"])] = message
        return message


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    # discord.py parses a body as JSON only when Content-Type is exactly "application/json".
    return web.Response(body=json.dumps(data).encode(), status=status,
                        headers={"Content-Type": "application/json", **(headers or {})})


# ---------------------------------------------------------------------- payload builders

_message_ids = itertools.count(600_000)


def message_payload(
    content: str, *, author: dict[str, Any] | None = None, channel_id: int = CHANNEL_ID, guild: bool = True,
    message_id: int | None = None, mentions: list[dict[str, Any]] | None = None,
    referenced: dict[str, Any] | None = None, reference_id: int | None = None,
    attachments: list[dict[str, Any]] | None = None, roles: list[str] | None = None,
    stickers: bool = False, message_type: int = 0,
) -> dict[str, Any]:
    author = author or discord_user()
    data: dict[str, Any] = {
        "id": str(message_id or next(_message_ids)), "channel_id": str(channel_id), "author": author,
        "content": content, "timestamp": "2025-01-01T00:00:00+00:00", "edited_timestamp": None, "tts": False,
        "mention_everyone": False, "mentions": mentions or [], "mention_roles": [], "attachments": attachments or [],
        "embeds": [], "pinned": False, "type": message_type, "flags": 0,
    }
    if guild:
        data["guild_id"] = str(GUILD_ID)
        data["member"] = {**MEMBER, "roles": roles or []}
    if stickers:
        data["sticker_items"] = [{"id": "31", "name": "wave", "format_type": 1}]
    if referenced is not None or reference_id is not None:
        ref_id = referenced["id"] if referenced is not None else str(reference_id)
        data["type"] = 19
        data["message_reference"] = {"message_id": ref_id, "channel_id": str(channel_id)}
        if guild:
            data["message_reference"]["guild_id"] = str(GUILD_ID)
        if referenced is not None:
            data["referenced_message"] = referenced
    return data


def bot_mention() -> dict[str, Any]:
    return {**BOT_USER, "member": MEMBER}


def guild_create() -> dict[str, Any]:
    everyone = {"id": str(GUILD_ID), "name": "@everyone", "permissions": "1071698660929", "position": 0,
                "color": 0, "hoist": False, "managed": False, "mentionable": False}
    helper = {**everyone, "id": "710", "name": "helper", "position": 1}
    return {
        "id": str(GUILD_ID), "name": "Test server", "owner_id": "1", "unavailable": False, "member_count": 2,
        "roles": [everyone, helper], "emojis": [], "stickers": [], "features": [], "threads": [],
        "voice_states": [], "presences": [], "stage_instances": [], "guild_scheduled_events": [],
        "channels": [{"id": str(CHANNEL_ID), "type": 0, "guild_id": str(GUILD_ID), "name": "general",
                      "position": 0, "permission_overwrites": [], "nsfw": False, "parent_id": None}],
        "members": [{**MEMBER, "user": BOT_USER}],
    }


def interaction_payload(
    name: str, options: dict[str, Any] | None = None, *, guild: bool = True, user: dict[str, Any] | None = None,
    resolved: dict[str, Any] | None = None, option_types: dict[str, int] | None = None,
) -> dict[str, Any]:
    """An APPLICATION_COMMAND interaction for slash command ``name`` with string (or typed) options."""
    interaction_id = next(_message_ids)
    user = user or discord_user()
    types = option_types or {}
    data: dict[str, Any] = {
        "id": str(interaction_id), "application_id": str(APP_ID), "type": 2, "token": f"itoken{interaction_id}",
        "version": 1, "channel_id": str(CHANNEL_ID if guild else DM_CHANNEL_ID), "locale": "en-US",
        "app_permissions": "0", "entitlements": [], "attachment_size_limit": 8_388_608,
        "authorizing_integration_owners": {"0": str(GUILD_ID)} if guild else {"1": user["id"]},
        "context": 0 if guild else 1,
        "channel": {"id": str(CHANNEL_ID if guild else DM_CHANNEL_ID), "type": 0 if guild else 1},
        "data": {"id": "5000", "name": name, "type": 1, "options": [
            {"name": k, "type": types.get(k, 3), "value": v} for k, v in (options or {}).items()]},
    }
    if resolved:
        data["data"]["resolved"] = resolved
    if guild:
        data["guild_id"] = str(GUILD_ID)
        data["member"] = {**MEMBER, "user": user, "permissions": "0"}
    else:
        data["user"] = user
    return data


def reaction_payload(message_id: int, emoji: str, user_id: int = 11, guild: bool = True) -> dict[str, Any]:
    data: dict[str, Any] = {"user_id": str(user_id), "channel_id": str(CHANNEL_ID), "message_id": str(message_id),
                            "emoji": {"id": None, "name": emoji}, "type": 0, "burst": False}
    if guild:
        data["guild_id"] = str(GUILD_ID)
    return data
