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
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SOURCE = r"""
#include <immintrin.h>
#include <omp.h>
#include <string.h>

static inline float hsum(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    __m128 sh = _mm_movehdup_ps(lo);
    __m128 s = _mm_add_ps(lo, sh);
    sh = _mm_movehl_ps(sh, s);
    s = _mm_add_ss(s, sh);
    return _mm_cvtss_f32(s);
}

/* Three rows of x against four rows of w (nr <= 4 of them real); add: y += instead of y =. */
static void tile3(const float *x, long ldx, const float *w, long ldw, long K, float *y, long ldy, int nr, int add) {
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
    __m256 a10 = a00, a11 = a00, a12 = a00, a13 = a00, a20 = a00, a21 = a00, a22 = a00, a23 = a00;
    const float *w0 = w, *w1 = w + (nr > 1 ? ldw : 0);
    const float *w2 = w + (nr > 2 ? 2 * ldw : 0), *w3 = w + (nr > 3 ? 3 * ldw : 0);
    const float *x0 = x, *x1 = x + ldx, *x2 = x + 2 * ldx;
    for (long k = 0; k < K; k += 8) {
        __m256 v0 = _mm256_loadu_ps(w0 + k), v1 = _mm256_loadu_ps(w1 + k);
        __m256 v2 = _mm256_loadu_ps(w2 + k), v3 = _mm256_loadu_ps(w3 + k);
        __m256 u = _mm256_loadu_ps(x0 + k);
        a00 = _mm256_fmadd_ps(u, v0, a00); a01 = _mm256_fmadd_ps(u, v1, a01);
        a02 = _mm256_fmadd_ps(u, v2, a02); a03 = _mm256_fmadd_ps(u, v3, a03);
        u = _mm256_loadu_ps(x1 + k);
        a10 = _mm256_fmadd_ps(u, v0, a10); a11 = _mm256_fmadd_ps(u, v1, a11);
        a12 = _mm256_fmadd_ps(u, v2, a12); a13 = _mm256_fmadd_ps(u, v3, a13);
        u = _mm256_loadu_ps(x2 + k);
        a20 = _mm256_fmadd_ps(u, v0, a20); a21 = _mm256_fmadd_ps(u, v1, a21);
        a22 = _mm256_fmadd_ps(u, v2, a22); a23 = _mm256_fmadd_ps(u, v3, a23);
    }
    float r[3][4] = {{hsum(a00), hsum(a01), hsum(a02), hsum(a03)}, {hsum(a10), hsum(a11), hsum(a12), hsum(a13)},
                     {hsum(a20), hsum(a21), hsum(a22), hsum(a23)}};
    for (int i = 0; i < 3; i++)
        for (int j = 0; j < nr; j++) y[i * ldy + j] = add ? y[i * ldy + j] + r[i][j] : r[i][j];
}

/* One row of x against four rows of w, two accumulators per row (memory-bound case). */
static void tile1(const float *x, const float *w, long ldw, long K, float *y, int nr, int add) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    const float *w0 = w, *w1 = w + (nr > 1 ? ldw : 0);
    const float *w2 = w + (nr > 2 ? 2 * ldw : 0), *w3 = w + (nr > 3 ? 3 * ldw : 0);
    long k = 0;
    for (; k + 16 <= K; k += 16) {
        __m256 u = _mm256_loadu_ps(x + k), t = _mm256_loadu_ps(x + k + 8);
        a0 = _mm256_fmadd_ps(u, _mm256_loadu_ps(w0 + k), a0); a1 = _mm256_fmadd_ps(u, _mm256_loadu_ps(w1 + k), a1);
        a2 = _mm256_fmadd_ps(u, _mm256_loadu_ps(w2 + k), a2); a3 = _mm256_fmadd_ps(u, _mm256_loadu_ps(w3 + k), a3);
        b0 = _mm256_fmadd_ps(t, _mm256_loadu_ps(w0 + k + 8), b0);
        b1 = _mm256_fmadd_ps(t, _mm256_loadu_ps(w1 + k + 8), b1);
        b2 = _mm256_fmadd_ps(t, _mm256_loadu_ps(w2 + k + 8), b2);
        b3 = _mm256_fmadd_ps(t, _mm256_loadu_ps(w3 + k + 8), b3);
    }
    for (; k < K; k += 8) {
        __m256 u = _mm256_loadu_ps(x + k);
        a0 = _mm256_fmadd_ps(u, _mm256_loadu_ps(w0 + k), a0); a1 = _mm256_fmadd_ps(u, _mm256_loadu_ps(w1 + k), a1);
        a2 = _mm256_fmadd_ps(u, _mm256_loadu_ps(w2 + k), a2); a3 = _mm256_fmadd_ps(u, _mm256_loadu_ps(w3 + k), a3);
    }
    float r[4] = {hsum(_mm256_add_ps(a0, b0)), hsum(_mm256_add_ps(a1, b1)), hsum(_mm256_add_ps(a2, b2)),
                  hsum(_mm256_add_ps(a3, b3))};
    for (int j = 0; j < nr; j++) y[j] = add ? y[j] + r[j] : r[j];
}

/* y[M, N] (row stride ldy) (+)= x[M, K] (row stride ldx) @ w[N, K]^T (row stride ldw);  K % 8 == 0. */
void lb_linear(const float *x, long ldx, const float *w, long ldw, float *y, long ldy, long M, long N, long K,
               int add, int threads) {
    long blocks = (N + 3) / 4;
    long chunk = blocks / (threads * 8L);
    if (chunk < 1) chunk = 1;
    #pragma omp parallel for schedule(dynamic, chunk) num_threads(threads) if (threads > 1 && blocks > 8)
    for (long b = 0; b < blocks; b++) {
        long n = b * 4;
        int nr = (int)(N - n < 4 ? N - n : 4);
        long m = 0;
        for (; m + 3 <= M; m += 3) tile3(x + m * ldx, ldx, w + n * ldw, ldw, K, y + m * ldy + n, ldy, nr, add);
        for (; m < M; m++) tile1(x + m * ldx, w + n * ldw, ldw, K, y + m * ldy + n, nr, add);
    }
}

/* GGUF Q4_1 rows to fp32. A 20-byte block holds 32 weights: fp16 d, fp16 m, then 16 bytes whose low
   nibbles are weights 0..15 and high nibbles 16..31; w = d*q + m. d*q is exact in fp32 (11 x 4 bits), so
   this equals the reference dequantisation bit for bit, fused multiply-add or not. */
static void q41_rows(const unsigned char *w, long ldw, int nr, long K, float *out) {
    const __m128i low4 = _mm_set1_epi8(0x0F);
    for (int r = 0; r < nr; r++) {
        const unsigned char *row = w + r * ldw;
        float *o = out + r * K;
        for (long b = 0; b < K / 32; b++, o += 32) {
            const unsigned char *blk = row + b * 20;
            unsigned short hd, hm;
            memcpy(&hd, blk, 2);
            memcpy(&hm, blk + 2, 2);
            __m256 d = _mm256_set1_ps(_cvtsh_ss(hd)), m = _mm256_set1_ps(_cvtsh_ss(hm));
            __m128i q = _mm_loadu_si128((const __m128i *)(blk + 4));
            __m128i lo = _mm_and_si128(q, low4), hi = _mm_and_si128(_mm_srli_epi16(q, 4), low4);
            __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
            for (int p = 0; p < 4; p++) {
                __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[p]));
                _mm256_storeu_ps(o + 8 * p, _mm256_add_ps(_mm256_mul_ps(d, f), m));
            }
        }
    }
}

/* GGUF Q8_0 rows to fp32: 34-byte blocks of fp16 d and 32 int8 q; w = d*q, exact in fp32 (11 x 8 bits). */
static void q80_rows(const unsigned char *w, long ldw, int nr, long K, float *out) {
    for (int r = 0; r < nr; r++) {
        const unsigned char *row = w + r * ldw;
        float *o = out + r * K;
        for (long b = 0; b < K / 32; b++, o += 32) {
            const unsigned char *blk = row + b * 34;
            unsigned short hd;
            memcpy(&hd, blk, 2);
            __m256 d = _mm256_set1_ps(_cvtsh_ss(hd));
            for (int p = 0; p < 4; p++) {
                __m128i q = _mm_loadl_epi64((const __m128i *)(blk + 2 + 8 * p));
                _mm256_storeu_ps(o + 8 * p, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q))));
            }
        }
    }
}

typedef void (*rows_fn)(const unsigned char *, long, int, long, float *);

/* lb_linear with block-quantised weights (ldw in bytes, K % 32 == 0): each thread expands four weight
   rows at a time into a small fp32 panel and runs the same tiles over it, so the sums are lb_linear's
   exactly while the weights stay 0.625 (Q4_1) or 1.06 (Q8_0) bytes each in memory instead of 4. */
static void linear_blocks(rows_fn expand, const float *x, long ldx, const unsigned char *w, long ldw, float *y,
                          long ldy, long M, long N, long K, int add, int threads) {
    long blocks = (N + 3) / 4;
    long chunk = blocks / (threads * 8L);
    if (chunk < 1) chunk = 1;
    #pragma omp parallel num_threads(threads) if (threads > 1 && blocks > 8)
    {
        float *panel = (float *)_mm_malloc(4 * K * sizeof(float), 32);
        #pragma omp for schedule(dynamic, chunk)
        for (long b = 0; b < blocks; b++) {
            long n = b * 4;
            int nr = (int)(N - n < 4 ? N - n : 4);
            expand(w + n * ldw, ldw, nr, K, panel);
            long m = 0;
            for (; m + 3 <= M; m += 3) tile3(x + m * ldx, ldx, panel, K, K, y + m * ldy + n, ldy, nr, add);
            for (; m < M; m++) tile1(x + m * ldx, panel, K, K, y + m * ldy + n, nr, add);
        }
        _mm_free(panel);
    }
}

void lb_linear_q41(const float *x, long ldx, const unsigned char *w, long ldw, float *y, long ldy, long M, long N,
                   long K, int add, int threads) {
    linear_blocks(q41_rows, x, ldx, w, ldw, y, ldy, M, N, K, add, threads);
}

void lb_linear_q80(const float *x, long ldx, const unsigned char *w, long ldw, float *y, long ldy, long M, long N,
                   long K, int add, int threads) {
    linear_blocks(q80_rows, x, ldx, w, ldw, y, ldy, M, N, K, add, threads);
}

/* Whole rows to fp32 [N, K] (embedding lookups, a few label rows of the output layer, tests). */
static void dequant_blocks(rows_fn expand, const unsigned char *w, long ldw, long N, long K, float *out) {
    for (long n = 0; n < N; n += 4) expand(w + n * ldw, ldw, (int)(N - n < 4 ? N - n : 4), K, out + n * K);
}

void lb_dequant_q41(const unsigned char *w, long ldw, long N, long K, float *out) {
    dequant_blocks(q41_rows, w, ldw, N, K, out);
}

void lb_dequant_q80(const unsigned char *w, long ldw, long N, long K, float *out) {
    dequant_blocks(q80_rows, w, ldw, N, K, out);
}
"""

_lib: Any = None
_tried = False


def _build() -> Any:
    import torch

    from bot.models import cache_dir

    if os.environ.get("LORABOT_NO_KERNELS"):
        return None
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        return None
    flags = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC"]
    digest = hashlib.sha256((SOURCE + " ".join(flags)).encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"lb_linear-{digest}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            src = Path(tmp) / "lb_linear.c"
            src.write_text(SOURCE, encoding="utf-8")
            out = Path(tmp) / target.name
            done = subprocess.run([compiler, *flags, str(src), "-o", str(out)], capture_output=True, text=True,
                                  timeout=120)
            if done.returncode != 0:
                log.info("CPU kernel not built (%s); using torch matmul", done.stderr.strip()[:200])
                return None
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
    return lib


def load() -> Any:
    """The compiled library, or None (built once per machine, cached next to the converted model)."""
    global _lib, _tried
    if not _tried:
        _tried = True
        try:
            _lib = _build()
        except Exception as exc:  # a broken toolchain must never stop the bot: torch's matmul still works
            log.info("CPU kernel unavailable (%s); using torch matmul", exc)
            _lib = None
    return _lib


def usable(x: Any, w: Any) -> bool:
    import torch

    return (x.dtype == torch.float32 and w.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 2
            and w.dim() == 2 and x.shape[1] == w.shape[1] and x.shape[1] % 8 == 0 and x.stride(1) == 1
            and w.stride(1) == 1)


def linear(x: Any, w: Any, threads: int, out: Any = None) -> Any:
    """``x @ w.T``, or ``out += x @ w.T`` (``out``: float32 [M, N] with unit column stride).

    The caller checks ``usable(x, w)`` and that ``load()`` worked; rows of ``x``/``w`` may be strided.
    """
    import torch

    m, k = x.shape
    n = w.shape[0]
    add = out is not None
    y = out if add else torch.empty((m, n), dtype=torch.float32)
    assert y.shape == (m, n) and y.stride(1) == 1
    _lib.lb_linear(x.data_ptr(), x.stride(0), w.data_ptr(), w.stride(0), y.data_ptr(), y.stride(0), m, n, k,
                   int(add), threads)
    return y


class QuantWeight:
    """A linear layer's weight [N, K] kept as GGUF blocks (uint8 [N, K / 32 * block bytes], rows contiguous);
    the kernel expands them with results equal to the float weights'. Subclasses name the block type."""

    BLOCK_BYTES = 0
    _linear = _dequant = ""

    def __init__(self, blocks: Any, in_features: int):
        if in_features % 32 or blocks.dim() != 2 or blocks.shape[1] != in_features // 32 * self.BLOCK_BYTES:
            raise ValueError(f"not {type(self).__name__} rows of {in_features} weights: {tuple(blocks.shape)}")
        self.blocks = blocks.contiguous()
        self.shape = (blocks.shape[0], in_features)

    @property
    def nbytes(self) -> int:
        return self.blocks.numel()

    def dequantize(self, rows: Any = None) -> Any:
        """float32 [N, K], or only the given rows (an index tensor: embedding lookups)."""
        import torch

        blocks = self.blocks if rows is None else self.blocks[rows].contiguous()
        out = torch.empty((blocks.shape[0], self.shape[1]), dtype=torch.float32)
        getattr(_lib, self._dequant)(blocks.data_ptr(), blocks.stride(0), blocks.shape[0], self.shape[1],
                                     out.data_ptr())
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
    import torch

    m, k = x.shape
    n = w.shape[0]
    assert k == w.shape[1] and x.dtype == torch.float32 and x.stride(1) == 1
    add = out is not None
    y = out if add else torch.empty((m, n), dtype=torch.float32)
    assert y.shape == (m, n) and y.stride(1) == 1
    getattr(_lib, w._linear)(x.data_ptr(), x.stride(0), w.blocks.data_ptr(), w.blocks.stride(0), y.data_ptr(),
                             y.stride(0), m, n, k, int(add), threads)
    return y
