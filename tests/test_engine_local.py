"""The in-process engine on a tiny random Llama with random adapters (built locally, no download)."""

from __future__ import annotations

import asyncio
import shutil

import pytest

from bot.engine import SamplingParams, kernels
from bot.engine.loading import BaseModelRef, load_model
from bot.errors import AdapterError

GREEDY = SamplingParams(max_new_tokens=10)
PROMPTS = [
    ("Hello there, how are you?", None),
    ("Write a short story.\nStory:", "story"),
    ("Context: The sky is blue.\nQuestion: What colour is the sky?\nAnswer:", "qa"),
    ("Sentence: Angela Merkel visited Paris on Monday with officials from the European Union.\nEntities:", "ner"),
    ("Write a short story about a dragon.\nStory:", "story"),
]


def _engine(tiny_base, tiny_adapters, backend: str, max_batch: int = 8, batch_wait_ms: int = 5):
    """backend "light": the fast backend on a model loaded without transformers (bot.engine.light_model);
    "native": the fast backend on the torch-free engine (bot.engine.native_llama)."""
    from bot.engine.light_model import LightTokenizer, load_light
    from bot.engine.scheduler import LocalEngine

    if backend == "native":
        from bot.engine import native_llama
        from bot.engine.backend_fast import FastBackend

        fast = FastBackend(native_llama.load(tiny_base, gguf=None, max_context=2048))
        return LocalEngine(None, LightTokenizer(tiny_base), BaseModelRef("tiny", tiny_base), tiny_adapters,
                           max_batch=max_batch, backend=fast, batch_wait_ms=batch_wait_ms)
    if backend == "light":
        model, tok = load_light(tiny_base, dtype="float32", device="cpu")
        backend = "fast"
    else:
        model, tok = load_model(tiny_base, dtype="float32", device="cpu")
    return LocalEngine(model, tok, BaseModelRef("tiny", tiny_base), tiny_adapters, max_batch=max_batch,
                       backend=backend, batch_wait_ms=batch_wait_ms)


NATIVE = pytest.param("native", marks=pytest.mark.skipif(kernels.load() is None, reason="no CPU kernel"))


@pytest.fixture(params=["fast", "peft", "light", NATIVE])
async def engine(request, tiny_base, tiny_adapters):
    eng = _engine(tiny_base, tiny_adapters, request.param)
    assert eng.backend == {"light": "fast", "native": "fast"}.get(request.param, request.param)
    yield eng
    await eng.close()


async def test_all_adapters_attached(engine):
    assert sorted(engine.adapters) == ["ner", "qa", "sentiment", "story"]
    assert engine.problems == []


async def test_mixed_adapter_batch_equals_one_at_a_time(engine):
    alone = [(await engine.generate(p, GREEDY, a)).text for p, a in PROMPTS]
    together = await asyncio.gather(*(engine.generate(p, GREEDY, a) for p, a in PROMPTS))
    assert [g.text for g in together] == alone
    # The adapters really change the output (otherwise the comparison above proves little).
    bare = await engine.generate(PROMPTS[1][0], GREEDY, None)
    assert bare.text != alone[1]


async def test_rows_joining_a_running_batch_get_the_same_answer(engine):
    long = SamplingParams(max_new_tokens=30)
    first = asyncio.ensure_future(engine.generate(PROMPTS[1][0], long, "story"))
    await asyncio.sleep(0.05)  # let the first request start decoding before the others arrive
    later = await asyncio.gather(*(engine.generate(p, GREEDY, a) for p, a in PROMPTS[2:]))
    alone = [(await engine.generate(p, GREEDY, a)).text for p, a in PROMPTS[2:]]
    assert [g.text for g in later] == alone
    assert (await first).text == (await engine.generate(PROMPTS[1][0], long, "story")).text


async def test_classify_batches_and_sums_to_one(engine):
    prompt = "Text: I loved it\nSentiment:"
    choices = [" negative", " neutral", " positive"]
    alone = [await engine.classify(prompt, choices, a) for a in ("sentiment", None)]
    together = await asyncio.gather(*(engine.classify(prompt, choices, a) for a in ("sentiment", None)))
    for x, y in zip(alone, together, strict=True):
        assert abs(sum(x.scores.values()) - 1) < 1e-5
        for c in choices:
            assert x.scores[c] == pytest.approx(y.scores[c], abs=1e-4)
    assert alone[0].scores != alone[1].scores


async def test_streaming_deltas_add_up_to_the_text(engine):
    deltas: list[str] = []

    async def sink(d: str) -> None:
        deltas.append(d)

    g = await engine.generate(PROMPTS[1][0], SamplingParams(max_new_tokens=16), "story", sink)
    assert len(deltas) >= 2 and "".join(deltas) == g.text
    assert g.completion_tokens <= 16 and g.finish_reason in ("stop", "length")


async def test_stop_strings_end_generation(engine):
    free = await engine.generate(PROMPTS[0][0], SamplingParams(max_new_tokens=20), None)
    assert len(free.text) > 4
    stop = free.text[2:4]
    cut = await engine.generate(PROMPTS[0][0], SamplingParams(max_new_tokens=20, stop=(stop,)), None)
    assert stop not in cut.text and free.text.startswith(cut.text) and cut.finish_reason == "stop"


async def test_sampling_is_reproducible_with_a_seed(engine):
    p = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, repetition_penalty=1.2, seed=7)
    a = await engine.generate(PROMPTS[1][0], p, "story")
    b = await engine.generate(PROMPTS[1][0], p, "story")
    assert a.text == b.text


async def test_unknown_adapter_is_refused(engine):
    with pytest.raises(AdapterError):
        await engine.generate("hi", GREEDY, "nope")


async def test_a_failing_request_does_not_break_the_others(engine, monkeypatch):
    backend, original = engine._backend, engine._backend.prefill
    poison = engine._tok("POISON", add_special_tokens=False).input_ids

    def flaky(batch, prompts, adapters):
        if poison in prompts:
            raise RuntimeError("boom")
        return original(batch, prompts, adapters)

    monkeypatch.setattr(backend, "prefill", flaky)
    results = await asyncio.gather(
        engine.generate("POISON", GREEDY, None), engine.generate(PROMPTS[0][0], GREEDY, None),
        return_exceptions=True,
    )
    assert isinstance(results[0], Exception) and "boom" in str(results[0])
    assert not isinstance(results[1], Exception) and results[1].text


async def test_reload_adds_and_removes_adapters(engine, tiny_adapters, tmp_path):
    extra = tiny_adapters / "story2"
    shutil.copytree(tiny_adapters / "story", extra)
    try:
        problems = await engine.reload_adapters()
        assert "story2" in engine.adapters and problems == []
        assert (await engine.generate(PROMPTS[1][0], GREEDY, "story2")).text
    finally:
        shutil.rmtree(extra)
    await engine.reload_adapters()
    assert "story2" not in engine.adapters


async def test_cancelled_request_does_not_disturb_the_batch(engine):
    long = SamplingParams(max_new_tokens=40)
    victim = asyncio.ensure_future(engine.generate(PROMPTS[1][0], long, "story"))
    keeper = asyncio.ensure_future(engine.generate(PROMPTS[4][0], GREEDY, "story"))
    await asyncio.sleep(0.02)
    victim.cancel()
    assert (await keeper).text == (await engine.generate(PROMPTS[4][0], GREEDY, "story")).text


# --------------------------------------------------------------------------- fast backend == PEFT reference


async def _texts(eng, jobs, *, together: bool) -> list[tuple[str, int, str]]:
    if together:
        done = await asyncio.gather(*(eng.generate(p, params, a) for p, params, a in jobs))
    else:
        done = [await eng.generate(p, params, a) for p, params, a in jobs]
    return [(g.text, g.completion_tokens, g.finish_reason) for g in done]


async def test_fast_backend_generates_the_same_tokens_as_peft(tiny_base, tiny_adapters):
    """Greedy, token for token: one at a time, as one mixed-adapter batch, and with rows joining a
    running batch and leaving it (slot moves), past the cache's first 128 columns."""
    long = SamplingParams(max_new_tokens=150)
    jobs = [(p, GREEDY, a) for p, a in PROMPTS] + [(PROMPTS[1][0], long, "story"), (PROMPTS[0][0], long, None)]
    results = {}
    for backend in ("peft", "fast", "light"):
        eng = _engine(tiny_base, tiny_adapters, backend, max_batch=4)  # more jobs than rows: they queue
        try:
            alone = await _texts(eng, jobs, together=False)
            together = await _texts(eng, jobs, together=True)
            first = asyncio.ensure_future(eng.generate(PROMPTS[4][0], long, "story"))
            await asyncio.sleep(0.05)
            joined = await _texts(eng, jobs[:5], together=True)
            results[backend] = (alone, together, joined, (await first).text)
            longest = max(eng.count_tokens(p) + n for (p, _, _), (_, n, _) in zip(jobs, alone, strict=True))
        finally:
            await eng.close()
    assert results["fast"] == results["peft"] == results["light"]
    alone, together, joined, _ = results["fast"]
    assert together == alone and joined == alone[:5]
    assert longest > 128  # the slot cache had to grow past its first allocation


async def test_fast_backend_classifies_like_peft(tiny_base, tiny_adapters):
    prompt = "Text: I loved it\nSentiment:"
    choices = [" negative", " neutral", " positive"]
    scores = {}
    for backend in ("peft", "fast", "light"):
        eng = _engine(tiny_base, tiny_adapters, backend)
        try:
            scores[backend] = await asyncio.gather(
                *(eng.classify(prompt, choices, a) for a in ("sentiment", None, "ner")))
        finally:
            await eng.close()
    for x, y, z in zip(scores["fast"], scores["peft"], scores["light"], strict=True):
        for c in choices:
            assert x.scores[c] == pytest.approx(y.scores[c], abs=1e-5) == z.scores[c]


def test_fast_forward_matches_peft_logits_with_mixed_adapters(tiny_base, tiny_adapters):
    """The batched LoRA (stacked A/B, per-row mask) against PEFT's per-adapter loop, logit by logit."""
    import torch
    from peft import PeftModel

    from bot.engine.fast_llama import FastLlama

    names = ["sentiment", "ner", "qa", "story"]
    ref_model, tok = load_model(tiny_base, dtype="float32", device="cpu")
    ref = PeftModel.from_pretrained(ref_model, str(tiny_adapters / names[0]), adapter_name=names[0])
    for n in names[1:]:
        ref.load_adapter(str(tiny_adapters / n), adapter_name=n)
    ref.eval()
    model, _ = load_model(tiny_base, dtype="float32", device="cpu")
    fast = FastLlama.from_model(model)
    for n in names:
        fast.add_adapter(n, tiny_adapters / n)
    prompt = tok(PROMPTS[3][0], add_special_tokens=False).input_ids
    rows = [None, "story", "ner", None, "qa", "sentiment", "story"]
    with torch.no_grad():
        want = ref(input_ids=torch.tensor([prompt] * len(rows)), logits_to_keep=1,
                   adapter_names=[r or "__base__" for r in rows]).logits[:, -1]
    got = fast.prefill([prompt] * len(rows), rows)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    assert got.argmax(-1).tolist() == want.argmax(-1).tolist()
    # Removing an adapter from the middle of the stacks leaves the others' results unchanged, up to float
    # rounding: each row's LoRA sums over the whole stack (zeros outside its adapter's columns), and the
    # stack's width and order change. 1e-4 is the bound against PEFT too; a wrong slice moves logits by ~1.
    kept = [r for r in rows if r != "ner"]
    before = fast.prefill([prompt] * len(kept), kept)
    assert torch.allclose(before, got[[i for i, r in enumerate(rows) if r != "ner"]], atol=1e-4, rtol=1e-4)
    fast.remove_adapter("ner")
    assert torch.allclose(fast.prefill([prompt] * len(kept), kept), before, atol=1e-4, rtol=1e-4)
    fast.add_adapter("ner", tiny_adapters / "ner")
    assert torch.allclose(fast.prefill([prompt] * len(rows), rows), got, atol=1e-4, rtol=1e-4)


def test_fast_backend_refuses_what_it_cannot_run(tiny_base, tiny_adapters, tmp_path):
    import json

    from bot.engine.fast_llama import FastLlama, unsupported

    model, _ = load_model(tiny_base, dtype="float32", device="cpu")
    assert unsupported(model) is None
    assert "LlamaForCausalLM" in unsupported(object())
    fast = FastLlama.from_model(model)
    dora = tmp_path / "dora"
    shutil.copytree(tiny_adapters / "qa", dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    with pytest.raises(ValueError, match="use_dora"):
        fast.add_adapter("dora", dora)
    assert fast.adapters == {}


# --------------------------------------------------------------------------- sampling


def test_top_p_keeps_exactly_what_a_full_sort_keeps():
    import numpy as np

    from bot.engine.sampling import softmax, top_p_candidates

    for seed, scale, top_p in [(0, 0.3, 0.95), (1, 3.0, 0.9), (2, 10.0, 0.5), (3, 1.0, 0.999), (4, 30.0, 0.1)]:
        probs = softmax(np.random.default_rng(seed).standard_normal(5000) * scale)
        order = np.argsort(-probs, kind="stable")
        ordered = probs[order]
        keep = np.cumsum(ordered) - ordered < top_p
        ids, kept = top_p_candidates(probs, top_p)
        assert np.array_equal(ids, order[keep]) and np.array_equal(kept, ordered[keep])
    # Ties (a flat distribution: the cut-off is past the first candidates) are kept in id order.
    ids, _ = top_p_candidates(np.full(1024, 1 / 1024), 0.5)   # powers of two: the sums are exact
    assert np.array_equal(ids, np.arange(512))


def test_sampling_among_top_p_candidates_has_the_filtered_distribution():
    import numpy as np

    from bot.engine.sampling import choose_next_tokens, softmax, top_p_filter

    logits = np.array([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0, -5.0]], dtype=np.float32)
    params = SamplingParams(temperature=0.9, top_p=0.8)
    expected = top_p_filter(softmax(logits[0] / 0.9), 0.8)
    expected = expected / expected.sum()
    gen = np.random.default_rng(0)
    n = 20000
    counts = np.bincount([choose_next_tokens(logits, [params], [[]], [gen])[0] for _ in range(n)], minlength=8) / n
    assert (counts[expected == 0] == 0).all()
    assert np.allclose(counts, expected, atol=0.015)


def test_sampling_is_reproducible_and_refuses_a_nan_temperature():
    import numpy as np

    from bot.engine.sampling import choose_next_tokens

    logits = np.random.default_rng(1).standard_normal((2, 50)).astype(np.float32)
    params = [SamplingParams(temperature=1.0, top_p=0.9, repetition_penalty=1.3), SamplingParams(temperature=0.7)]
    seen = [[3, 4, 5], [6]]

    def draws(seed: int) -> list[list[int]]:
        gens = [np.random.default_rng(seed), np.random.default_rng(seed + 1)]
        return [choose_next_tokens(logits, params, seen, gens) for _ in range(20)]

    assert draws(7) == draws(7) != draws(8)
    with pytest.raises(ValueError, match="temperature nan"):
        choose_next_tokens(logits[:1], [SamplingParams(temperature=float("nan"))], [[]], [np.random.default_rng(0)])


# --------------------------------------------------------------------------- the small-batch CPU kernel


def test_cpu_kernel_matches_torch_matmul():
    import torch

    from bot.engine import kernels

    if kernels.load() is None:
        pytest.skip("no C compiler or no AVX2/FMA here: the engine uses torch's matmul")
    gen = torch.Generator().manual_seed(0)
    for m, n, k in [(1, 5, 8), (2, 64, 32), (3, 7, 24), (4, 1, 16), (7, 130, 64), (16, 96, 576), (30, 33, 40)]:
        x = torch.randn(m, k, generator=gen)
        w_full = torch.randn(n, k + 8, generator=gen)
        w = w_full[:, 3:3 + k]   # strided rows, as a column slice of a transposed LoRA stack
        assert kernels.usable(x, w)
        want = x @ w.t()
        assert torch.allclose(kernels.linear(x, w, 1), want, atol=1e-3, rtol=1e-5)
        assert torch.allclose(kernels.linear(x, w, 2), want, atol=1e-3, rtol=1e-5)
        acc = torch.randn(m, n, generator=gen)
        assert torch.allclose(kernels.linear(x, w, 2, out=acc.clone()), acc + want, atol=1e-3, rtol=1e-5)
    assert not kernels.usable(torch.randn(2, 12), torch.randn(3, 12))  # K not a multiple of 8


def test_adapter_files_read_as_safetensors_reads_them(tiny_adapters):
    import torch
    from safetensors.torch import load_file

    from bot.engine.weights import read_safetensors

    path = tiny_adapters / "story" / "adapter_model.safetensors"
    want, got = load_file(str(path)), read_safetensors(path)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) and want[k].dtype == got[k].dtype for k in want)


async def test_a_lone_request_does_not_wait_for_company(tiny_base, tiny_adapters):
    # A minute of batch_wait: were a lone request to wait for companions, it would take that minute.
    # (Requests arriving together still batch: tests/reliability/test_faults.py fails one inside a batch.)
    eng = _engine(tiny_base, tiny_adapters, "light", batch_wait_ms=60_000)
    try:
        lone = await asyncio.wait_for(eng.classify("Text: fine\nSentiment:", ["positive", "negative"], "sentiment"),
                                      30)
        assert sum(lone.scores.values()) == pytest.approx(1.0)
    finally:
        await eng.close()
