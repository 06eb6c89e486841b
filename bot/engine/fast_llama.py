"""Fast inference for a Llama-shaped base model with many LoRA adapters applied per row at once.

Used by ``bot.engine.scheduler.LocalEngine`` in place of transformers + PEFT's ``adapter_names`` (which
runs, in every layer and for every projection, one small forward per adapter present in the batch).
What it does differently, all of it exact up to floating-point summation order:

* the base weights are used where transformers loaded them (memory-mapped safetensors): nothing is
  copied, so memory stays that of the model plus the adapters;
* batched LoRA (the Punica / S-LoRA idea): per layer and projection group the A matrices of every
  loaded adapter are stacked (``[R_total, in]``) and so are the B matrices (``[R_total, out]``). A batch
  whose rows use different adapters computes ``x @ A_stack^T``, multiplies it by a per-row mask that
  keeps the row's own adapter's columns (times its scaling) and zeroes the rest, and adds
  ``that @ B_stack``: two matmuls per group whatever the mix, and exactly 0 for rows without an adapter.
  A batch that uses a single adapter only touches that adapter's slice;
* a slot KV cache: every row keeps its keys/values from column 0 (no left padding), decoding writes one
  column per row in place (no concatenation), a finished row's slot is refilled by moving the last row;
* on x86 CPUs, small-batch matmuls run on ``bot.engine.kernels`` (an AVX2 kernel built on first use)
  instead of the bundled BLAS, which is slow for a few rows on AMD CPUs; torch's matmul otherwise;
* grouped-query attention without copying K/V: the query heads that share a K/V head are laid out as
  extra query positions of that head;
* prefill computes the last layer's attention output and MLP only at each row's last position, and
  classification computes only the logits it needs; a short prefill (up to ``NATIVE_PREFILL_MAX_ROWS``
  tokens: a sentiment or NER message) is one native step whose rows are the prompts' tokens.

Greedy outputs equal those of transformers + PEFT (tests/test_engine_local.py checks it token for token).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bot.engine import kernels
from bot.engine.decode_native import NativeDecode
from bot.engine.weights import read_safetensors

GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gu": ("gate_proj", "up_proj"), "down": ("down_proj",),
}
MODULE_GROUP = {m: g for g, ms in GROUPS.items() for m in ms}
_KEY = re.compile(
    r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.([a-z_]+_proj)\.lora_([AB])(?:\.[A-Za-z0-9_-]+)?\.weight$"
)


def unsupported(model: Any) -> str | None:
    """Why ``model`` (a transformers model) cannot run on this path (None when it can)."""
    cfg = getattr(model, "config", None)
    if type(model).__name__ != "LlamaForCausalLM" or cfg is None:
        return f"{type(model).__name__} is not a plain LlamaForCausalLM"
    return unsupported_config(cfg)


def unsupported_config(cfg: Any) -> str | None:
    """Why a Llama config (transformers' or ``bot.engine.light_model``'s) cannot run on this path."""
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        return "the model has projection biases"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r} is not silu"
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        return f"RoPE type {kind!r} is not supported"
    if getattr(cfg, "pretraining_tp", 1) != 1:
        return "pretraining_tp != 1"
    return None


def rope_inv_freq(cfg: Any) -> torch.Tensor:
    """The default RoPE inverse frequencies, computed exactly as transformers computes them."""
    rope = getattr(cfg, "rope_parameters", None) or {}
    base = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))


@dataclass
class _Layer:
    ln1: torch.Tensor
    ln2: torch.Tensor
    wqkv: tuple[torch.Tensor, ...]   # q, k, v (projection group "qkv")
    wo: tuple[torch.Tensor, ...]
    wgu: tuple[torch.Tensor, ...]    # gate, up
    wdown: tuple[torch.Tensor, ...]


@dataclass
class _Adapter:
    name: str
    ranges: dict[str, tuple[int, int]]       # group -> [lo, hi) rows in that group's stacks
    scaling: dict[str, list[float]]          # group -> one scaling per stacked row (per module)
    nbytes: int = 0


@dataclass
class _Stack:
    """One projection group's LoRA weights for all layers: A [L, cap, in] and B transposed, [L, out, cap]
    (both keep the reduction dimension contiguous, the layout the small-batch kernel streams)."""

    A: torch.Tensor
    B: torch.Tensor
    scale: torch.Tensor        # [cap] scaling of each stacked row
    used: int = 0


class _Sel:
    """Which LoRA rows each token row uses, per group: None, or (lo, hi, multiplier [1 or N, hi-lo])."""

    def __init__(self, groups: dict[str, tuple[int, int, torch.Tensor] | None], mixed: bool):
        self.groups = groups
        self.mixed = mixed

    def rows(self, index: torch.Tensor) -> _Sel:
        if not self.mixed:
            return self
        return _Sel({g: None if s is None else (s[0], s[1], s[2][index]) for g, s in self.groups.items()}, True)

    def per_token(self, lengths: torch.Tensor) -> _Sel:
        """Row i's selection repeated for each of its ``lengths[i]`` tokens (packed prompts)."""
        if not self.mixed:
            return self
        return _Sel({g: None if s is None else (s[0], s[1], s[2].repeat_interleave(lengths, 0))
                     for g, s in self.groups.items()}, True)


@dataclass
class Columns:
    """Ask a prefill for the logits of these vocabulary ids only (classification)."""

    ids: list[int]


@dataclass
class Reservation:
    """Slots [start, start + rows) of a SlotCache that a prefill writes into; committed once it succeeds."""

    cache: SlotCache
    start: int
    rows: int
    width: int
    lengths: list[int] = field(default_factory=list)


class SlotCache:
    """Keys/values of the running batch: ``kv[layer, row, k|v, kv_head, column, head_dim]``.

    Row ``i`` holds its tokens in columns ``0 .. lens[i] - 1``; rows ``0 .. n - 1`` are in use. Columns
    past a row's length may hold stale (finite) values: attention masks them, and ``written`` tracks how
    far each slot was written so that stale values from an earlier occupant are cleared on reuse.
    The block is sized from what the live rows need, not grown from the largest shape it ever had; with
    ``max_tokens`` it is never allocated larger than that (rows x columns).
    """

    def __init__(self, fast: FastLlama, max_rows: int, max_len: int, max_tokens: int = 0):
        self.fast = fast
        self.max_rows = max_rows
        self.max_len = max_len
        self.max_tokens = max_tokens
        self.kv: torch.Tensor | None = None
        self.n = 0
        self.lens: list[int] = []
        self.written: list[int] = []

    @property
    def capacity(self) -> tuple[int, int]:
        return (0, 0) if self.kv is None else (self.kv.shape[1], self.kv.shape[4])

    @torch.inference_mode()
    def _ensure(self, rows: int, cols: int) -> None:
        cap_rows, cap_cols = self.capacity
        if rows <= cap_rows and cols <= cap_cols:
            return
        f = self.fast
        width = max(self.written[: self.n], default=0)
        # Sized from the live rows' needs, so a long row that has left does not keep every row wide.
        need_cols = max(cols, width)
        new_cols = max(need_cols, min(self.max_len, -(-need_cols // 128) * 128))
        new_rows = max(rows, min(max(self.max_rows, rows), max(4, 2 * cap_rows)))
        if self.max_tokens and new_rows * new_cols > self.max_tokens:
            new_rows = max(rows, self.max_tokens // new_cols)
            if new_rows * new_cols > self.max_tokens:
                new_cols = max(need_cols, self.max_tokens // new_rows)
        kv = torch.zeros((f.n_layers, new_rows, 2, f.n_kv, new_cols, f.head_dim), dtype=f.dtype, device=f.device)
        if self.kv is not None and self.n:
            kv[:, : self.n, :, :, :width] = self.kv[:, : self.n, :, :, :width]
        self.kv = kv
        self.written = self.written[: self.n] + [0] * (new_rows - self.n)

    @torch.inference_mode()
    def reserve(self, rows: int, width: int) -> Reservation:
        self._ensure(self.n + rows, width)
        assert self.kv is not None
        for s in range(self.n, self.n + rows):
            if self.written[s] > width:
                self.kv[:, s, :, :, width:self.written[s]].zero_()
            self.written[s] = width
        return Reservation(self, self.n, rows, width)

    def commit(self, res: Reservation) -> None:
        if res.start != self.n:
            raise RuntimeError("reservations must be committed in order")
        self.lens += res.lengths
        self.n += res.rows

    @torch.inference_mode()
    def retire(self, keep: list[int]) -> list[int]:
        """Keep rows ``keep`` (in that order of preference); returns the new order as old indices."""
        n_new = len(keep)
        kept = set(keep)
        order: list[int] = [i for i in range(n_new)]
        holes = [i for i in range(n_new) if i not in kept]
        movers = [i for i in keep if i >= n_new]
        assert self.kv is not None or not holes
        for hole, mover in zip(holes, movers, strict=True):
            assert self.kv is not None
            w = self.written[mover]
            self.kv[:, hole, :, :, :w] = self.kv[:, mover, :, :, :w]
            if self.written[hole] > w:
                self.kv[:, hole, :, :, w:self.written[hole]].zero_()
            self.written[hole] = w
            order[hole] = mover
        self.lens = [self.lens[o] for o in order]
        self.n = n_new
        self._shrink_columns()
        return order

    @torch.inference_mode()
    def _shrink_columns(self) -> None:
        """Once the widest rows have left, give back the columns only they used (at least half the
        block), so a finished long prompt does not keep its memory for ever."""
        if self.kv is None or not self.n:
            return
        width = max(self.written[: self.n])
        cols = -(-(width + 1) // 128) * 128   # room for the next step without growing again
        if self.kv.shape[4] <= 2 * cols:
            return
        self.kv = self.kv[:, :, :, :, :cols].clone()
        self.written = [min(w, cols) for w in self.written]


class FastLlama:
    """A LlamaForCausalLM's weights prepared for batched multi-adapter inference (see module docstring)."""

    KERNEL_MAX_ROWS = 64  # above this many rows the bundled BLAS is as fast (measured)
    # Prompts' tokens up to which a prefill is one native step. Measured on the bundled model, 2 threads,
    # with an adapter: 25 tokens 66 ms vs 84 in the Python layers, 96 tokens 184 vs 198, 4 x 25 186 vs 201,
    # but 150 tokens 339 vs 327 and 400 970 vs 878: past ~120 rows the step's plain attention loop (every
    # query row against every earlier key) costs more than the Python layers' overhead it saves.
    NATIVE_PREFILL_MAX_ROWS = 128

    def __init__(self, cfg: Any, weights: dict[str, torch.Tensor], *, max_context: int = 2048,
                 cpu_kernel: bool = True, inv_freq: torch.Tensor | None = None, attention_scaling: float = 1.0,
                 native_step: bool = True, int8_activations: bool = False):
        """``cfg``: a Llama config; ``weights``: its tensors by transformers' names ("model.layers.0.
        self_attn.q_proj.weight", ...; ``lm_head.weight`` may be absent when tied to the embeddings).
        ``inv_freq``: RoPE frequencies (default: computed from ``cfg``). ``native_step``: decode with
        ``bot.engine.decode_native`` where the kernel is built (False: the Python layers, for comparison).
        ``int8_activations``: the native step multiplies the quantised base weights with int8-rounded
        activations (approximate, opt-in; ``engine.int8_activations``)."""
        reason = unsupported_config(cfg)
        if reason:
            raise ValueError(reason)
        self.config = cfg
        self.n_layers = cfg.num_hidden_layers
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.group = self.n_heads // self.n_kv
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.hidden = cfg.hidden_size
        self.inter = cfg.intermediate_size
        self.eps = float(cfg.rms_norm_eps)
        self.scale = self.head_dim ** -0.5
        try:
            self.embed = weights["model.embed_tokens.weight"]
            self.head = weights.get("lm_head.weight", self.embed)
            self.norm = weights["model.norm.weight"]
            self.layers = [self._weights(weights, f"model.layers.{i}.") for i in range(self.n_layers)]
        except KeyError as exc:
            raise ValueError(f"the weights have no tensor {exc.args[0]}") from None
        self.dtype = self.norm.dtype    # the embeddings may be quantised blocks (bot.engine.gguf)
        self.device = self.norm.device
        self.q_dim = self.n_heads * self.head_dim
        self.kv_dim = self.n_kv * self.head_dim
        self.out_dims = {
            "q_proj": (0, self.q_dim), "k_proj": (self.q_dim, self.q_dim + self.kv_dim),
            "v_proj": (self.q_dim + self.kv_dim, self.q_dim + 2 * self.kv_dim), "o_proj": (0, self.hidden),
            "gate_proj": (0, self.inter), "up_proj": (self.inter, 2 * self.inter), "down_proj": (0, self.hidden),
        }
        self.in_dims = {m: (self.inter if m == "down_proj" else self.q_dim if m == "o_proj" else self.hidden)
                        for m in MODULE_GROUP}
        self.max_context = min(max_context, cfg.max_position_embeddings)
        self._rope(rope_inv_freq(cfg) if inv_freq is None else inv_freq, attention_scaling)
        group_in = {"qkv": self.hidden, "o": self.q_dim, "gu": self.hidden, "down": self.inter}
        group_out = {"qkv": self.q_dim + 2 * self.kv_dim, "o": self.hidden, "gu": 2 * self.inter, "down": self.hidden}
        self._stacks = {g: self._empty_stack(group_in[g], group_out[g]) for g in GROUPS}
        self.adapters: dict[str, _Adapter] = {}
        self._sel_cache: dict[tuple[str | None, ...], _Sel | None] = {}
        use_kernel = cpu_kernel and self.device.type == "cpu" and self.dtype == torch.float32
        self.kernel = kernels.load() if use_kernel else None
        self.native: NativeDecode | None = None
        if self.kernel is not None and native_step and not os.environ.get("LORABOT_PYTHON_STEP"):
            native = NativeDecode(self, self.kernel, int8=int8_activations)
            self.native = None if native.why_not else native

    @classmethod
    def from_model(cls, model: Any, *, max_context: int = 2048, cpu_kernel: bool = True,
                   int8_activations: bool = False) -> FastLlama:
        """From a loaded transformers LlamaForCausalLM, using its tensors where they are."""
        reason = unsupported(model)
        if reason:
            raise ValueError(reason)
        rotary = model.model.rotary_emb
        return cls(model.config, model.state_dict(), max_context=max_context, cpu_kernel=cpu_kernel,
                   int8_activations=int8_activations, inv_freq=rotary.inv_freq,
                   attention_scaling=getattr(rotary, "attention_scaling", 1.0))

    # ------------------------------------------------------------------ weights
    @staticmethod
    def _weights(w: dict[str, torch.Tensor], prefix: str) -> _Layer:
        # Not fused into one q/k/v matrix: a fused copy would add ~280 MB (the originals stay mapped),
        # and at these sizes the two extra matmul calls per group cost well under a millisecond.
        attn, mlp = prefix + "self_attn.", prefix + "mlp."
        return _Layer(
            ln1=w[prefix + "input_layernorm.weight"], ln2=w[prefix + "post_attention_layernorm.weight"],
            wqkv=(w[attn + "q_proj.weight"], w[attn + "k_proj.weight"], w[attn + "v_proj.weight"]),
            wo=(w[attn + "o_proj.weight"],), wgu=(w[mlp + "gate_proj.weight"], w[mlp + "up_proj.weight"]),
            wdown=(w[mlp + "down_proj.weight"],),
        )

    def _rope(self, inv_freq: torch.Tensor, scaling: float) -> None:
        """cos/sin per position, computed as transformers does; sin carries rotate_half's sign."""
        inv_freq = inv_freq.to(device=self.device, dtype=torch.float32)
        positions = torch.arange(self.max_context, device=self.device, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * scaling).to(self.dtype)
        sin = (emb.sin() * scaling).to(self.dtype)
        half = self.head_dim // 2
        # rotate_half(x) * sin == roll(x, half) * [-sin_first_half, sin_second_half], exactly.
        self._cos = cos
        self._sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)

    def _empty_stack(self, d_in: int, d_out: int) -> _Stack:
        z = torch.zeros
        return _Stack(A=z((self.n_layers, 0, d_in), dtype=self.dtype, device=self.device),
                      B=z((self.n_layers, d_out, 0), dtype=self.dtype, device=self.device),
                      scale=z((0,), dtype=self.dtype, device=self.device))

    # ------------------------------------------------------------------ adapters
    def add_adapter(self, name: str, path: Path) -> None:
        """Load a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) and stack it."""
        if name in self.adapters:
            self.remove_adapter(name)
        config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
        for key, bad in (("use_dora", True), ("fan_in_fan_out", True)):
            if config.get(key) == bad:
                raise ValueError(f"{key} adapters are not supported by the fast engine (use backend='peft')")
        if config.get("bias", "none") != "none" or config.get("rank_pattern") or config.get("alpha_pattern") or \
                config.get("layers_to_transform") is not None:
            raise ValueError("LoRA with bias, rank/alpha patterns or layers_to_transform is not supported by "
                             "the fast engine (use backend='peft')")
        r, alpha = int(config["r"]), float(config.get("lora_alpha", config["r"]))
        scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        tensors = read_safetensors(path / "adapter_model.safetensors")
        weights: dict[tuple[int, str, str], torch.Tensor] = {}
        for key, value in tensors.items():
            m = _KEY.search(key)
            if m is None or m.group(2) not in MODULE_GROUP:
                raise ValueError(f"tensor {key} is not a LoRA weight of a Llama projection")
            weights[(int(m.group(1)), m.group(2), m.group(3))] = value
        modules = sorted({k[1] for k in weights}, key=list(MODULE_GROUP).index)
        for layer in range(self.n_layers):
            for mod in modules:
                a, b = weights.get((layer, mod, "A")), weights.get((layer, mod, "B"))
                if a is None or b is None:
                    raise ValueError(f"layer {layer} {mod}: lora_A/lora_B missing (partial adapters are not "
                                     "supported by the fast engine)")
                rank = a.shape[0]
                if a.shape != (rank, self.in_dims[mod]) or b.shape != (self.out_dims[mod][1] - self.out_dims[mod][0],
                                                                       rank):
                    raise ValueError(f"layer {layer} {mod}: LoRA shapes {tuple(a.shape)}/{tuple(b.shape)} do not "
                                     "fit the base model")
        if len(weights) != 2 * self.n_layers * len(modules):
            raise ValueError("the adapter has LoRA weights for layers the base model does not have")
        ranges: dict[str, tuple[int, int]] = {}
        scales: dict[str, list[float]] = {}
        nbytes = 0
        for g, members in GROUPS.items():
            present = [m for m in members if m in modules]
            stack = self._stacks[g]
            ranks = [weights[(0, m, "A")].shape[0] for m in present]
            total = sum(ranks)
            lo = stack.used
            ranges[g], scales[g] = (lo, lo + total), [scaling] * total
            if not total:
                continue
            self._grow(stack, lo + total)
            row = lo
            for m, rank in zip(present, ranks, strict=True):
                # Copied straight from the file mapping into place. The B file layout [out, r] is already
                # the stack's (transposed) one; the other modules' output rows in these columns stay zero.
                out_lo, out_hi = self.out_dims[m]
                for i in range(self.n_layers):
                    stack.A[i, row:row + rank].copy_(weights[(i, m, "A")])
                    stack.B[i, out_lo:out_hi, row:row + rank].copy_(weights[(i, m, "B")])
                row += rank
            stack.scale[lo:lo + total] = scaling
            stack.used = lo + total
            nbytes += self.n_layers * total * (stack.A.shape[2] + stack.B.shape[1]) * stack.A.element_size()
        self.adapters[name] = _Adapter(name, ranges, scales, nbytes)
        self._sel_cache.clear()

    def _grow(self, stack: _Stack, need: int) -> None:
        cap = stack.A.shape[1]
        if need <= cap:
            return
        new = max(need, 2 * cap)
        A = torch.zeros((stack.A.shape[0], new, stack.A.shape[2]), dtype=self.dtype, device=self.device)
        A[:, :stack.used] = stack.A[:, :stack.used]
        B = torch.zeros((stack.B.shape[0], stack.B.shape[1], new), dtype=self.dtype, device=self.device)
        B[:, :, :stack.used] = stack.B[:, :, :stack.used]
        stack.A, stack.B = A, B
        scale = torch.zeros((new,), dtype=stack.scale.dtype, device=stack.scale.device)
        scale[:stack.used] = stack.scale[:stack.used]
        stack.scale = scale

    def remove_adapter(self, name: str) -> None:
        gone = self.adapters.pop(name)
        for g, (lo, hi) in gone.ranges.items():
            width = hi - lo
            if not width:
                continue
            stack = self._stacks[g]
            tail, end = slice(hi, stack.used), stack.used - width
            stack.A[:, lo:end] = stack.A[:, tail].clone()
            stack.A[:, end:stack.used] = 0
            stack.B[:, :, lo:end] = stack.B[:, :, tail].clone()
            stack.B[:, :, end:stack.used] = 0
            stack.scale[lo:stack.used - width] = stack.scale[tail].clone()
            stack.used -= width
            for other in self.adapters.values():
                a, b = other.ranges[g]
                if a >= hi:
                    other.ranges[g] = (a - width, b - width)
        self._sel_cache.clear()

    def adapter_bytes(self, name: str) -> int:
        return self.adapters[name].nbytes

    # ------------------------------------------------------------------ row -> adapter selection
    def _selection(self, adapters: list[str | None]) -> _Sel | None:
        key = tuple(adapters)
        if key not in self._sel_cache:
            if len(self._sel_cache) > 16:
                self._sel_cache.clear()
            self._sel_cache[key] = self._build_selection(adapters)
        return self._sel_cache[key]

    def _build_selection(self, adapters: list[str | None]) -> _Sel | None:
        present = sorted({a for a in adapters if a is not None})
        if not present:
            return None
        groups: dict[str, tuple[int, int, torch.Tensor] | None] = {}
        mixed = len(present) > 1 or None in adapters
        for g in GROUPS:
            spans = [self.adapters[a].ranges[g] for a in present if self.adapters[a].ranges[g][1] >
                     self.adapters[a].ranges[g][0]]
            if not spans:
                groups[g] = None
                continue
            lo, hi = min(s[0] for s in spans), max(s[1] for s in spans)
            scale = self._stacks[g].scale
            if not mixed:
                groups[g] = (lo, hi, scale[lo:hi].unsqueeze(0))
                continue
            mult = torch.zeros((len(adapters), hi - lo), dtype=self.dtype, device=self.device)
            for i, a in enumerate(adapters):
                if a is not None:
                    a_lo, a_hi = self.adapters[a].ranges[g]
                    mult[i, a_lo - lo:a_hi - lo] = scale[a_lo:a_hi]
            groups[g] = (lo, hi, mult)
        return _Sel(groups, bool(mixed))

    # ------------------------------------------------------------------ the forward pass
    def _mm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x @ w.T"""
        if isinstance(w, kernels.QuantWeight):  # only handed over when the kernel is built
            return kernels.linear_quant(x if x.stride(1) == 1 else x.contiguous(), w, torch.get_num_threads())
        if self.kernel is not None and x.shape[0] <= self.KERNEL_MAX_ROWS and kernels.usable(x, w):
            return kernels.linear(x, w, torch.get_num_threads())
        return F.linear(x, w)

    def _proj(self, x: torch.Tensor, ws: tuple[torch.Tensor, ...], layer: int, group: str,
              sel: _Sel | None) -> torch.Tensor:
        out = self._mm(x, ws[0]) if len(ws) == 1 else torch.cat([self._mm(x, w) for w in ws], dim=-1)
        if sel is None:
            return out
        s = sel.groups[group]
        if s is None:
            return out
        lo, hi, mult = s
        stack = self._stacks[group]
        a = self._mm(x, stack.A[layer, lo:hi])
        a.mul_(mult)
        bt = stack.B[layer, :, lo:hi]
        if self.kernel is not None and a.shape[0] <= self.KERNEL_MAX_ROWS and kernels.usable(a, bt):
            kernels.linear(a, bt, torch.get_num_threads(), out=out)
        else:
            out.addmm_(a, bt.t())
        return out

    def _run_layers(self, x: torch.Tensor, positions: torch.Tensor, sel: _Sel | None, attend: Any,
                    last: torch.Tensor | None = None) -> torch.Tensor:
        """x [N, D] -> hidden states after the last layer ([len(last), D] when ``last`` picks rows)."""
        cos = self._cos[positions].unsqueeze(1)
        sin = self._sin[positions].unsqueeze(1)
        nq, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        half = hd // 2
        qk_dim = self.q_dim + self.kv_dim
        n_layers = self.n_layers
        for i, lw in enumerate(self.layers):
            h = F.rms_norm(x, (self.hidden,), lw.ln1, self.eps)
            qkv = self._proj(h, lw.wqkv, i, "qkv", sel)
            qk = qkv[:, :qk_dim].view(-1, nq + nkv, hd)
            qk = qk * cos + qk.roll(half, -1) * sin
            q, k = qk[:, :nq], qk[:, nq:]
            v = qkv[:, qk_dim:].view(-1, nkv, hd)
            final = last is not None and i == n_layers - 1
            o = attend(i, q, k, v, final)
            if final:
                assert last is not None
                x = x[last]
                sel = sel.rows(last) if sel is not None else None
            x = x + self._proj(o, lw.wo, i, "o", sel)
            h = F.rms_norm(x, (self.hidden,), lw.ln2, self.eps)
            gu = self._proj(h, lw.wgu, i, "gu", sel)
            act = F.silu(gu[:, :self.inter]) * gu[:, self.inter:]
            x = x + self._proj(act, lw.wdown, i, "down", sel)
        return x

    def _logits(self, h: torch.Tensor, columns: Columns | None, int8: bool = False) -> torch.Tensor:
        h = F.rms_norm(h, (self.hidden,), self.norm, self.eps)
        if columns is None:
            if int8 and isinstance(self.head, kernels.QuantWeight):
                return kernels.linear_quant_int8(h, self.head, torch.get_num_threads())
            return self._mm(h, self.head)
        return self._mm(h, self._rows(self.head, torch.tensor(columns.ids, device=self.device)))

    @staticmethod
    def _rows(w: Any, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of a float matrix or of quantised blocks (embedding lookups, label columns)."""
        return w.dequantize(ids) if isinstance(w, kernels.QuantWeight) else F.embedding(ids, w)

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], adapters: list[str | None],
                target: Reservation | Columns | None = None) -> torch.Tensor:
        """Logits at each prompt's last position [B, V] (or [B, len(ids)] for ``Columns``).

        With a ``Reservation`` the keys/values are written into its slots (commit it afterwards).
        """
        lengths = [len(p) for p in prompts]
        ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=self.device)
        sel = self._selection(adapters)
        sel = sel.per_token(torch.tensor(lengths, device=self.device)) if sel is not None else None
        res = target if isinstance(target, Reservation) else None
        x = self._rows(self.embed, ids)
        last = torch.cumsum(torch.tensor(lengths, device=self.device), 0) - 1   # each prompt's last packed row
        if (self.native is not None and len(ids) <= self.NATIVE_PREFILL_MAX_ROWS
                and (res is None or (res.cache.kv is not None and res.cache.kv.is_contiguous()))):
            h = self._native_prefill(x, lengths, sel, res)[last]
        else:
            h = self._python_prefill(x, lengths, sel, res, last)
        if res is not None:
            res.lengths = lengths
        return self._logits(h, target if isinstance(target, Columns) else None)

    def _python_prefill(self, x: torch.Tensor, lengths: list[int], sel: _Sel | None, res: Reservation | None,
                        last: torch.Tensor) -> torch.Tensor:
        # The prompts are packed (no padding) through the linear layers, which cost nearly everything;
        # only attention sees them padded to the longest, [rows, width], where masks are simple.
        rows, width = len(lengths), max(lengths)
        lens = torch.tensor(lengths, device=self.device)
        positions = torch.cat([torch.arange(n, device=self.device) for n in lengths])
        padded_at = positions + torch.arange(rows, device=self.device).repeat_interleave(lens) * width
        cols = torch.arange(width, device=self.device)
        causal = cols[None, :] <= cols[:, None]                       # [T, T]
        valid = cols[None, :] < lens[:, None]                         # [B, T]
        mask = (causal[None] & valid[:, None, :]).repeat_interleave(self.group, dim=1).unsqueeze(1)
        last_mask = valid[:, None, None, :]                           # [B, 1, 1, T]
        kv = res.cache.kv if res is not None else None
        nkv, g, hd = self.n_kv, self.group, self.head_dim

        def pad(t: torch.Tensor) -> torch.Tensor:
            out = t.new_zeros((rows * width, *t.shape[1:]))
            out[padded_at] = t
            return out

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, final: bool) -> torch.Tensor:
            k4 = pad(k).view(rows, width, nkv, hd).transpose(1, 2)
            v4 = pad(v).view(rows, width, nkv, hd).transpose(1, 2)
            if kv is not None:
                assert res is not None
                kv[layer, res.start:res.start + rows, 0, :, :width] = k4
                kv[layer, res.start:res.start + rows, 1, :, :width] = v4
            if final:
                q4 = q[last].view(rows, nkv, g, hd)
                out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=last_mask, scale=self.scale)
                return out.reshape(rows, -1)
            q4 = pad(q).view(rows, width, nkv, g, hd).permute(0, 2, 1, 3, 4).reshape(rows, nkv, width * g, hd)
            out = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask, scale=self.scale)
            return out.view(rows, nkv, width, g, hd).permute(0, 2, 1, 3, 4).reshape(rows * width, -1)[padded_at]

        return self._run_layers(x, positions, sel, attend, last=last)

    def _native_prefill(self, x: torch.Tensor, lengths: list[int], sel: _Sel | None,
                        res: Reservation | None) -> torch.Tensor:
        """The prompts' tokens as rows of one native step: a prompt's tokens share its slot at positions
        0, 1, ... (``lb_decode_step`` writes every row's key/value before any row attends, so attention is
        causal). Without a reservation the keys/values go to one scratch layer that every layer reuses."""
        assert self.native is not None
        h = x.contiguous()
        positions = [p for n in lengths for p in range(n)]
        first = res.start if res is not None else 0
        slots = [first + r for r, n in enumerate(lengths) for _ in range(n)]
        if res is not None:
            assert res.cache.kv is not None
            kv = res.cache.kv
        else:
            kv = torch.empty((1, len(lengths), 2, self.n_kv, max(lengths), self.head_dim), dtype=self.dtype)
        # Exact arithmetic for prompts whatever engine.int8_activations says (it is a decode-speed option).
        self.native.step(h, positions, kv, sel, torch.get_num_threads(), slots=slots, one_layer=res is None,
                         int8=False)
        return h

    @torch.inference_mode()
    def decode(self, cache: SlotCache, tokens: list[int], adapters: list[str | None]) -> torch.Tensor:
        """One step for every row of ``cache`` (token i goes to row i); logits [n, V]."""
        n = cache.n
        assert len(tokens) == n == len(adapters)
        cache._ensure(n, max(cache.lens) + 1)
        assert cache.kv is not None
        lens = torch.tensor(cache.lens, device=self.device)
        width = max(cache.lens) + 1
        rows = torch.arange(n, device=self.device)
        mask = (torch.arange(width, device=self.device)[None, :] <= lens[:, None])[:, None, None, :]
        kv = cache.kv
        nkv, g, hd = self.n_kv, self.group, self.head_dim

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, final: bool) -> torch.Tensor:
            kvl = kv[layer]
            kvl[rows, :, :, lens] = torch.stack((k, v), dim=1)
            out = F.scaled_dot_product_attention(
                q.reshape(n, nkv, g, hd), kvl[:n, 0, :, :width], kvl[:n, 1, :, :width], attn_mask=mask,
                scale=self.scale,
            )
            return out.reshape(n, -1)

        x = self._rows(self.embed, torch.tensor(tokens, device=self.device))
        if self.native is not None and kv.is_contiguous():
            h = x.contiguous()
            self.native.step(h, cache.lens, kv, self._selection(adapters), torch.get_num_threads())
            int8 = self.native.int8 and n <= 2   # as the step decides (decode_step.c)
        else:
            int8 = False
            h = self._run_layers(x, lens, self._selection(adapters), attend)
        for i in range(n):
            cache.lens[i] += 1
            cache.written[i] = max(cache.written[i], cache.lens[i])
        return self._logits(h, None, int8)

    def new_cache(self, max_rows: int, max_tokens: int = 0) -> SlotCache:
        return SlotCache(self, max_rows, self.max_context, max_tokens)
