"""The fast engine without torch: numpy arrays, the compiled kernel and the native decode step.

On a CPU with the kernel, ``FastLlama`` spends its time in ``lb_decode_step`` (every layer of a decode
step or a short prefill in one call) and the output layer's kernel matmul; PyTorch only holds the arrays.
Importing torch costs ~2 s and ~200 MB, most of the bot's cold start and of its memory, so when a model
can take this path the engine runs it with numpy arrays instead: the same C code on the same weights
(memory-mapped GGUF blocks or float32 safetensors), the same adapter stacks (``LoraStacks``), the same slot
cache (``SlotCache``). Every prompt goes through the native step, however long (``FastLlama`` switches
to its Python layers past ``NATIVE_PREFILL_MAX_ROWS`` tokens). Results equal ``FastLlama``'s native path
up to the last bits of the RoPE tables (numpy's cos/sin against torch's) and of the final norm.

``load`` says why a model cannot take this path (``NativeUnsupported``); the caller then loads it the
torch way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from bot.engine import kernels
from bot.engine.decode_native import NativeDecode
from bot.engine.light_model import unsupported_config
from bot.engine.lora_stacks import Columns, LoraStacks, Selection
from bot.engine.slot_cache import Reservation, SlotCache
from bot.engine.weights import read_arrays


class NativeUnsupported(Exception):
    """This model or configuration needs the torch engine (the message says why)."""


def _widen(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) as float32 values, exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _small_pages() -> None:
    """Stop numpy from asking for transparent huge pages on large arrays (for this process). The slot
    cache is touched sparsely (a few rows of each layer's block), and with 2 MB pages one chat's cache
    was resident in full: measured on the bundled model, one 128-token chat peaked at 330 MB with them
    and 240 MB without."""
    core = getattr(np, "_core", None) or np.core
    setter = getattr(core.multiarray, "_set_madvise_hugepage", None)
    if setter is not None:
        setter(False)


def _threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class NativeLlama(LoraStacks):
    """A Llama-shaped model's weights for batched multi-adapter inference through ``lb_decode_step``;
    the interface of ``FastLlama`` (``add_adapter``, ``prefill``, ``decode``, ``new_cache``), numpy inside."""

    def __init__(self, cfg: Any, weights: dict[str, Any], lib: Any, *, max_context: int = 2048, threads: int = 0,
                 int8_activations: bool = False):
        """``weights``: float32 arrays or ``QuantWeight`` blocks by transformers' names; ``lib``: the
        compiled kernel (``kernels.load()``)."""
        reason = unsupported_config(cfg)
        if reason:
            raise NativeUnsupported(reason)
        _small_pages()
        self.kernel = lib
        self.threads = threads or _threads()
        self._read_model(cfg, weights, NativeUnsupported)
        self.max_context = min(max_context, self.max_context)
        self._rope(cfg)
        self._bf16_stacks = True
        self._init_stacks()
        self.native = NativeDecode(self, lib, int8=int8_activations)
        if self.native.why_not:
            raise NativeUnsupported(self.native.why_not)

    def _rope(self, cfg: Any) -> None:
        """cos/sin per position with transformers' default RoPE (float32 frequencies and angles, as it
        computes them); sin carries rotate_half's sign, as ``FastLlama._rope``."""
        rope = getattr(cfg, "rope_parameters", None) or {}
        base = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        dim = self.head_dim
        inv_freq = (1.0 / (base ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))).astype(np.float32)
        freqs = np.arange(self.max_context, dtype=np.float32)[:, None] * inv_freq[None, :]
        emb = np.concatenate((freqs, freqs), axis=-1)
        half = dim // 2
        sin = np.sin(emb)
        self._cos = np.ascontiguousarray(np.cos(emb), dtype=np.float32)
        self._sin = np.ascontiguousarray(np.concatenate((-sin[:, :half], sin[:, half:]), axis=-1), dtype=np.float32)

    # ------------------------------------------------------------------ arrays (LoraStacks, SlotCache)
    def _zeros(self, shape: tuple[int, ...]) -> np.ndarray:
        return np.zeros(shape, dtype=np.float32)

    def _copy(self, x: np.ndarray) -> np.ndarray:
        return x.copy()

    def _repeat_rows(self, x: np.ndarray, counts: list[int]) -> np.ndarray:
        return np.repeat(x, counts, axis=0)

    def _read_lora_file(self, path: Path) -> dict[str, np.ndarray]:
        return read_arrays(path, bf16_bits=True)   # bfloat16 as uint16 bits: see _lora_values

    # bfloat16 adapters (PEFT saves a bfloat16 model's adapters so) are stacked as their own bits, half
    # the memory of float32, and the kernel widens them exactly; one adapter that is not exactly bfloat16
    # turns every stack to float32 for good.
    def _lora_zeros(self, shape: tuple[int, ...]) -> np.ndarray:
        return np.zeros(shape, dtype=np.uint16 if self._bf16_stacks else np.float32)

    def _lora_values(self, xs: list[np.ndarray]) -> list[np.ndarray]:
        # xs: uint16 bfloat16 bits (views of the file, copied into the stacks as they are) or floats.
        xs = [x if x.dtype == np.uint16 else np.ascontiguousarray(x, dtype=np.float32) for x in xs]
        exact = all(x.dtype == np.uint16 or not (x.view(np.uint32) & 0xFFFF).any() for x in xs)
        if self._bf16_stacks and not exact:
            self._bf16_stacks = False
            for stack in self._stacks.values():
                stack.A, stack.B = (_widen(stack.A), _widen(stack.B))
        if not self._bf16_stacks:
            return [_widen(x) if x.dtype == np.uint16 else x for x in xs]
        return [x if x.dtype == np.uint16 else (x.view(np.uint32) >> 16).astype(np.uint16) for x in xs]

    def new_kv(self, rows: int, cols: int) -> np.ndarray:
        return np.zeros((self.n_layers, rows, 2, self.n_kv, cols, self.head_dim), dtype=np.float32)

    def copy_kv(self, view: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(view)

    def new_cache(self, max_rows: int, max_tokens: int = 0) -> SlotCache:
        return SlotCache(self, max_rows, self.max_context, max_tokens)

    # ------------------------------------------------------------------ the forward pass
    def _rows(self, w: Any, ids: list[int]) -> np.ndarray:
        """Rows ``ids`` of a float matrix or of quantised blocks (embedding lookups, label columns)."""
        index = np.asarray(ids, dtype=np.int64)
        if isinstance(w, kernels.QuantWeight):
            return w.dequantize(index)
        return np.ascontiguousarray(w[index], dtype=np.float32)

    def _logits(self, h: np.ndarray, columns: Columns | None, int8: bool = False) -> np.ndarray:
        # rms_norm as torch computes it in float32: x * rsqrt(mean(x^2) + eps) * w
        h = h * (1.0 / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + np.float32(self.eps))) * self.norm
        h = np.ascontiguousarray(h, dtype=np.float32)
        if columns is not None:
            return kernels.linear(h, self._rows(self.head, columns.ids), self.threads)
        if isinstance(self.head, kernels.QuantWeight):
            if int8:
                return kernels.linear_quant_int8(h, self.head, self.threads)
            return kernels.linear_quant(h, self.head, self.threads)
        return kernels.linear(h, self.head, self.threads)

    def prefill(self, prompts: list[list[int]], adapters: list[str | None],
                target: Reservation | Columns | None = None) -> np.ndarray:
        """Logits at each prompt's last position [B, V] (or [B, len(ids)] for ``Columns``); with a
        ``Reservation`` the keys/values are written into its slots (commit it afterwards).

        The prompts' tokens are the rows of one native step: a prompt's tokens share its slot at positions
        0, 1, ... (the step writes every row's key/value before any row attends, so attention is causal).
        Without a reservation the keys/values go to one scratch layer that every layer reuses."""
        lengths = [len(p) for p in prompts]
        sel = self._selection(adapters)
        sel = sel.per_token(lengths) if sel is not None else None
        res = target if isinstance(target, Reservation) else None
        h = self._rows(self.embed, [t for p in prompts for t in p])
        positions = [p for n in lengths for p in range(n)]
        first = res.start if res is not None else 0
        slots = [first + r for r, n in enumerate(lengths) for _ in range(n)]
        if res is not None:
            kv = res.cache.kv
        else:
            kv = np.empty((1, len(lengths), 2, self.n_kv, max(lengths), self.head_dim), dtype=np.float32)
        # Exact arithmetic for prompts whatever engine.int8_activations says (it is a decode-speed option).
        self.native.step(h, positions, kv, sel, self.threads, slots=slots, one_layer=res is None, int8=False)
        if res is not None:
            res.lengths = lengths
        last = np.cumsum(lengths) - 1
        return self._logits(h[last], target if isinstance(target, Columns) else None)

    def decode(self, cache: SlotCache, tokens: list[int], adapters: list[str | None]) -> np.ndarray:
        """One step for every row of ``cache`` (token i goes to row i); logits [n, V]."""
        n = cache.n
        assert len(tokens) == n == len(adapters)
        cache._ensure(n, max(cache.lens) + 1)
        h = self._rows(self.embed, tokens)
        sel: Selection | None = self._selection(adapters)
        self.native.step(h, cache.lens, cache.kv, sel, self.threads)
        for i in range(n):
            cache.lens[i] += 1
            cache.written[i] = max(cache.written[i], cache.lens[i])
        return self._logits(h, None, self.native.int8 and n <= 2)   # int8 as the step decides (decode_step.c)


def config_reason(config: Any) -> str | None:
    """Why the settings (a ``bot.config.Config``) ask for the torch engine; None when this one may run."""
    if os.environ.get("LORABOT_TORCH_ENGINE") or os.environ.get("LORABOT_PYTHON_STEP"):
        return "LORABOT_TORCH_ENGINE or LORABOT_PYTHON_STEP is set"
    if config.engine.backend not in ("auto", "fast"):
        return f"engine.backend = {config.engine.backend!r}"
    if not config.engine.cpu_kernel:
        return "engine.cpu_kernel = false"
    if config.model.dtype not in ("auto", "float32"):
        return f"model.dtype = {config.model.dtype!r} (this engine computes in float32)"
    gpu = Path("/proc/driver/nvidia/version").exists()   # what "auto" would pick, without importing torch
    if config.model.device == "cuda" or (config.model.device == "auto" and gpu):
        return "a CUDA device may be used"
    return None


def load(folder: Path, *, gguf: Path | None, max_context: int, threads: int = 0,
         int8_activations: bool = False) -> NativeLlama:
    """The model folder (and the GGUF it was converted from, whose quantised matrices replace the float
    ones) as a ``NativeLlama``; raises ``NativeUnsupported`` when it needs the torch engine."""
    from bot.engine.gguf import GGUFError, quantized_weights
    from bot.engine.light_model import read_config, unsupported_folder, weight_files

    reason = unsupported_folder(folder)
    if reason:
        raise NativeUnsupported(reason)
    lib = kernels.load()
    if lib is None:
        raise NativeUnsupported(f"no CPU kernel ({kernels.status().reason})")
    config = read_config(folder)
    weights: dict[str, Any] = {}
    for path in weight_files(folder):
        try:
            weights.update(read_arrays(path))
        except ValueError as exc:
            raise NativeUnsupported(str(exc)) from None
    if any(w.dtype != np.float32 for w in weights.values()):
        raise NativeUnsupported("the weights are not float32")
    if gguf is not None:
        try:
            found = quantized_weights(gguf, config)
        except (OSError, GGUFError) as exc:
            raise NativeUnsupported(f"{gguf}: {exc}") from None
        weights.update({k: w for k, w in found.items() if k in weights and tuple(weights[k].shape) == w.shape})
    return NativeLlama(config, weights, lib, max_context=max_context, threads=threads,
                       int8_activations=int8_activations)


__all__ = ["NativeLlama", "NativeUnsupported", "config_reason", "load"]
