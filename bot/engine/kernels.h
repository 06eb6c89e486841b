/* What kernels.c shares with decode_step.c (both are built into one library by bot/engine/kernels.py). */
#ifndef LB_KERNELS_H
#define LB_KERNELS_H

enum { LB_F32 = 0, LB_Q41 = 1, LB_Q80 = 2, LB_BF16 = 3 };

/* A weight matrix w[n, k] used as y = x @ w^T: float32 or bfloat16 rows (ld in elements, k % 8 == 0) or
   GGUF Q4_1 / Q8_0 block rows (ld in bytes, k % 32 == 0). bfloat16 widens to float32 exactly, so its
   products are those of float32 rows holding the same values. */
typedef struct {
    int kind;
    const void *w;
    long ld;
    long n;
    long k;
} lb_mat;

/* y[M, n] (+)= x[M, k] @ w^T for this thread's share of w's rows. Call it from inside a parallel region
   (or outside one: then it does all of them); no barrier at its end. panel: 4 * k floats of this
   thread's own (used only for block and bfloat16 weights with M > 1). */
void lb_mm_for(const lb_mat *w, const float *x, long ldx, float *y, long ldy, long M, int add, float *panel);

/* Rows of x quantised to int8 in blocks of 32 (the opt-in approximate path, kernels_int8.c): q [M, k],
   per block its scale d (x ~ d * q) and the exact float sum s of its 32 values. */
typedef struct {
    signed char *q;
    float *d, *s;
    long k;
} lb_xq;

/* This thread's share of quantising x [M, k] (k % 32 == 0) into xq; ends with a barrier. */
void lb_quantize_for(const float *x, long ldx, long M, const lb_xq *xq);

/* lb_mm_for for block weights (Q4_1, Q8_0) with int8 rows of x: integer dot products per block, as
   llama.cpp does; no barrier at its end. */
void lb_mm_i8_for(const lb_mat *w, const lb_xq *x, float *y, long ldy, long M, int add);

#endif
