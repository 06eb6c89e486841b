"""``lorabot doctor``: what this installation will actually use, to paste into a bug report.

Everything is looked up, nothing is assumed; a part that cannot be found says why instead of failing
the whole report. Tokens are never printed: only whether each one is set.
"""

from __future__ import annotations

import json
import platform
import sys
from typing import Any

from bot import __version__
from bot.config import Config


def _database(config: Config) -> dict[str, Any]:
    path = config.path(config.store.path)
    out: dict[str, Any] = {"path": str(path), "exists": path.exists()}
    if not path.exists():
        out["integrity"] = "not created yet (the first message creates it)"
        return out
    out["bytes"] = path.stat().st_size
    try:
        from bot.store import Store

        store = Store.open(path, read_only=True)
        try:
            out["integrity"] = store.integrity_check()
        finally:
            store.close()
    except Exception as exc:
        out["integrity"] = f"cannot open: {exc}"
    return out


def report(config: Config) -> dict[str, Any]:
    from bot.engine import describe

    out: dict[str, Any] = {
        "lorabot": __version__,
        "python": f"{platform.python_implementation()} {platform.python_version()} ({sys.executable})",
        "platform": platform.platform(),
        "config": str(config.root / "config.toml") if (config.root / "config.toml").is_file() else "defaults",
    }
    try:
        out.update(describe(config))
    except Exception as exc:  # e.g. torch missing: say so, keep the rest of the report
        out["engine"] = {"problem": f"{type(exc).__name__}: {exc}"}
    out["database"] = _database(config)
    out["transports"] = {
        p: {"token_env": getattr(config, p).token_env, "token_set": config.token(p) is not None}
        for p in ("telegram", "discord")
    }
    return out


def _lines(value: Any, indent: str = "") -> list[str]:
    lines: list[str] = []
    for key, item in value.items():
        if isinstance(item, dict):
            lines.append(f"{indent}{key}:")
            lines += _lines(item, indent + "  ") if item else [f"{indent}  (none)"]
        elif isinstance(item, list):
            lines.append(f"{indent}{key}: " + (", ".join(map(str, item)) if item else "(none)"))
        else:
            lines.append(f"{indent}{key}: {item}")
    return lines


def render(data: dict[str, Any], *, as_json: bool) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) if as_json else "\n".join(_lines(data))
