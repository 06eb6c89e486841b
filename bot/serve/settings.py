"""What ``lorabot serve``'s flags set, checked before anything starts."""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass

from bot.errors import LorabotError

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


@dataclass(frozen=True)
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None          # the Bearer token clients must send (None: no key, loopback only)
    max_body_bytes: int = 1 << 20       # a request body over this is refused (413)
    max_prompt_chars: int = 32_000      # a prompt (or all chat messages together) over this is refused (400)
    max_in_flight: int = 64             # model requests running or queued at once; more are refused (429)
    retry_after_s: int = 1              # the Retry-After a refused request is given


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def api_key_from_env(name: str | None) -> str | None:
    """The API key from the environment variable ``name`` (never from a flag: it would show in ``ps``)."""
    if not name:
        return None
    if not _ENV_NAME.fullmatch(name):
        raise LorabotError(f"--api-key-env must name an environment variable; got {name!r}")
    value = os.environ.get(name, "").strip()
    if not value:
        raise LorabotError(f"--api-key-env {name}: the environment variable {name} is not set (or empty)")
    return value


def check_settings(settings: ServeSettings) -> None:
    """Refuse a server reachable from other machines without a key, and limits that cannot work."""
    if not is_loopback(settings.host) and not settings.api_key:
        raise LorabotError(
            f"--host {settings.host} makes the API reachable from other machines: give it a key with "
            "--api-key-env NAME (clients then send `Authorization: Bearer <key>`)"
        )
    if not 0 <= settings.port <= 65535:
        raise LorabotError(f"--port must be between 0 and 65535; got {settings.port}")
    for name in ("max_body_bytes", "max_prompt_chars", "max_in_flight"):
        if getattr(settings, name) <= 0:
            raise LorabotError(f"--{name.replace('_', '-')} must be greater than 0")
