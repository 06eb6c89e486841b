"""Auth, size limits, the bounded queue (429), disconnects freeing rows, and the adapter lifecycle."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import openai
import pytest

from bot.config import load_config
from bot.serve.settings import ServeSettings
from tests.serve.conftest import (
    API_KEY,
    REPO,
    LiveServer,
    copy_adapters,
    eos_id,
    metric,
    scrape,
    set_manifest,
    write_config,
)
from tests.serve.test_http_errors import assert_openai_error

AUTH = {"Authorization": f"Bearer {API_KEY}"}
LONG = 1900   # tokens: far more than any test waits for, once the end-of-text token is banned


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, tiny_adapters: Path) -> Iterator[LiveServer]:
    """A server with a key, small limits and an adapters folder of its own (the lifecycle tests change it)."""
    folder = tmp_path_factory.mktemp("keyed")
    adapters = copy_adapters(tiny_adapters, folder / "adapters")
    config = load_config(write_config(folder / "config.toml", tiny_base, adapters, folder / "log.db"))
    settings = ServeSettings(port=0, api_key=API_KEY, max_in_flight=2, max_body_bytes=4096, max_prompt_chars=300)
    live = LiveServer(config, settings).start()
    yield live
    live.stop()


async def _post(url: str, path: str, body: object, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http, http.post(
            url + path, data=body if isinstance(body, bytes) else json.dumps(body).encode(),
            headers={"Content-Type": "application/json"} | (headers or {})) as response:
        return response.status, await response.json(content_type=None)


def _long_story(engine) -> dict:
    return {"model": "story", "prompt": "Write a short story.\nStory:", "max_tokens": LONG, "temperature": 0,
            "logit_bias": {str(eos_id(engine)): -100}}


async def _until(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


# ---------------------------------------------------------------- auth
async def test_the_key_is_required_except_for_the_page_and_health(keyed: LiveServer):
    body = {"model": "story", "prompt": "hi", "max_tokens": 2}
    status, answer = await _post(keyed.url, "/v1/completions", body)
    assert status == 401
    assert_openai_error(answer, 401, None, "invalid_api_key")
    status, _ = await _post(keyed.url, "/v1/completions", body, {"Authorization": "Bearer wrong-key-7f3a9c"})
    assert status == 401
    status, _ = await _post(keyed.url, "/v1/completions", body, {"Authorization": API_KEY})   # no scheme
    assert status == 401
    status, answer = await _post(keyed.url, "/v1/completions", body, AUTH)
    assert status == 200 and answer["choices"][0]["text"] is not None
    async with aiohttp.ClientSession() as http:
        for path in ("/", "/health"):
            async with http.get(keyed.url + path) as response:
                assert response.status == 200
        for path in ("/v1/models", "/metrics"):
            async with http.get(keyed.url + path) as response:
                assert response.status == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="nope", max_retries=0).models.list()
    assert len(openai.OpenAI(base_url=f"{keyed.url}/v1", api_key=API_KEY, max_retries=0).models.list().data) == 5


async def test_requests_for_another_host_name_are_refused(keyed: LiveServer):
    status, answer = await _post(keyed.url, "/v1/completions", {"model": "story", "prompt": "hi"},
                                 AUTH | {"Host": "attacker.example:80"})
    assert status == 403 and answer["error"]["code"] == "host_not_allowed"


def test_a_server_reachable_from_elsewhere_needs_a_key(tmp_path: Path):
    done = subprocess.run([sys.executable, "-m", "bot", "serve", "--host", "0.0.0.0", "--port", "0"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 2 and "--api-key-env" in done.stderr
    done = subprocess.run([sys.executable, "-m", "bot", "serve", "--api-key-env", "LORABOT_TEST_UNSET_KEY"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 2 and "LORABOT_TEST_UNSET_KEY" in done.stderr and "not set" in done.stderr


# ---------------------------------------------------------------- sizes
async def test_body_and_prompt_size_limits(keyed: LiveServer):
    status, answer = await _post(keyed.url, "/v1/completions", {"model": "story", "prompt": "x" * 5000}, AUTH)
    assert status == 413
    assert_openai_error(answer, 413, None, "request_too_large")
    status, answer = await _post(keyed.url, "/v1/completions", {"model": "story", "prompt": "word " * 70}, AUTH)
    assert status == 400
    assert_openai_error(answer, 400, "prompt", "prompt_too_long")
    chat = {"model": "story", "messages": [{"role": "user", "content": "word " * 35}] * 2}
    status, answer = await _post(keyed.url, "/v1/chat/completions", chat, AUTH)
    assert status == 400 and answer["error"]["code"] == "prompt_too_long"
    status, answer = await _post(keyed.url, "/v1/completions", {"model": "story", "prompt": "hi", "max_tokens": 2},
                                 AUTH)
    assert status == 200


# ---------------------------------------------------------------- the bounded queue and disconnects
async def test_a_full_server_answers_429_with_retry_after_and_disconnects_free_the_rows(keyed: LiveServer):
    engine = keyed.engine
    steps_before = engine.stats()["decode_steps"]
    async with aiohttp.ClientSession(headers=AUTH) as http:
        streams = []
        for _ in range(2):   # the server's limit
            response = await http.post(keyed.url + "/v1/completions", json={**_long_story(engine), "stream": True})
            assert response.status == 200
            await response.content.readline()   # the first event: it is generating
            streams.append(response)
        await _until(lambda: engine.stats()["running_rows"] == 2)
        async with http.post(keyed.url + "/v1/completions", json={"model": "qa", "prompt": "hi"}) as refused:
            assert refused.status == 429 and refused.headers["Retry-After"] == "1"
            assert_openai_error(await refused.json(), 429, None, "rate_limit_exceeded")
        for response in streams:   # the clients go away mid-stream
            response.close()
        await _until(lambda: engine.stats()["running_rows"] == 0)
        ran = engine.stats()["decode_steps"] - steps_before
        assert ran < LONG // 2, ran          # they stopped long before their max_tokens
        # A non-streamed request whose client gives up: the handler is cancelled, and so is the row.
        with pytest.raises(asyncio.TimeoutError):
            await http.post(keyed.url + "/v1/completions", json=_long_story(engine),
                            timeout=aiohttp.ClientTimeout(total=0.5))
        await _until(lambda: engine.stats()["running_rows"] == 0)
        assert engine.stats()["decode_steps"] - steps_before < LONG
        async with http.post(keyed.url + "/v1/completions", json={"model": "qa", "prompt": "hi"}) as again:
            assert again.status == 200   # room again
    text = await scrape(keyed.url, AUTH)
    assert metric(text, "lorabot_requests_rejected_total", reason="queue_full") == 1
    assert metric(text, "lorabot_requests_cancelled_total", endpoint="completions") == 3
    assert metric(text, "lorabot_requests_in_flight") == 0


# ---------------------------------------------------------------- adapters: load and unload
async def test_loading_and_unloading_an_adapter(keyed: LiveServer, tiny_adapters: Path):
    folder = Path(keyed.config.path(keyed.config.adapters.dir))
    body = {"model": "story", "prompt": "Write a short story.\nStory:", "max_tokens": 8, "temperature": 0}
    status, plain = await _post(keyed.url, "/v1/completions", body, AUTH)
    assert status == 200
    load = {"lora_name": "story2", "lora_path": str(tiny_adapters / "story")}
    status, _ = await _post(keyed.url, "/v1/load_lora_adapter", load)
    assert status == 401   # the admin key
    async with aiohttp.ClientSession(headers=AUTH) as http:
        async with http.post(keyed.url + "/v1/load_lora_adapter", json=load) as response:
            assert response.status == 200 and "story2" in await response.text()
        async with http.get(keyed.url + "/v1/models") as response:
            cards = {m["id"]: m for m in (await response.json())["data"]}
        assert cards["story2"]["task"] == "story" and cards["story2"]["parent"] == keyed.engine.base_model
        status, loaded = await _post(keyed.url, "/v1/completions", {**body, "model": "story2"}, AUTH)
        assert status == 200 and loaded["choices"][0]["text"] == plain["choices"][0]["text"]   # the same weights
        status, again = await _post(keyed.url, "/v1/load_lora_adapter", load, AUTH)
        assert status == 400 and again["error"]["code"] == "adapter_exists"
        async with http.post(keyed.url + "/v1/unload_lora_adapter", json={"lora_name": "story2"}) as response:
            assert response.status == 200 and "removed" in await response.text()
        assert "story2" not in keyed.engine.adapters and not (folder / "story2").exists()
        assert [p.name.split("-")[0] for p in (folder / ".unloaded").iterdir()] == ["story2"]   # kept, not deleted
        status, _ = await _post(keyed.url, "/v1/completions", {**body, "model": "story2"}, AUTH)
        assert status == 404
        status, missing = await _post(keyed.url, "/v1/unload_lora_adapter", {"lora_name": "story2"}, AUTH)
        assert status == 404 and missing["error"]["code"] == "adapter_not_found"


async def test_bad_adapter_folders_are_refused_with_the_bot_s_reasons(keyed: LiveServer, tiny_adapters: Path,
                                                                     tmp_path: Path):
    pickled = copy_adapters(tiny_adapters, tmp_path / "pickled", ("ner",)) / "ner"
    (pickled / "adapter_model.bin").write_bytes(b"not really a pickle")
    other_shape = copy_adapters(tiny_adapters, tmp_path / "shape", ("ner",)) / "ner"
    set_manifest(other_shape, base_shape="llama:999:2:4:2:64:49152")
    old_format = copy_adapters(tiny_adapters, tmp_path / "format", ("qa",)) / "qa"
    set_manifest(old_format, format_version=1)
    cases = [
        ({"lora_name": "x1", "lora_path": str(tmp_path / "nowhere")}, "not a folder"),
        ({"lora_name": "x2", "lora_path": str(pickled)}, "pickled"),
        ({"lora_name": "x3", "lora_path": str(other_shape)}, "does not match the loaded base model"),
        ({"lora_name": "x4", "lora_path": str(old_format)}, "prompt format v1"),
        ({"lora_name": "Bad Name", "lora_path": str(tiny_adapters / "qa")}, "not a valid adapter name"),
        ({"lora_name": "chat", "lora_path": str(tiny_adapters / "qa")}, "not a valid adapter name"),
        ({"lora_name": "x5"}, "lora_path is required"),
    ]
    before = sorted(p.name for p in Path(keyed.config.path(keyed.config.adapters.dir)).iterdir())
    for body, reason in cases:
        status, answer = await _post(keyed.url, "/v1/load_lora_adapter", body, AUTH)
        assert status == 400, body
        assert_openai_error(answer, 400, answer["error"]["param"], answer["error"]["code"])
        assert reason in answer["error"]["message"], answer
    after = sorted(p.name for p in Path(keyed.config.path(keyed.config.adapters.dir)).iterdir())
    assert after == before and not {"x1", "x2", "x3", "x4"} & set(keyed.engine.adapters)


async def test_without_a_key_the_adapters_cannot_be_changed(server: LiveServer, tiny_adapters: Path):
    status, answer = await _post(server.url, "/v1/load_lora_adapter",
                                 {"lora_name": "story3", "lora_path": str(tiny_adapters / "story")})
    assert status == 403 and answer["error"]["code"] == "admin_key_required"
    assert "story3" not in server.engine.adapters
