"""One data entry of a recipe (``data.train`` / ``data.dev``): a file and how to select from it.

A recipe writes an entry as a bare path or as a table with a path and options. ``DataSpec`` keeps which
of the two it was, and the table's keys in order, because the resolved recipe.toml and the ``--resume``
fingerprint write entries back as they were read: ``"a.jsonl"`` and ``{ path = "a.jsonl" }`` select the
same examples but fingerprint differently, as they always have.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bot.errors import ConfigError

PARTS = ("train", "holdout")


@dataclass(frozen=True)
class DataSpec:
    path: str
    limit: int = 0                 # a seeded sample of this many examples (0 = all)
    skip: int = 0                  # leave out exactly the examples ``limit = skip`` would sample
    min_words: int = 0             # only examples whose key text has at least this many words
    balance: bool = False          # the sample takes equal shares per label (sentiment)
    # A deterministic group split (the same key, e.g. a QA context, always on one side): the fraction held out.
    # A recipe's integer 0 stays an integer so that it is written back as it was read.
    holdout: float = 0.0
    part: str = "train"            # which side of the holdout split: "train" or "holdout"
    # Stories: an untitled story gets a theme or opening taken from itself (training/story_themes.py).
    themes: bool = False
    # QA: each context's sentences in a seeded new order (training/qa_shuffle.py), after the holdout split.
    shuffle_sentences: bool = False
    # The keys the recipe's table wrote, in order; None: the recipe wrote a bare path.
    keys: tuple[str, ...] | None = field(default=None, repr=False)

    def as_table(self) -> dict[str, Any]:
        """The entry as a table: the keys the recipe wrote, then any other option not at its default."""
        written = list(self.keys or ("path",))
        written += [f.name for f in _OPTIONS if f.name not in written and getattr(self, f.name) != f.default]
        return {k: getattr(self, k) for k in written}

    def written(self) -> str | dict[str, Any]:
        """The entry as a recipe writes it (a bare path when it was one and nothing else was set)."""
        table = self.as_table()
        return self.path if self.keys is None and list(table) == ["path"] else table


_OPTIONS = [f for f in dataclasses.fields(DataSpec) if f.name not in ("path", "keys")]
_KINDS = {"str": str, "int": int, "float": float, "bool": bool}
_TYPES: dict[str, type] = {"path": str, **{f.name: _KINDS[str(f.type)] for f in _OPTIONS}}


def _fits(kind: type, value: Any) -> bool:
    if kind is bool or isinstance(value, bool):  # TOML's true is no count, and 1 is no boolean
        return kind is bool and isinstance(value, bool)
    return isinstance(value, int | float) if kind is float else isinstance(value, kind)


def data_specs(raw: list[Any] | tuple[Any, ...], where: str, problems: list[str] | None = None
               ) -> tuple[DataSpec, ...]:
    """Check data entries (paths, tables or DataSpecs); every problem goes to ``problems``, else is raised."""
    specs = []
    sink = problems if problems is not None else []
    for i, item in enumerate(raw):
        if isinstance(item, DataSpec):
            specs.append(item)
            continue
        at = f"{where}[{i}]"
        table = {"path": item} if isinstance(item, str) else item
        if not isinstance(table, Mapping) or not isinstance(table.get("path"), str):
            sink.append(f"{at}: expected a path or a table with a path")
            continue
        before = len(sink)
        for key, value in table.items():
            kind = _TYPES.get(key)
            if kind is None:
                sink.append(f"{at}.{key}: unknown key (known: {', '.join(_TYPES)})")
            elif not _fits(kind, value):
                sink.append(f"{at}.{key}: expected {kind.__name__}, got {value!r}")
        # The ranges are checked on the well-typed values only (a wrong type is reported above).
        typed = {k: v for k, v in table.items() if k in _TYPES and _fits(_TYPES[k], v)}
        if typed.get("part", "train") not in PARTS:
            sink.append(f"{at}.part: 'train' or 'holdout'")
        for key in ("limit", "skip", "min_words"):
            if typed.get(key, 0) < 0:
                sink.append(f"{at}.{key}: must not be negative")
        if not 0 <= typed.get("holdout", 0) < 1:
            sink.append(f"{at}.holdout: a fraction in [0, 1)")
        if len(sink) == before:
            specs.append(DataSpec(**table, keys=None if isinstance(item, str) else tuple(table)))
    if problems is None and sink:
        raise ConfigError(where, sink)
    return tuple(specs)


def as_spec(spec: DataSpec | Mapping[str, Any] | str, where: str = "data spec") -> DataSpec:
    """A DataSpec from one entry as a recipe writes it (callers outside recipes pass a plain mapping)."""
    (checked,) = data_specs([spec], where)
    return checked
