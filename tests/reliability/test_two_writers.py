"""Two processes writing one database at once (a bot and `lorabot ask`/`db purge` beside it): no write
fails, no row is lost. Writes take the lock up front (BEGIN IMMEDIATE): a deferred transaction that reads
and then writes fails at once with SQLITE_BUSY_SNAPSHOT when the other process committed in between."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bot.store import Store

WRITER = r"""
import sys
from bot.store import Store
path, who, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
store = Store.open(path)
errors = 0
for i in range(rounds):
    try:
        user = store.ensure_user("test", f"{who}-{i % 7}")
        chat = store.ensure_chat("test", f"{who}-{i % 5}")
        q = store.log_incoming(chat_id=chat, user_id=user, text=f"{who} question {i}")
        assert store.log_reply(chat_id=chat, reply_to=q, text=f"{who} answer {i}") is not None
        if who == "purger" and i % 10 == 0:
            store.purge_older_than(3650)
    except Exception as exc:
        errors += 1
        print(f"{who} round {i}: {type(exc).__name__}: {exc}", file=sys.stderr)
print(errors)
"""


def test_two_processes_writing_one_database_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    Store.open(path).close()
    rounds = 250
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), who, str(rounds)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for who in ("bot", "purger")]
    outputs = [p.communicate(timeout=300) for p in procs]
    for (out, err), proc in zip(outputs, procs, strict=True):
        assert proc.returncode == 0, err
        assert out.strip() == "0", err[-2000:]
    store = Store.open(path, read_only=True)
    try:
        counts = dict(store.db.execute("SELECT direction, count(*) FROM messages GROUP BY direction").fetchall())
        assert counts == {"in": 2 * rounds, "out": 2 * rounds}
        assert store.db.execute("SELECT count(*) FROM messages WHERE status = 'pending'").fetchone()[0] == 0
    finally:
        store.close()
