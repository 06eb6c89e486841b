"""bench/llamacpp.py: without llama-cpp-python its rows are skipped with the reason (never a crash), and the
summary of ``make bench`` then has nothing to meet for them; with it, a tiny side-by-side run measures both
engines on the same prompts. No timing is asserted: figures come from the benchmark itself."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import bench.all as bench_all
import bench.common as bench_common
from bench import llamacpp

LLAMACPP_KEYS = ("llamacpp_single_tok_s", "llamacpp_adapter_tok_s", "llamacpp_b16_tok_s", "llamacpp_classify_ms",
                 "llamacpp_rss_mb")
LORABOT_KEYS = ("single_tok_s", "single_adapter_tok_s", "aggregate_tok_s_16", "sentiment_p50_ms", "cold_start_s",
                "rss_mb")


@pytest.fixture
def results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """bench/results/ redirected, so that a test never overwrites a real benchmark's figures."""
    out = tmp_path / "results"
    monkeypatch.setattr(bench_common, "RESULTS", out)
    monkeypatch.setattr(bench_all, "RESULTS", out)
    return out


def test_the_child_reports_a_missing_llama_cpp_instead_of_failing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)   # what `import llama_cpp` meets when it is not installed
    found = llamacpp.llamacpp_child({}, 0.0)
    assert found["skipped"].startswith("llama_cpp cannot be imported (ModuleNotFoundError")
    assert "'.[bench]'" in found["skipped"]                # and how to get it


def test_without_llama_cpp_the_json_says_why_and_the_summary_has_nothing_to_meet(
        results: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    # The child is a separate process: a package that fails to import, first on its path, stands in for
    # an installation without llama-cpp-python (or one whose build does not load).
    shadow = tmp_path / "shadow" / "llama_cpp"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text('raise ImportError("simulated: llama-cpp-python is not installed")\n')
    monkeypatch.setenv("PYTHONPATH", str(shadow.parent))

    assert llamacpp.main(["--sides", "llamacpp", "--rounds", "2", "--threads", "1"]) == 0
    data = json.loads((results / "llamacpp.json").read_text())
    assert "simulated: llama-cpp-python is not installed" in data["llamacpp_skipped"]
    assert len(data["runs"]["llamacpp"]) == 1                  # no second attempt once it is known to be missing
    assert all(data[k] is None for k in (*LLAMACPP_KEYS, *LORABOT_KEYS))
    assert set(data["ratios"].values()) == {None}
    assert data["settings"]["prompt_tokens"]["sentiment"] == 25
    assert "llama.cpp rows skipped: llama_cpp cannot be imported" in capsys.readouterr().out

    rows = {r["figure"]: r for r in bench_all.summary_rows({"llamacpp": {"status": "ok"}})}
    for figure in ("vs_llama_adapter", "vs_llama_16", "vs_llama_sentiment", "vs_llama_rss"):
        assert rows[figure]["baseline"] is None and rows[figure]["met"] is None, rows[figure]
    assert "llama.cpp skipped (ImportError: simulated" in rows["vs_llama_adapter"]["note"]


@pytest.mark.real_model
def test_a_tiny_side_by_side_run_measures_both_engines_on_the_same_work(results: Path) -> None:
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (the bench extra)")
    args = ["--sides", "lorabot", "llamacpp", "--rounds", "1", "--runs", "1", "--new-tokens", "4",
            "--b16-new-tokens", "2", "--classify-runs", "1", "--threads", "1", "--float32", "no"]
    assert llamacpp.main(args) == 0
    data = json.loads((results / "llamacpp.json").read_text())
    assert "llamacpp_skipped" not in data, data.get("llamacpp_skipped")
    assert not [c["error"] for side in data["runs"].values() for c in side if "error" in c]
    assert data["llamacpp"]["version"] == llama_cpp.__version__
    assert data["lorabot"]["adapters"] == data["llamacpp"]["adapters"]     # memory compared like for like
    for key in (*LLAMACPP_KEYS, *LORABOT_KEYS, "llamacpp_cold_start_s"):
        assert isinstance(data[key], int | float) and data[key] > 0, key
    assert all(isinstance(v, float) and v > 0 for v in data["ratios"].values()), data["ratios"]
    lorabot_run = data["runs"]["lorabot"][0]
    # The same prompt tokens on both sides, and both engines' sentiment adapters agree on the label.
    assert lorabot_run["prompt_tokens"] == {k: data["settings"]["prompt_tokens"][k] for k in ("chat", "sentiment")}
    ours, theirs = data["outputs"]["lorabot"]["sentiment_scores"], data["outputs"]["llamacpp"]["sentiment_scores"]
    assert max(ours, key=ours.get) == max(theirs, key=theirs.get) == "positive", (ours, theirs)
    assert data["lorabot"]["backend"] == "fast" and data["lorabot"]["dtype"] in ("float32", "bfloat16", "float16")
