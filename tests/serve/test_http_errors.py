"""Raw HTTP: every refusal is OpenAI's error JSON, exactly {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import json

import aiohttp
import pytest

from tests.serve.conftest import LiveServer

BAD_COMPLETIONS = [
    # (body, status, param, code)
    ({"prompt": "hi"}, 400, "model", None),
    ({"model": "nope", "prompt": "hi"}, 404, "model", "model_not_found"),
    ({"model": "story"}, 400, "prompt", None),
    ({"model": "story", "prompt": ""}, 400, "prompt", None),
    ({"model": "story", "prompt": [1, 2, 3]}, 400, "prompt", "unsupported_parameter"),
    ({"model": "story", "prompt": ["a", "b"]}, 400, "prompt", "unsupported_parameter"),
    ({"model": "story", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens", None),
    ({"model": "story", "prompt": "hi", "span_of": 3}, 400, "span_of", None),
    ({"model": "story", "prompt": "hi", "max_tokens": "5"}, 400, "max_tokens", None),
    ({"model": "story", "prompt": "hi", "max_tokens": True}, 400, "max_tokens", None),
    ({"model": "story", "prompt": "hi", "temperature": 3}, 400, "temperature", None),
    ({"model": "story", "prompt": "hi", "temperature": "hot"}, 400, "temperature", None),
    ({"model": "story", "prompt": "hi", "top_p": 0}, 400, "top_p", None),
    ({"model": "story", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
    ({"model": "story", "prompt": "hi", "stop": [""]}, 400, "stop", None),
    ({"model": "story", "prompt": "hi", "seed": 2**70}, 400, "seed", None),
    ({"model": "story", "prompt": "hi", "n": 3}, 400, "n", "unsupported_parameter"),
    ({"model": "story", "prompt": "hi", "echo": True}, 400, "echo", "unsupported_parameter"),
    ({"model": "story", "prompt": "hi", "best_of": 2}, 400, "best_of", "unsupported_parameter"),
    ({"model": "story", "prompt": "hi", "suffix": "x"}, 400, "suffix", "unsupported_parameter"),
    ({"model": "story", "prompt": "hi", "presence_penalty": 0.5}, 400, "presence_penalty", "unsupported_parameter"),
    ({"model": "story", "prompt": "hi", "logprobs": 21}, 400, "logprobs", None),
    ({"model": "story", "prompt": "hi", "logit_bias": {"x": 1}}, 400, "logit_bias", None),
    ({"model": "story", "prompt": "hi", "logit_bias": {"5": 101}}, 400, "logit_bias", None),
    ({"model": "story", "prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options", None),
    ({"model": "story", "prompt": "hi", "messages": []}, 400, "messages", "unknown_parameter"),
    ({"model": "story", "prompt": "hi", "response_format": {"type": "json_object"}}, 400, "response_format",
     "unsupported_parameter"),
]
BAD_CHATS = [
    ({"model": "story"}, 400, "messages", None),
    ({"model": "story", "messages": []}, 400, "messages", None),
    ({"model": "story", "messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role", None),
    ({"model": "story", "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", None),
    ({"model": "story", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, "messages[0].content", "unsupported_parameter"),
    ({"model": "story", "messages": [{"role": "user", "content": "x", "tool_calls": []}]}, 400,
     "messages[0].tool_calls", "unsupported_parameter"),
    ({"model": "story", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "top_logprobs", None),
    ({"model": "story", "messages": [{"role": "user", "content": "x"}], "prompt": "x"}, 400, "prompt",
     "unknown_parameter"),
    ({"model": "story", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
      "max_completion_tokens": 2}, 400, "max_tokens", None),
]


def assert_openai_error(body: dict, status: int, param: str | None, code: str | None) -> None:
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == ("rate_limit_error" if status == 429 else "invalid_request_error")
    assert error["param"] == param and error["code"] == code, error


async def _post(url: str, path: str, body: object, **kw: object) -> tuple[int, dict, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} | kw.pop("headers", {})  # type: ignore[operator]
    async with aiohttp.ClientSession() as http, http.post(url + path, data=data, headers=headers) as response:
        return response.status, await response.json(content_type=None), dict(response.headers)


@pytest.mark.parametrize(("body", "status", "param", "code"), BAD_COMPLETIONS)
async def test_bad_completion_requests(server: LiveServer, body, status, param, code):
    got, answer, _ = await _post(server.url, "/v1/completions", body)
    assert got == status
    assert_openai_error(answer, status, param, code)


@pytest.mark.parametrize(("body", "status", "param", "code"), BAD_CHATS)
async def test_bad_chat_requests(server: LiveServer, body, status, param, code):
    got, answer, _ = await _post(server.url, "/v1/chat/completions", body)
    assert got == status
    assert_openai_error(answer, status, param, code)


async def test_malformed_bodies_routes_and_methods(server: LiveServer):
    for raw in (b"{not json", b"\xff\xfe", b"[1, 2]", b'"text"'):
        status, body, _ = await _post(server.url, "/v1/completions", raw)
        assert status == 400
        assert_openai_error(body, 400, None, None)
    status, body, _ = await _post(server.url, "/v1/completions", b"{}", headers={"Content-Type": "text/plain"})
    assert status == 415
    assert_openai_error(body, 415, None, "unsupported_media_type")
    async with aiohttp.ClientSession() as http:
        async with http.get(server.url + "/v1/nothing") as response:
            assert response.status == 404
            assert_openai_error(await response.json(), 404, None, "not_found")
        async with http.get(server.url + "/v1/completions") as response:
            assert response.status == 405 and "POST" in response.headers["Allow"]
            assert_openai_error(await response.json(), 405, None, "method_not_allowed")
        async with http.get(server.url + "/health") as response:
            assert response.status == 200 and (await response.json())["status"] == "ok"


async def test_a_good_request_still_works_after_all_that(server: LiveServer):
    status, body, _ = await _post(server.url, "/v1/completions", {"model": "story", "prompt": "hi", "max_tokens": 2})
    assert status == 200 and body["usage"]["completion_tokens"] <= 2 and body["object"] == "text_completion"
