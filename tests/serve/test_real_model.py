"""End to end on the bundled SmolLM2-135M-Instruct and the shipped adapters: the page's skill and the OpenAI API."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import openai
import pytest

from bot.config import load_config, replace
from tests.serve.conftest import REPO, LiveServer


@pytest.mark.real_model
async def test_the_real_model_over_http(bundled_dir: Path, tmp_path: Path):
    config = replace(load_config(REPO / "config.toml"), store={"path": str(tmp_path / "log.db")})
    live = LiveServer(config).start()
    try:
        async with aiohttp.ClientSession() as http, http.post(
                f"{live.url}/v1/skills/sentiment", json={"text": "What a wonderful film, I loved it!",
                                                          "compare": True}) as response:
            assert response.status == 200
            reply = await response.json()
        assert reply["adapter"] == "sentiment" and reply["label"] == "positive" and reply["scores"]["positive"] > 0.5
        assert set(reply["base"]["scores"]) == set(reply["scores"])

        client = openai.AsyncOpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=120)
        models = {m.id for m in (await client.models.list()).data}
        assert {"SmolLM2-135M-Instruct", "sentiment", "ner", "qa", "story"} <= models
        chat = await client.chat.completions.create(
            model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=12, temperature=0)
        assert "Paris" in chat.choices[0].message.content
        await client.close()
    finally:
        live.stop()
