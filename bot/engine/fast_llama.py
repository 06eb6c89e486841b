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

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bot.engine import kernels
from bot.engine.decode_native import NativeDecode
from bot.engine.light_model import unsupported_config
from bot.engine.lora_stacks import GROUPS, MODULE_GROUP, Columns, LoraStacks, Selection
from bot.engine.slot_cache import Reservation, SlotCache
from bot.engine.weights import read_safetensors

__all__ = ["GROUPS", "MODULE_GROUP", "Columns", "FastLlama", "Reservation", "SlotCache", "unsupported",
           "unsupported_config"]

def unsupported(model: Any) -> str | None:
    """Why ``model`` (a transformers model) cannot run on this path (None when it can)."""
    cfg = getattr(model, "config", None)
    if type(model).__name__ != "LlamaForCausalLM" or cfg is None:
        return f"{type(model).__name__} is not a plain LlamaForCausalLM"
    return unsupported_config(cfg)


def rope_inv_freq(cfg: Any) -> torch.Tensor:
    """The default RoPE inverse frequencies, computed exactly as transformers computes them."""
    rope = getattr(cfg, "rope_parameters", None) or {}
    base = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))


class FastLlama(LoraStacks):
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
        self._read_model(cfg, weights, ValueError)
        self.dtype = self.norm.dtype    # the embeddings may be quantised blocks (bot.engine.gguf)
        self.device = self.norm.device
        self.max_context = min(max_context, self.max_context)
        self._rope(rope_inv_freq(cfg) if inv_freq is None else inv_freq, attention_scaling)
        self._init_stacks()
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

    # ------------------------------------------------------------------ arrays for the adapter stacks
    def _zeros(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    def _copy(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    def _repeat_rows(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        return x.repeat_interleave(torch.tensor(counts, device=x.device), 0)

    def _read_lora_file(self, path: Path) -> dict[str, torch.Tensor]:
        return read_safetensors(path)

    # ------------------------------------------------------------------ the forward pass
    def _mm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x @ w.T"""
        if isinstance(w, kernels.QuantWeight):  # only handed over when the kernel is built
            return kernels.linear_quant(x if x.stride(1) == 1 else x.contiguous(), w, torch.get_num_threads())
        if self.kernel is not None and x.shape[0] <= self.KERNEL_MAX_ROWS and kernels.usable(x, w):
            return kernels.linear(x, w, torch.get_num_threads())
        return F.linear(x, w)

    def _proj(self, x: torch.Tensor, ws: tuple[torch.Tensor, ...], layer: int, group: str,
              sel: Selection | None) -> torch.Tensor:
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

    def _run_layers(self, x: torch.Tensor, positions: torch.Tensor, sel: Selection | None, attend: Any,
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
        if isinstance(w, kernels.QuantWeight):
            return torch.as_tensor(w.dequantize(ids.cpu().numpy()))
        return F.embedding(ids, w)

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], adapters: list[str | None],
                target: Reservation | Columns | None = None) -> torch.Tensor:
        """Logits at each prompt's last position [B, V] (or [B, len(ids)] for ``Columns``).

        With a ``Reservation`` the keys/values are written into its slots (commit it afterwards).
        """
        lengths = [len(p) for p in prompts]
        ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=self.device)
        sel = self._selection(adapters)
        sel = sel.per_token(lengths) if sel is not None else None
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

    def _python_prefill(self, x: torch.Tensor, lengths: list[int], sel: Selection | None, res: Reservation | None,
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

    def _native_prefill(self, x: torch.Tensor, lengths: list[int], sel: Selection | None,
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

    # Plain tensors, not inference tensors: the cache is also written outside inference mode (retire).
    def new_kv(self, rows: int, cols: int) -> torch.Tensor:
        with torch.inference_mode(False):
            return torch.zeros((self.n_layers, rows, 2, self.n_kv, cols, self.head_dim), dtype=self.dtype,
                               device=self.device)

    def copy_kv(self, view: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(False):
            return view.clone()
