"""``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` in vLLM's shapes, for the key holder only.

The adapters folder stays the one truth about what is served (as for ``/reload``): loading copies the
folder into it under ``lora_name`` and has the engine re-scan, so the copy is validated by exactly the
code that validates every folder at start; unloading moves the folder to ``<adapters>/.unloaded/``
(nothing is deleted) and re-scans. Unlike vLLM's in-memory adapters, both survive a restart.
"""

from __future__ import annotations

import asyncio
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from aiohttp import web

from bot.adapters import NAME_RE, RESERVED_NAMES, validate_adapter
from bot.errors import AdapterError
from bot.serve.errors import ApiError, invalid
from bot.serve.schema import read_json
from bot.serve.state import ServeState, state

UNLOADED = ".unloaded"


def _admin(request: web.Request) -> ServeState:
    s = state(request)
    if not s.settings.api_key:  # the guard already checked the key when there is one
        raise ApiError(403, "Loading and unloading adapters needs the admin key: start lorabot serve with "
                       "--api-key-env NAME.", code="admin_key_required")
    return s


def _body(raw: Any, keys: set[str]) -> dict[str, str]:
    if not isinstance(raw, dict):
        raise invalid("The request body must be a JSON object.")
    for key in raw:
        if key not in keys:
            raise invalid(f"Unrecognized request argument supplied: {key}", key, "unknown_parameter")
    for key in keys:
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise invalid(f"{key} is required (a non-empty string).", key)
    return raw


async def load_adapter(request: web.Request) -> web.Response:
    s = _admin(request)
    body = _body(await read_json(request), {"lora_name", "lora_path"})
    name, source = body["lora_name"], Path(body["lora_path"]).expanduser()
    if not NAME_RE.fullmatch(name) or name in RESERVED_NAMES:
        raise invalid(f"lora_name {name!r} is not a valid adapter name (lower-case letters, digits, '-' and '_'; "
                      f"not one of {', '.join(sorted(RESERVED_NAMES))}).", "lora_name")
    folder = s.config.path(s.config.adapters.dir)
    async with s.adapters_lock:
        if name in s.engine.adapters or (folder / name).exists():
            raise invalid(f"The lora adapter '{name}' has already been loaded.", "lora_name", "adapter_exists")
        staged = await asyncio.to_thread(_stage, source, folder, name, s)
        problems = await s.engine.reload_adapters()
        if name not in s.engine.adapters:  # validated, but the weights did not load: take it out again
            await asyncio.to_thread(_move_out, folder, name)
            await s.engine.reload_adapters()
            reason = next((p.reason for p in problems if p.name == name), "it was not attached")
            raise invalid(f"Adapter {name!r} from {source} cannot be loaded: {reason}", "lora_path",
                          "invalid_adapter")
    return web.Response(text=f"Success: LoRA adapter '{name}' added successfully (copied to {staged}).")


def _stage(source: Path, folder: Path, name: str, s: ServeState) -> Path:
    """Copy ``source`` into ``folder/name`` once it validated as the bot validates every folder."""
    if not source.is_dir():
        raise invalid(f"lora_path {source} is not a folder on the server.", "lora_path", "invalid_adapter")
    links = [p.name for p in source.rglob("*") if p.is_symlink()]
    if links:
        raise invalid(f"lora_path {source} holds symbolic links ({', '.join(links[:3])}); refused.", "lora_path",
                      "invalid_adapter")
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / f".loading-{uuid.uuid4().hex}"
    try:
        shutil.copytree(source, staging / name)
        try:  # the name checked is lora_name: the copy carries it
            validate_adapter(staging / name, base_model=s.engine.base_model,
                             base_shape=getattr(s.engine, "base_shape", None))
        except AdapterError as exc:
            raise invalid(f"Adapter {name!r} from {source} is not valid: {exc}", "lora_path",
                          "invalid_adapter") from None
        (staging / name).rename(folder / name)   # one step: the engine never sees half a folder
    except OSError as exc:
        raise ApiError(500, f"Cannot copy {source} into {folder}: {exc}", code="copy_failed") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder / name


async def unload_adapter(request: web.Request) -> web.Response:
    s = _admin(request)
    body = _body(await read_json(request), {"lora_name"})
    name = body["lora_name"]
    folder = s.config.path(s.config.adapters.dir)
    async with s.adapters_lock:
        if name not in s.engine.adapters or not NAME_RE.fullmatch(name):
            raise ApiError(404, f"The lora adapter '{name}' cannot be found.", param="lora_name",
                           code="adapter_not_found")
        kept = await asyncio.to_thread(_move_out, folder, name)
        await s.engine.reload_adapters()
    return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully (kept in {kept}).")


def _move_out(folder: Path, name: str) -> Path:
    target = folder / UNLOADED / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    target.parent.mkdir(parents=True, exist_ok=True)
    (folder / name).rename(target)
    return target
