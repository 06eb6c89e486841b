"""16 HTTP clients at once, four adapters: each gets exactly its tokens alone, and they shared batches."""

from __future__ import annotations

import asyncio

import openai

from tests.serve.conftest import LiveServer, metric, scrape

ADAPTERS = ("story", "qa", "ner", "sentiment")
TOPICS = ("a dragon", "the sea", "a robot", "winter")


def _requests() -> list[tuple[str, str, int]]:
    """(adapter, prompt, max_tokens): four of each adapter, different prompts and lengths."""
    out = []
    for i in range(16):
        adapter, topic = ADAPTERS[i % 4], TOPICS[i // 4]
        out.append((adapter, f"Write a short story about {topic}.\nStory:", 10 + 3 * (i % 5)))
    return out


async def test_sixteen_clients_with_four_adapters_get_their_own_tokens(server: LiveServer):
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    reqs = _requests()

    async def ask(adapter: str, prompt: str, max_tokens: int) -> tuple[str, int]:
        done = await client.completions.create(model=adapter, prompt=prompt, max_tokens=max_tokens, temperature=0)
        return done.choices[0].text, done.usage.completion_tokens

    alone = [await ask(*r) for r in reqs]
    before = await scrape(server.url)
    together = await asyncio.gather(*(ask(*r) for r in reqs))
    after = await scrape(server.url)
    await client.close()

    assert together == alone
    assert len({text for (adapter, *_), (text, _) in zip(reqs, alone, strict=True) if adapter == "story"}) > 1

    def steps(le: str) -> float:
        name = "lorabot_engine_decode_batch_rows_bucket"
        return metric(after, name, le=le) - metric(before, name, le=le)

    # Decode steps while the 16 ran: some with more than four rows, so with more than one adapter in them.
    assert steps("+Inf") > 0 and steps("+Inf") - steps("4.0") > 0
    served = metric(after, "lorabot_http_requests_total", endpoint="/v1/completions", status="200") - metric(
        before, "lorabot_http_requests_total", endpoint="/v1/completions", status="200")
    assert served == 16
    generated = sum(metric(after, "lorabot_tokens_total", kind="completion", model=a) for a in ADAPTERS) - sum(
        metric(before, "lorabot_tokens_total", kind="completion", model=a) for a in ADAPTERS)
    assert generated == sum(n for _, n in together)
    assert metric(after, "lorabot_request_seconds_count", endpoint="/v1/completions") >= 32
    assert "lorabot_engine_queue_depth" in after and "lorabot_engine_running_rows" in after
