/* The CPU's part of split expert layers (gs_split.c): llama.cpp's own CPU
 * kernels, resolved from the CPU backend the process loaded, and a pool of
 * threads computing a layer's left-out experts with them in three phases
 * (gate and up rows; the activation, quantized; down rows), the hook's
 * thread helping. Workers spin between layers (the next one comes within a
 * fraction of a millisecond while generating), then sleep. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <link.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gs_abi.h"
#include "gs_split.h"
#include "gs_util.h"
#include "gguf_stream.h"

/* ---- the CPU kernels: llama.cpp's own, from its CPU backend ------------------ */

typedef void (*vec_dot_fn)(int n, float *s, size_t bs, const void *x, size_t bx, const void *y, size_t by, int nrc);
typedef void (*from_float_fn)(const float *x, void *y, int64_t k);
struct type_traits_cpu {          /* struct ggml_type_traits_cpu (ggml-cpu.h) */
    from_float_fn from_float;
    vec_dot_fn    vec_dot;
    int32_t       vec_dot_type;
    int64_t       nrows;
};
static const struct type_traits_cpu *(*traits_cpu)(int type);
static size_t (*row_size)(int type, int64_t n);
static void (*swiglu)(int n, float *y, const float *x, const float *g);   /* y = silu(x) * g, as the CPU op */

/* The CPU backend's library as the process loaded it (libggml-cpu.so.0 on
 * llama-cpp-python's wheels): another copy would have uninitialised tables. */
static int find_cpu_lib(struct dl_phdr_info *info, size_t size, void *out) {
    (void)size;
    const char *slash = info->dlpi_name ? strrchr(info->dlpi_name, '/') : NULL;
    if (!slash || strncmp(slash + 1, "libggml-cpu", 11) != 0) return 0;
    snprintf(out, 4096, "%s", info->dlpi_name);
    return 1;
}

int cpu_kernels_load(void) {
    if (traits_cpu && row_size && swiglu) return GS_OK;
    char path[4096] = "";
    Dl_info info;
    if (!dl_iterate_phdr(find_cpu_lib, path) || !dladdr((void *)G.nbytes, &info) || !info.dli_fname)
        return fail(GS_E_DLOPEN, "split experts: llama.cpp's CPU backend (libggml-cpu) is not loaded");
    void *h = dlopen(path, RTLD_NOW | RTLD_NOLOAD), *base = dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD);
    traits_cpu = h ? (const struct type_traits_cpu *(*)(int))dlsym(h, "ggml_get_type_traits_cpu") : NULL;
    swiglu = h ? (void (*)(int, float *, const float *, const float *))dlsym(h, "ggml_vec_swiglu_f32") : NULL;
    row_size = base ? (size_t (*)(int, int64_t))dlsym(base, "ggml_row_size") : NULL;
    if (!traits_cpu || !row_size || !swiglu)
        return fail(GS_E_DLOPEN, "split experts: ggml_get_type_traits_cpu / ggml_vec_swiglu_f32 (%s) or ggml_row_size "
                    "not found", path);
    split_graph_load(h, base);   /* optional: prompts fall back to the pool's kernels */
    return GS_OK;
}

int cpu_kernels_have(int type) {
    const struct type_traits_cpu *tr = traits_cpu(type);
    return tr && tr->vec_dot && traits_cpu(tr->vec_dot_type)->from_float;
}

/* ---- one layer's CPU work: experts of some rows, in three phases ------------- */

#ifndef CHUNK_ROWS                 /* -D to time others (tools/cpu_experts) */
#define CHUNK_ROWS 32
#endif
#ifndef TILE_ROWS
#define TILE_ROWS 16                /* weight rows a unit's jobs pass over together */
#endif
#define PHASE_DONE 4
#define MANY_ROWS 16              /* from this many rows (prompts): phase 0 quantizes them, units by expert */

struct split_pool {
    pthread_t *th;
    int n_th;
    atomic_int gen, phase, active, sleeping, stop;
    atomic_int next[PHASE_DONE], done[PHASE_DONE];
    int n_tasks[PHASE_DONE];
    pthread_mutex_t mu;
    pthread_cond_t cv;
    /* the current layer */
    const char *src[3];           /* expert 0 of each tensor in host memory */
    size_t nb1[3], nb2[3];
    const float *bias[3];         /* expert 0's biases, or NULL */
    size_t bias_nb1[3];
    int oai;
    int n_ff, n_embd, chunks_ff, chunks_embd;
    const struct type_traits_cpu *tr[3];
    size_t xq_row, hq_row;        /* bytes of a quantized x row (gate/up) and h (down) */
    int n_jobs;
    cpu_job *jobs;
    /* the matrix phases' units: jobs perm[unit_at[u] .. unit_at[u + 1]) share an expert,
     * whose weight rows a task reads once for all of them (one job per unit for few rows) */
    int *perm, *unit_at, n_units;
    size_t cap_perm, cap_unit;
    const float *x;               /* the ubatch's rows (n_embd floats each) */
    char *xq;                     /* per row of the ubatch: x quantized for gate, then for up */
    float *g, *u;                 /* per job: n_ff */
    char *hq;                     /* per job: silu(g)*u quantized for down */
    float *y;                     /* per job: n_embd */
    size_t cap_jobs, cap_xq, cap_g, cap_u, cap_hq, cap_y;
    split_graph *graph;           /* a prompt's jobs, where llama.cpp's graph computes them (NULL: never) */
    int graph_on;                 /* the posted layer's jobs went to it */
};

static void cpu_relax(void) { __asm__ __volatile__("" ::: "memory"); }

/* An expert's bias onto its rows r0..r1 (llama.cpp's ggml_add_id after the matrix). */
static void add_bias(float *out, const float *bias, size_t nb1, int expert, int r0, int r1) {
    if (!bias) return;
    const float *b = (const float *)((const char *)bias + (size_t)expert * nb1);
    for (int r = r0; r < r1; r++) out[r] += b[r];
}

/* gpt-oss's activation, as llama.cpp's CPU op swiglu_oai with the alpha and
 * limit its graph builds (build_moe_ffn, LLM_FFN_SWIGLU_OAI_MOE). */
static void swiglu_oai(int n, float *y, const float *g, const float *u) {
    const float alpha = 1.702f, limit = 7.0f;
    for (int k = 0; k < n; k++) {
        const float x = g[k] < limit ? g[k] : limit;
        const float v = u[k] < -limit ? -limit : u[k] > limit ? limit : u[k];
        y[k] = x / (1.f + expf(alpha * (-x))) * (v + 1.f);
    }
}

/* Row r of x quantized for gate and for up (vec_dot's input types). */
static void quantize_row(struct split_pool *p, int r) {
    for (int m = W_GATE; m <= W_UP; m++)
        traits_cpu(p->tr[m]->vec_dot_type)->from_float(p->x + (size_t)r * p->n_embd,
                                                       p->xq + (size_t)r * 2 * p->xq_row + m * p->xq_row, p->n_embd);
}

/* Matrix m's rows r0..r1 of unit u's expert against each of its jobs'
 * inputs (x quantized for gate / up, the activation for down): a tile of
 * TILE_ROWS weight rows stays in L1 while the jobs pass (ggml's tiles). */
static void unit_rows(struct split_pool *p, int m, int u, int r0, int r1) {
    int a = p->unit_at[u], b = p->unit_at[u + 1], expert = p->jobs[p->perm[a]].expert;
    int down = m == W_DOWN, n = down ? p->n_ff : p->n_embd;
    size_t out_n = down ? p->n_embd : p->n_ff;
    const char *w = p->src[m] + (size_t)expert * p->nb2[m];
    float *outs = m == W_GATE ? p->g : m == W_UP ? p->u : p->y;
    for (int rb = r0; rb < r1; rb += TILE_ROWS)
        for (int k = a; k < b; k++) {
            int j = p->perm[k];
            const char *in = down ? p->hq + (size_t)j * p->hq_row
                                  : p->xq + (size_t)p->jobs[j].row * 2 * p->xq_row + (size_t)m * p->xq_row;
            float *out = outs + (size_t)j * out_n;
            for (int r = rb; r < rb + TILE_ROWS && r < r1; r++)
                p->tr[m]->vec_dot(n, &out[r], 0, w + r * p->nb1[m], 0, in, 0, 1);
        }
    for (int k = a; k < b; k++) add_bias(outs + (size_t)p->perm[k] * out_n, p->bias[m], p->bias_nb1[m], expert, r0, r1);
}

static void do_task(struct split_pool *p, int ph, int i) {
    if (ph == 0) {                /* a row quantized (a prompt's many rows: in parallel) */
        quantize_row(p, i);
    } else if (ph == 1) {         /* gate and up rows: unit, matrix, chunk */
        int per_unit = 2 * p->chunks_ff, r0 = (i % p->chunks_ff) * CHUNK_ROWS;
        int r1 = r0 + CHUNK_ROWS < p->n_ff ? r0 + CHUNK_ROWS : p->n_ff;
        unit_rows(p, (i % per_unit) / p->chunks_ff, i / per_unit, r0, r1);
    } else if (ph == 2) {         /* the activation, quantized for down */
        float *g = p->g + (size_t)i * p->n_ff, *u = p->u + (size_t)i * p->n_ff;
        if (p->oai) swiglu_oai(p->n_ff, g, g, u);
        else swiglu(p->n_ff, g, g, u);
        traits_cpu(p->tr[W_DOWN]->vec_dot_type)->from_float(g, p->hq + (size_t)i * p->hq_row, p->n_ff);
    } else {                      /* down rows: unit, chunk */
        int r0 = (i % p->chunks_embd) * CHUNK_ROWS;
        unit_rows(p, W_DOWN, i / p->chunks_embd, r0, r0 + CHUNK_ROWS < p->n_embd ? r0 + CHUNK_ROWS : p->n_embd);
    }
}

static void advance(struct split_pool *p, int ph) {
    int nx = ph + 1;
    while (nx < PHASE_DONE && p->n_tasks[nx] == 0) nx++;
    atomic_store(&p->phase, nx);
}

/* Take tasks until the layer's work is done (workers and the hook's thread alike). */
static void run_phases(struct split_pool *p) {
    for (;;) {
        int ph = atomic_load(&p->phase);
        if (ph >= PHASE_DONE) return;
        int i = atomic_fetch_add(&p->next[ph], 1);
        if (i >= p->n_tasks[ph]) {
            while (atomic_load(&p->phase) == ph) cpu_relax();
            continue;
        }
        do_task(p, ph, i);
        if (atomic_fetch_add(&p->done[ph], 1) + 1 == p->n_tasks[ph]) advance(p, ph);
    }
}

#define SPIN_ROUNDS 2000000       /* ~ms: the next layer's work comes sooner while generating */

static void *worker(void *arg) {
    struct split_pool *p = arg;
    int seen = 0;
    while (!atomic_load(&p->stop)) {
        for (long spins = 0; atomic_load(&p->gen) == seen && !atomic_load(&p->stop); spins++) {
            if (spins < SPIN_ROUNDS) { cpu_relax(); continue; }
            pthread_mutex_lock(&p->mu);
            atomic_fetch_add(&p->sleeping, 1);
            while (atomic_load(&p->gen) == seen && !atomic_load(&p->stop)) pthread_cond_wait(&p->cv, &p->mu);
            atomic_fetch_sub(&p->sleeping, 1);
            pthread_mutex_unlock(&p->mu);
        }
        atomic_fetch_add(&p->active, 1);
        int g = atomic_load(&p->gen);
        if (g != seen) { seen = g; run_phases(p); }
        atomic_fetch_sub(&p->active, 1);
    }
    return NULL;
}

void split_pool_free(split_pool *p) {
    if (!p) return;
    atomic_store(&p->stop, 1);
    pthread_mutex_lock(&p->mu);
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    for (int k = 0; k < p->n_th; k++) pthread_join(p->th[k], NULL);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv);
    split_graph_free(p->graph);
    free(p->th); free(p->jobs); free(p->perm); free(p->unit_at); free(p->xq); free(p->g); free(p->u); free(p->hq);
    free(p->y);
    free(p);
}

int split_pool_create(int n_workers, split_pool **out) {
    struct split_pool *p = calloc(1, sizeof *p);
    if (!p) return fail(GS_E_NOMEM, "split experts: calloc");
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    atomic_store(&p->phase, PHASE_DONE);
    p->th = calloc(n_workers > 0 ? n_workers : 1, sizeof *p->th);
    if (!p->th) { free(p); return fail(GS_E_NOMEM, "split experts: calloc"); }
    for (; p->n_th < n_workers; p->n_th++)
        if (pthread_create(&p->th[p->n_th], NULL, worker, p)) {
            split_pool_free(p);
            return fail(GS_E_NOMEM, "split experts: pthread_create failed");
        }
    /* GGUF_STREAM_PROMPT_CPU_KERNEL=pool keeps a prompt's experts on the pool's
     * kernels (an A/B of the two on one machine) */
    const char *kernel = getenv("GGUF_STREAM_PROMPT_CPU_KERNEL");
    if (!(kernel && !strcmp(kernel, "pool")) && split_graph_create(n_workers + 1, &p->graph))
        p->graph = NULL;   /* no thread for it: the pool computes prompts too */
    *out = p;
    return GS_OK;
}

static int grow(void **buf, size_t *cap, size_t want) {
    if (want <= *cap) return GS_OK;
    void *n = realloc(*buf, want);
    if (!n) return fail(GS_E_NOMEM, "split experts: realloc(%zu)", want);
    *buf = n;
    *cap = want;
    return GS_OK;
}

cpu_job *split_pool_jobs(split_pool *p, size_t n) {
    while (atomic_load(&p->active) || atomic_load(&p->phase) < PHASE_DONE) cpu_relax();   /* the last layer's: done */
    return grow((void **)&p->jobs, &p->cap_jobs, n * sizeof(cpu_job)) ? NULL : p->jobs;
}

/* The matrix phases' units: one per job, or (by_expert) one per expert
 * with its jobs in their order (a counting sort). */
static int make_units(split_pool *p, int by_expert) {
    int n = p->n_jobs, max = 0;
    if (grow((void **)&p->perm, &p->cap_perm, (size_t)(n ? n : 1) * sizeof(int))
        || grow((void **)&p->unit_at, &p->cap_unit, (size_t)(n + 1) * sizeof(int)))
        return GS_E_NOMEM;
    if (!by_expert) {
        for (int j = 0; j <= n; j++) { if (j < n) p->perm[j] = j; p->unit_at[j] = j; }
        p->n_units = n;
        return GS_OK;
    }
    for (int j = 0; j < n; j++) if (p->jobs[j].expert > max) max = p->jobs[j].expert;
    int at[max + 2];
    memset(at, 0, sizeof at);
    for (int j = 0; j < n; j++) at[p->jobs[j].expert + 1]++;
    for (int e = 0; e <= max; e++) at[e + 1] += at[e];
    p->n_units = 0;
    for (int e = 0; e <= max; e++) if (at[e + 1] > at[e]) p->unit_at[p->n_units++] = at[e];
    p->unit_at[p->n_units] = n;
    for (int j = 0; j < n; j++) p->perm[at[p->jobs[j].expert]++] = j;
    return GS_OK;
}

int split_pool_post(split_pool *p, const expert_mats *mats, const float *x, int n_rows, int n_jobs) {
    while (atomic_load(&p->active)) cpu_relax();     /* stragglers of the last layer leave first */
    for (int m = 0; m < 3; m++) {
        p->src[m] = mats->src[m];
        p->nb1[m] = mats->nb1[m];
        p->nb2[m] = mats->nb2[m];
        p->tr[m] = traits_cpu(mats->type[m]);
        p->bias[m] = mats->bias[m];
        p->bias_nb1[m] = mats->bias_nb1[m];
    }
    p->oai = mats->oai;
    p->n_jobs = n_jobs;
    p->n_embd = mats->n_embd;
    p->n_ff = mats->n_ff;
    p->chunks_ff = (p->n_ff + CHUNK_ROWS - 1) / CHUNK_ROWS;
    p->chunks_embd = (p->n_embd + CHUNK_ROWS - 1) / CHUNK_ROWS;
    p->xq_row = row_size(p->tr[W_GATE]->vec_dot_type, p->n_embd);
    size_t up_row = row_size(p->tr[W_UP]->vec_dot_type, p->n_embd);
    if (up_row > p->xq_row) p->xq_row = up_row;
    p->hq_row = row_size(p->tr[W_DOWN]->vec_dot_type, p->n_ff);
    size_t nj = p->n_jobs;
    if (grow((void **)&p->xq, &p->cap_xq, (size_t)n_rows * 2 * p->xq_row)
        || grow((void **)&p->g, &p->cap_g, nj * p->n_ff * sizeof(float))
        || grow((void **)&p->u, &p->cap_u, nj * p->n_ff * sizeof(float))
        || grow((void **)&p->hq, &p->cap_hq, nj * p->hq_row)
        || grow((void **)&p->y, &p->cap_y, nj * p->n_embd * sizeof(float)))
        return GS_E_NOMEM;
    p->x = x;
    /* a prompt's many rows: llama.cpp's MUL_MAT_ID graph computes them (its
     * tiled kernels), or else quantized in a phase of their own (that costs a
     * generated token time) and grouped by expert, its rows read once */
    int many_rows = n_rows >= MANY_ROWS;
    p->graph_on = many_rows && p->graph && split_graph_usable(mats);
    if (p->graph_on) return split_graph_post(p->graph, mats, x, p->jobs, n_jobs);
    if (make_units(p, many_rows)) return GS_E_NOMEM;
    for (int r = 0; r < n_rows && !many_rows; r++) quantize_row(p, r);
    p->n_tasks[0] = many_rows ? n_rows : 0;
    p->n_tasks[1] = p->n_units * 2 * p->chunks_ff;
    p->n_tasks[2] = p->n_jobs;
    p->n_tasks[3] = p->n_units * p->chunks_embd;
    for (int ph = 0; ph < PHASE_DONE; ph++) { atomic_store(&p->next[ph], 0); atomic_store(&p->done[ph], 0); }
    atomic_store(&p->phase, !p->n_jobs ? PHASE_DONE : many_rows ? 0 : 1);
    atomic_fetch_add(&p->gen, 1);
    if (atomic_load(&p->sleeping)) {
        pthread_mutex_lock(&p->mu);
        pthread_cond_broadcast(&p->cv);
        pthread_mutex_unlock(&p->mu);
    }
    return GS_OK;
}

void split_pool_finish(split_pool *p) {
    run_phases(p);                                   /* help, then wait for the last task and the workers */
    while (atomic_load(&p->phase) < PHASE_DONE || atomic_load(&p->active)) cpu_relax();
    if (p->graph_on) split_graph_finish(p->graph);
}

const float *split_pool_out(const split_pool *p, int job) {
    return p->graph_on ? split_graph_out(p->graph, job) : p->y + (size_t)job * p->n_embd;
}
