"""A whole decode step in one native call (``decode_step.c``), for ``FastLlama`` on a CPU with the kernel.

Python describes the model once (pointers to the weights where they already are: float32 tensors or GGUF
blocks, the norms, the RoPE tables) and, per step, which LoRA rows each row uses; the C code runs every
layer with its threads forked once. ``why_not`` says when a model cannot take this path; the Python
layers (``FastLlama._run_layers``) are then used, with the same results up to summation order. A short
prefill is the same call with one row per prompt token (``FastLlama._native_prefill``).
It takes torch tensors (``FastLlama``) or numpy arrays (``bot.engine.native_llama``, which runs without
torch) alike: only addresses, strides, shapes and dtypes are read.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from bot.engine import kernels
from bot.engine.kernels import address

c_int, c_long, c_float, c_void_p = ctypes.c_int, ctypes.c_long, ctypes.c_float, ctypes.c_void_p
KIND = {kernels.Q41Weight: 1, kernels.Q80Weight: 2}
LB_F32, LB_BF16 = 0, 3   # kernels.h
GROUP_ORDER = ("qkv", "o", "gu", "down")


class Mat(ctypes.Structure):
    _fields_ = [("kind", c_int), ("w", c_void_p), ("ld", c_long), ("n", c_long), ("k", c_long)]


class Layer(ctypes.Structure):
    _fields_ = [("ln1", c_void_p), ("ln2", c_void_p),
                *[(name, Mat) for name in ("q", "k", "v", "o", "gate", "up", "down")]]


class Model(ctypes.Structure):
    _fields_ = [("n_layers", c_int), ("hidden", c_int), ("n_heads", c_int), ("n_kv", c_int), ("head_dim", c_int),
                ("inter", c_int), ("eps", c_float), ("scale", c_float), ("layers", ctypes.POINTER(Layer)),
                ("cos", c_void_p), ("sin", c_void_p)]


class Lora(ctypes.Structure):
    _fields_ = [("A", c_void_p), ("lda", c_long), ("a_layer", c_long), ("B", c_void_p), ("ldb", c_long),
                ("b_layer", c_long), ("mult", c_void_p), ("ldm", c_long), ("r", c_long), ("kind", c_int)]


def _strides(a: Any) -> tuple[int, ...]:
    """Strides in elements of a numpy array or a torch tensor."""
    return tuple(x // a.itemsize for x in a.strides) if isinstance(a, np.ndarray) else tuple(a.stride())


def _f32_cpu(a: Any) -> bool:
    if isinstance(a, np.ndarray):
        return a.dtype == np.float32
    return str(a.dtype) == "torch.float32" and a.device.type == "cpu"


def _contiguous(a: Any) -> bool:
    return a.flags.c_contiguous if isinstance(a, np.ndarray) else a.is_contiguous()


def _mat(w: Any, rows: int, cols: int) -> Mat | str:
    if isinstance(w, kernels.QuantWeight):
        if w.shape != (rows, cols):
            return f"a weight of shape {w.shape} where {(rows, cols)} was expected"
        return Mat(KIND[type(w)], w.address, w.row_bytes, rows, cols)
    if not _f32_cpu(w):
        return "weights that are not float32 on the CPU"
    if tuple(w.shape) != (rows, cols) or _strides(w)[1] != 1 or cols % 8:
        return f"a weight of shape {tuple(w.shape)} (strides {_strides(w)}) the kernel cannot stream"
    return Mat(0, address(w), _strides(w)[0], rows, cols)


class NativeDecode:
    """The C description of one ``FastLlama`` (keeps what it points at alive through ``fast``)."""

    def __init__(self, fast: Any, lib: Any, *, int8: bool = False):
        self.fast, self.lib, self.int8 = fast, lib, int8
        self.why_not = self._describe()

    def _describe(self) -> str:
        f = self.fast
        if not _f32_cpu(f.norm):
            return (f"the model runs in {f.norm.dtype} on {getattr(f.norm, 'device', 'cpu')}, the native step "
                    "needs float32 on the CPU")
        if f.hidden % 8 or f.q_dim % 8 or f.inter % 8:
            return "the model's dimensions are not multiples of 8"
        D, qd, kvd, inter = f.hidden, f.q_dim, f.kv_dim, f.inter
        layers = (Layer * f.n_layers)()
        for i, lw in enumerate(f.layers):
            for norm in (lw.ln1, lw.ln2):
                if not _f32_cpu(norm) or not _contiguous(norm):
                    return "norm weights that are not contiguous float32"
            q, k, v = lw.wqkv
            shapes = {"q": (q, qd, D), "k": (k, kvd, D), "v": (v, kvd, D), "o": (lw.wo[0], D, qd),
                      "gate": (lw.wgu[0], inter, D), "up": (lw.wgu[1], inter, D), "down": (lw.wdown[0], D, inter)}
            layers[i].ln1, layers[i].ln2 = address(lw.ln1), address(lw.ln2)
            for name, (w, rows, cols) in shapes.items():
                mat = _mat(w, rows, cols)
                if isinstance(mat, str):
                    return f"layer {i} {name}_proj: {mat}"
                setattr(layers[i], name, mat)
        for table in (f._cos, f._sin):
            if not _contiguous(table):
                return "RoPE tables that are not contiguous"
        self.layers = layers
        self.model = Model(f.n_layers, D, f.n_heads, f.n_kv, f.head_dim, inter, f.eps, f.scale, layers,
                           address(f._cos), address(f._sin))
        return ""

    def _lora(self, sel: Any) -> Any:
        if sel is None:
            return None
        groups = (Lora * 4)()
        for j, g in enumerate(GROUP_ORDER):
            s = sel.groups[g]
            if s is None:
                continue
            lo, hi, mult = s
            stack = self.fast._stacks[g]
            A, B = stack.A, stack.B
            a_strides, b_strides = _strides(A), _strides(B)
            assert _contiguous(mult) and _f32_cpu(mult)
            # bfloat16 stacks (bot.engine.native_llama) are held as uint16 arrays of the same bits.
            bf16 = isinstance(A, np.ndarray) and A.dtype == np.uint16
            size = 2 if bf16 else 4
            groups[j] = Lora(address(A) + lo * a_strides[1] * size, a_strides[1], a_strides[0],
                             address(B) + lo * size, b_strides[1], b_strides[0],
                             address(mult), mult.shape[1] if mult.shape[0] > 1 else 0, hi - lo,
                             LB_BF16 if bf16 else LB_F32)
        return groups

    def step(self, x: Any, lens: list[int], kv: Any, sel: Any, threads: int, *,
             slots: list[int] | None = None, one_layer: bool = False, int8: bool | None = None) -> None:
        """Run every layer on ``x`` [n, hidden] in place (the rows' embeddings in, their last hidden
        states out); row i's new keys/values go to column ``lens[i]`` of its slot of ``kv`` (a contiguous
        SlotCache block): slot ``slots[i]``, by default slot i. ``one_layer``: ``kv`` is one layer's block,
        reused by every layer (keys/values not kept). ``int8``: override the model's int8 setting."""
        n = x.shape[0]
        assert _contiguous(x) and _f32_cpu(x) and _contiguous(kv) and len(lens) == n
        assert slots is None or (len(slots) == n and min(slots) >= 0 and max(slots) < kv.shape[1])
        assert max(lens) < kv.shape[4]
        lora = self._lora(sel)
        self.lib.lb_decode_step(ctypes.byref(self.model), lora, n, address(x), (c_long * n)(*lens),
                                None if slots is None else (c_long * n)(*slots), address(kv), kv.shape[1],
                                kv.shape[4], int(one_layer), threads, int(self.int8 if int8 is None else int8))
