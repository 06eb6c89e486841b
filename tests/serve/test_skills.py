"""``/v1/skills/<skill>``: the same structured results as ``lorabot ask --json``, from the same code."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import aiohttp

from bot.ask import ask
from bot.serve.state import STATE
from tests.serve.conftest import REPO, LiveServer

CONTEXT = "The cat sat on the mat while Alice read a book in Paris."
CASES = [
    ("sentiment", {"text": "I loved every minute of it"}),
    ("sentiment", {"text": "I loved every minute of it", "compare": True}),
    ("ner", {"text": "Angela Merkel met Emmanuel Macron in Paris"}),
    ("ner", {"text": "Angela Merkel met Emmanuel Macron in Paris", "compare": True}),
    ("qa", {"text": "Where did the cat sit?", "context": CONTEXT}),
    ("qa", {"text": "Where did the cat sit? | " + CONTEXT, "compare": True}),
    ("story", {"text": "a dragon who loved tea"}),
    ("story", {"text": "a dragon who loved tea", "compare": True}),
    ("chat", {"text": "Hello, who are you?"}),
]


def _without_latency(reply: dict) -> dict:
    return reply | {"usage": {k: v for k, v in reply["usage"].items() if k != "latency_ms"}}


async def _skill(url: str, skill: str, body: dict) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http, http.post(f"{url}/v1/skills/{skill}", json=body) as response:
        return response.status, await response.json()


async def _events(url: str, skill: str, body: dict) -> list[dict]:
    out = []
    async with aiohttp.ClientSession() as http, http.post(f"{url}/v1/skills/{skill}", json=body) as response:
        assert response.status == 200 and response.content_type == "text/event-stream"
        async for line in response.content:
            if line.startswith(b"data: "):
                data = line[6:].strip()
                out.append("[DONE]" if data == b"[DONE]" else json.loads(data))
    return out


async def test_every_skill_answers_as_ask_does(server: LiveServer):
    for skill, body in CASES:
        status, got = await _skill(server.url, skill, body)
        assert status == 200, got
        core = server.app[STATE].core   # the server's own core: ask() exactly as `lorabot ask` calls it
        reply = server.run(ask(core, skill, body["text"], context=body.get("context"),
                               compare=body.get("compare", False), platform="cli", chat_id="cli", user_id="me"))
        assert _without_latency(got) == _without_latency(reply.to_json()), (skill, body)
        assert ("base" in got) == body.get("compare", False)


def test_the_same_as_the_lorabot_ask_command(server: LiveServer, tmp_path):
    context = tmp_path / "context.txt"
    context.write_text(CONTEXT)
    config = server.config
    toml = tmp_path / "config.toml"
    toml.write_text((config.root / "config.toml").read_text().replace(str(config.path(config.store.path)),
                                                                        str(tmp_path / "cli.db")))
    done = subprocess.run([sys.executable, "-m", "bot", "--config", str(toml), "ask", "qa", "Where did the cat sit?",
                           "--context", str(context), "--compare", "--json"], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout.strip().splitlines()[-1])
    status, got = asyncio.run(_skill(server.url, "qa", {"text": "Where did the cat sit?", "context": CONTEXT,
                                                        "compare": True}))
    assert status == 200 and _without_latency(got) == _without_latency(printed)


async def test_a_streamed_story_gives_partial_texts_then_the_result(server: LiveServer):
    _, whole = await _skill(server.url, "story", {"text": "a dragon who loved tea"})
    events = await _events(server.url, "story", {"text": "a dragon who loved tea", "stream": True})
    assert events[-1] == "[DONE]"
    partial = [e["text"] for e in events[:-2]]
    assert all(e["object"] == "skill.partial" for e in events[:-2]) and len(partial) > 1
    assert all(whole["text"].startswith(p.strip()) for p in partial)
    assert events[-2]["object"] == "skill.result"
    assert _without_latency({k: v for k, v in events[-2].items() if k != "object"}) == _without_latency(whole)


async def test_base_alone_is_the_compare_s_base_side(server: LiveServer):
    _, compared = await _skill(server.url, "story", {"text": "a lighthouse", "compare": True})
    _, base = await _skill(server.url, "story", {"text": "a lighthouse", "base": True})
    assert base["adapter"] is None and compared["adapter"] == "story"
    assert base["text"] == compared["base"]["text"] != compared["text"]


async def test_refusals_and_unknown_skills(server: LiveServer):
    status, answer = await _skill(server.url, "qa", {"text": "no context here"})
    assert status == 400 and answer["error"]["code"] == "skill_refused" and "question" in answer["error"]["message"]
    status, answer = await _skill(server.url, "horoscope", {"text": "hi"})
    assert status == 404 and answer["error"]["code"] == "skill_not_found"
    status, answer = await _skill(server.url, "story", {"text": "hi", "temperature": 2})
    assert status == 400 and answer["error"]["param"] == "temperature"
    status, answer = await _skill(server.url, "story", {"text": "hi", "compare": True, "base": True})
    assert status == 400
    status, answer = await _skill(server.url, "story", {"text": "x" * 5000})
    assert status == 400 and "too long" in answer["error"]["message"]
    status, answer = await _skill(server.url, "chat", {"text": "hi", "session": "../../etc"})
    assert status == 400 and answer["error"]["param"] == "session"


async def test_a_session_keeps_the_chat_history(server: LiveServer):
    for text in ("My name is Ada.", "What is my name?"):
        status, _ = await _skill(server.url, "chat", {"text": text, "session": "history-test"})
        assert status == 200
    core = server.app[STATE].core
    chat = server.run(core.store.ensure_chat("http", "history-test"))
    turns = server.run(core.store.history(chat, skill="chat"))
    assert [role for role, _ in turns] == ["user", "assistant", "user", "assistant"]
