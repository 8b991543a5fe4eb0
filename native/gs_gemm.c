/* Q4_K weights times a few rows (decodes of 1-32 tokens on CPU layers),
 * our own kernel in llama.cpp's CPU backend.
 *
 * A verify of k drafts or k parallel sequences multiplies each CPU-layer
 * weight by k rows at once. llama.cpp's kernels for that (CPU_REPACK's 4-row
 * tiles, AMX's 16-row tiles, the plain dot one row at a time) each unpack a
 * weight block again per row or per tile: on the GPU box's Xeon an 8-row
 * decode of its CPU layers read weights at 28-39 GB/s where one row reads
 * them at 51-61. Here a weight block is unpacked once (its nibbles and its
 * 6-bit scales into four vectors of AVX-512 lanes) and multiplied by up to 8
 * rows while in registers (u8 x s8 pairs, then the sub-block scales and the
 * sum in one VNNI instruction), chunks of 8 rows for more.
 *
 * How llama.cpp calls it: ggml's CPU backend asks each extra buffer type for
 * a weight's tensor_traits (ggml-cpu/traits.h) and CPU_REPACK's returns the
 * weight's `extra` for any tensor whose buffer is of its type. A CPU layer's
 * Q4_K weight that only 2-D MUL_MATs read is homed in the plain host copy
 * with a CPU_REPACK buffer (a tag: nothing is repacked) and gemm_traits as
 * its extra, whose compute_forward computes the node here or declines (other
 * row counts, layouts) so that ggml's own plain kernels compute it. */
#include <immintrin.h>
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "gs_engine.h"
#include "gs_split.h"

#define QK 256                 /* weights per Q4_K block */
#define GEMM_CHUNK 8           /* rows per pass over a weight block (accumulators in registers) */
#define GEMM_TYPE_Q4_K 12
#define GEMM_OP_MUL_MAT 29     /* GGML_OP_MUL_MAT (ggml.h), checked by name at gemm_enable */

typedef struct { uint16_t d, dmin; uint8_t scales[12]; uint8_t qs[128]; } block_q4_K;
_Static_assert(sizeof(block_q4_K) == 144, "block_q4_K");

/* struct ggml_compute_params (ggml-cpu-impl.h) */
struct compute_params {
    int    ith, nth;
    size_t wsize;
    void  *wdata;
    void  *threadpool;
    bool   use_ref;
};

/* The quantized rows in the work buffer, per weight block b and row c (rows
 * padded to a chunk): qs[b][c][256] int8 with the sub-blocks in the weight
 * vectors' order, d[b][c] (the row's block scale), d4[b][c][4] (the same,
 * four times: the mins' lanes) and s[b][c][8] int16 (sub-block sums). */
typedef struct { int nb, rows, cols; int8_t *qs; float *d, *d4; int16_t *s; } q8_rows;

static size_t align64(size_t n) { return (n + 63) & ~(size_t)63; }

static q8_rows rows_at(void *work, int nb, int rows) {
    q8_rows q = {nb, rows, (rows + GEMM_CHUNK - 1) / GEMM_CHUNK * GEMM_CHUNK, 0, 0, 0, 0};
    size_t n = (size_t)nb * q.cols;
    char *p = (char *)(((uintptr_t)work + 63) & ~(uintptr_t)63);
    q.qs = (int8_t *)p;  p += align64(n * QK);
    q.d = (float *)p;    p += align64(n * sizeof(float));
    q.d4 = (float *)p;   p += align64(n * 4 * sizeof(float));
    q.s = (int16_t *)p;
    return q;
}

static size_t rows_bytes(int nb, int rows) {
    size_t n = (size_t)nb * ((rows + GEMM_CHUNK - 1) / GEMM_CHUNK * GEMM_CHUNK);
    return 64 + align64(n * QK) + align64(n * sizeof(float)) + align64(n * 4 * sizeof(float)) + n * 8 * sizeof(int16_t);
}

static inline int nearest_int(float f) {   /* ggml-quants.c's */
    float v = f + 12582912.f;
    int i;
    memcpy(&i, &v, sizeof i);
    return (i & 0x007fffff) - 0x00400000;
}

/* A weight vector holds sub-blocks (0|2), (1|3), (4|6), (5|7) (low and high
 * nibbles of 64 bytes): position p of a quantized row holds sub-block sb_at[p]. */
static const int sb_at[8] = {0, 2, 1, 3, 4, 6, 5, 7};

/* Row c's block b as quantize_row_q8_K_ref quantizes it (the same values),
 * laid out for the kernel; a padding row is zeros. */
static void quantize_block(const float *x, q8_rows *q, int b, int c) {
    size_t at = (size_t)b * q->cols + c;
    int8_t *o = q->qs + at * QK;
    int16_t *s = q->s + at * 8;
    float *d4 = q->d4 + at * 4;
    float max = 0, amax = 0;
    for (int j = 0; x && j < QK; j++) {
        float ax = fabsf(x[j]);
        if (ax > amax) { amax = ax; max = x[j]; }
    }
    if (!amax) {
        memset(o, 0, QK);
        memset(s, 0, 8 * sizeof *s);
        q->d[at] = d4[0] = d4[1] = d4[2] = d4[3] = 0;
        return;
    }
    const float iscale = -127.f / max;
    for (int p = 0; p < 8; p++) {
        int sb = sb_at[p], sum = 0;
        for (int j = 0; j < 32; j++) {
            int v = nearest_int(iscale * x[sb * 32 + j]);
            if (v > 127) v = 127;
            o[p * 32 + j] = (int8_t)v;
            sum += v;
        }
        s[sb] = (int16_t)sum;
    }
    q->d[at] = d4[0] = d4[1] = d4[2] = d4[3] = 1 / iscale;
}

#define GEMM_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")))

/* One weight row (nb blocks at x) times rows c0 .. c0+R-1: dst[c * ds]. R is
 * a constant where it is inlined (its accumulators stay in registers). */
static inline __attribute__((always_inline)) GEMM_TARGET void row_times(const block_q4_K *x, const q8_rows *q, int c0,
                                                                        float *dst, size_t ds, const int R) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    /* int16 lanes of each weight vector's two sub-blocks' scales, from the 16 of (scales, mins) */
    const __m512i i0 = _mm512_set_epi16(2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2, 0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0);
    const __m512i i1 = _mm512_set_epi16(3,3,3,3,3,3,3,3,3,3,3,3,3,3,3,3, 1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1);
    const __m512i i2 = _mm512_set_epi16(6,6,6,6,6,6,6,6,6,6,6,6,6,6,6,6, 4,4,4,4,4,4,4,4,4,4,4,4,4,4,4,4);
    const __m512i i3 = _mm512_set_epi16(7,7,7,7,7,7,7,7,7,7,7,7,7,7,7,7, 5,5,5,5,5,5,5,5,5,5,5,5,5,5,5,5);
    const uint32_t kmask1 = 0x3f3f3f3f, kmask2 = 0x0f0f0f0f, kmask3 = 0x03030303;
    const int nb = q->nb, cols = q->cols;
    __m512 acc[GEMM_CHUNK], macc0 = _mm512_setzero_ps(), macc1 = _mm512_setzero_ps();
    for (int c = 0; c < R; c++) acc[c] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        uint32_t u[4];   /* 6-bit scales and mins, unpacked as ggml's x86 q4_K dot does */
        memcpy(u, x[b].scales, 12);
        u[3] = ((u[2] >> 4) & kmask2) | (((u[1] >> 6) & kmask3) << 4);
        const uint32_t m01 = u[1] & kmask1;
        u[1] = (u[2] & kmask2) | (((u[0] >> 6) & kmask3) << 4);
        u[2] = m01;
        u[0] &= kmask1;
        const __m256i sm = _mm256_cvtepu8_epi16(_mm_set_epi32((int)u[3], (int)u[2], (int)u[1], (int)u[0]));
        const __m512i smz = _mm512_castsi256_si512(sm);
        const __m512i s0 = _mm512_permutexvar_epi16(i0, smz), s1 = _mm512_permutexvar_epi16(i1, smz);
        const __m512i s2 = _mm512_permutexvar_epi16(i2, smz), s3 = _mm512_permutexvar_epi16(i3, smz);
        const __m512i mins = _mm512_broadcast_i32x4(_mm256_extracti128_si256(sm, 1));
        const __m512i q0 = _mm512_loadu_si512(x[b].qs), q1 = _mm512_loadu_si512(x[b].qs + 64);
        const __m512i w0 = _mm512_and_si512(q0, low), w1 = _mm512_and_si512(_mm512_srli_epi16(q0, 4), low);
        const __m512i w2 = _mm512_and_si512(q1, low), w3 = _mm512_and_si512(_mm512_srli_epi16(q1, 4), low);
        const __m512 d = _mm512_set1_ps(_cvtsh_ss(x[b].d)), neg_dmin = _mm512_set1_ps(-_cvtsh_ss(x[b].dmin));
        const size_t at = (size_t)b * cols + c0;
        const int8_t *y = q->qs + at * QK;
        const float *yd = q->d + at;
        for (int c = 0; c < R; c++, y += QK) {
            __m512i sum = _mm512_madd_epi16(_mm512_maddubs_epi16(w0, _mm512_loadu_si512(y)), s0);
            sum = _mm512_dpwssd_epi32(sum, _mm512_maddubs_epi16(w1, _mm512_loadu_si512(y + 64)), s1);
            sum = _mm512_dpwssd_epi32(sum, _mm512_maddubs_epi16(w2, _mm512_loadu_si512(y + 128)), s2);
            sum = _mm512_dpwssd_epi32(sum, _mm512_maddubs_epi16(w3, _mm512_loadu_si512(y + 192)), s3);
            acc[c] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(yd[c])), d, acc[c]);
        }
        /* the mins: four rows' sub-block sums per vector, 4 int32 lanes a row */
        const int16_t *ys = q->s + at * 8;
        const float *d4 = q->d4 + at * 4;
        __m512i m = _mm512_madd_epi16(_mm512_loadu_si512(ys), mins);
        macc0 = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(m), _mm512_loadu_ps(d4)), neg_dmin, macc0);
        if (R > 4) {
            m = _mm512_madd_epi16(_mm512_loadu_si512(ys + 32), mins);
            macc1 = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(m), _mm512_loadu_ps(d4 + 16)), neg_dmin, macc1);
        }
    }
    float ml[16];
    for (int c = 0; c < R; c++) {
        if (c % 4 == 0) _mm512_storeu_ps(ml, c < 4 ? macc0 : macc1);
        const float *l = ml + (c % 4) * 4;
        dst[(size_t)c * ds] = _mm512_reduce_add_ps(acc[c]) + ((l[0] + l[1]) + (l[2] + l[3]));
    }
}

/* Weight rows [r0, r1) times every quantized row. */
static GEMM_TARGET void rows_range(const char *w, size_t w_row, const q8_rows *q, float *dst, size_t ds, int64_t r0,
                                   int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
        const block_q4_K *x = (const block_q4_K *)(w + (size_t)r * w_row);
        for (int c0 = 0; c0 < q->rows; c0 += GEMM_CHUNK) {
            float *o = dst + (size_t)c0 * ds + r;
            switch (q->rows - c0 < GEMM_CHUNK ? q->rows - c0 : GEMM_CHUNK) {
            case 1: row_times(x, q, c0, o, ds, 1); break;
            case 2: row_times(x, q, c0, o, ds, 2); break;
            case 3: row_times(x, q, c0, o, ds, 3); break;
            case 4: row_times(x, q, c0, o, ds, 4); break;
            case 5: row_times(x, q, c0, o, ds, 5); break;
            case 6: row_times(x, q, c0, o, ds, 6); break;
            case 7: row_times(x, q, c0, o, ds, 7); break;
            default: row_times(x, q, c0, o, ds, 8); break;
            }
        }
    }
}

/* ---- llama.cpp's side: the tensor_traits object ---------------------------- */

static cpu_barrier_t barrier;
static _Atomic int64_t nodes_done;   /* nodes computed here (tests) */

/* The nodes computed here: a 2-D Q4_K weight's MUL_MAT of 1..GS_GEMM_MAX_ROWS
 * contiguous F32 rows into contiguous F32 rows. */
static int handles(const struct gs_tensor *op) {
    const struct gs_tensor *w = op->src[0], *x = op->src[1];
    return op->op == GEMM_OP_MUL_MAT && w && x && w->type == GEMM_TYPE_Q4_K && x->type == 0 && op->type == 0
           && w->ne[2] == 1 && w->ne[3] == 1 && x->ne[2] == 1 && x->ne[3] == 1 && x->ne[0] == w->ne[0]
           && w->ne[0] % QK == 0 && w->nb[0] == sizeof(block_q4_K) && x->ne[1] >= 1 && x->ne[1] <= GS_GEMM_MAX_ROWS
           && x->nb[0] == sizeof(float) && op->nb[0] == sizeof(float) && op->ne[0] == w->ne[1];
}

static void traits_dtor(void *self) { (void)self; }

static bool traits_work_size(void *self, int n_threads, const struct gs_tensor *op, size_t *size) {
    (void)self; (void)n_threads;
    if (!handles(op)) return false;
    *size = rows_bytes((int)(op->src[0]->ne[0] / QK), (int)op->src[1]->ne[1]);
    return true;
}

/* Every thread of the node: its share of the quantized row blocks, the
 * barrier, its share of the weight rows. */
static bool traits_compute(void *self, struct compute_params *p, struct gs_tensor *op) {
    (void)self;
    if (!handles(op)) return false;
    const struct gs_tensor *w = op->src[0], *x = op->src[1];
    int nb = (int)(w->ne[0] / QK), rows = (int)x->ne[1];
    if (p->wsize < rows_bytes(nb, rows)) return false;   /* planned by another: ggml computes it */
    q8_rows q = rows_at(p->wdata, nb, rows);
    int units = nb * q.cols;
    for (int u = units * p->ith / p->nth; u < units * (p->ith + 1) / p->nth; u++) {
        int b = u / q.cols, c = u % q.cols;
        quantize_block(c < rows ? (const float *)((const char *)x->data + (size_t)c * x->nb[1]) + (size_t)b * QK : NULL,
                       &q, b, c);
    }
    barrier(p->threadpool);
    int64_t n = w->ne[1];
    rows_range(w->data, w->nb[1], &q, op->data, op->nb[1] / sizeof(float), n * p->ith / p->nth, n * (p->ith + 1) / p->nth);
    if (p->ith == 0) nodes_done++;
    return true;
}

/* class ggml::cpu::tensor_traits's virtual table as the Itanium C++ ABI lays
 * it out: the complete and deleting destructors, work_size, compute_forward. */
static void *const traits_vtable[4] = {(void *)traits_dtor, (void *)traits_dtor, (void *)traits_work_size,
                                       (void *)traits_compute};
static struct { void *const *vptr; } traits = {traits_vtable};

static GEMM_TARGET int cpu_has_kernel(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")
           && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma");
}

int gs_gemm_available(void) { return cpu_has_kernel(); }

int64_t gs_gemm_nodes(void) { return nodes_done; }

/* The extra a weight computed here carries; NULL where this CPU or this
 * llama.cpp build cannot (the reason recorded). */
void *gemm_traits(void) {
    if (!cpu_has_kernel()) { fail(GS_E_INVALID, "the CPU kernel for Q4_K rows needs AVX-512 (BW, VL, VNNI)"); return NULL; }
    if (cpu_kernels_load() || !(barrier = cpu_barrier())) return NULL;
    const char *name = G.op_name(GEMM_OP_MUL_MAT);
    if (!name || strcmp(name, "MUL_MAT")) { fail(GS_E_GGML, "ggml op %d is %s, not MUL_MAT", GEMM_OP_MUL_MAT, name); return NULL; }
    return &traits;
}

int gs_gemm_test(const void *w, int64_t n_rows, int64_t k, const float *x, int rows, float *out) {
    if (!cpu_has_kernel()) return fail(GS_E_INVALID, "gs_gemm_test: this CPU has no AVX-512 VNNI");
    if (k % QK || rows < 1 || rows > GS_GEMM_MAX_ROWS) return fail(GS_E_INVALID, "gs_gemm_test: bad shape");
    int nb = (int)(k / QK);
    void *work = malloc(rows_bytes(nb, rows));
    if (!work) return fail(GS_E_NOMEM, "gs_gemm_test: malloc");
    q8_rows q = rows_at(work, nb, rows);
    for (int b = 0; b < nb; b++)
        for (int c = 0; c < q.cols; c++) quantize_block(c < rows ? x + (size_t)c * k + (size_t)b * QK : NULL, &q, b, c);
    rows_range(w, (size_t)nb * sizeof(block_q4_K), &q, out, (size_t)n_rows, 0, n_rows);
    free(work);
    return GS_OK;
}
