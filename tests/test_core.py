"""Core behaviour with the FakeEngine installed through the real interface and a real SQLite store."""

from __future__ import annotations

import json

import pytest

from bot.config import Config, replace
from bot.core import Core
from bot.messages import Entities, Incoming, Sentiment
from bot.store import AsyncStore, Store
from tests.fakes import FakeEngine


@pytest.fixture
async def store():
    s = AsyncStore(Store.memory())
    yield s
    await s.close()


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def core(store, engine) -> Core:
    return Core(Config(), engine, store)


def msg(text: str, **kw) -> Incoming:
    fields = dict(platform="test", chat_id="c1", user_id="u1", text=text)
    fields.update(kw)
    return Incoming(**fields)


def rows(store: AsyncStore, sql: str, params=()) -> list[tuple]:
    return list(store._store.db.execute(sql, params).fetchall())


async def test_help_and_skills_list_every_skill(core):
    help_reply = await core.handle(msg("/help"))
    assert "/compare" in help_reply.text and "/mode" in help_reply.text
    skills = (await core.handle(msg("/skills"))).text
    for name in ("chat", "sentiment", "ner", "qa", "story"):
        assert f"• {name}" in skills
    assert "adapter 'sentiment'" in skills


async def test_sentiment_command_uses_adapter_and_logs_both_directions(core, store, engine):
    reply = await core.handle(msg("/sentiment I love this film"))
    assert isinstance(reply.result, Sentiment) and reply.result.label == "positive"
    assert reply.adapter == "sentiment" and reply.skill == "sentiment"
    assert abs(sum(reply.result.scores.values()) - 1) < 1e-6
    assert engine.calls[-1][2] == "sentiment"
    stored = rows(store, "SELECT direction, status, skill, adapter, result_json FROM messages ORDER BY id")
    assert stored[0][:3] == ("in", "answered", "sentiment")
    assert stored[1][:4] == ("out", "sent", "sentiment", "sentiment")
    assert json.loads(stored[1][4])["label"] == "positive"
    assert reply.message_id is not None and reply.feedback


async def test_mode_persists_and_plain_messages_follow_it(core, store):
    assert "Mode set to sentiment" in (await core.handle(msg("/mode sentiment"))).text
    reply = await core.handle(msg("this is awful"))
    assert reply.skill == "sentiment" and reply.result.label == "negative"
    # A new Core over the same store (a restart) keeps the mode.
    restarted = Core(Config(), FakeEngine(), store)
    assert (await restarted.handle(msg("so good"))).skill == "sentiment"
    assert "Unknown skill" in (await core.handle(msg("/mode nonsense"))).text


async def test_ner_offsets_point_into_the_users_text(core):
    text = "Yesterday Alice met Bob in Paris."
    reply = await core.handle(msg(f"/ner {text}"))
    assert isinstance(reply.result, Entities)
    names = [e.text for e in reply.result.entities]
    assert names == ["Alice", "Bob", "Paris"]
    for e in reply.result.entities:
        assert text[e.start:e.end] == e.text


async def test_qa_takes_context_from_pipe_reply_or_attachment(core):
    assert (await core.handle(msg("/ask where? | The cat sat in Rome."))).result.answer == "Rome"
    replied = await core.handle(msg("/ask where did it sit?", reply_to_text="The dog lay in Oslo."))
    assert replied.result.answer == "Oslo"
    attached = await core.handle(msg("/ask where?", attachment_text="A bird flew to Lima."))
    assert attached.result.answer == "Lima"
    missing = await core.handle(msg("/ask where is it?"))
    assert missing.kind == "refusal" and "question" in missing.text


async def test_story_streams_progressively(core):
    seen: list[str] = []

    async def stream(text: str) -> None:
        seen.append(text)

    reply = await core.handle(msg("/story a brave mouse"), stream)
    assert len(seen) > 3 and seen[-1] == reply.text
    assert all(seen[i + 1].startswith(seen[i]) for i in range(len(seen) - 1))


async def test_story_opening_sentence_is_kept(core):
    reply = await core.handle(msg("/story The old lighthouse keeper heard a knock at midnight."))
    assert reply.text.startswith("The old lighthouse keeper heard a knock at midnight. word0")
    theme = await core.handle(msg("/story a little fox who wanted to fly"))
    assert theme.text.startswith("word0")


async def test_compare_shows_base_and_adapter(core):
    reply = await core.handle(msg("/compare sentiment I love it"))
    assert reply.base_result is not None and reply.result is not None
    assert "Base model" in reply.text and "Fine-tuned (adapter 'sentiment')" in reply.text
    data = reply.to_json()
    assert data["label"] == "positive" and "base" in data and "scores" in data["base"]
    bad = await core.handle(msg("/compare chat hi"))
    assert bad.kind == "refusal" and "Usage" in bad.text


async def test_chat_history_is_used_and_reset_clears_it(core, engine):
    await core.handle(msg("/mode chat"))
    await core.handle(msg("my name is Ada"))
    await core.handle(msg("what is my name?"))
    assert "my name is Ada" in engine.calls[-1][1]
    await core.handle(msg("/reset"))
    await core.handle(msg("hello again"))
    assert "my name is Ada" not in engine.calls[-1][1]


async def test_forget_deletes_the_users_rows(core, store):
    await core.handle(msg("/sentiment good"))
    await core.handle(msg("/sentiment bad", user_id="u2"))
    reply = await core.handle(msg("/forget"))
    assert "deleted" in reply.text
    users = [r[0] for r in rows(store, "SELECT platform_user_id FROM users")]
    assert users == ["u2"]
    assert rows(store, "SELECT count(*) FROM messages")[0][0] == 2  # u2's message and its reply


async def test_bad_input_is_refused_clearly_and_logged(core, store):
    empty = await core.handle(msg("   "))
    assert empty.kind == "refusal" and "text" in empty.text
    huge = await core.handle(msg("/sentiment " + "x" * 100_000))
    assert huge.kind == "refusal" and "too long" in huge.text
    unknown = await core.handle(msg("/frobnicate"))
    assert "Unknown command /frobnicate" in unknown.text
    controls = await core.handle(msg("/sentiment good\x00\x07 \u202egnirts\udc80"))
    assert controls.kind == "answer"
    statuses = [r[0] for r in rows(store, "SELECT status FROM messages WHERE direction='in' ORDER BY id")]
    assert statuses == ["refused", "refused", "refused", "answered"]


async def test_engine_failure_fails_only_that_request(core, store, engine):
    engine.fail_on = "explode"
    failed = await core.handle(msg("/ner please explode"))
    assert failed.kind == "error" and "failed" in failed.text
    ok = await core.handle(msg("/ner Then Alice left."))
    assert ok.kind == "answer"
    statuses = [r[0] for r in rows(store, "SELECT status FROM messages WHERE direction='in' ORDER BY id")]
    assert statuses == ["failed", "answered"]


async def test_groups_edits_and_allowlist(store, engine):
    config = replace(Config(), access={"allowed_users": ("test:u1",), "admins": ("u1",)})
    core = Core(config, engine, store)
    assert await core.handle(msg("hello", is_group=True, addressed=False)) is None
    assert await core.handle(msg("hello", edited=True)) is None
    denied = await core.handle(msg("/help", user_id="intruder"))
    assert denied.kind == "refusal" and "private" in denied.text
    assert rows(store, "SELECT count(*) FROM users WHERE platform_user_id='intruder'")[0][0] == 0
    assert (await core.handle(msg("/reload"))).kind == "command"


async def test_reload_is_admin_only(core):
    assert (await core.handle(msg("/reload"))).text == "Only admins can reload adapters."


async def test_rate_limit_refuses_politely(store, engine):
    config = replace(Config(), access={"rate_limit_per_minute": 2})
    core = Core(config, engine, store)
    assert (await core.handle(msg("/sentiment good"))).kind == "answer"
    assert (await core.handle(msg("/sentiment good"))).kind == "answer"
    third = await core.handle(msg("/sentiment good"))
    assert third.kind == "refusal" and "too quickly" in third.text
    other_user = await core.handle(msg("/sentiment good", user_id="u9"))
    assert other_user.kind == "answer"


async def test_feedback_is_stored(core, store):
    reply = await core.handle(msg("/sentiment great"))
    assert await core.feedback("test", "u1", reply.message_id, 1) == "Thanks for the feedback!"
    assert rows(store, "SELECT value FROM feedback")[0][0] == 1


async def test_history_shows_what_was_said_not_the_command(core, engine):
    await core.handle(msg("/chat my name is Ada"))
    await core.handle(msg("/chat and yours?"))
    prompt = engine.calls[-1][1]
    assert "user: my name is Ada" in prompt and "/chat" not in prompt


async def test_sentiment_applies_the_adapters_label_offsets(store):
    """The fake adapter says neutral at 0.9 for a plain sentence; offsets from the manifest move it."""
    import dataclasses

    engine = FakeEngine()
    info = engine.installed["sentiment"]
    engine.installed["sentiment"] = dataclasses.replace(info, label_offsets={"neutral": -3.0, "negative": 0.5})
    core = Core(Config(), engine, store)
    reply = await core.handle(msg("/sentiment the train leaves at nine"))
    # neutral 0.9 * e^-3 = 0.045, negative 0.05 * e^0.5 = 0.082, positive 0.05: renormalised.
    assert reply.result.label == "negative"
    assert abs(sum(reply.result.scores.values()) - 1) < 1e-9
    assert reply.result.scores["negative"] > reply.result.scores["positive"] > reply.result.scores["neutral"]
