"""The engine as one package behind one interface, and the backend seam proven by a third backend."""

from __future__ import annotations

import ast
import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bot.engine import SamplingParams

REPO = Path(__file__).resolve().parents[1]
BOT = REPO / "bot"


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports count too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_nothing_outside_the_engine_package_imports_its_insides() -> None:
    internals = {f"bot.engine.{p.stem}" for p in (BOT / "engine").glob("*.py") if p.stem != "__init__"}
    assert {"bot.engine.scheduler", "bot.engine.backend", "bot.engine.kernels"} <= internals
    offenders = {
        str(path.relative_to(REPO)): sorted(_imports(path) & internals)
        for path in BOT.rglob("*.py") if "engine" not in path.relative_to(BOT).parts
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_backends_do_not_import_each_other() -> None:
    for name, other in (("backend_fast", "backend_peft"), ("backend_peft", "backend_fast")):
        assert not any(i.startswith(f"bot.engine.{other}") for i in _imports(BOT / "engine" / f"{name}.py"))


def test_the_runtime_package_ships_no_test_helpers() -> None:
    assert not (BOT / "random_model.py").exists()
    assert not any("tests" in i.split(".")[0] for p in BOT.rglob("*.py") for i in _imports(p))


def test_the_kernel_source_is_a_c_file_in_the_package() -> None:
    source = (BOT / "engine" / "kernels.c").read_text(encoding="utf-8")
    assert "lb_linear_q41" in source and "#include <immintrin.h>" in source
    assert "#include" not in (BOT / "engine" / "kernels.py").read_text(encoding="utf-8")


def test_importing_the_interface_does_not_import_torch() -> None:
    code = "import sys, bot.engine, bot.core, bot.app, bot.cli, bot.doctor; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert done.stdout.strip() == "False"


# --------------------------------------------------------------------------- a third backend
@dataclass
class CountingBatch:
    last: list[int] = field(default_factory=list)


class CountingBackend:
    """A model with no weights: the next token is the last one plus one (plus 2 with adapter "skip").

    Implements only ``bot.engine.backend.Backend``; if the scheduler reached past that interface (for a
    model, a cache layout, a torch module), this backend would fail."""

    name = "counting"

    def __init__(self, vocab: int, eos: int):
        from types import SimpleNamespace

        self.vocab, self.eos = vocab, eos
        self.config = SimpleNamespace(model_type="counting", vocab_size=vocab, max_position_embeddings=64,
                                      eos_token_id=eos)
        self.attached: list[str] = []
        self.calls: list[tuple[str, int]] = []

    def attach(self, info) -> None:  # type: ignore[no-untyped-def]
        self.attached.append(info.name)

    def detach(self, name: str) -> None:
        self.attached.remove(name)

    def adapter_bytes(self, name: str) -> int:
        return 0

    def _logits(self, last: Sequence[int], adapters: Sequence[str | None]):  # type: ignore[no-untyped-def]
        import torch

        out = torch.full((len(last), self.vocab), -1e9)
        for i, (t, a) in enumerate(zip(last, adapters, strict=True)):
            nxt = t + (2 if a == "skip" else 1)
            out[i, self.eos if nxt >= self.eos else nxt] = 0.0
        return out

    def score(self, prompts, adapters, token_ids):  # type: ignore[no-untyped-def]
        self.calls.append(("score", len(prompts)))
        return self._logits([p[-1] for p in prompts], adapters)[:, list(token_ids)]

    def new_batch(self, max_rows: int, max_tokens: int = 0) -> CountingBatch:
        return CountingBatch()

    def prefill(self, batch, prompts, adapters):  # type: ignore[no-untyped-def]
        self.calls.append(("prefill", len(prompts)))
        batch.last += [p[-1] for p in prompts]
        return self._logits([p[-1] for p in prompts], adapters)

    def decode(self, batch, tokens, positions, adapters):  # type: ignore[no-untyped-def]
        self.calls.append(("decode", len(tokens)))
        batch.last = list(tokens)
        return self._logits(tokens, adapters)

    def retire(self, batch, keep):  # type: ignore[no-untyped-def]
        batch.last = [batch.last[i] for i in keep]
        return keep


class DigitTokenizer:
    """Token i is the character chr(ord('a') + i); id 25 ('z') ends a sequence."""

    eos_token_id = 25
    pad_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = False):  # type: ignore[no-untyped-def]
        from types import SimpleNamespace

        return SimpleNamespace(input_ids=[ord(c) - ord("a") for c in text if "a" <= c <= "y"])

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(ord("a") + i) for i in ids if not (skip_special_tokens and i == 25))

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True) -> str:  # type: ignore[no-untyped-def]
        return "".join(m["content"] for m in messages)


async def test_a_third_backend_runs_behind_the_same_scheduler() -> None:
    from bot.adapters import AdapterInfo
    from bot.engine.backend import Backend
    from bot.engine.loading import BaseModelRef
    from bot.engine.scheduler import LocalEngine

    Backend.register(CountingBackend)
    backend = CountingBackend(vocab=26, eos=25)
    engine = LocalEngine(None, DigitTokenizer(), BaseModelRef("counting", Path(".")), None, backend=backend,
                         max_batch=4)
    try:
        assert engine.backend == "counting"
        engine._adapters["skip"] = AdapterInfo(
            name="skip", path=Path("."), task="story", format_version=1, labels=(), base_model="counting",
            base_shape="", rank=1, target_modules=(),
        )
        engine._live["skip"] = "skip"
        greedy = SamplingParams(max_new_tokens=5)
        plain, skipping, short, to_end = await asyncio.gather(
            engine.generate("ab", greedy, None), engine.generate("ab", greedy, "skip"),
            engine.generate("a", SamplingParams(max_new_tokens=2), None), engine.generate("w", greedy, None),
        )
        assert plain.text == "cdefg" and plain.finish_reason == "length"
        assert skipping.text == "dfhjl"
        assert short.text == "bc"
        assert to_end.text == "xy" and to_end.finish_reason == "stop"   # then 'z', the end token
        scores = await engine.classify("ab", ["c", "d"], None)
        assert scores.scores["c"] > 0.99
        assert ("prefill", 4) in backend.calls  # the four requests shared one batch
    finally:
        await asyncio.wait_for(engine.close(), 10)


# --------------------------------------------------------------------------- doctor and the kernel warning
def _lorabot(*args: str, env: dict[str, str] | None = None, stdin: str = "") -> subprocess.CompletedProcess[str]:
    cli = Path(sys.executable).with_name("lorabot")
    return subprocess.run([str(cli), *args], capture_output=True, text=True, cwd=REPO, input=stdin,
                          env={**os.environ, **(env or {})}, timeout=300)


@pytest.mark.real_model
def test_doctor_reports_what_the_installation_uses(bundled_dir: Path) -> None:
    text = _lorabot("doctor")
    assert text.returncode == 0, text.stderr
    for needle in ("python:", "torch:", "cpu_capability:", "backend: fast", "kernel:", "weights:",
                   "SmolLM2-135M-Instruct", "sentiment:", "database:", "token_set:"):
        assert needle in text.stdout, needle
    data = json.loads(_lorabot("doctor", "--json").stdout)
    assert data["engine"]["backend"] in ("fast", "peft")
    assert set(data["adapters"]["valid"]) >= {"sentiment", "ner", "qa", "story"}
    assert data["transports"]["telegram"]["token_set"] in (True, False)


@pytest.mark.real_model
def test_doctor_never_prints_a_token(bundled_dir: Path) -> None:
    secret = "123456:SECRET-token-value-abcdefghijklmnop"
    done = _lorabot("doctor", "--json", env={"TELEGRAM_BOT_TOKEN": secret})
    assert secret not in done.stdout + done.stderr
    assert json.loads(done.stdout)["transports"]["telegram"]["token_set"] is True


def _float32_config(tmp_path: Path) -> str:
    """The repo's settings with float32 weights: the kernel is used only then (bfloat16 CPUs skip it)."""
    path = tmp_path / "config.toml"
    path.write_text(f'[model]\ndtype = "float32"\n[adapters]\ndir = "{REPO / "adapters"}"\n'
                    f'[store]\npath = "{tmp_path / "lorabot.db"}"\n', encoding="utf-8")
    return str(path)


def _kernel_warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "WARNING" in line and "CPU kernel" in line]


@pytest.mark.real_model
def test_without_kernels_the_start_warns_once_and_still_answers(bundled_dir: Path, tmp_path: Path) -> None:
    done = _lorabot("--config", _float32_config(tmp_path), "ask", "sentiment", "what a lovely day", "--json",
                    env={"LORABOT_NO_KERNELS": "1"})
    assert done.returncode == 0, done.stderr
    warnings = _kernel_warnings(done.stderr)
    assert len(warnings) == 1, done.stderr
    assert "LORABOT_NO_KERNELS" in warnings[0] and "slower" in warnings[0] and "MB" in warnings[0]
    assert json.loads(done.stdout.splitlines()[-1])["kind"] == "answer"


@pytest.mark.real_model
def test_an_unwritable_kernel_cache_warns_once_and_still_answers(bundled_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    (cache / "models").mkdir(parents=True)
    (cache / "models" / bundled_dir.name).symlink_to(bundled_dir)   # the converted model, reused
    (cache / "kernels").write_text("a file where the kernel folder should be")  # fails even for root
    config = _float32_config(tmp_path)
    done = _lorabot("--config", config, "ask", "sentiment", "what a lovely day", "--json",
                    env={"LORABOT_CACHE_DIR": str(cache)})
    assert done.returncode == 0, done.stderr
    warnings = _kernel_warnings(done.stderr)
    assert len(warnings) == 1, done.stderr
    assert "torch matmul" in warnings[0]
    assert json.loads(done.stdout.splitlines()[-1])["kind"] == "answer"
    doctor = _lorabot("--config", config, "doctor", "--json", env={"LORABOT_CACHE_DIR": str(cache)})
    report = json.loads(doctor.stdout)
    assert report["kernel"]["used"] is False and report["kernel"]["reason"]
    assert "kernel" in report["engine"]["weights"]
    shutil.rmtree(cache)
