"""/reload while rows decode: it takes effect between two decode steps, a changed adapter is swapped in only
once it loaded, rows already running finish on the weights they started with, and a broken replacement
leaves the old version serving (tiny random model and adapters)."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

import pytest

from bot.engine import SamplingParams

LONG = SamplingParams(max_new_tokens=1500)
SHORT = SamplingParams(max_new_tokens=12)
PROMPT = "Write a short story.\nStory:"


@pytest.fixture
async def live(tiny_base: Path, tiny_adapters: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    from bot.engine.light_model import load_light
    from bot.engine.loading import BaseModelRef
    from bot.engine.scheduler import LocalEngine

    folder = tmp_path / "adapters"
    shutil.copytree(tiny_adapters, folder)  # the session's folder stays as it is
    model, tok = load_light(tiny_base, dtype="float32", device="cpu")
    engine = LocalEngine(model, tok, BaseModelRef("tiny", tiny_base), folder, max_batch=4)
    yield engine, folder
    await asyncio.wait_for(engine.close(), 30)


def _replace_story(tiny_base: Path, folder: Path) -> None:
    from tests.random_model import save_random_adapter

    fresh = folder.parent / "story-new"
    save_random_adapter(tiny_base, fresh, task="story", seed=99)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copy(fresh / name, folder / "story" / name)
        later = time.time() + 5  # a different mtime even on coarse-clock file systems
        os.utime(folder / "story" / name, (later, later))


async def test_reload_takes_effect_while_rows_decode_and_running_rows_keep_their_weights(live, tiny_base) -> None:
    engine, folder = live
    old_long = await engine.generate(PROMPT, SamplingParams(max_new_tokens=200), "story")
    old_short = await engine.generate(PROMPT, SHORT, "story")
    running = asyncio.ensure_future(engine.generate(PROMPT, SamplingParams(max_new_tokens=200), "story"))
    filler = asyncio.ensure_future(engine.generate("Hello there", LONG, None))  # steady traffic
    while engine.in_flight < 2:
        await asyncio.sleep(0.001)
    _replace_story(tiny_base, folder)
    steps = engine.decode_steps
    problems = await asyncio.wait_for(engine.reload_adapters(), 10)
    assert problems == []
    assert not filler.done(), "reload waited for the running batch to finish"
    assert engine.decode_steps - steps <= 3  # within a step or so, not after 1,500 tokens
    new_short = await engine.generate(PROMPT, SHORT, "story")
    assert new_short.text != old_short.text          # new requests use the new weights
    assert (await running).text == old_long.text     # the running row finished on the old ones
    filler.cancel()
    await asyncio.sleep(0.05)
    assert engine._retiring == set()                  # the old version was detached once unused


async def test_a_broken_replacement_leaves_the_old_version_serving(live) -> None:
    engine, folder = live
    before = await engine.generate(PROMPT, SHORT, "story")
    (folder / "story" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    problems = await asyncio.wait_for(engine.reload_adapters(), 10)
    assert [p.name for p in problems] == ["story"]
    assert "story" in engine.adapters
    assert (await engine.generate(PROMPT, SHORT, "story")).text == before.text


async def test_a_removed_adapter_stops_serving_after_reload(live) -> None:
    engine, folder = live
    shutil.rmtree(folder / "qa")
    assert await engine.reload_adapters() == []
    assert "qa" not in engine.adapters
    from bot.errors import AdapterError

    with pytest.raises(AdapterError):
        await engine.generate("Question: where?\nAnswer:", SHORT, "qa")
