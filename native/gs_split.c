/* Mixture-of-experts layers split while generating (gs_engine_set_split_experts).
 *
 * A token reads only its routed experts: of a split layer's routed experts,
 * the first n_upload (per decode, over its rows) are copied from host memory
 * into a small device region and computed there by llama.cpp's own kernels,
 * while the CPU computes the others from the same host copy. The PCIe link
 * and the CPU's memory bus then work on one layer at the same time, where
 * stock's --n-cpu-moe uses one of them per layer.
 *
 * The hook makes two boundaries per split layer:
 *   A, after ffn_moe_weights-L (the get_rows that read the routed ids): the
 *      ids are read and rewritten in place (uploaded experts -> their index in
 *      the region, the others -> a zero expert there, which adds nothing),
 *      the CPU's workers start on the others, the uploads land;
 *   B, after ffn_moe_out-L (the sum of the weighted experts): the CPU's part,
 *      weighted by the final routing weights (src[1] of ffn_moe_weighted-L),
 *      is added to it.
 * The region's tensors keep the expert count in their shape; every id the
 * kernels see is below n_upload + n_used (a zero expert per routing position
 * after the uploaded ones), so they read only the region. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <link.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gs_engine.h"

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

static int load_cpu_kernels(void) {
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
    return GS_OK;
}

/* ---- one layer's CPU work: experts of some rows, in three phases ------------- */

enum { W_GATE, W_UP, W_DOWN };
#define CHUNK_ROWS 32
#define PHASE_DONE 4

typedef struct {                  /* one expert of one row the CPU computes */
    int row, pos, expert;
} cpu_job;

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
    int type[3], n_ff, n_embd, chunks_ff, chunks_embd;
    const struct type_traits_cpu *tr[3];
    size_t xq_row, hq_row;        /* bytes of a quantized x row (gate/up) and h (down) */
    int n_jobs;
    cpu_job *jobs;
    char *xq;                     /* per row of the ubatch: x quantized for gate, then for up */
    float *g, *u;                 /* per job: n_ff */
    char *hq;                     /* per job: silu(g)*u quantized for down */
    float *y;                     /* per job: n_embd */
    size_t cap_jobs, cap_xq, cap_g, cap_u, cap_hq, cap_y;
};

static void cpu_relax(void) { __asm__ __volatile__("" ::: "memory"); }

static void do_task(struct split_pool *p, int ph, int i) {
    if (ph == 1) {                /* gate and up rows: job, matrix, chunk */
        int per_job = 2 * p->chunks_ff, j = i / per_job, m = (i % per_job) / p->chunks_ff;
        int r0 = (i % p->chunks_ff) * CHUNK_ROWS, r1 = r0 + CHUNK_ROWS < p->n_ff ? r0 + CHUNK_ROWS : p->n_ff;
        const cpu_job *jb = &p->jobs[j];
        const char *w = p->src[m] + (size_t)jb->expert * p->nb2[m];
        const char *xq = p->xq + (size_t)jb->row * 2 * p->xq_row + (size_t)m * p->xq_row;
        float *out = (m == W_GATE ? p->g : p->u) + (size_t)j * p->n_ff;
        for (int r = r0; r < r1; r++) p->tr[m]->vec_dot(p->n_embd, &out[r], 0, w + r * p->nb1[m], 0, xq, 0, 1);
    } else if (ph == 2) {         /* the activation, quantized for down */
        float *g = p->g + (size_t)i * p->n_ff, *u = p->u + (size_t)i * p->n_ff;
        swiglu(p->n_ff, g, g, u);
        traits_cpu(p->tr[W_DOWN]->vec_dot_type)->from_float(g, p->hq + (size_t)i * p->hq_row, p->n_ff);
    } else {                      /* down rows: job, chunk */
        int j = i / p->chunks_embd, r0 = (i % p->chunks_embd) * CHUNK_ROWS;
        int r1 = r0 + CHUNK_ROWS < p->n_embd ? r0 + CHUNK_ROWS : p->n_embd;
        const char *w = p->src[W_DOWN] + (size_t)p->jobs[j].expert * p->nb2[W_DOWN];
        float *y = p->y + (size_t)j * p->n_embd;
        for (int r = r0; r < r1; r++)
            p->tr[W_DOWN]->vec_dot(p->n_ff, &y[r], 0, w + r * p->nb1[W_DOWN], 0, p->hq + (size_t)j * p->hq_row, 0, 1);
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

static void pool_free(struct split_pool *p) {
    if (!p) return;
    atomic_store(&p->stop, 1);
    pthread_mutex_lock(&p->mu);
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    for (int k = 0; k < p->n_th; k++) pthread_join(p->th[k], NULL);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv);
    free(p->th); free(p->jobs); free(p->xq); free(p->g); free(p->u); free(p->hq); free(p->y);
    free(p);
}

static int pool_create(int n_workers, struct split_pool **out) {
    struct split_pool *p = calloc(1, sizeof *p);
    if (!p) return fail(GS_E_NOMEM, "split experts: calloc");
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    atomic_store(&p->phase, PHASE_DONE);
    p->th = calloc(n_workers > 0 ? n_workers : 1, sizeof *p->th);
    if (!p->th) { free(p); return fail(GS_E_NOMEM, "split experts: calloc"); }
    for (; p->n_th < n_workers; p->n_th++)
        if (pthread_create(&p->th[p->n_th], NULL, worker, p)) {
            pool_free(p);
            return fail(GS_E_NOMEM, "split experts: pthread_create failed");
        }
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

/* Post the jobs (p->jobs[0..n_jobs)) of `layer` on x (rows of n_embd floats). */
static int pool_post(gs_engine *e, int layer, const float *x, int n_rows) {
    struct split_pool *p = e->split.pool;
    while (atomic_load(&p->active)) cpu_relax();     /* stragglers of the last layer leave first */
    const int *rec = e->split.rec[layer];
    for (int m = 0; m < 3; m++) {
        const struct gs_tensor *t = e->recs[rec[m]].t;
        p->src[m] = e->up[rec[m]].src;
        p->nb1[m] = t->nb[1];
        p->nb2[m] = t->nb[2];
        p->type[m] = t->type;
        p->tr[m] = traits_cpu(t->type);
    }
    const struct gs_tensor *gate = e->recs[rec[W_GATE]].t;
    p->n_embd = (int)gate->ne[0];
    p->n_ff = (int)gate->ne[1];
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
    for (int r = 0; r < n_rows; r++)
        for (int m = W_GATE; m <= W_UP; m++)
            traits_cpu(p->tr[m]->vec_dot_type)->from_float(x + (size_t)r * p->n_embd,
                                                           p->xq + (size_t)r * 2 * p->xq_row + m * p->xq_row, p->n_embd);
    p->n_tasks[0] = 0;
    p->n_tasks[1] = p->n_jobs * 2 * p->chunks_ff;
    p->n_tasks[2] = p->n_jobs;
    p->n_tasks[3] = p->n_jobs * p->chunks_embd;
    for (int ph = 0; ph < PHASE_DONE; ph++) { atomic_store(&p->next[ph], 0); atomic_store(&p->done[ph], 0); }
    atomic_store(&p->phase, p->n_jobs ? 1 : PHASE_DONE);
    atomic_fetch_add(&p->gen, 1);
    if (atomic_load(&p->sleeping)) {
        pthread_mutex_lock(&p->mu);
        pthread_cond_broadcast(&p->cv);
        pthread_mutex_unlock(&p->mu);
    }
    return GS_OK;
}

/* ---- device reads and writes: the split's own stream (CUDA), memcpy (host) ---- */

static int dio(gs_engine *e, void *dst, const void *src, size_t n, int kind) {
    if (!e->cfg.use_cuda) { memcpy(dst, src, n); return GS_OK; }
    int err = C.MemcpyAsync(dst, src, n, kind, e->split.stream);
    return err ? cuda_fail("cudaMemcpyAsync", err) : GS_OK;
}

static int dio_sync(gs_engine *e) {
    int err = e->cfg.use_cuda ? C.StreamSynchronize(e->split.stream) : CUDA_SUCCESS;
    return err ? cuda_fail("cudaStreamSynchronize", err) : GS_OK;
}

static void stage_free(gs_engine *e) {
    if (e->split.stage) e->cfg.use_cuda ? (void)C.FreeHost(e->split.stage) : free(e->split.stage);
    e->split.stage = NULL;
    e->split.cap_stage = 0;
}

/* Host memory the small reads and writes go through (pinned on CUDA: async). */
static int stage_grow(gs_engine *e, size_t want) {
    if (want <= e->split.cap_stage) return GS_OK;
    want = align_up(2 * want, 4096);
    void *p = NULL;
    if (e->cfg.use_cuda) {
        int err = C.HostAlloc(&p, want, 0);
        if (err) return cuda_fail("cudaHostAlloc", err);
    } else if (!(p = malloc(want))) return fail(GS_E_NOMEM, "split experts: malloc(%zu)", want);
    stage_free(e);
    e->split.stage = p;
    e->split.cap_stage = want;
    return GS_OK;
}

/* ---- the hook's part --------------------------------------------------------- */

enum { MODE_TWO = 1, MODE_ONE = 2 };   /* per layer and decode: which boundaries it takes */

static int split_layer_of(const gs_engine *e, const struct gs_tensor *t, const char *prefix) {
    int i = parse_index(t->name, prefix, '\0');
    return i >= 0 && i < e->cfg.n_layer && e->split.on[i] && !e->layers[i].gr_live ? i : -1;
}

static int rec_layer(const gs_engine *e, const struct gs_tensor *w) {
    int idx = w ? ptrmap_get(&e->rec_map, w) : -1;
    return idx < 0 ? -1 : e->recs[idx].layer;
}

/* The node that computes the final routing weights (behind reshapes and
 * views), by name less its layer: "ffn_moe_weights_norm-" for qwen3moe. Once
 * known, a layer takes one boundary there instead of two. */
static void learn_weights_node(gs_engine *e, const struct gs_tensor *w) {
    while (w && (!strcmp(G.op_name(w->op), "RESHAPE") || !strcmp(G.op_name(w->op), "VIEW"))) w = w->src[0];
    const char *dash = w ? strrchr(w->name, '-') : NULL;
    if (!dash || strncmp(w->name, "ffn_moe_weights", 15) || dash - w->name >= (long)sizeof e->split.weights_node - 1)
        return;
    snprintf(e->split.weights_node, sizeof e->split.weights_node, "%.*s", (int)(dash - w->name + 1), w->name);
}

int split_ask(gs_engine *e, const struct gs_tensor *t) {
    if (!e->split.n || e->phase != GS_PHASE_GENERATE) return 0;
    int i;
    if ((i = split_layer_of(e, t, "ffn_inp-")) >= 0) { e->split.inp[i] = (struct gs_tensor *)t; return 0; }
    if ((i = split_layer_of(e, t, "ffn_moe_logits-")) >= 0) { e->split.x[i] = t->src[1]; return 0; }
    if ((i = split_layer_of(e, t, "ffn_moe_topk-")) >= 0) {     /* a new decode's routing for layer i */
        e->split.ids[i] = (struct gs_tensor *)t;
        e->split.routed[i] = 0;
        e->split.mode[i] = e->split.weights_node[0] && e->split.inp[i] ? MODE_ONE : MODE_TWO;
        return 0;
    }
    if ((i = split_layer_of(e, t, e->split.weights_node[0] ? e->split.weights_node : "ffn_moe_weights-")) >= 0
        && e->split.mode[i] == MODE_ONE) {
        e->split.w[i] = (struct gs_tensor *)t;
        return 1;
    }
    if ((i = split_layer_of(e, t, "ffn_moe_weights-")) >= 0 && e->split.mode[i] == MODE_TWO) return 1;
    if ((i = split_layer_of(e, t, "ffn_moe_weighted-")) >= 0 && e->split.mode[i] == MODE_TWO) {
        e->split.w[i] = t->src[1];
        learn_weights_node(e, t->src[1]);
        return 0;
    }
    if ((i = split_layer_of(e, t, "ffn_moe_out-")) >= 0 && e->split.mode[i] == MODE_TWO) return 1;
    /* a node reading a split layer's experts runs only after its routing was rewritten */
    for (int k = 0; k < 3; k++) {
        int l = rec_layer(e, t->src[k]);
        if (l >= 0 && e->split.on[l] && !e->layers[l].gr_live && !e->split.routed[l]) {
            engine_fail(e, fail(GS_E_GRAPH, "split experts: %s reads layer %d's experts before its routing was seen "
                                "(ffn_moe_topk/ffn_moe_weights-%d): this graph's expert block is not the one the "
                                "split knows", t->name, l, l));
            return 1;
        }
    }
    return 0;
}

/* Staging layout of a ubatch: ids, x, routing weights, the residual (or expert sum). */
typedef struct { size_t ids, x, w, y, end; } stage_at;

static stage_at stage_layout(size_t n_ids, size_t n_rows, size_t n_embd) {
    stage_at a;
    a.ids = 0;
    a.x = align_up(n_ids * sizeof(int32_t), 64);
    a.w = align_up(a.x + n_rows * n_embd * sizeof(float), 64);
    a.y = align_up(a.w + n_ids * sizeof(float), 64);
    a.end = a.y + n_rows * n_embd * sizeof(float);
    return a;
}

/* The CPU's experts, weighted, onto y (rows of n_embd); then y goes back to `to`. */
static int add_cpu_part(gs_engine *e, int layer, const float *w, float *y, struct gs_tensor *to, int n_used) {
    struct split_pool *p = e->split.pool;
    double t0 = now_s();
    run_phases(p);                                   /* help, then wait for the last task */
    while (atomic_load(&p->phase) < PHASE_DONE) cpu_relax();
    e->ctr.split_cpu_wait_seconds += now_s() - t0;
    for (int j = 0; j < p->n_jobs; j++) {
        const cpu_job *jb = &p->jobs[j];
        float wk = w[(size_t)jb->row * n_used + jb->pos], *o = y + (size_t)jb->row * p->n_embd;
        const float *yj = p->y + (size_t)j * p->n_embd;
        for (int c = 0; c < p->n_embd; c++) o[c] += wk * yj[c];
    }
    (void)layer;
    return dio(e, to->data, y, (size_t)e->split.rows[layer] * p->n_embd * sizeof(float), CUDA_H2D);
}

/* The boundary where a layer's routing is known: read it, choose, rewrite
 * the ids, start the CPU, upload. MODE_ONE (the final weights and the
 * residual at hand): finish the CPU's part into the residual here too. */
static int route(gs_engine *e, int layer) {
    struct gs_tensor *ids = e->split.ids[layer], *x = e->split.x[layer], *w = e->split.w[layer], *inp = e->split.inp[layer];
    int one = e->split.mode[layer] == MODE_ONE;
    if (!ids || !x || ids->type != 26 /* GGML_TYPE_I32 */ || x->type != 0 /* F32 */
        || (one && (!w || !inp || w->type != 0 || inp->type != 0)))
        return fail(GS_E_GRAPH, "split experts: layer %d's routing tensors were not seen (or not I32 ids / F32 input)",
                    layer);
    struct split_pool *p = e->split.pool;
    int n_used = (int)ids->ne[0], n_rows = (int)ids->ne[1], n_expert = (int)e->recs[e->split.rec[layer][0]].t->ne[2];
    int n_embd = (int)x->ne[0];
    if (n_used > e->split.n_used)
        return fail(GS_E_GRAPH, "split experts: layer %d routes %d experts per token, the region has zero experts for %d",
                    layer, n_used, e->split.n_used);
    if (x->ne[1] * x->ne[2] != n_rows || n_embd != e->recs[e->split.rec[layer][W_GATE]].t->ne[0]
        || (one && (inp->ne[0] != n_embd || inp->ne[1] * inp->ne[2] != n_rows || (size_t)w->ne[0] * w->ne[1] * w->ne[2]
                    != (size_t)n_used * n_rows)))
        return fail(GS_E_GRAPH, "split experts: layer %d's expert input, weights or residual have unexpected shapes", layer);
    size_t n_ids = (size_t)n_used * n_rows;
    stage_at at = stage_layout(n_ids, n_rows, n_embd);
    int rc = stage_grow(e, at.end);
    if (!rc) rc = grow((void **)&p->jobs, &p->cap_jobs, n_ids * sizeof(cpu_job));
    if (rc) return rc;
    char *st = e->split.stage;
    int32_t *id = (int32_t *)(st + at.ids);
    for (int r = 0; r < n_rows && !rc; r++)
        rc = dio(e, id + (size_t)r * n_used, (char *)ids->data + (size_t)r * ids->nb[1], n_used * sizeof(int32_t), CUDA_D2H);
    if (!rc) rc = dio(e, st + at.x, x->data, (size_t)n_rows * n_embd * sizeof(float), CUDA_D2H);
    if (!rc && one) rc = dio(e, st + at.w, w->data, n_ids * sizeof(float), CUDA_D2H);
    if (!rc && one) rc = dio(e, st + at.y, inp->data, (size_t)n_rows * n_embd * sizeof(float), CUDA_D2H);
    if (!rc) rc = dio_sync(e);
    if (rc) return rc;
    /* uploaded: the first n_upload distinct experts in routing order (row 0's
     * best first); the rest of each row's go to the CPU */
    int slot_of[n_expert], n_up = 0;
    for (int k = 0; k < n_expert; k++) slot_of[k] = -1;
    p->n_jobs = 0;
    for (size_t k = 0; k < n_ids; k++) {
        int ex = id[k];
        if (ex < 0 || ex >= n_expert) return fail(GS_E_GRAPH, "split experts: layer %d routed to expert %d of %d", layer, ex, n_expert);
        if (slot_of[ex] < 0 && n_up < e->split.n_upload) { slot_of[ex] = n_up; e->split.up_ids[n_up++] = ex; }
        if (slot_of[ex] < 0) p->jobs[p->n_jobs++] = (cpu_job){ (int)(k / n_used), (int)(k % n_used), ex };
        /* a left-out expert reads a zero expert of its own position: llama.cpp's
         * batched kernels group a ubatch's rows by expert, at most one per row */
        id[k] = slot_of[ex] >= 0 ? slot_of[ex] : e->split.n_upload + (int)(k % n_used);
    }
    e->split.rows[layer] = n_rows;
    rc = pool_post(e, layer, (const float *)(st + at.x), n_rows);   /* the CPU starts first */
    for (int m = 0; m < 3 && !rc; m++) {
        int k = e->split.rec[layer][m];
        size_t nb2 = e->recs[k].t->nb[2];
        for (int j = 0; j < n_up && !rc; j++)
            rc = dio(e, e->split.base + e->split.off[layer][m] + j * nb2,
                     (const char *)e->up[k].src + (size_t)e->split.up_ids[j] * nb2, nb2, CUDA_H2D);
    }
    for (int r = 0; r < n_rows && !rc; r++)
        rc = dio(e, (char *)ids->data + (size_t)r * ids->nb[1], id + (size_t)r * n_used, n_used * sizeof(int32_t), CUDA_H2D);
    if (!rc && one) rc = add_cpu_part(e, layer, (const float *)(st + at.w), (float *)(st + at.y), inp, n_used);
    double t0 = now_s();
    if (!rc) rc = dio_sync(e);
    e->ctr.split_upload_seconds += now_s() - t0;
    e->ctr.split_uploaded += n_up;
    e->ctr.split_cpu += p->n_jobs;
    e->ctr.split_layers++;
    e->split.routed[layer] = 1;
    return rc;
}

/* MODE_TWO's second boundary, after ffn_moe_out-L: the CPU's part into the expert sum. */
static int add_to_sum(gs_engine *e, int layer, struct gs_tensor *out) {
    struct split_pool *p = e->split.pool;
    struct gs_tensor *w = e->split.w[layer];
    int n_rows = e->split.rows[layer], n_embd = p->n_embd, n_used = (int)e->split.ids[layer]->ne[0];
    if (!w || w->type != 0 || out->type != 0 || out->ne[0] != n_embd)
        return fail(GS_E_GRAPH, "split experts: layer %d's routing weights or expert sum were not as expected", layer);
    size_t n_ids = (size_t)n_used * n_rows;
    stage_at at = stage_layout(n_ids, n_rows, n_embd);
    char *st = e->split.stage;
    int rc = dio(e, st + at.w, w->data, n_ids * sizeof(float), CUDA_D2H);
    if (!rc) rc = dio(e, st + at.y, out->data, (size_t)n_rows * n_embd * sizeof(float), CUDA_D2H);
    if (!rc) rc = dio_sync(e);
    if (!rc) rc = add_cpu_part(e, layer, (const float *)(st + at.w), (float *)(st + at.y), out, n_used);
    if (!rc) rc = dio_sync(e);
    e->split.mode[layer] = 0;
    return rc;
}

/* Between decodes: the CPU's last job done, and nothing kept from the last
 * graph (a graph's tensors are seen again at each decode; the context may be
 * gone). */
void split_settle(gs_engine *e) {
    if (!e->split.n) return;
    struct split_pool *p = e->split.pool;
    run_phases(p);
    while (atomic_load(&p->phase) < PHASE_DONE || atomic_load(&p->active)) cpu_relax();
    size_t n = e->cfg.n_layer;
    memset(e->split.x, 0, n * sizeof *e->split.x);
    memset(e->split.ids, 0, n * sizeof *e->split.ids);
    memset(e->split.w, 0, n * sizeof *e->split.w);
    memset(e->split.inp, 0, n * sizeof *e->split.inp);
    memset(e->split.mode, 0, n);
    memset(e->split.routed, 0, n);
}

void split_synced(gs_engine *e, struct gs_tensor *t) {
    if (!e->split.n || e->phase != GS_PHASE_GENERATE || e->status) return;
    int i, rc = GS_OK;
    const char *first = e->split.weights_node[0] ? e->split.weights_node : "ffn_moe_weights-";
    if ((i = split_layer_of(e, t, first)) >= 0 && e->split.mode[i] == MODE_ONE && !e->split.routed[i])
        rc = route(e, i);
    else if ((i = split_layer_of(e, t, "ffn_moe_weights-")) >= 0 && e->split.mode[i] == MODE_TWO && !e->split.routed[i])
        rc = route(e, i);
    else if ((i = split_layer_of(e, t, "ffn_moe_out-")) >= 0 && e->split.mode[i] == MODE_TWO && e->split.routed[i])
        rc = add_to_sum(e, i, t);
    if (rc) engine_fail(e, rc);
}

/* ---- placement ---------------------------------------------------------------- */

/* Split layers' expert tensors read from the region while generating. */
void split_point(gs_engine *e, int layer) {
    for (int m = 0; m < 3; m++) {
        const srec *r = &e->recs[e->split.rec[layer][m]];
        r->t->buffer = e->split.buf;
        r->t->extra = r->src_extra;
        r->t->data = e->split.base + e->split.off[layer][m];
    }
}

void split_free(gs_engine *e) {
    pool_free(e->split.pool);
    e->split.pool = NULL;
    if (e->split.buf) G.buffer_free(e->split.buf);
    e->split.buf = NULL;
    e->split.base = NULL;
    stage_free(e);
    if (e->split.stream) C.StreamDestroy(e->split.stream);
    free(e->split.on); free(e->split.rec); free(e->split.off); free(e->split.x); free(e->split.ids);
    free(e->split.w); free(e->split.inp); free(e->split.mode); free(e->split.routed); free(e->split.rows);
    memset(&e->split, 0, sizeof e->split);
}

/* The layer's gate, up and down expert tensors among its records. */
static int find_experts(gs_engine *e, int layer, int rec[3]) {
    static const char *names[3] = { ".ffn_gate_exps.weight", ".ffn_up_exps.weight", ".ffn_down_exps.weight" };
    const layer_info *ly = &e->layers[layer];
    rec[0] = rec[1] = rec[2] = -1;
    for (int k = ly->first; k < ly->first + ly->count; k++) {
        const char *name = e->recs[k].t->name;
        int m = 0;
        while (m < 3 && !(strstr(name, names[m]) && !strcmp(strstr(name, names[m]), names[m]))) m++;
        if (m < 3) rec[m] = k;
        else if (strstr(name, "_exps"))   /* biases or scales indexed by the routed ids would read rewritten ones */
            return fail(GS_E_INVALID, "split experts: layer %d has %s; only plain gate/up/down expert weights can "
                        "be split", layer, name);
    }
    for (int m = 0; m < 3; m++) {
        if (rec[m] < 0)
            return fail(GS_E_INVALID, "split experts: layer %d has no streamed %s tensor (separate gate, up and down "
                        "expert tensors are needed)", layer, names[m] + 1);
        const struct gs_tensor *t = e->recs[rec[m]].t;
        const struct type_traits_cpu *tr = traits_cpu(t->type);
        if (!tr || !tr->vec_dot || !traits_cpu(tr->vec_dot_type)->from_float || t->ne[3] != 1)
            return fail(GS_E_INVALID, "split experts: the CPU has no dot product for %s's type %d", t->name, t->type);
    }
    const struct gs_tensor *g = e->recs[rec[0]].t, *u = e->recs[rec[1]].t, *d = e->recs[rec[2]].t;
    if (g->ne[0] != u->ne[0] || g->ne[1] != u->ne[1] || d->ne[0] != g->ne[1] || d->ne[1] != g->ne[0]
        || g->ne[2] != u->ne[2] || g->ne[2] != d->ne[2])
        return fail(GS_E_INVALID, "split experts: layer %d's expert tensors do not have gate/up [n_embd, n_ff, n] and "
                    "down [n_ff, n_embd, n] shapes", layer);
    if (e->split.n_upload + e->split.n_used > g->ne[2])
        return fail(GS_E_INVALID, "split experts: %d uploaded experts and %d zero ones (one per expert used) need %d "
                    "experts per layer (it has %lld)", e->split.n_upload, e->split.n_used,
                    e->split.n_upload + e->split.n_used, (long long)g->ne[2]);
    return GS_OK;
}

static int alloc_arrays(gs_engine *e) {
    int n = e->cfg.n_layer;
    e->split.on = calloc(n, 1);
    e->split.rec = calloc(n, sizeof *e->split.rec);
    e->split.off = calloc(n, sizeof *e->split.off);
    e->split.x = calloc(n, sizeof *e->split.x);
    e->split.ids = calloc(n, sizeof *e->split.ids);
    e->split.w = calloc(n, sizeof *e->split.w);
    e->split.inp = calloc(n, sizeof *e->split.inp);
    e->split.mode = calloc(n, 1);
    e->split.routed = calloc(n, 1);
    e->split.rows = calloc(n, sizeof *e->split.rows);
    if (!e->split.on || !e->split.rec || !e->split.off || !e->split.x || !e->split.ids || !e->split.w
        || !e->split.inp || !e->split.mode || !e->split.routed || !e->split.rows)
        return fail(GS_E_NOMEM, "split experts: calloc");
    return GS_OK;
}

int gs_engine_set_split_experts(gs_engine *e, const int *layers, int n, int n_upload, int n_used, int n_threads) {
    if (!e->started) return fail(GS_E_INVALID, "set_split_experts: the engine has not started");
    if (e->kv.attached && e->kv.reuse_min_batch && !e->kv.graphs_dropped)
        return fail(GS_E_INVALID, "set_split_experts: the attached context reuses graphs built with the old placement");
    if (n < 0 || (n > 0 && (n_upload < 0 || n_upload > GS_SPLIT_MAX_UPLOAD || n_used < 1 || n_threads < 1)))
        return fail(GS_E_INVALID, "set_split_experts: %d layers, %d uploaded experts (0 .. %d), %d used, %d threads", n,
                    n_upload, GS_SPLIT_MAX_UPLOAD, n_used, n_threads);
    int rc = switch_phase(e, GS_PHASE_PROMPT);
    if (rc) return rc;
    split_free(e);
    generate_order(e);
    if (n == 0) return GS_OK;
    if ((rc = load_cpu_kernels()) || (rc = alloc_arrays(e))) { split_free(e); return rc; }
    e->split.n_upload = n_upload;
    e->split.n_used = n_used;
    size_t align = G.buft_get_alignment(e->cfg.ring_buft), region = 0;
    if (!align) align = 1;
    for (int k = 0; k < n && !rc; k++) {
        int i = layers[k];
        if (i < 0 || i >= e->cfg.n_layer || e->layers[i].count == 0)
            rc = fail(GS_E_INVALID, "split experts: layer %d is not a streamed layer", i);
        else if (e->layers[i].cpu_generate || e->layers[i].disk_bytes)
            rc = fail(GS_E_INVALID, "split experts: layer %d is a CPU or disk-tier layer", i);
        else if (!(rc = find_experts(e, i, e->split.rec[i]))) {
            size_t at = 0;
            for (int m = 0; m < 3; m++) {
                e->split.off[i][m] = at;
                at = align_up(at + (size_t)(n_upload + n_used) * e->recs[e->split.rec[i][m]].t->nb[2] + 512, align);
            }
            if (at > region) region = at;
            e->split.on[i] = 1;
        }
    }
    if (!rc) {
        e->split.buf = G.buft_alloc_buffer(e->cfg.ring_buft, region);
        if (!e->split.buf) rc = fail(GS_E_GGML, "split experts: no room for the %zu-byte device region", region);
    }
    if (!rc) {
        G.buffer_set_usage(e->split.buf, GGML_USAGE_WEIGHTS);
        G.buffer_clear(e->split.buf, 0);      /* the zero experts (and the padding after them) stay zero */
        e->split.base = G.buffer_get_base(e->split.buf);
        e->split.bytes = region;
        rc = pool_create(n_threads - 1, &e->split.pool);
    }
    if (!rc && e->cfg.use_cuda) {
        int err = C.StreamCreateWithFlags(&e->split.stream, CUDA_STREAM_NON_BLOCKING);
        if (err) { e->split.stream = NULL; rc = cuda_fail("cudaStreamCreateWithFlags", err); }
    }
    if (rc) { split_free(e); return rc; }
    e->split.n = n;
    e->size.split_region_bytes = region;
    generate_order(e);
    return GS_OK;
}
