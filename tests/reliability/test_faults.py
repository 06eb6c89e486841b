"""Faults: the bot killed mid-stream, a model request that raises, a full disk, a read-only database.

What must hold: the log stays consistent (integrity_check ok), every reply a user saw is in it, messages
the bot never answered stay visible as 'pending', one failing request fails alone, and storage faults
surface as a clear StoreError / "lorabot: ..." line rather than a traceback or a silent loss.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from bot.config import Config, replace
from bot.core import Core
from bot.engine import Generation, SamplingParams
from bot.errors import EngineError, StoreError
from bot.messages import Incoming
from bot.store import AsyncStore, Store
from tests.fakes import FakeEngine
from tests.reliability.conftest import REPO, clean_env, lorabot, query, rows, without_privileges, write_config


def msg(text: str, user: str = "u1", chat: str = "c1", **kw: object) -> Incoming:
    return Incoming(platform="test", chat_id=chat, user_id=user, text=text, **kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- kill -9 mid-stream


def _read_until(proc: subprocess.Popen, db: Path, replies: int, deadline: float) -> bytes:
    """Read the bot's stdout until ``replies`` answers were printed, the next one has started, and its
    incoming message is committed as 'pending' (so the kill lands while a request is in flight)."""
    fd = proc.stdout.fileno()  # type: ignore[union-attr]
    os.set_blocking(fd, False)
    out = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AssertionError(f"the bot exited early (rc {proc.wait()}); stdout: {out[-2000:]!r}")
            out += chunk
        if out.count(b"bot> ") > replies and db.exists():
            try:
                pending = query(db)("SELECT count(*) FROM messages WHERE status = 'pending'")[0][0]
            except sqlite3.OperationalError:  # schema not created yet, or locked for a moment
                pending = 0
            if pending:
                return out
    raise AssertionError(f"timed out waiting for {replies} replies; stdout so far: {out[-2000:]!r}")


def test_kill_9_mid_stream_loses_nothing_that_was_sent(tiny_config: Path, tmp_path: Path) -> None:
    """The real `lorabot chat` on the tiny model, fed through a pipe, SIGKILLed while writing a story."""
    db = tmp_path / "log.db"
    answered = 5
    lines = [f"/sentiment message {i} was a great day" for i in range(answered)]
    # An opening sentence streams at once; 1500 tokens keep it in flight for many seconds.
    lines += ["/story The night was dark and the wind was cold."]
    lines += [f"/sentiment never read {i}" for i in range(3)]  # still in the pipe at the kill
    stderr = (tmp_path / "stderr.txt").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bot", "--config", str(tiny_config), "chat"], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=stderr, cwd=REPO, env=clean_env(),
    )
    try:
        proc.stdin.write(("\n".join(lines) + "\n").encode())  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]  # kept open: EOF would end the chat cleanly
        out = _read_until(proc, db, answered, time.monotonic() + 150)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        stderr.close()

    # Every reply printed before the kill (text between two "bot> " prompts) is in the log, in order.
    printed = [seg.decode().removesuffix("\n") for seg in out.split(b"bot> ")[1:-1]]
    assert len(printed) == answered
    run = query(db)
    assert run("PRAGMA integrity_check") == [("ok",)]
    stored = [r[0] for r in run("SELECT text FROM messages WHERE direction = 'out' ORDER BY id")]
    assert stored == printed
    statuses = run("SELECT text, status FROM messages WHERE direction = 'in' ORDER BY id")
    assert [s for _, s in statuses] == ["answered"] * answered + ["pending"]
    assert statuses[-1][0] == lines[answered]

    # The operator sees the unanswered message (the CLI opens the crashed WAL file and recovers it).
    unanswered = lorabot("--config", str(tiny_config), "db", "unanswered")
    assert unanswered.returncode == 0, unanswered.stderr
    [row] = [json.loads(line) for line in unanswered.stdout.splitlines()]
    assert row["text"] == lines[answered] and row["platform"] == "console"

    # Restart (the real CLI; FakeEngine instead of loading the model again): it answers, old rows intact.
    again = lorabot("--config", str(tiny_config), "chat", stdin="/sentiment after the restart it is good\n",
                    shim=True)
    assert again.returncode == 0, again.stderr
    assert "positive" in again.stdout
    check = lorabot("--config", str(tiny_config), "db", "check")
    assert check.returncode == 0 and check.stdout.strip() == "ok"
    assert [r[0] for r in run("SELECT text FROM messages WHERE direction = 'out' ORDER BY id")][:answered] == printed
    assert run("SELECT text FROM messages WHERE status = 'pending'") == [(lines[answered],)]


# --------------------------------------------------------------------------- a request that raises


class RaisingEngine(FakeEngine):
    """FakeEngine whose marked requests raise a non-lorabot exception (a bug, not an EngineError)."""

    async def generate(self, prompt, params, adapter, on_text=None) -> Generation:  # type: ignore[override]
        if "KABOOM" in prompt:
            raise KeyError("a bug deep inside the model code")
        return await super().generate(prompt, params, adapter, on_text)


async def test_one_failing_request_among_concurrent_ones_fails_alone(mem_store: AsyncStore) -> None:
    engine = RaisingEngine(fail_on="explode", delay=0.001)
    core = Core(replace(Config(), access={"rate_limit_per_minute": 0}), engine, mem_store)
    texts = {
        "/sentiment I love it": "answer", "/sentiment please explode": "error",
        "/ner Then Alice met Bob.": "answer", "/ner KABOOM Alice": "error",
        "/story a brave mouse": "answer", "/story explode a mouse": "error", "/ask who? | Alice did.": "answer",
    }
    replies = await asyncio.gather(*(core.handle(msg(t, user=f"u{i}", chat=f"c{i}")) for i, t in enumerate(texts)))
    assert [r.kind for r in replies] == list(texts.values())
    assert "injected failure" in replies[1].text  # an EngineError's message is meant for the user
    assert "something went wrong on my side" in replies[3].text  # a bug's message is not shown
    statuses = [s for (s,) in rows(mem_store, "SELECT status FROM messages WHERE direction='in' ORDER BY id")]
    assert sorted(statuses) == sorted("failed" if k == "error" else "answered" for k in texts.values())
    assert (await core.handle(msg("/sentiment still good"))).kind == "answer"


@pytest.fixture(scope="module")
def real_config(tiny_base: Path, tiny_adapters: Path) -> Config:
    # batch_wait_ms is raised so that simultaneous requests land in one micro-batch: the failure has to
    # be isolated inside a batch, not just between batches.
    return replace(Config(), model={"base": str(tiny_base), "dtype": "float32", "threads": 1},
                   adapters={"dir": str(tiny_adapters)}, engine={"batch_wait_ms": 150},
                   generation={"max_new_tokens": 3}, ner={"max_new_tokens": 3}, qa={"max_new_tokens": 3},
                   story={"max_new_tokens": 3}, access={"rate_limit_per_minute": 0})


async def _engine(config: Config):  # type: ignore[no-untyped-def]
    from bot.engine.scheduler import LocalEngine

    return await asyncio.to_thread(LocalEngine.from_config, config, progress=False)


async def _close(engine) -> None:  # type: ignore[no-untyped-def]
    if engine._thread.is_alive():  # a dead worker would never acknowledge the stop request
        await asyncio.wait_for(engine.close(), 30)


async def test_real_engine_failure_inside_a_batch_fails_only_that_request(
    real_config: Config, mem_store: AsyncStore, monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = await _engine(real_config)
    try:
        backend = engine._backend
        real_prefill, real_score = backend.prefill, backend.score

        shared: list[int] = []   # sizes of the batches a poisoned prompt was in

        def poisoned(prompts) -> None:  # type: ignore[no-untyped-def]
            if any("KABOOM" in engine._tok.decode(p) for p in prompts):
                shared.append(len(prompts))
                raise RuntimeError("injected: CUDA error: device-side assert triggered")

        def prefill(batch, prompts, adapters):  # type: ignore[no-untyped-def]
            poisoned(prompts)
            return real_prefill(batch, prompts, adapters)

        def score(prompts, adapters, ids):  # type: ignore[no-untyped-def]
            poisoned(prompts)
            return real_score(prompts, adapters, ids)

        monkeypatch.setattr(backend, "prefill", prefill)
        monkeypatch.setattr(backend, "score", score)
        core = Core(real_config, engine, mem_store)
        texts = ["/sentiment a good day", "/sentiment KABOOM day", "/ner Alice met Bob", "/ner KABOOM Carol",
                 "/ask who? | Alice was here", "/story a brave mouse"]
        replies = await asyncio.wait_for(asyncio.gather(
            *(core.handle(msg(t, user=f"u{i}", chat=f"c{i}")) for i, t in enumerate(texts))), 120)
        kinds = ["error" if "KABOOM" in t else "answer" for t in texts]
        assert [r.kind for r in replies] == kinds, [r.text for r in replies]
        assert all("model failed on this request" in r.text for r in replies if r.kind == "error")
        assert max(shared) > 1   # the failure was inside a batch with other requests, not alone
        after = await asyncio.wait_for(core.handle(msg("/sentiment the engine still works")), 60)
        assert after.kind == "answer"
    finally:
        await _close(engine)


async def test_real_engine_generations_grow_past_the_first_cache_block(real_config: Config) -> None:
    """Found by bench/load.py: rows whose prompt + output crossed 128 tokens (a KV-cache allocation step)
    failed, and every other row of the decode batch failed with them."""
    engine = await _engine(real_config)
    try:
        prompt = ""
        while engine.count_tokens(prompt) < 110:
            prompt += "the quick brown fox jumps over the lazy dog "
        greedy = SamplingParams(max_new_tokens=60)  # temperature 0: reproducible
        long, short = await asyncio.wait_for(asyncio.gather(
            engine.generate(prompt, greedy, None), engine.generate("Hi", SamplingParams(max_new_tokens=40), None),
        ), 120)
        assert long.prompt_tokens < 128 < long.prompt_tokens + long.completion_tokens  # it did cross
        assert short.completion_tokens > 0
    finally:
        await _close(engine)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the bug itself
async def test_real_engine_sampling_failure_of_one_row_does_not_kill_the_worker(real_config: Config) -> None:
    # A NaN temperature (which [generation] temperature = nan in config.toml currently lets through) gives
    # that row NaN probabilities, which choose_next_tokens refuses for that row only: nothing is monkeypatched.
    engine = await _engine(real_config)
    try:
        good = asyncio.ensure_future(engine.generate("Hello there", SamplingParams(max_new_tokens=3), None))
        bad = asyncio.ensure_future(engine.generate(
            "Hello here", SamplingParams(max_new_tokens=3, temperature=float("nan")), None))
        deadline = time.monotonic() + 60
        # Watch the thread rather than wait on the futures: with the bug they never settle.
        while not (good.done() and bad.done()) and engine._thread.is_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert engine._thread.is_alive(), "the engine's worker thread died"
        with pytest.raises(EngineError):
            await bad
        assert isinstance(await good, Generation)
    finally:
        for future in (good, bad):
            future.cancel()
        await _close(engine)


# --------------------------------------------------------------------------- full disk


class DiskFillingEngine(FakeEngine):
    """Fills the disk while "the model runs": between storing the question and storing the answer."""

    store: AsyncStore | None = None

    async def generate(self, prompt, params, adapter, on_text=None) -> Generation:  # type: ignore[override]
        assert self.store is not None
        await self.store._run(_fill_disk)
        return await super().generate(prompt, params, adapter, on_text)


def _fill_disk(store: Store) -> None:
    pages = store.db.execute("PRAGMA page_count").fetchone()[0]
    store.db.execute(f"PRAGMA max_page_count = {pages}")


@pytest.fixture
async def file_store(tmp_path: Path) -> AsyncIterator[AsyncStore]:
    store = await AsyncStore.open(tmp_path / "log.db")
    try:
        yield store
    finally:
        await store.close()


async def test_full_disk_before_the_model_runs_is_a_clear_store_error(file_store: AsyncStore, tmp_path: Path) -> None:
    core = Core(Config(), FakeEngine(), file_store)
    assert (await core.handle(msg("/sentiment fine so far"))).kind == "answer"
    await file_store._run(_fill_disk)
    with pytest.raises(StoreError, match="disk is full") as caught:
        for i in range(20):  # the first write that needs a new page fails
            await core.handle(msg(f"/sentiment {'long text ' * 300} {i}"))
    assert str(tmp_path / "log.db") in str(caught.value)
    assert await file_store.integrity_check() == "ok"
    # Each write is one transaction: a message is either fully answered or still visibly pending.
    statuses = (await file_store.stats())["by_status"]
    assert set(statuses) <= {"answered", "sent", "pending"} and statuses.get("pending", 0) <= 1
    assert len(await file_store.unanswered()) == statuses.get("pending", 0)


async def test_full_disk_after_the_model_ran_leaves_the_question_pending(file_store: AsyncStore) -> None:
    engine = DiskFillingEngine()
    engine.store = file_store
    core = Core(Config(), engine, file_store)
    with pytest.raises(StoreError, match="disk is full"):
        await core.handle(msg("/chat " + "please answer this long question " * 120))
    assert await file_store.integrity_check() == "ok"
    [pending] = await file_store.unanswered()  # the operator can still see what went unanswered
    assert pending["text"].startswith("/chat please answer")


def test_full_disk_through_the_cli_is_one_clear_line(fake_config: Path) -> None:
    messages = "".join(f"/sentiment {'a long message ' * 300} {i}\n" for i in range(20))
    result = lorabot("--config", str(fake_config), "chat", stdin=messages, shim=True,
                     env=clean_env(LORABOT_SHIM_MAX_PAGES="1"))
    assert result.returncode == 2
    assert "lorabot: " in result.stderr and "disk is full" in result.stderr
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------- read-only database


async def test_read_only_store_refuses_writes_through_the_core(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    Store.open(path).close()
    store = await AsyncStore.open(path, read_only=True)
    try:
        with pytest.raises(StoreError, match="read-only"):
            await Core(Config(), FakeEngine(), store).handle(msg("/sentiment hi"))
    finally:
        await store.close()


@pytest.fixture
def read_only_db(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A database with one exchange, then the file and its folder made read-only."""
    folder = tmp_path / "ro"
    folder.mkdir()
    db = folder / "log.db"
    with Store.open(db) as store:
        chat, user = store.ensure_chat("test", "c"), store.ensure_user("test", "u")
        incoming = store.log_incoming(chat_id=chat, user_id=user, text="hello", skill="chat")
        store.log_reply(chat_id=chat, reply_to=incoming, text="hi!", skill="chat")
    db.chmod(0o444)
    folder.chmod(0o555)
    config = write_config(tmp_path / "config.toml", store={"path": str(db)},
                          adapters={"dir": str(tmp_path / "none")})
    yield db, config
    folder.chmod(0o755)
    db.chmod(0o644)


def test_read_only_database_through_the_cli_is_one_clear_line(read_only_db: tuple[Path, Path]) -> None:
    db, config = read_only_db
    prefix = without_privileges()
    result = lorabot("--config", str(config), "chat", stdin="/sentiment hi\n", shim=True, prefix=prefix)
    assert result.returncode == 2
    assert f"lorabot: {db}: the database is read-only" in result.stderr
    assert "Traceback" not in result.stderr
    vacuum = lorabot("db", "vacuum", "--db", str(db), prefix=prefix)
    assert vacuum.returncode == 2 and "read-only" in vacuum.stderr and "Traceback" not in vacuum.stderr


def test_read_only_database_can_still_be_inspected(read_only_db: tuple[Path, Path]) -> None:
    db, _ = read_only_db
    result = lorabot("db", "stats", "--db", str(db), prefix=without_privileges())
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["messages"] == {"in": 1, "out": 1}
