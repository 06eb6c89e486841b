"""``lorabot serve`` driven by the official ``openai`` client: what any OpenAI program would see."""

from __future__ import annotations

import openai
import pytest

from bot.engine import SamplingParams
from tests.serve.conftest import LiveServer

PROMPT = "Write a short story about a dragon.\nStory:"


@pytest.fixture
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_list_the_base_and_every_adapter_with_lorabot_fields(client, server):
    models = {m.id: m for m in client.models.list().data}
    base = server.engine.base_model
    assert set(models) == {base, "sentiment", "ner", "qa", "story"}
    assert models[base].parent is None
    ner = models["ner"].model_dump()
    assert ner["parent"] == base and ner["task"] == "ner" and ner["labels"] == ["PER", "ORG", "LOC", "MISC"]
    assert ner["format_version"] == 1 and ner["max_model_len"] == server.engine.max_context
    assert client.models.retrieve("qa").model_dump()["task"] == "qa"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_a_completion_is_the_engine_s_own_answer(client, server):
    done = client.completions.create(model="story", prompt=PROMPT, max_tokens=10, temperature=0)
    direct = server.run(server.engine.generate(PROMPT, SamplingParams(max_new_tokens=10), "story"))
    assert done.choices[0].text == direct.text and done.choices[0].finish_reason == direct.finish_reason
    assert done.usage.prompt_tokens == direct.prompt_tokens and done.usage.completion_tokens == 10
    assert done.usage.total_tokens == done.usage.prompt_tokens + 10
    bare = client.completions.create(model=server.engine.base_model, prompt=PROMPT, max_tokens=10, temperature=0)
    assert bare.choices[0].text != done.choices[0].text   # the adapter really is applied


def test_chat_uses_the_chat_template(client, server):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there!"}]
    done = client.chat.completions.create(model=server.engine.base_model, messages=messages, max_tokens=8,
                                          temperature=0)
    prompt = server.engine.chat_prompt(messages)
    direct = server.run(server.engine.generate(prompt, SamplingParams(max_new_tokens=8), None))
    assert done.choices[0].message.role == "assistant" and done.choices[0].message.content == direct.text
    assert done.usage.prompt_tokens == server.engine.count_tokens(prompt)


def test_streams_give_the_same_text_as_one_answer(client):
    whole = client.completions.create(model="qa", prompt=PROMPT, max_tokens=12, temperature=0)
    chunks = list(client.completions.create(model="qa", prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12

    messages = [{"role": "user", "content": "Tell me about dragons."}]
    whole_chat = client.chat.completions.create(model="story", messages=messages, max_tokens=12, temperature=0)
    stream = list(client.chat.completions.create(model="story", messages=messages, max_tokens=12, temperature=0,
                                                 stream=True))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == whole_chat.choices[0].message.content
    assert stream[-1].usage.completion_tokens == whole_chat.usage.completion_tokens


def test_logprobs_of_a_greedy_completion(client):
    done = client.completions.create(model="ner", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    lp = done.choices[0].logprobs
    assert "".join(lp.tokens) == done.choices[0].text and len(lp.token_logprobs) == 6
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 3 and value <= 0
        assert max(top.values()) == pytest.approx(value) and top[token] == pytest.approx(value)  # greedy: the top one
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])

    chat = client.chat.completions.create(model="ner", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert "".join(t.token for t in content) == chat.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == pytest.approx(t.logprob) for t in content)
    assert bytes(content[0].bytes).decode() == content[0].token


def test_logit_bias_bans_and_forces_tokens(client, server):
    first = client.completions.create(model="story", prompt=PROMPT, max_tokens=1, temperature=0, logprobs=2)
    top = first.choices[0].logprobs.top_logprobs[0]
    banned_text, runner_up = sorted(top, key=top.get, reverse=True)[:2]
    ids = server.engine._tok(banned_text, add_special_tokens=False).input_ids   # the greedy token's id
    assert len(ids) == 1
    again = client.completions.create(model="story", prompt=PROMPT, max_tokens=1, temperature=0,
                                      logit_bias={str(ids[0]): -100})
    assert again.choices[0].text == runner_up
    forced_id = server.engine._tok(" castle", add_special_tokens=False).input_ids[0]
    forced = client.completions.create(model="story", prompt=PROMPT, max_tokens=1, temperature=0, logprobs=1,
                                       logit_bias={str(forced_id): 100})
    assert forced.choices[0].logprobs.token_logprobs[0] == pytest.approx(0.0, abs=1e-3)   # after the bias
    assert forced.choices[0].text == server.engine._tok.decode([forced_id])


def test_seeded_sampling_is_reproducible(client):
    runs = [client.completions.create(model="story", prompt=PROMPT, max_tokens=12, temperature=1.0, top_p=0.9,
                                      seed=7).choices[0].text for _ in range(2)]
    assert runs[0] == runs[1]


def test_errors_arrive_as_the_client_s_exceptions(client, server):
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="no-such-adapter", prompt="hi", max_tokens=2)
    assert missing.value.code == "model_not_found" and missing.value.param == "model"
    with pytest.raises(openai.BadRequestError) as several:
        client.completions.create(model="story", prompt="hi", max_tokens=2, n=2)
    assert several.value.param == "n" and "n=1" in several.value.message
    with pytest.raises(openai.BadRequestError) as tools:
        client.chat.completions.create(model="story", messages=[{"role": "user", "content": "hi"}], tools=[
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])
    assert tools.value.param == "tools" and tools.value.code == "unsupported_parameter"
    with pytest.raises(openai.BadRequestError) as unknown:
        client.completions.create(model="story", prompt="hi", max_tokens=2, extra_body={"mirostat": 2})
    assert unknown.value.param == "mirostat" and "Unrecognized request argument" in unknown.value.message
    with pytest.raises(openai.BadRequestError) as long:
        client.completions.create(model="story", prompt="hi " * 50, max_tokens=server.engine.max_context)
    assert long.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as streamed:
        client.completions.create(model="story", prompt="hi", max_tokens=2, logprobs=2, stream=True)
    assert streamed.value.param == "logprobs"
    with pytest.raises(openai.BadRequestError) as bias:
        client.completions.create(model="story", prompt="hi", max_tokens=2, logit_bias={"999999999": 5})
    assert "vocabulary" in bias.value.message
