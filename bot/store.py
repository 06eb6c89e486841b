"""The conversation log: every message and reply, in one SQLite file (sqlite-utils on top).

``Store`` is synchronous and must be used from one thread at a time; ``AsyncStore`` runs every call on
one dedicated worker thread so the event loop never blocks on disk and SQLite is touched from one
thread only. Every SQLite failure surfaces as ``StoreError`` naming the database path.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import sqlite3
from collections.abc import Callable, Coroutine, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

from sqlite_utils import Database

from bot.errors import StoreError
from bot.messages import SkillResult

__all__ = ["MIGRATIONS", "AsyncStore", "Store"]

P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S", bound="Store")

BUSY_TIMEOUT_MS = 5000
CHAT_SKILL = "chat"
INCOMING_STATUSES = ("pending", "answered", "failed", "refused")
REPLY_STATUSES = ("sent", "failed")
_OK_STATUSES = ("answered", "sent")  # turns that count as a real exchange in history and exports


# --- migrations -------------------------------------------------------------------------------------

def _v1_initial_schema(db: Database) -> None:
    for sql in (
        """CREATE TABLE users (
            id INTEGER PRIMARY KEY,
            platform TEXT NOT NULL,
            platform_user_id TEXT NOT NULL,
            name TEXT,
            created_at TEXT NOT NULL,
            UNIQUE (platform, platform_user_id)
        )""",
        """CREATE TABLE chats (
            id INTEGER PRIMARY KEY,
            platform TEXT NOT NULL,
            platform_chat_id TEXT NOT NULL,
            mode TEXT,
            reset_at TEXT,
            created_at TEXT NOT NULL,
            UNIQUE (platform, platform_chat_id)
        )""",
        """CREATE TABLE messages (
            id INTEGER PRIMARY KEY,
            chat_id INTEGER NOT NULL REFERENCES chats(id),
            user_id INTEGER REFERENCES users(id),
            direction TEXT NOT NULL CHECK (direction IN ('in', 'out')),
            text TEXT NOT NULL,
            skill TEXT,
            adapter TEXT,
            status TEXT NOT NULL CHECK (status IN ('pending', 'answered', 'failed', 'refused', 'sent')),
            reply_to INTEGER REFERENCES messages(id),
            platform_message_id TEXT,
            latency_ms REAL,
            prompt_tokens INTEGER,
            completion_tokens INTEGER,
            result_json TEXT,
            error TEXT,
            created_at TEXT NOT NULL
        )""",
        "CREATE INDEX messages_chat ON messages (chat_id, id)",
        "CREATE INDEX messages_user ON messages (user_id)",
        # Foreign-key checks on delete and reply lookups scan children by reply_to.
        "CREATE INDEX messages_reply_to ON messages (reply_to)",
        "CREATE INDEX messages_created ON messages (created_at)",
        "CREATE INDEX messages_pending ON messages (id) WHERE status = 'pending'",
        """CREATE TABLE feedback (
            id INTEGER PRIMARY KEY,
            message_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
            user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            value INTEGER NOT NULL CHECK (value IN (-1, 1)),
            created_at TEXT NOT NULL,
            UNIQUE (message_id, user_id)
        )""",
        "CREATE INDEX feedback_user ON feedback (user_id)",
    ):
        db.execute(sql)


def _v2_platform_state(db: Database) -> None:
    for sql in (
        # Set when the platform refused to deliver to the chat (the user blocked the bot, it was removed
        # from the group); cleared when the chat writes again. Replies to it are not attempted meanwhile.
        "ALTER TABLE chats ADD COLUMN unreachable_at TEXT",
        "ALTER TABLE chats ADD COLUMN unreachable_reason TEXT",
        # The platform messages a reply was delivered as (a long reply is several), so a reaction on any
        # of them finds the stored reply after a restart. They go with the reply (and with the chat).
        """CREATE TABLE sent_messages (
            chat_id INTEGER NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
            platform_message_id TEXT NOT NULL,
            message_id INTEGER NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
            PRIMARY KEY (chat_id, platform_message_id)
        )""",
        "CREATE INDEX sent_messages_message ON sent_messages (message_id)",
        # Small facts a transport keeps across restarts (e.g. the hash of the slash commands last synced).
        """CREATE TABLE settings (
            key TEXT PRIMARY KEY,
            value TEXT NOT NULL,
            updated_at TEXT NOT NULL
        )""",
    ):
        db.execute(sql)


# Applied in order, each exactly once, each in its own transaction. Append only: never edit or reorder
# an entry that has shipped, since databases in the wild record migrations by name.
MIGRATIONS: list[tuple[str, Callable[[Database], None]]] = [
    ("v1_initial_schema", _v1_initial_schema),
    ("v2_platform_state", _v2_platform_state),
]


# --- errors -----------------------------------------------------------------------------------------

def _explain(exc: BaseException, *, read_only: bool = False) -> str:
    """A sentence for the operator; SQLite messages never carry row values, so nothing secret leaks."""
    name = (getattr(exc, "sqlite_errorname", None) or "").upper()
    text = str(exc).lower()
    if isinstance(exc, sqlite3.ProgrammingError) and "closed" in text:
        return "the store is closed"
    if "READONLY" in name or "readonly" in text or "read-only" in text:
        if read_only:
            return "the store was opened read-only, so it cannot be written"
        return ("the database is read-only; check the permissions of the file and its folder "
                "(SQLite also writes the -wal and -shm files next to it)")
    if "FULL" in name or "disk is full" in text:
        return ("the disk is full (or the database reached its size limit); free some space, "
                "or set store.retention_days to purge old messages")
    if "NOTADB" in name or "not a database" in text:
        return "the file is not a SQLite database; point store.path elsewhere or move the file away"
    if "CORRUPT" in name or "malformed" in text:
        return "the database is corrupt; restore a backup or move the file away to start a new one"
    if "BUSY" in name or "LOCKED" in name or "locked" in text:
        return "the database is locked by another process; is another lorabot using the same file?"
    if "CANTOPEN" in name or "unable to open" in text:
        return "cannot open the database file; check that its folder exists and is writable"
    if "IOERR" in name or "disk i/o" in text:
        return "an I/O error occurred reading or writing the database"
    return f"database error ({name or type(exc).__name__}): {exc}"


def _guarded(method: Callable[Concatenate[S, P], R]) -> Callable[Concatenate[S, P], R]:
    @functools.wraps(method)
    def wrapper(self: S, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {_explain(exc, read_only=self.read_only)}") from exc

    return wrapper


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


# --- the store --------------------------------------------------------------------------------------

class Store:
    """The conversation database. Build it with ``Store.open(path)`` or ``Store.memory()``."""

    def __init__(self, db: Database, path: str, *, read_only: bool = False) -> None:
        self.db = db
        self.path = path
        self.read_only = read_only
        self._last_time: datetime | None = None

    # opening ----------------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, *, read_only: bool = False) -> Store:
        """Open (creating if needed) the database file and bring its schema up to date.

        ``read_only`` opens it with SQLite's ``mode=ro``: reads work, every write raises StoreError.
        """
        file = Path(path).expanduser()
        if not read_only:
            try:
                file.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"{file}: cannot create its folder {file.parent}: "
                                 f"{exc.strerror or exc}") from exc
        try:
            if read_only:
                uri = f"{file.resolve().as_uri()}?mode=ro"
                wal = file.with_name(file.name + "-wal")
                if not os.access(file.parent, os.W_OK) and not (wal.exists() and wal.stat().st_size):
                    # WAL readers need to create the -shm file; in a read-only folder with nothing left in
                    # the WAL, the main file alone is the whole database.
                    uri += "&immutable=1"
                conn = sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000)
            else:
                conn = sqlite3.connect(str(file), check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000)
        except sqlite3.Error as exc:
            raise StoreError(f"{file}: {_explain(exc)}") from exc
        return cls._setup(conn, str(file), wal=not read_only, read_only=read_only)

    @classmethod
    def memory(cls) -> Store:
        """A fresh in-memory database (tests, dry runs)."""
        return cls._setup(sqlite3.connect(":memory:", check_same_thread=False), ":memory:", wal=False)

    @classmethod
    def _setup(cls, conn: sqlite3.Connection, path: str, *, wal: bool, read_only: bool = False) -> Store:
        try:
            db = Database(conn, execute_plugins=False)
            store = cls(db, path, read_only=read_only)
            db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            db.execute("PRAGMA foreign_keys = ON")
            if wal:
                db.enable_wal()
                # In WAL mode NORMAL loses at most the last commits on power loss: fine for a chat log.
                db.execute("PRAGMA synchronous = NORMAL")
            store._migrate(read_only=read_only)
        except BaseException as exc:
            conn.close()
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"{path}: {_explain(exc, read_only=read_only)}") from exc
            raise
        return store

    def _migrate(self, *, read_only: bool) -> None:
        applied = set()
        if "_migrations" in self.db.table_names():
            applied = {r["name"] for r in self.db.query("SELECT name FROM _migrations")}
        known = [name for name, _ in MIGRATIONS]
        unknown = sorted(applied - set(known))
        if unknown:
            raise StoreError(f"{self.path}: the database was written by a newer lorabot "
                             f"(unknown migrations: {', '.join(unknown)}); upgrade lorabot")
        pending = [(i, name, fn) for i, (name, fn) in enumerate(MIGRATIONS, 1) if name not in applied]
        if pending and read_only:
            raise StoreError(f"{self.path}: opened read-only but the database needs {len(pending)} "
                             "migration(s); open it once read-write first")
        if not pending:
            return
        self.db.execute("""CREATE TABLE IF NOT EXISTS _migrations (
            id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, applied_at TEXT NOT NULL)""")
        for number, name, fn in pending:
            try:
                with self._write():
                    fn(self.db)
                    self.db.execute("INSERT INTO _migrations (id, name, applied_at) VALUES (?, ?, ?)",
                                    [number, name, self._now()])
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: migration {name} failed: {_explain(exc)}") from exc

    @contextlib.contextmanager
    def _write(self) -> Iterator[None]:
        """A write transaction that takes the write lock at its start (``BEGIN IMMEDIATE``).

        sqlite-utils' ``atomic()`` begins a deferred transaction: one that reads first and writes later can
        fail at once with SQLITE_BUSY_SNAPSHOT when another process committed in between, without waiting
        for the busy timeout. Taking the lock first makes a second writer wait its turn instead. Nested
        calls become savepoints, as in ``atomic()``.
        """
        conn = self.db.conn
        if conn.in_transaction:
            with self.db.atomic():
                yield
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            conn.execute("COMMIT")
        except BaseException:  # also a failed COMMIT: the connection must not stay inside the transaction
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _now(self) -> str:
        # Strictly increasing within a store, so "created after reset_at" never ties on a coarse clock.
        moment = datetime.now(UTC)
        if self._last_time is not None and moment <= self._last_time:
            moment = self._last_time + timedelta(microseconds=1)
        self._last_time = moment
        return _iso(moment)

    def _one(self, sql: str, params: list[Any] | tuple[Any, ...] = ()) -> Any:
        row = self.db.execute(sql, list(params)).fetchone()
        return None if row is None else row[0]

    # users and chats --------------------------------------------------------------------------------

    @_guarded
    def ensure_user(self, platform: str, platform_user_id: str, name: str | None = None) -> int:
        """The row id of this platform user, created on first sight; a given ``name`` replaces the old."""
        key = [platform, str(platform_user_id)]
        row = self.db.execute("SELECT id, name FROM users WHERE platform = ? AND platform_user_id = ?",
                              key).fetchone()
        if row is not None and (name is None or name == row[1]):
            return int(row[0])
        with self._write():
            self.db.execute(
                """INSERT INTO users (platform, platform_user_id, name, created_at) VALUES (?, ?, ?, ?)
                   ON CONFLICT (platform, platform_user_id)
                   DO UPDATE SET name = coalesce(excluded.name, users.name)""",
                [*key, name, self._now()])
            return int(self._one("SELECT id FROM users WHERE platform = ? AND platform_user_id = ?", key))

    @_guarded
    def ensure_chat(self, platform: str, platform_chat_id: str) -> int:
        """The row id of this platform chat, created on first sight."""
        key = [platform, str(platform_chat_id)]
        found = self._one("SELECT id FROM chats WHERE platform = ? AND platform_chat_id = ?", key)
        if found is not None:
            return int(found)
        with self._write():
            self.db.execute(
                """INSERT INTO chats (platform, platform_chat_id, created_at) VALUES (?, ?, ?)
                   ON CONFLICT (platform, platform_chat_id) DO NOTHING""",
                [*key, self._now()])
            return int(self._one("SELECT id FROM chats WHERE platform = ? AND platform_chat_id = ?", key))

    @_guarded
    def get_mode(self, chat_id: int) -> str | None:
        """The chat's selected mode (skill), or None when it never chose one."""
        return self._one("SELECT mode FROM chats WHERE id = ?", [chat_id])

    @_guarded
    def set_mode(self, chat_id: int, mode: str | None) -> None:
        """Remember the chat's mode; None goes back to the default."""
        with self._write():
            if self.db.execute("UPDATE chats SET mode = ? WHERE id = ?", [mode, chat_id]).rowcount == 0:
                raise ValueError(f"no chat with id {chat_id}")

    @_guarded
    def migrate_chat(self, platform: str, old_chat_id: str, new_chat_id: str) -> int | None:
        """The platform gave the chat a new id (a Telegram group upgraded to a supergroup): its mode,
        history and delivery records move to the new id, in one transaction. Returns the chat's row id,
        or None when the old id is unknown (nothing to move, e.g. a second notice of the same move).

        When the new id already has a row (messages arrived there before the move was noticed), the two
        merge: the old chat's messages join it, and its mode is kept unless the new chat chose one.
        """
        with self._write():
            old = self._one("SELECT id FROM chats WHERE platform = ? AND platform_chat_id = ?",
                            [platform, str(old_chat_id)])
            if old is None:
                return None
            new = self._one("SELECT id FROM chats WHERE platform = ? AND platform_chat_id = ?",
                            [platform, str(new_chat_id)])
            if new is None or new == old:
                self.db.execute("UPDATE chats SET platform_chat_id = ? WHERE id = ?", [str(new_chat_id), old])
                return int(old)
            (old_mode, old_reset), (new_mode, new_reset) = (
                self.db.execute("SELECT mode, reset_at FROM chats WHERE id = ?", [i]).fetchone() for i in (old, new))
            resets = [r for r in (old_reset, new_reset) if r is not None]
            # A reset in either chat still hides what came before it.
            self.db.execute("UPDATE chats SET mode = ?, reset_at = ? WHERE id = ?",
                            [new_mode or old_mode, max(resets) if resets else None, new])
            self.db.execute("UPDATE messages SET chat_id = ? WHERE chat_id = ?", [new, old])
            # Message ids are per chat on Telegram: an id the new chat already uses keeps its own reply.
            self.db.execute("UPDATE OR IGNORE sent_messages SET chat_id = ? WHERE chat_id = ?", [new, old])
            self.db.execute("DELETE FROM chats WHERE id = ?", [old])  # its leftover sent_messages go too
            return int(new)

    @_guarded
    def mark_unreachable(self, platform: str, platform_chat_id: str, reason: str) -> None:
        """The platform refuses to deliver to this chat (the user blocked the bot, it was removed)."""
        with self._write():
            self.db.execute(
                """UPDATE chats SET unreachable_at = ?, unreachable_reason = ?
                   WHERE platform = ? AND platform_chat_id = ?""",
                [self._now(), reason, platform, str(platform_chat_id)])

    @_guarded
    def chat_reachable(self, platform: str, platform_chat_id: str, written_at: datetime) -> bool:
        """Whether a reply to a message written at ``written_at`` (the platform's time) may be attempted.

        False for messages written before the chat became unreachable (e.g. queued behind the reply that
        found the bot blocked); a message written after it shows the chat is back, and clears the mark.
        """
        key = [platform, str(platform_chat_id)]
        since = self._one("SELECT unreachable_at FROM chats WHERE platform = ? AND platform_chat_id = ?", key)
        if since is None:
            return True
        if _iso(written_at) <= since:
            return False
        with self._write():
            self.db.execute("""UPDATE chats SET unreachable_at = NULL, unreachable_reason = NULL
                               WHERE platform = ? AND platform_chat_id = ?""", key)
        return True

    @_guarded
    def remember_sent(self, platform: str, platform_chat_id: str, platform_message_ids: list[str],
                      message_id: int) -> bool:
        """Record that stored reply ``message_id`` was delivered as these platform messages; False (and
        nothing written) when the reply is gone meanwhile (its user sent /forget)."""
        with self._write():
            chat = self._one(
                """SELECT c.id FROM chats c JOIN messages m ON m.chat_id = c.id
                   WHERE c.platform = ? AND c.platform_chat_id = ? AND m.id = ? AND m.direction = 'out'""",
                [platform, str(platform_chat_id), message_id])
            if chat is None:
                return False
            self.db.conn.executemany(
                """INSERT INTO sent_messages (chat_id, platform_message_id, message_id) VALUES (?, ?, ?)
                   ON CONFLICT (chat_id, platform_message_id) DO UPDATE SET message_id = excluded.message_id""",
                [(chat, str(pid), message_id) for pid in platform_message_ids])
        return True

    @_guarded
    def sent_reply(self, platform: str, platform_chat_id: str, platform_message_id: str) -> int | None:
        """The stored reply delivered as this platform message, if it is one of ours."""
        found = self._one(
            """SELECT s.message_id FROM sent_messages s JOIN chats c ON c.id = s.chat_id
               WHERE c.platform = ? AND c.platform_chat_id = ? AND s.platform_message_id = ?""",
            [platform, str(platform_chat_id), str(platform_message_id)])
        return None if found is None else int(found)

    @_guarded
    def get_setting(self, key: str) -> str | None:
        return self._one("SELECT value FROM settings WHERE key = ?", [key])

    @_guarded
    def set_setting(self, key: str, value: str) -> None:
        with self._write():
            self.db.execute(
                """INSERT INTO settings (key, value, updated_at) VALUES (?, ?, ?)
                   ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at""",
                [key, value, self._now()])

    @_guarded
    def reset(self, chat_id: int) -> None:
        """Start a fresh conversation: history() ignores everything before now."""
        with self._write():
            if self.db.execute("UPDATE chats SET reset_at = ? WHERE id = ?",
                               [self._now(), chat_id]).rowcount == 0:
                raise ValueError(f"no chat with id {chat_id}")

    # messages ---------------------------------------------------------------------------------------

    @_guarded
    def log_incoming(self, *, chat_id: int, user_id: int | None, text: str, skill: str | None = None,
                     platform_message_id: str | int | None = None) -> int | None:
        """Store a user's message as 'pending' (before the model runs, so a crash leaves a trace); returns its
        id, or None when its user or chat was deleted meanwhile (a /forget from another chat): then nothing
        about them is written again."""
        table = self.db.table("messages")
        with self._write():  # the lock first: a /forget cannot commit between the check and the insert
            gone = self._one("SELECT 1 FROM chats WHERE id = ?", [chat_id]) is None or (
                user_id is not None and self._one("SELECT 1 FROM users WHERE id = ?", [user_id]) is None)
            if gone:
                return None
            table.insert({
                "chat_id": chat_id, "user_id": user_id, "direction": "in", "text": text, "skill": skill,
                "status": "pending",
                "platform_message_id": None if platform_message_id is None else str(platform_message_id),
                "created_at": self._now(),
            })
            return cast(int, table.last_pk)

    @_guarded
    def log_reply(self, *, chat_id: int, reply_to: int, text: str, skill: str | None = None,
                  adapter: str | None = None, status: str = "sent", latency_ms: float | None = None,
                  prompt_tokens: int | None = None, completion_tokens: int | None = None,
                  result: Mapping[str, Any] | SkillResult | None = None,
                  incoming_status: str = "answered") -> int | None:
        """Store the reply and settle the incoming message's status, atomically; returns the reply's id,
        or None when the question no longer exists (its user sent /forget while it was being answered)."""
        if status not in REPLY_STATUSES:
            raise ValueError(f"reply status must be one of {', '.join(REPLY_STATUSES)}; got {status!r}")
        if incoming_status not in INCOMING_STATUSES[1:]:
            raise ValueError(f"incoming_status must be answered, failed or refused; got {incoming_status!r}")
        if result is not None and not isinstance(result, Mapping):
            result = result.to_json()
        table = self.db.table("messages")
        with self._write():
            if self._one("SELECT 1 FROM messages WHERE id = ?", [reply_to]) is None:
                return None  # the question was deleted meanwhile (/forget): the answer is not kept either
            table.insert({
                "chat_id": chat_id, "user_id": None, "direction": "out", "text": text, "skill": skill,
                "adapter": adapter, "status": status, "reply_to": reply_to, "latency_ms": latency_ms,
                "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "result_json": None if result is None else json.dumps(dict(result), ensure_ascii=False),
                "created_at": self._now(),
            })
            reply_id = cast(int, table.last_pk)
            updated = self.db.execute(
                "UPDATE messages SET status = ? WHERE id = ? AND chat_id = ? AND direction = 'in'",
                [incoming_status, reply_to, chat_id]).rowcount
            if updated == 0:
                raise ValueError(f"message {reply_to} is not an incoming message of chat {chat_id}")
        return reply_id

    @_guarded
    def mark_incoming(self, message_id: int, status: str, error: str | None = None) -> None:
        """Settle an incoming message without a stored reply (e.g. the model failed)."""
        if status not in INCOMING_STATUSES:
            raise ValueError(f"status must be one of {', '.join(INCOMING_STATUSES)}; got {status!r}")
        with self._write():
            updated = self.db.execute(
                "UPDATE messages SET status = ?, error = ? WHERE id = ? AND direction = 'in'",
                [status, error, message_id]).rowcount
            if updated == 0:
                raise ValueError(f"no incoming message with id {message_id}")

    @_guarded
    def history(self, chat_id: int, *, skill: str = CHAT_SKILL, limit: int = 50) -> list[tuple[str, str]]:
        """The chat's recent (role, text) turns for ``skill``, oldest first, since the last reset.

        Only answered exchanges count; ``limit`` caps the number of entries and whole user/assistant
        pairs are kept, so the list always starts with a user turn.
        """
        pairs = max(limit, 0) // 2
        if pairs == 0:
            return []
        rows = self.db.execute(
            f"""SELECT i.text, o.text FROM messages i
                JOIN chats c ON c.id = i.chat_id
                JOIN messages o ON o.id = (
                    SELECT max(id) FROM messages
                    WHERE reply_to = i.id AND direction = 'out' AND status IN {_OK_STATUSES})
                WHERE i.chat_id = ? AND i.direction = 'in' AND i.skill = ? AND i.status IN {_OK_STATUSES}
                  AND (c.reset_at IS NULL OR i.created_at > c.reset_at)
                ORDER BY i.id DESC LIMIT ?""",
            [chat_id, skill, pairs]).fetchall()
        turns: list[tuple[str, str]] = []
        for question, answer in reversed(rows):
            turns += [("user", question), ("assistant", answer)]
        return turns

    @_guarded
    def unanswered(self) -> list[dict[str, Any]]:
        """Incoming messages still 'pending': the ones a crash or restart left without an answer."""
        return list(self.db.query(
            """SELECT m.id, m.chat_id, m.user_id, m.text, m.skill, m.platform_message_id, m.created_at,
                      c.platform, c.platform_chat_id
               FROM messages m JOIN chats c ON c.id = m.chat_id
               WHERE m.status = 'pending' ORDER BY m.id"""))

    # feedback ---------------------------------------------------------------------------------------

    @_guarded
    def add_feedback(self, *, message_id: int, platform: str, platform_user_id: str, value: int) -> bool:
        """Record a 👍 (+1) or 👎 (-1) on a reply; a later vote by the same user replaces the earlier.

        Returns False when ``message_id`` is not a stored outgoing message.
        """
        if isinstance(value, bool) or value not in (1, -1):
            raise ValueError(f"feedback value must be +1 or -1; got {value!r}")
        if self._one("SELECT direction FROM messages WHERE id = ?", [message_id]) != "out":
            return False
        with self._write():
            user_id = self.ensure_user(platform, platform_user_id)
            self.db.execute(
                """INSERT INTO feedback (message_id, user_id, value, created_at) VALUES (?, ?, ?, ?)
                   ON CONFLICT (message_id, user_id)
                   DO UPDATE SET value = excluded.value, created_at = excluded.created_at""",
                [message_id, user_id, value, self._now()])
        return True

    @_guarded
    def retract_feedback(self, *, message_id: int, platform: str, platform_user_id: str, value: int) -> bool:
        """Withdraw a user's vote on a reply if it is still ``value`` (a removed 👍 must not delete the 👎
        that replaced it); True when a vote went."""
        with self._write():
            return self.db.execute(
                """DELETE FROM feedback WHERE message_id = ? AND value = ? AND user_id = (
                       SELECT id FROM users WHERE platform = ? AND platform_user_id = ?)""",
                [message_id, value, platform, str(platform_user_id)]).rowcount > 0

    # privacy and housekeeping -----------------------------------------------------------------------

    @_guarded
    def forget_user(self, platform: str, platform_user_id: str) -> dict[str, int]:
        """Delete everything about one user, in one transaction; returns how many rows of each kind went.

        Removes their messages, the replies to them, their votes and the votes on those replies, the
        user row, and the chats in which nobody else wrote.
        """
        counts = {"users": 0, "chats": 0, "messages": 0, "feedback": 0}
        with self._write():
            user_id = self._one("SELECT id FROM users WHERE platform = ? AND platform_user_id = ?",
                                [platform, str(platform_user_id)])
            if user_id is None:
                return counts
            solo_chats = [r[0] for r in self.db.execute(
                """SELECT DISTINCT chat_id FROM messages WHERE user_id = :u AND chat_id NOT IN (
                       SELECT chat_id FROM messages WHERE user_id IS NOT NULL AND user_id != :u)""",
                {"u": user_id}).fetchall()]
            theirs = "SELECT id FROM messages WHERE user_id = :u"
            replies = f"SELECT id FROM messages WHERE reply_to IN ({theirs})"
            counts["feedback"] += self.db.execute(
                f"DELETE FROM feedback WHERE user_id = :u OR message_id IN ({theirs}) "
                f"OR message_id IN ({replies})", {"u": user_id}).rowcount
            self.db.execute(f"DELETE FROM sent_messages WHERE message_id IN ({replies})", {"u": user_id})
            # Replies reference the incoming rows, so they must go first.
            counts["messages"] += self.db.execute(
                f"DELETE FROM messages WHERE id IN ({replies})", {"u": user_id}).rowcount
            counts["messages"] += self.db.execute("DELETE FROM messages WHERE user_id = ?",
                                                  [user_id]).rowcount
            for chat_id in solo_chats:
                counts["feedback"] += self.db.execute(
                    "DELETE FROM feedback WHERE message_id IN (SELECT id FROM messages WHERE chat_id = ?)",
                    [chat_id]).rowcount
                self.db.execute("DELETE FROM sent_messages WHERE chat_id = ?", [chat_id])
                counts["messages"] += self.db.execute(
                    "DELETE FROM messages WHERE chat_id = ? AND direction = 'out'", [chat_id]).rowcount
                counts["messages"] += self.db.execute(
                    "DELETE FROM messages WHERE chat_id = ?", [chat_id]).rowcount
                counts["chats"] += self.db.execute("DELETE FROM chats WHERE id = ?", [chat_id]).rowcount
            counts["users"] = self.db.execute("DELETE FROM users WHERE id = ?", [user_id]).rowcount
        return counts

    @_guarded
    def purge_older_than(self, days: int) -> int:
        """Delete messages older than ``days`` days (and replies to them, and their votes); 0 keeps all.

        Users and chats older than that with nothing left in the log go too, so a retention period also
        bounds how long a name or a chat setting is kept. Returns the number of messages deleted.
        """
        if days < 0:
            raise ValueError(f"days must be 0 or more; got {days}")
        if days == 0:
            return 0
        cutoff = _iso(datetime.now(UTC) - timedelta(days=days))
        old = "SELECT id FROM messages WHERE created_at < :cutoff"
        replies = f"SELECT id FROM messages WHERE reply_to IN ({old})"
        with self._write():
            self.db.execute(f"DELETE FROM feedback WHERE message_id IN ({old}) OR message_id IN ({replies})",
                            {"cutoff": cutoff})
            self.db.execute(f"DELETE FROM sent_messages WHERE message_id IN ({old}) OR message_id IN ({replies})",
                            {"cutoff": cutoff})
            # A reply can be newer than the cutoff; it goes with its question, and before it (foreign key).
            deleted = self.db.execute(f"DELETE FROM messages WHERE id IN ({replies})",
                                      {"cutoff": cutoff}).rowcount
            deleted += self.db.execute("DELETE FROM messages WHERE created_at < :cutoff",
                                       {"cutoff": cutoff}).rowcount
            self.db.execute("""DELETE FROM chats WHERE created_at < :cutoff
                               AND NOT EXISTS (SELECT 1 FROM messages WHERE chat_id = chats.id)""",
                            {"cutoff": cutoff})
            self.db.execute("""DELETE FROM users WHERE created_at < :cutoff
                               AND NOT EXISTS (SELECT 1 FROM messages WHERE user_id = users.id)
                               AND NOT EXISTS (SELECT 1 FROM feedback WHERE user_id = users.id)""",
                            {"cutoff": cutoff})
        return deleted

    @_guarded
    def stats(self, *, chat_id: int | None = None) -> dict[str, Any]:
        """Counts for an operator: whole database, or one chat when ``chat_id`` is given."""
        where, params = ("WHERE m.chat_id = ?", [chat_id]) if chat_id is not None else ("", [])
        and_ = "AND" if where else "WHERE"
        if chat_id is None:
            users = self._one("SELECT count(*) FROM users")
            chats = self._one("SELECT count(*) FROM chats")
        else:
            users = self._one("SELECT count(DISTINCT user_id) FROM messages m " + where, params)
            chats = self._one("SELECT count(*) FROM chats WHERE id = ?", params)
        directions = dict(self.db.execute(
            f"SELECT direction, count(*) FROM messages m {where} GROUP BY direction", params).fetchall())
        by_skill = {skill or "none": n for skill, n in self.db.execute(
            f"SELECT skill, count(*) FROM messages m {where} {and_} direction = 'in' GROUP BY skill",
            params).fetchall()}
        by_status = dict(self.db.execute(
            f"SELECT status, count(*) FROM messages m {where} GROUP BY status", params).fetchall())
        votes = dict(self.db.execute(
            f"SELECT f.value, count(*) FROM feedback f JOIN messages m ON m.id = f.message_id {where} "
            "GROUP BY f.value", params).fetchall())
        latency = f"FROM messages m {where} {and_} direction = 'out' AND latency_ms IS NOT NULL"
        n = self._one(f"SELECT count(*) {latency}", params)
        median = None
        if n:
            middle = [r[0] for r in self.db.execute(
                f"SELECT latency_ms {latency} ORDER BY latency_ms LIMIT ? OFFSET ?",
                [*params, 2 - n % 2, (n - 1) // 2]).fetchall()]
            median = sum(middle) / len(middle)
        return {
            "users": users, "chats": chats,
            "messages": {"in": directions.get("in", 0), "out": directions.get("out", 0)},
            "by_skill": by_skill, "by_status": by_status,
            "feedback": {"up": votes.get(1, 0), "down": votes.get(-1, 0)},
            "median_latency_ms": median,
        }

    def export_chat_examples(self, only_positive_feedback: bool = False) -> Iterator[dict[str, Any]]:
        """Chat conversations for fine-tuning: ``{"messages": [{"role", "content"}, ...]}``.

        One conversation per chat and reset period, answered chat-skill turns only. With
        ``only_positive_feedback`` only replies with a net positive vote are kept, and a conversation is
        split wherever a turn is dropped so every example stays contiguous.
        """
        try:
            chats = self.db.execute("SELECT id, reset_at FROM chats ORDER BY id").fetchall()
            for chat_id, reset_at in chats:
                rows = self.db.execute(
                    f"""SELECT i.text, o.text, i.created_at,
                               (SELECT coalesce(sum(value), 0) FROM feedback WHERE message_id = o.id)
                        FROM messages i JOIN messages o ON o.id = (
                            SELECT max(id) FROM messages
                            WHERE reply_to = i.id AND direction = 'out' AND status IN {_OK_STATUSES})
                        WHERE i.chat_id = ? AND i.direction = 'in' AND i.skill = ?
                          AND i.status IN {_OK_STATUSES}
                        ORDER BY i.id""",
                    [chat_id, CHAT_SKILL]).fetchall()
                conversation: list[dict[str, str]] = []
                after_reset = False
                for question, answer, created_at, score in rows:
                    crossed = reset_at is not None and not after_reset and created_at > reset_at
                    after_reset = after_reset or crossed
                    if crossed or (only_positive_feedback and score <= 0):
                        if conversation:
                            yield {"messages": conversation}
                        conversation = []
                    if only_positive_feedback and score <= 0:
                        continue
                    conversation += [{"role": "user", "content": question},
                                     {"role": "assistant", "content": answer}]
                if conversation:
                    yield {"messages": conversation}
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {_explain(exc, read_only=self.read_only)}") from exc

    @_guarded
    def vacuum(self) -> None:
        """Rebuild the file to return the space freed by deletions to the disk."""
        self.db.vacuum()

    @_guarded
    def integrity_check(self) -> str:
        """SQLite's own consistency check: "ok", or the problems found, one per line."""
        return "\n".join(str(r[0]) for r in self.db.execute("PRAGMA integrity_check").fetchall())

    def close(self) -> None:
        """Close the connection; safe to call twice."""
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --- async wrapper ----------------------------------------------------------------------------------

def _offload(method: Callable[Concatenate[Store, P], R]) -> Callable[Concatenate[AsyncStore, P],
                                                                     Coroutine[Any, Any, R]]:
    """Turn a Store method into an AsyncStore coroutine method that runs on the store's thread."""

    @functools.wraps(method)
    async def wrapper(self: AsyncStore, *args: P.args, **kwargs: P.kwargs) -> R:
        return await self._run(method, *args, **kwargs)

    return wrapper


def _export_list(store: Store, only_positive_feedback: bool = False) -> list[dict[str, Any]]:
    # Materialised on the worker: a lazy iterator would touch SQLite from the event loop's thread.
    return list(store.export_chat_examples(only_positive_feedback))


class AsyncStore:
    """``Store`` for asyncio code: the same methods as coroutines, all run in order on one worker thread.

    A cancelled caller does not cancel the write it started: it still lands.
    """

    def __init__(self, store: Store, executor: ThreadPoolExecutor | None = None) -> None:
        """Wrap ``store``; ``executor`` is the single-worker pool it was opened on, if any."""
        self._store = store
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorabot-store")
        self._closed = False

    @classmethod
    async def open(cls, path: str | Path, *, read_only: bool = False) -> AsyncStore:
        """Open the file on the worker thread (migrations included) and wrap it."""
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorabot-store")
        try:
            store = await asyncio.get_running_loop().run_in_executor(
                executor, functools.partial(Store.open, path, read_only=read_only))
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(store, executor)

    @property
    def path(self) -> str:
        return self._store.path

    async def _run(self, fn: Callable[Concatenate[Store, P], R], *args: P.args, **kwargs: P.kwargs) -> R:
        if self._closed:
            raise StoreError(f"{self._store.path}: the store is closed")
        call = functools.partial(fn, self._store, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    ensure_user = _offload(Store.ensure_user)
    ensure_chat = _offload(Store.ensure_chat)
    get_mode = _offload(Store.get_mode)
    set_mode = _offload(Store.set_mode)
    reset = _offload(Store.reset)
    log_incoming = _offload(Store.log_incoming)
    log_reply = _offload(Store.log_reply)
    mark_incoming = _offload(Store.mark_incoming)
    history = _offload(Store.history)
    unanswered = _offload(Store.unanswered)
    add_feedback = _offload(Store.add_feedback)
    retract_feedback = _offload(Store.retract_feedback)
    migrate_chat = _offload(Store.migrate_chat)
    mark_unreachable = _offload(Store.mark_unreachable)
    chat_reachable = _offload(Store.chat_reachable)
    remember_sent = _offload(Store.remember_sent)
    sent_reply = _offload(Store.sent_reply)
    get_setting = _offload(Store.get_setting)
    set_setting = _offload(Store.set_setting)
    forget_user = _offload(Store.forget_user)
    purge_older_than = _offload(Store.purge_older_than)
    stats = _offload(Store.stats)
    export_chat_examples = _offload(_export_list)
    vacuum = _offload(Store.vacuum)
    integrity_check = _offload(Store.integrity_check)

    async def close(self) -> None:
        """Wait for every queued call to finish, then close the database and stop the thread."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        try:
            # Queued behind every pending call on the single worker, so those complete first.
            await loop.run_in_executor(self._executor, self._store.close)
        finally:
            self._executor.shutdown(wait=False)
