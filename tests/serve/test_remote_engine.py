"""The bot's core with ``[engine] backend = "openai"`` pointed at a real ``lorabot serve`` process."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bot.app import open_app
from bot.ask import ask
from bot.config import Config, load_config
from bot.engine import SamplingParams, load_engine
from bot.engine.remote import RemoteEngine
from bot.errors import EngineError
from bot.serve.settings import ServeSettings
from tests.serve.conftest import (
    API_KEY,
    LiveServer,
    ServeProcess,
    copy_adapters,
    eos_id,
    set_manifest,
    write_config,
)
from tests.serve.test_skills import CASES


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, tiny_adapters: Path) -> Iterator[ServeProcess]:
    folder = tmp_path_factory.mktemp("served")
    proc = ServeProcess(write_config(folder / "server.toml", tiny_base, tiny_adapters, folder / "server.db"))
    yield proc
    proc.stop()


def _bot_config(folder: Path, tiny_base: Path, adapters: Path, url: str | None, story_tokens: int = 12) -> Config:
    engine = f'[engine]\nbackend = "openai"\nbase_url = "{url}"\ntimeout_s = 20\n' if url else ""
    folder.mkdir(parents=True, exist_ok=True)
    return load_config(write_config(folder / "bot.toml", tiny_base, adapters, folder / "bot.db", engine,
                                    story_tokens=story_tokens))


async def _answers(config: Config, engine) -> list[dict]:  # type: ignore[no-untyped-def]
    out = []
    async with open_app(config, engine=engine) as app:
        for skill, body in CASES:
            reply = await ask(app.core, skill, body["text"], context=body.get("context"),
                              compare=body.get("compare", False), platform="test", chat_id=f"c{len(out)}",
                              user_id="u")
            assert reply is not None and reply.kind == "answer", reply
            data = reply.to_json()
            data["usage"].pop("latency_ms")
            out.append(data)
    return out


def _same(remote: dict, local: dict) -> None:
    if "scores" not in local:
        assert remote == local
        return
    # Sentiment: probabilities from the server's log-probabilities (float32, after a +100 bias), not from the
    # local softmax: equal to within rounding, so the label and every score agree.
    for side in (lambda d: d, lambda d: d.get("base")):
        r, lo = side(remote), side(local)
        if lo is None:
            assert r is None
            continue
        assert r["label"] == lo["label"] and r["scores"] == pytest.approx(lo["scores"], abs=1e-4)
    assert remote["usage"] == local["usage"] and remote["adapter"] == local["adapter"]


async def test_every_skill_equals_the_in_process_engine(served: ServeProcess, tmp_path: Path, tiny_base: Path,
                                                         tiny_adapters: Path):
    remote_config = _bot_config(tmp_path / "remote", tiny_base, tiny_adapters, served.url)
    local_config = _bot_config(tmp_path / "local", tiny_base, tiny_adapters, None)
    remote = await asyncio.to_thread(load_engine, remote_config, progress=False)
    assert isinstance(remote, RemoteEngine) and sorted(remote.adapters) == ["ner", "qa", "sentiment", "story"]
    assert remote.problems == [] and remote.served_base == remote.base_model
    local = await asyncio.to_thread(load_engine, local_config, progress=False)
    for got, want in zip(await _answers(remote_config, remote), await _answers(local_config, local), strict=True):
        _same(got, want)


async def test_served_and_local_adapters_are_matched_and_mismatches_reported(served: ServeProcess, tmp_path: Path,
                                                                           tiny_base: Path, tiny_adapters: Path):
    local = copy_adapters(tiny_adapters, tmp_path / "adapters", ("sentiment", "ner", "story"))
    set_manifest(local / "story", task="domain")            # the server's copy is a story adapter
    copy_adapters(tiny_adapters, tmp_path / "extra", ("story",))
    (tmp_path / "extra" / "story").rename(local / "extra")  # a folder the server does not serve
    config = _bot_config(tmp_path / "bot", tiny_base, local, served.url)
    engine = await asyncio.to_thread(load_engine, config, progress=False)
    try:
        assert sorted(engine.adapters) == ["ner", "sentiment"]
        reasons = {p.name: p.reason for p in engine.problems}
        assert set(reasons) == {"story", "extra", "qa"}
        assert "task 'story'" in reasons["story"] and "'domain'" in reasons["story"]
        assert reasons["extra"].startswith("not served by")
        assert "no adapter folder" in reasons["qa"]
    finally:
        await engine.close()


async def test_a_server_killed_mid_stream_gives_a_clear_error_and_the_bot_stays_up(
        tmp_path: Path, tiny_base: Path, tiny_adapters: Path):
    server_config = write_config(tmp_path / "server.toml", tiny_base, tiny_adapters, tmp_path / "server.db")
    proc = await asyncio.to_thread(ServeProcess, server_config)
    config = _bot_config(tmp_path / "bot", tiny_base, tiny_adapters, proc.url, story_tokens=1500)
    engine = await asyncio.to_thread(load_engine, config, progress=False)
    engine.retries, engine.backoff_s = 1, 0.05
    second: ServeProcess | None = None
    try:
        async with open_app(config, engine=engine) as app:
            streaming = asyncio.Event()

            async def seen(_: str) -> None:
                streaming.set()

            story = asyncio.create_task(ask(app.core, "story", "a dragon who loved tea", platform="test",
                                            chat_id="c", user_id="u", stream=seen))
            await asyncio.wait_for(streaming.wait(), 60)
            proc.kill()
            reply = await asyncio.wait_for(story, 60)
            assert reply is not None and reply.kind == "error"
            assert "stopped in the middle of the answer" in reply.text or "before its end" in reply.text, reply.text

            down = await ask(app.core, "sentiment", "I loved it", platform="test", chat_id="c", user_id="u")
            assert down is not None and down.kind == "error"
            assert f"the model server at {proc.url} is not answering" in down.text and "tried 2 times" in down.text

            # Retried with backoff: a server that comes back while the bot waits answers the same request.
            engine.retries, engine.backoff_s = 8, 0.25
            waiting = asyncio.create_task(ask(app.core, "sentiment", "I loved it", platform="test", chat_id="c",
                                              user_id="u"))
            second = await asyncio.to_thread(ServeProcess, server_config, port=proc.port)
            back = await asyncio.wait_for(waiting, 120)
            assert back is not None and back.kind == "answer" and back.adapter == "sentiment"
            assert back.result is not None and sorted(back.result.scores) == ["negative", "neutral", "positive"]
            assert await app.store.unanswered() == []   # every message was answered or marked failed
    finally:
        proc.stop()
        if second is not None:
            second.stop()


async def test_the_server_s_key_is_sent_from_the_environment(tmp_path: Path, tiny_base: Path, tiny_adapters: Path,
                                                            monkeypatch: pytest.MonkeyPatch):
    server_config = load_config(write_config(tmp_path / "server.toml", tiny_base, tiny_adapters,
                                             tmp_path / "server.db"))
    live = LiveServer(server_config, ServeSettings(port=0, api_key=API_KEY)).start()
    try:
        folder = tmp_path / "bot"
        folder.mkdir()
        config = load_config(write_config(
            folder / "bot.toml", tiny_base, tiny_adapters, folder / "bot.db",
            f'[engine]\nbackend = "openai"\nbase_url = "{live.url}"\napi_key_env = "LORABOT_TEST_SERVER_KEY"\n'))
        with pytest.raises(EngineError, match="LORABOT_TEST_SERVER_KEY"):   # named, but not set
            await asyncio.to_thread(load_engine, config, progress=False)
        monkeypatch.setenv("LORABOT_TEST_SERVER_KEY", "the-wrong-key")
        with pytest.raises(EngineError, match=r"refused the request \(HTTP 401\): Incorrect API key"):
            await asyncio.to_thread(load_engine, config, progress=False)
        monkeypatch.setenv("LORABOT_TEST_SERVER_KEY", API_KEY)
        engine = await asyncio.to_thread(load_engine, config, progress=False)
        async with open_app(config, engine=engine) as app:
            reply = await ask(app.core, "sentiment", "I loved it", platform="test", chat_id="c", user_id="u")
        assert reply is not None and reply.kind == "answer" and reply.adapter == "sentiment"
    finally:
        live.stop()


async def test_a_bot_side_stream_that_fails_or_is_cancelled_frees_the_server_s_row(
        server: LiveServer, tmp_path: Path, tiny_base: Path, tiny_adapters: Path):
    config = _bot_config(tmp_path / "bot", tiny_base, tiny_adapters, server.url)
    engine = await asyncio.to_thread(load_engine, config, progress=False)
    endless = SamplingParams(max_new_tokens=1500, logit_bias=((eos_id(server.engine), -100.0),))
    prompt = "Write a short story.\nStory:"

    async def gone(_: str) -> None:
        raise ConnectionError("injected: the chat is gone")

    async def idle() -> None:
        deadline = time.monotonic() + 20
        while server.stats()["running_rows"]:
            assert time.monotonic() < deadline, "the server kept generating"
            await asyncio.sleep(0.02)

    try:
        before = server.stats()["decode_steps"]
        with pytest.raises(ConnectionError):
            await engine.generate(prompt, endless, "story", gone)
        await idle()
        started = asyncio.Event()

        async def seen(_: str) -> None:
            started.set()

        task = asyncio.create_task(engine.generate(prompt, endless, "story", seen))
        await asyncio.wait_for(started.wait(), 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await idle()
        assert server.stats()["decode_steps"] - before < 1500   # both stopped long before their end
    finally:
        await engine.close()
