"""Training checkpoints in safetensors + JSON only (never pickle), replaced atomically.

A checkpoint folder holds: lora.safetensors (trainable weights, fp32), optimizer.safetensors +
optimizer.json (AdamW moments and hyper-parameters), scheduler.json, rng.safetensors (each
process's torch RNG, so dropout continues identically) and state.json (step = the position in the
data order, histories, elapsed time, the config fingerprint).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

NAME = "checkpoint"
BEST = "best.safetensors"  # the LoRA weights of the best periodic evaluation (train.keep_best)


def optimizer_to_files(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state_dict into tensors (safetensors) and plain values (JSON)."""
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for idx, slots in state["state"].items():
        plain["state"][str(idx)] = {}
        for key, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                plain["state"][str(idx)][key] = value
    return tensors, plain


def optimizer_from_files(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in plain["state"].items()}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": plain["param_groups"]}


def save(run_dir: Path, *, lora: dict[str, torch.Tensor], optimizer: dict[str, Any], scheduler: dict[str, Any],
         rng: dict[str, torch.Tensor], state: dict[str, Any]) -> Path:
    """Write a checkpoint next to the current one, then swap it in (a crash keeps the previous one)."""
    final, tmp, old = run_dir / NAME, run_dir / f"{NAME}.tmp", run_dir / f"{NAME}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(lora, str(tmp / "lora.safetensors"))
    opt_tensors, opt_plain = optimizer_to_files(optimizer)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    _write_json(tmp / "optimizer.json", opt_plain)
    _write_json(tmp / "scheduler.json", scheduler)
    save_file(rng, str(tmp / "rng.safetensors"))
    _write_json(tmp / "state.json", state)  # last: its presence marks a complete checkpoint
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def find(run_dir: Path) -> Path | None:
    """The newest complete checkpoint (``.old`` is used if a crash came between the two renames)."""
    for name in (NAME, f"{NAME}.old"):
        if (run_dir / name / "state.json").is_file():
            return run_dir / name
    return None


def load(folder: Path) -> dict[str, Any]:
    return {
        "lora": load_file(str(folder / "lora.safetensors")),
        "optimizer": optimizer_from_files(load_file(str(folder / "optimizer.safetensors")),
                                          _read_json(folder / "optimizer.json")),
        "scheduler": _read_json(folder / "scheduler.json"),
        "rng": load_file(str(folder / "rng.safetensors")),
        "state": _read_json(folder / "state.json"),
    }


def remove(run_dir: Path) -> None:
    for name in (NAME, f"{NAME}.tmp", f"{NAME}.old"):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    (run_dir / BEST).unlink(missing_ok=True)


def save_best(run_dir: Path, lora: dict[str, torch.Tensor]) -> None:
    """Replace the best weights atomically: a crash leaves the previous best (or none), never half a file."""
    tmp = run_dir / f"{BEST}.tmp"
    save_file(lora, str(tmp))
    tmp.replace(run_dir / BEST)


def load_best(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / BEST))


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))
