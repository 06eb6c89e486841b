/* One decode step of a Llama-shaped model for every row of the running batch, all layers in one call.

   Done in Python, a step is ~20 tensor operations per layer (norms, three projection groups with their
   LoRA, RoPE, the cache write, attention, SiLU), each paying dispatch and a thread fork-join: at one row
   that overhead was most of the step. Here the threads are forked once per step and meet at barriers.
   The arithmetic is the Python path's (bot/engine/fast_llama.py), up to floating-point summation order:
   rms_norm, x @ W^T, then + (x @ A^T * scaling) @ B^T for the rows' own adapters, RoPE with rotate_half's
   sign folded into sin, softmax attention over each row's own columns of the slot cache. */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

typedef struct {
    const float *ln1, *ln2;
    lb_mat q, k, v, o, gate, up, down;
} lb_layer;

typedef struct {
    int n_layers, hidden, n_heads, n_kv, head_dim, inter;
    float eps, scale;
    const lb_layer *layers;
    const float *cos, *sin; /* [positions, head_dim] */
} lb_model;

/* One projection group's LoRA rows in use this step (r == 0: none). A: rows [r, in] of layer l at
   A + l * a_layer, row stride lda. B: the transposed stack [out, cap] from column lo, at B + l * b_layer,
   row stride ldb (strides in elements). mult: [rows or 1, r] (ldm 0: one row for all), each row's scaling
   where its adapter's columns are, 0 elsewhere. kind: LB_F32 or LB_BF16, the stacks' element type. */
typedef struct {
    const void *A;
    long lda, a_layer;
    const void *B;
    long ldb, b_layer;
    const float *mult;
    long ldm;
    long r;
    int kind;
} lb_lora;

/* Element i of a bfloat16 array as float32 (exact: its bits are the float's top half). */
static inline float bf16_at(const unsigned short *p, long i) {
    unsigned int bits = (unsigned int)p[i] << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

enum { G_QKV, G_O, G_GU, G_DOWN };

static void rms_rows(float *x, const float *add, const float *w, float *h, int n, int D, float eps) {
    #pragma omp for schedule(static)
    for (int i = 0; i < n; i++) {
        float *xi = x + (long)i * D, *hi = h + (long)i * D;
        if (add)
            for (int d = 0; d < D; d++) xi[d] += add[(long)i * D + d];
        float ss = 0.0f;
        for (int d = 0; d < D; d++) ss += xi[d] * xi[d];
        float inv = 1.0f / sqrtf(ss / (float)D + eps);
        for (int d = 0; d < D; d++) hi[d] = (xi[d] * inv) * w[d];
    }
}

/* The base projection(s) (nowait) and, for a group with LoRA rows, x @ A^T into la; then the barrier and
   la *= mult and y += la @ B^T. */
static void project(const lb_mat *const *ws, int nw, const long *offs, const lb_lora *g, int layer, const float *x,
                    long ldx, float *y, long ldy, int n, float *la, float *panel, const lb_xq *xq_buf) {
    lb_xq xq = {0};
    if (xq_buf) {
        xq = (lb_xq){xq_buf->q, xq_buf->d, xq_buf->s, ws[0]->k};
        lb_quantize_for(x, ldx, n, &xq);
    }
    for (int j = 0; j < nw; j++) {
        if (xq_buf && ws[j]->kind != LB_F32)
            lb_mm_i8_for(ws[j], &xq, y + offs[j], ldy, n, 0);
        else
            lb_mm_for(ws[j], x, ldx, y + offs[j], ldy, n, 0, panel);
    }
    const long esz = g->kind == LB_F32 ? 4 : 2;
    if (g->r) {
        lb_mat a = {g->kind, (const char *)g->A + layer * g->a_layer * esz, g->lda, g->r, ws[0]->k};
        lb_mm_for(&a, x, ldx, la, g->r, n, 0, panel);
    }
    #pragma omp barrier
    if (!g->r) return;
    #pragma omp for schedule(static)
    for (long e = 0; e < n * g->r; e++) la[e] *= g->mult[(e / g->r) * g->ldm + e % g->r];
    const char *B = (const char *)g->B + layer * g->b_layer * esz;
    if (g->r % 8 == 0) {
        lb_mat b = {g->kind, B, g->ldb, ldy, g->r};
        lb_mm_for(&b, la, g->r, y, ldy, n, 1, panel);
        #pragma omp barrier
        return;
    }
    #pragma omp for schedule(static)
    for (long o = 0; o < ldy; o++) {
        const float *bo = (const float *)(B + o * g->ldb * esz);
        if (g->kind == LB_BF16) {   /* widened into the panel first: one loop, the same sums as float32 */
            for (long j = 0; j < g->r; j++) panel[j] = bf16_at((const unsigned short *)bo, j);
            bo = panel;
        }
        for (int i = 0; i < n; i++) {
            float s = 0.0f;
            for (long j = 0; j < g->r; j++) s += la[i * g->r + j] * bo[j];
            y[i * ldy + o] += s;
        }
    }
}

static float dot(const float *a, const float *b, int n) {
    __m256 s = _mm256_setzero_ps();
    int d = 0;
    for (; d + 8 <= n; d += 8) s = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), s);
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    lo = _mm_hadd_ps(lo, lo);
    lo = _mm_hadd_ps(lo, lo);
    float r = _mm_cvtss_f32(lo);
    for (; d < n; d++) r += a[d] * b[d];
    return r;
}

/* x [n, hidden]: the rows' embeddings in, their last hidden states (before the final norm) out.
   lens[i]: row i's cached tokens (its new token goes to column lens[i] and has that position).
   slots[i]: the cache row that row i reads and writes (NULL: row i's own). A prefill is this step with one
   row per prompt token: a prompt's tokens share its slot at consecutive positions, and since every row's
   key/value is written before any row attends, each token attends to itself and the tokens before it.
   kv: [layers, kv_rows, 2, n_kv, kv_cols, head_dim], or with one_layer a single layer's block that every
   layer reuses (a prefill whose keys/values are not kept). lora: 4 groups (qkv, o, gate/up, down) or NULL.
   int8: the block-quantised base weights multiply int8-rounded activations (kernels_int8.c; approximate). */
void lb_decode_step(const lb_model *m, const lb_lora *lora, int n, float *x, const long *lens, const long *slots,
                    float *kv, long kv_rows, long kv_cols, int one_layer, int threads, int int8) {
    const int D = m->hidden, nq = m->n_heads, nkv = m->n_kv, hd = m->head_dim, I = m->inter, half = hd / 2;
    const int g = nq / nkv;
    const long qd = (long)nq * hd, kvd = (long)nkv * hd, QKV = qd + 2 * kvd;
    const long s_head = kv_cols * hd, s_kv = nkv * s_head, s_row = 2 * s_kv, s_layer = one_layer ? 0 : kv_rows * s_row;
    long rmax = 1;
    static const lb_lora none = {0};
    for (int j = 0; lora && j < 4; j++)
        if (lora[j].r > rmax) rmax = lora[j].r;
    float *buf = (float *)_mm_malloc(sizeof(float) * n * (2 * D + QKV + qd + 2 * I + I + rmax), 32);
    float *h = buf, *tmp = h + (long)n * D, *qkv = tmp + (long)n * D, *att = qkv + n * QKV;
    float *gu = att + n * qd, *act = gu + (long)n * 2 * I, *la = act + (long)n * I;
    long maxw = 0;
    for (int i = 0; i < n; i++)
        if (lens[i] + 1 > maxw) maxw = lens[i] + 1;
    const long qkv_offs[3] = {0, qd, qd + kvd}, gu_offs[2] = {0, I}, zero[1] = {0};
    /* At more rows the float tiles reuse each expanded weight row for every row of x; the int8 loop does
       not (measured: slower than float32 at 16 rows). */
    if (n > 2) int8 = 0;
    long kmax = I > D ? I : D;
    if (qd > kmax) kmax = qd;
    lb_xq xq = {NULL, NULL, NULL, 0};
    if (int8) {
        xq.q = (signed char *)_mm_malloc((size_t)n * kmax, 32);
        xq.d = (float *)malloc(sizeof(float) * n * (kmax / 32) * 2);
        xq.s = xq.d + n * (kmax / 32);
    }
    const lb_xq *xqp = int8 ? &xq : NULL;
    #pragma omp parallel num_threads(threads) if (threads > 1)
    {
        /* Expanded weight rows: the base matrices' (K <= max(I, D)) and bfloat16 LoRA stacks' (K <= rmax). */
        long pk = I > D ? I : D;
        if (rmax > pk) pk = rmax;
        float *panel = (float *)_mm_malloc(sizeof(float) * 4 * pk, 32);
        float *sc = (float *)malloc(sizeof(float) * maxw);
        float *rot = (float *)malloc(sizeof(float) * hd);
        for (int l = 0; l < m->n_layers; l++) {
            const lb_layer *w = m->layers + l;
            const lb_lora *gl[4];
            for (int j = 0; j < 4; j++) gl[j] = lora ? lora + j : &none;
            float *layer_kv = kv + l * s_layer;
            rms_rows(x, l ? tmp : NULL, w->ln1, h, n, D, m->eps);
            const lb_mat *wqkv[3] = {&w->q, &w->k, &w->v};
            project(wqkv, 3, qkv_offs, gl[G_QKV], l, h, D, qkv, QKV, n, la, panel, xqp);
            /* RoPE on the query and key heads; keys and values into the row's next cache column. */
            #pragma omp for schedule(static)
            for (long it = 0; it < (long)n * (nq + nkv); it++) {
                int i = (int)(it / (nq + nkv)), hh = (int)(it % (nq + nkv));
                float *v = qkv + i * QKV + (long)hh * hd;
                const float *c = m->cos + lens[i] * hd, *s = m->sin + lens[i] * hd;
                for (int d = 0; d < hd; d++) rot[d] = v[d] * c[d] + v[(d + half) % hd] * s[d];
                if (hh < nq) {
                    memcpy(v, rot, sizeof(float) * hd);
                } else {
                    float *dst = layer_kv + (slots ? slots[i] : i) * s_row + (hh - nq) * s_head + lens[i] * hd;
                    memcpy(dst, rot, sizeof(float) * hd);
                    memcpy(dst + s_kv, qkv + i * QKV + qd + kvd + (long)(hh - nq) * hd, sizeof(float) * hd);
                }
            }
            #pragma omp for schedule(dynamic, 1)
            for (long it = 0; it < (long)n * nq; it++) {
                int i = (int)(it / nq), hq = (int)(it % nq);
                const float *q = qkv + i * QKV + (long)hq * hd;
                const float *K = layer_kv + (slots ? slots[i] : i) * s_row + (hq / g) * s_head, *V = K + s_kv;
                long width = lens[i] + 1;
                float mx = -INFINITY, sum = 0.0f;
                for (long c = 0; c < width; c++) {
                    sc[c] = dot(q, K + c * hd, hd) * m->scale;
                    if (sc[c] > mx) mx = sc[c];
                }
                for (long c = 0; c < width; c++) sum += (sc[c] = expf(sc[c] - mx));
                float *o = att + i * qd + (long)hq * hd;
                memset(o, 0, sizeof(float) * hd);
                for (long c = 0; c < width; c++) {
                    float p = sc[c] / sum;
                    const float *vc = V + c * hd;
                    for (int d = 0; d < hd; d++) o[d] += p * vc[d];
                }
            }
            const lb_mat *wo[1] = {&w->o};
            project(wo, 1, zero, gl[G_O], l, att, qd, tmp, D, n, la, panel, xqp);
            rms_rows(x, tmp, w->ln2, h, n, D, m->eps);
            const lb_mat *wgu[2] = {&w->gate, &w->up};
            project(wgu, 2, gu_offs, gl[G_GU], l, h, D, gu, 2 * I, n, la, panel, xqp);
            #pragma omp for schedule(static)
            for (long it = 0; it < (long)n * I; it++) {
                long i = it / I, e = it % I;
                float gate = gu[i * 2 * I + e];
                act[it] = gate / (1.0f + expf(-gate)) * gu[i * 2 * I + I + e];
            }
            const lb_mat *wd[1] = {&w->down};
            project(wd, 1, zero, gl[G_DOWN], l, act, I, tmp, D, n, la, panel, xqp);
        }
        #pragma omp for schedule(static)
        for (long e = 0; e < (long)n * D; e++) x[e] += tmp[e];
        free(rot);
        free(sc);
        _mm_free(panel);
    }
    _mm_free(buf);
    if (int8) {
        _mm_free(xq.q);
        free(xq.d);
    }
}
