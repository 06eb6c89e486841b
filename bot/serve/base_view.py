"""The engine seen without its adapters: a core over it answers every skill with the bare base model.

The page streams the base model's answer beside the adapter's as two requests (batched together);
``/compare`` gives the same pair but only once both are complete. Everything except the adapter list
is the engine itself, so the requests go to the same worker and batch.
"""

from __future__ import annotations

from typing import Any

from bot.adapters import AdapterInfo, AdapterProblem


class BaseOnly:
    def __init__(self, engine: Any):
        self._engine = engine

    @property
    def adapters(self) -> dict[str, AdapterInfo]:
        return {}

    @property
    def problems(self) -> list[AdapterProblem]:
        return []

    async def reload_adapters(self) -> list[AdapterProblem]:
        return []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)
