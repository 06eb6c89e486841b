#include <immintrin.h>
#include <omp.h>
#include <string.h>

#include "kernels.h"

static inline float hsum(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    __m128 sh = _mm_movehdup_ps(lo);
    __m128 s = _mm_add_ps(lo, sh);
    sh = _mm_movehl_ps(sh, s);
    s = _mm_add_ss(s, sh);
    return _mm_cvtss_f32(s);
}

/* Three rows of x against four rows of w (nr <= 4 of them real); add: y += instead of y =. The three x
   vectors stay in registers and each w vector is loaded just before its three FMAs: 12 accumulators + 3 + 1
   = the 16 AVX2 registers, nothing spilled (every accumulator sees the same FMAs in the same order). */
static void tile3(const float *x, long ldx, const float *w, long ldw, long K, float *y, long ldy, int nr, int add) {
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
    __m256 a10 = a00, a11 = a00, a12 = a00, a13 = a00, a20 = a00, a21 = a00, a22 = a00, a23 = a00;
    const float *w0 = w, *w1 = w + (nr > 1 ? ldw : 0);
    const float *w2 = w + (nr > 2 ? 2 * ldw : 0), *w3 = w + (nr > 3 ? 3 * ldw : 0);
    const float *x0 = x, *x1 = x + ldx, *x2 = x + 2 * ldx;
    for (long k = 0; k < K; k += 8) {
        __m256 u0 = _mm256_loadu_ps(x0 + k), u1 = _mm256_loadu_ps(x1 + k), u2 = _mm256_loadu_ps(x2 + k);
        __m256 v = _mm256_loadu_ps(w0 + k);
        a00 = _mm256_fmadd_ps(u0, v, a00); a10 = _mm256_fmadd_ps(u1, v, a10); a20 = _mm256_fmadd_ps(u2, v, a20);
        v = _mm256_loadu_ps(w1 + k);
        a01 = _mm256_fmadd_ps(u0, v, a01); a11 = _mm256_fmadd_ps(u1, v, a11); a21 = _mm256_fmadd_ps(u2, v, a21);
        v = _mm256_loadu_ps(w2 + k);
        a02 = _mm256_fmadd_ps(u0, v, a02); a12 = _mm256_fmadd_ps(u1, v, a12); a22 = _mm256_fmadd_ps(u2, v, a22);
        v = _mm256_loadu_ps(w3 + k);
        a03 = _mm256_fmadd_ps(u0, v, a03); a13 = _mm256_fmadd_ps(u1, v, a13); a23 = _mm256_fmadd_ps(u2, v, a23);
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

/* The 32 nibbles of a Q4_1 block (16 bytes: low nibbles are weights 0..15, high ones 16..31) as floats,
   exactly: a nibble ORed into the mantissa of 2^23 and 2^23 subtracted again (cheaper than int->float
   conversion, and the same value). */
static inline void nibbles(const unsigned char *qs, __m256 q[4]) {
    const __m256i low4 = _mm256_set1_epi32(0x0F), magic = _mm256_set1_epi32(0x4B000000);
    const __m256 fmagic = _mm256_set1_ps(8388608.0f);
    __m256i b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)qs));
    __m256i b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(qs + 8)));
    q[0] = _mm256_sub_ps(_mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(b0, low4), magic)), fmagic);
    q[1] = _mm256_sub_ps(_mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(b1, low4), magic)), fmagic);
    q[2] = _mm256_sub_ps(_mm256_castsi256_ps(_mm256_or_si256(_mm256_srli_epi32(b0, 4), magic)), fmagic);
    q[3] = _mm256_sub_ps(_mm256_castsi256_ps(_mm256_or_si256(_mm256_srli_epi32(b1, 4), magic)), fmagic);
}

/* GGUF Q4_1 rows to fp32. A 20-byte block holds 32 weights: fp16 d, fp16 m, then 16 bytes whose low
   nibbles are weights 0..15 and high nibbles 16..31; w = d*q + m. d*q is exact in fp32 (11 x 4 bits), so
   this equals the reference dequantisation bit for bit, fused multiply-add or not. */
static void q41_rows(const unsigned char *w, long ldw, int nr, long K, float *out) {
    for (int r = 0; r < nr; r++) {
        const unsigned char *row = w + r * ldw;
        float *o = out + r * K;
        for (long b = 0; b < K / 32; b++, o += 32) {
            const unsigned char *blk = row + b * 20;
            unsigned short hd, hm;
            memcpy(&hd, blk, 2);
            memcpy(&hm, blk + 2, 2);
            __m256 d = _mm256_set1_ps(_cvtsh_ss(hd)), m = _mm256_set1_ps(_cvtsh_ss(hm));
            __m256 q[4];
            nibbles(blk + 4, q);
            for (int p = 0; p < 4; p++) _mm256_storeu_ps(o + 8 * p, _mm256_add_ps(_mm256_mul_ps(d, q[p]), m));
        }
    }
}

/* 8 int8 weights as exact floats: sign-extended into the mantissa of 1.5 * 2^23, which is then subtracted. */
static inline __m256 int8s(const unsigned char *q) {
    const __m256i magic = _mm256_set1_epi32(0x4B400000);
    const __m256 fmagic = _mm256_set1_ps(12582912.0f);
    __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)q));
    return _mm256_sub_ps(_mm256_castsi256_ps(_mm256_add_epi32(v, magic)), fmagic);
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
            for (int p = 0; p < 4; p++) _mm256_storeu_ps(o + 8 * p, _mm256_mul_ps(d, int8s(blk + 2 + 8 * p)));
        }
    }
}

typedef void (*rows_fn)(const unsigned char *, long, int, long, float *);

/* The four rows' sums of a one-row product (two accumulators each) into y. */
static inline void store4(const __m256 *a, const __m256 *b, int nr, float *y, int add) {
    for (int j = 0; j < nr; j++) {
        float s = hsum(_mm256_add_ps(a[j], b[j]));
        y[j] = add ? y[j] + s : s;
    }
}

/* 8 bfloat16 values as float32, exactly: their 16 bits are the top half of the float's. */
static inline __m256 bf16s(const unsigned short *p) {
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

/* bfloat16 rows to fp32 (ldw in elements). */
static void bf16_rows(const unsigned short *w, long ldw, int nr, long K, float *out) {
    for (int r = 0; r < nr; r++)
        for (long k = 0; k < K; k += 8) _mm256_storeu_ps(out + r * K + k, bf16s(w + r * ldw + k));
}

/* One row of x against four bfloat16 rows, widened in registers. */
static void bf16_dot4(const float *x, const unsigned short *w, long ldw, int nr, long K, float *y, int add) {
    const unsigned short *w0 = w, *w1 = w + (nr > 1 ? ldw : 0);
    const unsigned short *w2 = w + (nr > 2 ? 2 * ldw : 0), *w3 = w + (nr > 3 ? 3 * ldw : 0);
    __m256 a[4], b[4];
    for (int r = 0; r < 4; r++) a[r] = b[r] = _mm256_setzero_ps();
    long k = 0;
    for (; k + 16 <= K; k += 16) {
        __m256 u = _mm256_loadu_ps(x + k), t = _mm256_loadu_ps(x + k + 8);
        a[0] = _mm256_fmadd_ps(u, bf16s(w0 + k), a[0]); a[1] = _mm256_fmadd_ps(u, bf16s(w1 + k), a[1]);
        a[2] = _mm256_fmadd_ps(u, bf16s(w2 + k), a[2]); a[3] = _mm256_fmadd_ps(u, bf16s(w3 + k), a[3]);
        b[0] = _mm256_fmadd_ps(t, bf16s(w0 + k + 8), b[0]); b[1] = _mm256_fmadd_ps(t, bf16s(w1 + k + 8), b[1]);
        b[2] = _mm256_fmadd_ps(t, bf16s(w2 + k + 8), b[2]); b[3] = _mm256_fmadd_ps(t, bf16s(w3 + k + 8), b[3]);
    }
    for (; k < K; k += 8) {
        __m256 u = _mm256_loadu_ps(x + k);
        a[0] = _mm256_fmadd_ps(u, bf16s(w0 + k), a[0]); a[1] = _mm256_fmadd_ps(u, bf16s(w1 + k), a[1]);
        a[2] = _mm256_fmadd_ps(u, bf16s(w2 + k), a[2]); a[3] = _mm256_fmadd_ps(u, bf16s(w3 + k), a[3]);
    }
    store4(a, b, nr, y, add);
}

/* One row of x against four Q4_1 rows, expanded in registers (no panel): at one row the panel's store and
   reload cost more than the arithmetic. The weights are the reference dequantisation's exactly (d*q is
   exact, so one rounding either way); two accumulators per row hide the FMA latency. */
static void q41_dot4(const float *x, const unsigned char *w, long ldw, int nr, long K, float *y, int add) {
    const unsigned char *rows[4] = {w, w + (nr > 1 ? ldw : 0), w + (nr > 2 ? 2 * ldw : 0), w + (nr > 3 ? 3 * ldw : 0)};
    __m256 a[4], b[4];
    for (int r = 0; r < 4; r++) a[r] = b[r] = _mm256_setzero_ps();
    for (long blk = 0; blk < K / 32; blk++) {
        const float *xb = x + blk * 32;
        __m256 x0 = _mm256_loadu_ps(xb), x1 = _mm256_loadu_ps(xb + 8);
        __m256 x2 = _mm256_loadu_ps(xb + 16), x3 = _mm256_loadu_ps(xb + 24);
        #pragma GCC unroll 4
        for (int r = 0; r < 4; r++) {
            const unsigned char *bp = rows[r] + blk * 20;
            unsigned short hd, hm;
            memcpy(&hd, bp, 2);
            memcpy(&hm, bp + 2, 2);
            __m256 d = _mm256_set1_ps(_cvtsh_ss(hd)), m = _mm256_set1_ps(_cvtsh_ss(hm)), q[4];
            nibbles(bp + 4, q);
            a[r] = _mm256_fmadd_ps(x0, _mm256_fmadd_ps(d, q[0], m), a[r]);
            b[r] = _mm256_fmadd_ps(x1, _mm256_fmadd_ps(d, q[1], m), b[r]);
            a[r] = _mm256_fmadd_ps(x2, _mm256_fmadd_ps(d, q[2], m), a[r]);
            b[r] = _mm256_fmadd_ps(x3, _mm256_fmadd_ps(d, q[3], m), b[r]);
        }
    }
    store4(a, b, nr, y, add);
}

/* The same for Q8_0 rows. */
static void q80_dot4(const float *x, const unsigned char *w, long ldw, int nr, long K, float *y, int add) {
    const unsigned char *rows[4] = {w, w + (nr > 1 ? ldw : 0), w + (nr > 2 ? 2 * ldw : 0), w + (nr > 3 ? 3 * ldw : 0)};
    __m256 a[4], b[4];
    for (int r = 0; r < 4; r++) a[r] = b[r] = _mm256_setzero_ps();
    for (long blk = 0; blk < K / 32; blk++) {
        const float *xb = x + blk * 32;
        #pragma GCC unroll 4
        for (int r = 0; r < 4; r++) {
            const unsigned char *bp = rows[r] + blk * 34;
            unsigned short hd;
            memcpy(&hd, bp, 2);
            __m256 d = _mm256_set1_ps(_cvtsh_ss(hd));
            for (int p = 0; p < 4; p += 2) {
                __m256 w0 = _mm256_mul_ps(d, int8s(bp + 2 + 8 * p));
                __m256 w1 = _mm256_mul_ps(d, int8s(bp + 10 + 8 * p));
                a[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 8 * p), w0, a[r]);
                b[r] = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 8 * p + 8), w1, b[r]);
            }
        }
    }
    store4(a, b, nr, y, add);
}

void lb_mm_for(const lb_mat *w, const float *x, long ldx, float *y, long ldy, long M, int add, float *panel) {
    long N = w->n, K = w->k, blocks = (N + 3) / 4;
    long chunk = blocks / (omp_get_num_threads() * 8L);
    if (chunk < 1) chunk = 1;
    #pragma omp for schedule(dynamic, chunk) nowait
    for (long b = 0; b < blocks; b++) {
        long n = b * 4;
        int nr = (int)(N - n < 4 ? N - n : 4);
        const float *wf;
        long ldw;
        if (w->kind == LB_F32) {
            wf = (const float *)w->w + n * w->ld;
            ldw = w->ld;
        } else if (w->kind == LB_BF16) {
            const unsigned short *wb = (const unsigned short *)w->w + n * w->ld;
            if (M == 1) {
                bf16_dot4(x, wb, w->ld, nr, K, y + n, add);
                continue;
            }
            bf16_rows(wb, w->ld, nr, K, panel);
            wf = panel;
            ldw = K;
        } else {
            const unsigned char *wq = (const unsigned char *)w->w + n * w->ld;
            if (M == 1) {
                (w->kind == LB_Q41 ? q41_dot4 : q80_dot4)(x, wq, w->ld, nr, K, y + n, add);
                continue;
            }
            (w->kind == LB_Q41 ? q41_rows : q80_rows)(wq, w->ld, nr, K, panel);
            wf = panel;
            ldw = K;
        }
        long m = 0;
        for (; m + 3 <= M; m += 3) tile3(x + m * ldx, ldx, wf, ldw, K, y + m * ldy + n, ldy, nr, add);
        for (; m < M; m++) tile1(x + m * ldx, wf, ldw, K, y + m * ldy + n, nr, add);
    }
}

/* One matmul with its own parallel region (the threads split w's rows dynamically: a thread that the OS
   deschedules does not hold the others back). */
static void mm(const lb_mat *w, const float *x, long ldx, float *y, long ldy, long M, int add, int threads) {
    long blocks = (w->n + 3) / 4;
    #pragma omp parallel num_threads(threads) if (threads > 1 && blocks > 8)
    {
        float *panel = w->kind == LB_F32 ? NULL : (float *)_mm_malloc(4 * w->k * sizeof(float), 32);
        lb_mm_for(w, x, ldx, y, ldy, M, add, panel);
        if (panel) _mm_free(panel);
    }
}

/* y[M, N] (row stride ldy) (+)= x[M, K] (row stride ldx) @ w[N, K]^T (row stride ldw);  K % 8 == 0. */
void lb_linear(const float *x, long ldx, const float *w, long ldw, float *y, long ldy, long M, long N, long K,
               int add, int threads) {
    lb_mat m = {LB_F32, w, ldw, N, K};
    mm(&m, x, ldx, y, ldy, M, add, threads);
}

/* lb_linear with block-quantised weights (ldw in bytes, K % 32 == 0): each thread expands four weight
   rows at a time into a small fp32 panel and runs the same tiles over it (or, for one row, expands them in
   registers), so the sums are lb_linear's up to summation order while the weights stay 0.625 (Q4_1) or
   1.06 (Q8_0) bytes each in memory instead of 4. */
void lb_linear_q41(const float *x, long ldx, const unsigned char *w, long ldw, float *y, long ldy, long M, long N,
                   long K, int add, int threads) {
    lb_mat m = {LB_Q41, w, ldw, N, K};
    mm(&m, x, ldx, y, ldy, M, add, threads);
}

void lb_linear_q80(const float *x, long ldx, const unsigned char *w, long ldw, float *y, long ldy, long M, long N,
                   long K, int add, int threads) {
    lb_mat m = {LB_Q80, w, ldw, N, K};
    mm(&m, x, ldx, y, ldy, M, add, threads);
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
