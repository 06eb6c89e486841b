/* The opt-in approximate matmul (engine.int8_activations): rows of x rounded to int8 per block of 32
   and multiplied with the Q4_1 / Q8_0 weight blocks in integers (maddubs), the way llama.cpp multiplies.
   About three times fewer instructions per weight than expanding the weights to float32; the price is the
   rounding of the activations (relative error up to 1/254 of a block's largest value). Q4_1's offset
   term uses the exact float sum of the block (m * sum(x)), so only d * sum(x * q) is approximated. */
#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <omp.h>
#include <string.h>

#include "kernels.h"

static inline float hsum8(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

void lb_quantize_for(const float *x, long ldx, long M, const lb_xq *xq) {
    long nb = xq->k / 32;
    #pragma omp for schedule(static)
    for (long it = 0; it < M * nb; it++) {
        long m = it / nb, b = it % nb;
        const float *v = x + m * ldx + b * 32;
        float amax = 0.0f, sum = 0.0f;
        for (int j = 0; j < 32; j++) {
            float a = fabsf(v[j]);
            if (a > amax) amax = a;
            sum += v[j];
        }
        float d = amax / 127.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
        signed char *q = xq->q + m * xq->k + b * 32;
        for (int j = 0; j < 32; j++) q[j] = (signed char)lrintf(v[j] * id);
        xq->d[m * nb + b] = d;
        xq->s[m * nb + b] = sum;
    }
}

/* One x row against one Q4_1 weight row. */
static float dot_q41(const signed char *xq, const float *xd, const float *xs, const unsigned char *w, long nb) {
    const __m128i low4 = _mm_set1_epi8(0x0F);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc = _mm256_setzero_ps();
    float offset = 0.0f;
    for (long b = 0; b < nb; b++) {
        const unsigned char *bp = w + b * 20;
        unsigned short hd, hm;
        memcpy(&hd, bp, 2);
        memcpy(&hm, bp + 2, 2);
        __m128i qs = _mm_loadu_si128((const __m128i *)(bp + 4));
        __m256i w8 = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(qs, 4), low4), _mm_and_si128(qs, low4));
        __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(w8, _mm256_loadu_si256((const __m256i *)(xq + b * 32))),
                                      ones);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(hd) * xd[b]), _mm256_cvtepi32_ps(p), acc);
        offset += _cvtsh_ss(hm) * xs[b];
    }
    return hsum8(acc) + offset;
}

/* One x row against one Q8_0 weight row (maddubs takes one unsigned operand: |w| and x with w's sign). */
static float dot_q80(const signed char *xq, const float *xd, const unsigned char *w, long nb) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc = _mm256_setzero_ps();
    for (long b = 0; b < nb; b++) {
        const unsigned char *bp = w + b * 34;
        unsigned short hd;
        memcpy(&hd, bp, 2);
        __m256i w8 = _mm256_loadu_si256((const __m256i *)(bp + 2));
        __m256i x8 = _mm256_loadu_si256((const __m256i *)(xq + b * 32));
        __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w8, w8), _mm256_sign_epi8(x8, w8)), ones);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(hd) * xd[b]), _mm256_cvtepi32_ps(p), acc);
    }
    return hsum8(acc);
}

void lb_mm_i8_for(const lb_mat *w, const lb_xq *x, float *y, long ldy, long M, int add) {
    long N = w->n, nb = w->k / 32;
    long chunk = N / (omp_get_num_threads() * 32L);
    if (chunk < 1) chunk = 1;
    #pragma omp for schedule(dynamic, chunk) nowait
    for (long n = 0; n < N; n++) {
        const unsigned char *row = (const unsigned char *)w->w + n * w->ld;
        for (long m = 0; m < M; m++) {
            const signed char *xq = x->q + m * x->k;
            const float *xd = x->d + m * nb, *xs = x->s + m * nb;
            float s = w->kind == LB_Q41 ? dot_q41(xq, xd, xs, row, nb) : dot_q80(xq, xd, row, nb);
            y[m * ldy + n] = add ? y[m * ldy + n] + s : s;
        }
    }
}

/* y[M, N] = x[M, K] @ w^T for block weights (kind LB_Q41 / LB_Q80), x rounded to int8 (the output layer). */
void lb_linear_i8(const float *x, long ldx, int kind, const unsigned char *w, long ldw, float *y, long ldy, long M,
                  long N, long K, int threads) {
    lb_mat m = {kind, w, ldw, N, K};
    float *d = (float *)malloc(sizeof(float) * 2 * M * (K / 32));
    lb_xq xq = {(signed char *)_mm_malloc((size_t)M * K, 32), d, d + M * (K / 32), K};
    #pragma omp parallel num_threads(threads) if (threads > 1)
    {
        lb_quantize_for(x, ldx, M, &xq);
        lb_mm_i8_for(&m, &xq, y, ldy, M, 0);
    }
    _mm_free(xq.q);
    free(d);
}
