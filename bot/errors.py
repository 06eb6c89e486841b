"""Error types whose messages are written for the person who will read them."""


class LorabotError(Exception):
    """Base class: ``str(error)`` is safe and useful to show a user or an operator."""


class ConfigError(LorabotError):
    """config.toml (or an override) is invalid. Carries every problem found, not just the first."""

    def __init__(self, path: str, problems: list[str]):
        self.path = path
        self.problems = list(problems)
        listed = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{path}: {len(self.problems)} problem(s):\n{listed}")


class UserInputError(LorabotError):
    """The message cannot be processed as sent; the text says what to change."""


class AdapterError(LorabotError):
    """An adapter folder is missing, malformed, unsafe or does not fit the base model."""


class ModelError(LorabotError):
    """The base model cannot be found or loaded."""


class EngineError(LorabotError):
    """A model request failed; only that request is affected."""


class ChoicesError(EngineError):
    """``classify`` was given choices that do not start with distinct tokens: nothing tells them apart."""


class DataError(LorabotError):
    """Training or evaluation data is malformed. Always names the file and, where known, the line."""

    def __init__(self, path: str, line: int | None, problem: str):
        self.path, self.line, self.problem = str(path), line, problem
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {problem}")


class StoreError(LorabotError):
    """The conversation database cannot be opened or written (read-only, disk full, corrupt)."""
