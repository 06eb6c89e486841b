"""Write an adapter folder atomically: built beside its destination, validated, then moved into place."""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from bot.adapters import NAME_RE, RESERVED_NAMES, AdapterInfo, validate_adapter
from bot.errors import AdapterError


def check_name(out: Path) -> str:
    """The adapter name is the folder name; refuse a bad one before any training time is spent."""
    name = out.name
    if not NAME_RE.fullmatch(name) or name in RESERVED_NAMES:
        raise AdapterError(f"--out {out}: the folder name {name!r} is not a valid adapter name (lower-case "
                           f"letters, digits, '-' and '_'; not {', '.join(sorted(RESERVED_NAMES))})")
    return name


def publish(out: Path, write: Callable[[Path], None], *, base_model: str, base_shape: str) -> AdapterInfo:
    """Call ``write(folder)``, check the result with the bot's own validator, then replace ``out``.

    The staging folder is hidden (a dot name), so the bot's adapter scan never picks up a half-written
    adapter, and any failure removes it: a failed run leaves ``out`` as it was.
    """
    check_name(out)
    staging = out.parent / f".{out.name}.staging-{os.getpid()}"
    folder, previous = staging / out.name, staging / "previous"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        folder.mkdir(parents=True)
        write(folder)
        info = validate_adapter(folder, base_model=base_model, base_shape=base_shape)
        if out.exists():
            out.rename(previous)
        try:
            folder.rename(out)
        except OSError:
            if previous.exists() and not out.exists():
                previous.rename(out)
            raise
        return dataclasses.replace(info, path=out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
