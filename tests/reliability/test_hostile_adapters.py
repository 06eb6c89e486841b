"""Hostile adapter folders: each one is reported as a problem with a reason, the others still load, nothing
crashes the scan, and no pickle is ever unpickled (the pickles here create a marker file if they are)."""

from __future__ import annotations

import json
import pickle
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.adapters import MANIFEST, PEFT_CONFIG, WEIGHTS, AdapterInfo, scan_adapters, validate_adapter
from bot.errors import AdapterError


class _Pwn:
    """Unpickling this creates the marker file: proof that someone loaded a pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (str(self.marker), "w"))


def evil_pickle(marker: Path) -> bytes:
    return pickle.dumps({"base_model.model.layers.0.lora_A.weight": _Pwn(marker)})


def safetensors_bytes(header: bytes | dict, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.fixture
def good(tiny_adapters: Path) -> Path:
    return tiny_adapters / "sentiment"


@pytest.fixture
def shape(good: Path) -> str:
    return json.loads((good / MANIFEST).read_text())["base_shape"]


def _edit_json(name: str, **changes: object) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        data = json.loads((folder / name).read_text())
        data.update(changes)
        (folder / name).write_text(json.dumps(data))
    return edit


def _write(name: str, content: bytes) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_bytes(content)


def _remove(name: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).unlink()


def _truncate_weights(folder: Path) -> None:
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])  # header intact, tensor data cut


def _weights_linked_to(target: str) -> Callable[[Path], None]:
    def link(folder: Path) -> None:
        (folder / WEIGHTS).unlink()
        (folder / WEIGHTS).symlink_to(target)
    return link


# (folder name, mutation, words expected in the reason). Every case starts from a copy of a valid adapter.
CASES: list[tuple[str, Callable[[Path], None], str]] = [
    ("no-manifest", _remove(MANIFEST), "lorabot.json is missing"),
    ("no-peft-config", _remove(PEFT_CONFIG), "adapter_config.json is missing"),
    ("no-weights", _remove(WEIGHTS), "adapter_model.safetensors is missing"),
    ("wrong-base", _edit_json(MANIFEST, base_shape="llama-h4096-l32", base_model="meta/Llama-7B"), "does not match"),
    ("old-format", _edit_json(MANIFEST, format_version=99), "prompt format v99"),
    ("unknown-task", _edit_json(MANIFEST, task="rm -rf"), "unknown task"),
    ("schema", _edit_json(MANIFEST, lorabot_manifest=2), "unsupported manifest schema"),
    ("labels-string", _edit_json(MANIFEST, labels="positive"), "labels must be a list"),
    ("labels-dup", _edit_json(MANIFEST, labels=["a", "a"]), "duplicate labels"),
    ("manifest-list", _write(MANIFEST, b"[1, 2]"), "must hold a JSON object"),
    ("manifest-binary", _write(MANIFEST, b"\xff\xfe\x00garbage"), "not valid JSON"),
    ("manifest-empty", _write(MANIFEST, b""), "not valid JSON"),
    ("not-lora", _edit_json(PEFT_CONFIG, peft_type="IA3"), "peft_type must be LORA"),
    ("modules-to-save", _edit_json(PEFT_CONFIG, modules_to_save=["lm_head"]), "modules_to_save"),
    ("rank-zero", _edit_json(PEFT_CONFIG, r=0), "r must be a positive integer"),
    ("rank-string", _edit_json(PEFT_CONFIG, r="8"), "r must be a positive integer"),
    ("weights-empty", _write(WEIGHTS, b""), "truncated"),
    ("weights-short", _write(WEIGHTS, b"\x01\x02\x03\x04"), "truncated"),
    ("header-giant", _write(WEIGHTS, struct.pack("<Q", 2**63) + b"{}"), "header length"),
    ("header-past-end", _write(WEIGHTS, struct.pack("<Q", 50_000_000) + b'{"a":'), "not a readable safetensors"),
    ("header-garbage", _write(WEIGHTS, safetensors_bytes(b"\x80\x81not json")), "not a readable safetensors"),
    ("header-list", _write(WEIGHTS, safetensors_bytes(b"[1,2,3]")), "not a safetensors file"),
    ("header-empty", _write(WEIGHTS, safetensors_bytes({"__metadata__": {}})), "holds no tensors"),
    ("header-full-model", _write(WEIGHTS, safetensors_bytes(
        {"model.embed_tokens.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)),
        "non-LoRA tensors"),
    ("weights-link-etc", _weights_linked_to("/etc/hostname"), "safetensors"),
]
PICKLE_CASES = ["adapter_model.bin", "adapter_model.pt", "weights.PTH", "x.ckpt", "y.pkl", "z.pickle"]
BAD_NAMES = ["Bad Name", "UPPER", "base", "chat", "none", "__base__", "-dash", "a" * 65, "ѕentiment", "x.y", "a;b"]


def _copy(good: Path, folder: Path) -> Path:
    shutil.copytree(good, folder, symlinks=True)
    return folder


@pytest.mark.parametrize(("name", "mutate", "reason"), CASES, ids=[c[0] for c in CASES])
def test_each_broken_folder_is_reported_with_its_reason(
    tmp_path: Path, good: Path, shape: str, name: str, mutate: Callable[[Path], None], reason: str,
) -> None:
    root = tmp_path / "adapters"
    _copy(good, root / "fine")
    mutate(_copy(good, root / name))
    found, problems = scan_adapters(root, base_model="tiny", base_shape=shape)
    assert set(found) == {"fine"}  # the others still load
    [problem] = problems
    assert problem.name == name and reason in problem.reason, problem.reason


@pytest.mark.parametrize("pickle_name", PICKLE_CASES)
def test_pickled_weights_are_refused_without_being_opened(
    tmp_path: Path, good: Path, shape: str, pickle_name: str,
) -> None:
    marker = tmp_path / "unpickled"
    folder = _copy(good, tmp_path / "adapters" / "pickled")
    (folder / pickle_name).write_bytes(evil_pickle(marker))
    with pytest.raises(AdapterError, match="pickled weights"):
        validate_adapter(folder, base_model="tiny", base_shape=shape)
    assert not marker.exists()


def test_a_pickle_disguised_as_safetensors_is_not_unpickled(tmp_path: Path, good: Path, shape: str) -> None:
    marker = tmp_path / "unpickled"
    folder = _copy(good, tmp_path / "adapters" / "disguised")
    (folder / WEIGHTS).write_bytes(evil_pickle(marker))
    with pytest.raises(AdapterError, match="safetensors"):
        validate_adapter(folder, base_model="tiny", base_shape=shape)
    assert not marker.exists()


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_folder_names_are_refused(tmp_path: Path, good: Path, shape: str, name: str) -> None:
    root = tmp_path / "adapters"
    _copy(good, root / name)
    found, problems = scan_adapters(root, base_model="tiny", base_shape=shape)
    assert found == {} and "not a valid adapter name" in problems[0].reason


def test_a_name_with_a_trailing_newline_is_refused(tmp_path: Path, good: Path, shape: str) -> None:
    root = tmp_path / "adapters"
    _copy(good, root / "sentiment\n")
    found, problems = scan_adapters(root, base_model="tiny", base_shape=shape)
    assert found == {} and "not a valid adapter name" in problems[0].reason


def test_traversal_names_never_become_paths(tmp_path: Path, good: Path, shape: str) -> None:
    # validate_adapter judges the folder's own name; "../x"-style input can only arrive as a name there.
    for name in ("..", ".", "../../x", "..\\x"):
        with pytest.raises(AdapterError):
            validate_adapter(tmp_path / "adapters" / name, base_model="tiny", base_shape=shape)


def test_symlinks_out_of_the_adapters_folder_are_refused(tmp_path: Path, good: Path, shape: str) -> None:
    outside = _copy(good, tmp_path / "elsewhere" / "sneaky")
    root = tmp_path / "adapters"
    root.mkdir()
    (root / "sneaky").symlink_to(outside, target_is_directory=True)
    (root / "loop").symlink_to(root / "loop")  # a symlink loop is skipped, not followed forever
    (root / "dangling").symlink_to(tmp_path / "nowhere")
    found, problems = scan_adapters(root, base_model="tiny", base_shape=shape)
    assert found == {}
    assert [(p.name, p.reason) for p in problems] == [("sneaky", "links outside the adapters folder; refused")]


@pytest.mark.parametrize("target", [MANIFEST, PEFT_CONFIG, WEIGHTS])
def test_deeply_nested_json_is_a_reported_problem(tmp_path: Path, good: Path, shape: str, target: str) -> None:
    root = tmp_path / "adapters"
    _copy(good, root / "fine")
    folder = _copy(good, root / "deep")
    deep = b"[" * 100_000
    (folder / target).write_bytes(safetensors_bytes(deep) if target == WEIGHTS else deep)
    found, problems = scan_adapters(root, base_model="tiny", base_shape=shape)
    assert set(found) == {"fine"} and problems[0].name == "deep"


@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(target=st.sampled_from([MANIFEST, PEFT_CONFIG, WEIGHTS]), data=st.binary(max_size=300),
       keep=st.integers(min_value=0, max_value=400))
def test_random_and_truncated_files_never_crash_validation(
    tmp_path_factory: pytest.TempPathFactory, good: Path, shape: str, target: str, data: bytes, keep: int,
) -> None:
    folder = _copy(good, tmp_path_factory.mktemp("fuzz") / "fuzzed")
    original = (folder / target).read_bytes()
    # Half the time random bytes, half the time the real file cut short (with random bytes appended).
    (folder / target).write_bytes(data if keep % 2 else original[:keep] + data[:8])
    try:
        assert isinstance(validate_adapter(folder, base_model="tiny", base_shape=shape), AdapterInfo)
    except AdapterError as exc:
        assert str(exc)


# --------------------------------------------------------------------------- through the real engine


def test_real_engine_loads_the_good_adapter_and_reports_every_bad_one(tmp_path: Path, good: Path,
                                                                       tiny_base: Path) -> None:
    """LocalEngine over a folder of one good adapter and many bad ones (some only fail at weight loading)."""
    import asyncio

    from bot.config import Config, replace
    from bot.engine.scheduler import LocalEngine

    marker = tmp_path / "unpickled"
    root = tmp_path / "adapters"
    _copy(good, root / "good")
    _truncate_weights(_copy(good, root / "truncated"))  # passes validation, fails when PEFT reads it
    (_copy(good, root / "pickled") / "adapter_model.bin").write_bytes(evil_pickle(marker))
    only_bin = _copy(good, root / "only-bin")
    (only_bin / WEIGHTS).unlink()
    (only_bin / "adapter_model.bin").write_bytes(evil_pickle(marker))
    (_copy(good, root / "garbage") / WEIGHTS).write_bytes(b"\x00" * 64)
    _edit_json(MANIFEST, base_shape="other")(_copy(good, root / "wrong-base"))
    (root / "outside").symlink_to(_copy(good, tmp_path / "elsewhere" / "outside"), target_is_directory=True)

    config = replace(Config(), model={"base": str(tiny_base), "dtype": "float32", "threads": 1},
                     adapters={"dir": str(root)})
    engine = LocalEngine.from_config(config, progress=False)

    async def use() -> list:
        try:
            scores = await engine.classify("Text: good\nSentiment:", [" negative", " positive"], "good")
            assert abs(sum(scores.scores.values()) - 1) < 1e-5
            # A reload after another bad folder appears: still no crash, and the problem list is fresh.
            (_copy(good, root / "late") / MANIFEST).write_text("{")
            return await engine.reload_adapters()
        finally:
            await engine.close()

    reloaded = asyncio.run(use())
    assert set(engine.adapters) == {"good"}
    bad = {"truncated", "pickled", "only-bin", "garbage", "wrong-base", "outside"}
    assert {p.name for p in engine.problems} == bad | {"late"} == {p.name for p in reloaded}
    reasons = {p.name: p.reason for p in engine.problems}
    assert reasons["truncated"].startswith("cannot be loaded")
    assert "pickled weights" in reasons["pickled"] and "pickled weights" in reasons["only-bin"]
    assert not marker.exists()
