"""Adapter folders: validated one by one; a bad folder is reported and skipped, never fatal."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bot.adapters import scan_adapters, shape_signature, validate_adapter
from bot.errors import AdapterError


@pytest.fixture
def base_shape(tiny_base: Path) -> str:
    from transformers import AutoConfig

    return shape_signature(AutoConfig.from_pretrained(tiny_base))


@pytest.fixture
def folder(tmp_path, tiny_adapters) -> Path:
    target = tmp_path / "adapters"
    shutil.copytree(tiny_adapters, target)
    return target


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_valid_adapters_are_found(folder, base_shape):
    found, problems = scan_adapters(folder, base_model="tiny", base_shape=base_shape)
    assert sorted(found) == ["ner", "qa", "sentiment", "story"] and problems == []
    assert found["sentiment"].labels == ("negative", "neutral", "positive")


@pytest.mark.parametrize(
    ("breakage", "reason"),
    [
        (lambda p: (p / "adapter_model.safetensors").unlink(), "adapter_model.safetensors is missing"),
        (lambda p: (p / "lorabot.json").unlink(), "lorabot.json is missing"),
        (lambda p: (p / "lorabot.json").write_text("{nope"), "not valid JSON"),
        (lambda p: (p / "adapter_model.bin").write_bytes(b"\x80\x04pickle"), "pickled weights"),
        (lambda p: edit_json(p / "lorabot.json", task="poetry"), "unknown task"),
        (lambda p: edit_json(p / "lorabot.json", format_version=99), "prompt format v99"),
        (lambda p: edit_json(p / "lorabot.json", base_shape="llama:1:2:3"), "does not match the loaded base model"),
        (lambda p: edit_json(p / "lorabot.json", labels=[]), "must list its labels"),
        (lambda p: edit_json(p / "adapter_config.json", modules_to_save=["lm_head"]), "modules_to_save"),
        (lambda p: edit_json(p / "adapter_config.json", peft_type="PREFIX_TUNING"), "peft_type must be LORA"),
        (lambda p: (p / "adapter_model.safetensors").write_bytes(b"\x01\x02"), "truncated"),
    ],
)
def test_broken_adapter_is_reported_and_others_still_load(folder, base_shape, breakage, reason):
    breakage(folder / "sentiment")
    found, problems = scan_adapters(folder, base_model="tiny", base_shape=base_shape)
    assert sorted(found) == ["ner", "qa", "story"]
    assert len(problems) == 1 and reason in problems[0].reason and problems[0].name == "sentiment"


def test_bad_names_and_links_outside_are_refused(folder, base_shape, tmp_path):
    shutil.copytree(folder / "qa", folder / "Bad Name")
    outside = tmp_path / "elsewhere"
    shutil.copytree(folder / "qa", outside)
    (folder / "linked").symlink_to(outside)
    found, problems = scan_adapters(folder, base_model="tiny", base_shape=base_shape)
    reasons = {p.name: p.reason for p in problems}
    assert "not a valid adapter name" in reasons["Bad Name"]
    assert "outside" in reasons["linked"]
    assert "linked" not in found
    with pytest.raises(AdapterError, match="valid adapter name"):
        validate_adapter(folder / ".." / "..")


def test_missing_folder_is_empty_not_an_error(tmp_path):
    assert scan_adapters(tmp_path / "none") == ({}, [])
