"""A small-batch fp32 matmul for x86 CPUs with AVX2/FMA, built on first use with the system C compiler.

``y = x @ w.T`` for ``x`` [M, K] and a row-major ``w`` [N, K] (the layout nn.Linear keeps, so the
weights are used where they are, without a packed copy). Decoding multiplies a few rows by every
weight matrix; for such small M the BLAS that PyTorch bundles (MKL) is slow on AMD CPUs (measured on
an EPYC: 3-7 GB/s of weights, M=4 slower than M=16). This kernel keeps a 3-row x 4-column tile in
registers, streams four weight rows at a time and splits the columns over threads dynamically (a
thread that the OS deschedules does not hold the others back).

The same tiles also run over weights kept as GGUF Q4_1 / Q8_0 blocks (``QuantWeight``): four rows at a
time are expanded into a small float32 panel, exactly as the GGUF reference dequantises them, so the
sums equal the float32 kernel's on the converted weights while the weights stay 6x (Q4_1) smaller.

Optional: when there is no compiler, no AVX2/FMA, or the build fails, ``linear`` is None and callers
use ``torch.nn.functional.linear``. Results equal a float32 matmul up to summation order.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

SOURCE_PATH = Path(__file__).with_name("kernels.c")
# Built into one library: the matmuls, a whole decode step (bot.engine.decode_native), the opt-in int8 matmul.
SOURCES = (SOURCE_PATH, SOURCE_PATH.with_name("decode_step.c"), SOURCE_PATH.with_name("kernels_int8.c"))
HEADER = SOURCE_PATH.with_name("kernels.h")

_lib: Any = None
_status: KernelStatus | None = None

# What going without the kernel costs, as measured on the project's 2-core AVX2 machine (README).
COST = "decode about 2x slower and 817 MB instead of 483 MB (the quantised weights need the kernel)"


@dataclass(frozen=True)
class KernelStatus:
    built: bool
    reason: str            # why not (empty when built)
    path: str = ""         # the shared library in use
    compiler: str = ""     # the compiler and its version line


def _compiler() -> tuple[str, str] | None:
    path = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if path is None:
        return None
    done = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    return path, (done.stdout.splitlines() or [""])[0].strip()


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags as /proc/cpuinfo lists them (None where there is no /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


def _missing_cpu_features() -> str:
    """Why this CPU cannot run the kernel ("" when it can): it needs AVX2, FMA and F16C. Read from
    /proc/cpuinfo where there is one (no torch import), else from PyTorch's report."""
    flags = cpu_flags()
    if flags is not None:
        missing = {"avx2", "fma", "f16c"} - flags
        return f"this CPU has no {', '.join(sorted(missing)).upper()}" if missing else ""
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    return "" if capability in ("AVX2", "AVX512") else f"this CPU has no AVX2 (PyTorch reports {capability})"


def _build() -> tuple[Any, KernelStatus]:
    from bot.engine.loading import cache_dir

    if os.environ.get("LORABOT_NO_KERNELS"):
        return None, KernelStatus(False, "turned off by LORABOT_NO_KERNELS")
    missing = _missing_cpu_features()
    if missing:
        return None, KernelStatus(False, missing)
    found = _compiler()
    if found is None:
        return None, KernelStatus(False, "no C compiler (cc or gcc) on PATH")
    compiler, version = found
    source = "\0".join(p.read_text(encoding="utf-8") for p in (*SOURCES, HEADER))
    flags = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC"]
    # A different compiler (or version) may build different code: it gets its own cached library.
    digest = hashlib.sha256("\0".join([source, " ".join(flags), compiler, version]).encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"lb_linear-{digest}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out = Path(tmp) / target.name
            done = subprocess.run([compiler, *flags, *map(str, SOURCES), "-lm", "-o", str(out)], capture_output=True,
                                  text=True, timeout=120)
            if done.returncode != 0:
                return None, KernelStatus(False, f"the build failed: {done.stderr.strip()[:300]}",
                                          compiler=version)
            os.replace(out, target)
    lib = ctypes.CDLL(str(target))
    lib.lb_linear.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p,
                              ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_int, ctypes.c_int]
    lib.lb_linear.restype = None
    lib.lb_linear_q41.argtypes = lib.lb_linear.argtypes
    lib.lb_linear_q41.restype = None
    lib.lb_dequant_q41.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_void_p]
    lib.lb_dequant_q41.restype = None
    lib.lb_linear_q80.argtypes = lib.lb_linear.argtypes
    lib.lb_linear_q80.restype = None
    lib.lb_dequant_q80.argtypes = lib.lb_dequant_q41.argtypes
    lib.lb_dequant_q80.restype = None
    lib.lb_decode_step.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_int,
                                   ctypes.c_int, ctypes.c_int]
    lib.lb_decode_step.restype = None
    lib.lb_linear_i8.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_long,
                                 ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_long,
                                 ctypes.c_int]
    lib.lb_linear_i8.restype = None
    return lib, KernelStatus(True, "", path=str(target), compiler=version)


def status() -> KernelStatus:
    """Build or load the kernel once per process and say how that went (never raises)."""
    global _lib, _status
    if _status is None:
        try:
            _lib, _status = _build()
        except Exception as exc:  # a broken toolchain or a noexec cache must never stop the bot
            _lib, _status = None, KernelStatus(False, f"{type(exc).__name__}: {exc}")
        if not _status.built:
            log.warning("CPU kernel not available: %s; using torch matmul instead: %s", _status.reason, COST)
    return _status


def load() -> Any:
    """The compiled library, or None (built once per machine, cached next to the converted model)."""
    status()
    return _lib


def usable(x: Any, w: Any) -> bool:
    import torch

    return (x.dtype == torch.float32 and w.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 2
            and w.dim() == 2 and x.shape[1] == w.shape[1] and x.shape[1] % 8 == 0 and x.stride(1) == 1
            and w.stride(1) == 1)


def _output(x: Any, out: Any, m: int, n: int) -> Any:
    """``out``, checked, or a new float32 [m, n] of the kind of ``x`` (numpy array or torch tensor)."""
    if out is None:
        if isinstance(x, np.ndarray):
            out = np.empty((m, n), dtype=np.float32)
        else:
            import torch

            out = torch.empty((m, n), dtype=torch.float32)
    assert tuple(out.shape) == (m, n) and unit_columns(out) and str(out.dtype).endswith("float32")
    return out


def unit_columns(a: Any) -> bool:
    return (a.strides[1] == a.itemsize) if isinstance(a, np.ndarray) else a.stride(1) == 1


def linear(x: Any, w: Any, threads: int, out: Any = None) -> Any:
    """``x @ w.T``, or ``out += x @ w.T`` (``out``: float32 [M, N] with unit column stride); numpy
    arrays or torch tensors alike.

    The caller checks ``usable(x, w)`` (or the same of numpy arrays) and that ``load()`` worked; rows of
    ``x``/``w`` may be strided.
    """
    m, k = x.shape
    n = w.shape[0]
    y = _output(x, out, m, n)
    _lib.lb_linear(address(x), row_stride(x), address(w), row_stride(w), address(y), row_stride(y), m, n, k,
                   int(out is not None), threads)
    return y


def address(a: Any) -> int:
    """The data address of a numpy array or a torch tensor."""
    return a.ctypes.data if isinstance(a, np.ndarray) else a.data_ptr()


def row_stride(a: Any) -> int:
    """Elements between two rows of a 2-D numpy array or torch tensor."""
    return a.strides[0] // a.itemsize if isinstance(a, np.ndarray) else a.stride(0)


class QuantWeight:
    """A linear layer's weight [N, K] kept as GGUF blocks (uint8 [N, K / 32 * block bytes], rows contiguous,
    a numpy array or a torch tensor); the kernel expands them with results equal to the float weights'.
    Subclasses name the block type."""

    BLOCK_BYTES = 0
    _linear = _dequant = ""

    def __init__(self, blocks: Any, in_features: int):
        if in_features % 32 or blocks.ndim != 2 or blocks.shape[1] != in_features // 32 * self.BLOCK_BYTES:
            raise ValueError(f"not {type(self).__name__} rows of {in_features} weights: {tuple(blocks.shape)}")
        self.blocks = np.ascontiguousarray(blocks) if isinstance(blocks, np.ndarray) else blocks.contiguous()
        self.shape = (blocks.shape[0], in_features)

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.blocks.shape[1]

    @property
    def address(self) -> int:
        return address(self.blocks)

    @property
    def row_bytes(self) -> int:
        return self.blocks.shape[1]

    def dequantize(self, rows: Any = None) -> Any:
        """float32 [N, K], or only the given rows (indices: embedding lookups); a numpy array for numpy
        blocks, a tensor for tensor blocks."""
        blocks = self.blocks if rows is None else self.blocks[rows]
        if isinstance(blocks, np.ndarray):
            blocks = np.ascontiguousarray(blocks)
            out: Any = np.empty((blocks.shape[0], self.shape[1]), dtype=np.float32)
        else:
            import torch

            blocks = blocks.contiguous()
            out = torch.empty((blocks.shape[0], self.shape[1]), dtype=torch.float32)
        getattr(_lib, self._dequant)(address(blocks), blocks.shape[1], blocks.shape[0], self.shape[1], address(out))
        return out


class Q41Weight(QuantWeight):
    """Q4_1: 20-byte blocks of fp16 d, fp16 m and 32 nibbles; w = d*q + m."""

    BLOCK_BYTES = 20
    _linear, _dequant = "lb_linear_q41", "lb_dequant_q41"


class Q80Weight(QuantWeight):
    """Q8_0: 34-byte blocks of fp16 d and 32 int8; w = d*q."""

    BLOCK_BYTES = 34
    _linear, _dequant = "lb_linear_q80", "lb_dequant_q80"


def linear_quant(x: Any, w: QuantWeight, threads: int, out: Any = None) -> Any:
    """``linear`` with block-quantised weights (the same sums as ``linear`` on the dequantised weights).
    ``x``: float32 [M, K] with unit column stride; needs ``load()`` to have worked."""
    m, k = x.shape
    n = w.shape[0]
    assert k == w.shape[1] and str(x.dtype).endswith("float32") and unit_columns(x)
    y = _output(x, out, m, n)
    getattr(_lib, w._linear)(address(x), row_stride(x), w.address, w.row_bytes, address(y), row_stride(y), m, n,
                             k, int(out is not None), threads)
    return y


def linear_quant_int8(x: Any, w: QuantWeight, threads: int) -> Any:
    """``x @ w.T`` with ``x`` rounded to int8 per block of 32 (approximate: ``engine.int8_activations``)."""
    m, k = x.shape
    assert k == w.shape[1] and str(x.dtype).endswith("float32") and unit_columns(x)
    y = _output(x, None, m, w.shape[0])
    kind = 1 if isinstance(w, Q41Weight) else 2
    _lib.lb_linear_i8(address(x), row_stride(x), kind, w.address, w.row_bytes, address(y), row_stride(y), m,
                      w.shape[0], k, threads)
    return y
