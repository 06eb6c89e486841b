"""Every loaded LoRA adapter stacked per projection group, and which stacked rows each batch row uses.

Shared by the two fast engines: ``FastLlama`` (torch tensors, any device) and ``NativeLlama`` (numpy
arrays, no torch). Per layer and projection group the A matrices of every loaded adapter are stacked
(``[R_total, in]``) and so are the B matrices (``[R_total, out]``, kept transposed); a batch whose rows use
different adapters multiplies ``x @ A_stack^T`` by a per-row mask that keeps the row's own adapter's
columns (times its scaling) and zeroes the rest. The array type comes from the engine through its
hooks (``_zeros``, ``_copy``, ``_repeat_rows``, ``_read_lora_file``, and for the stacks' own element type
``_lora_zeros``/``_lora_values``); the slicing used here means the same for torch tensors and numpy arrays.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gu": ("gate_proj", "up_proj"), "down": ("down_proj",),
}
MODULE_GROUP = {m: g for g, ms in GROUPS.items() for m in ms}
_KEY = re.compile(
    r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.([a-z_]+_proj)\.lora_([AB])(?:\.[A-Za-z0-9_-]+)?\.weight$"
)


@dataclass
class Layer:
    ln1: Any
    ln2: Any
    wqkv: tuple[Any, ...]   # q, k, v (projection group "qkv")
    wo: tuple[Any, ...]
    wgu: tuple[Any, ...]    # gate, up
    wdown: tuple[Any, ...]

    @staticmethod
    def from_weights(w: dict[str, Any], prefix: str) -> Layer:
        # Not fused into one q/k/v matrix: a fused copy would add ~280 MB (the originals stay mapped),
        # and at these sizes the two extra matmul calls per group cost well under a millisecond.
        attn, mlp = prefix + "self_attn.", prefix + "mlp."
        return Layer(
            ln1=w[prefix + "input_layernorm.weight"], ln2=w[prefix + "post_attention_layernorm.weight"],
            wqkv=(w[attn + "q_proj.weight"], w[attn + "k_proj.weight"], w[attn + "v_proj.weight"]),
            wo=(w[attn + "o_proj.weight"],), wgu=(w[mlp + "gate_proj.weight"], w[mlp + "up_proj.weight"]),
            wdown=(w[mlp + "down_proj.weight"],),
        )


@dataclass
class Columns:
    """Ask a prefill for the logits of these vocabulary ids only (classification)."""

    ids: list[int]


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

    A: Any
    B: Any
    scale: Any        # [cap] scaling of each stacked row
    used: int = 0


class Selection:
    """Which LoRA rows each token row uses, per group: None, or (lo, hi, multiplier [1 or N, hi-lo])."""

    def __init__(self, groups: dict[str, tuple[int, int, Any] | None], mixed: bool,
                 repeat_rows: Callable[[Any, list[int]], Any]):
        self.groups = groups
        self.mixed = mixed
        self._repeat = repeat_rows

    def rows(self, index: Any) -> Selection:
        if not self.mixed:
            return self
        return Selection({g: None if s is None else (s[0], s[1], s[2][index]) for g, s in self.groups.items()}, True,
                    self._repeat)

    def per_token(self, lengths: list[int]) -> Selection:
        """Row i's selection repeated for each of its ``lengths[i]`` tokens (packed prompts)."""
        if not self.mixed:
            return self
        return Selection({g: None if s is None else (s[0], s[1], self._repeat(s[2], lengths))
                     for g, s in self.groups.items()}, True, self._repeat)


class LoraStacks:
    """A Llama model's shape and weights, and the adapters stacked on it (mixed into both fast engines).
    The engine calls ``_read_model``, then ``_init_stacks`` once its array hooks work."""

    def _read_model(self, cfg: Any, weights: dict[str, Any], error: type[Exception]) -> None:
        """The shape from a Llama config; the weights by transformers' names ("model.layers.0.self_attn.
        q_proj.weight", ...; ``lm_head.weight`` may be absent when tied to the embeddings), ``error`` for
        a missing one. Per module: ``in_dims`` its input size, ``out_dims`` its output rows [lo, hi) in
        its group's output."""
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
        self.q_dim = self.n_heads * self.head_dim
        self.kv_dim = self.n_kv * self.head_dim
        self.max_context = cfg.max_position_embeddings
        try:
            self.embed = weights["model.embed_tokens.weight"]
            self.head = weights.get("lm_head.weight", self.embed)
            self.norm = weights["model.norm.weight"]
            self.layers = [Layer.from_weights(weights, f"model.layers.{i}.") for i in range(self.n_layers)]
        except KeyError as exc:
            raise error(f"the weights have no tensor {exc.args[0]}") from None
        self.out_dims = {
            "q_proj": (0, self.q_dim), "k_proj": (self.q_dim, self.q_dim + self.kv_dim),
            "v_proj": (self.q_dim + self.kv_dim, self.q_dim + 2 * self.kv_dim), "o_proj": (0, self.hidden),
            "gate_proj": (0, self.inter), "up_proj": (self.inter, 2 * self.inter), "down_proj": (0, self.hidden),
        }
        self.in_dims = {m: (self.inter if m == "down_proj" else self.q_dim if m == "o_proj" else self.hidden)
                        for m in MODULE_GROUP}

    def _init_stacks(self) -> None:
        group_in = {"qkv": self.hidden, "o": self.q_dim, "gu": self.hidden, "down": self.inter}
        group_out = {"qkv": self.q_dim + 2 * self.kv_dim, "o": self.hidden, "gu": 2 * self.inter, "down": self.hidden}
        self._stacks = {g: _Stack(A=self._lora_zeros((self.n_layers, 0, group_in[g])),
                                  B=self._lora_zeros((self.n_layers, group_out[g], 0)), scale=self._zeros((0,)))
                        for g in GROUPS}
        self.adapters: dict[str, _Adapter] = {}
        self._sel_cache: dict[tuple[str | None, ...], Selection | None] = {}

    # The engine's arrays: float zeros of a shape, a copy, row i repeated counts[i] times, a LoRA file's tensors.
    def _zeros(self, shape: tuple[int, ...]) -> Any:
        raise NotImplementedError

    def _copy(self, x: Any) -> Any:
        raise NotImplementedError

    def _repeat_rows(self, x: Any, counts: list[int]) -> Any:
        raise NotImplementedError

    def _read_lora_file(self, path: Path) -> dict[str, Any]:
        raise NotImplementedError

    # The A/B stacks' elements: the engine's float type unless it keeps them narrower (exactly).
    def _lora_zeros(self, shape: tuple[int, ...]) -> Any:
        return self._zeros(shape)

    def _lora_values(self, xs: list[Any]) -> list[Any]:
        """An adapter's A and B matrices as the stacks hold them; may first change how the stacks hold
        everything, when they cannot hold these exactly."""
        return xs

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
        tensors = self._read_lora_file(path / "adapter_model.safetensors")
        weights: dict[tuple[int, str, str], Any] = {}
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
        weights = dict(zip(weights, self._lora_values(list(weights.values())), strict=True))
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
                    stack.A[i, row:row + rank] = weights[(i, m, "A")]
                    stack.B[i, out_lo:out_hi, row:row + rank] = weights[(i, m, "B")]
                row += rank
            stack.scale[lo:lo + total] = scaling
            stack.used = lo + total
            nbytes += self.n_layers * total * (stack.A.shape[2] + stack.B.shape[1]) * stack.A.itemsize
        self.adapters[name] = _Adapter(name, ranges, scales, nbytes)
        self._sel_cache.clear()

    def _grow(self, stack: _Stack, need: int) -> None:
        cap = stack.A.shape[1]
        if need <= cap:
            return
        new = max(need, 2 * cap)
        A = self._lora_zeros((stack.A.shape[0], new, stack.A.shape[2]))
        A[:, :stack.used] = stack.A[:, :stack.used]
        B = self._lora_zeros((stack.B.shape[0], stack.B.shape[1], new))
        B[:, :, :stack.used] = stack.B[:, :, :stack.used]
        stack.A, stack.B = A, B
        scale = self._zeros((new,))
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
            stack.A[:, lo:end] = self._copy(stack.A[:, tail])
            stack.A[:, end:stack.used] = 0
            stack.B[:, :, lo:end] = self._copy(stack.B[:, :, tail])
            stack.B[:, :, end:stack.used] = 0
            stack.scale[lo:stack.used - width] = self._copy(stack.scale[tail])
            stack.used -= width
            for other in self.adapters.values():
                a, b = other.ranges[g]
                if a >= hi:
                    other.ranges[g] = (a - width, b - width)
        self._sel_cache.clear()

    def adapter_bytes(self, name: str) -> int:
        return self.adapters[name].nbytes

    # ------------------------------------------------------------------ row -> adapter selection
    def _selection(self, adapters: list[str | None]) -> Selection | None:
        key = tuple(adapters)
        if key not in self._sel_cache:
            if len(self._sel_cache) > 16:
                self._sel_cache.clear()
            self._sel_cache[key] = self._build_selection(adapters)
        return self._sel_cache[key]

    def _build_selection(self, adapters: list[str | None]) -> Selection | None:
        present = sorted({a for a in adapters if a is not None})
        if not present:
            return None
        groups: dict[str, tuple[int, int, Any] | None] = {}
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
                groups[g] = (lo, hi, scale[lo:hi][None])
                continue
            mult = self._zeros((len(adapters), hi - lo))
            for i, a in enumerate(adapters):
                if a is not None:
                    a_lo, a_hi = self.adapters[a].ranges[g]
                    mult[i, a_lo - lo:a_hi - lo] = scale[a_lo:a_hi]
            groups[g] = (lo, hi, mult)
        return Selection(groups, bool(mixed), self._repeat_rows)
